"""Retrieval metrics of a ranked top-k with torchmetrics: NDCG@10 (graded gains), MRR@10, Recall@1 and @10.

Policies (REFERENCE.md §6 lists the traps):
- Ties were already broken by the ranking (``RunningTopK``: lower corpus row first); torchmetrics sees strictly
  decreasing scores, so its tie averaging never applies.
- Relevant documents outside the retrieved top-k still count in the ideal DCG and the recall denominator: they
  are appended below the ranking.
- A query with no relevant document (no qrel with grade > 0) is skipped, not scored 0; ``num_skipped`` reports how
  many. This matches pytrec_eval and Sentence Transformers' InformationRetrievalEvaluator.
- Gains are linear in the grade (trec_eval's NDCG); MRR and recall treat any grade > 0 as relevant.
"""

from __future__ import annotations

import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


def retrieval_metrics(ranked: torch.Tensor, qrels: list[dict[int, int]]) -> dict[str, float]:
    """Metrics of a ranking.

    Args:
        ranked: ``[Q, K]`` corpus rows, best first (``K >= 10``).
        qrels: Per query: ``{corpus row: grade > 0}``.

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@1", "recall@10"}`` averaged over queries with a relevant document, plus
        ``num_queries`` (scored) and ``num_skipped`` (no relevant document).
    """
    if ranked.shape[1] < 10:
        raise ValueError(f"need at least 10 ranked documents per query, got {ranked.shape[1]}")
    ranked = ranked.cpu()
    preds, grades, indexes = [], [], []
    num_skipped = 0
    for query, relevant in enumerate(qrels):
        if not relevant:
            num_skipped += 1
            continue
        rows = ranked[query].tolist()
        retrieved = set(rows)
        missing = [row for row in relevant if row not in retrieved]
        rows = rows + missing
        preds.append(torch.arange(len(rows), 0, -1, dtype=torch.float32))  # strictly decreasing: rank order
        grades.append(torch.tensor([relevant.get(row, 0) for row in rows], dtype=torch.int64))
        indexes.append(torch.full((len(rows),), query, dtype=torch.int64))
    if not preds:
        raise ValueError("no query has a relevant document: nothing to evaluate")
    preds_t, grades_t, indexes_t = torch.cat(preds), torch.cat(grades), torch.cat(indexes)
    binary = grades_t > 0
    metrics = {
        "ndcg@10": RetrievalNormalizedDCG(top_k=10)(preds_t, grades_t, indexes=indexes_t),
        "mrr@10": RetrievalMRR(top_k=10)(preds_t, binary, indexes=indexes_t),
        "recall@1": RetrievalRecall(top_k=1)(preds_t, binary, indexes=indexes_t),
        "recall@10": RetrievalRecall(top_k=10)(preds_t, binary, indexes=indexes_t),
    }
    out = {name: float(value) for name, value in metrics.items()}
    out.update(num_queries=len(preds), num_skipped=num_skipped)
    return out
