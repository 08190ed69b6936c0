"""The bi-encoder: one Qwen3-VL trunk embeds queries and pages alike (the prompt's instruction tells them apart)."""

from __future__ import annotations

import torch
from torch import nn

from vdr.distributed.collectives import world
from vdr.models.backbone import idle_vision_term
from vdr.models.inputs import EncoderInputs
from vdr.models.pooling import last_token_pool


class BiEncoder(nn.Module):
    """Qwen3-VL trunk + last-token pooling + L2 normalisation.

    Args:
        backbone: A ``Qwen3VLModel`` (no LM head).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def trunk(self) -> nn.Module:
        """The ``Qwen3VLModel`` (vision tower + decoder)."""
        return self.backbone

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.text_config.hidden_size

    def forward(self, inputs: EncoderInputs, normalize: bool = True) -> torch.Tensor:
        """Returns ``[B, D]`` float32 embeddings (unit norm unless ``normalize`` is false)."""
        # Text-only batch with other ranks: run the vision tower anyway (first, as an image batch would), so every
        # rank's collectives line up.
        idle = idle_vision_term(self.backbone) if inputs.pixel_values is None and world()[1] > 1 else None
        hidden = self.backbone(**inputs.model_kwargs(), use_cache=False).last_hidden_state  # [B, L, D]
        if idle is not None:
            hidden = hidden + idle
        return last_token_pool(hidden, inputs.attention_mask, normalize=normalize)  # [B, D]
