"""``vdr export``: a ``vdr fit`` checkpoint of either kind becomes the Sentence Transformers directory that serves it.

A bi-encoder checkpoint becomes a ``SentenceTransformer`` directory (``vdr.export.embedder``), a reranker checkpoint a
``CrossEncoder`` directory (``vdr.export.reranker``). The destination and the checkpoint are checked before any
model is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from vdr.export.atomic import check_destination
from vdr.export.weights import Provenance, check_dtype
from vdr.lit.checkpoint import checkpoint_kind, read_checkpoint

KINDS = ("biencoder", "reranker")


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    truncate_dim: int | None = None,
    dtype: str | None = None,
    activation: str = "sigmoid",
) -> Path:
    """Exports a ``vdr fit`` checkpoint of a bi-encoder or a reranker (see :func:`export_command`)."""
    check_destination(output, overwrite)
    check_dtype(dtype)
    checkpoint = read_checkpoint(ckpt_path)
    kind = checkpoint_kind(checkpoint)
    if kind not in KINDS:
        raise ValueError(f"{ckpt_path} is a vdr {kind!r} checkpoint; vdr export supports: {', '.join(KINDS)}")
    provenance = Provenance.from_checkpoint(ckpt_path, checkpoint)
    if kind == "reranker":
        if truncate_dim is not None:
            raise ValueError("truncate_dim applies to embeddings; a reranker export has none")
        from vdr.export.reranker import export_reranker
        from vdr.lit.reranker import RerankerModule

        return export_reranker(RerankerModule.from_checkpoint(checkpoint), output, overwrite=overwrite, dtype=dtype,
                               activation=activation, provenance=provenance, in_place=True)
    from vdr.export.embedder import export_embedder
    from vdr.lit.biencoder import BiEncoderModule

    return export_embedder(BiEncoderModule.from_checkpoint(checkpoint), output, overwrite=overwrite,
                           truncate_dim=truncate_dim, dtype=dtype, provenance=provenance, in_place=True)


def export_command(
    ckpt_path: str,
    output: str,
    overwrite: bool = False,
    truncate_dim: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    activation: Literal["sigmoid", "identity"] = "sigmoid",
) -> str:
    """Export a `vdr fit` checkpoint: a bi-encoder to a SentenceTransformer directory, a reranker to a CrossEncoder one.

    Args:
        ckpt_path: The checkpoint (e.g. checkpoints/<run>/version_0/checkpoints/last.ckpt).
        output: Directory to write; it must be absent or empty unless --overwrite.
        overwrite: Replace an existing directory (only once the new export is complete).
        truncate_dim: Bi-encoders: default Matryoshka embedding size for encode (first d dimensions).
        dtype: Weight dtype: float32, bfloat16 or float16 (default: as trained).
        activation: Rerankers: what CrossEncoder.predict returns by default, sigmoid (probability) or identity
            (log-odds).
    """
    path = export_checkpoint(ckpt_path, output, overwrite=overwrite, truncate_dim=truncate_dim, dtype=dtype,
                             activation=activation)
    print(f"exported {ckpt_path} -> {path}")
    return str(path)
