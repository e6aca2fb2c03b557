"""Data: embedded datasets, readers for local files, deterministic splits and batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .embedded import breast_cancer, digits, synthetic
from .files import mnist, read_csv, read_idx
from .split import batches, train_test_split_ids
from .table import DataError, Table

__all__ = ["Table", "DataError", "load_table", "batches", "train_test_split_ids", "DATASETS"]

DATASETS = ("digits", "breast_cancer", "synthetic", "mnist", "csv")
_OPTIONS = {"digits": set(), "breast_cancer": set(), "synthetic": {"n", "features", "classes", "seed", "image"},
            "mnist": {"limit"}, "csv": {"standardize"}}


def load_table(dataset: str, *, path: str | None = None, id_column: str | None = None, label_column: str | None = None,
               options: dict[str, Any] | None = None, base_dir: Path | None = None) -> Table:
    """Load a dataset by name; ``path`` (for mnist and csv) is relative to ``base_dir`` if given."""
    options = dict(options or {})
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    unknown = set(options) - _OPTIONS[dataset]
    if unknown:
        raise DataError(f"unknown option(s) {sorted(unknown)} for dataset {dataset!r}; allowed: {sorted(_OPTIONS[dataset])}")
    if dataset in ("mnist", "csv"):
        if not path:
            raise DataError(f"dataset {dataset!r} reads a local file: set path")
        file = Path(path).expanduser()
        if base_dir is not None and not file.is_absolute():
            file = base_dir / file
        if dataset == "mnist":
            return mnist(file, options.get("limit"))
        return read_csv(file, id_column, label_column, bool(options.get("standardize", False)))
    if dataset == "synthetic":
        return synthetic(**options)
    return digits() if dataset == "digits" else breast_cancer()
