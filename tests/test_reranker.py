"""The reranker's parts: the yes/no score against the full LM head, the losses' derivable values, the official pair
format against the HF processor, grouped batches, candidate lists, and bad training data."""

from __future__ import annotations

import json
import math
import random

import datasets
import pytest
import torch
from PIL import Image

from vdr.data.errors import DataError
from vdr.data.rerank_collator import RerankCollator, pair_messages
from vdr.data.schema import PairRows, TrainExample, TrainRows, load_eval_set
from vdr.data.sources import load_table
from vdr.data.synth import render_page
from vdr.evaluation.candidates import Candidates, run_file_candidates, sampled_candidates
from vdr.evaluation.metrics import retrieval_metrics
from vdr.losses.ranking import KLDistill, ListwiseCE, MarginMSE, PointwiseBCE, RankNet
from vdr.models.backbone import load_backbone
from vdr.models.reranker import Reranker

from .conftest import TINY_PIXELS

QUERIES = ["what was Acme revenue in 2019", "Borvex debt 2021", "staff of Calyra for 2016"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny", min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, lm_head=True)


def _pages(count: int) -> list[Image.Image]:
    return [render_page("Acme", "Revenue", 2015 + i, random.Random(i), size=64) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def test_score_is_the_yes_no_log_odds_without_full_logits(backbone) -> None:
    reranker = Reranker(backbone.model, 9693, 2152).eval()
    inputs = RerankCollator(backbone.processor).encode_pairs(QUERIES, _pages(3))
    calls = []
    handle = backbone.model.lm_head.register_forward_hook(lambda *args: calls.append(args[2].shape))
    try:
        with torch.no_grad():
            logits = reranker.yes_no_logits(inputs)  # [B, 2]
            scores = reranker(inputs)  # [B]
        assert calls == []  # the [B, L, vocab] projection never runs
        with torch.no_grad():
            full = backbone.model(**inputs.model_kwargs()).logits  # [B, L, vocab]: the reference route
    finally:
        handle.remove()
    assert logits.shape == (3, 2) and scores.shape == (3,)
    assert calls == [full.shape] and full.shape[-1] == 151936
    last = inputs.attention_mask.sum(1) - 1  # right padding: the last real token
    reference = full[torch.arange(3), last][:, [9693, 2152]]  # [B, 2]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, reference[:, 0] - reference[:, 1], atol=1e-5, rtol=1e-5)


def test_a_pair_scores_the_same_alone_and_in_a_padded_batch(backbone) -> None:
    reranker = Reranker(backbone.model, 9693, 2152).eval()
    collator = RerankCollator(backbone.processor)
    pages = _pages(3)
    with torch.no_grad():
        batch = reranker(collator.encode_pairs(QUERIES, pages))
        alone = torch.stack([reranker(collator.encode_pairs([q], [p]))[0] for q, p in zip(QUERIES, pages)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Losses: values derivable by hand, invariants, masking
# ---------------------------------------------------------------------------------------------------------------


def test_pointwise_bce_values() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    assert PointwiseBCE()(torch.zeros(1, 3), labels).item() == pytest.approx(math.log(2))
    # log(1 + e^-2) for the positive at +2, log(1 + e^-1) for a negative at -1; the masked column is ignored.
    scores = torch.tensor([[2.0, -1.0, 50.0]])
    mask = torch.tensor([[True, True, False]])
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert PointwiseBCE()(scores, labels, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_listwise_ce_values_and_permutation() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert ListwiseCE()(torch.zeros(1, 4), labels).item() == pytest.approx(math.log(4))
    # Masked candidates leave the softmax: log 2 over the two that remain.
    mask = torch.tensor([[True, False, True, False]])
    assert ListwiseCE()(torch.tensor([[0.0, 9.0, 0.0, 9.0]]), labels, mask=mask).item() == pytest.approx(math.log(2))
    scores = torch.randn(5, 4)
    labels = torch.zeros(5, 4)
    labels[:, 0] = 1
    permutation = torch.randperm(4)
    assert ListwiseCE()(scores, labels).item() == pytest.approx(
        ListwiseCE()(scores[:, permutation], labels[:, permutation]).item(), rel=1e-6)
    # Temperature 2 on doubled scores is the original loss.
    assert ListwiseCE(temperature=2.0)(2 * scores, labels).item() == pytest.approx(ListwiseCE()(scores, labels).item())


def test_ranknet_values() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    assert RankNet()(torch.zeros(1, 3), labels).item() == pytest.approx(math.log(2))
    # Pairs (0,1) and (0,2): s0 - s1 = 1 and s0 - s2 = -1.
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert RankNet()(torch.tensor([[0.0, -1.0, 1.0]]), labels).item() == pytest.approx(expected, rel=1e-6)
    # Graded labels: (2 > 1), (2 > 0), (1 > 0) all count.
    graded = torch.tensor([[1.0, 0.5, 0.0]])
    assert RankNet()(torch.zeros(1, 3), graded).item() == pytest.approx(math.log(2))


def test_distillation_losses() -> None:
    teacher = torch.tensor([[3.0, 1.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    assert KLDistill()(teacher + 5.0, labels, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.tensor([[100.0, 0.0, 0.0]])
    assert KLDistill()(torch.zeros(1, 3), labels, teacher=one_hot).item() == pytest.approx(math.log(3), rel=1e-5)
    assert MarginMSE()(teacher + 7.0, labels, teacher=teacher).item() == pytest.approx(0.0, abs=1e-6)
    # Margins: student (1, 1) vs teacher (2, 5) -> ((1 - 2)^2 + (1 - 5)^2) / 2.
    assert MarginMSE()(torch.tensor([[1.0, 0.0, 0.0]]), labels, teacher=teacher).item() == pytest.approx(8.5)
    with pytest.raises(ValueError, match="teacher"):
        KLDistill()(teacher, labels)


def test_losses_train_the_positive_up() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    teacher = torch.tensor([[4.0, 0.0, 0.0]])
    for loss in (PointwiseBCE(), ListwiseCE(), RankNet(), KLDistill(), MarginMSE()):
        scores = torch.zeros(1, 3, requires_grad=True)
        loss(scores, labels, teacher=teacher).backward()
        assert scores.grad[0, 0] < 0 and (scores.grad[0, 1:] > 0).all(), type(loss).__name__


# ---------------------------------------------------------------------------------------------------------------
# Collator: the official pair format, HF processor parity, grouping
# ---------------------------------------------------------------------------------------------------------------


def test_pairs_render_in_the_official_reranker_format(backbone) -> None:
    collator = RerankCollator(backbone.processor, instruction="Find the page.")
    rendered = collator.render(pair_messages("Acme revenue 2019"))
    assert rendered == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: Find the page.<Query>:Acme revenue 2019\n<Document>:<|vision_start|><|image_pad|><|vision_end|>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # A system message (a Sentence Transformers prompt) replaces the instruction.
    with_prompt = [{"role": "system", "content": [{"type": "text", "text": "Other."}]}, *pair_messages("q")]
    assert "<Instruct>: Other.<Query>:q\n" in collator.render(with_prompt)


def test_pairs_match_the_hf_processor(backbone) -> None:
    collator = RerankCollator(backbone.processor)
    pages = [Image.new("RGB", (90, 300), (200, 10, 10)), *_pages(2)]
    ours = collator.encode_pairs(QUERIES, pages)
    rendered = [collator.render(pair_messages(q)) for q in QUERIES]
    reference = backbone.processor(text=rendered, images=pages, return_tensors="pt", padding=True)
    kwargs = ours.model_kwargs()  # the patches made from the pages on their device (here the CPU)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(kwargs[name].to(reference[name].dtype), reference[name]), name


def test_groups_are_laid_out_row_by_row_with_batch_negatives(backbone) -> None:
    pages = _pages(4)
    examples = [TrainExample(row=i, query=f"q{i}", pages=[pages[i], pages[(i + 1) % 3]], page_keys=[i, 10 + i])
                for i in range(3)]
    examples[2].page_keys[0] = 0  # row 2's positive is row 0's page (a duplicate)
    batch = RerankCollator(backbone.processor, batch_negatives=2).collate_groups(examples)
    assert batch.labels.tolist() == [[1, 0, 0, 0]] * 3
    assert len(batch.inputs) == 12
    # Row 0 borrows rows 1 and 2's positives; row 2's positive equals row 0's page, so it is masked for row 0,
    # and row 0's positive is masked for row 2 (it is row 2's own positive again).
    assert batch.mask.tolist() == [[True, True, True, False], [True, True, True, True], [True, True, False, True]]
    with pytest.raises(ValueError, match="below the batch size"):
        RerankCollator(backbone.processor, batch_negatives=3).collate_groups(examples)


# ---------------------------------------------------------------------------------------------------------------
# Bad training data: named rows, before training
# ---------------------------------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int]) -> dict:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_bad_reranker_training_data_names_the_row() -> None:
    image = datasets.Image()
    groups = datasets.Dataset.from_dict(
        {"query": ["a", "b"], "image": [_png((1, 2, 3)), None], "negative_0": [_png((4, 5, 6))] * 2},
        features=datasets.Features({"query": datasets.Value("string"), "image": image, "negative_0": image}))
    with pytest.raises(DataError, match=r"dataset 'groups', row 1, column 'image': the group has no positive page"):
        TrainRows(groups, "groups", num_negatives=1)
    teacher = datasets.Dataset.from_dict(
        {"query": ["a", "b"], "image": [_png((1, 2, 3))] * 2, "negative_0": [_png((4, 5, 6))] * 2,
         "scores": [[1.0, 0.5], [2.0]]},
        features=datasets.Features({"query": datasets.Value("string"), "image": image, "negative_0": image,
                                    "scores": datasets.Sequence(datasets.Value("float32"))}))
    with pytest.raises(DataError, match=r"row 1, column 'scores': teacher scores missing: 2 needed"):
        TrainRows(teacher, "teacher", num_negatives=1, teacher_column="scores")
    rows = TrainRows(teacher.select([0]), "teacher", num_negatives=1, teacher_column="scores")
    assert rows[0].teacher == [1.0, 0.5]
    with pytest.raises(DataError, match=r"missing column\(s\) \['marks'\]"):
        TrainRows(teacher, "teacher", num_negatives=1, teacher_column="marks")
    pairs = datasets.Dataset.from_dict({"query": ["a", "b", "c"], "image": [_png((1, 2, 3))] * 3,
                                        "label": [1.0, 0.0, 2.0]},
                                       features=datasets.Features({"query": datasets.Value("string"), "image": image,
                                                                   "label": datasets.Value("float32")}))
    with pytest.raises(DataError, match=r"row 2, column 'label': expected a relevance label in \[0, 1\]"):
        PairRows(pairs, "pairs")
    ok = PairRows(pairs.select([0, 1]), "pairs")
    assert [ok[i].label for i in range(2)] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# Candidate lists
# ---------------------------------------------------------------------------------------------------------------


def test_sampled_candidates_hold_the_positives(tiny_synth) -> None:
    eval_set = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    candidates = sampled_candidates(eval_set, 10, seed=3)
    assert candidates.rows.shape == (12, 10)
    for query, relevant in enumerate(eval_set.qrels):
        rows = candidates.rows[query].tolist()
        assert set(relevant) <= set(rows) and len(set(rows)) == 10
    assert torch.equal(candidates.rows, sampled_candidates(eval_set, 10, seed=3).rows)
    pairs = candidates.pairs(eval_set)
    assert len(pairs) == 120 and pairs[13].index == 13 and pairs[13].query == eval_set.query_texts[1]


def test_reranked_order_and_metrics(tiny_synth, tmp_path) -> None:
    eval_set = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    query, corpus = eval_set.query_ids, eval_set.corpus_ids
    lines = [f"{query[0]} Q0 {corpus[row]} 0 {score} run" for row, score in ((5, 0.1), (7, 0.9), (2, 0.5))]
    (tmp_path / "run.txt").write_text("\n".join(lines) + "\n")
    candidates = run_file_candidates(tmp_path / "run.txt", eval_set, depth=2)
    assert candidates.rows[0].tolist() == [7, 2] and (candidates.rows[1:] == -1).all()
    (tmp_path / "run.json").write_text(json.dumps({query[1]: {corpus[4]: 1.0, corpus[9]: 3.0}}))
    assert run_file_candidates(tmp_path / "run.json", eval_set).rows[1].tolist() == [9, 4]
    (tmp_path / "bad.txt").write_text(f"{eval_set.query_ids[0]} Q0 nope 0 1.0 run\n")
    with pytest.raises(DataError, match="line 1: corpus id 'nope' is not in the eval corpus"):
        run_file_candidates(tmp_path / "bad.txt", eval_set)
    # Reranking sorts by score, ties keep the first-stage order; metrics match a direct computation.
    lists = Candidates(torch.tensor([[3, 1, 2, -1], [4, 5, 6, 7]]), "test")
    scores = torch.tensor([[0.0, 1.0, 1.0, float("nan")], [2.0, 2.0, 2.0, 3.0]])
    assert lists.reranked(scores).tolist() == [[1, 2, 3, -1], [7, 4, 5, 6]]
    qrels = [{2: 1}, {6: 2}]
    expected = retrieval_metrics(torch.tensor([[1, 2, 3] + [-1] * 7, [7, 4, 5, 6] + [-1] * 6]), qrels)
    small = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    small.qrels = qrels
    assert lists.metrics(small, lists.reranked(scores))["ndcg@10"] == pytest.approx(expected["ndcg@10"])
    assert expected["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
