"""Directory outputs that are either complete or absent: written to a temporary sibling, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_destination(output: str | os.PathLike, overwrite: bool) -> Path:
    """Fails early (before any expensive work) when ``output`` cannot be (re)written."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    return output


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory that replaces ``output`` only if the block completes.

    On an error the temporary directory is removed and ``output`` (absent, or the previous version) is untouched, so a
    failed export never leaves a directory that looks complete. The swap is two renames on one filesystem.
    """
    output = check_destination(output, overwrite).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run with our pid
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = output.parent / f".{output.name}.previous-{os.getpid()}"
    if output.exists():
        check_destination(output, overwrite)  # it may have been filled while we worked
        output.rename(previous)
    staging.rename(output)
    shutil.rmtree(previous, ignore_errors=True)
