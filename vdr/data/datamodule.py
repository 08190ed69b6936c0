"""The LightningDataModule: training rows and an evaluation set from disk, parquet or the hub.

Which tensors a row becomes is the model's business: the collator comes from the LightningModule
(``collator`` attribute) unless one is passed, so data and model cannot disagree on prompts or page sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from vdr.data.batching import RowCosts, TokenBudgetBatchSampler, train_row_costs
from vdr.data.resume import ShuffledRows, TrainPosition
from vdr.data.schema import EvalSet, PairRows, TrainRows, load_eval_set
from vdr.data.sources import load_table
from vdr.data.synth import GENERATOR_VERSION, SynthConfig, config_record, generate
from vdr.evaluation.candidates import (
    Candidates,
    retriever_candidates,
    run_file_candidates,
    sampled_candidates,
)


class PaddedRows(torch.utils.data.Dataset):
    """An eval dataset padded to a multiple of the world size; padding items repeat row 0 with ``index = -1``.

    Lightning shards eval loaders with a ``DistributedSampler``, which pads by repeating real rows: a repeated page
    would then be ranked twice. Padding here instead keeps every rank's batch count equal (FSDP needs each rank to
    run the same forwards) and lets the evaluation callbacks drop the padding by its index.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, multiple: int) -> None:
        self.dataset, self.length = dataset, math.ceil(len(dataset) / multiple) * multiple

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        return dataclasses.replace(self.dataset[0], index=-1)


class RetrievalDataModule(L.LightningDataModule):
    """Training rows (query, image, negative_i) and an eval set (queries, corpus, qrels).

    Args:
        train: Training table: a save_to_disk directory, parquet file(s), or a hub dataset id.
        eval: Eval set: a directory holding queries/, corpus/ and qrels/, or a hub id with those configurations.
        num_negatives: Hard-negative columns per row to train with (negative_0 ..).
        batch_size: Training queries per step per device (with ``max_tokens_per_batch``: the most per step).
        eval_batch_size: Queries or pages embedded per eval step.
        num_workers: DataLoader worker processes: they decode pages and tokenize (and run the HF image processor with
            the module's ``page_preprocessing: processor``).
        verify_images: Check every image header at setup, so a corrupt file fails before training.
        synthetic: When set, generate the synthetic VDR data with this config into ``synthetic_dir`` if it is
            missing, and use it for ``train`` and ``eval`` unless those are given.
        synthetic_dir: Where the synthetic data lives.
        seed: Seed of the training shuffle.
        max_tokens_per_batch: Token-budget batching: training batches of similar-length rows whose padded decoder
            tokens (B x longest query + B x (1 + k) x longest page) stay under this, the same number of batches on
            every rank and in every epoch (``vdr.data.batching``). None: fixed ``batch_size`` batches.
        skip_bad_rows: A bad training row (an empty or non-text query, a missing, unreadable or corrupt page, ...)
            is left out instead of failing the run: rows that fail the checks at setup are dropped (a warning counts
            and names them), a row whose pixels do not decode is passed over for the next (``data/skipped_rows``
            counts those). Column-level problems and eval sets always fail: the corpus must be whole.
    """

    def __init__(
        self,
        train: str | None = None,
        eval: str | None = None,
        num_negatives: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        verify_images: bool = True,
        synthetic: SynthConfig | None = None,
        synthetic_dir: str = "checkpoints/data/synth",
        seed: int = 0,
        max_tokens_per_batch: int | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        super().__init__()
        # Plain data only (the synthetic config as a dict), so hparams.yaml and TensorBoard can hold it.
        self.save_hyperparameters(ignore=["synthetic"])
        self.hparams["synthetic"] = config_record(synthetic) if synthetic else None
        if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1 (null: fixed batches), got {max_tokens_per_batch}")
        self.skip_bad_rows = skip_bad_rows
        if synthetic is not None:
            train = train or os.path.join(synthetic_dir, "train")
            eval = eval or os.path.join(synthetic_dir, "eval")
        if train is None and eval is None:
            raise ValueError("give a training table (train), an eval set (eval), or synthetic data (synthetic)")
        self.train_source, self.eval_source = train, eval
        self.synthetic, self.synthetic_dir = synthetic, synthetic_dir
        self.num_negatives, self.batch_size, self.eval_batch_size = num_negatives, batch_size, eval_batch_size
        self.num_workers, self.verify_images, self.seed = num_workers, verify_images, seed
        self.max_tokens_per_batch = max_tokens_per_batch
        self.row_costs: RowCosts | None = None
        self.collator = None
        self.train_rows: TrainRows | None = None
        self.eval_set: EvalSet | None = None
        self.start: TrainPosition | None = None  # a resumed run's place in its data (``load_state_dict``)

    def prepare_data(self) -> None:
        if self.synthetic is None:
            return
        meta_path = os.path.join(self.synthetic_dir, "synth.json")
        if not os.path.exists(meta_path):
            rank_zero_info(f"generating synthetic VDR data into {self.synthetic_dir}")
            generate(self.synthetic_dir, self.synthetic)
            return
        with open(meta_path) as handle:
            meta = json.load(handle)
        if meta.get("generator_version") != GENERATOR_VERSION or meta.get("config") != config_record(self.synthetic):
            # Generated data of another generator version or config: regenerate rather than train on other pages.
            rank_zero_info(f"{self.synthetic_dir} holds synthetic data of another generator version or config; "
                           "regenerating it")
            generate(self.synthetic_dir, self.synthetic, overwrite=True)

    def setup(self, stage: str) -> None:
        if self.collator is None:
            if self.trainer is None or not hasattr(self.trainer.lightning_module, "collator"):
                raise RuntimeError("no collator: attach a LightningModule with a `collator` or set `collator`")
            self.collator = self.trainer.lightning_module.collator
        if stage == "fit" and self.train_rows is None:
            if self.train_source is None:
                raise ValueError("fit needs a training table (data.train)")
            root = self.train_source if os.path.isdir(self.train_source) else None
            self.train_rows = self._train_rows(load_table(self.train_source), root)
        if self.eval_source is not None and self.eval_set is None:
            self.eval_set = load_eval_set(self.eval_source, loader=load_table, verify_images=self.verify_images)

    def _train_rows(self, table, root: str | None) -> torch.utils.data.Dataset:
        return TrainRows(table, self.train_source, num_negatives=self.num_negatives, root=root,
                         verify_images=self.verify_images, skip_bad_rows=self.skip_bad_rows)

    def state_dict(self) -> dict:
        """The training position (epoch, batches of it finished) for a checkpoint, so a resumed run goes on from there.

        Read from Lightning's loop counters, whichever hook saves (after a batch, after a validation, at the end of an
        epoch or of fit): a checkpoint written after a batch counts that batch as finished; once an epoch's batches
        are all processed, the position is the next epoch's start.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epochs, batches = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress.current
        if epochs.processed == epochs.started or batches.ready >= trainer.num_training_batches:
            # Between epochs, or after an epoch's last batch (limit_train_batches may end it early): the next one.
            return {"train_position": {"epoch": epochs.processed + (epochs.processed != epochs.started), "batches": 0}}
        return {"train_position": {"epoch": epochs.processed, "batches": batches.ready}}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get("train_position")
        self.start = TrainPosition(**position) if position else None
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if self.start is not None and loop is not None and loop._combined_loader is not None:
            # The training loader was built before the checkpoint was read (FSDP restores after the strategy's setup,
            # whose optimizer setup counts the steps of an epoch): build it again, from the position.
            if loop._data_fetcher is not None:
                loop._data_fetcher.teardown()
                loop._data_fetcher = None
            loop._combined_loader = None
        # Lightning warns that a mid-epoch resume restarts the epoch; ours does not.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def _shard(self) -> dict:
        """This rank and the world size, as Lightning would give a ``DistributedSampler``."""
        return (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}

    def _start(self) -> TrainPosition | None:
        """The resumed position, once (the next ``train_dataloader`` call, e.g. a later fit, starts afresh)."""
        start, self.start = self.start, None
        if start is not None:
            rank_zero_info(f"resuming the training data at epoch {start.epoch}, after batch {start.batches}")
        return start

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:
            dataset = PaddedRows(dataset, self.trainer.world_size)
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=self.collator,
            persistent_workers=self.num_workers > 0, pin_memory=self._pin_memory(), generator=self._generator(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.max_tokens_per_batch is not None:
            return self._token_budget_loader()
        if len(self.train_rows) < self.batch_size:
            raise ValueError(f"{self.train_source}: {len(self.train_rows)} rows, fewer than one batch "
                             f"({self.batch_size}); lower data.batch_size")
        shard = self._shard()
        sampler = ShuffledRows(len(self.train_rows), self.batch_size, seed=self.seed, rank=shard.get("rank", 0),
                               world_size=shard.get("num_replicas", 1), start=self._start())
        # drop_last: every step has a full batch (equal in-batch negatives, equal per-rank batches under DDP).
        return DataLoader(
            self.train_rows, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, collate_fn=self.collator, persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(), generator=self._generator(),
        )

    def _token_budget_loader(self) -> DataLoader:
        if self.row_costs is None:
            self.row_costs = train_row_costs(self.train_rows, self.collator)  # image headers only: seconds per 10k
        # Lightning's sharding of a training loader under DDP: its DistributedSampler is handed to the batch sampler
        # (a BatchSampler subclass it rebuilds), which reads rank, world size and epoch from it and packs the same
        # batches as below; with use_distributed_sampler false, the ranks given here are used as they are.
        shard = self._shard()
        sampler = TokenBudgetBatchSampler(
            self.row_costs, self.max_tokens_per_batch, max_batch_size=self.batch_size, seed=self.seed,
            rank=shard.get("rank", 0), world_size=shard.get("num_replicas", 1), start=self._start(),
        )
        rank_zero_info(f"token-budget batching: {len(sampler)} batches per epoch per rank (of {len(self.train_rows)} "
                       f"rows, at most {self.max_tokens_per_batch} padded tokens and {self.batch_size} rows each)")
        return DataLoader(self.train_rows, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collator, persistent_workers=self.num_workers > 0,
                          pin_memory=self._pin_memory(), generator=self._generator())

    def _generator(self) -> torch.Generator:
        """A loader's own generator: starting an iterator draws its workers' base seed from it, not from torch's
        global generator, whose state a checkpoint restores and a resumed run must find as the stopped run left it."""
        return torch.Generator().manual_seed(self.seed)

    def _pin_memory(self) -> bool:
        """Batches go to a GPU: pin them (the loader's thread does it), so Lightning's non-blocking copy is async."""
        return isinstance(getattr(self.trainer, "accelerator", None), CUDAAccelerator)

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_set is None:
            return []
        # Queries first, then the corpus: the retrieval callback streams the corpus against all queries.
        return [self._loader(self.eval_set.query_rows(), self.eval_batch_size),
                self._loader(self.eval_set.corpus_rows(), self.eval_batch_size)]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


class RerankDataModule(RetrievalDataModule):
    """Training groups or labeled pairs for a reranker, and eval candidate lists to rerank.

    Training data: the bi-encoder's schema (``query``, ``image``, ``negative_i``; each row a group with its positive
    first), or labeled pairs (``query``, ``image``, ``label``) with ``labeled_pairs``. Evaluation reranks each eval
    query's candidates, taken from ``candidates`` (a first-stage run file), else from ``retriever``'s top-k, else
    sampled (the query's relevant pages plus random corpus pages). Token-budget batching (``max_tokens_per_batch`` of
    ``RetrievalDataModule``) is not offered here yet: groups and pairs are collated into (query, page) sequences, whose
    cost model the batch sampler does not have.

    Args:
        train: Training table (see ``RetrievalDataModule``).
        eval: Eval set with queries/, corpus/ and qrels/.
        num_negatives: Hard-negative columns per group (negative_0 ..).
        batch_size: Groups (or pairs) per step per device.
        eval_batch_size: Pairs scored per eval step.
        num_workers: DataLoader worker processes.
        verify_images: Check every image header at setup.
        synthetic: Generate and use the synthetic VDR data (see ``RetrievalDataModule``).
        synthetic_dir: Where the synthetic data lives.
        seed: Seed of the training shuffle and of sampled candidates.
        labeled_pairs: The training table holds labeled pairs (query, image, label), one pair per example.
        teacher_column: Column of teacher scores per row (positive first, then each negative), for distillation.
        candidates: A first-stage run file (TREC run or JSON ``{qid: {docid: score}}``) giving each eval query's
            candidates.
        retriever: A bi-encoder (checkpoint, export or hub id) whose top-k over the eval corpus are the candidates,
            computed once at setup.
        num_candidates: Candidates per eval query (the depth read from a run file or a retriever).
        skip_bad_rows: Leave bad training rows out instead of failing (see ``RetrievalDataModule``).
    """

    def __init__(
        self,
        train: str | None = None,
        eval: str | None = None,
        num_negatives: int = 1,
        batch_size: int = 8,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        verify_images: bool = True,
        synthetic: SynthConfig | None = None,
        synthetic_dir: str = "checkpoints/data/synth",
        seed: int = 0,
        labeled_pairs: bool = False,
        teacher_column: str | None = None,
        candidates: str | None = None,
        retriever: str | None = None,
        num_candidates: int = 20,
        skip_bad_rows: bool = False,
    ) -> None:
        super().__init__(train, eval, num_negatives, batch_size, eval_batch_size, num_workers, verify_images,
                         synthetic, synthetic_dir, seed, skip_bad_rows=skip_bad_rows)
        if labeled_pairs and teacher_column:
            raise ValueError("teacher scores are read per group; labeled pairs carry a label instead")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.labeled_pairs, self.teacher_column = labeled_pairs, teacher_column
        self.candidates_source, self.retriever, self.num_candidates = candidates, retriever, num_candidates
        self.candidates: Candidates | None = None

    def _train_rows(self, table, root: str | None) -> torch.utils.data.Dataset:
        if self.labeled_pairs:
            return PairRows(table, self.train_source, root=root, verify_images=self.verify_images,
                            skip_bad_rows=self.skip_bad_rows)
        return TrainRows(table, self.train_source, num_negatives=self.num_negatives, root=root,
                         verify_images=self.verify_images, teacher_column=self.teacher_column,
                         skip_bad_rows=self.skip_bad_rows)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.eval_set is not None and self.candidates is None:
            strategy = self.trainer.strategy if self.trainer is not None else None
            if strategy is None or strategy.global_rank == 0:
                self.candidates = self._candidates()
            if strategy is not None and strategy.world_size > 1:
                # One rank computes the lists (a retriever's top-k once, not on every GPU) and all share them, so
                # every rank's pair indices mean the same pairs.
                self.candidates = strategy.broadcast(self.candidates)
            rank_zero_info(f"reranking {self.candidates.num_pairs} candidate pairs: {self.candidates.source}")

    def _candidates(self) -> Candidates:
        if self.candidates_source:
            return run_file_candidates(self.candidates_source, self.eval_set, self.num_candidates)
        if self.retriever:
            return retriever_candidates(self.retriever, self.eval_set, self.num_candidates)
        return sampled_candidates(self.eval_set, self.num_candidates, self.seed)

    def val_dataloader(self) -> list[DataLoader]:
        if self.candidates is None:
            return []
        return [self._loader(self.candidates.pairs(self.eval_set), self.eval_batch_size)]
