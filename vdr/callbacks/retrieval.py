"""Retrieval evaluation during training: rank the whole eval corpus for every eval query and log NDCG@10.

The data module's validation loaders yield the eval queries (loader 0) and then the corpus (loader 1); the module's
``validation_step`` embeds them. This callback keeps the query embeddings, merges each corpus chunk into a running
top-k (``[Q, k]`` memory, never a queries x corpus matrix), and at epoch end logs ``val/ndcg@10``,
``val/mrr@10``, ``val/recall@1`` and ``val/recall@10`` (see ``vdr.evaluation.metrics`` for tie and empty-query
policies), so ``ModelCheckpoint(monitor="val/ndcg@10", mode="max")`` works.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from vdr.callbacks.evaluation import EvaluationCallback
from vdr.evaluation.metrics import retrieval_metrics
from vdr.evaluation.topk import RunningTopK

QUERIES, CORPUS = 0, 1


class RetrievalEvaluator(EvaluationCallback):
    """Ranks the eval corpus at each validation and logs retrieval metrics.

    Args:
        k: Documents kept per query (at least 10; more lets later stages rerank).
        prefix: Metric name prefix.
    """

    def __init__(self, k: int = 100, prefix: str = "val/") -> None:
        if k < 10:
            raise ValueError(f"k must be at least 10 for NDCG@10, got {k}")
        super().__init__()
        self.k, self.prefix = k, prefix
        self._query_chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._topk: RunningTopK | None = None
        self.last_ranking: torch.Tensor | None = None

    def _reset(self) -> None:
        self._query_chunks, self._topk = [], None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == QUERIES:
            self._query_chunks.append((batch.index, outputs.detach()))
            return
        if self._topk is None:
            # All queries are in: order them by row once, then stream the corpus.
            index = torch.cat([i for i, _ in self._query_chunks])
            embeddings = torch.cat([e for _, e in self._query_chunks])
            queries = torch.empty_like(embeddings)
            queries[index.to(embeddings.device)] = embeddings
            self._topk = RunningTopK(queries, self.k)
            self._query_chunks = []
        self._topk.update(outputs.detach(), batch.index)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._topk is None:
            self._reset()
            return
        eval_set = trainer.datamodule.eval_set
        _, ranked = self._topk.result()
        if ranked.shape[0] != len(eval_set.qrels):
            raise RuntimeError(f"ranked {ranked.shape[0]} queries, the eval set has {len(eval_set.qrels)}")
        metrics = retrieval_metrics(ranked, eval_set.qrels, corpus_size=len(eval_set.corpus_ids))
        if metrics["num_skipped"]:
            rank_zero_warn(f"{metrics['num_skipped']} eval queries have no relevant document and were skipped")
        prefix = "test/" if trainer.testing else self.prefix
        for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
            pl_module.log(f"{prefix}{name}", metrics[name], prog_bar=True)
        self.last_metrics = {"step": trainer.global_step, **metrics}
        self.last_ranking = ranked.cpu()
        rank_zero_info(
            f"step {trainer.global_step}: " + ", ".join(f"{n} {metrics[n]:.4f}" for n in ("ndcg@10", "recall@1"))
        )
        self._reset()
