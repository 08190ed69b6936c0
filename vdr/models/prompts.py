"""The embedding prompts (REFERENCE.md §3) and the chat messages they become.

The instruction is the system turn; the user turn holds the images first, then the text. Sentence Transformers'
"message" modality builds the same messages from a prompt, so training and serving render identically.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdr.models.processor import DEFAULT_SYSTEM_PROMPT


@dataclass
class EmbeddingPrompts:
    """Instructions that tell the one encoder which side it embeds.

    Args:
        query: System instruction for queries.
        document: System instruction for pages (Qwen's default instruction).
    """

    query: str = "Retrieve images or text relevant to the user's query."
    document: str = DEFAULT_SYSTEM_PROMPT


def messages(instruction: str, *, text: str | None = None, num_images: int = 0) -> list[dict]:
    """Chat messages for one input: images (placeholders; pixels travel separately) before text."""
    content: list[dict] = [{"type": "image"} for _ in range(num_images)]
    if text is not None:
        content.append({"type": "text", "text": text})
    if not content:
        raise ValueError("an input needs text or at least one image")
    return [
        {"role": "system", "content": [{"type": "text", "text": instruction}]},
        {"role": "user", "content": content},
    ]
