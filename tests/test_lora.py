"""LoRA through peft: which weights train, adapters in checkpoints, and exports that merge them and embed alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sentence_transformers import SentenceTransformer

from vdr.evaluation.encoders import ModuleEncoder, SentenceTransformerEncoder
from vdr.export.command import export_checkpoint
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule
from vdr.lit.reranker import RerankerModule
from vdr.models.lora import LoraOptions

from .conftest import TINY_PIXELS, fit_tiny

TINY = BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS)
TEXTS = ["revenue of Acme in 2015", "profit of Globex in 2019"]


def trainable(module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def test_default_lora_adapts_qwens_decoder_projections_and_freezes_the_rest() -> None:
    names = trainable(BiEncoderModule(TINY, lora=LoraOptions(r=4, alpha=8)))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert not [n for n in names if ".visual." in n]
    layers = {n.split("layers.")[1].split(".")[0] for n in names}
    assert layers == {"0", "1"}  # every decoder layer


def test_the_vision_tower_can_train_in_full_or_with_adapters() -> None:
    trained = trainable(BiEncoderModule(TINY, lora={"r": 4, "alpha": 8, "vision": "trained"}))
    vision = [n for n in trained if ".visual." in n]
    assert vision and not [n for n in vision if ".lora_" in n]  # the whole tower, no adapters in it
    adapted = trainable(BiEncoderModule(TINY, lora={"r": 4, "alpha": 8, "vision": "lora"}))
    vision = [n for n in adapted if ".visual." in n]
    assert vision and all(".lora_" in n and ".blocks." in n for n in vision)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in vision} == {"qkv", "proj", "linear_fc1", "linear_fc2"}
    with pytest.raises(ValueError, match="freeze_vision is set but lora.vision is 'trained'"):
        BiEncoderModule(TINY, lora={"vision": "trained"}, freeze_vision=True)
    with pytest.raises(ValueError, match="lora.vision must be frozen, trained or lora"):
        LoraOptions(vision="adapted")


def test_a_lora_run_checkpoints_its_adapters_and_exports_merged_weights_that_embed_alike(tiny_synth: Path,
                                                                                         tmp_path: Path) -> None:
    run = fit_tiny(tmp_path, tiny_synth, "lora", 3, "--model.lora.r", "4", "--model.lora.alpha", "8",
                   "--model.lora.vision", "lora", "--model.optimizer.init_args.lr", "0.05")
    checkpoint = run / "checkpoints/last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["lora"]["vision"] == "lora"
    adapters = {k: v for k, v in state["state_dict"].items() if ".lora_B." in k}
    assert adapters and all(v.abs().sum() > 0 for v in adapters.values())  # trained (lora_B starts at zero)
    module = BiEncoderModule.from_checkpoint(checkpoint)  # strict load: the adapters come back as they were saved
    out = export_checkpoint(checkpoint, tmp_path / "export")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k or "base_layer" in k]
    ours = ModuleEncoder(module.model, module.collator, "cpu")
    theirs = SentenceTransformerEncoder(SentenceTransformer(str(out), device="cpu"))
    torch.testing.assert_close(theirs.queries(TEXTS), ours.queries(TEXTS), atol=1e-5, rtol=1e-4)
    from PIL import Image

    pages = [Image.new("RGB", (64, 64), (200, 30 * i, 60)) for i in range(2)]
    torch.testing.assert_close(theirs.pages(pages), ours.pages(pages), atol=1e-5, rtol=1e-4)
    # The adapters changed the model: the base weights alone embed otherwise.
    base = BiEncoderModule(TINY)
    base.model.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                                for k, v in module.model.state_dict().items() if ".lora_" not in k})
    plain = ModuleEncoder(base.model, base.collator, "cpu").queries(TEXTS)
    assert (plain - ours.queries(TEXTS)).abs().max() > 1e-3


def test_the_reranker_takes_lora_too() -> None:
    module = RerankerModule(backbone={"name_or_path": "tiny", "min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS},
                            lora={"r": 4, "alpha": 8})
    names = trainable(module)
    assert names and all(".lora_" in n for n in names)
    from PIL import Image

    scores = module.model(module.collator.encode_pairs(["a query"], [Image.new("RGB", (64, 64))]))
    assert scores.shape == (1,)
