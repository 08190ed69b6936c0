"""``vdr mine``: hard negatives for a training set, mined with a retriever (and optionally rescored by a reranker).

Reads training rows (``query``, ``image``), embeds the queries and a corpus of pages with any model ``vdr evaluate``
takes (a ``vdr fit`` checkpoint, a Sentence Transformers directory, a Hugging Face name), ranks the corpus for every
query, and writes the rows again with ``negative_0 .. negative_{k-1}`` chosen by :mod:`vdr.mining.select`, plus
their scores: ``positive_score``, ``negative_{i}_score`` and ``scores`` (a list, positive first: the layout of the
reranker's ``teacher_column``).

- The corpus is the training set's own positive pages (deduplicated by content), or ``--corpus``: any table with an
  ``image`` column, or an eval set's directory (its ``corpus/``).
- A query's positives are the pages of every row with the same query text; they never become its negatives, nor does
  any copy of them elsewhere in the corpus (pages are compared by content hash).
- Image columns keep their kind: ``datasets.Image`` columns are written as image bytes, path columns as absolute
  paths (so the output works from any directory).
- Embeddings are cached (``--cache_dir``), keyed by the model's files and the inputs: mining again with other
  filters or samplings skips the encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from vdr.data.errors import DataError
from vdr.data.images import read_encoded
from vdr.data.schema import EncodeRows, TrainRows, image_column, verify_images_of
from vdr.data.sources import load_table
from vdr.data.writing import check_target, move_into_place, temporary_sibling, write_dataset
from vdr.evaluation.run import example_batches
from vdr.evaluation.topk import RunningTopK
from vdr.mining.cache import EmbeddingCache, default_cache_dir, describe_encoder
from vdr.mining.select import PAD, MiningSettings, Selection, Window, resort, select, window


class PageTable:
    """A column of pages (undecoded), with each page's content hash and how to write it into another dataset.

    Args:
        table: A table with an ``image`` column.
        name: How the user named it (for errors).
        root: Directory relative paths resolve against.
        rows: The table rows this page table holds (default: all).
    """

    def __init__(self, table, name: str, root: str | None, rows: list[int] | None = None,
                 keys: list[int] | None = None) -> None:
        import datasets

        table = image_column(table, name, "image").select_columns(["image"])
        self.table = table if rows is None else table.select(rows)
        self.name, self.root = name, root
        feature = self.table.features["image"]
        self.is_paths = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if keys is None:
            values = tqdm(self.table["image"], desc=f"read {name}", unit="page", leave=False)
            keys = [read_encoded(value, dataset=name, row=row, column="image", root=root).key
                    for row, value in enumerate(values)]
        self.keys = keys

    def __len__(self) -> int:
        return len(self.table)

    def value(self, row: int):
        """The page as a value of the output dataset: an absolute path, or ``{"bytes": ..., "path": None}``."""
        value = self.table[row]["image"]
        if self.is_paths:
            return os.path.abspath(value if self.root is None else os.path.join(self.root, value))
        return {"bytes": read_encoded(value, dataset=self.name, row=row, column="image", root=self.root).data,
                "path": None}

    def decoded(self) -> EncodeRows:
        return EncodeRows(self.table, self.name, "image", "image", root=self.root)


def _embed_pages(encoder, pages: PageTable, batch_size: int, num_workers: int, desc: str) -> torch.Tensor:
    loader = example_batches(pages.decoded(), batch_size, num_workers)
    return torch.cat([encoder.pages([e.image for e in batch]) for batch in tqdm(loader, desc=desc, unit="batch")])


def _embed_texts(encoder, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([encoder.queries(texts[i : i + batch_size])
                      for i in tqdm(range(0, len(texts), batch_size), desc="embed queries", unit="batch")])


def _load_corpus(corpus: str, verify: bool) -> PageTable:
    """A corpus table (or an eval set's ``corpus/``), checked, with each distinct page (by content) once."""
    root = corpus if os.path.isdir(corpus) else None
    source = corpus
    if os.path.isdir(os.path.join(corpus, "corpus")):
        source = os.path.join(corpus, "corpus")  # an eval set: relative paths resolve against the set, as in evaluation
        warnings.warn(f"mining from the eval set {corpus}: its pages become training negatives, so evaluation on it no "
                      "longer measures unseen pages", stacklevel=2)
    table = load_table(source)
    if "image" not in table.column_names:
        raise DataError(source, f"a corpus needs an 'image' column; found {table.column_names}")
    if len(table) == 0:
        raise DataError(source, "has no rows")
    table = image_column(table, source, "image")
    if verify:
        verify_images_of(table, source, ["image"], root)
    pages = PageTable(table, source, root)
    first: dict[int, int] = {}
    for row, key in enumerate(pages.keys):
        first.setdefault(key, row)  # a page twice in the corpus must not fill two negative columns of one row
    if len(first) == len(pages):
        return pages
    return PageTable(table, source, root, list(first.values()), keys=list(first))


def _check_separate(output: Path, inputs: dict[str, str | None]) -> None:
    """Refuses an output that is, holds or sits inside an input: --overwrite would move the input away."""
    target = output.resolve()
    for flag, value in inputs.items():
        if value is None or not os.path.exists(value):
            continue
        source = Path(value).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise ValueError(f"--output {output} overlaps --{flag} {value}; write the mined dataset somewhere else")


def _exclusions(ranked_rows: torch.Tensor, query_of_row: list[int], train_keys: list[int],
                corpus_keys: list[int]) -> torch.Tensor:
    """``[U, depth]``: whether each ranked corpus row is one of the query's positives (by content hash)."""
    corpus_size = len(corpus_keys)
    rows_of_key: dict[int, list[int]] = defaultdict(list)
    for row, key in enumerate(corpus_keys):
        rows_of_key[key].append(row)
    positive_pairs = {query * corpus_size + row for query, key in zip(query_of_row, train_keys)
                      for row in rows_of_key.get(key, ())}  # query x corpus row, flattened
    codes = torch.arange(ranked_rows.shape[0])[:, None] * corpus_size + ranked_rows  # [U, depth]
    return torch.isin(codes, torch.tensor(sorted(positive_pairs), dtype=torch.int64)) & (ranked_rows != PAD)


def _select_rows(candidates: Window, row_index: torch.Tensor, positive_scores: torch.Tensor,
                 settings: MiningSettings, chunk: int = 4096) -> Selection:
    """:func:`select` over the rows' windows (``candidates[row_index]``), a chunk of rows at a time (bounded memory)."""
    generator = torch.Generator().manual_seed(settings.seed)
    parts = []
    for first in range(0, len(row_index), chunk):
        index = row_index[first : first + chunk]
        parts.append(select(Window(candidates.rows[index], candidates.scores[index]),
                            positive_scores[first : first + chunk], settings, generator))
    counts = {name: sum(part.counts.get(name, 0) for part in parts) for name in parts[0].counts}
    return Selection(torch.cat([p.rows for p in parts]), torch.cat([p.scores for p in parts]),
                     torch.cat([p.kept for p in parts]), counts)


def _rerank_window(scorer, candidates: Window, texts: list[str], corpus: PageTable, batch_size: int) -> torch.Tensor:
    """``[U, W]`` reranker scores of each query's window (``-inf`` at padding)."""
    scores = torch.full(candidates.rows.shape, float("-inf"))
    pairs = (candidates.rows != PAD).nonzero().tolist()
    pages = corpus.decoded()
    for start in tqdm(range(0, len(pairs), batch_size), desc="rerank candidates", unit="batch"):
        chunk = pairs[start : start + batch_size]
        images = [pages[int(candidates.rows[u, w])].image for u, w in chunk]
        values = scorer.score([texts[u] for u, _ in chunk], images)
        for (u, w), value in zip(chunk, values.tolist()):
            scores[u, w] = value
    return scores


def _rerank_positives(scorer, queries: list[str], positives: PageTable, positive_of_row: list[int],
                      batch_size: int) -> torch.Tensor:
    """``[R]`` reranker scores of each row's (query, positive) pair."""
    pages = positives.decoded()
    out = []
    for start in tqdm(range(0, len(queries), batch_size), desc="rerank positives", unit="batch"):
        rows = range(start, min(start + batch_size, len(queries)))
        out.append(scorer.score([queries[r] for r in rows], [pages[positive_of_row[r]].image for r in rows]))
    return torch.cat(out).float()


def _statistics(positive: torch.Tensor, negatives: torch.Tensor) -> dict[str, float]:
    hardest = negatives.max(dim=1).values  # random picks come in draw order, not best first
    return {
        "positive_mean": positive.mean().item(), "positive_median": positive.median().item(),
        "negative_mean": negatives.mean().item(), "negative_median": negatives.median().item(),
        "hardest_negative_mean": hardest.mean().item(),
        "positive_minus_hardest_mean": (positive - hardest).mean().item(),
        "negative_above_positive_fraction": (negatives > positive[:, None]).float().mean().item(),
    }


def mine_command(
    model: str,
    data: str,
    output: Path,
    num_negatives: int = 1,
    range_min: int = 0,
    range_max: int = 50,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    sampling: Literal["top", "random"] = "top",
    seed: int = 0,
    corpus: str | None = None,
    reranker: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    split: str = "train",
    verify_images: bool = True,
    overwrite: bool = False,
) -> dict:
    """Mine hard negatives: write the training rows with negative_0..k-1 (and their scores) picked from a ranking.

    Args:
        model: The retriever that ranks the corpus: a `vdr fit` checkpoint (.ckpt), a Sentence Transformers directory
            (e.g. from `vdr export`), or a Hugging Face Qwen3-VL directory or hub id.
        data: Training rows with `query` and `image` columns (a save_to_disk directory, parquet, or a hub dataset).
        output: Directory for the mined dataset (save_to_disk) and its mining.json report.
        num_negatives: Negatives per row (negative_0 .. negative_{k-1}); rows with fewer survivors are skipped.
        range_min: First rank (0-based, positives removed) a negative may come from; skip the very top to avoid
            unlabeled positives.
        range_max: End of the rank window (exclusive).
        absolute_margin: Drop candidates scoring above (positive score - margin).
        relative_margin: Drop candidates scoring above (positive score - |positive score| * margin); 0.05 with top
            sampling is the NV-Retriever setting.
        max_score: Drop candidates scoring above this.
        sampling: top (the best-ranked survivors) or random (a uniform sample of the survivors).
        seed: Seed of random sampling.
        corpus: Pages to mine from: a table with an `image` column or an eval set directory (default: the training
            set's own positive pages).
        reranker: Rescore the window (and the positive) with this reranker (checkpoint, CrossEncoder directory or hub
            id); margins, max_score and top sampling then use its scores (log-odds).
        batch_size: Inputs per forward pass.
        device: cpu, cuda, cuda:1, ... (default: cuda when available).
        num_workers: Processes decoding pages.
        cache_dir: Where embeddings are cached (default: $VDR_CACHE or ~/.cache/vdr, under embeddings/).
        no_cache: Neither read nor write cached embeddings.
        split: The split of a hub dataset or DatasetDict.
        verify_images: Check every page of the training rows up front, before any model work.
        overwrite: Replace an existing output directory (only once the new one is complete).
    """
    from vdr.evaluation.encoders import load_encoder
    from vdr.evaluation.scorers import load_scorer

    settings = MiningSettings(num_negatives, range_min, range_max, absolute_margin, relative_margin, max_score,
                              sampling, seed)
    output = Path(output)
    check_target(output, overwrite)
    _check_separate(output, {"data": data, "corpus": corpus})
    start = time.perf_counter()

    # Everything about the data is checked before any model is loaded.
    table = load_table(data, split=split)
    root = data if os.path.isdir(data) else None
    TrainRows(table, data, root=root, verify_images=verify_images)  # the training schema, with clear errors
    queries = list(table["query"])
    train = PageTable(table, data, root)
    first_row_of_key: dict[int, int] = {}
    for row, key in enumerate(train.keys):
        first_row_of_key.setdefault(key, row)
    unique_positive_rows = list(first_row_of_key.values())
    positives = PageTable(train.table, f"{data} (positives)", root, unique_positive_rows,
                          keys=[train.keys[row] for row in unique_positive_rows])
    positive_index = {key: i for i, key in enumerate(positives.keys)}
    positive_of_row = [positive_index[key] for key in train.keys]  # [R] -> row of `positives`
    pages = positives if corpus is None else _load_corpus(corpus, verify_images)
    texts = sorted(set(queries))
    text_index = {text: i for i, text in enumerate(texts)}
    query_of_row = [text_index[q] for q in queries]  # [R] -> row of `texts`
    positives_per_query: dict[int, set[int]] = defaultdict(set)  # content hashes of each query's positives
    for row, key in enumerate(train.keys):
        positives_per_query[query_of_row[row]].add(key)
    copies = defaultdict(int)
    for key in pages.keys:
        copies[key] += 1
    most_excluded = max(sum(copies[key] for key in keys) for keys in positives_per_query.values())

    encoder = load_encoder(model, device)
    scorer = load_scorer(reranker, device) if reranker else None
    cache = EmbeddingCache(None if no_cache else Path(cache_dir or default_cache_dir()), model,
                           describe_encoder(encoder))
    query_vectors = cache.get_or_compute("queries", texts, lambda: _embed_texts(encoder, texts, batch_size))
    page_vectors = cache.get_or_compute("pages", pages.keys, lambda: _embed_pages(
        encoder, pages, batch_size, num_workers, "embed corpus"))
    positive_vectors = page_vectors if pages is positives else cache.get_or_compute(
        "pages", positives.keys, lambda: _embed_pages(encoder, positives, batch_size, num_workers, "embed positives"))

    depth = min(len(pages), range_max + most_excluded)
    topk = RunningTopK(query_vectors, depth)
    for first in range(0, len(pages), 4096):
        chunk = page_vectors[first : first + 4096]
        topk.update(chunk, torch.arange(first, first + len(chunk)))
    ranked_scores, ranked_rows = topk.result()  # [U, depth]
    excluded = _exclusions(ranked_rows, query_of_row, train.keys, pages.keys)  # [U, depth]
    candidates = window(ranked_rows, ranked_scores, excluded, settings)  # [U, W]
    row_index = torch.tensor(query_of_row)  # [R]
    positive_scores = (query_vectors[row_index] * positive_vectors[torch.tensor(positive_of_row)]).sum(-1)  # [R]
    if scorer is not None:
        candidates = resort(candidates, _rerank_window(scorer, candidates, texts, pages, batch_size))
        positive_scores = _rerank_positives(scorer, queries, positives, positive_of_row,
                                            batch_size)
    selection = _select_rows(candidates, row_index, positive_scores, settings)  # [R, k]
    kept = selection.kept.nonzero().flatten().tolist()
    if not kept:
        raise DataError(data, f"no row kept {num_negatives} negatives after the filters ({selection.counts}); widen "
                        "the rank window or loosen the margins")

    import datasets

    image_feature = datasets.Value("string") if train.is_paths else datasets.Image()
    negative_feature = datasets.Value("string") if pages.is_paths else datasets.Image()
    features = datasets.Features(
        {"query": datasets.Value("string"), "image": image_feature}
        | {f"negative_{i}": negative_feature for i in range(num_negatives)}
        | {"positive_score": datasets.Value("float32")}
        | {f"negative_{i}_score": datasets.Value("float32") for i in range(num_negatives)}
        | {"scores": datasets.Sequence(datasets.Value("float32"))}
    )

    def rows():
        for row in tqdm(kept, desc="write", unit="row"):
            negatives = selection.rows[row].tolist()
            scores = [positive_scores[row].item(), *selection.scores[row].tolist()]
            record = {"query": queries[row], "image": train.value(row)}
            record |= {f"negative_{i}": pages.value(corpus_row) for i, corpus_row in enumerate(negatives)}
            record |= {"positive_score": scores[0]}
            record |= {f"negative_{i}_score": score for i, score in enumerate(scores[1:])}
            yield record | {"scores": scores}

    statistics = _statistics(positive_scores[kept], selection.scores[kept])
    report = {
        "model": model, "data": data, "corpus": corpus or "training positives", "reranker": reranker,
        "settings": asdict(settings), "rows": len(queries), "rows_written": len(kept), "queries": len(texts),
        "corpus_pages": len(pages), "counts": selection.counts, "scores": statistics,
        "cached": cache.hits, "seconds": round(time.perf_counter() - start, 1),
    }
    tmp_dir = temporary_sibling(output)
    try:
        write_dataset(rows(), features, tmp_dir)
        (tmp_dir / "mining.json").write_text(json.dumps(report, indent=2) + "\n")
        move_into_place(tmp_dir, output)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _print_report(report)
    return report


def _print_report(report: dict) -> None:
    counts, scores = report["counts"], report["scores"]
    skipped = counts["rows_skipped"]
    why = f" (fewer than {report['settings']['num_negatives']} candidates survived the filters)" if skipped else ""
    print(f"mined {report['rows']} rows over {report['corpus_pages']} pages: {report['rows_written']} written, "
          f"{skipped} skipped{why}")
    dropped = ", ".join(f"{name.removeprefix('dropped_')} {value}" for name, value in counts.items()
                        if name.startswith("dropped_"))
    print(f"candidates in the rank windows: {counts['candidates']}" + (f"; dropped by {dropped}" if dropped else ""))
    print(f"scores: positive mean {scores['positive_mean']:.4f} (median {scores['positive_median']:.4f}), negatives "
          f"mean {scores['negative_mean']:.4f} (median {scores['negative_median']:.4f}), hardest negative mean "
          f"{scores['hardest_negative_mean']:.4f}; positive - hardest mean {scores['positive_minus_hardest_mean']:.4f}"
          f"; negatives above their positive: {100 * scores['negative_above_positive_fraction']:.1f}%")
    if report["cached"]:
        print(f"embeddings from the cache: {', '.join(report['cached'])}", file=sys.stderr)
    print(f"{report['seconds']:.1f} s", file=sys.stderr)
