"""The whole training path learns: overfitting a few rows raises their retrieval NDCG@10 well above the start."""

from __future__ import annotations

from pathlib import Path

import datasets
import lightning as L
import torch

from vdr.callbacks.retrieval import RetrievalEvaluator
from vdr.data.datamodule import RetrievalDataModule
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule

from .conftest import TINY_PIXELS


def _train_rows_as_eval_set(train: Path, out: Path, rows: int) -> None:
    """An eval set whose queries are the first training queries and whose corpus is their positive pages."""
    table = datasets.load_from_disk(str(train)).select(range(rows))
    datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(rows)], "text": table["query"]}).save_to_disk(
        str(out / "queries"))
    table.select_columns(["image"]).add_column("id", [f"p{i}" for i in range(rows)]).save_to_disk(str(out / "corpus"))
    datasets.Dataset.from_dict({"query_id": [f"q{i}" for i in range(rows)], "corpus_id": [f"p{i}" for i in range(rows)],
                                "score": [1] * rows}).save_to_disk(str(out / "qrels"))


def test_overfitting_a_small_set_raises_ndcg(tiny_synth: Path, tmp_path: Path) -> None:
    rows = 16
    _train_rows_as_eval_set(tiny_synth / "train", tmp_path / "eval", rows)
    train = datasets.load_from_disk(str(tiny_synth / "train")).select(range(rows))
    train.save_to_disk(str(tmp_path / "train"))
    L.seed_everything(0)
    module = BiEncoderModule(
        BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS, image_mean=1.0, initializer_range=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        warmup_ratio=0.0, decay="constant", freeze_token_embeddings=True,
    )
    data = RetrievalDataModule(train=str(tmp_path / "train"), eval=str(tmp_path / "eval"), num_negatives=0,
                               batch_size=16, eval_batch_size=16)
    evaluator = RetrievalEvaluator(k=16)
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator],
                        val_check_interval=150, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.validate(module, datamodule=data, verbose=False)
    before = evaluator.last_metrics["ndcg@10"]
    trainer.fit(module, datamodule=data)
    after = evaluator.last_metrics["ndcg@10"]
    assert after > before + 0.3, (before, after)


def test_hard_negatives_after_step_trains_on_positives_first(tiny_synth: Path) -> None:
    # Before the switch the step's loss is the in-batch loss of the same rows collated without negatives.
    from vdr.data.schema import TrainRows
    from vdr.data.sources import load_table

    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), hard_negatives_after_step=10)
    with_negatives = TrainRows(load_table(str(tiny_synth / "train")), "t", num_negatives=1)
    without = TrainRows(load_table(str(tiny_synth / "train")), "t", num_negatives=0)
    batch = module.collator([with_negatives[i] for i in range(4)])
    plain = module.collator([without[i] for i in range(4)])
    module.log = lambda *args, **kwargs: None  # no trainer attached
    early = module.training_step(batch, 0)
    expected = module.loss(module.model(plain.queries), module.model(plain.documents),
                           document_keys=plain.document_keys)
    assert torch.allclose(early, expected, atol=1e-5)
    module.hard_negatives_after_step = 0
    assert not torch.allclose(module.training_step(batch, 0), expected, atol=1e-3)
