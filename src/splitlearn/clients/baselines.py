"""The plans that set split learning against its baselines (``splitlearn compare``): one plan's
model, data and partition under each schedule, or with every segment at the clients' party.

A plain plan is the trivial case: its one data holder is the party the clients would play, and
it is one client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..core.plan import Plan, per_client
from ..core.specs import PlanError

__all__ = ["METHODS", "DEFAULT_CLIENTS", "template_of", "centralized_plan", "method_plan", "client_count",
           "row_sources", "partition_of", "ScheduleShape", "schedule_shape"]

METHODS = ("sequential", "splitfed_v1", "splitfed_v2", "independent", "fedavg", "large_batch", "centralized")
DEFAULT_CLIENTS = 10


def template_of(plan: Plan) -> str:
    """The party the clients play: the ``[clients]`` template, else the plan's one data holder."""
    if plan.clients is not None:
        return plan.clients.template
    holders = [p for p, s in plan.parties.items() if s.holds]
    if len(holders) != 1:
        raise PlanError("compare needs a plan where one party (the client template) holds all the data",
                        entry="parties", hint="give the plan a [clients] section naming its template party")
    return holders[0]


def centralized_plan(plan: Plan) -> Plan:
    """Every segment at the template party: the unsplit model, trained by one party."""
    t = template_of(plan)
    if per_client(plan):
        raise PlanError("the centralized baseline needs every row at one party, but each client reads its own file "
                        f"({plan.parties[t].data.path})", entry=f"parties.{t}.data.path",
                        hint="leave centralized out of the methods, or give the plan one shared dataset")
    return _one_party(plan).replace(clients=None)


def _one_party(plan: Plan) -> Plan:
    """Every segment at the template party (keeping ``[clients]``: the clients' own files stay theirs)."""
    t = template_of(plan)
    data_elsewhere = [p for p, s in plan.parties.items() if p != t and s.holds]
    if data_elsewhere:
        raise PlanError(f"parties {data_elsewhere} hold data too: only the template party may hold data to "
                        "compare against unsplit baselines", entry=f"parties.{data_elsewhere[0]}.holds")
    segments = {k: s.model_copy(update={"party": t}) for k, s in plan.segments.items()}
    return plan.replace(name=f"{plan.name}-centralized", parties={t: plan.parties[t]}, segments=segments, wires={})


def method_plan(plan: Plan, method: str, clients: int, partition: dict | None = None) -> Plan:
    """The plan that runs ``method`` with ``clients`` clients (centralized: one party, no clients)."""
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}", hint=f"choose from {', '.join(METHODS)}")
    t = template_of(plan)
    spec = {"template": t, "count": clients, **({"partition": partition} if partition else {})}
    if method == "centralized":
        return centralized_plan(plan)
    if method in ("fedavg", "large_batch"):
        spec.update(schedule="fedavg", federation="federation", local_steps=1 if method == "large_batch" else None)
        return _one_party(plan).replace(name=f"{plan.name}-{method}").with_clients(**spec)
    return plan.replace(name=f"{plan.name}-{method}").with_clients(**spec, schedule=method)


def client_count(plan: Plan, asked: int | None) -> int:
    """How many clients compare runs: as asked, else the plan's (else :data:`DEFAULT_CLIENTS`); with
    per-client files exactly the plan's."""
    own = plan.clients.count if plan.clients is not None else None
    if per_client(plan) and asked not in (None, own):
        raise PlanError(f"each client reads its own file ({plan.parties[plan.clients.template].data.path}) and the "
                        f"plan has {own} clients: compare cannot run {asked}", entry="clients.count",
                        hint=f"leave the number of clients out (or give {own})")
    return asked or own or DEFAULT_CLIENTS


def row_sources(plan: Plan) -> list[str | None]:
    """Whose rows the template party holds: each client's file (per-client files), else [None] (its own data)."""
    return plan.clients.names() if per_client(plan) else [None]


def partition_of(plan: Plan) -> dict[str, Any]:
    """How the plan shares the training rows among clients (a plan without clients: ``iid``)."""
    return plan.clients.partition.model_dump() if plan.clients is not None else {"kind": "iid"}


@dataclass(frozen=True)
class ScheduleShape:
    """What the cost model needs of a plan's schedule."""

    clients: int  # copies of the template party that train (a plain plan: 1)
    rounds: int  # averaging rounds: ceil(epochs / local_epochs) (a plain plan: its epochs)
    peer_handoff: bool  # sequential clients pass their weights straight to the next


def schedule_shape(plan: Plan) -> ScheduleShape:
    c = plan.clients
    if c is None:
        return ScheduleShape(1, plan.train.epochs, False)
    return ScheduleShape(c.count, math.ceil(plan.train.epochs / c.local_epochs),
                         c.schedule == "sequential" and c.handoff == "peer")
