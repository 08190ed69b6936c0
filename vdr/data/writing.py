"""Writing datasets so that a crash or a bad input never leaves a half-written or clobbered output.

Rows stream into Arrow tables in chunks (only encoded page bytes are held, never decoded images), the dataset is
saved into a temporary sibling directory, and moved over the target in one rename at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

CHUNK_ROWS = 512


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Mutes the ``datasets`` progress bars (``save_to_disk`` draws one per call) inside the block only."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def write_dataset(rows: Iterator[dict], features: datasets.Features, path: Path) -> None:
    """Saves ``rows`` (dicts matching ``features``) with ``save_to_disk`` at ``path``.

    Rows are turned into Arrow ``CHUNK_ROWS`` at a time and each chunk is saved beside ``path`` at once, so memory holds
    one chunk of page bytes, not the dataset; the saved chunks are memory-mapped and joined into the final save.
    """
    import datasets

    scratch = path.with_name(f"{path.name}.chunks")
    shutil.rmtree(scratch, ignore_errors=True)
    # save_to_disk draws its own per-shard bars; they would interleave with ours.
    try:
        with quiet_datasets():
            chunks: list[datasets.Dataset] = []

            def flush(buffer: list[dict]) -> None:
                chunk_dir = scratch / str(len(chunks))
                table = (datasets.Dataset.from_list(buffer, features=features) if buffer
                         else datasets.Dataset.from_dict({name: [] for name in features}, features=features))
                table.save_to_disk(str(chunk_dir))
                chunks.append(datasets.load_from_disk(str(chunk_dir)))  # memory-mapped

            buffer: list[dict] = []
            for row in rows:
                buffer.append(row)
                if len(buffer) == CHUNK_ROWS:
                    flush(buffer)
                    buffer = []
            if buffer or not chunks:
                flush(buffer)
            dataset = chunks[0] if len(chunks) == 1 else datasets.concatenate_datasets(chunks)
            dataset.save_to_disk(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_target(output_dir: Path, overwrite: bool) -> None:
    """Refuses to write over a file, or over a non-empty directory unless ``overwrite``."""
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite):
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass overwrite=True (--overwrite)")


def temporary_sibling(output_dir: Path) -> Path:
    """A fresh directory beside ``output_dir`` (same file system, so the final move is one rename)."""
    tmp_dir = output_dir.with_name(f"{output_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # left over from a crashed run that happened to have our pid
    tmp_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir()
    return tmp_dir


def move_into_place(tmp_dir: Path, output_dir: Path) -> None:
    """Moves a finished ``tmp_dir`` to ``output_dir``, replacing what was there only now that the new one is whole."""
    if output_dir.exists():
        # rename() cannot replace a non-empty directory, so park the old one first; the window without a dataset at
        # output_dir is a single rename, and never shows a partial one.
        old = output_dir.with_name(f"{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, output_dir)
