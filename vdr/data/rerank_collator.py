"""Examples to reranker inputs: each (query, page) pair rendered in the Qwen3-VL-Reranker chat format, grouped.

A training batch holds B groups of G candidates, laid out group by group (``inputs`` row ``b * G + g``): the positive
first, then the hard negatives, then (optionally) the positives of other rows in the batch as extra negatives, which
cost a forward pass each but no extra data. The messages are the ones Sentence Transformers' ``CrossEncoder`` builds
for a pair (roles ``query`` and ``document``), rendered by the same template that export writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vdr.data.collator import ChatCollator, PagePreprocessing, Pinnable
from vdr.data.schema import PairExample, ScorePair, TrainExample
from vdr.models.inputs import EncoderInputs
from vdr.models.processor import DEFAULT_RERANK_INSTRUCTION, reranker_chat_template


@dataclass
class RerankBatch(Pinnable):
    """B groups of G candidates to score together."""

    inputs: EncoderInputs  # B * G sequences, group by group
    labels: torch.Tensor  # [B, G] float relevance in [0, 1]
    mask: torch.Tensor  # [B, G] bool, False: not a candidate of this group (its own positive again)
    rows: torch.Tensor  # [B] dataset rows, for messages about a batch
    teacher: torch.Tensor | None = None  # [B, G] teacher scores (distillation)
    skipped: int = 0  # undecodable rows passed over to fill this batch (skip_bad_rows)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class ScoreBatch(Pinnable):
    """Pairs to score, with their positions in the flattened candidate lists."""

    inputs: EncoderInputs
    index: torch.Tensor  # [N] int64


def pair_messages(query: str, *, num_images: int = 1, text: str | None = None) -> list[dict]:
    """The messages of one (query, document) pair, as Sentence Transformers builds them: images before text."""
    document: list[dict] = [{"type": "image"} for _ in range(num_images)]
    if text is not None:
        document.append({"type": "text", "text": text})
    return [{"role": "query", "content": [{"type": "text", "text": query}]},
            {"role": "document", "content": document}]


class RerankCollator(ChatCollator):
    """Renders (query, page) pairs in the reranker format and groups them.

    Args:
        processor: A Qwen3-VL processor.
        instruction: The ``<Instruct>`` text.
        max_text_tokens: Longest query, in tokens.
        batch_negatives: Positives of this many other rows of the batch join each group as extra negatives.
        page_preprocessing: Where pages become patches (see :class:`ChatCollator`).
    """

    def __init__(self, processor, instruction: str = DEFAULT_RERANK_INSTRUCTION, max_text_tokens: int = 256,
                 batch_negatives: int = 0, page_preprocessing: PagePreprocessing = "device") -> None:
        super().__init__(processor, max_text_tokens, chat_template=reranker_chat_template(instruction),
                         page_preprocessing=page_preprocessing)
        if batch_negatives < 0:
            raise ValueError(f"batch_negatives must be >= 0, got {batch_negatives}")
        self.instruction, self.batch_negatives = instruction, batch_negatives

    def __call__(self, examples: list) -> RerankBatch | ScoreBatch:
        if isinstance(examples[0], TrainExample):
            batch = self.collate_groups(examples)
        elif isinstance(examples[0], PairExample):
            batch = self.collate_labeled(examples)
        else:
            return self.collate_pairs(examples)
        batch.skipped = sum(e.skipped for e in examples)
        return batch

    def encode_pairs(self, queries: list[str], images: list[Image.Image]) -> EncoderInputs:
        """One sequence per (query, page) pair."""
        rendered = [self.render(pair_messages(self._shorten(q))) for q in queries]
        return self._tokenize(rendered, images=images)

    def collate_groups(self, examples: list[TrainExample]) -> RerankBatch:
        size = len(examples)
        if self.batch_negatives >= size:
            raise ValueError(f"batch_negatives ({self.batch_negatives}) must be below the batch size ({size})")
        columns = len(examples[0].pages)
        if any(len(e.pages) != columns for e in examples):
            raise ValueError("all rows of a batch must have the same number of hard negatives")
        queries, pages, keys = [], [], []
        for i, example in enumerate(examples):
            borrowed = [examples[(i + shift) % size] for shift in range(1, self.batch_negatives + 1)]
            queries.extend([example.query] * (columns + len(borrowed)))
            pages.extend(example.pages + [other.pages[0] for other in borrowed])
            keys.append(example.page_keys + [other.page_keys[0] for other in borrowed])
        keys_t = torch.tensor(keys, dtype=torch.int64)  # [B, G]
        group = keys_t.shape[1]
        labels = torch.zeros((size, group))
        labels[:, 0] = 1.0
        mask = keys_t != keys_t[:, :1]  # a page equal to the row's positive is not its negative ...
        mask[:, 0] = True  # ... and the positive itself stays
        teacher = None
        if examples[0].teacher is not None:
            if self.batch_negatives:
                raise ValueError("teacher scores cover the row's own pages only; use batch_negatives: 0 to distil")
            teacher = torch.tensor([e.teacher for e in examples], dtype=torch.float32)  # [B, G]
        return RerankBatch(self.encode_pairs(queries, pages), labels, mask,
                           torch.tensor([e.row for e in examples], dtype=torch.int64), teacher)

    def collate_labeled(self, examples: list[PairExample]) -> RerankBatch:
        labels = torch.tensor([[e.label] for e in examples], dtype=torch.float32)  # [B, 1]
        return RerankBatch(self.encode_pairs([e.query for e in examples], [e.page for e in examples]), labels,
                           torch.ones_like(labels, dtype=torch.bool),
                           torch.tensor([e.row for e in examples], dtype=torch.int64))

    def collate_pairs(self, examples: list[ScorePair]) -> ScoreBatch:
        return ScoreBatch(self.encode_pairs([e.query for e in examples], [e.image for e in examples]),
                          torch.tensor([e.index for e in examples], dtype=torch.int64))
