"""Export to Sentence Transformers, proven against the real library, and the standalone evaluator.

A 6-step tiny run gives a real checkpoint. Its export must load with `SentenceTransformer(path)` (no vdr code) and
embed exactly as the LightningModule does; `vdr evaluate` must give the same numbers through the checkpoint and the
export, and Sentence Transformers' own InformationRetrievalEvaluator must agree with our metrics.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from vdr.cli import main
from vdr.data.schema import load_eval_set
from vdr.data.sources import load_table
from vdr.data.synth import render_page
from vdr.evaluation.encoders import ModuleEncoder, SentenceTransformerEncoder, load_encoder
from vdr.evaluation.run import evaluate, information_retrieval_evaluator
from vdr.export.command import export_checkpoint
from vdr.export.embedder import export_embedder
from vdr.lit.biencoder import BiEncoderModule

from .conftest import REPO, STACK, TINY_PIXELS, assert_same_ranking, data_args, embed_eval_set, fit_tiny, scalars

TEXTS = ["what was Acme revenue in 2019", "Borvex debt 2021", "staff of Calyra for 2016"]


@pytest.fixture(scope="module")
def run(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step tiny run validated at its end: last.ckpt holds exactly the weights of the logged metrics."""
    return fit_tiny(tmp_path_factory.mktemp("export-run"), tiny_synth, "run", 6)


@pytest.fixture(scope="module")
def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("exports") / "model")


@pytest.fixture(scope="module")
def module(checkpoint: Path) -> BiEncoderModule:
    return BiEncoderModule.from_checkpoint(checkpoint)


def _pages(count: int = 3) -> list:
    return [render_page("Acme", "Revenue", 2015 + i, random.Random(i), size=64) for i in range(count)]


def _assert_same_embeddings(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    cosine = F.cosine_similarity(ours.float(), theirs.float().cpu(), dim=-1)
    assert cosine.min() >= 0.9999, cosine


# ---------------------------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------------------------


def test_export_has_the_sentence_transformers_layout(exported: Path, module: BiEncoderModule, run: Path) -> None:
    files = {str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling/config.json", "2_Normalize/config.json", "README.md"} <= files
    modules = json.loads((exported / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    bert = json.loads((exported / "sentence_bert_config.json").read_text())
    assert bert["transformer_task"] == "feature-extraction" and bert["unpad_inputs"] is False
    assert set(bert["modality_config"]) == {"text", "image", "video", "message"}
    assert bert["modality_config"]["message"]["format"] == "structured"
    assert bert["processing_kwargs"] == {"chat_template": {"add_generation_prompt": True}}
    pooling = json.loads((exported / "1_Pooling" / "config.json").read_text())
    assert pooling == {"embedding_dimension": 32, "pooling_mode": "lasttoken", "include_prompt": True}
    st_config = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": module.prompts.query, "document": module.prompts.document}
    assert st_config["similarity_fn_name"] == "cosine" and "truncate_dim" not in st_config
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3VLModel"]
    # The training page-size bounds are baked into the saved image processor.
    size = json.loads((exported / "processor_config.json").read_text())["image_processor"]["size"]
    assert size == {"shortest_edge": TINY_PIXELS, "longest_edge": TINY_PIXELS}
    # The model card records the base model and the final metric the run logged.
    card = (exported / "README.md").read_text()
    final = scalars(run)["val/ndcg@10"][-1][1]
    assert "Base model: `tiny`" in card and f"| ndcg@10 | {final:.4f} |" in card
    assert f'SentenceTransformer("{exported}")' in card


def test_export_is_loadable_by_sentence_transformers_alone(exported: Path, module: BiEncoderModule) -> None:
    """Texts through encode_query, pages and page+text through encode_document: the module's own embeddings."""
    model = SentenceTransformer(str(exported), device="cpu")
    pages = _pages()
    with torch.no_grad():
        queries = module.model(module.collator.encode_texts(TEXTS, module.prompts.query))
        documents = module.model(module.collator.encode_pages(pages, module.prompts.document))
        captioned = module.model(module.collator.encode_pages(pages, module.prompts.document,
                                                              ["figure one", "a table", None]))
    _assert_same_embeddings(queries, model.encode_query(TEXTS, convert_to_tensor=True))
    _assert_same_embeddings(documents, model.encode_document(pages, convert_to_tensor=True))
    mixed = [{"image": pages[0], "text": "figure one"}, {"image": pages[1], "text": "a table"}, pages[2]]
    _assert_same_embeddings(captioned, model.encode_document(mixed, convert_to_tensor=True))
    # The caption changes the embedding (so the comparison above tested the text part, too).
    assert F.cosine_similarity(captioned[0], documents[0], dim=0) < 0.99999


def test_truncate_dim_and_dtype(checkpoint: Path, module: BiEncoderModule, tmp_path: Path) -> None:
    out = export_checkpoint(checkpoint, tmp_path / "small", truncate_dim=16, dtype="bfloat16")
    assert json.loads((out / "config_sentence_transformers.json").read_text())["truncate_dim"] == 16
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    model = SentenceTransformer(str(out), device="cpu", model_kwargs={"dtype": torch.float32})
    embeddings = model.encode_query(TEXTS, convert_to_tensor=True)
    assert embeddings.shape == (3, 16)
    with torch.no_grad():
        ours = module.model(module.collator.encode_texts(TEXTS, module.prompts.query))[:, :16]
    cosine = F.cosine_similarity(ours, embeddings.float(), dim=-1)
    assert cosine.min() > 0.99  # bf16 weights: close, not exact
    with pytest.raises(ValueError, match=r"truncate_dim must be in \[1, 32\]"):
        export_checkpoint(checkpoint, tmp_path / "bad", truncate_dim=33)


def test_lora_adapters_are_merged_into_the_export(tiny_backbone, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    module = BiEncoderModule(backbone={"name_or_path": "tiny", "min_pixels": TINY_PIXELS,
                                       "max_pixels": TINY_PIXELS}).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "qkv"])
    module.model.backbone = get_peft_model(module.model.backbone, config)
    with torch.no_grad():
        for name, parameter in module.model.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)  # trained adapters: non-zero updates
        queries = module.model(module.collator.encode_texts(TEXTS, module.prompts.query))
        pages = module.model(module.collator.encode_pages(_pages(), module.prompts.document))
    out = export_embedder(module, tmp_path / "lora")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k]
    model = SentenceTransformer(str(out), device="cpu")
    _assert_same_embeddings(queries, model.encode_query(TEXTS, convert_to_tensor=True))
    _assert_same_embeddings(pages, model.encode_document(_pages(), convert_to_tensor=True))
    # The adapters mattered, and the training module still has them (export merged a copy).
    base = SentenceTransformer(str(export_embedder(BiEncoderModule(backbone={
        "name_or_path": "tiny", "min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS}), tmp_path / "base")))
    assert F.cosine_similarity(queries, base.encode_query(TEXTS, convert_to_tensor=True), dim=-1).min() < 0.999
    assert any("lora_B" in name for name, _ in module.model.backbone.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_non_empty_output_needs_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        export_checkpoint(checkpoint, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["export", "--ckpt_path", str(checkpoint), "--output", str(out)]) == 2
    assert main(["export", "--ckpt_path", str(checkpoint), "--output", str(out), "--overwrite"]) == 0
    assert (out / "modules.json").exists() and not (out / "notes.txt").exists()


def test_failed_export_leaves_no_complete_looking_directory(checkpoint: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import vdr.export.embedder as embedder

    previous = export_checkpoint(checkpoint, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(embedder, "write_embedder_config", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no "fresh", no staging leftovers
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == before


def test_wrong_checkpoints_get_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, foreign)
    with pytest.raises(ValueError, match="is not a vdr checkpoint"):
        export_checkpoint(foreign, tmp_path / "a")
    unknown = tmp_path / "colbert.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "vdr": {"kind": "colbert", "format": 1}}, unknown)
    with pytest.raises(ValueError, match="is a vdr 'colbert' checkpoint; vdr export supports: biencoder, reranker"):
        export_checkpoint(unknown, tmp_path / "b")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        export_checkpoint(tmp_path / "text.ckpt", tmp_path / "c")
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "d")]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colbert.ckpt", "foreign.ckpt", "text.ckpt"]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: checkpoint route, export route, Sentence Transformers' evaluator
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_and_export_rank_identically(checkpoint: Path, exported: Path, tiny_synth: Path,
                                                run: Path) -> None:
    eval_set = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    ours = load_encoder(str(checkpoint), "cpu")
    theirs = load_encoder(str(exported), "cpu")
    assert isinstance(ours, ModuleEncoder) and isinstance(theirs, SentenceTransformerEncoder)
    from_checkpoint = evaluate(ours, eval_set, batch_size=7, progress=False)
    from_export = evaluate(theirs, eval_set, batch_size=5, progress=False)
    assert_same_ranking(embed_eval_set(ours, eval_set), embed_eval_set(theirs, eval_set))
    for name, value in from_checkpoint.metrics.items():
        assert from_export.metrics[name] == pytest.approx(value, abs=1e-6), name
    # ... and both equal what the training callback logged for these weights.
    assert from_checkpoint.metrics["ndcg@10"] == pytest.approx(scalars(run)["val/ndcg@10"][-1][1], abs=1e-6)


def test_information_retrieval_evaluator_agrees(exported: Path, checkpoint: Path, tiny_synth: Path) -> None:
    eval_set = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    ours = evaluate(load_encoder(str(checkpoint), "cpu"), eval_set, progress=False).metrics
    evaluator = information_retrieval_evaluator(eval_set)
    assert isinstance(evaluator, InformationRetrievalEvaluator)  # the library's own implementation
    theirs = evaluator(SentenceTransformer(str(exported), device="cpu"))
    prefix = "cosine_"
    assert theirs[f"{prefix}ndcg@10"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert theirs[f"{prefix}mrr@10"] == pytest.approx(ours["mrr@10"], abs=1e-4)
    assert theirs[f"{prefix}recall@5"] == pytest.approx(ours["recall@5"], abs=1e-4)
    assert theirs[f"{prefix}map@100"] == pytest.approx(ours["map@100"], abs=1e-4)


def test_evaluate_command_writes_json(exported: Path, tiny_synth: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "metrics.json"
    assert main(["evaluate", "--model", str(exported), "--data", str(tiny_synth / "eval"), "--output", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@100"} <= set(report)
    assert report["num_queries"] == 12 and report["num_documents"] == 36
    assert f"ndcg@10  {report['ndcg@10']:.4f}" in capsys.readouterr().out
    # Bad input fails before any model is loaded, with the file named.
    assert main(["evaluate", "--model", str(exported), "--data", str(tmp_path / "nowhere")]) == 2
    assert main(["evaluate", "--model", str(exported), "--data", str(tiny_synth / "eval"),
                 "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_evaluate_a_plain_hugging_face_directory(module: BiEncoderModule, tiny_synth: Path, tmp_path: Path,
                                                 checkpoint: Path) -> None:
    # A Qwen3-VL saved with save_pretrained (no modules.json): our module with the default prompts.
    module.model.backbone.save_pretrained(tmp_path / "hf")
    module.processor.save_pretrained(tmp_path / "hf")
    eval_set = load_eval_set(str(tiny_synth / "eval"), loader=load_table)
    encoder = load_encoder(str(tmp_path / "hf"), "cpu")
    assert isinstance(encoder, ModuleEncoder)
    plain = evaluate(encoder, eval_set, progress=False)
    reference = evaluate(load_encoder(str(checkpoint), "cpu"), eval_set, progress=False)
    assert torch.equal(plain.ranked, reference.ranked)



def test_export_callback_exports_the_best_checkpoint(tiny_synth: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", *STACK, "--config", str(REPO / "configs/callbacks/export.yaml"), *data_args(tiny_synth),
          "--trainer.logger.init_args.name", "cb", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.check_val_every_n_epoch", "null"])
    run_dir = tmp_path / "checkpoints" / "cb" / "version_0"
    [best] = (run_dir / "checkpoints").glob("step*.ckpt")  # save_top_k=1: the better of the validations at 2 and 4
    export = run_dir / "export"
    assert (export / "modules.json").exists() and f"/{best.name}` (step" in (export / "README.md").read_text()
    model = SentenceTransformer(str(export), device="cpu")
    module = BiEncoderModule.from_checkpoint(best)
    with torch.no_grad():
        queries = module.model(module.collator.encode_texts(TEXTS, module.prompts.query))
    _assert_same_embeddings(queries, model.encode_query(TEXTS, convert_to_tensor=True))


# ---------------------------------------------------------------------------------------------------------------
# Training from Sentence Transformers directories (the published Qwen3-VL-Embedding layout, or our exports)
# ---------------------------------------------------------------------------------------------------------------

HUB_PROMPTS = {"query": "Retrieve images or text relevant to the user's query.",
               "document": "Represent the user's input."}


def _hub_layout(backbone, directory: Path, *, pooling: str = "lasttoken", prompts: dict | None = None) -> Path:
    """A tiny model in the layout of Qwen/Qwen3-VL-Embedding-2B on the hub: a Qwen3VLForConditionalGeneration
    checkpoint and processor at the root, and the pipeline files as Sentence Transformers itself writes them."""
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    from transformers import Qwen3VLForConditionalGeneration

    full = Qwen3VLForConditionalGeneration(backbone.model.config)
    full.model.load_state_dict(backbone.model.state_dict())
    full.save_pretrained(directory)
    backbone.processor.save_pretrained(directory)
    transformer = Transformer(str(directory), transformer_task="feature-extraction", unpad_inputs=False,
                              processing_kwargs={"chat_template": {"add_generation_prompt": True}})
    pipeline = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode=pooling), Normalize()],
                                   prompts=prompts or HUB_PROMPTS, similarity_fn_name="cosine")
    pipeline.save(str(directory.parent / "st-writer"))
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "2_Normalize/config.json"):
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_bytes((directory.parent / "st-writer" / name).read_bytes())
    return directory


def test_backbone_loads_from_the_hub_embedding_layout(tiny_backbone, tmp_path: Path) -> None:
    directory = _hub_layout(tiny_backbone, tmp_path / "hub")
    assert json.loads((directory / "config.json").read_text())["architectures"] == [
        "Qwen3VLForConditionalGeneration"]
    module = BiEncoderModule(backbone={"name_or_path": str(directory), "min_pixels": TINY_PIXELS,
                                       "max_pixels": TINY_PIXELS}).eval()
    loaded = module.model.backbone.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in tiny_backbone.model.state_dict().items())
    # Our collator and pooling on the loaded weights = Sentence Transformers on the directory.
    reference = SentenceTransformer(str(directory), device="cpu")
    with torch.no_grad():
        queries = module.model(module.collator.encode_texts(TEXTS, module.prompts.query))
        pages = module.model(module.collator.encode_pages(_pages(), module.prompts.document))
    _assert_same_embeddings(queries, reference.encode_query(TEXTS, convert_to_tensor=True))
    _assert_same_embeddings(pages, reference.encode_document(_pages(), convert_to_tensor=True))


def test_fit_starts_from_the_hub_layout_and_from_an_export(tiny_backbone, tiny_synth: Path, exported: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _hub_layout(tiny_backbone, tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    for source in (directory, exported):
        assert main(["fit", *STACK, *data_args(tiny_synth), "--model.backbone.name_or_path", str(source),
                     "--trainer.fast_dev_run", "true"]) == 0
    # Continuing from an export starts from its trained weights, not from the base model.
    continued = BiEncoderModule(backbone={"name_or_path": str(exported), "min_pixels": TINY_PIXELS,
                                          "max_pixels": TINY_PIXELS})
    reference = SentenceTransformer(str(exported), device="cpu")
    with torch.no_grad():
        queries = continued.model(continued.collator.encode_texts(TEXTS, continued.prompts.query))
    _assert_same_embeddings(queries, reference.encode_query(TEXTS, convert_to_tensor=True))


def test_sentence_transformers_models_with_other_pooling_or_prompts(tiny_backbone, tmp_path: Path) -> None:
    mean = _hub_layout(tiny_backbone, tmp_path / "mean" / "model", pooling="mean")
    with pytest.raises(ValueError, match="pooling 'mean' and a Normalize module; vdr trains"):
        BiEncoderModule(backbone={"name_or_path": str(mean), "min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS})
    other = _hub_layout(tiny_backbone, tmp_path / "other" / "model",
                        prompts={"query": "Find the page.", "document": HUB_PROMPTS["document"]})
    with pytest.warns(UserWarning, match="trained with the query prompt 'Find the page.'"):
        BiEncoderModule(backbone={"name_or_path": str(other), "min_pixels": TINY_PIXELS, "max_pixels": TINY_PIXELS})


def test_same_ranking_check_can_fail() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.3, 0.7, 0.2]])
    assert_same_ranking(scores, scores + 1e-7, k=4)  # noise far below the gaps: same ranking
    tied = scores.clone()
    tied[0, 1] = 0.7 + 5e-6  # within tol of page 4: their order may flip
    assert_same_ranking(tied, torch.where(tied == 0.7, tied + 1e-5, tied), k=4, tol=2e-5)
    swapped = scores.clone()
    swapped[0, [0, 4]] = swapped[0, [4, 0]]
    with pytest.raises(AssertionError):
        assert_same_ranking(scores, swapped, k=4)


def test_hub_repositories_are_read_like_directories(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id goes through hf_hub_download for the small JSON files only (here served from a local export)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from vdr.evaluation.encoders import is_sentence_transformers_model
    from vdr.models.st_format import hub_layout, local_layout

    fetched: list[str] = []

    def download(repo_id: str, filename: str, **kwargs) -> str:
        fetched.append(filename)
        path = exported / filename if repo_id == "org/exported" else Path("/nonexistent")
        if not path.is_file():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hub_layout("org/exported") == local_layout(exported)
    assert set(fetched) == {"modules.json", "config_sentence_transformers.json", "1_Pooling/config.json"}
    assert is_sentence_transformers_model("org/exported") and not is_sentence_transformers_model("org/plain")
