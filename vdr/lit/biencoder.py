"""The bi-encoder LightningModule: InfoNCE training steps, embedding for evaluation, optimizer and schedule.

Model maths lives in ``vdr.models`` and ``vdr.losses``; this module wires them to Lightning's loop. Validation
steps only embed: the retrieval callback owns the corpus ranking and the metrics.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from vdr.data.collator import EmbeddingCollator, EncodeBatch, RetrievalBatch
from vdr.lit.checkpoint import checkpoint_marker, read_checkpoint
from vdr.lit.schedule import Decay, warmup_decay
from vdr.losses.contrastive import InfoNCELoss
from vdr.models.backbone import load_backbone
from vdr.models.biencoder import BiEncoder
from vdr.models.prompts import EmbeddingPrompts


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


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)


CHECKPOINT_KIND = "biencoder"


class BiEncoderModule(L.LightningModule):
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
    """

    def __init__(
        self,
        backbone: BackboneConfig | dict | None = None,
        prompts: EmbeddingPrompts | dict | None = None,
        max_text_tokens: int = 256,
        loss: InfoNCELoss | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        warmup_ratio: float = 0.1,
        decay: Decay = "linear",
        min_lr_ratio: float = 0.0,
        freeze_vision: bool = False,
        freeze_token_embeddings: bool = False,
        hard_negatives_after_step: int = 0,
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
             "hard_negatives_after_step": hard_negatives_after_step}
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
        self.optimizer_factory = optimizer
        self.warmup_ratio, self.decay, self.min_lr_ratio = warmup_ratio, decay, min_lr_ratio
        self.hard_negatives_after_step = hard_negatives_after_step
        if freeze_vision:
            self.model.backbone.visual.requires_grad_(False)
        if freeze_token_embeddings:
            self.model.backbone.get_input_embeddings().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | dict, **overrides) -> BiEncoderModule:
        """Rebuilds the module of a ``vdr fit`` checkpoint on the CPU with its trained weights, outside Lightning.

        Args:
            checkpoint: A ``.ckpt`` path, or the dict :func:`vdr.lit.checkpoint.read_checkpoint` returned for one.
            overrides: Replace saved hyperparameters (e.g. ``backbone`` to load the base from elsewhere).

        Only the model's weights are restored (strictly); optimizer, loss and loop state are not needed to embed or
        export.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(checkpoint, CHECKPOINT_KIND)
        saved = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}  # Lightning's own
        module = cls(**{**saved, **overrides})
        weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        module.model.load_state_dict(weights, strict=True)
        return module.eval()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vdr"] = checkpoint_marker(CHECKPOINT_KIND)

    def forward(self, inputs) -> torch.Tensor:
        """``[B, D]`` unit-norm embeddings."""
        return self.model(inputs)

    def training_step(self, batch: RetrievalBatch, batch_idx: int) -> torch.Tensor:
        documents, keys = batch.documents, batch.document_keys
        if self.global_step < self.hard_negatives_after_step:
            documents, keys = documents.head(len(batch)), keys[: len(batch)]  # positives only
        queries = self.model(batch.queries)  # [B, D]
        documents = self.model(documents)  # [B * (1 + k), D], or [B, D] before hard negatives start
        loss = self.loss(queries, documents, document_keys=keys)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} on dataset rows {batch.rows.tolist()}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/temperature", self.loss.temperature, batch_size=len(batch))
        return loss

    def validation_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)  # [B, D]; ranked by the retrieval callback

    def test_step(self, batch: EncodeBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(batch.inputs)

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
