"""Anything that scores (query, page) pairs, behind one small interface: our reranker module or a ``CrossEncoder``.

``load_scorer`` picks the route from what it is given, as ``load_encoder`` does for retrievers:

- a ``.ckpt`` file written by ``vdr fit`` for a reranker: our module (``Reranker`` + ``RerankCollator``);
- a Sentence Transformers ``CrossEncoder`` directory or hub repository (``modules.json``), e.g. a ``vdr export``;
- any other Hugging Face Qwen3-VL directory or hub id (e.g. ``Qwen/Qwen3-VL-Reranker-2B``): our module around
  ``from_pretrained`` with the default instruction (REFERENCE.md §3).

Scores are log-odds (``logit("yes") - logit("no")``) on every route, so they compare across routes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image

from vdr.data.rerank_collator import RerankCollator
from vdr.evaluation.encoders import default_device, model_route
from vdr.models.reranker import Reranker, yes_no_token_ids


class Scorer(Protocol):
    """Scores ``[N]`` (query, page) pairs as float32 log-odds."""

    def score(self, queries: list[str], images: list[Image.Image]) -> torch.Tensor: ...


class ModuleScorer:
    """Our reranker and collator: the same code path as training and the rerank callback."""

    def __init__(self, model: Reranker, collator: RerankCollator, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.collator = collator
        self.device = torch.device(device)

    @torch.inference_mode()
    def score(self, queries: list[str], images: list[Image.Image]) -> torch.Tensor:
        inputs = self.collator.encode_pairs(queries, images)
        return self.model(move_data_to_device(inputs, self.device)).float().cpu()  # [N]


class CrossEncoderScorer:
    """A Sentence Transformers ``CrossEncoder``, asked for raw log-odds (no activation)."""

    def __init__(self, model) -> None:
        self.model = model

    def score(self, queries: list[str], images: list[Image.Image]) -> torch.Tensor:
        scores = self.model.predict(list(zip(queries, images)), batch_size=len(queries), convert_to_tensor=True,
                                    activation_fn=torch.nn.Identity(), show_progress_bar=False)
        return scores.float().cpu().reshape(-1)  # [N]


def load_scorer(model: str, device: str | None = None) -> Scorer:
    """Loads a reranker checkpoint, a ``CrossEncoder`` directory or hub id, or a Hugging Face Qwen3-VL.

    Args:
        model: A ``.ckpt`` file, a directory, or a hub id.
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
    """
    device = device or default_device()
    route = model_route(model)
    if route == "checkpoint":
        from vdr.lit.reranker import RerankerModule

        module = RerankerModule.from_checkpoint(model)
        return ModuleScorer(module.model, module.collator, device)
    if route == "sentence-transformers":
        from sentence_transformers import CrossEncoder

        return CrossEncoderScorer(CrossEncoder(model, device=device))
    from vdr.models.backbone import load_backbone

    backbone = load_backbone(model, min_pixels=None, max_pixels=None, lm_head=True)
    reranker = Reranker(backbone.model, *yes_no_token_ids(backbone.processor.tokenizer))
    return ModuleScorer(reranker, RerankCollator(backbone.processor), device)
