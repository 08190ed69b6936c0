"""The collator against the HF Qwen3-VL processor (the reference), and the batch layout the loss relies on."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vdr.data.collator import EmbeddingCollator
from vdr.data.schema import EncodeExample, TrainExample
from vdr.models.backbone import load_backbone
from vdr.models.prompts import EmbeddingPrompts, messages

# Varied sizes and aspect ratios: tiny (upscaled to min_pixels), very wide, tall, and above max_pixels.
SIZES = [(12, 9), (640, 80), (90, 700), (333, 257), (1200, 1600), (64, 64)]


def _page(size: tuple[int, int], seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def processor():
    # Bounds that make the sizes above hit both the upscale and the downscale branches of the resize.
    return load_backbone("tiny", min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 40).processor


def _reference(processor, rendered: list[str], images: list[Image.Image] | None):
    return processor(text=rendered, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("page_preprocessing", ["device", "processor"])
def test_pages_match_the_hf_processor(processor, page_preprocessing) -> None:
    collator = EmbeddingCollator(processor, EmbeddingPrompts(), page_preprocessing=page_preprocessing)
    images = [_page(size, i) for i, size in enumerate(SIZES)]
    texts = ["a caption", None, "", "x" * 5, None, "chart of revenue"]
    ours = collator.encode_pages(images, "Represent the user's input.", texts)
    assert (ours.pages is not None) == (page_preprocessing == "device")
    rendered = [collator.render(messages("Represent the user's input.", text=t, num_images=1)) for t in texts]
    reference = _reference(processor, rendered, images)
    kwargs = ours.model_kwargs()  # the device path makes its patches here, bit-identical to the processor's
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(kwargs[name].to(reference[name].dtype), reference[name]), name
    tokens = (ours.input_ids == 151655).sum(1)
    assert torch.equal(tokens, ours.image_grid_thw.prod(-1) // 4)
    assert tokens.min() >= 4 and tokens.max() <= 40


def test_queries_match_the_hf_processor(processor) -> None:
    collator = EmbeddingCollator(processor, EmbeddingPrompts())
    texts = ["what was Acme revenue in 2019", "a", "Ünïcödé — naïve café; 東京 123"]
    ours = collator.encode_texts(texts, EmbeddingPrompts().query)
    reference = _reference(processor, [collator.render(messages(EmbeddingPrompts().query, text=t)) for t in texts],
                           None)
    assert torch.equal(ours.input_ids, reference["input_ids"])
    assert torch.equal(ours.attention_mask, reference["attention_mask"])
    assert ours.pixel_values is None and ours.mm_token_type_ids.sum() == 0


def test_long_text_is_shortened_but_keeps_the_pooled_tail(processor) -> None:
    collator = EmbeddingCollator(processor, EmbeddingPrompts(), max_text_tokens=8)
    inputs = collator.encode_texts(["word " * 500], "q")
    tail = processor.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert inputs.input_ids.shape[1] < 40
    assert inputs.input_ids[0, -len(tail):].tolist() == tail


def _pixels(inputs) -> torch.Tensor:
    """The patches the model reads (the device path makes them from the pages here)."""
    return inputs.model_kwargs()["pixel_values"]


def test_train_batch_is_column_major_with_keys(processor) -> None:
    collator = EmbeddingCollator(processor)
    pages = [[_page((64, 64), 10 * r + c) for c in range(3)] for r in range(2)]
    examples = [TrainExample(row=r, query=f"q{r}", pages=pages[r], page_keys=[100 * r + c for c in range(3)])
                for r in range(2)]
    batch = collator(examples)
    # [positives of rows 0, 1; negative_0 of rows 0, 1; negative_1 of rows 0, 1]
    assert batch.document_keys.tolist() == [0, 100, 1, 101, 2, 102]
    assert len(batch.queries) == 2 and len(batch.documents) == 6
    assert batch.rows.tolist() == [0, 1]
    single = collator.encode_pages([pages[1][0]], EmbeddingPrompts().document)
    patches = _pixels(single).shape[0]
    assert torch.equal(_pixels(batch.documents)[patches : 2 * patches], _pixels(single))


def test_encode_examples_keep_their_index(processor) -> None:
    collator = EmbeddingCollator(processor)
    batch = collator([EncodeExample(index=7, text="a"), EncodeExample(index=3, text="b")])
    assert batch.index.tolist() == [7, 3]
    pages = collator([EncodeExample(index=1, image=_page((50, 50), 0))])
    assert pages.inputs.has_images and pages.inputs.pages is not None


@pytest.mark.parametrize("page_preprocessing", ["device", "processor"])
def test_head_keeps_exactly_the_first_sequences_images(processor, page_preprocessing) -> None:
    collator = EmbeddingCollator(processor, page_preprocessing=page_preprocessing)
    images = [_page(size, i) for i, size in enumerate(SIZES)]
    everything = collator.encode_pages(images, "d")
    first = collator.encode_pages(images[:3], "d")
    head = everything.head(3)
    assert torch.equal(_pixels(head), _pixels(first))
    assert torch.equal(head.image_grid_thw, first.image_grid_thw)
    width = first.input_ids.shape[1]
    assert torch.equal(head.input_ids[:, :width], first.input_ids)
    assert head.input_ids.shape[1] == width  # trimmed to its own longest sequence


@pytest.mark.parametrize("page_preprocessing", ["device", "processor"])
def test_chunks_hold_exactly_their_sequences_and_images(processor, page_preprocessing) -> None:
    collator = EmbeddingCollator(processor, page_preprocessing=page_preprocessing)
    images = [_page(size, i) for i, size in enumerate(SIZES)]
    texts = [None, "a caption", None, "another, longer caption of the page", None, "six"]
    everything = collator.encode_pages(images, "d", texts)
    chunks = everything.chunks(2)
    assert [len(c) for c in chunks] == [min(2, len(images) - i) for i in range(0, len(images), 2)]
    for i, chunk in zip(range(0, len(images), 2), chunks):
        alone = collator.encode_pages(images[i : i + 2], "d", texts[i : i + 2])  # the collator's own padding
        ours, reference = chunk.model_kwargs(), alone.model_kwargs()
        for name in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(ours[name], reference[name]), (i, name)
    queries = collator.encode_texts(["q one", "a longer query two", "q3"], "q").chunks(2)
    assert not queries[1].has_images and queries[1].input_ids.shape == (1, queries[1].attention_mask.sum())
