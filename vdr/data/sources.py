"""Where tables come from: a ``save_to_disk`` directory, parquet files, or a hub dataset (for online users)."""

from __future__ import annotations

import glob
import os

import datasets

from vdr.data.errors import DataError


def load_table(source: str, *, split: str = "train", config: str | None = None) -> datasets.Dataset:
    """Loads one table as a ``datasets.Dataset``.

    Args:
        source: A directory written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), a parquet file or
            glob, a directory of parquet files, or a hub dataset id.
        split: The split to take from a ``DatasetDict`` or a hub dataset.
        config: The hub configuration (e.g. ``queries`` of a BEIR-style dataset).
    """
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "state.json")) or os.path.exists(
            os.path.join(source, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(source)
            return _pick_split(loaded, source, split)
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
        if not files:
            raise DataError(source, "directory holds neither a save_to_disk dataset nor parquet files")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if source.endswith(".parquet") or any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise DataError(source, "no parquet file matches")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if not _looks_like_hub_id(source):
        raise DataError(source, "no such file or directory (and not a hub id of the form owner/name)")
    return datasets.load_dataset(source, config, split=split)


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` (or a bare name): no leading ``.``, ``/`` or ``~`` and at most one slash."""
    return not source.startswith((".", "/", "~")) and source.count("/") <= 1


def _pick_split(loaded, source: str, split: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(source, f"has splits {sorted(loaded)}, not {split!r}")
        return loaded[split]
    return loaded
