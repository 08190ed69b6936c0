"""Qwen3-VL's patch embedding computed as the matmul it is.

The released module runs a ``Conv3d`` whose kernel equals its stride over patches that are already cut out and
flattened, i.e. one linear map per patch. On CPUs (and in some GPU stacks) the convolution kernels are far
slower than a plain matmul: on the demo preset the Conv3d took 40% of a training step. The parameters keep their
names and shapes (``proj.weight`` is still ``[hidden, 3, 2, 16, 16]``), so checkpoints and exports are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearPatchEmbed(nn.Module):
    """Drop-in replacement for ``Qwen3VLVisionPatchEmbed`` with identical parameters and outputs.

    Args:
        original: The model's patch embedding (its ``proj`` Conv3d is adopted, not copied).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.proj = original.proj  # nn.Conv3d, kernel == stride
        self.embed_dim = self.proj.out_channels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.embed_dim, -1)  # [hidden, C * T * p * p], same flattening order
        patches = hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype)  # [P, C * T * p * p]
        return F.linear(patches, weight, self.proj.bias)  # [P, hidden]


def use_linear_patch_embed(model: nn.Module) -> None:
    """Swaps the vision tower's patch embedding of a ``Qwen3VLModel`` for ``LinearPatchEmbed`` in place."""
    visual = model.visual
    if not isinstance(visual.patch_embed, LinearPatchEmbed):
        visual.patch_embed = LinearPatchEmbed(visual.patch_embed)
