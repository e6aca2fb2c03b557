"""Sweeping a defense: train the plan once per value, audit each run, tabulate accuracy vs leakage.

    sweep("examples/vanilla.toml", "nopeek.alpha", [0, 0.5, 1], Path("runs/nopeek"))
    sweep("examples/nopeek.toml", {"nopeek.alpha": [0, 0.5], "noise.sigma": [0, 0.1]}, None, Path("runs/grid"))

writes ``out/sweep.json``, ``out/sweep.md`` (the table) and ``out/sweep.png`` (accuracy against
each leakage figure); each run and its audit stay in ``out/PARAM=VALUE/`` (a grid of several
parameters: every combination, in ``out/P1=V1,P2=V2/``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from ...core.defense import sweep_params
from ...core.graph import Graph, Wire, build_graph
from ...core.load import load_plan
from ...core.plan import Plan
from ...core.specs import PlanError
from .score import dcs, sweep_strengths
from .run import AuditError, audit_run
from .wires import WIRE_MEASURES

__all__ = ["PARAMS", "FIGURES", "sweep", "parse_sweep", "swept_wires", "plan_with", "setting_name"]

class _Params(Mapping[str, str]):
    """Sweep parameter -> description, read from the defense registry when asked (so a defense
    registered later counts)."""

    def __getitem__(self, param: str) -> str:
        return sweep_params()[param][1].description

    def __iter__(self) -> Iterator[str]:
        return iter(sweep_params())

    def __len__(self) -> int:
        return len(sweep_params())


PARAMS: Mapping[str, str] = _Params()

# leakage figures of a row: key -> (label, which wire entry it comes from, how to read it)
FIGURES = {
    "distance_correlation": "distance correlation",
    "inversion_mse": "inversion MSE",
    "inversion_ssim": "inversion SSIM",
    "norm_auc": "norm-attack AUC",
    "direction_auc": "direction-attack AUC",
    "token_recovery": "token recovery",
}
_WORST = {"distance_correlation": max, "inversion_mse": min, "inversion_ssim": max, "norm_auc": max,
          "direction_auc": max, "token_recovery": max, "inversion_relative": min}


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``PARAM=V1,V2,...`` -> (param, values); raises :class:`AuditError` with what is wrong."""
    param, sep, rest = text.partition("=")
    param = param.strip()
    if not sep:
        raise AuditError(f"--sweep {text!r}: expected PARAM=V1,V2,... (e.g. nopeek.alpha=0,0.5,1)")
    if param not in PARAMS:
        raise AuditError(f"--sweep: unknown parameter {param!r}; known: {', '.join(PARAMS)}")
    return param, _values(param, [v.strip() for v in rest.split(",")])


def _values(param: str, raw: list[Any]) -> list[float]:
    out = []
    for v in raw:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise AuditError(f"{param}: {v!r} is not a number") from None
        if not math.isfinite(x) or x < 0:
            raise AuditError(f"{param}: values must be finite and >= 0, got {v!r}")
        out.append(x)
    if not out:
        raise AuditError(f"{param}: give at least one value")
    if len(set(out)) != len(out):
        raise AuditError(f"{param}: values repeat: {raw}")
    return out


def _eligible(graph: Graph, param: str) -> list[Wire]:
    applies = sweep_params()[param][1].applies
    return [w for w in graph.wires if applies(graph, w)]


def swept_wires(graph: Graph, param: str, wire: str | None) -> list[Wire]:
    """The wires a sweep sets: ``wire`` (a wire name or its source node), ``"all"`` (every wire the
    setting applies to), or by default the first such wire."""
    eligible = _eligible(graph, param)
    if not eligible:
        raise AuditError(f"{param} applies to no wire of plan {graph.plan.name!r}")
    if wire is None:
        return eligible[:1]
    if wire == "all":
        return eligible
    match = [w for w in graph.wires if wire in (w.name, w.src)]
    if not match:
        raise AuditError(f"--wire {wire!r}: no such wire; wires: {', '.join(w.name for w in graph.wires)}")
    bad = [w.name for w in match if w not in eligible]
    if bad:
        raise AuditError(f"{param} does not apply to wire {bad[0]!r}; it applies to "
                         f"{', '.join(w.name for w in eligible)}")
    return match


def plan_with(plan: Plan, param: str, value: float, wires: list[Wire]) -> Plan:
    """A copy of ``plan`` with the swept setting at ``value`` on ``wires`` (keyed by source node)."""
    body = plan.model_dump(mode="json")
    known = sweep_params()
    if param not in known:
        raise AuditError(f"unknown parameter {param!r}; known: {', '.join(known)}")
    defense, setting = known[param]
    for w in wires:
        spec = dict(body["wires"].get(w.src) or {})
        spec[defense.key] = setting.value(spec.get(defense.key), value)
        body["wires"][w.src] = spec
    try:
        new = load_plan(body)
    except PlanError as e:
        raise AuditError(f"{param}={value:g}: {e}") from None
    new._source = plan._source  # relative data paths stay relative to the plan file
    return new


def _figures(entry: dict[str, Any]) -> dict[str, Any]:
    inv = entry.get("inversion") or {}
    leak = entry.get("label_leakage") or {}
    text = entry.get("text_inversion") or {}
    rates = [r["rate"] for r in (text.get("learned"), text.get("nearest_embedding")) if r]
    return {"distance_correlation": entry.get("distance_correlation"), "inversion_mse": inv.get("mse"),
            "inversion_relative": inv["mse"] / inv["mse_mean_guess"] if inv.get("mse") is not None and
            inv.get("mse_mean_guess") else None,
            "inversion_ssim": inv.get("ssim"), "norm_auc": leak.get("norm_auc"),
            "direction_auc": leak.get("direction_auc"), "token_recovery": max(rates) if rates else None,
            "token_chance": text.get("chance")}


def _score(rows: list[dict[str, Any]]) -> None:
    """Each row's defense score (``dcs``, :mod:`~splitlearn.tools.audit.score`): its measures' mean DCS against the
    first setting's test accuracy (a sweep's first setting: the least defended, e.g. 0)."""
    ref = rows[0].get("test_accuracy") if rows and not rows[0].get("failed") else None
    for r in rows:
        found = sweep_strengths(r) if not r.get("failed") else []
        if found and ref is not None and r.get("test_accuracy") is not None:
            r["dcs"] = sum(dcs(a, ref - r["test_accuracy"]) for a in found) / len(found)


def setting_name(values: Mapping[str, float]) -> str:
    """A setting's folder and label: ``P=V``, or ``P1=V1,P2=V2`` in a grid."""
    return ",".join(f"{p}={v:g}" for p, v in values.items())


def _table(result: dict[str, Any]) -> str:
    rows, params = result["rows"], result["params"]
    keys = [k for k in FIGURES if any(r.get(k) is not None for r in rows)]
    dp = any("delta" in r for r in rows)
    score = any(r.get("dcs") is not None for r in rows)
    loss = ["test_loss"] if any(r.get("test_loss") is not None for r in rows) else []
    head = [*(["value"] if len(params) == 1 else params), "test accuracy", *(["test loss"] if loss else []),
            *(FIGURES[k] for k in keys), *(["epsilon (noise)"] if dp else []), *(["DCS"] if score else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        setting = [f"{r['values'][p]:g}" for p in params]
        if r.get("failed"):  # failures as data: the setting's error in the table, the others finished
            cells = setting + [f"failed: {r['failed'][:200]}".replace("|", "/")]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
            continue
        acc = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        cells = setting + [acc] + ["n/a" if r.get(k) is None else f"{r[k]:.4f}" for k in loss + keys]
        if dp:
            cells.append("unbounded" if r.get("epsilon") is None else f"{r['epsilon']:.3g} (delta {r['delta']:g})")
        if score:
            cells.append("n/a" if r.get("dcs") is None else f"{r['dcs']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(plan_path: str | Path | Plan, param: str | Mapping[str, Sequence[float]], values: list[float] | None,
          out: str | Path, wire: str | None = None, epochs: int | None = None, *, aux_fraction: float = 0.1,
          seed: int = 0, decoder_epochs: int = 200, train_seed: int | None = None,
          progress: Callable[[str], None] | None = None, ray: str | None = None) -> dict[str, Any]:
    """Train ``plan_path`` once per value of ``param`` on the chosen wire(s), audit every run and
    tabulate test accuracy against the leakage figures of those wires (the worst over them when
    there are several). ``param`` may instead map several parameters to their values (``values``
    None): a grid, one run per combination. ``epochs``/``train_seed`` override the plan's training
    settings; ``aux_fraction``, ``seed``, ``decoder_epochs`` go to
    :func:`~splitlearn.tools.audit.audit_run`; ``progress`` is told what is being done; ``ray``:
    every setting as a Ray task, in parallel as the cluster at that address allows ("local": one on
    this machine). A setting that fails is listed as failed; the others finish."""
    from .figures import sweep_plot

    if isinstance(param, str):
        grid = {param: values}
    elif values is not None:
        raise AuditError("a grid takes its values in the mapping: sweep(plan, {PARAM: [V1, ...], ...}, None, out)")
    else:
        grid = dict(param)
    if not grid:
        raise AuditError("give at least one parameter to sweep")
    for p in grid:
        if p not in PARAMS:
            raise AuditError(f"unknown parameter {p!r}; known: {', '.join(PARAMS)}")
        grid[p] = _values(p, [] if grid[p] is None else list(grid[p]))
    try:
        base = load_plan(plan_path)
    except PlanError as e:
        raise AuditError(str(e)) from None
    graph = build_graph(base)
    on = {p: swept_wires(graph, p, wire) for p in grid}
    wires = list({w.name: w for ws in on.values() for w in ws}.values())  # every wire a parameter sets, once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from ...launch.onray import TaskFailure, run_tasks, write_files

    settings = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    items = []
    for setting in settings:
        plan = base
        for p, v in setting.items():
            plan = plan_with(plan, p, v, on[p])
        items.append((plan, setting, [w.name for w in wires], [w.src_party for w in wires], epochs, train_seed,
                      aux_fraction, seed, decoder_epochs))
    if progress is not None:
        progress(f"{setting_name(settings[0])}: training {base.name} and auditing it"
                 + (f" ({len(settings)} settings as Ray tasks)" if ray is not None else ""))

    def tell(i: int, value: Any) -> None:
        if progress is not None and i + 1 < len(settings):
            progress(f"{setting_name(settings[i + 1])}: training {base.name} and auditing it")

    if ray is None:
        done = run_tasks(_setting_here, [(*item, out / setting_name(item[1])) for item in items], progress=tell)
    else:
        done = run_tasks(_setting_shipped, items, ray_address=ray, use_ray=True, progress=tell)
    rows = []
    for setting, d in zip(settings, done):
        run_dir = out / setting_name(setting)
        one = {"value": setting[next(iter(grid))]} if len(grid) == 1 else {}
        if isinstance(d, TaskFailure):
            rows.append({**one, "values": setting, "failed": d.error, "test_accuracy": None, "run": str(run_dir)})
            continue
        row, files = d
        if files is not None:
            write_files(run_dir, files)
        rows.append({**one, **row, "run": str(run_dir)})
    _score(rows)
    params = list(grid)
    name = " x ".join(params)
    summary = {"plan": base.name, "param": name, "params": params, "description": "; ".join(PARAMS[p] for p in params),
               "wires": [w.name for w in wires], "grid": grid, "epochs": epochs or base.train.epochs, "rows": rows}
    if len(params) == 1:
        summary["values"] = grid[params[0]]  # as before grids: one parameter's values
    from ...launch.results import write_json

    write_json(out / "sweep.json", summary)
    note = ("" if len(wires) == 1 else
            f"\nLeakage figures are the worst over the {len(wires)} wires (largest dCor, SSIM, AUCs and token "
            "recovery, smallest MSE).\n")
    if any(r.get("dcs") is not None for r in rows):
        note += (f"\nDCS: the defense score after VFLAIR's (splitlearn.tools.audit.score): 1 / (1 + sqrt(0.5 A^2 + "
                 f"0.5 M^2)), A the mean over the measures above of each one's share of the way from its baseline to "
                 f"a perfect attack, M the test accuracy lost against the first setting ({setting_name(settings[0])}); "
                 f"1 is the ideal.\n")
    chance = sorted({r["token_chance"] for r in rows if r.get("token_chance") is not None})
    if chance:  # what guessing the most frequent token everywhere scores, beside the attacks' recovery
        span = f"{chance[0]:.4f}" + (f" to {chance[-1]:.4f}" if len(chance) > 1 else "")
        note += (f"\nToken recovery: the share of the tokens the better text-inversion attack recovers from the "
                 f"hidden states (chance, the most frequent token: {span}).\n")
    (out / "sweep.md").write_text(
        f"# Sweep of {name} on {', '.join(w.name for w in wires)} ({base.name}, {summary['epochs']} epochs)\n\n"
        f"{summary['description']}.\n{note}\n{_table(summary)}\n")
    shown = [{**r, "label": setting_name(r["values"]) if len(params) > 1 else f"{r['value']:g}"} for r in rows
             if not r.get("failed")]
    sweep_plot(out / "sweep.png", name, shown, FIGURES, join=len(params) == 1)
    return summary


def _setting(plan: Plan, values: dict[str, float], wire_names: list[str], senders: list[str], epochs: int | None,
             train_seed: int | None, aux_fraction: float, seed: int, decoder_epochs: int, run_dir: Path) -> dict:
    """Train one setting into ``run_dir``, audit it; its row of the table."""
    from ...api import train

    result = train(plan, epochs=epochs, seed=train_seed, out=run_dir)
    audit = audit_run(run_dir, aux_fraction=aux_fraction, seed=seed, epochs=decoder_epochs,
                      attacks=sorted(WIRE_MEASURES))  # what the table shows: the per-wire measures
    per_wire = {w: _figures(audit["wires"][w]) for w in wire_names}
    worst = {k: (_WORST[k](xs) if (xs := [f[k] for f in per_wire.values() if f[k] is not None]) else None)
             for k in _WORST}
    row = {"values": values, "test_accuracy": result["metrics"].get("test_accuracy"),
           "test_loss": audit.get("test_loss"), **worst, "wires": per_wire}
    chance = [f["token_chance"] for f in per_wire.values() if f["token_chance"] is not None]
    if chance:
        row["token_chance"] = max(chance)
    spent = [result["parties"][p].get("privacy", {}).get(w) for w, p in zip(wire_names, senders)]
    if any(spent):  # the noise's (epsilon, delta), as the run accounted it; None where unbounded (sigma 0)
        eps = [p["epsilon"] for p in spent if p]
        row["epsilon"] = max(eps) if all(math.isfinite(e) for e in eps) else None
        row["delta"] = max(p["delta"] for p in spent if p)
    return row


def _setting_here(*args: Any) -> tuple[dict, None]:
    return _setting(*args), None


def _setting_shipped(*args: Any) -> tuple[dict, dict[str, bytes]]:
    """A Ray task: the setting in a folder of the worker's own; its row and the folder's files."""
    import tempfile

    from ...launch.onray import folder_files

    with tempfile.TemporaryDirectory(prefix="splitlearn-sweep-") as tmp:
        return _setting(*args, Path(tmp)), folder_files(Path(tmp))
