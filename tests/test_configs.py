"""Every shipped config parses (and the CPU-runnable ones instantiate); includes expand as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from vdr.cli import DEFAULT_CLASSES, VdrCLI
from vdr.config_includes import expand_includes
from vdr.data.datamodule import RetrievalDataModule
from vdr.lit.base import VdrModule

from .conftest import REPO

# Ablation grids (configs/ablations/) are not `vdr fit` configs: each of their runs is parsed below instead.
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "ablations" not in p.parts)
GRIDS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))


def test_configs_exist() -> None:
    assert len(CONFIGS) >= 8
    assert (REPO / "configs" / "demo.yaml") in CONFIGS
    assert GRIDS, "configs/ablations/ lost its example grid"


def _parser() -> LightningArgumentParser:
    # The parser the CLI builds, without instantiating anything (the 2b preset would allocate 2B parameters).
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    parser.add_argument("--validate_before_fit", type=bool, default=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(VdrModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(RetrievalDataModule, "data", subclass_mode=True)
    parser.set_defaults(DEFAULT_CLASSES)
    return parser


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_config_parses(path: Path) -> None:
    content = yaml.safe_load(path.read_text())
    assert isinstance(content, dict) and content, f"{path} is empty"
    config = _parser().parse_args(expand_includes(["--config", str(path)]))
    assert config is not None


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_every_run_of_every_shipped_grid_parses(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vdr.ablation.grid import load_grid

    monkeypatch.chdir(REPO)  # grids name their configs relative to the repository root, as the commands run there
    runs = load_grid(path).runs()
    assert runs
    for run in runs:
        assert _parser().parse_args(expand_includes(list(run.fit_args))) is not None, run.name


def test_demo_config_instantiates_on_cpu() -> None:
    cli = VdrCLI(args=expand_includes(
        ["--config", str(REPO / "configs/demo.yaml"), "--model.backbone.name_or_path", "tiny"]), run=False,
        save_config_callback=None)
    assert cli.model.backbone_config.max_pixels == 128 * 128
    assert cli.datamodule.batch_size == 64
    assert cli.trainer.max_steps > 0
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "RetrievalEvaluator" in names and "ModelCheckpoint" in names


def test_the_readme_large_batch_block_instantiates_on_cpu(tmp_path: Path) -> None:
    """The README's "Large batches" YAML over the demo config, tiny backbone (Matryoshka dims cut to its width)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Large batches in bounded memory\n\n```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "large.yaml").write_text(block)
    cli = VdrCLI(args=expand_includes(
        ["--config", str(REPO / "configs/demo.yaml"), "--config", str(tmp_path / "large.yaml"),
         "--model.backbone.name_or_path", "tiny", "--model.loss.init_args.dims", "[32, 16]",
         "--model.freeze_token_embeddings", "false"]), run=False,  # the demo freezes its table: sparse needs it trained
        save_config_callback=None)
    options = yaml.safe_load(block)["model"]
    for name in ("mini_batch_size", "mini_batch_tokens", "vision_checkpoint_images", "text_checkpoint_rows",
                 "sparse_embedding_grad", "offload_activations", "lora"):
        assert cli.model.hparams[name] == options[name], name
    assert cli.datamodule.max_tokens_per_batch == yaml.safe_load(block)["data"]["max_tokens_per_batch"]


def test_includes_expand_in_order_with_own_keys_last(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("include: [../a.yaml]\ny: 2\n")
    (tmp_path / "top.yaml").write_text("include:\n  - sub/b.yaml\nz: 3\n")
    args = expand_includes(["fit", "--config", str(tmp_path / "top.yaml"), "--trainer.max_steps", "1"])
    assert args[:3] == ["fit", "--config", str(tmp_path / "sub" / "../a.yaml")]
    assert yaml.safe_load(args[4]) == {"y": 2} and yaml.safe_load(args[6]) == {"z": 3}
    assert args[-2:] == ["--trainer.max_steps", "1"]


def test_include_errors_are_explained(tmp_path: Path) -> None:
    (tmp_path / "top.yaml").write_text("include: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="included config 'missing.yaml' not found"):
        expand_includes(["--config", str(tmp_path / "top.yaml")])
    (tmp_path / "loop.yaml").write_text("include: [loop.yaml]\n")
    with pytest.raises(ValueError, match="include cycle"):
        expand_includes(["--config", str(tmp_path / "loop.yaml")])
