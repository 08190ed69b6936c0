"""The sweep's reports in OUTPUT: ``results.csv``, ``results.md`` and ``plots/<metric>.png``.

They are rewritten after every run (each to a temporary file, then renamed), so a partial sweep always has complete
reports of the runs finished so far. Every run of the grid has a row, in grid order, whatever its status: ``ok``,
``failed`` (its partial curves are kept), ``interrupted`` or ``pending``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vdr.ablation.grid import Grid, Run
from vdr.ablation.metrics import lower_is_better
from vdr.ablation.record import Outcome, Status, write_text

GIB = 2**30
UNSAFE_FILE = re.compile(r"[^\w.@+=-]")


@dataclass(frozen=True)
class Row:
    """A run of the grid with its state: the outcome of its finished (or latest failed) attempt, if any."""

    run: Run
    status: Status
    outcome: Outcome | None


def metric_tags(rows: list[Row]) -> list[str]:
    """Every validation tag any run logged, sorted."""
    return sorted({tag for row in rows if row.outcome for tag in row.outcome.metrics})


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def _columns(grid: Grid, tags: list[str]) -> list[str]:
    metrics = [f"{kind}_{tag}" for tag in tags for kind in ("best", "best_step", "final")]
    return ["run", *(axis.label for axis in grid.axes), "status", "attempt", "wall_s", "peak_rss_gib", "peak_gpu_gib",
            "global_step", *metrics, "log"]


def _values(grid: Grid, row: Row, tags: list[str]) -> list:
    out = row.outcome
    metrics = [out.metrics[tag][kind] if out and tag in out.metrics else None
               for tag in tags for kind in ("best", "best_step", "final")]
    measured = ([out.attempt, out.wall_s, _gib(out.peak_rss_bytes), _gib(out.peak_gpu_bytes), out.global_step]
                if out else [None] * 5)
    return [row.run.name, *(row.run.choices[axis.label] for axis in grid.axes), row.status, *measured, *metrics,
            out.log if out else None]


def write_csv(path: Path, grid: Grid, rows: list[Row]) -> None:
    """One row per run: its choices, status, cost and per metric ``best_``, ``best_step_`` and ``final_`` columns."""
    tags = metric_tags(rows)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(_columns(grid, tags))
    writer.writerows([["" if value is None else value for value in _values(grid, row, tags)] for row in rows])
    write_text(path, text.getvalue())


def _best(rows: list[Row], tag: str, kind: str) -> float | None:
    values = [row.outcome.metrics[tag][kind] for row in rows
              if row.status == "ok" and tag in row.outcome.metrics and not math.isnan(row.outcome.metrics[tag][kind])]
    return (min if lower_is_better(tag) else max)(values) if values else None


def _format(value: float | int | None, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def markdown(grid: Grid, rows: list[Row]) -> str:
    """The CSV's information as a markdown table, the grid file's header comment above it; bold: best per column."""
    tags = metric_tags(rows)
    head = ["run", *(axis.label for axis in grid.axes), "status", "attempt", "wall (s)", "peak RSS (GiB)",
            "peak GPU (GiB)", "steps"]
    for tag in tags:
        head += [f"best {tag} (step)", f"final {tag}"]
    best = {(tag, kind): _best(rows, tag, kind) for tag in tags for kind in ("best", "final")}
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * (len(grid.axes) + 2) + "---:|" * (len(head) - len(grid.axes) - 2)]
    for row in rows:
        out = row.outcome
        cells = [row.run.name, *(row.run.choices[axis.label] for axis in grid.axes), row.status]
        cells += ([str(out.attempt), f"{out.wall_s:.1f}", _format(_gib(out.peak_rss_bytes), ".2f"),
                   _format(_gib(out.peak_gpu_bytes), ".2f"), _format(out.global_step)] if out else [""] * 5)
        for tag in tags:
            metric = out.metrics.get(tag) if out else None
            for kind in ("best", "final"):
                if metric is None:
                    cells.append("")
                    continue
                text = f"{metric[kind]:.4f}"
                if row.status == "ok" and metric[kind] == best[tag, kind]:
                    text = f"**{text}**"
                cells.append(f"{text} @ {metric['best_step']}" if kind == "best" else text)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    counts = {status: sum(row.status == status for row in rows) for status in ("ok", "failed", "interrupted",
                                                                               "pending")}
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    header = [f"> {line}".rstrip() for line in grid.header.splitlines()]
    return "\n".join([f"# Ablation: {grid.path.name}", "", *header, *([""] if header else []),
                      f"{len(rows)} runs ({summary}). Bold: the best value of each metric column over the finished "
                      "runs (lowest for losses, highest otherwise). Steps are optimizer steps; wall time is the "
                      "whole `vdr fit` process.", "", *lines, ""])


def plot_file(tag: str) -> str:
    """``val/ndcg@10`` -> ``val_ndcg@10.png``."""
    return UNSAFE_FILE.sub("_", tag) + ".png"


def plot(path: Path, tag: str, rows: list[Row]) -> None:
    """Each run's final ``tag`` as a bar (the ablation at a glance) and, when some run validated more than once,
    ``tag`` against the training step, one line per run (dashed: failed runs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logged = [row for row in rows if row.outcome and row.outcome.curves.get(tag)]
    curves = any(len(row.outcome.curves[tag]) > 1 for row in logged)
    figure = Figure(figsize=(13 if curves else 7, 0.8 + 0.35 * max(4, len(logged))), dpi=120)
    FigureCanvasAgg(figure)  # no pyplot: no global state, no display
    direction = "lower" if lower_is_better(tag) else "higher"
    bars = figure.add_subplot(1, 2 if curves else 1, 1)
    labels = [row.run.name if row.status == "ok" else f"{row.run.name} ({row.status})" for row in logged]
    finals = [row.outcome.curves[tag][-1][1] for row in logged]
    bars.barh(range(len(logged)), finals, color=["C0" if row.status == "ok" else "0.7" for row in logged])
    bars.set_yticks(range(len(logged)), labels, fontsize="small")
    bars.invert_yaxis()  # grid order, top to bottom
    for y, value in enumerate(finals):
        bars.annotate(f"{value:.4f}", (value, y), xytext=(3, 0), textcoords="offset points", va="center",
                      fontsize="small")
    bars.set(xlabel=f"final {tag}", title=f"final {tag} ({direction} is better)")
    bars.grid(axis="x", alpha=0.3)
    if curves:
        axes = figure.add_subplot(1, 2, 2)
        for row, label in zip(logged, labels):
            steps, values = zip(*row.outcome.curves[tag])
            axes.plot(steps, values, marker="o", markersize=3, linestyle="-" if row.status == "ok" else "--",
                      label=label)
        axes.set(xlabel="step", ylabel=tag, title=f"{tag} against the step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(staging, format="png", bbox_inches="tight")
    os.replace(staging, path)


def write_reports(output: Path, grid: Grid, rows: list[Row]) -> None:
    """``results.csv``, ``results.md`` and one plot per validation metric under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / "results.csv", grid, rows)
    write_text(output / "results.md", markdown(grid, rows))
    tags = metric_tags(rows)
    if tags:
        (output / "plots").mkdir(exist_ok=True)
    for tag in tags:
        plot(output / "plots" / plot_file(tag), tag, rows)
