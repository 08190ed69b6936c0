"""Two ranks compute what one rank computes: DDP with global negatives, FSDP2, distributed evaluation, two nodes.

Every run here is a real ``vdr fit`` / ``vdr validate`` in child processes with gloo on the CPU (Lightning launches
the second rank, or torchrun launches both), on the tiny model in fp32. ``distributed_probe.Probe`` records each
rank's losses, first-step gradients and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Image, load_from_disk

from vdr.data.synth import generate

from .conftest import REPO, RERANK_STACK, STACK, TINY_SYNTH, data_args

TESTS = Path(__file__).resolve().parent
PER_RANK_BATCH = 4


def vdr(*args: str, cwd: Path, launcher: list[str] | None = None, timeout: int = 600) -> None:
    """Runs the ``vdr`` command (under ``launcher``, e.g. torchrun, if given) with one thread per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [*(launcher or [sys.executable, "-m"]), "vdr.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def probe_args(output: Path, **init_args) -> list[str]:
    args = ["--trainer.callbacks+", "distributed_probe.Probe", "--trainer.callbacks.output", str(output)]
    for name, value in init_args.items():
        args += [f"--trainer.callbacks.{name}", str(value).lower()]
    return args


def ranks(output: Path) -> list[dict]:
    files = sorted(output.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic data, plus ``train8``: 8 rows (one global batch of 2 x 4) with one hard negative each, where
    two rows' hard negative is another row's positive page (false negatives to mask across ranks)."""
    out = tmp_path_factory.mktemp("dist-data") / "synth"
    generate(out, TINY_SYNTH, progress=False)
    table = load_from_disk(str(out / "train")).select(range(8))
    table = table.cast_column("image", Image(decode=False)).cast_column("negative_0", Image(decode=False))
    rows = table.to_dict()
    rows["negative_0"][7] = rows["image"][0]
    rows["negative_0"][2] = rows["image"][5]
    Dataset.from_dict(rows, features=table.features).cast_column("image", Image()).cast_column(
        "negative_0", Image()).save_to_disk(str(out / "train8"))
    return out


def fit_args(synth: Path, name: str, *, devices: int, batch: int, steps: int,
             val_every: int | None = None) -> list[str]:
    return ["fit", *STACK, *data_args(synth), "--data.train", str(synth / "train8"), "--data.batch_size", str(batch),
            "--trainer.logger.init_args.name", name, "--trainer.devices", str(devices),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every or steps),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.max_epochs", "-1", *LEARNABLE_TEMPERATURE]


# A parameter FSDP leaves whole (a scalar): its gradient must still be averaged across ranks.
LEARNABLE_TEMPERATURE = ["--model.loss", "vdr.losses.contrastive.InfoNCELoss", "--model.loss.learnable_temperature",
                         "true"]
DDP = ["--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def one_process(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8: the reference."""
    root = tmp_path_factory.mktemp("one")
    vdr(*fit_args(synth, "one", devices=1, batch=2 * PER_RANK_BATCH, steps=1), *probe_args(root / "probe"), cwd=root)
    return root / "probe"


def _two_ranks(synth: Path, root: Path, strategy: list[str], steps: int = 1, **probe) -> Path:
    vdr(*fit_args(synth, "two", devices=2, batch=PER_RANK_BATCH, steps=steps), *strategy,
        *probe_args(root / "probe", **probe), cwd=root)
    return root / "probe"


@pytest.fixture(scope="module")
def ddp(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DDP ranks, batch 4 each, 3 steps (one step per epoch of train8)."""
    return _two_ranks(synth, tmp_path_factory.mktemp("ddp"), DDP, steps=3)


def _assert_same_step(reference: Path, other: Path) -> None:
    (one,), two = ranks(reference), ranks(other)
    assert len(two) == 2 and two[0]["world_size"] == 2
    # The logged loss is each rank's mean over its queries; with equal batches their mean is the global batch's.
    assert sum(r["losses"][0] for r in two) / 2 == pytest.approx(one["losses"][0], abs=1e-5)
    expected = torch.load(reference / "rank0-grads.pt")
    for rank in (0, 1):
        grads = torch.load(other / f"rank{rank}-grads.pt")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            # Two ranks sum in another order than one process: float32 rounding scales with the tensor's largest
            # entries, e.g. in the token-embedding gradient, which adds many rows' contributions (seen: 1.4e-6 on an
            # entry of 4e-3 in a table whose largest is 0.34). A lost global negative changes entries by far more
            # (test_a_gather_that_keeps_only_the_local_gradient_fails_the_gradient_check).
            atol = max(1e-6, 1e-5 * grad.abs().max().item())
            torch.testing.assert_close(grads[name], grad, atol=atol, rtol=1e-4, msg=name)


def test_ddp_global_negatives_give_the_one_process_loss_and_gradients(one_process: Path, ddp: Path) -> None:
    _assert_same_step(one_process, ddp)


@pytest.mark.slow  # 26 s: the check's own mutation test; the default suite keeps under 20 minutes
def test_a_gather_that_keeps_only_the_local_gradient_fails_the_gradient_check(synth, one_process, tmp_path) -> None:
    broken = _two_ranks(synth, tmp_path, DDP, local_gradient_gather=True)
    (one,), two = ranks(one_process), ranks(broken)
    assert sum(r["losses"][0] for r in two) / 2 == pytest.approx(one["losses"][0], abs=1e-5)  # the loss is right
    with pytest.raises(AssertionError):
        _assert_same_step(one_process, broken)  # the gradients are not


@pytest.mark.parametrize("strategy", ["ddp", "ddp-sparse", "fsdp"])
def test_gradcache_on_two_ranks_takes_the_one_process_plain_step(strategy, synth, one_process, ddp, tmp_path) -> None:
    """GradCache in mini-batches of 3 sequences (4 queries and 8 pages per rank: 2 + 3 replays, the last ones short)
    with global negatives, under DDP and FSDP2, gives the gradients of one process's plain step over the global batch;
    under DDP with one gradient all-reduce per step, as the plain step's (the replays do not sync). ``ddp-sparse``
    also hands the token table sparse gradients (vdr.models.sparse_embedding): DDP still reduces a dense one. Under
    FSDP2 also with gradient checkpointing, each vision block checkpointed over tiles of 2 pages and each decoder layer
    over tiles of 2 rows (vdr.models.checkpoint_tiles): a layer's all-gather runs once per layer call, however many
    tiles each rank has."""
    tiles = ["--model.gradient_checkpointing_text", "true", "--model.gradient_checkpointing_vision", "true",
             "--model.vision_checkpoint_images", "2", "--model.text_checkpoint_rows", "2"]
    extra = {"ddp": DDP, "ddp-sparse": [*DDP, "--model.sparse_embedding_grad", "true"], "fsdp": [*FSDP, *tiles]}
    cached = _two_ranks(synth, tmp_path, [*extra[strategy], "--model.mini_batch_size", "3"])
    _assert_same_step(one_process, cached)
    for rank in ranks(cached):  # the options reached every rank's layers
        if strategy == "fsdp":
            assert rank["layer_rows"] == [1, 2] and rank["block_images"] == [1, 2]  # tiles of 2 (of 3 and 1 rows)
        else:
            assert rank["layer_rows"] == [1, 2, 3]  # whole mini-batches
            sparse = ["torch.sparse_coo"] * 5 if strategy == "ddp-sparse" else ["torch.strided"] * 5
            assert rank["table_grad_layouts"] == sparse  # one backward per replay: 2 for the queries, 3 for the pages
    if strategy != "fsdp":
        reductions = [r["first_step_reductions"] for r in ranks(cached)]
        assert reductions[0] >= 1 and reductions == [r["first_step_reductions"] for r in ranks(ddp)]


# ---------------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------------

FSDP = ["--config", str(REPO / "configs/trainer/fsdp.yaml"), "--trainer.strategy.init_args.param_dtype", "null"]
# Frozen and trainable weights in one unit; a learning rate that does not depend on max_steps (a resumed run to step
# 4 then sees the schedule of an uninterrupted one).
FROZEN = ["--model.freeze_vision", "true", "--model.freeze_token_embeddings", "true", "--model.warmup_ratio", "0",
          "--model.decay", "constant"]


def test_fsdp_matches_one_process_gradients_and_ddp_losses(synth, one_process, ddp, tmp_path) -> None:
    fsdp = _two_ranks(synth, tmp_path, FSDP, steps=3)
    _assert_same_step(one_process, fsdp)  # sharded gradients, gathered in full, equal the global batch's
    for ours, theirs in zip(ranks(fsdp), ranks(ddp)):
        assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-4)
    checkpoint = tmp_path / "checkpoints/two/version_0/checkpoints/last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank


@pytest.fixture(scope="module")
def fsdp_frozen(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP with the vision tower and token embeddings frozen (frozen and trainable weights share the root unit):
    2 steps, then resumed from its sharded checkpoint for 2 more, exporting at the end of each fit."""
    root = tmp_path_factory.mktemp("fsdp-frozen")
    export = ["--trainer.callbacks+", "vdr.callbacks.export.ExportBest", "--trainer.callbacks.overwrite", "true"]
    vdr(*fit_args(synth, "frozen", devices=2, batch=PER_RANK_BATCH, steps=2), *FSDP, *FROZEN, *export,
        *probe_args(root / "first"), cwd=root)
    last = root / "checkpoints/frozen/version_0/checkpoints/last.ckpt"
    vdr(*fit_args(synth, "frozen", devices=2, batch=PER_RANK_BATCH, steps=4, val_every=2), *FSDP, *FROZEN,
        "--ckpt_path", str(last), *probe_args(root / "resumed"), cwd=root)
    return root


@pytest.mark.slow  # 26 s
def test_fsdp_resumes_from_its_sharded_checkpoint_as_if_never_stopped(synth, fsdp_frozen, tmp_path) -> None:
    # Validating at the same steps as the interrupted run (Lightning's loop state at the checkpoint depends on it).
    vdr(*fit_args(synth, "straight", devices=2, batch=PER_RANK_BATCH, steps=4, val_every=2), *FSDP, *FROZEN,
        *probe_args(tmp_path / "probe"), cwd=tmp_path)
    straight = ranks(tmp_path / "probe")
    first, resumed = ranks(fsdp_frozen / "first"), ranks(fsdp_frozen / "resumed")
    for rank in (0, 1):
        assert first[rank]["losses"] + resumed[rank]["losses"] == pytest.approx(straight[rank]["losses"], abs=1e-5)
    grads = torch.load(fsdp_frozen / "first/rank0-grads.pt")
    assert grads and not any(".visual." in name or "embed_tokens" in name for name in grads)  # frozen: no gradient


def test_fsdp_export_writes_full_weights_in_the_ddp_export_format(fsdp_frozen, ddp, tmp_path) -> None:
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from vdr.evaluation.encoders import ModuleEncoder, SentenceTransformerEncoder
    from vdr.export.command import export_checkpoint
    from vdr.lit.biencoder import BiEncoderModule
    from vdr.lit.checkpoint import read_checkpoint

    sharded = fsdp_frozen / "checkpoints/frozen/version_0/checkpoints/last.ckpt"
    ours = export_checkpoint(sharded, tmp_path / "fsdp")
    theirs = export_checkpoint(ddp.parent / "checkpoints/two/version_0/checkpoints/last.ckpt", tmp_path / "ddp")
    files = sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    for name in files:  # configs, processor, tokenizer: the same bytes
        if name.endswith(".json"):
            assert (ours / name).read_text() == (theirs / name).read_text(), name
    weights, reference = load_file(next(ours.rglob("*.safetensors"))), load_file(next(theirs.rglob("*.safetensors")))
    assert {k: (v.shape, v.dtype) for k, v in weights.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
    # The checkpoint holds whole tensors (each the shape of the unsharded model's), and the export embeds as the
    # module rebuilt from it does.
    module = BiEncoderModule.from_checkpoint(sharded)
    state = read_checkpoint(sharded)["state_dict"]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in module.state_dict().items()}
    texts = ["revenue of Acme in 2015", "a query"]
    expected = ModuleEncoder(module.model, module.collator, "cpu").queries(texts)
    torch.testing.assert_close(SentenceTransformerEncoder(SentenceTransformer(str(ours), device="cpu")).queries(texts),
                               expected, atol=1e-5, rtol=1e-4)
    in_run = fsdp_frozen / "checkpoints/frozen/version_0/export"  # ExportBest, from the first fit's best checkpoint
    assert SentenceTransformerEncoder(SentenceTransformer(str(in_run), device="cpu")).queries(texts).shape == (2, 32)


# ---------------------------------------------------------------------------------------------------------------
# Distributed evaluation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 queries over 21 pages: shards of 2 ranks need padding at every batch size."""
    out = tmp_path_factory.mktemp("odd") / "synth"
    generate(out, dataclasses.replace(TINY_SYNTH, num_eval_queries=7), progress=False)
    return out / "eval"


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # fsdp: 39 s
def test_distributed_ndcg_equals_one_process(strategy, synth, one_process, odd_eval, tmp_path) -> None:
    checkpoint = one_process.parent / "checkpoints/one/version_0/checkpoints/last.ckpt"
    args = ["validate", *STACK, "--data.eval", str(odd_eval), "--data.eval_batch_size", "3", "--ckpt_path",
            str(checkpoint), "--trainer.enable_progress_bar", "false"]
    vdr(*args, *probe_args(tmp_path / "one"), cwd=tmp_path)
    vdr(*args, "--trainer.devices", "2", *(DDP if strategy == "ddp" else FSDP), *probe_args(tmp_path / "two"),
        cwd=tmp_path)
    (one,), two = ranks(tmp_path / "one"), ranks(tmp_path / "two")
    assert one["metrics"]["num_queries"] == 7 and two[0]["world_size"] == 2
    for rank in two:
        for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
            assert rank["metrics"][name] == pytest.approx(one["metrics"][name], abs=1e-6), name


# ---------------------------------------------------------------------------------------------------------------
# The reranker under DDP and FSDP
# ---------------------------------------------------------------------------------------------------------------



@pytest.mark.slow  # 95 s: the default suite keeps under 20 minutes
def test_reranker_trains_under_ddp_and_fsdp_and_evaluates_as_one_process(synth, odd_eval, tmp_path) -> None:
    """Listwise reranker, 2 ranks x 4 groups: DDP and FSDP (with activation checkpointing) take the same steps, and the
    distributed rerank metrics (7 queries x 7 candidates = 49 pairs, padded to shard) equal one process validating the
    same checkpoint."""
    common = [*RERANK_STACK, *data_args(synth), "--data.train", str(synth / "train8"), "--data.eval", str(odd_eval),
              "--data.batch_size", str(PER_RANK_BATCH), "--data.num_candidates", "7", "--data.eval_batch_size", "5"]
    # FSDP with activation checkpointing: recomputing each layer in the backward changes no number.
    checkpointing = ["--trainer.strategy.init_args.activation_checkpointing", "true"]
    for name, strategy in (("ddp", DDP), ("fsdp", [*FSDP, *checkpointing])):
        vdr("fit", *common, "--trainer.logger.init_args.name", name, "--trainer.devices", "2", "--trainer.max_steps",
            "2", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.max_epochs", "-1", *strategy, *probe_args(tmp_path / name), cwd=tmp_path)
    ddp, fsdp = ranks(tmp_path / "ddp"), ranks(tmp_path / "fsdp")
    for ours, theirs in zip(fsdp, ddp):
        assert len(ours["losses"]) == 2 and ours["losses"] == pytest.approx(theirs["losses"], abs=1e-4)
        assert ours["metrics"]["rerank_ndcg@10"] == pytest.approx(theirs["metrics"]["rerank_ndcg@10"], abs=1e-4)
    checkpoint = tmp_path / "checkpoints/ddp/version_0/checkpoints/last.ckpt"
    vdr("validate", *common, "--ckpt_path", str(checkpoint), *probe_args(tmp_path / "one"), cwd=tmp_path)
    (one,) = ranks(tmp_path / "one")
    for rank in ddp:
        for name in ("rerank_ndcg@10", "rerank_mrr@10", "rerank_recall@1", "first_stage_ndcg@10"):
            assert rank["metrics"][name] == pytest.approx(one["metrics"][name], abs=1e-6), name
    # The FSDP run's sharded checkpoint validated under FSDP with no model config: the module class and its
    # arguments come from the checkpoint directory's metadata, and the metrics are the run's own.
    sharded = tmp_path / "checkpoints/fsdp/version_0/checkpoints/last.ckpt"
    no_model = [part for name in ("trainer/default", "trainer/cpu", "callbacks/rerank")
                for part in ("--config", str(REPO / f"configs/{name}.yaml"))]
    vdr("validate", *no_model, "--data", "vdr.data.datamodule.RerankDataModule", *common[len(RERANK_STACK):],
        "--trainer.devices", "2", *FSDP, "--ckpt_path", str(sharded), *probe_args(tmp_path / "sharded"), cwd=tmp_path)
    for rank, run in zip(ranks(tmp_path / "sharded"), fsdp):
        assert rank["inference_mode"] is False  # FSDP2's buffers must not become inference tensors (GPU runs)
        assert rank["metrics"]["rerank_ndcg@10"] == pytest.approx(run["metrics"]["rerank_ndcg@10"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A rank without images; two nodes
# ---------------------------------------------------------------------------------------------------------------


def torchrun(*args: str, nproc: int = 1, nnodes: int = 1, node_rank: int = 0, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *args]


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])  # ddp: 30 s
def test_a_rank_whose_batch_has_no_image_does_not_hang(mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(TESTS / "distributed_text_only.py")
    ok = subprocess.run(torchrun(script, mode, nproc=2, port=29611), env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "ok 0" in ok.stdout and "ok 1" in ok.stdout, ok.stderr[-3000:]
    # Without the idle vision pass the same run fails: DDP finds unreduced vision gradients, FSDP's all-gathers of
    # the vision blocks wait for a rank that never joins (a 20 s gloo timeout ends the wait).
    broken = subprocess.run(torchrun(script, mode, "--no-guard", nproc=2, port=29612), env=env, capture_output=True,
                            text=True, timeout=300)
    assert broken.returncode != 0


@pytest.mark.slow  # 18 s
def test_two_nodes_take_the_steps_of_one_node_with_two_processes(synth, ddp, tmp_path) -> None:
    """Two launches of scripts/slurm/torchrun.sh with NNODES=2 on 127.0.0.1 (one process each) against the
    Lightning-launched 2-process run of the same config: the same losses at every step."""
    args = [*fit_args(synth, "two", devices=1, batch=PER_RANK_BATCH, steps=3), *DDP, *probe_args(tmp_path / "probe")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NNODES": "2", "GPUS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29621"}
    script = str(REPO / "scripts/slurm/torchrun.sh")
    nodes = [subprocess.Popen(["bash", script, *args], cwd=tmp_path, env={**env, "NODE_RANK": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-5000:]
    two_nodes, one_node = ranks(tmp_path / "probe"), ranks(ddp)
    assert [r["world_size"] for r in two_nodes] == [2, 2]
    for ours, theirs in zip(two_nodes, one_node):
        assert len(ours["losses"]) == 3
        assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-6)


@pytest.mark.slow  # 26 s
def test_slurm_submission_takes_nodes_and_gpus_from_the_config(tmp_path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" > "$SBATCH_LOG"\n')
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "log"),
           "VDR": str(Path(sys.executable).parent / "vdr")}
    config = ["fit", "--config", str(REPO / "configs/trainer/gpu.yaml"), "--config",
              str(REPO / "configs/trainer/fsdp.yaml"), "--trainer.num_nodes", "2", "--trainer.devices", "4"]
    submit = ["bash", str(REPO / "scripts/slurm/submit.sh")]
    result = subprocess.run([*submit, *config], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    words = (tmp_path / "log").read_text().split()
    assert words[:3] == ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"]
    assert words[3].endswith("scripts/slurm/vdr.sbatch") and words[4:] == config
    # GPUs per node left to "auto" cannot size an allocation: refused before anything is submitted.
    (tmp_path / "log").unlink()
    result = subprocess.run([*submit, "fit"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "set trainer.devices" in result.stderr and not (tmp_path / "log").exists()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts/slurm/vdr.sbatch")]).returncode == 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp-gradcache"])
def test_ranks_with_unequal_batches_take_the_one_process_step(synth: Path, mode: str) -> None:
    """Token-budget batches differ in size across ranks: each rank's loss is weighted by its share of the rows, so the
    mean over ranks is the global batch's mean loss and gradient (3 + 5 rows against 1 process with 8). Under FSDP2
    with GradCache the short rank also pads its passes, or the ranks' collectives would not line up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(TESTS / "distributed_uneven.py")
    result = subprocess.run(torchrun(script, str(synth / "train8"), mode, nproc=2, port=29631), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout.split(), result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_all(synth: Path, tmp_path: Path, strategy: str) -> None:
    # Rank 1's loss is NaN at step 1: both ranks skip that step together (no hang, no update anywhere), then go on.
    poison = ["--trainer.callbacks+", "distributed_probe.Poison", "--trainer.callbacks.output", str(tmp_path / "out")]
    vdr(*fit_args(synth, "nan", devices=2, batch=PER_RANK_BATCH, steps=3), *(DDP if strategy == "ddp" else FSDP),
        "--model.nonfinite_loss", "skip", *poison, cwd=tmp_path, timeout=300)
    for rank in (0, 1):
        record = json.loads((tmp_path / "out" / f"rank{rank}-poison.json").read_text())
        assert record == {"changed": [True, False, True], "skipped_steps": 1}, rank


@pytest.mark.slow
def test_fsdp_resumes_mid_epoch_with_max_epochs_set(synth: Path, tmp_path: Path) -> None:
    # 48 rows on 2 ranks of 4: 6 steps an epoch, stopped after 3. With max_epochs set, FSDP builds the training loader
    # before it reads the checkpoint (its optimizer setup counts an epoch's steps): it must be rebuilt at the position.
    def args(name: str, steps: int) -> list[str]:
        return [*fit_args(synth, name, devices=2, batch=PER_RANK_BATCH, steps=steps), "--data.train",
                str(synth / "train"), "--trainer.max_epochs", "2", *FSDP, *FROZEN]

    vdr(*args("straight", 6), *probe_args(tmp_path / "straight"), cwd=tmp_path)
    vdr(*args("cut", 3), *probe_args(tmp_path / "first"), cwd=tmp_path)
    vdr(*args("cut", 6), "--ckpt_path", "last", *probe_args(tmp_path / "resumed"), cwd=tmp_path)
    straight, first, resumed = (ranks(tmp_path / n) for n in ("straight", "first", "resumed"))
    for rank in (0, 1):
        assert len(first[rank]["losses"]) == 3 and len(resumed[rank]["losses"]) == 3
        assert first[rank]["losses"] + resumed[rank]["losses"] == pytest.approx(straight[rank]["losses"], abs=1e-5)
