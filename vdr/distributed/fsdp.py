"""FSDP2 for the vdr modules: one shard unit per decoder layer and per vision block, through Lightning.

Lightning's ``ModelParallelStrategy`` runs FSDP2 (``fully_shard``) on GPUs and, with gloo, on CPUs (where its
``FSDPStrategy`` refuses to run), and leaves the sharding to the module's ``configure_model``.
:class:`FSDP2Strategy` is that strategy with every rank data-parallel and the sharding options as arguments;
``VdrModule.configure_model`` calls :func:`shard_module` with them.

Frozen and trainable parameters may share a unit (FSDP2 shards each parameter on its own and reduces only the
gradients that exist). Parameters outside every unit (a learnable temperature: FSDP2 cannot shard a scalar) stay
whole on each rank; :func:`shard_module` returns them so their gradients can be averaged across ranks.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vdr.lit.checkpoint_io import PARTIAL, recover_interrupted_swap, remove_stale_partials, sync_directory
from vdr.models.backbone import set_gradient_checkpointing
from vdr.models.sparse_embedding import has_sparse_gradients


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (e.g. bfloat16, float32)")
    return value


@dataclass
class ShardingOptions:
    """How :func:`shard_module` wraps a model (see :class:`FSDP2Strategy` for the meaning of each)."""

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over all ranks of all nodes.

    Args:
        param_dtype: Dtype weights are gathered and computed in (``bfloat16`` halves all-gather traffic and
            activation memory; master weights and optimizer state stay in the parameters' own dtype). None: no cast.
        reduce_dtype: Dtype of the gradient reduce-scatter (``float32``: bf16 gradients summed exactly).
        activation_checkpointing: Recompute each decoder layer and vision block in the backward instead of keeping
            its activations.
        reshard_after_forward: Free each unit's gathered weights after its forward and gather them again for the
            backward (least memory); False keeps them (one all-gather fewer per unit and step).
        save_distributed_checkpoint: Checkpoints are directories with one shard per rank (``vdr export`` and
            resuming read them); False gathers full weights and optimizer state into one file on rank 0.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        _dtype(param_dtype), _dtype(reduce_dtype)  # a typo fails here, before any process starts
        self.sharding = ShardingOptions(param_dtype, reduce_dtype, activation_checkpointing, reshard_after_forward)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" makes only the nodes data-parallel; here every rank is.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Writes a sharded checkpoint so that a kill never leaves a mixed or partial one at ``filepath``.

        Lightning writes the shards into the checkpoint's own directory, over the previous ones: a rank killed midway
        leaves some files new and some old. Here every rank writes into a staging directory beside it; once all are
        done, rank 0 swaps it in (the previous checkpoint is renamed aside, the staging directory renamed into place,
        the previous one deleted). A kill before the swap leaves the previous checkpoint whole; between the two renames
        (microseconds) the previous one is whole under ``.NAME.previous``, and is put back by the next save or by
        ``--ckpt_path last`` (:func:`vdr.lit.checkpoint_io.recover_interrupted_swap`). Single-file checkpoints are
        atomic through the CheckpointIO (``vdr.lit.checkpoint_io``).
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}{PARTIAL}sharded")
        previous = path.with_name(f".{path.name}.previous")
        if self.global_rank == 0:
            recover_interrupted_swap(path)
            remove_stale_partials(path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("vdr-checkpoint-staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("vdr-checkpoint-written")
        if self.global_rank == 0:
            if path.is_dir():
                os.replace(path, previous)
            elif path.exists():
                path.unlink()
            os.replace(staging, path)
            sync_directory(path.parent)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("vdr-checkpoint-swapped")


def shard_module(module, mesh, options: ShardingOptions | None = None) -> list[torch.nn.Parameter]:
    """Applies FSDP2 to ``module.model`` (a bi-encoder or reranker): each vision block, each decoder layer, then the
    rest (embeddings, patch merger, final norm, LM head) as the root unit.

    Args:
        module: A ``VdrModule`` (its ``model`` and ``trunk``).
        mesh: A device mesh; its ``data_parallel`` dimension shards the weights (tensor parallelism is refused).
        options: Mixed precision, activation checkpointing and resharding (default: fp32, no checkpointing).

    Returns:
        The trainable parameters left unsharded (outside ``module.model``, or scalars), whose gradients the caller
        must average across ranks.
    """
    if has_sparse_gradients(module.trunk.get_input_embeddings()):
        raise ValueError("model.sparse_embedding_grad is for one device or DDP: FSDP2 reduce-scatters the dense "
                         "gradient of each gathered weight, which the sparse lookup's hook does not reach; unset it")
    options = options or ShardingOptions()
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("vdr modules shard with FSDP2 over data-parallel ranks only; use "
                         "vdr.distributed.fsdp.FSDP2Strategy (or ModelParallelStrategy with tensor_parallel_size=1 "
                         "and data_parallel_size = world size)")
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    policy = MixedPrecisionPolicy(
        param_dtype=_dtype(options.param_dtype), reduce_dtype=_dtype(options.reduce_dtype),
    )
    trunk = module.trunk
    if options.activation_checkpointing:
        # Checkpoint tiles set by the module (model.vision_checkpoint_images, model.text_checkpoint_rows) stay.
        set_gradient_checkpointing(trunk, text=True, vision=True,
                                   vision_images=getattr(trunk.visual.blocks[0], "tile_images", None),
                                   text_rows=getattr(trunk.language_model.layers[0], "tile_rows", None))
    kwargs = {"mesh": dp_mesh, "mp_policy": policy, "reshard_after_forward": options.reshard_after_forward}
    for unit in [*trunk.visual.blocks, *trunk.language_model.layers]:
        fully_shard(unit, **kwargs)
    fully_shard(module.model, **kwargs)
    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
