"""Gathers across ranks for contrastive training and sharded evaluation.

``gather_with_grad`` is what global in-batch negatives need: every rank sees every rank's documents, and the gradient
a rank's loss sends to another rank's documents flows back to the rank that embedded them (the backward of an
all-gather is a sum over ranks of each chunk's gradient; a backward that keeps only the local chunk's gradient
gives the right loss and wrong gradients, REFERENCE.md §6). Chunks may differ in length across ranks: they are padded
for the collective and trimmed after it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(flag: bool, device: torch.device | str, *, everyone: bool) -> bool:
    """``flag`` combined over every rank: true on all (``everyone``) or on any; this rank's alone without a process
    group. Ranks that must take the same branch (skip a step, save and stop) decide with it."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN if everyone else dist.ReduceOp.MAX)
    return bool(value.item())


def _lengths(x: torch.Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world()[1])]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] == length:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((length - x.shape[0], *x.shape[1:]))])


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenates every rank's ``x`` along dim 0 (rank order), differentiably.

    Returns:
        ``(gathered, offset)``: ``[sum of lengths, ...]`` and the row where this rank's own ``x`` starts in it. On one
        process, ``(x, 0)``.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    lengths = _lengths(x)
    with warnings.catch_warnings():
        # Deprecated in torch 2.14 for a private functional API; it is the public autograd all-gather on every torch
        # we support (2.11+), and its backward works on gloo as well as NCCL.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(_pad(x, max(lengths)))  # backward: sum of every rank's gradient for our chunk
    return torch.cat([part[:n] for part, n in zip(parts, lengths)]), sum(lengths[:rank])


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (lengths along dim 0 may differ), in rank order, without gradients."""
    if world()[1] == 1:
        return [x]
    lengths = _lengths(x)
    padded = _pad(x, max(lengths))
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, lengths)]
