"""Checkpoints are written atomically: a writer killed at any point leaves the previous checkpoint whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tests.conftest import REPO
from vdr.lit.checkpoint_io import AtomicCheckpointIO, atomic_torch_save

# A child process that saves a large checkpoint over `last.ckpt` through AtomicCheckpointIO, as a Trainer does.
# STALL makes it stop just before the rename (the widest window a kill can hit); otherwise it writes at full speed.
WRITER = """
import os, sys, time, torch
from vdr.lit import checkpoint_io
if os.environ.get("STALL"):
    checkpoint_io.os.replace = lambda *args: time.sleep(600)
checkpoint_io.AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.ones(int(sys.argv[2]))}, sys.argv[1])
"""
BIG = 100_000_000  # float32 values: a 400 MB file, long enough to write that the kill lands mid-write


def kill_writer_mid_write(target: Path, values: int, stall: bool) -> int:
    """Starts the writer, SIGKILLs it once its partial file holds data, and returns the partial file's size then."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"STALL": "1"} if stall else {})}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(values)], env=env)
    deadline = time.monotonic() + 120
    partial = None
    while time.monotonic() < deadline and writer.poll() is None:
        found = [p for p in target.parent.glob(f".{target.name}.partial-*") if p.stat().st_size > 1 << 20]
        if found:
            partial = found[0]
            break
        time.sleep(0.001)
    assert partial is not None, "the writer never started writing"
    if stall:  # wait for the whole file, so the kill lands between the write and the rename
        while partial.stat().st_size < values * 4:
            time.sleep(0.01)
    size = partial.stat().st_size
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    return size


@pytest.mark.parametrize("stall", [False, True], ids=["mid-write", "before-rename"])
def test_a_writer_killed_while_saving_leaves_the_previous_checkpoint_whole(tmp_path: Path, stall: bool) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.zeros(3)}, target)
    size = kill_writer_mid_write(target, BIG if not stall else 1_000_000, stall)
    if not stall:
        assert size < BIG * 4  # the kill did land mid-write
    # The old checkpoint is intact and nothing half-written took its name.
    old = torch.load(target, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["weights"], torch.zeros(3))
    # The next save replaces it and clears what the killed writer left behind.
    AtomicCheckpointIO().save_checkpoint({"step": 3, "weights": torch.ones(2)}, target)
    assert torch.load(target, weights_only=True)["step"] == 3
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_a_failed_save_leaves_the_previous_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "best.ckpt"
    atomic_torch_save({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot serialize")

    with pytest.raises(RuntimeError, match="cannot serialize"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


def test_vdr_modules_install_the_atomic_checkpoint_io() -> None:
    import lightning as L

    from tests.conftest import TINY_PIXELS
    from vdr.lit.base import BackboneConfig
    from vdr.lit.biencoder import BiEncoderModule

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS))
    trainer.strategy.connect(module)
    module.trainer = trainer
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    module.on_fit_start()  # where a fit installs it, before any checkpoint is written
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
