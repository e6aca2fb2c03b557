"""What each physical party runs over a transport (:func:`physical_party`), for every plan: a plain
plan's party runs its session over the plan's schedule (:class:`_PlainParty`); a ``[clients]``
plan's is its coordinator or a follower (:func:`make_role`). Both launchers
(:mod:`~splitlearn.launch.threads`, :mod:`~splitlearn.launch.processes`) start parties through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..core.engine import Party
from ..core.plan import Plan
from ..core.specs import PlanError
from ..wire.link import Link
from ..wire.messages import Limits
from ..wire.transport.base import Transport
from ..run.observe import Recorder
from ..run.report import PartyReport, Progress
from ..run.session import run_party
from ..run.setup import PartySetup, Step, schedule, setup_party
from .coordinator import Coordinator
from .follower import Follower
from .participant import Participant
from .roles import Duty, duties_of

__all__ = ["physical_party", "make_role"]


def make_role(plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None,
              **kw: Any) -> Participant:
    """The participant physical party ``name`` of a ``[clients]`` plan is: the coordinator, or a follower."""
    cls = Coordinator if Duty.COORDINATOR in duties_of(plan, name) else Follower
    return cls(plan, name, transport, setup, **kw)


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
    return make_role(plan, name, transport, setup, step_timeout=timeout, record=record, limits=limits,
                     tracking=tracking, out=out, resume=resume, **role)
