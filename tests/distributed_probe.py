"""A callback the distributed tests add to ``vdr fit`` runs in child processes: it records each rank's losses,
gradients, DDP gradient all-reduces and metrics to files, and can swap in a wrong all-gather to show that the gradient
test catches it."""

from __future__ import annotations

import json
import os

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vdr.distributed.collectives import world


class _LocalGradientGather(torch.autograd.Function):
    """An all-gather whose backward keeps only this rank's own loss's gradient for its chunk (a peer bug): the loss is
    right, the gradients are not."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.length = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.length : (ctx.rank + 1) * ctx.length]


def local_gradient_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    rank, size = world()
    return (_LocalGradientGather.apply(x), rank * x.shape[0]) if size > 1 else (x, 0)


def record_group_sizes(trunk, rows: set[int], images: set[int], when=lambda: True) -> None:
    """Hooks on a Qwen3-VL trunk that add, per call with gradients on (and ``when()``), the rows of the first decoder
    layer's input to ``rows`` and the images of the first vision block's to ``images``: checkpoint tiles show as groups
    no larger than theirs."""
    def layer_rows(module, args):
        if torch.is_grad_enabled() and when():
            rows.add(args[0].shape[0])

    def block_images(module, args, kwargs):
        if torch.is_grad_enabled() and when():
            images.add(len(kwargs["cu_seqlens"]) - 1)

    trunk.language_model.layers[0].input_layernorm.register_forward_pre_hook(layer_rows)
    trunk.visual.blocks[0].attn.register_forward_pre_hook(block_images, with_kwargs=True)


class Probe(L.Callback):
    """Writes ``rank{r}.json`` (losses per step, last validation metrics) and ``rank{r}-grads.pt`` (the gradients
    at the first optimizer step, full tensors) into ``output``.

    Args:
        output: Directory to write into.
        local_gradient_gather: Replace the bi-encoder's all-gather by :func:`local_gradient_gather`.
    """

    def __init__(self, output: str, local_gradient_gather: bool = False) -> None:
        self.output, self.local_gradient_gather = output, local_gradient_gather
        self.losses: list[float] = []
        self.reductions = 0  # DDP gradient-bucket all-reduces so far
        self.first_step_reductions: int | None = None
        # Of the first step, with gradients on: rows per call of the first decoder layer, images per call of the first
        # vision block's attention (tiles show as groups no larger than theirs), the token table's incoming gradients.
        self.layer_rows: set[int] = set()
        self.block_images: set[int] = set()
        self.table_grad_layouts: list[str] = []

    def _record_calls(self, pl_module) -> None:
        record_group_sizes(pl_module.trunk, self.layer_rows, self.block_images,
                           when=lambda: pl_module.trainer.global_step == 0)
        table = pl_module.trunk.get_input_embeddings().weight
        if not isinstance(table, DTensor) and table.requires_grad:  # FSDP2's gathered weight is another tensor
            table.register_hook(lambda grad: self.table_grad_layouts.append(str(grad.layout))
                                if pl_module.trainer.global_step == 0 else None)

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        self._record_calls(pl_module)

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            def counting_hook(state, bucket):
                self.reductions += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)

    def setup(self, trainer, pl_module, stage: str) -> None:
        os.makedirs(self.output, exist_ok=True)
        if self.local_gradient_gather:
            import vdr.lit.biencoder

            vdr.lit.biencoder.gather_with_grad = local_gradient_gather

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != 0:
            return
        self.first_step_reductions = self.reductions
        grads = {}
        for name, param in pl_module.named_parameters():
            if param.grad is not None:
                grad = param.grad
                grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().cpu()
        torch.save(grads, os.path.join(self.output, f"rank{trainer.global_rank}-grads.pt"))

    def _write(self, trainer) -> None:
        metrics = {}
        for callback in trainer.callbacks:
            metrics.update(getattr(callback, "last_metrics", {}))
        with open(os.path.join(self.output, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"losses": self.losses, "metrics": metrics, "world_size": trainer.world_size,
                       "first_step_reductions": self.first_step_reductions,
                       "layer_rows": sorted(self.layer_rows), "block_images": sorted(self.block_images),
                       "table_grad_layouts": self.table_grad_layouts,
                       "inference_mode": trainer.validate_loop.inference_mode}, handle)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer)


class Poison(L.Callback):
    """Makes ``rank``'s loss NaN at optimizer step ``step``; writes ``rank{r}-poison.json``: whether each step changed
    this rank's weights, and the steps the module skipped.

    Args:
        output: Directory to write into.
        step: The optimizer step whose loss is poisoned.
        rank: The rank whose loss is poisoned (the others see a finite loss).
    """

    def __init__(self, output: str, step: int = 1, rank: int = 1) -> None:
        self.output, self.step, self.rank = output, step, rank
        self.changed: list[bool] = []
        self.hook = None

    def _weights(self, module) -> torch.Tensor:
        parts = [p.detach() for p in module.parameters() if p.requires_grad]
        return torch.cat([(p.to_local() if isinstance(p, DTensor) else p).flatten() for p in parts]).clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = self._weights(pl_module)
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            self.hook = pl_module.loss.register_forward_hook(lambda module, args, out: out + float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.changed.append(not torch.equal(self._weights(pl_module), self.before))

    def on_fit_end(self, trainer, pl_module) -> None:
        os.makedirs(self.output, exist_ok=True)
        with open(os.path.join(self.output, f"rank{trainer.global_rank}-poison.json"), "w") as handle:
            json.dump({"changed": self.changed, "skipped_steps": pl_module._skipped_steps}, handle)
