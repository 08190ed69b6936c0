"""Embeddings kept on disk between runs, so re-mining with other filters or samplings skips the encoder.

An entry is keyed by what determines the vectors: the model (its path with the size and modification time of its
files, or its hub id), how the encoder renders inputs (its class, prompts, pixel bounds and text length: a checkpoint
or a Hugging Face directory gets them from code and config, not only from its files), which side was embedded
(queries or pages), the inputs (query texts, or the content hashes of the pages, in order), and a format version.
Entries are safetensors files written atomically; a damaged or mismatched entry is recomputed, never trusted.
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


CACHE_VERSION = 1  # bump when embedding code changes what the same model and inputs produce


def describe_encoder(encoder) -> str:
    """What besides the weights decides an encoder's vectors: its class, prompts, pixel bounds and text length."""
    collator = getattr(encoder, "collator", None)
    if collator is not None:
        pixel_bounds = collator.image_processor.size
        return repr((type(encoder).__name__, collator.prompts, collator.max_text_tokens, pixel_bounds))
    model = getattr(encoder, "model", None)
    return repr((type(encoder).__name__, getattr(model, "prompts", None), getattr(model, "truncate_dim", None)))


class EmbeddingCache:
    """Reads and writes ``[N, D]`` float32 embeddings by key.

    Args:
        directory: Where entries live (created on first write); None disables caching.
        model: The model argument, fingerprinted into every key.
        encoder: :func:`describe_encoder` of the encoder that computes the entries.
    """

    def __init__(self, directory: Path | None, model: str, encoder: str = "") -> None:
        self.directory = directory
        self.model = model_fingerprint(model) if directory is not None else model
        self.encoder = encoder
        self.hits: list[str] = []

    def key(self, side: str, inputs: list) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([CACHE_VERSION, self.model, self.encoder, side]).encode())
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
                    if side not in self.hits:
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
