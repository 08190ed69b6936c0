"""The two data schemas, validated up front, as torch datasets of decoded examples.

Training rows (the reference VDR recipe): ``query`` (text), ``image`` (the positive page) and
``negative_0 .. negative_{k-1}`` (hard-negative pages); for reranker distillation, optionally a column of teacher
scores (a list per row: the positive's, then each negative's). Image columns hold ``datasets.Image`` values or file
paths. Rerankers also train on labeled pairs: ``query``, ``image`` and ``label`` (relevance in [0, 1]).

Evaluation sets are three tables: ``queries`` (``id``, ``text``), ``corpus`` (``id``, ``image``) and ``qrels``
(``query_id``, ``corpus_id``, ``score``: an integer relevance grade, > 0 relevant).

Everything that can be checked without decoding pixels is checked when the dataset is built, so a bad row
fails the run before any training, naming its row and column; pixels that do not decode fail when their row is
loaded, naming the row. With ``skip_bad_rows``, training rows that fail the checks are dropped instead (``dropped``
lists them with their reasons, a warning counts them), and a training row whose pixels do not decode is passed over
for the next one (warned, and counted in ``TrainExample.skipped``). A bad column (missing, or of the wrong type) fails
either way, and so does anything in an evaluation set: its corpus must be whole.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
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

    row: int  # in the user's table
    query: str
    pages: list[Image.Image]
    page_keys: list[int]  # content hashes, aligned with ``pages``
    teacher: list[float] | None = None  # teacher scores, aligned with ``pages`` (reranker distillation)
    skipped: int = 0  # undecodable rows passed over to reach this one (skip_bad_rows)


@dataclass
class PairExample:
    """One labeled (query, page) pair, decoded."""

    row: int  # in the user's table
    query: str
    page: Image.Image
    page_key: int
    label: float
    skipped: int = 0  # undecodable rows passed over to reach this one (skip_bad_rows)


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


def _text_column(table: datasets.Dataset, name: str, column: str) -> None:
    """Checks a text column's type: a column of numbers or lists is the wrong column, not a table of bad rows."""
    feature = table.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(name, f"expected a text column, found feature {feature}", column=column)


def _require_columns(table: datasets.Dataset, name: str, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(name, f"missing column(s) {missing} required by the {what} schema; "
                        f"found {table.column_names}")


def _invisible(text: str) -> bool:
    """Nothing a reader would see: whitespace, control and format characters only (NUL, zero-width space and
    joiners, direction marks). A text of these is empty to the model too: a few tokens that say nothing."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _row_errors(values: Iterable, name: str, column: str, error_of: Callable[[object], str | None]
                ) -> Iterator[DataError]:
    """A ``DataError`` for each value of a column that ``error_of`` finds wrong (it says what is wrong, or None)."""
    for row, value in enumerate(values):
        if (message := error_of(value)) is not None:
            yield DataError(name, message, row=row, column=column)


def _text_error(value) -> str | None:
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    if not value.strip():
        return "empty text"
    if _invisible(value):
        return f"empty text: only invisible characters {value[:20]!r}"
    return None


def _missing_errors(table: datasets.Dataset, name: str, column: str, what: str) -> Iterator[DataError]:
    """Rows whose image value is missing: null, an image with neither bytes nor path, an empty path or empty bytes.

    Reads the Arrow column (no Python copy of the image bytes, which ``_image_errors`` may read next).
    """
    values = table.select_columns([column]).with_format("arrow")[column]

    def empty(array):  # null or of length 0
        return pc.fill_null(pc.equal(pc.binary_length(array), 0), True)

    if pa.types.is_struct(values.type):
        missing = pc.and_(empty(pc.struct_field(values, "bytes")), empty(pc.struct_field(values, "path")))
        missing = pc.or_(pc.is_null(values), missing)
    else:
        missing = empty(values)
    for row in pc.indices_nonzero(missing).to_pylist():
        yield DataError(name, f"{what}: the value is empty", row=row, column=column)


def _teacher_error(scores, needed: int) -> str | None:
    """What is wrong with one row's teacher scores: a list of at least ``needed`` finite numbers (positive first,
    then the negatives)."""
    if not isinstance(scores, list | tuple):
        return f"expected a list of {needed} teacher scores (positive, then each negative), got {type(scores).__name__}"
    if len(scores) < needed or any(s is None for s in scores[:needed]):
        return f"teacher scores missing: {needed} needed (positive, then each negative), got {scores!r}"
    if any(isinstance(s, bool) or not isinstance(s, int | float) or s != s or abs(s) == float("inf")
           for s in scores[:needed]):
        return f"teacher scores must be finite numbers, got {list(scores[:needed])!r}"
    return None


def _label_error(label) -> str | None:
    if isinstance(label, bool) or not isinstance(label, int | float) or not 0 <= label <= 1:
        return f"expected a relevance label in [0, 1] (1 relevant, 0 not), got {label!r}"
    return None


def _image_errors(table: datasets.Dataset, name: str, columns: list[str], root: str | None,
                  skip: Container[int] = ()) -> Iterator[DataError]:
    """Rows whose image does not read or whose header does not verify; rows in ``skip`` are not read."""
    for column in columns:
        for row, value in enumerate(table[column]):
            if row in skip:
                continue
            try:
                verify(read_encoded(value, dataset=name, row=row, column=column, root=root),
                       dataset=name, row=row, column=column)
            except DataError as error:
                yield error


def _check_texts(values: Iterable, name: str, column: str) -> None:
    for error in _row_errors(values, name, column, _text_error):
        raise error


def verify_images_of(table: datasets.Dataset, name: str, columns: list[str], root: str | None) -> None:
    """Reads every image of ``columns`` and checks its header; the first bad one raises its ``DataError``."""
    for error in _image_errors(table, name, columns, root):
        raise error


def _first_decodable(dataset, index: int, load: Callable[[int], TrainExample | PairExample], skip: bool):
    """``load(index)``; with ``skip``, a row whose page does not decode is passed over (warned) for the next one.

    Passing over rather than dropping keeps every batch at its size: no empty batch with a batch size of 1, no rank
    of a DDP step with fewer rows than its collectives expect, no reranker group short of its batch negatives.
    """
    for offset in range(len(dataset)):
        candidate = (index + offset) % len(dataset)
        try:
            example = load(candidate)
        except DataError as error:
            if not skip:
                raise
            warnings.warn(f"skipping a training row (skip_bad_rows): {error}", stacklevel=3)
            continue
        example.skipped = offset
        return example
    raise DataError(dataset.name, "no row has pages that decode")


class _CheckedRows(torch.utils.data.Dataset):
    """Training rows checked up front: a bad row fails the run, naming it, or with ``skip_bad_rows`` is dropped.

    Positions in this dataset are positions among the rows kept; ``source_rows`` maps them to the rows of the
    user's table, which every message and every example's ``row`` names.
    """

    name: str
    skip_bad_rows: bool
    table: datasets.Dataset
    source_rows: Sequence[int]  # [len(self)] the user's row of each position
    dropped: dict[int, str]  # the user's row -> why it was dropped at construction (skip_bad_rows)

    def _reject(self, errors: Iterable[DataError]) -> None:
        """Raises the first error, or with ``skip_bad_rows`` records each one's row as dropped (its first error)."""
        for error in errors:
            if not self.skip_bad_rows:
                raise error
            self.dropped.setdefault(error.row, str(error))

    def _keep_good_rows(self, table: datasets.Dataset) -> datasets.Dataset:
        """Drops the rejected rows from ``table`` (warning with their count and the first few reasons)."""
        self.source_rows = range(len(table))
        if not self.dropped:
            return table
        self.dropped = dict(sorted(self.dropped.items()))
        first = next(iter(self.dropped.values()))
        if len(self.dropped) == len(table):
            raise DataError(self.name, f"every one of its {len(table)} rows fails the checks, so skip_bad_rows "
                            f"leaves nothing to train on; the first: {first}")
        self.source_rows = [row for row in range(len(table)) if row not in self.dropped]
        warnings.warn(self.bad_rows_report(), stacklevel=3)
        # In memory: an indices file would otherwise be written next to the user's data.
        return table.select(self.source_rows, keep_in_memory=True)

    def bad_rows_report(self, limit: int = 3) -> str:
        """One line: how many rows were dropped at construction (``skip_bad_rows``) and why, for the first few."""
        if not self.dropped:
            return f"{self.name}: no rows dropped"
        total = len(self.source_rows) + len(self.dropped)
        reasons = "; ".join(list(self.dropped.values())[:limit])
        more = f" (and {len(self.dropped) - limit} more)" if len(self.dropped) > limit else ""
        return (f"{self.name}: {len(self.dropped)} of {total} rows fail the checks and are left out (skip_bad_rows): "
                f"{reasons}{more}")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        return _first_decodable(self, index, self._load, self.skip_bad_rows)

    def _load(self, index: int):
        raise NotImplementedError


class TrainRows(_CheckedRows):
    """Training rows in the reference schema.

    Args:
        table: The loaded table.
        name: How the user named it (used in error messages).
        num_negatives: Hard-negative columns to use (``negative_0`` ..); the table may hold more.
        root: Directory that relative image paths are resolved against.
        verify_images: Check every image header up front (reads each file once; no pixel decoding for PNG).
        teacher_column: A column of teacher scores to attach to each example (reranker distillation).
        skip_bad_rows: A row that fails the up-front checks (no text, an image missing, unreadable or corrupt, bad
            teacher scores) is dropped (``dropped`` holds each with its reason; a warning counts them), and a row whose
            page does not decode when loaded is passed over for the next row (a warning names it;
            ``TrainExample.skipped`` counts it), instead of failing the run. A bad column fails either way.
    """

    def __init__(self, table: datasets.Dataset, name: str, *, num_negatives: int = 0, root: str | None = None,
                 verify_images: bool = True, teacher_column: str | None = None,
                 skip_bad_rows: bool = False) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.name, self.root, self.skip_bad_rows = name, root, skip_bad_rows
        self.image_columns = ["image"] + [f"negative_{i}" for i in range(num_negatives)]
        available = sorted(c for c in table.column_names if c.startswith("negative_"))
        if any(c not in table.column_names for c in self.image_columns[1:]):
            raise DataError(name, f"the config asks for {num_negatives} hard negatives (negative_0 .. "
                            f"negative_{num_negatives - 1}) but the table has {len(available)}: {available}")
        _require_columns(table, name, ["query", "image", *([teacher_column] if teacher_column else [])], "training")
        if len(table) == 0:
            raise DataError(name, "has no rows")
        _text_column(table, name, "query")
        for column in self.image_columns:
            table = image_column(table, name, column)
        columns = table.select_columns(["query", *self.image_columns])
        self.dropped = {}
        self._reject(_row_errors(columns["query"], name, "query", _text_error))
        self._reject(_missing_errors(columns, name, "image", "the group has no positive page"))
        for column in self.image_columns[1:]:
            self._reject(_missing_errors(columns, name, column, "the group has no page in this hard-negative column"))
        teacher = None
        if teacher_column:
            teacher, needed = list(table[teacher_column]), len(self.image_columns)
            self._reject(_row_errors(teacher, name, teacher_column, lambda scores: _teacher_error(scores, needed)))
        if verify_images:
            self._reject(_image_errors(columns, name, self.image_columns, root, skip=self.dropped))
        self.table = self._keep_good_rows(columns)
        self.teacher = None
        if teacher is not None:
            self.teacher = [[float(s) for s in teacher[row][:needed]] for row in self.source_rows]

    def _load(self, index: int) -> TrainExample:
        record, row = self.table[index], self.source_rows[index]
        encoded = [self._read(record[c], row, c) for c in self.image_columns]
        pages = [decode(e, dataset=self.name, row=row, column=c) for e, c in zip(encoded, self.image_columns)]
        teacher = self.teacher[index] if self.teacher is not None else None
        return TrainExample(row=row, query=record["query"], pages=pages, page_keys=[e.key for e in encoded],
                            teacher=teacher)

    def _read(self, value, row: int, column: str) -> EncodedImage:
        return read_encoded(value, dataset=self.name, row=row, column=column, root=self.root)


class PairRows(_CheckedRows):
    """Labeled pairs for pointwise reranker training: ``query``, ``image`` and ``label`` (relevance in [0, 1]).

    Args:
        table: The loaded table.
        name: How the user named it (used in error messages).
        root: Directory that relative image paths are resolved against.
        verify_images: Check every image header up front.
        skip_bad_rows: A pair that fails the up-front checks (no text, a bad label, its image missing, unreadable or
            corrupt) is dropped (see ``dropped``), and a pair whose page does not decode when loaded is passed over
            for the next pair, instead of failing the run.
    """

    def __init__(self, table: datasets.Dataset, name: str, *, root: str | None = None,
                 verify_images: bool = True, skip_bad_rows: bool = False) -> None:
        self.name, self.root, self.skip_bad_rows = name, root, skip_bad_rows
        _require_columns(table, name, ["query", "image", "label"], "labeled-pair")
        if len(table) == 0:
            raise DataError(name, "has no rows")
        _text_column(table, name, "query")
        table = image_column(table, name, "image")
        columns = table.select_columns(["query", "image"])
        self.dropped = {}
        self._reject(_row_errors(columns["query"], name, "query", _text_error))
        self._reject(_missing_errors(columns, name, "image", "the pair has no page"))
        labels = list(table["label"])
        self._reject(_row_errors(labels, name, "label", _label_error))
        if verify_images:
            self._reject(_image_errors(columns, name, ["image"], root, skip=self.dropped))
        self.table = self._keep_good_rows(columns)
        self.labels = [float(labels[row]) for row in self.source_rows]

    def _load(self, index: int) -> PairExample:
        record, row = self.table[index], self.source_rows[index]
        encoded = read_encoded(record["image"], dataset=self.name, row=row, column="image", root=self.root)
        page = decode(encoded, dataset=self.name, row=row, column="image")
        return PairExample(row=row, query=record["query"], page=page, page_key=encoded.key, label=self.labels[index])


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
        _text_column(queries, f"{name}/queries", "text")
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
