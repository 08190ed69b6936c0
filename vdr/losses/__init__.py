"""Losses: tensors in, a scalar out. No Lightning, no torch.distributed."""

from vdr.losses.contrastive import InfoNCELoss, false_negative_mask
from vdr.losses.ranking import KLDistill, ListwiseCE, MarginMSE, PointwiseBCE, RankingLoss, RankNet

__all__ = ["InfoNCELoss", "KLDistill", "ListwiseCE", "MarginMSE", "PointwiseBCE", "RankNet", "RankingLoss",
           "false_negative_mask"]
