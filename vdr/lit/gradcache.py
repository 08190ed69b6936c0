"""GradCache (Gao et al., 2021): a contrastive step over a batch of any size, in the memory of one mini-batch.

The loss of InfoNCE couples every query with every document, so a plain step keeps the activations of the whole batch
until the backward. GradCache splits the step in three:

1. embed every mini-batch without gradients (keeping only the ``[N, D]`` embeddings) and remember each mini-batch's
   random state;
2. compute the loss on those embeddings and its gradient with respect to them (the "gradient cache");
3. embed each mini-batch again, with gradients and the same random state (same dropout masks), and backpropagate
   the cached gradient through it: ``sum(embeddings * cached_grad)``, whose gradient is the loss's.

The parameter gradients equal the plain loss's; the cost is one extra forward pass. :class:`CachedEmbeddings` holds
steps 1 and 3 for one side (queries or documents); the LightningModule runs step 2 and decides which replays sync
gradients across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vdr.models.inputs import EncoderInputs


@dataclass
class RandomState:
    """The CPU and (when the model is on a GPU) the device's generator states, to replay a forward exactly."""

    cpu: torch.Tensor
    device: torch.device | None = None
    accelerator: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state())

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Runs the block from this state; the generators continue from where they were before it."""
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.accelerator, self.device)
            yield


@dataclass
class Replay:
    """One mini-batch to embed again with gradients, and the gradient its embeddings receive."""

    inputs: EncoderInputs
    state: RandomState
    grad: torch.Tensor  # [b, D]
    encode: Callable[[EncoderInputs], torch.Tensor]
    device: torch.device

    def surrogate(self) -> torch.Tensor:
        """A scalar whose gradient with respect to the parameters is the loss's, through this mini-batch."""
        with self.state.restored():
            embeddings = self.encode(self.inputs.to(self.device))  # [b, D]
        return (embeddings * self.grad.to(embeddings.dtype)).sum()


class CachedEmbeddings:
    """Step 1 for one side of a batch: embeddings of every mini-batch, computed without gradients.

    Args:
        encode: Inputs to ``[b, D]`` embeddings (the bi-encoder). The replays call it with gradients enabled.
        chunks: The side's ``B`` sequences in mini-batches (``EncoderInputs.chunks``: by count, tokens or both).
            Tensors may still be in host memory (page pixels, which a large batch would otherwise hold on the GPU all
            step long): each mini-batch is moved to ``device`` when it runs.
        device: Where the model runs (whose random generator dropout draws from).
        passes: Forward passes to run (default: one per mini-batch). More repeat the last mini-batch and replay it
            with a zero gradient: ranks of a sharded model must all run as many passes as the one that needs most.

    Attributes:
        embeddings: ``[B, D]`` leaf tensor that requires grad: compute the loss on it, then backpropagate so that its
            ``.grad`` holds the gradient cache before calling :meth:`replays`.
    """

    def __init__(self, encode: Callable[[EncoderInputs], torch.Tensor], chunks: list[EncoderInputs],
                 device: torch.device, passes: int | None = None) -> None:
        if not chunks:
            raise ValueError("GradCache needs at least one mini-batch")
        self.encode, self.device, self.chunks = encode, device, chunks
        self.padding = (passes or len(self.chunks)) - len(self.chunks)
        if self.padding < 0:
            raise ValueError(f"{passes} passes for {len(self.chunks)} mini-batches")
        self.states: list[RandomState] = []
        parts = []
        with torch.no_grad():
            for chunk in self.chunks:
                self.states.append(RandomState.capture(device))
                parts.append(encode(chunk.to(device)))  # [b, D]
            for _ in range(self.padding):
                encode(self.chunks[-1].to(device))  # unused: keeps a sharded model's collectives aligned
        self.embeddings = torch.cat(parts).requires_grad_()  # [B, D]

    def replays(self) -> list[Replay]:
        """Step 3's work, one :class:`Replay` per mini-batch, carrying its slice of the gradient cache."""
        if self.embeddings.grad is None:
            raise RuntimeError("no gradient cache: backpropagate the loss to `embeddings` first")
        grads = self.embeddings.grad.split([len(chunk) for chunk in self.chunks])
        replays = [Replay(chunk, state, grad, self.encode, self.device)
                   for chunk, state, grad in zip(self.chunks, self.states, grads)]
        last = replays[-1]
        return replays + [Replay(last.inputs, last.state, torch.zeros_like(last.grad), self.encode, self.device)
                          for _ in range(self.padding)]
