"""Pages made into patches on the device (``vdr.data.pages``) against the HF Qwen2-VL image processor, the reference.

Noise pages are the hardest case for a resize (every pixel an edge, bicubic overshoot clamped everywhere), so they are
the test pages; smooth pages and rendered text pass a fortiori.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from tests.conftest import TINY_PIXELS
from vdr.data.collator import EmbeddingCollator
from vdr.data.datamodule import RetrievalDataModule
from vdr.data.errors import DataError
from vdr.data.images import EncodedImage, decode, verify
from vdr.data.pages import PageFormat, Pages, resize_emulated, resize_fixed_point
from vdr.data.schema import EncodeExample, TrainRows
from vdr.lit.base import BackboneConfig
from vdr.lit.biencoder import BiEncoderModule
from vdr.models.backbone import load_backbone
from vdr.models.prompts import EmbeddingPrompts

MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 40  # 4 to 40 visual tokens: both resize branches are hit
# (width, height): tiny (upscaled), very wide (150:1), very tall, above max_pixels (an A4 scan at 300 dpi), exactly on
# the grid (no resize), odd sizes, and sizes that repeat out of order (one resize batch, pages written back in order).
SIZES = [(5, 7), (3000, 20), (24, 1900), (2480, 3508), (128, 96), (333, 257), (640, 80), (128, 96), (333, 257),
         (90, 700), (64, 64), (1, 1)]


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=generator,
                                         dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def processor():
    return load_backbone("tiny", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).processor


@pytest.mark.parametrize(("source", "target"), [((12, 9), (64, 96)), ((640, 80), (64, 640)), ((3508, 2480), (864, 608)),
                                                ((20, 3000), (32, 2464)), ((1000, 17), (1888, 32)), ((7, 7), (7, 7))])
@pytest.mark.parametrize("resize", [resize_emulated, resize_fixed_point], ids=["emulated", "dispatched"])
def test_fixed_point_resize_is_torchvisions_uint8_bicubic_bit_for_bit(source, target, resize) -> None:
    """(height, width) pairs: upscale, one axis only, a 4x shrink (17 taps), extreme ratios, and no change. The
    emulation is what a GPU runs; on the CPU the dispatch takes PyTorch's own kernel."""
    pixels = torch.randint(0, 256, (2, 3, *source), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    reference = tvF.resize(pixels, list(target), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(resize(pixels, *target), reference)


def test_emulated_resize_on_random_sizes() -> None:
    generator = np.random.default_rng(0)
    for _ in range(20):
        height, width, out_height, out_width = (int(v) for v in generator.integers(1, 400, size=4))
        pixels = torch.from_numpy(generator.integers(0, 256, size=(1, 3, height, width), dtype=np.uint8))
        reference = tvF.resize(pixels, [out_height, out_width], interpolation=tvF.InterpolationMode.BICUBIC,
                               antialias=True)
        assert torch.equal(resize_emulated(pixels, out_height, out_width), reference), (
            (height, width), (out_height, out_width))


@pytest.mark.parametrize("resize", ["dispatched", "emulated"])
@pytest.mark.parametrize("chunk_pixels", [1 << 25, 1], ids=["pages-of-a-size-together", "one-page-at-a-time"])
def test_pages_match_the_processor_bit_for_bit(processor, chunk_pixels, resize, monkeypatch) -> None:
    monkeypatch.setattr("vdr.data.pages.MAX_CHUNK_PIXELS", chunk_pixels)
    if resize == "emulated":  # the route a GPU takes, here on the CPU
        monkeypatch.setattr("vdr.data.pages.resize_fixed_point", resize_emulated)
    images = [_noise(size, i) for i, size in enumerate(SIZES)]
    reference = processor.image_processor(images=images, return_tensors="pt")
    pages = Pages.pack(images, PageFormat.of(processor.image_processor))
    grid = pages.grid_thw()
    assert torch.equal(grid, reference["image_grid_thw"])
    tokens = (grid.prod(-1) // 4).tolist()  # a 150:1 page keeps one 32-px row: more than max_pixels allows
    assert min(tokens) >= 4 and len(set(tokens)) > 5
    ours = pages.pixel_values()
    assert ours.dtype == torch.float32 and ours.shape == reference["pixel_values"].shape
    assert (ours - reference["pixel_values"]).abs().max().item() == 0.0  # the issue asks for <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pages_made_on_a_gpu_match_the_processor_on_the_cpu(processor) -> None:
    images = [_noise(size, i) for i, size in enumerate(SIZES)]
    reference = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pages = Pages.pack(images, PageFormat.of(processor.image_processor)).to("cuda")
    assert torch.equal(pages.pixel_values().cpu(), reference)


def test_pages_slice_to_the_patches_of_their_images(processor) -> None:
    images = [_noise(size, i) for i, size in enumerate(SIZES[:6])]
    pages = Pages.pack(images, PageFormat.of(processor.image_processor))
    alone = Pages.pack(images[2:5], pages.format)
    assert torch.equal(pages.select(2, 5).pixel_values(), alone.pixel_values())


def test_embeddings_match_the_processor_path() -> None:
    """The tiny model embeds the same pages alike whichever route made their patches (cosine within 1e-4)."""
    pixels = 32 * 32 * 16
    images = [_noise(size, i) for i, size in enumerate([(300, 400), (2000, 60), (17, 23), (128, 128), (300, 400)])]
    embeddings = {}
    for route in ("device", "processor"):
        module = BiEncoderModule(BackboneConfig("tiny", pixels // 4, pixels), page_preprocessing=route).eval()
        with torch.no_grad():
            embeddings[route] = module(module.collator.encode_pages(images, EmbeddingPrompts().document))
    cosine = (embeddings["device"] * embeddings["processor"]).sum(-1)
    assert cosine.min().item() > 1 - 1e-4, cosine


def _encoded(image: Image.Image, format: str, **save) -> EncodedImage:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return EncodedImage(buffer.getvalue(), f"<{image.mode} {format}>")


def _modes() -> list[tuple[str, EncodedImage]]:
    base = _noise((70, 50), 0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(70, dtype=np.uint8) * 3, (50, 1))))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    keyed = palette.copy()
    keyed.info["transparency"] = 3  # palette index 3 is transparent
    greyscale_keyed = base.convert("L")
    return [
        ("L", _encoded(base.convert("L"), "PNG")),
        ("LA", _encoded(rgba.convert("LA"), "PNG")),
        ("RGBA", _encoded(rgba, "PNG")),
        ("P", _encoded(palette, "PNG")),
        ("P transparent", _encoded(keyed, "PNG", transparency=3)),
        ("L transparent", _encoded(greyscale_keyed, "PNG", transparency=128)),
        ("CMYK", _encoded(base.convert("CMYK"), "JPEG", quality=95)),
        ("1", _encoded(base.convert("1"), "PNG")),
        ("RGB", _encoded(base, "PNG")),
    ]


def _on_white(image: Image.Image) -> Image.Image:
    """A page as a viewer shows it, made another way than ``vdr.data.images.to_rgb`` (which alpha-composites): pasted
    on white through its alpha band, as Qwen's ``qwen-vl-utils`` does with RGBA pages. Opaque modes pass unchanged."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def _composites_transparency(processor) -> bool:
    """Whether the installed image processor puts transparency on white (transformers >= 5.21) or drops it."""
    clear, white = Image.new("RGBA", (32, 32), (0, 0, 0, 0)), Image.new("RGB", (32, 32), (255, 255, 255))
    out = processor.image_processor(images=[clear, white], return_tensors="pt")["pixel_values"]
    return torch.equal(*out.chunk(2))


@pytest.mark.parametrize(("mode", "encoded"), _modes(), ids=[m for m, _ in _modes()])
def test_image_modes_convert_as_the_processor_does(processor, mode, encoded) -> None:
    """Our decode + device path gives, bit for bit, what the processor gives for the page as a viewer shows it (any
    mode); where the installed processor composites transparency itself, also what it gives for the file's own image."""
    with Image.open(io.BytesIO(encoded.data)) as raw:
        raw.load()
        reference = processor.image_processor(images=[_on_white(raw)], return_tensors="pt")["pixel_values"]
        itself = processor.image_processor(images=[raw], return_tensors="pt")["pixel_values"]
    page = decode(encoded, dataset="d", row=0, column="image")
    assert page.mode == "RGB"
    ours = Pages.pack([page], PageFormat.of(processor.image_processor)).pixel_values()
    assert torch.equal(ours, reference), mode
    if _composites_transparency(processor):
        assert torch.equal(ours, itself), mode


def test_sixteen_bit_pages_are_scaled_not_clipped(processor) -> None:
    """A deliberate difference: the processor's PIL conversion clips 16-bit values at 255 (the page turns white)."""
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    encoded = _encoded(Image.fromarray(levels), "PNG")
    page = np.asarray(decode(encoded, dataset="d", row=0, column="image"))
    assert np.array_equal(page[..., 0], (levels // 256).astype(np.uint8))
    with Image.open(io.BytesIO(encoded.data)) as raw:
        assert np.asarray(raw.convert("RGB"))[32, 32, 0] == 255  # what the processor would see


def test_processors_the_device_path_cannot_reproduce_are_refused(processor) -> None:
    image_processor = processor.image_processor
    original = image_processor.resample
    try:
        image_processor.resample = 2  # bilinear
        with pytest.raises(ValueError, match="page_preprocessing 'processor'"):
            PageFormat.of(image_processor)
    finally:
        image_processor.resample = original
    with pytest.raises(ValueError, match="'device' or 'processor'"):
        EmbeddingCollator(processor, page_preprocessing="gpu")
    import transformers

    if hasattr(transformers, "Qwen2VLImageProcessorPil"):  # the PIL backend: one level apart in a few pixels
        with pytest.warns(UserWarning, match="resizes with PIL"):
            PageFormat.of(transformers.Qwen2VLImageProcessorPil(patch_size=16))


def test_extreme_aspect_ratio_fails_naming_the_row() -> None:
    encoded = _encoded(Image.new("RGB", (2010, 10), "white"), "PNG")
    for check in (verify, decode):  # up front (setup) and when the row loads
        with pytest.raises(DataError, match=r"row 4, column 'negative_0'.*aspect ratios beyond 200:1"):
            check(encoded, dataset="d", row=4, column="negative_0")


def _truncated_jpeg() -> bytes:
    data = _encoded(_noise((200, 200), 1), "JPEG").data
    return data[: len(data) // 2]  # the header verifies; the pixels do not decode


def _table_with_truncated_pages(tmp_path: Path, bad: tuple[int, ...]) -> Path:
    pages = [_encoded(_noise((64, 64), i), "PNG").data for i in range(16)]
    negatives = [_truncated_jpeg() if i in bad else _encoded(_noise((64, 64), 100 + i), "PNG").data
                 for i in range(16)]
    table = datasets.Dataset.from_dict(
        {"query": [f"query {i}" for i in range(16)], "image": [{"bytes": p, "path": None} for p in pages],
         "negative_0": [{"bytes": p, "path": None} for p in negatives]},
        features=datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                                    "negative_0": datasets.Image()}),
    )
    table.save_to_disk(str(tmp_path / "train"))
    return tmp_path / "train"


def test_an_undecodable_page_fails_naming_its_row_or_is_passed_over_and_counted(tmp_path: Path) -> None:
    source = _table_with_truncated_pages(tmp_path, bad=(5, 14, 15))
    table = datasets.load_from_disk(str(source))
    rows = TrainRows(table, "train", num_negatives=1)  # the header check passes
    with pytest.raises(DataError, match=r"row 5, column 'negative_0': cannot decode image"):
        rows[5]
    skipping = TrainRows(table, "train", num_negatives=1, skip_bad_rows=True)
    with pytest.warns(UserWarning, match=r"skipping a training row.*row 5"):
        example = skipping[5]
    assert (example.row, example.skipped) == (6, 1)  # the next row takes its place
    with pytest.warns(UserWarning, match=r"row 15"):
        example = skipping[14]
    assert (example.row, example.skipped) == (0, 2)  # past the end: from the first row again
    assert (skipping[3].row, skipping[3].skipped) == (3, 0)


def test_skipping_keeps_batches_whole_and_counts_in_a_fit(tmp_path: Path) -> None:
    source = _table_with_truncated_pages(tmp_path, bad=(5,))
    module = BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS))
    data = RetrievalDataModule(train=str(source), batch_size=4, skip_bad_rows=True)
    sizes = []

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sizes.append((len(batch), batch.skipped))

    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Sizes()])
    with pytest.warns(UserWarning, match="row 5"):
        trainer.fit(module, datamodule=data)
    assert sorted(sizes) == [(4, 0), (4, 0), (4, 0), (4, 1)]
    assert trainer.callback_metrics["data/skipped_rows"].item() == 1.0


def test_collators_convert_pages_of_any_mode(processor) -> None:
    """Pages given straight to a collator (an encoder's ``pages``) convert alike on both routes, as a viewer shows
    them, whatever the installed processor would do with them (before transformers 5.21 it drops alpha)."""
    pages = [Image.new("L", (64, 48), 90), Image.new("RGBA", (40, 40), (10, 200, 30, 128))]
    on_white = EmbeddingCollator(processor, page_preprocessing="processor").encode_pages(
        [_on_white(p) for p in pages], "d").pixel_values
    for route in ("device", "processor"):
        inputs = EmbeddingCollator(processor, page_preprocessing=route).encode_pages(pages, "d")
        assert torch.equal(inputs.model_kwargs()["pixel_values"], on_white), route


def test_batches_pin_every_tensor_they_hold(processor, monkeypatch) -> None:
    """``DataLoader(pin_memory=True)`` calls a batch's ``pin_memory``: every tensor, nested pages included, is pinned
    and the structure (shapes, format, counts) survives. Pinning needs a GPU, so it is recorded here instead."""
    from vdr.data.schema import TrainExample

    collator = EmbeddingCollator(processor)
    pages = [[_noise((64, 80), 2 * r), _noise((90, 40), 2 * r + 1)] for r in range(2)]
    batch = collator([TrainExample(r, f"q{r}", pages[r], [2 * r, 2 * r + 1], skipped=r) for r in range(2)])
    pinned = []

    def fake_pin(tensor):
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    sides = [out.queries, out.documents]
    tensors = [getattr(side, name) for side in sides for name in ("input_ids", "attention_mask", "mm_token_type_ids")]
    tensors += [out.documents.image_grid_thw, out.documents.pages.pixels, out.document_keys, out.rows]
    assert all(any(t is p for p in pinned) for t in tensors)
    assert out.documents.pages.shapes == batch.documents.pages.shapes and out.skipped == 1
    assert torch.equal(out.documents.model_kwargs()["pixel_values"], batch.documents.model_kwargs()["pixel_values"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pinning_loader_pins_the_pages(processor) -> None:
    images = [_noise((64, 80), i) for i in range(4)]
    examples = [EncodeExample(index=i, image=image) for i, image in enumerate(images)]
    loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=EmbeddingCollator(processor),
                                         pin_memory=True)
    assert next(iter(loader)).inputs.pages.pixels.is_pinned()
