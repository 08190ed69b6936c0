"""A running top-k over a corpus streamed in chunks: memory is ``[Q, k]``, whatever the corpus size.

Tie policy: equal scores rank the lower corpus row first (a stable, deterministic order; ``torch.topk`` alone
gives no guarantee). Metrics are then computed on this strict ranking, so no tie handling happens downstream.
"""

from __future__ import annotations

import torch


class RunningTopK:
    """Keeps, for each of ``num_queries`` queries, the ``k`` best (score, corpus row) pairs seen so far.

    Args:
        queries: ``[Q, D]`` query embeddings (kept on their device).
        k: How many documents to keep per query.
    """

    def __init__(self, queries: torch.Tensor, k: int) -> None:
        self.queries = queries
        self.k = k
        self.scores = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)  # [Q, <=k]
        self.indices = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)  # [Q, <=k]

    def update(self, documents: torch.Tensor, rows: torch.Tensor) -> None:
        """Scores a chunk of documents (``[B, D]``, corpus rows ``[B]``) against every query and merges."""
        scores = self.queries.float() @ documents.to(self.queries.device).float().T  # [Q, B]
        rows = rows.to(self.queries.device).expand(scores.shape[0], -1)  # [Q, B]
        self.merge(scores, rows)

    def merge(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Merges precomputed ``[Q, B]`` scores of corpus ``rows`` into the running top-k."""
        scores = torch.cat([self.scores, scores], dim=1)  # [Q, k + B]
        rows = torch.cat([self.indices, rows], dim=1)  # [Q, k + B]
        by_row = rows.argsort(dim=1, stable=True)  # lower row first ...
        scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
        by_score = scores.argsort(dim=1, descending=True, stable=True)[:, : self.k]  # ... among equal scores
        self.scores, self.indices = scores.gather(1, by_score), rows.gather(1, by_score)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([Q, k] scores, [Q, k] corpus rows)``, best first."""
        return self.scores, self.indices
