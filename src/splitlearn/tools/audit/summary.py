"""The audit's results as rows of text for a terminal table (the CLI prints them; nothing here prints).

:func:`audit_summary` turns ``audit.json`` into one row per wire and attack (wire, attacker,
attack, figure, verdict) and the notes under the table; :func:`sweep_summary` turns
``sweep.json`` into its columns and one row per setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sweep import FIGURES

__all__ = ["AuditSummary", "audit_summary", "sweep_summary", "ATTACKS", "figure"]

ATTACKS = {"distance_correlation": "distance correlation", "inversion": "model inversion",
           "label_leakage": "labels from gradients", "labels_exposed": "labels on the wire",
           "text_inversion": "tokens from hidden states"}


def figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass
class AuditSummary:
    """What a terminal shows of an audit: rows ``(wire, attacker, attack, figure, verdict)`` (verdict
    ``""`` where no attack applies), the thresholds, notes and per-client lines."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=list)
    explanations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_client: list[str] = field(default_factory=list)


def _figure_of(what: str, verdict: dict, inv: dict, leak: dict, text: dict) -> str:
    if what == "inversion":
        return f"MSE {inv['mse']:.4f} vs {inv['mse_mean_guess']:.4f} by guessing" + (
            f", SSIM {inv['ssim']:.2f}" if inv.get("ssim") is not None else "")
    if what == "label_leakage":
        return ", ".join(f"{k} AUC {leak[k + '_auc']:.3f}" for k in ("norm", "direction")
                         if leak.get(k + "_auc") is not None)
    if what == "labels_exposed":
        return f"{100 * verdict['value']:.1f}% exact"
    if what == "text_inversion":
        rates = [f"{k} {100 * text[key]['rate']:.1f}%" for k, key in (("learned", "learned"),
                                                                      ("nearest", "nearest_embedding")) if text.get(key)]
        return f"{', '.join(rates)} vs chance {100 * text['chance']:.1f}%"
    return f"{verdict['value']:.3f}"


def audit_summary(result: dict[str, Any]) -> AuditSummary:
    """The rows and notes of an audit's result (``audit.json``)."""
    out = AuditSummary(thresholds=list(result.get("thresholds", {}).values()),
                       explanations=list(result.get("explanations", [])))
    for name, w in result["wires"].items():
        inv, leak = w.get("inversion") or {}, w.get("label_leakage") or {}
        if not w.get("verdicts"):
            out.rows.append((name, w["receiver"], "none applies", "-", ""))
        for what, v in w.get("verdicts", {}).items():
            attacker = w["sender"] if what == "label_leakage" else w["receiver"]
            out.rows.append((name, attacker, ATTACKS[what], _figure_of(what, v, inv, leak, w.get("text_inversion") or {}),
                             v["verdict"]))
        why_not: dict[str, list[str]] = {}
        for what, why in (w.get("why_not") or {}).items():
            why_not.setdefault(why, []).append(what.replace("_", " "))
        out.notes += [f"{name}: no {' or '.join(whats)}: {why}" for why, whats in why_not.items()]
        out.notes += [f"{name}: {text}" for text in (inv.get("ssim_note"), leak.get("note")) if text]
        if w.get("text_inversion") and result.get("test_loss") is not None:
            out.notes.append(f"{name}: the tokens are recovered from a run whose fine-tuning reached a test loss of "
                             f"{result['test_loss']:.4f}")
    for entry in result.get("attacks", {}).values():  # the registry's attacks: a row per place each applies
        if entry.get("why_not"):
            out.notes.append(f"no {entry['title']}: {entry['why_not']}")
        for r in entry.get("results", []):
            if r.get("why_not"):
                out.notes.append(f"{r['wire']}: no {entry['title']} by {r['attacker']}: {r['why_not']}")
            else:
                out.rows.append((r["wire"], r["attacker"], entry["title"], r["figure_text"], r["verdict"]))
        limits = dict.fromkeys(r["thresholds"] for r in entry.get("results", []) if r.get("thresholds"))
        out.thresholds += [f"{entry['title']}: {t}" for t in limits]
    for name in result["wires"]:  # [clients]: what each client's own traffic gives away
        per = {c: a["wires"].get(name, {}).get("distance_correlation") for c, a in result.get("clients", {}).items()}
        if any(v is not None for v in per.values()):
            out.per_client.append(f"{name}: distance correlation per client: "
                                  + ", ".join(f"{c} {figure(v)}" for c, v in per.items()))
    return out


def sweep_summary(result: dict[str, Any]) -> tuple[list[str], list[list[str] | None]]:
    """(columns, rows) of a sweep's result (``sweep.json``); a failed setting's row is its setting
    followed by ``None`` for each figure."""
    params = result["params"]
    keys = [k for k in FIGURES if any(r.get(k) is not None for r in result["rows"])]
    dp = any("delta" in r for r in result["rows"])
    loss = ["test_loss"] if any(r.get("test_loss") is not None for r in result["rows"]) else []
    columns = [*(["value"] if len(params) == 1 else params), "test accuracy", *(["test loss"] if loss else []),
               *(FIGURES[k] for k in keys), *(["epsilon"] if dp else [])]
    rows = []
    for r in result["rows"]:
        setting = [f"{r['values'][p]:g}" for p in params]
        if r.get("failed"):
            rows.append(setting + [None] * (1 + len(loss) + len(keys) + dp))
            continue
        eps = [("unbounded" if r.get("epsilon") is None else f"{r['epsilon']:.3g}")] if dp else []
        rows.append(setting + [figure(r["test_accuracy"]), *(figure(r.get(k)) for k in loss + keys), *eps])
    return columns, rows
