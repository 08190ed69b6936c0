"""Examples to Qwen3-VL tensors: chat rendering, page sizing, image-token expansion, padding.

The HF processor is the reference for every tensor made here (tests compare them). Pages leave the collator in one of
two forms (``page_preprocessing``): ``"device"`` packs their decoded uint8 pixels and leaves resizing, normalization
and patching to the training device (``vdr.data.pages``, bit-identical to the processor on the CPU); ``"processor"``
runs the HF image processor here, in the DataLoader worker. Either way the grid and token count of each page are known
here. Two things differ from the processor in route, not result: each ``<|image_pad|>`` placeholder is tokenized once
and expanded to its visual-token count in id space (the processor expands a string of thousands of pad tokens and
tokenizes it), and over-long texts are shortened before rendering so the template's tail, whose last token is the
one pooled, always survives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from PIL import Image

from vdr.data.images import to_rgb
from vdr.data.pages import PageFormat, Pages
from vdr.data.schema import EncodeExample, TrainExample
from vdr.models.inputs import EncoderInputs, mrope_position_ids
from vdr.models.prompts import EmbeddingPrompts, messages


class Pinnable:
    """A batch dataclass that ``DataLoader(pin_memory=True)`` pins: every tensor in it, nested ones included, moves to
    page-locked memory in the loader's pinning thread, so the copy to the GPU runs asynchronously."""

    def pin_memory(self):
        return apply_to_collection(self, torch.Tensor, lambda tensor: tensor.pin_memory())


@dataclass
class RetrievalBatch(Pinnable):
    """A training batch: B queries and their pages, positives first then each hard-negative column."""

    queries: EncoderInputs  # B sequences
    documents: EncoderInputs  # B * (1 + k) sequences: [positives; negative_0 of every row; ...]
    document_keys: torch.Tensor  # [B * (1 + k)] int64 content hashes, for false-negative masking
    rows: torch.Tensor  # [B] dataset rows, for messages about a batch
    skipped: int = 0  # undecodable rows passed over to fill this batch (skip_bad_rows)

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class EncodeBatch(Pinnable):
    """Eval queries or corpus pages to embed, with their rows in their table."""

    inputs: EncoderInputs
    index: torch.Tensor  # [B] int64


PagePreprocessing = Literal["device", "processor"]


class ChatCollator:
    """Chat rendering and tokenization shared by the embedding and reranker collators.

    Args:
        processor: A Qwen3-VL processor (its tokenizer renders chats; its image processor sizes pages).
        max_text_tokens: Longest text, in tokens, before the chat template is added.
        chat_template: Template to render with (default: the tokenizer's own).
        page_preprocessing: ``"device"``: pages leave as uint8 pixels, made into patches on the device at the forward;
            ``"processor"``: the HF image processor makes the patches here.
    """

    def __init__(self, processor, max_text_tokens: int = 256, chat_template: str | None = None,
                 page_preprocessing: PagePreprocessing = "device") -> None:
        if page_preprocessing not in ("device", "processor"):
            raise ValueError(f"page_preprocessing must be 'device' or 'processor', got {page_preprocessing!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_text_tokens = max_text_tokens
        self.chat_template = chat_template
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_area = self.image_processor.merge_size**2
        # None: the processor makes the patches here.
        self.page_format = PageFormat.of(self.image_processor) if page_preprocessing == "device" else None

    def render(self, chat: list[dict]) -> str:
        """The exact string the model reads (before image-token expansion)."""
        return self.tokenizer.apply_chat_template(chat, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def _shorten(self, text: str | None) -> str | None:
        if text is None:
            return None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_tokens else self.tokenizer.decode(ids[: self.max_text_tokens])

    def _tokenize(self, rendered: list[str], images: list[Image.Image]) -> EncoderInputs:
        """Tokenizes rendered chats whose image placeholders take ``images`` in order, and pads them on the right."""
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        pixel_values = grid = pages = None
        tokens_per_image: list[int] = []
        # Both routes see a page as a viewer shows it, whatever the installed processor does with one: transformers
        # before 5.21 dropped the alpha band (transparent regions take whatever colour lies under them).
        images = [to_rgb(i) if isinstance(i, Image.Image) else i for i in images]
        if images and self.page_format is not None:
            pages = Pages.pack(images, self.page_format)
            grid = pages.grid_thw()  # [I, 3]
        elif images:
            vision = self.image_processor(images=images, return_tensors="pt")
            pixel_values, grid = vision["pixel_values"], vision["image_grid_thw"]  # [P, 1536], [I, 3]
        if images:
            tokens_per_image = (grid.prod(-1) // self.merge_area).tolist()
        expanded, next_image = [], 0
        for sequence in ids:
            out: list[int] = []
            for token in sequence:
                if token == self.image_token_id:
                    out.extend([token] * tokens_per_image[next_image])
                    next_image += 1
                else:
                    out.append(token)
            expanded.append(out)
        if next_image != len(tokens_per_image):
            raise ValueError(f"{len(tokens_per_image)} images for {next_image} image placeholders")
        length = max(len(s) for s in expanded)
        input_ids = torch.full((len(expanded), length), self.tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(expanded), length), dtype=torch.int64)
        for row, sequence in enumerate(expanded):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32) * attention_mask.to(torch.int32)
        if not images:
            return EncoderInputs(input_ids, attention_mask, mm_token_type_ids)
        # Host-side rope positions and vision attention segments (see EncoderInputs): single frames only.
        positions = mrope_position_ids(attention_mask, mm_token_type_ids, grid, self.image_processor.merge_size)
        seqlens = tuple(h * w for _, h, w in grid.tolist()) if bool((grid[:, 0] == 1).all()) else None
        return EncoderInputs(input_ids, attention_mask, mm_token_type_ids, pixel_values, grid, pages,
                             position_ids=positions, vision_seqlens=seqlens)


class EmbeddingCollator(ChatCollator):
    """Turns examples into padded Qwen3-VL inputs rendered with the embedding chat template.

    Args:
        processor: A Qwen3-VL processor (its tokenizer carries the chat template; its image processor the bounds).
        prompts: The query and document instructions.
        max_text_tokens: Longest query or page text, in tokens, before the template is added.
        page_preprocessing: Where pages become patches (see :class:`ChatCollator`).
    """

    def __init__(self, processor, prompts: EmbeddingPrompts | None = None, max_text_tokens: int = 256,
                 page_preprocessing: PagePreprocessing = "device") -> None:
        super().__init__(processor, max_text_tokens, page_preprocessing=page_preprocessing)
        self.prompts = prompts or EmbeddingPrompts()

    def __call__(self, examples: list) -> RetrievalBatch | EncodeBatch:
        if isinstance(examples[0], TrainExample):
            return self.collate_train(examples)
        return self.collate_encode(examples)

    def collate_train(self, examples: list[TrainExample]) -> RetrievalBatch:
        columns = len(examples[0].pages)
        if any(len(e.pages) != columns for e in examples):
            raise ValueError("all rows of a batch must have the same number of hard negatives")
        pages = [e.pages[c] for c in range(columns) for e in examples]  # column-major: positives first
        keys = [e.page_keys[c] for c in range(columns) for e in examples]
        return RetrievalBatch(
            queries=self.encode_texts([e.query for e in examples], self.prompts.query),
            documents=self.encode_pages(pages, self.prompts.document),
            document_keys=torch.tensor(keys, dtype=torch.int64),
            rows=torch.tensor([e.row for e in examples], dtype=torch.int64),
            skipped=sum(e.skipped for e in examples),
        )

    def collate_encode(self, examples: list[EncodeExample]) -> EncodeBatch:
        index = torch.tensor([e.index for e in examples], dtype=torch.int64)
        if examples[0].image is None:
            return EncodeBatch(self.encode_texts([e.text for e in examples], self.prompts.query), index)
        texts = [e.text for e in examples]
        return EncodeBatch(self.encode_pages([e.image for e in examples], self.prompts.document, texts), index)

    def encode_texts(self, texts: list[str], instruction: str) -> EncoderInputs:
        """Text-only inputs (queries)."""
        rendered = [self.render(messages(instruction, text=self._shorten(t))) for t in texts]
        return self._tokenize(rendered, images=[])

    def encode_pages(self, images: list[Image.Image], instruction: str,
                     texts: list[str | None] | None = None) -> EncoderInputs:
        """One page image per input, optionally followed by text (image + text documents)."""
        texts = texts or [None] * len(images)
        rendered = [self.render(messages(instruction, text=self._shorten(t), num_images=1)) for t in texts]
        return self._tokenize(rendered, images=images)
