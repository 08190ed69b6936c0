"""Running top-k and retrieval metrics, cross-checked against pytrec_eval (an independent C implementation).

Policies under test: ties rank the lower corpus row first; relevant documents outside the kept top-k still count
in the ideal DCG and the recall denominator; queries without a relevant document are skipped.
"""

from __future__ import annotations

import pytest
import pytrec_eval
import torch

from vdr.evaluation.metrics import per_query_ndcg, retrieval_metrics
from vdr.evaluation.topk import RunningTopK


def _doc_id(row: int) -> str:
    # pytrec_eval breaks score ties by descending document id; naming row r "d{999 - r}" makes that order
    # "lower row first", our policy, so both sides rank identically.
    return f"d{999 - row:03d}"


def _fixture(seed: int = 0, queries: int = 9, corpus: int = 40):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(queries, corpus, generator=generator) * 5).round() / 5  # few distinct values: many ties
    qrels: list[dict[int, int]] = []
    for q in range(queries):
        if q == 3:
            qrels.append({})  # a query with no relevant document
            continue
        rows = torch.randperm(corpus, generator=generator)[: 1 + q % 4].tolist()
        qrels.append({row: 1 + (row % 3) for row in rows})  # graded 1..3
    # Query 5: its only relevant document scores lowest, far outside any top-10.
    if queries > 5:
        qrels[5] = {7: 2}
        scores[5, 7] = -1.0
    return scores, qrels


def _rank(scores: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    topk = RunningTopK(torch.eye(scores.shape[0]), k)
    for start in range(0, scores.shape[1], chunk):
        rows = torch.arange(start, min(start + chunk, scores.shape[1]))
        topk.merge(scores[:, rows], rows.expand(scores.shape[0], -1))
    return topk.result()[1]


def _pytrec(scores: torch.Tensor, qrels: list[dict[int, int]]) -> dict[str, float]:
    qrel = {f"q{q}": {_doc_id(r): g for r, g in rel.items()} for q, rel in enumerate(qrels) if rel}
    full = {f"q{q}": {_doc_id(r): float(s) for r, s in enumerate(row)} for q, row in enumerate(scores)}
    # MRR@10 is reciprocal rank over the top 10 only: cut the run (in pytrec's own order) at 10.
    cut = {}
    for qid, docs in full.items():
        ordered = sorted(docs.items(), key=lambda kv: (-kv[1], [-ord(c) for c in kv[0]]))[:10]
        cut[qid] = dict(ordered)
    measures = {"ndcg_cut.10", "recall.1", "recall.5", "recall.10", "map_cut.100"}
    full_eval = pytrec_eval.RelevanceEvaluator(qrel, measures).evaluate(full)
    cut_eval = pytrec_eval.RelevanceEvaluator(qrel, {"recip_rank"}).evaluate(cut)
    # pytrec's binary measures count grade >= 1 as relevant, as ours do.
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "ndcg@10": mean([v["ndcg_cut_10"] for v in full_eval.values()]),
        "recall@1": mean([v["recall_1"] for v in full_eval.values()]),
        "recall@5": mean([v["recall_5"] for v in full_eval.values()]),
        "recall@10": mean([v["recall_10"] for v in full_eval.values()]),
        "map@100": mean([v["map_cut_100"] for v in full_eval.values()]),
        "mrr@10": mean([cut_eval[q]["recip_rank"] if q in cut_eval else 0.0 for q in full_eval]),
        "num_queries": len(full_eval),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_metrics_match_pytrec_eval(seed: int, chunk: int) -> None:
    scores, qrels = _fixture(seed)
    ours = retrieval_metrics(_rank(scores, k=12, chunk=chunk), qrels)
    reference = _pytrec(scores, qrels)
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"):
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name
    assert "map@100" not in ours  # a top-12 of a 40-page corpus cannot give MAP@100
    assert ours["num_queries"] == reference["num_queries"] == len(qrels) - 1
    assert ours["num_skipped"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_ndcg_matches_pytrec_eval_query_by_query(seed: int) -> None:
    scores, qrels = _fixture(seed)
    ranked = _rank(scores, k=12, chunk=5)
    ours = per_query_ndcg(ranked, qrels)  # [Q]
    qrel = {f"q{q}": {_doc_id(r): g for r, g in rel.items()} for q, rel in enumerate(qrels) if rel}
    run = {f"q{q}": {_doc_id(r): float(s) for r, s in enumerate(row)} for q, row in enumerate(scores)}
    reference = pytrec_eval.RelevanceEvaluator(qrel, {"ndcg_cut.10"}).evaluate(run)
    for q in range(len(qrels)):
        if qrels[q]:
            assert ours[q].item() == pytest.approx(reference[f"q{q}"]["ndcg_cut_10"], abs=1e-6), q
        else:
            assert ours[q].isnan()  # skipped, not scored 0
    # The aggregate is their mean over the scored queries.
    assert ours.nanmean().item() == pytest.approx(retrieval_metrics(ranked, qrels)["ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_at_100_matches_pytrec_eval(seed: int) -> None:
    # 150 pages: relevant documents fall inside and outside the top 100 (query 5's sits last).
    scores, qrels = _fixture(seed, queries=9, corpus=150)
    ours = retrieval_metrics(_rank(scores, k=100, chunk=64), qrels)
    assert ours["map@100"] == pytest.approx(_pytrec(scores, qrels)["map@100"], abs=1e-9)
    # A ranking that covers the whole (small) corpus is enough.
    small, small_qrels = _fixture(seed, queries=9, corpus=40)
    covered = retrieval_metrics(_rank(small, k=100, chunk=7), small_qrels, corpus_size=40)
    assert covered["map@100"] == pytest.approx(_pytrec(small, small_qrels)["map@100"], abs=1e-9)


def test_map_normalises_by_all_relevant_documents_not_the_retrieved_ones() -> None:
    # One of two relevant documents at rank 1, the other never retrieved: AP = (1/1) / 2, not 1 (torchmetrics).
    ranked = torch.arange(100)[None]
    assert retrieval_metrics(ranked, [{0: 1, 500: 1}])["map@100"] == pytest.approx(0.5)


def test_running_topk_equals_a_stable_full_sort() -> None:
    scores, _ = _fixture(4, queries=5, corpus=50)
    expected = torch.stack([torch.tensor(sorted(range(50), key=lambda r: (-row[r].item(), r))[:10]) for row in scores])
    for chunk in (1, 3, 50):
        assert torch.equal(_rank(scores, k=10, chunk=chunk), expected)


def test_update_scores_embeddings_by_dot_product() -> None:
    queries = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    topk = RunningTopK(queries, k=5)
    for start in range(0, 30, 8):
        topk.update(documents[start : start + 8], torch.arange(start, min(start + 8, 30)))
    assert torch.equal(topk.result()[1], (queries @ documents.T).topk(5).indices)


def test_relevant_document_outside_top_k_still_counts() -> None:
    # One relevant document retrieved at rank 1 and one never retrieved: NDCG@10 = 1 / IDCG(2 docs), recall 0.5.
    ranked = torch.arange(10)[None]
    metrics = retrieval_metrics(ranked, [{0: 1, 50: 1}])
    assert metrics["ndcg@10"] == pytest.approx(1.0 / (1.0 + 1.0 / torch.log2(torch.tensor(3.0)).item()))
    assert metrics["recall@10"] == pytest.approx(0.5)
    assert metrics["mrr@10"] == pytest.approx(1.0)


def test_all_queries_without_relevant_documents_is_an_error() -> None:
    with pytest.raises(ValueError, match="no query has a relevant document"):
        retrieval_metrics(torch.arange(10)[None], [{}])
