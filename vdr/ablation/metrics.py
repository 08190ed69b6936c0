"""A run's validation curves from its TensorBoard event files, and the best and final value of each.

A run can write several event files (one per ``trainer.fit``/``validate`` call, e.g. with ``validate_before_fit``)
whose names do not sort by time, so points are ordered by step (then by write time), never by file name.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

Curve = list[tuple[int, float]]


@dataclass(frozen=True)
class MetricSummary:
    """The best value of a curve (its first occurrence) and its value at the largest step."""

    best: float
    best_step: int
    final: float
    final_step: int


def lower_is_better(tag: str) -> bool:
    """Losses are minimized; every other vdr validation metric (NDCG, recall, MRR, ...) is maximized."""
    return "loss" in tag.lower()


def read_scalars(log_dir: str | os.PathLike, prefix: str = "val/") -> dict[str, Curve]:
    """``{tag: [(step, value), ...]}`` in step order for every scalar tag under ``prefix`` in ``log_dir``'s events.

    Only the directory's own event files are read (not subdirectories). At one step, the value written last counts
    last (a validation repeated at the same step replaces the earlier one as the final value).
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    points: dict[str, list[tuple[int, float, float]]] = {}
    for events in Path(log_dir).glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            if tag.startswith(prefix):
                points.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))
    return {tag: [(step, value) for step, _, value in sorted(curve)] for tag, curve in sorted(points.items())}


def summarize(curve: Curve, lower: bool = False) -> MetricSummary:
    """Best (max, or min where ``lower``; NaNs ignored, NaN if all are) and final value of a non-empty curve."""
    if not curve:
        raise ValueError("summarize needs at least one point")
    final_step, final = curve[-1]
    finite = [(step, value) for step, value in curve if not math.isnan(value)]
    if not finite:
        return MetricSummary(math.nan, final_step, final, final_step)
    pick = min if lower else max
    best_step, best = pick(finite, key=lambda point: point[1])  # the first of equal values: the earliest step
    return MetricSummary(best, best_step, final, final_step)


def summarize_all(curves: dict[str, Curve]) -> dict[str, MetricSummary]:
    """``summarize`` per tag, with the direction ``lower_is_better`` gives."""
    return {tag: summarize(curve, lower_is_better(tag)) for tag, curve in curves.items() if curve}
