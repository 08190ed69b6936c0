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
from vdr.evaluation.records import StageRecord, read_run, run_json, short_name
from vdr.evaluation.report import default_details, write_report
from vdr.evaluation.scorers import Scorer, load_scorer
from vdr.evaluation.topk import RunningTopK


@dataclass
class EvalResult:
    """Metrics and the kept ranking: ``[Q, k]`` corpus rows, best first, and their scores."""

    metrics: dict[str, float]
    ranked: torch.Tensor
    scores: torch.Tensor


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
    scores, ranked = topk.result()
    metrics = retrieval_metrics(ranked, eval_set.qrels, corpus_size=len(corpus))
    return EvalResult(metrics, ranked.cpu(), scores.cpu())


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


def evaluate_stages(encoder: Encoder, eval_set: EvalSet, *, model: str, scorer: Scorer | None = None,
                    reranker: str | None = None, rerank_depth: int = 100, batch_size: int = 32,
                    num_workers: int = 0) -> list[StageRecord]:
    """The retriever's ranking, then (with a scorer) its top ``rerank_depth`` reranked: one record per stage.

    Args:
        encoder: The retriever.
        eval_set: Queries, corpus and qrels.
        model: The retriever's name (labels and reports).
        scorer: A reranker of the retriever's top pages.
        reranker: The reranker's name.
        rerank_depth: How many of the retriever's top pages the reranker re-scores.
        batch_size: Inputs per encoder or scorer call.
        num_workers: DataLoader workers decoding pages.
    """
    result = evaluate(encoder, eval_set, batch_size=batch_size, k=max(100, rerank_depth), num_workers=num_workers)
    metrics = {name: result.metrics[name] for name in (*METRIC_NAMES, "num_queries", "num_skipped")}
    stages = [StageRecord.from_ranking(short_name(model), model, metrics, result.ranked, result.scores,
                                       eval_set.qrels)]
    if scorer is not None:
        candidates = Candidates(result.ranked[:, :rerank_depth], f"{model} top {rerank_depth}")
        scores = rerank(scorer, candidates, eval_set, batch_size=batch_size, num_workers=num_workers)
        rows, sorted_scores = candidates.sort_by(scores)
        reranked = candidates.metrics(eval_set, rows)
        reranked = {name: reranked[name] for name in METRIC_NAMES if name in reranked}
        label = f"{short_name(model)} + {short_name(reranker)}"
        stages.insert(0, StageRecord.from_ranking(label, f"{model} reranked by {reranker}", reranked, rows,
                                                  sorted_scores, eval_set.qrels))
    return stages


def _check_output(output: Path | None, flag: str, suffix: str) -> None:
    if output is not None and Path(output).is_dir():
        raise IsADirectoryError(f"{flag} {output} is a directory; expected a {suffix} file path")


def _check_compare(compare: str, report: Path | None) -> None:
    """--compare fails before any work: it needs --report, and a run file or a local model must exist."""
    if report is None:
        raise ValueError("--compare shows two runs side by side in the report: give --report FILE.html too")
    if compare.endswith(".json"):
        if not Path(compare).is_file():
            raise FileNotFoundError(f"--compare {compare}: no such file (a run written by vdr evaluate --output)")
        return
    hub_id = compare.count("/") == 1 and not compare.startswith((".", "/", "~"))
    if not os.path.exists(compare) and not hub_id:
        raise FileNotFoundError(f"--compare {compare}: no such file or directory (expected a run .json, a model "
                                f"directory or checkpoint, or a hub id owner/name)")


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)  # an existing report is replaced only by a complete one


def _print_table(stages: list[StageRecord]) -> None:
    """The retriever's metrics, or (with a reranker) both stages side by side in pipeline order."""
    if len(stages) == 1:
        for name in METRIC_NAMES:
            print(f"{name:>10}  {stages[0].metrics[name]:.4f}")
        return
    reranked, retriever = stages
    print(f"{'':>10}  {'retriever':>9}  {'reranked':>9}")
    for name in METRIC_NAMES:
        second = f"{reranked.metrics[name]:>9.4f}" if name in reranked.metrics else f"{'-':>9}"
        print(f"{name:>10}  {retriever.metrics[name]:>9.4f}  {second}")


def evaluate_command(
    model: str,
    data: str,
    output: Path | None = None,
    report: Path | None = None,
    compare: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    verify_images: bool = True,
    reranker: str | None = None,
    rerank_depth: int = 100,
    thumbnail_size: int = 160,
) -> dict[str, float]:
    """Evaluate a retriever (and optionally a reranker of its top pages): NDCG@10, MRR@10, Recall@1/5/10, MAP@100.

    Args:
        model: A checkpoint of `vdr fit` (.ckpt), a Sentence Transformers directory (e.g. from `vdr export`), or a
            Hugging Face Qwen3-VL directory or hub id.
        data: An eval set with queries/, corpus/ and qrels/ tables (as `vdr data synth` writes under eval/), or a
            hub dataset with those configurations.
        output: Also write the metrics, and each query's top 10 pages, to this JSON file (what --compare reads).
        report: Also write an HTML report to this file: each query's top pages as thumbnails, worst queries first,
            self-contained (opens offline).
        compare: Another run to show beside this one in the report, with per-query wins and losses: a JSON file
            written by `vdr evaluate --output` on the same eval set, or a second retriever (a model, as for
            --model) to evaluate here.
        batch_size: Queries or pages per forward pass.
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        num_workers: Processes decoding pages.
        verify_images: Decode every corpus image up front, so a bad file fails before any model work.
        reranker: Rerank each query's top pages with this model: a reranker checkpoint (.ckpt), a CrossEncoder
            directory (e.g. from `vdr export`) or hub id. Both stages' metrics are printed and saved.
        rerank_depth: How many of the retriever's top pages the reranker re-scores.
        thumbnail_size: The report's thumbnails: longer side in pixels.
    """
    _check_output(output, "--output", ".json")
    _check_output(report, "--report", ".html")
    if rerank_depth < 1:
        raise ValueError(f"rerank_depth must be >= 1, got {rerank_depth}")
    if thumbnail_size < 16:
        raise ValueError(f"thumbnail_size must be at least 16 pixels, got {thumbnail_size}")
    if compare is not None:
        _check_compare(compare, report)
    start = time.perf_counter()
    eval_set = load_eval_set(data, loader=load_table, verify_images=verify_images)  # bad data fails before the model
    compare_is_run = compare is not None and compare.endswith(".json")
    others = read_run(Path(compare), eval_set) if compare_is_run else []  # a bad file fails early too
    encoder = load_encoder(model, device)
    scorer = load_scorer(reranker, device) if reranker else None  # a bad reranker path fails before the long part
    stages = evaluate_stages(encoder, eval_set, model=model, scorer=scorer, reranker=reranker,
                             rerank_depth=rerank_depth, batch_size=batch_size, num_workers=num_workers)
    _print_table(stages)
    if compare is not None and not compare_is_run:
        # The second retriever, behind the same reranker when there is one: the two pipelines differ in one part.
        # Loaded only now, in place of the first, so two models never share the device.
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        others = evaluate_stages(load_encoder(compare, device), eval_set, model=compare, scorer=scorer,
                                 reranker=reranker, rerank_depth=rerank_depth, batch_size=batch_size,
                                 num_workers=num_workers)
        _print_table(others)
    if output is not None:
        _write_json(Path(output), run_json(stages, eval_set, model=model, data=data, reranker=reranker,
                                           rerank_depth=rerank_depth))
    if report is not None:
        for other in others:
            if any(other.label == stage.label for stage in stages):
                other.label += " (compared)"
        pair = (0, len(stages)) if others else (0, 1) if len(stages) == 2 else None
        title = f"{short_name(model)} on {data}" + (f" vs {others[0].label}" if others else "")
        details = default_details(model, data, eval_set, reranker=reranker, compared_with=compare)
        write_report(report, eval_set, stages + others, title=title, details=details, compare=pair,
                     thumbnail_size=thumbnail_size, num_workers=num_workers)
        print(f"report: {report}", file=sys.stderr)
    print(f"{len(eval_set.query_ids)} queries, {len(eval_set.corpus_ids)} pages, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {name: stages[-1].metrics[name] for name in METRIC_NAMES}


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
