"""Losses: tensors in, a scalar out. No Lightning, no torch.distributed."""

from vdr.losses.contrastive import InfoNCELoss, false_negative_mask

__all__ = ["InfoNCELoss", "false_negative_mask"]
