"""The grid file of ``vdr ablate``: a base config stack, flags common to all runs, and axes whose product is the runs.

Format (YAML)::

    # Hypothesis: a lower temperature helps with mined negatives.
    # Run: vdr ablate --grid configs/ablations/temperature.yaml --output checkpoints/ablations/temperature
    base: [configs/demo.yaml]       # the config stack, as `vdr fit --config ...` (paths relative to the current dir)
    overrides:                      # flags of every run: dotted keys as on the `vdr fit` command line
      trainer.max_steps: 100
      model.loss: vdr.losses.contrastive.InfoNCELoss
    grid:                           # one run per combination (cartesian product; the first axis varies slowest)
      model.loss.temperature: [0.02, 0.05]   # a plain axis: a key and its values
      negatives:                             # a named axis: each choice is a name and the flags it sets
        mined: {data.train: checkpoints/data/mined/train}
        random: {data.train: checkpoints/data/random/train, data.num_negatives: 1}
        none: {}                             # a choice may set nothing (the base stack's value)

A run is ``vdr fit --config BASE... --KEY VALUE...``: the overrides in file order, then each axis's flags; later
flags win. Values are written as on a command line: booleans ``true``/``false``, null ``null``, lists and mappings as
JSON. The key ``config`` adds a config file at that point (``config: [a.yaml, b.yaml]`` is an axis of fragments).
Runs are named from their choices, e.g. ``temperature=0.02,negatives=mined``: a plain axis by the last component of
its key (more components where two axes would share one), a named axis by its name.

Everything is checked when the file is read, before any run starts; errors name the file and the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("base", "overrides", "grid")
# The runner sets these to put every run's logs, checkpoints and config under the output directory.
RESERVED = ("trainer.logger.init_args.save_dir", "trainer.logger.init_args.name", "trainer.logger.init_args.version")
UNSAFE = re.compile(r"[^\w.=,@+-]")  # characters a run name (a directory name) does not keep
MAX_NAME = 150


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Choice:
    """One value of an axis: its label in run names and the ``(dotted key, value)`` flags it sets."""

    label: str
    flags: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Axis:
    """A grid axis: its key in the file, its label in run names and report columns, and its choices in file order."""

    key: str
    label: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Run:
    """One combination: its name (a directory name), the label of its choice per axis, and its ``vdr fit`` args."""

    name: str
    choices: dict[str, str]
    fit_args: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    path: Path
    header: str
    base: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]
    axes: tuple[Axis, ...]

    def runs(self) -> list[Run]:
        """Every combination of the axes' choices, the first axis varying slowest."""
        config = [word for path in self.base for word in ("--config", path)]
        runs = []
        for combo in itertools.product(*(axis.choices for axis in self.axes)):
            flags = self.overrides + tuple(flag for choice in combo for flag in choice.flags)
            words = [word for key, value in flags for word in (f"--{key}", format_value(value))]
            choices = {axis.label: choice.label for axis, choice in zip(self.axes, combo)}
            runs.append(Run(run_name(list(choices.items())), choices, tuple(config + words)))
        return runs


def format_value(value: Any) -> str:
    """A YAML value as a ``vdr fit`` command-line word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _label(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_label(item) for item in value)
    if isinstance(value, dict):
        return "-".join(f"{key}_{_label(item)}" for key, item in value.items())
    return format_value(value)


def run_name(choices: list[tuple[str, str]]) -> str:
    """``label=choice,...`` with characters unsafe in a directory name replaced; long names end in a short hash."""
    name = UNSAFE.sub("_", ",".join(f"{label}={choice}" for label, choice in choices)).lstrip(".-") or "run"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise GridError(f"key {key!r} appears twice in one mapping ({node.start_mark})")
        return super().construct_mapping(node, deep=deep)


def _check_flags(path: Path, where: str, flags: Any) -> tuple[tuple[str, Any], ...]:
    if flags is None:
        return ()
    if not isinstance(flags, dict):
        raise GridError(f"{path}: {where} must be a mapping of dotted keys to values, got {flags!r}")
    for key, value in flags.items():
        _check_key(path, where, key)
        if key == "config":
            _check_config(path, f"{where}.config", value)
    return tuple(flags.items())


def _check_key(path: Path, where: str, key: Any) -> None:
    if not isinstance(key, str) or not key or key.startswith("-") or any(c.isspace() for c in key):
        raise GridError(f"{path}: {where}: {key!r} is not a dotted key (write trainer.max_steps, not --flags)")
    if key in RESERVED:
        raise GridError(f"{path}: {where}.{key} is set by vdr ablate (each run logs under OUTPUT/runs/RUN)")


def _check_config(path: Path, where: str, value: Any) -> None:
    if not isinstance(value, str):
        raise GridError(f"{path}: {where} must be a config file path, got {value!r}")
    if not os.path.isfile(value):
        raise FileNotFoundError(f"{path}: {where}: config file {value!r} not found (paths are relative to the "
                                f"current directory, {os.getcwd()})")


def _axis(path: Path, key: Any, values: Any) -> tuple[str, tuple[Choice, ...], bool]:
    where = f"grid.{key}"
    if isinstance(values, list):  # a plain axis: one key, its values
        _check_key(path, "grid", key)
        if not values:
            raise GridError(f"{path}: {where} has no values")
        if key == "config":
            for value in values:
                _check_config(path, where, value)
        return key, tuple(Choice(_label(value), ((key, value),)) for value in values), False
    if isinstance(values, dict):  # a named axis: each choice a name and its flags
        if not isinstance(key, str) or not key:
            raise GridError(f"{path}: grid: axis name {key!r} must be a string")
        if not values:
            raise GridError(f"{path}: {where} has no choices")
        choices = []
        for name, flags in values.items():
            if isinstance(name, bool) or not isinstance(name, (str, int, float)):
                raise GridError(f"{path}: {where}: choice name {name!r} must be a string")
            choices.append(Choice(str(name), _check_flags(path, f"{where}.{name}", flags)))
        return key, tuple(choices), True
    raise GridError(f"{path}: {where} must be a list of values or a mapping of named choices, got {values!r}")


def _labels(keys: list[tuple[str, bool]]) -> list[str]:
    """Each plain axis by the shortest suffix of its dotted key that no other axis shares; named axes by name."""
    depth = [1] * len(keys)
    while True:
        labels = [key if named else ".".join(key.split(".")[-d:]) for (key, named), d in zip(keys, depth)]
        grow = [i for i, label in enumerate(labels) if labels.count(label) > 1 and not keys[i][1]
                and depth[i] < len(keys[i][0].split("."))]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


def load_grid(path: str | os.PathLike) -> Grid:
    """Reads and checks a grid file (see the module docstring); raises GridError or FileNotFoundError."""
    path = Path(path)
    text = path.read_text()
    try:
        content = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise GridError(f"{path}: not valid YAML: {error}") from None
    except GridError as error:
        raise GridError(f"{path}: {error}") from None
    if not isinstance(content, dict):
        raise GridError(f"{path}: expected a mapping with {', '.join(SECTIONS)}")
    unknown = sorted(set(content) - set(SECTIONS))
    if unknown:
        raise GridError(f"{path}: unknown section(s) {unknown} (expected {', '.join(SECTIONS)})")
    for section in ("base", "grid"):
        if content.get(section) is None:
            raise GridError(f"{path}: missing {section!r}")
    base = [content["base"]] if isinstance(content["base"], str) else content["base"]
    if not isinstance(base, list) or not base:
        raise GridError(f"{path}: base must be a config file path or a non-empty list of them")
    for i, config in enumerate(base):
        _check_config(path, f"base[{i}]", config)
    overrides = _check_flags(path, "overrides", content.get("overrides"))
    if not isinstance(content["grid"], dict) or not content["grid"]:
        raise GridError(f"{path}: grid must be a mapping of at least one axis (a dotted key and its values)")
    parsed = [_axis(path, key, values) for key, values in content["grid"].items()]
    setters: dict[str, str] = {key: "overrides" for key, _ in overrides}
    for key, choices, _ in parsed:
        for flag in {flag for choice in choices for flag, _ in choice.flags}:
            if flag in setters and flag != "config" and not flag.endswith("+"):  # those two add, they do not replace
                raise GridError(f"{path}: {flag} is set by both {setters[flag]} and grid.{key}")
            setters[flag] = f"grid.{key}"
    labels = _labels([(key, named) for key, _, named in parsed])
    if len(set(labels)) < len(labels):
        raise GridError(f"{path}: grid axes {[key for key, _, _ in parsed]} would share the labels {labels}; rename "
                        "a named axis")
    axes = tuple(Axis(key, label, choices) for (key, choices, _), label in zip(parsed, labels))
    header = "\n".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda s: s.startswith("#"),
                                                                                 text.splitlines()))
    grid = Grid(path, header, tuple(base), overrides, axes)
    seen: dict[str, dict[str, str]] = {}
    for run in grid.runs():
        if run.name in seen:
            raise GridError(f"{path}: runs {seen[run.name]} and {run.choices} would both be named {run.name!r} "
                            "(repeated values, or values equal once made safe for a directory name)")
        seen[run.name] = run.choices
    return grid
