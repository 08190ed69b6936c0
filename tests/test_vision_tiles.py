"""Vision-block checkpoints over groups of images (``vision_checkpoint_images``): same gradients, a smaller backward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from vdr.data.collator import EmbeddingCollator
from vdr.models.backbone import PRESETS, build_processor, set_gradient_checkpointing
from vdr.models.biencoder import BiEncoder
from vdr.models.inputs import EncoderInputs
from vdr.models.vision_tiles import TiledCheckpointBlock


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
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import Qwen3VLModel

    preset = replace(PRESETS["tiny"], vision_hidden=512, vision_heads=4, vision_intermediate=1024)
    torch.manual_seed(0)
    model = BiEncoder(Qwen3VLModel(preset.config())).train()
    pages = [Image.new("RGB", (256, 256), (20 * i, 90, 100)) for i in range(8)]
    inputs = EmbeddingCollator(build_processor(256 * 256, 256 * 256)).encode_pages(pages, "Represent the page.",
                                                                                    [None] * 8)
    assert inputs.vision_seqlens == (256,) * 8

    def peak_mib(vision_images: int | None) -> float:
        """The step's peak above the parameters and their gradients, in MiB."""
        set_gradient_checkpointing(model.trunk, text=True, vision=True, vision_images=vision_images)
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(inputs).sum().backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return (peak["Total"] - sum(v for k, v in peak.items() if str(k).split(".")[-1] in ("PARAM", "GRAD"))) / 2**20

    whole, *tiled = (peak_mib(images) for images in (None, 4, 2, 1))
    print(f"peak above parameters and gradients: {whole:.1f} MiB; with tiles of 4, 2, 1 pages: "
          + ", ".join(f"{peak:.1f}" for peak in tiled))
    # Measured: 87.8 MiB; 67.7, 52.7, 46.2. What is left at 1 page is the rest of the step (the token-embedding
    # gradient, the mergers' activations, the checkpointed inputs).
    assert whole > tiled[0] > tiled[1] > tiled[2]
    assert tiled[1] < 0.7 * whole
