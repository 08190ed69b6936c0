"""What ``vdr ablate`` keeps on disk per run, and how it reads a run's state back.

``OUTPUT/runs/RUN/`` holds, for attempt ``N`` (0, 1, ...): ``attempt_N.log`` (the run's stdout and stderr),
``attempt_N/`` (its TensorBoard events, checkpoints and resolved ``config.yaml``) and, once the process has exited,
``attempt_N.json`` (its :class:`Outcome`). A successful attempt's outcome is also written to ``result.json``, which
marks the run finished. Attempts are never deleted: a retry is a new attempt. Every JSON file is written to a
temporary name and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULT_FILE = "result.json"
Status = Literal["ok", "failed", "interrupted", "pending"]
_ATTEMPT = re.compile(r"attempt_(\d+)")


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary sibling and renames it over ``path``."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def write_json(path: Path, data: Any) -> None:
    """``write_text`` of indented JSON."""
    write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class Outcome:
    """One attempt of one run, as ``attempt_N.json`` and (when ``status`` is ok) ``result.json`` hold it.

    Attributes:
        run: The run's name.
        attempt: The attempt's index.
        status: ``ok``, or ``failed`` (nonzero exit, or no summary: the fit did not reach its end).
        error: Why a failed attempt failed.
        fit_args: The ``vdr fit`` arguments that define the run (config stack and flags; the runner's logger and
            callback flags excluded): what a resumed sweep compares to decide if a finished run is still this run.
        config_sha256: Digest of the config files (and their includes) the run read.
        command: The whole command line the attempt ran.
        log: The attempt's output log; ``log_dir`` its logger directory.
        wall_s: Wall-clock seconds of the process (start-up and data loading included).
        peak_rss_bytes: Largest resident set of the process or of any child it waited for (DataLoader workers,
            spawned ranks), from ``wait4``.
        peak_gpu_bytes: Largest ``torch.cuda.max_memory_allocated`` over the ranks; None on a CPU run.
        global_step: Optimizer steps taken.
        metrics: Per ``val/`` tag: ``best``, ``best_step``, ``final``, ``final_step``.
        curves: Per ``val/`` tag: ``[[step, value], ...]`` in step order.
    """

    run: str
    attempt: int
    status: Literal["ok", "failed"]
    fit_args: list[str]
    command: list[str]
    log: str
    log_dir: str
    wall_s: float
    peak_rss_bytes: int
    error: str | None = None
    config_sha256: str | None = None
    peak_gpu_bytes: int | None = None
    global_step: int | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Outcome:
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not a vdr ablate record ({error}); move it away to rerun the run") from None


class RunDir:
    """``OUTPUT/runs/RUN``: a run's attempts and its ``result.json`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, name: str) -> None:
        self.name = name
        self.path = Path(root) / name

    def log(self, attempt: int) -> Path:
        return self.path / f"attempt_{attempt}.log"

    def log_dir(self, attempt: int) -> Path:
        return self.path / f"attempt_{attempt}"

    def record(self, attempt: int) -> Path:
        return self.path / f"attempt_{attempt}.json"

    def attempts(self) -> list[int]:
        """Indices of every attempt that left anything behind, in order."""
        if not self.path.is_dir():
            return []
        found = {int(m.group(1)) for p in self.path.iterdir() if (m := _ATTEMPT.match(p.name))}
        return sorted(found)

    def next_attempt(self) -> int:
        return max(self.attempts(), default=-1) + 1

    def result(self) -> Outcome | None:
        """The finished run's outcome, or None."""
        path = self.path / RESULT_FILE
        return Outcome.read(path) if path.is_file() else None

    def state(self) -> tuple[Status, Outcome | None]:
        """``ok`` with its result; else from the latest attempt: ``failed`` with its outcome, ``interrupted`` (it left
        files but no outcome) or ``pending`` (no attempt yet, or a finished one whose result.json was deleted)."""
        result = self.result()
        if result is not None:
            return "ok", result
        attempts = self.attempts()
        if not attempts:
            return "pending", None
        record = self.record(attempts[-1])
        if not record.is_file():
            return "interrupted", None
        outcome = Outcome.read(record)
        return ("failed", outcome) if outcome.status == "failed" else ("pending", None)

    def save(self, outcome: Outcome) -> None:
        """Writes the attempt's record, and ``result.json`` if it succeeded."""
        write_json(self.record(outcome.attempt), asdict(outcome))
        if outcome.status == "ok":
            write_json(self.path / RESULT_FILE, asdict(outcome))
