"""Checkpoint files written atomically: a reader sees the old file or the new one, never part of one.

Lightning's ``TorchCheckpointIO`` serializes the whole checkpoint into memory, writes it to a temporary file from
``tempfile`` (the system's temporary directory) and moves it into place. Where that directory is on another file
system than the checkpoints (a node's local /tmp, a cluster's shared storage) the move is a copy, which a kill can cut
short, leaving a truncated ``last.ckpt``; the file is not synced to disk before it replaces the old one, so a crash of
the machine can leave an empty one; and a killed writer leaves a checkpoint-sized file behind in /tmp.

``AtomicCheckpointIO`` writes beside the target (``.NAME.partial-PID``, same directory, same file system), syncs it,
renames it over the target (atomic on POSIX) and syncs the directory. A writer killed at any point leaves the previous
checkpoint whole and only a partial file, which the next save of that checkpoint removes. vdr modules install it in
place of Lightning's default (``VdrModule.setup``); sharded FSDP checkpoints are directories and get the same
guarantee from ``FSDP2Strategy.save_checkpoint``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

PARTIAL = ".partial-"  # infix of the temporary names


def partial_name(path: Path) -> Path:
    """Where a writer stages ``path``: a hidden sibling named after the target and this process."""
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")


def remove_partials(directory: Path, name: str) -> None:
    """Removes what killed writers of the checkpoints matching ``name`` (a glob) in ``directory`` left (one process
    writes a given checkpoint at a time)."""
    for stale in directory.glob(f".{name}{PARTIAL}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def remove_stale_partials(path: Path) -> None:
    """Removes what killed writers of ``path`` left."""
    remove_partials(path.parent, path.name)


def recover_interrupted_swap(path: Path) -> None:
    """Puts back a sharded checkpoint whose replacement was interrupted between its two renames (``FSDP2Strategy``):
    ``.NAME.previous`` exists and ``NAME`` does not."""
    previous = path.with_name(f".{path.name}.previous")
    if previous.is_dir() and not path.exists():
        os.replace(previous, path)


def sync_directory(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (POSIX: fsync the directory)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that leaves either the old ``path`` or the complete new one, whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    staging = partial_name(path)
    try:
        with open(staging, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, durable writes of local files (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
