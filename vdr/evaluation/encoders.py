"""Anything that embeds queries and pages, behind one small interface, so one evaluator serves every model source.

``load_encoder`` picks the route from what it is given:

- a ``.ckpt`` file written by ``vdr fit``: our own module (``BiEncoder`` + ``EmbeddingCollator``);
- a Sentence Transformers directory or hub repository (``modules.json``), e.g. a ``vdr export`` or the published
  ``Qwen/Qwen3-VL-Embedding-2B``: ``SentenceTransformer(path)``, no code of ours;
- any other Hugging Face Qwen3-VL directory or hub id: our module around ``from_pretrained`` with the default
  embedding prompts (REFERENCE.md §3).
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image

from vdr.data.collator import EmbeddingCollator
from vdr.models.biencoder import BiEncoder
from vdr.models.prompts import EmbeddingPrompts


class Encoder(Protocol):
    """Embeds a batch of query texts or of page images as ``[N, D]`` unit vectors (float32)."""

    def queries(self, texts: list[str]) -> torch.Tensor: ...

    def pages(self, images: list[Image.Image]) -> torch.Tensor: ...


class ModuleEncoder:
    """Our bi-encoder and collator: the same code path as training and the validation callback.

    Args:
        model: The bi-encoder.
        collator: Renders and tokenizes inputs (its prompts are the query and document instructions).
        device: Where to run.
    """

    def __init__(self, model: BiEncoder, collator: EmbeddingCollator, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.collator = collator
        self.device = torch.device(device)

    @torch.inference_mode()
    def queries(self, texts: list[str]) -> torch.Tensor:
        inputs = self.collator.encode_texts(texts, self.collator.prompts.query)
        return self.model(move_data_to_device(inputs, self.device)).cpu()  # [N, D]

    @torch.inference_mode()
    def pages(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.collator.encode_pages(images, self.collator.prompts.document)
        return self.model(move_data_to_device(inputs, self.device)).cpu()  # [N, D]


class SentenceTransformerEncoder:
    """A ``SentenceTransformer``: queries through ``encode_query``, pages through ``encode_document``."""

    def __init__(self, model) -> None:
        self.model = model

    def _encode(self, method, values: list) -> torch.Tensor:
        embeddings = method(values, batch_size=len(values), convert_to_tensor=True, show_progress_bar=False)
        return F.normalize(embeddings.float().cpu(), dim=-1)  # [N, D]; truncate_dim leaves them unnormalised

    def queries(self, texts: list[str]) -> torch.Tensor:
        return self._encode(self.model.encode_query, texts)

    def pages(self, images: list[Image.Image]) -> torch.Tensor:
        return self._encode(self.model.encode_document, images)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_sentence_transformers_model(name_or_path: str) -> bool:
    """Whether a directory or hub repository holds a Sentence Transformers pipeline (``modules.json``)."""
    from vdr.models.st_format import embedder_layout

    return embedder_layout(name_or_path) is not None


def model_route(model: str) -> Literal["checkpoint", "sentence-transformers", "hugging-face"]:
    """How a model argument of ``vdr evaluate`` loads: a ``vdr fit`` checkpoint (a file, or an FSDP run's sharded
    directory), a Sentence Transformers directory or hub repository (``modules.json``), or a plain Hugging Face
    directory or hub id."""
    from vdr.lit.checkpoint import is_sharded_checkpoint

    if os.path.isfile(model) or is_sharded_checkpoint(model):
        return "checkpoint"
    if not os.path.isdir(model) and "/" not in model:
        raise FileNotFoundError(f"{model} is neither a checkpoint file, a directory, nor a hub id (owner/name)")
    return "sentence-transformers" if is_sentence_transformers_model(model) else "hugging-face"


def load_encoder(model: str, device: str | None = None) -> Encoder:
    """Loads a checkpoint, a Sentence Transformers model, or a Hugging Face Qwen3-VL as an :class:`Encoder`.

    Args:
        model: A ``.ckpt`` file, a directory, or a hub id.
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
    """
    device = device or default_device()
    route = model_route(model)
    if route == "checkpoint":
        from vdr.lit.biencoder import BiEncoderModule

        module = BiEncoderModule.from_checkpoint(model)
        return ModuleEncoder(module.model, module.collator, device)
    if route == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformerEncoder(SentenceTransformer(model, device=device))
    from vdr.models.backbone import load_backbone

    backbone = load_backbone(model, min_pixels=None, max_pixels=None)
    collator = EmbeddingCollator(backbone.processor, EmbeddingPrompts())
    return ModuleEncoder(BiEncoder(backbone.model), collator, device)
