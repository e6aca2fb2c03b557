"""How the coordinator keeps a ``[clients]`` run consistent across failures: every participant
saves its state at the end of every round (the :class:`~splitlearn.wire.control.Cursor` of the next
round's start); when a failed party comes back as a new process (it lost its state since the last
checkpoint), every participant rewinds to the last cursor all of them hold, by the rule every plan
resumes by (:func:`~splitlearn.run.resume.agree_on_resume`), and the schedule goes on from there."""

from __future__ import annotations

import logging
import time

from ..core.engine import PartyError
from ..run.resume import agree_on_resume, say_resume, usable_checkpoints
from ..wire.control import (Checkpoint, CheckpointsHeld, Cursor, Restore, Restored, Rows, Saved, StartedOver,
                            StartOver, WhichCheckpoints)
from ..wire.transport import TransportError
from .instructing import Instructing
from .schedule import Round

__all__ = ["Recovery", "MAX_REWINDS", "POLL_S"]

log = logging.getLogger(__name__)

MAX_REWINDS = 20  # times a run may rewind to a checkpoint (a party that fails every time ends it)
POLL_S = 0.5  # while waiting for a party to come back, how often its stream's state is looked at again


class Recovery(Instructing):
    """Checkpoints, rewinds and rejoining parties of a :class:`~splitlearn.clients.coordinator.Coordinator`.

    ``_rejoined``: parties that came back as new processes (said so, and proven by the
    transport); ``given_up``: parties waited for in vain (never again); ``_restarts_taken``: per
    party, its restarts (seen by the transport) believed."""

    def _restarts_known(self, peer: str) -> int:
        """Where this coordinator rewinds (checkpoints kept, ``rejoin_wait_s``), a turn with ``peer`` ends at once if
        the transport saw it restart beyond those taken into account: the rewind waits (:meth:`_rejoined_party`).
        Elsewhere a new process of a client is a client like any (its restarts seen when the turn begins)."""
        if self.checkpoints is None or self.rejoin_wait_s <= 0:
            return super()._restarts_known(peer)
        return self._restarts_taken.get(peer, 0)

    def _broken(self, party: str) -> bool:
        """Whether ``party``'s stream is broken now (the transport knows; never waits)."""
        try:
            return self.switch.inner.broken_since(party) is not None
        except TransportError:
            return False

    def _on_rejoined(self, party: str) -> None:
        """``party`` says it came back as a new process (resuming). Believed once per restart the
        transport saw (another incarnation of it); otherwise refused, named and counted. A
        coordinator that itself resumes takes every party back anyway: nothing to believe."""
        if self.resuming:
            return
        seen = self._restarts(party)
        if seen > self._restarts_taken.get(party, 0):
            self._restarts_taken[party] = seen
            self._rejoined.add(party)  # the coordinator rewinds with it
            return
        self.link.refuse(party, "it says it came back as a new process, but the transport saw no new process of it "
                         f"since its last restart ({seen} restarts): not believed, nobody goes back")

    def checkpoint_everyone(self, index: int, everyone: list[str], rnd: Round | None = None) -> None:
        """Every party (this one too) saves its state as of the end of round ``index`` (-1: before the
        first), the cursor of the next round's start."""
        cursor = Cursor.after_round(index)
        rid, gone = next(self._requests), self.gone(everyone, now=True)
        asked, why = [], {}
        for p in everyone:
            if p in self.given_up:  # it did not come back when waited for: not asked (nor waited for) again
                why[p] = "it was given up on earlier in the run (it did not come back in time)"
                continue
            try:
                self._instruct(p, Checkpoint(cursor), rid)
                asked.append(p)
            except TransportError as e:
                log.warning("%s: checkpoint: cannot reach %s: %s", self.name, p, e)
                why[p] = f"cannot reach it: {e}"
        self.capture(cursor)
        ans = self.replies(asked, self.timeout, rid, Saved, gone=gone)
        for p in everyone:
            if p not in ans and rnd is not None:
                self._skip(rnd, p, "checkpoint", why.get(p) or gone(p) or f"it did not say within {self.timeout:g} s "
                                                                        "that it saved its state")

    def start_over_everyone(self, everyone: list[str]) -> None:
        """Resuming, but no checkpoint is held by every party: every party starts the run over."""
        self._ask(everyone, StartOver(), StartedOver)
        moved = self.checkpoints.set_aside()  # a peer's word never deletes checkpoints
        self.resuming = False
        log.warning("%s: resuming, but no checkpoint is held by every party: from the start%s", self.name,
                    f" (checkpoints moved to {moved})" * bool(moved))

    def rewind(self, everyone: list[str], why: str) -> int | None:
        """Every party goes back to the last cursor whose checkpoint all of them hold
        (:func:`~splitlearn.run.resume.agree_on_resume`); the index of the round to do next, the
        cursor's (None: no checkpoint is held by all). Parties that do not answer are left out (and
        reported)."""
        if self.per_client and self._counts is not None:  # a new process knows no row counts yet
            for p in self._rejoined & set(everyone):
                try:
                    self._instruct(p, Rows(tuple(self._counts[0]), tuple(self._counts[1])))
                except TransportError:
                    pass
        ans = self._ask(everyone, WhichCheckpoints(), CheckpointsHeld)
        ours = usable_checkpoints(self.name, self.checkpoints)
        known = {self.name: ours, **{p: sorted(set(held.cursors)) for p, held in ans.items()}}
        missing = [p for p in everyone if p not in ans and p not in self.given_up]
        if missing:  # it would keep a later state than the others: the run could not stay consistent
            raise PartyError(f"{self.name}: {why}, but {missing[:5]} did not say within {self.timeout:g} s which "
                             "checkpoints they hold, so not every party can go back to the same round")
        cursor = agree_on_resume(self.name, known, list(known))
        if cursor is None:
            log.warning("%s: %s, but no checkpoint is held by every party", self.name, why)
            return None
        say_resume(self.name, ours, cursor, known)  # (when it goes back further than its own last)
        self.attempt += 1
        if self.attempt > MAX_REWINDS:
            raise PartyError(f"{self.name}: the parties went back to a checkpoint {MAX_REWINDS} times; giving up "
                             f"({why})")
        rid = next(self._requests)
        for p in ans:
            try:
                self._instruct(p, Restore(cursor, self.attempt), rid)
            except TransportError as e:
                raise PartyError(f"{self.name}: {why}; cannot tell {p} to go back to the checkpoint {cursor}: "
                                 f"{e}") from None
        self.restore(cursor, self.attempt)
        got = self.replies(list(ans), 3 * self.timeout, rid, Restored)
        failed = [p for p in ans if p not in got or got[p].cursor != cursor]
        if failed:
            raise PartyError(f"{self.name}: {why}; going back to the end of round {cursor.round - 1} ({cursor}), "
                             f"{failed} did not")
        log.warning("%s: %s; every party went back to the end of round %d (%s)", self.name, why, cursor.round - 1,
                    cursor)
        self._rejoined.clear()
        for p in ans:  # the processes that went back are those the run goes on with (a resuming coordinator's too)
            self._restarts_taken[p] = max(self._restarts_taken.get(p, 0), self._restarts(p))
        return next((i for i, r in enumerate(self.rounds) if r.index >= cursor.round), len(self.rounds))

    def _rejoined_party(self, party: str) -> str | None:
        """The party that came back as a new process (``party``, which failed, or another: the
        failure may be a neighbour's), proven by the transport (see :meth:`_on_rejoined`); None if
        none did. It is waited for only while the transport says one may come back (:meth:`_away`),
        up to ``rejoin_wait_s``; ``party``, still away then, is not waited for again. A party that
        is connected is not waited for at all. Parties given up on are not taken back."""
        self._rejoined -= self.given_up
        if not self._rejoined and party not in self.given_up and self._away(party):
            log.warning("%s: waiting up to %g s for %s to come back (away: %s)", self.name, self.rejoin_wait_s, party,
                        self._away(party))
            deadline = time.monotonic() + self.rejoin_wait_s
            while not self._rejoined and self._away(party) and (left := deadline - time.monotonic()) > 0:
                self.await_messages([party], min(left, POLL_S), lambda *_: None,  # a rejoin notice: _on_rejoined
                                    until=lambda: bool(self._rejoined - self.given_up))
                self._rejoined -= self.given_up
            if not self._rejoined:
                for p in self._away(party):  # a restart that never said it rejoined is not waited for again
                    self._restarts_taken[p] = self._restarts(p)
                    if p not in self.clients and self._broken(p):  # a fixed role waited for in vain (it ends the
                        self.given_up.add(p)  # run: Instructing._skip)
                if self._broken(party):
                    self.given_up.add(party)
        return sorted(self._rejoined)[0] if self._rejoined else None

    def _away(self, party: str) -> list[str]:
        """Who may yet come back as a new process: ``party`` or a fixed role whose stream is broken
        now, or that the transport saw restart without saying so yet."""
        candidates = [party, *(p for p in self._fixed_roles() if p != party)]
        return [p for p in candidates if self._broken(p) or self._restarts(p) > self._restarts_taken.get(p, 0)]
