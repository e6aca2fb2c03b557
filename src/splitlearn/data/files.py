"""Readers for files a user already has: MNIST idx files and CSV with an id column.

Nothing here unpickles: idx files are parsed from their header with numpy, CSV with the
standard library, and every mismatch is a DataError naming the file. The helpers for ids,
labels and CSV records are shared with the Parquet and image readers.
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .table import DataError, Table, repeated

__all__ = ["read_idx", "mnist", "read_csv", "TARGETS", "check_classes", "check_table_settings", "check_target",
           "check_unique", "csv_records", "header_index", "add_labels", "label_indices", "label_values", "text_ids"]

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e})") from None


def read_idx(path: Path, ndim: int, type_code: int | None = None) -> np.ndarray:
    """An idx file (optionally ``.gz``) with ``ndim`` dimensions, checked against its header.

    The magic number is ``00 00 <type> <ndim>``; ``type_code`` (e.g. 0x08 for uint8) pins the type.
    """
    raw = _read_bytes(path)
    magic = raw[:4]
    if (len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES or magic[3] != ndim
            or (type_code is not None and magic[2] != type_code)):
        want = f"0x0000{type_code:02X}{ndim:02X}" if type_code is not None else f"an idx magic number with {ndim} dims"
        raise DataError(f"{path}: bad magic number 0x{magic.hex().upper()}, expected {want}; is this the right file?")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, need {head})")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_TYPES[magic[2]])
    expected = head + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes where the header {list(dims)} implies {expected}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem} (or {stem}.gz); an MNIST folder holds the four idx files")


def mnist(folder: Path, limit: int | None = None) -> Table:
    """MNIST train then test from its idx files: ``x`` (H*W in [0, 1]), ``image`` (1xHxW), ``y``, ``is_test`` (int8).

    ``limit`` keeps the first ``limit`` train and ``limit // 6`` (at least 1) test rows.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise DataError(f"mnist option limit must be a positive integer, got {limit!r}")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (give the folder holding the MNIST idx files)")
    parts = []
    for prefix, is_test in (("train", 0), ("t10k", 1)):
        images_file = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels_file = _find(folder, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_file, 3, 0x08), read_idx(labels_file, 1, 0x08)
        if len(images) != len(labels):
            raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
        if parts and images.shape[1:] != parts[0][0].shape[1:]:
            raise DataError(f"{images_file}: images are {list(images.shape[1:])}, train images are "
                            f"{list(parts[0][0].shape[1:])}")
        if limit is not None:
            keep = int(limit) if not is_test else max(1, int(limit) // 6)
            images, labels = images[:keep], labels[:keep]
        parts.append((images, labels, np.full(len(labels), is_test, dtype=np.int8)))
    images = np.concatenate([p[0] for p in parts]).astype(np.float32) / np.float32(255.0)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    n = len(y)
    return Table(np.arange(n, dtype=np.int64),
                 {"x": images.reshape(n, -1), "image": images.reshape(n, 1, *images.shape[1:]), "y": y,
                  "is_test": np.concatenate([p[2] for p in parts])})


def _canonical_int(s: str) -> bool:
    try:
        return str(int(s)) == s and -2**63 <= int(s) < 2**63
    except ValueError:
        return False


def text_ids(values: Sequence[str], where: Callable[[int], str]) -> np.ndarray:
    """Ids read as text: int64 when every (stripped) value is a canonical integer ('161', not '0161' or '+161'),
    else the stripped strings. ``where(i)`` names the place of value ``i`` in errors."""
    stripped = [v.strip() for v in values]
    for i, s in enumerate(stripped):
        if not s:
            raise DataError(f"{where(i)}: empty id; every row needs one")
    if all(_canonical_int(s) for s in stripped):
        return np.asarray([int(s) for s in stripped], dtype=np.int64)
    return np.asarray(stripped, dtype=str)


def check_classes(classes: object, what: str) -> list[str] | None:
    """Option ``classes``: None, or distinct label values (strings) in class order."""
    if classes is None:
        return None
    if (not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes)):
        raise DataError(f"{what} option classes must be a non-empty list of label values as strings "
                        f"(e.g. [\"benign\", \"malignant\"] or [\"0\", \"1\"]), got {classes!r}")
    if len(set(classes)) != len(classes):
        raise DataError(f"{what} option classes names {sorted({c for c in classes if classes.count(c) > 1})} "
                        "more than once")
    return list(classes)


TARGETS = ("class", "value")  # what a label column holds: class labels, or values (regression targets)


def check_target(target: str, classes: list[str] | None, what: str) -> None:
    """``target`` is one of :data:`TARGETS`; classes make no sense for values."""
    if target not in TARGETS:
        raise DataError(f"{what}: target must be one of {list(TARGETS)}, got {target!r}")
    if target == "value" and classes is not None:
        raise DataError(f"{what} option classes is set, but the label column is a regression target (the loss "
                        "using it is not a classification loss); remove classes or use a classification loss")


def label_values(labels: Sequence[str], where: Callable[[int], str]) -> np.ndarray:
    """Regression targets (stripped text) as float32; one that is not a finite number is an error at ``where(i)``."""
    out = np.empty(len(labels), dtype=np.float32)
    for i, v in enumerate(labels):
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not math.isfinite(x):
            raise DataError(f"{where(i)}: target {v!r} is not a finite number, but the loss using this column is a "
                            "regression loss; fix the value, or use a classification loss for class labels")
        out[i] = x
    return out


def add_labels(fields: dict[str, np.ndarray], columns: dict[str, list[str]], labels: Sequence[str],
               classes: list[str] | None, where: Callable[[int], str], target: str = "class") -> None:
    """A label column's values as field ``y`` (:func:`label_indices`), its class names in ``columns["y"]``."""
    fields["y"], names = label_indices(labels, classes, where, target)
    if names is not None:
        columns["y"] = names


def label_indices(labels: Sequence[str], classes: list[str] | None,
                  where: Callable[[int], str], target: str = "class") -> tuple[np.ndarray, list[str] | None]:
    """Labels (stripped text) as int64 class indices, and the class names (None when integer labels are kept);
    with ``target = "value"`` (a regression loss) the values as float32 instead, and no names.

    With ``classes`` a label is its index in that list (one outside it is an error at ``where(i)``);
    without, integer labels are kept and any other labels map their sorted distinct values to 0..k-1
    (the names are recorded with the run and printed, so the mapping is never silent).
    """
    if target == "value":
        return label_values(labels, where), None
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        for i, v in enumerate(labels):
            if v not in index:
                raise DataError(f"{where(i)}: label {v!r} is not one of the classes {classes}")
        return np.asarray([index[v] for v in labels], dtype=np.int64), classes
    try:
        return np.asarray([int(v) for v in labels], dtype=np.int64), None
    except (ValueError, OverflowError):
        names = sorted(set(labels))
        index = {c: i for i, c in enumerate(names)}
        return np.asarray([index[v] for v in labels], dtype=np.int64), names


def csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(1, header)`` (names stripped, checked distinct), then ``(line, cells)`` for every non-empty record,
    ``line`` being the line it starts on; every record has as many cells as the header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path}: empty file; the first line must name the columns")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{path}: column name(s) {dupes} appear more than once in the header")
            yield 1, header
            line_end = reader.line_num
            for row in reader:
                line, line_end = line_end + 1, reader.line_num  # the line the record starts on
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}, line {line}: {len(row)} cells where the header has {len(header)}")
                yield line, row
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def header_index(path: Path, header: list[str], name: str | None) -> int | None:
    if name is None:
        return None
    if name not in header:
        raise DataError(f"{path}: no column {name!r}; columns are {header}")
    return header.index(name)


def check_unique(path: Path, ids: np.ndarray, column: str) -> None:
    """Repeated ids are an error naming the file, the column and the first few."""
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: ids in column {column!r} are not unique (repeated: {repeated(ids)})")


def check_table_settings(path: Path, what: str, id_column: str | None, label_column: str | None,
                         classes: list[str] | None, dataset: str) -> list[str] | None:
    """The checks every table reader makes before reading: the file, its id and label columns, ``classes``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not id_column:
        raise DataError(f"{path}: {what} needs an id column: set id_column")
    if label_column == id_column:
        raise DataError(f"{path}: label_column and id_column are both {id_column!r}")
    return check_classes(classes, dataset)


def read_csv(path: Path, id_column: str | None, label_column: str | None = None,
             classes: list[str] | None = None, target: str = "class") -> Table:
    """A CSV with a header, a unique id column, an optional label column ``y``, and numeric columns ``x`` (float32).

    Ids are int64 when every one is a canonical integer, else strings. Labels: see :func:`label_indices`
    (class names, when there are any, in ``columns["y"]``; ``target = "value"``: float32 regression targets). Nothing is standardised here: preprocessing
    is fitted later on the training rows.
    """
    classes = check_table_settings(path, "a CSV", id_column, label_column, classes, "csv")
    check_target(target, classes, "csv")
    records = csv_records(path)
    header = next(records)[1]
    id_at, label_at = header_index(path, header, id_column), header_index(path, header, label_column)
    features = [(i, h) for i, h in enumerate(header) if i not in (id_at, label_at)]
    lines: list[int] = []
    ids: list[str] = []
    labels: list[str] = []
    rows: list[list[float]] = []
    for line, row in records:
        values = []
        for i, h in features:
            try:
                v = float(row[i])
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise DataError(f"{path}, line {line}, column {h!r}: {row[i]!r} is not a finite number; "
                                "feature columns must be numeric (or name it as label_column)")
            values.append(v)
        lines.append(line)
        ids.append(row[id_at])
        rows.append(values)
        if label_at is not None:
            labels.append(row[label_at].strip())
    if not ids:
        raise DataError(f"{path}: no rows after the header")
    ids_arr = text_ids(ids, lambda i: f"{path}, line {lines[i]}, column {id_column!r}")
    check_unique(path, ids_arr, id_column)
    x = np.asarray(rows, dtype=np.float32).reshape(len(ids), len(features))
    fields, columns = {"x": x}, {"x": [h for _, h in features]}
    if label_at is not None:
        add_labels(fields, columns, labels, classes, lambda i: f"{path}, line {lines[i]}, column {label_column!r}",
                   target)
    return Table(ids_arr, fields, columns)
