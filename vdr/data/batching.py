"""Token-budget batching: batches of similar-length rows whose padded decoder tokens stay under a budget.

Pages vary in size, and so do their sequences (template tokens plus one visual token per 32x32 px after the image
processor's resize). A fixed batch size must be small enough for the batch of the largest pages, and pads every
small page of a batch to its largest. What the decoder pays for a training batch of B rows with k hard negatives is

    padded tokens = B * (longest query) + B * (1 + k) * (longest page)

(queries pad to their longest, the B * (1 + k) pages to theirs; vision patches are packed without padding), and
``TokenBudgetBatchSampler`` bounds exactly that: it sorts rows by length within shuffled pools, packs them greedily
under ``max_tokens``, and deals the batches to the ranks.

Distributed: every rank packs the whole dataset identically from (seed, epoch) and keeps its share, so no
communication is needed; every rank gets the same number of batches, and the batches of one step have similar costs
(the slowest rank sets the pace of a DDP step). Per-rank batch sizes differ, which the bi-encoder's gather of
documents across ranks allows (it pads before gathering).

The number of batches is fixed per run: the count of epoch 0, rounded down to a multiple of the world size. Lightning
reads a loader's length once (before the first epoch) to count the steps of an epoch and, through
``estimated_stepping_batches``, the length of the learning-rate schedule; an epoch that yielded more batches would be
cut short, one that yielded fewer would end early and shift the schedule. So an epoch that packs into more batches
moves the rows of its smallest batches into other batches with room (dropping a row only where none has room), and
one that packs into fewer splits its largest batches in two (halves of a batch stay under the budget).
"""

from __future__ import annotations

import heapq
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from vdr.data.errors import DataError
from vdr.data.images import read_encoded
from vdr.data.pages import smart_resize
from vdr.data.resume import TrainPosition
from vdr.models.prompts import messages


def visual_tokens(width: int, height: int, image_processor) -> int:
    """Visual tokens of a ``width`` x ``height`` page after ``image_processor``'s resize (its size bounds)."""
    factor = image_processor.patch_size * image_processor.merge_size  # 32: one visual token per factor x factor px
    size = image_processor.size
    resized_height, resized_width = smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"],
                                                 max_pixels=size["longest_edge"])
    return (resized_height // factor) * (resized_width // factor)


@dataclass
class RowCosts:
    """Sequence lengths of training rows: what the padded-token cost of any batch of them is computed from."""

    query: list[int]  # [N] query sequence length (template + text tokens)
    page: list[int]  # [N] the row's longest page sequence (template + visual tokens) over its 1 + k pages
    pages_per_row: int  # 1 + k
    name: str = "train"  # the dataset, for messages

    def __len__(self) -> int:
        return len(self.query)

    def row_tokens(self, row: int) -> int:
        """Padded tokens of a batch holding only ``row``."""
        return self.query[row] + self.pages_per_row * self.page[row]

    def batch_tokens(self, rows: Sequence[int]) -> int:
        """Padded decoder tokens of a batch: B * longest query + B * (1 + k) * longest page."""
        longest_query, longest_page = max(self.query[r] for r in rows), max(self.page[r] for r in rows)
        return len(rows) * (longest_query + self.pages_per_row * longest_page)


def train_row_costs(rows, collator, chunk: int = 256) -> RowCosts:
    """The sequence lengths ``collator`` gives each row of ``rows``, without decoding a pixel.

    Queries are tokenized by the collator itself (exact, shortening included); a page's length is the document
    template's tokens plus its visual tokens, from the size in its image header and the processor's resize rule.

    Args:
        rows: Training rows (``vdr.data.schema.TrainRows``).
        collator: The ``EmbeddingCollator`` that will collate them.
        chunk: Rows read and tokenized at a time.
    """
    if not all(hasattr(collator, name) for name in ("encode_texts", "prompts", "image_processor")):
        raise TypeError(f"token-budget batching needs an embedding collator (queries and pages), got "
                        f"{type(collator).__name__}")
    template = collator.tokenizer(collator.render(messages(collator.prompts.document, num_images=1)),
                                  add_special_tokens=False)["input_ids"]
    page_template = len(template) - template.count(collator.image_token_id)  # the placeholder becomes the page
    queries: list[int] = []
    pages: list[int] = []
    table = rows.table.select_columns(["query", *rows.image_columns])
    for records in table.iter(batch_size=chunk):
        encoded = collator.encode_texts(records["query"], collator.prompts.query)
        queries.extend(encoded.attention_mask.sum(1).tolist())
        for offset in range(len(records["query"])):
            row = len(pages)
            longest = 0
            for column in rows.image_columns:
                image = read_encoded(records[column][offset], dataset=rows.name, row=row, column=column,
                                     root=rows.root)
                try:
                    with Image.open(io.BytesIO(image.data)) as header:  # reads the header, not the pixels
                        longest = max(longest, visual_tokens(*header.size, collator.image_processor))
                except (UnidentifiedImageError, OSError, ValueError) as error:
                    raise DataError(rows.name, f"cannot size image {image.origin}: {error}", row=row,
                                    column=column) from error
            pages.append(page_template + longest)
    return RowCosts(queries, pages, len(rows.image_columns), rows.name)


@dataclass
class EpochPlan:
    """One epoch's batches on every rank."""

    steps: list[list[list[int]]]  # [step][rank] -> dataset rows of that rank's batch
    dropped: list[int]  # rows left out this epoch (no batch had room for them)


class TokenBudgetBatchSampler(BatchSampler):
    """Batches of similar-length rows under a padded-token budget, the same number on every rank.

    A ``BatchSampler`` subclass so that Lightning, which under DDP swaps a ``DistributedSampler`` into a
    loader's batch sampler, can rebuild it with one: the rebuilt sampler takes its rank and world size from that
    ``DistributedSampler`` (which must agree with ``rank``/``world_size`` where those are given) and its epoch from
    the sampler's ``set_epoch``, which Lightning calls every epoch. The ``DistributedSampler``'s own order of rows
    is not used: rows are packed from ``seed`` and the epoch, identically on every rank.

    Args:
        costs: Sequence lengths of the rows (``train_row_costs``).
        max_tokens: Most padded decoder tokens per batch (queries plus pages, see the module docstring).
        max_batch_size: Most rows per batch (None: only the budget bounds it).
        seed: Seed of the shuffle; every rank must use the same one.
        rank: This rank (None: the ``sampler``'s, else 0).
        world_size: Ranks sharing the data (None: the ``sampler``'s, else 1).
        pool_batches: Rows are sorted by length within shuffled pools of about this many batches: larger pools pad
            less, smaller ones mix the rows of a batch more (more varied in-batch negatives).
        sampler: A ``DistributedSampler`` that carries rank, world size and epoch (Lightning passes its own; None
            makes one from ``rank`` and ``world_size``); any other sampler is ignored.
        start: Where to start: this epoch, less its first ``start.batches`` batches (a resumed run; None: epoch 0
            from its start). An init argument, so it survives Lightning rebuilding the sampler under DDP.

    Raises:
        DataError: A row needs more than ``max_tokens`` on its own (named, with its cost).
        ValueError: The rows pack into fewer batches than there are ranks.
    """

    def __init__(self, costs: RowCosts, max_tokens: int, *, max_batch_size: int | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, pool_batches: int = 16,
                 sampler: Sampler | None = None, start: TrainPosition | None = None) -> None:
        # BatchSampler.__init__ is not called: it wants a fixed batch size, and there is none here.
        if max_tokens < 1 or (max_batch_size is not None and max_batch_size < 1) or pool_batches < 1:
            raise ValueError(f"max_tokens ({max_tokens}), max_batch_size ({max_batch_size}) and pool_batches "
                             f"({pool_batches}) must be >= 1")
        if isinstance(sampler, DistributedSampler):
            if (rank is not None and rank != sampler.rank) or (world_size not in (None, sampler.num_replicas)):
                raise ValueError(f"rank {rank} of {world_size} disagrees with the DistributedSampler's rank "
                                 f"{sampler.rank} of {sampler.num_replicas}")
        else:
            rank, world_size = rank or 0, world_size or 1
            sampler = DistributedSampler(range(len(costs)), num_replicas=world_size, rank=rank, shuffle=False)
        self.sampler = sampler
        self.rank, self.world_size = sampler.rank, sampler.num_replicas
        self.costs, self.max_tokens, self.max_batch_size, self.seed = costs, max_tokens, max_batch_size, seed
        self.drop_last = True  # rows that no batch has room for are left out (see ``EpochPlan.dropped``)
        over = [row for row in range(len(costs)) if costs.row_tokens(row) > max_tokens]
        if over:
            worst = max(over, key=costs.row_tokens)
            raise DataError(
                costs.name, f"needs {costs.row_tokens(over[0])} padded tokens on its own (query "
                f"{costs.query[over[0]]} + {costs.pages_per_row} pages x {costs.page[over[0]]}), over the token "
                f"budget max_tokens={max_tokens}; {len(over)} row(s) are over it, the largest (row {worst}) needs "
                f"{costs.row_tokens(worst)}. Raise the budget (data.max_tokens_per_batch) or lower the model's "
                "max_pixels / max_text_tokens", row=over[0])
        # Rows per pool: pool_batches batches of the median row.
        median = sorted(costs.row_tokens(row) for row in range(len(costs)))[len(costs) // 2]
        typical = min(max_tokens // median, max_batch_size or len(costs))
        self.pool_rows = max(1, pool_batches * typical)
        packed = len(self._pack(random.Random(self._seed_string(0))))
        self.num_batches = packed // self.world_size * self.world_size  # the whole run's batches per epoch, all ranks
        if self.num_batches == 0:
            raise ValueError(f"{costs.name}: {len(costs)} rows pack into {packed} batch(es) under max_tokens="
                             f"{max_tokens}, fewer than the {self.world_size} ranks")
        self._plan: tuple[int, EpochPlan] | None = None
        self.start = start
        if self.start is not None:
            self.set_epoch(self.start.epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle (Lightning calls the ``sampler``'s ``set_epoch``, which is the same)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def __iter__(self):
        steps = self.plan(self.epoch).steps
        if self.start is not None and self.start.epoch == self.epoch:
            steps = steps[self.start.batches :]
            self.start = None  # once (see ``vdr.data.resume``)
        for step in steps:
            yield list(step[self.rank])

    def plan(self, epoch: int) -> EpochPlan:
        """Every rank's batches for ``epoch`` (deterministic in the seed and the epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = random.Random(self._seed_string(epoch))
            batches = self._pack(rng)
            dropped = self._fit(batches)
            self._plan = epoch, EpochPlan(self._deal(batches, rng), dropped)
        return self._plan[1]

    def _seed_string(self, epoch: int) -> str:
        return f"vdr-batching:{self.seed}:{epoch}"  # string seeds hash with SHA-512: the same on every machine

    def _pack(self, rng: random.Random) -> list[list[int]]:
        """Shuffles the rows, sorts each pool by length, and packs greedily under the budget.

        Pools are sorted alternately ascending and descending, so a batch that runs on into the next pool meets rows
        of similar length.
        """
        order = list(range(len(self.costs)))
        rng.shuffle(order)
        query, page, pages_per_row = self.costs.query, self.costs.page, self.costs.pages_per_row
        batches: list[list[int]] = []
        batch: list[int] = []
        longest_query = longest_page = 0
        for pool, start in enumerate(range(0, len(order), self.pool_rows)):
            rows = sorted(order[start : start + self.pool_rows], key=lambda r: (page[r], query[r]),
                          reverse=pool % 2 == 1)
            for row in rows:
                q, p = max(longest_query, query[row]), max(longest_page, page[row])
                full = self.max_batch_size is not None and len(batch) == self.max_batch_size
                if batch and (full or (len(batch) + 1) * (q + pages_per_row * p) > self.max_tokens):
                    batches.append(batch)
                    batch, q, p = [], query[row], page[row]
                batch.append(row)
                longest_query, longest_page = q, p
        if batch:
            batches.append(batch)
        return batches

    def _fit(self, batches: list[list[int]]) -> list[int]:
        """Brings ``batches`` (in place) to the run's count; returns the rows no batch had room for."""
        if len(batches) < self.num_batches:
            # Split the largest batches: each half is a subset of a batch under the budget, so it is under too.
            heap = [(-len(b), i) for i, b in enumerate(batches)]
            heapq.heapify(heap)
            while len(batches) < self.num_batches:
                _, i = heapq.heappop(heap)
                batch = batches[i]
                batches[i], tail = batch[: len(batch) // 2], batch[len(batch) // 2 :]
                batches.append(tail)
                heapq.heappush(heap, (-len(batches[i]), i))
                heapq.heappush(heap, (-len(tail), len(batches) - 1))
            return []
        dropped: list[int] = []
        if len(batches) > self.num_batches:
            # Move the rows of the smallest batches into the batch whose padded tokens grow least (best fit).
            batches.sort(key=len)
            surplus = batches[: len(batches) - self.num_batches]
            del batches[: len(batches) - self.num_batches]
            query, page, pages_per_row = self.costs.query, self.costs.page, self.costs.pages_per_row
            shape = [[len(b), max(query[r] for r in b), max(page[r] for r in b)] for b in batches]
            for row in (r for batch in surplus for r in batch):
                best, best_growth = None, None
                for i, (size, q, p) in enumerate(shape):
                    if self.max_batch_size is not None and size == self.max_batch_size:
                        continue
                    tokens = (size + 1) * (max(q, query[row]) + pages_per_row * max(p, page[row]))
                    growth = tokens - size * (q + pages_per_row * p)
                    if tokens <= self.max_tokens and (best_growth is None or growth < best_growth):
                        best, best_growth = i, growth
                if best is None:
                    dropped.append(row)
                    continue
                batches[best].append(row)
                size, q, p = shape[best]
                shape[best] = [size + 1, max(q, query[row]), max(p, page[row])]
        return sorted(dropped)

    def _deal(self, batches: list[list[int]], rng: random.Random) -> list[list[list[int]]]:
        """Groups batches of similar cost into steps of one batch per rank, and shuffles the steps.

        Within a step the costliest batch goes to the rank with the least load so far, so totals stay balanced too.
        """
        tokens = [self.costs.batch_tokens(b) for b in batches]
        ranked = sorted(range(len(batches)), key=lambda i: -tokens[i])
        loads = [0] * self.world_size
        steps = []
        for start in range(0, len(ranked), self.world_size):
            step: list[list[int]] = [[] for _ in range(self.world_size)]
            lightest = sorted(range(self.world_size), key=lambda r: (loads[r], r))
            for i, rank in zip(ranked[start : start + self.world_size], lightest):
                step[rank] = batches[i]
                loads[rank] += tokens[i]
            steps.append(step)
        rng.shuffle(steps)
        for step in steps:
            for batch in step:
                rng.shuffle(batch)  # no order by length inside a batch
        return steps
