"""A client, a fixed party or a federation of its own: carries out the coordinator's typed
instructions (:mod:`splitlearn.wire.control`) until it says stop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..core.engine import PartyError
from ..run.report import PartyReport, Progress
from ..run.resume import usable_checkpoints
from ..wire.codec import WireError
from ..wire.control import (Census, CensusAnswer, Checkpoint, CheckpointsHeld, Collect, Collected, Instruction,
                            LoadWeights, MergeServerCopies, NotRestored, Rejoined, Restore, Restored, Rows, Saved,
                            SendAverage, SendWeights, StartedOver, StartOver, Stop, TakeTurn, TurnDone,
                            WhichCheckpoints)
from ..wire.messages import Kind, quote, read_command
from ..wire.transport import TransportClosed, TransportError
from .roles import physical_names
from .saving import StateSaving
from .secure import SecurePhase, secure_send
from .turns import TurnTaking

__all__ = ["Follower", "Unfit", "HANDLERS", "WHILE_RESUMING"]

log = logging.getLogger(__name__)


class Unfit(Exception):
    """An instruction of the right types that this participant cannot carry out (it is refused)."""


class Follower(TurnTaking, StateSaving):
    """Carries out the coordinator's instructions, each by the handler of its type in
    :data:`HANDLERS` (if its duties allow it), until a :class:`~splitlearn.wire.control.Stop`."""

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        self.open_tracker()
        try:
            if self.resuming:  # a new process: the coordinator tells which checkpoint every party rewinds to
                self._reply(0, Rejoined(tuple(usable_checkpoints(self.name, self.checkpoints))))
            self.follow()
        finally:
            self.close_tracker()
        return self.report()

    def follow(self) -> None:
        while True:
            if self._pending:
                msg = self._pending.popleft()
            else:
                try:
                    msg = self.link.recv(None)
                except TransportClosed as e:
                    raise PartyError(f"{self.name}: lost the coordinator {self.coordinator!r} before it said "
                                     f"stop ({e})") from None
            if msg.kind == Kind.WEIGHTS:  # may overtake the command naming it (it came on another stream)
                if not self._hold_weights(msg):
                    self.link.refuse(msg.sender, "weights from a party that never sends us any", wire="weights")
                continue
            if msg.kind != Kind.COMMAND or msg.sender != self.coordinator:
                if msg.kind == Kind.ERROR:
                    log.info("%s: %s", self.name, msg.text[:500])
                continue
            try:
                request, deadline, ins = read_command(msg, self.limits)
            except WireError as e:
                self.link.refuse(msg.sender, str(e))
                continue
            if self.fault is not None:
                self.fault(self, request, ins)
            if isinstance(ins, Stop):
                if ins.reason:  # the run was stopped for a reason that concerns us all
                    raise PartyError(f"{self.name}: {self.coordinator} stopped the run: {ins.reason[:600]}")
                return
            if time.time() > deadline:
                log.info("%s: dropping a command that is past its deadline: %s", self.name, quote(ins.WORD))
                continue
            if self.resuming and type(ins) not in WHILE_RESUMING:  # our state is not the others' yet
                log.info("%s: waiting for the word to rewind to a checkpoint; dropping %s", self.name, quote(ins.WORD))
                continue
            handler = HANDLERS.get(type(ins))
            if handler is None or not handler.allowed(self):
                self.link.refuse(msg.sender, f"a command {quote(ins.WORD)} that {self.name} does not carry out")
                continue
            try:
                handler.run(self, request, ins)
            except Unfit as e:
                self.link.refuse(msg.sender, f"a {quote(ins.WORD)} command that {self.name} cannot carry out: {e}")

    # -- the instructions ------------------------------------------------------------------------
    def _turn(self, request: int, ins: TakeTurn) -> None:
        turn = self.turns.get(ins.turn)
        if turn is None:
            raise Unfit(f"no turn {ins.turn}")
        if ins.model is not None and ins.model not in self.clients:
            raise Unfit(f"no client {quote(ins.model)} whose weights to evaluate")
        if ins.client not in self.clients:
            raise Unfit(f"no client {quote(ins.client)} to take the turn with")
        ok, why = self.run_turn(turn, ins.client, ins.model)
        if self.coordinator not in self.plan.parties:  # it takes no part in turns: tell it we are done
            self._reply(request, TurnDone(ok, why))

    def _census(self, request: int, ins: Census) -> None:
        train, test = self.setup.rows
        self._reply(request, CensusAnswer(int(train), int(test), self.setup.schema()))

    def _rows(self, request: int, ins: Rows) -> None:
        if len(ins.train) != len(self.clients):
            raise Unfit(f"row counts for {len(ins.train)} clients; the plan has {len(self.clients)}")
        self.use_counts(list(ins.train), list(ins.test))

    def _load(self, request: int, ins: LoadWeights) -> None:
        with self._metering(ins.evaluation):
            self.load_weights(ins.source, request, ready=ins.ready, lend=ins.lend)

    def _send(self, request: int, ins: SendWeights) -> None:
        if ins.to not in physical_names(self.plan):
            raise Unfit(f"no party {quote(ins.to)} to send weights to")
        if self.spec.secure_aggregation and self.is_client and ins.to == self.federation and not ins.evaluation:
            secure_send(self, request, None if self.fault is None else
                        lambda phase: self.fault(self, request, SecurePhase(phase, ins.to)))
            return
        with self._metering(ins.evaluation):
            self._send_to_client(ins.to, request) if ins.to in self.clients else self.send_weights(ins.to, request)

    def _send_to_client(self, client: str, request: int) -> None:
        """Weights to a client (a hand-off's peer, the federation's average): one that is gone (:meth:`gone`) cannot
        take them, and the coordinator learns it from that client; this party goes on. Any other failure to send
        (its own transport closed, a limit) is its own."""
        try:
            self.send_weights(client, request)
        except TransportClosed:
            raise
        except TransportError as e:
            if not self.gone([client], now=True)(client):
                raise
            log.warning("%s: weights for %s not sent: %s", self.name, client, e)

    def _collect(self, request: int, ins: Collect) -> None:
        got, refused = self.collect(list(ins.clients), list(ins.samples), request)
        self._reply(request, Collected(tuple(got), refused))

    def _send_average(self, request: int, ins: SendAverage) -> None:
        strangers = [c for c in ins.clients if c not in self.clients]
        if strangers:
            raise Unfit(f"no client {quote(strangers[0])} to send the average to")
        with self._metering(ins.evaluation):
            for c, r in zip(ins.clients, ins.requests):
                self._send_to_client(c, r)

    def _checkpoint(self, request: int, ins: Checkpoint) -> None:
        self.capture(ins.cursor)
        self._reply(request, Saved(ins.cursor))

    def _which_checkpoints(self, request: int, ins: WhichCheckpoints) -> None:
        self._reply(request, CheckpointsHeld(tuple(usable_checkpoints(self.name, self.checkpoints))))

    def _start_over(self, request: int, ins: StartOver) -> None:
        moved = self.checkpoints.set_aside()  # what it held is moved aside, not lost
        log.warning("%s: told to start over%s", self.name, f" (checkpoints moved to {moved})" * bool(moved))
        self.resuming = False
        self._reply(request, StartedOver())

    def _restore(self, request: int, ins: Restore) -> None:
        if ins.cursor not in self.checkpoints.cursors():
            self._reply(request, NotRestored(ins.cursor))
            return
        self.restore(ins.cursor, ins.attempt)
        if self.secure is not None:  # a coordinator that came back as a new process numbers its requests anew
            self.secure.last = 0
        self._reply(request, Restored(ins.cursor))

    def _merge_copies(self, request: int, ins: MergeServerCopies) -> None:
        self.merge_copies(list(ins.clients), list(ins.samples))


@dataclass(frozen=True)
class _Handler:
    run: Callable[[Follower, int, Any], None]
    allowed: Callable[[Follower], bool]


def _saves(f: Follower) -> bool:
    return f.checkpoints is not None


HANDLERS: dict[type[Instruction], _Handler] = {
    TakeTurn: _Handler(Follower._turn, lambda f: f.in_turns),
    SendWeights: _Handler(Follower._send, lambda f: f.is_client or f.is_federation),
    LoadWeights: _Handler(Follower._load, lambda f: f.is_client),
    Census: _Handler(Follower._census, lambda f: f.is_client and f.per_client),
    Rows: _Handler(Follower._rows, lambda f: f.per_client and f.ctx is None),
    Collect: _Handler(Follower._collect, lambda f: f.is_federation),
    SendAverage: _Handler(Follower._send_average, lambda f: f.is_federation),
    Checkpoint: _Handler(Follower._checkpoint, _saves),
    WhichCheckpoints: _Handler(Follower._which_checkpoints, _saves),
    Restore: _Handler(Follower._restore, _saves),
    StartOver: _Handler(Follower._start_over, _saves),
    MergeServerCopies: _Handler(Follower._merge_copies, lambda f: f.setup is not None and not f.is_client),
}

WHILE_RESUMING = frozenset({WhichCheckpoints, Restore, StartOver, Stop, Rows, Census})
