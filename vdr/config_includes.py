"""Config files that stack fragments: a top-level ``include:`` list expands into repeated ``--config`` flags.

``vdr fit --config configs/demo.yaml`` with ``include: [trainer/default.yaml, model/demo.yaml]`` in demo.yaml is
exactly ``vdr fit --config configs/trainer/default.yaml --config configs/model/demo.yaml --config <demo.yaml's own
keys>``: later files override earlier ones and list values extend with ``key+:``, as jsonargparse does anyway.
Include paths are relative to the including file; includes may nest.
"""

from __future__ import annotations

import os

import yaml

CONFIG_FLAGS = ("--config", "-c")


def _expand_file(path: str, seen: tuple[str, ...]) -> list[str]:
    real = os.path.realpath(path)
    if real in seen:
        raise ValueError(f"config include cycle: {' -> '.join(seen + (real,))}")
    with open(path) as handle:
        content = yaml.safe_load(handle) or {}
    if not isinstance(content, dict) or "include" not in content:
        return ["--config", path]
    includes = content.pop("include")
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ValueError(f"{path}: 'include' must be a list of config file paths, got {includes!r}")
    args: list[str] = []
    for include in includes:
        target = os.path.join(os.path.dirname(path), include)
        if not os.path.exists(target):
            raise FileNotFoundError(f"{path}: included config {include!r} not found (looked at {target})")
        args += _expand_file(target, seen + (real,))
    if content:
        args += ["--config", yaml.safe_dump(content, sort_keys=False)]  # jsonargparse takes YAML text here too
    return args


def expand_includes(argv: list[str]) -> list[str]:
    """Returns ``argv`` with every ``--config FILE`` that has an ``include:`` list expanded in place."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word in CONFIG_FLAGS:
            path = next(words, None)
            if path is None:
                out.append(word)
            elif os.path.isfile(path):
                out += _expand_file(path, ())
            else:
                out += [word, path]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
            out += _expand_file(path, ()) if os.path.isfile(path) else [word]
        else:
            out.append(word)
    return out
