"""What a researcher looks at: `vdr evaluate --report` (HTML, checked in real headless Chromium) and the retrieval
image the training callback logs to TensorBoard.

The browser tests need Chromium (`.ci/run` installs Debian's); without it they skip, unless VDR_REQUIRE_BROWSER=1
(set by CI), where a missing browser fails them.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdr.cli import main
from vdr.data.errors import DataError
from vdr.data.schema import load_eval_set
from vdr.data.sources import load_table
from vdr.evaluation.grid import MISSED, OTHER, RELEVANT, fixed_queries, retrieval_grid
from vdr.evaluation.metrics import per_query_ndcg, retrieval_metrics
from vdr.evaluation.records import DEPTH, StageRecord

from .conftest import needs_browser, report_browser, report_data


@pytest.fixture(scope="module")
def eval_set(tiny_synth: Path):
    return load_eval_set(str(tiny_synth / "eval"), loader=load_table)


@pytest.fixture(scope="module")
def models(_tiny_backbone, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random tiny Qwen3-VL directories (Hugging Face layout) that rank the eval set differently."""
    root = tmp_path_factory.mktemp("report-models")
    paths = []
    for seed in (0, 1):
        model = copy.deepcopy(_tiny_backbone.model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        path = root / f"model-{seed}"
        model.save_pretrained(path)
        _tiny_backbone.processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def evaluated(models: tuple[Path, Path], tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vdr evaluate` of model B (run.json), then of model A with a report that compares it with that run."""
    root = tmp_path_factory.mktemp("report")
    data = str(tiny_synth / "eval")
    assert main(["evaluate", "--model", str(models[1]), "--data", data, "--output", str(root / "b.json"),
                 "--device", "cpu"]) == 0
    assert main(["evaluate", "--model", str(models[0]), "--data", data, "--output", str(root / "a.json"),
                 "--report", str(root / "report.html"), "--compare", str(root / "b.json"), "--device", "cpu"]) == 0
    return root


def _record(eval_set, seed: int, k: int = 20) -> StageRecord:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(eval_set.query_ids), len(eval_set.corpus_ids), generator=generator)
    top, rows = scores.topk(k)
    metrics = retrieval_metrics(rows, eval_set.qrels)
    return StageRecord.from_ranking(f"random-{seed}", f"random-{seed}", metrics, rows, top, eval_set.qrels)


# ---------------------------------------------------------------------------------------------------------------
# Per-query records: what --output keeps and --compare reads back
# ---------------------------------------------------------------------------------------------------------------


def test_record_round_trips_through_json(eval_set, tmp_path: Path) -> None:
    record = _record(eval_set, 0)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record.to_json(eval_set)))
    back = StageRecord.from_json(json.loads(path.read_text()), eval_set, label="x", model="x", metrics={}, kept=20,
                                 source=path)
    assert torch.equal(back.top, record.top)
    torch.testing.assert_close(back.scores, record.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.ndcg, record.ndcg, equal_nan=True)
    assert back.ranks == record.ranks
    # Each query's rank of a relevant page is where the full ranking put it.
    full = _record(eval_set, 0, k=len(eval_set.corpus_ids))
    for query, ranks in enumerate(full.ranks):
        assert all(rank is not None for rank in ranks.values())  # the whole corpus was kept
        for row, rank in record.ranks[query].items():
            assert rank == (ranks[row] if ranks[row] <= 20 else None)


def test_record_of_another_eval_set_is_refused_with_the_file_and_id(eval_set, tmp_path: Path) -> None:
    saved = _record(eval_set, 0).to_json(eval_set)
    first = eval_set.query_ids[0]
    path = tmp_path / "other.json"
    with pytest.raises(DataError, match=rf"other.json.*no result for eval query '{first}'"):
        StageRecord.from_json({q: v for q, v in saved.items() if q != first}, eval_set, label="x", model="x",
                              metrics={}, kept=20, source=path)
    saved[first]["top"][0][0] = "page-from-elsewhere"
    with pytest.raises(DataError, match=rf"query '{first}' ranks page 'page-from-elsewhere'"):
        StageRecord.from_json(saved, eval_set, label="x", model="x", metrics={}, kept=20, source=path)
    saved[first] = {"top": "not a list of pairs"}
    with pytest.raises(DataError, match=rf"query '{first}': expected"):
        StageRecord.from_json(saved, eval_set, label="x", model="x", metrics={}, kept=20, source=path)


def test_evaluate_output_keeps_each_querys_top_pages(evaluated: Path, eval_set) -> None:
    run = json.loads((evaluated / "a.json").read_text())
    assert set(run["queries"]) == set(eval_set.query_ids) and run["kept"] == min(100, len(eval_set.corpus_ids))
    per_query = [run["queries"][q]["ndcg@10"] for q in eval_set.query_ids]
    assert sum(per_query) / len(per_query) == pytest.approx(run["ndcg@10"], abs=1e-5)  # every query has a positive
    for query, query_id in enumerate(eval_set.query_ids):
        entry = run["queries"][query_id]
        assert len(entry["top"]) == DEPTH
        assert [score for _, score in entry["top"]] == sorted((score for _, score in entry["top"]), reverse=True)
        assert set(entry["ranks"]) == {eval_set.corpus_ids[row] for row in eval_set.qrels[query]}


def test_bad_compare_fails_before_any_model_work(evaluated: Path, tiny_synth: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tiny_synth / "eval")
    # --compare without --report has nothing to show.
    assert main(["evaluate", "--model", "no-such-model", "--data", data, "--compare", str(evaluated / "b.json")]) == 2
    assert "--report" in capsys.readouterr().err
    # A run of other queries: named, before the (missing) model is even looked for.
    other = json.loads((evaluated / "b.json").read_text())
    other["queries"].pop(next(iter(other["queries"])))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["evaluate", "--model", "no-such-model", "--data", data, "--report", str(tmp_path / "r.html"),
                 "--compare", str(tmp_path / "other.json")]) == 2
    error = capsys.readouterr().err
    assert "other.json" in error and "no result for eval query" in error
    # Metrics only (an older --output): a clear message, not a KeyError.
    (tmp_path / "old.json").write_text(json.dumps({"ndcg@10": 0.5}))
    assert main(["evaluate", "--model", "no-such-model", "--data", data, "--report", str(tmp_path / "r.html"),
                 "--compare", str(tmp_path / "old.json")]) == 2
    assert "no per-query results" in capsys.readouterr().err
    # A run over more queries, over another corpus, or with a metric that is not a number.
    for change, message in ((lambda run: run["queries"].update(extra=run["queries"]["q0000"]), "not in"),
                            (lambda run: run.update(num_documents=999), "over 999 pages"),
                            (lambda run: run.update({"ndcg@10": "high"}), "ndcg@10 must be a number")):
        bad = json.loads((evaluated / "b.json").read_text())
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert main(["evaluate", "--model", "no-such-model", "--data", data, "--report", str(tmp_path / "r.html"),
                     "--compare", str(tmp_path / "bad.json")]) == 2
        error = capsys.readouterr().err
        assert "bad.json" in error and message in error, error
    # A run file that is not there is named as such (not looked up as a model), as is a local model path.
    for missing in ("runs/typo.json", "./no/such/model"):
        assert main(["evaluate", "--model", "no-such-model", "--data", data, "--report", str(tmp_path / "r.html"),
                     "--compare", missing]) == 2
        assert f"--compare {missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# The report's content
# ---------------------------------------------------------------------------------------------------------------


def test_report_holds_both_runs_and_each_page_once(evaluated: Path, eval_set) -> None:
    data = report_data(evaluated / "report.html")
    assert [stage["label"].split("/")[-1] for stage in data["stages"]] == ["model-0", "model-1"]
    assert data["compare"] == [0, 1] and len(data["queries"]) == len(eval_set.query_ids)
    a, b = (json.loads((evaluated / name).read_text()) for name in ("a.json", "b.json"))
    for stage, run in zip(data["stages"], (a, b)):
        assert stage["metrics"]["ndcg@10"] == pytest.approx(run["ndcg@10"], abs=1e-6)
    for query, shown in zip(eval_set.query_ids, data["queries"]):
        for stage, run in zip(shown["stages"], (a, b)):
            assert [eval_set.corpus_ids[row] for row, _ in stage["top"]] == [p for p, _ in run["queries"][query]["top"]]
            assert stage["ndcg"] == pytest.approx(run["queries"][query]["ndcg@10"], abs=1e-6)
    # Every page drawn has exactly one thumbnail, however many queries show it.
    text = (evaluated / "report.html").read_text()
    thumbs = json.loads(re.search(r'id="report-thumbs">(.*?)</script>', text, re.S).group(1))
    assert set(thumbs) == set(data["pageIds"])
    assert len(thumbs) < sum(len(stage["top"]) for q in data["queries"] for stage in q["stages"])
    first = Image.open(io.BytesIO(base64.b64decode(next(iter(thumbs.values())))))
    assert first.format == "JPEG" and max(first.size) <= 160
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)


def test_a_run_compared_with_itself_ties_on_every_query(evaluated: Path, models: tuple[Path, Path], tiny_synth: Path,
                                                       tmp_path: Path) -> None:
    assert main(["evaluate", "--model", str(models[0]), "--data", str(tiny_synth / "eval"), "--report",
                 str(tmp_path / "self.html"), "--compare", str(evaluated / "a.json"), "--device", "cpu"]) == 0
    data = report_data(tmp_path / "self.html")
    first, second = (stage["label"] for stage in data["stages"])
    assert second == f"{first} (compared)"  # told apart
    assert all(q["stages"][0] == q["stages"][1] for q in data["queries"])


def test_compare_with_a_second_model_evaluates_it_here(evaluated: Path, models: tuple[Path, Path], tiny_synth: Path,
                                                      tmp_path: Path) -> None:
    """--compare MODEL gives the same report as --compare its saved run."""
    assert main(["evaluate", "--model", str(models[0]), "--data", str(tiny_synth / "eval"), "--report",
                 str(tmp_path / "models.html"), "--compare", str(models[1]), "--device", "cpu"]) == 0
    by_model, by_file = report_data(tmp_path / "models.html"), report_data(evaluated / "report.html")
    assert [s["label"] for s in by_model["stages"]] == [s["label"] for s in by_file["stages"]]
    for from_model, from_file in zip(by_model["queries"], by_file["queries"]):
        assert [[row for row, _ in s["top"]] for s in from_model["stages"]] == \
            [[row for row, _ in s["top"]] for s in from_file["stages"]]


def test_query_text_cannot_break_out_of_the_page(eval_set, tmp_path: Path) -> None:
    from vdr.evaluation.report import write_report

    hostile = copy.copy(eval_set)
    hostile.query_texts = ["</script><script>window.pwned = 1</script>", "what does __THUMBS__ mean",
                           *eval_set.query_texts[2:]]
    write_report(tmp_path / "r.html", hostile, [_record(eval_set, 0)], title="<b>t</b> __DATA__",
                 details={"model": "__TITLE__"}, progress=False)
    text = (tmp_path / "r.html").read_text()
    assert "</script><script>window.pwned" not in text and "<title>&lt;b&gt;t&lt;/b&gt; __DATA__</title>" in text
    data = report_data(tmp_path / "r.html")  # still valid JSON: placeholders inside texts are left alone
    assert [q["text"] for q in data["queries"][:2]] == hostile.query_texts[:2]
    assert data["details"] == [["model", "__TITLE__"]]


# ---------------------------------------------------------------------------------------------------------------
# The report in a real browser
# ---------------------------------------------------------------------------------------------------------------


def _worst_first(values: list[float], ranks: list[dict] | None = None) -> list[int]:
    """Query rows by value ascending, NaN last (the page's sort); ties: with ``ranks`` (per query, relevant page ->
    rank or None), the lowest-placed best relevant page first; then eval order."""
    def first_rank(q: int) -> float:
        placed = [rank for rank in (ranks[q].values() if ranks else []) if rank is not None]
        return min(placed, default=math.inf) if ranks else 0

    return sorted(range(len(values)), key=lambda q: (math.isnan(values[q]), 0 if math.isnan(values[q]) else values[q],
                                                     -first_rank(q), q))


def test_report_in_chromium_worst_query_first_thumbnails_loaded(evaluated: Path, eval_set, tmp_path: Path) -> None:
    needs_browser()
    data = report_data(evaluated / "report.html")
    ours = [math.nan if q["stages"][0]["ndcg"] is None else q["stages"][0]["ndcg"] for q in data["queries"]]
    theirs = [math.nan if q["stages"][1]["ndcg"] is None else q["stages"][1]["ndcg"] for q in data["queries"]]
    with report_browser.open_report(evaluated / "report.html") as opened:
        page = opened.page
        cards = lambda: page.eval_on_selector_all("section.query", "cards => cards.map(c => c.dataset.id)")  # noqa: E731
        # Worst query first, in the order NDCG@10 sorts them.
        ranks = [q["stages"][0]["ranks"] for q in data["queries"]]
        assert cards() == [eval_set.query_ids[q] for q in _worst_first(ours, ranks)]
        # Every thumbnail on the page decoded: 2 runs x 10 pages per query, plus relevant pages that missed them.
        total, loaded = opened.thumbnails()
        missed = sum(1 for q in data["queries"] for s in q["stages"] for row in q["relevant"]
                     if int(row) not in {r for r, _ in s["top"]})
        assert loaded == total == len(eval_set.query_ids) * 2 * DEPTH + missed
        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot))
        pixels = np.asarray(Image.open(screenshot).convert("RGB"))
        assert pixels.shape[:2] == (1000, 1400) and pixels.std() > 20  # drawn, not blank
        # Filter: relevant page not in the top 10.
        opened.rerendered(lambda: page.select_option("#filter", "missed-0"))
        expected = [eval_set.query_ids[q] for q in _worst_first(ours, ranks)
                    if not set(eval_set.qrels[q]) & {row for row, _ in data["queries"][q]["stages"][0]["top"]}]
        assert cards() == expected
        # Sort by the change against the compared run, losses first; the header counts wins and losses.
        opened.rerendered(lambda: page.select_option("#filter", "all"))
        opened.rerendered(lambda: page.select_option("#sort", "delta-asc"))
        assert cards() == [eval_set.query_ids[q] for q in _worst_first([a - b for a, b in zip(ours, theirs)])]
        wins = sum(a - b > 1e-9 for a, b in zip(ours, theirs))
        losses = sum(a - b < -1e-9 for a, b in zip(ours, theirs))
        assert f"{wins} wins, {losses} losses" in page.inner_text("#versus")
        # Search narrows to matching query texts.
        word = eval_set.query_texts[0].split()[-1]
        opened.rerendered(lambda: page.fill("#search", word))
        assert set(cards()) == {eval_set.query_ids[q] for q, t in enumerate(eval_set.query_texts)
                                if word.lower() in t.lower()}
        assert opened.problems == []  # no page error, no network request


def test_large_report_paginates(eval_set, tmp_path: Path) -> None:
    """300 queries (the eval set repeated): one page of 20 cards is drawn; next shows the following 20."""
    needs_browser()
    from vdr.evaluation.report import write_report

    large = copy.copy(eval_set)
    repeat = 25
    large.query_ids = [f"{q}-{i}" for i in range(repeat) for q in eval_set.query_ids]
    large.query_texts = eval_set.query_texts * repeat
    large.qrels = eval_set.qrels * repeat
    record = _record(large, 3)
    write_report(tmp_path / "large.html", large, [record], title="large", details={}, progress=False)
    order = _worst_first(record.ndcg.tolist(), record.ranks)
    with report_browser.open_report(tmp_path / "large.html") as opened:
        page = opened.page
        ids = lambda: page.eval_on_selector_all("section.query", "cards => cards.map(c => c.dataset.id)")  # noqa: E731
        assert ids() == [large.query_ids[q] for q in order[:20]]
        assert "queries 1-20 of 300" in page.inner_text("#status")
        opened.rerendered(lambda: page.click("#pages-top button:has-text('next')"))
        assert ids() == [large.query_ids[q] for q in order[20:40]]
        total, loaded = opened.thumbnails()
        assert loaded == total > 0


# ---------------------------------------------------------------------------------------------------------------
# The TensorBoard image
# ---------------------------------------------------------------------------------------------------------------


def test_fixed_queries_spread_over_the_eval_set() -> None:
    assert fixed_queries(300, 4) == [0, 100, 199, 299]
    assert fixed_queries(3, 4) == [0, 1, 2] and fixed_queries(10, 1) == [0] and fixed_queries(10, 0) == []


def test_grid_frames_relevant_pages_green_and_a_missed_one_red(eval_set) -> None:
    size, frame, gap, caption = 32, 4, 12, 18
    q0_relevant, = eval_set.qrels[0]
    q1_relevant, = eval_set.qrels[1]
    others = [row for row in range(len(eval_set.corpus_ids)) if row not in (q0_relevant, q1_relevant)]
    ranked = torch.tensor([[others[0], q0_relevant, *others[1:9]],  # query 0: relevant page at rank 2
                           others[:10]])  # query 1: its relevant page not retrieved
    small = copy.copy(eval_set)
    small.qrels, small.query_ids = eval_set.qrels[:2], eval_set.query_ids[:2]
    small.query_texts = eval_set.query_texts[:2]
    grid = retrieval_grid(small, ranked, [0, 1], depth=3, size=size)
    cell, band = size + 2 * frame, caption + size + 2 * frame + gap
    assert grid.shape == (gap + 2 * band, gap + 4 * (cell + gap) + gap, 3) and grid.dtype == np.uint8

    def frame_colour(query: int, column: int, extra: int = 0) -> tuple[int, ...]:
        top, left = gap + query * band + caption, gap + column * (cell + gap) + extra
        return tuple(grid[top + 1, left + 1])  # inside the frame's top-left corner

    assert [frame_colour(0, c) for c in range(3)] == [OTHER, RELEVANT, OTHER]
    assert [frame_colour(1, c) for c in range(3)] == [OTHER] * 3
    assert frame_colour(1, 3, extra=gap) == MISSED  # query 1's relevant page, after the gap
    assert frame_colour(0, 3, extra=gap) != MISSED  # query 0's was in its top 3: no extra page
    assert per_query_ndcg(ranked, small.qrels)[1] == 0

