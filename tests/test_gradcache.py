"""Same maths, less memory: GradCache and gradient checkpointing give the plain step's loss and gradients.

Each equivalence runs one real Lightning optimizer step of the tiny bi-encoder on synthetic rows with a hard negative
(two of which are other rows' positives: false negatives masked in the loss) and a learnable temperature, and compares
every parameter's gradient at the optimizer step. The distributed versions (2 ranks with GradCache vs 1 plain
process, DDP and FSDP2) are in test_distributed.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pytest
import torch
from datasets import Dataset, Image, load_from_disk

from vdr.data.datamodule import RetrievalDataModule
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule
from vdr.lit.gradcache import CachedEmbeddings, RandomState
from vdr.losses.contrastive import InfoNCELoss

from .conftest import TINY_PIXELS
from .distributed_probe import record_group_sizes


class Gradients(L.Callback):
    """Keeps the loss of each batch and every gradient at the first optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def rows8(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training rows with one hard negative; rows 7 and 2 have another row's positive as their negative."""
    table = load_from_disk(str(tiny_synth / "train")).select(range(8))
    table = table.cast_column("image", Image(decode=False)).cast_column("negative_0", Image(decode=False))
    rows = table.to_dict()
    rows["negative_0"][7], rows["negative_0"][2] = rows["image"][0], rows["image"][5]
    out = tmp_path_factory.mktemp("rows8") / "train"
    Dataset.from_dict(rows, features=table.features).cast_column("image", Image()).cast_column(
        "negative_0", Image()).save_to_disk(str(out))
    return out


def one_step(rows: Path, batch_size: int = 8, accumulate: int = 1, loss: InfoNCELoss | None = None,
             callbacks: tuple[L.Callback, ...] = (), **module_args) -> Gradients:
    """One optimizer step over ``accumulate`` batches; the recorded losses and gradients."""
    L.seed_everything(0)
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS),
                             loss=loss or InfoNCELoss(learnable_temperature=True), **module_args)
    probe = Gradients()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, *callbacks],
                        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RetrievalDataModule(train=str(rows), batch_size=batch_size))
    return probe


def assert_same_gradients(ours: Gradients, reference: Gradients) -> None:
    assert ours.losses == pytest.approx(reference.losses, rel=2e-6)  # float32 sums in another order
    assert ours.grads.keys() == reference.grads.keys() and "loss.log_scale" in ours.grads
    for name, grad in reference.grads.items():
        # Float32 sums in another order: within 5e-5 of the tensor's largest entry (a wrong gradient is off by O(1)).
        # The temperature's gradient is one sum over every logit, a small difference of large terms: 1e-3 of it.
        rtol = 1e-3 if grad.dim() == 0 else 1e-4
        torch.testing.assert_close(ours.grads[name], grad, atol=5e-5 * float(grad.abs().max()), rtol=rtol, msg=name)


@pytest.fixture(scope="module")
def plain(rows8: Path) -> Gradients:
    return one_step(rows8)


@pytest.mark.parametrize("mini_batch_size", [1, 3])
def test_gradcache_gives_the_plain_loss_and_gradients(rows8: Path, plain: Gradients, mini_batch_size: int) -> None:
    # 8 queries and 16 pages in mini-batches of 1 or 3 (the last one shorter), one replay at a time.
    assert_same_gradients(one_step(rows8, mini_batch_size=mini_batch_size), plain)


def test_gradcache_under_gradient_accumulation_gives_the_plain_accumulated_gradients(rows8: Path) -> None:
    reference = one_step(rows8, batch_size=4, accumulate=2)
    assert len(reference.losses) == 2
    assert_same_gradients(one_step(rows8, batch_size=4, accumulate=2, mini_batch_size=3), reference)


def test_gradient_checkpointing_changes_no_gradient_and_recomputes_each_layer(rows8: Path, plain: Gradients) -> None:
    calls = {"text": 0, "vision": 0}

    class CountLayerCalls(L.Callback):
        def setup(self, trainer, pl_module, stage):
            trunk = pl_module.trunk
            # A module inside the checkpointed layer starts again when the layer is recomputed (a pre-hook: the
            # recompute stops early, once it has what the backward needs).
            for tower, layer in (("text", trunk.language_model.layers[0]), ("vision", trunk.visual.blocks[0])):
                layer.mlp.register_forward_pre_hook(lambda *_, tower=tower: calls.__setitem__(tower, calls[tower] + 1))

    L.seed_everything(0)
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS),
                             loss=InfoNCELoss(learnable_temperature=True), gradient_checkpointing_text=True,
                             gradient_checkpointing_vision=True)
    probe = Gradients()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, CountLayerCalls()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RetrievalDataModule(train=str(rows8), batch_size=8))
    assert_same_gradients(probe, plain)
    # One call per forward (text: queries and pages; vision: pages), and once more in the backward when checkpointed.
    assert calls == {"text": 4, "vision": 2}


def test_tiled_checkpoints_under_gradcache_give_the_plain_gradients(rows8: Path, plain: Gradients) -> None:
    # Mini-batches of 3 sequences, each vision block checkpointed over tiles of 2 pages and 1, each decoder layer over
    # tiles of 2 rows and 1 (vdr.models.checkpoint_tiles).
    groups = {"rows": set(), "images": set()}  # per call of the first layer and block, with gradients on

    class GroupSizes(L.Callback):
        def setup(self, trainer, pl_module, stage):
            record_group_sizes(pl_module.trunk, groups["rows"], groups["images"])

    ours = one_step(rows8, mini_batch_size=3, gradient_checkpointing_text=True, gradient_checkpointing_vision=True,
                    vision_checkpoint_images=2, text_checkpoint_rows=2, callbacks=(GroupSizes(),))
    assert_same_gradients(ours, plain)
    assert groups == {"rows": {1, 2}, "images": {1, 2}}  # mini-batches of 3 (and 1 or 2) went in as tiles


@pytest.mark.parametrize("mini_batch_size", [None, 3], ids=["plain", "gradcache"])
def test_sparse_embedding_gradients_give_the_plain_gradients(rows8: Path, plain: Gradients,
                                                            mini_batch_size: int | None) -> None:
    """``sparse_embedding_grad``: each backward hands the token table a sparse gradient (plain: one, the queries' and
    pages' lookups summed; GradCache: one per replay, 3 + 6), and the optimizer sees the plain dense gradient."""
    layouts = []

    class IncomingLayouts(L.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.trunk.get_input_embeddings().weight.register_hook(lambda grad: layouts.append(grad.layout))

    L.seed_everything(0)
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS),
                             loss=InfoNCELoss(learnable_temperature=True), mini_batch_size=mini_batch_size,
                             sparse_embedding_grad=True)
    probe = Gradients()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, IncomingLayouts()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RetrievalDataModule(train=str(rows8), batch_size=8))
    assert layouts == [torch.sparse_coo] * (1 if mini_batch_size is None else 9)
    assert probe.grads["model.backbone.language_model.embed_tokens.weight"].layout == torch.strided
    assert_same_gradients(probe, plain)


def test_replays_draw_the_same_dropout_masks_as_the_cached_pass(tiny_backbone, processor_batch) -> None:
    """With dropout on, GradCache's gradients equal those of embedding the same mini-batches with gradients in the same
    order; replaying without restoring the random state gives other masks and other gradients."""
    from vdr.models.biencoder import BiEncoder

    model = BiEncoder(tiny_backbone.model).train()
    for layer in model.trunk.language_model.layers:
        layer.self_attn.attention_dropout = 0.3
    inputs = processor_batch
    loss_fn = InfoNCELoss()

    def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
        return loss_fn(embeddings[:3], embeddings[3:])  # the first 3 as queries against the other 3

    torch.manual_seed(7)
    plain = loss_of(torch.cat([model(chunk) for chunk in inputs.chunks(2)]))
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def cached_gradients(restore: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(7)
        cache = CachedEmbeddings(model, inputs.chunks(2), torch.device("cpu"))
        loss = loss_of(cache.embeddings)
        torch.testing.assert_close(loss, plain)
        loss.backward()
        with pytest.MonkeyPatch.context() as patch:
            if not restore:
                patch.setattr(RandomState, "restored", lambda self: nullcontext())
            for replay in cache.replays():
                replay.surrogate().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    replayed = cached_gradients(restore=True)
    for name, grad in expected.items():
        torch.testing.assert_close(replayed[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    wrong = cached_gradients(restore=False)
    assert any(not torch.allclose(wrong[n], g, atol=1e-6, rtol=1e-4) for n, g in expected.items())


@pytest.fixture
def processor_batch(tiny_backbone):
    """6 pages, some with text: one batch, chunked unevenly by the tests."""
    from PIL import Image as PILImage

    from vdr.data.collator import EmbeddingCollator

    collator = EmbeddingCollator(tiny_backbone.processor)
    pages = [PILImage.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(6)]
    texts = ["revenue 2015", "profit of Acme", None, "a longer caption for this page", None, "x"]
    return collator.encode_pages(pages, "Represent the page.", texts)


def test_gradcache_refuses_a_mini_batch_below_one() -> None:
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), mini_batch_size=0)


def test_gradcache_leaves_page_pixels_in_host_memory_until_their_mini_batch_runs(rows8: Path) -> None:
    from vdr.data.schema import TrainRows
    from vdr.data.sources import load_table

    rows = TrainRows(load_table(str(rows8)), "rows8", num_negatives=1)
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), mini_batch_size=2,
                             page_preprocessing="processor")
    batch = module.collator([rows[i] for i in range(4)])
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)  # "meta": a device other than the CPU
    assert moved.queries.input_ids.device.type == "meta" and moved.documents.input_ids.device.type == "meta"
    assert moved.documents.pixel_values.device.type == "cpu"
    module.mini_batch_size = None  # the plain step needs every page at once
    batch = module.collator([rows[i] for i in range(4)])
    assert module.transfer_batch_to_device(batch, torch.device("meta"), 0).documents.pixel_values.device.type == "meta"
    # Device preprocessing: the pages travel as uint8 (a quarter of one float32 frame); each mini-batch makes its own
    # patches on the device at its forward.
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), mini_batch_size=2)
    moved = module.transfer_batch_to_device(module.collator([rows[i] for i in range(4)]), torch.device("meta"), 0)
    assert moved.documents.pixel_values is None
    assert moved.documents.pages.pixels.device.type == "meta" and moved.documents.pages.pixels.dtype == torch.uint8


def test_token_budget_mini_batches_give_the_plain_loss_and_gradients(rows8: Path, plain: Gradients) -> None:
    # A budget of exactly the 8 queries' padded tokens: they share one pass, and the 16 pages take several.
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS))
    batch = module.collator(_rows(rows8, 8))
    budget = 8 * int(batch.queries.attention_mask.sum(1).max())
    assert len(batch.queries.chunks(tokens=budget)) == 1 and len(batch.documents.chunks(tokens=budget)) > 1
    assert_same_gradients(one_step(rows8, mini_batch_tokens=budget), plain)


def _rows(path: Path, n: int) -> list:
    from vdr.data.schema import TrainRows
    from vdr.data.sources import load_table

    rows = TrainRows(load_table(str(path)), "rows", num_negatives=1)
    return [rows[i] for i in range(n)]


@pytest.mark.parametrize("mini_batch_size", [None, 3], ids=["plain", "gradcache"])
def test_offloaded_activations_give_the_same_gradients(rows8: Path, plain: Gradients,
                                                       mini_batch_size: int | None) -> None:
    """Offloading runs on the CPU here (tensors copied into other host memory and back): the gradients equal the
    plain step's, and with checkpointing what moves is each checkpointed layer's input, a fraction of the rest."""
    from vdr.models.offload import OffloadActivations

    moved = {}
    for checkpointing in (False, True):
        L.seed_everything(0)
        module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS),
                                 loss=InfoNCELoss(learnable_temperature=True), mini_batch_size=mini_batch_size,
                                 offload_activations=True, gradient_checkpointing_text=checkpointing,
                                 gradient_checkpointing_vision=checkpointing)
        assert isinstance(module.offload, OffloadActivations)
        module.offload = OffloadActivations(min_bytes=0, device_types=("cpu",))
        probe = Gradients()
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=RetrievalDataModule(train=str(rows8), batch_size=8))
        assert_same_gradients(probe, plain)
        moved[checkpointing] = (module.offload.tensors, module.offload.bytes)
    layers = len(module.trunk.language_model.layers) + len(module.trunk.visual.blocks)
    assert moved[True][0] >= layers  # every checkpointed layer's input went through the hooks
    assert moved[True][1] < moved[False][1] / 3


def test_offloading_leaves_weights_and_expanded_views_where_they_are() -> None:
    from vdr.models.offload import OffloadActivations

    layer = torch.nn.Linear(256, 256)
    x = torch.randn(8, 256, requires_grad=True)
    offload = OffloadActivations(min_bytes=0, device_types=("cpu",))
    with offload:
        y = layer(x)  # saves x and weight.t() (a view of the parameter)
        z = (torch.ones(1, 1).expand(4096, 256) * x.sum()).sum()  # saves an expanded view: 1 float stored
        big = torch.randn(4096, 256, requires_grad=True) * 1  # 4 MiB
        # Saves an expanded view of one row of it (8 KiB if copied), beside the scalar (4 bytes, offloaded).
        w = (big[:1].expand(8, 256) * x.sum()).sum()
    assert offload.tensors == 2 and offload.bytes == x.numel() * 4 + 4  # x, and the scalar
    (y.sum() + z + w).backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_offloading_moves_small_views_that_would_keep_a_large_tensor() -> None:
    """A tile of rows (`checkpoint_tiles`) saved by its checkpoint is a small view of the whole batch's hidden states:
    kept on the GPU, it would keep all of them there. Small tensors of their own stay, and so do small views of tensors
    without gradients (each tile's slice of the rope cos/sin, which every layer saves again)."""
    from vdr.models.offload import OffloadActivations

    hidden = torch.randn(64, 100, 16, requires_grad=True)  # 400 KiB
    tiles = (hidden * 1).split(1)  # 6.25 KiB each, views of a non-leaf as a layer's input is
    cos = torch.randn(64, 100, 16)
    offload = OffloadActivations(min_bytes=100_000, device_types=("cpu",))
    with offload:
        outputs = [tile.sin() * cos[i : i + 1] for i, tile in enumerate(tiles[:3])]
        outputs.append(torch.randn(100, 16, requires_grad=True).sin())
    assert offload.tensors == 3 and offload.bytes == 3 * tiles[0].numel() * 4  # the three tiles
    sum(out.sum() for out in outputs).backward()
    torch.testing.assert_close(hidden.grad[:3], hidden[:3].detach().cos() * cos[:3])
