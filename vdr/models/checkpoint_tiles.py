"""Checkpoints over a few images or rows at a time: the backward's largest transients, bounded apart from the batch.

With gradient checkpointing, the backward recomputes one layer at a time over everything the pass embedded, and holds
that layer's activations and their gradients at once. For the 2B model that is ~70 MiB per 600x600 page for a vision
block (1,296 patches in a 1024-wide tower, with float32 norms under autocast) and ~45 MiB per row of 345 tokens for a
decoder layer: on one H200 the step's peak grew by ~72 MiB per sequence of the GradCache mini-batch (docs/LOG.md).

Images never attend to one another (a vision block's attention is block-diagonal over images; its other ops work
patch by patch), and rows never do in a decoder layer (attention is within a row; the rest works token by token). So
a layer's output over the whole pass is the concatenation of its outputs over groups of images, or of rows.
:func:`tile_vision_checkpoints` and :func:`tile_text_checkpoints` make each vision block, or each decoder layer,
checkpoint each group separately: the forward saves the same layer inputs as before, and the backward recomputes and
differentiates one group at a time. Same values, same gradients, same compute; the transient follows the group (plus
one layer's weight gradients, which autograd sums over the groups before adding them to ``.grad``), while the towers
still take the whole mini-batch in one pass.

Tiling a whole tower instead (running it per group) would not do: autograd then holds the summed weight gradients of
every layer until the last group's backward, as much memory as the tiles save.

The tiled classes are made at run time (a subclass of the layer's own): ``torch.save`` of a whole module, rather than
its state dict, cannot pickle them. Parameters, names and state dicts are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


# A decoder layer's per-row inputs, by the names transformers passes them (its other arguments are not per row).
_ROW_INPUTS = ("attention_mask", "position_ids", "position_embeddings")


class TiledCheckpointDecoderLayer:
    """Mixin for a ``Qwen3VLTextDecoderLayer``: in training with gradients, one checkpoint per group of rows.

    Attributes:
        tile_rows: Rows per checkpointed group.
    """

    tile_rows: int

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer_forward = super().forward  # the released layer (transformers' own checkpointing is off)
        rows = hidden_states.shape[0]
        if not (self.training and torch.is_grad_enabled()):
            return layer_forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(f"a tiled {type(self).__name__} takes its inputs after the hidden states by keyword, as "
                            f"transformers' decoder passes them; got {len(args)} positional")
        if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            raise ValueError("tiled decoder checkpoints cannot fill a key/value cache (each group of rows would append "
                             "its own): call the model with use_cache=False, as vdr's encoders do")
        sizes = [min(self.tile_rows, rows - first) for first in range(0, rows, self.tile_rows)]
        per_tile = [dict(kwargs) for _ in sizes]
        for name in _ROW_INPUTS:
            for tile, part in zip(per_tile, _split_rows(kwargs.get(name), rows, sizes, name)):
                tile[name] = part
        tiles = hidden_states.split(sizes)  # one split: its backward concatenates the tiles' gradients once
        outputs = [checkpoint(layer_forward, tile, use_reentrant=False, **tile_kwargs)
                   for tile, tile_kwargs in zip(tiles, per_tile)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _split_rows(value, rows: int, sizes: list[int], name: str) -> list:
    """``value`` (a tensor or a tuple of tensors whose first dimension is the rows, one broadcast over them, or None)
    split into groups of ``sizes`` rows."""
    if value is None:
        return [None] * len(sizes)
    if isinstance(value, tuple):
        return list(zip(*(_split_rows(part, rows, sizes, name) for part in value)))
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        raise TypeError(f"tiled decoder checkpoints cannot split {name} of type {type(value).__name__} by rows "
                        "(e.g. flex attention's block mask): use text_checkpoint_rows with sdpa, eager or flash "
                        "attention")
    if value.shape[0] == rows:
        return list(value.split(sizes))
    if value.shape[0] == 1:
        return [value] * len(sizes)  # broadcast over the rows
    raise ValueError(f"{name} has {value.shape[0]} rows where the hidden states have {rows}")


_TILED_CLASSES: dict[type, type] = {}


def _tiled_class(cls: type, mixin: type) -> type:
    if cls not in _TILED_CLASSES:
        _TILED_CLASSES[cls] = type(f"TiledCheckpoint{cls.__name__}", (mixin, cls), {})
    return _TILED_CLASSES[cls]


def _released_class(tiled: type) -> type:
    for cls, ours in _TILED_CLASSES.items():
        if ours is tiled:
            return cls
    raise ValueError(f"cannot remove checkpoint tiles from a {tiled.__name__} (e.g. after FSDP's fully_shard "
                     "wrapped the tiled layer): set them before sharding")


def _tile(layers: nn.ModuleList, mixin: type, attribute: str, size: int | None, option: str) -> None:
    if size is not None and size < 1:
        raise ValueError(f"{option} must be >= 1 (or null), got {size}")
    for layer in layers:
        tiled = isinstance(layer, mixin)
        if size is None and tiled:
            layer.__class__ = _released_class(type(layer))
            delattr(layer, attribute)
        elif size is not None:
            if not tiled:
                layer.__class__ = _tiled_class(type(layer), mixin)
            setattr(layer, attribute, size)


def tile_vision_checkpoints(visual: nn.Module, images: int | None) -> None:
    """Checkpoints each block of ``visual`` (a ``Qwen3VLVisionModel``) over at most ``images`` images at a time.

    Call it with transformers' checkpointing of the vision tower off (``set_gradient_checkpointing`` does); None puts
    the released blocks back. A video's frames count as images (its attention segments are per frame).
    """
    _tile(visual.blocks, TiledCheckpointBlock, "tile_images", images, "vision_checkpoint_images")


def tile_text_checkpoints(language_model: nn.Module, rows: int | None) -> None:
    """Checkpoints each decoder layer of ``language_model`` (a ``Qwen3VLTextModel``) over at most ``rows`` rows at a
    time.

    Call it with transformers' checkpointing of the text tower off (``set_gradient_checkpointing`` does); None puts the
    released layers back. A pass of at most ``rows`` rows runs as one checkpoint, as without tiles. Rows are a
    batch's sequences (vdr pads them; a packed, padding-free batch would be one row).
    """
    _tile(language_model.layers, TiledCheckpointDecoderLayer, "tile_rows", rows, "text_checkpoint_rows")
