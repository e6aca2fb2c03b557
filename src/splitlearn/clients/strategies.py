"""Schedules as strategies: what happens around the turns of horizontal clients.

A strategy owns its rounds, which copies of the fixed parties' segments exist, what happens
before a client's turn and after a round, which client an evaluation turn goes to and which
extra connections its clients need. The coordinator (:class:`~splitlearn.clients.roles.Coordinator`)
walks the rounds and asks the strategy; the turns themselves are the ordinary engine session.
A new schedule is one new class here, registered in :data:`STRATEGIES`, plus its test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.plan import ClientsSpec, Plan
from .schedule import Round, Turn, averaging_rounds, epoch_rounds

if TYPE_CHECKING:
    from .roles import Coordinator

__all__ = ["Strategy", "STRATEGIES", "strategy_of", "ring_neighbours"]


def _position(plan: Plan, name: str) -> int:
    """A client's place in the ring, 0-based, from its name ``template-k`` (no list of names)."""
    spec = plan.clients
    prefix = f"{spec.template}-"
    k = int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else 0
    if not 1 <= k <= spec.count or name != f"{prefix}{k}":
        raise ValueError(f"{name!r} is not a client of this plan")
    return k - 1


def ring_neighbours(plan: Plan, a: str, b: str) -> bool:
    """Clients next to each other in the ring of client names: k and k+1, N and 1."""
    i, j, n = _position(plan, a), _position(plan, b), plan.clients.count
    return abs(i - j) == 1 or {i, j} == {0, n - 1}


def _ring_of(plan: Plan, client: str) -> set[str]:
    """The ring neighbours of ``client`` (found by position, not by comparing with every client)."""
    i, n, t = _position(plan, client), plan.clients.count, plan.clients.template
    return {f"{t}-{(i + d) % n + 1}" for d in (-1, 1)} - {client} if n > 1 else set()


class Strategy:
    """The base: every client in turn over its rows, nothing shared, one evaluation per round."""

    name = ""
    averages = False  # the federation averages the clients' weights after every round
    one_model = True  # the run ends with one model (for predict); False: one per client

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return epoch_rounds(plan, shares, test_rows, sites, evaluate_each=False)

    def own_copy(self, turn: Turn) -> bool:
        """Whether a fixed party runs this turn on a copy of its segments kept for the client."""
        return False

    def before_round(self, coord: Coordinator, rnd: Round, names: list[str]) -> list[str]:
        """Prepare the round for the drawn clients ``names``; those who take part."""
        return names

    def before_turn(self, coord: Coordinator, rnd: Round, client: str) -> bool:
        """Prepare ``client``'s turn; False skips it."""
        return True

    def after_round(self, coord: Coordinator, rnd: Round, done: list[str]) -> None:
        """What happens once the round's clients (``done``: those whose turn went through) trained."""

    def eval_client(self, coord: Coordinator, rnd: Round, turn: Turn, done: list[str]) -> tuple[str, str | None] | None:
        """Who runs an evaluation turn and whose weights it scores, when not its own (None: nobody
        can). The run's model is the holder's (the client that trained last); on another site's
        test rows that site scores it with the holder's weights lent for the turn."""
        if turn.client is not None:
            return coord.clients[turn.client], None
        if turn.site is None:
            return (coord.holder, None) if coord.holder is not None else None
        site = coord.clients[turn.site]
        if coord.holder in (None, site):
            return site, None
        return (site, coord.holder) if coord.lend(rnd, coord.holder, site) else None

    def peer_links(self, plan: Plan) -> list[tuple[str, str]]:
        """Connections between clients, as (dialer, listener)."""
        return []

    def weight_senders(self, plan: Plan, client: str) -> set[str]:
        """Clients that may send ``client`` weights directly."""
        return set()

    def describe(self, plan: Plan) -> dict[str, Any]:
        """What ``result.json`` says of the schedule beyond its kind and clients."""
        return {}


class Sequential(Strategy):
    """One client at a time; the weights of the client that trained last go to the next, directly
    between ring neighbours (``handoff = "peer"``) or by way of the coordinator."""

    name = "sequential"

    def before_turn(self, coord: Coordinator, rnd: Round, client: str) -> bool:
        if coord.holder in (None, client):
            return True
        return coord.handoff(rnd, coord.holder, client)

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


class SplitFedV2(Strategy):
    """Every drawn client trains each round from the averaged weights (the federation's), one
    after another against the one server model; then the federation averages them by samples."""

    name = "splitfed_v2"
    averages = True

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return averaging_rounds(plan, shares, test_rows, sites)

    def before_round(self, coord: Coordinator, rnd: Round, names: list[str]) -> list[str]:
        return coord.download(rnd, names)  # the federation's weights first

    def after_round(self, coord: Coordinator, rnd: Round, done: list[str]) -> None:
        coord.average(rnd, done)

    def eval_client(self, coord: Coordinator, rnd: Round, turn: Turn, done: list[str]) -> tuple[str, str | None] | None:
        # given the averaged weights: the site whose test rows it scores, or a client that trained this round
        if turn.site is not None:
            site = coord.clients[turn.site]
            return (site, None) if coord.download(rnd, [site], evaluation=True) else None
        c = next((c for c in done if coord.download(rnd, [c], evaluation=True)), None)
        return (c, None) if c is not None else None

    def describe(self, plan: Plan) -> dict[str, Any]:
        from .layout import federation_of

        c = plan.clients
        return {"federation": federation_of(plan), "local_epochs": c.local_epochs, "local_steps": c.local_steps,
                "fraction": c.fraction}


class SplitFedV1(SplitFedV2):
    """SplitFed v2, with a server copy per client for the round's training, averaged by samples
    into the shared server model at every fixed party after the round."""

    name = "splitfed_v1"

    def own_copy(self, turn: Turn) -> bool:
        return turn.mode == "train"

    def after_round(self, coord: Coordinator, rnd: Round, done: list[str]) -> None:
        coord.average(rnd, done)
        coord.merge_copies_everywhere(done, [rnd.samples[coord.clients.index(c)] for c in done])


class FedAvg(SplitFedV2):
    """Federated averaging: the plan's only party is the clients' (the federation is a role of its
    own); ``local_steps = 1`` over all clients is large-batch SGD."""

    name = "fedavg"


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Sequential(), SplitFedV1(), SplitFedV2(), Independent(),
                                                        FedAvg())}


def strategy_of(spec: ClientsSpec) -> Strategy:
    """The strategy of a ``[clients]`` section."""
    return STRATEGIES[spec.schedule]
