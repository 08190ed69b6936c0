"""Vision-block checkpoints over a few images at a time: the backward's largest transient, bounded apart from the batch.

With gradient checkpointing, the backward recomputes one vision block at a time, over every image of the pass, and
holds that block's activations and their gradients at once. At 600x600 pages (1,296 patches per page in a 1024-wide
tower, with float32 norms under autocast) that is ~70 MiB per page for the 2B model: on one H200 the step's peak grew
by that much per sequence of the GradCache mini-batch, and at mini-batch 16 it was the step's peak (docs/LOG.md).

Images never attend to one another (the vision attention is block-diagonal over images; every other op in a block
works patch by patch), so a block's output over all images is the concatenation of its outputs over groups of images.
:func:`tile_vision_checkpoints` makes each vision block checkpoint each group separately: the forward saves the same
block inputs as before, and the backward recomputes and differentiates one group at a time. Same values, same
gradients, same compute; the transient follows the group (plus one block's weight gradients, which autograd sums over
the groups before adding them to ``.grad``), while the decoder still takes the whole mini-batch in one pass.

Tiling the whole vision tower instead (running it per group) would not do: autograd then holds the summed weight
gradients of every vision block until the last group's backward, as much memory as the tiles save.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_TILED_CLASSES: dict[type, type] = {}


class TiledCheckpointBlock:
    """Mixin for a ``Qwen3VLVisionBlock``: in training with gradients, one checkpoint per group of images.

    Attributes:
        tile_images: Images per checkpointed group.
    """

    tile_images: int

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        block_forward = super().forward  # the released block (transformers' own checkpointing is off)
        if not (self.training and torch.is_grad_enabled()):
            return block_forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        # Image boundaries in the packed patches: a host tensor in vdr's pipeline (a GPU one costs a read per block).
        bounds = cu_seqlens.tolist()
        firsts = range(0, len(bounds) - 1, self.tile_images)
        lasts = [min(first + self.tile_images, len(bounds) - 1) for first in firsts]
        # One split (its backward concatenates the tiles' gradients once; slices would each zero-fill a full-size one).
        tiles = hidden_states.split([bounds[last] - bounds[first] for first, last in zip(firsts, lasts)])
        outputs = []
        for tile, first, last in zip(tiles, firsts, lasts):
            start, stop = bounds[first], bounds[last]
            tile_seqlens = cu_seqlens[first : last + 1] - start
            tile_positions = None if position_embeddings is None else tuple(
                t[start:stop] for t in position_embeddings)
            outputs.append(checkpoint(block_forward, tile, tile_seqlens, tile_positions, use_reentrant=False,
                                      **kwargs))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _tiled_class(cls: type) -> type:
    if cls not in _TILED_CLASSES:
        _TILED_CLASSES[cls] = type(f"TiledCheckpoint{cls.__name__}", (TiledCheckpointBlock, cls), {})
    return _TILED_CLASSES[cls]


def _released_class(tiled: type) -> type:
    for cls, ours in _TILED_CLASSES.items():
        if ours is tiled:
            return cls
    raise ValueError(f"cannot remove vision-checkpoint tiles from a {tiled.__name__} (e.g. after FSDP's fully_shard "
                     "wrapped the tiled block): set them before sharding")


def tile_vision_checkpoints(visual: nn.Module, images: int | None) -> None:
    """Checkpoints each block of ``visual`` (a ``Qwen3VLVisionModel``) over at most ``images`` images at a time.

    Call it with transformers' checkpointing of the vision tower off (``set_gradient_checkpointing`` does); None puts
    the released blocks back. The blocks keep their parameters, names and state dict. A video's frames count as images
    (its attention segments are per frame). The tiled class is made at run time: ``torch.save`` of a whole module
    (rather than its state dict) cannot pickle it.
    """
    if images is not None and images < 1:
        raise ValueError(f"vision_checkpoint_images must be >= 1 (or null), got {images}")
    for block in visual.blocks:
        tiled = isinstance(block, TiledCheckpointBlock)
        if images is None and tiled:
            block.__class__ = _released_class(type(block))
            del block.tile_images
        elif images is not None:
            if not tiled:
                block.__class__ = _tiled_class(type(block))
            block.tile_images = images
