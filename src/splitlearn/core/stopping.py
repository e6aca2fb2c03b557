"""Validation and early stopping: the best epoch, agreed by every party (``[data] validation_fraction``,
``[train] early_stop``).

With ``validation_fraction`` every epoch ends with evaluation steps on validation rows carved from the
training rows (:func:`~splitlearn.run.setup.schedule`); the test rows are scored once, after the last epoch.
The party computing the watched loss (``early_stop.loss``, else the plan's only or first loss) reads the
epoch's figure (``early_stop.metric``, default ``val_loss``) and applies the rule (:class:`Rule`): an epoch
whose figure beats the best so far by more than ``min_delta`` becomes the best epoch; ``patience`` epochs in
a row without one stop the run (without ``early_stop`` it never stops, and the best epoch is the lowest
``val_loss``'s).

**The verdict is the network's.** After each epoch's last validation step the parties agree on it over a
tree spanning every party linked by a wire (:func:`~splitlearn.core.precision.agreement_tree` with label
wires too, so a party that only sends labels hears it): the party with the figure sends its parent a CREDIT
whose text is ``best <epoch>`` or ``stop <epoch>`` (the best epoch so far, and whether to stop), each party on
the way to the root passes it up as it came, and the root sends it down to every child, which sends it on.
So every party knows (best epoch, stop?) at the same step, and only messages travel (threads and party
processes alike). Each keeps a copy of its modules' state at the best epoch (in memory and in its
checkpoints, with the agreed best epoch and the rule's state, so a resume goes on identically); on ``stop``
every party drops the training epochs left, and the test steps follow at once, numbered on from the step
just settled (so every party skips the same steps). Before the test steps every party loads the best epoch's
weights: the test figures, the saved weights and ``predict`` are the best epoch's.

A verdict is taken only from the party's parent or the child on the way to the party with the figure, for
the epoch being settled, once (the parent's only after this party told its own, and then only the one it
told); its epoch must be the epoch being settled or the best one agreed before, and its word ``stop`` exactly
when ``patience`` epochs have passed since that epoch. Anything else is refused naming the peer. So a hostile
peer can choose which of those two epochs is kept, or stop the run as the rule would, and nothing more: as the
party with the figure could by lying about it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..wire.messages import Kind, Message, quote
from .precision import Place, agreement_tree

if TYPE_CHECKING:
    from ..wire.link import Link
    from .graph import Graph
    from .plan import Plan

__all__ = ["unlinked", "WORDS", "check_plan", "watched_loss", "Rule", "EpochAgreement", "copy_state"]

WORDS = ("best", "stop")  # an epoch verdict's first word
_VERDICT = re.compile(r"^(best|stop) (0|[1-9][0-9]{0,8})$")


def check_plan(plan: Plan) -> None:
    """A ValueError naming the entry where validation or early stopping cannot work: ``early_stop`` without
    ``[data] validation_fraction``, validation rows in a party's own data, an unknown or
    missing ``early_stop.loss``, or a figure the watched loss does not give."""
    from . import losses
    from .metrics import EXTRA_METRICS, METRICS, REGRESSION_METRICS

    stop, fraction = plan.train.early_stop, plan.data.validation_fraction
    for p, spec in plan.parties.items():
        if spec.data is not None and spec.data.validation_fraction is not None:
            raise ValueError(f"parties.{p}.data.validation_fraction: the validation rows are carved alike by every "
                             "party: set validation_fraction in [data]")
    if stop is None and fraction is None:
        return
    if stop is None:
        return
    if fraction is None:
        raise ValueError("train.early_stop needs validation rows to watch: set [data] validation_fraction "
                         "(e.g. 0.1 of the training rows)")
    if stop.loss is None and len(plan.losses) > 1:
        raise ValueError(f"train.early_stop.loss: the plan has several losses ({sorted(plan.losses)}): say whose "
                         f"{stop.metric} is watched")
    if stop.loss is not None and stop.loss not in plan.losses:
        raise ValueError(f"train.early_stop.loss {stop.loss!r} is no loss of the plan ({sorted(plan.losses)})")
    name = watched_loss(plan)
    kind = plan.losses[name].kind
    found = losses.get(kind)
    if found.classification and found.probabilities is not None:
        gives = ["loss", "rows", *METRICS]
    elif found.classification:
        gives = ["loss", "rows", "accuracy"]
    else:
        gives = ["loss", "rows", *REGRESSION_METRICS]
    gives += [m for m in getattr(kind, "metrics", ()) if m in EXTRA_METRICS]
    figure = stop.metric[len("val_"):]
    if figure not in gives or figure == "rows":
        accepted = [f"val_{m}" for m in gives if m != "rows"]
        raise ValueError(f"train.early_stop.metric {stop.metric!r}: loss {name!r} ({kind}) gives none; it gives "
                         f"{accepted} (an extra metric once listed in losses.{name}.metrics)")


def watched_loss(plan: Plan) -> str:
    """The loss whose validation figure decides: ``early_stop.loss``, else the plan's first."""
    stop = plan.train.early_stop
    return stop.loss if stop is not None and stop.loss is not None else next(iter(plan.losses))


class Rule:
    """The early-stopping rule at the party with the figure: the best value and epoch so far."""

    def __init__(self, plan: Plan):
        stop = plan.train.early_stop
        self.metric = stop.metric if stop is not None else "val_loss"
        self.smaller = (stop.direction if stop is not None else "min") == "min"
        self.min_delta = stop.min_delta if stop is not None else 0.0
        self.best: float | None = None  # the best epoch's value (None: no finite one yet)

    def better(self, value: float | None) -> bool:
        """Whether ``value`` improves on the best so far by more than ``min_delta`` (None or NaN never does)."""
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.smaller else value > self.best + self.min_delta

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best}

    def load(self, state: dict[str, Any]) -> None:
        value = state.get("best_value")
        if value is not None and type(value) is not float:
            raise ValueError(f"not an early-stopping rule's state: {state!r}")
        self.best = value


def copy_state(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every module's state (weights and buffers), as it is now."""
    return {seg: {k: v.detach().clone() for k, v in m.state_dict().items()} for seg, m in modules.items()}


def unlinked(graph: Graph) -> list[str]:
    """The parties no chain of wires links to the party whose validation figure decides (they could never hear the
    epoch verdicts): a plan with validation rows and such a party is refused."""
    places = agreement_tree(graph, every_wire=True)

    def root(p: str) -> str:
        while places[p].parent is not None:
            p = places[p].parent
        return p

    home = root(graph.nodes[watched_loss(graph.plan)].party)
    return [p for p in graph.parties if root(p) != home]


class EpochAgreement:
    """One party's side of the epoch verdicts (see the module's docstring).

    ``steps``: per epoch, the message step of its last validation step (what each verdict names); ``error``:
    what the party raises when it cannot go on (the engine's ``PartyError``)."""

    def __init__(self, graph: Graph, name: str, link: Link, steps: list[int], error: type[Exception]):
        plan = graph.plan
        self.name, self.link, self.steps, self.error = name, link, steps, error
        stop = plan.train.early_stop
        self.patience = stop.patience if stop is not None else None
        self.loss = watched_loss(plan)
        self.holder = graph.nodes[self.loss].party  # the party with the figure
        self.metric = stop.metric if stop is not None else "val_loss"
        places = agreement_tree(graph, every_wire=True)
        self.place: Place = places[name]
        self.toward = self._toward(places)  # the child on the way to the holder (None: the holder is not below)
        if name in unlinked(graph):  # (prepare() refuses such a plan before any party starts)
            raise error(f"{name}: no wire links it to {self.holder!r}, whose {self.metric} decides the best epoch, "
                        "so it cannot learn it")
        self.rule = Rule(plan) if name == self.holder else None
        self.epoch = 0  # the epoch being settled next
        self.best: int | None = None  # the best epoch agreed so far
        self.stopped: int | None = None  # the epoch after which the run stopped
        self.heard: str | None = None  # the verdict of the child on the way to the holder
        self.decided: str | None = None  # the parent's
        self.told = ""  # what this party told its parent
        self.settling = False  # between an epoch's last validation step and its verdict
        self.later: dict[int, Message] = {}  # the parent's decisions of later epochs, come early (a lagging consumer)
        self.kept: dict[str, dict[str, torch.Tensor]] | None = None  # its modules' state at the best epoch

    def _toward(self, places: dict[str, Place]) -> str | None:
        """The child of this party whose subtree holds the holder (None if none does)."""
        p = self.holder
        while p is not None and places[p].parent is not None:
            if places[p].parent == self.name:
                return p
            p = places[p].parent
        return None

    @property
    def on_path(self) -> bool:
        """Whether this party tells its parent a verdict (the holder is it or below it)."""
        return self.name == self.holder or self.toward is not None

    # -- messages ------------------------------------------------------------------------------

    @staticmethod
    def owns(msg: Message) -> bool:
        """Whether a text CREDIT is an epoch verdict (its first word ``best`` or ``stop``)."""
        return msg.text.partition(" ")[0] in WORDS

    def take(self, msg: Message) -> None:
        """An epoch verdict from a neighbour in the tree, or it is refused naming why."""
        problem = self._problem(msg)
        if problem == "":
            return  # a duplicate of a settled epoch's
        if problem is not None:
            self.link.refuse(msg.sender, problem, msg.step, msg.wire)
        elif msg.sender == self.place.parent:
            self.decided = msg.text
        else:
            self.heard = msg.text

    def _problem(self, msg: Message) -> str | None:
        edges = self.place.edges
        if msg.sender not in edges:
            return "no epoch verdict is expected from it (it is no neighbour in this party's agreement tree)"
        if msg.wire != edges[msg.sender] or msg.tensors:
            return f"a verdict names wire {edges[msg.sender]!r} and carries no tensor"
        if msg.step in self.steps[:self.epoch]:
            return ""
        if msg.sender == self.place.parent and not self.on_path and msg.step in self.steps[self.epoch + 1:] \
                and msg.step not in self.later and _VERDICT.match(msg.text):
            self.later[msg.step] = msg  # checked when this party settles that epoch
            return ""
        if self.epoch >= len(self.steps) or msg.step != self.steps[self.epoch]:
            return (f"an epoch verdict for step {msg.step}, which ends no epoch this party is settling"
                    + (f" (epoch {self.epoch} ends at step {self.steps[self.epoch]})" if self.epoch < len(self.steps)
                       else ""))
        parent = msg.sender == self.place.parent
        if not parent and msg.sender != self.toward:
            return f"an epoch verdict from a child not on the way to {quote(self.holder)}, whose figure decides"
        problem = self._text_problem(msg.text)
        if problem is not None:
            return problem
        if (self.decided if parent else self.heard) is not None:
            return f"a second epoch verdict for step {msg.step}"
        if parent and self.on_path and not self.told:
            return "a decision before this party told its own verdict"
        if parent and self.told and msg.text != self.told:
            return f"a decision {quote(msg.text)} other than the verdict {self.told!r} this party told"
        return None

    def _text_problem(self, text: str) -> str | None:
        """Why a verdict's text is not one the epoch being settled may have, or None."""
        m = _VERDICT.match(text)
        if m is None:
            return f"an epoch verdict is 'best <epoch>' or 'stop <epoch>', not {quote(text)}"
        word, best = m.group(1), int(m.group(2))
        allowed = sorted({self.epoch} | ({self.best} if self.best is not None else set()))
        if best not in allowed:
            return (f"best epoch {best} is out of range after epoch {self.epoch}: it is "
                    + " or ".join(map(str, allowed)) + (" (the best agreed so far, or this one)" if len(allowed) > 1
                                                        else " (the first)"))
        stops = self.patience is not None and self.epoch - best >= self.patience
        if (word == "stop") != stops:
            return (f"{quote(text)} after epoch {self.epoch}: the run stops exactly when {self.patience} epochs "
                    f"have passed since the best one" if self.patience is not None
                    else f"{quote(text)}: this plan has no early_stop, so it never stops")
        return None

    def waiting(self) -> list[str]:
        """The verdicts this party waits for (a timeout's message names them)."""
        if not self.settling:
            return []
        out = [f"the epoch verdict of {self.toward}"] if self.toward is not None and self.heard is None else []
        return out + ([f"the epoch decision of {self.place.parent}"] if self.place.parent and self.decided is None
                      else [])

    # -- settling an epoch ---------------------------------------------------------------------

    def settle(self, epoch: int, figure: Callable[[], float | None],
               wait: Callable[[Callable[[], bool]], None]) -> tuple[int, bool]:
        """After epoch ``epoch``'s last validation step: the agreed (best epoch, stop). ``figure()``: the
        epoch's validation figure (read at the holder only); ``wait(done)`` takes messages until ``done()`` (the
        engine's :meth:`~splitlearn.core.engine.Party.wait_after`, which hands the verdicts to :meth:`take`)."""
        assert epoch == self.epoch, f"settling epoch {epoch}, but epoch {self.epoch} is next"
        self.settling = True
        if self.rule is not None:
            value = figure()
            best = epoch if self.rule.better(value) or self.best is None else self.best
            if self.rule.better(value):
                self.rule.best = value
            stops = self.patience is not None and epoch - best >= self.patience
            verdict = f"{'stop' if stops else 'best'} {best}"
        else:
            wait(lambda: self.toward is None or self.heard is not None)
            verdict = self.heard or ""
        if self.place.parent is not None:
            if self.on_path:
                self.told = verdict
                self._send(self.place.parent, verdict)
            wait(lambda: self.decided is not None)
            verdict = self.decided
        if not verdict:  # a single party with no figure of its own cannot happen (check_plan, __init__)
            raise self.error(f"{self.name}: no epoch verdict reached it")
        for c in self.place.children:
            self._send(c, verdict)
        word, _, number = verdict.partition(" ")
        self.best, self.epoch = int(number), epoch + 1
        self.heard = self.decided = None
        self.told, self.settling = "", False
        if word == "stop":
            self.stopped = epoch
        held = self.later.pop(self.steps[self.epoch], None) if self.epoch < len(self.steps) else None
        if held is not None:
            self.take(held)
        return self.best, word == "stop"

    def _send(self, peer: str, verdict: str) -> None:
        self.link.send(Message(Kind.CREDIT, self.name, peer, self.steps[self.epoch], self.place.edges[peer],
                               text=verdict))

    # -- checkpoints ---------------------------------------------------------------------------

    def keep(self, modules: dict[str, torch.nn.Module]) -> None:
        """Keep a copy of ``modules``' state as the best epoch's."""
        self.kept = copy_state(modules)

    def use_best(self, modules: dict[str, torch.nn.Module]) -> None:
        """Load the best epoch's state into ``modules`` (for the test steps, the saved weights and predict)."""
        for seg, m in modules.items():
            if self.kept is not None and seg in self.kept:
                m.load_state_dict(self.kept[seg])

    def state(self) -> dict[str, Any]:
        """For a checkpoint taken between epochs."""
        return {"epoch": self.epoch, "best_epoch": self.best, "stopped_at": self.stopped,
                **(self.rule.state() if self.rule is not None else {})}

    def load(self, state: dict[str, Any]) -> None:
        epoch, best, stopped = state.get("epoch"), state.get("best_epoch"), state.get("stopped_at")
        if type(epoch) is not int or not (best is None or type(best) is int) or not (
                stopped is None or type(stopped) is int):
            raise ValueError(f"not an epoch agreement's state: {state!r}")
        self.epoch, self.best, self.stopped = epoch, best, stopped
        if self.rule is not None:
            self.rule.load(state)
