"""Run under ``torchrun --nproc_per_node 2``: ranks with unequal batches (3 and 5 rows, as token-budget batching
gives) take the step of one process over all 8 rows.

``python distributed_uneven.py TRAIN {ddp,fsdp-gradcache}``. Each rank computes the bi-encoder's loss over its rows
against every rank's documents and backpropagates it; ``ddp`` averages the gradients over ranks as DDP does,
``fsdp-gradcache`` shards the model with FSDP2 and runs GradCache in mini-batches of 2 sequences (the ranks need 2 + 3
and 3 + 5 passes: the short rank pads). Rank 0 compares the result with one process's loss and gradients over the 8
rows and prints ``ok`` or the largest mismatch.
"""

from __future__ import annotations

import sys
import unittest.mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import vdr.distributed.collectives
import vdr.lit.biencoder
from vdr.data.schema import TrainRows
from vdr.data.sources import load_table
from vdr.distributed.fsdp import shard_module
from vdr.lit.base import BackboneConfig
from vdr.lit.biencoder import BiEncoderModule


def gradients(module: BiEncoderModule) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in module.named_parameters() if p.grad is not None}


def plain_step(module: BiEncoderModule, batch) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss = module._loss(module.model(batch.queries), module.model(batch.documents), batch.document_keys)
    loss.backward()
    return float(loss), gradients(module)


def main(train: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = BiEncoderModule(BackboneConfig("tiny", min_pixels=64 * 64, max_pixels=64 * 64))
    rows = TrainRows(load_table(train), train, num_negatives=1)
    alone = unittest.mock.patch.multiple  # one process over all 8 rows: no gathers, weight 1
    with alone(vdr.distributed.collectives, world=lambda: (0, 1)), alone(vdr.lit.biencoder, world=lambda: (0, 1)):
        expected_loss, expected = plain_step(module, module.collator([rows[i] for i in range(8)]))
    batch = module.collator([rows[i] for i in (range(3) if rank == 0 else range(3, 8))])
    module.zero_grad()
    if mode == "ddp":
        loss, grads = plain_step(module, batch)
        for grad in grads.values():  # DDP: the mean over ranks
            dist.all_reduce(grad)
            grad /= 2
    else:
        module._unsharded = shard_module(module, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
        module.mini_batch_size = 2
        step = module._cached_loss(batch, batch.documents, batch.document_keys)
        step.backward()  # FSDP2 reduce-scatters the mean over ranks
        loss, grads = float(step), gradients(module)
    losses = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(losses, torch.tensor([loss]))
    if rank == 0:
        worst = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in expected.items())
        mean = float(sum(losses)) / 2
        ok = abs(mean - expected_loss) < 1e-5 and worst < 1e-4 and grads.keys() == expected.keys()
        print("ok" if ok else f"mismatch: loss {mean} vs {expected_loss}, worst relative gradient error {worst}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
