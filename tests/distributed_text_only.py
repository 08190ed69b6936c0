"""Run under ``torchrun --nproc_per_node 2``: rank 0 trains on page images, rank 1 on text-only documents.

``python distributed_text_only.py {ddp,fsdp} [--no-guard]`` takes two optimizer steps of the tiny bi-encoder and
prints ``ok <rank>``. ``--no-guard`` disables the idle vision pass, to show that the collectives then fail (a gloo
timeout of 20 s turns the hang into an error).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import vdr.distributed.collectives
from vdr.distributed.fsdp import shard_module
from vdr.lit.base import BackboneConfig
from vdr.lit.biencoder import BiEncoderModule


def main(mode: str, guard: bool) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    torch.manual_seed(0)
    if not guard:
        vdr.distributed.collectives.world = lambda: (0, 1)  # the model believes it runs alone: no idle vision pass
    module = BiEncoderModule(BackboneConfig("tiny", min_pixels=64 * 64, max_pixels=64 * 64))
    collate = module.collator
    if rank == 0:
        documents = collate.encode_pages([Image.new("RGB", (64, 64), c) for c in ("white", "black")], "Represent.")
    else:
        documents = collate.encode_texts(["a text-only document", "another one"], "Represent.")
    if mode == "fsdp":
        shard_module(module, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
        model = module.model
    else:
        model = DistributedDataParallel(module.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(documents).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    print(f"ok {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], guard="--no-guard" not in sys.argv)
