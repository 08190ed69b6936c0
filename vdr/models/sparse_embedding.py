"""Token-embedding gradients added row by row: no dense temporary the size of the table in each backward.

The backward of a token lookup (``F.embedding``) builds a gradient as large as the whole table, zero except in the
rows of the batch's tokens, and autograd then adds it to ``.grad``. For Qwen3-VL that table is 151,936 x 2048 (593 MiB
in bf16): with GradCache every replay after the first holds that temporary beside ``.grad`` at the end of its backward,
0.58 GiB above the weights, gradients and optimizer state (docs/LOG.md, 2026-11-28), for a gradient that touches a few
thousand rows.

:func:`sparse_embedding_gradients` makes the lookup's backward return a sparse gradient instead (``sparse=True``: the
rows' indices and the output gradient itself, no copy), which autograd adds into the dense ``.grad`` in place. The
first backward of a step, which finds no ``.grad``, would store the sparse tensor itself: a hook turns it dense there
and then, so the optimizer, gradient clipping, DDP's reduction and checkpoints see the dense gradient they always
did. The values are the same sums, taken in another order (float rounding differs, in bf16 by an ulp).

The lookup registers that hook itself, on the weight it finds, whenever the weight lacks it: a deep copy or a pickle of
the module (which keep the class but drop a tensor's hooks) and a replaced weight stay dense where they should.

The module's ``sparse`` attribute stays False on purpose: DDP reads it to expect sparse gradients for the parameter,
while here the parameter's gradient is dense by the time DDP reduces it. FSDP2 reduce-scatters the gradient of its
unsharded parameter, which this hook does not reach: :func:`vdr.distributed.fsdp.shard_module` refuses the option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SparseGradEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookup returns a sparse gradient that lands in a dense ``.grad`` (see the module)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad and self.weight.is_leaf and not _hooked(self.weight):  # not a functional call's
            self.weight.register_post_accumulate_grad_hook(_densify)
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse=True)


def _densify(weight: torch.Tensor) -> None:
    """After a gradient is accumulated: a sparse ``.grad`` (the step's first) becomes dense; later ones add into it."""
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()


def _hooked(weight: torch.Tensor) -> bool:
    hooks = weight._post_accumulate_grad_hooks  # None until a hook is registered; copies and pickles start without
    return hooks is not None and any(hook is _densify for hook in hooks.values())


def sparse_embedding_gradients(embedding: nn.Embedding, enabled: bool) -> None:
    """Switches ``embedding`` (a model's token embeddings) to sparse lookup gradients, or back (``enabled=False``).

    Parameters, names and state dict are unchanged. Nothing to do for a frozen table: that is refused.
    """
    on = isinstance(embedding, SparseGradEmbedding)
    if enabled == on:
        return
    if enabled:
        if type(embedding) is not nn.Embedding:
            raise TypeError(f"sparse embedding gradients need a plain nn.Embedding, got {type(embedding).__name__}")
        if not embedding.weight.requires_grad:
            raise ValueError("sparse_embedding_grad is set but the token embeddings are frozen (e.g. "
                             "freeze_token_embeddings or LoRA): they have no gradient to make sparse")
        if embedding.max_norm is not None:
            raise ValueError("sparse embedding gradients do not combine with an embedding's max_norm")
        embedding.__class__ = SparseGradEmbedding  # its first lookup registers the hook
    else:
        embedding.__class__ = nn.Embedding
        hooks = embedding.weight._post_accumulate_grad_hooks or {}
        for key in [key for key, hook in hooks.items() if hook is _densify]:
            del hooks[key]


def has_sparse_gradients(embedding: nn.Module) -> bool:
    return isinstance(embedding, SparseGradEmbedding)
