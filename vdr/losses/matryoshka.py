"""Matryoshka InfoNCE: the contrastive loss summed over nested prefixes of the embedding (Kusupati et al., 2022).

Training on the first ``d`` dimensions of each embedding, renormalised, for several ``d`` at once makes those
prefixes usable embeddings on their own: serving truncates to ``d`` and renormalises (Sentence Transformers'
``truncate_dim``). The reference recipe sums equal-weight losses over 2048/1536/1024/512/256/128/64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vdr.losses.contrastive import InfoNCELoss


class MatryoshkaLoss(InfoNCELoss):
    """``sum_i weights[i] * InfoNCE(q[:, :dims[i]], docs[:, :dims[i]])``, each prefix renormalised to unit length.

    Every term shares the one temperature (``scale = 1 / temperature``, 20 by default), as Sentence Transformers'
    ``MatryoshkaLoss`` around ``MultipleNegativesRankingLoss`` does. Listing the full size among ``dims`` keeps the
    plain InfoNCE term; the loss does not add it by itself.

    Args:
        dims: Prefix sizes to train, e.g. ``[2048, 1536, 1024, 512, 256, 128, 64]``; each at most the embedding size.
        weights: Weight of each prefix's loss, in the order of ``dims`` (default: 1.0 each).
        temperature: Softmax temperature (initial value when learnable).
        learnable_temperature: Learn ``log(1 / temperature)``, clamped so the scale stays within [1, 100].
    """

    def __init__(
        self,
        dims: list[int],
        weights: list[float] | None = None,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__(temperature, learnable_temperature)
        if not dims:
            raise ValueError("dims must list at least one embedding size")
        if any(d <= 0 for d in dims):
            raise ValueError(f"dims must be positive, got {list(dims)}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct, got {list(dims)}")
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"weights must have one entry per dim: {len(weights)} weights for {len(dims)} dims")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative, got {weights}")
        self.dims, self.weights = list(dims), weights

    def check_dim(self, embedding_dim: int) -> None:
        """Raises ``ValueError`` if a prefix is longer than ``embedding_dim`` (call before training starts)."""
        too_large = [d for d in self.dims if d > embedding_dim]
        if too_large:
            raise ValueError(f"MatryoshkaLoss dims {too_large} exceed the embedding size {embedding_dim}")

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        *,
        document_keys: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Weighted sum of the InfoNCE losses of each prefix; arguments as ``InfoNCELoss.forward``.

        Args:
            queries: ``[B, D]`` query embeddings.
            documents: ``[N, D]`` documents, ``N = (1 + k) * B_total``, positives first.
            document_keys: ``[N]`` content hashes for false-negative masking (see ``InfoNCELoss``).
            offset: Column of this batch's first positive.
        """
        self.check_dim(min(queries.shape[-1], documents.shape[-1]))
        total = queries.new_zeros((), dtype=torch.float32)
        for dim, weight in zip(self.dims, self.weights):
            q = F.normalize(queries[:, :dim].float(), dim=-1)  # [B, d]
            docs = F.normalize(documents[:, :dim].float(), dim=-1)  # [N, d]
            total = total + weight * super().forward(q, docs, document_keys=document_keys, offset=offset)
        return total
