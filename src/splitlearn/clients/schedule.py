"""Schedules for horizontal clients: who trains on which rows, in which order (pure logic).

A plan with a ``[clients]`` section has ``count`` clients that all play its ``template`` party,
each on its own share of the training rows (:func:`client_shares`). :func:`rounds` lists, for
every round, the *turns*: one client running a list of steps against the plan's other parties
(the same steps :func:`splitlearn.run.setup.schedule` yields for a single client), and what
happens to the client weights around them:

=============== ====================================================================
sequential      clients in turn over their rows (one round = one epoch); the weights
                of the client that trained last go to the next (``handoff``).
splitfed_v1/v2  every drawn client trains each round from the averaged weights,
fedavg          then the federation averages them (sample-weighted FedAvg); v1 also
                keeps a server copy per client, averaged the same way.
independent     clients in turn, nothing shared: each client has its own bottom and
                its own server copy, and each is evaluated on its own.
=============== ====================================================================

Every party computes the same rounds from the plan, so only the coordinator's typed instructions
(:mod:`splitlearn.wire.control`) travel, never the rounds themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import batches, partition
from ..core.plan import Plan

__all__ = ["Turn", "Round", "client_shares", "rounds", "epoch_rounds", "averaging_rounds", "eval_steps"]


@dataclass(frozen=True)
class Turn:
    """Steps one client runs against the fixed parties; ``client`` is None for an evaluation
    turn whose weights the coordinator picks when it gets there (the run's model: the holder of
    the latest weights, or the federation's average). ``site``: the client whose own test rows an
    evaluation scores (each client's file; it runs the turn), None for the plan's test rows."""

    index: int
    round: int
    mode: str  # "train" or "eval"; "plan": the trivial schedule's one turn, every step of a plain plan
    client: int | None
    steps: tuple  # of run.setup.Step
    site: int | None = None

    @property
    def rows(self) -> int:
        return sum(len(s.rows) for s in self.steps)


@dataclass(frozen=True)
class Round:
    index: int
    epoch: int  # the epoch this round belongs to (metrics are reported per epoch)
    clients: tuple[int, ...]  # who trains, in order
    train: tuple[Turn, ...]
    evals: tuple[Turn, ...] = ()  # after the round (and after averaging); empty between epochs
    average: bool = False  # the federation averages the clients' weights after the train turns
    samples: dict[int, int] = field(default_factory=dict)  # client -> rows it trains on this round (FedAvg weights)


def client_shares(plan: Plan, train_rows: np.ndarray, labels: np.ndarray | None) -> list[np.ndarray]:
    """Each client's training rows (positions into the aligned data), from the plan's partition."""
    spec = plan.clients
    assert spec is not None
    alpha = spec.partition.alpha if spec.partition.kind == "dirichlet" else None
    if alpha is not None and labels is None:
        from ..core.specs import PlanError

        raise PlanError(f"a dirichlet partition needs class labels: {spec.template!r} holds no target of a "
                        "classification loss", entry="clients.partition", hint='use partition = "iid"')
    parts = partition(labels if labels is not None else np.zeros(len(train_rows)), spec.count, alpha=alpha,
                      seed=plan.train.seed)
    return [train_rows[p] for p in parts]


def _steps(rows: list[np.ndarray], mode: str, epoch: int) -> tuple:
    """A turn's steps, numbered from 0: a turn is a session of its own (its hello names the turn)."""
    from ..run.setup import Step

    return tuple(Step(i, mode, epoch, torch.from_numpy(np.asarray(b))) for i, b in enumerate(rows))


def rounds(plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
           sites: list[int] | None = None) -> list[Round]:
    """Every round of the plan's schedule (the same at every party); turns are numbered globally.
    ``sites``: the clients that hold test rows of their own (per-client data); every evaluation
    then scores each of them, so the run's figures are pooled over all their test rows."""
    from ..core.strategy import STRATEGIES

    return STRATEGIES.get(plan.clients.schedule).rounds(plan, shares, test_rows, sites)


def eval_steps(plan: Plan, test_rows: np.ndarray, epoch: int) -> tuple:
    """An evaluation turn's steps over ``test_rows``, in order."""
    t = plan.train
    return _steps([test_rows[b] for b in batches(len(test_rows), t.eval_batch_size, t.seed, epoch, shuffle=False)],
                  "eval", epoch)


class _Batches:
    """The batches and evaluation turns every schedule draws from, numbered alike at every party."""

    def __init__(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray, sites: list[int] | None = None):
        self.plan, self.shares, self.test_rows, self.sites = plan, shares, test_rows, sites
        self.turn_ids = iter(range(1 << 62))

    def of(self, k: int, pass_: int) -> list[np.ndarray]:
        # client 0 draws exactly the batches of a plan without clients (run.setup.schedule)
        t = self.plan.train
        return [self.shares[k][b] for b in batches(len(self.shares[k]), t.batch_size, t.seed + 7919 * k, pass_)]

    def turn(self, r: int, mode: str, client: int | None, rows: list[np.ndarray], epoch: int) -> Turn:
        return Turn(next(self.turn_ids), r, mode, client, _steps(rows, mode, epoch))

    def evals(self, r: int, epoch: int, clients: list[int | None]) -> tuple[Turn, ...]:
        """Evaluation turns: one per entry of ``clients`` (None: the run's model); with per-client
        test rows, the run's model once on every site's rows (a client of its own: on its rows)."""
        steps = eval_steps(self.plan, self.test_rows, epoch)
        if self.sites is None:
            return tuple(Turn(next(self.turn_ids), r, "eval", c, steps) for c in clients)
        pairs = [(None, k) for k in self.sites] if clients == [None] else [(c, c) for c in clients if c in self.sites]
        return tuple(Turn(next(self.turn_ids), r, "eval", c, steps, site) for c, site in pairs)


def epoch_rounds(plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray, sites: list[int] | None = None, *,
                 evaluate_each: bool) -> list[Round]:
    """One round per epoch, every client in order over its rows; then one evaluation turn (its
    client picked by the coordinator), or one per client with ``evaluate_each``."""
    b, n = _Batches(plan, shares, test_rows, sites), plan.clients.count
    out = []
    for epoch in range(plan.train.epochs):
        order = list(range(n))
        train = tuple(b.turn(epoch, "train", k, b.of(k, epoch), epoch) for k in order)
        who: list[int | None] = list(range(n)) if evaluate_each else [None]
        out.append(Round(epoch, epoch, tuple(order), train, b.evals(epoch, epoch, who),
                         samples={k: len(shares[k]) for k in order}))
    return out


def averaging_rounds(plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
                     sites: list[int] | None = None) -> list[Round]:
    """Rounds of ``local_epochs`` passes (or ``local_steps`` batches) per drawn client (a
    ``fraction`` of them), each followed by averaging; evaluation after each epoch's last round."""
    spec, t = plan.clients, plan.train
    n = spec.count
    rng = np.random.default_rng([t.seed, 7])
    b = _Batches(plan, shares, test_rows, sites)
    if spec.local_steps is None and t.epochs % spec.local_epochs:
        from ..core.specs import PlanError

        raise PlanError(f"clients.local_epochs ({spec.local_epochs}) must divide train.epochs ({t.epochs})",
                        entry="clients.local_epochs", hint="a round is local_epochs passes over each client's rows")
    per_pass = max(math.ceil(len(s) / t.batch_size) for s in shares)
    if spec.local_steps is None:
        total, per_epoch = math.ceil(t.epochs / spec.local_epochs), 1
    else:
        per_epoch = max(1, math.ceil(per_pass / spec.local_steps))
        total = t.epochs * per_epoch
    cursor = [0] * n  # batches each client has consumed (its stream of passes)
    out: list[Round] = []
    for r in range(total):
        drawn = max(1, round(spec.fraction * n))
        clients = sorted(rng.choice(n, size=drawn, replace=False).tolist()) if drawn < n else list(range(n))
        epoch = r // per_epoch  # local_epochs: one round is one reporting period
        train = []
        samples = {}
        for k in clients:
            if spec.local_steps is None:
                first = cursor[k] // max(1, math.ceil(len(shares[k]) / t.batch_size))
                rows = [x for p in range(first, first + spec.local_epochs) for x in b.of(k, p)]
            else:
                rows = []
                for _ in range(spec.local_steps):
                    nb = math.ceil(len(shares[k]) / t.batch_size)
                    p, i = divmod(cursor[k] + len(rows), nb)
                    rows.append(b.of(k, p)[i])
            cursor[k] += len(rows)
            samples[k] = sum(len(x) for x in rows)
            train.append(b.turn(r, "train", k, rows, epoch))
        last_of_epoch = (r + 1) % per_epoch == 0 or r == total - 1
        out.append(Round(r, epoch, tuple(clients), tuple(train), b.evals(r, epoch, [None]) if last_of_epoch else (),
                         True, samples))
    return out
