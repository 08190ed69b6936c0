"""`vdr ablate`: grid files (expansion, names, errors), metric summaries from event files, the child process's
measurements, failures and retries with a stand-in for `vdr fit`, and a real 2-run sweep on the tiny model that
resumes."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from vdr.ablation import runner
from vdr.ablation.command import ablate_command
from vdr.ablation.grid import GridError, load_grid, run_name
from vdr.ablation.metrics import read_scalars, summarize, summarize_all
from vdr.ablation.record import Outcome, RunDir
from vdr.ablation.report import Row, markdown, plot_file

from .conftest import REPO

TINY_BASE = [str(REPO / f"configs/{name}.yaml") for name in ("trainer/default", "trainer/cpu", "callbacks/default",
                                                             "model/tiny")]


def _write(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))  # JSON is YAML
    return path


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "base.yaml", "trainer: {max_steps: 1}\n")
    return "base.yaml"


# ---- the grid file ---------------------------------------------------------------------------------------------------

def test_grid_expands_in_file_order_with_named_axes(tmp_path: Path, base: str) -> None:
    grid = load_grid(_write(tmp_path / "g.yaml", "# Hypothesis: h.\n# Run: vdr ablate ...\n" + json.dumps({
        "base": [base], "overrides": {"trainer.max_steps": 4, "model.loss": "X"},
        "grid": {"model.loss.temperature": [0.02, 0.05],
                 "negatives": {"mined": {"data.train": "m", "data.num_negatives": 2}, "none": {}},
                 "model.dims": [[64, 32], None, True]}})))
    runs = grid.runs()
    assert grid.header == "Hypothesis: h.\nRun: vdr ablate ..."
    assert [axis.label for axis in grid.axes] == ["temperature", "negatives", "dims"]
    assert len(runs) == 12
    assert [run.name for run in runs[:4]] == ["temperature=0.02,negatives=mined,dims=64-32",
                                              "temperature=0.02,negatives=mined,dims=null",
                                              "temperature=0.02,negatives=mined,dims=true",
                                              "temperature=0.02,negatives=none,dims=64-32"]
    assert runs[0].choices == {"temperature": "0.02", "negatives": "mined", "dims": "64-32"}
    # Base stack, then the overrides, then each axis's flags in file order; values as on a command line.
    assert list(runs[0].fit_args) == ["--config", base, "--trainer.max_steps", "4", "--model.loss", "X",
                                      "--model.loss.temperature", "0.02", "--data.train", "m",
                                      "--data.num_negatives", "2", "--model.dims", "[64, 32]"]
    assert list(runs[4].fit_args[-4:]) == ["--model.loss.temperature", "0.02", "--model.dims", "null"]


def test_axis_labels_grow_until_unique_and_names_are_safe(tmp_path: Path, base: str) -> None:
    axes = {"data.batch_size": [8], "model.batch_size": [2], "data.train": ["a/b c"]}
    grid = load_grid(_write(tmp_path / "g.yaml", {"base": base, "grid": axes}))
    assert [axis.label for axis in grid.axes] == ["data.batch_size", "model.batch_size", "train"]
    assert grid.runs()[0].name == "data.batch_size=8,model.batch_size=2,train=a_b_c"
    long = run_name([("x", "y" * 300)])
    assert len(long) == 150 and long != run_name([("x", "y" * 301)])


@pytest.mark.parametrize(("content", "message"), [
    ({"grid": {"a.b": [1]}}, "missing 'base'"),
    ({"base": "BASE"}, "missing 'grid'"),
    ({"base": "BASE", "grid": {"a.b": [1]}, "overides": {}}, "unknown section"),
    ({"base": ["nope.yaml"], "grid": {"a.b": [1]}}, "base[0]: config file 'nope.yaml' not found"),
    ({"base": "BASE", "grid": {"a.b": []}}, "grid.a.b has no values"),
    ({"base": "BASE", "grid": {"a.b": 0.1}}, "grid.a.b must be a list of values or a mapping"),
    ({"base": "BASE", "grid": {"v": {"x": [1]}}}, "grid.v.x must be a mapping of dotted keys"),
    ({"base": "BASE", "grid": {"v": {"x": {"--a.b": 1}}}}, "'--a.b' is not a dotted key"),
    ({"base": "BASE", "grid": {"a.b": [1, 1]}}, "would both be named 'b=1'"),
    ({"base": "BASE", "grid": {"a.b": ["x/y", "x_y"]}}, "would both be named 'b=x_y'"),
    ({"base": "BASE", "overrides": {"a.b": 1}, "grid": {"a.b": [2]}}, "a.b is set by both overrides and grid.a.b"),
    ({"base": "BASE", "grid": {"trainer.logger.init_args.name": ["x"]}}, "is set by vdr ablate"),
    ({"base": "BASE", "grid": {"config": ["missing.yaml"]}}, "grid.config: config file 'missing.yaml' not found"),
    ("base: BASE\ngrid:\n  a.b: [1]\n  a.b: [2]\n", "key 'a.b' appears twice"),
])
def test_grid_errors_name_the_file_and_the_key(tmp_path: Path, base: str, content: dict | str, message: str) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    path = _write(tmp_path / "bad.yaml", text.replace("BASE", base))
    with pytest.raises((GridError, FileNotFoundError)) as error:
        load_grid(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


# ---- metrics ---------------------------------------------------------------------------------------------------------

def test_best_and_final_from_several_event_files(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    # Two files, as validate_before_fit writes them; the later steps are in the first file written.
    for points in ([(2, 0.5, 2.0), (4, 0.3, 1.0)], [(0, 0.1, 3.0)]):
        with SummaryWriter(str(tmp_path)) as writer:
            for step, ndcg, loss in points:
                writer.add_scalar("val/ndcg@10", ndcg, step)
                writer.add_scalar("val/loss", loss, step)
                writer.add_scalar("train/loss", 9.0, step)
    curves = read_scalars(tmp_path)
    assert list(curves) == ["val/loss", "val/ndcg@10"]  # only val/ tags
    steps, values = zip(*curves["val/ndcg@10"])
    assert steps == (0, 2, 4) and values == pytest.approx((0.1, 0.5, 0.3))
    summaries = summarize_all(curves)
    ndcg, loss = summaries["val/ndcg@10"], summaries["val/loss"]
    assert (ndcg.best, ndcg.best_step, ndcg.final, ndcg.final_step) == pytest.approx((0.5, 2, 0.3, 4))
    assert (loss.best, loss.best_step, loss.final) == pytest.approx((1.0, 4, 1.0))  # losses: lower is better


def test_summary_ignores_nan_and_keeps_the_first_best() -> None:
    diverged = summarize([(0, 0.2), (5, 0.4), (9, 0.4), (12, math.nan)])
    assert (diverged.best, diverged.best_step, diverged.final_step) == (0.4, 5, 12) and math.isnan(diverged.final)
    assert math.isnan(summarize([(3, math.nan)]).best)


# ---- the child process and the sweep, with a stand-in for `vdr fit` --------------------------------------------------

def test_launch_reports_exit_code_log_and_the_childs_peak_rss(tmp_path: Path) -> None:
    child = "import sys; block = b'x' * (300 << 20); print('hello'); print('oops', file=sys.stderr); sys.exit(3)"
    launched = runner.launch([sys.executable, "-c", child], tmp_path / "a.log", echo=False)
    assert launched.returncode == 3 and launched.wall_s > 0
    assert 300 << 20 < launched.peak_rss_bytes < 2 << 30
    assert (tmp_path / "a.log").read_text().split() == ["hello", "oops"]


FAKE_FIT = """
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
log_dir = os.path.join(args["--trainer.logger.init_args.save_dir"], args["--trainer.logger.init_args.name"],
                       args["--trainer.logger.init_args.version"])
os.makedirs(log_dir)
print("fake fit", args.get("--model.x"))
if args.get("--model.x") == "bad":
    sys.exit(1)
if args.get("--model.x") != "no_summary":
    with open(os.path.join(log_dir, "ablation_summary.json"), "w") as handle:
        json.dump({"global_step": 4, "peak_gpu_bytes": None}, handle)
"""


@pytest.fixture
def fake_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "FIT", [sys.executable, str(_write(tmp_path / "fake_fit.py", FAKE_FIT))])


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_failures_are_recorded_retried_and_changed_commands_refused(tmp_path: Path, base: str, fake_fit: None,
                                                                     capsys: pytest.CaptureFixture) -> None:
    grid = {"base": base, "overrides": {"trainer.max_steps": 4}, "grid": {"model.x": ["good", "bad", "no_summary"]}}
    path = _write(tmp_path / "g.yaml", grid)
    with pytest.raises(SystemExit, match="2 run\\(s\\) failed"):
        ablate_command(path, Path("out"), quiet=True)
    runs = Path("out/runs")
    assert (runs / "x=good/result.json").is_file() and not (runs / "x=bad/result.json").exists()
    bad = Outcome.read(runs / "x=bad/attempt_0.json")
    assert (bad.status, bad.error) == ("failed", "exit code 1")
    assert (runs / "x=bad/attempt_0.log").read_text() == "fake fit bad\n"
    assert "did not reach its end" in Outcome.read(runs / "x=no_summary/attempt_0.json").error
    rows = _csv(Path("out/results.csv"))
    assert [(r["run"], r["x"], r["status"], r["global_step"]) for r in rows] == [
        ("x=good", "good", "ok", "4"), ("x=bad", "bad", "failed", ""), ("x=no_summary", "no_summary", "failed", "")]
    (runs / "x=no_summary/attempt_1.log").write_text("")  # an attempt killed before it wrote its outcome
    assert RunDir(runs, "x=no_summary").state() == ("interrupted", None)

    capsys.readouterr()
    with pytest.raises(SystemExit):
        ablate_command(path, Path("out"), quiet=True)  # the good run is skipped, the others get a new attempt
    printed = capsys.readouterr().out
    assert "[1/3] x=good: finished (attempt 0), skipped" in printed
    assert "[3/3] x=no_summary: attempt 2 (the last one interrupted)" in printed
    assert RunDir(runs, "x=bad").attempts() == [0, 1] and (runs / "x=bad/attempt_0.log").is_file()

    _write(path, {**grid, "overrides": {"trainer.max_steps": 5}})
    with pytest.raises(GridError, match="x=good .*--trainer.max_steps 4 -> 5"):
        ablate_command(path, Path("out"), quiet=True)
    _write(path, {**grid, "grid": {"model.x": ["good"]}, "overrides": {"trainer.max_steps": 5}})
    ablate_command(path, Path("out"), quiet=True, rerun_changed=True)
    assert Outcome.read(runs / "x=good/result.json").attempt == 1
    assert "--trainer.max_steps 4" in " ".join(Outcome.read(runs / "x=good/attempt_0.json").command)
    Path(base).write_text("trainer: {max_steps: 2}\n")  # the same flags over a changed config: another run
    with pytest.raises(GridError, match="x=good .*contents of a config file it reads changed"):
        ablate_command(path, Path("out"), quiet=True)


def test_markdown_bolds_the_best_finished_value_per_column(tmp_path: Path, base: str) -> None:
    grid = load_grid(_write(tmp_path / "g.yaml", {"base": base, "grid": {"a.t": [1, 2, 3]}}))

    def row(run, status: str, ndcg: float, loss: float) -> Row:
        metrics = {"val/ndcg@10": {"best": ndcg, "best_step": 7, "final": ndcg, "final_step": 9},
                   "val/loss": {"best": loss, "best_step": 7, "final": loss, "final_step": 9}}
        return Row(run, status, Outcome(run.name, 0, status, [], [], "log", "dir", 1.0, 2**30, metrics=metrics))

    runs = grid.runs()
    table = markdown(grid, [row(runs[0], "ok", 0.5, 2.0), row(runs[1], "ok", 0.25, 1.0),
                            row(runs[2], "failed", 0.9, 0.5)])
    lines = table.splitlines()
    assert "| t=1 | 1 | ok | 0 | 1.0 | 1.00 |  |  | 2.0000 @ 7 | 2.0000 | **0.5000** @ 7 | **0.5000** |" in lines
    assert "| t=2 | 2 | ok | 0 | 1.0 | 1.00 |  |  | **1.0000** @ 7 | **1.0000** | 0.2500 @ 7 | 0.2500 |" in lines
    assert "| t=3 | 3 | failed | 0 | 1.0 | 1.00 |  |  | 0.5000 @ 7 | 0.5000 | 0.9000 @ 7 | 0.9000 |" in lines
    assert plot_file("val/ndcg@10") == "val_ndcg@10.png"


# ---- a real sweep ----------------------------------------------------------------------------------------------------

@pytest.mark.slow  # 51 s: the default suite keeps under 20 minutes
def test_ablation_resumes_and_writes_csv_table_and_plots(tiny_synth: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from vdr.cli import main

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "grid.yaml", {
        "base": TINY_BASE,
        "overrides": {"data.train": str(tiny_synth / "train"), "data.eval": str(tiny_synth / "eval"),
                      "data.batch_size": 8, "data.eval_batch_size": 16, "trainer.max_steps": 4,
                      "trainer.val_check_interval": 4, "trainer.check_val_every_n_epoch": None,
                      "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                      "model.loss": "vdr.losses.contrastive.InfoNCELoss"},
        "grid": {"model.loss.temperature": [0.05, 0.1]}})
    command = ["ablate", "--grid", "grid.yaml", "--output", "out", "--quiet"]
    assert main(command) == 0
    names = ["temperature=0.05", "temperature=0.1"]
    runs = tmp_path / "out/runs"
    assert sorted(p.parent.name for p in runs.glob("*/result.json")) == names
    # The grid value reached the run: its saved config holds it.
    assert "temperature: 0.1\n" in (runs / "temperature=0.1/attempt_0/config.yaml").read_text()
    rows = _csv(tmp_path / "out/results.csv")
    assert [(r["run"], r["temperature"], r["status"], r["attempt"], r["global_step"]) for r in rows] == [
        (names[0], "0.05", "ok", "0", "4"), (names[1], "0.1", "ok", "0", "4")]
    tags = [column.removeprefix("final_") for column in rows[0] if column.startswith("final_")]
    assert "val/ndcg@10" in tags and "val/recall@1" in tags
    for r in rows:
        assert float(r["wall_s"]) > 0 and 0.1 < float(r["peak_rss_gib"]) < 16 and r["peak_gpu_gib"] == ""
        for tag in tags:
            assert 0.0 <= float(r[f"best_{tag}"]) <= 1.0 and math.isfinite(float(r[f"final_{tag}"]))
            assert r[f"best_step_{tag}"] == "3"  # one validation, at the last step (Lightning's index 3)
    table = (tmp_path / "out/results.md").read_text()
    assert all(f"| {name} |" in table for name in names) and "**" in table
    for tag in tags:
        with Image.open(tmp_path / "out/plots" / plot_file(tag)) as image:
            assert image.format == "PNG" and image.size[0] > 100

    def no_launch(*args, **kwargs):
        raise AssertionError("a finished run was launched again")

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(runner, "launch", no_launch)
        assert main(command) == 0
    assert capsys.readouterr().out.count("skipped") == 2

    (runs / names[1] / "result.json").unlink()  # as if it had been interrupted
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"[1/2] {names[0]}: finished (attempt 0), skipped" in printed and f"[2/2] {names[1]}: attempt 1" in printed
    assert RunDir(runs, names[0]).attempts() == [0] and RunDir(runs, names[1]).attempts() == [0, 1]
    assert (runs / names[1] / "attempt_0/config.yaml").is_file()  # the earlier attempt is kept
    assert [r["attempt"] for r in _csv(tmp_path / "out/results.csv")] == ["0", "1"]


def test_a_second_sweep_on_the_same_output_is_refused(tmp_path: Path, base: str) -> None:
    import fcntl

    path = _write(tmp_path / "g.yaml", {"base": base, "grid": {"model.x": [1]}})
    Path("out").mkdir()
    with open("out/.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a sweep in progress
        with pytest.raises(GridError, match="another vdr ablate is running on out"):
            ablate_command(path, Path("out"), quiet=True)
    assert not Path("out/runs").exists()
