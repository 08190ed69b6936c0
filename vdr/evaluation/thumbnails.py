"""Small pictures of corpus pages, for reports and TensorBoard: decoded once, shrunk, and (for HTML) JPEG-encoded.

A report of 1,000 queries shows up to ~10,000 distinct pages, so each is kept small: at most ``size`` pixels on its
longer side (aspect ratio kept) and JPEG quality 70, about 3-8 KB for a document page at 160 px.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from vdr.data.schema import EvalSet


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """An RGB copy at most ``size`` pixels on its longer side (never enlarged)."""
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)  # in place, keeps the aspect ratio
    return image


def jpeg_base64(image: Image.Image, quality: int = 70) -> str:
    """The image as a base64 JPEG string (the payload of a ``data:image/jpeg;base64,`` URI)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class PageThumbnails(torch.utils.data.Dataset):
    """Base64 JPEG thumbnails of some corpus rows; items are ``(row, base64)`` (decoding runs in loader workers).

    Args:
        eval_set: Where the pages are.
        rows: The corpus rows to draw.
        size: Longer side in pixels.
        quality: JPEG quality (1-95).
    """

    def __init__(self, eval_set: EvalSet, rows: list[int], size: int, quality: int = 70) -> None:
        if size < 16:
            raise ValueError(f"thumbnail size must be at least 16 pixels, got {size}")
        if not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
        self.corpus, self.rows, self.size, self.quality = eval_set.corpus_rows(), rows, size, quality

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[int, str]:
        row = self.rows[item]
        return row, jpeg_base64(thumbnail(self.corpus[row].image, self.size), self.quality)
