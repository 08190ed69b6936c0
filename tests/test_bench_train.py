"""scripts/bench_train.py: the whole benchmark in its tiny CPU mode, and its FLOP count derived by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from vdr.models.inputs import EncoderInputs

SCRIPT = REPO / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through the module registry
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow  # 27 s: the default suite keeps under 20 minutes
def test_tiny_cpu_run_measures_both_modes(tmp_path):
    output = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--batch", "4", "--negatives", "1", "--page", "64",
         "--steps", "2", "--warmup", "1", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["mode"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert rows.keys() == {"lightning", "bare"}
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert math.isfinite(row["step_s_median"]) and row["step_s_median"] > 0
        assert row["peak_mem_gib"] > 0
        assert row["flops_per_step"] > 0 and row["attention_flops_per_step"] > 0
        assert row["mfu"] is None  # no --peak-tflops on the CPU
        assert row["visual_tokens_per_page"] == 4  # 64 x 64 px, one visual token per 32 x 32 px
    lightning, bare = rows["lightning"], rows["bare"]
    # Same weights, same batches, same optimizer and precision: the same maths in both loops.
    assert lightning["batches_hash"] == bare["batches_hash"]
    assert lightning["flops_per_step"] == bare["flops_per_step"]
    assert lightning["first_loss"] == pytest.approx(bare["first_loss"], rel=1e-5)
    assert lightning["last_loss"] == pytest.approx(bare["last_loss"], rel=1e-4)
    assert lightning["lightning_over_bare"]["samples_per_s"] > 0
    assert "lightning / bare:" in done.stdout and "x samples/s" in done.stdout


def test_flop_model_counts_the_tiny_matrices_by_hand(bench, tiny_backbone):
    """Tiny preset (vdr/models/backbone.py): text hidden 32, 4 heads x head_dim 8, 2 KV heads, MLP 64, 2 layers;
    vision hidden 32, MLP 64, depth 2, one DeepStack merger, patches of 3 x 2 x 16 x 16 = 1536 values.

    text per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 + gate, up, down 3 x 32x64 = 9216; x 2 layers = 18432.
    vision: patch embedding 1536x32 = 49152; per block qkv 32x96 + proj 32x32 + fc1, fc2 2 x 32x64 = 8192, x 2.
    mergers: 2 x 2 tokens of 32 -> 128 -> 128 -> 32: 128x128 + 128x32 = 20480, main + one DeepStack = 40960.
    """
    model = bench.FlopModel.of(tiny_backbone.trunk)
    assert model.text_matmul == 18432
    assert model.vision_matmul == 49152 + 2 * 8192
    assert model.merger_matmul == 2 * 20480
    assert (model.merge_area, model.text_layers, model.text_attention_width) == (4, 2, 32)
    assert (model.vision_layers, model.vision_width) == (2, 32)


def test_step_flops_formula(bench):
    """A text-only sequence of 10 tokens through 2 layers of 18432 matmul weights and attention width 32:
    dense 6 x 18432 x 10; causal attention 6 x 2 layers x 32 x 10^2. One image of 16 patches adds
    6 x (vision 1000 x 16 + merger 400 x 16 / 4) dense and 12 x 3 layers x 64 x 16^2 attention."""
    model = bench.FlopModel(text_matmul=18432, vision_matmul=1000, merger_matmul=400, merge_area=4, text_layers=2,
                            text_attention_width=32, vision_layers=3, vision_width=64)
    text = bench.step_flops(model, bench.Tokens(text=10, text_squares=100))
    assert text == {"dense": 6 * 18432 * 10, "attention": 6 * 2 * 32 * 100}
    doubled = bench.step_flops(model, bench.Tokens(text=20, text_squares=200))
    assert doubled["dense"] == 2 * text["dense"]  # dense FLOPs scale with tokens
    image = bench.step_flops(model, bench.Tokens(text=10, text_squares=100, patches=16, patch_squares=256))
    assert image["dense"] - text["dense"] == 6 * (1000 * 16 + 400 * 4)
    assert image["attention"] - text["attention"] == 12 * 3 * 64 * 256


def test_tokens_count_real_tokens_and_patches_per_image(bench):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # lengths 3 and 4 (padding not counted)
    queries = EncoderInputs(torch.zeros_like(mask), mask, torch.zeros_like(mask, dtype=torch.int32))
    pages = EncoderInputs(torch.zeros_like(mask), mask, torch.zeros_like(mask, dtype=torch.int32),
                          image_grid_thw=torch.tensor([[1, 2, 2], [1, 4, 2]]))  # 4 and 8 patches
    tokens = bench.Tokens.of(queries, pages)
    assert (tokens.text, tokens.text_squares) == (14, 2 * (9 + 16))
    assert (tokens.patches, tokens.patch_squares) == (12, 16 + 64)


def test_page_size_parses_side_or_width_by_height(bench):
    assert bench.page_size("896") == (896, 896)
    assert bench.page_size("768x1024") == (768, 1024)
