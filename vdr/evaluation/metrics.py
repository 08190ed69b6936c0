"""Retrieval metrics of a ranked top-k: NDCG@10 (graded gains), MRR@10, Recall@{1,5,10} with torchmetrics; MAP@100.

Policies (REFERENCE.md §6 lists the traps):
- Ties were already broken by the ranking (``RunningTopK``: lower corpus row first); torchmetrics sees strictly
  decreasing scores, so its tie averaging never applies.
- Relevant documents outside the retrieved top-k still count in the ideal DCG and the recall denominator: they
  are appended below the ranking.
- A query with no relevant document (no qrel with grade > 0) is skipped, not scored 0; ``num_skipped`` reports how
  many. This matches pytrec_eval and Sentence Transformers' InformationRetrievalEvaluator.
- Gains are linear in the grade (trec_eval's NDCG); MRR, recall and MAP treat any grade > 0 as relevant.
- MAP@100 is trec_eval's ``map_cut_100`` (as BEIR, MTEB and Sentence Transformers report it): precision at each
  relevant document in the top 100, summed and divided by the number of relevant documents. torchmetrics'
  ``RetrievalMAP(top_k=100)`` divides by the relevant documents *retrieved* in the top 100 instead, which scores a
  query that finds 1 of its 5 relevant documents at rank 1 as perfect, so it is computed here (vectorised, checked
  against pytrec_eval in the tests). It needs the ranking to cover 100 documents or the whole corpus.
"""

from __future__ import annotations

import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@100")
MAP_CUTOFF = 100


def retrieval_metrics(ranked: torch.Tensor, qrels: list[dict[int, int]], corpus_size: int | None = None
                      ) -> dict[str, float]:
    """Metrics of a ranking.

    Args:
        ranked: ``[Q, K]`` corpus rows, best first (``K >= 10``).
        qrels: Per query: ``{corpus row: grade > 0}``.
        corpus_size: Number of corpus documents; lets MAP@100 be computed from a ranking shorter than 100 when it
            covers the whole corpus.

    Returns:
        ``ndcg@10``, ``mrr@10``, ``recall@1``, ``recall@5``, ``recall@10`` and, when the ranking covers 100
        documents or the whole corpus, ``map@100``, averaged over queries with a relevant document; plus
        ``num_queries`` (scored) and ``num_skipped`` (no relevant document).
    """
    judged = _Judged(ranked, qrels)
    binary = judged.grades > 0
    metrics = {
        "ndcg@10": RetrievalNormalizedDCG(top_k=10)(judged.preds, judged.grades, indexes=judged.indexes),
        "mrr@10": RetrievalMRR(top_k=10)(judged.preds, binary, indexes=judged.indexes),
        "recall@1": RetrievalRecall(top_k=1)(judged.preds, binary, indexes=judged.indexes),
        "recall@5": RetrievalRecall(top_k=5)(judged.preds, binary, indexes=judged.indexes),
        "recall@10": RetrievalRecall(top_k=10)(judged.preds, binary, indexes=judged.indexes),
    }
    out = {name: float(value) for name, value in metrics.items()}
    if ranked.shape[1] >= MAP_CUTOFF or ranked.shape[1] == corpus_size:
        out["map@100"] = mean_average_precision(ranked, qrels, MAP_CUTOFF)
    out.update(num_queries=len(judged.scored), num_skipped=len(qrels) - len(judged.scored))
    return out


def per_query_ndcg(ranked: torch.Tensor, qrels: list[dict[int, int]]) -> torch.Tensor:
    """``[Q]`` NDCG@10 of each query (NaN where it has no relevant document), as :func:`retrieval_metrics` averages.

    Args:
        ranked: ``[Q, K]`` corpus rows, best first (``K >= 10``).
        qrels: Per query: ``{corpus row: grade > 0}``.
    """
    judged = _Judged(ranked, qrels)
    # The same torchmetrics metric, aggregated by identity: one value per scored query, in query order.
    ndcg = RetrievalNormalizedDCG(top_k=10, aggregation=lambda values, dim: values)
    values = ndcg(judged.preds, judged.grades, indexes=judged.indexes)  # [Q']
    out = torch.full((len(qrels),), float("nan"))  # [Q]
    out[judged.scored] = values.float().cpu()
    return out


class _Judged:
    """A ranking flattened for torchmetrics: rank-order ``preds``, ``grades`` and query ``indexes`` per document.

    Relevant documents outside the ranking are appended below it; queries with no relevant document are left out
    (``scored`` lists the others).
    """

    def __init__(self, ranked: torch.Tensor, qrels: list[dict[int, int]]) -> None:
        if ranked.shape[1] < 10:
            raise ValueError(f"need at least 10 ranked documents per query, got {ranked.shape[1]}")
        if len(qrels) != ranked.shape[0]:
            raise ValueError(f"{ranked.shape[0]} ranked queries but qrels for {len(qrels)}")
        ranked = ranked.cpu()
        preds, grades, indexes = [], [], []
        self.scored = [query for query, relevant in enumerate(qrels) if relevant]
        if not self.scored:
            raise ValueError("no query has a relevant document: nothing to evaluate")
        for query in self.scored:
            relevant = qrels[query]
            rows = ranked[query].tolist()
            retrieved = set(rows)
            rows = rows + [row for row in relevant if row not in retrieved]
            preds.append(torch.arange(len(rows), 0, -1, dtype=torch.float32))  # strictly decreasing: rank order
            grades.append(torch.tensor([relevant.get(row, 0) for row in rows], dtype=torch.int64))
            indexes.append(torch.full((len(rows),), query, dtype=torch.int64))
        self.preds, self.grades, self.indexes = torch.cat(preds), torch.cat(grades), torch.cat(indexes)


def mean_average_precision(ranked: torch.Tensor, qrels: list[dict[int, int]], cutoff: int = MAP_CUTOFF) -> float:
    """trec_eval's ``map_cut``: mean over queries with a relevant document of AP@cutoff normalised by all relevant.

    Args:
        ranked: ``[Q, K]`` corpus rows, best first; documents past ``K`` count as not retrieved.
        qrels: Per query: ``{corpus row: grade > 0}``.
        cutoff: Rank cutoff.
    """
    scored = [q for q, relevant in enumerate(qrels) if relevant]
    top = ranked[scored, :cutoff].cpu()  # [Q', c]
    hits = torch.tensor([[row in qrels[q] for row in top[i].tolist()] for i, q in enumerate(scored)],
                        dtype=torch.float64).reshape(top.shape)  # [Q', c]
    ranks = torch.arange(1, top.shape[1] + 1, dtype=torch.float64)  # [c]
    precision = hits.cumsum(dim=1) / ranks  # [Q', c]: precision at each rank
    num_relevant = torch.tensor([len(qrels[q]) for q in scored], dtype=torch.float64)  # [Q']
    return float(((precision * hits).sum(dim=1) / num_relevant).mean())
