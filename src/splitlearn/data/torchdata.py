"""Rows from PyTorch: a map-style ``Dataset``, or a ``DataLoader`` over one, as a party's rows, streamed.

:class:`TorchSource` holds what the user gave (``splitlearn.split(model, cut, data=loader)`` or
:meth:`splitlearn.core.specs.DataSpec.of_torch`). Its rows are addressed by position: ids ``0..n-1``
are the dataset's indices; with test data, ids ``n..n+m-1`` are the test dataset's rows (marked
``is_test``). A party's table holds :class:`TorchColumn` objects, never the rows: each input node
is a :class:`TorchField` that the engine indexes with a step's positions, and the party's
:class:`TorchReader` reads those rows through a ``DataLoader`` over the dataset with the user's
``collate_fn``, workers, ``pin_memory`` and prefetching, whose batches are the schedule's training
batches in order (one batch kept, so the fields of the same rows are read once). Rows asked
outside that order (evaluation, the handshake's one row) are read in this process with the same
``collate_fn``.

Labels a loss needs up front (its classes, the label checks) come from ``dataset.targets`` where
the dataset has one of its length (checked against every batch read: a mismatch is an error), else
from one pass over the dataset reading that field. Preprocessing that needs whole columns
(``standardize``, ``normalize``, ``standardize_target``) is not applied: the dataset's transforms
are the user's.

With a ``DataLoader``, its ``batch_sampler``'s draws are every epoch's training batches (splitlearn
shuffles nothing; a sampler's ``set_epoch`` is called before each epoch's draws), drawn once and
shared by every party of this process; all its dataset's rows are training rows, so the test rows
are given apart (``test_data``). Workers are seeded from the plan seed (a generator of splitlearn's,
so reading leaves the user's generators alone). The objects live in this process: a party process
cannot have them, and a plan file naming ``dataset = "torch"`` is refused.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .table import DataError, Table

__all__ = ["TorchSource", "TorchColumn", "TorchField", "TorchReader", "is_torch_data", "source_of"]


def is_torch_data(data: Any) -> bool:
    """Whether ``data`` is a ``torch.utils.data`` Dataset or DataLoader."""
    return isinstance(data, (Dataset, DataLoader))


def _dataset_of(data: Any, what: str) -> tuple[Dataset, DataLoader | None]:
    loader = data if isinstance(data, DataLoader) else None
    dataset = loader.dataset if loader is not None else data
    if isinstance(dataset, IterableDataset):
        raise DataError(f"{what} is an IterableDataset ({type(dataset).__name__}): its rows cannot be addressed, so "
                        "the parties could not read the same rows of each step; give a map-style Dataset (with "
                        "__getitem__ and __len__), or a DataLoader over one")
    if not isinstance(dataset, Dataset):
        raise DataError(f"{what} is {type(dataset).__name__}, not a torch.utils.data.Dataset or DataLoader")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{what} ({type(dataset).__name__}) has no len(): its rows must be addressable 0..n-1") from None
    if n < 1:
        raise DataError(f"{what} ({type(dataset).__name__}) holds no rows")
    if loader is not None and loader.batch_sampler is None:
        raise DataError(f"{what} is a DataLoader without batches (batch_size=None): give it a batch_size or a "
                        "batch_sampler, whose draws are the training batches")
    return dataset, loader


def _tensor(value: Any, field: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"field {field!r} of a batch is {type(value).__name__}, not a tensor: the collate_fn must give "
                    "tensors")


def _fields(batch: Any, rows: int) -> dict[str, torch.Tensor]:
    """A collated batch as fields: (x, y) -> ``x``, ``y``; a dict -> its keys."""
    if isinstance(batch, dict):
        out = {str(k): _tensor(v, str(k)) for k, v in batch.items()}
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        out = {"x": _tensor(batch[0], "x"), "y": _tensor(batch[1], "y")}
    else:
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise DataError(f"a batch is {got}: items must be a pair (x, y) or a dict of tensors (its keys the fields)")
    bad = {k: list(v.shape) for k, v in out.items() if v.dim() == 0 or len(v) != rows}
    if bad:
        raise DataError(f"a batch of {rows} rows has fields of shapes {bad}: each needs one entry per row")
    return out


class TorchSource:
    """A Dataset or DataLoader given in Python (and optionally test rows), read by position."""

    def __init__(self, data: Any, test_data: Any = None):
        self.dataset, self.loader = _dataset_of(data, "data")
        self.test_dataset, self.test_loader = (None, None) if test_data is None else _dataset_of(test_data, "test_data")
        if self.loader is not None and test_data is None:
            raise DataError("a DataLoader's sampler draws its training batches from every row of its dataset, so no "
                            "test rows can be held out of it: give the test rows apart (test_data, or data=(loader, "
                            "test_loader))")
        self.n_train = len(self.dataset)  # type: ignore[arg-type]
        self.n_test = 0 if self.test_dataset is None else len(self.test_dataset)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._draws: list[list[np.ndarray]] = []  # per epoch: the batch sampler's draws
        self._planned: dict[int, list[np.ndarray]] = {}  # per epoch: the training steps' positions
        self._known: tuple[list[np.ndarray], dict[bytes, list[int]]] | None = None  # planned(), kept
        self._labels: dict[str, np.ndarray] = {}
        self._targets: set[str] = set()  # labels taken from dataset.targets: checked against every batch read
        self._sample = self.read(np.zeros(1, dtype=np.int64))  # one row: the fields, their dtypes and shapes
        if self.test_dataset is not None:  # the test rows must have the same fields, dtypes and shapes
            def kinds(row: dict[str, torch.Tensor]) -> dict[str, tuple]:
                return {k: (v.dtype, tuple(v.shape[1:])) for k, v in row.items()}

            test = kinds(self.read(np.full(1, self.n_train, dtype=np.int64)))
            if test != kinds(self._sample):
                raise DataError(f"the test rows' fields {test} differ from the training rows' {kinds(self._sample)}")

    # -- the rows as a table ------------------------------------------------------------------

    def table(self) -> Table:
        """Ids ``0..n+m-1``; every field a :class:`TorchColumn` (nothing read); ``is_test`` with test data."""
        n = self.n_train + self.n_test
        fields: dict[str, Any] = {f: TorchColumn(self, f, np.arange(n, dtype=np.int64)) for f in self._sample}
        if "is_test" in fields:
            raise DataError("the dataset has a field 'is_test', a name splitlearn keeps for its test rows: rename it")
        if self.test_dataset is not None:
            fields["is_test"] = np.arange(n) >= self.n_train
        return Table(np.arange(n, dtype=np.int64), fields)

    # -- reading --------------------------------------------------------------------------------

    def _settings(self, test: bool) -> tuple[Dataset, DataLoader | None, int]:
        if test and self.test_dataset is not None:
            return self.test_dataset, self.test_loader or self.loader, self.n_train
        return self.dataset, self.loader, 0

    def loader_over(self, batches: list[list[int]], test: bool, seed: int, workers: bool = True) -> DataLoader:
        """A DataLoader over the (test) dataset whose batches are ``batches``, with the user's collate_fn and,
        where ``workers``, its workers, pinning and prefetching; workers seeded from ``seed``."""
        dataset, user, _ = self._settings(test)
        kw: dict[str, Any] = {"collate_fn": user.collate_fn if user is not None else default_collate,
                              "generator": torch.Generator().manual_seed(seed)}
        if user is not None and workers:
            kw.update(num_workers=user.num_workers, pin_memory=user.pin_memory, timeout=user.timeout,
                      worker_init_fn=user.worker_init_fn, multiprocessing_context=user.multiprocessing_context,
                      pin_memory_device=user.pin_memory_device)
            if user.num_workers:
                kw["prefetch_factor"] = user.prefetch_factor
        return DataLoader(dataset, batch_sampler=batches, **kw)

    def split_rows(self, rows: np.ndarray) -> bool:
        """Whether ``rows`` are test rows (all of them); a DataError for rows of both or out of range."""
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_train + self.n_test):
            raise DataError(f"rows {rows.min()}..{rows.max()} asked of a dataset of {self.n_train + self.n_test} rows")
        test = rows >= self.n_train
        if test.any() and not test.all():
            raise DataError("one read asked for training and test rows together")
        return bool(test.any())

    def batch(self, rows: np.ndarray, batch: Any) -> dict[str, torch.Tensor]:
        """A collated batch of ``rows`` as fields, its labels checked against ``dataset.targets``."""
        out = _fields(batch, len(rows))
        for f in self._targets & set(out):
            self._check_targets(f, rows, out[f])
        return out

    def _check_targets(self, field: str, rows: np.ndarray, given: torch.Tensor) -> None:
        if not np.array_equal(given.numpy(), self._labels[field][rows]):
            raise DataError(f"dataset.targets differs from the labels the dataset's items give (field {field!r}, "
                            f"rows {rows[:5].tolist()}...): a target_transform? Remove targets or make them agree")

    def read(self, rows: np.ndarray, seed: int = 0) -> dict[str, torch.Tensor]:
        """``rows`` read in this process (no workers), with the user's collate_fn."""
        test = self.split_rows(rows)
        offset = self._settings(test)[2]
        return self.batch(rows, next(iter(self.loader_over([(rows - offset).tolist()], test, seed, workers=False))))

    # -- labels ---------------------------------------------------------------------------------

    def labels(self, field: str, seed: int, per_read: int) -> np.ndarray:
        """Field ``field`` of every row: ``y`` from ``dataset.targets`` (and the test dataset's) where each has
        one of its length, else one pass over the rows reading it, ``per_read`` rows at a time (through the
        user's DataLoader settings)."""
        with self._lock:
            if field not in self._labels:
                self._labels[field] = self._read_labels(field, seed, per_read)
            return self._labels[field]

    def _read_labels(self, field: str, seed: int, per_read: int) -> np.ndarray:
        parts = [self.dataset] + ([self.test_dataset] if self.test_dataset is not None else [])
        targets = [getattr(d, "targets", None) for d in parts] if field == "y" else [None]
        if all(t is not None and len(t) == len(d) for t, d in zip(targets, parts)):  # type: ignore[arg-type]
            labels = np.concatenate([np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) for t in targets])
            self._labels[field] = labels  # checked against the row already read, then against every batch
            self._targets.add(field)
            self._check_targets(field, np.zeros(1, dtype=np.int64), self._sample[field])
            return labels
        out = []
        for test, n in ((False, self.n_train), (True, self.n_test)):
            chunks = [list(range(i, min(i + per_read, n))) for i in range(0, n, per_read)]
            if chunks:
                for b, batch in zip(chunks, self.loader_over(chunks, test, seed)):
                    out.append(_fields(batch, len(b))[field].numpy())
        return np.concatenate(out)

    # -- the training batches -------------------------------------------------------------------

    def draws(self, epoch: int) -> list[np.ndarray]:
        """The DataLoader's batch sampler's draws of ``epoch`` (positions into its dataset), drawn once per
        epoch in epoch order and shared by every party of this process."""
        assert self.loader is not None
        with self._lock:
            while len(self._draws) <= epoch:
                e = len(self._draws)
                bs = self.loader.batch_sampler
                for s in dict.fromkeys((bs, getattr(bs, "sampler", None), self.loader.sampler)):
                    if hasattr(s, "set_epoch"):
                        s.set_epoch(e)
                drawn = [np.asarray(list(b), dtype=np.int64).reshape(-1) for b in bs]
                if not drawn or not all(len(b) for b in drawn):
                    raise DataError(f"the DataLoader's sampler drew {'an empty batch' if drawn else 'no batch'} in "
                                    f"epoch {e}: every epoch needs training rows")
                rows = np.concatenate(drawn)
                if rows.min() < 0 or rows.max() >= self.n_train:
                    bad = rows[(rows < 0) | (rows >= self.n_train)][0]
                    raise DataError(f"the DataLoader's sampler drew index {bad}, but its dataset has {self.n_train} "
                                    "rows")
                self._draws.append(drawn)
            return self._draws[epoch]

    def expect(self, epoch: int, rows: list[torch.Tensor]) -> None:
        """The positions of ``epoch``'s training steps, in order (what the readers stream)."""
        with self._lock:
            self._planned[epoch] = [np.ascontiguousarray(r.numpy(), dtype=np.int64) for r in rows]
            self._known = None

    def planned(self) -> tuple[list[np.ndarray], dict[bytes, list[int]]]:
        """Every known training step's positions, epoch after epoch, and where each batch comes in it."""
        with self._lock:
            if self._known is None:
                seq = [r for e in sorted(self._planned) for r in self._planned[e]]
                where: dict[bytes, list[int]] = {}
                for k, r in enumerate(seq):
                    where.setdefault(r.tobytes(), []).append(k)
                self._known = (seq, where)
            return self._known


class TorchColumn:
    """A field of a :class:`TorchSource` at some of its positions, unread: what a party's table holds.
    Indexing it selects positions (or, ``[:, a:b]``, feature columns); it is never turned into an array."""

    def __init__(self, source: TorchSource, field: str, index: np.ndarray, columns: tuple[int, int] | None = None):
        self.source, self.field, self.index, self.columns = source, field, index, columns
        sample = source._sample[field]
        self.per_row = tuple(sample.shape[1:]) if columns is None else (columns[1] - columns[0], *sample.shape[2:])
        self.torch_dtype = sample.dtype

    @property
    def ndim(self) -> int:
        return 1 + len(self.per_row)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.per_row)

    @property
    def dtype(self) -> Any:
        return torch.empty(0, dtype=self.torch_dtype).numpy().dtype if self.torch_dtype != torch.bfloat16 \
            else self.torch_dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> "TorchColumn":
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice):
            if self.columns is not None or len(self.per_row) != 1:
                raise DataError(f"field {self.field!r}: a column range needs a 2-D field")
            start, stop, _ = key[1].indices(self.per_row[0])
            return TorchColumn(self.source, self.field, self.index, (start, stop))
        return TorchColumn(self.source, self.field, self.index[key], self.columns)

    def __array__(self, *_: Any, **__: Any) -> np.ndarray:
        raise DataError(f"field {self.field!r} of a torch dataset is streamed, never read whole (preprocessing that "
                        "needs whole columns, such as standardize or normalize, is the dataset's own transforms)")

    def values(self, seed: int, per_read: int) -> np.ndarray:
        """Its values at its positions, read up front (labels: see :meth:`TorchSource.labels`)."""
        out = self.source.labels(self.field, seed, per_read)[self.index]
        return out if self.columns is None else out[:, self.columns[0]:self.columns[1]]

    def view(self, reader: "TorchReader") -> "TorchField":
        return TorchField(self, reader)


class TorchReader:
    """A party's reader: the schedule's training batches through one DataLoader (the user's workers and
    prefetching), in order; the last batch kept, so every field of the same rows is read once."""

    def __init__(self, source: TorchSource, seed: int):
        self.source, self.seed = source, seed
        self._rows: np.ndarray | None = None  # the kept batch's positions and fields
        self._at: dict[int, int] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self._stream: Iterator[Any] | None = None
        self._seq: list[np.ndarray] = []
        self._next = 0  # the stream's next batch in _seq
        self.reads: list[int] = []  # rows per read (what was asked of the dataset), for tests and reports

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Fields of ``rows`` (positions), as tensors in ``rows``' order."""
        if self._rows is not None and all(int(r) in self._at for r in rows):
            if np.array_equal(rows, self._rows):
                return self._batch
            pick = torch.as_tensor([self._at[int(r)] for r in rows], dtype=torch.long)
            return {k: v[pick] for k, v in self._batch.items()}
        batch = self._streamed(rows)
        if batch is None:
            batch = self.source.read(rows, self.seed)
        self.reads.append(len(rows))
        self._rows, self._batch = rows.copy(), batch
        self._at = {int(r): i for i, r in enumerate(rows)}
        return batch

    def _streamed(self, rows: np.ndarray) -> dict[str, torch.Tensor] | None:
        """``rows`` from the stream when they are a planned training batch (the stream (re)started there)."""
        if self._stream is None or self._next >= len(self._seq) or not np.array_equal(self._seq[self._next], rows):
            seq, where = self.source.planned()
            found = where.get(np.ascontiguousarray(rows, dtype=np.int64).tobytes(), [])
            at = next((k for k in found if k >= self._next), found[0] if found else None)  # the next one due
            if at is None:  # not a training batch (evaluation, one row): the stream waits for the next
                return None
            self._seq, self._next = seq, at
            offset = self.source._settings(False)[2]
            self._stream = iter(self.source.loader_over([(b - offset).tolist() for b in seq[at:]], False, self.seed))
        batch = self.source.batch(rows, next(self._stream))
        self._next += 1
        if self._next >= len(self._seq):
            self._stream = None  # the last planned batch: its workers end
        return batch


class TorchField:
    """One input node of a party over a torch dataset, as the engine uses it: indexed with a step's
    positions (or ``[:1]``, the handshake's row) it gives that field's batch tensor; never all rows."""

    def __init__(self, column: TorchColumn, reader: TorchReader):
        self.column, self.reader = column, reader
        self.dtype = column.torch_dtype

    def __len__(self) -> int:
        return len(self.column)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.column.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        return int(np.prod(self.column.shape))

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        positions = self.column.index[rows]
        value = self.reader.read(np.asarray(positions, dtype=np.int64).reshape(-1))[self.column.field]
        c = self.column.columns
        return value if c is None else value[:, c[0]:c[1]]


def source_of(plan: Any) -> TorchSource | None:
    """The plan's torch source: its ``[data]``'s, else a party's own (None when it reads none)."""
    for spec in (plan.data, *(p.data for p in plan.parties.values())):
        if spec is not None and spec.dataset == "torch":
            return spec._source
    return None
