"""A participant's state at the end of a round (its :class:`~splitlearn.wire.control.Cursor`: the
next round's start), saved on the coordinator's word and restored when the run rewinds to it (with
an ``--out`` folder)."""

from __future__ import annotations

import copy
from typing import Any

from ..run import checkpoint as checkpoints
from ..run.agreement import Agreement
from ..run.setup import make_optimizer
from ..wire.control import Cursor
from .participant import Participant

__all__ = ["StateSaving"]


class StateSaving(Participant):
    """A :class:`~splitlearn.clients.participant.Participant` that saves its state (checkpoints)."""

    def _extra_state(self) -> dict[str, Any]:
        """More of this participant's state for its checkpoints' manifest (JSON)."""
        return {}

    def capture(self, cursor: Cursor) -> None:
        """Save this party's state as of ``cursor`` (a round's start: the end of the one before): weights,
        optimizers (and the server copies kept per client), the federation's average, the random
        stream, meters, records and the training its noise spent."""
        self.records = self.pool.close(self.records)  # the round's evaluation is over: its pooled record goes in
        pool, tensors = self.pool.checkpoint()  # its scored rows: intervals are drawn when the result asks
        optim = {}
        if self.setup is not None:
            tensors.update(checkpoints.module_tensors(self.setup.modules))
            t, optim = checkpoints.optimizer_tensors(self.setup.optimizer)
            tensors.update(t)
        copies = {}
        for c, (mods, opt) in self.copies.items():
            tensors.update(checkpoints.module_tensors(mods, f"copy.{c}.module."))
            t, copies[c] = checkpoints.optimizer_tensors(opt, f"copy.{c}.optim.")
            tensors.update(t)
        for k, v in (self.global_state or {}).items():
            tensors[f"global.{k}"] = v.detach().cpu().contiguous().clone()
        for k, v in (self.rng.state() if self.rng is not None else {}).items():
            tensors[f"rng.{k}"] = v
        self.checkpoints.save(cursor, tensors, {
            "format": checkpoints.FORMAT, "party": self.name, "optimizer": optim, "copies": copies,
            "random": self.rng is not None, "meter": checkpoints.meter_state(self.link.meter),
            "eval_meter": checkpoints.meter_state(self.eval_meter), "records": self.records, "skipped": self.skipped,
            "refused": self.refused, "train_work": self.train_work, "pool": pool,
            "agreements": {peer: a.state() for peer, a in self.agreements.items()}, **self._extra_state()})

    def restore(self, cursor: Cursor, attempt: int) -> dict[str, Any]:
        """Go back to the state :meth:`capture` saved as of ``cursor``; its manifest (a checkpoint of an
        earlier splitlearn is never listed nor read: :class:`~splitlearn.run.checkpoint.Checkpoints`)."""
        tensors, man = self.checkpoints.load(cursor)
        if self.setup is not None:
            checkpoints.load_modules(self.setup.modules, tensors)
            checkpoints.load_optimizer(self.setup.optimizer, tensors, man["optimizer"])
        self.copies = {}
        for c, entry in man["copies"].items():
            mods = copy.deepcopy(self.setup.modules)
            opt = make_optimizer(self.plan, self.plays, mods)
            checkpoints.load_modules(mods, tensors, f"copy.{c}.module.")
            checkpoints.load_optimizer(opt, tensors, entry, f"copy.{c}.optim.")
            self.copies[c] = (mods, opt)
        if self.global_state is not None:
            self.global_state = {k: tensors[f"global.{k}"] for k in self.global_state}
        self.rng = None
        if man["random"]:
            self.rng = self._random(self.setup.modules if self.setup is not None else {})
            self.rng.load({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
        checkpoints.load_meter(self.link.meter, man["meter"])
        checkpoints.load_meter(self.eval_meter, man["eval_meter"])
        self.records, self.skipped, self.refused, self.train_work = (man["records"], man["skipped"], man["refused"],
                                                                     man["train_work"])
        self.attempt, self.resuming = attempt, False
        self.lent = None
        held = man.get("agreements")
        self.agreements = {str(p): Agreement.loaded(a) for p, a in held.items()} if isinstance(held, dict) else {}
        self.last_round = None  # the federation's record of a round after the cursor: it is trained again
        self.pool.load(man.get("pool"), tensors, self.records)
        self._early.clear()
        self._pending.clear()
        return man
