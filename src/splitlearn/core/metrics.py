"""Clinical metrics of a head, from its outputs and the true targets.

ROC AUC (one-vs-rest, macro, for several classes; None unless every class is among the rows), F1 (binary; for
several classes the macro mean over the classes in the rows or predictions), sensitivity and specificity (binary:
class 1 is the positive one) come from scikit-learn; the expected calibration error is the usual 10-bin estimate
(bins of equal width over the confidence of the decided class), which scikit-learn does not provide. Regression
heads get MAE, RMSE and R² (scikit-learn).
Every headline figure comes with the rows it was computed on and a 95 % percentile bootstrap
interval (:func:`bootstrap_ci`: 1,000 resamples of the rows, a fixed seed, so a run and its
resumed twin give the same interval).
:func:`evaluation_metrics` gives every test figure of a run from its scored rows (:class:`Scores`), whether one
party scored them in one session or several sites' scores are pooled.

A plan's ``[losses.NAME] metrics = ["balanced_accuracy", ...]`` adds figures by name from
:data:`EXTRA_METRICS` (:func:`register_metric` adds one; a plan read by a party process or a Ray
actor sees the built-ins only). They come from scikit-learn, like the figures above: it is a
dependency already, it computes in float64 on the scored rows as they are kept and pooled here
(numpy, on the host, over the union of every batch or site), so a figure is exact and the same
wherever it is pooled, and it is one import; ``torchmetrics`` would add a package whose strength,
accumulating per batch on the device, this path does not need (the scores are already pooled).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.text import IGNORE_INDEX
from . import losses
from .registry import Registry

__all__ = ["METRICS", "REGRESSION_METRICS", "classification_metrics", "regression_metrics",
           "expected_calibration_error", "bootstrap_ci", "curves", "BOOTSTRAP_ROUNDS", "CURVE_POINTS",
           "Scores", "evaluation_metrics", "Metric", "EXTRA_METRICS", "register_metric", "check_metrics",
           "token_scores", "scores_state", "scores_loaded", "draws_intervals"]

METRICS = ("accuracy", "roc_auc", "f1", "sensitivity", "specificity", "ece")  # per epoch, as test_<name>
REGRESSION_METRICS = ("mae", "rmse", "r2")  # per epoch, as test_<name>
BOOTSTRAP_ROUNDS = 1000


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share of rows."""
    confidence, decided = probs.max(1), probs.argmax(1)
    right = (decided == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
    return float(total)


def classification_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """``probs`` (rows, classes) sum to one per row; ``targets`` the classes. A figure the rows cannot give: None."""
    from sklearn.metrics import f1_score, recall_score, roc_auc_score

    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only up to rounding
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    k = probs.shape[1]
    decided = probs.argmax(1)
    labels = list(range(k))
    out: dict[str, float | None] = {"accuracy": float((decided == targets).mean())}
    present = np.unique(targets)
    if k == 2:
        out["roc_auc"] = float(roc_auc_score(targets, probs[:, 1])) if len(present) == 2 else None
        out["f1"] = float(f1_score(targets, decided, labels=labels, zero_division=0))
        out["sensitivity"] = float(recall_score(targets, decided, pos_label=1, labels=labels, zero_division=0))
        out["specificity"] = float(recall_score(targets, decided, pos_label=0, labels=labels, zero_division=0))
    else:
        out["roc_auc"] = (float(roc_auc_score(targets, probs, multi_class="ovr", average="macro", labels=labels))
                          if len(present) == k else None)
        seen = sorted(set(present.tolist()) | set(np.unique(decided).tolist()))  # an absent class is no 0 to average
        out["f1"] = float(f1_score(targets, decided, labels=seen, average="macro", zero_division=0))
    out["ece"] = expected_calibration_error(probs, targets)
    return out


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """Mean absolute error, root mean squared error and R² (None for fewer than two rows or constant targets)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
    true = np.asarray(targets, dtype=np.float64).reshape(-1)
    out: dict[str, float | None] = {"mae": float(mean_absolute_error(true, pred)),
                                    "rmse": float(np.sqrt(mean_squared_error(true, pred)))}
    out["r2"] = float(r2_score(true, pred)) if len(true) > 1 and np.ptp(true) > 0 else None
    return out


_Figure = Callable[[np.ndarray, np.ndarray], "float | None"]  # (outputs, targets) -> a figure, None where undefined


@dataclass(frozen=True)
class Metric:
    """An extra test figure a loss may ask by name (``[losses.NAME] metrics``), as ``test_<name>``.

    ``fn(outputs, targets)``: ``classification``: class probabilities (rows, classes; each row sums to
    one) and the true classes; else predicted and true values (a standardised target's in its own
    units). It gives None where the rows cannot give the figure."""

    name: str
    fn: _Figure
    classification: bool


EXTRA_METRICS: Registry[Metric] = Registry("metric")  # the built-ins are registered below


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Add a metric under its name (a taken name only with ``replace``); plans validated afterwards may name it."""
    return EXTRA_METRICS.register(metric.name, metric, replace=replace)


def check_metrics(kind: str, names: Sequence[str]) -> None:
    """A ValueError unless every name is a metric of :data:`EXTRA_METRICS` of loss kind ``kind``'s sort
    (classification metrics need a kind with class probabilities, regression ones a kind without an
    accuracy), none named twice nor one every such loss gives anyway."""
    if not names:
        return
    found = losses.get(kind)
    if found.classification and found.probabilities is None:
        raise ValueError(f"loss kind {kind!r} gives no class probabilities, so no extra metrics: remove 'metrics'")
    classification = found.classification
    sort = "classification" if classification else "regression"
    may = [m.name for m in EXTRA_METRICS.values() if m.classification == classification]
    fits = f"loss kind {kind!r} ({sort}) may ask {may}"
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"metric {name!r} is named twice")
        if name in (*METRICS, *REGRESSION_METRICS, "loss", "rows"):
            raise ValueError(f"metric {name!r} is given as test_{name} without asking; {fits}")
        if name not in EXTRA_METRICS:
            raise ValueError(f"unknown metric {name!r}; {fits}")
        if EXTRA_METRICS[name].classification != classification:
            other = "regression" if classification else "classification"
            raise ValueError(f"metric {name!r} is a {other} metric; {fits}")


def _classes(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised float64 probabilities, int64 targets and the decided classes."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    return probs, np.asarray(targets).astype(np.int64).reshape(-1), probs.argmax(1)


def _sklearn(name: str) -> Callable[..., float]:
    """``sklearn.metrics.<name>``, imported when first called (scikit-learn is slow to import)."""
    def score(*args: Any, **kwargs: Any) -> float:
        import sklearn.metrics

        return getattr(sklearn.metrics, name)(*args, **kwargs)
    return score


def _decided_metric(score: Callable[..., float]) -> _Figure:
    def fn(probs: np.ndarray, targets: np.ndarray) -> float | None:
        _, t, decided = _classes(probs, targets)
        return float(score(t, decided))
    return fn


def _average_precision(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Binary: of class 1's probability; several classes: the macro mean one-vs-rest (scikit-learn's
    ``average="macro"``). None unless every class is among the rows (as ROC AUC)."""
    from sklearn.metrics import average_precision_score

    p, t, _ = _classes(probs, targets)
    k = p.shape[1]
    if len(np.unique(t)) < k:
        return None
    if k == 2:
        return float(average_precision_score(t, p[:, 1]))
    return float(np.mean([average_precision_score(t == c, p[:, c]) for c in range(k)]))


def _log_loss(probs: np.ndarray, targets: np.ndarray) -> float | None:
    from sklearn.metrics import log_loss

    p, t, _ = _classes(probs, targets)
    return float(log_loss(t, p, labels=list(range(p.shape[1]))))


def _brier(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Binary: scikit-learn's ``brier_score_loss`` of class 1's probability; several classes: the mean over
    rows of the squared distance to the one-hot target (what scikit-learn 1.7 on gives with ``labels``)."""
    from sklearn.metrics import brier_score_loss

    p, t, _ = _classes(probs, targets)
    if p.shape[1] == 2:
        return float(brier_score_loss(t, p[:, 1], pos_label=1))
    return float(((p - np.eye(p.shape[1])[t]) ** 2).sum(1).mean())


def _precision(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Binary: of class 1; several classes: the macro mean over the classes in the rows or predictions (as F1)."""
    from sklearn.metrics import precision_score

    p, t, decided = _classes(probs, targets)
    if p.shape[1] == 2:
        return float(precision_score(t, decided, pos_label=1, labels=[0, 1], zero_division=0))
    seen = sorted(set(np.unique(t).tolist()) | set(np.unique(decided).tolist()))
    return float(precision_score(t, decided, labels=seen, average="macro", zero_division=0))


def _values_metric(score: Callable[..., float], *, spread: bool = False) -> _Figure:
    def fn(predictions: np.ndarray, targets: np.ndarray) -> float | None:
        pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
        true = np.asarray(targets, dtype=np.float64).reshape(-1)
        if spread and not (len(true) > 1 and np.ptp(true) > 0):  # a share of the target's variance: undefined
            return None
        return float(score(true, pred))
    return fn


def _builtin_metrics() -> None:
    for name, fn in (("balanced_accuracy", _decided_metric(_sklearn("balanced_accuracy_score"))),
                     ("matthews_corrcoef", _decided_metric(_sklearn("matthews_corrcoef"))),
                     ("cohen_kappa", _decided_metric(_sklearn("cohen_kappa_score"))),
                     ("average_precision", _average_precision), ("log_loss", _log_loss), ("brier_score", _brier),
                     ("precision", _precision)):
        register_metric(Metric(name, fn, classification=True))
    for name, fn in (("explained_variance", _values_metric(_sklearn("explained_variance_score"), spread=True)),
                     ("median_absolute_error", _values_metric(_sklearn("median_absolute_error"))),
                     ("max_error", _values_metric(_sklearn("max_error"))),
                     ("mape", _values_metric(_sklearn("mean_absolute_percentage_error")))):
        register_metric(Metric(name, fn, classification=False))


def _auc_rows(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of each bootstrap resample against boolean ``positive``: ``scores`` and ``positive`` are the
    original rows (n,), ``counts`` (resamples, n) how often each row is drawn. The Mann-Whitney statistic
    (ties count one half, as scikit-learn's) summed over tied groups of the sorted scores, so no resample is
    ranked (sorting each took a ten-class evaluation of 360 rows half a second); NaN where one class is absent."""
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    c = counts.T[order].astype(np.float64)  # (n, resamples): each row's draws, in the order of its score
    pos_g, neg_g = c * pos[:, None], c * ~pos[:, None]  # drawn positives and negatives, per row
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # the first row of each group of equal scores
    if len(starts) < len(s):  # ties: per group
        pos_g, neg_g = np.add.reduceat(pos_g, starts, axis=0), np.add.reduceat(neg_g, starts, axis=0)
    below = np.cumsum(neg_g, axis=0) - neg_g  # negatives drawn with a lower score
    u = (pos_g * (below + 0.5 * neg_g)).sum(0)  # integers and halves: exact in float64
    n1, n0 = pos_g.sum(0), neg_g.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def _interval(values: np.ndarray) -> list[float] | None:
    ok = values[np.isfinite(values)]
    if len(ok) < len(values) / 2:  # undefined in most resamples (e.g. AUC with a rare class)
        return None
    return [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]


def bootstrap_ci(outputs: np.ndarray, targets: np.ndarray, *, classification: bool,
                 rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile bootstrap intervals of the headline metrics, ``{name: [low, high]}``.

    ``outputs``: class probabilities (rows, classes) for classification, predicted values for
    regression. Classification gives ``accuracy`` and ``roc_auc``, binary also ``sensitivity``,
    ``specificity`` and ``f1``; regression ``mae``, ``rmse`` and ``r2``. An interval is None where the
    metric is undefined in most resamples."""
    true = np.asarray(targets).reshape(-1)
    n = len(true)
    if n < 2:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, (rounds, n))
    counts = np.bincount((idx + n * np.arange(rounds)[:, None]).ravel(), minlength=rounds * n).reshape(rounds, n)
    out: dict[str, list[float] | None] = {}
    if not classification:
        pred = np.asarray(outputs, dtype=np.float64).reshape(-1)
        t = true.astype(np.float64)[idx]
        err = pred[idx] - t
        out["mae"] = _interval(np.abs(err).mean(1))
        out["rmse"] = _interval(np.sqrt((err ** 2).mean(1)))
        sst = ((t - t.mean(1, keepdims=True)) ** 2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["r2"] = _interval(np.where(sst > 0, 1 - (err ** 2).sum(1) / sst, np.nan))
        return out
    probs = np.asarray(outputs, dtype=np.float64)
    t = true.astype(np.int64)
    k = probs.shape[1]
    right = probs.argmax(1) == t
    out["accuracy"] = _interval(right[idx].mean(1))
    if k == 2:
        pos, r = t[idx] == 1, right[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            tp, fn = (r & pos).sum(1), (~r & pos).sum(1)
            tn, fp = (r & ~pos).sum(1), (~r & ~pos).sum(1)
            out["roc_auc"] = _interval(_auc_rows(probs[:, 1], t == 1, counts))
            out["sensitivity"] = _interval(np.where(tp + fn > 0, tp / (tp + fn), np.nan))
            out["specificity"] = _interval(np.where(tn + fp > 0, tn / (tn + fp), np.nan))
            out["f1"] = _interval(np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan))
    else:
        aucs = np.stack([_auc_rows(probs[:, c], t == c, counts) for c in range(k)])
        out["roc_auc"] = _interval(aucs.mean(0))  # macro one-vs-rest; NaN where a class is absent
    return out


CURVE_POINTS = 500  # at most this many points of a curve or scatter are kept (evenly spaced)


def _thin(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int)) if n else np.zeros(0, int)


def curves(outputs: np.ndarray, targets: np.ndarray, *, classification: bool, bins: int = 10) -> dict:
    """What the report draws, small enough for ``result.json``: for classification the confusion matrix
    (rows: true class), the reliability diagram (per confidence bin: mean confidence, accuracy, rows) and,
    binary, the ROC curve (scikit-learn; at most 500 points); for regression observed and predicted values
    (at most 500 rows, evenly spaced)."""
    true = np.asarray(targets).reshape(-1)
    if not classification:
        pred = np.asarray(outputs, dtype=np.float64).reshape(-1)
        keep = _thin(len(true))
        return {"observed": true.astype(np.float64)[keep].tolist(), "predicted": pred[keep].tolist()}
    from sklearn.metrics import confusion_matrix, roc_curve

    probs = np.asarray(outputs, dtype=np.float64)
    k = probs.shape[1]
    t = true.astype(np.int64)
    decided = probs.argmax(1)
    out: dict = {"confusion": confusion_matrix(t, decided, labels=list(range(k))).tolist()}
    confidence = probs.max(1)
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
    cal = {"confidence": [], "accuracy": [], "rows": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            cal["confidence"].append(float(confidence[inside].mean()))
            cal["accuracy"].append(float((decided[inside] == t[inside]).mean()))
            cal["rows"].append(int(inside.sum()))
    out["calibration"] = cal
    if k == 2 and len(np.unique(t)) == 2:
        fpr, tpr, _ = roc_curve(t, probs[:, 1])
        keep = _thin(len(fpr))
        out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
    return out


@dataclass(frozen=True)
class Scores:
    """Rows a head scored (one evaluation batch, or a site's rows): ``outputs`` the class probabilities
    (rows, classes), else the decided values (regression: in the target's own units); ``targets``;
    ``loss_sum`` the loss summed over the rows; ``right`` the rows decided right (``LossKind.correct``,
    classification; None where not counted: accuracy then comes from ``outputs``)."""

    outputs: np.ndarray
    targets: np.ndarray
    loss_sum: float
    rows: int
    right: int | None = None


def _added(values: Sequence[float]) -> float:
    """Left to right, as a running sum adds them (``sum`` of floats may compensate, Python 3.12 on)."""
    total = 0.0
    for v in values:
        total += v
    return total


def draws_intervals(kind: str) -> bool:
    """Whether :func:`evaluation_metrics` draws bootstrap intervals and curves for loss kind ``kind`` (not a
    language model's, scored per token, nor a head that decides classes without probabilities)."""
    k = losses.get(kind)
    return not k.tokens and not (k.probabilities is None and k.classification)


def scores_state(scores: dict[str, Sequence[Scores]], prefix: str) -> tuple[dict[str, list], dict[str, Tensor]]:
    """Scored rows for a checkpoint, whose intervals and curves are drawn only when asked: per loss its summed
    loss, rows and rows decided right (JSON), and its outputs and targets (``PREFIX LOSS.outputs``, ``.targets``:
    every part's, concatenated, which is all :func:`bootstrap_ci` and :func:`curves` read)."""
    summary, tensors = {}, {}
    for k in sorted(scores):
        parts = scores[k]
        right = None if any(p.right is None for p in parts) else int(sum(p.right for p in parts))
        summary[k] = [_added([p.loss_sum for p in parts]), int(sum(p.rows for p in parts)), right]
        for what in ("outputs", "targets"):
            joined = np.concatenate([getattr(p, what) for p in parts])
            tensors[f"{prefix}{k}.{what}"] = torch.from_numpy(np.ascontiguousarray(joined))
    return summary, tensors


def scores_loaded(summary: dict[str, list], tensors: dict[str, Tensor], prefix: str) -> dict[str, list[Scores]]:
    """What :func:`scores_state` saved: per loss one :class:`Scores` of every row."""
    return {k: [Scores(tensors[f"{prefix}{k}.outputs"].numpy(), tensors[f"{prefix}{k}.targets"].numpy(),
                       loss_sum, rows, right)] for k, (loss_sum, rows, right) in summary.items()}


_RECENT: dict[tuple, tuple[tuple[weakref.ref, ...], dict[str, Any]]] = {}  # the last 2 evaluations' figures
_RECENT_LOCK = threading.Lock()


def evaluation_metrics(kind: str, parts: Sequence[Scores], intervals: bool = True) -> dict[str, Any]:
    """Every test figure of loss kind ``kind`` over the union of the rows of ``parts`` (never a mean of
    per-part figures), as ``test_<name>``: the loss, the rows, the accuracy (from the ``right`` counts
    where every part has them), those of :func:`classification_metrics` (a kind with probabilities) or
    :func:`regression_metrics` (a kind without an accuracy) and the extra metrics a plan entry asks
    (``kind`` a :class:`~splitlearn.core.losses.KindName` with ``metrics``: :data:`EXTRA_METRICS`), with the
    headline figures' 95 % intervals (``ci95``) and :func:`curves` (unless ``intervals`` is False: a validation
    epoch's figures, for early stopping, need neither). No rows: an empty dict.

    The same :class:`Scores` objects in the same order (scored rows are never changed) asked again are not scored again
    (a turn's evaluation and the pooled record of that one turn share the figures, a copy each; nothing is held)."""
    key = (kind, intervals, tuple(id(p) for p in parts))
    if (known := _RECENT.get(key)) is None or any(r() is not p for r, p in zip(known[0], parts)):  # (an id reused)
        known = (tuple(weakref.ref(p) for p in parts), _evaluation_metrics(kind, parts, intervals))
        with _RECENT_LOCK:  # (parties in threads of one process may evaluate at once)
            _RECENT[key] = known
            while len(_RECENT) > 2:  # the oldest goes
                del _RECENT[next(iter(_RECENT))]
    return copy.deepcopy(known[1])


def _evaluation_metrics(kind: str, parts: Sequence[Scores], intervals: bool) -> dict[str, Any]:
    rows = sum(p.rows for p in parts)
    if not rows:
        return {}
    loss_kind = losses.get(kind)
    if loss_kind.tokens:
        return _token_metrics(parts, rows)
    out: dict[str, Any] = {"test_loss": _added([p.loss_sum for p in parts]) / rows, "test_rows": rows}
    if loss_kind.classification and all(p.right is not None for p in parts):
        out["test_accuracy"] = sum(p.right for p in parts) / rows
    outputs = np.concatenate([p.outputs for p in parts])
    targets = np.concatenate([p.targets for p in parts])
    if loss_kind.probabilities is None and loss_kind.classification:  # decided classes only: the accuracy alone
        out.setdefault("test_accuracy", float((outputs.reshape(-1) == targets.reshape(-1)).mean()))
        return out
    classification = loss_kind.probabilities is not None
    found = (classification_metrics if classification else regression_metrics)(outputs, targets)
    for name, value in found.items():
        out.setdefault(f"test_{name}", value)  # the counted accuracy stays
    for name in loss_kind.metrics:  # the plan entry's extra metrics, on the same rows
        out[f"test_{name}"] = _extra(name, outputs, targets)
    if intervals:
        out["ci95"] = {f"test_{n}": v for n, v in bootstrap_ci(outputs, targets, classification=classification).items()}
        out["curves"] = curves(outputs, targets, classification=classification)
    return out


def token_scores(logits: Tensor, target: Tensor, rows: int, ignore_index: int | None = IGNORE_INDEX) -> Scores:
    """An evaluation batch of a language-model head (a loss kind with ``tokens``) as :class:`Scores` per counted
    token: the logits ``[rows, T, V]`` at position t score token t+1 of ``target`` ``[rows, T]``, a token counted
    unless ``ignore_index`` (None: every token). ``outputs``: each counted token's negative log-likelihood
    (float64); ``targets``: its id; ``loss_sum``: their sum; ``right``: the tokens predicted right (the logits'
    argmax); ``rows``: the rows."""
    logits, target = logits[:, :-1].float(), target[:, 1:]
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    picked, tokens = logits[keep], target[keep]
    nll = F.cross_entropy(picked, tokens, reduction="none").double().numpy()
    return Scores(nll, tokens.numpy(), float(nll.sum()), rows, int((picked.argmax(-1) == tokens).sum()))


def _token_metrics(parts: Sequence[Scores], rows: int) -> dict[str, Any]:
    """A language model's figures over every counted token of ``parts`` (:func:`token_scores`): the loss (the
    token mean), ``perplexity`` (exp of it: over the whole split, token-weighted, not a mean of batches'), next-token
    ``accuracy``, ``tokens`` and ``rows``; no interval nor curve (perplexity None past exp's range). No counted
    token: the rows alone."""
    tokens = sum(len(p.targets) for p in parts)
    if not tokens:
        return {"test_rows": rows, "test_tokens": 0}
    loss = _added([p.loss_sum for p in parts]) / tokens
    return {"test_loss": loss, "test_perplexity": math.exp(loss) if loss < 700 else None,
            "test_accuracy": sum(p.right or 0 for p in parts) / tokens, "test_rows": rows, "test_tokens": tokens}



def _extra(name: str, outputs: np.ndarray, targets: np.ndarray) -> float | None:
    """An extra metric's value; None where it is undefined on these rows (a single class for Cohen's kappa,
    outputs that are not finite): never NaN in a result, never an evaluation that ends the run."""
    import logging
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(EXTRA_METRICS[name].fn(outputs, targets))
    except (ValueError, ZeroDivisionError, FloatingPointError) as e:
        logging.getLogger(__name__).warning("test_%s is undefined on these rows: %s", name, e)
        return None
    return value if math.isfinite(value) else None


_builtin_metrics()
