"""Retrieval evaluation during training: rank the whole eval corpus for every eval query and log NDCG@10.

The data module's validation loaders yield the eval queries (loader 0) and then the corpus (loader 1); the module's
``validation_step`` embeds them. This callback keeps the query embeddings, merges each corpus chunk into a running
top-k (``[Q, k]`` memory, never a queries x corpus matrix), and at epoch end logs ``val/ndcg@10``,
``val/mrr@10``, ``val/recall@1`` and ``val/recall@10`` (see ``vdr.evaluation.metrics`` for tie and empty-query
policies), so ``ModelCheckpoint(monitor="val/ndcg@10", mode="max")`` works.

With several ranks, each embeds its shard of the queries and of the corpus. The query embeddings (``[Q, D]``) are
gathered once, each rank keeps the top-k of its corpus shard, and only those (``[Q, k]`` scores and rows per rank) are
gathered and merged: the corpus embeddings never leave their rank.

Matryoshka: for each listed dimension ``d`` the corpus is also ranked with the embeddings truncated to their first
``d`` dimensions and renormalised (how Sentence Transformers' ``truncate_dim`` serves them), one more running top-k
per ``d``, and ``val/ndcg@10_d{d}`` is logged; at the full size it is ``val/ndcg@10`` itself.

Pictures: at each validation, rank zero also logs to TensorBoard (``val/retrieval``) one image of the top pages of a
few fixed eval queries, relevant pages framed in green (``vdr.evaluation.grid``), so a run's progress can be watched
in the Images tab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from vdr.callbacks.evaluation import EvaluationCallback
from vdr.distributed.collectives import all_gather_uneven
from vdr.evaluation.grid import fixed_queries, retrieval_grid
from vdr.evaluation.metrics import retrieval_metrics
from vdr.evaluation.topk import RunningTopK

QUERIES, CORPUS = 0, 1


class RetrievalEvaluator(EvaluationCallback):
    """Ranks the eval corpus at each validation and logs retrieval metrics.

    Args:
        k: Documents kept per query (at least 10; more lets later stages rerank).
        prefix: Metric name prefix.
        dims: Matryoshka dimensions to also evaluate (``ndcg@10_d{d}``); default: the module loss's ``dims`` when it
            has them (``MatryoshkaLoss``), else none.
        image_queries: How many fixed eval queries (spread over the eval set) the TensorBoard image shows; 0: none.
        image_depth: Top pages shown per query in that image.
    """

    def __init__(self, k: int = 100, prefix: str = "val/", dims: list[int] | None = None, image_queries: int = 4,
                 image_depth: int = 5) -> None:
        if k < 10:
            raise ValueError(f"k must be at least 10 for NDCG@10, got {k}")
        if dims is not None and any(d <= 0 for d in dims):
            raise ValueError(f"dims must be positive, got {dims}")
        if image_queries < 0 or not 1 <= image_depth <= k:
            raise ValueError(f"need image_queries >= 0 and 1 <= image_depth <= k, got {image_queries}, {image_depth}")
        super().__init__()
        self.k, self.prefix, self.dims = k, prefix, dims
        self.image_queries, self.image_depth = image_queries, image_depth
        self._query_chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._topk: RunningTopK | None = None
        self._truncated: dict[int, RunningTopK] = {}  # d -> top-k by the first d dimensions; d < full size only
        self._eval_dims: list[int] = []
        self.last_ranking: torch.Tensor | None = None

    def _reset(self) -> None:
        self._query_chunks, self._topk, self._truncated, self._eval_dims = [], None, {}, []

    def _resolve_dims(self, pl_module, embedding_dim: int) -> list[int]:
        """The dimensions to evaluate, largest first: ours, else the loss's."""
        dims = self.dims if self.dims is not None else getattr(getattr(pl_module, "loss", None), "dims", None)
        too_large = [d for d in dims or [] if d > embedding_dim]
        if too_large:
            raise ValueError(f"RetrievalEvaluator dims {too_large} exceed the embedding size {embedding_dim}")
        return sorted(set(dims or []), reverse=True)

    def _merged_ranking(self, topk: RunningTopK) -> torch.Tensor:
        """``[Q, k]`` corpus rows: every rank's top-k of its corpus shard merged (one process: just its own)."""
        scores, rows = topk.result()  # [Q, <=k]; gathered as [k, Q] (along k, which may differ between ranks)
        merged = RunningTopK(topk.queries, self.k)
        parts = zip(all_gather_uneven(scores.T.contiguous()), all_gather_uneven(rows.T.contiguous()))
        for part_scores, part_rows in parts:
            merged.merge(part_scores.T, part_rows.T)
        return merged.result()[1]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        real = batch.index >= 0  # [B]; -1 marks the padding of distributed shards
        index, embeddings = batch.index[real], outputs.detach()[real.to(outputs.device)]
        if dataloader_idx == QUERIES:
            self._query_chunks.append((index.to(embeddings.device), embeddings))
            return
        if self._topk is None:
            # All queries are in (on every rank): order them by row once, then stream the corpus.
            query_rows = torch.cat(all_gather_uneven(torch.cat([i for i, _ in self._query_chunks])))
            query_embeddings = torch.cat(all_gather_uneven(torch.cat([e for _, e in self._query_chunks])))
            queries = torch.empty_like(query_embeddings)  # [Q, D]
            queries[query_rows] = query_embeddings
            self._topk = RunningTopK(queries, self.k)
            self._eval_dims = self._resolve_dims(pl_module, queries.shape[1])
            self._truncated = {d: RunningTopK(_truncate(queries, d), self.k)
                               for d in self._eval_dims if d < queries.shape[1]}
            self._query_chunks = []
        self._topk.update(embeddings, index)
        for d, topk in self._truncated.items():
            topk.update(_truncate(embeddings, d), index)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._topk is None:
            self._reset()
            return
        eval_set = trainer.datamodule.eval_set
        ranked = self._merged_ranking(self._topk)
        if ranked.shape[0] != len(eval_set.qrels):
            raise RuntimeError(f"ranked {ranked.shape[0]} queries, the eval set has {len(eval_set.qrels)}")
        metrics = retrieval_metrics(ranked, eval_set.qrels, corpus_size=len(eval_set.corpus_ids))
        if metrics["num_skipped"]:
            rank_zero_warn(f"{metrics['num_skipped']} eval queries have no relevant document and were skipped")
        prefix = "test/" if trainer.testing else self.prefix
        for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
            # Every rank holds the same value; sync_dist averages equal numbers (and keeps Lightning quiet).
            pl_module.log(f"{prefix}{name}", metrics[name], prog_bar=True, sync_dist=True)
        by_dim = {}
        for d in self._eval_dims:
            truncated = self._truncated.get(d)
            by_dim[f"ndcg@10_d{d}"] = metrics["ndcg@10"] if truncated is None else retrieval_metrics(
                self._merged_ranking(truncated), eval_set.qrels, corpus_size=len(eval_set.corpus_ids))["ndcg@10"]
        for name, value in by_dim.items():
            pl_module.log(f"{prefix}{name}", value, sync_dist=True)
        self.last_metrics = {"step": trainer.global_step, **metrics, **by_dim}
        self.last_ranking = ranked.cpu()
        self._log_image(trainer, eval_set, f"{prefix}retrieval")
        rank_zero_info(
            f"step {trainer.global_step}: " + ", ".join(f"{n} {metrics[n]:.4f}" for n in ("ndcg@10", "recall@1"))
            + "".join(f", {n} {v:.4f}" for n, v in by_dim.items())
        )
        self._reset()

    def _log_image(self, trainer, eval_set, tag: str) -> None:
        """The top pages of the fixed queries, as one image, to every TensorBoard logger (rank zero)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        queries = fixed_queries(len(eval_set.query_ids), self.image_queries)
        if not trainer.is_global_zero or not loggers or not queries:
            return
        try:
            grid = retrieval_grid(eval_set, self.last_ranking, queries, depth=self.image_depth)  # [H, W, 3]
        except Exception as error:
            # A picture must not end a run: on rank zero alone, the other ranks would wait at the next collective.
            rank_zero_warn(f"could not draw the {tag} image: {type(error).__name__}: {error}")
            return
        for logger in loggers:
            logger.experiment.add_image(tag, grid, trainer.global_step, dataformats="HWC")


def _truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, dim]``: the first ``dim`` dimensions, renormalised to unit length."""
    return F.normalize(embeddings[:, :dim].float(), dim=-1)
