"""Data: embedded datasets, readers for local files, deterministic splits and batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .embedded import SYNTHETIC_OPTIONS, breast_cancer, diabetes, digits, synthetic, wine
from .files import TARGETS, check_classes, mnist, read_csv
from .formats import check_flag, infer_dataset, read_npz, read_parquet
from .images import check_normalize, read_images
from .partition import partition
from .split import batches, train_test_split_ids
from .table import DataError, Table
from .text import TEXT_OPTIONS, read_text

__all__ = ["Table", "DataError", "load_table", "infer_dataset", "batches", "train_test_split_ids", "partition",
           "DATASETS", "TARGET_OPTION"]

DATASETS = ("digits", "breast_cancer", "wine", "diabetes", "synthetic", "mnist", "csv", "parquet", "npz", "images",
            "text")
TARGET_OPTION = "standardize_target"  # regression targets (data.preprocess): the datasets that can hold them
_T = TARGET_OPTION
_OPTIONS: dict[str, set[str]] = {"digits": set(), "breast_cancer": set(), "wine": set(), "diabetes": {_T},
                                 "synthetic": set(SYNTHETIC_OPTIONS), "mnist": {"limit"},
                                 "csv": {"standardize", "classes", _T}, "parquet": {"standardize", "classes", _T},
                                 "npz": {"standardize", "normalize", _T},
                                 "images": {"size", "channels", "normalize", "classes", "image_column"},
                                 "text": {*TEXT_OPTIONS, _T}}
_SETTINGS = {"mnist": {"path"}, "csv": {"path", "id_column", "label_column"},  # besides options
             "parquet": {"path", "id_column", "label_column"}, "npz": {"path", "id_column"},
             "images": {"path", "id_column", "label_column"}, "text": {"path", "id_column", "label_column"}}


def load_table(dataset: str, *, path: str | None = None, id_column: str | None = None, label_column: str | None = None,
               options: dict[str, Any] | None = None, base_dir: Path | None = None, target: str = "class") -> Table:
    """Load a dataset by name; a relative ``path`` (mnist, csv, parquet, npz, images, text: and its tokenizer) is
    resolved against ``base_dir`` when given. ``standardize``, ``normalize`` and ``standardize_target`` are only
    checked here: they are fitted on the training rows later (:mod:`splitlearn.data.preprocess`). ``target``:
    what a label column holds, ``"class"`` labels or ``"value"``s (a regression loss's targets, read as
    float32)."""
    if target not in TARGETS:
        raise DataError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if options is not None and not isinstance(options, dict):
        raise DataError(f"options for dataset {dataset!r} must be a mapping, got {type(options).__name__}")
    options = dict(options or {})
    unknown = set(options) - _OPTIONS[dataset]
    if unknown:
        raise DataError(f"unknown option(s) {sorted(unknown)} for dataset {dataset!r}; "
                        f"allowed: {sorted(_OPTIONS[dataset])}")
    given = {k for k, v in {"path": path, "id_column": id_column, "label_column": label_column}.items() if v}
    unused = given - _SETTINGS.get(dataset, set())
    if unused:
        raise DataError(f"dataset {dataset!r} does not use {sorted(unused)}; remove them")
    if TARGET_OPTION in options:
        check_flag(dataset, TARGET_OPTION, options.pop(TARGET_OPTION))
    if dataset == "synthetic":
        return synthetic(**options)
    if dataset in ("digits", "breast_cancer", "wine", "diabetes"):
        return {"digits": digits, "breast_cancer": breast_cancer, "wine": wine, "diabetes": diabetes}[dataset]()
    if "standardize" in options:
        check_flag(dataset, "standardize", options["standardize"])
    classes = check_classes(options.get("classes"), dataset)
    if not path:
        raise DataError(f"dataset {dataset!r} reads a local file: set path")
    file = Path(path).expanduser()
    if base_dir is not None and not file.is_absolute():
        file = Path(base_dir) / file
    file = file.resolve()  # errors name the file that was looked for
    if dataset == "mnist":
        return mnist(file, options.get("limit"))
    if dataset == "csv":
        return read_csv(file, id_column, label_column, classes, target)
    if dataset == "text":  # notes tokenised (data.text)
        return read_text(file, id_column, label_column, options, base_dir, classes, target)
    if dataset == "parquet":
        return read_parquet(file, id_column, label_column, classes, target)
    if target == "value" and dataset == "images":
        raise DataError("images hold class labels (one subfolder or label per class), but the loss using them is a "
                        "regression loss; use a classification loss, or give the targets in a CSV or npz")
    if "normalize" in options:
        check_normalize(options["normalize"], options.get("channels", 1) if dataset == "images" else None, dataset)
    if dataset == "npz":
        return read_npz(file, id_column)
    return read_images(file, id_column, label_column, image_column=options.get("image_column"),
                       size=options.get("size"), channels=options.get("channels", 1), classes=classes)
