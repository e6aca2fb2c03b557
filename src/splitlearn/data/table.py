"""Rows of one data source, aligned by id."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Table", "DataError"]


class DataError(ValueError):
    """Data that cannot be used, with the file or dataset and what to change."""


@dataclass(frozen=True)
class Table:
    ids: np.ndarray  # int64 (n,), unique
    fields: dict[str, np.ndarray]  # each with first dimension n
    columns: dict[str, list[str]] = field(default_factory=dict)  # names of the columns of 2-D fields

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, arr in self.fields.items():
            if len(arr) != n:
                raise DataError(f"field {name!r} has {len(arr)} rows, ids have {n}")
        if len(np.unique(self.ids)) != n:
            raise DataError("ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> "Table":
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
            raise DataError(f"field {name!r} has shape {list(arr.shape[1:])} per row: a column range needs a 2-D field")
        start, stop = columns
        if not 0 <= start < stop <= arr.shape[1]:
            raise DataError(f"columns [{start}, {stop}) of field {name!r}, which has {arr.shape[1]} columns")
        return arr[:, start:stop]

    def align(self, ids: np.ndarray) -> "Table":
        """The rows in the order of ``ids``; every id must be present."""
        order = np.argsort(self.ids)
        found = np.searchsorted(self.ids, ids, sorter=order)
        found = np.clip(found, 0, len(self.ids) - 1)
        pos = order[found]
        missing = ids[self.ids[pos] != ids] if len(self.ids) else ids
        if len(missing):
            raise DataError(f"{len(missing)} of the {len(ids)} ids are missing here (first: {missing[:5].tolist()})")
        return self.take(pos)
