"""Data sources and schemas: what loads, and every kind of bad input failing early with the row and column named."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pytest
from PIL import Image

from vdr.data.errors import DataError
from vdr.data.schema import EvalSet, TrainRows, load_eval_set
from vdr.data.sources import load_table


def _png(color: str = "white", size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _train_table(**overrides) -> datasets.Dataset:
    columns = {
        "query": ["acme revenue 2019", "nexar profit 2020", "jovix debt 2021"],
        "image": [{"bytes": _png("red"), "path": None}, {"bytes": _png("blue"), "path": None},
                  {"bytes": _png("green"), "path": None}],
        "negative_0": [{"bytes": _png("gray"), "path": None}] * 3,
    }
    columns.update(overrides)
    features = datasets.Features({k: datasets.Value("string") if k == "query" else datasets.Image() for k in columns
                                  if not isinstance(columns[k][0], int | type(None))})
    if len(features) != len(columns):
        return datasets.Dataset.from_dict(columns)
    return datasets.Dataset.from_dict(columns, features=features)


def test_train_rows_decode_and_hash() -> None:
    rows = TrainRows(_train_table(), "t", num_negatives=1)
    example = rows[1]
    assert example.query == "nexar profit 2020"
    assert [p.mode for p in example.pages] == ["RGB", "RGB"]
    # Same bytes, same key: row 0's negative and row 1's negative are the same page.
    assert rows[0].page_keys[1] == example.page_keys[1] != example.page_keys[0]


def test_path_columns_and_parquet_sources(tmp_path: Path) -> None:
    (tmp_path / "pages").mkdir()
    for name in ("a", "b"):
        (tmp_path / "pages" / f"{name}.png").write_bytes(_png())
    table = datasets.Dataset.from_dict({"query": ["q a", "q b"], "image": ["pages/a.png", "pages/b.png"]})
    table.to_parquet(str(tmp_path / "train.parquet"))
    loaded = load_table(str(tmp_path / "train.parquet"))
    rows = TrainRows(loaded, "train.parquet", root=str(tmp_path))
    assert rows[1].pages[0].size == (40, 30)


def test_fewer_negative_columns_than_asked() -> None:
    with pytest.raises(DataError, match=r"asks for 2 hard negatives .* has 1: \['negative_0'\]"):
        TrainRows(_train_table(), "t", num_negatives=2)


def test_missing_required_column() -> None:
    with pytest.raises(DataError, match=r"dataset 't': missing column\(s\) \['query'\]"):
        TrainRows(_train_table().remove_columns("query"), "t")


def test_empty_query_names_the_row() -> None:
    table = _train_table(query=["ok", "   ", "ok"])
    with pytest.raises(DataError, match=r"dataset 't', row 1, column 'query': empty text"):
        TrainRows(table, "t")


def test_non_image_value_in_image_column() -> None:
    table = datasets.Dataset.from_dict({"query": ["a", "b"], "image": [1, 2]})
    with pytest.raises(DataError, match=r"column 'image': expected an image column"):
        TrainRows(table, "t")


def test_missing_image_file_names_the_row(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    table = datasets.Dataset.from_dict({"query": ["a", "b"], "image": ["a.png", "missing.png"]})
    with pytest.raises(DataError, match=r"row 1, column 'image': cannot read image file .*missing.png"):
        TrainRows(table, "t", root=str(tmp_path))


def test_corrupt_image_fails_at_setup() -> None:
    truncated = _png("red", (200, 200))[:60]
    table = _train_table(negative_0=[{"bytes": _png(), "path": None}, {"bytes": truncated, "path": None},
                                     {"bytes": _png(), "path": None}])
    with pytest.raises(DataError, match=r"row 1, column 'negative_0': corrupt image"):
        TrainRows(table, "t", num_negatives=1)


def test_corrupt_image_without_verification_fails_when_loaded() -> None:
    table = _train_table(image=[{"bytes": b"not an image", "path": None}] * 3)
    rows = TrainRows(table, "t", verify_images=False)
    with pytest.raises(DataError, match=r"row 2, column 'image': cannot decode image"):
        rows[2]


def _eval_tables(qrels: dict | None = None):
    queries = datasets.Dataset.from_dict({"id": ["q1", "q2"], "text": ["acme revenue", "nexar debt"]})
    corpus = datasets.Dataset.from_dict(
        {"id": ["p1", "p2", "p3"], "image": [{"bytes": _png(c), "path": None} for c in ("red", "blue", "green")]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    qrels = datasets.Dataset.from_dict(qrels or {"query_id": ["q1", "q2", "q2"], "corpus_id": ["p1", "p2", "p3"],
                                                 "score": [1, 2, 0]})
    return queries, corpus, qrels


def test_eval_set_indexes_graded_qrels(tmp_path: Path) -> None:
    for name, table in zip(("queries", "corpus", "qrels"), _eval_tables()):
        table.save_to_disk(str(tmp_path / name))
    eval_set = load_eval_set(str(tmp_path), loader=load_table)
    assert eval_set.qrels == [{0: 1}, {1: 2}]  # grade 0 is not relevant
    assert eval_set.corpus_rows()[2].image.size == (40, 30)
    assert eval_set.query_rows()[1].text == "nexar debt"


def test_qrel_with_unknown_corpus_id() -> None:
    tables = _eval_tables({"query_id": ["q1", "q2"], "corpus_id": ["p1", "p9"], "score": [1, 1]})
    with pytest.raises(DataError, match=r"dataset 'ev/qrels', row 1, column 'corpus_id': corpus id 'p9' is not"):
        EvalSet.from_tables("ev", *tables)


def test_qrel_with_non_integer_grade() -> None:
    tables = _eval_tables({"query_id": ["q1"], "corpus_id": ["p1"], "score": [0.5]})
    with pytest.raises(DataError, match=r"row 0, column 'score': expected an integer relevance grade"):
        EvalSet.from_tables("ev", *tables)


def test_duplicate_corpus_ids() -> None:
    queries, corpus, qrels = _eval_tables()
    corpus = corpus.map(lambda row, i: {"id": "p1" if i == 2 else row["id"]}, with_indices=True)
    with pytest.raises(DataError, match=r"dataset 'ev/corpus', row 2, column 'id': duplicate id 'p1'"):
        EvalSet.from_tables("ev", queries, corpus, qrels)


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_table(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no parquet file matches"):
        load_table(str(tmp_path / "*.parquet"))


def test_synthetic_cache_of_another_generator_version_or_config_is_regenerated(tmp_path: Path) -> None:
    import json

    from vdr.data.datamodule import RetrievalDataModule
    from vdr.data.synth import GENERATOR_VERSION, SynthConfig

    config = SynthConfig(seed=2, image_size=64, num_train_pages=4, num_negatives=1, num_eval_queries=2,
                         distractors_per_query=1)
    target = tmp_path / "synth"
    RetrievalDataModule(synthetic=config, synthetic_dir=str(target)).prepare_data()
    meta_path = target / "synth.json"
    first = meta_path.stat().st_mtime_ns
    RetrievalDataModule(synthetic=config, synthetic_dir=str(target)).prepare_data()  # same version and config: kept
    assert meta_path.stat().st_mtime_ns == first
    meta = json.loads(meta_path.read_text())
    meta["generator_version"] = GENERATOR_VERSION - 1
    meta_path.write_text(json.dumps(meta))
    RetrievalDataModule(synthetic=config, synthetic_dir=str(target)).prepare_data()  # stale version: regenerated
    assert json.loads(meta_path.read_text())["generator_version"] == GENERATOR_VERSION
    other = SynthConfig(seed=3, image_size=64, num_train_pages=4, num_negatives=1, num_eval_queries=2,
                        distractors_per_query=1)
    RetrievalDataModule(synthetic=other, synthetic_dir=str(target)).prepare_data()  # another config: regenerated
    assert json.loads(meta_path.read_text())["config"]["seed"] == 3
