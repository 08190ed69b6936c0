"""Backbone presets, loading a saved model directory (the from_pretrained path), pooling and the patch embedding."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import Qwen3VLModel

from vdr.data.collator import EmbeddingCollator
from vdr.models.backbone import PRESETS, count_parameters, load_backbone
from vdr.models.biencoder import BiEncoder
from vdr.models.patch_embed import LinearPatchEmbed
from vdr.models.pooling import last_token_index, last_token_pool

from .conftest import TINY_PIXELS
from .test_collator import _page


def test_2b_preset_is_the_qwen3_vl_2b_layout() -> None:
    config = PRESETS["2b"].config()
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (151936, 2048, 28)
    assert text.num_attention_heads == 16
    assert (text.num_key_value_heads, text.head_dim, text.intermediate_size) == (8, 128, 6144)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["rope_theta"] == 5e6
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (24, 1024, 4096, 16)
    assert (vision.patch_size, vision.spatial_merge_size, vision.out_hidden_size) == (16, 2, 2048)
    assert list(vision.deepstack_visual_indexes) == [5, 11, 17]
    with torch.device("meta"):
        counts = count_parameters(Qwen3VLModel(config))
    assert 2.0e9 < sum(counts.values()) < 2.3e9  # Qwen3-VL-2B: ~2.1B parameters without the LM head


def test_tiny_preset_builds_fast() -> None:
    start = time.perf_counter()
    model = Qwen3VLModel(PRESETS["tiny"].config())
    assert time.perf_counter() - start < 1.0
    assert count_parameters(model)["vision"] < 200_000


def test_presets_are_seeded() -> None:
    a = Qwen3VLModel(PRESETS["tiny"].config())
    b1 = load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, seed=3).model
    b2 = load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, seed=3).model
    assert all(torch.equal(x, y) for x, y in zip(b1.state_dict().values(), b2.state_dict().values()))
    assert not torch.equal(a.language_model.embed_tokens.weight, b1.language_model.embed_tokens.weight)


def test_unknown_backbone_name_is_explained() -> None:
    with pytest.raises(ValueError, match="expected a preset"):
        load_backbone("tinyy", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)


def test_loads_a_saved_directory_like_a_hub_checkpoint(tiny_backbone, tmp_path) -> None:
    # The from_pretrained route a hub user takes, on a tiny model saved locally (no network here).
    tiny_backbone.model.save_pretrained(tmp_path)
    tiny_backbone.processor.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), min_pixels=TINY_PIXELS, max_pixels=2 * TINY_PIXELS)
    assert loaded.processor.image_processor.size == {"shortest_edge": TINY_PIXELS, "longest_edge": 2 * TINY_PIXELS}
    assert isinstance(loaded.model.visual.patch_embed, LinearPatchEmbed)
    collator = EmbeddingCollator(tiny_backbone.processor)
    inputs = collator.encode_pages([_page((64, 64), 0), _page((64, 64), 1)], "Represent the user's input.", ["a", "b"])
    with torch.no_grad():
        expected = BiEncoder(tiny_backbone.model).eval()(inputs)
        got = BiEncoder(loaded.model).eval()(inputs)
    assert torch.allclose(expected, got, atol=1e-5)


def test_linear_patch_embed_equals_the_conv3d() -> None:
    reference = load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, linear_patch_embed=False).model
    fast = load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS).model
    assert type(reference.visual.patch_embed).__name__ == "Qwen3VLVisionPatchEmbed"
    assert fast.state_dict().keys() == reference.state_dict().keys()
    patches = torch.randn(64, 3 * 2 * 16 * 16, requires_grad=True)
    out_ref = reference.visual.patch_embed(patches)
    out_fast = fast.visual.patch_embed(patches)
    assert torch.allclose(out_ref, out_fast, atol=1e-5)
    grad_ref = torch.autograd.grad(out_ref.square().sum(), reference.visual.patch_embed.proj.weight)[0]
    grad_fast = torch.autograd.grad(out_fast.square().sum(), fast.visual.patch_embed.proj.weight)[0]
    assert torch.allclose(grad_ref, grad_fast, atol=1e-4)


def test_last_token_index_for_right_and_left_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_last_token_pool_normalises() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    pooled = last_token_pool(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))
    assert torch.allclose(pooled[0], torch.nn.functional.normalize(hidden[0, 1], dim=0))


def test_biencoder_embedding_ignores_padding(tiny_backbone) -> None:
    # The same query alone and next to a longer one (so it is padded) embeds the same.
    collator = EmbeddingCollator(tiny_backbone.processor)
    model = BiEncoder(tiny_backbone.model).eval()
    with torch.no_grad():
        alone = model(collator.encode_texts(["acme revenue"], "q"))
        padded = model(collator.encode_texts(["acme revenue", "a much longer query about profit in 2019"], "q"))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_added_whole_word_tokens() -> None:
    backbone = load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, added_tokens=["Elkora", "2019"])
    tokenizer = backbone.processor.tokenizer
    pieces = [tokenizer.decode([i]) for i in tokenizer("Elkora sales 2019 20190", add_special_tokens=False).input_ids]
    assert "Elkora" in pieces and "2019" in pieces
    assert "20190" not in pieces and pieces[-5:] == ["2", "0", "1", "9", "0"]  # not matched inside a longer word
    assert max(tokenizer.convert_tokens_to_ids(["Elkora", "2019"])) < backbone.model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS,
                      added_tokens=[f"w{i}" for i in range(300)])
