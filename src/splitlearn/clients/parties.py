"""What each physical party runs over a transport (:func:`physical_party`), for every plan: the
:class:`~splitlearn.clients.participant.Participant` its duties make it. A plan whose schedule is
coordinated (``[clients]``) has one coordinator and followers; a plain plan's trivial schedule has
peers only (:class:`~splitlearn.clients.peer.Peer`). Every launcher
(:mod:`~splitlearn.launch.threads`, :mod:`~splitlearn.launch.processes`) starts parties through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..core.plan import Plan
from ..core.specs import PlanError
from ..wire.messages import Limits
from ..wire.transport.base import Transport
from ..run.setup import PartySetup, Step
from .coordinator import Coordinator
from .follower import Follower
from .participant import Participant
from .peer import Peer
from .roles import Duty, duties_of
from .strategies import strategy_of

__all__ = ["physical_party", "make_role"]


def make_role(plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None,
              **kw: Any) -> Participant:
    """The participant physical party ``name`` is, by its duties: a plain plan's peer; a coordinated
    schedule's coordinator, or a follower. ``kw``: the participant's own arguments."""
    if not strategy_of(plan).coordinated:
        return Peer(plan, name, transport, setup, **kw)
    cls = Coordinator if Duty.COORDINATOR in duties_of(plan, name) else Follower
    return cls(plan, name, transport, setup, **kw)


def physical_party(plan: Plan, name: str, setup: PartySetup | None, transport: Transport, *,
                   shapes: dict | None = None, timeout: float | None = None, record: bool = False,
                   limits: Limits | None = None, steps: list[Step] | Callable[[], list[Step]] | None = None,
                   predicting: bool = False,
                   tracking: Any = None, out: Path | None = None, resume: bool = False, **role: Any) -> Participant:
    """What physical party ``name`` runs over ``transport``; ``.run(progress)`` gives its report.

    ``timeout`` bounds each step (default: the plan's, :meth:`~splitlearn.core.plan.Plan.step_timeout_s`);
    ``record`` keeps what it receives for the audit; ``limits``: what it accepts from its peers;
    ``tracking`` streams the metrics of the losses it computes; ``out``: the run folder, where
    checkpoints are taken; ``resume``: go on from the last checkpoint every party holds. A plain
    plan's party takes ``shapes`` (wire shapes known beforehand) and ``steps``, which replace the
    plan's schedule (prediction: ``predicting`` then); a coordinated schedule's, ``role``: its
    shared ``context``, ``fault`` (a test hook), ``rejoin_wait_s`` (the seconds the coordinator
    waits for a failed party to come back as a new process)."""
    common = dict(step_timeout=timeout, record=record, limits=limits, tracking=tracking, out=out, resume=resume)
    if not strategy_of(plan).coordinated:
        return make_role(plan, name, transport, setup, shapes=shapes, steps=steps, predicting=predicting, **common)
    if steps is not None:
        raise PlanError("a plan with [clients] runs its own schedule", entry="clients")
    return make_role(plan, name, transport, setup, **common, **role)
