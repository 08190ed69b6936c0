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


def test_token_budget_chunks_keep_order_and_stay_within_the_budget(processor) -> None:
    collator = EmbeddingCollator(processor)
    images = [_page(size, i) for i, size in enumerate(SIZES)]
    pages = collator.encode_pages(images, "d", [None, "a caption", None, "another, longer caption", None, "six"])
    queries = collator.encode_texts(["q one", "a longer query two", "q3", "four", "five", "query six"], "q")
    for inputs in (pages, queries):
        lengths = inputs.attention_mask.sum(1).tolist()
        for budget in (1, max(lengths), 2 * max(lengths), 10**6):
            for size in (None, 2):
                chunks = inputs.chunks(size, budget)
                assert sum(len(c) for c in chunks) == len(inputs)  # every sequence once, in order
                assert torch.equal(torch.cat([c.input_ids[:, 0] for c in chunks]), inputs.input_ids[:, 0])
                for chunk in chunks:
                    padded = len(chunk) * chunk.input_ids.shape[1]
                    assert padded <= budget or len(chunk) == 1  # a sequence over the budget goes alone
                    assert size is None or len(chunk) <= size
                # Greedy: no chunk could have taken the next chunk's first sequence.
                start = 0
                for chunk in chunks[:-1]:
                    start += len(chunk)
                    grown = (len(chunk) + 1) * max(chunk.input_ids.shape[1], lengths[start])
                    assert grown > budget or (size is not None and len(chunk) == size)
    # Short queries share one pass under a budget that splits the pages.
    budget = 2 * max(pages.attention_mask.sum(1).tolist())
    assert len(queries.chunks(tokens=budget)) == 1 and len(pages.chunks(tokens=budget)) > 1
    with pytest.raises(ValueError, match="size, a token budget or both"):
        pages.chunks()
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        pages.chunks(tokens=0)


@pytest.mark.parametrize("page_preprocessing", ["device", "processor"])
def test_host_positions_and_vision_segments_match_what_the_model_derives(tiny_backbone, page_preprocessing,
                                                                          monkeypatch) -> None:
    """The collator's M-RoPE positions equal ``get_rope_index``'s; given them and the host segment lengths, the model
    skips both computations (which read GPU tensors back to the host) and gives bit-identical hidden states."""
    from dataclasses import replace

    from vdr.models import backbone
    from vdr.models.backbone import trunk_hidden_states
    from vdr.models.inputs import vision_cu_seqlens

    trunk = tiny_backbone.model.eval()
    collator = EmbeddingCollator(tiny_backbone.processor, page_preprocessing=page_preprocessing)
    images = [_page(size, i) for i, size in enumerate(SIZES)]
    inputs = collator.encode_pages(images, "d", [None, "a caption", None, "another, longer caption", None, "six"])
    expected, _ = trunk.get_rope_index(inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
                                       image_grid_thw=inputs.image_grid_thw, attention_mask=inputs.attention_mask)
    assert torch.equal(inputs.position_ids, expected)
    for chunk in inputs.chunks(2):  # sliced with their rows and images
        mine, _ = trunk.get_rope_index(chunk.input_ids, mm_token_type_ids=chunk.mm_token_type_ids,
                                       image_grid_thw=chunk.image_grid_thw, attention_mask=chunk.attention_mask)
        assert torch.equal(chunk.position_ids, mine)
        assert list(chunk.vision_seqlens) == chunk.image_grid_thw.prod(-1).tolist()
    with torch.no_grad():
        derived = trunk_hidden_states(trunk, replace(inputs, position_ids=None, vision_seqlens=None))
        segments = []
        attention = type(trunk.visual.blocks[0].attn)
        forward = attention.forward
        monkeypatch.setattr(attention, "forward", lambda self, hidden, cu_seqlens, *a, **k: (
            segments.append(cu_seqlens), forward(self, hidden, cu_seqlens, *a, **k))[1])
        monkeypatch.setattr(type(trunk), "get_rope_index", lambda *a, **k: pytest.fail("positions were recomputed"))
        made = []
        monkeypatch.setattr(backbone, "vision_cu_seqlens", lambda seqlens: made.append(vision_cu_seqlens(seqlens))
                            or made[-1])
        given = trunk_hidden_states(trunk, inputs)
    assert torch.equal(given, derived)
    assert len(segments) == len(trunk.visual.blocks) and len(made) == 1
    assert all(s is made[0] for s in segments)  # ours, not recomputed by the model
    assert made[0].tolist() == [0, *inputs.image_grid_thw.prod(-1).cumsum(0).tolist()]
