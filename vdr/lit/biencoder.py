"""The bi-encoder LightningModule: InfoNCE training steps, embedding for evaluation, optimizer and schedule.

Model maths lives in ``vdr.models`` and ``vdr.losses``; this module wires them to Lightning's loop. Validation
steps only embed: the retrieval callback owns the corpus ranking and the metrics.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from vdr.data.collator import EmbeddingCollator, EncodeBatch, RetrievalBatch
from vdr.distributed.collectives import all_gather_uneven, gather_with_grad
from vdr.lit.base import BackboneConfig, VdrModule, default_optimizer
from vdr.lit.schedule import Decay
from vdr.losses.contrastive import InfoNCELoss
from vdr.models.backbone import load_backbone
from vdr.models.biencoder import BiEncoder
from vdr.models.prompts import EmbeddingPrompts

CHECKPOINT_KIND = "biencoder"


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

    Global negatives and gradient accumulation: each micro-batch is its own contrastive problem over the documents
    of all ranks for that micro-batch (``world size x per-device batch x (1 + k)`` documents); the accumulated
    gradient is the mean over micro-batches. Negatives never cross micro-batches: for one softmax over more documents
    than fit at once, use a larger per-device batch with gradient caching, not accumulation.
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
    ) -> None:
        super().__init__()
        # Dicts arrive from load_from_checkpoint (hyperparameters are saved as plain data).
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        self.backbone_config = backbone or BackboneConfig()
        self.prompts = EmbeddingPrompts(**prompts) if isinstance(prompts, dict) else prompts or EmbeddingPrompts()
        self.save_hyperparameters(
            {"backbone": asdict(self.backbone_config), "prompts": asdict(self.prompts),
             "max_text_tokens": max_text_tokens, "warmup_ratio": warmup_ratio, "decay": decay,
             "min_lr_ratio": min_lr_ratio, "freeze_vision": freeze_vision,
             "freeze_token_embeddings": freeze_token_embeddings,
             "hard_negatives_after_step": hard_negatives_after_step, "global_negatives": global_negatives}
        )
        loaded = load_backbone(**asdict(self.backbone_config))
        for side, saved in loaded.prompts.items():
            ours = getattr(self.prompts, side, None)
            if ours is not None and saved != ours:
                rank_zero_warn(f"{loaded.source} was trained with the {side} prompt {saved!r}; this run uses {ours!r} "
                               "(set model.prompts to keep the original)")
        self.model = BiEncoder(loaded.model)
        self.processor = loaded.processor
        self.collator = EmbeddingCollator(self.processor, self.prompts, max_text_tokens)
        self.loss = loss or InfoNCELoss()
        self._configure_training(optimizer, warmup_ratio, decay, min_lr_ratio)
        self.hard_negatives_after_step = hard_negatives_after_step
        self.global_negatives = global_negatives
        self._freeze(self.model.backbone, vision=freeze_vision, token_embeddings=freeze_token_embeddings)

    def forward(self, inputs) -> torch.Tensor:
        """``[B, D]`` unit-norm embeddings."""
        return self.model(inputs)

    def training_step(self, batch: RetrievalBatch, batch_idx: int) -> torch.Tensor:
        documents, keys = batch.documents, batch.document_keys
        if self.global_step < self.hard_negatives_after_step:
            documents, keys = documents.head(len(batch)), keys[: len(batch)]  # positives only
        queries = self.model(batch.queries)  # [B, D]
        documents = self.model(documents)  # [B * (1 + k), D], or [B, D] before hard negatives start
        offset = 0
        if self.global_negatives:
            # Every rank's documents, in rank order; this rank's positives start at `offset`.
            documents, offset = gather_with_grad(documents)  # [sum over ranks of B_r * (1 + k), D]
            keys = torch.cat(all_gather_uneven(keys))
        loss = self.loss(queries, documents, document_keys=keys, offset=offset)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} on dataset rows {batch.rows.tolist()}")
        # Averaged over ranks: with equal per-rank batches, the loss one process would compute on the global batch.
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log("train/temperature", self.loss.temperature, batch_size=len(batch))
        return loss

    def validation_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)  # [B, D]; ranked by the retrieval callback

    def test_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)
