"""Hard-negative mining: the selection rules against a brute-force reading of them, and `vdr mine` end to end on the
tiny model (positives never mined, margins respected, mined pages above random ones, path columns, cache, reranker)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from vdr.cli import main
from vdr.data.images import read_encoded
from vdr.data.schema import TrainRows
from vdr.data.sources import load_table
from vdr.evaluation.encoders import load_encoder
from vdr.evaluation.scorers import load_scorer
from vdr.mining.select import PAD, MiningSettings, Window, resort, select, window

from .conftest import fit_tiny
from .test_rerank_pipeline import fit_reranker

# --------------------------------------------------------------------------------------------------------------------
# The selection rules, against a plain-Python reading of them
# --------------------------------------------------------------------------------------------------------------------


def survivors(ranked: list[int], scores: list[float], positives: set[int], positive: float,
              settings: MiningSettings) -> list[int]:
    """Ranks [range_min, range_max) of the ranking without positives that pass every filter, in rank order."""
    others = [(row, score) for row, score in zip(ranked, scores) if row != PAD and row not in positives]
    kept = []
    for row, score in others[settings.range_min : settings.range_max]:
        if settings.absolute_margin is not None and score > positive - settings.absolute_margin:
            continue
        if settings.relative_margin is not None and score > positive - abs(positive) * settings.relative_margin:
            continue
        if settings.max_score is not None and score > settings.max_score:
            continue
        kept.append(row)
    return kept


def brute_force(ranked: list[int], scores: list[float], positives: set[int], positive: float,
                settings: MiningSettings) -> list[int] | None:
    """The top ``num_negatives`` survivors, or None when there are fewer."""
    kept = survivors(ranked, scores, positives, positive, settings)
    return kept[: settings.num_negatives] if len(kept) >= settings.num_negatives else None


def random_ranking(generator: torch.Generator, rows: int, depth: int, corpus: int):
    scores = torch.rand(rows, depth, generator=generator).sort(dim=1, descending=True).values * 2 - 1  # [R, C]
    ranked = torch.stack([torch.randperm(corpus, generator=generator)[:depth] for _ in range(rows)])  # [R, C]
    ranked[:, -2:] = PAD  # a ranking that ran out early
    scores[:, -2:] = float("-inf")
    positives = [set(ranked[r, torch.randint(0, depth, (2,), generator=generator)].tolist()) - {PAD}
                 for r in range(rows)]
    excluded = torch.tensor([[row in positives[r] for row in ranked[r].tolist()] for r in range(rows)])
    return ranked, scores, positives, excluded


@pytest.mark.parametrize("settings", [
    MiningSettings(num_negatives=3, range_min=0, range_max=10),
    MiningSettings(num_negatives=2, range_min=3, range_max=12, absolute_margin=0.1),
    MiningSettings(num_negatives=2, range_min=1, range_max=20, relative_margin=0.3, max_score=0.5),
    MiningSettings(num_negatives=4, range_min=0, range_max=6, absolute_margin=0.5),  # often too few: rows skipped
])
def test_top_selection_matches_brute_force(settings: MiningSettings) -> None:
    generator = torch.Generator().manual_seed(0)
    ranked, scores, positives, excluded = random_ranking(generator, rows=40, depth=24, corpus=60)
    positive = torch.rand(40, generator=generator) * 2 - 1
    chosen = select(window(ranked, scores, excluded, settings), positive, settings)
    skipped = 0
    for r in range(40):
        expected = brute_force(ranked[r].tolist(), scores[r].tolist(), positives[r], positive[r].item(), settings)
        if expected is None:
            skipped += 1
            assert not chosen.kept[r] and (chosen.rows[r] == PAD).all()
        else:
            assert chosen.kept[r] and chosen.rows[r].tolist() == expected
            assert not set(expected) & positives[r]
    assert chosen.counts["rows_skipped"] == skipped


def test_random_sampling_draws_only_survivors_and_follows_its_seed() -> None:
    generator = torch.Generator().manual_seed(1)
    ranked, scores, positives, excluded = random_ranking(generator, rows=30, depth=24, corpus=60)
    positive = torch.ones(30)
    draws, in_score_order = [], []
    for seed in (0, 0, 1):
        settings = MiningSettings(num_negatives=3, range_min=2, range_max=18, absolute_margin=0.2, sampling="random",
                                  seed=seed)
        chosen = select(window(ranked, scores, excluded, settings), positive, settings)
        draws.append(chosen.rows)
        for r in range(30):
            pool = survivors(ranked[r].tolist(), scores[r].tolist(), positives[r], 1.0, settings)
            assert bool(chosen.kept[r]) == (len(pool) >= 3)
            if chosen.kept[r]:
                assert set(chosen.rows[r].tolist()) <= set(pool)
                picked = chosen.scores[r]
                in_score_order.append(bool((picked[:-1] >= picked[1:]).all()))
    # Written in draw order: the first column of random negatives is itself a uniform draw, not the hardest of k.
    assert not all(in_score_order)
    assert torch.equal(draws[0], draws[1])  # same seed, same draw
    assert not torch.equal(draws[0], draws[2])  # another seed, another draw


def test_resort_orders_by_new_scores_and_keeps_padding_last() -> None:
    rows = torch.tensor([[4, 7, 9, PAD]])
    new = resort(Window(rows, torch.tensor([[0.9, 0.8, 0.7, float("-inf")]])), torch.tensor([[0.1, 0.5, 0.3, 9.0]]))
    assert new.rows.tolist() == [[7, 9, 4, PAD]]
    assert new.scores[0, :3].tolist() == pytest.approx([0.5, 0.3, 0.1])


@pytest.mark.parametrize("bad", [dict(num_negatives=0), dict(range_min=5, range_max=5),
                                 dict(num_negatives=4, range_max=3), dict(relative_margin=-0.1)])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        MiningSettings(**bad)


# --------------------------------------------------------------------------------------------------------------------
# `vdr mine` end to end on the tiny model
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = fit_tiny(tmp_path_factory.mktemp("mine-run"), tiny_synth, "miner", 4)
    return run / "checkpoints" / "last.ckpt"


def mine(checkpoint: Path, data: Path, output: Path, *flags: str) -> dict:
    assert main(["mine", "--model", str(checkpoint), "--data", str(data), "--output", str(output), "--device", "cpu",
                 "--cache_dir", str(output.parent / "cache"), *flags]) == 0
    return json.loads((output / "mining.json").read_text())


def keys(table: datasets.Dataset, column: str, root: str | None = None) -> list[int]:
    table = table.cast_column(column, datasets.Image(decode=False)) if isinstance(
        table.features[column], datasets.Image) else table
    return [read_encoded(v, dataset="t", row=i, column=column, root=root).key for i, v in enumerate(table[column])]


def similarity(encoder, texts: list[str], table: datasets.Dataset, column: str) -> torch.Tensor:
    """Row-wise cosine of each text with its page in ``column``, embedded independently of the mining code."""
    images = [page.convert("RGB") for page in table.cast_column(column, datasets.Image())[column]]
    return (encoder.queries(texts) * encoder.pages(images)).sum(-1)  # [R]


def test_mined_negatives_are_the_hardest_non_positives(checkpoint: Path, tiny_synth: Path, tmp_path: Path) -> None:
    report = mine(checkpoint, tiny_synth / "train", tmp_path / "mined", "--num_negatives", "2", "--range_max", "10")
    mined = load_table(str(tmp_path / "mined"))
    TrainRows(mined, "mined", num_negatives=2)  # the training schema, readable by `vdr fit`
    source = load_table(str(tiny_synth / "train"))
    assert len(mined) == len(source) == report["rows_written"]

    # An independent ranking: every query against every distinct training page, by the same model.
    encoder = load_encoder(str(checkpoint), "cpu")
    page_keys = keys(source, "image")
    distinct = sorted(set(page_keys), key=page_keys.index)
    pages = [source.cast_column("image", datasets.Image())[page_keys.index(k)]["image"] for k in distinct]
    scores = encoder.queries(list(mined["query"])) @ encoder.pages(pages).T  # [R, P]
    positives_of = {}
    for query, key in zip(source["query"], page_keys):
        positives_of.setdefault(query, set()).add(key)
    negative_keys = [keys(mined, f"negative_{i}") for i in range(2)]
    for row, query in enumerate(mined["query"]):
        allowed = [j for j, k in enumerate(distinct) if k not in positives_of[query]]
        best = sorted(allowed, key=lambda j: -scores[row, j].item())[:2]
        assert [negative_keys[i][row] for i in range(2)] == [distinct[j] for j in best]
        assert not {negative_keys[i][row] for i in range(2)} & positives_of[query]  # never a positive
    written = torch.tensor([mined["negative_0_score"], mined["negative_1_score"]]).T  # [R, 2]
    expected = scores.gather(1, torch.tensor([[distinct.index(negative_keys[i][r]) for i in range(2)]
                                              for r in range(len(mined))]))
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=0)
    positive = similarity(encoder, list(mined["query"]), mined, "image")
    torch.testing.assert_close(torch.tensor(mined["positive_score"]), positive, atol=1e-5, rtol=0)
    assert [row[0] for row in mined["scores"]] == pytest.approx(mined["positive_score"])


def test_margins_hold_and_mined_negatives_outrank_random_ones(checkpoint: Path, tiny_synth: Path,
                                                              tmp_path: Path) -> None:
    # A margin that bites: half the distance between the mean positive score and the mean hardest negative.
    probe = mine(checkpoint, tiny_synth / "train", tmp_path / "probe", "--range_max", "10")
    margin = max(1e-4, abs(probe["scores"]["positive_mean"] - probe["scores"]["hardest_negative_mean"]) / 2)
    report = mine(checkpoint, tiny_synth / "train", tmp_path / "margin", "--range_max", "40", "--absolute_margin",
                  str(margin), "--max_score", str(probe["scores"]["positive_median"]))
    assert report["counts"]["dropped_absolute_margin"] > 0
    mined = load_table(str(tmp_path / "margin"))
    encoder = load_encoder(str(checkpoint), "cpu")
    negative = similarity(encoder, list(mined["query"]), mined, "negative_0")
    positive = similarity(encoder, list(mined["query"]), mined, "image")
    assert (negative <= positive - margin + 1e-5).all()
    assert (negative <= probe["scores"]["positive_median"] + 1e-5).all()

    # Random negatives: a uniform draw from every non-positive page (the window spans the whole corpus).
    random_report = mine(checkpoint, tiny_synth / "train", tmp_path / "random", "--sampling", "random",
                         "--range_max", "1000", "--seed", "3")
    top = load_table(str(tmp_path / "probe"))
    drawn = load_table(str(tmp_path / "random"))
    assert random_report["counts"]["candidates"] > 10 * len(drawn)
    mined_scores = similarity(encoder, list(top["query"]), top, "negative_0")
    random_scores = similarity(encoder, list(drawn["query"]), drawn, "negative_0")
    assert (mined_scores >= random_scores - 1e-5).all()  # the top non-positive outranks any other one
    assert mined_scores.mean() > random_scores.mean()


def test_path_columns_stay_paths_and_the_cache_makes_a_rerun_cheap(checkpoint: Path, tiny_synth: Path,
                                                                  tmp_path: Path) -> None:
    # The training set again, with pages as files and relative paths.
    source = load_table(str(tiny_synth / "train")).cast_column("image", datasets.Image(decode=False))
    (tmp_path / "paths" / "pages").mkdir(parents=True)
    paths = []
    for row, value in enumerate(source["image"]):
        (tmp_path / "paths" / "pages" / f"{row}.png").write_bytes(value["bytes"])
        paths.append(f"pages/{row}.png")
    datasets.Dataset.from_dict({"query": source["query"], "image": paths}).save_to_disk(str(tmp_path / "paths"
                                                                                            / "table"))
    # Relative paths resolve against the data directory: put the pages where the table is.
    (tmp_path / "paths" / "pages").rename(tmp_path / "paths" / "table" / "pages")

    first = mine(checkpoint, tmp_path / "paths" / "table", tmp_path / "out", "--range_max", "8")
    mined = load_table(str(tmp_path / "out"))
    assert mined.features["negative_0"] == datasets.Value("string")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in list(mined["negative_0"]) + list(mined["image"]))
    assert first["cached"] == []
    again = mine(checkpoint, tmp_path / "paths" / "table", tmp_path / "out", "--range_max", "8", "--overwrite")
    assert again["cached"] == ["queries", "pages"]  # no encoder pass the second time
    assert list(load_table(str(tmp_path / "out"))["negative_0"]) == list(mined["negative_0"])


def test_reranker_rescoring_orders_and_scores_by_the_reranker(checkpoint: Path, tiny_synth: Path,
                                                              tmp_path: Path) -> None:
    reranker = fit_reranker(tmp_path, tiny_synth, "rr", 2, "--model.batch_negatives", "1") / "checkpoints" / "last.ckpt"
    mine(checkpoint, tiny_synth / "train", tmp_path / "reranked", "--num_negatives", "3", "--range_max", "6",
         "--reranker", str(reranker))
    mined = load_table(str(tmp_path / "reranked"))
    scorer = load_scorer(str(reranker), "cpu")
    for i in range(3):
        pages = [p.convert("RGB") for p in mined[f"negative_{i}"]]
        expected = scorer.score(list(mined["query"]), pages)
        torch.testing.assert_close(torch.tensor(mined[f"negative_{i}_score"]), expected, atol=1e-4, rtol=0)
    scores = torch.tensor(mined["scores"])  # [R, 1 + k]
    assert (scores[:, 1:-1] >= scores[:, 2:]).all()  # best first by the reranker
    positives = scorer.score(list(mined["query"]), [p.convert("RGB") for p in mined["image"]])
    torch.testing.assert_close(scores[:, 0], positives, atol=1e-4, rtol=0)


def test_bad_input_fails_before_any_model_work_and_keeps_what_was_written(tiny_synth: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    broken = load_table(str(tiny_synth / "train")).remove_columns("image")
    broken.save_to_disk(str(tmp_path / "broken"))
    # A model that does not exist: the data error must come first.
    assert main(["mine", "--model", str(tmp_path / "no-model.ckpt"), "--data", str(tmp_path / "broken"), "--output",
                 str(tmp_path / "out")]) == 2
    assert "missing column(s) ['image']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    assert main(["mine", "--model", str(tmp_path / "no-model.ckpt"), "--data", str(tiny_synth / "train"), "--output",
                 str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"
    # An output inside the input would move the input away with --overwrite.
    assert main(["mine", "--model", str(tmp_path / "no-model.ckpt"), "--data", str(tiny_synth / "train"), "--output",
                 str(tiny_synth / "train" / "mined"), "--overwrite"]) == 2
    assert "overlaps --data" in capsys.readouterr().err
    assert not (tiny_synth / "train" / "mined").exists()


def test_an_external_corpus_with_copies_never_yields_a_positive_or_a_page_twice(checkpoint: Path, tiny_synth: Path,
                                                                               tmp_path: Path) -> None:
    # The corpus: every training positive, the first five twice more, and the eval pages (another set of pages).
    train = load_table(str(tiny_synth / "train")).cast_column("image", datasets.Image(decode=False))
    eval_pages = load_table(str(tiny_synth / "eval" / "corpus")).cast_column("image", datasets.Image(decode=False))
    images = list(train["image"]) + list(train["image"][:5]) * 2 + list(eval_pages["image"])
    corpus = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(images))], "image": images},
                                        features=datasets.Features({"id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    corpus.save_to_disk(str(tmp_path / "corpus"))
    report = mine(checkpoint, tiny_synth / "train", tmp_path / "mined", "--num_negatives", "3", "--range_max", "12",
                  "--corpus", str(tmp_path / "corpus"))
    assert report["corpus_pages"] == len(set(keys(train, "image"))) + len(eval_pages)  # copies counted once
    mined = load_table(str(tmp_path / "mined"))
    positives_of: dict[str, set[int]] = {}
    for query, key in zip(train["query"], keys(train, "image")):
        positives_of.setdefault(query, set()).add(key)
    columns = [keys(mined, f"negative_{i}") for i in range(3)]
    for row, query in enumerate(mined["query"]):
        negatives = [column[row] for column in columns]
        assert len(set(negatives)) == 3  # no page twice in one row
        assert not set(negatives) & positives_of[query]  # no copy of a positive


def test_no_survivor_is_an_error_that_leaves_the_output_alone(checkpoint: Path, tiny_synth: Path,
                                                             tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    code = main(["mine", "--model", str(checkpoint), "--data", str(tiny_synth / "train"), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--no_cache", "--max_score", "-2", "--overwrite"])
    assert code == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
