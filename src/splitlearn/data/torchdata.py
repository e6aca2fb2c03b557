"""Rows from PyTorch: a map-style ``Dataset``, or a ``DataLoader`` over one, as a party's rows, streamed.

:class:`TorchSource` holds what the user gave (``splitlearn.split(model, cut, data=loader)`` or
:meth:`splitlearn.core.specs.DataSpec.of_torch`). Its rows are addressed by position: ids ``0..n-1``
are the dataset's indices; with test data, ids ``n..n+m-1`` are the test dataset's rows (marked
``is_test``). A party's table holds :class:`TorchColumn` objects, never the rows: each input node
is a :class:`TorchField` that the engine indexes with a step's positions, and the party's
:class:`TorchReader` reads those rows through a ``DataLoader`` over the dataset with the user's
``collate_fn``, workers, ``pin_memory`` and prefetching, whose batches are the party's own training
steps in order (derived from its own rows, never from another party's schedule; one batch kept, so the
fields of the same rows, and a pipelined step's micro-batches, are read once: a step's first
micro-batch reads the whole step's rows). Rows asked
outside that order (evaluation, the handshake's one row) are read in this process with the same
``collate_fn``. Reads in this process (those, and every read without workers) draw from the
party's own random stream (given by the reader's owner), never the caller's generator.

Labels a loss needs up front (its classes, the label checks) come from ``dataset.targets`` where
the dataset has one of its length, else from one pass over the dataset reading that field; either
way they are checked against every batch read (a mismatch is an error: labels must be a function
of the row, so a collate_fn or dataset that changes them per draw, such as MixUp or label noise, is
refused rather than trained against other labels). Preprocessing that needs whole columns
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
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .table import DataError, Table

__all__ = ["TorchSource", "TorchColumn", "TorchField", "TorchReader", "Scope", "is_torch_data", "sources_of"]

Scope = Callable[[], AbstractContextManager[None]]  # inside, torch's global generator draws a party's own stream


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
        self._labels: dict[str, np.ndarray] = {}  # fields read up front: checked against every batch read
        self._targets: set[str] = set()  # of them, those taken from dataset.targets
        self._sample = self._quiet(np.zeros(1, dtype=np.int64))  # one row: the fields, their dtypes and shapes
        if self.test_dataset is not None:  # the test rows must have the same fields, dtypes and shapes
            def kinds(row: dict[str, torch.Tensor]) -> dict[str, tuple]:
                return {k: (v.dtype, tuple(v.shape[1:])) for k, v in row.items()}

            test = kinds(self._quiet(np.full(1, self.n_train, dtype=np.int64)))
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

    def in_thread(self, test: bool = False) -> bool:
        """Whether its reads run in the reading thread (no workers): their random transforms then draw from
        torch's global generator, so the reader puts a party's stream there."""
        user = self._settings(test)[1]
        return user is None or not user.num_workers

    def _quiet(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``rows`` read before any party has a stream (the sample rows): under a fixed seed, the caller's
        generator left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.read(rows)

    def split_rows(self, rows: np.ndarray) -> bool:
        """Whether ``rows`` are test rows (all of them); a DataError for rows of both or out of range."""
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_train + self.n_test):
            raise DataError(f"rows {rows.min()}..{rows.max()} asked of a dataset of {self.n_train + self.n_test} rows")
        test = rows >= self.n_train
        if test.any() and not test.all():
            raise DataError("one read asked for training and test rows together")
        return bool(test.any())

    def batch(self, rows: np.ndarray, batch: Any) -> dict[str, torch.Tensor]:
        """A collated batch of ``rows`` as fields, its labels checked against those read up front."""
        out = _fields(batch, len(rows))
        for f in set(self._labels) & set(out):
            self._check_labels(f, rows, out[f])
        return out

    def _check_labels(self, field: str, rows: np.ndarray, given: torch.Tensor) -> None:
        """A DataError, naming the rows, where a batch's ``field`` is not what was read up front for its rows."""
        want = self._labels[field][rows]
        got = given.detach().cpu().numpy()
        if got.shape == want.shape and np.array_equal(got, want, equal_nan=got.dtype.kind == "f" == want.dtype.kind):
            return
        differ = rows[(got != want).reshape(len(rows), -1).any(axis=1)] if got.shape == want.shape else rows
        named = f"{differ[:5].tolist()}{'...' if len(differ) > 5 else ''}"
        if field in self._targets:
            raise DataError(f"dataset.targets differs from the labels the dataset's items give (field {field!r}, "
                            f"rows {named}): a target_transform? Remove targets or make them agree")
        raise DataError(f"field {field!r} of rows {named} differs from the labels read for them up front: labels "
                        "must be a function of the row (the loss, its classes and checks use those read once), so a "
                        "dataset or collate_fn that changes them per draw (MixUp, CutMix, random label noise) would "
                        "train on other labels than the batch's: draw such labels inside the model or loss instead")

    def read(self, rows: np.ndarray, seed: int = 0) -> dict[str, torch.Tensor]:
        """``rows`` read in this process (no workers), with the user's collate_fn."""
        test = self.split_rows(rows)
        offset = self._settings(test)[2]
        return self.batch(rows, next(iter(self.loader_over([(rows - offset).tolist()], test, seed, workers=False))))

    # -- labels ---------------------------------------------------------------------------------

    def labels(self, field: str, seed: int, per_read: int, scope: Scope = nullcontext) -> np.ndarray:
        """Field ``field`` of every row: ``y`` from ``dataset.targets`` (and the test dataset's) where each has
        one of its length, else one pass over the rows reading it, ``per_read`` rows at a time (through the
        user's DataLoader settings; reads without workers under ``scope``). Every batch read later is checked
        against them."""
        with self._lock:
            if field not in self._labels:
                self._labels[field] = self._read_labels(field, seed, per_read, scope)
            return self._labels[field]

    def _read_labels(self, field: str, seed: int, per_read: int, scope: Scope) -> np.ndarray:
        parts = [self.dataset] + ([self.test_dataset] if self.test_dataset is not None else [])
        targets = [getattr(d, "targets", None) for d in parts] if field == "y" else [None]
        if all(t is not None and len(t) == len(d) for t, d in zip(targets, parts)):  # type: ignore[arg-type]
            labels = np.concatenate([np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) for t in targets])
            self._labels[field] = labels  # checked against the row already read, then against every batch
            self._targets.add(field)
            self._check_labels(field, np.zeros(1, dtype=np.int64), self._sample[field])
            return labels
        out = []
        for test, n in ((False, self.n_train), (True, self.n_test)):
            chunks = [list(range(i, min(i + per_read, n))) for i in range(0, n, per_read)]
            if chunks:
                with scope() if self.in_thread(test) else nullcontext():
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

    def values(self, seed: int, per_read: int, scope: Scope = nullcontext) -> np.ndarray:
        """Its values at its positions, read up front (labels: see :meth:`TorchSource.labels`)."""
        out = self.source.labels(self.field, seed, per_read, scope)[self.index]
        return out if self.columns is None else out[:, self.columns[0]:self.columns[1]]

    def view(self, reader: "TorchReader") -> "TorchField":
        return TorchField(self, reader)


class TorchReader:
    """A party's reader: its training steps through one DataLoader (the user's workers and prefetching), in
    order; the last batch kept, so every field of the same rows is read once, and so are the micro-batches of
    a step that ``[train] pipeline`` splits (the first reads the whole step's rows, the others take theirs
    from it). Reads in this thread (no workers, or rows outside the steps) run under ``scope``: the party's
    own random stream, for the dataset's random transforms.

    ``steps`` gives the party's training steps, epoch after epoch, as positions into the source (called
    once, at the first read; none by default): its own, derived from its own rows, so what it streams never
    depends on which party's thread ran first (a party holding no data schedules positions from counts
    alone, which are not these rows)."""

    def __init__(self, source: TorchSource, seed: int, scope: Scope = nullcontext, pipeline: int = 1,
                 steps: Callable[[], list[np.ndarray]] = list):
        self.source, self.seed, self.scope, self.pipeline, self.steps = source, seed, scope, pipeline, steps
        self._rows: np.ndarray | None = None  # the kept batch's positions and fields
        self._at: dict[int, int] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self._stream: Iterator[Any] | None = None
        self._seq: list[np.ndarray] | None = None  # the training steps (steps(), once)
        self._where: dict[bytes, list[int]] = {}  # where each step's rows come in _seq
        self._firsts: dict[bytes, list[int]] = {}  # where each step's first micro-batch (pipeline > 1) comes
        self._next = 0  # the stream's next batch in _seq
        self.reads: list[int] = []  # rows per read (what was asked of the dataset), for tests and reports

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Fields of ``rows`` (positions), as tensors in ``rows``' order."""
        kept = self._kept(rows)
        if kept is not None:
            return kept
        planned = self._planned(rows)
        if planned is None:  # not a training step's rows (evaluation, one row): the stream waits for the next
            with self.scope():
                whole, batch = rows, self.source.read(rows, self.seed)
        else:
            whole, batch = planned
        self.reads.append(len(whole))
        self._rows, self._batch = whole.copy(), batch
        self._at = {int(r): i for i, r in enumerate(whole)}
        kept = self._kept(rows)
        assert kept is not None
        return kept

    def _kept(self, rows: np.ndarray) -> dict[str, torch.Tensor] | None:
        """``rows`` from the kept batch, when it holds them all."""
        if self._rows is None or not all(int(r) in self._at for r in rows):
            return None
        if np.array_equal(rows, self._rows):
            return self._batch
        pick = torch.as_tensor([self._at[int(r)] for r in rows], dtype=torch.long)
        return {k: v[pick] for k, v in self._batch.items()}

    def _first(self, step: np.ndarray) -> np.ndarray:
        """A step's first micro-batch, as the engine splits it (torch.tensor_split)."""
        return np.array_split(step, self.pipeline)[0]

    def _plan(self) -> list[np.ndarray]:
        """The training steps, and where each step (and its first micro-batch) comes among them."""
        if self._seq is None:
            seq = [np.ascontiguousarray(b, dtype=np.int64) for b in self.steps()]
            for k, b in enumerate(seq):
                self._where.setdefault(b.tobytes(), []).append(k)
                if self.pipeline > 1:
                    self._firsts.setdefault(self._first(b).tobytes(), []).append(k)
            self._seq = seq
        return self._seq

    def _due(self, rows: np.ndarray) -> int | None:
        """Where ``rows`` come in the training steps: a step's rows, or its first micro-batch's."""
        seq = self._plan()
        if self._stream is not None and self._next < len(seq):
            b = seq[self._next]
            if np.array_equal(b, rows) or (self.pipeline > 1 and np.array_equal(self._first(b), rows)):
                return self._next
        key = np.ascontiguousarray(rows, dtype=np.int64).tobytes()
        found = self._where.get(key) or self._firsts.get(key, [])
        return next((k for k in found if k >= self._next), found[0] if found else None)  # the next one due

    def _planned(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor]] | None:
        """The training step's rows that ``rows`` begin, and its fields, from the stream (started there)."""
        at = self._due(rows)
        if at is None or self._seq is None:
            return None
        in_thread = self.source.in_thread()
        if self._stream is None or at != self._next:
            self._next = at
            offset = self.source._settings(False)[2]
            with self.scope() if in_thread else nullcontext():
                self._stream = iter(self.source.loader_over([(b - offset).tolist() for b in self._seq[at:]], False,
                                                            self.seed))
        whole = self._seq[at]
        with self.scope() if in_thread else nullcontext():
            batch = self.source.batch(whole, next(self._stream))
        self._next += 1
        if self._next >= len(self._seq):
            self._stream = None  # the last planned batch: its workers end
        return whole, batch


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


def sources_of(plan: Any) -> list[tuple[TorchSource, list[str]]]:
    """The torch sources the plan's parties read, each with the parties reading it (a party that holds
    fields reads its own ``data``, else the plan's ``[data]``); none when it reads none."""
    out: dict[int, tuple[TorchSource, list[str]]] = {}
    for name, party in plan.parties.items():
        spec = (party.data or plan.data) if party.holds else None
        if spec is not None and spec.dataset == "torch" and spec._source is not None:
            out.setdefault(id(spec._source), (spec._source, []))[1].append(name)
    return list(out.values())
