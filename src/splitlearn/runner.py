"""Setting a party up and running it through a plan's schedule; the in-process simulation.

Everything a party needs is derived from the plan and its own data: the same schedule
(batches from the plan seed), the same initial weights (networks seeded by name), the same
wire shapes (a dry run on one sample). :func:`run_party` is what a party process runs;
:func:`run_parties` runs every party in a thread of this process over the in-process transport.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .data import DataError, Table, batches, load_table, train_test_split_ids
from .engine import Mode, Party, PartyError, StepOutput, correct, dry_run
from .graph import Graph, build_graph
from .link import Link
from .codec import WireError
from .messages import PROTOCOL_VERSION, Kind, Message, parse_json, quote
from .models import build_segment
from .plan import DataSpec, Plan, PlanError, load_plan, plan_dir, plan_hash
from .transport import InProcessHub, TransportClosed, TransportError, TransportTimeout

__all__ = ["Step", "schedule", "PartySetup", "setup_party", "prepare", "session", "run_party", "run_parties",
           "RunError"]

class RunError(RuntimeError):
    """A run failed; ``errors`` maps each failed party to its error."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"party {p!r} failed: {e}" for p, e in errors.items()))


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
                predict: bool = False) -> PartySetup:
    """Build a party's segments, optimizer and inputs (without labels when ``predict``)."""
    graph = build_graph(plan)
    table = party_table(plan, name, cache, data)
    table = table.align(np.sort(table.ids))
    segs = [n for n in graph.local_order(name) if graph.nodes[n].kind == "segment"]
    modules = {s: build_segment(plan, s) for s in segs}
    return PartySetup(plan, graph, name, modules, make_optimizer(plan, name, modules),
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
    for w in graph.wires:
        lp = w.spec.label_protection
        if lp is not None and lp.kind == "marvell":
            losses = [n for n in graph.order if graph.nodes[n].kind == "loss" and graph.nodes[n].party == w.dst_party]
            targets = [inputs[graph.nodes[n].inputs[1]] for n in losses if graph.nodes[n].inputs[1] in inputs]
            if any(len(torch.unique(t)) > 2 for t in targets):
                raise PlanError(f"marvell label protection on {w.src!r} needs binary labels", entry=f"wires.{w.src}",
                                hint='use label_protection = { kind = "max_norm" } for more than two classes')
        if w.spec.randomized_response is not None and inputs.get(w.src) is not None \
                and inputs[w.src].is_floating_point():
            raise PlanError(f"randomized_response on {w.src!r} needs class labels, and {w.src!r} holds numbers",
                            entry=f"wires.{w.src}", hint="use it on the labels of a classification loss")
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


@dataclass
class PartyReport:
    name: str
    metrics: dict[str, dict] = field(default_factory=dict)  # loss name -> per-epoch history
    meter: dict = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    privacy: dict[str, dict] = field(default_factory=dict)  # wire -> epsilon spent by its noise


@dataclass
class _Epoch:
    train_sum: float = 0.0
    train_n: int = 0
    test_sum: float = 0.0
    test_n: int = 0
    right: int = 0


def _hello_text(party: Party, ids_hash: str) -> dict:
    return {"protocol": PROTOCOL_VERSION, "plan_hash": plan_hash(party.graph.plan), "ids_hash": ids_hash}


@contextmanager
def session(party: Party, ids_hash: str = "") -> Iterator[None]:
    """Hello (protocol, plan and ids must match), a handshake step fixing wire shapes, then the
    caller's steps, then goodbye. A failure is sent to the neighbours before it is raised."""
    link, me = party.link, party.name
    neighbours = party.graph.neighbours(me)

    def deadline() -> float | None:  # the hello, like the goodbye, has one deadline however much arrives
        return None if party.timeout is None else time.monotonic() + party.timeout

    try:
        ours = _hello_text(party, ids_hash)
        for p in neighbours:
            link.send(Message(Kind.HELLO, me, p, text=json.dumps(ours)))
        heard: set[str] = set()
        until = deadline()
        while heard != set(neighbours):
            msg = _recv(link, until, f"{me}: no hello from {sorted(set(neighbours) - heard)} within {party.timeout} s")
            party.raise_if_stopped(msg)
            if msg.kind == Kind.HELLO and msg.sender in neighbours:
                try:
                    theirs = parse_json(msg.text, link.limits)
                except WireError as e:
                    theirs = e
                if not isinstance(theirs, dict):
                    link.refuse(msg.sender, f"its hello is not a JSON object ({theirs})" if isinstance(theirs, WireError)
                                else "its hello is not a JSON object")
                    continue
                for key, value in ours.items():
                    if theirs.get(key) != value:
                        raise PartyError(f"{me}: {key} differs from {quote(msg.sender)}'s: ours is {value!r}, "
                                         f"theirs is {quote(theirs.get(key))}" + (
                                             " (both must run the same plan file with the same --epochs/--seed)"
                                             if key == "plan_hash" else ""))
                heard.add(msg.sender)
            else:
                party.keep_early(msg, -2)  # before the handshake (step -1)
        party.step(-1, None, "handshake")
        yield
        for p in neighbours:
            link.send(Message(Kind.STOP, me, p, text="done"))
        until = deadline()
        while not set(neighbours) <= party.finished:
            msg = _recv(link, until, f"{me}: no goodbye from {sorted(set(neighbours) - party.finished)} "
                        f"within {party.timeout} s")
            party.raise_if_stopped(msg)
            if msg.kind == Kind.STOP:
                party.finished.add(msg.sender)
    except (PartyError, PlanError, TransportError) as e:
        for p in neighbours:
            try:
                link.send(Message(Kind.ERROR, me, p, text=f"{me} failed: {e}"))
            except Exception:  # noqa: BLE001 - the neighbour may be gone already
                pass
        raise


def _recv(link: Link, deadline: float | None, why: str) -> Message:
    try:
        return link.recv(deadline=deadline)
    except TransportTimeout:
        raise PartyError(why) from None


class _Metrics:
    """Per-epoch history of the losses a party computes."""

    def __init__(self, party: Party):
        plan = party.graph.plan
        self.kinds = {n.name: plan.losses[n.name].kind for n in party.graph.losses() if n.party == party.name}
        self.hist = {k: {"train_loss": [], "test_loss": [], "test_accuracy": []} for k in self.kinds}
        self.acc = {k: _Epoch() for k in self.kinds}

    def add(self, step: Step, out: StepOutput) -> None:
        n = len(step.rows)
        for k, v in out.losses.items():
            a = self.acc[k]
            if step.mode == "train":
                a.train_sum, a.train_n = a.train_sum + v * n, a.train_n + n
            else:
                a.test_sum, a.test_n = a.test_sum + v * n, a.test_n + n
                if self.kinds[k] in ("cross_entropy", "bce"):
                    a.right += correct(self.kinds[k], out.predictions[k], out.targets[k])

    def close_epoch(self) -> None:
        for k, a in self.acc.items():
            h = self.hist[k]
            if a.train_n:
                h["train_loss"].append(a.train_sum / a.train_n)
            if a.test_n:
                h["test_loss"].append(a.test_sum / a.test_n)
                if self.kinds[k] in ("cross_entropy", "bce"):
                    h["test_accuracy"].append(a.right / a.test_n)
            self.acc[k] = _Epoch()


def run_party(party: Party, steps: Iterator[Step], on_step: Callable[[Step], None] | None = None,
              ids_hash: str = "") -> PartyReport:
    """Run a party through the schedule; collect the metrics of the losses it computes."""
    metrics = _Metrics(party)
    epoch = None
    timing = {"train_s": 0.0, "train_samples": 0, "train_steps": 0, "first_step_s": 0.0, "first_step_samples": 0}
    with session(party, ids_hash):
        for step in steps:
            if epoch is not None and step.epoch != epoch:
                metrics.close_epoch()
            epoch = step.epoch
            t0 = time.perf_counter()
            out = party.step(step.id, step.rows, step.mode)
            if step.mode == "train":
                dt = time.perf_counter() - t0
                if not timing["train_steps"]:  # includes one-off work: FLOP counting, allocator warm-up
                    timing["first_step_s"], timing["first_step_samples"] = dt, len(step.rows)
                timing["train_s"] += dt
                timing["train_samples"] += len(step.rows)
                timing["train_steps"] += 1
            metrics.add(step, out)
            if on_step is not None:
                on_step(step)
    metrics.close_epoch()
    report = PartyReport(party.name, metrics.hist, {**party.meter.summary(), **timing}, list(party.link.refused))
    report.privacy = privacy_spent(party, timing["train_samples"], timing["train_steps"])
    return report


def privacy_spent(party: Party, samples: int, steps: int) -> dict[str, dict]:
    """(epsilon, delta) of the Gaussian noise on each wire this party sends, after ``steps`` steps."""
    out = {}
    epochs = party.graph.plan.train.epochs
    for w in party.wires.values():
        noise = w.spec.noise
        if w.src_party != party.name or noise is None or not steps:
            continue
        from .privacy.noise import PrivacyAccountant

        per_epoch = samples / epochs
        acc = PrivacyAccountant(noise.sigma, min(1.0, party.graph.plan.train.batch_size / per_epoch), noise.delta)
        acc.step(steps)
        out[w.name] = {"epsilon": acc.epsilon(), "delta": noise.delta, "sigma": noise.sigma, "clip": noise.clip,
                       "steps": steps, "accountant": acc.backend}
    return out


# -- in-process simulation -------------------------------------------------------------------

def prepare(plan: Plan | str | Path, *, epochs: int | None = None, seed: int | None = None,
            data: DataSpec | None = None) -> tuple[Plan, dict[str, PartySetup], dict]:
    """Load the plan, set every party up and check the plan end to end before any training."""
    plan = load_plan(plan).with_train(epochs=epochs, seed=seed)
    cache: dict = {}
    setups = {p: setup_party(plan, p, cache, data) for p in plan.parties}
    shapes = check_plan(setups)
    return plan, setups, shapes


def run_parties(setups: dict[str, PartySetup], shapes: dict, on_step: Callable[[Step], None] | None = None,
                timeout: float = 600.0, steps: Callable[[PartySetup], Iterator[Step]] | None = None,
                job: Callable[..., object] | None = None, predicting: bool = False,
                observers: dict[str, Callable] | None = None) -> dict[str, object]:
    """Run every party in a thread of this process over the in-process transport."""
    first = next(iter(setups.values()))
    graph = first.graph
    hub = InProcessHub(list(setups))
    lead = next(n.party for n in graph.losses())
    steps = steps or (lambda s: schedule(s.plan, s.splits))
    reports: dict[str, object] = {}
    errors: dict[str, BaseException] = {}
    parties = {name: Party(graph, name, Link(hub.transport(name)), s.modules, s.optimizer, s.inputs, dict(shapes),
                           timeout, predicting) for name, s in setups.items()}
    job = job or run_party
    for name, obs in (observers or {}).items():
        parties[name].observer = obs

    def work(name: str) -> None:
        try:
            reports[name] = job(parties[name], steps(setups[name]), on_step if name == lead else None,
                                ids_hash=setups[name].ids_hash)
        except BaseException as e:  # noqa: BLE001 - reported per party below
            errors[name] = e
            hub.close()

    threads = [threading.Thread(target=work, args=(n,), name=f"party-{n}", daemon=True) for n in setups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        root = {p: e for p, e in errors.items() if not isinstance(e, TransportClosed)} or errors
        raise RunError({p: (str(e) if isinstance(e, (PartyError, PlanError)) else f"{type(e).__name__}: {e}")
                        for p, e in root.items()})
    return reports
