"""Qwen3-VL backbones: loaded from the hub or a directory, or built from a named size preset with random weights.

``load_backbone("Qwen/Qwen3-VL-Embedding-2B")`` is what an online user runs; ``load_backbone("tiny")`` builds the
same architecture at toy size offline, for tests; ``"demo"`` is small enough to learn the synthetic task on two CPU
cores; ``"2b"`` is the real Qwen3-VL-2B layout (REFERENCE.md §2) with random weights, for benchmarks.
The transformers class defaults are a 7B-like layout, so every preset spells out its config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel
from transformers.utils.generic import is_flash_attention_requested

from vdr.models.checkpoint_tiles import tile_text_checkpoints, tile_vision_checkpoints
from vdr.models.inputs import vision_cu_seqlens
from vdr.models.patch_embed import use_linear_patch_embed
from vdr.models.processor import add_whole_word_tokens, build_processor, set_pixel_bounds

QWEN_VOCAB_SIZE = 151936
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


@dataclass(frozen=True)
class Preset:
    """A Qwen3-VL layout. Text and vision towers are sized independently; ``out_hidden`` = text hidden."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    head_dim: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2 (rotary pairs split over t, h, w)
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int = 2304
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Qwen3VLConfig:
        text = {
            "vocab_size": QWEN_VOCAB_SIZE,
            "hidden_size": self.text_hidden,
            "intermediate_size": self.text_intermediate,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "num_key_value_heads": self.text_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": list(self.mrope_section),
                "mrope_interleaved": True,
            },
        }
        vision = {
            "depth": self.vision_depth,
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_heads": self.vision_heads,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": self.text_hidden,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
            "initializer_range": self.initializer_range,
        }
        return Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            vision_start_token_id=VISION_START_TOKEN_ID,
            vision_end_token_id=VISION_END_TOKEN_ID,
            tie_word_embeddings=True,
            **self.extra,
        )


PRESETS: dict[str, Preset] = {
    # Tests: builds in a fraction of a second; most of its 4.9M parameters are the (real-size) vocabulary.
    "tiny": Preset(
        text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=8, text_intermediate=64,
        mrope_section=(2, 1, 1), vision_hidden=32, vision_depth=2, vision_heads=2, vision_intermediate=64,
        deepstack_visual_indexes=(0,), num_position_embeddings=64,
    ),
    # The CPU demo (REFERENCE.md §8): 128-wide towers of depth 2 learn to read 128x128 pages in minutes.
    # A wider initialisation than Qwen's 0.02 keeps the tiny towers from collapsing page embeddings early.
    "demo": Preset(
        text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=32, text_intermediate=256,
        mrope_section=(6, 5, 5), vision_hidden=128, vision_depth=2, vision_heads=4, vision_intermediate=256,
        deepstack_visual_indexes=(0,), num_position_embeddings=256, initializer_range=0.05,
    ),
    # Qwen3-VL-2B (REFERENCE.md §2), random weights: for benchmarks on a GPU.
    "2b": Preset(
        text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, head_dim=128, text_intermediate=6144,
        mrope_section=(24, 20, 20), vision_hidden=1024, vision_depth=24, vision_heads=16, vision_intermediate=4096,
        deepstack_visual_indexes=(5, 11, 17), num_position_embeddings=2304,
    ),
}


@dataclass
class Backbone:
    """A Qwen3-VL trunk (or, for rerankers, the trunk with its LM head) and the processor that prepares its inputs."""

    model: Qwen3VLModel | Qwen3VLForConditionalGeneration
    processor: Any
    source: str
    # Query/document prompts saved with a Sentence Transformers model (empty otherwise): what it was trained with.
    prompts: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def trunk(self) -> Qwen3VLModel:
        """The ``Qwen3VLModel`` itself, with or without an LM head around it."""
        return self.model.model if isinstance(self.model, Qwen3VLForConditionalGeneration) else self.model


def load_backbone(
    name_or_path: str,
    *,
    min_pixels: int | None,
    max_pixels: int | None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_mean: float = 0.5,
    image_std: float = 0.5,
    linear_patch_embed: bool = True,
    initializer_range: float | None = None,
    added_tokens: list[str] | tuple[str, ...] = (),
    lm_head: bool = False,
) -> Backbone:
    """Loads a Qwen3-VL backbone and its processor.

    Args:
        name_or_path: A preset name (``tiny``, ``demo``, ``2b``), a hub id such as ``Qwen/Qwen3-VL-Embedding-2B``,
            or a local directory saved with ``save_pretrained``. A Sentence Transformers directory or repository
            (``modules.json``, as the published Qwen3-VL-Embedding models and ``vdr export`` write them) loads its
            Transformer module, after checking that it pools the last token and normalises.
        min_pixels: Smallest page area after resizing (None: keep a loaded processor's own; presets need it).
        max_pixels: Largest page area after resizing (sets the visual-token budget: one token per 32x32 px).
        dtype: Parameter dtype. Keep float32 master weights for mixed-precision training.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        seed: Seed for the random initialisation of presets (hub weights ignore it).
        image_mean: Pixel normalisation mean for presets (hub processors bring their own).
        image_std: Pixel normalisation std for presets.
        linear_patch_embed: Compute the patch embedding as a matmul (same parameters, same outputs, faster).
        initializer_range: Std of the random initialisation of presets (default: the preset's own).
        added_tokens: Whole words to add to the tokenizer as single tokens. They take ids after the released
            special tokens, inside the embedding table's spare rows (Qwen3-VL: 151,936 rows for 151,669 ids).
        lm_head: Load ``Qwen3VLForConditionalGeneration`` (trunk + LM head, what a reranker scores with) instead of
            the bare ``Qwen3VLModel``. A checkpoint without a head (an embedder) gets the head tied to its token
            embeddings, as Qwen3-VL-2B ties them.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    prompts: dict[str, str] = {}
    if name_or_path in PRESETS:
        if min_pixels is None or max_pixels is None:
            raise ValueError(f"preset {name_or_path!r} needs min_pixels and max_pixels")
        preset = PRESETS[name_or_path]
        if initializer_range is not None:
            preset = replace(preset, initializer_range=initializer_range)
        config = preset.config()
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = (Qwen3VLForConditionalGeneration if lm_head else Qwen3VLModel)(config)
        model.to(dtype)
        processor = build_processor(min_pixels, max_pixels, image_mean=image_mean, image_std=image_std)
    else:
        model, processor, prompts = _from_pretrained(name_or_path, min_pixels, max_pixels, dtype, attn_implementation,
                                                     lm_head)
    backbone = Backbone(model=model, processor=processor, source=name_or_path, prompts=prompts)
    if linear_patch_embed:
        use_linear_patch_embed(backbone.trunk)
    if added_tokens:
        add_whole_word_tokens(processor.tokenizer, added_tokens, model.config.text_config.vocab_size)
    return backbone


def _from_pretrained(name_or_path: str, min_pixels: int | None, max_pixels: int | None, dtype: torch.dtype,
                     attn: str, lm_head: bool = False):
    if not os.path.isdir(name_or_path) and "/" not in name_or_path:
        raise ValueError(
            f"unknown backbone {name_or_path!r}: expected a preset ({', '.join(PRESETS)}), a local directory, "
            "or a hub id such as 'Qwen/Qwen3-VL-Embedding-2B'"
        )
    if not os.path.isdir(name_or_path) and (name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"backbone directory {name_or_path!r} does not exist (and it is not a hub id of the "
                                "form owner/name)")
    from transformers import AutoProcessor

    from vdr.models.processor import EMBEDDING_CHAT_TEMPLATE
    from vdr.models.st_format import check_last_token_embedder, embedder_layout

    layout = embedder_layout(name_or_path)
    kwargs = {}
    if layout is not None:
        if not lm_head:  # a reranker reads the LM head's yes/no rows; pooling is an embedder's business
            check_last_token_embedder(layout, name_or_path)
        if layout.transformer_path:
            kwargs["subfolder"] = layout.transformer_path
    # A Qwen3VLForConditionalGeneration checkpoint loads as a trunk too: from_pretrained drops its "model." prefix and
    # LM head.
    model_class = Qwen3VLForConditionalGeneration if lm_head else Qwen3VLModel
    model = model_class.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    if min_pixels is not None or max_pixels is not None:
        size = processor.image_processor.size
        set_pixel_bounds(processor, min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"])
    # Our collator renders with the embedding template whatever the checkpoint ships (an instruct model's
    # template would add thinking or date headers that training and serving would then disagree on).
    processor.tokenizer.chat_template = EMBEDDING_CHAT_TEMPLATE
    processor.chat_template = EMBEDDING_CHAT_TEMPLATE
    return model, processor, dict(layout.prompts) if layout else {}


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the vision tower, the token embeddings and the rest of the text tower."""
    vision = sum(p.numel() for p in model.visual.parameters())
    embed = model.language_model.embed_tokens.weight.numel()
    text = sum(p.numel() for p in model.language_model.parameters()) - embed
    return {"vision": vision, "embeddings": embed, "text": text}


def trunk_hidden_states(trunk: Qwen3VLModel, inputs) -> torch.Tensor:
    """``[B, L, D]`` last hidden states of ``inputs`` (``EncoderInputs``); with several ranks, a text-only batch also
    runs the vision tower idly (first, as an image batch would), so every rank's collectives line up."""
    from vdr.distributed.collectives import world

    idle = idle_vision_term(trunk) if not inputs.has_images and world()[1] > 1 else None
    hidden = trunk(**inputs.model_kwargs(), **vision_kwargs(trunk, inputs), use_cache=False).last_hidden_state
    return hidden if idle is None else hidden + idle


def vision_kwargs(trunk: Qwen3VLModel, inputs) -> dict[str, torch.Tensor]:
    """Precomputed vision-tower inputs (transformers' ``image_*`` keyword arguments) that spare the GPU a stop.

    Without flash attention, each vision block reads the images' segment lengths to the host to split its attention;
    the segments passed as a host tensor make that read free. Flash attention wants them on the device, where the
    model computes them itself.
    """
    if not inputs.has_images or inputs.vision_seqlens is None or is_flash_attention_requested(trunk.visual.config):
        return {}
    # Qwen3VLModel passes its extra keyword arguments on to the language model too, whose attention ignores this one.
    return {"image_cu_seqlens": vision_cu_seqlens(inputs.vision_seqlens)}


def idle_vision_term(trunk: Qwen3VLModel) -> torch.Tensor:
    """A zero that depends on every vision parameter: run the vision tower on one blank 32x32 image.

    Under DDP or FSDP every rank must run the same modules in the same order: a rank whose batch holds no image (text
    queries, text-only documents) would otherwise skip the vision tower, and FSDP's parameter all-gathers (or DDP's
    gradient reduction) would wait forever for it. Adding this term to such a batch's output keeps the collectives
    aligned and changes no value; its gradients are zeros.
    """
    visual = trunk.visual
    config = visual.config
    merge = config.spatial_merge_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    weight = next(visual.parameters())
    grid = torch.tensor([[1, merge, merge]], device=weight.device)  # one image of one visual token
    pixels = torch.zeros(merge * merge, patch_dim, device=weight.device, dtype=weight.dtype)
    total = torch.zeros((), device=weight.device)
    for tensor in _tensors(visual(pixels, grid_thw=grid)):
        total = total + tensor.float().sum()
    return total * 0.0


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor in a model output (tensors, tuples, lists, ModelOutputs), depth first."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]


def set_gradient_checkpointing(trunk: Qwen3VLModel, *, text: bool, vision: bool,
                              vision_images: int | None = None, text_rows: int | None = None) -> None:
    """Recomputes each decoder layer (``text``) and each vision block (``vision``) in the backward instead of keeping
    their activations: non-reentrant ``torch.utils.checkpoint``, active in training mode only. Gradients are unchanged;
    the cost is one more forward of the checkpointed tower.

    ``vision_images`` / ``text_rows``: each vision block checkpoints groups of at most this many images, and each
    decoder layer groups of at most this many rows, separately, so the backward holds one group's activations at a
    time (``vdr.models.checkpoint_tiles``). Each needs its tower's checkpointing.
    """
    if vision_images is not None and not vision:
        raise ValueError("vision_checkpoint_images needs gradient checkpointing of the vision tower")
    if text_rows is not None and not text:
        raise ValueError("text_checkpoint_rows needs gradient checkpointing of the text tower")
    tile_vision_checkpoints(trunk.visual, vision_images)  # None: the released blocks
    tile_text_checkpoints(trunk.language_model, text_rows)
    # Tiled layers checkpoint themselves; transformers' switch stays off for them.
    for tower, enabled in ((trunk.language_model, text and text_rows is None),
                           (trunk.visual, vision and vision_images is None)):
        # transformers 5.2x renamed the switch (the old name warns); the benchmark machines' 5.17 has only the old one.
        if hasattr(tower, "activation_checkpointing_enable"):
            on, off, active = (tower.activation_checkpointing_enable, tower.activation_checkpointing_disable,
                               tower.is_activation_checkpointing)
            kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
        else:
            on, off, active = (tower.gradient_checkpointing_enable, tower.gradient_checkpointing_disable,
                               tower.is_gradient_checkpointing)
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if enabled:
            on(**kwargs)
        elif active:
            off()
