"""Who takes part in a run and who connects to whom, for every plan.

The *physical parties* of a plan are the processes (or threads) that run it: its parties, or
with ``[clients]`` its fixed parties, a federation of its own and every client. A plain plan is
the trivial case: one fixed set of parties and no coordinator (:class:`Topology`; who plays what:
:mod:`splitlearn.clients.roles`). :func:`~splitlearn.clients.parties.physical_party` gives each
one what it runs over a transport.

Who dials whom (:func:`dialer`): for each pair of neighbours, a party marked ``dial_out``
dials the other; otherwise a party that holds raw data (a hospital, behind its firewall) dials
the one that holds none (the server, a relay), which listens; between two parties alike, the
one earlier in the plan (nearer the data) dials. Clients dial.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from ..core.graph import build_graph
from ..core.plan import Plan, per_client
from ..core.specs import DataSpec, PlanError
from ..run.rows import holds_data, party_file
from ..run.setup import PartySetup, build_modules, make_optimizer, setup_party
from .context import Context
from .roles import client_names, client_of, coordinator_of, federation_of, physical_names, plays_of
from .strategies import strategy_of

__all__ = ["Topology", "physical_setups", "with_dial_out", "dialer", "holds_raw_data",
           "clients_playing", "own_data", "shared_in_process", "connections", "describe_schedule", "schedule_line"]


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
    """(dialer, listener) for every pair of physical parties that exchange messages: fixed parties
    that are neighbours in the graph (a plain plan: every pair of its parties that do), and the
    coordinator with every fixed party; clients dial the fixed parties and the federation; the
    strategy may link clients too (sequential peer hand-off: a ring)."""
    clients = client_names(plan)
    fixed = [p for p in physical_names(plan) if p not in clients]
    graph, coordinator = build_graph(plan), coordinator_of(plan)
    out = []
    for i, a in enumerate(fixed):
        for b in fixed[i + 1:]:
            if b in graph.neighbours(a) or coordinator in (a, b):
                d = dialer(plan, a, b)
                out.append((d, b if d == a else a))
    for c in clients:
        out += [(c, f) for f in fixed]
    return out + strategy_of(plan).peer_links(plan)


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
    coordinator: str | None  # walks a coordinated schedule; None for a plain plan's trivial one
    lead: str  # whose progress a launcher shows
    droppable: frozenset[str]  # parties whose failure is data (clients), not the end of the run
    # once the coordinator ended, the seconds the others get to end on their own (they read "stop" within an answer's
    # time, clients.timeout) before a launcher closes the transport under them; 0 without a coordinator
    grace_s: float = 0.0

    @classmethod
    def of(cls, plan: Plan) -> "Topology":
        """The one layout of every plan (its roles: :mod:`splitlearn.clients.roles`); the lead is
        the coordinator, or without one the party of the plan's first loss."""
        coord = coordinator_of(plan)
        lead = coord or next(n.party for n in build_graph(plan).losses())
        grace = plan.clients.timeout if coord is not None else 0.0
        return cls(physical_names(plan), connections(plan), coord, lead, frozenset(client_names(plan)), grace)

    @property
    def awaited(self) -> list[str]:
        """The parties whose end is the run's: the coordinator, or without one every party."""
        return [self.coordinator] if self.coordinator is not None else list(self.names)

    def plays(self, plan: Plan, name: str) -> str | None:
        """The plan party physical party ``name`` plays (None: a federation of its own)."""
        return plays_of(plan, name)

    def dials(self, name: str) -> list[str]:
        return [lst for d, lst in self.pairs if d == name]

    def accepts(self, name: str) -> list[str]:
        return [d for d, lst in self.pairs if lst == name]


def physical_setups(plan: Plan, topo: Topology, prepared: dict[str, PartySetup],
                    data: dict | None = None) -> dict[str, PartySetup | None]:
    """What each physical party holds, from the plan parties' setups (:func:`~splitlearn.run.setup.prepare`):
    every client gets fresh segments of its own (the same initial weights) over the template's data,
    or over its own file (a per-client path; ``data``: files given per client)."""
    out: dict[str, PartySetup | None] = {}
    fresh: dict[str, dict] = {}  # the party played -> the first client's fresh segments, copied for the others
    for n in topo.names:
        plays = topo.plays(plan, n)
        if plays is None:
            out[n] = None
        elif plan.clients is not None and n in topo.droppable:
            t = prepared[plays]
            if t.client is not None:  # each client reads its own file
                out[n] = setup_party(plan, plays, client=n, data=data.get(n) if data else None)
                continue
            mods = _fresh_copy(fresh, plays) if plays in fresh else fresh.setdefault(
                plays, build_modules(plan, plays, list(t.modules)))
            if mods is None:  # a module deepcopy cannot copy (weight_norm's computed weights): built again
                mods = build_modules(plan, plays, list(t.modules))
            out[n] = dataclasses.replace(t, modules=mods, optimizer=make_optimizer(plan, plays, mods))
        else:
            out[n] = prepared[plays]
    return out


def _fresh_copy(fresh: dict[str, dict], plays: str) -> dict | None:
    """A copy of the first client's fresh segments (built once, seeded: the same weights every build; a build per
    client cost 2-4 ms), or None where a module cannot be deep-copied."""
    try:
        return copy.deepcopy(fresh[plays])
    except (RuntimeError, TypeError):
        return None


def shared_in_process(plan: Plan, setups: dict[str, PartySetup]) -> dict[str, Any]:
    """What every physical party of a run in one process is given alike (more arguments of
    :func:`~splitlearn.clients.parties.physical_party`): the :class:`~splitlearn.clients.context.Context` of a ``[clients]`` plan whose
    clients share one dataset, derived once from the template's setup; nothing otherwise."""
    if plan.clients is None or per_client(plan):
        return {}
    return {"context": Context.from_setup(plan, setups[plan.clients.template])}


def schedule_line(plan: Plan) -> str:
    """The clients and how they train, in one line for the plan's picture ("" for a plain plan)."""
    c = plan.clients
    if c is None:
        return ""
    text = f"{c.count} clients {c.template}-1 … {c.template}-{c.count} ({c.partition.kind}), schedule {c.schedule}"
    return f"{text}: {strategy_of(plan).summary(plan)}"


def describe_schedule(plan: Plan) -> str | None:
    """One line on a ``[clients]`` plan's clients, schedule and roles (None for a plain plan)."""
    c = plan.clients
    if c is None:
        return None
    return (f"clients: {c.count} x {c.template!r} ({c.template}-1 ... {c.template}-{c.count}), schedule {c.schedule}"
            + (f", hand-off {c.handoff}" if c.schedule == "sequential" else f", federation {federation_of(plan)}")
            + f", partition {c.partition.kind}; coordinator {coordinator_of(plan)}; "
            f"a client that does not answer within {c.timeout:g} s is skipped; a step may take "
            f"{plan.step_timeout_s():g} s")
