"""``vdr ablate``: every combination of a grid of ``vdr fit`` overrides, one run at a time, resumable, then reported.

Output layout::

    OUTPUT/grid.yaml                 the grid file of the latest invocation
    OUTPUT/results.csv, results.md   one row per run (rewritten after every run)
    OUTPUT/plots/<metric>.png        each validation metric against the step, one line per run
    OUTPUT/runs/RUN/attempt_N.log    an attempt's output; attempt_N/ its events, checkpoints and config.yaml
    OUTPUT/runs/RUN/result.json      the finished run (see vdr.ablation.record)
"""

from __future__ import annotations

import datetime
import difflib
import fcntl
import shlex
import shutil
import time
from pathlib import Path

from vdr.ablation.grid import Grid, GridError, Run, load_grid
from vdr.ablation.record import RunDir
from vdr.ablation.report import Row, write_reports
from vdr.ablation.runner import config_digest, run_attempt


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _difference(old: list[str], new: list[str]) -> str:
    """The words that differ between two commands, each change with the flag before it: ``--a.b 4 -> 5``."""
    changes = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op != "equal":
            flag = old[i1 - 1] if i1 > 0 and old[i1 - 1].startswith("--") and op == "replace" else ""
            changes.append(f"{flag} {shlex.join(old[i1:i2]) or '(nothing)'} -> {shlex.join(new[j1:j2]) or '(nothing)'}")
    return "; ".join(change.strip() for change in changes)


def _check_finished(grid: Grid, runs: list[Run], dirs: list[RunDir], rerun_changed: bool) -> set[str]:
    """Names of the finished runs whose result still stands; raises GridError for a changed one (see the command)."""
    finished, changed = set(), []
    for run, folder in zip(runs, dirs):
        result = folder.result()
        if result is None:
            continue
        # Another command, or the same command over config files whose contents changed (a longer schedule in the
        # base config is another run as much as a changed flag is).
        if result.fit_args != list(run.fit_args) or result.config_sha256 != config_digest(run.fit_args):
            changed.append((run, result))
            continue
        finished.add(run.name)
    if changed and not rerun_changed:
        run, result = changed[0]
        difference = (_difference(result.fit_args, list(run.fit_args)) if result.fit_args != list(run.fit_args)
                      else "the contents of a config file it reads changed")
        raise GridError(
            f"{grid.path}: {len(changed)} finished run(s) now have another command: "
            f"{', '.join(r.name for r, _ in changed)} (e.g. {run.name}: {difference})."
            " Use a new --output for a new grid, or pass --rerun_changed true to run them again (as new attempts; "
            "earlier attempts are kept).")
    return finished


def _headline(metrics: dict[str, dict[str, float]]) -> str:
    tag = next((t for t in metrics if "ndcg@10" in t), next(iter(metrics), None))
    if tag is None:
        return "no val/ metrics"
    metric = metrics[tag]
    return f"{tag} best {metric['best']:.4f} @ {metric['best_step']}, final {metric['final']:.4f}"


def ablate_command(grid: Path, output: Path, dry_run: bool = False, rerun_changed: bool = False,
                   quiet: bool = False) -> None:
    """Run every combination of a grid of `vdr fit` overrides in turn; resumable; results in a CSV, a table and plots.

    The grid file (YAML; paths relative to the current directory)::

        base: [configs/demo.yaml]          # the config stack of every run
        overrides: {trainer.max_steps: 100}  # flags of every run (dotted keys, as on the vdr fit command line)
        grid:                              # one run per combination, e.g. temperature=0.02,negatives=mined
          model.loss.temperature: [0.02, 0.05]
          negatives:                       # a named axis: each choice sets several flags
            mined: {data.train: checkpoints/data/mined/train}
            random: {data.train: checkpoints/data/random/train}

    A run is finished when OUTPUT/runs/RUN/result.json exists: rerunning the command skips it, and reruns failed and
    interrupted runs as a new attempt (attempt_N, earlier ones kept). A finished run whose command (or the contents of
    a config file it reads) has since changed stops the sweep before anything runs, unless --rerun_changed. After
    every run, OUTPUT/results.csv, results.md and plots/<metric>.png are rewritten: best and final value of each val/
    metric, wall time, peak RSS, peak GPU memory. Exits nonzero if a run failed (the others still run). One sweep at a
    time per OUTPUT (a lock file). The stack must log with a TensorBoardLogger (configs/trainer/default.yaml does):
    each run's logger is pointed at OUTPUT/runs/RUN/attempt_N.

    Args:
        grid: The grid file, YAML (paths relative to the current directory) with "base: [config files]" (the
            stack of every run), "overrides: {dotted.key: value}" (flags of every run, optional) and "grid:" whose
            entries are plain axes "dotted.key: [values]" or named axes "name: {choice: {dotted.key: value}}"; one
            run per combination, named like temperature=0.02,negatives=mined. Full format: vdr/ablation/grid.py.
        output: Directory of the sweep (created); rerun with the same one to resume.
        dry_run: Print each run's state and command, run nothing.
        rerun_changed: Run again (as a new attempt) the finished runs whose command changed instead of stopping.
        quiet: Do not print the runs' output (it always goes to OUTPUT/runs/RUN/attempt_N.log).
    """
    spec, output = load_grid(grid), Path(output)
    runs = spec.runs()
    dirs = [RunDir(output / "runs", run.name) for run in runs]
    finished = _check_finished(spec, runs, dirs, rerun_changed)
    print(f"vdr ablate: {len(runs)} runs from {spec.path} -> {output} ({len(finished)} finished, "
          f"{len(runs) - len(finished)} to run)", flush=True)
    if dry_run:
        for i, (run, folder) in enumerate(zip(runs, dirs), 1):
            state = "finished" if run.name in finished else "changed" if folder.result() else folder.state()[0]
            print(f"[{i}/{len(runs)}] {run.name} ({state}): vdr fit {shlex.join(run.fit_args)}")
        return
    output.mkdir(parents=True, exist_ok=True)
    lock = open(output / ".lock", "w")  # noqa: SIM115 - held (and released by the OS) for the life of the sweep
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise GridError(f"another vdr ablate is running on {output}; wait for it or use another --output") from None
    if spec.path.resolve() != (output / "grid.yaml").resolve():
        shutil.copyfile(spec.path, output / "grid.yaml")
    # A changed finished run (--rerun_changed) is pending: its old result is not this run's.
    rows = [Row(run, *folder.state()) if run.name in finished or folder.result() is None else Row(run, "pending", None)
            for run, folder in zip(runs, dirs)]
    write_reports(output, spec, rows)
    start, durations, failed = time.perf_counter(), [], []
    for i, (run, folder) in enumerate(zip(runs, dirs)):
        tag = f"[{i + 1}/{len(runs)}] {run.name}"
        if run.name in finished:
            print(f"{tag}: finished (attempt {rows[i].outcome.attempt}), skipped", flush=True)
            continue
        attempt = folder.next_attempt()
        after = f" (the last one {rows[i].status})" if rows[i].status in ("failed", "interrupted") else ""
        print(f"{tag}: attempt {attempt}{after}, log {folder.log(attempt)}", flush=True)
        outcome = run_attempt(run.fit_args, folder, echo=not quiet)
        durations.append(outcome.wall_s)
        rows[i] = Row(run, outcome.status, outcome)
        write_reports(output, spec, rows)
        left = sum(r.name not in finished for r in runs[i + 1:]) * sum(durations) / len(durations)
        progress = f"elapsed {_clock(time.perf_counter() - start)}, ~{_clock(left)} left"
        if outcome.status == "ok":
            gpu = f", peak GPU {outcome.peak_gpu_bytes / 2**30:.2f} GiB" if outcome.peak_gpu_bytes else ""
            print(f"{tag}: ok in {outcome.wall_s:.1f} s, peak RSS {outcome.peak_rss_bytes / 2**30:.2f} GiB{gpu}; "
                  f"{_headline(outcome.metrics)} ({progress})", flush=True)
        else:
            failed.append(f"{run.name} ({outcome.error}; log {outcome.log})")
            print(f"{tag}: FAILED after {outcome.wall_s:.1f} s: {outcome.error}; log {outcome.log} ({progress})",
                  flush=True)
    ok = sum(row.status == "ok" for row in rows)
    print(f"vdr ablate: {ok} of {len(runs)} runs finished, {len(failed)} failed in this invocation "
          f"({_clock(time.perf_counter() - start)}); results in {output / 'results.md'}", flush=True)
    if failed:
        raise SystemExit(f"vdr ablate: {len(failed)} run(s) failed: " + "; ".join(failed))
