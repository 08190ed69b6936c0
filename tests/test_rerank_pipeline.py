"""The reranker end to end: `vdr fit` with the rerank callback, export to a CrossEncoder proven against Sentence
Transformers, and `vdr evaluate --reranker` through the checkpoint and the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from sentence_transformers import CrossEncoder

from vdr.cli import main
from vdr.data.schema import load_eval_set
from vdr.data.sources import load_table
from vdr.evaluation.candidates import Candidates, sampled_candidates
from vdr.evaluation.records import short_name
from vdr.evaluation.run import evaluate, rerank
from vdr.evaluation.scorers import CrossEncoderScorer, ModuleScorer, load_scorer
from vdr.export.command import export_checkpoint
from vdr.lit.checkpoint import read_checkpoint
from vdr.lit.reranker import RerankerModule

from .conftest import RERANK_STACK, data_args, fit_tiny, report_data, scalars


def fit_reranker(root: Path, synth: Path, name: str, steps: int, *flags: str) -> Path:
    """``vdr fit`` of the tiny reranker inside ``root``, validating before and after; the run directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", *RERANK_STACK, *data_args(synth), "--data.batch_size", "4", "--data.num_candidates", "10",
              "--trainer.logger.init_args.name", name, "--trainer.max_steps", str(steps),
              "--trainer.val_check_interval", str(steps), "--trainer.check_val_every_n_epoch", "null",
              "--validate_before_fit", "true", *flags])
    return root / "checkpoints" / name / "version_0"


@pytest.fixture(scope="module")
def run(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_reranker(tmp_path_factory.mktemp("rerank-run"), tiny_synth, "rerank", 6, "--model.batch_negatives", "1")


@pytest.fixture(scope="module")
def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def module(checkpoint: Path) -> RerankerModule:
    return RerankerModule.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("rerank-exports") / "reranker")


@pytest.fixture(scope="module")
def eval_set(tiny_synth: Path):
    return load_eval_set(str(tiny_synth / "eval"), loader=load_table)


def test_fit_logs_both_stages_and_saves_a_reranker_checkpoint(run: Path, checkpoint: Path, module: RerankerModule,
                                                              eval_set) -> None:
    logged = scalars(run)
    reranked = [value for _, value in logged["val/rerank_ndcg@10"]]  # before and after training
    first = [value for _, value in logged["val/first_stage_ndcg@10"]]
    assert len(reranked) == 2 and len(first) == 2
    assert first[0] == first[1]  # the same sampled lists at every validation
    assert "val/rerank_recall@1" in logged and "val/rerank_mrr@10" in logged
    saved = read_checkpoint(checkpoint, "reranker")
    assert saved["vdr"]["kind"] == "reranker"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "vdr.lit.reranker.RerankerModule"
    # The callback's last value equals an independent route: score the same lists outside Lightning.
    candidates = sampled_candidates(eval_set, 10, seed=0)
    # In the callback's own batches (data.eval_batch_size 16): the 6-step tiny model's scores are nearly tied (120
    # pairs within ~0.03, neighbours ~2e-6 apart), and other padding shifts them by ~1e-7.
    scores = rerank(ModuleScorer(module.model, module.collator), candidates, eval_set, batch_size=16, progress=False)
    ndcg = candidates.metrics(eval_set, candidates.reranked(scores))["ndcg@10"]
    assert ndcg == pytest.approx(reranked[1], abs=1e-5)
    assert candidates.metrics(eval_set)["ndcg@10"] == pytest.approx(first[1], abs=1e-6)


def test_export_is_a_cross_encoder_that_scores_like_the_module(exported: Path, module: RerankerModule,
                                                               eval_set) -> None:
    files = {str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "chat_template.jinja", "modules.json", "sentence_bert_config.json",
            "config_sentence_transformers.json", "1_LogitScore/config.json", "README.md"} <= files
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert json.loads((exported / "1_LogitScore/config.json").read_text())["true_token_id"] == 9693
    model = CrossEncoder(str(exported), device="cpu")
    corpus = eval_set.corpus_rows()
    pages = [corpus[i].image for i in range(8)]
    queries = [eval_set.query_texts[i % 3] for i in range(8)]
    ours = ModuleScorer(module.model, module.collator).score(queries, pages)
    theirs = torch.as_tensor(model.predict(list(zip(queries, pages)), activation_fn=torch.nn.Identity()))
    assert (ours - theirs).abs().max() < 1e-4, (ours, theirs)
    assert ours.std() > 1e-3  # distinct scores, so the comparison means something
    # Default activation: the official probability.
    torch.testing.assert_close(torch.as_tensor(model.predict(list(zip(queries, pages)))), torch.sigmoid(ours),
                               atol=1e-4, rtol=1e-4)
    ranked = model.rank(queries[0], pages)
    mine = ModuleScorer(module.model, module.collator).score([queries[0]] * 8, pages)
    assert [r["corpus_id"] for r in ranked] == mine.argsort(descending=True).tolist()


def test_evaluate_retrieves_then_reranks(tiny_synth: Path, tmp_path: Path, checkpoint: Path, exported: Path,
                                         eval_set, capsys: pytest.CaptureFixture[str]) -> None:
    retriever = fit_tiny(tmp_path, tiny_synth, "retriever", 2) / "checkpoints" / "last.ckpt"
    reports = {}
    for route, model in (("checkpoint", checkpoint), ("export", exported)):
        out = tmp_path / f"{route}.json"
        # The report compares with the same retriever given as a second model: it is reranked the same way.
        report = ["--report", str(tmp_path / "report.html"), "--compare", str(retriever)] if route == "export" else []
        assert main(["evaluate", "--model", str(retriever), "--data", str(tiny_synth / "eval"), "--reranker",
                     str(model), "--rerank_depth", "12", "--output", str(out), "--device", "cpu", *report]) == 0
        reports[route] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "retriever   reranked" in printed
    first, second = reports["checkpoint"], reports["export"]
    assert first["reranked"]["depth"] == 12
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
        assert first["reranked"][name] == pytest.approx(second["reranked"][name], abs=1e-6), name
        assert first[name] == second[name]  # the same retriever
    # The reranked lists are the retriever's top 12, re-sorted by the reranker's scores.
    retrieved = evaluate(load_scorer_free_encoder(retriever), eval_set, k=100, progress=False)
    candidates = Candidates(retrieved.ranked[:, :12], "top 12")
    scores = rerank(CrossEncoderScorer(CrossEncoder(str(exported), device="cpu")), candidates, eval_set,
                    progress=False)
    assert candidates.metrics(eval_set, candidates.reranked(scores))["ndcg@10"] == pytest.approx(
        first["reranked"]["ndcg@10"], abs=1e-6)
    # The saved per-query lists and the report show both stages: the reranked top 10 first, then the retriever's.
    rows, sorted_scores = candidates.sort_by(scores)
    page = report_data(tmp_path / "report.html")
    name, reranker_name = short_name(str(retriever)), short_name(str(exported))
    assert [stage["label"] for stage in page["stages"]] == [
        f"{name} + {reranker_name}", name, f"{name} + {reranker_name} (compared)", f"{name} (compared)"]
    assert page["compare"] == [0, 2]  # reranked pipeline against reranked pipeline
    assert all(q["stages"][0]["top"] == q["stages"][2]["top"] for q in page["queries"])  # the same pipeline twice
    for query, query_id in enumerate(eval_set.query_ids):
        reranked_top = [eval_set.corpus_ids[row] for row in rows[query, :10].tolist()]
        assert [pid for pid, _ in second["reranked"]["queries"][query_id]["top"]] == reranked_top
        assert [row for row, _ in page["queries"][query]["stages"][0]["top"]] == rows[query, :10].tolist()
        assert [score for _, score in page["queries"][query]["stages"][0]["top"]] == pytest.approx(
            sorted_scores[query, :10].tolist(), abs=1e-4)
        retrieved_top = retrieved.ranked[query, :10].tolist()
        assert [row for row, _ in page["queries"][query]["stages"][1]["top"]] == retrieved_top
    assert main(["evaluate", "--model", str(retriever), "--data", str(tiny_synth / "eval"), "--reranker",
                 str(tmp_path / "missing.ckpt")]) == 2


def load_scorer_free_encoder(checkpoint: Path):
    from vdr.evaluation.encoders import load_encoder

    return load_encoder(str(checkpoint), "cpu")


def test_load_scorer_routes(checkpoint: Path, exported: Path) -> None:
    assert isinstance(load_scorer(str(checkpoint), "cpu"), ModuleScorer)
    assert isinstance(load_scorer(str(exported), "cpu"), CrossEncoderScorer)


def test_candidates_from_a_retriever_match_its_evaluation(tiny_synth: Path, tmp_path: Path, eval_set) -> None:
    retriever = fit_tiny(tmp_path, tiny_synth, "retriever", 2) / "checkpoints" / "last.ckpt"
    run = fit_reranker(tmp_path, tiny_synth, "from-retriever", 1, "--data.retriever", str(retriever),
                       "--data.num_candidates", "20")
    first = scalars(run)["val/first_stage_ndcg@10"][0][1]
    expected = evaluate(load_scorer_free_encoder(retriever), eval_set, k=20, progress=False).metrics["ndcg@10"]
    assert first == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("flags", "message"), [
    (["--model.loss", "vdr.losses.ranking.ListwiseCE", "--data.labeled_pairs", "true"], "each group has 1"),
    (["--model.loss", "vdr.losses.ranking.KLDistill"], "set data.teacher_column"),
])
def test_loss_and_data_mismatch_fails_before_training(tiny_synth: Path, tmp_path: Path, flags: list[str],
                                                      message: str) -> None:
    if "--data.labeled_pairs" in flags:
        import datasets

        rows = datasets.load_from_disk(str(tiny_synth / "train")).select(range(8))
        rows = rows.remove_columns(["negative_0"]).add_column("label", [1.0, 0.0] * 4)
        rows.save_to_disk(str(tmp_path / "pairs"))
        flags = [*flags, "--data.train", str(tmp_path / "pairs")]
    with pytest.raises(ValueError, match=message):
        fit_reranker(tmp_path, tiny_synth, "mismatch", 2, *flags)
    assert not list((tmp_path / "checkpoints" / "mismatch").rglob("*.ckpt"))


def _table_variant(synth: Path, out: Path, change) -> Path:
    import datasets

    change(datasets.load_from_disk(str(synth / "train")).select(range(16))).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("variant", ["labeled pairs, pointwise BCE", "teacher scores, KL", "teacher scores, MarginMSE"])
def test_fit_with_labeled_pairs_and_distillation(tiny_synth: Path, tmp_path: Path, variant: str) -> None:
    if variant.startswith("labeled"):
        train = _table_variant(tiny_synth, tmp_path / "pairs", lambda rows: rows.remove_columns(["negative_0"])
                               .add_column("label", [1.0, 0.0] * 8))
        flags = ["--data.labeled_pairs", "true", "--model.loss", "vdr.losses.ranking.PointwiseBCE"]
    else:
        train = _table_variant(tiny_synth, tmp_path / "teacher", lambda rows: rows.add_column(
            "scores", [[2.0, -1.0 + i / 16] for i in range(16)]))
        loss = "KLDistill" if "KL" in variant else "MarginMSE"
        flags = ["--data.teacher_column", "scores", "--model.loss", f"vdr.losses.ranking.{loss}"]
    run = fit_reranker(tmp_path, tiny_synth, "variant", 3, "--data.train", str(train), *flags)
    assert len(scalars(run)["val/rerank_ndcg@10"]) == 2
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_export_command_with_identity_activation(checkpoint: Path, module: RerankerModule, eval_set,
                                                 tmp_path: Path) -> None:
    output = tmp_path / "identity"
    assert main(["export", "--ckpt_path", str(checkpoint), "--output", str(output), "--activation", "identity"]) == 0
    config = json.loads((output / "config_sentence_transformers.json").read_text())
    assert config["model_type"] == "CrossEncoder" and config["activation_fn"].endswith("Identity")
    corpus = eval_set.corpus_rows()
    pages, queries = [corpus[i].image for i in range(4)], eval_set.query_texts[:4]
    theirs = torch.as_tensor(CrossEncoder(str(output), device="cpu").predict(list(zip(queries, pages))))
    ours = ModuleScorer(module.model, module.collator).score(queries, pages)
    assert (ours - theirs).abs().max() < 1e-4
    assert main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "x"), "--truncate_dim",
                 "8"]) == 2  # embeddings only
    assert not (tmp_path / "x").exists()
