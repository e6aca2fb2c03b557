"""Clinical metrics of a classification head, from its outputs and the true classes.

ROC AUC (one-vs-rest, macro, for several classes; None unless every class is among the rows),
F1 (binary; for several classes the macro mean over the classes in the rows or predictions),
sensitivity and specificity (binary: class 1 is the positive one) come from scikit-learn;
the expected calibration error is the usual 10-bin estimate (bins of equal width over the
confidence of the decided class), which scikit-learn does not provide.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "classification_metrics", "expected_calibration_error"]

METRICS = ("accuracy", "roc_auc", "f1", "sensitivity", "specificity", "ece")  # per epoch, as test_<name>


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
    """``probs`` (rows, classes) sum to one per row; ``targets`` the classes. A metric that the
    rows cannot give (AUC with one class present) is None."""
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
