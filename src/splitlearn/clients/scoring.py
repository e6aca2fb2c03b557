"""Test metrics of a ``[clients]`` run pooled over every site's test rows: a turn's session keeps
its heads' evaluation scores (:class:`~splitlearn.run.report.Metrics`, given back as the report's
``scores``), and :class:`EvaluationPool` writes one pooled record per evaluation: the figures of
:func:`~splitlearn.core.metrics.evaluation_metrics` over the union of the rows (never a mean of
per-client figures). Its bootstrap intervals and curves are drawn for the last pooled record only, once asked
(:meth:`EvaluationPool.settle`: the report; a checkpoint keeps the record's scored rows instead,
:meth:`EvaluationPool.checkpoint`), as a plain plan's party draws them (:meth:`~splitlearn.run.report.Metrics.settle`)."""

from __future__ import annotations

import numpy as np

from ..core.metrics import Scores, draws_intervals, evaluation_metrics, scores_loaded, scores_state
from ..core.plan import Plan
from .schedule import Turn

__all__ = ["EvaluationPool"]


class EvaluationPool:
    """A head's scores of the current evaluation (every site it scores), per loss; ``of``: the
    (round, attempt) of that evaluation."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.scores: dict[str, list[Scores]] = {}
        self.of: tuple[int, int] | None = None
        self.unsettled: tuple[dict, dict[str, list[Scores]]] | None = None  # the last pooled record, its scores

    def add(self, records: list[dict], turn: Turn, attempt: int, scored: dict[str, list[Scores]], record: dict,
            keep_in_record: bool) -> list[dict]:
        """Add an evaluation turn's scores (``records`` with the previous evaluation's pooled record
        written if this turn starts a new one). ``keep_in_record``: a client head with its own
        test rows also keeps its scores in the turn's record (``outputs``, ``targets``, ``loss_sum``,
        ``rows``, for classification ``right``), so the run's result can pool them over every client."""
        if self.of != (turn.round, attempt):
            records = self.close(records)
            self.of = (turn.round, attempt)
        for loss, parts in scored.items():
            self.scores.setdefault(loss, []).extend(parts)
            if keep_in_record:
                kept = record.setdefault("scores", {})[loss] = {
                    "outputs": np.concatenate([p.outputs for p in parts]).tolist(),
                    "targets": np.concatenate([p.targets for p in parts]).tolist(),
                    "loss_sum": float(sum(p.loss_sum for p in parts)), "rows": int(sum(p.rows for p in parts))}
                if all(p.right is not None for p in parts):  # classification: the rows decided right
                    kept["right"] = int(sum(p.right for p in parts))
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
                  "losses": {k: evaluation_metrics(self.plan.losses[k].kind, v, intervals=False)
                             for k, v in self.scores.items()}}
        self.unsettled = (pooled, self.scores)
        self.clear()
        return [r for r in records if not (r["mode"] == "pooled" and r["round"] == rnd)] + [pooled]

    def settle(self) -> None:
        """Draw the last pooled record's 95 % intervals and curves (once: the record in ``records`` gets them)."""
        if self.unsettled is not None:
            pooled, scores = self.unsettled
            for k, v in scores.items():
                found = evaluation_metrics(self.plan.losses[k].kind, v)
                pooled["losses"][k].update({n: found[n] for n in ("ci95", "curves") if n in found})
            self.unsettled = None

    def checkpoint(self) -> tuple[dict | None, dict]:
        """(state, tensors) for a checkpoint: the unsettled pooled record's round and its scored rows
        (:func:`~splitlearn.core.metrics.scores_state`, tensors ``pool.LOSS.outputs`` and ``.targets``), so that
        its intervals are drawn once, when the result asks, not at every round's checkpoint."""
        if self.unsettled is not None and not any(draws_intervals(self.plan.losses[k].kind) for k in self.unsettled[1]):
            self.settle()  # nothing to draw (a language model's, decided classes): no rows kept
        if self.unsettled is None:
            return None, {}
        pooled, scores = self.unsettled
        summary, tensors = scores_state(scores, "pool.")
        return {"round": pooled["round"], "scores": summary}, tensors

    def load(self, state: dict | None, tensors: dict, records: list[dict]) -> None:
        """Back to what :meth:`checkpoint` saved, the unsettled record being the pooled one of ``records`` (the
        checkpoint's) of its round."""
        self.reset()
        if state is not None:
            pooled = next(r for r in reversed(records) if r["mode"] == "pooled" and r["round"] == state["round"])
            self.unsettled = (pooled, scores_loaded(state["scores"], tensors, "pool."))

    def clear(self) -> None:
        self.scores, self.of = {}, None

    def reset(self) -> None:
        """Nothing pooled, nothing to settle (a rewind: the records are the checkpoint's)."""
        self.clear()
        self.unsettled = None
