"""Setting parties up: everything a party needs, derived from the plan and its own data.

The same schedule (batches from the plan seed), the same initial weights (networks seeded by
name), the same wire shapes (a dry run on one sample): no coordination is needed for any of it.
:func:`prepare` loads a plan and checks it end to end before anything runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..core.engine import Mode, dry_run
from ..core.graph import Graph, build_graph
from ..core.plan import DataSpec, Plan, PlanError, plan_dir
from ..core.load import load_plan
from ..data import DataError, Table, batches, load_table, train_test_split_ids
from ..models import build_segment
from ..privacy import defenses

__all__ = ["Step", "Splits", "schedule", "PartySetup", "setup_party", "check_plan", "prepare", "make_optimizer",
           "party_table", "party_inputs", "splits_for", "party_device", "build_modules"]


@dataclass(frozen=True)
class Step:
    id: int
    mode: Mode
    epoch: int
    rows: torch.Tensor  # positions into the train or test rows


@dataclass
class Splits:
    ids: np.ndarray  # all aligned ids
    train: np.ndarray  # positions into ids
    test: np.ndarray


def schedule(plan: Plan, splits: Splits, epochs: int | None = None) -> Iterator[Step]:
    """The steps every party runs, in order: each epoch's training batches, then evaluation."""
    t = plan.train
    sid = 0
    for epoch in range(epochs or t.epochs):
        for b in batches(len(splits.train), t.batch_size, t.seed, epoch):
            yield Step(sid, "train", epoch, torch.from_numpy(splits.train[b]))
            sid += 1
        for b in batches(len(splits.test), t.eval_batch_size, t.seed, epoch, shuffle=False):
            yield Step(sid, "eval", epoch, torch.from_numpy(splits.test[b]))
            sid += 1


# -- data ------------------------------------------------------------------------------------

def _table(spec: DataSpec, base: Path | None, cache: dict) -> Table:
    if spec.dataset == "arrays":
        if spec._table is None:
            raise DataError("dataset 'arrays' holds rows given in Python, which this process does not have: give "
                            "the data again (splitlearn.predict(run, data=...)) or use a file")
        return spec._table
    key = spec.model_dump_json()
    if key not in cache:
        cache[key] = load_table(spec.dataset, path=spec.path, id_column=spec.id_column,
                                label_column=spec.label_column, options=dict(spec.options), base_dir=base)
    return cache[key]


def party_table(plan: Plan, party: str, cache: dict | None = None, data: DataSpec | None = None) -> Table:
    """The rows a party holds: its own source, or the plan's dataset (``data`` overrides both)."""
    spec = data or plan.parties[party].source or plan.data
    try:
        return _table(spec, plan_dir(plan), {} if cache is None else cache)
    except DataError as e:
        entry = f"parties.{party}.source" if plan.parties[party].source and data is None else "data"
        raise PlanError(str(e), entry=entry, hint="fix the data settings or the file") from None


def party_inputs(plan: Plan, party: str, table: Table, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The party's input nodes (``party.field``) as tensors over the table's rows."""
    out = {}
    for local, ref in plan.parties[party].holds.items():
        if f"{party}.{local}" in skip:
            continue
        try:
            arr = table.select(ref.field, ref.columns)
        except DataError as e:
            raise PlanError(str(e), entry=f"parties.{party}.holds.{local}",
                            hint="name a field of the dataset and a column range inside it") from None
        out[f"{party}.{local}"] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def splits_for(plan: Plan, table: Table) -> Splits:
    ids = np.sort(table.ids)
    is_test = table.align(ids).fields.get("is_test") if "is_test" in table.fields else None
    train_ids, test_ids = train_test_split_ids(ids, plan.data.test_fraction, plan.train.seed, is_test)
    return Splits(ids, np.searchsorted(ids, train_ids), np.searchsorted(ids, test_ids))


# -- a party ---------------------------------------------------------------------------------

def make_optimizer(plan: Plan, party: str, modules: dict[str, nn.Module]) -> torch.optim.Optimizer | None:
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        return None
    o = plan.parties[party].optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def party_device(plan: Plan, party: str) -> torch.device:
    """The device a party computes on: ``auto`` is the first CUDA device when there is one."""
    want = plan.parties[party].device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(want)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= count or not count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or no CUDA build of torch)"
            raise PlanError(f"party {party!r} asks for device {want!r}, but this machine has {have}",
                            entry=f"parties.{party}.device",
                            hint='use device = "cpu", or "auto" (CUDA where there is one, else the CPU)')
    return dev


def build_modules(plan: Plan, party: str, segments: list[str]) -> dict[str, nn.Module]:
    """A party's segments, built from the plan and moved to its device."""
    device = party_device(plan, party)
    return {s: build_segment(plan, s).to(device) for s in segments}


@dataclass
class PartySetup:
    """What a party builds from the plan and its data, before any message is exchanged."""

    plan: Plan
    graph: Graph
    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer | None
    inputs: dict[str, torch.Tensor]
    splits: Splits

    @property
    def ids_hash(self) -> str:
        """Parties must hold the same sample ids; the hello compares this."""
        return hashlib.sha256(np.ascontiguousarray(self.splits.ids, dtype="<i8").tobytes()).hexdigest()[:16]


def setup_party(plan: Plan, name: str, cache: dict | None = None, data: DataSpec | None = None,
                predict: bool = False, optimizer: bool = True) -> PartySetup:
    """Build a party's segments, optimizer (unless not ``optimizer``) and inputs (without labels when ``predict``)."""
    graph = build_graph(plan)
    table = party_table(plan, name, cache, data)
    table = table.align(np.sort(table.ids))
    segs = [n for n in graph.local_order(name) if graph.nodes[n].kind == "segment"]
    modules = build_modules(plan, name, segs)
    return PartySetup(plan, graph, name, modules, make_optimizer(plan, name, modules) if optimizer else None,
                      party_inputs(plan, name, table, graph.label_inputs() if predict else set()),
                      splits_for(plan, table))


def check_plan(setups: dict[str, PartySetup]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checks that need every party's data: aligned ids and a dry run. Returns the wire shapes."""
    first = next(iter(setups.values()))
    for s in setups.values():
        if not np.array_equal(s.splits.ids, first.splits.ids):
            missing = np.setdiff1d(first.splits.ids, s.splits.ids)
            raise PlanError(f"party {s.name!r} and {first.name!r} hold different ids ({len(missing)} of "
                            f"{first.name!r}'s are missing at {s.name!r})", entry=f"parties.{s.name}.source",
                            hint="every party must hold the same sample ids (rows are aligned by id)")
    inputs = {k: v for s in setups.values() for k, v in s.inputs.items()}
    graph = first.graph
    defenses.check_data(graph, inputs)  # what each wire's defenses need of the data (binary labels, classes)
    sample = {k: v[:1] for k, v in inputs.items()}
    modules = {k: m for s in setups.values() for k, m in s.modules.items()}
    modes = {k: m.training for k, m in modules.items()}
    for m in modules.values():
        m.eval()  # no running statistics change during the dry run
    try:
        shapes = dry_run(first.graph, modules, sample, {n: inputs[n] for n in graph.label_inputs() if n in inputs})
    finally:
        for k, m in modules.items():
            m.train(modes[k])
    return shapes



def prepare(plan: Plan | str | Path, *, epochs: int | None = None, seed: int | None = None,
            data: DataSpec | None = None, check_only: bool = False) -> tuple[Plan, dict[str, PartySetup], dict]:
    """Load the plan, set every party up and check the plan end to end before any training
    (``check_only``: no optimizers, for a look at the plan)."""
    plan = load_plan(plan).with_train(epochs=epochs, seed=seed)
    cache: dict = {}
    try:
        setups = {p: setup_party(plan, p, cache, data, optimizer=not check_only) for p in plan.parties}
        shapes = check_plan(setups)
    except PlanError as e:  # name the plan file, whatever part of the set-up found the problem
        raise e.in_file(e.file or plan._source) from None
    return plan, setups, shapes
