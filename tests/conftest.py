"""Shared fixtures: a tiny Qwen3-VL built from a config (offline) and a tiny synthetic VDR dataset."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vdr.data.synth import SynthConfig, generate  # noqa: E402
from vdr.models.backbone import Backbone, load_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_PIXELS = 64 * 64  # 4 visual tokens per page: the tiny model reads them in milliseconds
# The tiny config stack the CLI tests run (`vdr fit` with these files, then per-test flags).
STACK = ["--config", str(REPO / "configs/trainer/default.yaml"), "--config", str(REPO / "configs/trainer/cpu.yaml"),
         "--config", str(REPO / "configs/callbacks/default.yaml"), "--config", str(REPO / "configs/model/tiny.yaml")]
# The tiny reranker's stack (its model and data classes, the rerank callback).
RERANK_STACK = [part for name in ("trainer/default", "trainer/cpu", "callbacks/rerank", "model/reranker-tiny")
                for part in ("--config", str(REPO / f"configs/{name}.yaml"))]


def data_args(synth: Path) -> list[str]:
    """CLI flags that train on a synthetic dataset with small batches and quiet logs."""
    return ["--data.train", str(synth / "train"), "--data.eval", str(synth / "eval"), "--data.batch_size", "8",
            "--data.eval_batch_size", "16", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run directory: ``{tag: [(step, value), ...]}`` in step order.

    A run with ``validate_before_fit`` writes two event files whose names end in a per-process counter that is not
    zero-padded (``.9`` sorts after ``.10``), so values are ordered by step, not by file name.
    """
    values: dict[str, list[tuple[int, float]]] = {}
    for events in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points, key=lambda point: point[0]) for tag, points in values.items()}


_browser_spec = importlib.util.spec_from_file_location("report_browser", REPO / "scripts" / "report_browser.py")
report_browser = importlib.util.module_from_spec(_browser_spec)
sys.modules["report_browser"] = report_browser  # dataclasses look their module up there
_browser_spec.loader.exec_module(report_browser)


def needs_browser() -> None:
    """Skip without Chromium or playwright, except under CI (VDR_REQUIRE_BROWSER=1), where that is a failure."""
    missing = report_browser.chromium_path() is None or importlib.util.find_spec("playwright") is None
    if missing and os.environ.get("VDR_REQUIRE_BROWSER") == "1":
        pytest.fail("VDR_REQUIRE_BROWSER=1 but Chromium or playwright is missing (apt-get install chromium)")
    if missing:
        pytest.skip("needs Chromium and playwright (apt-get install chromium; pip install -e .[dev])")


def report_data(path: Path) -> dict:
    """The JSON a ``vdr evaluate --report`` page draws from."""
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', path.read_text(), re.S)
    return json.loads(match.group(1))


def fit_tiny(root: Path, synth: Path, name: str, steps: int, *flags: str) -> Path:
    """``vdr fit`` on the tiny stack inside ``root`` for ``steps`` steps, validating at the end; the run directory."""
    from vdr.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", *STACK, *data_args(synth), "--trainer.logger.init_args.name", name,
              "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
              "--trainer.check_val_every_n_epoch", "null", *flags])
    return root / "checkpoints" / name / "version_0"


def embed_eval_set(encoder, eval_set, batch_size: int = 64) -> torch.Tensor:
    """``[Q, N]`` cosine scores of every eval query against every corpus page (small eval sets only)."""
    queries = torch.cat([encoder.queries(eval_set.query_texts[i : i + batch_size])
                         for i in range(0, len(eval_set.query_texts), batch_size)])
    rows = eval_set.corpus_rows()
    pages = torch.cat([encoder.pages([rows[j].image for j in range(i, min(i + batch_size, len(rows)))])
                       for i in range(0, len(rows), batch_size)])
    return queries @ pages.T


def assert_same_ranking(scores: torch.Tensor, other: torch.Tensor, k: int = 10, tol: float = 1e-5) -> None:
    """Two routes score alike (within ``tol``) and rank the same top ``k``, except inside ties closer than ``tol``."""
    assert scores.shape == other.shape
    assert (scores - other).abs().max() < tol, (scores - other).abs().max()
    top, top_other = scores.topk(k + 1).indices, other.topk(k + 1).indices
    gaps = scores.gather(1, top).diff(dim=1).abs()  # [Q, k]: between ranks r and r + 1
    for query in range(scores.shape[0]):
        for rank in range(k):
            near_tie = gaps[query, rank] < 2 * tol or (rank > 0 and gaps[query, rank - 1] < 2 * tol)
            if not near_tie:
                assert top[query, rank] == top_other[query, rank], (query, rank)


TINY_SYNTH = SynthConfig(seed=1, image_size=64, num_train_pages=48, num_negatives=1, num_eval_queries=12,
                         distractors_per_query=2)


@pytest.fixture(scope="session")
def _tiny_backbone() -> Backbone:
    torch.set_num_threads(2)
    return load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)


@pytest.fixture
def tiny_backbone(_tiny_backbone: Backbone) -> Backbone:
    """A fresh copy per test (tests may train it); the processor is shared, it holds no state."""
    return Backbone(copy.deepcopy(_tiny_backbone.model), _tiny_backbone.processor, _tiny_backbone.source)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset: 48 training rows with one hard negative, 12 eval queries over 36 pages."""
    out = tmp_path_factory.mktemp("data") / "synth"
    generate(out, TINY_SYNTH, progress=False)
    return out
