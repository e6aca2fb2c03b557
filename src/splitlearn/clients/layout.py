"""Who takes part in a run and who connects to whom, for every plan.

The *physical parties* of a plan are the processes (or threads) that run it: its parties, or
with ``[clients]`` its fixed parties, a federation of its own and every client. A plain plan is
the trivial case: one fixed set of parties and no coordinator. :func:`physical_party` gives each
one what it runs over a transport; both launchers (:mod:`~splitlearn.launch.threads`,
:mod:`~splitlearn.launch.processes`) use it and nothing else.

Who dials whom (:func:`dialer`): for each pair of neighbours, a party marked ``dial_out``
dials the other; otherwise a party that holds raw data (a hospital, behind its firewall) dials
the one that holds none (the server, a relay), which listens; between two parties alike, the
one earlier in the plan (nearer the data) dials. Clients dial.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from ..core.engine import Party
from ..core.graph import build_graph
from ..core.plan import DataSpec, Plan, PlanError, per_client
from ..wire.link import Link
from ..wire.messages import Limits
from ..wire.transport.base import Transport
from ..run.observe import Recorder
from ..run.session import PartyReport, Progress, run_party
from ..run.setup import PartySetup, Step, build_modules, holds_data, make_optimizer, party_file, schedule, setup_party
from .strategies import strategy_of

__all__ = ["Topology", "physical_party", "physical_setups", "plain_connections", "with_dial_out", "dialer",
           "holds_raw_data", "federation_of", "coordinator_of", "roles", "plays_of", "client_of", "clients_playing",
           "own_data", "shared_in_process", "connections", "per_client", "describe_schedule", "schedule_line"]


def holds_raw_data(plan: Plan, party: str) -> bool:
    """Whether ``party`` holds a field that a segment takes as input (features, not only labels)."""
    fed = {i for s in plan.segments.values() for i in s.inputs}
    return any(f"{party}.{local}" in fed for local in plan.parties[party].holds)


def dialer(plan: Plan, a: str, b: str) -> str:
    """Which of two neighbouring parties (``a`` earlier in the plan) dials the other (see the module).
    A role that is no party of the plan (a ``[clients]`` federation of its own) listens."""
    if a not in plan.parties or b not in plan.parties:
        return b if a not in plan.parties else a
    da, db = plan.parties[a].dial_out, plan.parties[b].dial_out
    if da and db:
        raise PlanError(f"parties {a!r} and {b!r} exchange messages but both only dial out",
                        entry=f"parties.{b}.dial_out", hint="one of each pair of neighbours must listen")
    if da or db:
        return a if da else b
    ra, rb = holds_raw_data(plan, a), holds_raw_data(plan, b)
    return b if rb and not ra else a


def plain_connections(plan: Plan) -> list[tuple[str, str]]:
    """(dialer, listener) for every pair of a plan's parties that exchange messages."""
    graph = build_graph(plan)
    names = list(plan.parties)
    out = []
    for a in names:
        for b in graph.neighbours(a):
            if names.index(b) <= names.index(a):
                continue  # each pair once, a before b
            d = dialer(plan, a, b)
            out.append((d, b if d == a else a))
    return out


def federation_of(plan: Plan) -> str:
    """The party or role that averages client weights."""
    spec = plan.clients
    if spec.federation:
        return spec.federation
    fixed = [p for p in plan.parties if p != spec.template]
    return fixed[0] if fixed else "federation"


def coordinator_of(plan: Plan) -> str:
    spec = plan.clients
    fed = federation_of(plan)
    fixed = [p for p in plan.parties if p != spec.template]
    return fed if fed in plan.parties or not fixed else fixed[0]


def roles(plan: Plan) -> list[str]:
    """Every physical party of the plan: fixed parties, a separate federation, then the clients."""
    spec = plan.clients
    fixed = [p for p in plan.parties if p != spec.template]
    fed = federation_of(plan)
    return fixed + ([fed] if fed not in fixed else []) + spec.names()


def plays_of(plan: Plan, name: str) -> str | None:
    """The plan party a physical party plays: the template for a client, itself for a fixed
    party (every party of a plain plan), none for a federation of its own."""
    return plan.clients.template if client_of(plan, name) is not None else (name if name in plan.parties else None)


def client_of(plan: Plan, name: str) -> str | None:
    """``name`` if physical party ``name`` is a client of the plan's ``[clients]`` (it reads a client's rows),
    None for a fixed party, a federation and every party of a plain plan."""
    return name if plan.clients is not None and name in plan.clients.names() else None


def clients_playing(plan: Plan, party: str) -> list[str]:
    """The clients that play plan party ``party`` (the ``[clients]`` template's); [] for any other party."""
    return plan.clients.names() if plan.clients is not None and party == plan.clients.template else []


def own_data(plan: Plan, name: str, data: str | Path) -> DataSpec:
    """Where physical party ``name`` reads its rows when started on its own file ``data`` (``--data``).
    PlanError where it takes none: it holds no data, or it is a client of a plan whose clients share one
    dataset (only a template whose path names ``{client}`` lets each client bring its own)."""
    plays = plays_of(plan, name)
    if plays is None or not holds_data(plan, plays):
        raise PlanError(f"party {name!r} holds no data, so it takes no --data", entry="--data",
                        hint="give --data to the parties that hold rows")
    if client_of(plan, name) is not None and not per_client(plan):
        raise PlanError("this plan shares one dataset among its clients, so a client cannot bring its own file",
                        entry=f"parties.{plays}.data", hint='give the template\'s data a path with {client} (e.g. '
                        'path = "data/{client}.csv") to let each client read its own')
    return party_file(plan, plays, data)


def connections(plan: Plan) -> list[tuple[str, str]]:
    """(dialer, listener) pairs of a horizontal plan: clients dial the fixed parties and the
    federation; the strategy may link clients too (sequential peer hand-off: a ring)."""
    spec = plan.clients
    fixed = [p for p in roles(plan) if p not in spec.names()]
    graph = build_graph(plan)
    out = []
    for i, a in enumerate(fixed):  # fixed parties among themselves, as in a plan without clients
        for b in fixed[i + 1:]:
            if b in graph.neighbours(a) or coordinator_of(plan) in (a, b):
                d = dialer(plan, a, b)
                out.append((d, b if d == a else a))
    for c in spec.names():
        out += [(c, f) for f in fixed]
    return out + strategy_of(spec).peer_links(plan)


def with_dial_out(plan: Plan, names: list[str]) -> Plan:
    """The plan with these parties marked ``dial_out`` (give every party the same list). A ``[clients]`` plan
    refuses it: its clients always dial the fixed parties."""
    if names and plan.clients is not None:
        raise PlanError("--dial-out does not apply to a plan with [clients]: clients always dial the server",
                        entry="clients", hint='use handoff = "server" if clients cannot listen for each other')
    unknown = set(names) - set(plan.parties)
    if unknown:
        raise PlanError(f"--dial-out names unknown parties {sorted(unknown)}", hint=f"parties are {sorted(plan.parties)}")
    return plan.replace(parties={n: (p.model_copy(update={"dial_out": True}) if n in names else p)
                                 for n, p in plan.parties.items()})


@dataclass(frozen=True)
class Topology:
    """The physical parties of a plan and their connections."""

    names: list[str]  # in start order
    pairs: list[tuple[str, str]]  # (dialer, listener)
    coordinator: str | None  # walks a [clients] schedule; None for a plain plan
    lead: str  # whose progress a launcher shows
    droppable: frozenset[str]  # parties whose failure is data (clients), not the end of the run
    # once the coordinator ended, the seconds the others get to end on their own (they read "stop" within an answer's
    # time, clients.timeout) before a launcher closes the transport under them; 0 without a coordinator
    grace_s: float = 0.0

    @classmethod
    def of(cls, plan: Plan) -> "Topology":
        if plan.clients is None:
            lead = next(n.party for n in build_graph(plan).losses())
            return cls(list(plan.parties), plain_connections(plan), None, lead, frozenset())
        coord = coordinator_of(plan)
        return cls(roles(plan), connections(plan), coord, coord, frozenset(plan.clients.names()), plan.clients.timeout)

    def plays(self, plan: Plan, name: str) -> str | None:
        """The plan party physical party ``name`` plays (None: a federation of its own)."""
        return plays_of(plan, name)

    def dials(self, name: str) -> list[str]:
        return [lst for d, lst in self.pairs if d == name]

    def accepts(self, name: str) -> list[str]:
        return [d for d, lst in self.pairs if lst == name]


class _PlainParty:
    """A party of a plan without ``[clients]``: its session over the plan's schedule."""

    def __init__(self, setup: PartySetup, transport: Transport, *, shapes: dict | None, timeout: float | None,
                 record: bool, limits: Limits | None, steps: list[Step] | None = None, predicting: bool = False,
                 tracking: Any = None, out: Path | None = None, resume: bool = False):
        self.setup, self.steps, self.tracking, self.resume = setup, steps, tracking, resume
        self.checkpoints = None  # a run with an --out folder takes checkpoints there (never predictions)
        if out is not None and steps is None:
            from ..run.checkpoint import Checkpoints

            from ..core.flow import flow_pairs

            # a party that hears nothing while training (it sends labels only) runs ahead by up to flow
            # control's window: it keeps the checkpoints its neighbours may still hold as their last
            g, me = setup.graph, setup.name
            free = not any(w.dst_party == me or (w.src_party == me and w.carries == "activation") for w in g.wires)
            ahead = [p.window for p in flow_pairs(g, limits or Limits()) if p.producer == me and free]
            self.checkpoints = Checkpoints(Path(out) / "parties" / setup.name / "checkpoints",
                                           setup.plan.train.checkpoint_every, lag=max(ahead, default=0))
        self.party = Party(setup.graph, setup.name, Link(transport, limits=limits), setup.modules, setup.optimizer,
                           setup.inputs, dict(shapes or {}), timeout, predicting)
        if record:
            self.party.observer = Recorder(setup.splits.ids if setup.table is not None else None)

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        s = self.setup
        tracker = None
        if self.tracking is not None and any(n.party == s.name for n in s.graph.losses()):
            from ..run.tracking import open_tracker

            tracker = open_tracker(self.tracking, s.plan, s.name)

        def steps() -> list[Step]:  # once the hello has told how many rows there are
            if self.party.observer is not None:  # the ids after any private alignment; a party without data
                self.party.observer.ids = s.splits.ids if s.table is not None else None  # records positions
            return self.steps if self.steps is not None else list(schedule(s.plan, s.splits))

        try:
            report = run_party(self.party, steps, progress, ids_hash=s.ids_hash, tracker=tracker, setup=s,
                               checkpoints=self.checkpoints, resume=self.resume)
        finally:
            if tracker is not None:
                tracker.close()
        report.data = s.data_report()
        report.preprocess = s.preprocess
        return report


def physical_setups(plan: Plan, topo: Topology, prepared: dict[str, PartySetup],
                    data: dict | None = None) -> dict[str, PartySetup | None]:
    """What each physical party holds, from the plan parties' setups (:func:`~splitlearn.run.setup.prepare`):
    every client gets fresh segments of its own (the same initial weights) over the template's data,
    or over its own file (a per-client path; ``data``: files given per client)."""
    out: dict[str, PartySetup | None] = {}
    for n in topo.names:
        plays = topo.plays(plan, n)
        if plays is None:
            out[n] = None
        elif plan.clients is not None and n in topo.droppable:
            t = prepared[plays]
            if t.client is not None:  # each client reads its own file
                out[n] = setup_party(plan, plays, client=n, data=data.get(n) if data else None)
                continue
            mods = build_modules(plan, plays, list(t.modules))
            out[n] = dataclasses.replace(t, modules=mods, optimizer=make_optimizer(plan, plays, mods))
        else:
            out[n] = prepared[plays]
    return out


def shared_in_process(plan: Plan, setups: dict[str, PartySetup]) -> dict[str, Any]:
    """What every physical party of a run in one process is given alike (more arguments of
    :func:`physical_party`): the :class:`~splitlearn.clients.context.Context` of a ``[clients]`` plan whose
    clients share one dataset, derived once from the template's setup; nothing otherwise."""
    if plan.clients is None or per_client(plan):
        return {}
    from .context import Context

    return {"context": Context.from_setup(plan, setups[plan.clients.template])}


def physical_party(plan: Plan, name: str, setup: PartySetup | None, transport: Transport, *,
                   shapes: dict | None = None, timeout: float | None = None, record: bool = False,
                   limits: Limits | None = None, steps: list[Step] | None = None, predicting: bool = False,
                   tracking: Any = None, out: Path | None = None, resume: bool = False, **role: Any):
    """What physical party ``name`` runs over ``transport``; ``.run(progress)`` gives its report.

    ``timeout`` bounds each step (default: the plan's, :meth:`~splitlearn.core.plan.Plan.step_timeout_s`;
    a client's: each step of its turns; ``clients.timeout`` bounds the schedule's answers);
    ``record`` keeps what it receives for the audit; ``steps`` replace the plan's schedule
    (prediction: ``predicting`` then); ``role``: more for a role of a ``[clients]`` plan (its
    shared ``context``; ``fault``, a test hook; ``rejoin_wait_s``, the seconds the coordinator
    waits for a failed party to come back as a new process), which a plain plan's parties,
    resuming through their sessions, do without; ``out``: the run folder, where checkpoints are
    taken; ``resume``: go on from the last checkpoint every party holds."""
    if plan.clients is None:
        setup = setup or setup_party(plan, name)
        return _PlainParty(setup, transport, shapes=shapes, timeout=plan.step_timeout_s(timeout),
                           record=record, limits=limits, steps=steps, predicting=predicting, tracking=tracking,
                           out=out, resume=resume)
    if steps is not None:
        raise PlanError("a plan with [clients] runs its own schedule", entry="clients")
    from .roles import make_role

    return make_role(plan, name, transport, setup, step_timeout=timeout, record=record, limits=limits,
                     tracking=tracking, out=out, resume=resume, **role)


def schedule_line(plan: Plan) -> str:
    """The clients and how they train, in one line for the plan's picture ("" for a plain plan)."""
    c = plan.clients
    if c is None:
        return ""
    text = f"{c.count} clients {c.template}-1 … {c.template}-{c.count} ({c.partition.kind}), schedule {c.schedule}"
    return f"{text}: {strategy_of(c).summary(plan)}"


def describe_schedule(plan: Plan) -> str | None:
    """One line on a ``[clients]`` plan's clients, schedule and roles (None for a plain plan)."""
    c = plan.clients
    if c is None:
        return None
    return (f"clients: {c.count} x {c.template!r} ({c.template}-1 ... {c.template}-{c.count}), schedule {c.schedule}"
            + (f", hand-off {c.handoff}" if c.schedule == "sequential" else f", federation {federation_of(plan)}")
            + f", partition {c.partition.kind}; coordinator {coordinator_of(plan)}; "
            f"a client silent for {c.timeout:g} s is skipped")
