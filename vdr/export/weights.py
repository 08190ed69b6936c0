"""What every export shares: where it comes from (for the model card), and the weights it writes.

LoRA adapters are merged into the saved weights, so an export is a plain Qwen3-VL whatever the training setup.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Provenance:
    """Where an export comes from, for its model card.

    Attributes:
        checkpoint: The checkpoint file, if any.
        step: Optimizer step of the checkpoint.
        metrics: The evaluation metrics of the validation that produced it (``val/`` names without the prefix).
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
            if key.startswith(("RetrievalEvaluator", "RerankEvaluator")) and state.get("last_metrics"):
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


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def save_weights(model: nn.Module, directory: str | Path, dtype: str | None = None) -> None:
    """``save_pretrained`` (safetensors + config.json), cast to ``dtype`` when given, the model itself untouched."""
    state_dict = None
    if dtype is not None:
        state_dict = {name: tensor.to(DTYPES[dtype]) for name, tensor in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state_dict)
    if dtype is not None:
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(directory)
