"""A party's rows: where they come from (its own file, the plan's ``[data]``, ``--data``), reading
them, their loss targets in the dtype their loss kind gives them, the input tensors of the party's
nodes, and the train/test splits every party derives alike from the plan seed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import losses
from ..core.plan import Plan, plan_dir
from ..core.randomness import PartyRandom, party_seed
from ..core.specs import DataSpec, PlanError
from ..data import DataError, Table, load_table, train_test_split_ids
from ..data.split import batches, validation_count, validation_split_ids
from ..data.text import TEXT_FIELDS, Ragged, text_lengths
from ..data.torchdata import TorchColumn, TorchReader, TorchSource, sources_of

__all__ = ["Splits", "party_table", "party_inputs", "splits_for", "counted_splits", "ids_digest", "data_spec",
           "with_file", "party_file", "holds_data", "target_kinds", "scaled_targets", "read_table", "data_entry",
           "train_batches"]


@dataclass
class Splits:
    ids: np.ndarray  # all aligned ids
    train: np.ndarray  # positions into ids
    test: np.ndarray
    # [data] validation_fraction: positions carved from the training rows (none without it)
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def counts(self) -> tuple[int, int]:
        """(training rows with the validation rows among them, test rows): what a hello tells."""
        return len(self.train) + len(self.validation), len(self.test)


def read_table(spec: DataSpec, base: Path | None, cache: dict, target: str = "class") -> Table:
    """The rows ``spec`` names (``target``: what its label column holds), read once per ``cache``."""
    if spec.dataset == "arrays":
        if spec._table is None:
            raise DataError("dataset 'arrays' holds rows given in Python, which this process does not have: give "
                            "the data again (splitlearn.predict(run, data=...)) or use a file")
        return spec._table
    if spec.dataset == "torch":  # a Dataset or DataLoader given in Python: its rows streamed (data.torchdata)
        if spec._source is None:
            raise DataError("dataset 'torch' is a Dataset or DataLoader given in Python (splitlearn.split(data=...), "
                            "DataSpec.of_torch), which this process does not have: a plan file or a party process "
                            "cannot hold one; train it in the process that holds it (launcher='threads')")
        if spec.options or spec.path or spec.id_column or spec.label_column:
            raise DataError("dataset 'torch' takes no path, columns or options: its rows, ids (positions) and "
                            "transforms are the Dataset's own (standardize and normalize are not applied)")
        return spec._source.table()
    key = (spec.model_dump_json(), target)
    if key not in cache:
        cache[key] = load_table(spec.dataset, path=spec.path, id_column=spec.id_column,
                                label_column=spec.label_column, options=dict(spec.options), base_dir=base,
                                target=target)
    return cache[key]


def target_kinds(plan: Plan, party: str) -> dict[str, tuple[str, str]]:
    """The party's fields that a loss takes as its target: field -> (``"class"`` or ``"value"``, the loss).

    The loss kind decides what a target means: classification losses take class labels, any other
    (``mse``, a registered regression kind) values, kept as floating point end to end. One field
    cannot be both."""
    out: dict[str, tuple[str, str]] = {}
    holds = plan.parties[party].holds
    for name, loss in plan.losses.items():
        owner, _, local = loss.target.partition(".")
        if owner != party or local not in holds:
            continue
        field_name = holds[local].field
        kind = "class" if losses.is_classification(loss.kind) else "value"
        if field_name in out and out[field_name][0] != kind:
            other = out[field_name][1]
            raise PlanError(f"field {field_name!r} of {party!r} is the target of classification and regression "
                            f"losses ({other!r} and {name!r}): its values cannot be both class labels and numbers",
                            entry=f"losses.{name}.kind", hint="give each kind of target its own column")
        out[field_name] = (kind, name)
    return out


def scaled_targets(plan: Plan, party: str, spec: DataSpec | None, given: bool = False) -> dict[str, str]:
    """The party's regression targets that its data's ``standardize_target`` standardises: its local input
    name -> a loss taking it (empty without the option). Class labels are never standardised: the option is
    refused, naming its entry, where the party's targets are all class labels, where the party's own data
    (``[parties.NAME.data]``) has it but the party holds no target, where the plan's ``[data]`` has it but
    no party reading it holds a regression target, and in a ``[clients]`` plan."""
    if spec is None or not spec.options.get("standardize_target"):
        return {}
    own = not given and plan.parties[party].data is not None
    shared = not given and not own  # the plan's [data]: the parties holding a regression target use it
    entry = "--data" if given else f"{'parties.' + party + '.' if own else ''}data.options.standardize_target"
    hint = ('set it in the data of the party that holds a regression loss\'s target (kind = "mse" or another '
            "regression kind), or remove it")
    plan.check_target_scaling(entry)

    def targets(p: str) -> tuple[dict[str, str], list[str]]:  # regression targets; classification losses
        value, classes = {}, []
        for name, loss in plan.losses.items():
            owner, _, local = loss.target.partition(".")
            if owner == p and local in plan.parties[p].holds:
                if losses.is_classification(loss.kind):
                    classes.append(f"{name!r} ({loss.kind})")
                else:
                    value.setdefault(local, name)
        return value, classes

    mine, classes = targets(party)
    if mine:
        return mine
    if classes:
        raise PlanError(f"standardize_target standardises a regression target, but {party!r} holds only class "
                        f"labels, the target(s) of classification loss(es) {', '.join(classes)}",
                        entry=entry, hint=hint)
    if own:
        raise PlanError(f"standardize_target standardises a regression target, but {party!r} holds the target of "
                        "no loss", entry=entry, hint=hint)
    if shared and not any(targets(p)[0] for p, ps in plan.parties.items() if ps.data is None and holds_data(plan, p)):
        raise PlanError("standardize_target standardises a regression target, but no party reading [data] holds "
                        "one", entry=entry, hint=hint)
    return {}


def _label_target(plan: Plan, party: str) -> str:
    """What the party's label column (field ``y``) holds, for the readers."""
    return target_kinds(plan, party).get("y", ("class", ""))[0]


def holds_data(plan: Plan, party: str) -> bool:
    """Whether a party holds any rows (features or labels); one that holds none reads no data."""
    return bool(plan.parties[party].holds)


def data_spec(plan: Plan, party: str, client: str | None = None, data: DataSpec | None = None) -> DataSpec | None:
    """Where a party's rows come from: ``data`` (given at start), else its own ``[parties.NAME.data]``
    (a client's ``{client}`` in the path filled in), else the plan's ``[data]``; None if it holds none."""
    if not holds_data(plan, party):
        return None
    spec = data or plan.parties[party].data or plan.data
    if spec.path and "{client}" in spec.path:
        if client is None:
            raise PlanError(f"the data of {party!r} is one file per client ({spec.path!r}); which client is this?",
                            entry=f"parties.{party}.data.path", hint="start it as a client: --name "
                            f"{party}-1 (or another client's name)")
        spec = spec.model_copy(update={"path": spec.path.replace("{client}", client)})
    return spec


def with_file(spec: DataSpec, path: str | Path) -> DataSpec:
    """``spec`` reading ``path`` instead (``--data FILE``): its kind told by the file when it differs."""
    from ..data import infer_dataset

    file = Path(path).expanduser().resolve()
    if spec.dataset == "text" and file.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        return spec.model_copy(update={"path": str(file)})  # notes: read with the same columns and tokenizer
    try:
        kind = infer_dataset(file)
    except DataError as e:
        raise PlanError(str(e), entry="--data", hint="give a .csv, .parquet or .npz file, or a folder of images "
                        "(one subfolder per class) or of MNIST idx files") from None
    if kind == spec.dataset:
        return spec.model_copy(update={"path": str(file)})
    keep = {k: getattr(spec, k) for k in ("id_column", "label_column") if kind in ("csv", "parquet")}
    if kind in ("csv", "parquet") and not keep.get("id_column"):
        keep["id_column"] = "id"  # a table from elsewhere: its ids in a column named "id"
    return DataSpec(dataset=kind, path=str(file), test_fraction=spec.test_fraction, **keep)


def party_file(plan: Plan, party: str, path: str | Path) -> DataSpec:
    """A party's rows from ``path`` (``--data``), read with its own data settings."""
    return with_file(plan.parties[party].data or plan.data, path)


def data_entry(plan: Plan, party: str, given: bool) -> str:
    return "--data" if given else (f"parties.{party}.data" if plan.parties[party].data else "data")


def party_table(plan: Plan, party: str, cache: dict | None = None, data: DataSpec | None = None,
                client: str | None = None) -> Table:
    """The rows a party holds (see :func:`data_spec`), sorted by id."""
    spec = data_spec(plan, party, client, data)
    if spec is None:
        raise PlanError(f"party {party!r} holds no data", entry=f"parties.{party}.holds")
    try:
        table = read_table(spec, plan_dir(plan), {} if cache is None else cache, _label_target(plan, party))
        return table.align(np.sort(table.ids))
    except DataError as e:
        raise PlanError(f"party {client or party!r}: {e}", entry=data_entry(plan, party, data is not None),
                        hint="fix the data settings or the file") from None


def _as_target(arr: np.ndarray, kind: str, loss: str, where: str) -> np.ndarray:
    """A loss target in the dtype its loss kind gives it: values float32; class labels integers
    (floating labels only when every one is a whole number: 1.0 is class 1)."""
    if arr.dtype.kind not in "biuf":
        raise PlanError(f"{where} holds {arr.dtype} values, but loss {loss!r} needs numbers", entry=f"losses.{loss}",
                        hint="use a numeric column, or map it to classes (options.classes)")
    if kind == "value":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise PlanError(f"{where} holds {arr[bad][0].item()!r}, not a class label, but loss {loss!r} is a "
                            "classification loss", entry=f"losses.{loss}.kind",
                            hint='use kind = "mse" for a numeric target, or give whole-number class labels')
    return arr


def party_inputs(plan: Plan, party: str, table: Table, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The party's input nodes (``party.field``) as tensors over the table's rows; loss targets in the
    dtype their loss kind gives them (:func:`target_kinds`). A torch dataset's fields are
    :class:`~splitlearn.data.torchdata.TorchField` objects read per step; its loss targets are tensors.
    Where the table holds an ``attention_mask`` (text: :mod:`splitlearn.data.text`), its fields ``input_ids``,
    ``attention_mask`` and ``lm_labels`` are :class:`~splitlearn.data.text.Ragged` by the mask's lengths: a step's
    rows come padded to their own longest note.

    A torch dataset's reads in the party's thread (no workers) draw its random transforms from a stream of
    the party's own, seeded by the plan seed and its name (apart from its random layers' stream), so they
    are reproducible and leave the caller's generator alone."""
    out: dict = {}
    targets = target_kinds(plan, party)
    reader = None  # a torch dataset's rows: one reader per party, its fields streamed (data.torchdata)
    stream: PartyRandom | None = None
    lengths = None  # text: each row's tokens, by which its text fields trim
    if any(ref.field in TEXT_FIELDS for ref in plan.parties[party].holds.values()):
        try:
            lengths = text_lengths(table)
        except DataError as e:
            raise PlanError(f"party {party!r}: {e}", entry=f"parties.{party}.holds",
                            hint="give each row's attention_mask as 1 on its tokens then 0 (right padding)") from None
    for local, ref in plan.parties[party].holds.items():
        if f"{party}.{local}" in skip:
            continue
        try:
            arr = table.select(ref.field, ref.columns)
            if isinstance(arr, TorchColumn):
                _check_loader(plan, arr.source)
                stream = stream or PartyRandom(party_seed(plan.train.seed, f"{party}/data"))
                if ref.field not in targets:
                    reader = reader or TorchReader(arr.source, plan.train.seed, stream.scope, plan.train.pipeline,
                                                   _steps_of(plan, table, arr.index))
                    out[f"{party}.{local}"] = arr.view(reader)
                    continue
                # a loss's targets, up front (classes, checks)
                arr = arr.values(plan.train.seed, plan.train.batch_size, stream.scope)
        except DataError as e:
            raise PlanError(str(e), entry=f"parties.{party}.holds.{local}",
                            hint="name a field of the dataset and a column range inside it") from None
        if ref.field in targets:
            kind, loss = targets[ref.field]
            arr = _as_target(arr, kind, loss, f"field {ref.field!r} of {party!r}")
            if kind == "class" and arr.dtype.kind == "f" and losses.get(plan.losses[loss].kind).indexes_classes:
                arr = arr.astype(np.int64)
        out[f"{party}.{local}"] = torch.from_numpy(np.ascontiguousarray(arr))
        if ref.field in TEXT_FIELDS and lengths is not None:
            if ref.columns is not None:
                raise PlanError(f"field {ref.field!r} of {party!r} holds tokens, whose batches are cut to their "
                                "longest note: it takes no column range", entry=f"parties.{party}.holds.{local}",
                                hint="remove columns (max_length bounds the tokens)")
            out[f"{party}.{local}"] = Ragged(out[f"{party}.{local}"], torch.from_numpy(lengths))
    return out


def splits_for(plan: Plan, table: Table, validation: bool = True, every_row: bool = False) -> Splits:
    """The training, test and (with ``[data] validation_fraction``, unless ``validation`` is False: rows to predict)
    validation rows of ``table``, by id, alike at every party; ``every_row``: every row a test row (new rows to
    predict, the count a party without data learns in the hello)."""
    ids = np.sort(table.ids)
    if every_row:
        return Splits(ids, np.zeros(0, dtype=np.int64), np.arange(len(ids), dtype=np.int64))
    is_test = table.align(ids).fields.get("is_test") if "is_test" in table.fields else None
    train_ids, test_ids = train_test_split_ids(ids, plan.data.test_fraction, plan.train.seed, is_test)
    fraction = plan.data.validation_fraction if validation else None
    if fraction is None:
        return Splits(ids, np.searchsorted(ids, train_ids), np.searchsorted(ids, test_ids))
    try:
        train_ids, val_ids = validation_split_ids(train_ids, fraction, plan.train.seed)
    except DataError as e:
        raise PlanError(str(e), entry="data.validation_fraction",
                        hint="a fraction that leaves both training and validation rows") from None
    return Splits(ids, np.searchsorted(ids, train_ids), np.searchsorted(ids, test_ids), np.searchsorted(ids, val_ids))


def counted_splits(train: int, test: int, validation_fraction: float | None = None) -> Splits:
    """The splits of a party that holds no data: only how many rows there are (told in the hello: ``train``
    counts the validation rows too, which ``validation_fraction`` carves out as the holders do)."""
    val = 0
    if validation_fraction is not None:
        try:
            val = validation_count(train, validation_fraction)
        except DataError as e:
            raise PlanError(str(e), entry="data.validation_fraction",
                            hint="a fraction that leaves both training and validation rows") from None
    return Splits(np.arange(train + test, dtype=np.int64), np.arange(train - val, dtype=np.int64),
                  np.arange(train, train + test, dtype=np.int64), np.arange(train - val, train, dtype=np.int64))


def ids_digest(ids: np.ndarray) -> str:
    """A hash of sorted sample ids, integers or strings alike."""
    h = hashlib.sha256()
    if ids.dtype.kind in "iu":
        h.update(b"i" + np.ascontiguousarray(ids, dtype="<i8").tobytes())
    else:
        for v in ids.tolist():
            b = str(v).encode()
            h.update(len(b).to_bytes(4, "little") + b)
    return h.hexdigest()[:16]


def _torch_sources(plan: Plan) -> list[TorchSource]:
    """The torch sources the parties read: one, or several Datasets batched alike by the plan seed. Parties
    reading different sources where one is a DataLoader are refused: its sampler's draws are every party's
    steps, which the other source's rows would not follow."""
    found = sources_of(plan)
    if len(found) > 1 and any(s.loader is not None for s, _ in found):
        named = " and ".join(f"{', '.join(map(repr, parties))} ({'a DataLoader' if s.loader else 'a Dataset'})"
                             for s, parties in found)
        entries = [f"parties.{parties[0]}.data" if plan.parties[parties[0]].data is not None else "data"
                   for _, parties in found]
        raise PlanError(f"parties {named} each read torch data of their own, but a DataLoader's sampler draws the "
                        "training steps of every party: the other parties' rows would not follow its draws",
                        entry=entries[-1], hint="give one DataLoader (or one Dataset) that every party reads, or "
                        "plain Datasets to each, batched alike by the plan seed")
    return [s for s, _ in found]


def _check_loader(plan: Plan, source: TorchSource) -> None:
    """What the plan asks of a DataLoader, before anything runs: no other party reading torch data of its
    own (:func:`_torch_sources`), batches no larger than ``[train] batch_size`` (a custom batch_sampler's
    draws are checked as drawn, by :func:`train_batches`) and no validation rows carved from the rows its
    sampler draws."""
    _torch_sources(plan)
    if source.loader is None:
        return
    size, most = plan.train.batch_size, source.loader.batch_size
    if most is not None and most > size:
        raise PlanError(f"the DataLoader draws batches of up to {most} rows, but [train] batch_size is {size}: "
                        "no step may be larger", entry="train.batch_size",
                        hint=f"set batch_size = {most} (split(..., batch_size={most}))")
    if getattr(plan.data, "validation_fraction", None) is not None:
        raise PlanError("validation_fraction carves validation rows out of the training rows, but a DataLoader's "
                        "sampler draws from every row of its dataset", entry="data.validation_fraction",
                        hint="hold the validation rows out of the DataLoader's dataset yourself")


def train_batches(plan: Plan, train: np.ndarray, epoch: int) -> list[torch.Tensor]:
    """An epoch's training batches (positions) for :func:`splitlearn.run.setup.schedule`: a DataLoader's
    batch sampler's draws (:mod:`splitlearn.data.torchdata`), else the plan seed's batches over ``train``."""
    t = plan.train
    sources = _torch_sources(plan)
    source = next((s for s in sources if s.loader is not None), None)
    if source is None:
        out = [torch.from_numpy(train[b]) for b in batches(len(train), t.batch_size, t.seed, epoch)]
    else:
        if len(train) != source.n_train:
            raise PlanError(f"the DataLoader's sampler draws from all {source.n_train} rows of its dataset, but the "
                            f"plan trains on {len(train)} of them (rows held out of it)",
                            entry="data", hint="give the test (and validation) rows apart, as their own Dataset")
        try:
            drawn = source.draws(epoch)
        except DataError as e:
            raise PlanError(str(e), entry="data", hint="check the DataLoader's sampler") from None
        big = max(len(b) for b in drawn)
        if big > t.batch_size:
            raise PlanError(f"the DataLoader draws batches of up to {big} rows, but [train] batch_size is "
                            f"{t.batch_size}: no step may be larger", entry="train.batch_size",
                            hint=f"set batch_size = {big} (split(..., batch_size={big}))")
        out = [torch.from_numpy(train[b]) for b in drawn]
    return out


def _steps_of(plan: Plan, table: Table, index: np.ndarray) -> Callable[[], list[np.ndarray]]:
    """The training steps a party's torch reader streams: its schedule's (:func:`train_batches` over the
    training rows of ``table``, its own rows, every epoch), as positions into the source (``index``: each
    table row's). Derived by the reader's party itself: a party holding no data schedules positions from
    counts alone, which are no rows of the source, so no other party's steps may stand for these."""
    def steps() -> list[np.ndarray]:
        try:
            train = splits_for(plan, table).train
            epochs = [train_batches(plan, train, e) for e in range(plan.train.epochs)]
        except PlanError:  # rows the plan trains on in no split (a prediction's): none to stream; training's
            return []  # own splits and steps raise the same error, in setup and the schedule
        at = index[np.argsort(table.ids, kind="stable")]  # a position among the sorted ids -> the source's row
        return [at[b.numpy()] for steps_ in epochs for b in steps_]
    return steps
