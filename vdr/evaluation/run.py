"""Standalone evaluation: ``vdr evaluate --model MODEL --data EVAL_DIR [--reranker MODEL] [--output FILE.json]``.

Ranks a whole eval corpus for every eval query with any :class:`~vdr.evaluation.encoders.Encoder` (a checkpoint, an
export, a hub model), with the same running top-k, tie policy and metrics as the training callback, and reports
NDCG@10, MRR@10, Recall@{1,5,10} and MAP@100. With a reranker, each query's top 100 are then re-scored by any
:class:`~vdr.evaluation.scorers.Scorer` (a reranker checkpoint, a CrossEncoder export) and both stages are reported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vdr.data.schema import EvalSet, load_eval_set
from vdr.data.sources import load_table
from vdr.evaluation.candidates import Candidates
from vdr.evaluation.encoders import Encoder, load_encoder
from vdr.evaluation.metrics import METRIC_NAMES, retrieval_metrics
from vdr.evaluation.scorers import Scorer, load_scorer
from vdr.evaluation.topk import RunningTopK


@dataclass
class EvalResult:
    """Metrics and the kept ranking (``[Q, k]`` corpus rows, best first)."""

    metrics: dict[str, float]
    ranked: torch.Tensor


def example_batches(dataset, batch_size: int, num_workers: int) -> DataLoader:
    # Decoding pages is the CPU-heavy part; workers overlap it with encoding. Examples stay a list (no collation).
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)


def evaluate(encoder: Encoder, eval_set: EvalSet, *, batch_size: int = 32, k: int = 100, num_workers: int = 0,
             progress: bool = True) -> EvalResult:
    """Embeds all queries, streams the corpus through a running top-k, and scores the ranking.

    Args:
        encoder: Embeds queries and pages.
        eval_set: Queries, corpus and qrels.
        batch_size: Inputs per encoder call.
        k: Documents kept per query (>= 100 for MAP@100 unless the corpus is smaller).
        num_workers: DataLoader workers decoding pages.
        progress: Show progress bars (stderr).
    """
    texts = eval_set.query_texts
    queries = torch.cat([
        encoder.queries(texts[start : start + batch_size])
        for start in tqdm(range(0, len(texts), batch_size), desc="queries", unit="batch", disable=not progress)
    ])  # [Q, D]
    topk = RunningTopK(queries, k)
    corpus = eval_set.corpus_rows()
    for examples in tqdm(example_batches(corpus, batch_size, num_workers), desc="corpus", unit="batch",
                         disable=not progress):
        rows = torch.tensor([e.index for e in examples])
        topk.update(encoder.pages([e.image for e in examples]), rows)
    _, ranked = topk.result()
    metrics = retrieval_metrics(ranked, eval_set.qrels, corpus_size=len(corpus))
    return EvalResult(metrics, ranked.cpu())


def rerank(scorer: Scorer, candidates: Candidates, eval_set: EvalSet, *, batch_size: int = 32, num_workers: int = 0,
           progress: bool = True) -> torch.Tensor:
    """Scores every candidate pair; returns ``[Q, C]`` scores (NaN at padding), to sort with ``candidates.reranked``.

    Args:
        scorer: Scores (query, page) pairs.
        candidates: Each query's candidate pages.
        eval_set: Queries and corpus the candidates refer to.
        batch_size: Pairs per scorer call.
        num_workers: DataLoader workers decoding pages.
        progress: Show a progress bar (stderr).
    """
    scores = torch.full(candidates.rows.shape, float("nan"))  # [Q, C]
    pairs_of_batches = example_batches(candidates.pairs(eval_set), batch_size, num_workers)
    for pairs in tqdm(pairs_of_batches, desc="rerank", unit="batch", disable=not progress):
        index = torch.tensor([p.index for p in pairs])
        scores.view(-1)[index] = scorer.score([p.query for p in pairs], [p.image for p in pairs])
    return scores


def _check_output(output: Path | None) -> None:
    if output is not None and output.is_dir():
        raise IsADirectoryError(f"--output {output} is a directory; expected a .json file path")


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)  # an existing report is replaced only by a complete one


def evaluate_command(
    model: str,
    data: str,
    output: Path | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    verify_images: bool = True,
    reranker: str | None = None,
    rerank_depth: int = 100,
) -> dict[str, float]:
    """Evaluate a retriever (and optionally a reranker of its top pages): NDCG@10, MRR@10, Recall@1/5/10, MAP@100.

    Args:
        model: A checkpoint of `vdr fit` (.ckpt), a Sentence Transformers directory (e.g. from `vdr export`), or a
            Hugging Face Qwen3-VL directory or hub id.
        data: An eval set with queries/, corpus/ and qrels/ tables (as `vdr data synth` writes under eval/), or a
            hub dataset with those configurations.
        output: Also write the metrics to this JSON file.
        batch_size: Queries or pages per forward pass.
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        num_workers: Processes decoding pages.
        verify_images: Decode every corpus image up front, so a bad file fails before any model work.
        reranker: Rerank each query's top pages with this model: a reranker checkpoint (.ckpt), a CrossEncoder
            directory (e.g. from `vdr export`) or hub id. Both stages' metrics are printed and saved.
        rerank_depth: How many of the retriever's top pages the reranker re-scores.
    """
    _check_output(output)
    if rerank_depth < 1:
        raise ValueError(f"rerank_depth must be >= 1, got {rerank_depth}")
    start = time.perf_counter()
    eval_set = load_eval_set(data, loader=load_table, verify_images=verify_images)  # bad data fails before the model
    encoder = load_encoder(model, device)
    scorer = load_scorer(reranker, device) if reranker else None  # a bad reranker path fails before the long part
    result = evaluate(encoder, eval_set, batch_size=batch_size, k=max(100, rerank_depth), num_workers=num_workers)
    metrics = {name: result.metrics[name] for name in METRIC_NAMES}
    report = {**metrics, "num_queries": result.metrics["num_queries"], "num_skipped": result.metrics["num_skipped"],
              "num_documents": len(eval_set.corpus_ids), "model": model, "data": data}
    reranked = None
    if scorer is not None:
        candidates = Candidates(result.ranked[:, :rerank_depth], f"{model} top {rerank_depth}")
        scores = rerank(scorer, candidates, eval_set, batch_size=batch_size, num_workers=num_workers)
        rerank_metrics = candidates.metrics(eval_set, candidates.reranked(scores))
        reranked = {name: rerank_metrics[name] for name in METRIC_NAMES if name in rerank_metrics}
        report["reranked"] = {**reranked, "reranker": reranker, "depth": rerank_depth}
    if reranked is None:
        for name in METRIC_NAMES:
            print(f"{name:>10}  {metrics[name]:.4f}")
    else:
        print(f"{'':>10}  {'retriever':>9}  {'reranked':>9}")
        for name in METRIC_NAMES:
            second = f"{reranked[name]:>9.4f}" if name in reranked else f"{'-':>9}"
            print(f"{name:>10}  {metrics[name]:>9.4f}  {second}")
    print(f"{len(eval_set.query_ids)} queries, {len(eval_set.corpus_ids)} pages, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    if output is not None:
        _write_json(Path(output), report)
    return metrics


def information_retrieval_evaluator(eval_set: EvalSet, **kwargs):
    """Sentence Transformers' ``InformationRetrievalEvaluator`` over the same queries, pages and qrels.

    For cross-checks and for users who evaluate inside a Sentence Transformers training loop. It holds every decoded
    page in memory (unlike :func:`evaluate`, which streams the corpus) and treats every grade > 0 as relevant.

    Args:
        eval_set: Queries, corpus and qrels.
        kwargs: Passed to the evaluator (e.g. ``batch_size``, ``show_progress_bar``).
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    rows = eval_set.corpus_rows()
    kwargs = {"accuracy_at_k": [1], "precision_recall_at_k": [1, 5, 10], "write_csv": False, **kwargs}
    return InformationRetrievalEvaluator(
        queries=dict(zip(eval_set.query_ids, eval_set.query_texts)),
        corpus={eval_set.corpus_ids[i]: rows[i].image for i in range(len(rows))},
        relevant_docs={eval_set.query_ids[q]: {eval_set.corpus_ids[r] for r in relevant}
                       for q, relevant in enumerate(eval_set.qrels) if relevant},
        **kwargs,
    )
