"""The bi-encoder: one Qwen3-VL trunk embeds queries and pages alike (the prompt's instruction tells them apart)."""

from __future__ import annotations

import torch
from torch import nn

from vdr.models.backbone import trunk_hidden_states
from vdr.models.inputs import EncoderInputs
from vdr.models.lora import unwrap
from vdr.models.pooling import last_token_pool


class BiEncoder(nn.Module):
    """Qwen3-VL trunk + last-token pooling + L2 normalisation.

    Args:
        backbone: A ``Qwen3VLModel`` (no LM head), or a peft model around one.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def trunk(self) -> nn.Module:
        """The ``Qwen3VLModel`` (vision tower + decoder), with its LoRA adapters if any."""
        return unwrap(self.backbone)

    @property
    def embedding_dim(self) -> int:
        return self.trunk.config.text_config.hidden_size

    def forward(self, inputs: EncoderInputs, normalize: bool = True) -> torch.Tensor:
        """Returns ``[B, D]`` float32 embeddings (unit norm unless ``normalize`` is false)."""
        hidden = trunk_hidden_states(self.trunk, inputs)  # [B, L, D]
        return last_token_pool(hidden, inputs.attention_mask, normalize=normalize)  # [B, D]
