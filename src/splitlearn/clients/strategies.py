"""The built-in strategies of a ``[clients]`` schedule, registered in
:data:`splitlearn.core.strategy.STRATEGIES` (a user's strategy registers there the same way).

A strategy owns its rounds (:mod:`splitlearn.clients.schedule`), which copies of the fixed
parties' segments exist, and, shaped like Flower's, configures each round as typed actions
(:mod:`splitlearn.clients.actions`): :meth:`Strategy.configure_train` before the training turns,
:meth:`Strategy.aggregate_train` once they went through (:class:`RoundResult`), and
:meth:`Strategy.configure_evaluate` for each evaluation turn. The coordinator carries the actions
out; a strategy never calls back into it. It also says which extra connections its clients need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.plan import Plan
from ..core.strategy import STRATEGIES
from .actions import Action, Average, Download, Evaluate, HandOff, MergeCopies, RoundResult, Train
from .roles import federation_of
from .schedule import Round, Turn, averaging_rounds, epoch_rounds

__all__ = ["Strategy", "Sequential", "Independent", "SplitFedV2", "SplitFedV1", "FedAvg", "Trivial", "TRIVIAL",
           "strategy_of"]


def _position(plan: Plan, name: str) -> int:
    """A client's place in the ring, 0-based, from its name ``template-k`` (no list of names)."""
    spec = plan.clients
    prefix = f"{spec.template}-"
    k = int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else 0
    if not 1 <= k <= spec.count or name != f"{prefix}{k}":
        raise ValueError(f"{name!r} is not a client of this plan")
    return k - 1


def _ring_of(plan: Plan, client: str) -> set[str]:
    """The ring neighbours of ``client`` (found by position, not by comparing with every client)."""
    i, n, t = _position(plan, client), plan.clients.count, plan.clients.template
    return {f"{t}-{(i + d) % n + 1}" for d in (-1, 1)} - {client} if n > 1 else set()


def _names(plan: Plan, indices: Any) -> list[str]:
    names = plan.clients.names()
    return [names[k] for k in indices]


class Strategy:
    """The base: every client in turn over its rows, nothing shared, one evaluation per round (of
    the run's model: the weights of the client that trained last)."""

    name = ""
    one_model = True  # the run ends with one model (for predict); False: one per client
    averages = False  # its rounds end with Average (the federation's): clients.secure_aggregation may protect it
    coordinated = True  # a coordinator walks the rounds and instructs the others (False: each party derives them)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse ``[clients.options]`` this strategy does not take (a ValueError naming them)."""
        if options:
            raise ValueError(f"schedule {self.name!r} takes no options, got {sorted(options)}")

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return epoch_rounds(plan, shares, test_rows, sites, evaluate_each=False)

    def own_copy(self, turn: Turn) -> bool:
        """Whether a fixed party runs this turn on a copy of its segments kept for the client."""
        return False

    def configure_train(self, plan: Plan, rnd: Round, clients: list[str]) -> list[Action]:
        """The round's actions up to and including its training turns; ``clients``: those drawn."""
        return [Train(t, c) for t, c in zip(rnd.train, _names(plan, (t.client for t in rnd.train))) if c in clients]

    def aggregate_train(self, plan: Plan, rnd: Round, result: RoundResult) -> list[Action]:
        """What happens once the round's training turns are over (asked only if some went through)."""
        return []

    def configure_evaluate(self, plan: Plan, rnd: Round, turn: Turn, result: RoundResult,
                           holder: str | None) -> list[Action]:
        """The actions of evaluation turn ``turn`` (none: nobody can run it). ``holder``: the client
        that trained last in the run. The run's model is the holder's; on another site's test
        rows that site scores it with the holder's weights lent for the turn."""
        if turn.client is not None:
            return [Evaluate(turn, (_names(plan, [turn.client])[0],))]
        if turn.site is None:
            return [Evaluate(turn, (holder,))] if holder is not None else []
        site = _names(plan, [turn.site])[0]
        if holder in (None, site):
            return [Evaluate(turn, (site,))]
        return [Evaluate(turn, (site,), model=holder)]

    def peer_links(self, plan: Plan) -> list[tuple[str, str]]:
        """Connections between clients, as (dialer, listener)."""
        return []

    def weight_senders(self, plan: Plan, client: str) -> set[str]:
        """Clients that may send ``client`` weights directly."""
        return set()

    def describe(self, plan: Plan) -> dict[str, Any]:
        """What ``result.json`` says of the schedule beyond its kind and clients."""
        return {}

    def summary(self, plan: Plan) -> str:
        """How the clients train, in a few words (the plan's picture, ``splitlearn inspect``)."""
        return "every client trains in turn"


class Sequential(Strategy):
    """One client at a time; the weights of the client that trained last go to the next, directly
    between ring neighbours (``handoff = "peer"``) or by way of the coordinator."""

    name = "sequential"

    def configure_train(self, plan: Plan, rnd: Round, clients: list[str]) -> list[Action]:
        out: list[Action] = []
        for t in super().configure_train(plan, rnd, clients):
            out += [HandOff(t.client), t]
        return out

    def peer_links(self, plan: Plan) -> list[tuple[str, str]]:
        names = plan.clients.names()
        if plan.clients.handoff != "peer" or len(names) < 2:
            return []
        out = [(names[k], names[k - 1]) for k in range(1, len(names))]
        return out + ([(names[0], names[-1])] if len(names) > 2 else [])

    def weight_senders(self, plan: Plan, client: str) -> set[str]:
        if plan.clients.handoff != "peer":
            return set()
        return _ring_of(plan, client)

    def describe(self, plan: Plan) -> dict[str, Any]:
        return {"handoff": plan.clients.handoff}

    def summary(self, plan: Plan) -> str:
        how = ("each passes its segments straight to the next client" if plan.clients.handoff == "peer"
               else "each hands its segments to the server, which gives them to the next")
        return f"one client at a time; {how}"


class Independent(Strategy):
    """Nothing shared: each client has its own bottom and its own server copy, and each is
    evaluated on its own."""

    name = "independent"
    one_model = False

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return epoch_rounds(plan, shares, test_rows, sites, evaluate_each=True)

    def own_copy(self, turn: Turn) -> bool:
        return True

    def summary(self, plan: Plan) -> str:
        return "every client trains its own model; nothing is shared"


class SplitFedV2(Strategy):
    """Every drawn client trains each round from the averaged weights (the federation's), one
    after another against the one server model; then the federation averages them by samples."""

    name = "splitfed_v2"
    averages = True

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return averaging_rounds(plan, shares, test_rows, sites)

    def configure_train(self, plan: Plan, rnd: Round, clients: list[str]) -> list[Action]:
        return [Download(tuple(clients)), *super().configure_train(plan, rnd, clients)]  # the average first

    def aggregate_train(self, plan: Plan, rnd: Round, result: RoundResult) -> list[Action]:
        return [Average(result.trained)]

    def configure_evaluate(self, plan: Plan, rnd: Round, turn: Turn, result: RoundResult,
                           holder: str | None) -> list[Action]:
        # given the averaged weights: the site whose test rows it scores, or a client that trained this round
        if turn.site is not None:
            return [Evaluate(turn, (_names(plan, [turn.site])[0],), federation_weights=True)]
        return [Evaluate(turn, result.trained, federation_weights=True)] if result.trained else []

    def describe(self, plan: Plan) -> dict[str, Any]:
        c = plan.clients
        rule = "secure_threshold" if c.secure_threshold else "ceil(2n/3) of the n clients a round draws"
        secure = {"secure_aggregation": {"threshold": c.secure_floor(), "rule": rule}} if c.secure_aggregation else {}
        return {"federation": federation_of(plan), "local_epochs": c.local_epochs, "local_steps": c.local_steps,
                "fraction": c.fraction, **secure}

    def summary(self, plan: Plan) -> str:
        return f"clients train in each round, {federation_of(plan)} averages their segments"


class SplitFedV1(SplitFedV2):
    """SplitFed v2, with a server copy per client for the round's training, averaged by samples
    into the shared server model at every fixed party after the round."""

    name = "splitfed_v1"

    def own_copy(self, turn: Turn) -> bool:
        return turn.mode == "train"

    def aggregate_train(self, plan: Plan, rnd: Round, result: RoundResult) -> list[Action]:
        return [Average(result.trained), MergeCopies(result.trained)]


class FedAvg(SplitFedV2):
    """Federated averaging: the plan's only party is the clients' (the federation is a role of its
    own); ``local_steps = 1`` over all clients is large-batch SGD."""

    name = "fedavg"


class Trivial(Strategy):
    """A plain plan's schedule: one fixed set of parties, one round whose one turn is every step of
    the plan (training and evaluation, in order; :func:`splitlearn.run.setup.schedule`). Nobody
    coordinates: every party derives the round from the plan, so no instruction travels, and a
    plan whose parties are not all linked (multi-hop, ``dial_out``) needs no link it lacks. Not a
    ``[clients]`` schedule (not registered)."""

    name = "trivial"
    coordinated = False

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None, validation: np.ndarray | None = None) -> list[Round]:
        """Round 0, whose one turn (mode ``"plan"``) runs the plan's steps over ``shares[0]`` (the
        training rows), ``validation`` (``[data] validation_fraction``'s rows) and ``test_rows``, numbered as
        every party numbers them."""
        from ..run.rows import Splits
        from ..run.setup import schedule

        more = () if validation is None else (validation,)
        steps = tuple(schedule(plan, Splits(np.empty(0), shares[0], test_rows, *more)))  # ids: not read by it
        return [Round(0, 0, (), (Turn(0, 0, "plan", None, steps),))]

    def configure_train(self, plan: Plan, rnd: Round, clients: list[str]) -> list[Action]:
        return []  # nobody instructs: every party runs the round's one turn

    def summary(self, plan: Plan) -> str:
        return "every party takes part in every step"


TRIVIAL = Trivial()

for _builtin in (Sequential(), SplitFedV1(), SplitFedV2(), Independent(), FedAvg()):
    STRATEGIES.register(_builtin.name, _builtin)


def strategy_of(plan: Plan) -> Strategy:
    """The strategy of a plan: its ``[clients]`` schedule's, or the trivial one of a plain plan."""
    return TRIVIAL if plan.clients is None else STRATEGIES.get(plan.clients.schedule)
