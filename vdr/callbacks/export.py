"""Export at the end of training: the best checkpoint becomes a Sentence Transformers directory beside the run."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class ExportBest(L.Callback):
    """At the end of ``fit``, exports the ModelCheckpoint's best checkpoint (its last one if none is ranked).

    Runs on global rank zero only (the others wait at a barrier), after the final checkpoint is written, through the
    same code as ``vdr export``, so the directory is identical to a manual export of that checkpoint.

    Args:
        output: Directory to write (default: ``<run dir>/export``).
        truncate_dim: Default Matryoshka dimension of the export.
        dtype: Weight dtype of the export (default: as trained).
        overwrite: Replace an existing non-empty ``output``.
    """

    def __init__(self, output: str | None = None, truncate_dim: int | None = None, dtype: str | None = None,
                 overwrite: bool = False) -> None:
        self.output, self.truncate_dim, self.dtype, self.overwrite = output, truncate_dim, dtype, overwrite

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The best checkpoint of the first ModelCheckpoint that ranked one, else the newest last checkpoint (a run
        # without validation has only ResumeCheckpoint's last.ckpt).
        callbacks = trainer.checkpoint_callbacks
        path = next((c.best_model_path for c in callbacks if c.best_model_path), None) or \
            next((c.last_model_path for c in callbacks if c.last_model_path), None)
        if not path:
            rank_zero_warn("ExportBest: no checkpoint was saved (add a ModelCheckpoint); nothing exported")
            return
        output = self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "export")
        if trainer.is_global_zero:
            from vdr.export.command import export_checkpoint

            export_checkpoint(path, output, overwrite=self.overwrite, truncate_dim=self.truncate_dim,
                              dtype=self.dtype)
            rank_zero_info(f"exported {path} -> {output}")
        trainer.strategy.barrier("vdr-export")
