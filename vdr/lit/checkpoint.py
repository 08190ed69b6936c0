"""Reading ``vdr fit`` checkpoints outside Lightning's loop (export, evaluation), with a clear error for the wrong kind.

Every vdr LightningModule writes ``checkpoint["vdr"] = {"kind": ..., "format": 1}`` (``on_save_checkpoint``), so a
tool can tell a bi-encoder checkpoint from a reranker's, or from a checkpoint of some other project, before it
builds a model.

A checkpoint is a ``.ckpt`` file, or, from an FSDP run (``FSDP2Strategy``), a ``.ckpt`` directory of per-rank shards
(``torch.distributed.checkpoint``) with the rest of the checkpoint in ``meta.pt``; both read into the same full,
unsharded dict here, on one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def checkpoint_marker(kind: str) -> dict[str, Any]:
    """The ``checkpoint["vdr"]`` entry a module of this ``kind`` writes."""
    return {"kind": kind, "format": FORMAT}


def read_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU and checks that a vdr module (of ``kind``, if given) wrote it.

    Args:
        path: A ``.ckpt`` file or sharded ``.ckpt`` directory written by ``vdr fit``.
        kind: The expected module kind, e.g. ``"biencoder"``; None accepts any (see ``checkpoint_kind``).

    Returns:
        The checkpoint dict (``hyper_parameters``, ``state_dict``, ``callbacks``, ...).
    """
    if not os.path.isfile(path) and not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (neither a file nor a sharded checkpoint directory "
                                f"with {SHARDED_METADATA})")
    try:
        if os.path.isdir(path):
            checkpoint = _read_sharded(Path(path))
        else:
            # Plain tensors and Python containers only: vdr modules save their hyperparameters as plain data.
            # Memory-mapped: a 2B model's checkpoint also holds ~16 GB of optimizer state that export never reads.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    marker = checkpoint.get("vdr") if isinstance(checkpoint, dict) else None
    if not isinstance(marker, dict) or "kind" not in marker:
        raise ValueError(f"{path} is not a vdr checkpoint: it has no 'vdr' entry (checkpoints written by `vdr fit` "
                         "have one)")
    if kind is not None and marker["kind"] != kind:
        raise ValueError(f"{path} is a vdr {marker['kind']!r} checkpoint; this needs a {kind!r} checkpoint")
    if marker.get("format", FORMAT) > FORMAT:
        raise ValueError(f"{path} was written by a newer vdr (checkpoint format {marker['format']} > {FORMAT})")
    return checkpoint


SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded (FSDP) checkpoint directory."""
    return os.path.isfile(os.path.join(path, SHARDED_METADATA))


def _read_sharded(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint's full weights (``state_dict``, its optimizer state left on disk) and metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    checkpoint: dict[str, Any] = {}
    _load_state_dict(checkpoint, storage_reader=FileSystemReader(folder),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    checkpoint.update(torch.load(folder / SHARDED_METADATA, map_location="cpu", weights_only=True))
    return checkpoint


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    """The module kind recorded in a checkpoint that :func:`read_checkpoint` accepted."""
    return checkpoint["vdr"]["kind"]
