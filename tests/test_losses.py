"""InfoNCE: values derived by hand, invariants, masking and the cross-rank offset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vdr.losses import InfoNCELoss, false_negative_mask


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_equal_similarities_give_log_n() -> None:
    # All cosine similarities equal (orthogonal queries and documents): softmax is uniform over N columns.
    queries = torch.eye(4)[:2]  # [2, 4]
    documents = torch.eye(4)[2:].repeat(3, 1)  # [6, 4], orthogonal to both queries
    assert InfoNCELoss()(queries, documents) == pytest.approx(math.log(6), abs=1e-6)


def test_hand_computed_value() -> None:
    # q0 = e0; docs: d0 = e0 (its positive, cos 1), d1 = e1 (cos 0). With temperature 0.5 (scale 2):
    # loss_0 = -log(e^2 / (e^2 + e^0)) = log(1 + e^-2). q1 = e1 against d1 (cos 1), d0 (cos 0): the same.
    queries = torch.eye(2)
    documents = torch.eye(2)
    assert InfoNCELoss(temperature=0.5)(queries, documents) == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    # Temperature 1: log(1 + e^-1).
    assert InfoNCELoss(temperature=1.0)(queries, documents) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_matches_cross_entropy_over_scaled_cosine() -> None:
    queries, documents = _unit(5, 16, seed=1), _unit(15, 16, seed=2)
    expected = F.cross_entropy(20.0 * queries @ documents.T, torch.arange(5))
    assert torch.allclose(InfoNCELoss()(queries, documents), expected, atol=1e-5)


def test_permuting_the_batch_leaves_the_loss_unchanged() -> None:
    batch, k = 6, 2
    queries, documents = _unit(batch, 8, seed=3), _unit(batch * (1 + k), 8, seed=4)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(0))
    # Permute rows consistently: queries, and within each column block (positives, negatives 0, negatives 1).
    doc_perm = torch.cat([perm + c * batch for c in range(1 + k)])
    loss = InfoNCELoss()(queries, documents)
    assert torch.allclose(loss, InfoNCELoss()(queries[perm], documents[doc_perm]), atol=1e-6)


def test_duplicate_positive_is_masked_not_a_negative() -> None:
    # Row 1's hard negative is row 0's positive page (same content hash): for query 0 that column is its own page
    # and must not count as a negative; for query 1 it is a genuine negative.
    queries, documents = _unit(2, 8, seed=5), _unit(4, 8, seed=6)
    documents[3] = documents[0]
    keys = torch.tensor([10, 11, 12, 10])
    masked = InfoNCELoss()(queries, documents, document_keys=keys)
    logits = 20.0 * queries @ documents.T
    expected_0 = F.cross_entropy(logits[0, [0, 1, 2]][None], torch.tensor([0]))  # column 3 dropped
    expected_1 = F.cross_entropy(logits[1][None], torch.tensor([1]))  # nothing dropped
    assert torch.allclose(masked, (expected_0 + expected_1) / 2, atol=1e-5)
    assert not torch.allclose(masked, InfoNCELoss()(queries, documents), atol=1e-4)


def test_mask_never_hides_the_target() -> None:
    keys = torch.tensor([7, 7, 7])  # every document is the same page
    mask = false_negative_mask(keys, keys[:2], torch.arange(2))
    assert mask.tolist() == [[False, True, True], [True, False, True]]


def test_offset_selects_this_ranks_positives() -> None:
    # Documents gathered from 2 ranks of 3 queries: [pos r0; pos r1; neg r0; neg r1] laid out as
    # [positives of all 6; negatives of all 6]. Rank 1's queries target columns 3..5.
    queries, documents = _unit(6, 8, seed=7), _unit(12, 8, seed=8)
    full = InfoNCELoss()(queries, documents)
    rank0 = InfoNCELoss()(queries[:3], documents, offset=0)
    rank1 = InfoNCELoss()(queries[3:], documents, offset=3)
    assert torch.allclose((rank0 + rank1) / 2, full, atol=1e-6)


def test_learnable_temperature_trains_and_is_clamped() -> None:
    loss_fn = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    queries, documents = _unit(4, 8, seed=9), _unit(4, 8, seed=10)
    loss_fn(queries, documents).backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad.abs() > 0
    with torch.no_grad():
        loss_fn.log_scale.fill_(10.0)
    assert loss_fn.scale().item() == pytest.approx(100.0)
    assert not any(p.requires_grad for p in InfoNCELoss().parameters())


def test_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
