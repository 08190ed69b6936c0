"""A callback for the resume tests: one JSON line per training step (loss, temperature, learning rate, rows).

Imported by ``vdr fit`` subprocesses through ``--trainer.callbacks+``; ``delay`` slows steps down so a test can signal
the process while it is mid-run.
"""

from __future__ import annotations

import json
import time

import lightning as L


class StepLog(L.Callback):
    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                  "loss": None if loss is None else float(loss), "temperature": pl_module.loss.temperature,
                  "lr": trainer.optimizers[0].param_groups[0]["lr"], "rows": batch.rows.tolist()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        time.sleep(self.delay)
