"""Last-token pooling: the embedding is the hidden state of the last attended token (Qwen3-VL-Embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last attended token of each row, for left or right padding alike.

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens.

    Returns:
        ``[B]`` int64 positions.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [L]
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)  # [B]; +1 so position 0 beats padding


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Pools ``[B, L, D]`` hidden states into ``[B, D]`` embeddings, L2-normalised unless told otherwise."""
    index = last_token_index(attention_mask)  # [B]
    pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]  # [B, D]
    return F.normalize(pooled.float(), dim=-1) if normalize else pooled
