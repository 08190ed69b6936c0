"""Candidate lists for reranking: which pages a reranker re-orders for each eval query, and in which first-stage order.

Three sources, in the order a user would reach for them:

- a first-stage run file (TREC ``qid Q0 docid rank score tag`` lines, or JSON ``{qid: {docid: score}}``);
- a retriever (a bi-encoder checkpoint, export or hub model): its top-k over the whole corpus;
- neither: each query's relevant pages plus pages sampled from the rest of the corpus, in a random (seeded) order.

Lists are ``[Q, C]`` corpus rows in first-stage order, ``-1`` padding short lists; the metrics treat ``-1`` as a
non-relevant slot, and relevant pages missing from a list still count in the ideal DCG, so reranking cannot score
above the first stage's recall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vdr.data.errors import DataError
from vdr.data.schema import EvalSet, ScorePair
from vdr.evaluation.metrics import retrieval_metrics

PAD = -1


@dataclass
class Candidates:
    """Each eval query's candidate pages, best first by the first stage.

    Attributes:
        rows: ``[Q, C]`` corpus rows, ``-1`` for padding.
        source: Where the lists came from (for logs and reports).
    """

    rows: torch.Tensor
    source: str

    @property
    def num_pairs(self) -> int:
        return int((self.rows != PAD).sum())

    def pairs(self, eval_set: EvalSet) -> CandidatePairs:
        """The (query, page) pairs to score, one dataset item each."""
        return CandidatePairs(eval_set, self.rows)

    def reranked(self, scores: torch.Tensor) -> torch.Tensor:
        """``[Q, C]`` rows sorted by ``scores`` (``[Q, C]``), best first; ties keep the first-stage order."""
        return self.sort_by(scores)[0]

    def sort_by(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([Q, C] rows, [Q, C] scores)`` sorted by ``scores``, best first (padding last, scored ``-inf``)."""
        scores = scores.float().masked_fill(self.rows == PAD, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)  # [Q, C]
        return self.rows.gather(1, order), scores.gather(1, order)

    def metrics(self, eval_set: EvalSet, ranked: torch.Tensor | None = None) -> dict[str, float]:
        """Retrieval metrics of ``ranked`` (default: the first-stage order), with short lists padded to 10."""
        ranked = self.rows if ranked is None else ranked
        if ranked.shape[1] < 10:
            ranked = torch.cat([ranked, torch.full((ranked.shape[0], 10 - ranked.shape[1]), PAD)], dim=1)
        return retrieval_metrics(ranked, eval_set.qrels, corpus_size=len(eval_set.corpus_ids))


class CandidatePairs(torch.utils.data.Dataset):
    """The non-padding (query, page) pairs of candidate lists; ``index`` is ``q * C + c``."""

    def __init__(self, eval_set: EvalSet, rows: torch.Tensor) -> None:
        self.eval_set, self.width = eval_set, rows.shape[1]
        self.corpus = eval_set.corpus_rows()
        self.positions = (rows != PAD).nonzero().tolist()  # [[q, c], ...]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> ScorePair:
        query, column = self.positions[item]
        page = self.corpus[int(self.rows[query, column])].image
        return ScorePair(index=query * self.width + column, query=self.eval_set.query_texts[query], image=page)


def _pack(lists: list[list[int]], source: str) -> Candidates:
    width = max(1, max(len(rows) for rows in lists))
    rows = torch.full((len(lists), width), PAD, dtype=torch.int64)
    for query, values in enumerate(lists):
        rows[query, : len(values)] = torch.tensor(values, dtype=torch.int64)
    return Candidates(rows, source)


def sampled_candidates(eval_set: EvalSet, size: int, seed: int = 0) -> Candidates:
    """Each query's relevant pages plus random other pages, ``size`` in all, in a random order.

    The first-stage order is random, so its NDCG@10 is what a reranker that has learned nothing scores on average.

    Args:
        eval_set: Queries, corpus and qrels.
        size: Candidates per query (relevant pages beyond it are dropped, best grade first).
        seed: Seed of the sampling and the order.
    """
    corpus_size = len(eval_set.corpus_ids)
    if not 1 <= size <= corpus_size:
        raise ValueError(f"candidate list size must be in [1, {corpus_size}] (the corpus size), got {size}")
    generator = torch.Generator().manual_seed(seed)
    lists = []
    for relevant in eval_set.qrels:
        chosen = sorted(relevant, key=lambda row: (-relevant[row], row))[:size]
        others = [row for row in torch.randperm(corpus_size, generator=generator).tolist() if row not in relevant]
        chosen = chosen + others[: size - len(chosen)]
        order = torch.randperm(len(chosen), generator=generator).tolist()
        lists.append([chosen[i] for i in order])
    return _pack(lists, f"{size} sampled (relevant + random pages, seed {seed})")


def run_file_candidates(path: str | Path, eval_set: EvalSet, depth: int = 100) -> Candidates:
    """The top ``depth`` pages of each query in a first-stage run file, by descending score.

    Args:
        path: A TREC run (``qid Q0 docid rank score tag`` per line) or a JSON ``{qid: {docid: score}}`` file.
        eval_set: The queries and corpus the ids refer to.
        depth: Candidates kept per query.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run file {path} does not exist")
    query_row = {q: i for i, q in enumerate(eval_set.query_ids)}
    corpus_row = {c: i for i, c in enumerate(eval_set.corpus_ids)}
    scored: list[dict[int, float]] = [{} for _ in eval_set.query_ids]
    text = path.read_text()
    if text.lstrip().startswith("{"):
        entries = [(qid, docid, score, f"query {qid!r}") for qid, docs in json.loads(text).items()
                   for docid, score in docs.items()]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 6:
                raise DataError(str(path), f"line {number}: expected 'qid Q0 docid rank score tag', got {line!r}")
            entries.append((fields[0], fields[2], fields[4], f"line {number}"))
    for qid, docid, score, where in entries:
        if str(qid) not in query_row:
            raise DataError(str(path), f"{where}: query id {qid!r} is not in the eval queries")
        if str(docid) not in corpus_row:
            raise DataError(str(path), f"{where}: corpus id {docid!r} is not in the eval corpus")
        try:
            value = float(score)
        except (TypeError, ValueError) as error:
            raise DataError(str(path), f"{where}: score {score!r} is not a number") from error
        scored[query_row[str(qid)]][corpus_row[str(docid)]] = value
    lists = [sorted(docs, key=lambda row: (-docs[row], row))[:depth] for docs in scored]
    return _pack(lists, f"run file {path} (top {depth})")


def retriever_candidates(model: str, eval_set: EvalSet, depth: int = 100, *, batch_size: int = 32,
                         device: str | None = None, progress: bool = True) -> Candidates:
    """The top ``depth`` pages of each query as ranked by a retriever over the whole corpus.

    Args:
        model: Anything ``vdr evaluate`` takes: a bi-encoder checkpoint, a Sentence Transformers export or hub id.
        eval_set: Queries, corpus and qrels.
        depth: Candidates kept per query.
        batch_size: Inputs per encoder call.
        device: Where the retriever runs (default: CUDA when available).
        progress: Show progress bars.
    """
    from vdr.evaluation.encoders import load_encoder
    from vdr.evaluation.run import evaluate

    result = evaluate(load_encoder(model, device), eval_set, batch_size=batch_size, k=depth, progress=progress)
    return Candidates(result.ranked, f"retriever {model} (top {depth})")
