"""What every physical party of a ``[clients]`` plan derives alike from the plan: the graph, each
client's rows and the rounds of the schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import losses
from ..core.graph import build_graph
from ..core.plan import Plan
from ..run.setup import PartySetup
from .schedule import Round, Turn, client_shares, eval_steps, rounds

__all__ = ["Context", "client_labels"]


@dataclass
class Context:
    """The graph, the clients' training rows (``shares``), the rounds and their turns by index;
    ``tests``: with per-client data, each client's own test rows."""

    graph: Any
    ids_hash: str
    shares: list[np.ndarray]
    rounds: list[Round]
    turns: dict[int, Turn]
    tests: list[np.ndarray] | None = None

    @classmethod
    def from_setup(cls, plan: Plan, setup: PartySetup) -> "Context":
        """The shares of one dataset (the template party's ``setup``): every party derives them alike."""
        shares = client_shares(plan, setup.splits.train, client_labels(plan, setup))
        rs = rounds(plan, shares, setup.splits.test)
        return cls(setup.graph, setup.ids_hash, shares, rs, _turns(rs))

    @classmethod
    def from_counts(cls, plan: Plan, train: list[int], test: list[int], me: int | None = None,
                    setup: PartySetup | None = None) -> "Context":
        """Each client reads its own file: its rows are its own (the client ``me`` knows their
        positions; every other party only how many there are, from the census)."""
        shares = [np.arange(n, dtype=np.int64) for n in train]
        tests = [np.arange(n, dtype=np.int64) for n in test]
        if me is not None and setup is not None:
            shares[me], tests[me] = setup.splits.train, setup.splits.test
        sites = [k for k, n in enumerate(test) if n > 0]  # every evaluation scores each of them
        rs = rounds(plan, shares, tests[0] if tests else np.zeros(0, dtype=np.int64), sites)
        return cls(build_graph(plan), "", shares, rs, _turns(rs), tests)

    def steps_of(self, plan: Plan, turn: Turn, client: int) -> tuple:
        """A turn's steps; with per-client data an evaluation runs on its site's own test rows."""
        if self.tests is None or turn.mode != "eval":
            return turn.steps
        site = client if turn.site is None else turn.site
        return eval_steps(plan, self.tests[site], turn.steps[0].epoch if turn.steps else 0)


def _turns(rs: list[Round]) -> dict[int, Turn]:
    return {t.index: t for r in rs for t in (*r.train, *r.evals)}


def client_labels(plan: Plan, setup: PartySetup) -> np.ndarray | None:
    """Class labels of the training rows for a Dirichlet partition: the template's field that a
    classification loss takes as its target (None for an iid partition: no labels needed)."""
    from ..run.rows import party_table

    spec = plan.clients
    if spec.partition.kind != "dirichlet":
        return None
    holds = plan.parties[spec.template].holds
    fields = [holds[t.split(".", 1)[1]].field for t in (loss.target for loss in plan.losses.values()
                                                        if losses.is_classification(loss.kind))
              if t.split(".", 1)[0] == spec.template and t.split(".", 1)[1] in holds]
    if not fields:
        return None
    table = party_table(plan, spec.template).align(setup.splits.ids)
    y = np.asarray(table.fields.get(fields[0]))
    return y.reshape(len(y), -1)[:, 0][setup.splits.train] if y.dtype.kind in "iub" else None
