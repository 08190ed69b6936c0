"""The HTML report of ``vdr evaluate --report``: every query's top pages as thumbnails, worst queries first.

One self-contained file (``report.html`` beside this module is its page): the metrics of each stage, then for each
query its top 10 pages per stage with their scores, relevant pages outlined in green, and relevant pages that missed
the top 10 in red with the rank they got. It sorts by NDCG@10 (worst first by default), or by the per-query change
between two stages (a reranker against its retriever, or this run against another one); it filters to queries whose
relevant page is not in the top 10, or to wins or losses, and searches query texts.

Large eval sets stay usable: each page's thumbnail is stored once, however many queries show it (a small JPEG,
``thumbnails.py``), and only one page of 20 queries is drawn at a time.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vdr.data.schema import EvalSet
from vdr.evaluation.metrics import METRIC_NAMES
from vdr.evaluation.records import PAD, StageRecord
from vdr.evaluation.thumbnails import PageThumbnails


def report_data(eval_set: EvalSet, stages: list[StageRecord], *, title: str, details: dict[str, object],
                compare: tuple[int, int] | None = None, thumbnail_height: int = 88) -> dict:
    """What the page draws: stages and their metrics, and per query its relevant pages and each stage's top pages.

    Args:
        eval_set: The queries, qrels and page ids the stages ranked.
        stages: The rankings to show, the first one sorted by by default.
        title: The page's heading.
        details: Shown under the heading (model, data, ...).
        compare: ``(a, b)``: per-query NDCG@10 of stage ``a`` minus stage ``b`` (wins, losses, sorting by change).
        thumbnail_height: Displayed thumbnail height in CSS pixels.
    """
    if not stages:
        raise ValueError("a report needs at least one ranking")
    if compare is not None and (len(set(compare)) != 2 or not all(0 <= s < len(stages) for s in compare)):
        raise ValueError(f"compare must name two different stages of {len(stages)}, got {compare}")
    queries = []
    for query, (query_id, text) in enumerate(zip(eval_set.query_ids, eval_set.query_texts)):
        results = []
        for stage in stages:
            top = [[row, _finite(score)] for row, score in zip(stage.top[query].tolist(), stage.scores[query].tolist())
                   if row != PAD]
            results.append({"top": top, "ndcg": _finite(stage.ndcg[query].item()), "ranks": stage.ranks[query]})
        queries.append({"id": query_id, "text": text, "relevant": eval_set.qrels[query], "stages": results})
    return {
        "title": title,
        "details": [[key, value] for key, value in details.items()],
        "metricNames": list(METRIC_NAMES),
        "stages": [{"label": s.label, "model": s.model, "metrics": {k: _finite(v) for k, v in s.metrics.items()},
                    "kept": s.kept} for s in stages],
        "compare": list(compare) if compare is not None else None,
        "thumbnailHeight": thumbnail_height,
        "pageIds": {row: eval_set.corpus_ids[row] for row in shown_rows(eval_set, stages)},
        "queries": queries,
    }


def shown_rows(eval_set: EvalSet, stages: list[StageRecord]) -> list[int]:
    """The corpus rows the report draws: every stage's top pages and every relevant page, each once."""
    rows = {row for stage in stages for row in stage.top.flatten().tolist() if row != PAD}
    rows.update(row for relevant in eval_set.qrels for row in relevant)
    return sorted(rows)


def write_report(path: str | Path, eval_set: EvalSet, stages: list[StageRecord], *, title: str,
                 details: dict[str, object], compare: tuple[int, int] | None = None, thumbnail_size: int = 160,
                 num_workers: int = 0, progress: bool = True) -> Path:
    """Writes the report (replacing ``path`` only once it is complete).

    Args:
        path: The HTML file to write.
        eval_set: The queries, qrels and pages the stages ranked.
        stages: The rankings to show, the first one sorted by by default.
        title: The page's heading.
        details: Shown under the heading.
        compare: ``(a, b)``: the two stages whose per-query change is shown.
        thumbnail_size: Longer side of each stored thumbnail, in pixels (shown 88 px high, larger on hover).
        num_workers: DataLoader workers decoding pages.
        progress: Show a progress bar (stderr).
    """
    path = Path(path)
    data = report_data(eval_set, stages, title=title, details=details, compare=compare,
                       thumbnail_height=min(88, thumbnail_size))
    pages = PageThumbnails(eval_set, [int(row) for row in data["pageIds"]], thumbnail_size)
    thumbs: dict[int, str] = {}
    loader = DataLoader(pages, batch_size=32, num_workers=num_workers, collate_fn=list)
    for batch in tqdm(loader, desc="thumbnails", unit="batch", disable=not progress):
        thumbs.update(batch)
    template = resources.files("vdr.evaluation").joinpath("report.html").read_text(encoding="utf-8")
    parts = {"TITLE": html.escape(title), "DATA": _script_json(data), "THUMBS": _script_json(thumbs)}
    # One pass: a placeholder's name inside a query text or a path must not be substituted again.
    page = re.sub(r"__(TITLE|DATA|THUMBS)__", lambda match: parts[match[1]], template)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)  # an existing report is replaced only by a complete one
    return path


def default_details(model: str, data: str, eval_set: EvalSet, **extra: object) -> dict[str, object]:
    """The facts shown under a report's heading."""
    details: dict[str, object] = {"model": model, **{k: v for k, v in extra.items() if v is not None}, "data": data,
                                  "queries": len(eval_set.query_ids), "pages": len(eval_set.corpus_ids)}
    details["written"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return details


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 6)


def _script_json(value: object) -> str:
    # Inside <script type="application/json">: "<" only occurs in strings, where \u003c reads back the same and
    # no "</script>" in a query text can end the block.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")

