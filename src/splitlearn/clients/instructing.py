"""What the parts of a ``[clients]`` coordinator share (:mod:`~splitlearn.clients.coordinator`,
:mod:`~splitlearn.clients.transfers`, :mod:`~splitlearn.clients.recovery`): a participant that
instructs the others, skips a party that fails (and reports it) and keeps the state they read."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core.engine import PartyError
from ..wire.control import Instruction, Reply
from ..wire.messages import command
from ..wire.transport import TransportError
from .roles import physical_names
from .saving import StateSaving
from .schedule import Round
from .turns import TurnTaking

__all__ = ["Instructing", "PartyRejoined"]

log = logging.getLogger(__name__)


class PartyRejoined(Exception):
    """A failed party came back as a new process (it lost its state since the last checkpoint)."""

    def __init__(self, party: str):
        super().__init__(party)
        self.party = party


class Instructing(TurnTaking, StateSaving):
    """A participant that instructs the others. ``holder``: the client whose training turn went
    through last (the run's model, unless the federation averages); ``_counts``: per-client data,
    the census's row counts; ``_rejoined``, ``given_up``, ``_restarts_taken``: parties that came back
    as new processes, parties waited for in vain, and per party its restarts believed
    (:class:`~splitlearn.clients.recovery.Recovery`)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.holder: str | None = None
        self._counts: tuple[list[int], list[int]] | None = None
        self._rejoined: set[str] = set()
        self.given_up: set[str] = set()
        self._restarts_taken: dict[str, int] = {}

    def _instruct(self, party: str, instruction: Instruction, request: int | None = None) -> int:
        """Send ``instruction`` to ``party``; its request id (a new one unless given)."""
        rid = next(self._requests) if request is None else request
        self.link.send(command(self.name, party, instruction, rid, time.time() + self.timeout))
        return rid

    def _ask(self, parties: list[str], instruction: Instruction, *of: type[Reply]) -> dict[str, Reply]:
        """Send ``instruction`` to each of ``parties`` under one request (one that cannot be reached
        just does not answer); their replies of the types ``of`` that come within an answer's time."""
        rid = next(self._requests)
        for p in parties:
            try:
                self._instruct(p, instruction, rid)
            except TransportError:
                pass
        return self.replies(parties, self.timeout, rid, *of)

    def _skip(self, rnd: Round, party: str, what: str, why: str) -> None:
        """``party`` failed at ``what`` in round ``rnd``: reported and skipped, unless a party came
        back as a new process meanwhile (PartyRejoined: every party rewinds to a checkpoint), or a fixed role (a
        federation of its own, a relay) is gone for good (:meth:`gone`; where the coordinator rewinds, once it did not
        come back within ``rejoin_wait_s``): a PartyError then stops the run, naming it."""
        waits = self.checkpoints is not None and self.rejoin_wait_s > 0
        rejoined = self._rejoined_party(party) if waits else None
        if rejoined is not None:
            raise PartyRejoined(rejoined)
        lost = self._fixed_role_gone()  # a fixed role gone for good: no schedule goes on without it
        if lost is not None and waits and lost[0] not in self.given_up:  # it may come back: waited for as well
            if (rejoined := self._rejoined_party(lost[0])) is not None:
                raise PartyRejoined(rejoined)
            lost = self._fixed_role_gone()
        if lost is not None:
            raise PartyError(f"{self.name}: {lost[0]} is gone ({lost[1]}"
                             + f"; not back as a new process within {self.rejoin_wait_s:g} s" * waits
                             + "), and the run cannot go on without it"
                             + " (start every party again with --resume to go on from the last checkpoint)"
                             * (self.checkpoints is not None))
        self.skipped.append({"round": rnd.index, "client": party, "during": what, "reason": why})
        log.warning("%s: skipped %s in round %d (%s): %s", self.name, party, rnd.index, what, why)

    def _fixed_roles(self) -> list[str]:
        """The fixed roles this coordinator commands: every physical party but the clients and itself (a federation
        of its own, a relay, a server that is not the coordinator)."""
        return [p for p in physical_names(self.plan) if p not in self.clients and p != self.name]

    def _fixed_role_gone(self) -> tuple[str, str] | None:
        """A fixed role (:meth:`_fixed_roles`) that is gone (:meth:`gone`), and why; None if none is."""
        fixed = self._fixed_roles()
        gone = self.gone(fixed, now=True)
        return next(((p, why) for p in fixed if (why := gone(p))), None)

    def _rejoined_party(self, party: str) -> str | None:
        """The party that came back as a new process after ``party`` failed; None here (nobody is
        waited for): :class:`~splitlearn.clients.recovery.Recovery` looks."""
        return None
