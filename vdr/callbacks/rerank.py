"""Reranking evaluation during training: score every eval query's candidate pages, re-sort, log NDCG@10.

The rerank data module's validation loader yields the candidate (query, page) pairs; the module's
``validation_step`` scores them. This callback puts each score at its place in the ``[Q, C]`` candidate lists, and at
epoch end logs ``val/rerank_ndcg@10`` (with ``val/rerank_mrr@10`` and ``val/rerank_recall@1``) beside
``val/first_stage_ndcg@10``: the same lists in their first-stage order, so the reranker's gain is one subtraction.
Ties in the reranker's scores keep the first-stage order; metric policies are ``vdr.evaluation.metrics``'s.
With several ranks, each scores its shard of the pairs; only (pair index, score) is gathered.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from vdr.callbacks.evaluation import EvaluationCallback
from vdr.distributed.collectives import all_gather_uneven

RERANK_METRICS = ("ndcg@10", "mrr@10", "recall@1")


class RerankEvaluator(EvaluationCallback):
    """Reranks the eval candidate lists at each validation and logs the metrics of both orders.

    Args:
        prefix: Metric name prefix.
    """

    def __init__(self, prefix: str = "val/") -> None:
        super().__init__()
        self.prefix = prefix
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._chunks = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        real = batch.index >= 0  # -1 marks the padding of distributed shards
        self._chunks.append((batch.index[real].cpu(), outputs.detach().float().cpu()[real.cpu()]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._chunks:
            self._chunks = []
            return
        data = trainer.datamodule
        candidates, eval_set = data.candidates, data.eval_set
        index = torch.cat(all_gather_uneven(torch.cat([i for i, _ in self._chunks]).to(pl_module.device))).cpu()
        values = torch.cat(all_gather_uneven(torch.cat([s for _, s in self._chunks]).to(pl_module.device))).cpu()
        scores = torch.full(candidates.rows.shape, float("nan"))  # [Q, C]
        scores.view(-1)[index] = values
        self._chunks = []
        scored = ~scores.isnan()
        if not torch.equal(scored, candidates.rows != -1):
            raise RuntimeError(f"scored {int(scored.sum())} candidate pairs, expected {candidates.num_pairs}")
        first = candidates.metrics(eval_set)
        reranked = candidates.metrics(eval_set, candidates.reranked(scores))
        prefix = "test/" if trainer.testing else self.prefix
        for name in RERANK_METRICS:
            pl_module.log(f"{prefix}rerank_{name}", reranked[name], prog_bar=name == "ndcg@10", sync_dist=True)
        pl_module.log(f"{prefix}first_stage_ndcg@10", first["ndcg@10"], sync_dist=True)
        self.last_metrics = {"step": trainer.global_step, **{f"rerank_{k}": v for k, v in reranked.items()},
                             "first_stage_ndcg@10": first["ndcg@10"]}
        rank_zero_info(f"step {trainer.global_step}: rerank_ndcg@10 {reranked['ndcg@10']:.4f} "
                       f"(first stage {first['ndcg@10']:.4f}), rerank_recall@1 {reranked['recall@1']:.4f}")
