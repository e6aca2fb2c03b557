"""The per-wire measures of the audit, registered as attacks (``per_wire``): what the receiver of an activation
wire learns about its sender's raw inputs (distance correlation, model inversion, text inversion), what its
sender learns about labels from the gradients it gets back (norm and direction attacks), and what a label
wire's receiver holds. :mod:`splitlearn.tools.audit.run` measures them wire by wire (``audit.json``'s
``wires``); ``audit --attack inversion`` keeps that measure alone (:func:`keep_measures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .attacks import Attack, Settings, Target, register_attack

if TYPE_CHECKING:
    from .run import RunFolder

__all__ = ["WireMeasure", "WIRE_MEASURES", "keep_measures"]


class WireMeasure(Attack):
    """A measure of the per-wire audit: its figures live in each wire's entry under its ``name``."""

    per_wire = True

    def __init__(self, name: str, title: str, attacker: str, needs: str, applies_to: str, figure: str,
                 baseline: str, paper: str = "") -> None:
        self.name, self.title, self.attacker, self.needs = name, title, attacker, needs
        self.applies_to, self.figure, self.baseline, self.paper = applies_to, figure, baseline, paper

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        """Never called: it has no targets of its own (:meth:`targets` says so), the per-wire audit measures it."""
        raise RuntimeError(f"{self.name!r} is measured by the per-wire audit (audit.json's wires), not on a target")


_MEASURES = (
    WireMeasure("distance_correlation", "distance correlation (Vepakomma et al., NoPeek)", "receiver of activations",
                "the activations it received; passive", "activation wires whose sender computes them from its own data",
                "dCor between the sender's raw inputs and the activations", "0 (independent)"),
    WireMeasure("inversion", "model inversion (a decoder trained on auxiliary rows)", "receiver of activations",
                "the activations it received and an auxiliary share of the raw inputs (aux_fraction); passive",
                "activation wires whose sender computes them from its own data", "reconstruction MSE (and SSIM)",
                "the mean image / mean row of the auxiliary rows"),
    WireMeasure("text_inversion", "text inversion (tokens from hidden states)", "receiver of hidden states",
                "the hidden states it received and an auxiliary share of the token ids; passive",
                "activation wires whose sender's raw inputs are token ids", "share of tokens recovered",
                "chance (the most frequent token)"),
    WireMeasure("label_leakage", "labels from gradients (norm and direction, Li et al. 2021)",
                "sender of activations (feature party, U-shaped server)", "the cut gradients it received; passive",
                "gradient wires back to a party whose activations feed a loss whose labels another party holds",
                "AUC of the norm and direction attacks", "0.5 (chance)"),
    WireMeasure("labels_exposed", "labels on the wire", "receiver of a label wire", "the labels it received; passive",
                "label wires (vanilla plans)", "agreement of what it received with the labels",
                "randomized response's agreement"),
)
WIRE_MEASURES = frozenset(m.name for m in _MEASURES)
for _m in _MEASURES:
    register_attack(_m)


def keep_measures(audit: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``audit`` with only the per-wire measures ``names`` left in its wires (``audit --attack``: the others are
    measured alongside, then dropped, with their reasons for not applying)."""
    drop = WIRE_MEASURES - names
    if not drop:
        return audit
    wires = [*audit.get("wires", {}).values(), *(w for c in audit.get("clients", {}).values()
                                                 for w in c.get("wires", {}).values())]
    for w in wires:
        for key in drop:
            w.pop(key, None)
            (w.get("why_not") or {}).pop(key, None)
        if "why_not" in w and not w["why_not"]:
            del w["why_not"]
    return audit
