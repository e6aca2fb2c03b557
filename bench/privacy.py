"""Privacy benchmarks: what the int8 codec saves on the activation wires, and what NoPeek and
label protection buy in leakage for how much accuracy, on digits (vanilla plan) and breast
cancer (vertical plan), every figure measured in the same run.

    .venv/bin/python bench/privacy.py            # writes the "privacy" section of BENCHMARKS.md

Every setting is trained with the plan's own epochs once per seed (the seed also draws the
train/test split) in one process; accuracies are means over the seeds, and a setting's cost is
its mean accuracy minus that of the undefended plan over the same seeds. Leakage figures come
from ``splitlearn.tools.audit.audit_run`` on each run (the worst over the plan's wires where there are
several), averaged over the seeds.

    .venv/bin/python bench/privacy.py --table    # writes the "privacy_table" section: defense x attack

``--table`` trains each plan of :data:`TABLE_PLANS` once per defense setting of :data:`DEFENSES` and runs the
audit (``audit_run``: every attack of the registry, those registered later included) on each run; it writes the
table attack x defense with the main-task cost and a defense score after VFLAIR's DCS (:func:`dcs`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _md import write_section
from splitlearn.api import train
from splitlearn.tools.audit.score import BETA, dcs, strength
from splitlearn.tools.audit import audit_run
from splitlearn.core.load import load_plan

ROOT = Path(__file__).resolve().parents[1]
PLANS = {"digits (vanilla)": ROOT / "examples" / "vanilla.toml",
         "breast cancer (vertical)": ROOT / "examples" / "vertical.toml"}
NOPEEK_PLANS = {"digits (nopeek: 3-layer bottom, Adam)": ROOT / "examples" / "nopeek.toml",
                "breast cancer (vertical_nopeek: 2-layer bottoms, Adam)": ROOT / "examples" / "vertical_nopeek.toml",
                **PLANS}
WORST = {"dcor": max, "mse": min, "norm_auc": max, "direction_auc": max}


def activation_wires(body: dict) -> list[str]:
    """Sources of the plan's activation wires (those a segment sends to another party)."""
    plan = load_plan(body)
    from splitlearn.core.graph import build_graph

    return [w.src for w in build_graph(plan).wires if w.carries == "activation"]


def with_wires(body: dict, setting: dict[str, Any]) -> dict:
    out = {**body, "wires": {**body.get("wires", {})}}
    for src in activation_wires(body):
        out["wires"][src] = {**out["wires"].get(src, {}), **setting}
    return out


def payload(result: dict, direction: str) -> int:
    """Tensor bytes sent on the activation wires in one direction: ``forward`` (activations, training
    and evaluation steps) or ``backward`` (gradients)."""
    acts = {w["name"] for w in result["wires"] if w["carries"] == "activation"}
    return sum(row["payload"] for p in result["parties"].values() for row in p["sent"]
               if row["wire"] in acts and row["direction"] == direction)


def run(body: dict, seed: int, audit: bool, tmp: Path) -> dict[str, Any]:
    """Train once (and audit); the figures of this run."""
    out = Path(tempfile.mkdtemp(dir=tmp)) if audit else None
    result = train(load_plan(body), seed=seed, out=out)
    fig = {"acc": result["metrics"]["test_accuracy"], "fwd_bytes": payload(result, "forward"),
           "bwd_bytes": payload(result, "backward")}
    if audit:
        a = audit_run(out)
        wires = [w for w in a["wires"].values() if w["carries"] == "activation"]
        per = {"dcor": [w["distance_correlation"] for w in wires],
               "mse": [w["inversion"]["mse"] for w in wires if w.get("inversion")],
               "norm_auc": [w["label_leakage"]["norm_auc"] for w in wires if w.get("label_leakage")],
               "direction_auc": [w["label_leakage"]["direction_auc"] for w in wires if w.get("label_leakage")]}
        for k, xs in per.items():
            xs = [x for x in xs if x is not None]
            fig[k] = WORST[k](xs) if xs else None
    return fig


def measure(body: dict, seeds: list[int], audit: bool, tmp: Path) -> dict[str, Any]:
    runs = [run(body, s, audit, tmp) for s in seeds]
    out: dict[str, Any] = {"accs": [r["acc"] for r in runs]}
    for k in runs[0]:
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.fmean(xs) if xs else None
    return out


def pts(a: float, b: float) -> str:
    """``a - b`` in points of accuracy, signed (no "-0.00")."""
    d = round(100 * (a - b), 2)
    return f"{d if d else 0.0:+.2f}"


def section_codec(seeds: list[int], tmp: Path) -> list[str]:
    lines = ["### int8 codec on the activation wires", "",
             "Forward activation bytes: tensor payload the senders put on the activation wires (training and",
             "evaluation steps), from `result.json` (`parties[*].sent`, direction `forward`). int8 is affine",
             "quantisation with one (min, scale) pair per tensor; `grad_codec = int8` also quantises the",
             "gradients coming back.", "",
             "| data (plan) | setting | test accuracy | change (points) | forward activation bytes | reduction | "
             "backward gradient bytes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    verdicts = []
    for label, path in PLANS.items():
        body = load_plan(path).model_dump(mode="json")
        base = measure(body, seeds, False, tmp)
        rows = [("float32 (reference)", base)]
        for name, setting in (("codec = int8", {"codec": "int8"}),
                              ("codec = int8, grad_codec = int8", {"codec": "int8", "grad_codec": "int8"})):
            rows.append((name, measure(with_wires(body, setting), seeds, False, tmp)))
        for name, m in rows[1:]:
            ratio, cost = base["fwd_bytes"] / m["fwd_bytes"], 100 * (base["acc"] - m["acc"])
            met = ratio >= 3.9 and cost <= 0.5
            verdicts.append(f"- {label}, {name}: {ratio:.3f}x at {pts(m['acc'], base['acc'])} points: "
                            f"{'met' if met else 'not met'}.")
        for name, m in rows:
            lines.append(f"| {label} | {name} | {m['acc']:.4f} | {pts(m['acc'], base['acc'])} | "
                         f"{m['fwd_bytes']:,.0f} | {base['fwd_bytes'] / m['fwd_bytes']:.3f}x | {m['bwd_bytes']:,.0f} |")
            print(f"codec {label} {name}: acc {m['acc']:.4f} bytes {m['fwd_bytes']:,.0f}", flush=True)
    lines += ["", "Targets: at least 3.9x fewer forward activation bytes, at most 0.5 points of accuracy lost.", "",
              *verdicts, ""]
    return lines


def section_nopeek(seeds: list[int], alphas: list[float], tmp: Path) -> list[str]:
    lines = ["### NoPeek: distance correlation against accuracy", "",
             "dCor: distance correlation between the sender's raw inputs and the smashed data the receiver",
             "got during the last 4096 training rows (the latest row per sample, 1000 samples), as the audit",
             "measures it; inversion MSE: a decoder trained on 10% of those rows by the receiver, scored on",
             "the rest. NoPeek on every activation wire (vertical: both clinics; worst wire reported).",
             "On breast cancer 2 points is about 7 test rows over the 3 seeds, so neighbouring alphas can",
             "land on either side of the target.", "",
             "| data (plan) | alpha | test accuracy | change (points) | dCor | dCor / dCor(alpha=0) | inversion MSE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for label, path in NOPEEK_PLANS.items():
        body = load_plan(path).model_dump(mode="json")
        res = {}
        for a in alphas:
            res[a] = measure(with_wires(body, {"nopeek": a}), seeds, True, tmp)
            m = res[a]
            print(f"nopeek {label} alpha={a:g}: acc {m['acc']:.4f} dcor {m['dcor']:.4f}", flush=True)
        ref = res[alphas[0]]
        for a, m in res.items():
            lines.append(f"| {label} | {a:g} | {m['acc']:.4f} | {pts(m['acc'], ref['acc'])} | {m['dcor']:.4f} | "
                         f"{m['dcor'] / ref['dcor']:.3f} | {m['mse']:.4f} |")
        halving = [a for a, m in res.items() if m["dcor"] <= 0.5 * ref["dcor"]]
        cheap = [a for a, m in res.items() if 100 * (ref["acc"] - m["acc"]) <= 2.0]
        best = min(cheap, key=lambda a: res[a]["dcor"])
        if halving:
            a = halving[0]
            verdicts.append(f"- {label}: the smallest alpha that halves dCor is {a:g} "
                            f"({res[a]['dcor']:.3f} from {ref['dcor']:.3f}), at {pts(res[a]['acc'], ref['acc'])} "
                            f"points of accuracy: the 2-point target is {'met' if a in cheap else 'not met'}.")
        else:
            lowest = min(m["dcor"] for m in res.values())
            verdicts.append(f"- {label}: no alpha of the sweep halves dCor (lowest {lowest:.3f} "
                            f"from {ref['dcor']:.3f}).")
        verdicts.append(f"  Within 2 points of accuracy the lowest dCor is {res[best]['dcor']:.3f} (alpha {best:g}, "
                        f"{res[best]['dcor'] / ref['dcor']:.2f} of the undefended dCor).")
        broken = [a for a, m in res.items() if 100 * (ref["acc"] - m["acc"]) > 10]
        if broken:
            verdicts.append(f"  From alpha {min(broken):g} training breaks down (more than 10 points lost): the "
                            "figures there describe a failed model, not a useful trade-off.")
    lines += ["", "Target: dCor halved at a cost of at most 2 points.", "", *verdicts, ""]
    return lines


def section_labels(seeds: list[int], strengths: list[float], tmp: Path) -> list[str]:
    label = "breast cancer (vertical)"
    body = load_plan(PLANS[label]).model_dump(mode="json")
    lines = ["### Label protection on vertical breast cancer", "",
             "The server (label holder) protects the gradients it returns to both clinics; each clinic runs",
             "the norm and the direction attack on the gradients it received during the first 4096",
             "training rows (the audit's `label_leakage`; max(AUC, 1 - AUC), 0.5 = chance; worst clinic).",
             "The protection noise comes from each run's random party secret, not from the seed, so these",
             "rows (unlike the ones above) change from one run of this script to the next.", "",
             "| protection | test accuracy | change (points) | norm-attack AUC | direction-attack AUC |",
             "|---|---:|---:|---:|---:|"]
    settings = [("none", None)] + [(f"marvell, strength {s:g}", {"kind": "marvell", "strength": s}) for s in strengths]
    settings.append(("max_norm", {"kind": "max_norm"}))
    res = {}
    for name, lp in settings:
        res[name] = m = measure(with_wires(body, {"label_protection": lp}) if lp else body, seeds, True, tmp)
        print(f"labels {name}: acc {m['acc']:.4f} norm {m['norm_auc']:.3f} direction {m['direction_auc']:.3f}",
              flush=True)
    ref = res["none"]
    for name, m in res.items():
        lines.append(f"| {name} | {m['acc']:.4f} | {pts(m['acc'], ref['acc'])} | {m['norm_auc']:.3f} | "
                     f"{m['direction_auc']:.3f} |")
    ok = [n for n, m in res.items() if n != "none" and m["norm_auc"] <= 0.6 and m["direction_auc"] <= 0.6
          and 100 * (ref["acc"] - m["acc"]) <= 2.0]
    lines += ["", "Target: norm and direction AUC at most 0.6 at a cost of at most 2 points.", "",
              (f"Met by: {'; '.join(ok)}." if ok else "No setting of the sweep meets it.") +
              f" Unprotected: norm-attack AUC {ref['norm_auc']:.3f}, direction-attack AUC {ref['direction_auc']:.3f}.",
              ""]
    return lines


# -- the defense x attack table (--table) ------------------------------------------------------------



def _digits_halves(tmp: Path) -> dict:
    """digits split into left and right halves (4 of each row's 8 pixels) between two clinics, labels at the
    server: tests/test_audit_attacks.py's plan (4 epochs), from an .npz written to ``tmp``."""
    import numpy as np

    from splitlearn.data.embedded import digits

    x = digits().fields["x"].reshape(-1, 8, 8)
    path = tmp / "digits_halves.npz"
    np.savez(path, left=x[:, :, :4].reshape(-1, 32), right=x[:, :, 4:].reshape(-1, 32), y=digits().fields["y"])
    sgd, bottom = {"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"zoo": "mlp", "args": {"sizes": [32, 32],
                                                                                       "out_activation": True}}
    return {"name": "digits_halves", "data": {"dataset": "npz", "path": str(path)},
            "train": {"epochs": 4, "batch_size": 64, "seed": 0},
            "parties": {"clinic_a": {"holds": {"x": "left"}, "optimizer": sgd},
                        "clinic_b": {"holds": {"x": "right"}, "optimizer": sgd},
                        "server": {"holds": {"y": "y"}, "optimizer": sgd}},
            "networks": {"bottom_a": bottom, "bottom_b": bottom, "top": {"zoo": "mlp", "args": {"sizes": [64, 32, 10]}}},
            "segments": {"bottom_a": {"party": "clinic_a", "inputs": ["clinic_a.x"], "network": "bottom_a"},
                         "bottom_b": {"party": "clinic_b", "inputs": ["clinic_b.x"], "network": "bottom_b"},
                         "top": {"party": "server", "inputs": ["bottom_a", "bottom_b"], "merge": "concat",
                                 "network": "top"}},
            "losses": {"digit": {"input": "top", "target": "server.y"}}}


# label -> (plan body from a temporary folder, epochs, the audit's --attribute, MID's bottleneck)
TABLE_PLANS: dict[str, tuple[Any, int | None, str | None, int]] = {
    "digits halves (vertical, 2 clinics)": (_digits_halves, None, None, 16),
    "digits (vanilla)": (lambda tmp: load_plan(PLANS["digits (vanilla)"]).model_dump(mode="json"), None,
                         "hospital.parity", 32),
    "breast cancer (vertical 15/15)": (lambda tmp: load_plan(PLANS["breast cancer (vertical)"]).model_dump(mode="json"),
                                       3, "clinic_a.x:0", 8),
}
# name -> (the wires it goes on: activation / returned gradients / label, its setting; "B": MID's bottleneck)
DEFENSES: dict[str, tuple[str, Any]] = {
    "none": ("", None),
    "nopeek 0.5": ("activation", {"nopeek": 0.5}),
    "noise sigma 1": ("activation", {"noise": {"clip": 1.0, "sigma": 1.0}}),
    "randomized response eps 1": ("label", {"randomized_response": 1.0}),
    "marvell 1.0": ("gradient", {"label_protection": {"kind": "marvell", "strength": 1.0}}),
    "max_norm": ("gradient", {"label_protection": {"kind": "max_norm"}}),
    "MID lambda 0.001": ("activation", {"mid": {"lambda": 0.001, "bottleneck": "B"}}),
    "MID lambda 0.1": ("activation", {"mid": {"lambda": 0.1, "bottleneck": "B"}}),
}
# per-wire measures of the audit: (baseline, higher is stronger); inversion's figure is the MSE over the mean guess's
WIRE_BASELINES = {"distance_correlation": (0.0, True), "inversion": (1.0, False), "label_leakage": (0.5, True),
                  "text_inversion": (0.0, True)}
PREFERRED = ("own_inputs", "majority_class", "majority_value", "mean_image", "chance")


def _toml(setting: dict) -> str:
    def val(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return f'"{v}"' if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
    return "; ".join(f"{k} = {val(v)}" for k, v in setting.items())


def defended(body: dict, where: str, setting: dict | None, bottleneck: int) -> tuple[dict, list[str]] | None:
    """``body`` with ``setting`` on every wire of kind ``where`` (None: no such wire); and those wires."""
    if setting is None:
        return body, []
    from splitlearn.core.graph import build_graph

    graph = build_graph(load_plan(body))
    pick = {"activation": lambda w: w.carries == "activation" and graph.nodes[w.src].kind == "segment",
            "gradient": lambda w: w.carries == "activation" and graph.receiver_computes_loss(w),
            "label": lambda w: w.carries == "label"}[where]
    wires = sorted({w.src for w in graph.wires if pick(w)})
    if not wires:
        return None
    setting = {k: ({**v, "bottleneck": bottleneck} if isinstance(v, dict) and v.get("bottleneck") == "B" else v)
               for k, v in setting.items()}
    out = {**body, "wires": {**body.get("wires", {})}}
    for src in wires:
        out["wires"][src] = {**out["wires"].get(src, {}), **setting}
    return out, wires


def attack_rows(audit: dict, classes: int) -> dict[str, tuple[float, float, bool]]:
    """Every figure of an audit: "attack: attacker on wire" -> (value, baseline, higher is stronger). Per-wire
    measures as :data:`WIRE_BASELINES`; a registered attack's ``value`` against the first of its ``baselines``
    in :data:`PREFERRED` order (lower is stronger where its declared figure is an MSE)."""
    from splitlearn.tools.audit.attacks import ATTACKS

    out = {}
    for wire, entry in audit.get("wires", {}).items():
        for measure, v in (entry.get("verdicts") or {}).items():
            if v.get("value") is None:
                continue
            base, higher = WIRE_BASELINES.get(measure, (1.0 / classes, True))  # labels on the wire: chance
            own = entry.get(measure) if isinstance(entry.get(measure), dict) else {}
            who = own.get("attacker") or entry.get("attacker") or entry.get("receiver")
            out[f"{measure}: {who} on {wire}"] = (float(v["value"]), base, higher)
    for name, section in audit.get("attacks", {}).items():
        higher = "MSE" not in ATTACKS.get(name).describe()["figure"] if name in ATTACKS else True
        for r in section.get("results", []):
            if r.get("value") is None:
                continue
            bases = {k: b for k, b in (r.get("baselines") or {}).items() if isinstance(b, (int, float))}
            base = next((bases[k] for k in PREFERRED if k in bases), next(iter(bases.values()), 0.0 if higher else 1.0))
            out[f"{name}: {r['attacker']} on {r['wire']}"] = (float(r["value"]), float(base), higher)
    return out


def _pinned():
    """The parties' noise secrets pinned (each draws a new one every run), so that the table is reproducible."""
    from types import SimpleNamespace

    from splitlearn.core import engine

    class Pin:
        def __enter__(self):
            self.was, engine.secrets = engine.secrets, SimpleNamespace(randbits=lambda bits: 0)

        def __exit__(self, *exc):
            engine.secrets = self.was
    return Pin()


def section_table(tmp: Path) -> str:
    from splitlearn.core.specs import PlanError
    from splitlearn.tools.audit.attacks import attack_names, get_attack

    lines = ["## Privacy: every defense against every attack, with its cost and a defense score", "",
             "Written by `.venv/bin/python bench/privacy.py --table` in {SECONDS} s. Machine: "
             f"{platform.machine()}, torch {torch.__version__}, one torch thread, in-process parties; seed 0, the "
             "parties' noise secrets pinned to 0 (one reproducible run per cell; noise, Marvell, randomized response "
             "and MID draw other noise with other secrets, so a cell moves by a few points from secret to secret).",
             "Attacks: every passive one registered (`" + "`, `".join(n for n in attack_names() if not get_attack(n)
                                                                  .active) + "`), run by `audit_run` (inversion "
             "decoder 50 epochs) on each run: those that apply to a plan are its rows. The active ones (`"
             + "`, `".join(n for n in attack_names() if get_attack(n).active) + "`) train the plan again per cell; "
             "their defenses are measured in docs/privacy.md.", "",
             f"**Defense score (after VFLAIR's DCS).** For one attack under a defense, `A` is the attack's share of "
             "the way from its baseline to a perfect attack, `(v - b) / (1 - b)` for a figure where higher is stronger "
             "(accuracy, AUC, dCor) and `(b - v) / b` for an error (the inversion's MSE over the mean guess's, "
             "b = 1), clipped to [0, 1]; `M` is the main-task accuracy lost against the undefended run (0 where it "
             f"gained). `D = sqrt(beta A^2 + (1 - beta) M^2)` with beta = {BETA}, the distance of (attack, main task) "
             "from the ideal (attack at its baseline, main task at the undefended accuracy), and `DCS = 1 / (1 + D)`, "
             "in [0.5, 1] (1: the ideal). A defense's score on a plan is the mean over the plan's attack rows. "
             "Baselines b: dCor 0; inversion 1 (the mean guess); label leakage AUC 0.5; labels on the wire chance; "
             "the registry's attacks their first of own inputs (model completion: what the party knows without the "
             "run), majority class, majority value.", ""]
    advice = []
    for label, (make, epochs, attribute, bottleneck) in TABLE_PLANS.items():
        body = make(tmp)
        classes = 2 if "cancer" in label else 10
        res: dict[str, dict] = {}
        for name, (where, setting) in DEFENSES.items():
            got = defended(body, where, setting, bottleneck)
            if got is None:
                res[name] = {"why": f"no {where} wire"}
                continue
            run_body, wires = got
            out = Path(tempfile.mkdtemp(dir=tmp))
            try:
                with _pinned():
                    result = train(load_plan(run_body), epochs=epochs, seed=0, out=out)
            except PlanError as e:
                res[name] = {"why": str(e).split("\n")[0].split("': ", 1)[-1]}
                continue
            audit = audit_run(out, epochs=50, attribute=attribute)
            eps = [v["epsilon"] for v in (result.get("privacy") or {}).values() if isinstance(v, dict) and "epsilon" in v]
            res[name] = {"acc": result["metrics"]["test_accuracy"], "rows": attack_rows(audit, classes),
                         "wires": wires, "setting": run_body["wires"][wires[0]] if wires else {},
                         "eps": max(eps) if eps else None}
            print(f"table {label} {name}: acc {res[name]['acc']:.4f}", flush=True)
        ref = res["none"]
        names = [n for n in res if "acc" in res[n]]
        rows = list(ref["rows"])
        lines += [f"### {label}", "", "| attack: attacker on wire (figure, baseline) | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        score = {n: [] for n in names}
        for row in rows:
            v0, base, higher = ref["rows"][row]
            cells = []
            for n in names:
                got = res[n]["rows"].get(row)
                if got is None:
                    cells.append("-")
                    continue
                d = dcs(strength(*got), ref["acc"] - res[n]["acc"])
                score[n].append(d)
                cells.append(f"{got[0]:.3f} ({d:.2f})")
            lines.append(f"| {row} ({'higher' if higher else 'lower'} leaks more; b = {base:.3f}) | "
                         + " | ".join(cells) + " |")
            s0 = strength(v0, base, higher)
            if s0 >= 0.1:  # it leaks: the cheapest defense that halves it, else the one that scores best on it
                tried = [n for n in names if n != "none" and row in res[n]["rows"]]
                halving = [n for n in tried if strength(*res[n]["rows"][row]) <= s0 / 2]
                pick = (min(halving, key=lambda n: (ref["acc"] - res[n]["acc"], strength(*res[n]["rows"][row])))
                        if halving else max(tried, key=lambda n: dcs(strength(*res[n]["rows"][row]),
                                                                      ref["acc"] - res[n]["acc"]), default=None))
                if pick is not None:
                    b = res[pick]
                    advice.append(f"- {label}, {row}: {v0:.3f} undefended -> {b['rows'][row][0]:.3f} with "
                                  f"`{_toml(b['setting'])}` on `[wires.{b['wires'][0]}]`"
                                  + (f" (and {', '.join(b['wires'][1:])})" if len(b["wires"]) > 1 else "")
                                  + f", for {pts(b['acc'], ref['acc'])} points of main-task accuracy"
                                  + ("." if halving else ": no defense of the table halves it; this one scores best "
                                     "on it (DCS)."))
        lines.append("| main-task test accuracy | " + " | ".join(f"{res[n]['acc']:.4f}" for n in names) + " |")
        lines.append("| change (points) | " + " | ".join(pts(res[n]["acc"], ref["acc"]) for n in names) + " |")
        lines.append("| epsilon spent (noise) | " + " | ".join(f"{res[n]['eps']:.1f}" if res[n]["eps"] else "-"
                                                              for n in names) + " |")
        lines.append("| **defense score (mean DCS)** | " + " | ".join(
            f"**{statistics.fmean(score[n]):.3f}**" if score[n] else "-" for n in names) + " |")
        skipped = [f"{n} ({res[n]['why']})" for n in res if "why" in res[n]]
        lines += ["", "Cells: the attack's figure under the defense (its DCS). Settings, on every wire they apply "
                  "to: " + "; ".join(f"{n}: `{_toml(res[n]['setting'])}`" for n in names if n != "none") + "."
                  + (f" Not applicable: {'; '.join(skipped)}." if skipped else ""), ""]
    lines += ["### What reduces each leak, measured", "",
              "For each attack that leaks undefended (`A` >= 0.1: a tenth of the way from its baseline to a perfect "
              "attack), the cheapest defense of the table that halves `A`, its plan line and its cost in main-task "
              "accuracy (where none halves it, the one with the best DCS on it):", "", *advice, ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    ap.add_argument("--alphas", default="0,0.25,0.3,0.35,0.4,0.5,1,1.5,2,3,4,8", help="NoPeek alphas (the first is the reference)")
    ap.add_argument("--strengths", default="0.25,0.5,1,2", help="Marvell strengths")
    ap.add_argument("--table", action="store_true", help="only the defense x attack table (its own section)")
    args = ap.parse_args()
    if args.table:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            text = section_table(Path(tmp))
        write_section("privacy_table", text.replace("{SECONDS}", f"{time.perf_counter() - t0:.0f}"))
        print("wrote the privacy_table section of BENCHMARKS.md")
        return
    seeds = list(range(args.seeds))
    alphas = [float(a) for a in args.alphas.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        body = section_codec(seeds, tmp) + section_nopeek(seeds, alphas, tmp) + section_labels(seeds, strengths, tmp)
    cmd = " ".join(["bench/privacy.py", *sys.argv[1:]])
    head = ["## Privacy: codec savings, NoPeek and label protection against accuracy", "",
            f"Written by `.venv/bin/python {cmd}` in {time.perf_counter() - t0:.0f} s. Machine: "
            f"{platform.machine()}, torch {torch.__version__}, one torch thread, in-process parties.",
            f"Seeds {seeds} (each seed also draws the train/test split: digits 360 test rows, breast cancer",
            "114); plans' own epochs (vanilla 8, nopeek 15, vertical 20, vertical_nopeek 100). Accuracies are means over the seeds and changes",
            "are against the undefended plan on the same seeds; one test row is 0.28 points on digits and",
            "0.88 on breast cancer.", ""]
    write_section("privacy", "\n".join(head + body))
    print("wrote the privacy section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
