"""The tensors a Qwen3-VL encoder consumes, as one dataclass (what the collator returns per side of a batch)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from vdr.data.pages import Pages


@dataclass
class EncoderInputs:
    """A padded batch of chat-rendered sequences, with the patches of every image in it.

    Images come either as the processor's patches (``pixel_values``) or as decoded pages (``pages``) whose patches are
    made on the device at the forward (``vdr.data.pages``); ``image_grid_thw`` is there in both cases. Lightning moves
    dataclasses field by field, so this travels to the device as it is.
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64, 1 for real tokens
    mm_token_type_ids: torch.Tensor  # [B, L] int32: 0 text, 1 image, 2 video (transformers 5.x needs it for M-RoPE)
    pixel_values: torch.Tensor | None = None  # [P, 3 * 2 * 16 * 16] patches of all images, in batch order
    image_grid_thw: torch.Tensor | None = None  # [I, 3] int64 (temporal, height, width) patches per image
    pages: Pages | None = None  # the I images as uint8 pixels, instead of pixel_values

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

    def chunks(self, size: int, merge_area: int = 4) -> list[EncoderInputs]:
        """Consecutive groups of at most ``size`` sequences (see :meth:`rows`)."""
        layout = self._layout(merge_area)  # read from the device once, not once per chunk
        return [self._rows(i, min(i + size, len(self)), layout) for i in range(0, len(self), size)]

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
        if self.pages is not None:
            pages = self.pages.select(images[start], images[stop])
            return EncoderInputs(ids, mask, types, image_grid_thw=grid, pages=pages)
        return EncoderInputs(ids, mask, types, self.pixel_values[patches[start] : patches[stop]], grid)

    def to(self, device: torch.device | str) -> EncoderInputs:
        """The same inputs on ``device`` (tensors already there are not copied)."""
        non_blocking = torch.device(device).type == "cuda"  # host-to-GPU copies may overlap; copies to the host may not
        moved = [None if t is None else t.to(device, non_blocking=non_blocking)
                 for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids, self.pixel_values,
                           self.image_grid_thw, self.pages)]
        return EncoderInputs(*moved)

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
        return kwargs
