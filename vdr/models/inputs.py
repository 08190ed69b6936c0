"""The tensors a Qwen3-VL encoder consumes, as one dataclass (what the collator returns per side of a batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderInputs:
    """A padded batch of chat-rendered sequences, with the patches of every image in it.

    Lightning moves dataclasses field by field, so this travels to the device as it is.
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64, 1 for real tokens
    mm_token_type_ids: torch.Tensor  # [B, L] int32: 0 text, 1 image, 2 video (transformers 5.x needs it for M-RoPE)
    pixel_values: torch.Tensor | None = None  # [P, 3 * 2 * 16 * 16] patches of all images, in batch order
    image_grid_thw: torch.Tensor | None = None  # [I, 3] int64 (temporal, height, width) patches per image

    def __len__(self) -> int:
        return self.input_ids.shape[0]

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
        width = int(self.attention_mask[start:stop].sum(1).max())  # right padding beyond it is dropped
        ids, mask, types = (t[start:stop, :width]
                            for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids))
        if self.pixel_values is None:
            return EncoderInputs(ids, mask, types)
        # Images are stored in sequence order: the ones before `start` hold the image tokens of the earlier rows.
        tokens_per_row = (self.mm_token_type_ids == 1).sum(1)  # [B]
        image_ends = (self.image_grid_thw.prod(-1) // merge_area).cumsum(0)  # [I] image-token end of each image
        first = int((image_ends <= tokens_per_row[:start].sum()).sum())
        last = int((image_ends <= tokens_per_row[:stop].sum()).sum())
        if first == last:
            return EncoderInputs(ids, mask, types)
        patch_ends = self.image_grid_thw.prod(-1).cumsum(0)  # [I]
        begin = int(patch_ends[first - 1]) if first else 0
        return EncoderInputs(ids, mask, types, self.pixel_values[begin : int(patch_ends[last - 1])],
                             self.image_grid_thw[first:last])

    def chunks(self, size: int, merge_area: int = 4) -> list[EncoderInputs]:
        """Consecutive groups of at most ``size`` sequences (see :meth:`rows`)."""
        return [self.rows(i, min(i + size, len(self)), merge_area) for i in range(0, len(self), size)]

    def to(self, device: torch.device | str) -> EncoderInputs:
        """The same inputs on ``device`` (tensors already there are not copied)."""
        non_blocking = torch.device(device).type == "cuda"  # host-to-GPU copies may overlap; copies to the host may not
        moved = [None if t is None else t.to(device, non_blocking=non_blocking)
                 for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids, self.pixel_values,
                           self.image_grid_thw)]
        return EncoderInputs(*moved)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Qwen3VLModel.forward``."""
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
            kwargs["image_grid_thw"] = self.image_grid_thw
        return kwargs
