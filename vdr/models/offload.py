"""Activation offloading: tensors the backward needs wait in host memory instead of on the GPU.

With gradient checkpointing, what autograd keeps between a forward and its backward is mostly each checkpointed
layer's input (the hidden states between layers: ``pages x patches x 1024`` per vision block, ``rows x tokens x 2048``
per decoder layer of the 2B model). :class:`OffloadActivations` copies such tensors into pinned host memory as the
forward saves them and back to the GPU as the backward unpacks them (when the checkpointed layer is recomputed). Both
copies are queued on the current stream without waiting for it, so the GPU keeps working; the stream's order makes
reusing the freed GPU memory safe. Gradients are unchanged: the same values come back.

Parameters and views of them (a linear layer saves its weight transposed), small tensors (masks, position ids),
expanded views and tensor subclasses stay where they are. A small activation that is a view of a large one (one tile of
a checkpointed layer's rows) is offloaded: left on the GPU it would keep the whole tensor there. Without checkpointing
every saved activation is offloaded, which is correct but moves much more data.
"""

from __future__ import annotations

import torch


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """A context: tensors saved for the backward inside it are held in host memory until the backward needs them.

    Args:
        min_bytes: Smaller tensors stay on their device (not worth a copy).
        device_types: Devices whose tensors are offloaded. Tests add ``"cpu"`` to run the same path on a CPU (a copy
            into unpinned memory).

    Attributes:
        tensors: Tensors offloaded so far.
        bytes: Their total size.
    """

    def __init__(self, min_bytes: int = 1 << 20, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.min_bytes, self.device_types = min_bytes, device_types
        self.tensors = self.bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
        size = tensor.numel() * tensor.element_size()
        if (type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter)) \
                or tensor.device.type not in self.device_types or tensor.layout != torch.strided:
            return tensor  # a tensor subclass (DTensor), another device, or sparse
        # A small activation that is a view of a large one (a tile of a checkpointed layer's rows) would keep all of it
        # on the GPU: it moves. Small views of tensors without gradients (rope cos/sin, masks: shared by every layer)
        # stay, or each layer would copy them again.
        kept = tensor.untyped_storage().nbytes() if tensor.requires_grad else size
        if max(size, kept) < self.min_bytes:
            return tensor
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor  # a weight, or a view of one (linear saves ``weight.t()``): it stays on the GPU anyway
        if any(stride == 0 and n > 1 for n, stride in zip(tensor.shape, tensor.stride())):
            return tensor  # an expanded view: a copy would materialise every repeat
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
        host.copy_(tensor, non_blocking=True)
        self.tensors += 1
        self.bytes += size
        return tensor.device, host

    @staticmethod
    def _unpack(packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)
