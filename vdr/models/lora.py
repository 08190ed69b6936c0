"""LoRA adapters on a Qwen3-VL backbone through peft.

Qwen's own LoRA setting (REFERENCE.md §3) adapts the decoder's q/k/v/gate/up/down projections at r = alpha = 32.
The vision tower is frozen by default, or trained in full, or adapted too (its blocks' ``qkv``/``proj`` attention
and ``linear_fc1``/``linear_fc2`` MLP). The adapted backbone is a peft ``PeftModel``: checkpoints hold its adapter
weights beside the frozen base, and export merges them (``vdr.export.weights.merged_backbone``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from torch import nn

QWEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("qkv", "proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraOptions:
    """LoRA through peft.

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (the update is ``alpha / r * B A``).
        dropout: Dropout on the adapters' input.
        target_modules: Names of the decoder's linear layers to adapt (the last component of the module name).
        vision: The vision tower is ``frozen``, ``trained`` in full, or adapted with ``lora`` too.
        vision_target_modules: Names of the vision blocks' linear layers to adapt when ``vision`` is ``lora``.
    """

    r: int = 32
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_LORA_TARGETS))
    vision: Literal["frozen", "trained", "lora"] = "frozen"
    vision_target_modules: list[str] = field(default_factory=lambda: list(VISION_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.vision not in ("frozen", "trained", "lora"):
            raise ValueError(f"lora.vision must be frozen, trained or lora, got {self.vision!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the decoder layers to adapt, e.g. q_proj")

    def target_pattern(self) -> str:
        """The regular expression (peft matches it against full module names) of the layers to adapt."""

        def names(values: list[str]) -> str:
            return "|".join(re.escape(v) for v in values)

        pattern = rf"(?:.*\.)?language_model\.layers\.\d+\.(?:.*\.)?(?:{names(self.target_modules)})"
        if self.vision == "lora":
            pattern += rf"|(?:.*\.)?visual\.blocks\.\d+\.(?:.*\.)?(?:{names(self.vision_target_modules)})"
        return pattern


def add_lora(backbone: nn.Module, options: LoraOptions) -> nn.Module:
    """Wraps ``backbone`` (a ``Qwen3VLModel`` or ``Qwen3VLForConditionalGeneration``) in a peft ``PeftModel``.

    Only the adapters train afterwards: peft freezes the rest (the caller unfreezes a ``trained`` vision tower).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_pattern())
    return get_peft_model(backbone, config)


def unwrap(backbone: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when it has none); adapters stay injected."""
    from peft import PeftModel

    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def lora_hparams(options: LoraOptions | dict | None) -> tuple[LoraOptions | None, dict | None]:
    """``(options, plain dict for save_hyperparameters)`` from options or the dict a checkpoint holds."""
    if isinstance(options, dict):
        options = LoraOptions(**options)
    return options, asdict(options) if options else None
