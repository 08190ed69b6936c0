"""Matryoshka embeddings: the loss is the weighted sum of per-prefix InfoNCE losses, the evaluator ranks with each
truncated prefix, and an export with ``truncate_dim`` serves the module's truncated, renormalised embeddings."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from vdr.callbacks.retrieval import RetrievalEvaluator
from vdr.data.datamodule import RetrievalDataModule
from vdr.data.synth import render_page
from vdr.export.embedder import export_embedder
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule
from vdr.losses import InfoNCELoss
from vdr.losses.matryoshka import MatryoshkaLoss

from .conftest import TINY_PIXELS, fit_tiny, scalars

TINY_DIM = 32  # the tiny preset's embedding size


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


def _reference(queries, documents, dims, weights, log_scale, keys, offset):
    """The Matryoshka loss written out: per prefix, renormalise, scaled cosine, mask, cross-entropy; weighted sum."""
    targets = torch.arange(queries.shape[0]) + offset  # [B]
    # A query's own positive page at another column is no negative (same content hash, not the target column).
    mask = keys[targets][:, None] == keys[None, :]  # [B, N]
    mask[torch.arange(queries.shape[0]), targets] = False
    total = 0.0
    for dim, weight in zip(dims, weights):
        q, d = F.normalize(queries[:, :dim], dim=-1), F.normalize(documents[:, :dim], dim=-1)
        logits = (q @ d.T * log_scale.exp()).masked_fill(mask, float("-inf"))  # [B, N]
        total = total + weight * F.cross_entropy(logits, targets)
    return total


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_loss_equals_the_weighted_sum_of_per_dim_losses(weights: list[float] | None) -> None:
    # Rank 1 of 2, 3 queries each, 1 hard negative: 2 * 3 * (1 + 1) = 12 gathered documents, this rank's positives
    # start at column 3. Query 0's positive page reappears at column 10 (mined as someone's negative).
    generator = torch.Generator().manual_seed(0)
    dims, temperature, offset = [16, 8, 3], 0.1, 3
    documents = torch.randn(12, 16, generator=generator)
    documents[10] = documents[offset]
    queries = documents[offset : offset + 3] + torch.randn(3, 16, generator=generator)  # near their positives
    keys = torch.arange(12)
    keys[10] = keys[offset]
    loss_fn = MatryoshkaLoss(dims, weights, temperature=temperature, learnable_temperature=True)
    assert [p.numel() for p in loss_fn.parameters()] == [1]  # one temperature shared by every prefix

    ours_inputs = [t.clone().requires_grad_() for t in (queries, documents)]
    ours = loss_fn(*ours_inputs, document_keys=keys, offset=offset)
    ours.backward()
    ref_inputs = [t.clone().requires_grad_() for t in (queries, documents)]
    log_scale = torch.tensor(math.log(1 / temperature), requires_grad=True)
    expected = _reference(*ref_inputs, dims, weights or [1.0] * len(dims), log_scale, keys, offset)
    expected.backward()

    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)
    for mine, theirs in zip(ours_inputs, ref_inputs):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)
    assert torch.allclose(loss_fn.log_scale.grad, log_scale.grad, atol=1e-5)
    # The masking and the truncation both mattered to the value checked above.
    assert not torch.allclose(ours, loss_fn(queries, documents, offset=offset), atol=1e-3)
    full = InfoNCELoss(temperature)(F.normalize(queries, dim=-1), F.normalize(documents, dim=-1),
                                    document_keys=keys, offset=offset)
    assert not torch.allclose(ours, full * sum(weights or [1.0] * len(dims)), atol=1e-3)


def test_full_size_alone_is_plain_infonce() -> None:
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    documents = F.normalize(torch.randn(8, 8, generator=generator), dim=-1)
    assert torch.allclose(MatryoshkaLoss([8])(queries, documents), InfoNCELoss()(queries, documents), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dims": []}, "dims must list at least one"),
    ({"dims": [64, 0]}, r"dims must be positive, got \[64, 0\]"),
    ({"dims": [64, -8]}, "dims must be positive"),
    ({"dims": [64, 32, 64]}, r"dims must be distinct, got \[64, 32, 64\]"),
    ({"dims": [64, 32], "weights": [1.0]}, "weights must have one entry per dim: 1 weights for 2 dims"),
    ({"dims": [64, 32], "weights": [1.0, -0.5]}, r"weights must be non-negative, got \[1.0, -0.5\]"),
    ({"dims": [64], "temperature": 0.0}, "temperature must be positive"),
])
def test_invalid_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MatryoshkaLoss(**kwargs)


def test_a_dim_above_the_embedding_size_fails_clearly() -> None:
    loss_fn = MatryoshkaLoss([32, 16, 8])
    queries, documents = F.normalize(torch.randn(2, 16), dim=-1), F.normalize(torch.randn(4, 16), dim=-1)
    with pytest.raises(ValueError, match=r"MatryoshkaLoss dims \[32\] exceed the embedding size 16"):
        loss_fn(queries, documents)
    with pytest.raises(ValueError, match=r"MatryoshkaLoss dims \[32, 16\] exceed the embedding size 8"):
        loss_fn.check_dim(8)
    loss_fn.check_dim(32)  # fits


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


class _Recorder(L.Callback):
    """Keeps the embeddings the module produced during validation: ``{loader: [(index, embeddings), ...]}``."""

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen[dataloader_idx].append((batch.index.clone(), outputs.detach().clone()))

    def embeddings(self, loader: int) -> torch.Tensor:
        """``[rows, D]`` in row order."""
        index = torch.cat([i for i, _ in self.seen[loader]])
        values = torch.cat([e for _, e in self.seen[loader]])
        return values[index.argsort()]


def _ndcg_at_10(queries: torch.Tensor, corpus: torch.Tensor, qrels: list[dict[int, int]]) -> float:
    """By hand: full cosine ranking (equal scores: lower row first), linear gains, mean over queries with qrels."""
    order = (queries @ corpus.T).argsort(dim=1, descending=True, stable=True)[:, :10]  # [Q, 10]
    values = []
    for query, relevant in enumerate(qrels):
        if relevant:
            dcg = sum(relevant.get(row, 0) / math.log2(rank + 2) for rank, row in enumerate(order[query].tolist()))
            ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:10]))
            values.append(dcg / ideal)
    return sum(values) / len(values)


def _validate(tiny_synth: Path, loss: InfoNCELoss | None, evaluator: RetrievalEvaluator) -> tuple[dict, _Recorder]:
    L.seed_everything(0)
    # initializer_range 0.1 spreads the random model's embeddings, so rankings have no near-ties.
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS, initializer_range=0.1), loss=loss)
    data = RetrievalDataModule(train=str(tiny_synth / "train"), eval=str(tiny_synth / "eval"), eval_batch_size=8)
    recorder = _Recorder()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[evaluator, recorder])
    trainer.validate(module, datamodule=data, verbose=False)
    recorder.eval_set = data.eval_set
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, recorder


def test_evaluator_logs_ndcg_per_matryoshka_dim(tiny_synth: Path) -> None:
    evaluator = RetrievalEvaluator(k=16)  # dims from the module's loss
    logged, recorder = _validate(tiny_synth, MatryoshkaLoss([TINY_DIM, 16, 4]), evaluator)
    assert {"val/ndcg@10_d32", "val/ndcg@10_d16", "val/ndcg@10_d4"} <= set(logged)
    assert logged["val/ndcg@10_d32"] == logged["val/ndcg@10"]
    queries, corpus, qrels = recorder.embeddings(0), recorder.embeddings(1), recorder.eval_set.qrels
    # The hand computation agrees with the evaluator's main route at the full size ...
    assert _ndcg_at_10(queries, corpus, qrels) == pytest.approx(logged["val/ndcg@10"], abs=1e-6)
    for dim in (16, 4):
        # ... and at each prefix, truncated and renormalised.
        q, c = F.normalize(queries[:, :dim], dim=-1), F.normalize(corpus[:, :dim], dim=-1)
        expected = _ndcg_at_10(q, c, qrels)
        assert logged[f"val/ndcg@10_d{dim}"] == pytest.approx(expected, abs=1e-6), dim
        assert evaluator.last_metrics[f"ndcg@10_d{dim}"] == pytest.approx(expected, abs=1e-6)
    # Truncation changed the result (so the comparisons above could fail).
    assert logged["val/ndcg@10_d4"] != pytest.approx(logged["val/ndcg@10"], abs=1e-4)


def test_evaluator_dims_override_the_loss_and_plain_infonce_logs_none(tiny_synth: Path) -> None:
    logged, _ = _validate(tiny_synth, None, RetrievalEvaluator(k=16))
    assert "val/ndcg@10" in logged and not [name for name in logged if "_d" in name]
    logged, _ = _validate(tiny_synth, MatryoshkaLoss([TINY_DIM, 16]), RetrievalEvaluator(k=16, dims=[8]))
    assert [name for name in logged if "_d" in name] == ["val/ndcg@10_d8"]
    with pytest.raises(ValueError, match=r"RetrievalEvaluator dims \[64\] exceed the embedding size 32"):
        _validate(tiny_synth, None, RetrievalEvaluator(k=16, dims=[64, 8]))


def test_matryoshka_loss_from_the_cli(tiny_synth: Path, tmp_path: Path) -> None:
    """``model.loss`` as a class_path type-checks against the module's ``InfoNCELoss`` argument and trains."""
    loss = {"class_path": "vdr.losses.matryoshka.MatryoshkaLoss", "init_args": {"dims": [TINY_DIM, 8]}}
    run = fit_tiny(tmp_path, tiny_synth, "mrl", 2, "--model.loss", json.dumps(loss), "--trainer.log_every_n_steps", "1")
    assert "class_path: vdr.losses.matryoshka.MatryoshkaLoss" in (run / "config.yaml").read_text()
    logged = scalars(run)
    assert logged["val/ndcg@10_d32"] == logged["val/ndcg@10"]
    assert "val/ndcg@10_d8" in logged and "train/loss" in logged


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def test_export_truncate_dim_serves_the_truncated_renormalised_embeddings(tmp_path: Path) -> None:
    texts = ["what was Acme revenue in 2019", "Borvex debt 2021"]
    pages = [render_page("Acme", "Revenue", 2015 + i, random.Random(i), size=64) for i in range(2)]
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS, initializer_range=0.1)).eval()
    with torch.no_grad():
        queries = module.model(module.collator.encode_texts(texts, module.prompts.query))  # [2, 32]
        documents = module.model(module.collator.encode_pages(pages, module.prompts.document))  # [2, 32]
    out = export_embedder(module, tmp_path / "model", truncate_dim=8)
    assert json.loads((out / "config_sentence_transformers.json").read_text())["truncate_dim"] == 8
    model = SentenceTransformer(str(out), device="cpu")
    served_queries = model.encode_query(texts, convert_to_tensor=True, normalize_embeddings=True)
    served_documents = model.encode_document(pages, convert_to_tensor=True, normalize_embeddings=True)
    assert served_queries.shape == served_documents.shape == (2, 8)
    assert torch.allclose(served_queries.cpu(), F.normalize(queries[:, :8], dim=-1), atol=1e-5)
    assert torch.allclose(served_documents.cpu(), F.normalize(documents[:, :8], dim=-1), atol=1e-5)
    # Cosine similarity (the export's similarity function) is that of the truncated, renormalised vectors.
    expected = F.normalize(queries[:, :8], dim=-1) @ F.normalize(documents[:, :8], dim=-1).T
    served = model.similarity(model.encode_query(texts, convert_to_tensor=True),
                              model.encode_document(pages, convert_to_tensor=True))
    assert torch.allclose(served.cpu(), expected, atol=1e-5)


def test_the_module_refuses_a_prefix_longer_than_its_embedding_before_training() -> None:
    from vdr.lit.biencoder import BackboneConfig, BiEncoderModule

    with pytest.raises(ValueError, match=r"dims \[64\] exceed the embedding size 32"):
        BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), loss=MatryoshkaLoss([64, 16]))


def test_gradcache_with_matryoshka_gives_the_plain_gradients(tiny_synth) -> None:
    from .test_gradcache import assert_same_gradients, one_step

    def loss() -> MatryoshkaLoss:
        return MatryoshkaLoss([32, 8, 4], weights=[1.0, 0.5, 2.0], learnable_temperature=True)

    reference = one_step(tiny_synth / "train", loss=loss())
    assert_same_gradients(one_step(tiny_synth / "train", loss=loss(), mini_batch_size=5), reference)
