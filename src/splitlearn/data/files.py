"""Readers for files a user already has: MNIST idx files and CSV with an id column.

Nothing here unpickles: idx files are parsed from their header with numpy, CSV with the
standard library, and every mismatch is a DataError naming the file.
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .table import DataError, Table

__all__ = ["read_idx", "mnist", "read_csv"]

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


def read_csv(path: Path, id_column: str | None, label_column: str | None = None, standardize: bool = False) -> Table:
    """A CSV with a header, a unique integer id column, an optional label column ``y``, and numeric columns ``x``.

    Integer labels are kept; any other labels map their sorted distinct values to 0..k-1, kept in ``columns["y"]``.
    ``standardize`` z-scores ``x`` per column with the statistics of all rows.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not id_column:
        raise DataError(f"{path}: a CSV needs an id column: set id_column")
    if label_column == id_column:
        raise DataError(f"{path}: label_column and id_column are both {id_column!r}")
    ids: list[int] = []
    labels: list[str] = []
    rows: list[list[float]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path}: empty file; the first line must name the columns")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{path}: column name(s) {dupes} appear more than once in the header")
            for col in (id_column, label_column):
                if col and col not in header:
                    raise DataError(f"{path}: no column {col!r}; columns are {header}")
            id_at = header.index(id_column)
            label_at = header.index(label_column) if label_column else None
            features = [(i, h) for i, h in enumerate(header) if i not in (id_at, label_at)]
            line_end = reader.line_num
            for row in reader:
                line, line_end = line_end + 1, reader.line_num  # the line the record starts on
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}, line {line}: {len(row)} cells where the header has {len(header)}")
                try:
                    ids.append(int(row[id_at]))
                except ValueError:
                    raise DataError(f"{path}, line {line}, column {id_column!r}: id {row[id_at]!r} "
                                    "is not an integer; ids must be integers") from None
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
                rows.append(values)
                if label_at is not None:
                    labels.append(row[label_at].strip())
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    if not ids:
        raise DataError(f"{path}: no rows after the header")
    ids_arr = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(ids_arr, return_counts=True)
    if len(uniq) != len(ids_arr):
        raise DataError(f"{path}: ids in column {id_column!r} are not unique "
                        f"(repeated: {uniq[counts > 1][:5].tolist()})")
    x = np.asarray(rows, dtype=np.float32).reshape(len(ids), len(features))
    if standardize:
        std = x.std(0)
        x = ((x - x.mean(0)) / np.where(std > 0, std, 1)).astype(np.float32)
    fields, columns = {"x": x}, {"x": [h for _, h in features]}
    if label_at is not None:
        try:
            fields["y"] = np.asarray([int(v) for v in labels], dtype=np.int64)
        except ValueError:
            classes = sorted(set(labels))
            index = {c: i for i, c in enumerate(classes)}
            fields["y"] = np.asarray([index[v] for v in labels], dtype=np.int64)
            columns["y"] = classes
    return Table(ids_arr, fields, columns)
