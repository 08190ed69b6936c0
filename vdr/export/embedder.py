"""Bi-encoder export: a ``vdr fit`` checkpoint becomes a directory that ``SentenceTransformer(path)`` serves as is.

The directory (REFERENCE.md §4) holds the backbone (safetensors + config.json), the processor with the training
page-size bounds, the Sentence Transformers pipeline files (Transformer -> last-token Pooling -> Normalize, the
exact training prompts, cosine similarity) and a model card. LoRA adapters are merged into the saved weights, so the
export is a plain Qwen3-VL whatever the training setup.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vdr.export.atomic import atomic_directory, check_destination
from vdr.export.card import write_embedder_card
from vdr.models.st_format import write_embedder_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Provenance:
    """Where an export comes from, for its model card.

    Attributes:
        checkpoint: The checkpoint file, if any.
        step: Optimizer step of the checkpoint.
        metrics: The retrieval metrics of the validation that produced it (``val/`` names without the prefix).
        data: The data module's hyperparameters.
        config: The LightningModule's hyperparameters.
    """

    checkpoint: str | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, checkpoint: dict[str, Any]) -> Provenance:
        metrics: dict[str, float] = {}
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if key.startswith("RetrievalEvaluator") and state.get("last_metrics"):
                metrics = dict(state["last_metrics"])
        return cls(
            checkpoint=str(path),
            step=checkpoint.get("global_step"),
            metrics={k: v for k, v in metrics.items() if k != "step"},
            metrics_step=metrics.get("step"),
            data=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
            config=dict(checkpoint.get("hyper_parameters") or {}),
        )


def merged_backbone(backbone: nn.Module, in_place: bool = False) -> nn.Module:
    """The backbone as a plain ``Qwen3VLModel``: LoRA adapters (a peft ``PeftModel``) merged into the base weights.

    Args:
        backbone: The trained trunk, plain or wrapped by peft.
        in_place: Merge into ``backbone`` itself (when the caller owns a throwaway copy); otherwise into a copy, so
            the training module keeps its adapters.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(backbone, PeftModel):
        return (backbone if in_place else copy.deepcopy(backbone)).merge_and_unload()
    if any(isinstance(module, BaseTunerLayer) for module in backbone.modules()):
        raise TypeError("the backbone holds peft adapter layers outside a PeftModel; wrap it with peft.get_peft_model "
                        "so that export can merge them")
    return backbone


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
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    backbone = merged_backbone(module.model.backbone, in_place=in_place)
    prompts = {"query": module.prompts.query, "document": module.prompts.document}
    with atomic_directory(output, overwrite) as staging:
        state_dict = None
        if dtype is not None:
            state_dict = {name: tensor.to(DTYPES[dtype]) for name, tensor in backbone.state_dict().items()}
        backbone.save_pretrained(staging, state_dict=state_dict)
        if dtype is not None:
            config = copy.deepcopy(backbone.config)
            config.dtype = dtype
            config.save_pretrained(staging)
        # The processor carries the training min/max pixels in its image processor's `size`, and the embedding chat
        # template, so serving resizes and renders pages exactly as training did.
        module.processor.save_pretrained(staging)
        write_embedder_config(staging, embedding_dim=dim, prompts=prompts, truncate_dim=truncate_dim)
        write_embedder_card(staging, name=str(output), module=module, prompts=prompts, truncate_dim=truncate_dim,
                            provenance=provenance or Provenance(config=dict(module.hparams)))
    return Path(output)


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    truncate_dim: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Exports a ``vdr fit`` checkpoint; the destination and the checkpoint kind are checked before the model loads."""
    from vdr.lit.biencoder import CHECKPOINT_KIND, BiEncoderModule
    from vdr.lit.checkpoint import checkpoint_kind, read_checkpoint

    check_destination(output, overwrite)
    checkpoint = read_checkpoint(ckpt_path)
    kind = checkpoint_kind(checkpoint)
    if kind != CHECKPOINT_KIND:
        raise ValueError(f"{ckpt_path} is a vdr {kind!r} checkpoint; vdr export supports: {CHECKPOINT_KIND!r}")
    module = BiEncoderModule.from_checkpoint(checkpoint)
    return export_embedder(module, output, overwrite=overwrite, truncate_dim=truncate_dim, dtype=dtype,
                           provenance=Provenance.from_checkpoint(ckpt_path, checkpoint), in_place=True)


def export_command(
    ckpt_path: str,
    output: str,
    overwrite: bool = False,
    truncate_dim: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
) -> str:
    """Export a `vdr fit` checkpoint to a Sentence Transformers directory (load it with SentenceTransformer(path)).

    Args:
        ckpt_path: The checkpoint (e.g. checkpoints/<run>/version_0/checkpoints/last.ckpt).
        output: Directory to write; it must be absent or empty unless --overwrite.
        overwrite: Replace an existing directory (only once the new export is complete).
        truncate_dim: Default Matryoshka embedding size for encode (first d dimensions).
        dtype: Weight dtype: float32, bfloat16 or float16 (default: as trained).
    """
    path = export_checkpoint(ckpt_path, output, overwrite=overwrite, truncate_dim=truncate_dim, dtype=dtype)
    print(f"exported {ckpt_path} -> {path}")
    return str(path)
