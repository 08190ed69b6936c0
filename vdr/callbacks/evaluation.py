"""What the evaluation callbacks share: their last metrics kept in checkpoints, and test = validation.

The metrics of the validation that produced a checkpoint travel in it (``state_dict``), which is where an export's
model card reads them.

Under DDP or FSDP each rank embeds or scores its shard of the eval data (the data module pads the shards to equal
length with items of ``index = -1``, which the callbacks drop); the callbacks gather only what the metrics need, so
every rank computes the same metrics as one process would.
"""

from __future__ import annotations

import lightning as L


class EvaluationCallback(L.Callback):
    """Base of ``RetrievalEvaluator`` and ``RerankEvaluator``; subclasses implement the validation hooks."""

    def __init__(self) -> None:
        self.last_metrics: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.on_validation_epoch_end(trainer, pl_module)
