"""Setting parties up: everything a party needs, derived from the plan and its own data.

The same schedule (batches from the plan seed), the same initial weights (networks seeded by
name), the same wire shapes (a dry run on one sample): no coordination is needed for any of it.
:func:`prepare` loads a plan and checks it end to end before anything runs. A party's rows
(reading, targets, inputs, splits) are :mod:`splitlearn.run.rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..core.augment import check_images
from ..core.defense import check_data as check_defense_data
from ..core.dryrun import dry_run
from ..core.graph import Graph, build_graph
from ..core.load import load_plan
from ..core.optimizing import (WHOLE, PartyOptimizer, Update, checking_class, no_decay_split, optimizer_arguments,
                                optimizer_class, schedule_maker)
from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError
from ..core.stopping import unlinked, watched_loss
from ..core.step import Mode
from ..data import DataError, Table, batches
from ..data.preprocess import Preprocess, TargetScale, fit_preprocess, fit_target_scale
from ..models import build_segment
from ..models.build import load_factory
from .rows import (Splits, counted_splits, data_entry, data_spec, ids_digest, party_inputs, party_table, scaled_targets,
                   splits_for, target_kinds, train_batches)

__all__ = ["Step", "schedule", "accumulated", "PartySetup", "setup_party", "check_plan", "prepare", "make_optimizer",
           "party_device", "build_modules", "label_notes"]


@dataclass(frozen=True)
class Step:
    id: int
    mode: Mode
    epoch: int
    rows: torch.Tensor  # positions into the train or test rows
    update: Update = WHOLE  # training: its gradient group ([train] accumulate; one of its own by default)
    split: str = "test"  # evaluation: the rows it scores, "validation" or "test"


def schedule(plan: Plan, splits: Splits, epochs: int | None = None) -> Iterator[Step]:
    """The steps every party runs, in order: each epoch's training batches, then evaluation (with ``[data]
    validation_fraction``: of the validation rows every epoch, of the test rows once after the last epoch)."""
    t = plan.train
    sid = 0
    for epoch in range(epochs or t.epochs):
        for rows in train_batches(plan, splits.train, epoch):  # a DataLoader's: its batch sampler's draws
            yield Step(sid, "train", epoch, rows)
            sid += 1
        validating = plan.data.validation_fraction is not None  # the validation rows every epoch, the test rows
        for split in ("validation",) * validating + ("test",) * (not validating or epoch == (epochs or t.epochs) - 1):
            rows = getattr(splits, split)  # once, after the last epoch (with the best epoch's weights)
            for b in batches(len(rows), t.eval_batch_size, t.seed, epoch, shuffle=False):
                yield Step(sid, "eval", epoch, torch.from_numpy(rows[b]), split=split)
                sid += 1


def accumulated(steps: list[Step], accumulate: int) -> list[Step]:
    """``steps`` in gradient groups of ``accumulate`` consecutive training steps of one epoch (``[train]
    accumulate``): each step's :class:`~splitlearn.core.optimizing.Update` gives its rows over its group's, the
    group opened by its first and closed by its last. A group ends early at an epoch's (or a turn's) last
    training step: weighted by rows, it equals one batch of the rows it has. Every party derives the same
    groups from the same steps."""
    if accumulate == 1:
        return steps
    out: list[Step] = []
    group: list[Step] = []

    def close() -> None:
        rows = sum(len(s.rows) for s in group)
        out.extend(replace(s, update=Update(len(s.rows) / rows, i == 0, i == len(group) - 1))
                   for i, s in enumerate(group))
        group.clear()

    for s in steps:
        if group and (s.mode != "train" or s.epoch != group[0].epoch or len(group) == accumulate):
            close()
        if s.mode == "train":
            group.append(s)
        else:
            out.append(s)
    if group:
        close()
    return out


# -- a party ---------------------------------------------------------------------------------

def make_optimizer(plan: Plan, party: str, modules: dict[str, nn.Module], probe: bool = False) -> PartyOptimizer | None:
    """The optimizer of ``party``'s plan entry over its trainable parameters (None: it has none), with its
    schedule and clipping. ``no_decay`` makes two parameter groups, those with weight decay first, the others
    with ``weight_decay = 0``; a ``factory`` is called with the parameters (or those groups). ``probe``: one
    made only to be checked (:func:`~splitlearn.core.optimizing.checking_class`), never to step."""
    o = plan.parties[party].optimizer
    decay, no_decay = no_decay_split(modules, o.no_decay)
    if not decay and not no_decay:
        return None
    entry = f"parties.{party}.optimizer"
    groups = ({"params": decay}, {"params": no_decay, "weight_decay": 0.0})
    params: list = decay if not no_decay else [g for g in groups if g["params"]]
    try:
        if o.factory is not None:
            fn = load_factory(plan, o.factory, f"{entry}.factory", "an optimizer", "a torch.optim.Optimizer")
            optimizer = fn(params)
        else:
            cls = optimizer_class(o.name)
            kwargs = optimizer_arguments(cls, o.lr, o.momentum, o.weight_decay, o.arguments)
            optimizer = (checking_class(cls) if probe else cls)(params, **kwargs)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"factory {o.factory!r} returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        s = o.schedule
        return PartyOptimizer(optimizer, schedule_maker(s.name, s.arguments, s.warmup_steps) if s else None,
                              s.every if s else "step", o.clip_grad_norm)
    except PlanError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory, or torch refusing these parameters
        raise PlanError(f"party {party!r}: making its optimizer failed: {type(e).__name__}: {e}",
                        entry=f"{entry}.factory" if o.factory else entry,
                        hint="check the optimizer, its arguments and its schedule (see docs/plans.md)") from None


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
    """What a party builds from the plan and its data, before any message is exchanged.

    A party that holds no data has no ``table``; its ``splits`` are only counts, learnt from
    its neighbours' hellos (:meth:`count`). ``preprocess`` is fitted on the training rows (or
    given: the saved one, for ``predict``) and applied to every row of ``inputs``; so are the scales
    of the regression targets it standardises (``standardize_target``: ``scaled``), which the party
    computing each loss learns in the hello (:meth:`scale_hello`, :meth:`learn_scales`) and undoes
    wherever a prediction or a metric is computed (:meth:`scale_of`)."""

    plan: Plan
    graph: Graph
    name: str
    modules: dict[str, nn.Module]
    optimizer: PartyOptimizer | None
    inputs: dict[str, torch.Tensor]
    splits: Splits | None
    table: Table | None = None  # the raw rows, sorted by id (before preprocessing)
    preprocess: Preprocess | None = None
    skip: frozenset = frozenset()  # input nodes left out (labels, for predict)
    fixed_preprocess: bool = False  # preprocessing given (predict), not fitted
    predicting: bool = False  # rows to predict: every one scored, no validation rows carved out
    every_row: bool = False  # new rows to predict: every one a test row (none trains)
    options: dict = field(default_factory=dict)  # the data source's options (preprocessing)
    client: str | None = None  # the client it is, for a per-client file
    alignment: dict | None = None  # private alignment: rows held before, and kept
    scaled: dict[str, str] = field(default_factory=dict)  # standardised targets: local input -> a loss taking it
    learnt: dict[str, TargetScale] = field(default_factory=dict)  # loss -> its target's scale, told by its holder
    unaligned: Table | None = None  # private alignment: the rows as read, before it (a restarted session aligns them)

    def data_report(self) -> dict:
        """For ``result.json``: the rows it held, their schema and how alignment changed them."""
        if self.table is None:
            return {}
        out: dict = {"rows": len(self.table), "train": len(self.splits.train), "test": len(self.splits.test),
                     "schema": self.schema()}
        if self.alignment is not None:
            out["alignment"] = self.alignment
        return out

    @property
    def ids_hash(self) -> str:
        """Parties must hold the same sample ids; the hello compares this ("" without data)."""
        return ids_digest(self.splits.ids) if self.table is not None and self.splits is not None else ""

    @property
    def rows(self) -> tuple[int, int] | None:
        """(training rows, test rows), once known."""
        return None if self.splits is None else self.splits.counts  # (validation rows counted as training)

    def derive(self, table: Table) -> None:
        """Splits, preprocessing (fitted on the training rows) and inputs from ``table``."""
        self.table = table
        self.splits = splits_for(self.plan, table, validation=not self.predicting, every_row=self.every_row)
        if not self.fixed_preprocess:
            try:
                self.preprocess = fit_preprocess(self.options, table, self.splits.train)
            except DataError as e:
                raise PlanError(f"party {self.client or self.name!r}: {e}", entry=f"parties.{self.name}.data.options",
                                hint="standardize is for tables, normalize for images") from None
        if self.preprocess is not None:
            try:
                table = self.preprocess.apply(table)
            except DataError as e:
                raise PlanError(f"party {self.client or self.name!r}: {e}", entry=f"parties.{self.name}.data",
                                hint="predict with data of the same columns and shapes as the training data") from None
        self.inputs = party_inputs(self.plan, self.name, table, set(self.skip))
        self._scale_targets()

    def _scale_targets(self) -> None:
        """Fit (on the training rows) and apply the scales of the targets it standardises."""
        if not self.fixed_preprocess and self.scaled:
            fitted = {}
            for local in self.scaled:
                try:
                    fitted[local] = fit_target_scale(self.inputs[f"{self.name}.{local}"][self.splits.train].numpy())
                except DataError as e:
                    raise PlanError(f"party {self.client or self.name!r}: {e}", entry=f"parties.{self.name}.data",
                                    hint="give every training row a finite target value") from None
            self.preprocess = (self.preprocess or Preprocess()).with_targets(fitted)
        for local, scale in (self.preprocess.targets if self.preprocess is not None else {}).items():
            node = f"{self.name}.{local}"
            if node in self.inputs:  # (prediction reads no targets)
                self.inputs[node] = torch.from_numpy(scale.apply(self.inputs[node].numpy()))

    def scale_of(self, loss: str) -> TargetScale | None:
        """The scale of loss ``loss``'s target when its holder standardised it (this party's own, or told in
        a hello); its predictions and targets are multiplied back by it before any metric."""
        owner, _, local = self.plan.losses[loss].target.partition(".")
        if owner == self.name and self.preprocess is not None:
            return self.preprocess.targets.get(local)
        return self.learnt.get(loss)

    def scale_hello(self, peer: str) -> dict[str, dict[str, float]] | None:
        """What this party tells ``peer`` in the hello that carries its rows: the scale of each target it
        standardised whose loss ``peer`` computes (the party that receives those targets; no other)."""
        if self.table is None or self.preprocess is None:
            return None
        mine = self.preprocess.targets
        out = {}
        for name, loss in self.plan.losses.items():
            owner, _, local = loss.target.partition(".")
            if owner == self.name and local in mine and self.graph.nodes[name].party == peer:
                out[name] = mine[local].describe()
        return out or None

    def learn_scales(self, sender: str, told: object) -> None:
        """Keep the target scales ``sender``'s hello tells (:meth:`scale_hello`); a DataError unless each names
        a loss this party computes whose target ``sender`` holds, with a finite mean and a std above 0."""
        if not isinstance(told, dict):
            raise DataError(f"target_scale must map losses to scales, got {str(told)[:200]}")
        learnt = {}
        for name, value in told.items():
            loss = self.plan.losses.get(name) if isinstance(name, str) else None
            if loss is None or self.graph.nodes[name].party != self.name \
                    or loss.target.partition(".")[0] != sender:
                raise DataError(f"target_scale names {str(name)[:100]!r}, which is no loss of {self.name!r} "
                                f"whose target {sender!r} holds")
            learnt[name] = TargetScale.read(value)
        self.learnt.update(learnt)

    @property
    def own_ids(self) -> np.ndarray:
        """The ids of every row this party read, aligned or not (what a private alignment starts from)."""
        assert self.table is not None
        return (self.unaligned if self.unaligned is not None else self.table).ids

    def restrict(self, ids: np.ndarray) -> None:
        """Keep only the rows of ``ids`` (private alignment): splits, preprocessing and inputs again, from the
        rows as read (a session begun again aligns them again, not the rows an earlier alignment kept)."""
        assert self.table is not None
        if self.unaligned is None:
            self.unaligned = self.table
        self.alignment = {"held": len(self.unaligned), "aligned": len(ids)}
        self.derive(self.unaligned.align(np.sort(ids)))

    def count(self, train: int, test: int) -> None:
        """A party without data: how many rows the others hold (from their hellos). Splits already
        known with these counts (in one process: the data holders' own) are kept."""
        if self.rows != (train, test):  # (rows to predict carve out no validation rows, as the holders' do not)
            self.splits = counted_splits(train, test, None if self.predicting else self.plan.data.validation_fraction)

    def schema(self) -> dict[str, dict]:
        """What the party's rows look like, without any row: per field its dtype, shape per row,
        column names and (labels) class names."""
        if self.table is None:
            return {}
        out = {}
        for local, ref in self.plan.parties[self.name].holds.items():
            arr = self.table.fields.get(ref.field)
            if arr is None:
                continue
            if ref.columns is not None and arr.ndim == 2:
                arr = arr[:, ref.columns[0]:ref.columns[1]]
            entry = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:])}
            cols = self.table.columns.get(ref.field)
            if cols is not None:
                cols = cols[ref.columns[0]:ref.columns[1]] if ref.columns and arr.ndim == 2 else cols
                entry["columns" if arr.ndim == 2 else "classes"] = [str(c) for c in cols]
            scale = self.preprocess.targets.get(local) if self.preprocess is not None else None
            if scale is not None:  # the model learnt (y - mean) / std; predictions and metrics are in y's units
                entry["standardized"] = scale.describe()
            out[local] = entry
        return out


def setup_party(plan: Plan, name: str, cache: dict | None = None, data: DataSpec | None = None,
                predict: bool = False, optimizer: bool | str = True, client: str | None = None,
                preprocess: Preprocess | None = None, every_row: bool = False) -> PartySetup:
    """Build a party's segments, optimizer (unless not ``optimizer``; ``"probe"``: one to be checked only,
    :func:`make_optimizer`) and inputs (without labels
    when ``predict``); ``client``: the client it is (for a per-client file); ``preprocess``: use
    this one (predict) instead of fitting one on the training rows; ``every_row``: every row is a test row
    (new rows to predict)."""
    graph = build_graph(plan)
    segs = [n for n in graph.local_order(name) if graph.nodes[n].kind == "segment"]
    modules = build_modules(plan, name, segs)
    spec = data_spec(plan, name, client, data)
    setup = PartySetup(plan, graph, name, modules, make_optimizer(plan, name, modules, optimizer == "probe") if optimizer else None, {},
                       None, preprocess=preprocess, fixed_preprocess=preprocess is not None,
                       skip=frozenset(graph.label_inputs() if predict else ()), predicting=predict, every_row=every_row,
                       options=dict(spec.options) if spec is not None else {}, client=client,
                       scaled=scaled_targets(plan, name, spec, given=data is not None))
    if spec is not None:
        setup.derive(party_table(plan, name, cache, data, client))
    return setup


def label_notes(setups: dict[str, PartySetup]) -> list[str]:
    """One line per loss target read as text labels: the mapping from label to class index (recorded in each
    party's data schema in ``result.json``), and whether the plan chose it or it is the sorted values."""
    notes = []
    for s in setups.values():
        if s.table is None:
            continue
        targets = target_kinds(s.plan, s.name)
        for local, ref in s.plan.parties[s.name].holds.items():
            names = s.table.columns.get(ref.field) if ref.field in targets else None
            if not names or s.table.fields[ref.field].ndim != 1:
                continue
            chosen = "classes" in s.options
            mapping = ", ".join(f"{n!r} -> {i}" for i, n in enumerate(names))
            positive = f"; {names[1]!r} is the positive class (sensitivity, specificity)" if len(names) == 2 else ""
            notes.append(f"labels of {s.client or s.name}.{local}: {mapping}"
                         + ("" if chosen else " (their sorted values; set options.classes to choose the order)")
                         + positive)
    return notes


def _first_missing(a: PartySetup, b: PartySetup) -> str:
    missing = np.setdiff1d(a.splits.ids, b.splits.ids)
    return f"{len(missing)} of {a.name!r}'s ids are missing at {b.name!r} (first: {missing[:5].tolist()})"


def check_plan(setups: dict[str, PartySetup]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checks that need every party's data: aligned ids and a dry run. Returns the wire shapes."""
    holders = [s for s in setups.values() if s.table is not None]
    if not holders:
        raise PlanError("no party holds any data", entry="parties", hint="give a party `holds = { x = \"x\" }`")
    first = holders[0]
    plan = first.plan
    if plan.data.align == "psi":  # the chain of holders must be able to reach each other and their result
        from .align import check_arrangement

        check_arrangement(first.graph)
    if plan.data.align == "exact":
        for s in holders:
            if not np.array_equal(s.splits.ids, first.splits.ids):
                problem = _first_missing(first, s) if len(np.setdiff1d(first.splits.ids, s.splits.ids)) \
                    else _first_missing(s, first)
                raise PlanError(f"parties {first.name!r} and {s.name!r} hold different ids: {problem}",
                                entry=data_entry(plan, s.name, False),
                                hint='every party must hold the same sample ids; or set [data] align = "psi" '
                                     "to keep only the ids every party holds")
    for s in setups.values():
        if s.table is None:  # only counts, as over a network (where they come in the hello): its step rows
            s.splits = counted_splits(*first.splits.counts, None if first.predicting else plan.data.validation_fraction)
    inputs = {k: v for s in setups.values() for k, v in s.inputs.items()}
    graph = first.graph
    check_defense_data(graph, inputs)  # what each wire's defenses need of the data (binary labels, classes)
    lost = unlinked(graph) if plan.data.validation_fraction is not None else []
    if lost:
        raise PlanError(f"no wire links {lost} to {graph.nodes[watched_loss(plan)].party!r}, whose validation figure "
                        "decides the best epoch: they could never learn it", entry="data.validation_fraction",
                        hint="link every party to the network whose loss is watched, or train the networks apart")
    sample = {k: v[:1] for k, v in inputs.items()}
    for k, x in sample.items():  # an augmented field holds images every step can take: said before any party starts
        party, fld = k.split(".", 1)
        if plan.parties[party].augment.get(fld):
            check_images(plan.parties[party].augment[fld], x, f"parties.{party}.augment.{fld}")
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
            data: DataSpec | dict[str, DataSpec] | None = None,
            check_only: bool = False, probe: bool = False) -> tuple[Plan, dict[str, PartySetup], dict]:
    """Load the plan, set every party up and check the plan end to end before any training
    (``check_only``: no optimizers, for a look at the plan; ``probe``: optimizers made to be checked only,
    for a launcher whose parties make their own). ``data``: one source for every party, or one per party name."""
    plan = load_plan(plan).with_train(epochs=epochs, seed=seed)
    cache: dict = {}
    per = data if isinstance(data, dict) else {p: data for p in plan.parties}
    try:
        setups = {p: setup_party(plan, p, cache, per.get(p), optimizer=False if check_only else ("probe" if probe else True),
                             client=plan.reads_for(p))
                  for p in plan.parties}
        shapes = check_plan(setups)
    except PlanError as e:  # name the plan file, whatever part of the set-up found the problem
        raise e.in_file(e.file or plan._source) from None
    return plan, setups, shapes
