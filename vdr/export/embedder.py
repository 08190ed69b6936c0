"""Bi-encoder export: a ``vdr fit`` checkpoint becomes a directory that ``SentenceTransformer(path)`` serves as is.

The directory (REFERENCE.md §4) holds the backbone (safetensors + config.json), the processor with the training
page-size bounds, the Sentence Transformers pipeline files (Transformer -> last-token Pooling -> Normalize, the
exact training prompts, cosine similarity) and a model card.
"""

from __future__ import annotations

import os
from pathlib import Path

from vdr.export.atomic import atomic_directory, check_destination
from vdr.export.card import write_embedder_card
from vdr.export.weights import Provenance, check_dtype, merged_backbone, save_weights
from vdr.models.st_format import write_embedder_config


def export_embedder(
    module,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    truncate_dim: int | None = None,
    dtype: str | None = None,
    provenance: Provenance | None = None,
    in_place: bool = False,
) -> Path:
    """Writes a trained bi-encoder as a Sentence Transformers directory.

    Args:
        module: A ``BiEncoderModule`` (its backbone, processor and prompts are exported).
        output: The directory to create; replaced only if ``overwrite`` and only once the export is complete.
        overwrite: Replace an existing non-empty ``output``.
        truncate_dim: Default embedding size for ``encode`` (Matryoshka: the first ``d`` dimensions).
        dtype: Weight dtype of the export (``float32``, ``bfloat16``, ``float16``); default: as trained.
        provenance: Checkpoint, data, config and metrics for the model card.
        in_place: The caller will not use ``module`` again (adapters may be merged into it).

    Returns:
        The output directory.
    """
    check_destination(output, overwrite)
    dim = module.model.embedding_dim
    if truncate_dim is not None and not 1 <= truncate_dim <= dim:
        raise ValueError(f"truncate_dim must be in [1, {dim}], got {truncate_dim}")
    check_dtype(dtype)
    backbone = merged_backbone(module.model.backbone, in_place=in_place)
    prompts = {"query": module.prompts.query, "document": module.prompts.document}
    with atomic_directory(output, overwrite) as staging:
        save_weights(backbone, staging, dtype)
        # The processor carries the training min/max pixels in its image processor's `size`, and the embedding chat
        # template, so serving resizes and renders pages exactly as training did.
        module.processor.save_pretrained(staging)
        write_embedder_config(staging, embedding_dim=dim, prompts=prompts, truncate_dim=truncate_dim)
        write_embedder_card(staging, name=str(output), module=module, prompts=prompts, truncate_dim=truncate_dim,
                            provenance=provenance or Provenance(config=dict(module.hparams)))
    return Path(output)
