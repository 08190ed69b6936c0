"""The tensors a Qwen3-VL encoder consumes, as one dataclass (what the collator returns per side of a batch)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch

from vdr.data.pages import Pages


@dataclass
class EncoderInputs:
    """A padded batch of chat-rendered sequences, with the patches of every image in it.

    Images come either as the processor's patches (``pixel_values``) or as decoded pages (``pages``) whose patches are
    made on the device at the forward (``vdr.data.pages``); ``image_grid_thw`` is there in both cases. Lightning moves
    dataclasses field by field, so this travels to the device as it is.

    The collator also computes, on the host, what Qwen3-VL would otherwise derive at the forward from tensors on the
    GPU, stopping it each time it reads one: the M-RoPE ``position_ids`` (several host reads per row of pages) and
    the vision tower's attention segments (``vision_seqlens``: a host read in each of the 24 vision blocks).
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64, 1 for real tokens
    mm_token_type_ids: torch.Tensor  # [B, L] int32: 0 text, 1 image, 2 video (transformers 5.x needs it for M-RoPE)
    pixel_values: torch.Tensor | None = None  # [P, 3 * 2 * 16 * 16] patches of all images, in batch order
    image_grid_thw: torch.Tensor | None = None  # [I, 3] int64 (temporal, height, width) patches per image
    pages: Pages | None = None  # the I images as uint8 pixels, instead of pixel_values
    position_ids: torch.Tensor | None = None  # [3, B, L] int64 M-RoPE positions of rows with images (else None)
    vision_seqlens: tuple[int, ...] | None = None  # [I] patches per image: host ints, which Lightning leaves there

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_images(self) -> bool:
        return self.image_grid_thw is not None

    def head(self, n: int, merge_area: int = 4) -> EncoderInputs:
        """The first ``n`` sequences with exactly their images' patches (see :meth:`rows`)."""
        return self.rows(0, n, merge_area)

    def rows(self, start: int, stop: int, merge_area: int = 4) -> EncoderInputs:
        """Sequences ``start`` to ``stop - 1`` with exactly their images' patches, trimmed to their longest sequence.

        Args:
            start: First sequence kept.
            stop: One past the last sequence kept.
            merge_area: Patches per visual token (Qwen3-VL merges 2x2).
        """
        return self._rows(start, stop, self._layout(merge_area))

    def chunks(self, size: int | None = None, tokens: int | None = None, merge_area: int = 4) -> list[EncoderInputs]:
        """Consecutive groups of sequences (see :meth:`rows`), each within both bounds given.

        Args:
            size: At most this many sequences per group.
            tokens: At most this many tokens per group, counted as the group is padded: its sequences times its
                longest sequence (visual tokens included). A sequence longer than the budget forms a group alone.
            merge_area: Patches per visual token (Qwen3-VL merges 2x2).
        """
        if size is None and tokens is None:
            raise ValueError("chunks needs a size, a token budget or both")
        for name, value in (("size", size), ("tokens", tokens)):
            if value is not None and value < 1:
                raise ValueError(f"chunks: {name} must be >= 1, got {value}")
        layout = self._layout(merge_area)  # read from the device once, not once per chunk
        lengths = layout[0]
        bounds, start, longest = [], 0, 0
        for row, length in enumerate(lengths):
            rows, padded = row - start + 1, max(longest, length)  # the group if this row joins it
            over = (size is not None and rows > size) or (tokens is not None and rows * padded > tokens)
            if over and rows > 1:
                bounds.append((start, row))
                start, padded = row, length
            longest = padded
        bounds.append((start, len(lengths)))
        return [self._rows(a, b, layout) for a, b in bounds if b > a]

    def _layout(self, merge_area: int) -> tuple[list[int], list[int] | None, list[int] | None]:
        """Host-side bookkeeping: each row's length, and at each row boundary the images and patches before it.

        Images are stored in sequence order, so the images before row ``r`` are those whose visual tokens all belong
        to the earlier rows.
        """
        lengths = self.attention_mask.sum(1).tolist()
        if not self.has_images:
            return lengths, None, None
        tokens = [0, *(self.mm_token_type_ids == 1).sum(1).cumsum(0).tolist()]  # image tokens before each boundary
        image_ends = (self.image_grid_thw.prod(-1) // merge_area).cumsum(0).tolist()  # [I] image-token end per image
        patch_ends = [0, *self.image_grid_thw.prod(-1).cumsum(0).tolist()]  # patches before each image
        images = [bisect.bisect_right(image_ends, t) for t in tokens]
        return lengths, images, [patch_ends[i] for i in images]

    def _rows(self, start: int, stop: int, layout) -> EncoderInputs:
        lengths, images, patches = layout
        width = max(lengths[start:stop])  # right padding beyond it is dropped
        ids, mask, types = (t[start:stop, :width]
                            for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids))
        if images is None or images[start] == images[stop]:
            return EncoderInputs(ids, mask, types)
        grid = self.image_grid_thw[images[start] : images[stop]]
        host = {}
        if self.position_ids is not None:
            host["position_ids"] = self.position_ids[:, start:stop, :width]
        if self.vision_seqlens is not None:
            host["vision_seqlens"] = self.vision_seqlens[images[start] : images[stop]]
        if self.pages is not None:
            pages = self.pages.select(images[start], images[stop])
            return EncoderInputs(ids, mask, types, image_grid_thw=grid, pages=pages, **host)
        return EncoderInputs(ids, mask, types, self.pixel_values[patches[start] : patches[stop]], grid, **host)

    def to(self, device: torch.device | str) -> EncoderInputs:
        """The same inputs on ``device`` (tensors already there are not copied)."""
        non_blocking = torch.device(device).type == "cuda"  # host-to-GPU copies may overlap; copies to the host may not
        moved = [None if t is None else t.to(device, non_blocking=non_blocking)
                 for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids, self.pixel_values,
                           self.image_grid_thw, self.pages, self.position_ids)]
        return EncoderInputs(*moved, vision_seqlens=self.vision_seqlens)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Qwen3VLModel.forward``; pages become patches here, on the device they are on."""
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.has_images:
            kwargs["pixel_values"] = self.pixel_values if self.pages is None else self.pages.pixel_values()
            kwargs["image_grid_thw"] = self.image_grid_thw
            if self.position_ids is not None:
                kwargs["position_ids"] = self.position_ids
        return kwargs


def mrope_position_ids(attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor,
                       merge_size: int) -> torch.Tensor:
    """``[3, B, L]`` Qwen3-VL M-RoPE positions (temporal, height, width) of right-padded host tensors.

    What ``Qwen3VLModel.get_rope_index`` computes at the forward (the tests compare the two): text tokens count on
    from the previous position; a run of image tokens takes ``start + (t, row, column)`` over its merged grid, and the
    text after it continues from ``start + max(height, width) / merge_size``; padding gets 0.

    Args:
        attention_mask: ``[B, L]`` 1 for real tokens.
        mm_token_type_ids: ``[B, L]`` 0 for text, 1 for image tokens.
        image_grid_thw: ``[I, 3]`` patches per image (before merging), in sequence order.
        merge_size: Patches merged per side into one visual token (Qwen3-VL: 2).
    """
    batch, length = attention_mask.shape
    positions = torch.zeros(3, batch, length, dtype=torch.int64)
    grids = iter(image_grid_thw.tolist())
    for row in range(batch):
        real = attention_mask[row].bool()
        types = mm_token_type_ids[row][real].tolist()
        pieces, position = [], 0
        for kind, run in itertools.groupby(types):
            if kind == 0:
                n = len(list(run))
                pieces.append(torch.arange(position, position + n).expand(3, n))
                position += n
            else:
                t, h, w = next(grids)
                grid = torch.meshgrid(torch.arange(t), torch.arange(h // merge_size), torch.arange(w // merge_size),
                                      indexing="ij")
                pieces.append(torch.stack(grid).reshape(3, -1) + position)
                position += max(h, w) // merge_size
        if pieces:  # a row of padding only keeps its zeros
            positions[:, row, real] = torch.cat(pieces, dim=1)
    return positions


def vision_cu_seqlens(seqlens: tuple[int, ...]) -> torch.Tensor:
    """``[I + 1]`` int32 host tensor: where each image's patches start and end in the vision tower's packed input."""
    return torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
