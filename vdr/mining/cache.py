"""Embeddings kept on disk between runs, so re-mining with other filters or samplings skips the encoder.

An entry is keyed by what determines the vectors: the model (its path with the size and modification time of its
files, or its hub id), which side was embedded (queries or pages), and the inputs (query texts, or the content hashes
of the pages, in order). Entries are safetensors files written atomically; a damaged or mismatched entry is
recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def default_cache_dir() -> Path:
    """``$VDR_CACHE`` or ``$XDG_CACHE_HOME/vdr`` (``~/.cache/vdr``), under ``embeddings/``."""
    root = os.environ.get("VDR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vdr")
    return Path(root) / "embeddings"


def model_fingerprint(model: str) -> str:
    """Identifies a model's weights: path, size and mtime of each file for local models; the id for hub models."""
    path = Path(model)
    if path.is_file():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        entries = [f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return f"dir:{path.resolve()}:" + ",".join(entries)
    return f"hub:{model}"


class EmbeddingCache:
    """Reads and writes ``[N, D]`` float32 embeddings by key.

    Args:
        directory: Where entries live (created on first write); None disables caching.
        model: The model argument, fingerprinted into every key.
    """

    def __init__(self, directory: Path | None, model: str) -> None:
        self.directory = directory
        self.model = model_fingerprint(model) if directory is not None else model
        self.hits: list[str] = []

    def key(self, side: str, inputs: list) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([self.model, side]).encode())
        for value in inputs:
            digest.update(repr(value).encode())
            digest.update(b"\0")
        return f"{side}-{digest.hexdigest()[:32]}"

    def get_or_compute(self, side: str, inputs: list, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached embeddings of ``inputs``, or ``compute()``'s (then stored).

        Args:
            side: ``queries`` or ``pages``.
            inputs: What was embedded, in order (texts or page content hashes).
            compute: Embeds them when there is no valid entry.
        """
        if self.directory is None:
            return compute()
        path = self.directory / f"{self.key(side, inputs)}.safetensors"
        if path.is_file():
            try:
                embeddings = load_file(str(path))["embeddings"]
                if embeddings.shape[0] == len(inputs):
                    self.hits.append(side)
                    return embeddings
            except Exception:  # noqa: BLE001 - a damaged entry is recomputed, whatever the damage
                pass
        embeddings = compute().float().contiguous()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file({"embeddings": embeddings}, str(partial), metadata={"model": self.model[:1000], "side": side})
        os.replace(partial, path)
        return embeddings
