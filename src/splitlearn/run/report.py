"""What a party's run gives back: its :class:`PartyReport` (metrics, accounting, refusals, privacy
spent), the :class:`Progress` told after each step or round, :class:`RunError` naming the parties
that failed, and the per-epoch :class:`Metrics` of the losses a party computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import losses
from ..core.engine import Party
from ..core.metrics import Scores, draws_intervals, evaluation_metrics, scores_loaded, scores_state, token_scores
from ..core.step import StepOutput
from .setup import Step

__all__ = ["RunError", "PartyReport", "Progress", "EpochSums", "STEP_POINTS", "Metrics"]


class RunError(RuntimeError):
    """A run failed; ``errors`` maps each failed party to its error."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"party {p!r} failed: {e}" for p, e in errors.items()))


@dataclass
class PartyReport:
    """What one physical party did, for :func:`~splitlearn.launch.results.build_result`; the same
    for every plan (the clients' fields stay empty without ``[clients]``)."""

    name: str
    metrics: dict[str, dict] = field(default_factory=dict)  # loss name -> per-epoch history (plain runs)
    meter: dict = field(default_factory=dict)  # accounting of training, and timings
    refused: list[str] = field(default_factory=list)
    privacy: dict[str, dict] = field(default_factory=dict)  # wire -> epsilon spent by its noise
    plays: str | None = None  # the plan party it plays (clients: the template)
    eval_meter: dict = field(default_factory=dict)  # clients: the accounting of evaluation, apart
    records: list[dict] = field(default_factory=list)  # clients: one per turn it took part in
    skipped: list[dict] = field(default_factory=list)  # the coordinator: who was skipped, when and why
    modules: dict = field(default_factory=dict, repr=False)  # its trained segments (not in JSON)
    observed: dict = field(default_factory=dict, repr=False)  # what it recorded for the audit (not in JSON)
    predictions: dict = field(default_factory=dict, repr=False)  # predict steps: head -> outputs per batch
    data: dict = field(default_factory=dict)  # the rows it held and trained on, their schema, the alignment
    preprocess: Any = field(default=None, repr=False)  # its fitted preprocessing (saved beside its weights)
    refused_jumps: dict[str, int] = field(default_factory=dict)  # peer -> values refused past a learnt bound
    per_client: dict = field(default_factory=dict, repr=False)  # independent: client -> its own trained segments
    scores: dict[str, list[Scores]] = field(default_factory=dict, repr=False)  # loss -> last evaluation's (not in JSON)
    # [data] validation_fraction: the epoch whose weights it kept (best_epoch), where it stopped early (stopped_at,
    # None: it ran every epoch) and by which figure (metric, loss); none without validation
    stopping: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("modules", "observed", "predictions", "preprocess", "per_client", "scores")
                and not (k == "stopping" and not v)}


@dataclass(frozen=True)
class Progress:
    """How far a run is, told to ``on_step`` after each step (plain plans) or round ([clients])."""

    done: int
    total: int
    epoch: int  # from 0
    epochs: int
    unit: str  # "step" or "round"
    loss: float | None = None  # the training loss of that step (mean over the round's turns)
    mode: str = "train"


@dataclass
class EpochSums:
    """What an epoch of one loss adds up until it closes: the training loss, and each evaluation batch's scores."""

    train_sum: float = 0.0
    train_n: int = 0
    scores: list[Scores] = field(default_factory=list)
    validation: list[Scores] = field(default_factory=list)  # [data] validation_fraction: the validation rows'


STEP_POINTS = 500  # train loss per step: at most this many points are kept (evenly sampled)


class Metrics:
    """Per-epoch history of the losses a party computes: train loss, the figures on the validation rows
    (``[data] validation_fraction``: ``val_<name>``, every epoch) and the test figures of
    :func:`~splitlearn.core.metrics.evaluation_metrics` (loss, rows scored, for classification
    accuracy and the clinical metrics, for regression MAE, RMSE and R²); the last evaluation's 95 %
    bootstrap intervals (``ci95``) and curves; the train loss per step. ``scores``: the last
    evaluation's scored rows per loss (a ``[clients]`` evaluation pools them over every site)."""

    def __init__(self, party: Party, tracker: Any = None, setup: Any = None):
        plan = party.graph.plan
        self.setup = setup  # a PartySetup: the scale of a standardised target (setup.scale_of), undone here
        self.tracker = tracker  # a splitlearn.run.tracking.Tracker: values streamed as they come
        self.kinds = {n.name: plan.losses[n.name].kind for n in party.graph.losses() if n.party == party.name}
        self.hist = {k: {"train_loss": [], "test_loss": [], "test_accuracy": []} for k in self.kinds}
        self.steps: dict[str, list[list[float]]] = {k: [] for k in self.kinds}
        self.acc = {k: EpochSums() for k in self.kinds}
        self.ci: dict[str, dict] = {}  # loss -> the last evaluation's intervals
        self.curves: dict[str, dict] = {}  # loss -> the last evaluation's curves (core.metrics.curves)
        self.scores: dict[str, list[Scores]] = {}  # loss -> the last evaluation's scores, batch by batch
        self.unsettled: set[str] = set()  # losses whose last evaluation's intervals and curves are not drawn yet

    def add(self, step: Step, out: StepOutput) -> None:
        n = len(step.rows)
        for k, v in out.losses.items():
            a = self.acc[k]
            if step.mode == "train":
                a.train_sum, a.train_n = a.train_sum + v * n, a.train_n + n
                self.steps[k].append([step.id, v])
                if self.tracker is not None:
                    self.tracker.log({f"{k}/train_loss_step": v}, step.id)
            else:
                (a.validation if step.split == "validation" else a.scores).append(self._scores(k, out, v * n, n))

    def _scores(self, k: str, out: StepOutput, loss_sum: float, rows: int) -> Scores:
        """An evaluation batch's scores of loss ``k``: class probabilities, else the decided values (a
        standardised target's in its own units), and the rows decided right (classification)."""
        kind = losses.get(self.kinds[k])
        pred, true = out.predictions[k], out.targets[k]
        if kind.tokens:  # a language model: scored per counted token, not per row
            return token_scores(pred, true, rows, kind.ignore_index)
        right = kind.correct(pred, true) if kind.classification else None
        if kind.probabilities is not None:
            return Scores(kind.probabilities(pred.float()).numpy(), true.numpy(), loss_sum, rows, right)
        decided, target = kind.decide(pred.float()).numpy().reshape(-1), true.numpy().reshape(-1)
        scale = self.setup.scale_of(k) if self.setup is not None and not kind.classification else None
        if scale is not None:  # metrics in the target's own units
            decided, target = scale.undo(decided), scale.undo_target(target)
        return Scores(decided, target, loss_sum, rows, right)

    def close_epoch(self, epoch: int) -> None:
        for k, a in self.acc.items():
            h = self.hist[k]
            before = {name: len(v) for name, v in h.items()}
            if a.train_n:
                h["train_loss"].append(a.train_sum / a.train_n)
            for name, value in evaluation_metrics(self.kinds[k], a.validation, intervals=False).items():  # val_<name>
                h.setdefault(f"val_{name[len('test_'):]}", []).append(value)
            found = evaluation_metrics(self.kinds[k], a.scores, intervals=False)  # the last one's: when asked
            if found:
                self.scores[k] = a.scores
                self.unsettled.add(k)
                for name, value in found.items():
                    h.setdefault(name, []).append(value)
            if self.tracker is not None:
                self.tracker.log({f"{k}/{name}": v[-1] for name, v in h.items()
                                  if len(v) > before.get(name, 0) and v[-1] is not None}, epoch)
            self.acc[k] = EpochSums()

    def settle(self, only: set[str] | None = None) -> None:
        """The last evaluation's 95 % intervals and curves, drawn once they are asked for (the history): a thousand
        bootstrap resamples at every epoch would be the parties' largest cost. ``only``: these losses only."""
        for k in sorted(self.unsettled if only is None else self.unsettled & only):
            found = evaluation_metrics(self.kinds[k], self.scores[k])
            self.ci.pop(k, None), self.curves.pop(k, None)
            if "ci95" in found:
                self.ci[k], self.curves[k] = found["ci95"], found["curves"]
        self.unsettled -= self.unsettled if only is None else only

    def checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(state, tensors) for a checkpoint after a training step (no evaluation pending). The last evaluation's
        intervals and curves are not drawn for it (a thousand resamples at every epoch's checkpoint were most of a
        small model's epoch end): its scored rows go in the checkpoint instead (``unsettled``: each loss's summed
        loss, rows and rows decided right; the tensors ``metrics.LOSS.outputs`` and ``.targets``:
        :func:`~splitlearn.core.metrics.scores_state`), from which :meth:`load` lets them be drawn when asked."""
        assert not any(a.scores or a.validation for a in self.acc.values()), "a checkpoint falls between evaluation steps"
        self.settle({k for k in self.unsettled if not draws_intervals(self.kinds[k])})  # nothing to draw: no rows kept
        unsettled, tensors = scores_state({k: self.scores[k] for k in self.unsettled}, "metrics.")
        return {"hist": self.hist, "steps": self.steps, "ci": self.ci, "curves": self.curves, "unsettled": unsettled,
                "acc": {k: [a.train_sum, a.train_n, 0.0, 0, 0] for k, a in self.acc.items()}}, tensors  # no test rows

    def load(self, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Back to what :meth:`checkpoint` saved (``tensors``: the checkpoint's)."""
        self.hist, self.steps, self.ci, self.curves = state["hist"], state["steps"], state.get("ci", {}), \
            state.get("curves", {})
        self.scores = scores_loaded(state.get("unsettled", {}), tensors or {}, "metrics.")
        self.unsettled = set(self.scores)
        for k, (ts, tn, _vs, vn, _right) in state["acc"].items():
            if vn:
                raise ValueError(f"a checkpoint of loss {k!r} falls between evaluation steps ({vn} test rows pending)")
            self.acc[k] = EpochSums(ts, tn)

    def history(self, intervals: bool = True) -> dict[str, dict[str, list]]:
        """Each loss's per-epoch lists, with ``train_loss_steps``: [step id, loss] pairs, sampled,
        ``ci95``: the last evaluation's intervals, and ``curves``: its curves for the report (``intervals``
        False: neither, none drawn: a ``[clients]`` turn's figures, whose pooled record has them)."""
        if intervals:
            self.settle()
        out = {}
        for k, h in self.hist.items():
            pts = self.steps[k]
            every = max(1, -(-len(pts) // STEP_POINTS))
            out[k] = {**h, "train_loss_steps": pts[::every]}
            if intervals:
                out[k].update({**({"ci95": self.ci[k]} if self.ci.get(k) else {}),
                               **({"curves": self.curves[k]} if self.curves.get(k) else {})})
        return out
