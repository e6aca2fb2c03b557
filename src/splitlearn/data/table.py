"""Rows of one data source, aligned by id."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Table", "DataError"]


class DataError(ValueError):
    """Data that cannot be used, with the file or dataset and what to change."""


@dataclass(frozen=True)
class Table:
    """Rows of one data source, aligned by id: ``fields[name][i]`` belongs to ``ids[i]``."""

    ids: np.ndarray  # int64 (n,), unique
    fields: dict[str, np.ndarray]  # each with first dimension n
    columns: dict[str, list[str]] = field(default_factory=dict)  # names of the columns of 2-D fields

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise DataError(f"ids must be a 1-D integer array, got shape {list(ids.shape)} of {ids.dtype}")
        object.__setattr__(self, "ids", ids.astype(np.int64, copy=False))
        n = len(ids)
        for name, arr in self.fields.items():
            if np.ndim(arr) == 0 or len(arr) != n:
                raise DataError(f"field {name!r} has shape {list(np.shape(arr))}, but there are {n} ids")
        if len(np.unique(ids)) != n:
            raise DataError("ids are not unique")

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
        """The rows in the order of ``ids``; every id must be present (once)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(np.unique(ids)) != len(ids):
            raise DataError("the ids to align to are not unique")
        pos = np.zeros(0, dtype=np.int64)
        missing = ids
        if len(self.ids):
            order = np.argsort(self.ids)
            pos = order[np.clip(np.searchsorted(self.ids, ids, sorter=order), 0, len(self.ids) - 1)]
            missing = ids[self.ids[pos] != ids]
        if len(missing):
            raise DataError(f"{len(missing)} of the {len(ids)} ids are missing here "
                            f"(first: {missing[:5].tolist()}); every party must hold the same ids")
        return self.take(pos)
