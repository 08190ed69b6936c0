"""The reranker LightningModule: scores groups of (query, page) pairs and trains them with a ranking loss.

Model maths lives in ``vdr.models.reranker`` and ``vdr.losses.ranking``. Validation steps only score the eval
candidate pairs; the rerank callback (``vdr.callbacks.rerank``) sorts each query's list and computes the metrics.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from lightning.pytorch.cli import OptimizerCallable

from vdr.data.collator import PagePreprocessing
from vdr.data.rerank_collator import RerankBatch, RerankCollator, ScoreBatch
from vdr.lit.base import BackboneConfig, NonFiniteLoss, VdrModule, default_optimizer
from vdr.lit.schedule import Decay
from vdr.losses.ranking import ListwiseCE, RankingLoss
from vdr.models.backbone import load_backbone
from vdr.models.lora import LoraOptions, lora_hparams
from vdr.models.processor import DEFAULT_RERANK_INSTRUCTION
from vdr.models.reranker import Reranker, yes_no_token_ids

CHECKPOINT_KIND = "reranker"


class RerankerModule(VdrModule):
    """Trains a Qwen3-VL cross-encoder that scores a query and a page by its "yes" vs "no" log-odds.

    Args:
        backbone: The Qwen3-VL to start from (its LM head is kept: the score reads two of its rows).
        instruction: The ``<Instruct>`` text of every pair (export writes the same one).
        max_text_tokens: Longest query, in tokens, before the chat template.
        loss: The ranking loss (default: listwise softmax cross-entropy over 1 positive + k negatives); see
            ``vdr.losses.ranking`` for pointwise BCE, RankNet, and KL / MarginMSE distillation.
        batch_negatives: Positives of this many other rows of the batch join each group as extra negatives (one
            forward pass each). Training rows' hard negatives come first.
        optimizer: Optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 2e-5}}``.
        warmup_ratio: Fraction of the optimizer steps spent warming up linearly.
        decay: Shape of the decay after warmup.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        freeze_vision: Keep the vision tower's weights fixed.
        freeze_token_embeddings: Keep the token embedding table fixed; the LM head is tied to it in Qwen3-VL-2B and
            the presets, so the yes/no rows stay fixed too and the trunk learns to point at them.
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
        page_preprocessing: ``"device"``: DataLoader workers only decode pages; resizing, normalization and patching
            run on the training device at the forward, bit-identical to the HF processor on the CPU
            (``vdr.data.pages``). ``"processor"``: the HF image processor does it in the workers.
        nonfinite_loss: A NaN or infinite training loss ``"stop"``s the run, or ``"skip"``s the step (no update; a
            warning names the batch's rows; ``train/skipped_steps`` counts them). Either way the rows are named.
    """

    CHECKPOINT_KIND = CHECKPOINT_KIND

    def __init__(
        self,
        backbone: BackboneConfig | dict | None = None,
        instruction: str = DEFAULT_RERANK_INSTRUCTION,
        max_text_tokens: int = 256,
        loss: RankingLoss | None = None,
        batch_negatives: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_ratio: float = 0.1,
        decay: Decay = "linear",
        min_lr_ratio: float = 0.0,
        freeze_vision: bool = False,
        freeze_token_embeddings: bool = False,
        lora: LoraOptions | dict | None = None,
        gradient_checkpointing_text: bool = False,
        gradient_checkpointing_vision: bool = False,
        vision_checkpoint_images: int | None = None,
        text_checkpoint_rows: int | None = None,
        page_preprocessing: PagePreprocessing = "device",
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__()
        if isinstance(backbone, dict):  # from a checkpoint's plain-data hyperparameters
            backbone = BackboneConfig(**backbone)
        self.backbone_config = backbone or BackboneConfig()
        self.instruction = instruction
        lora, lora_dict = lora_hparams(lora)
        self.save_hyperparameters(
            {"backbone": asdict(self.backbone_config), "instruction": instruction, "max_text_tokens": max_text_tokens,
             "batch_negatives": batch_negatives, "warmup_ratio": warmup_ratio, "decay": decay,
             "min_lr_ratio": min_lr_ratio, "freeze_vision": freeze_vision,
             "freeze_token_embeddings": freeze_token_embeddings, "lora": lora_dict,
             "gradient_checkpointing_text": gradient_checkpointing_text,
             "gradient_checkpointing_vision": gradient_checkpointing_vision,
             "vision_checkpoint_images": vision_checkpoint_images,
             "text_checkpoint_rows": text_checkpoint_rows,
             "page_preprocessing": page_preprocessing, "nonfinite_loss": nonfinite_loss}
        )
        loaded = load_backbone(**asdict(self.backbone_config), lm_head=True)
        self.model = Reranker(loaded.model, *yes_no_token_ids(loaded.processor.tokenizer))
        self.processor = loaded.processor
        self.collator = RerankCollator(self.processor, instruction, max_text_tokens, batch_negatives,
                                       page_preprocessing)
        self.loss = loss or ListwiseCE()
        self.batch_negatives = batch_negatives
        self._configure_training(optimizer, warmup_ratio, decay, min_lr_ratio, nonfinite_loss)
        self._freeze(loaded.trunk, vision=freeze_vision, token_embeddings=freeze_token_embeddings)
        self._adapt(lora, checkpoint_text=gradient_checkpointing_text, checkpoint_vision=gradient_checkpointing_vision,
                    vision_images=vision_checkpoint_images, text_rows=text_checkpoint_rows, freeze_vision=freeze_vision)

    def setup(self, stage: str) -> None:
        # Loss and data must fit each other; checked here, after the data module's setup and before any step.
        if stage != "fit":
            return
        data = self.trainer.datamodule
        if getattr(data, "train_rows", None) is None:
            return
        pairs = getattr(data, "labeled_pairs", False)
        group = 1 if pairs else 1 + data.num_negatives + self.batch_negatives
        name = type(self.loss).__name__
        if group < self.loss.min_group_size:
            raise ValueError(f"{name} compares candidates within a group but each group has {group} "
                             f"({'labeled pairs' if pairs else 'set data.num_negatives or model.batch_negatives'}); "
                             "use PointwiseBCE for labeled pairs")
        teacher = getattr(data, "teacher_column", None)
        if self.loss.needs_teacher and not teacher:
            raise ValueError(f"{name} distils teacher scores: set data.teacher_column to the column that holds them")
        if self.loss.needs_teacher and self.batch_negatives:
            raise ValueError(f"{name} needs a teacher score for every candidate; batch negatives have none "
                             "(set model.batch_negatives: 0)")

    def forward(self, inputs) -> torch.Tensor:
        """``[N]`` log-odds relevance scores of N rendered pairs."""
        return self.model(inputs)

    def training_step(self, batch: RerankBatch, batch_idx: int) -> torch.Tensor:
        scores = self.model(batch.inputs).view(batch.labels.shape)  # [B, G]
        loss = self.loss(scores, batch.labels, mask=batch.mask, teacher=batch.teacher)
        if not self._train_on(loss, batch):
            return self._skipped_step_loss()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)  # mean over ranks
        self._count_skipped(batch)
        return loss

    def validation_step(self, batch: ScoreBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)  # [N]; sorted into rankings by the rerank callback

    def test_step(self, batch: ScoreBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)
