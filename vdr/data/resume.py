"""Where training is in its data, so that a resumed run reads the batches the interrupted one would have read.

A run's batches are a function of (seed, epoch) alone: ``ShuffledRows`` and ``TokenBudgetBatchSampler`` reshuffle
from those two, never from a generator that advances through the run. A checkpoint records a ``TrainPosition`` (the
epoch and the batches of it finished, from Lightning's loop counters), and the resumed run's sampler starts there:
the epoch's same order, less the batches already trained on.

Lightning asks the training loader for its first batches before it tells the sampler the epoch (``set_epoch``) on
resume, so the position's epoch is set when the sampler is built, not left to ``set_epoch``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class TrainPosition:
    """The epoch a run was in and how many of its training batches it had finished."""

    epoch: int
    batches: int  # fewer than the epoch's (an epoch's end is recorded as the next one's start)


class ShuffledRows(DistributedSampler):
    """Row indices for fixed-size training batches: a fresh shuffle per epoch from ``seed + epoch``, this rank's share.

    A ``DistributedSampler`` (so Lightning keeps it under DDP rather than replacing it) that can start mid-epoch.
    With one rank it is a seeded ``RandomSampler`` whose epochs do not depend on the epochs before them.

    Args:
        num_rows: Rows in the training table.
        batch_size: Rows per batch (the loader's), to skip whole batches when starting mid-epoch.
        seed: Seed of the shuffle; every rank must use the same one.
        rank: This rank.
        world_size: Ranks sharing the data; the rows are cut to a multiple of it (no row repeated to pad).
        start: Where to start: this epoch, less its first ``start.batches`` batches (None: epoch 0 from its start).
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: TrainPosition | None = None) -> None:
        super().__init__(range(num_rows), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start = start
        if self.start is not None:
            self.set_epoch(self.start.epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        if self.start is not None and self.start.epoch == self.epoch:
            indices = indices[self.start.batches * self.batch_size :]
            self.start = None  # once: the next pass over this epoch (none in a normal run) is whole
        return iter(indices)
