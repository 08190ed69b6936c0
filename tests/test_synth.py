"""Tests for the synthetic VDR dataset generator (vdr.data.synth)."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vdr.data import synth
from vdr.data.synth import (
    ALL_COMBOS,
    COMPANIES,
    QUERY_TEXT_BAND,
    Combo,
    SynthConfig,
    generate,
    main,
    plan,
    render_page,
    sample_layout,
)

# Tiny but non-trivial: every code path (negatives, distractors, shuffling) is exercised in about a second.
SMALL = SynthConfig(
    seed=3, image_size=96, num_train_pages=40, num_negatives=2, num_eval_queries=10, distractors_per_query=2
)
PARTS = ("train", "eval/queries", "eval/corpus", "eval/qrels")


def _load(root: Path, part: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(root / part))


def _tables_equal(a: Path, b: Path, part: str) -> bool:
    # Arrow table equality covers the undecoded PNG bytes, i.e. byte-identical images.
    return _load(a, part).data.table.equals(_load(b, part).data.table)


def _differ_in_one(a: Combo, b: Combo) -> bool:
    return sum(x != y for x, y in zip(a, b)) == 1


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small"
    generate(out, SMALL, progress=False)
    return out


@pytest.fixture(scope="module")
def default_plan() -> synth.SynthPlan:
    # Planning is cheap, so split properties are checked at the real default sizes.
    return plan(SynthConfig())


# ---- determinism -----------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_datasets(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, SMALL, progress=False)
    for part in PARTS:
        assert _tables_equal(small, again, part), part


def test_different_seed_differs(small: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate(other, replace(SMALL, seed=4), progress=False)
    assert not _tables_equal(small, other, "train")
    assert _load(small, "eval/queries")["text"] != _load(other, "eval/queries")["text"]


def test_render_page_is_deterministic() -> None:
    a = render_page("Acme", "Revenue", 2019, random.Random(5))
    b = render_page("Acme", "Revenue", 2019, random.Random(5))
    c = render_page("Acme", "Revenue", 2019, random.Random(6))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert a.size == (128, 128) and a.mode == "RGB"


# ---- schema ----------------------------------------------------------------------------------------------------------


def test_schema(small: Path) -> None:
    train = _load(small, "train")
    assert train.column_names == ["query", "image", "negative_0", "negative_1"]
    assert train.features["query"] == datasets.Value("string")
    for name in ("image", "negative_0", "negative_1"):
        assert isinstance(train.features[name], datasets.Image)
    assert len(train) == SMALL.num_train_pages

    queries, corpus, qrels = (_load(small, p) for p in PARTS[1:])
    assert queries.features == datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
    assert corpus.column_names == ["id", "image"] and isinstance(corpus.features["image"], datasets.Image)
    assert qrels.column_names == ["query_id", "corpus_id", "score"]
    assert qrels.features["score"].dtype.startswith("int")
    assert len(queries) == SMALL.num_eval_queries
    assert len(corpus) == SMALL.num_eval_queries * (1 + SMALL.distractors_per_query)
    assert set(qrels["score"]) == {1}

    page = train[0]["negative_1"]
    assert page.size == (SMALL.image_size, SMALL.image_size) and page.mode == "RGB"
    assert queries[0]["id"] == "q0000" and sorted(corpus["id"])[0] == "p00000"


def test_zero_negatives(tmp_path: Path) -> None:
    config = SynthConfig(seed=1, image_size=64, num_train_pages=5, num_negatives=0, num_eval_queries=3)
    paths = generate(tmp_path / "k0", config, progress=False)
    assert datasets.load_from_disk(str(paths.train)).column_names == ["query", "image"]


def test_metadata(small: Path) -> None:
    meta = json.loads((small / "synth.json").read_text())
    assert meta["config"]["seed"] == SMALL.seed and meta["config"]["num_negatives"] == 2
    assert meta["counts"]["corpus_pages"] == 30 and meta["counts"]["qrels"] == 10


# ---- splits (on the plan, at default sizes) --------------------------------------------------------------------------


def test_eval_combos_never_in_train(default_plan: synth.SynthPlan) -> None:
    eval_combos = {q.combo for q in default_plan.queries}
    assert len(eval_combos) == 300
    for row in default_plan.train:
        assert row.positive.combo not in eval_combos
        assert all(neg.combo not in eval_combos for neg in row.negatives)


def test_train_cycles_over_all_train_combos(default_plan: synth.SynthPlan) -> None:
    counts = Counter(row.positive.combo for row in default_plan.train)
    assert len(counts) == len(ALL_COMBOS) - 300
    assert set(counts.values()) == {2}  # 3240 rows over 1620 combos


def test_hard_negatives_differ_in_one_attribute(default_plan: synth.SynthPlan) -> None:
    changed = Counter()
    for row in default_plan.train:
        assert len(row.negatives) == 1
        for neg in row.negatives:
            assert _differ_in_one(row.positive.combo, neg.combo)
            changed[[a != b for a, b in zip(row.positive.combo, neg.combo)].index(True)] += 1
    assert set(changed) == {0, 1, 2}  # company, metric and year changes all occur


def test_each_query_has_exactly_one_relevant_page(default_plan: synth.SynthPlan) -> None:
    corpus = {p.id: p for p in default_plan.corpus}
    qrels = default_plan.qrels()
    assert Counter(q for q, _, _ in qrels) == Counter(q.id for q in default_plan.queries)
    for query in default_plan.queries:
        matching = [p for p in default_plan.corpus if p.page.combo == query.combo]
        assert len(matching) == 1 and matching[0].relevant
        assert (query.id, matching[0].id, 1) in qrels
    for query_id, corpus_id, _ in qrels:
        assert corpus[corpus_id].query_id == query_id


def test_distractors_are_hard_and_unlabelled(default_plan: synth.SynthPlan) -> None:
    queries = {q.id: q for q in default_plan.queries}
    eval_combos = {q.combo for q in default_plan.queries}
    distractors = [p for p in default_plan.corpus if not p.relevant]
    assert len(distractors) == 300 * 4
    assert len({p.id for p in default_plan.corpus}) == len(default_plan.corpus) == 1500
    changed = Counter()
    for page in distractors:
        query_combo = queries[page.query_id].combo
        assert page.page.combo not in eval_combos
        assert _differ_in_one(query_combo, page.page.combo)
        changed[[a != b for a, b in zip(query_combo, page.page.combo)].index(True)] += 1
    # Attributes rotate per query, so 4 distractors always touch all three attributes: roughly balanced.
    assert min(changed.values()) >= 300


def test_corpus_is_shuffled(default_plan: synth.SynthPlan) -> None:
    # Unshuffled, the first 50 pages would be exactly 10 positives each followed by its 4 distractors.
    head = [p.relevant for p in default_plan.corpus[:50]]
    assert head != [i % 5 == 0 for i in range(50)] and 0 < sum(head) < 50


def test_eval_split_independent_of_train_and_render_options(default_plan: synth.SynthPlan) -> None:
    other = plan(SynthConfig(num_train_pages=7, num_negatives=3, image_size=64, blank_query_text=True))
    assert other.queries == default_plan.queries
    assert other.corpus == default_plan.corpus


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SynthConfig(num_eval_queries=len(ALL_COMBOS))
    with pytest.raises(ValueError):
        SynthConfig(num_negatives=-1)
    with pytest.raises(ValueError, match="layout_jitter"):
        SynthConfig(layout_jitter=1.5)


def test_config_record_leaves_out_default_jitter() -> None:
    assert "layout_jitter" not in synth.config_record(SynthConfig())
    assert synth.config_record(SynthConfig(layout_jitter=0.5))["layout_jitter"] == 0.5


# ---- queries ---------------------------------------------------------------------------------------------------------


def test_queries_mention_their_combo(default_plan: synth.SynthPlan) -> None:
    pairs = [(r.query, r.positive.combo) for r in default_plan.train] + [
        (q.text, q.combo) for q in default_plan.queries
    ]
    for text, (company, metric, year) in pairs:
        words = text.split()
        assert company in words and metric.lower() in words and str(year) in words, text


def test_query_vocabulary_is_closed(default_plan: synth.SynthPlan) -> None:
    train_words = {w for r in default_plan.train for w in r.query.split()}
    eval_words = {w for q in default_plan.queries for w in q.text.split()}
    assert eval_words <= train_words


# ---- honesty ---------------------------------------------------------------------------------------------------------


def _below_band(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image)[int(QUERY_TEXT_BAND * size) :]


@pytest.mark.parametrize("size", [64, 96, 128])
@pytest.mark.parametrize("jitter", [0.0, 1.0])
def test_page_outside_text_band_ignores_topic(size: int, jitter: float) -> None:
    # The strongest form of honesty: given the page RNG, nothing outside the title band depends on the topic.
    for seed in range(8):
        a = render_page("Acme", "Revenue", 2015, random.Random(seed), size=size, layout_jitter=jitter)
        b = render_page("Zandor", "Margin", 2024, random.Random(seed), size=size, layout_jitter=jitter)
        assert np.array_equal(_below_band(a, size), _below_band(b, size))
        assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("size", [64, 128])
def test_blank_query_text_only_removes_title_band(size: int) -> None:
    for seed in range(8):
        layout = sample_layout(random.Random(seed), size)
        full = render_page("Wexley", "Margin", 2019, random.Random(seed), size=size)
        blank = render_page("Wexley", "Margin", 2019, random.Random(seed), size=size, blank_query_text=True)
        assert np.array_equal(_below_band(full, size), _below_band(blank, size))
        band = np.asarray(blank)[: int(QUERY_TEXT_BAND * size)]
        assert (band == np.array(layout.background, dtype=np.uint8)).all()  # nothing left of the query text
        assert not np.array_equal(np.asarray(full), np.asarray(blank))


def test_blank_dataset_matches_normal_one(small: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    generate(blank, replace(SMALL, blank_query_text=True), progress=False)
    for part in ("eval/queries", "eval/qrels"):
        assert _tables_equal(small, blank, part)
    normal_corpus, blank_corpus = _load(small, "eval/corpus"), _load(blank, "eval/corpus")
    assert normal_corpus["id"] == blank_corpus["id"]
    assert _load(small, "train")["query"] == _load(blank, "train")["query"]
    for a, b in zip(normal_corpus["image"], blank_corpus["image"]):
        assert np.array_equal(_below_band(a, SMALL.image_size), _below_band(b, SMALL.image_size))
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_layout_not_predictable_from_company(default_plan: synth.SynthPlan) -> None:
    kinds: dict[str, Counter] = {c: Counter() for c in COMPANIES}
    tints: dict[str, list] = {c: [] for c in COMPANIES}
    for row in default_plan.train:
        layout = sample_layout(random.Random(row.positive.seed))
        kinds[row.positive.combo.company][layout.kind] += 1
        tints[row.positive.combo.company].append(layout.background)
    for company in COMPANIES:
        total = sum(kinds[company].values())
        assert 0.3 < kinds[company]["chart"] / total < 0.7, company  # ~135 pages each, so this is > 4 sigma
        assert np.asarray(tints[company]).std(axis=0).min() > 5, company
    # Mean tint per company stays within a few levels of the global mean: no colour cue for the topic.
    means = np.array([np.mean(tints[c], axis=0) for c in COMPANIES])
    assert np.abs(means - means.mean(axis=0)).max() < 6


def _ink_in_band(image: Image.Image, size: int, background: tuple[int, int, int]) -> np.ndarray:
    band = np.asarray(image)[: int(QUERY_TEXT_BAND * size)]
    return (band != np.array(background, dtype=np.uint8)).any(axis=-1)


def test_title_block_has_a_fixed_place_unless_jittered() -> None:
    # The same topic on pages of different seeds: the same pixels are inked in the title band (only colours differ),
    # unless layout_jitter moves the margins.
    def masks(jitter: float) -> list[np.ndarray]:
        out = []
        for seed in range(6):
            layout = sample_layout(random.Random(seed), 128, jitter)
            page = render_page("Kelton", "Margin", 2021, random.Random(seed), layout_jitter=jitter)
            out.append(_ink_in_band(page, 128, layout.background))
        return out

    fixed, jittered = masks(0.0), masks(1.0)
    assert all(np.array_equal(fixed[0], m) for m in fixed[1:])
    assert not all(np.array_equal(jittered[0], m) for m in jittered[1:])


@pytest.mark.parametrize("size", [32, 128])
def test_year_sits_at_the_right_margin_whatever_the_metric(size: int) -> None:
    # The year's pixels do not move with the metric's length, and the metric never reaches them (even on the smallest
    # page, where the longest metric has to shrink): the year's columns of the subtitle are the same for the shortest
    # and the longest metric word, and differ between years.
    layout = sample_layout(random.Random(0), size)
    subtitle = slice(layout.margin_y + synth._scaled(size, 27), int(QUERY_TEXT_BAND * size))
    year_width = synth._font(synth._scaled(size, 14)).getlength("2019")
    right = slice(size - layout.margin_x - int(year_width) - 1, size)

    def year_pixels(metric: str, year: int) -> np.ndarray:
        return np.asarray(render_page("Acme", metric, year, random.Random(0), size=size))[subtitle, right]

    assert np.array_equal(year_pixels("Debt", 2019), year_pixels("Revenue", 2019))
    assert np.array_equal(year_pixels("Debt", 2019), year_pixels("Assets", 2019))
    assert not np.array_equal(year_pixels("Debt", 2019), year_pixels("Debt", 2018))


def test_generate_renders_with_the_configured_jitter(tmp_path: Path) -> None:
    config = replace(TINY, layout_jitter=1.0)
    generate(tmp_path / "jittered", config, progress=False)
    spec = plan(config).train[0].positive
    stored = np.asarray(_load(tmp_path / "jittered", "train")[0]["image"])
    assert np.array_equal(stored, np.asarray(synth.render_spec(spec, size=64, blank_query_text=False,
                                                               layout_jitter=1.0)))
    # This page's margins do move with jitter, so a generate() that dropped the setting would store another image.
    jittered, fixed = (sample_layout(random.Random(spec.seed), 64, jitter) for jitter in (1.0, 0.0))
    assert (jittered.margin_x, jittered.margin_y) != (fixed.margin_x, fixed.margin_y)
    assert not np.array_equal(stored, np.asarray(synth.render_spec(spec, size=64, blank_query_text=False)))


def test_text_contrast_is_high() -> None:
    for seed in range(200):
        layout = sample_layout(random.Random(seed))
        assert min(layout.background) - max(layout.ink) >= 140


# ---- writing ---------------------------------------------------------------------------------------------------------

TINY = SynthConfig(
    seed=2, image_size=64, num_train_pages=4, num_negatives=1, num_eval_queries=2, distractors_per_query=1
)


def test_refuses_non_empty_output_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(out)):
        generate(out, TINY, progress=False)
    assert (out / "keep.txt").exists()

    paths = generate(out, TINY, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and paths.eval_corpus.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no .tmp- or .old- leftovers


def test_empty_existing_dir_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    paths = generate(out, TINY, progress=False)
    assert paths.train == out / "train" and paths.train.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(*args: object, **kwargs: object) -> Image.Image:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return render_page("Acme", "Debt", 2020, random.Random(0), size=64)

    monkeypatch.setattr(synth, "render_spec", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--output", str(out), "--seed", "7", "--image-size", "64", "--num-train-pages", "6", "--num-negatives"]
    argv += ["0", "--num-eval-queries", "3", "--distractors-per-query", "1", "--no-progress"]
    assert main(argv) == 0
    assert "6 train rows" in capsys.readouterr().out
    assert len(datasets.load_from_disk(str(out / "train"))) == 6
    assert len(datasets.load_from_disk(str(out / "eval" / "corpus"))) == 6

    assert main(argv) == 1  # refuses to clobber
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--blank-query-text"]) == 0
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite", "--layout-jitter", "2"])
    assert "between 0 and 1" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--layout-jitter", "1"]) == 0
    assert json.loads((out / "synth.json").read_text())["config"]["layout_jitter"] == 1.0
