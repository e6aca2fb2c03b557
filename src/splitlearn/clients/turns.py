"""A participant's part in one turn: the ordinary engine session between the fixed parties and
one client, over a view of the transport that lets ``T-k`` speak as ``T``."""

from __future__ import annotations

import copy
import logging
from typing import Callable

from ..core.engine import Party, PartyError
from ..core.optimizing import PartyOptimizer
from ..core.specs import PlanError
from ..run.agreement import Agreement
from ..run.observe import Recorder
from ..run.session import run_party
from ..run.setup import make_optimizer
from ..wire.codec import WireError
from ..wire.link import Link
from ..wire.messages import Kind, Message, kind_of, parsed, read_hello
from ..wire.transport import TransportClosed, TransportError
from .participant import Participant
from .schedule import Turn
from .weights import load_state

__all__ = ["TurnTaking"]

log = logging.getLogger(__name__)


class TurnTaking(Participant):
    """A :class:`~splitlearn.clients.participant.Participant` that takes part in turns."""

    def _models(self, turn: Turn, client: str, model: str | None = None) -> tuple[dict, PartyOptimizer | None]:
        """The modules and optimizer of a turn: lent weights (no optimizer), this party's own, or a fixed party's
        copy for ``client`` with an optimizer of its own (its schedule too, stepped by that client's turns)."""
        if self.is_client and model is not None:  # another client's weights, for this turn only
            if self.lent is None:
                raise PartyError(f"{self.name}: no weights of {model} came to evaluate")
            mods = copy.deepcopy(self.setup.modules)
            load_state(mods, self.lent)
            return mods, None
        if self.is_client or not self.strategy.own_copy(turn):
            return self.setup.modules, self.setup.optimizer
        if client not in self.copies:  # from the shared model (v1: averaged at the end of every round)
            mods = copy.deepcopy(self.setup.modules)
            self.copies[client] = (mods, make_optimizer(self.plan, self.plays, mods))
        return self.copies[client]

    def _watch(self, peers: set[str]) -> Callable[[], None]:
        """What a fixed party's turn looks at while no message comes (:meth:`Switch.session`): its client (``peers``),
        gone (:meth:`~splitlearn.clients.participant.Participant.gone`), ends it at once, a TransportClosed naming it,
        instead of after the step timeout (a client's loss is no transport error: its failure is the turn's; a fixed
        party's loss or restart is, and ends the turn anyway)."""
        gone = self.gone(peers)

        def check() -> None:
            for p in sorted(peers):
                if why := gone(p):
                    raise TransportClosed(why)
        return check

    def run_turn(self, turn: Turn, client: str, model: str | None = None) -> tuple[bool, str]:
        """Take part in one turn with ``client`` (evaluating ``model``'s weights, lent to it, when
        not its own): (done, why not)."""
        t = self.spec.template
        fixed = {p for p in self.plan.parties if p != t}
        peers = fixed if self.is_client else ({client} | fixed) - {self.name}
        # in every hello of this turn (the hello compares it); a turn done again after a rewind differs from the first
        tag = f"{self.ids_hash}/turn-{turn.index}" + (f"/again-{self.attempt}" if self.attempt else "")

        def turn_of(data: bytes | Message) -> str | None:
            """The turn tag of a hello, bytes or handed over whole in one process (None: no readable hello)."""
            if kind_of(data) != Kind.HELLO:
                return None
            try:
                return read_hello(parsed(data, self.limits), self.limits).get("ids_hash")
            except WireError:
                return None

        def keep(peer: str, data: bytes) -> bool:
            """A peer's hello for this very turn may have come before we got here; the rest is stale."""
            return peer in peers and turn_of(data) == tag

        def defer(peer: str, data: bytes) -> bool:
            """Another turn's hello (the next one's can come while this one says goodbye): it waits."""
            found = turn_of(data)
            return found is not None and found != tag

        view = self.switch.session(self.plays, {} if self.is_client else {t: client}, keep, peers, defer,
                                   None if self.is_client else self._watch({client}))
        link = Link(view, self.link.meter if turn.mode == "train" else self.eval_meter, self.limits)
        try:
            modules, optimizer = self._models(turn, client, model)
        except PartyError as e:
            return False, str(e)
        finally:
            self.lent = None if self.is_client else self.lent
        if self.rng is None:  # this physical party's own random stream, kept from turn to turn
            self.rng = self._random(modules)
        party = Party(self.graph, self.plays, link, modules, optimizer, self.setup.inputs,
                      timeout=self.step_timeout, rng=self.rng)
        if self.recorders is not None:
            party.observer = self.recorders.setdefault("" if self.is_client else client, Recorder(self.record_ids))
        try:
            if self.tracker is not None:
                self.tracker.turn = turn.index
            turn_steps = self.ctx.steps_of(self.plan, turn, self.clients.index(client)) if self.ctx else turn.steps
            # a turn's own intervals would be drawn for nothing: its record keeps its figures, the pooled one intervals
            report = run_party(party, iter(turn_steps), ids_hash=tag, tracker=self.tracker, intervals=False,
                               agreed=self.agreements.setdefault(",".join(sorted(peers)), Agreement()))
        except (PartyError, PlanError, TransportError) as e:  # a peer that is gone or silent: failures as data
            self.refused += link.refused
            log.warning("%s: turn %d with %s failed: %s", self.name, turn.index, client, e)
            return False, str(e)
        self.refused += link.refused
        self.took_part(report)
        losses, steps = {}, {}
        for loss, h in report.metrics.items():
            key = "train_loss" if turn.mode == "train" else "test_loss"
            losses[loss] = {k: v[0] for k, v in h.items() if v and k not in ("train_loss_steps", "ci95", "curves")}
            losses[loss].setdefault(key, None)
            if h.get("train_loss_steps"):
                steps[loss] = [v for _, v in h["train_loss_steps"]]
        record = {"turn": turn.index, "round": turn.round, "epoch": turn.steps[0].epoch if turn.steps else 0,
                  "mode": turn.mode, "client": client, "rows": sum(len(x.rows) for x in turn_steps), "losses": losses,
                  "steps": steps, "train_s": report.meter.get("train_s", 0.0)}
        if model is not None:
            record["model"] = model
        self.records.append(record)
        if turn.mode == "eval" and report.scores:  # its heads' scores, pooled over every site
            self.records = self.pool.add(self.records, turn, self.attempt, report.scores, record,
                                         keep_in_record=self.per_client and self.is_client)
        return True, ""
