"""The physical parties of every plan and what each does.

A plain plan is the trivial case: its physical parties are its parties, each a **fixed party**,
with no coordinator and no federation (every party derives the one round of the trivial schedule
from the plan). A ``[clients]`` plan has

* **clients** ``T-1`` ... ``T-N`` play the plan's template party ``T``, one turn at a time, each
  with its own weights, optimizer and share of the rows;
* **fixed parties** (the plan's other parties, e.g. the server) take part in every turn;
* the **coordinator** (the federation role if it is a plan party, else the first fixed party,
  else the federation role) walks the rounds of the plan's strategy
  (:mod:`splitlearn.clients.strategies`) and tells each participant what to do next
  (:mod:`splitlearn.clients.coordinator`); the others follow (:mod:`splitlearn.clients.follower`);
* the **federation** keeps the averaged client weights (sample-weighted FedAvg); it is the
  coordinator unless ``clients.federation`` names a role of its own.

Each physical party's :class:`Duty` is computed once from the plan (:func:`duties_of`); what a
participant does branches on it, never on its name. The functions here read the plan only: every
module of :mod:`splitlearn.clients` may ask them who is who.
"""

from __future__ import annotations

import enum

from ..core.plan import Plan

__all__ = ["Duty", "duties_of", "federation_of", "coordinator_of", "physical_names", "plays_of", "client_of",
           "client_names"]


def federation_of(plan: Plan) -> str | None:
    """The party or role that averages client weights (None: a plain plan has none)."""
    spec = plan.clients
    if spec is None:
        return None
    if spec.federation:
        return spec.federation
    fixed = [p for p in plan.parties if p != spec.template]
    return fixed[0] if fixed else "federation"


def coordinator_of(plan: Plan) -> str | None:
    """The physical party that walks the schedule (see the module); None for a plain plan, whose
    trivial schedule every party derives alike."""
    spec = plan.clients
    if spec is None:
        return None
    fed = federation_of(plan)
    fixed = [p for p in plan.parties if p != spec.template]
    return fed if fed in plan.parties or not fixed else fixed[0]


def physical_names(plan: Plan) -> list[str]:
    """Every physical party of a plan: fixed parties, a separate federation, then the clients (a plain plan: its
    parties)."""
    spec = plan.clients
    if spec is None:
        return list(plan.parties)
    fixed = [p for p in plan.parties if p != spec.template]
    fed = federation_of(plan)
    return fixed + ([fed] if fed not in fixed else []) + spec.names()


def plays_of(plan: Plan, name: str) -> str | None:
    """The plan party a physical party plays: the template for a client, itself for a fixed
    party (every party of a plain plan), none for a federation of its own."""
    return plan.clients.template if client_of(plan, name) is not None else (name if name in plan.parties else None)


def client_names(plan: Plan) -> list[str]:
    """The clients of a ``[clients]`` plan, in order ([] for a plain plan)."""
    return [] if plan.clients is None else plan.clients.names()


def client_of(plan: Plan, name: str) -> str | None:
    """``name`` if physical party ``name`` is a client of the plan's ``[clients]`` (it reads a client's rows),
    None for a fixed party, a federation and every party of a plain plan."""
    return name if plan.clients is not None and plan.clients.is_client(name) else None


class Duty(enum.Flag):
    """What a physical party is (several at once: a server that is the federation and the
    coordinator too; every party of a plain plan is FIXED only)."""

    NONE = 0
    CLIENT = enum.auto()  # plays the template party, one turn at a time
    FIXED = enum.auto()  # plays another plan party: takes part in every turn
    FEDERATION = enum.auto()  # keeps the averaged client weights
    COORDINATOR = enum.auto()  # walks the schedule


def duties_of(plan: Plan, name: str) -> Duty:
    plays = plays_of(plan, name)
    duty = Duty.NONE
    if client_of(plan, name) is not None:
        duty |= Duty.CLIENT
    elif plays is not None:
        duty |= Duty.FIXED
    if name == federation_of(plan):
        duty |= Duty.FEDERATION
    if name == coordinator_of(plan):
        duty |= Duty.COORDINATOR
    return duty
