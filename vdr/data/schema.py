"""The two data schemas, validated up front, as torch datasets of decoded examples.

Training rows (the reference VDR recipe): ``query`` (text), ``image`` (the positive page) and
``negative_0 .. negative_{k-1}`` (hard-negative pages); for reranker distillation, optionally a column of teacher
scores (a list per row: the positive's, then each negative's). Image columns hold ``datasets.Image`` values or file
paths. Rerankers also train on labeled pairs: ``query``, ``image`` and ``label`` (relevance in [0, 1]).

Evaluation sets are three tables: ``queries`` (``id``, ``text``), ``corpus`` (``id``, ``image``) and ``qrels``
(``query_id``, ``corpus_id``, ``score``: an integer relevance grade, > 0 relevant).

Everything that can be checked without decoding pixels is checked when the dataset is built, so a bad row
fails the run before any training; pixels that do not decode fail when their row is loaded, naming the row (or, with
``skip_undecodable``, the training row is passed over for the next one, with a warning, and counted).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from vdr.data.errors import DataError
from vdr.data.images import EncodedImage, decode, read_encoded, verify


@dataclass
class TrainExample:
    """One training row, decoded: the query and its pages (positive first, then the hard negatives)."""

    row: int
    query: str
    pages: list[Image.Image]
    page_keys: list[int]  # content hashes, aligned with ``pages``
    teacher: list[float] | None = None  # teacher scores, aligned with ``pages`` (reranker distillation)
    skipped: int = 0  # undecodable rows passed over to reach this one (bad_images: skip)


@dataclass
class PairExample:
    """One labeled (query, page) pair, decoded."""

    row: int
    query: str
    page: Image.Image
    page_key: int
    label: float
    skipped: int = 0  # undecodable rows passed over to reach this one (bad_images: skip)


@dataclass
class ScorePair:
    """One (query, candidate page) pair for a reranker to score, with its position in the flattened candidate lists."""

    index: int
    query: str
    image: Image.Image


@dataclass
class EncodeExample:
    """One eval query or corpus page to embed, with its row in its table."""

    index: int
    text: str | None = None
    image: Image.Image | None = None


def image_column(table: datasets.Dataset, name: str, column: str) -> datasets.Dataset:
    """Checks an image column's type and switches it to undecoded bytes (we decode, hash and report ourselves)."""
    feature = table.features[column]
    if isinstance(feature, datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary"):
        return table
    raise DataError(name, f"expected an image column (datasets.Image or file paths), found feature {feature}",
                    column=column)


def _require_columns(table: datasets.Dataset, name: str, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(name, f"missing column(s) {missing} required by the {what} schema; "
                        f"found {table.column_names}")


def _check_texts(values: list, name: str, column: str) -> None:
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(name, f"expected text, got {type(value).__name__}", row=row, column=column)
        if not value.strip():
            raise DataError(name, "empty text", row=row, column=column)


def _check_present(table: datasets.Dataset, name: str, column: str, what: str) -> None:
    """Refuses rows whose image value is missing: null, an image with neither bytes nor path, or an empty path.

    Reads the Arrow column (no Python copy of the image bytes, which ``verify_images_of`` may read next).
    """
    values = table.select_columns([column]).with_format("arrow")[column]
    missing = pc.is_null(values)
    if pa.types.is_struct(values.type):
        no_bytes, no_path = (pc.is_null(pc.struct_field(values, field)) for field in ("bytes", "path"))
        missing = pc.or_(missing, pc.and_(no_bytes, no_path))
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        missing = pc.or_(missing, pc.fill_null(pc.equal(values, ""), True))
    row = pc.index(missing, True).as_py()
    if row >= 0:
        raise DataError(name, f"{what}: the value is empty", row=row, column=column)


def _check_teacher(values: list, name: str, column: str, needed: int) -> list[list[float]]:
    """Teacher scores: a list of at least ``needed`` finite numbers per row (positive first, then the negatives)."""
    out = []
    for row, scores in enumerate(values):
        if not isinstance(scores, list | tuple):
            raise DataError(name, f"expected a list of {needed} teacher scores (positive, then each negative), got "
                            f"{type(scores).__name__}", row=row, column=column)
        if len(scores) < needed or any(s is None for s in scores[:needed]):
            raise DataError(name, f"teacher scores missing: {needed} needed (positive, then each negative), got "
                            f"{scores!r}", row=row, column=column)
        scores = scores[:needed]
        if any(isinstance(s, bool) or not isinstance(s, int | float) or s != s or abs(s) == float("inf")
               for s in scores):
            raise DataError(name, f"teacher scores must be finite numbers, got {scores!r}", row=row, column=column)
        out.append([float(s) for s in scores])
    return out


def verify_images_of(table: datasets.Dataset, name: str, columns: list[str], root: str | None) -> None:
    for column in columns:
        for row, value in enumerate(table[column]):
            verify(read_encoded(value, dataset=name, row=row, column=column, root=root),
                   dataset=name, row=row, column=column)


def _first_decodable(dataset, row: int, load: Callable[[int], TrainExample | PairExample], skip: bool):
    """``load(row)``; with ``skip``, a row whose page does not decode is passed over (warned) for the next one.

    Passing over rather than dropping keeps every batch at its size: no empty batch with a batch size of 1, no rank
    of a DDP step with fewer rows than its collectives expect, no reranker group short of its batch negatives.
    """
    for offset in range(len(dataset)):
        candidate = (row + offset) % len(dataset)
        try:
            example = load(candidate)
        except DataError as error:
            if not skip:
                raise
            warnings.warn(f"skipping a training row (bad_images: skip): {error}", stacklevel=3)
            continue
        example.skipped = offset
        return example
    raise DataError(dataset.name, "no row has pages that decode")


class TrainRows(torch.utils.data.Dataset):
    """Training rows in the reference schema.

    Args:
        table: The loaded table.
        name: How the user named it (used in error messages).
        num_negatives: Hard-negative columns to use (``negative_0`` ..); the table may hold more.
        root: Directory that relative image paths are resolved against.
        verify_images: Check every image header up front (reads each file once; no pixel decoding for PNG).
        teacher_column: A column of teacher scores to attach to each example (reranker distillation).
        skip_undecodable: A row whose page does not decode is passed over for the next row (a warning names it;
            ``TrainExample.skipped`` counts it) instead of failing the run.
    """

    def __init__(self, table: datasets.Dataset, name: str, *, num_negatives: int = 0, root: str | None = None,
                 verify_images: bool = True, teacher_column: str | None = None,
                 skip_undecodable: bool = False) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.name, self.root, self.skip_undecodable = name, root, skip_undecodable
        self.image_columns = ["image"] + [f"negative_{i}" for i in range(num_negatives)]
        available = sorted(c for c in table.column_names if c.startswith("negative_"))
        if any(c not in table.column_names for c in self.image_columns[1:]):
            raise DataError(name, f"the config asks for {num_negatives} hard negatives (negative_0 .. "
                            f"negative_{num_negatives - 1}) but the table has {len(available)}: {available}")
        _require_columns(table, name, ["query", "image", *([teacher_column] if teacher_column else [])], "training")
        if len(table) == 0:
            raise DataError(name, "has no rows")
        for column in self.image_columns:
            table = image_column(table, name, column)
        self.table = table.select_columns(["query", *self.image_columns])
        _check_texts(self.table["query"], name, "query")
        _check_present(self.table, name, "image", "the group has no positive page")
        self.teacher = None
        if teacher_column:
            self.teacher = _check_teacher(table[teacher_column], name, teacher_column, len(self.image_columns))
        if verify_images:
            verify_images_of(self.table, name, self.image_columns, root)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int) -> TrainExample:
        return _first_decodable(self, row, self._load, self.skip_undecodable)

    def _load(self, row: int) -> TrainExample:
        record = self.table[row]
        encoded = [self._read(record[c], row, c) for c in self.image_columns]
        pages = [decode(e, dataset=self.name, row=row, column=c) for e, c in zip(encoded, self.image_columns)]
        teacher = self.teacher[row] if self.teacher is not None else None
        return TrainExample(row=row, query=record["query"], pages=pages, page_keys=[e.key for e in encoded],
                            teacher=teacher)

    def _read(self, value, row: int, column: str) -> EncodedImage:
        return read_encoded(value, dataset=self.name, row=row, column=column, root=self.root)


class PairRows(torch.utils.data.Dataset):
    """Labeled pairs for pointwise reranker training: ``query``, ``image`` and ``label`` (relevance in [0, 1]).

    Args:
        table: The loaded table.
        name: How the user named it (used in error messages).
        root: Directory that relative image paths are resolved against.
        verify_images: Check every image header up front.
        skip_undecodable: A pair whose page does not decode is passed over for the next pair instead of failing the
            run.
    """

    def __init__(self, table: datasets.Dataset, name: str, *, root: str | None = None,
                 verify_images: bool = True, skip_undecodable: bool = False) -> None:
        self.name, self.root, self.skip_undecodable = name, root, skip_undecodable
        _require_columns(table, name, ["query", "image", "label"], "labeled-pair")
        if len(table) == 0:
            raise DataError(name, "has no rows")
        table = image_column(table, name, "image")
        self.table = table.select_columns(["query", "image"])
        _check_texts(self.table["query"], name, "query")
        _check_present(self.table, name, "image", "the pair has no page")
        self.labels = []
        for row, label in enumerate(table["label"]):
            if isinstance(label, bool) or not isinstance(label, int | float) or not 0 <= label <= 1:
                raise DataError(name, f"expected a relevance label in [0, 1] (1 relevant, 0 not), got {label!r}",
                                row=row, column="label")
            self.labels.append(float(label))
        if verify_images:
            verify_images_of(self.table, name, ["image"], root)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int) -> PairExample:
        return _first_decodable(self, row, self._load, self.skip_undecodable)

    def _load(self, row: int) -> PairExample:
        record = self.table[row]
        encoded = read_encoded(record["image"], dataset=self.name, row=row, column="image", root=self.root)
        page = decode(encoded, dataset=self.name, row=row, column="image")
        return PairExample(row=row, query=record["query"], page=page, page_key=encoded.key, label=self.labels[row])


class EncodeRows(torch.utils.data.Dataset):
    """A column of texts or of images to embed (eval queries or corpus), one ``EncodeExample`` per row."""

    def __init__(self, values: list | datasets.Dataset, name: str, column: str, kind: str, root: str | None = None):
        self.values, self.name, self.column, self.kind, self.root = values, name, column, kind, root

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> EncodeExample:
        if self.kind == "text":
            return EncodeExample(index=index, text=self.values[index])
        value = self.values[index][self.column]
        encoded = read_encoded(value, dataset=self.name, row=index, column=self.column, root=self.root)
        return EncodeExample(index=index, image=decode(encoded, dataset=self.name, row=index, column=self.column))


@dataclass
class EvalSet:
    """A validated evaluation set with compact integer indexes (memory stays small for long string ids)."""

    name: str
    query_ids: list[str]
    query_texts: list[str]
    corpus_ids: list[str]
    corpus: datasets.Dataset  # one column "image", undecoded
    qrels: list[dict[int, int]]  # per query row: {corpus row: grade}, grades > 0 only
    root: str | None = None

    @classmethod
    def from_tables(cls, name: str, queries: datasets.Dataset, corpus: datasets.Dataset, qrels: datasets.Dataset,
                    *, root: str | None = None, verify_images: bool = True) -> EvalSet:
        """Validates the three tables and indexes the qrels."""
        _require_columns(queries, f"{name}/queries", ["id", "text"], "eval queries")
        _require_columns(corpus, f"{name}/corpus", ["id", "image"], "eval corpus")
        _require_columns(qrels, f"{name}/qrels", ["query_id", "corpus_id", "score"], "qrels")
        query_ids = [str(i) for i in queries["id"]]
        corpus_ids = [str(i) for i in corpus["id"]]
        for table_name, ids in ((f"{name}/queries", query_ids), (f"{name}/corpus", corpus_ids)):
            seen: dict[str, int] = {}
            for row, identifier in enumerate(ids):
                if identifier in seen:
                    raise DataError(table_name, f"duplicate id {identifier!r} (first at row {seen[identifier]})",
                                    row=row, column="id")
                seen[identifier] = row
        texts = queries["text"]
        _check_texts(texts, f"{name}/queries", "text")
        corpus = image_column(corpus, f"{name}/corpus", "image").select_columns(["image"])
        if verify_images:
            verify_images_of(corpus, f"{name}/corpus", ["image"], root)
        query_row = {q: i for i, q in enumerate(query_ids)}
        corpus_row = {c: i for i, c in enumerate(corpus_ids)}
        indexed: list[dict[int, int]] = [{} for _ in query_ids]
        for row, (qid, cid, score) in enumerate(zip(qrels["query_id"], qrels["corpus_id"], qrels["score"])):
            if str(qid) not in query_row:
                raise DataError(f"{name}/qrels", f"query id {qid!r} is not in the queries table",
                                row=row, column="query_id")
            if str(cid) not in corpus_row:
                raise DataError(f"{name}/qrels", f"corpus id {cid!r} is not in the corpus table",
                                row=row, column="corpus_id")
            if isinstance(score, bool) or not isinstance(score, int | float) or int(score) != score:
                raise DataError(f"{name}/qrels", f"expected an integer relevance grade, got {score!r}",
                                row=row, column="score")
            if score > 0:
                indexed[query_row[str(qid)]][corpus_row[str(cid)]] = int(score)
        return cls(name, query_ids, list(texts), corpus_ids, corpus, indexed, root)

    def query_rows(self) -> EncodeRows:
        return EncodeRows(self.query_texts, f"{self.name}/queries", "text", "text")

    def corpus_rows(self) -> EncodeRows:
        return EncodeRows(self.corpus, f"{self.name}/corpus", "image", "image", root=self.root)


def load_eval_set(source: str, *, loader: Callable[..., datasets.Dataset], verify_images: bool = True) -> EvalSet:
    """Loads ``source/{queries,corpus,qrels}`` (local directories) or the hub configurations of those names."""
    if os.path.isdir(source):
        tables = {part: loader(os.path.join(source, part)) for part in ("queries", "corpus", "qrels")}
        root = source
    else:
        tables = {part: loader(source, config=part, split="test") for part in ("queries", "corpus", "qrels")}
        root = None
    return EvalSet.from_tables(source, tables["queries"], tables["corpus"], tables["qrels"], root=root,
                               verify_images=verify_images)
