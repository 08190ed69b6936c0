"""The callback every ``vdr ablate`` run gets: at the end of fit, its peak GPU memory and final step in a JSON file.

The runner adds it with ``--trainer.callbacks+ vdr.ablation.summary.PeakMemory``. The file also marks a fit that
ran to its end: Lightning skips ``on_fit_end`` when training is interrupted, so a run that exits 0 without it is
recorded as failed.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch

SUMMARY_FILE = "ablation_summary.json"


class PeakMemory(L.Callback):
    """Writes ``<log dir>/ablation_summary.json`` at the end of fit (global rank zero; every rank takes part).

    ``peak_gpu_bytes`` is the largest ``torch.cuda.max_memory_allocated`` over the ranks since each process started
    (model construction included), ``peak_gpu_reserved_bytes`` the same for the caching allocator's reservation;
    both are null on a CPU run. ``global_step`` is the number of optimizer steps taken.

    Args:
        filename: Name of the file in the trainer's log directory.
    """

    def __init__(self, filename: str = SUMMARY_FILE) -> None:
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cuda = pl_module.device.type == "cuda"
        local = ([torch.cuda.max_memory_allocated(pl_module.device), torch.cuda.max_memory_reserved(pl_module.device)]
                 if cuda else [0, 0])
        peaks = torch.tensor(local, dtype=torch.int64, device=pl_module.device)
        peaks = trainer.strategy.all_gather(peaks).reshape(-1, 2).amax(dim=0).tolist()  # [2]: max over ranks
        if not trainer.is_global_zero:
            return
        summary = {"global_step": trainer.global_step, "peak_gpu_bytes": peaks[0] if cuda else None,
                   "peak_gpu_reserved_bytes": peaks[1] if cuda else None, "world_size": trainer.world_size,
                   "device": str(pl_module.device)}
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        staging = f"{path}.tmp-{os.getpid()}"
        with open(staging, "w") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(staging, path)
