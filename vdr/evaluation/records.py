"""Per-query results of one ranking stage: what a report shows, and what ``vdr evaluate --output`` keeps for
``--compare``.

A :class:`StageRecord` holds, for every eval query, the top pages (corpus rows and scores), its NDCG@10 and the rank
of each of its relevant pages in the kept ranking. In JSON it is keyed by query and page ids, so a record written by
one run can be read back against the same eval set by another (``vdr evaluate --compare OTHER.json``); reading it
checks that every id is in the eval set and names the file and the id when one is not.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vdr.data.errors import DataError
from vdr.data.schema import EvalSet
from vdr.evaluation.metrics import METRIC_NAMES, per_query_ndcg

DEPTH = 10  # pages kept per query: what NDCG@10 and the report look at
PAD = -1


@dataclass
class StageRecord:
    """One stage's ranking of every eval query, reduced to what a person looks at.

    Attributes:
        label: How reports name the stage (``retriever``, ``reranked``, a model's name).
        model: The model (and reranker) that produced it.
        metrics: The stage's aggregate metrics (``ndcg@10``, ...), as the evaluation printed them.
        top: ``[Q, DEPTH]`` corpus rows, best first (``-1``: fewer pages were ranked).
        scores: ``[Q, DEPTH]`` the scores they were ranked by (NaN at ``-1``).
        ndcg: ``[Q]`` NDCG@10 per query (NaN for a query with no relevant page).
        ranks: Per query: ``{relevant corpus row: 1-based rank in the kept ranking, or None below it}``.
        kept: How many pages per query the kept ranking held (what ``None`` in ``ranks`` is below).
    """

    label: str
    model: str
    metrics: dict[str, float]
    top: torch.Tensor
    scores: torch.Tensor
    ndcg: torch.Tensor
    ranks: list[dict[int, int | None]]
    kept: int

    @classmethod
    def from_ranking(cls, label: str, model: str, metrics: dict[str, float], rows: torch.Tensor,
                     scores: torch.Tensor, qrels: list[dict[int, int]]) -> StageRecord:
        """From a kept ranking.

        Args:
            label: The stage's name in reports.
            model: What produced it.
            metrics: Its aggregate metrics.
            rows: ``[Q, K]`` corpus rows, best first (``-1`` padding).
            scores: ``[Q, K]`` their scores.
            qrels: Per query: ``{corpus row: grade > 0}``.
        """
        rows, scores = rows.cpu(), scores.float().cpu()
        top, top_scores = _pad(rows[:, :DEPTH], scores[:, :DEPTH])
        ranks = []
        for query, relevant in enumerate(qrels):
            position = {row: rank for rank, row in enumerate(rows[query].tolist(), start=1) if row != PAD}
            ranks.append({row: position.get(row) for row in sorted(relevant)})
        return cls(label, model, dict(metrics), top, top_scores, per_query_ndcg(top, qrels), ranks, rows.shape[1])

    def to_json(self, eval_set: EvalSet) -> dict:
        """``{query id: {"ndcg@10", "top": [[page id, score], ...], "ranks": {page id: rank or null}}}``."""
        queries = {}
        for query, query_id in enumerate(eval_set.query_ids):
            top = [[eval_set.corpus_ids[row], round(score, 6)]
                   for row, score in zip(self.top[query].tolist(), self.scores[query].tolist()) if row != PAD]
            ndcg = self.ndcg[query].item()
            queries[query_id] = {"ndcg@10": None if math.isnan(ndcg) else round(ndcg, 6), "top": top,
                                 "ranks": {eval_set.corpus_ids[row]: rank for row, rank in self.ranks[query].items()}}
        return queries

    @classmethod
    def from_json(cls, queries: dict, eval_set: EvalSet, *, label: str, model: str, metrics: dict[str, float],
                  kept: int, source: str | Path) -> StageRecord:
        """Reads :meth:`to_json` back against ``eval_set``; NDCG@10 is recomputed from its qrels.

        Raises:
            DataError: naming ``source`` and the query or page id, when an id is not in the eval set or a query of
                the eval set is missing.
        """
        source = str(source)
        if not isinstance(queries, dict):
            raise DataError(source, f"expected per-query results (a JSON object by query id), got {type(queries)}")
        missing = [q for q in eval_set.query_ids if q not in queries]
        if missing:
            raise DataError(source, f"has no result for eval query {missing[0]!r} ({len(missing)} of "
                                    f"{len(eval_set.query_ids)} missing): was it evaluated on {eval_set.name}?")
        corpus_row = {c: i for i, c in enumerate(eval_set.corpus_ids)}
        num_queries = len(eval_set.query_ids)
        top = torch.full((num_queries, DEPTH), PAD, dtype=torch.int64)
        scores = torch.full((num_queries, DEPTH), float("nan"))
        ranks: list[dict[int, int | None]] = []
        for query, query_id in enumerate(eval_set.query_ids):
            pairs, saved_ranks = _entry(queries[query_id], source, query_id)
            for column, (page_id, score) in enumerate(pairs[:DEPTH]):
                if page_id not in corpus_row:
                    raise DataError(source, f"query {query_id!r} ranks page {page_id!r}, which is not in the eval "
                                            f"corpus of {eval_set.name}")
                top[query, column], scores[query, column] = corpus_row[page_id], score
            ranks.append({row: saved_ranks.get(eval_set.corpus_ids[row]) for row in sorted(eval_set.qrels[query])})
        return cls(label, model, dict(metrics), top, scores, per_query_ndcg(top, eval_set.qrels), ranks, kept)


def _pad(rows: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Q, DEPTH]`` rows and scores, short rankings padded with ``-1`` / NaN."""
    scores = scores.masked_fill(rows == PAD, float("nan"))
    missing = DEPTH - rows.shape[1]
    if missing > 0:
        rows = torch.cat([rows, torch.full((rows.shape[0], missing), PAD, dtype=rows.dtype)], dim=1)
        scores = torch.cat([scores, torch.full((scores.shape[0], missing), float("nan"))], dim=1)
    return rows, scores


def _entry(entry, source: str, query_id: str) -> tuple[list[tuple[str, float]], dict[str, int | None]]:
    """One query's ``(top pairs, ranks)`` from JSON, or a DataError naming the query."""
    try:
        pairs = [(str(page_id), float(score)) for page_id, score in entry["top"]]
        ranks = {str(page_id): None if rank is None else int(rank) for page_id, rank in entry.get("ranks", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(source, f"query {query_id!r}: expected {{'top': [[page id, score], ...], 'ranks': "
                                f"{{page id: rank}}}}, got {str(entry)[:120]}") from error
    return pairs, ranks


def run_json(stages: list[StageRecord], eval_set: EvalSet, *, model: str, data: str, reranker: str | None,
             rerank_depth: int) -> dict:
    """What ``--output`` writes: the retriever's metrics at the top level (a ``reranked`` section with a reranker),
    and per query its top 10 and the ranks of its relevant pages, which ``--compare`` reads back."""
    retriever = stages[-1]
    report = {**retriever.metrics, "num_documents": len(eval_set.corpus_ids), "model": model, "data": data,
              "kept": retriever.kept, "queries": retriever.to_json(eval_set)}
    if len(stages) == 2:
        report["reranked"] = {**stages[0].metrics, "reranker": reranker, "depth": rerank_depth,
                              "queries": stages[0].to_json(eval_set)}
    return report


def read_run(path: Path, eval_set: EvalSet) -> list[StageRecord]:
    """The stages of a run saved by ``vdr evaluate --output`` (reranked first, when it has them), for ``--compare``.

    Raises:
        DataError: naming the file, when it is not such a run or was evaluated on other queries or pages.
    """
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(str(path), f"cannot read it as JSON: {error}") from error
    if not isinstance(run, dict) or "queries" not in run:
        raise DataError(str(path), "has no per-query results (\"queries\"): write it with `vdr evaluate ... --output "
                                   "FILE.json`")
    _check_same_eval_set(run, eval_set, path)
    model = str(run.get("model", path))
    metrics = _metrics(run, path)
    stages = [StageRecord.from_json(run["queries"], eval_set, label=short_name(model), model=model, metrics=metrics,
                                    kept=int(run.get("kept", 100)), source=path)]
    reranked = run.get("reranked")
    if isinstance(reranked, dict) and "queries" in reranked:
        reranker = str(reranked.get("reranker"))
        metrics = _metrics(reranked, path)
        stages.insert(0, StageRecord.from_json(
            reranked["queries"], eval_set, label=f"{short_name(model)} + {short_name(reranker)}",
            model=f"{model} reranked by {reranker}", metrics=metrics, kept=int(reranked.get("depth", 100)),
            source=path))
    return stages


def short_name(model: str) -> str:
    """A model's name for labels: a hub id as it is; a path as its last two folders (``demo/export``), and for a file
    its name after them, folders named ``checkpoints`` skipped (``rerank_demo/version_0/last.ckpt``)."""
    if not os.path.exists(model):
        return model
    path = Path(model).resolve()
    folders = [part for part in (path.parent.parts if path.is_file() else path.parts) if part != "checkpoints"]
    return "/".join(folders[-2:] + ([path.name] if path.is_file() else []))


def _check_same_eval_set(run: dict, eval_set: EvalSet, path: Path) -> None:
    """A saved run's metrics are only comparable over the same queries and pages: refuse others."""
    queries = run["queries"]
    if isinstance(queries, dict):
        known = set(eval_set.query_ids)
        extra = [q for q in queries if q not in known]
        if extra:
            raise DataError(str(path), f"has results for {len(extra)} queries that are not in {eval_set.name} (e.g. "
                                       f"{extra[0]!r}): it was evaluated on another eval set")
    pages = run.get("num_documents")
    if pages is not None and pages != len(eval_set.corpus_ids):
        raise DataError(str(path), f"was evaluated over {pages} pages, {eval_set.name} has "
                                   f"{len(eval_set.corpus_ids)}: its metrics would not be comparable")


def _metrics(section: dict, path: Path) -> dict[str, float]:
    metrics = {}
    for name in METRIC_NAMES:
        if name in section:
            try:
                metrics[name] = float(section[name])
            except (TypeError, ValueError) as error:
                raise DataError(str(path), f"{name} must be a number, got {section[name]!r}") from error
            if not math.isfinite(metrics[name]):
                raise DataError(str(path), f"{name} must be a finite number, got {section[name]!r}")
    return metrics
