"""What every vdr LightningModule shares: the backbone config, freezing, optimizer + schedule, and checkpoint I/O.

The bi-encoder and the reranker differ in their model, collator, loss and steps; everything else lives here once.
"""

from __future__ import annotations

import functools
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vdr.distributed.collectives import agree
from vdr.lit.checkpoint import checkpoint_marker, read_checkpoint
from vdr.lit.checkpoint_io import AtomicCheckpointIO
from vdr.lit.schedule import Decay, warmup_decay
from vdr.models.backbone import set_gradient_checkpointing
from vdr.models.lora import LoraOptions, add_lora


@dataclass
class BackboneConfig:
    """Which Qwen3-VL to start from and how its pages are sized.

    Args:
        name_or_path: Preset (tiny, demo, 2b), hub id (Qwen/Qwen3-VL-Embedding-2B) or local directory.
        min_pixels: Smallest page area after resizing.
        max_pixels: Largest page area after resizing; one visual token per 32x32 px.
        dtype: Parameter dtype; keep float32 master weights with bf16-mixed precision.
        attn_implementation: sdpa, eager or flash_attention_2.
        seed: Initialisation seed of presets.
        image_mean: Pixel mean of presets (hub processors bring their own).
        image_std: Pixel std of presets.
        linear_patch_embed: Run the patch embedding as a matmul (same weights and outputs; the Conv3d is slow).
        initializer_range: Std of the random initialisation of presets (default: the preset's own).
        added_tokens: Whole words to tokenize as single tokens (domain vocabulary for from-scratch presets).
    """

    name_or_path: str = "tiny"
    min_pixels: int = 128 * 128
    max_pixels: int = 600 * 600
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    seed: int = 0
    image_mean: float = 0.5
    image_std: float = 0.5
    linear_patch_embed: bool = True
    initializer_range: float | None = None
    added_tokens: list[str] = field(default_factory=list)


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)


NonFiniteLoss = Literal["stop", "skip"]


def rng_states() -> dict:
    """This process's random generators' states (Python, NumPy, torch, its CUDA device), as plain data and tensors
    (loadable with ``weights_only``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restores what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class VdrModule(L.LightningModule):
    """Base of the vdr LightningModules. Subclasses set ``CHECKPOINT_KIND`` and build ``self.model``.

    Subclasses call :meth:`_configure_training` from ``__init__`` with the optimizer and schedule arguments.
    """

    CHECKPOINT_KIND = ""
    _unsharded: list[torch.nn.Parameter] | None = None  # set by configure_model under FSDP
    _skipped_rows = 0  # training rows this rank passed over so far (skip_bad_rows)
    _skipped_steps = 0  # steps skipped for a non-finite loss (nonfinite_loss: skip)
    _discard_gradients = False  # the current optimizer step is skipped: its gradients are dropped before it
    _last_rows: list[int] = []  # the training rows of the latest batch (named when a step goes non-finite)
    _resumed_rng: dict | None = None  # random states of the checkpoint being resumed, set at the first training batch

    @property
    def trunk(self) -> torch.nn.Module:
        """The ``Qwen3VLModel`` inside ``self.model``."""
        return self.model.trunk

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (e.g. ``FSDP2Strategy``), shards the model with FSDP2; else does nothing."""
        if self.device_mesh is None or self._unsharded is not None:  # not model-parallel, or already sharded
            return
        from vdr.distributed.fsdp import shard_module

        # `trainer.validate/test/predict` run under torch.inference_mode (except on gloo): FSDP2's first all-gather
        # there would allocate its reusable buffers as inference tensors, and the next training forward fails
        # ("Inplace update to inference tensor outside InferenceMode"). Lightning exempts its FSDPStrategy, not FSDP2.
        for loop in (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop):
            loop.inference_mode = False
        self._unsharded = shard_module(self, self.device_mesh, getattr(self.trainer.strategy, "sharding", None))

    def on_after_backward(self) -> None:
        # FSDP reduces the gradients of sharded weights in the backward; average the few it does not hold (a learnable
        # temperature) right after it, as DDP would, so clipping, callbacks and the step see synchronised gradients.
        if self._unsharded and dist.is_initialized():
            for param in self._unsharded:
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= dist.get_world_size()

    def on_train_end(self) -> None:
        data = self._trainer.datamodule if self._trainer is not None else None
        rows = getattr(data, "train_rows", None)
        if getattr(data, "skip_bad_rows", False) and rows is not None:
            # Every rank sees the same dropped rows; the passed-over ones are summed in data/skipped_rows.
            dropped = list(getattr(rows, "dropped", {}))
            more = ", ..." if len(dropped) > 10 else ""
            named = f" (rows {', '.join(map(str, dropped[:10]))}{more})" if dropped else ""
            rank_zero_info(f"skip_bad_rows: {len(dropped)} training rows failed the checks at setup and were left "
                           f"out{named}; {self._skipped_rows} did not decode and were passed over (rank 0)")
        if self._skipped_steps:
            rank_zero_info(f"nonfinite_loss: skip: {self._skipped_steps} steps had a non-finite loss and were skipped")

    def _count_skipped(self, batch) -> None:
        """Logs ``data/skipped_rows``: the training rows every rank has passed over so far, with ``skip_bad_rows``."""
        data = self._trainer.datamodule if self._trainer is not None else None
        if not getattr(data, "skip_bad_rows", False):  # the same on every rank: all of them log, or none
            return
        self._skipped_rows += batch.skipped
        self.log("data/skipped_rows", float(self._skipped_rows), reduce_fx="sum", sync_dist=True, batch_size=1)

    def _configure_training(self, optimizer, warmup_ratio: float, decay: Decay, min_lr_ratio: float,
                            nonfinite_loss: NonFiniteLoss) -> None:
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        self.optimizer_factory = optimizer
        self.warmup_ratio, self.decay, self.min_lr_ratio = warmup_ratio, decay, min_lr_ratio
        self.nonfinite_loss = nonfinite_loss

    def _train_on(self, loss: torch.Tensor, batch) -> bool:
        """Whether to train on ``loss``: False when any rank's loss is NaN or infinite and ``nonfinite_loss: skip``
        (the caller then returns :meth:`_skipped_step_loss`); ``stop`` raises instead. Either way the message names
        this rank's training rows.

        All ranks decide together (one all-reduce of a flag), so they skip or step as one.
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        everywhere = agree(finite, loss.device, everyone=True)
        self._last_rows = batch.rows.tolist()
        if everywhere or self._grad_scaler() is not None:
            # fp16's GradScaler skips a step whose gradients are not finite itself, and lowers its scale: that is
            # how fp16 training runs, not a fault.
            return True
        where = self._where(self._last_rows)
        self._stop_or_skip(f"the loss is {loss.item()} on {where}" if not finite
                           else f"another rank's loss is not finite ({where} here)")
        self.log("train/skipped_steps", float(self._skipped_steps), batch_size=1)
        return False

    def _stop_or_skip(self, what: str) -> None:
        """A non-finite step: raises (``nonfinite_loss: stop``), or marks the step's gradients to be dropped, counts
        and warns (``skip``)."""
        what = f"step {self.global_step}: {what}"
        if self.nonfinite_loss == "stop":
            raise FloatingPointError(f"{what}. Training stopped (model.nonfinite_loss: stop; `skip` skips such steps "
                                     "instead)")
        self._skipped_steps += 1
        self._discard_gradients = True
        warnings.warn(f"{what}; the step is skipped (model.nonfinite_loss: skip), {self._skipped_steps} so far",
                      stacklevel=3)

    def _where(self, rows: list[int]) -> str:
        data = self._trainer.datamodule if self._trainer is not None else None
        source = getattr(data, "train_source", None)
        return f"training rows {rows}" + (f" of {source}" if source else "")

    def _grad_scaler(self):
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _skipped_step_loss(self) -> torch.Tensor:
        """What ``training_step`` returns for a skipped step: a zero connected to no weight.

        Lightning refuses ``None`` from a training step under DDP and FSDP; backpropagating this reaches no parameter,
        and ``on_before_optimizer_step`` then drops every gradient of the step (earlier accumulated micro-batches'
        too), so the optimizer updates nothing: no weight, no moment, no step count.
        """
        return torch.zeros((), device=self.device, requires_grad=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._discard_gradients and self._grad_scaler() is None and not self._finite_gradients():
            # A finite loss whose gradients are not (an overflow in the backward): gradient clipping would spread the
            # NaN to every weight. Stopped or skipped like a non-finite loss.
            self._stop_or_skip(f"the loss is finite but its gradients are not (the step's last batch: "
                               f"{self._where(self._last_rows)})")
        if self._discard_gradients:
            for param in self.parameters():
                param.grad = None
            self._discard_gradients = False

    def _finite_gradients(self) -> bool:
        """Whether every gradient on every rank is finite (one fused norm and one all-reduce).

        A NaN or infinite entry makes its gradient's norm NaN or infinite. The norms are fused float32 reductions:
        ``isfinite`` per gradient would hold temporaries the size of the largest gradient (the 2B model's
        token-embedding gradient: 1.4 GiB of them, above the weights, gradients and AdamW state at the step). A norm
        above float32's range (entries beyond ~1e19) also counts as an overflow.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return True
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norms = torch._foreach_norm(local, 2.0, dtype=torch.float32)  # float32: an fp16 norm overflows at 65504
        finite = bool(torch.isfinite(torch.stack(norms)).all())
        return agree(finite, local[0].device, everyone=True)

    @staticmethod
    def _freeze(trunk: torch.nn.Module, *, vision: bool, token_embeddings: bool) -> None:
        """Freezes parts of a ``Qwen3VLModel`` trunk (with a tied LM head, freezing the embeddings freezes it too)."""
        if vision:
            trunk.visual.requires_grad_(False)
        if token_embeddings:
            trunk.get_input_embeddings().requires_grad_(False)

    def _adapt(self, lora: LoraOptions | None, *, checkpoint_text: bool, checkpoint_vision: bool,
               freeze_vision: bool, vision_images: int | None = None, text_rows: int | None = None) -> None:
        """Adds LoRA adapters to ``self.model.backbone`` and switches gradient checkpointing per tower."""
        trunk = self.trunk  # the same module before and after peft wraps the backbone (adapters are injected into it)
        if lora is not None:
            if freeze_vision and lora.vision != "frozen":
                raise ValueError(f"freeze_vision is set but lora.vision is {lora.vision!r}; choose one")
            self.model.backbone = add_lora(self.model.backbone, lora)  # freezes every base weight
            if lora.vision == "trained":
                trunk.visual.requires_grad_(True)
        set_gradient_checkpointing(trunk, text=checkpoint_text, vision=checkpoint_vision, vision_images=vision_images,
                                   text_rows=text_rows)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | dict, **overrides) -> VdrModule:
        """Rebuilds the module of a ``vdr fit`` checkpoint on the CPU with its trained weights, outside Lightning.

        Args:
            checkpoint: A ``.ckpt`` path, or the dict :func:`vdr.lit.checkpoint.read_checkpoint` returned for one.
            overrides: Replace saved hyperparameters (e.g. ``backbone`` to load the base from elsewhere).

        Only the model's weights are restored (strictly); optimizer, loss and loop state are not needed to embed,
        score or export.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(checkpoint, cls.CHECKPOINT_KIND)
        saved = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}  # Lightning's own
        module = cls(**{**saved, **overrides})
        weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        module.model.load_state_dict(weights, strict=True)
        return module.eval()

    def on_fit_start(self) -> None:
        # Atomic checkpoint files, unless the run chose its own CheckpointIO (see vdr.lit.checkpoint_io).
        strategy = self.trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None) or strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restored at the first training batch, not now: the loops draw random numbers (e.g. DataLoader seeds) between
        # loading the checkpoint and the first step that the run being resumed had already drawn before saving it.
        states = checkpoint.get("rng") or {}
        ranks = states.get("ranks", [])  # one per rank of the run that saved
        self._resumed_rng = ranks[self.global_rank if self.global_rank < len(ranks) else 0] if ranks else None
        self._skipped_steps = checkpoint.get("vdr_skipped_steps", 0)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        states = rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank's own states (every rank saves this dict; rank 0 writes it, or its meta file under FSDP).
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint["rng"] = {"ranks": gathered}
        else:
            checkpoint["rng"] = {"ranks": [states]}
        checkpoint["vdr_skipped_steps"] = self._skipped_steps
        checkpoint["vdr"] = checkpoint_marker(self.CHECKPOINT_KIND)
        # `vdr validate|test --ckpt_path X` rebuilds the module from these hyperparameters; the class tells LightningCLI
        # which module they belong to (a reranker's would otherwise be read as the default bi-encoder's).
        checkpoint.setdefault("hyper_parameters", {})["_class_path"] = f"{type(self).__module__}.{type(self).__name__}"

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.warmup_ratio * total)
        schedule = functools.partial(
            warmup_decay, total_steps=total, warmup_steps=warmup, decay=self.decay, min_ratio=self.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
