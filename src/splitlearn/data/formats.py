"""Readers for Parquet and NumPy ``.npz`` files, and telling a file's format from its name.

Parquet has the semantics of CSV (an id column, an optional label column, numeric feature
columns ``x``); an ``.npz`` holds named arrays, each a field. Nothing unpickles, and every
problem is a DataError naming the file (and row and column where there is one).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .files import add_labels, check_table_settings, check_target, check_unique, text_ids
from .images import IMAGE_SUFFIXES
from .table import DataError, Table, as_ids, repeated

__all__ = ["read_parquet", "read_npz", "infer_dataset", "check_flag"]


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'splitlearn[parquet]'") from None
    return pyarrow


def _is_text(pa: Any, t: Any) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def _first_null(col: Any) -> int | None:
    if not col.null_count:
        return None
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def _numbers(pa: Any, path: Path, name: str, col: Any) -> np.ndarray:
    """A Parquet feature column as float64: numeric types as they are, text parsed like CSV cells."""
    bad = _first_null(col)
    if bad is not None:
        raise DataError(f"{path}, row {bad}, column {name!r}: empty (null); feature columns must be numeric "
                        "and complete (or name it as label_column)")
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        values = col.cast(pa.float64(), safe=False).to_numpy()
    elif _is_text(pa, t):
        values = np.empty(len(col), dtype=np.float64)
        for i, v in enumerate(col.to_pylist()):
            try:
                values[i] = float(v)
            except ValueError:
                raise DataError(f"{path}, row {i}, column {name!r}: {v!r} is not a finite number; "
                                "feature columns must be numeric (or name it as label_column)") from None
    else:
        raise DataError(f"{path}, row 0, column {name!r}: {col[0].as_py()!r} is not a number (the column holds {t}); "
                        "feature columns must be numeric (or name it as label_column)")
    bad_rows = np.flatnonzero(~np.isfinite(values))
    if len(bad_rows):
        i = int(bad_rows[0])
        raise DataError(f"{path}, row {i}, column {name!r}: {col[i].as_py()!r} is not a finite number; "
                        "feature columns must be numeric (or name it as label_column)")
    return values


def read_parquet(path: Path, id_column: str | None, label_column: str | None = None,
                 classes: list[str] | None = None, target: str = "class") -> Table:
    """A Parquet file read like a CSV (:func:`splitlearn.data.files.read_csv`): a unique id column, an
    optional label column ``y``, numeric feature columns ``x`` (float32); errors name the 0-based row."""
    pa = _pyarrow()
    classes = check_table_settings(path, "a Parquet file", id_column, label_column, classes, "parquet")
    check_target(target, classes, "parquet")
    try:
        table = pa.parquet.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    header = table.column_names
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: column name(s) {dupes} appear more than once")
    for name in (id_column, label_column):
        if name and name not in header:
            raise DataError(f"{path}: no column {name!r}; columns are {header}")
    if not table.num_rows:
        raise DataError(f"{path}: no rows")
    try:
        table = table.combine_chunks()
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    ids = _parquet_ids(pa, path, table.column(id_column), id_column)
    check_unique(path, ids, id_column)
    features = [h for h in header if h not in (id_column, label_column)]
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        x[:, j] = _numbers(pa, path, name, table.column(name))
    fields, columns = {"x": x}, {"x": features}
    if label_column:
        col = table.column(label_column)
        bad = _first_null(col)
        if bad is not None:
            raise DataError(f"{path}, row {bad}, column {label_column!r}: no label (null)")
        labels = [str(v).strip() for v in col.to_pylist()]
        add_labels(fields, columns, labels, classes, lambda i: f"{path}, row {i}, column {label_column!r}", target)
    return Table(ids, fields, columns)


def _parquet_ids(pa: Any, path: Path, col: Any, name: str) -> np.ndarray:
    bad = _first_null(col)
    if bad is not None:
        raise DataError(f"{path}, row {bad}, column {name!r}: no id (null); every row needs one")
    if pa.types.is_integer(col.type):
        values = col.to_numpy()
        if values.dtype == np.uint64 and len(values) and values.max() > np.iinfo(np.int64).max:
            raise DataError(f"{path}, column {name!r}: ids must fit in 64-bit signed integers")
        return values.astype(np.int64)
    if _is_text(pa, col.type):
        return text_ids(col.to_pylist(), lambda i: f"{path}, row {i}, column {name!r}")
    raise DataError(f"{path}, column {name!r}: ids must be integers or text, but the column holds {col.type}")


def read_npz(path: Path, id_array: str | None = None) -> Table:
    """A NumPy ``.npz``: every array a field (floating arrays as float32, integer and bool arrays as int64),
    except ``id_array`` (default ``"ids"``, optional: else 0..n-1), which holds the ids. All arrays must
    have the same first dimension. Arrays of Python objects are refused: nothing is unpickled."""
    id_array = id_array or "ids"
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    name = None
    arrays: dict[str, np.ndarray] = {}
    single = (f"{path}: a single .npy array, not an .npz archive of named arrays "
              "(save with np.savez(path, x=..., y=...))")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(single)
        with z:
            for name in z.files:
                arrays[name] = z[name]
    except DataError:
        raise
    except ValueError as e:
        if name is None:
            raise DataError(f"{path}: not an .npz archive ({e})") from None
        if "pickle" in str(e):
            raise DataError(f"{path}: array {name!r} holds Python objects (dtype object), which are not read "
                            "(nothing is unpickled); save it as numbers or fixed-width strings") from None
        raise DataError(f"{path}: array {name!r} cannot be read ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        where = f"array {name!r}" if name is not None else "the archive"
        raise DataError(f"{path}: {where} cannot be read; is the file complete? ({e})") from None
    for key, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.ndim == 0:
            raise DataError(f"{path}: {key!r} is not an array with one row per sample")
    if not arrays or list(arrays) == [id_array]:
        raise DataError(f"{path}: no arrays of data (only {sorted(arrays) or 'nothing'})")
    first = id_array if id_array in arrays else next(iter(arrays))
    n = len(arrays[first])
    for key, arr in arrays.items():
        if len(arr) != n:
            raise DataError(f"{path}: array {key!r} has {len(arr)} rows but array {first!r} has {n}; "
                            "every array needs one row per sample")
    if id_array in arrays:
        try:
            ids = as_ids(arrays.pop(id_array))
        except DataError as e:
            raise DataError(f"{path}: array {id_array!r}: {e}") from None
        if len(np.unique(ids)) != n:
            raise DataError(f"{path}: ids in array {id_array!r} are not unique (repeated: {repeated(ids)})")
    else:
        ids = np.arange(n, dtype=np.int64)
    fields = {}
    for key, arr in arrays.items():
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        elif arr.dtype.kind in "iub":
            arr = arr.astype(np.int64, copy=False)
        fields[key] = arr
    return Table(ids, fields)


def _has_mnist(folder: Path) -> bool:
    return any((folder / f"train-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz"))


def _has_image_subfolders(folder: Path) -> bool:
    return any(sub.is_dir() and not sub.name.startswith(".")
               and any(f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") for f in sub.iterdir())
               for sub in folder.iterdir())


def infer_dataset(path: Path) -> str:
    """The dataset kind of a file or folder: ``csv`` (.csv), ``parquet`` (.parquet, .pq), ``npz`` (.npz),
    ``mnist`` (a folder of MNIST idx files) or ``images`` (a folder of class subfolders holding images).

    A CSV of image paths reads as ``csv`` here: name it ``images`` explicitly.
    """
    path = Path(path)
    if path.is_dir():
        try:
            if _has_mnist(path):
                return "mnist"
            if _has_image_subfolders(path):
                return "images"
        except OSError as e:
            raise DataError(f"{path}: cannot read the folder ({e.strerror or e})") from None
        raise DataError(f"{path}: a folder with neither MNIST idx files nor subfolders of images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}), one per class; cannot tell what it holds")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    kind = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: cannot tell the format from the name; use .csv, .parquet (or .pq), .npz, "
                        "a folder of class subfolders of images, or a folder of MNIST idx files")
    return kind


def check_flag(dataset: str, name: str, value: Any) -> bool:
    """A true/false option (``standardize``, or ``normalize = true``)."""
    if not isinstance(value, bool):
        raise DataError(f"{dataset} option {name} must be true or false, got {value!r}")
    return value

