"""Learning-rate schedule: linear warmup, then cosine, linear or no decay (a ``LambdaLR`` factor)."""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["cosine", "linear", "constant"]


def warmup_decay(step: int, *, total_steps: int, warmup_steps: int, decay: Decay, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based; the first step already trains, at 1/warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
