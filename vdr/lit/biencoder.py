"""The bi-encoder LightningModule: InfoNCE training steps, embedding for evaluation, optimizer and schedule.

Model maths lives in ``vdr.models`` and ``vdr.losses``; this module wires them to Lightning's loop. Validation
steps only embed: the retrieval callback owns the corpus ranking and the metrics.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn

from vdr.data.collator import EmbeddingCollator, EncodeBatch, PagePreprocessing, RetrievalBatch
from vdr.distributed.collectives import all_gather_uneven, gather_with_grad, world
from vdr.lit.base import BackboneConfig, NonFiniteLoss, VdrModule, default_optimizer
from vdr.lit.gradcache import CachedEmbeddings
from vdr.lit.schedule import Decay
from vdr.losses.contrastive import InfoNCELoss
from vdr.losses.matryoshka import MatryoshkaLoss
from vdr.models.backbone import load_backbone
from vdr.models.biencoder import BiEncoder
from vdr.models.inputs import EncoderInputs
from vdr.models.lora import LoraOptions, lora_hparams
from vdr.models.offload import OffloadActivations
from vdr.models.prompts import EmbeddingPrompts
from vdr.models.sparse_embedding import has_sparse_gradients, sparse_embedding_gradients

CHECKPOINT_KIND = "biencoder"

# The module's `transfer_batch_to_device` (GradCache keeps page pixels on the host) is meant to apply beside a data
# module; Lightning warns about that combination on every run.
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`")


class BiEncoderModule(VdrModule):
    """Trains a Qwen3-VL bi-encoder with InfoNCE over in-batch and hard negatives.

    Args:
        backbone: The Qwen3-VL to start from and its page-size bounds.
        prompts: Query and document instructions (export writes the same ones).
        max_text_tokens: Longest query text, in tokens, before the chat template.
        loss: The contrastive loss (default: InfoNCE at temperature 0.05).
        optimizer: Optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 2e-5}}``.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly (the recipe: 0.1).
        decay: Shape of the decay after warmup.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        freeze_vision: Keep the vision tower's weights fixed.
        freeze_token_embeddings: Keep the token embedding table fixed (151,936 rows: on small presets its AdamW
            update costs more than the rest of the step).
        hard_negatives_after_step: Train on in-batch negatives only before this optimizer step, then on the hard
            negatives too. A model trained from scratch first has to leave its collapsed start (all embeddings
            alike), which hard negatives slow down; a pretrained backbone wants 0.
        global_negatives: Under DDP or FSDP, score each query against the documents of every rank (gathered with
            gradients), as one process with the global batch would. False keeps each rank's negatives local.
        mini_batch_size: GradCache: embed at most this many sequences per forward pass and backpropagate the loss
            through cached embedding gradients (``vdr.lit.gradcache``): the gradients of the plain loss over the whole
            batch, in the activation memory of one mini-batch, for one extra forward pass. None: one pass per side
            (unless ``mini_batch_tokens`` is set).
        mini_batch_tokens: GradCache with mini-batches bounded by tokens (sequences x their longest, visual tokens
            included) rather than, or as well as, by sequences: short queries then share one pass while pages of
            hundreds of visual tokens take several. Activation memory follows tokens, so this bounds it more evenly.
        lora: Train LoRA adapters (peft) instead of the full model; merged into the weights at export.
        gradient_checkpointing_text: Recompute each decoder layer in the backward instead of keeping its activations.
        gradient_checkpointing_vision: Recompute each vision block in the backward.
        vision_checkpoint_images: With ``gradient_checkpointing_vision``, each vision block checkpoints groups of at
            most this many images separately (``vdr.models.checkpoint_tiles``): the same gradients, while the backward
            holds one group's block activations at a time rather than the whole mini-batch's (the 2B model at
            600x600 pages: ~70 MiB per page). None: one checkpoint per block.
        text_checkpoint_rows: With ``gradient_checkpointing_text``, each decoder layer checkpoints groups of at most
            this many rows (sequences) separately: the same gradients, while the backward holds one group's layer
            activations at a time (the 2B model: ~45 MiB per row of 345 tokens). None: one checkpoint per layer.
        sparse_embedding_grad: The token-embedding table's gradient is added row by row into its dense ``.grad``
            (``vdr.models.sparse_embedding``) rather than built whole in every backward: with GradCache, each replay
            of the 2B model otherwise holds a dense 593 MiB temporary beside ``.grad``. Same gradients (summed in
            another order). One device or DDP (FSDP2 refuses it); needs trainable token embeddings.
        offload_activations: Keep what the training forward saves for the backward (with checkpointing: each layer's
            input) in pinned host memory rather than on the GPU (``vdr.models.offload``): GPU memory for larger
            mini-batches, at the cost of host-device copies. Only tensors on a GPU move.
        page_preprocessing: ``"device"``: DataLoader workers only decode pages; resizing, normalization and patching
            run on the training device at the forward, bit-identical to the HF processor on the CPU
            (``vdr.data.pages``). ``"processor"``: the HF image processor does it in the workers.
        nonfinite_loss: A NaN or infinite training loss ``"stop"``s the run, or ``"skip"``s the step (no update; a
            warning names the batch's rows; ``train/skipped_steps`` counts them). Either way the rows are named.

    Global negatives and gradient accumulation: each micro-batch is its own contrastive problem over the documents
    of all ranks for that micro-batch (``world size x per-device batch x (1 + k)`` documents); the accumulated
    gradient is the mean over micro-batches. Negatives never cross micro-batches: for one softmax over more documents
    than fit at once, use a larger per-device batch with ``mini_batch_size`` (GradCache), not accumulation.
    """

    CHECKPOINT_KIND = CHECKPOINT_KIND

    def __init__(
        self,
        backbone: BackboneConfig | dict | None = None,
        prompts: EmbeddingPrompts | dict | None = None,
        max_text_tokens: int = 256,
        loss: InfoNCELoss | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_ratio: float = 0.1,
        decay: Decay = "linear",
        min_lr_ratio: float = 0.0,
        freeze_vision: bool = False,
        freeze_token_embeddings: bool = False,
        hard_negatives_after_step: int = 0,
        global_negatives: bool = True,
        mini_batch_size: int | None = None,
        mini_batch_tokens: int | None = None,
        lora: LoraOptions | dict | None = None,
        gradient_checkpointing_text: bool = False,
        gradient_checkpointing_vision: bool = False,
        vision_checkpoint_images: int | None = None,
        text_checkpoint_rows: int | None = None,
        offload_activations: bool = False,
        sparse_embedding_grad: bool = False,
        page_preprocessing: PagePreprocessing = "device",
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__()
        # Dicts arrive from load_from_checkpoint (hyperparameters are saved as plain data).
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        self.backbone_config = backbone or BackboneConfig()
        for name, value in (("mini_batch_size", mini_batch_size), ("mini_batch_tokens", mini_batch_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {value}")
        lora, lora_dict = lora_hparams(lora)
        self.prompts = EmbeddingPrompts(**prompts) if isinstance(prompts, dict) else prompts or EmbeddingPrompts()
        self.save_hyperparameters(
            {"backbone": asdict(self.backbone_config), "prompts": asdict(self.prompts),
             "max_text_tokens": max_text_tokens, "warmup_ratio": warmup_ratio, "decay": decay,
             "min_lr_ratio": min_lr_ratio, "freeze_vision": freeze_vision,
             "freeze_token_embeddings": freeze_token_embeddings,
             "hard_negatives_after_step": hard_negatives_after_step, "global_negatives": global_negatives,
             "mini_batch_size": mini_batch_size, "mini_batch_tokens": mini_batch_tokens, "lora": lora_dict,
             "gradient_checkpointing_text": gradient_checkpointing_text,
             "gradient_checkpointing_vision": gradient_checkpointing_vision,
             "vision_checkpoint_images": vision_checkpoint_images,
             "text_checkpoint_rows": text_checkpoint_rows,
             "offload_activations": offload_activations, "sparse_embedding_grad": sparse_embedding_grad,
             "page_preprocessing": page_preprocessing, "nonfinite_loss": nonfinite_loss}
        )
        loaded = load_backbone(**asdict(self.backbone_config))
        for side, saved in loaded.prompts.items():
            ours = getattr(self.prompts, side, None)
            if ours is not None and saved != ours:
                rank_zero_warn(f"{loaded.source} was trained with the {side} prompt {saved!r}; this run uses {ours!r} "
                               "(set model.prompts to keep the original)")
        self.model = BiEncoder(loaded.model)
        self.processor = loaded.processor
        self.collator = EmbeddingCollator(self.processor, self.prompts, max_text_tokens, page_preprocessing)
        self.loss = loss or InfoNCELoss()
        if isinstance(self.loss, MatryoshkaLoss):
            self.loss.check_dim(self.model.embedding_dim)  # a prefix longer than the embedding fails now, not at step 1
        self._configure_training(optimizer, warmup_ratio, decay, min_lr_ratio, nonfinite_loss)
        self.hard_negatives_after_step = hard_negatives_after_step
        self.global_negatives = global_negatives
        self.mini_batch_size = mini_batch_size
        self.mini_batch_tokens = mini_batch_tokens
        self.offload = OffloadActivations() if offload_activations else None
        self._freeze(self.model.backbone, vision=freeze_vision, token_embeddings=freeze_token_embeddings)
        self._adapt(lora, checkpoint_text=gradient_checkpointing_text, checkpoint_vision=gradient_checkpointing_vision,
                    vision_images=vision_checkpoint_images, text_rows=text_checkpoint_rows, freeze_vision=freeze_vision)
        sparse_embedding_gradients(self.trunk.get_input_embeddings(), sparse_embedding_grad)

    def setup(self, stage: str) -> None:
        # Before the strategy wraps or shards anything: only one device and DDP reduce the dense `.grad` that the
        # sparse lookup's hook leaves (FSDP2 also refuses it in `shard_module`). DeepSpeed and XLA subclass those two.
        strategy = self.trainer.strategy
        if (stage == "fit" and has_sparse_gradients(self.trunk.get_input_embeddings())
                and (not isinstance(strategy, SingleDeviceStrategy | DDPStrategy)
                     or isinstance(strategy, DeepSpeedStrategy | XLAStrategy | SingleDeviceXLAStrategy))):
            raise ValueError(f"model.sparse_embedding_grad is for one device or DDP, not {type(strategy).__name__}: "
                             "the token table's sparse gradients are made dense by a hook that other strategies' "
                             "gradient reduction does not wait for; unset it")

    def forward(self, inputs) -> torch.Tensor:
        """``[B, D]`` unit-norm embeddings."""
        return self.model(inputs)

    @property
    def gradcache(self) -> bool:
        """Whether training steps run in GradCache mini-batches."""
        return self.mini_batch_size is not None or self.mini_batch_tokens is not None

    def _encode(self, inputs: EncoderInputs) -> torch.Tensor:
        """The training forward: ``[b, D]`` embeddings, with what it saves for the backward offloaded if asked."""
        if self.offload is None or not torch.is_grad_enabled():
            return self.model(inputs)
        with self.offload:
            return self.model(inputs)

    def training_step(self, batch: RetrievalBatch, batch_idx: int) -> torch.Tensor:
        documents, keys = batch.documents, batch.document_keys
        if self.global_step < self.hard_negatives_after_step:
            documents, keys = documents.head(len(batch)), keys[: len(batch)]  # positives only
        if not self.gradcache:
            queries = self._encode(batch.queries)  # [B, D]
            documents = self._encode(documents)  # [B * (1 + k), D], or [B, D] before hard negatives start
            loss = self._loss(queries, documents, keys)
            if not self._train_on(loss, batch):
                return self._skipped_step_loss()  # no update
        else:
            loss = self._cached_loss(batch, documents, keys)
            if loss is None:
                return self._skipped_step_loss()
        # Averaged over ranks (each rank's weighted by its share of the rows): the global batch's mean loss.
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("train/temperature", self.loss.temperature, batch_size=len(batch))
        self._count_skipped(batch)
        return loss

    def _gather(self, documents: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(documents, keys, offset, weight)`` of every rank with global negatives (this rank's alone otherwise).

        Every rank's documents come in rank order; this rank's positives start at ``offset``. The all-gather's backward
        sums every rank's gradient for our documents and sends it back here. ``weight`` (``world size x this rank's
        rows / all rows``; 1 for equal batches) scales this rank's mean loss so that DDP's and FSDP's average over
        ranks is the mean over every query of the step, also when token-budget batches differ in size across ranks.
        """
        world_size = world()[1]
        if world_size == 1:
            return documents, keys, 0, 1.0
        all_keys = all_gather_uneven(keys)
        weight = world_size * len(keys) / sum(len(k) for k in all_keys)
        if not self.global_negatives:
            return documents, keys, 0, weight
        documents, offset = gather_with_grad(documents)  # [sum over ranks of B_r * (1 + k), D]
        return documents, torch.cat(all_keys), offset, weight

    def _loss(self, queries: torch.Tensor, documents: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        documents, keys, offset, weight = self._gather(documents, keys)
        return self.loss(queries, documents, document_keys=keys, offset=offset) * weight

    def _cached_loss(self, batch: RetrievalBatch, documents: EncoderInputs, keys: torch.Tensor) -> torch.Tensor | None:
        """GradCache: the plain loss's value and gradients, one mini-batch of activations at a time.

        Every mini-batch but the last is replayed and backpropagated here, without gradient synchronisation (DDP: the
        step's one all-reduce happens in Lightning's backward of the returned tensor, over the accumulated gradients;
        FSDP2 reduce-scatters after each replay). The returned tensor's value is the loss; its backward runs the last
        replay and gives a learnable temperature its gradient. None: the loss is not finite and the step is skipped
        (checked before any backward, so no gradient has been accumulated).
        """
        chunks = [side.chunks(self.mini_batch_size, self.mini_batch_tokens) for side in (batch.queries, documents)]
        passes = [len(side) for side in chunks]
        if self._unsharded is not None and world()[1] > 1:
            # FSDP gathers weights in every forward and reduce-scatters gradients in every backward: ranks whose
            # (token-budget) batches need fewer mini-batches run padding passes with zero gradients to stay in step.
            counts = torch.tensor(passes, device=self.device)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            passes = counts.tolist()
        sides = [CachedEmbeddings(self._encode, side, self.device, passes=n) for side, n in zip(chunks, passes)]
        gathered, keys, offset, weight = self._gather(sides[1].embeddings, keys)
        loss = self.loss(sides[0].embeddings, gathered, document_keys=keys, offset=offset) * weight
        if not self._train_on(loss, batch):
            return None
        loss.backward(inputs=[side.embeddings for side in sides])  # the gradient cache, through the all-gather
        *early, last = [replay for side in sides for replay in side.replays()]  # documents (with images) last
        # Lightning divides what training_step returns by the accumulation steps before its backward; so do we.
        trainer = self._trainer  # None when called outside a Trainer
        scale = 1.0 / trainer.accumulate_grad_batches if trainer else 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer else None  # fp16 loss scaling, if any
        strategy = trainer.strategy if trainer else None
        with strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext():
            for replay in early:
                surrogate = replay.surrogate() * scale
                (scaler.scale(surrogate) if scaler is not None else surrogate).backward()
        # The loss again on constants: its value, and the temperature's gradient when it is learnable.
        loss = self.loss(sides[0].embeddings.detach(), gathered.detach(), document_keys=keys, offset=offset) * weight
        surrogate = last.surrogate()
        return loss + (surrogate - surrogate.detach())

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        cached = self.gradcache and isinstance(batch, RetrievalBatch)
        if not cached or batch.documents.pixel_values is None:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # GradCache: page pixels stay in host memory and travel one mini-batch at a time (a batch of 64 pages of 600x600
        # px is 1 GB of float32 patches the GPU would otherwise hold for the whole step).
        pixels = batch.documents.pixel_values
        batch.documents.pixel_values = None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.documents.pixel_values = pixels
        return batch

    def on_train_start(self) -> None:
        if self.gradcache:
            self.zero_grad(set_to_none=True)  # gradients left by an earlier fit in this process (zeroed after steps)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # Lightning zeroes gradients between training_step and its backward; GradCache has backpropagated most of the
        # batch inside training_step by then, so it zeroes them after each optimizer step instead.
        if not self.gradcache:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.gradcache:
            optimizer.zero_grad()

    def validation_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)  # [B, D]; ranked by the retrieval callback

    def test_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)
