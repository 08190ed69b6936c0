"""One picture of what a model retrieves for a few queries: the image the retrieval callback logs to TensorBoard.

Per query, a caption line (id, NDCG@10, where its first relevant page ranked, the query text), then its top pages
left to right, relevant ones framed in green, and after a gap that relevant page itself framed in red when it is not
among them. Logged at every validation for the same queries, so TensorBoard's step slider shows a run learning.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vdr.data.schema import EvalSet
from vdr.evaluation.metrics import per_query_ndcg
from vdr.evaluation.thumbnails import thumbnail

RELEVANT, MISSED, OTHER = (26, 150, 65), (215, 25, 28), (200, 200, 200)
BACKGROUND, INK = (255, 255, 255), (30, 30, 30)
FRAME, GAP, CAPTION = 4, 12, 18  # pixels: a page's frame, space between pages, caption line height


def fixed_queries(num_queries: int, count: int) -> list[int]:
    """``count`` query rows spread evenly over the eval set (the same ones at every validation)."""
    count = min(count, num_queries)
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return [round(i * (num_queries - 1) / (count - 1)) for i in range(count)]  # distinct: steps are >= 1


def retrieval_grid(eval_set: EvalSet, ranked: torch.Tensor, queries: list[int], *, depth: int = 5,
                   size: int = 128) -> np.ndarray:
    """``[H, W, 3]`` uint8: one band per query of its top ``depth`` pages (relevant ones framed green).

    Args:
        eval_set: The queries, qrels and pages ``ranked`` refers to.
        ranked: ``[Q, K]`` corpus rows, best first (``K >= 10``; ``-1`` padding).
        queries: The query rows to draw, top to bottom.
        depth: Pages per query.
        size: Each page's box, in pixels (the page fits inside, aspect ratio kept).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    ndcg = per_query_ndcg(ranked, eval_set.qrels)  # [Q]
    corpus = eval_set.corpus_rows()
    cell = size + 2 * FRAME
    width = GAP + (depth + 1) * (cell + GAP) + GAP  # the extra cell: a relevant page that missed the top
    band = CAPTION + cell + GAP
    canvas = Image.new("RGB", (width, GAP + band * len(queries)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for band_index, query in enumerate(queries):
        top = GAP + band_index * band
        rows = [row for row in ranked[query].tolist() if row >= 0]
        relevant = eval_set.qrels[query]
        first_hit = next((rank for rank, row in enumerate(rows, start=1) if row in relevant), None)
        where = "no relevant page" if not relevant else (
            f"relevant at rank {first_hit}" if first_hit else f"relevant not in top {len(rows)}")
        score = "-" if math.isnan(ndcg[query]) else f"{ndcg[query]:.2f}"
        caption = f"{eval_set.query_ids[query]}  NDCG@10 {score}  {where}:  {eval_set.query_texts[query]}"
        draw.text((GAP, top), _fit(draw, caption, font, width - 2 * GAP), fill=INK, font=font)
        for column, row in enumerate(rows[:depth]):
            _paste(canvas, draw, corpus[row].image, GAP + column * (cell + GAP), top + CAPTION, size,
                   RELEVANT if row in relevant else OTHER)
        missed = [row for row in sorted(relevant) if row not in rows[:depth]]
        if missed:
            _paste(canvas, draw, corpus[missed[0]].image, GAP + depth * (cell + GAP) + GAP, top + CAPTION, size,
                   MISSED)
    return np.asarray(canvas)


def _paste(canvas: Image.Image, draw: ImageDraw.ImageDraw, page: Image.Image, left: int, top: int, size: int,
           frame: tuple[int, int, int]) -> None:
    draw.rectangle([left, top, left + size + 2 * FRAME - 1, top + size + 2 * FRAME - 1], fill=frame)
    small = thumbnail(page, size)
    box = Image.new("RGB", (size, size), BACKGROUND)
    box.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    canvas.paste(box, (left + FRAME, top + FRAME))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
