"""One-line verdicts on the audit's figures, with the thresholds stated, and explanations of
what leaks where a plan's shape suggests it should not (labels in a U-shaped plan).

The thresholds are rules of thumb, stated with every verdict so that a reader can judge:

- distance correlation between the raw inputs and what the receiver saw: >= 0.5 leaks,
  >= 0.2 mild, below that no measurable leak;
- model inversion: the decoder's MSE over the MSE of guessing the mean image: <= 0.5 leaks
  (it reconstructs far better than a guess), <= 0.9 mild, above that no measurable leak;
- label leakage from gradients (the larger of the norm and direction AUCs): >= 0.8 leaks,
  >= 0.6 mild, below that no measurable leak (0.5 is chance);
- a label wire: the receiver holds the labels (agreement with the truth);
- text inversion (token ids recovered from hidden states): the larger advantage over chance of the two
  attacks, ``(rate - chance) / (1 - chance)``: >= 0.5 leaks, >= 0.1 mild, below that no measurable leak.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...core.graph import Graph, Wire

__all__ = ["THRESHOLDS", "verdict", "add_verdicts", "secure_sum_note", "LEAKS", "MILD", "NONE"]

LEAKS, MILD, NONE = "leaks", "mild", "no measurable leak"
THRESHOLDS = {
    "distance_correlation": "dCor >= 0.5 leaks, >= 0.2 mild",
    "inversion": "MSE / mean-guess MSE <= 0.5 leaks, <= 0.9 mild",
    "label_leakage": "AUC >= 0.8 leaks, >= 0.6 mild (0.5: chance)",
    "labels_exposed": "the labels travel: agreement >= 0.9 leaks, else mild",
    "text_inversion": "tokens recovered, advantage over chance (rate - chance) / (1 - chance) >= 0.5 leaks, >= 0.1 mild",
}


def verdict(measure: str, value: float) -> str:
    """The verdict of one figure (see the module's thresholds)."""
    if measure == "distance_correlation":
        return LEAKS if value >= 0.5 else MILD if value >= 0.2 else NONE
    if measure == "inversion":  # value: MSE over the mean guess's MSE
        return LEAKS if value <= 0.5 else MILD if value <= 0.9 else NONE
    if measure == "label_leakage":
        return LEAKS if value >= 0.8 else MILD if value >= 0.6 else NONE
    if measure == "labels_exposed":
        return LEAKS if value >= 0.9 else MILD
    if measure == "text_inversion":  # value: the larger advantage over chance
        return LEAKS if value >= 0.5 else MILD if value >= 0.1 else NONE
    raise ValueError(f"no verdict for {measure!r}")


def _table(src: str) -> str:
    """The plan's TOML table of the wire from ``src``: ``[wires.bottom]``, ``[wires."bottom:hidden"]``."""
    return f"[wires.{src}]" if re.fullmatch(r"[A-Za-z0-9_-]+", src) else f'[wires."{src}"]'


def _of_wire(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if w.get("distance_correlation") is not None:
        v = w["distance_correlation"]
        out["distance_correlation"] = {"value": v, "verdict": verdict("distance_correlation", v)}
    inv = w.get("inversion") or {}
    if inv.get("mse") is not None and inv.get("mse_mean_guess"):
        ratio = inv["mse"] / inv["mse_mean_guess"]
        out["inversion"] = {"value": ratio, "verdict": verdict("inversion", ratio)}
    leak = w.get("label_leakage") or {}
    aucs = [a for a in (leak.get("norm_auc"), leak.get("direction_auc")) if a is not None]
    if aucs:
        out["label_leakage"] = {"value": max(aucs), "verdict": verdict("label_leakage", max(aucs))}
    seen = w.get("labels_exposed") or {}
    if seen.get("agreement") is not None:
        out["labels_exposed"] = {"value": seen["agreement"], "verdict": verdict("labels_exposed", seen["agreement"])}
    text = w.get("text_inversion") or {}
    gains = [r["advantage"] for r in (text.get("learned"), text.get("nearest_embedding"))
             if r and r.get("advantage") is not None]
    if gains:
        out["text_inversion"] = {"value": max(gains), "verdict": verdict("text_inversion", max(gains))}
    return out


def add_verdicts(audit: dict[str, Any]) -> dict[str, Any]:
    """Give every wire of an audit its ``verdicts``, and the audit its ``thresholds`` and
    ``explanations`` (what leaks that the plan's shape does not show, and the plan line that protects it)."""
    wires = audit.get("wires", {})
    label_wires = [n for n, w in wires.items() if w.get("carries") == "label"]
    notes = []
    for name, w in wires.items():
        w["verdicts"] = _of_wire(w)
        leak = w.get("label_leakage") or {}
        v = w["verdicts"].get("label_leakage")
        if v and v["verdict"] != NONE:
            src = name.split("->")[0]
            holder, attacker = leak.get("label_holder"), leak.get("attacker")
            shape = ("no wire of this plan carries labels, yet" if not label_wires else
                     "besides the label wire(s) " + ", ".join(label_wires) + ",")
            protected = "label_protection" in (w.get("defenses") or {})
            notes.append(
                f"{name}: {shape} {holder} returns the gradients of its loss {leak.get('loss')!r} to {attacker} on "
                f"this wire, and they reveal the labels (AUC {v['value']:.3f}: {v['verdict']}). "
                + ("Its label protection lowers this; raise its strength to lower it further."
                   if protected else
                   f"{holder} can protect them with noise on the gradients it returns: "
                   f"{_table(src)} label_protection = {{ kind = \"max_norm\", strength = 1.0 }} "
                   "(kind = \"marvell\" for binary labels)."))
        v = w["verdicts"].get("text_inversion")
        if v and v["verdict"] != NONE:
            text, src = w["text_inversion"], name.split("->")[0]
            best = max(r["rate"] for r in (text["learned"], text.get("nearest_embedding")) if r)
            noised = ((w.get("defenses") or {}).get("noise") or {}).get("sigma")
            fix = ("Its noise lowers this; raise sigma to lower it further" if noised
                   else f"Noise on them lowers it: {_table(src)} noise = {{ clip = C, sigma = S }}")
            notes.append(
                f"{name}: the token ids {text['tokens']} never leave {w['sender']}, yet {text['attacker']} recovers "
                f"{100 * best:.1f}% of them from the hidden states it receives (chance {100 * text['chance']:.1f}%: "
                f"{v['verdict']}). {fix}; 'splitlearn audit PLAN --sweep noise.sigma=0,0.5,1' tabulates the recovery "
                "against the fine-tuning's loss.")
    for c in audit.get("clients", {}).values():
        for w in c.get("wires", {}).values():
            w["verdicts"] = _of_wire(w)
    audit["thresholds"] = dict(THRESHOLDS)
    audit["explanations"] = notes
    return audit


def secure_sum_note(graph: Graph, wire: Wire) -> str:
    """Why no attack on the sender's own activation applies on ``wire``, an input of a secure sum
    (``merge = "secure_sum"``, :mod:`splitlearn.core.securesum`): the receiver holds only the sum."""
    segment = wire.consumers[0]
    members = [w.src_party for w in graph.wires if w.masked and w.consumers == wire.consumers]
    return (f"{wire.dst_party} holds only the sum of the activations of {', '.join(members)} (segment {segment!r} "
            f"merges them by secure_sum): {wire.src_party}'s own arrives masked, uniform modulo 2^64; the distance "
            f"correlation and the inversion here are of the sum, against {wire.src_party}'s raw inputs")
