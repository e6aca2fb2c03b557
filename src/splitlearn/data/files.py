"""Readers for files a user already has: MNIST idx files and CSV with an id column.

Nothing here unpickles: idx files are parsed from their header with numpy, CSV with the
standard library, and every mismatch is a DataError naming the file.
"""

from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path

import numpy as np

from .table import DataError, Table

__all__ = ["read_idx", "mnist", "read_csv"]

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (optionally gzipped) with ``ndim`` dimensions, checked against its header."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] != ndim:
        raise DataError(f"{path}: not an idx file with {ndim} dimension(s) (bad magic number {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes where the header {list(dims)} implies {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem} (or {stem}.gz); an MNIST folder holds the four idx files")


def mnist(folder: Path, limit: int | None = None) -> Table:
    """MNIST from its idx files: ``x`` (784 in [0, 1]), ``image`` (1x28x28), ``y``, ``is_test``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (give the folder holding the MNIST idx files)")
    parts = []
    for prefix, is_test in (("train", 0), ("t10k", 1)):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        if limit is not None:
            keep = limit if not is_test else max(1, limit // 6)
            images, labels = images[:keep], labels[:keep]
        parts.append((images, labels, np.full(len(labels), is_test, dtype=np.int8)))
    images = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    n = len(y)
    return Table(np.arange(n, dtype=np.int64), {"x": images.reshape(n, -1), "image": images.reshape(n, 1, *images.shape[1:]),
                                                "y": y, "is_test": np.concatenate([p[2] for p in parts])})


def read_csv(path: Path, id_column: str | None, label_column: str | None = None, standardize: bool = False) -> Table:
    """A CSV with an integer id column, optional label column, and numeric feature columns ``x``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not id_column:
        raise DataError(f"{path}: a CSV needs an id column: set id_column")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file")
        header = [h.strip() for h in header]
        for col in (id_column, label_column):
            if col and col not in header:
                raise DataError(f"{path}: no column {col!r}; columns are {header}")
        features = [h for h in header if h not in (id_column, label_column)]
        id_at, label_at = header.index(id_column), header.index(label_column) if label_column else None
        at = [header.index(h) for h in features]
        ids, labels, rows = [], [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {line}: {len(row)} cells where the header has {len(header)}")
            try:
                ids.append(int(row[id_at]))
            except ValueError:
                raise DataError(f"{path}, line {line}: id {row[id_at]!r} in column {id_column!r} is not an integer") from None
            values = []
            for i, h in zip(at, features):
                try:
                    values.append(float(row[i]))
                except ValueError:
                    raise DataError(f"{path}, line {line}, column {h!r}: {row[i]!r} is not a number") from None
            rows.append(values)
            if label_at is not None:
                labels.append(row[label_at].strip())
    if not ids:
        raise DataError(f"{path}: no rows after the header")
    ids_arr = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids_arr)) != len(ids_arr):
        raise DataError(f"{path}: ids in column {id_column!r} are not unique")
    x = np.asarray(rows, dtype=np.float32).reshape(len(ids), len(features))
    if standardize:
        x = ((x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)).astype(np.float32)
    fields, columns = {"x": x}, {"x": features}
    if label_at is not None:
        try:
            fields["y"] = np.asarray([int(v) for v in labels], dtype=np.int64)
        except ValueError:
            classes = sorted(set(labels))
            fields["y"] = np.asarray([classes.index(v) for v in labels], dtype=np.int64)
            columns["y"] = classes
    return Table(ids_arr, fields, columns)
