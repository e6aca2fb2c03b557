"""A party of a plain plan: the trivial schedule (:class:`~splitlearn.clients.strategies.Trivial`),
one fixed set of parties and one round whose one turn is every step of the plan. Nobody
coordinates: every party derives the round from the plan once the hello has told how many rows
there are, and runs it as the ordinary session (:func:`~splitlearn.run.session.run_party`),
taking its checkpoints at the cursors ``(0, step)`` and agreeing on a resume in the hellos."""

from __future__ import annotations

from typing import Any, Callable

from ..core.engine import Party
from ..core.plan import Plan
from ..run.observe import Recorder
from ..run.report import PartyReport, Progress
from ..run.session import run_party
from ..run.setup import PartySetup, Step
from ..wire.transport.base import Transport
from .participant import Participant

__all__ = ["Peer"]


class Peer(Participant):
    """A physical party of a plain plan (see the module). ``shapes``: wire shapes known
    beforehand; ``steps``: replace the plan's schedule, or give them once the hello has told the rows (a
    function; prediction: ``predicting`` then, and no checkpoints); ``record``: keep what it receives for the
    audit."""

    def __init__(self, plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None, *,
                 shapes: dict | None = None, steps: list[Step] | Callable[[], list[Step]] | None = None,
                 predicting: bool = False,
                 record: bool = False, out: Any = None, resume: bool = False, **kw: Any):
        predicting_steps = steps is not None  # a prediction takes no checkpoints and resumes from none
        super().__init__(plan, name, transport, setup, out=None if predicting_steps else out,
                         resume=resume and not predicting_steps, **kw)
        self.steps = steps
        s = self.setup
        self.party = Party(s.graph, name, self.link, s.modules, s.optimizer, s.inputs, dict(shapes or {}),
                           self.step_timeout, predicting)
        if record:
            self.party.observer = Recorder(s.splits.ids if s.table is not None else None)
            self.recorders = {"": self.party.observer}  # what it records, reported as every participant's

    def _steps(self) -> list[Step]:
        """The one turn's steps, once the hello has told how many rows there are."""
        s = self.setup
        if self.party.observer is not None:  # the ids after any private alignment; a party without data
            self.party.observer.ids = s.splits.ids if s.table is not None else None  # records positions
        if self.steps is not None:  # (a function of the rows the hello told: a prediction's)
            return self.steps() if callable(self.steps) else self.steps
        self.rounds = self.strategy.rounds(self.plan, [s.splits.train], s.splits.test, validation=s.splits.validation)
        self.turns = {t.index: t for r in self.rounds for t in r.train}
        (turn,) = self.turns.values()
        return list(turn.steps)

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        s = self.setup
        self.open_tracker()
        try:
            session = run_party(self.party, self._steps, progress, ids_hash=s.ids_hash, tracker=self.tracker,
                                setup=s, checkpoints=self.checkpoints, resume=self.resuming)
        finally:
            self.close_tracker()
        self.took_part(session)
        self.plan_session = session
        return self.report()
