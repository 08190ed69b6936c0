"""`vdr` end to end through the CLI on the tiny preset: fit, validate, the run directory, data tools, failures."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vdr.cli import main
from vdr.data.errors import DataError
from vdr.evaluation.grid import CAPTION, FRAME, GAP, MISSED, RELEVANT

from .conftest import REPO, STACK, data_args, fit_tiny, scalars


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fit_fast_dev_run(tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *STACK, *data_args(tiny_synth), "--trainer.fast_dev_run", "true"]) == 0


def test_fit_bf16_mixed(tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *STACK, *data_args(tiny_synth), "--trainer.fast_dev_run", "true",
                 "--trainer.precision", "bf16-mixed"]) == 0


@pytest.fixture(scope="module")
def fitted_run(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with a validation before training and at the end, in its own checkpoints/ folder."""
    return fit_tiny(tmp_path_factory.mktemp("run"), tiny_synth, "cli", 4, "--trainer.log_every_n_steps", "1",
                    "--validate_before_fit", "true")


def test_fit_writes_config_events_and_checkpoints(fitted_run: Path) -> None:
    config = (fitted_run / "config.yaml").read_text()
    assert "name_or_path: tiny" in config and "max_steps: 4" in config
    logged = scalars(fitted_run)
    # One validation before training (step 0) and one at the end (step 4 - 1: Lightning logs the last step index).
    assert [step for step, _ in logged["val/ndcg@10"]] == [0, 3]
    assert all(0.0 <= value <= 1.0 for _, value in logged["val/ndcg@10"])
    for name in ("val/mrr@10", "val/recall@1", "val/recall@10", "train/loss"):
        assert name in logged, name
    checkpoints = sorted(p.name for p in (fitted_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(n.startswith("step4-ndcg") for n in checkpoints)


def test_fit_logs_the_retrieval_image_to_tensorboard(fitted_run: Path) -> None:
    images = []
    for events in fitted_run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        if "val/retrieval" in accumulator.Tags()["images"]:
            images.extend(accumulator.Images("val/retrieval"))
    # Before training and at the end, at the global step (as the log line and checkpoint names; Lightning's scalars
    # say 3, its index of the last batch).
    assert sorted(image.step for image in images) == [0, 4]
    picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
    cell = 128 + 2 * FRAME
    band = CAPTION + cell + GAP
    assert (picture.height, picture.width) == (GAP + 4 * band, GAP + 6 * (cell + GAP) + GAP)  # 4 queries x 5 + 1
    pixels = np.asarray(picture.convert("RGB"))
    for query in range(4):  # each query's relevant page is framed: green in its top 5, else red beside it
        strip = pixels[GAP + query * band : GAP + (query + 1) * band].reshape(-1, 3)
        assert (strip == RELEVANT).all(axis=1).any() or (strip == MISSED).all(axis=1).any(), query


def test_validate_from_checkpoint_reproduces_the_final_metric(fitted_run: Path, tiny_synth: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fitted_run.parents[2])
    from vdr.callbacks.retrieval import RetrievalEvaluator

    seen: list[dict] = []
    original = RetrievalEvaluator.on_validation_epoch_end

    def spy(self, trainer, pl_module):
        original(self, trainer, pl_module)
        seen.append(dict(self.last_metrics))

    monkeypatch.setattr(RetrievalEvaluator, "on_validation_epoch_end", spy)
    main(["validate", *STACK, *data_args(tiny_synth), "--trainer.logger", "false",
          "--ckpt_path", str(fitted_run / "checkpoints" / "last.ckpt")])
    final = scalars(fitted_run)["val/ndcg@10"][-1][1]
    assert seen and seen[0]["ndcg@10"] == pytest.approx(final, abs=1e-6)


def test_checkpoint_loads_without_the_cli(fitted_run: Path) -> None:
    from vdr.lit.biencoder import BiEncoderModule

    module = BiEncoderModule.load_from_checkpoint(fitted_run / "checkpoints" / "last.ckpt")
    assert module.backbone_config.name_or_path == "tiny"
    state = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(module.state_dict()["model.backbone.visual.patch_embed.proj.weight"],
                       state["model.backbone.visual.patch_embed.proj.weight"])


def test_failed_run_leaves_earlier_runs_untouched(fitted_run: Path, tiny_synth: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken eval set (a qrel naming an unknown page) fails at setup, before any training or writing.
    bad = tmp_path / "bad_eval"
    for part in ("queries", "corpus"):
        datasets.load_from_disk(str(tiny_synth / "eval" / part)).save_to_disk(str(bad / part))
    qrels = datasets.load_from_disk(str(tiny_synth / "eval" / "qrels"))
    qrels.map(lambda row, i: {"corpus_id": "nope" if i == 3 else row["corpus_id"]},
              with_indices=True).save_to_disk(str(bad / "qrels"))
    root = fitted_run.parents[2]
    monkeypatch.chdir(root)
    before = _digest(root / "checkpoints")
    with pytest.raises(DataError, match=r"qrels', row 3, column 'corpus_id'"):
        main(["fit", *STACK, *data_args(tiny_synth), "--data.eval", str(bad), "--trainer.logger.init_args.name",
              "cli", "--trainer.max_steps", "1"])
    after = _digest(root / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before


def test_data_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    code = main(["data", "synth", "--output", str(out), "--seed", "2", "--image-size", "64", "--num-train-pages",
                 "8", "--num-eval-queries", "4", "--distractors-per-query", "1", "--no-progress"])
    assert code == 0
    assert len(datasets.load_from_disk(str(out / "train"))) == 8
    assert len(datasets.load_from_disk(str(out / "eval" / "corpus"))) == 8


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "name_or_path: demo" in printed and "validate_before_fit: true" in printed
