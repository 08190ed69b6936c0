"""The offline Qwen tokenizer and the embedding chat template against the released formats (REFERENCE.md §3)."""

from __future__ import annotations

from vdr.models.processor import EMBEDDING_CHAT_TEMPLATE, FIRST_SPECIAL_ID, SPECIAL_TOKENS, build_qwen_tokenizer
from vdr.models.prompts import EmbeddingPrompts, messages


def test_special_tokens_have_released_ids() -> None:
    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151653, 151655, 151656]
    assert len(tokenizer) == FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) == 151669
    assert tokenizer.pad_token_id == 151643


def test_bpe_matches_released_qwen_ids() -> None:
    tokenizer = build_qwen_tokenizer()
    # The reranker's answer tokens (REFERENCE.md §3) and a word the released vocabulary splits in a known way.
    assert tokenizer.convert_tokens_to_ids(["yes", "no"]) == [9693, 2152]
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    text = "Ünïcödé 東京 2019: revenue $1,234.5\n\n  tabs\t"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_embedding_prompt_format() -> None:
    tokenizer = build_qwen_tokenizer()
    assert tokenizer.chat_template == EMBEDDING_CHAT_TEMPLATE
    prompts = EmbeddingPrompts()
    query = tokenizer.apply_chat_template(messages(prompts.query, text="total revenue 2019"), tokenize=False,
                                          add_generation_prompt=True)
    assert query == (
        "<|im_start|>system\nRetrieve images or text relevant to the user's query.<|im_end|>\n"
        "<|im_start|>user\ntotal revenue 2019<|im_end|>\n<|im_start|>assistant\n"
    )
    page = tokenizer.apply_chat_template(messages(prompts.document, text="caption", num_images=1), tokenize=False,
                                         add_generation_prompt=True)
    assert page == (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>caption<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_system_prompt_when_none_given() -> None:
    tokenizer = build_qwen_tokenizer()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nRepresent the user's input.<|im_end|>\n")
