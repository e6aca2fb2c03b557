"""Rows of one data source, aligned by id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Table", "DataError", "as_ids", "repeated"]


class DataError(ValueError):
    """Data that cannot be used, with the file or dataset and what to change."""


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def as_ids(ids: Any) -> np.ndarray:
    """Sample ids as a 1-D int64 array or a numpy unicode (``'U'``) array; lists of str and object arrays
    of str become ``'U'``, and ids that mix integers and strings are refused."""
    arr = np.array(ids, dtype=object) if isinstance(ids, (list, tuple)) else np.asarray(ids)
    if arr.ndim != 1:
        raise DataError(f"ids must be a 1-D array, got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise DataError(f"ids must fit in 64-bit signed integers, got {arr.max()}")
    if kind in "iu":
        return arr.astype(np.int64, copy=False)
    if kind == "U":
        return arr
    if kind in "OT":
        values = arr.tolist()
        ints, strs = [v for v in values if _is_int(v)], [v for v in values if isinstance(v, str)]
        if ints and strs:
            raise DataError(f"ids mix integers and strings (e.g. {ints[0]!r} and {strs[0]!r}); use one kind for all")
        if len(strs) == len(values):
            return np.asarray(values, dtype=str)
        if len(ints) == len(values):
            try:
                return np.asarray(values, dtype=np.int64)
            except OverflowError:
                raise DataError(f"ids must fit in 64-bit signed integers, got {max(values, key=abs)}") from None
        odd = next(v for v in values if not (_is_int(v) or isinstance(v, str)))
        raise DataError(f"ids must be integers or strings, got {odd!r} ({type(odd).__name__})")
    raise DataError(f"ids must be integers or strings, got an array of {arr.dtype}")


def repeated(ids: np.ndarray, first: int = 5) -> list:
    """The first few ids (sorted) that appear more than once."""
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq[counts > 1][:first].tolist()


@dataclass(frozen=True)
class Table:
    """Rows of one data source, aligned by id: ``fields[name][i]`` belongs to ``ids[i]``."""

    ids: np.ndarray  # (n,) unique, int64 or unicode ('U')
    fields: dict[str, np.ndarray]  # each with first dimension n
    columns: dict[str, list[str]] = field(default_factory=dict)  # names of the columns of 2-D fields

    def __post_init__(self) -> None:
        ids = as_ids(self.ids)
        object.__setattr__(self, "ids", ids)
        n = len(ids)
        for name, arr in self.fields.items():
            if np.ndim(arr) == 0 or len(arr) != n:
                raise DataError(f"field {name!r} has shape {list(np.shape(arr))}, but there are {n} ids")
        if len(np.unique(ids)) != n:
            raise DataError(f"ids are not unique (repeated: {repeated(ids)})")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> Table:
        """The rows at ``positions``."""
        return Table(self.ids[positions], {k: v[positions] for k, v in self.fields.items()}, self.columns)

    def select(self, name: str, columns: tuple[int, int] | None = None) -> np.ndarray:
        """A field, or its feature columns ``[start, stop)``."""
        if name not in self.fields:
            raise DataError(f"no field {name!r}; this data has {sorted(self.fields)}")
        arr = self.fields[name]
        if columns is None:
            return arr
        if arr.ndim != 2:
            raise DataError(f"field {name!r} has shape {list(arr.shape[1:])} per row: "
                            "a column range needs a 2-D field (drop columns)")
        start, stop = columns
        width = arr.shape[1]
        if not 0 <= start < stop <= width:
            raise DataError(f"columns [{start}, {stop}) of field {name!r} are out of range or empty: "
                            f"it has {width} columns, so use 0 <= start < stop <= {width}")
        return arr[:, start:stop]

    def align(self, ids: np.ndarray) -> Table:
        """The rows in the order of ``ids`` (integers or strings, like this table's); every id must be present."""
        ids = as_ids(np.ravel(ids) if isinstance(ids, np.ndarray) else ids)
        if len(np.unique(ids)) != len(ids):
            raise DataError(f"the ids to align to are not unique (repeated: {repeated(ids)})")
        pos = np.zeros(0, dtype=np.int64)
        missing = ids
        if len(self.ids) and len(ids):
            if (ids.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
                kinds = ["strings" if a.dtype.kind == "U" else "integers" for a in (ids, self.ids)]
                raise DataError(f"the ids to align to are {kinds[0]} (e.g. {ids[0].item()!r}) but this data's ids "
                                f"are {kinds[1]} (e.g. {self.ids[0].item()!r}); every party must name its rows alike")
            order = np.argsort(self.ids)
            pos = order[np.clip(np.searchsorted(self.ids, ids, sorter=order), 0, len(self.ids) - 1)]
            missing = ids[self.ids[pos] != ids]
        if len(missing):
            raise DataError(f"{len(missing)} of the {len(ids)} ids are missing here "
                            f"(first: {missing[:5].tolist()}); every party must hold the same ids")
        return self.take(pos)
