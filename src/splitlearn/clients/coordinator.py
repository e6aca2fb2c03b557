"""The coordinator of a ``[clients]`` run: walks the rounds, carries out the actions its strategy
configures (:mod:`splitlearn.clients.actions`), skips and reports clients that fail, and stops
everyone at the end.

It waits for an answer at most ``clients.timeout`` seconds; a client that does not answer is
skipped for that turn and reported (``skipped`` in the result): it may answer again later.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..core.engine import PartyError
from ..core.specs import PlanError
from ..run.report import PartyReport, Progress
from ..wire.control import Census, CensusAnswer, Cursor, Rows, Stop, TakeTurn, TurnDone
from ..wire.messages import quote
from ..wire.transport import TransportError
from .actions import Action, Average, Download, Evaluate, HandOff, MergeCopies, RoundResult, Train
from .instructing import PartyRejoined
from .recovery import Recovery
from .schedule import Round, Turn
from .transfers import WeightTransfers

__all__ = ["Coordinator", "schema_difference"]

log = logging.getLogger(__name__)


class Coordinator(Recovery, WeightTransfers):
    """Walks the strategy's rounds; skips clients that do not answer; stops everyone at the end
    (its state: :class:`~splitlearn.clients.instructing.Instructing`)."""

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        self.open_tracker()
        try:
            self.coordinate(progress)
        finally:
            self.close_tracker()
        return self.report()

    def _extra_state(self) -> dict[str, Any]:
        return {"holder": self.holder}

    def restore(self, cursor: Cursor, attempt: int) -> dict[str, Any]:
        man = super().restore(cursor, attempt)
        self.holder = man["holder"]
        return man

    def coordinate(self, progress: Callable[[Progress], None] | None = None) -> None:
        """Walk the rounds; then tell every party to stop: plainly when the run is done, with the
        reason when it failed (so every party ends saying how the run really ended)."""
        fixed = [p for p in self.plan.parties if p != self.spec.template and p != self.name]
        others = fixed + ([self.federation] if self.federation not in (self.name, *fixed) else [])
        everyone = [*others, *self.clients]
        try:
            self._walk(fixed, everyone, progress)
        except BaseException as e:  # (Ctrl-C, SIGTERM: it was stopped; every party says so)
            self._stop(everyone, f"{self.name} was stopped ({str(e) or 'Ctrl-C'})" if isinstance(e, KeyboardInterrupt)
                       else str(e) or type(e).__name__)
            raise
        self._stop(everyone, None)

    def _stop(self, everyone: list[str], reason: str | None) -> None:
        for p in everyone:
            try:
                self._instruct(p, Stop(reason[:600] if reason else None))
            except TransportError:
                pass

    def _walk(self, fixed: list[str], everyone: list[str], progress: Callable[[Progress], None] | None) -> None:
        others = [p for p in everyone if p not in self.clients]
        if self.per_client:
            self.census(others)
        i = 0
        if self.checkpoints is not None:
            i = self.rewind(everyone, "resuming") if self.resuming else None
            if i is None:  # from the start: every party saves its state before the first round
                if self.resuming:  # nothing in common: every party (resuming too) starts over
                    self.start_over_everyone(everyone)
                self.checkpoint_everyone(-1, everyone)
                i = 0
        while i < len(self.rounds):
            rnd = self.rounds[i]
            try:
                self._round(rnd, fixed)
                if self.checkpoints is not None:
                    self.checkpoint_everyone(rnd.index, everyone, rnd)
            except PartyRejoined as e:
                i = self.rewind(everyone, f"{e.party} came back as a new process")
                if i is None:
                    raise PartyError(f"{self.name}: {e.party} came back as a new process, but no checkpoint is "
                                     "held by every party") from None
                continue
            if progress is not None:
                progress(self._progress(rnd))
            i += 1

    # -- a round: the strategy's actions, carried out in order ---------------------------------
    def _round(self, rnd: Round, fixed: list[str]) -> None:
        out: set[str] = set()  # clients an action could not prepare: their later training turns are skipped
        trained: list[str] = []
        drawn = [self.clients[k] for k in rnd.clients]
        for action in self.strategy.configure_train(self.plan, rnd, drawn):
            self._carry_out(action, rnd, fixed, out, trained)
        result = RoundResult(tuple(trained), tuple(c for c in drawn if c in out))
        if trained:
            for action in self.strategy.aggregate_train(self.plan, rnd, result):
                self._carry_out(action, rnd, fixed, out, trained)
        for turn in rnd.evals:
            for action in self.strategy.configure_evaluate(self.plan, rnd, turn, result, self.holder):
                self._carry_out(action, rnd, fixed, out, trained)

    def _carry_out(self, action: Action, rnd: Round, fixed: list[str], out: set[str], trained: list[str]) -> None:
        if isinstance(action, Download):
            loaded = self._download(rnd, action.clients)
            out.update(c for c in action.clients if c not in loaded)
        elif isinstance(action, HandOff):
            if action.client not in out and not self._hand_off(rnd, action.client):
                out.add(action.client)
        elif isinstance(action, Train):
            if action.client in out:
                return
            if self._turn(rnd, action.turn, action.client, fixed):
                trained.append(action.client)
                self.holder = action.client
            else:
                out.add(action.client)
        elif isinstance(action, Average):
            self._average(rnd, action.clients)
        elif isinstance(action, MergeCopies):
            self._merge_copies_everywhere(rnd, action.clients)
        elif isinstance(action, Evaluate):
            self._evaluate(rnd, action, fixed)
        else:
            raise PlanError(f"schedule {self.spec.schedule!r} asked for {action!r}, which is no action of "
                            "splitlearn.clients.actions", entry="clients.schedule")

    def _evaluate(self, rnd: Round, action: Evaluate, fixed: list[str]) -> None:
        if action.federation_weights:
            pick = next((c for c in action.candidates if self._download(rnd, [c], evaluation=True)), None)
        elif action.model is not None:
            pick = action.candidates[0] if self._lend(rnd, action.model, action.candidates[0]) else None
        else:
            pick = action.candidates[0] if action.candidates else None
        if pick is not None:
            self._turn(rnd, action.turn, pick, fixed, model=action.model)

    def _turn(self, rnd: Round, turn: Turn, client: str, fixed: list[str], model: str | None = None) -> bool:
        """``client`` takes its turn (evaluating ``model``'s weights, lent to it, when not its own)."""
        rid = 0
        for p in [client, *fixed]:
            try:
                r = self._instruct(p, TakeTurn(turn.index, client, model))
                rid = r if p == client else rid
            except TransportError as e:
                self._skip(rnd, client, f"{turn.mode} turn", f"cannot reach {p}: {e}")
                return False
        if not self.in_turns:  # a plan of one party (FedAvg): the client trains alone and says when it is done
            limit = self.step_timeout * max(1, len(turn.steps))  # as long as its steps may take
            gone = self.gone([client])  # (a client gone meanwhile is not waited for)
            ans = self.replies([client], limit, rid, TurnDone, gone=gone)
            if client in ans and ans[client].ok:
                return True
            self._skip(rnd, client, f"{turn.mode} turn", (gone(client) or f"no answer within {limit:g} s")
                       if client not in ans else f"its turn failed: {ans[client].why}")
            return False
        ok, why = self.run_turn(turn, client, model)
        if not ok:
            self._skip(rnd, client, f"{turn.mode} turn", why)
        return ok

    def _progress(self, rnd: Round) -> Progress:
        losses = [v["train_loss"] for r in self.records if r["round"] == rnd.index and r["mode"] == "train"
                  for v in r["losses"].values() if v.get("train_loss") is not None]
        return Progress(rnd.index + 1, len(self.rounds), rnd.epoch, self.plan.train.epochs, "round",
                        sum(losses) / len(losses) if losses else None)

    def census(self, others: list[str]) -> None:
        """Per-client data: ask every client how many rows it holds and what they look like (no
        row travels); the first client's schema is the one the others must have; then tell
        everyone the counts, from which each derives the same rounds. A client that does not
        answer gets no rows (and no turns)."""
        rid = next(self._requests)
        for c in self.clients:
            try:
                self._instruct(c, Census(), rid)
            except TransportError as e:
                log.warning("%s: census: cannot reach %s: %s", self.name, c, e)
        ans = self.replies(self.clients, self.timeout, rid, CensusAnswer)
        train, test, first = [], [], None
        for c in self.clients:
            if c not in ans:
                self.skipped.append({"round": 0, "client": c, "during": "census", "reason": "no answer"})
                train.append(0)
                test.append(0)
                continue
            schema = ans[c].schema
            if first is None:
                first = (c, schema)
            elif schema != first[1]:
                problem = schema_difference(first[1], schema, first[0], c)
                for p in [*others, *self.clients]:  # every party stops, naming the problem
                    try:
                        self._instruct(p, Stop(problem))
                    except TransportError:
                        pass
                raise PlanError(problem, entry=f"parties.{self.spec.template}.data",
                                hint="every client's file needs the same columns, dtypes, image shape and classes")
            train.append(ans[c].train)
            test.append(ans[c].test)
        self._counts = (train, test)
        for p in [*others, *self.clients]:
            try:
                self._instruct(p, Rows(tuple(train), tuple(test)))
            except TransportError as e:
                log.warning("%s: census: cannot reach %s: %s", self.name, p, e)
        self.use_counts(train, test)


def schema_difference(a: dict, b: dict, who_a: str, who_b: str) -> str:
    """The first difference of two data schemas, naming both parties, the field and both values."""
    a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
    for f in sorted(set(a) | set(b)):
        fa, fb = a.get(f), b.get(f)
        if not isinstance(fa, dict) or not isinstance(fb, dict):
            if f not in a or f not in b:
                return f"{who_a if f in a else who_b} holds field {f!r}, {who_b if f in a else who_a} does not"
            if fa != fb:
                return f"the data of {who_b} differs from {who_a}'s in field {f!r}: {quote(fb)} and {quote(fa)}"
            continue
        for k in sorted(set(fa) | set(fb)):
            va, vb = fa.get(k), fb.get(k)
            if va != vb:
                if k == "columns" and isinstance(va, list) and isinstance(vb, list):
                    extra = [c for c in vb if c not in va][:3] or [c for c in va if c not in vb][:3]
                    at = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
                    return (f"the data of {who_b} differs from {who_a}'s in field {f!r}: column {at} is "
                            f"{quote(vb[at] if at < len(vb) else None)} at {who_b} and "
                            f"{quote(va[at] if at < len(va) else None)} at {who_a} (columns only one has: {extra})")
                return (f"the data of {who_b} differs from {who_a}'s in field {f!r}: its {k} is {quote(vb)} at "
                        f"{who_b} and {quote(va)} at {who_a}")
    return f"the data of {who_b} differs from {who_a}'s"
