"""A defense's score against the attacks measured on it, after VFLAIR's Defense Capability Score (DCS).

For one attack under one defense, ``A`` (:func:`strength`) is the attack's share of the way from its baseline to a
perfect attack, in [0, 1]; ``M`` is the main-task accuracy the defense lost against the undefended run (0 where
it gained). ``D = sqrt(beta * A^2 + (1 - beta) * M^2)`` is the distance of (attack, main task) from the ideal
(the attack at its baseline, the main task at the undefended accuracy), and ``DCS = 1 / (1 + D)``, in [0.5, 1]
(1: the ideal). A defense's score over several attacks is the mean of theirs. ``bench/privacy.py``'s table and
``splitlearn audit PLAN --sweep`` give it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BETA", "strength", "dcs", "sweep_strengths"]

BETA = 0.5  # the weight of the attack's distance against the main task's (VFLAIR's default)


def strength(value: float, base: float, higher: bool) -> float:
    """The attack's share of the way from its baseline to a perfect attack, in [0, 1]: ``(v - b) / (1 - b)`` for a
    figure where higher is stronger (an accuracy, an AUC, a dCor), ``(b - v) / b`` for an error (a relative MSE)."""
    s = (value - base) / (1 - base) if higher else (base - value) / base
    return min(1.0, max(0.0, s)) if base != (1 if higher else 0) else 0.0


def dcs(attack: float, main_loss: float, beta: float = BETA) -> float:
    """VFLAIR's Defense Capability Score for one attack: ``1 / (1 + D)``, ``D = sqrt(beta * A^2 + (1 - beta) * M^2)``,
    ``A`` the attack's :func:`strength` under the defense, ``M`` the main-task accuracy lost (0 where it gained)."""
    return 1.0 / (1.0 + (beta * attack ** 2 + (1 - beta) * max(0.0, main_loss) ** 2) ** 0.5)


def sweep_strengths(row: dict[str, Any]) -> list[float]:
    """The strengths of the per-wire measures in a row of ``audit --sweep``: distance correlation (baseline 0),
    the inversion's MSE over the mean guess's (``inversion_relative``, baseline 1), the label-leakage AUCs (0.5) and token recovery (chance)."""
    out = []
    if row.get("distance_correlation") is not None:
        out.append(strength(row["distance_correlation"], 0.0, True))
    if row.get("inversion_relative") is not None:
        out.append(strength(row["inversion_relative"], 1.0, False))
    for key in ("norm_auc", "direction_auc"):
        if row.get(key) is not None:
            out.append(strength(row[key], 0.5, True))
    if row.get("token_recovery") is not None and row.get("token_chance") is not None:
        out.append(strength(row["token_recovery"], row["token_chance"], True))
    return out
