"""Exact resume: a `vdr fit` stopped by SIGTERM or killed by SIGKILL, then resumed with `--ckpt_path last`, trains the
same steps on the same rows with the same losses as a run that was never stopped.

The runs are subprocesses (signals are real); the tiny model has attention dropout (random state matters) and a
learnable temperature; 48 rows in batches of 8 make 6 batches an epoch, so checkpoints land mid-epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, STACK, data_args, fit_tiny, scalars

STEPS = 16
EVERY = 3  # ResumeCheckpoint period: steps 3, 9 and 15 are mid-epoch


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory: pytest.TempPathFactory, _tiny_backbone) -> Path:
    """The tiny backbone saved with attention dropout 0.1, so training draws random numbers every step."""
    folder = tmp_path_factory.mktemp("dropout-model")
    model = _tiny_backbone.model
    model.config.text_config.attention_dropout = 0.1
    try:
        model.save_pretrained(folder)
    finally:
        model.config.text_config.attention_dropout = 0.0
    _tiny_backbone.processor.save_pretrained(folder)
    return folder


def fit_command(synth: Path, model: Path, log: Path, *flags: str, delay: float = 0.0, steps: int = STEPS,
                every: int = EVERY) -> list[str]:
    # The default callbacks with a shorter checkpoint period, and the step log.
    callbacks = yaml.safe_load((REPO / "configs/callbacks/default.yaml").read_text())
    for callback in callbacks["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ResumeCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = every
    callbacks["trainer"]["callbacks"].append(
        {"class_path": "tests.resume_probe.StepLog", "init_args": {"path": str(log), "delay": delay}})
    stack = [part if not part.endswith("callbacks/default.yaml") else yaml.safe_dump(callbacks) for part in STACK]
    return [sys.executable, "-c", "import sys; from vdr.cli import main; sys.exit(main(sys.argv[1:]))", "fit",
            *stack, *data_args(synth), "--model.backbone.name_or_path", str(model),
            "--model.loss", '{"class_path": "vdr.losses.contrastive.InfoNCELoss", '
            '"init_args": {"learnable_temperature": true}}',
            "--trainer.logger.init_args.name", "run", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.check_val_every_n_epoch", "null",
            *flags]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run(command: list[str], cwd: Path, **extra: str) -> None:
    result = subprocess.run(command, cwd=cwd, env=environment(**extra), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def stop_after(command: list[str], cwd: Path, log: Path, steps: int, signum: int, **extra: str) -> int:
    """Starts a run, sends ``signum`` once ``steps`` steps are logged, and returns its exit status."""
    process = subprocess.Popen(command, cwd=cwd, env=environment(**extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to stop at"
        time.sleep(0.02)
    process.send_signal(signum)
    _, errors = process.communicate(timeout=300)
    assert signum == signal.SIGKILL or process.returncode == 143, errors[-3000:]  # stopped, not finished
    return process.returncode


def steps(log: Path) -> dict[int, dict]:
    """The logged steps by global step (after the optimizer step); a repeated step keeps its last record."""
    return {record["step"]: record for record in map(json.loads, log.read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tiny_synth: Path, dropout_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """An uninterrupted run's steps."""
    root = tmp_path_factory.mktemp("reference")
    run(fit_command(tiny_synth, dropout_model, root / "steps.jsonl"), root)
    return steps(root / "steps.jsonl")


def assert_same_steps(resumed: dict[int, dict], reference: dict[int, dict], first: int) -> None:
    assert sorted(resumed) == list(range(first, STEPS + 1))
    for step in range(first, STEPS + 1):
        ours, theirs = resumed[step], reference[step]
        assert ours["rows"] == theirs["rows"], step  # the same batch, mid-epoch or not
        assert (ours["epoch"], ours["batch"]) == (theirs["epoch"], theirs["batch"]), step
        assert ours["lr"] == theirs["lr"], step
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-6, (step, ours["loss"], theirs["loss"])
        assert abs(ours["temperature"] - theirs["temperature"]) <= 1e-7, step


def test_reference_run_uses_its_randomness(reference: dict[int, dict]) -> None:
    # The learnable temperature moves, and the run crosses epochs (so resuming mid-epoch is exercised).
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS]["temperature"] != reference[1]["temperature"]
    assert reference[STEPS]["epoch"] == 2


def test_sigterm_saves_and_resume_is_exact(tiny_synth: Path, dropout_model: Path, reference: dict[int, dict],
                                          tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    stop_after(fit_command(tiny_synth, dropout_model, log, delay=0.3), tmp_path, log, 4, signal.SIGTERM)
    stopped = steps(log)
    last = max(stopped)
    assert 4 <= last < STEPS  # it stopped at the end of a step, before the end of the run
    checkpoint = tmp_path / "checkpoints/run/version_0/checkpoints/last.ckpt"
    assert checkpoint.exists()
    import torch

    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == last
    run(fit_command(tiny_synth, dropout_model, tmp_path / "resumed.jsonl", "--ckpt_path", "last"), tmp_path)
    assert_same_steps(steps(tmp_path / "resumed.jsonl"), reference, last + 1)
    # The resumed run continued in the stopped run's folder, not a new version.
    assert not (tmp_path / "checkpoints/run/version_1").exists()


@pytest.mark.slow  # with the next test, 70 s: the default suite keeps under 20 minutes
def test_sigkill_resumes_from_the_last_periodic_checkpoint(tiny_synth: Path, dropout_model: Path,
                                                          reference: dict[int, dict], tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    stop_after(fit_command(tiny_synth, dropout_model, log, delay=0.3), tmp_path, log, 5, signal.SIGKILL)
    killed_at = max(steps(log))
    assert killed_at < STEPS
    import torch

    checkpoint = tmp_path / "checkpoints/run/version_0/checkpoints/last.ckpt"
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]
    assert saved % EVERY == 0 and saved <= killed_at  # no save on SIGKILL: the last periodic one
    run(fit_command(tiny_synth, dropout_model, tmp_path / "resumed.jsonl", "--ckpt_path", "last"), tmp_path)
    # The steps after the periodic save are run again, exactly as before, then the rest.
    assert_same_steps(steps(tmp_path / "resumed.jsonl"), reference, saved + 1)


@pytest.mark.slow
def test_slurm_sigterm_requeues_and_the_requeued_job_resumes(tiny_synth: Path, dropout_model: Path,
                                                              reference: dict[int, dict], tmp_path: Path) -> None:
    # A stand-in for scontrol records what it is asked; the job's command is the same before and after the requeue.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    flags = ("--ckpt_path", "last", "--trainer.logger.init_args.version", "slurm-4242")
    log = tmp_path / "steps.jsonl"
    stop_after(fit_command(tiny_synth, dropout_model, log, *flags, delay=0.3), tmp_path, log, 4, signal.SIGTERM,
               **job)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    last = max(steps(log))
    run(fit_command(tiny_synth, dropout_model, tmp_path / "requeued.jsonl", *flags), tmp_path, **job)
    assert_same_steps(steps(tmp_path / "requeued.jsonl"), reference, last + 1)


def test_same_seed_and_config_give_the_same_run(tiny_synth: Path, tmp_path: Path) -> None:
    # Two runs of one config: every logged value (losses per step, learning rate, final metrics) is equal, bit for bit.
    flags = ("--trainer.log_every_n_steps", "1", "--validate_before_fit", "true")
    first, second = (scalars(fit_tiny(tmp_path, tiny_synth, name, 6, *flags)) for name in ("first", "second"))
    assert "train/loss" in first and "val/ndcg@10" in first and len(first["train/loss"]) == 6
    assert first == second
    # A different seed is a different run (so the comparison above can fail).
    third = scalars(fit_tiny(tmp_path, tiny_synth, "third", 6, *flags, "--data.seed", "1"))
    assert third["train/loss"] != first["train/loss"]


def test_the_sbatch_script_resumes_fit_in_its_job_folder(tmp_path: Path) -> None:
    # SLURM sends SIGTERM before the time limit and may requeue; a fit resumes from its job's last checkpoint.
    script = REPO / "scripts/slurm/vdr.sbatch"
    directives = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=TERM@120" in directives and "--requeue" in directives
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "$@" > "$SRUN_LOG"\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "log"),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "VDR": "vdr"}

    def srun_words(*args: str) -> list[str]:
        result = subprocess.run(["bash", str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "log").read_text().split()

    words = srun_words("fit", "--config", "x.yaml")
    assert words[:6] == ["--kill-on-bad-exit=1", "vdr", "fit", "--config", "x.yaml", "--ckpt_path"]
    assert words[6:9] == ["last", "--trainer.logger.init_args.version", "slurm-77"]
    assert "--ckpt_path" not in srun_words("validate", "--config", "x.yaml")
    assert srun_words("fit", "--ckpt_path", "a.ckpt").count("--ckpt_path") == 1  # the user's choice stands


@pytest.mark.slow
def test_sigterm_with_accumulation_and_validations_resumes_exactly(tiny_synth: Path, dropout_model: Path,
                                                                  tmp_path: Path) -> None:
    # Two batches per optimizer step (3 steps an epoch), a validation every 2 steps, last.ckpt every 2 steps: the
    # checkpoints coincide with validations, and the signal can land inside an accumulation window.
    flags = ("--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "4",
             "--trainer.log_every_n_steps", "1")
    (tmp_path / "reference").mkdir()
    run(fit_command(tiny_synth, dropout_model, tmp_path / "reference.jsonl", *flags, steps=8, every=2),
        tmp_path / "reference")
    log = tmp_path / "steps.jsonl"
    stop_after(fit_command(tiny_synth, dropout_model, log, *flags, delay=0.3, steps=8, every=2), tmp_path, log, 5,
               signal.SIGTERM)
    run(fit_command(tiny_synth, dropout_model, tmp_path / "resumed.jsonl", *flags, "--ckpt_path", "last", steps=8,
                    every=2), tmp_path)

    def batches(path: Path) -> dict[tuple[int, int], dict]:
        return {(r["epoch"], r["batch"]): r for r in map(json.loads, path.read_text().splitlines())}

    reference, stopped, resumed = (batches(p) for p in (tmp_path / "reference.jsonl", log, tmp_path / "resumed.jsonl"))
    assert len(stopped) % 2 == 0  # it stopped where an optimizer step ended
    assert sorted(stopped) + sorted(resumed) == sorted(reference)  # every batch once, none repeated or skipped
    for key, record in resumed.items():
        theirs = reference[key]
        assert record["rows"] == theirs["rows"] and record["lr"] == theirs["lr"], key
        assert abs(record["loss"] - theirs["loss"]) <= 1e-6 and record["temperature"] == theirs["temperature"], key
    # The validations after the stop happen at the same steps with the same results (none skipped on resume).
    ours = dict(scalars(tmp_path / "checkpoints/run/version_0")["val/ndcg@10"])
    theirs = dict(scalars(tmp_path / "reference/checkpoints/run/version_0")["val/ndcg@10"])
    assert ours == theirs
