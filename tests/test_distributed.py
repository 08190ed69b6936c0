"""Two ranks compute what one rank computes: DDP with global negatives, FSDP2, distributed evaluation, two nodes.

Every run here is a real ``vdr fit`` / ``vdr validate`` in child processes with gloo on the CPU (Lightning launches
the second rank, or torchrun launches both), on the tiny model in fp32. ``distributed_probe.Probe`` records each
rank's losses, first-step gradients and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Image, load_from_disk

from conftest import REPO, STACK, TINY_SYNTH, data_args
from vdr.data.synth import generate

TESTS = Path(__file__).resolve().parent
PER_RANK_BATCH = 4


def vdr(*args: str, cwd: Path, launcher: list[str] | None = None, timeout: int = 600) -> None:
    """Runs the ``vdr`` command (under ``launcher``, e.g. torchrun, if given) with one thread per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [*(launcher or [sys.executable, "-m"]), "vdr.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def probe_args(output: Path, **init_args) -> list[str]:
    args = ["--trainer.callbacks+", "distributed_probe.Probe", "--trainer.callbacks.output", str(output)]
    for name, value in init_args.items():
        args += [f"--trainer.callbacks.{name}", str(value).lower()]
    return args


def ranks(output: Path) -> list[dict]:
    files = sorted(output.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic data, plus ``train8``: 8 rows (one global batch of 2 x 4) with one hard negative each, where
    two rows' hard negative is another row's positive page (false negatives to mask across ranks)."""
    out = tmp_path_factory.mktemp("dist-data") / "synth"
    generate(out, TINY_SYNTH, progress=False)
    table = load_from_disk(str(out / "train")).select(range(8))
    table = table.cast_column("image", Image(decode=False)).cast_column("negative_0", Image(decode=False))
    rows = table.to_dict()
    rows["negative_0"][7] = rows["image"][0]
    rows["negative_0"][2] = rows["image"][5]
    Dataset.from_dict(rows, features=table.features).cast_column("image", Image()).cast_column(
        "negative_0", Image()).save_to_disk(str(out / "train8"))
    return out


def fit_args(synth: Path, name: str, *, devices: int, batch: int, steps: int, train: str = "train8") -> list[str]:
    return ["fit", *STACK, *data_args(synth), "--data.train", str(synth / train), "--data.batch_size", str(batch),
            "--trainer.logger.init_args.name", name, "--trainer.devices", str(devices),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.max_epochs", "-1"]


DDP = ["--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def one_process(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8: the reference."""
    root = tmp_path_factory.mktemp("one")
    vdr(*fit_args(synth, "one", devices=1, batch=2 * PER_RANK_BATCH, steps=1), *probe_args(root / "probe"), cwd=root)
    return root / "probe"


def _ddp(synth: Path, root: Path, **probe) -> Path:
    vdr(*fit_args(synth, "ddp", devices=2, batch=PER_RANK_BATCH, steps=1), *DDP, *probe_args(root / "probe", **probe),
        cwd=root)
    return root / "probe"


def _assert_same_step(reference: Path, other: Path) -> None:
    (one,), two = ranks(reference), ranks(other)
    assert len(two) == 2 and two[0]["world_size"] == 2
    # The logged loss is each rank's mean over its queries; with equal batches their mean is the global batch's.
    assert sum(r["losses"][0] for r in two) / 2 == pytest.approx(one["losses"][0], abs=1e-5)
    expected = torch.load(reference / "rank0-grads.pt")
    for rank in (0, 1):
        grads = torch.load(other / f"rank{rank}-grads.pt")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_ddp_global_negatives_give_the_one_process_loss_and_gradients(synth, one_process, tmp_path) -> None:
    _assert_same_step(one_process, _ddp(synth, tmp_path))


def test_a_gather_that_keeps_only_the_local_gradient_fails_the_gradient_check(synth, one_process, tmp_path) -> None:
    broken = _ddp(synth, tmp_path, local_gradient_gather=True)
    (one,), two = ranks(one_process), ranks(broken)
    assert sum(r["losses"][0] for r in two) / 2 == pytest.approx(one["losses"][0], abs=1e-5)  # the loss is right
    with pytest.raises(AssertionError):
        _assert_same_step(one_process, broken)  # the gradients are not
