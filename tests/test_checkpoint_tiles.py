"""Checkpoints over groups of images (``vision_checkpoint_images``) and of rows (``text_checkpoint_rows``): same
gradients, a smaller backward."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
from PIL import Image

from vdr.data.collator import EmbeddingCollator
from vdr.models.backbone import PRESETS, build_processor, set_gradient_checkpointing
from vdr.models.biencoder import BiEncoder
from vdr.models.checkpoint_tiles import TiledCheckpointBlock, TiledCheckpointDecoderLayer
from vdr.models.inputs import EncoderInputs


def pages_of_several_sizes() -> EncoderInputs:
    """5 pages whose grids differ (16 to 96 patches), two with text: groups split the packed patches unevenly."""
    sizes = [(64, 64), (128, 96), (32, 64), (96, 128), (64, 32)]
    pages = [Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)) for i, size in enumerate(sizes)]
    texts = ["revenue 2015", None, "a longer caption for this page", None, None]
    return EmbeddingCollator(build_processor(32 * 32, 128 * 128)).encode_pages(pages, "Represent the page.", texts)


def gradients(model: BiEncoder, inputs: EncoderInputs, **checkpointing) -> tuple[torch.Tensor, dict, list[int]]:
    """Embeddings, every gradient of a fixed linear function of them, and the patches of each vision-block call
    (first block; forward and recompute)."""
    set_gradient_checkpointing(model.trunk, **checkpointing)
    calls = []
    block = model.trunk.visual.blocks[0]
    hook = block.attn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    model.zero_grad(set_to_none=True)
    embeddings = model(inputs)  # [5, D]
    weights = torch.linspace(-1, 1, embeddings.numel()).reshape(embeddings.shape)
    (embeddings * weights).sum().backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return embeddings.detach(), grads, calls


def assert_tiles_shrink_the_peak(model: BiEncoder, inputs: EncoderInputs, option: str) -> None:
    """A checkpointed forward and backward's peak above the parameters and their gradients (torch's MemTracker, CPU):
    without tiles, then with tiles (``option``: ``vision_images`` or ``text_rows``) of 4, 2 and 1."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def peak_mib(size: int | None) -> float:
        set_gradient_checkpointing(model.trunk, text=True, vision=True, **{option: size})
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(inputs).sum().backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return (peak["Total"] - sum(v for k, v in peak.items() if str(k).split(".")[-1] in ("PARAM", "GRAD"))) / 2**20

    whole, *tiled = (peak_mib(size) for size in (None, 4, 2, 1))
    print(f"peak above parameters and gradients: {whole:.1f} MiB; with {option} of 4, 2, 1: "
          + ", ".join(f"{peak:.1f}" for peak in tiled))
    assert whole > tiled[0] > tiled[1] > tiled[2]
    assert tiled[1] < 0.7 * whole


def test_tiled_vision_checkpoints_give_the_same_embeddings_and_gradients(tiny_backbone) -> None:
    model = BiEncoder(tiny_backbone.model).train()
    inputs = pages_of_several_sizes()
    patches = list(inputs.vision_seqlens)
    assert len(set(patches)) > 2
    reference, expected, calls = gradients(model, inputs, text=True, vision=True)
    assert calls == [sum(patches)] * 2  # the forward, and the recompute in the backward
    assert any(name.startswith("backbone.visual.blocks.") for name in expected)
    for images in (1, 2, 5):
        embeddings, grads, calls = gradients(model, inputs, text=True, vision=True, vision_images=images)
        tiles = [sum(patches[i : i + images]) for i in range(0, 5, images)]
        # The forward runs each tile; the backward recomputes the tiles one at a time, the last first.
        assert calls == tiles + tiles[::-1]
        torch.testing.assert_close(embeddings, reference, atol=1e-6, rtol=1e-5)
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6 * max(1.0, float(grad.abs().max())), rtol=1e-4,
                                       msg=name)
    # Without gradients (evaluation) a tiled block runs once over every image.
    with torch.no_grad():
        calls.clear()
        hook = model.trunk.visual.blocks[0].attn.register_forward_pre_hook(
            lambda module, args: calls.append(args[0].shape[0]))
        torch.testing.assert_close(model(inputs), reference, atol=1e-6, rtol=1e-5)
        hook.remove()
    assert calls == [sum(patches)]


def test_tiles_are_switched_off_and_refused_without_vision_checkpointing(tiny_backbone) -> None:
    trunk = tiny_backbone.model
    state = {name: t.clone() for name, t in trunk.state_dict().items()}
    set_gradient_checkpointing(trunk, text=False, vision=True, vision_images=2)
    assert all(isinstance(block, TiledCheckpointBlock) for block in trunk.visual.blocks)
    assert not any(getattr(block, "gradient_checkpointing", False) for block in trunk.visual.blocks)
    assert trunk.state_dict().keys() == state.keys()  # same parameter names: checkpoints and exports unchanged
    set_gradient_checkpointing(trunk, text=False, vision=True)
    assert not any(isinstance(block, TiledCheckpointBlock) for block in trunk.visual.blocks)
    assert all(block.gradient_checkpointing for block in trunk.visual.blocks)
    with pytest.raises(ValueError, match="needs gradient checkpointing of the vision tower"):
        set_gradient_checkpointing(trunk, text=True, vision=False, vision_images=2)
    with pytest.raises(ValueError, match="vision_checkpoint_images must be >= 1"):
        set_gradient_checkpointing(trunk, text=True, vision=True, vision_images=0)


def test_tiles_bound_the_backwards_memory() -> None:
    """Peak memory of a checkpointed forward and backward over 8 pages, tracked by torch's MemTracker on the CPU.

    A vision tower 512 wide over 256 patches per page makes the recompute of one vision block over all the pages the
    largest transient (as the 2B model's 1024-wide tower over 1,296 patches per 600x600 page is on a GPU). With tiles
    of 2 pages the backward holds a quarter of it.
    """
    from transformers import Qwen3VLModel

    preset = replace(PRESETS["tiny"], vision_hidden=512, vision_heads=4, vision_intermediate=1024)
    torch.manual_seed(0)
    model = BiEncoder(Qwen3VLModel(preset.config())).train()
    pages = [Image.new("RGB", (256, 256), (20 * i, 90, 100)) for i in range(8)]
    inputs = EmbeddingCollator(build_processor(256 * 256, 256 * 256)).encode_pages(pages, "Represent the page.",
                                                                                    [None] * 8)
    assert inputs.vision_seqlens == (256,) * 8

    # Measured: 87.8 MiB; 67.7, 52.7, 46.2. What is left at 1 page is the rest of the step (the token-embedding
    # gradient, the mergers' activations, the checkpointed inputs).
    assert_tiles_shrink_the_peak(model, inputs, "vision_images")


def test_tiled_text_checkpoints_give_the_same_embeddings_and_gradients(tiny_backbone) -> None:
    """5 rows of several lengths (padded, with images and deepstack features) in decoder checkpoints of 1, 2 and 5
    rows, also with the vision tiles: the embeddings and every gradient are unchanged."""
    model = BiEncoder(tiny_backbone.model).train()
    inputs = pages_of_several_sizes()
    assert len(set(inputs.attention_mask.sum(1).tolist())) > 2
    reference, expected, _ = gradients(model, inputs, text=True, vision=True)
    calls = []
    layer = model.trunk.language_model.layers[0]
    for rows, images in ((1, None), (2, None), (5, None), (2, 3)):
        calls.clear()
        hook = layer.input_layernorm.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        embeddings, grads, _ = gradients(model, inputs, text=True, vision=True, text_rows=rows, vision_images=images)
        hook.remove()
        assert isinstance(layer, TiledCheckpointDecoderLayer) and not layer.gradient_checkpointing
        tiles = [min(rows, 5 - first) for first in range(0, 5, rows)]
        assert calls == tiles + tiles[::-1]  # the forward's tiles; the backward recomputes them one by one, last first
        torch.testing.assert_close(embeddings, reference, atol=1e-6, rtol=1e-5)
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6 * max(1.0, float(grad.abs().max())), rtol=1e-4,
                                       msg=name)
    trunk = model.trunk
    with pytest.raises(ValueError, match="cannot fill a key/value cache"):  # each tile would append its own keys
        trunk(**inputs.model_kwargs(), use_cache=True)
    set_gradient_checkpointing(trunk, text=True, vision=True)
    assert not any(isinstance(layer, TiledCheckpointDecoderLayer) for layer in trunk.language_model.layers)
    assert all(layer.gradient_checkpointing for layer in trunk.language_model.layers)
    with pytest.raises(ValueError, match="needs gradient checkpointing of the text tower"):
        set_gradient_checkpointing(trunk, text=False, vision=True, text_rows=2)
    with pytest.raises(ValueError, match="text_checkpoint_rows must be >= 1"):
        set_gradient_checkpointing(trunk, text=True, vision=True, text_rows=0)


def test_text_tiles_bound_the_backwards_memory() -> None:
    """Peak memory of a checkpointed forward and backward over 8 rows of 200 tokens, by MemTracker on the CPU.

    A decoder 512 wide (MLP 2048) makes the recompute of one layer over all rows the largest transient, as the 2B
    model's decoder over 16 page rows is on a GPU; with tiles of 2 rows the backward holds about a quarter of it.
    """
    from transformers import Qwen3VLModel

    preset = replace(PRESETS["tiny"], text_hidden=512, text_heads=8, text_kv_heads=4, head_dim=64,
                     text_intermediate=2048, mrope_section=(12, 10, 10))
    torch.manual_seed(0)
    model = BiEncoder(Qwen3VLModel(preset.config())).train()
    # A table of 4,096 rows, not 151,936: that one's dense gradient (297 MiB at this width) would be the peak.
    model.trunk.language_model.embed_tokens = torch.nn.Embedding(4096, 512)
    collator = EmbeddingCollator(build_processor(32 * 32, 64 * 64), max_text_tokens=256)
    inputs = collator.encode_texts([" ".join(["revenue"] * (190 + i)) for i in range(8)], "Find the page.")
    assert inputs.input_ids.shape[0] == 8 and inputs.input_ids.shape[1] > 190
    inputs = dataclasses.replace(inputs, input_ids=inputs.input_ids % 4096)

    # Measured: 130.4 MiB; 81.8, 57.3, 45.8.
    assert_tiles_shrink_the_peak(model, inputs, "text_rows")


def test_the_reranker_scores_and_learns_the_same_through_tiles() -> None:
    """The reranker's trunk (under its LM head) tiled by 1 page and 1 row: the same scores and gradients."""
    import copy
    import random

    from vdr.data.rerank_collator import RerankCollator
    from vdr.data.synth import render_page
    from vdr.models.backbone import load_backbone
    from vdr.models.reranker import Reranker

    backbone = load_backbone("tiny", min_pixels=64 * 64, max_pixels=64 * 64, lm_head=True)
    pages = [render_page("Acme", "Revenue", 2015 + i, random.Random(i), size=64) for i in range(3)]
    inputs = RerankCollator(backbone.processor).encode_pairs(["Acme revenue 2015", "Acme 2016", "revenue"], pages)
    results = []
    for tiles in ({}, {"vision_images": 1, "text_rows": 1}):
        reranker = Reranker(copy.deepcopy(backbone.model), 9693, 2152).train()
        set_gradient_checkpointing(reranker.trunk, text=True, vision=True, **tiles)
        assert isinstance(reranker.trunk.language_model.layers[0], TiledCheckpointDecoderLayer) == bool(tiles)
        scores = reranker(inputs)  # [3]
        (scores * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((scores.detach(), {n: p.grad for n, p in reranker.named_parameters() if p.grad is not None}))
    (expected, reference), (scores, grads) = results
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6 * max(1.0, float(grad.abs().max())), rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("module_class", ["BiEncoderModule", "RerankerModule"])
def test_both_modules_pass_their_tile_options_to_the_layers(module_class: str) -> None:
    from vdr.lit.base import BackboneConfig
    from vdr.lit.biencoder import BiEncoderModule
    from vdr.lit.reranker import RerankerModule

    from .conftest import TINY_PIXELS

    module = {"BiEncoderModule": BiEncoderModule, "RerankerModule": RerankerModule}[module_class](
        BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), gradient_checkpointing_text=True,
        gradient_checkpointing_vision=True, vision_checkpoint_images=3, text_checkpoint_rows=2)
    assert all(isinstance(block, TiledCheckpointBlock) and block.tile_images == 3
               for block in module.trunk.visual.blocks)
    assert all(isinstance(layer, TiledCheckpointDecoderLayer) and layer.tile_rows == 2
               for layer in module.trunk.language_model.layers)
