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
        """The first ``n`` sequences with exactly their images' patches (trailing padding columns may remain).

        Args:
            n: Sequences to keep.
            merge_area: Patches per visual token (Qwen3-VL merges 2x2).
        """
        if self.pixel_values is None:
            return EncoderInputs(self.input_ids[:n], self.attention_mask[:n], self.mm_token_type_ids[:n])
        kept_tokens = int((self.mm_token_type_ids[:n] == 1).sum())
        tokens_per_image = self.image_grid_thw.prod(-1) // merge_area  # [I]
        images = int((tokens_per_image.cumsum(0) <= kept_tokens).sum())
        patches = int(self.image_grid_thw[:images].prod(-1).sum())
        return EncoderInputs(self.input_ids[:n], self.attention_mask[:n], self.mm_token_type_ids[:n],
                             self.pixel_values[:patches], self.image_grid_thw[:images])

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
