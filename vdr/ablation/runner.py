"""One attempt of one ablation run: ``vdr fit`` in a child process, its output teed to a log, then measured.

The child is started with ``Popen`` and reaped with ``os.wait4``, which returns the child's own resource usage: its
peak resident set (``ru_maxrss``, the largest of the child and of the processes it waited for) without the sweep's
or other runs'. Wall time counts the whole process, start-up and data loading included.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vdr.ablation.metrics import read_scalars, summarize_all
from vdr.ablation.record import Outcome, RunDir
from vdr.ablation.summary import SUMMARY_FILE
from vdr.config_includes import expand_includes

# What a run executes before its arguments (tests replace it with a stand-in process).
FIT = [sys.executable, "-m", "vdr", "fit"]
SUMMARY_CALLBACK = "vdr.ablation.summary.PeakMemory"


@dataclass(frozen=True)
class Launch:
    """A finished child process: exit code, wall-clock seconds and peak resident set in bytes."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int


def launch(command: list[str], log: Path, echo: bool = True) -> Launch:
    """Runs ``command``, writing its stdout and stderr to ``log`` (and to our stdout when ``echo``) as they come.

    If this process is interrupted, the child is terminated (killed after 30 s) before the exception goes on.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they are printed
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        with open(log, "wb") as handle:
            while chunk := os.read(process.stdout.fileno(), 1 << 16):  # raw chunks keep progress bars' \r
                handle.write(chunk)
                handle.flush()
                if echo:
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        process.stdout.close()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    return Launch(process.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024)  # ru_maxrss: KiB


def config_digest(fit_args: list[str] | tuple[str, ...]) -> str | None:
    """SHA-256 over the contents of every config file the arguments name, includes expanded, in order (None if one
    cannot be read: the run reports that itself)."""
    digest = hashlib.sha256()
    try:
        words = expand_includes(list(fit_args))
    except (OSError, ValueError):
        return None
    for flag, value in zip(words, words[1:]):
        if flag == "--config":
            digest.update(Path(value).read_bytes() if os.path.isfile(value) else value.encode())
    return digest.hexdigest()


def attempt_command(fit_args: list[str] | tuple[str, ...], runs_root: Path, run: RunDir, attempt: int) -> list[str]:
    """The attempt's command: ``vdr fit`` with the run's arguments, logging to ``runs_root/RUN/attempt_N``."""
    return [*FIT, *fit_args, "--trainer.logger.init_args.save_dir", str(runs_root),
            "--trainer.logger.init_args.name", run.name, "--trainer.logger.init_args.version", f"attempt_{attempt}",
            "--trainer.callbacks+", SUMMARY_CALLBACK]


def run_attempt(fit_args: list[str] | tuple[str, ...], run: RunDir, echo: bool = True) -> Outcome:
    """Runs the next attempt of ``run``, reads its metrics and summary, and saves its outcome (see ``RunDir.save``)."""
    attempt = run.next_attempt()
    command = attempt_command(fit_args, run.path.parent, run, attempt)
    stale = run.path / "result.json"  # a finished run rerun on purpose (its command changed): the attempt keeps it
    stale.unlink(missing_ok=True)
    digest = config_digest(fit_args)
    launched = launch(command, run.log(attempt), echo)
    log_dir = run.log_dir(attempt)
    summary_path = log_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    curves = read_scalars(log_dir) if log_dir.is_dir() else {}
    error = None
    if launched.returncode != 0:
        error = f"exit code {launched.returncode}"
    elif summary is None:
        error = f"exited 0 without {SUMMARY_FILE}: the fit did not reach its end"
    outcome = Outcome(
        run=run.name, attempt=attempt, status="failed" if error else "ok", error=error, fit_args=list(fit_args),
        config_sha256=digest, command=command, log=str(run.log(attempt)), log_dir=str(log_dir),
        wall_s=round(launched.wall_s, 2), peak_rss_bytes=launched.peak_rss_bytes,
        peak_gpu_bytes=(summary or {}).get("peak_gpu_bytes"), global_step=(summary or {}).get("global_step"),
        metrics={tag: asdict(metric) for tag, metric in summarize_all(curves).items()},
        curves={tag: [[step, value] for step, value in curve] for tag, curve in curves.items()},
    )
    run.save(outcome)
    return outcome
