"""Token-budget batching: the cost model is the collator's padded size, every batch is under budget, rows are used
once, ranks get equal counts of disjoint batches, Lightning's DDP sampler injection rebuilds the same batches, and a
two-rank ``vdr fit`` trains on them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from datasets import load_from_disk
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from vdr.data.batching import RowCosts, TokenBudgetBatchSampler, train_row_costs, visual_tokens
from vdr.data.collator import EmbeddingCollator
from vdr.data.datamodule import RetrievalDataModule
from vdr.data.errors import DataError
from vdr.data.pages import _smart_resize, smart_resize
from vdr.data.schema import TrainRows
from vdr.data.sources import load_table
from vdr.data.synth import SynthConfig, config_record, generate, plan, render_spec
from vdr.models.processor import build_processor

from .conftest import REPO, STACK

# Pages of 40 to 224 px: 4 to 49 visual tokens under the bounds below (upscaled small pages included).
VARIED = SynthConfig(seed=1, image_size=64, num_train_pages=48, num_negatives=1, num_eval_queries=4,
                     distractors_per_query=1, page_size_range=(40, 224))
MIN_PIXELS, MAX_PIXELS = 48 * 48, 224 * 224
BUDGET = 900  # 5 to 8 rows of these pages: the budget, not the batch cap of 8, decides


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("varied") / "synth"
    generate(out, VARIED, progress=False)
    return out


@pytest.fixture(scope="module")
def collator() -> EmbeddingCollator:
    return EmbeddingCollator(build_processor(MIN_PIXELS, MAX_PIXELS))


@pytest.fixture(scope="module")
def rows(varied: Path) -> TrainRows:
    return TrainRows(load_table(str(varied / "train")), "varied", num_negatives=1, root=str(varied / "train"))


@pytest.fixture(scope="module")
def costs(rows: TrainRows, collator: EmbeddingCollator) -> RowCosts:
    return train_row_costs(rows, collator)


def random_costs(n: int = 600, seed: int = 0) -> RowCosts:
    rng = random.Random(seed)
    return RowCosts([rng.randint(20, 60) for _ in range(n)], [rng.randint(10, 400) for _ in range(n)], 2)


def padded_tokens(batch) -> int:
    return batch.queries.input_ids.numel() + batch.documents.input_ids.numel()


def all_batches(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    return [batch for step in sampler.plan(epoch).steps for batch in step]


# ---- cost model ------------------------------------------------------------------------------------------------------


def test_visual_tokens_follow_the_image_processor(collator: EmbeddingCollator) -> None:
    sizes = [(12, 9), (40, 224), (640, 80), (90, 700), (333, 257), (1200, 1600), (64, 64)]
    images = [Image.new("RGB", size, "white") for size in sizes]
    grid = collator.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert [visual_tokens(w, h, collator.image_processor) for w, h in sizes] == (grid.prod(-1) // 4).tolist()
    for width, height in sizes:  # our copy of the rule (for releases that do not export it) agrees with theirs
        assert _smart_resize(height, width, 32, MIN_PIXELS, MAX_PIXELS) == smart_resize(
            height, width, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_cost_model_is_the_collators_padded_size(rows, collator, costs) -> None:
    assert len(set(costs.page)) > 4 and len(set(costs.query)) > 3  # the data varies, so the check means something
    sampler = TokenBudgetBatchSampler(costs, BUDGET, max_batch_size=12)
    batches = all_batches(sampler, 0)[:4] + [[0], [5, 17, 40], list(range(20))]
    for batch_rows in batches:
        batch = collator([rows[r] for r in batch_rows])
        assert padded_tokens(batch) == costs.batch_tokens(batch_rows)
        assert batch.queries.attention_mask.sum(1).tolist() == [costs.query[r] for r in batch_rows]
        pages = batch.documents.attention_mask.sum(1).view(2, -1).max(0).values  # [B]: each row's longest page
        assert pages.tolist() == [costs.page[r] for r in batch_rows]


# ---- packing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "max_batch_size"), [(900, None), (2000, None), (5000, 32), (20000, 64)])
def test_batches_are_under_budget_and_rows_used_at_most_once(max_tokens, max_batch_size) -> None:
    costs = random_costs()
    for world_size in (1, 3):
        sampler = TokenBudgetBatchSampler(costs, max_tokens, max_batch_size=max_batch_size, world_size=world_size)
        for epoch in range(3):
            batches, dropped = all_batches(sampler, epoch), sampler.plan(epoch).dropped
            assert all(costs.batch_tokens(b) <= max_tokens for b in batches)
            assert max_batch_size is None or max(len(b) for b in batches) <= max_batch_size
            used = [r for b in batches for r in b]
            assert len(used) == len(set(used)) and sorted(used + dropped) == list(range(len(costs)))
            rows_per_batch = max_batch_size or max_tokens // min(map(costs.row_tokens, range(len(costs))))
            assert len(dropped) <= world_size * rows_per_batch  # the tail: fewer than a batch per rank


def test_similar_lengths_share_a_batch() -> None:
    costs = random_costs()
    sampler = TokenBudgetBatchSampler(costs, 5000, max_batch_size=32)
    padded = sum(costs.batch_tokens(b) for b in all_batches(sampler, 0))
    shuffled = list(range(len(costs)))
    random.Random(0).shuffle(shuffled)
    fixed = sum(costs.batch_tokens(shuffled[i : i + 32]) for i in range(0, len(shuffled), 32))
    assert padded < 0.75 * fixed  # sorting within pools halves the page padding of random batches here


def test_the_count_is_fixed_per_run_and_split_or_refilled_to_it() -> None:
    costs = random_costs()
    sampler = TokenBudgetBatchSampler(costs, 2000)
    counts = {len(list(_epoch(sampler, epoch))) for epoch in range(8)}
    assert counts == {len(sampler)}
    for change in (7, -7):  # an epoch that packs into fewer batches than the run's count, then into more
        sampler.num_batches += change
        sampler._plan = None
        batches = all_batches(sampler, 0)
        assert len(batches) == sampler.num_batches and all(costs.batch_tokens(b) <= 2000 for b in batches)
        used = [r for b in batches for r in b]
        assert len(used) == len(set(used)) and len(used) + len(sampler.plan(0).dropped) == len(costs)
        sampler.num_batches -= change


def _epoch(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_equal_counts_of_disjoint_rows(world_size: int, costs: RowCosts) -> None:
    samplers = [TokenBudgetBatchSampler(costs, BUDGET, max_batch_size=8, rank=r, world_size=world_size)
                for r in range(world_size)]
    assert len({len(s) for s in samplers}) == 1
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert all(len(batches) == len(samplers[0]) for batches in per_rank)
        used = [r for batches in per_rank for b in batches for r in b]
        assert len(used) == len(set(used))
        assert len(costs) - len(used) <= world_size * 8


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_get_balanced_token_loads(world_size: int) -> None:
    costs = random_costs()
    sampler = TokenBudgetBatchSampler(costs, 3000, world_size=world_size)
    steps = [[costs.batch_tokens(b) for b in step] for step in sampler.plan(0).steps]
    loads = [sum(step[rank] for step in steps) for rank in range(world_size)]
    assert max(loads) <= 1.02 * min(loads)
    # The batches of a step cost about the same (the slowest rank sets a DDP step's pace).
    assert sum(max(step) - min(step) for step in steps) <= 0.1 * sum(map(max, steps))


def test_deterministic_per_seed_and_epoch_and_different_across_epochs(costs: RowCosts) -> None:
    one, again = (TokenBudgetBatchSampler(costs, BUDGET, seed=3) for _ in range(2))
    assert _epoch(one, 0) == _epoch(again, 0) and _epoch(one, 5) == _epoch(again, 5)
    assert _epoch(one, 0) != _epoch(one, 1)
    assert _epoch(one, 0) != _epoch(TokenBudgetBatchSampler(costs, BUDGET, seed=4), 0)


def test_a_row_over_budget_is_named_at_construction(costs: RowCosts) -> None:
    worst = max(range(len(costs)), key=costs.row_tokens)
    with pytest.raises(DataError, match=rf"'varied', row \d+: needs \d+ padded tokens .* max_tokens=\d+.*row {worst}"):
        TokenBudgetBatchSampler(costs, costs.row_tokens(worst) - 1)
    TokenBudgetBatchSampler(costs, costs.row_tokens(worst))  # exactly the largest row: fits
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        TokenBudgetBatchSampler(RowCosts([10] * 3, [10] * 3, 2), 1000, world_size=4)


# ---- Lightning -------------------------------------------------------------------------------------------------------


def test_lightnings_ddp_injection_rebuilds_the_same_batches(costs: RowCosts) -> None:
    """What Lightning does to a training loader under DDP (data_connector._prepare_dataloader): it records the loader's
    and the batch sampler's arguments while the hook runs, then rebuilds both around its own DistributedSampler, and
    calls that sampler's set_epoch each epoch."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.utilities.data import _update_dataloader

    dataset = list(range(len(costs)))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(dataset, batch_sampler=TokenBudgetBatchSampler(costs, BUDGET, rank=1, world_size=2),
                            collate_fn=list)
    injected = _update_dataloader(loader, DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=9))
    assert isinstance(injected.batch_sampler, TokenBudgetBatchSampler)
    assert injected.batch_sampler is not loader.batch_sampler
    assert isinstance(injected.batch_sampler.sampler, DistributedSampler)
    reference = TokenBudgetBatchSampler(costs, BUDGET, rank=1, world_size=2)
    for epoch in (0, 3):
        _set_sampler_epoch(injected, epoch)
        assert list(injected) == _epoch(reference, epoch)  # rank 1's batches, not rank 1's share of them
    assert len(injected) == len(reference)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        unsharded = DataLoader(dataset, batch_sampler=TokenBudgetBatchSampler(costs, BUDGET), collate_fn=list)
    adopted = _update_dataloader(unsharded, DistributedSampler(dataset, num_replicas=2, rank=1)).batch_sampler
    assert (adopted.rank, adopted.world_size) == (1, 2) and list(adopted) == _epoch(reference, 0)
    with pytest.raises(ValueError, match="disagrees"):
        TokenBudgetBatchSampler(costs, BUDGET, rank=0, world_size=1, sampler=DistributedSampler(dataset, 2, 1))


def test_datamodule_loader_keeps_the_budget(varied: Path, rows: TrainRows, collator, costs) -> None:
    budget = BUDGET
    data = RetrievalDataModule(train=str(varied / "train"), batch_size=8, max_tokens_per_batch=budget)
    data.collator = collator
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.batch_sampler, TokenBudgetBatchSampler)
    batches = list(loader)
    assert len(batches) == len(loader) and len({len(b) for b in batches}) > 1
    for batch in batches:
        assert padded_tokens(batch) <= budget and len(batch) <= 8  # measured on the collated tensors
    seen = [r for batch in batches for r in batch.rows.tolist()]
    assert len(seen) == len(set(seen)) and len(seen) >= len(rows) - 8
    # Without Lightning's injection (use_distributed_sampler false), the ranks come from the trainer's sharding.
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    sharded = data.train_dataloader().batch_sampler
    assert (sharded.rank, sharded.world_size) == (1, 2)
    assert list(sharded) == list(TokenBudgetBatchSampler(costs, budget, max_batch_size=8, rank=1, world_size=2))
    fixed = RetrievalDataModule(train=str(varied / "train"), batch_size=8)  # the default keeps fixed batches
    fixed.collator = collator
    fixed.setup("fit")
    assert {len(b) for b in fixed.train_dataloader()} == {8}
    with pytest.raises(ValueError, match="max_tokens_per_batch must be >= 1"):
        RetrievalDataModule(train=str(varied / "train"), max_tokens_per_batch=0)


# ---- synthetic pages of varied size ----------------------------------------------------------------------------------


def test_synthetic_pages_vary_in_size_and_default_data_is_unchanged(varied: Path, tmp_path: Path) -> None:
    sizes = {image.size for image in load_from_disk(str(varied / "train"))["image"]}
    assert len(sizes) > 10 and all(w == h and 40 <= w <= 224 for w, h in sizes)
    spec = plan(VARIED).train[0].positive
    assert render_spec(spec, size=64, blank_query_text=True, size_range=(40, 224)).size == render_spec(
        spec, size=64, blank_query_text=False, size_range=(40, 224)).size  # blanked pages keep their size
    # A config without the option keeps the record (synth.json) it always had: cached datasets are not regenerated.
    record = config_record(SynthConfig())
    assert "page_size_range" not in record and config_record(VARIED)["page_size_range"] == [40, 224]
    stamp = (varied / "synth.json").stat().st_mtime_ns
    RetrievalDataModule(synthetic=VARIED, synthetic_dir=str(varied)).prepare_data()
    assert (varied / "synth.json").stat().st_mtime_ns == stamp


# ---- two DDP ranks ---------------------------------------------------------------------------------------------------


class RowRecorder(L.Callback):
    """Writes ``rank{r}.json`` into ``output``: the dataset rows of each training batch, per epoch, and the loader."""

    def __init__(self, output: str) -> None:
        self.output, self.epochs = output, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs.setdefault(str(trainer.current_epoch), []).append(batch.rows.tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.batch_sampler
        record = {"epochs": self.epochs, "len": len(trainer.train_dataloader), "world": sampler.world_size,
                  "rank": sampler.rank, "injected": not isinstance(sampler.sampler.dataset, range)}
        os.makedirs(self.output, exist_ok=True)
        Path(self.output, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_ddp_ranks_train_on_the_planned_batches(varied: Path, rows, tmp_path: Path) -> None:
    """``vdr fit`` on 2 gloo ranks with a token budget: Lightning's sampler injection neither crashes nor splits the
    rows twice; each rank trains on exactly its planned batches, in both epochs, and the ranks' rows are disjoint."""
    budget, pixels = BUDGET, ["--model.backbone.min_pixels", str(MIN_PIXELS), "--model.backbone.max_pixels",
                            str(MAX_PIXELS)]
    command = [sys.executable, "-m", "vdr.cli", "fit", *STACK, *pixels, "--data.train", str(varied / "train"),
               "--data.eval", str(varied / "eval"), "--data.batch_size", "8", "--data.max_tokens_per_batch",
               str(budget), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.name", "budget",
               "--trainer.callbacks+", "tests.test_batching.RowRecorder", "--trainer.callbacks.output",
               str(tmp_path / "rows")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / "rows" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["injected"]) for r in ranks] == [(0, 2, True), (1, 2, True)]
    collator = EmbeddingCollator(build_processor(MIN_PIXELS, MAX_PIXELS))
    costs = train_row_costs(rows, collator)
    for rank, record in enumerate(ranks):
        planned = TokenBudgetBatchSampler(costs, budget, max_batch_size=8, rank=rank, world_size=2)
        assert record["len"] == len(planned)
        for epoch in (0, 1):
            assert record["epochs"][str(epoch)] == _epoch(planned, epoch)
    for epoch in ("0", "1"):
        used = [r for record in ranks for b in record["epochs"][epoch] for r in b]
        assert len(used) == len(set(used))
