"""Reranking evaluation during training: score every eval query's candidate pages, re-sort, log NDCG@10.

The rerank data module's validation loader yields the candidate (query, page) pairs; the module's
``validation_step`` scores them. This callback puts each score at its place in the ``[Q, C]`` candidate lists, and at
epoch end logs ``val/rerank_ndcg@10`` (with ``val/rerank_mrr@10`` and ``val/rerank_recall@1``) beside
``val/first_stage_ndcg@10``: the same lists in their first-stage order, so the reranker's gain is one subtraction.
Ties in the reranker's scores keep the first-stage order; metric policies are ``vdr.evaluation.metrics``'s.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from vdr.callbacks.evaluation import EvaluationCallback

RERANK_METRICS = ("ndcg@10", "mrr@10", "recall@1")


class RerankEvaluator(EvaluationCallback):
    """Reranks the eval candidate lists at each validation and logs the metrics of both orders.

    Args:
        prefix: Metric name prefix.
    """

    def __init__(self, prefix: str = "val/") -> None:
        super().__init__()
        self.prefix = prefix
        self._scores: torch.Tensor | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._scores = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._scores is None:
            rows = trainer.datamodule.candidates.rows  # [Q, C]
            self._scores = torch.full(rows.shape, float("nan"))
        self._scores.view(-1)[batch.index.cpu()] = outputs.detach().float().cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._scores is None:
            self._scores = None
            return
        data = trainer.datamodule
        candidates, eval_set = data.candidates, data.eval_set
        scored = ~self._scores.isnan()
        if not torch.equal(scored, candidates.rows != -1):
            raise RuntimeError(f"scored {int(scored.sum())} candidate pairs, expected {candidates.num_pairs}")
        first = candidates.metrics(eval_set)
        reranked = candidates.metrics(eval_set, candidates.reranked(self._scores))
        prefix = "test/" if trainer.testing else self.prefix
        for name in RERANK_METRICS:
            pl_module.log(f"{prefix}rerank_{name}", reranked[name], prog_bar=name == "ndcg@10")
        pl_module.log(f"{prefix}first_stage_ndcg@10", first["ndcg@10"])
        self.last_metrics = {"step": trainer.global_step, **{f"rerank_{k}": v for k, v in reranked.items()},
                             "first_stage_ndcg@10": first["ndcg@10"]}
        rank_zero_info(f"step {trainer.global_step}: rerank_ndcg@10 {reranked['ndcg@10']:.4f} "
                       f"(first stage {first['ndcg@10']:.4f}), rerank_recall@1 {reranked['recall@1']:.4f}")
        self._scores = None
