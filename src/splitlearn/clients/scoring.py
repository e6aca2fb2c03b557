"""Test metrics of a ``[clients]`` run pooled over every site's test rows: a turn's party keeps
its heads' evaluation outputs (:class:`ScoringParty`), and :class:`EvaluationPool` writes one
pooled record per evaluation (never a mean of per-client figures)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core import losses
from ..core.engine import Party
from ..core.plan import Plan
from .schedule import Turn

__all__ = ["Scores", "pooled_metrics", "ScoringParty", "EvaluationPool"]

Scores = tuple[np.ndarray, np.ndarray, float, int]  # head outputs (probabilities), targets, loss sum, rows


def pooled_metrics(kind: str, parts: list[Scores]) -> dict[str, Any]:
    """Test metrics over the union of the rows of ``parts`` (several clients' test rows), computed
    on all the rows together (never a mean of per-client figures): the test loss, the rows, those
    of :mod:`splitlearn.core.metrics` (classification, or regression) and their 95 % bootstrap
    intervals (``ci95``)."""
    from ..core.metrics import bootstrap_ci, classification_metrics, curves, regression_metrics

    rows = sum(n for *_, n in parts)
    if not rows:
        return {}
    out: dict[str, Any] = {"test_loss": sum(s for _, _, s, _ in parts) / rows, "test_rows": rows}
    outputs = np.concatenate([o for o, *_ in parts])
    targets = np.concatenate([t for _, t, *_ in parts])
    lk = losses.get(kind)
    if lk.probabilities is None and lk.classification:  # no probabilities: accuracy only
        out["test_accuracy"] = float((outputs.reshape(-1) == targets.reshape(-1)).mean())
        return out
    classification = lk.probabilities is not None
    found = (classification_metrics if classification else regression_metrics)(outputs, targets)
    out.update({f"test_{k}": v for k, v in found.items()})
    out["ci95"] = {f"test_{k}": v for k, v in bootstrap_ci(outputs, targets, classification=classification).items()}
    out["curves"] = curves(outputs, targets, classification=classification)
    return out


class ScoringParty(Party):
    """A turn's party that keeps its heads' outputs of evaluation steps, with the targets and the
    loss, so the run's test metrics can be pooled over every client's test rows."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.scored: dict[str, list[Scores]] = {}

    def step(self, step: int, rows: torch.Tensor, mode: Any) -> Any:
        out = super().step(step, rows, mode)
        if mode == "eval":
            for k, pred in out.predictions.items():
                if k in out.targets and k in out.losses:
                    kind = losses.get(self.graph.plan.losses[k].kind)
                    pred = pred.detach().float().cpu()
                    probs = kind.probabilities(pred) if kind.probabilities is not None else kind.decide(pred)
                    self.scored.setdefault(k, []).append((probs.numpy(), out.targets[k].detach().cpu().numpy(),
                                                          out.losses[k] * len(rows), len(rows)))
        return out


class EvaluationPool:
    """A head's scores of the current evaluation (every site it scores), per loss; ``of``: the
    (round, attempt) of that evaluation."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.scores: dict[str, list[Scores]] = {}
        self.of: tuple[int, int] | None = None

    def add(self, records: list[dict], turn: Turn, attempt: int, scored: dict[str, list[Scores]], record: dict,
            keep_in_record: bool) -> list[dict]:
        """Add an evaluation turn's scores (``records`` with the previous evaluation's pooled record
        written if this turn starts a new one). ``keep_in_record``: a client head with its own
        test rows also keeps its scores in the turn's record, so the run's result can pool them
        over every client."""
        if self.of != (turn.round, attempt):
            records = self.close(records)
            self.of = (turn.round, attempt)
        for loss, parts in scored.items():
            self.scores.setdefault(loss, []).extend(parts)
            if keep_in_record:
                record.setdefault("scores", {})[loss] = {
                    "outputs": np.concatenate([o for o, *_ in parts]).tolist(),
                    "targets": np.concatenate([t for _, t, *_ in parts]).tolist(),
                    "loss_sum": float(sum(x for *_, x, _ in parts)), "rows": int(sum(n for *_, n in parts))}
        return records

    def close(self, records: list[dict]) -> list[dict]:
        """``records`` with the pooled record of the evaluation whose scores are pooled (``mode =
        "pooled"``: the metrics over the union of every site's test rows); the pool emptied."""
        if not self.scores or self.of is None:
            return records
        rnd = self.of[0]
        evals = [r for r in records if r["mode"] == "eval" and r["round"] == rnd and set(r["losses"]) & set(self.scores)]
        pooled = {"mode": "pooled", "round": rnd, "epoch": evals[-1]["epoch"] if evals else 0,
                  "turns": [r["turn"] for r in evals], "clients": [r["client"] for r in evals],
                  "rows": sum(r["rows"] for r in evals),
                  "losses": {k: pooled_metrics(self.plan.losses[k].kind, v) for k, v in self.scores.items()}}
        self.clear()
        return [r for r in records if not (r["mode"] == "pooled" and r["round"] == rnd)] + [pooled]

    def clear(self) -> None:
        self.scores, self.of = {}, None
