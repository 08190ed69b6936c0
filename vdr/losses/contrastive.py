"""InfoNCE over in-batch and hard negatives (Sentence Transformers' "multiple negatives ranking" convention).

Query i scores every document of the batch; its target is column ``offset + i`` of
``[positives; negative column 0; negative column 1; ...]``. With several ranks the caller concatenates every rank's
documents in that layout, rank after rank, and passes ``offset`` = the column of this rank's first document
(``rank * B * (1 + k)`` for equal batches, not ``rank * B``); the loss never reads ranks itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def false_negative_mask(
    document_keys: torch.Tensor, positive_keys: torch.Tensor, positive_columns: torch.Tensor
) -> torch.Tensor:
    """Marks documents that are the query's own positive page appearing at another column.

    Args:
        document_keys: ``[N]`` content hashes of the documents.
        positive_keys: ``[B]`` content hash of each query's positive.
        positive_columns: ``[B]`` column of each query's positive.

    Returns:
        ``[B, N]`` bool, True where the logit must be dropped from the softmax.
    """
    same = positive_keys[:, None] == document_keys[None, :]  # [B, N]
    target = F.one_hot(positive_columns, document_keys.shape[0]).bool()  # [B, N]
    return same & ~target


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query over all documents of the batch, by cosine similarity / temperature.

    Inputs must be L2-normalised. ``scale = 1 / temperature``; the reference recipe uses 20 (temperature 0.05).
    For symmetric or query-query terms, extend this class; for reranker losses see ``vdr.losses.ranking``.

    Args:
        temperature: Softmax temperature (initial value when learnable).
        learnable_temperature: Learn ``log(1 / temperature)``, clamped so the scale stays within [1, 100].
    """

    def __init__(self, temperature: float = 0.05, learnable_temperature: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def logits(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` scaled cosine similarities."""
        return queries.float() @ documents.float().T * self.scale()  # [B, N]

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        *,
        document_keys: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Mean InfoNCE loss.

        Args:
            queries: ``[B, D]`` unit-norm query embeddings.
            documents: ``[N, D]`` unit-norm documents, ``N = (1 + k) * B_total``, positives first.
            document_keys: ``[N]`` content hashes; when given, a query's own positive page appearing at another
                column (a duplicate row, or its page mined as someone's negative) is dropped from its softmax.
            offset: Column of this batch's first positive (where this rank's documents start when they come from
                all ranks).
        """
        logits = self.logits(queries, documents)  # [B, N]
        targets = torch.arange(queries.shape[0], device=queries.device) + offset  # [B]
        if document_keys is not None:
            mask = false_negative_mask(document_keys, document_keys[targets], targets)  # [B, N]
            logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, targets)
