"""The physical parties of a ``[clients]`` plan and what each does.

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
participant does branches on it, never on its name.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from ..core.plan import Plan
from ..wire.transport.base import Transport
from .layout import coordinator_of, federation_of, plays_of

if TYPE_CHECKING:
    from ..run.setup import PartySetup
    from .participant import Participant

__all__ = ["Duty", "duties_of", "make_role"]


class Duty(enum.Flag):
    """What a physical party of a ``[clients]`` plan is (several at once: a server that is the
    federation and the coordinator too)."""

    NONE = 0
    CLIENT = enum.auto()  # plays the template party, one turn at a time
    FIXED = enum.auto()  # plays another plan party: takes part in every turn
    FEDERATION = enum.auto()  # keeps the averaged client weights
    COORDINATOR = enum.auto()  # walks the schedule


def duties_of(plan: Plan, name: str) -> Duty:
    plays = plays_of(plan, name)
    duty = Duty.NONE
    if plays == plan.clients.template:
        duty |= Duty.CLIENT
    elif plays is not None:
        duty |= Duty.FIXED
    if name == federation_of(plan):
        duty |= Duty.FEDERATION
    if name == coordinator_of(plan):
        duty |= Duty.COORDINATOR
    return duty


def make_role(plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None,
              **kw: Any) -> Participant:
    """The participant physical party ``name`` is: the coordinator, or a follower."""
    from .coordinator import Coordinator
    from .follower import Follower

    cls = Coordinator if Duty.COORDINATOR in duties_of(plan, name) else Follower
    return cls(plan, name, transport, setup, **kw)
