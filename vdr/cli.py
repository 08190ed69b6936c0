"""The ``vdr`` command: LightningCLI subcommands (fit, validate, test), ``vdr export``, ``vdr evaluate``, research tools
(``vdr mine``, ``vdr ablate``) and data tools (``vdr data synth``).

Configs compose: ``vdr fit --config configs/trainer/cpu.yaml --config configs/model/demo.yaml ...``; later files
and flags override earlier ones. ``main(argv)`` is what the console script and the tests call.

The model and data classes are chosen by the config: ``model`` and ``data`` default to the bi-encoder and its data
module, so their fragments hold only arguments; a reranker config names ``class_path: vdr.lit.reranker.RerankerModule``
and ``vdr.data.datamodule.RerankDataModule``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

# Nothing in a run may reach a model hub unless the user asks for a hub id; tokenizer threads fight DataLoader
# workers for the two cores otherwise.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from vdr.config_includes import expand_includes  # noqa: E402
from vdr.data.datamodule import RetrievalDataModule  # noqa: E402
from vdr.data.errors import DataError  # noqa: E402
from vdr.lit.base import VdrModule  # noqa: E402
from vdr.lit.checkpoint_io import recover_interrupted_swap  # noqa: E402

DEFAULT_CLASSES = {"model": {"class_path": "vdr.lit.biencoder.BiEncoderModule"},
                   "data": {"class_path": "vdr.data.datamodule.RetrievalDataModule"}}


class SaveConfig(SaveConfigCallback):
    """Lightning's config saving; a resumed run (``--ckpt_path``, or a fixed logger version) in the folder of the run
    it resumes keeps that run's ``config.yaml`` and writes its own beside it: ``config.resumed-1.yaml``, ..."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Also a requeued job that died before its first checkpoint: same folder (its logger version), no ckpt_path.
        logger = self.config.get("trainer", Namespace()).get("logger")
        pinned = isinstance(logger, Namespace) and (logger.get("init_args") or Namespace()).get("version") is not None
        if (self.config.get("ckpt_path") or pinned) and not self.already_saved and trainer.log_dir:
            taken = trainer.strategy.broadcast(sorted(p.name for p in Path(trainer.log_dir).glob("config*.yaml")))
            if self.config_filename in taken:
                stem = Path(self.config_filename).stem
                self.config_filename = next(f"{stem}.resumed-{n}.yaml" for n in range(1, len(taken) + 2)
                                            if f"{stem}.resumed-{n}.yaml" not in taken)
        super().setup(trainer, pl_module, stage)


class VdrCLI(LightningCLI):
    """LightningCLI with a validation pass before training (the "before" point of a learning curve) and runs resumed
    in place (``resume_in_place``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", SaveConfig)
        super().__init__(VdrModule, RetrievalDataModule, *args, subclass_mode_model=True, subclass_mode_data=True,
                         **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(DEFAULT_CLASSES)
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False,
            help="Run one validation before the first training step (logged at step 0).",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI rebuilds the module from a checkpoint file's hyperparameters (with its class, `_class_path`);
        # an FSDP run's checkpoint is a directory whose hyperparameters live in its metadata file: read them there.
        from vdr.lit.checkpoint import SHARDED_METADATA, is_sharded_checkpoint

        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            resume_in_place(self.config["fit"])
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if not path or not is_sharded_checkpoint(path):
            return super()._parse_ckpt_path()
        import torch

        metadata = torch.load(os.path.join(path, SHARDED_METADATA), map_location="cpu", weights_only=True)
        hparams = {k: v for k, v in metadata.get("hyper_parameters", {}).items() if k != "_instantiator"}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_fit(self) -> None:
        resuming = self.config_init[self.subcommand].get("ckpt_path")  # its "before" point is in the resumed run's log
        if self.config_init[self.subcommand].get("validate_before_fit") and not resuming:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def _run_folder(logger) -> Path | None:
    """``save_dir/name`` of a TensorBoardLogger config (the folder holding a run's version folders); None otherwise."""
    if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return None
    args = logger.get("init_args") or Namespace()
    return Path(args.get("save_dir") or ".") / (args.get("name") or "lightning_logs")


def resume_in_place(config: Namespace) -> None:
    """Points ``fit --ckpt_path`` at the run it resumes, and the logger at that run's folder.

    ``--ckpt_path last`` is the ``checkpoints/last.ckpt`` of this config's run: of its logger version if one is set
    (a requeued SLURM job sets ``slurm-<job id>``), else of its newest version folder that has one; with none, the run
    starts from scratch (what a first SLURM launch wants). A checkpoint inside a version folder of this run, given by
    path, continues in that folder. Continuing in place keeps one TensorBoard curve per run, and lets the
    ModelCheckpoint callbacks go on ranking the checkpoints they restored. Only runs logged with TensorBoardLogger
    (the configs' default) are resolved here; anything else goes to Lightning as given.
    """
    ckpt_path, run = config.get("ckpt_path"), _run_folder(config.get("trainer", Namespace()).get("logger"))
    if not ckpt_path or run is None:
        return
    args = config.trainer.logger.init_args
    version = args.get("version")
    if ckpt_path == "last":
        if version is not None:
            folders = [run / (version if isinstance(version, str) else f"version_{version}")]
        else:
            folders = [path.parent.parent for path in run.glob("*/checkpoints/*last.ckpt*")]
        for folder in folders:
            recover_interrupted_swap(folder / "checkpoints" / "last.ckpt")
        found = [folder for folder in folders if (folder / "checkpoints" / "last.ckpt").exists()]
        found = list(dict.fromkeys(found))
        if not found:
            where = folders[0] if version is not None else run
            rank_zero_info(f"--ckpt_path last: no checkpoints/last.ckpt under {where}; starting a new run")
            config.ckpt_path = None
            return
        folder = max(found, key=lambda f: (f / "checkpoints" / "last.ckpt").stat().st_mtime)
        config.ckpt_path = str(folder / "checkpoints" / "last.ckpt")
        rank_zero_info(f"--ckpt_path last: resuming {config.ckpt_path}")
    else:
        path = Path(ckpt_path).resolve()
        folder = path.parent.parent
        if version is not None or path.parent.name != "checkpoints" or folder.parent != run.resolve():
            return
    args.version = folder.name


DATA_COMMANDS = {
    "synth": ("vdr.data.synth", "write the synthetic VDR training and eval sets"),
    "from-pdf": ("vdr.data.pdf", "render every page of a folder of PDFs, with its text layer, into a dataset"),
    "queries": ("vdr.data.queries", "write training and eval sets of search queries for rendered pages"),
}


def _data_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        lines = "\n".join(f"  {name:<9} {what}" for name, (_, what) in DATA_COMMANDS.items())
        print(f"usage: vdr data {{{','.join(DATA_COMMANDS)}}} [...] (--help for each)\n\nsubcommands:\n{lines}")
        return 0 if argv else 2
    if argv[0] in DATA_COMMANDS:
        return importlib.import_module(DATA_COMMANDS[argv[0]][0]).main(argv[1:])
    print(f"vdr data: unknown subcommand {argv[0]!r} (expected: {', '.join(DATA_COMMANDS)})", file=sys.stderr)
    return 2


def _bare_flags(function, argv: list[str]) -> list[str]:
    """A bare ``--overwrite`` means ``--overwrite true`` for bool parameters (jsonargparse wants a value)."""
    parameters = inspect.signature(function).parameters
    flags = {f"--{name}" for name, p in parameters.items() if p.annotation in (bool, "bool")}
    out: list[str] = []
    for i, word in enumerate(argv):
        out.append(word)
        if word in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def _tool_main(function, argv: list[str]) -> int:
    # Plain functions become commands with jsonargparse, as LightningCLI does for classes: --help shows the
    # docstring's argument descriptions.
    from jsonargparse import CLI

    try:
        CLI(function, args=_bare_flags(function, argv), as_positional=False)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as error:
        if os.environ.get("VDR_TRACEBACK"):
            raise
        # Bad input, not a bug: one clear line (VDR_TRACEBACK=1 shows where it came from).
        print(f"vdr {function.__name__.removesuffix('_command')}: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # We pass the (include-expanded) command line explicitly, which LightningCLI warns about when run as a script.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if words and words[0] == "data":
        return _data_main(words[1:])
    if words and words[0] == "export":
        from vdr.export.command import export_command

        return _tool_main(export_command, words[1:])
    if words and words[0] == "evaluate":
        from vdr.evaluation.run import evaluate_command

        return _tool_main(evaluate_command, words[1:])
    if words and words[0] == "mine":
        from vdr.mining.command import mine_command

        return _tool_main(mine_command, words[1:])
    if words and words[0] == "ablate":
        from vdr.ablation.command import ablate_command

        return _tool_main(ablate_command, words[1:])
    VdrCLI(args=expand_includes(words), save_config_kwargs={"overwrite": False})
    return 0


if __name__ == "__main__":
    sys.exit(main())
