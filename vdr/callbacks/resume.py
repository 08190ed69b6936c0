"""The checkpoint a run resumes from: ``last.ckpt`` every N steps, at the end, and when the job is told to stop.

A job on a cluster is stopped with SIGTERM (preemption; SLURM's time limit with ``--signal=TERM@120``, see
scripts/slurm/vdr.sbatch). This callback's handler notes the signal; at the end of the current optimizer step (a
validation or an epoch's end in between runs to its end first), on every rank together, it writes ``last.ckpt``
(atomically: ``vdr.lit.checkpoint_io``), asks SLURM to requeue the job, and stops the run with exit status 143.
The requeued job runs the same command, whose ``--ckpt_path last`` finds that checkpoint (``vdr.cli``), and the
resumed run continues with the next step: same batches (``vdr.data.resume``), learning rate, optimizer state and
random state as a run that was never stopped.

A SIGKILL (or a crash) cannot be answered: the run resumes from the last periodic save, and repeats the steps after it
exactly.

Lightning's own SLURM requeue (``SLURMEnvironment(auto_requeue=True)`` on SIGUSR1) is not used: it saves from inside
the signal handler, wherever in a step each rank happens to be, which is not a state a run can resume exactly from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vdr.distributed.collectives import agree
from vdr.lit.checkpoint_io import remove_partials


class ResumeCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` every ``every_n_train_steps`` steps, at the end of fit, and on SIGTERM (then stops).

    Args:
        every_n_train_steps: Optimizer steps between saves: the most a SIGKILL can cost. Each save writes the weights
            and the optimizer state (about 8x the bf16 weights with AdamW and fp32 master weights).
        requeue: On SIGTERM inside a SLURM job (``SLURM_JOB_ID`` set), run ``scontrol requeue`` after saving.
        dirpath: Where ``last.ckpt`` goes (default: the run's ``checkpoints/``, beside the best checkpoint).
    """

    def __init__(self, every_n_train_steps: int = 100, requeue: bool = True, dirpath: str | None = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        # save_top_k 0: only `last.ckpt`; no version counter: the one file is replaced, never `last-v1.ckpt`.
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self.requeue = requeue

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            remove_partials(Path(self.dirpath), "*")  # left by writers killed mid-save, best checkpoints' too

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Our own SIGTERM handler, in place of Lightning's: Lightning's stops the run wherever it notices the signal
        # (after a validation, at an epoch's end: no checkpoint) and, on several ranks, broadcasts from inside the
        # handler. Ours only raises a flag, read at the end of a training step.
        self._signalled = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(self, "_previous_handler", None) is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._final_batch(trainer):
            # Saved now rather than at the end of fit: by then Lightning may have begun (and counted) an empty epoch,
            # and a run resumed from that count would read another epoch's shuffle than an uninterrupted run.
            self._save_last(trainer)
        # Only where an optimizer step ended: mid-way through gradient accumulation the gradients so far would be lost.
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.current.ready % trainer.accumulate_grad_batches and not progress.is_last_batch:
            return
        if not self._stop_requested(trainer):
            return
        self._save_last(trainer)
        rank_zero_info(f"SIGTERM: saved {self.last_model_path} after step {trainer.global_step}; stopping")
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            self._requeue(os.environ["SLURM_JOB_ID"])
        raise SIGTERMException(143)  # on every rank at once; 143: stopped by SIGTERM, not finished

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if self._final_batch(trainer) or self._last_global_step_saved == trainer.global_step:
            # Saved again after a validation that followed this step's save: the checkpoint then holds its metrics
            # (the model card reads them) and a run resumed from it does not skip that validation.
            self._last_global_step_saved = -1
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)  # a run stopped otherwise (e.g. early stopping) and not saved at its last step

    @staticmethod
    def _final_batch(trainer: L.Trainer) -> bool:
        """Whether the batch just trained is the run's last: max_steps reached, or the last batch of the last epoch."""
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def _save_last(self, trainer: L.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.fast_dev_run or trainer.sanity_checking or \
                self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        """Whether any rank got SIGTERM (signals reach ranks at different moments; all must save together)."""
        stop = bool(getattr(self, "_signalled", False) or trainer.received_sigterm)
        return agree(stop, trainer.strategy.root_device, everyone=False)

    @staticmethod
    def _requeue(job_id: str) -> None:
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            rank_zero_warn(f"SLURM job {job_id} was not requeued: scontrol failed ({error})")
            return
        if result.returncode == 0:
            rank_zero_info(f"requeued SLURM job {job_id}")
        else:
            rank_zero_warn(f"SLURM job {job_id} was not requeued: scontrol requeue exited {result.returncode}: "
                           f"{result.stderr.strip()}")
