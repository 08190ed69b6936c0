"""Reranker losses over groups of candidates: pointwise, listwise, pairwise, and distillation from a teacher.

Every loss takes the same tensors, so the LightningModule can swap them from the config:

- ``scores`` ``[B, G]``: the reranker's log-odds for G candidates of each of B queries (grouped data puts the positive
  in column 0, then the hard negatives; labeled pairs are groups of one);
- ``labels`` ``[B, G]``: relevance in [0, 1] (1 relevant, 0 not; fractions for soft labels);
- ``mask`` ``[B, G]`` bool, optional: False drops a candidate (padding, or a page that is this query's own positive
  appearing again as a negative);
- ``teacher`` ``[B, G]``, optional: a teacher's scores, for the distillation losses.

Which loss to start from: :class:`PointwiseBCE` is the hard-to-beat baseline and the only one that works on
labeled pairs; :class:`ListwiseCE` is InfoNCE's counterpart for rerankers (1 positive + k negatives);
:class:`RankNet` only cares about order; :class:`KLDistill` and :class:`MarginMSE` learn a teacher's scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _valid(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()


class RankingLoss(nn.Module):
    """Base class: what a loss needs from the data, so a bad config fails before training.

    Attributes:
        needs_teacher: Reads ``teacher`` scores.
        min_group_size: Smallest group the loss is defined on (listwise and pairwise losses compare candidates).
    """

    needs_teacher = False
    min_group_size = 1


class _Softmax(RankingLoss):
    """A loss over each group's softmax, with a temperature the scores are divided by."""

    min_group_size = 2

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class PointwiseBCE(RankingLoss):
    """Binary cross-entropy of each candidate's log-odds against its label, averaged over valid candidates.

    Zero scores give ``log 2`` whatever the labels. ``sigmoid(score)`` is then the calibrated probability that the
    official reranker reports.
    """

    def forward(self, scores, labels, *, mask=None, teacher=None):
        valid = _valid(scores, mask)  # [B, G]
        losses = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")  # [B, G]
        return losses[valid].mean()


class ListwiseCE(_Softmax):
    """Softmax cross-entropy over each group: ``-log(sum_pos exp(s) / sum_valid exp(s))``.

    With one positive (the grouped schema: column 0) this is the cross-entropy at the positive's column. Equal scores
    over G candidates give ``log G``.

    Args:
        temperature: Scores are divided by it before the softmax (1: the log-odds as they are).
    """


    def forward(self, scores, labels, *, mask=None, teacher=None):
        valid = _valid(scores, mask)  # [B, G]
        logits = (scores.float() / self.temperature).masked_fill(~valid, float("-inf"))  # [B, G]
        positive = logits.masked_fill(~(labels > 0), float("-inf"))  # [B, G]
        return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positive, dim=1)).mean()


class RankNet(RankingLoss):
    """Pairwise logistic loss ``log(1 + exp(-(s_i - s_j)))`` over every valid pair with ``label_i > label_j``.

    Averaged over pairs; equal scores give ``log 2``. Groups without such a pair contribute nothing.
    """

    min_group_size = 2

    def forward(self, scores, labels, *, mask=None, teacher=None):
        valid = _valid(scores, mask)  # [B, G]
        difference = scores.float()[:, :, None] - scores.float()[:, None, :]  # [B, G, G]: s_i - s_j
        pairs = (labels[:, :, None] > labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B, G, G]
        if not pairs.any():
            return scores.sum() * 0.0  # keeps the graph (e.g. a batch of all-equal labels)
        return F.softplus(-difference[pairs]).mean()


class KLDistill(_Softmax):
    """``KL(softmax(teacher / T) || softmax(scores / T))`` over each group's valid candidates, averaged over groups.

    Zero when the student's distribution equals the teacher's; a uniform student against a one-hot teacher over G
    candidates gives ``log G``. Not multiplied by ``T**2``: scale the learning rate instead if ``T`` changes.

    Args:
        temperature: Softens both distributions.
    """

    needs_teacher = True


    def forward(self, scores, labels, *, mask=None, teacher=None):
        if teacher is None:
            raise ValueError("KLDistill needs teacher scores")
        valid = _valid(scores, mask)  # [B, G]
        student = F.log_softmax((scores.float() / self.temperature).masked_fill(~valid, float("-inf")), dim=1)
        target = F.log_softmax((teacher.float() / self.temperature).masked_fill(~valid, float("-inf")), dim=1)
        terms = target.exp() * (target - student)  # [B, G]
        return terms.masked_fill(~valid, 0.0).sum(dim=1).mean()


class MarginMSE(RankingLoss):
    """Mean squared error between the student's and the teacher's margins ``s_pos - s_neg``.

    The positive is column 0 (the grouped schema); every other valid column is a negative. A student that equals the
    teacher plus any constant scores 0.
    """

    needs_teacher = True
    min_group_size = 2

    def forward(self, scores, labels, *, mask=None, teacher=None):
        if teacher is None:
            raise ValueError("MarginMSE needs teacher scores")
        valid = _valid(scores, mask)[:, 1:]  # [B, G - 1]
        student = scores.float()[:, :1] - scores.float()[:, 1:]  # [B, G - 1]
        target = teacher.float()[:, :1] - teacher.float()[:, 1:]  # [B, G - 1]
        return F.mse_loss(student[valid], target[valid])
