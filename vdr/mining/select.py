"""Which candidates become hard negatives: rank window, margin filters and sampling, as tensor operations.

The conventions are Sentence Transformers' (``mine_hard_negatives``) and NV-Retriever's (REFERENCE.md §5):

1. A query's candidates are the retriever's ranking of the corpus with the query's positives removed (by content, so
   a copy of the positive elsewhere in the corpus is removed too).
2. Ranks ``[range_min, range_max)`` of that list form the window (0-based: ``range_min = 0`` keeps the top page).
3. A candidate is dropped when it scores too close to the positive (``absolute_margin``: ``score > positive -
   margin``; ``relative_margin``: ``score > positive - |positive| * margin``) or above ``max_score``: near-positive
   scores are the likely false negatives (an unlabeled relevant page).
4. ``top`` sampling takes the best-ranked survivors (in rank order), ``random`` a uniform sample of them (in draw
   order, so the first j of k columns are still a uniform sample); a row with fewer survivors than ``num_negatives``
   is skipped (counted), so every written row has all its negative columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PAD = -1


@dataclass
class MiningSettings:
    """How negatives are picked from each query's ranking.

    Attributes:
        num_negatives: Negatives per row (columns ``negative_0 .. negative_{k-1}``).
        range_min: First rank of the window (0-based, positives excluded from the ranking).
        range_max: End of the window (exclusive).
        absolute_margin: Drop candidates scoring above ``positive - absolute_margin``.
        relative_margin: Drop candidates scoring above ``positive - |positive| * relative_margin`` (0.05 with
            ``top`` sampling is NV-Retriever's setting).
        max_score: Drop candidates scoring above this.
        sampling: ``top``: the best-ranked survivors; ``random``: a uniform sample of them.
        seed: Seed of ``random`` sampling.
    """

    num_negatives: int = 1
    range_min: int = 0
    range_max: int = 50
    absolute_margin: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None
    sampling: Literal["top", "random"] = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"need 0 <= range_min < range_max, got range_min={self.range_min}, "
                             f"range_max={self.range_max}")
        if self.range_max - self.range_min < self.num_negatives:
            raise ValueError(f"the window [range_min, range_max) = [{self.range_min}, {self.range_max}) holds fewer "
                             f"ranks than num_negatives={self.num_negatives}")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be 'top' or 'random', got {self.sampling!r}")


@dataclass
class Window:
    """Each row's candidates inside the rank window, best first.

    Attributes:
        rows: ``[R, W]`` corpus rows, ``-1`` where the ranking ran out.
        scores: ``[R, W]`` their scores (``-inf`` at padding).
    """

    rows: torch.Tensor
    scores: torch.Tensor


@dataclass
class Selection:
    """The mined negatives and what the filters did.

    Attributes:
        rows: ``[R, k]`` corpus rows of each row's negatives (top: in rank order; random: in draw order); ``-1`` on
            skipped rows.
        scores: ``[R, k]`` their scores (NaN on skipped rows).
        kept: ``[R]`` whether the row has all ``k`` negatives.
        counts: Candidates in the windows, dropped by each filter, and rows skipped.
    """

    rows: torch.Tensor
    scores: torch.Tensor
    kept: torch.Tensor
    counts: dict[str, int]


def window(ranked_rows: torch.Tensor, ranked_scores: torch.Tensor, excluded: torch.Tensor,
           settings: MiningSettings) -> Window:
    """Removes each row's positives from its ranking and keeps ranks ``[range_min, range_max)`` of the rest.

    Args:
        ranked_rows: ``[R, C]`` corpus rows by descending score (``-1`` padding).
        ranked_scores: ``[R, C]`` their scores.
        excluded: ``[R, C]`` True where the candidate is one of the row's positives.
        settings: The window bounds.
    """
    valid = (ranked_rows != PAD) & ~excluded  # [R, C]
    rank = valid.long().cumsum(dim=1) - 1  # [R, C] rank among the non-positives
    inside = valid & (rank >= settings.range_min) & (rank < settings.range_max)  # [R, C]
    # No wider than the ranking can fill: a whole-corpus window (random negatives) costs [R, C], not [R, range_max].
    width = max(1, min(settings.range_max, ranked_rows.shape[1]) - settings.range_min)
    slot = (rank - settings.range_min).clamp(0, width - 1)  # [R, C]
    rows = torch.full((ranked_rows.shape[0], width), PAD, dtype=torch.int64)  # [R, W]
    scores = torch.full((ranked_rows.shape[0], width), float("-inf"))  # [R, W]
    at = inside.nonzero(as_tuple=True)
    rows[at[0], slot[at]] = ranked_rows[at]
    scores[at[0], slot[at]] = ranked_scores[at].float()
    return Window(rows, scores)


def resort(candidates: Window, scores: torch.Tensor) -> Window:
    """The window ordered by new ``[R, W]`` scores (a reranker's), best first; padding stays last."""
    scores = scores.float().masked_fill(candidates.rows == PAD, float("-inf"))  # [R, W]
    order = scores.argsort(dim=1, descending=True, stable=True)  # [R, W]
    return Window(candidates.rows.gather(1, order), scores.gather(1, order))


def select(candidates: Window, positive_scores: torch.Tensor, settings: MiningSettings,
           generator: torch.Generator | None = None) -> Selection:
    """Applies the margin and score filters, then samples ``num_negatives`` survivors per row.

    Args:
        candidates: Each row's window, best first.
        positive_scores: ``[R]`` each row's positive's score under the same scorer.
        settings: Filters and sampling.
        generator: Source of ``random`` sampling (default: a fresh one seeded with ``settings.seed``); pass one
            generator to successive calls over chunks of rows so that the chunks draw independently.
    """
    present = candidates.rows != PAD  # [R, W]
    scores, positive = candidates.scores, positive_scores.float()[:, None]  # [R, W], [R, 1]
    keep = present.clone()
    counts = {"candidates": int(present.sum())}
    bounds = {  # a candidate scoring above a bound is dropped
        "dropped_absolute_margin": None if settings.absolute_margin is None else positive - settings.absolute_margin,
        "dropped_relative_margin": None if settings.relative_margin is None
        else positive - positive.abs() * settings.relative_margin,
        "dropped_max_score": None if settings.max_score is None else torch.tensor(float(settings.max_score)),
    }
    for name, bound in bounds.items():
        if bound is not None:
            dropped = scores > bound  # [R, W]
            counts[name] = int((keep & dropped).sum())  # each candidate counted by the first filter that drops it
            keep &= ~dropped
    if settings.sampling == "top":
        priority = keep.float()  # [R, W]; the stable sort below keeps rank order among survivors
    else:
        generator = generator or torch.Generator().manual_seed(settings.seed)
        priority = torch.rand(keep.shape, generator=generator) + keep.float()  # survivors in (1, 2), others in (0, 1)
    k = settings.num_negatives
    chosen = priority.argsort(dim=1, descending=True, stable=True)[:, :k]  # [R, k]
    kept = keep.sum(dim=1) >= k  # [R]
    # Top picks come in rank order; random ones in draw order (not sorted: training on the first j of k random
    # negatives must still see uniform draws, not the hardest of k).
    rows, picked = candidates.rows.gather(1, chosen), scores.gather(1, chosen)  # [R, k]
    rows[~kept], picked[~kept] = PAD, float("nan")
    counts["rows_skipped"] = int((~kept).sum())
    return Selection(rows, picked, kept, counts)
