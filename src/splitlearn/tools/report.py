"""``splitlearn report RUN_DIR``: one self-contained ``report.html`` of a run (or of a compare).

Everything is in the file (pictures as inline PNG, the style inline, no script or font from
anywhere), so it opens offline and can be mailed: the topology, the curves of every metric,
per-party bytes, FLOPs, compute and wait, each wire with what it carries, its codecs and
defenses, the privacy spent, the test figures with their rows and 95 % intervals, the last
evaluation's confusion matrix, ROC curve and reliability diagram (regression: predicted against
observed, residuals), the audit's figures and pictures when ``RUN_DIR/audit`` exists,
and for a ``compare`` folder its table and the accuracy-vs-computation picture.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ..core.units import human as _human

__all__ = ["ReportError", "write_report"]


class ReportError(ValueError):
    """A folder that is neither a run folder nor a compare folder."""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _figure(draw, width: float = 9.0, height: float = 3.2) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curves(metrics: dict[str, Any]) -> bytes | None:
    per_epoch = {k: v for k, v in metrics.get("per_epoch", {}).items() if v and all(x is not None for x in v)}
    steps = metrics.get("train_loss_steps") or []
    panels = (["train loss per step"] if steps else []) + list(per_epoch)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)

    from matplotlib.ticker import MaxNLocator

    def draw(fig) -> None:
        for i, name in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            if name == "train loss per step":
                ax.plot([s for s, _ in steps], [v for _, v in steps], linewidth=1)
                ax.set_xlabel("step")
            else:
                ys = per_epoch[name]
                ax.plot(range(1, len(ys) + 1), ys, marker="o")
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name.replace("_", " "), fontsize=10)
            ax.grid(alpha=0.3)

    return _figure(draw, 4.0 * cols, 2.8 * rows)


def _class_names(result: dict[str, Any], k: int) -> list[str]:
    """The label holder's class names (recorded when its labels were text), else 0..k-1."""
    for party in result.get("parties", {}).values():
        for entry in ((party.get("data") or {}).get("schema") or {}).values():
            names = entry.get("classes") if isinstance(entry, dict) else None
            if isinstance(names, list) and len(names) == k:
                return [str(n) for n in names]
    return [str(i) for i in range(k)]


def _clinical(result: dict[str, Any]) -> bytes | None:
    """The last evaluation as a clinician reads it: confusion matrix, ROC curve (binary) and reliability
    diagram for classification; predicted against observed and residuals for regression."""
    c = result.get("metrics", {}).get("curves")
    if not isinstance(c, dict):
        return None
    if "observed" in c:
        obs, pred = c["observed"], c["predicted"]
        if not obs:
            return None

        def draw_regression(fig) -> None:
            ax = fig.add_subplot(1, 2, 1)
            ax.scatter(obs, pred, s=8, alpha=0.6)
            lo, hi = min(min(obs), min(pred)), max(max(obs), max(pred))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
            ax.set_xlabel("observed")
            ax.set_ylabel("predicted")
            ax.set_title("predicted against observed", fontsize=10)
            ax = fig.add_subplot(1, 2, 2)
            ax.scatter(pred, [o - p for o, p in zip(obs, pred)], s=8, alpha=0.6)
            ax.axhline(0, color="grey", linewidth=1)
            ax.set_xlabel("predicted")
            ax.set_ylabel("observed - predicted")
            ax.set_title("residuals", fontsize=10)
            for a in fig.axes:
                a.grid(alpha=0.3)

        return _figure(draw_regression, 9.0, 3.6)
    matrix = c.get("confusion")
    if not matrix:
        return None
    names = _class_names(result, len(matrix))
    panels = 2 + ("roc" in c)

    def draw_classification(fig) -> None:
        ax = fig.add_subplot(1, panels, 1)
        ax.imshow(matrix, cmap="Blues")
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
        ticks = range(len(names))
        ax.set_xticks(list(ticks), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(list(ticks), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix", fontsize=10)
        at = 2
        if "roc" in c:
            ax = fig.add_subplot(1, panels, at)
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"])
            ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
            ax.set_xlabel(f"1 - specificity (positive: {names[1]})")
            ax.set_ylabel("sensitivity")
            ax.set_title("ROC curve", fontsize=10)
            ax.grid(alpha=0.3)
            at += 1
        cal = c.get("calibration") or {}
        ax = fig.add_subplot(1, panels, at)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
        ax.plot(cal.get("confidence", []), cal.get("accuracy", []), marker="o")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title("calibration (reliability)", fontsize=10)
        ax.grid(alpha=0.3)

    return _figure(draw_classification, 3.6 * panels, 3.4)


def _topology(run_dir: Path) -> bytes | None:
    """The run's picture from its plan.json (parsed only: no factory of the plan is run)."""
    from ..core.graph import build_graph
    from ..core.plan import parse_plan
    from .viz import topology_png

    try:
        return topology_png(build_graph(parse_plan(json.loads((run_dir / "plan.json").read_text()))))
    except Exception:  # noqa: BLE001 - no plan.json, or one this version cannot read: no picture
        return None


def _defenses(spec: dict[str, Any]) -> str:
    keys = [k for k in spec if k not in ("codec", "grad_codec", "allow_nonfinite", "max_abs", "max_jump")
            and spec[k] not in (None, 0, 0.0, {}, False)]
    return ", ".join(f"{k} {json.dumps(spec[k])}" for k in keys) or "none"


def _audit_section(run_dir: Path) -> str:
    file = run_dir / "audit" / "audit.json"
    if not file.is_file():
        return "<p>No audit yet: <code>splitlearn audit RUN_DIR</code> measures what each party could learn.</p>"
    audit = json.loads(file.read_text())
    rows, pictures = [], []
    for name, w in audit.get("wires", {}).items():
        inv = w.get("inversion") or {}
        leak = w.get("label_leakage") or {}
        verdicts = "; ".join(f"{k}: {v['verdict']}" for k, v in (w.get("verdicts") or {}).items())
        rows.append([name, f"{w.get('sender')} -> {w.get('receiver')}", w.get("carries"),
                     w.get("distance_correlation"), inv.get("mse"), inv.get("ssim"), leak.get("norm_auc"),
                     leak.get("direction_auc"), verdicts or "-"])
        fig = inv.get("figure")
        inside = isinstance(fig, str) and (run_dir / fig).resolve().is_relative_to((run_dir / "audit").resolve())
        if inside and (run_dir / fig).is_file():  # only the audit's own pictures are embedded
            pictures.append(f"<figure>{_img((run_dir / fig).read_bytes(), f'inversion on {name}')}"
                            f"<figcaption>model inversion on {html.escape(name)}: originals (top) and what "
                            "the receiver reconstructs (bottom)</figcaption></figure>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in audit.get("explanations", []))
    return ((_table(["wire", "from -> to", "carries", "dCor", "inversion MSE", "SSIM", "norm AUC", "direction AUC",
                     "verdict"], rows) if rows else "") + (f"<ul>{notes}</ul>" if notes else "") + "".join(pictures)
            + "".join(_attack_section(run_dir, a) for a in audit.get("attacks", {}).values()))


def _attack_section(run_dir: Path, a: dict[str, Any]) -> str:
    """One registered attack of the audit: who attacks with what, its figure against its baseline per place it
    applies, the verdict and the plan line that reduces it, and its figures."""
    head = (f"<h3>{html.escape(a.get('title', ''))}</h3><p>{html.escape(a.get('attacker', ''))}; needs "
            f"{html.escape(a.get('needs', ''))}. Baseline: {html.escape(a.get('baseline', ''))}."
            + (f" Published: {html.escape(a['paper'])}." if a.get("paper") else "") + "</p>")
    if a.get("why_not"):
        return head + f"<p>Does not apply: {html.escape(a['why_not'])}</p>"
    rows, pictures = [], []
    for r in a.get("results", []):
        rows.append([r.get("wire"), r.get("attacker"), r.get("figure_text") or r.get("why_not"),
                     r.get("verdict", "-"), r.get("remedy", "")])
        fig = r.get("figure")
        inside = isinstance(fig, str) and (run_dir / fig).resolve().is_relative_to((run_dir / "audit").resolve())
        if inside and (run_dir / fig).is_file():
            pictures.append(f"<figure>{_img((run_dir / fig).read_bytes(), str(a.get('title', 'attack')))}</figure>")
    return head + _table(["wire", "attacker", "figure", "verdict", "what reduces it"], rows) + "".join(pictures)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .55rem;
text-align:left}th{background:#f2f4f7}img{max-width:100%;border:1px solid #eee}.big{font-size:1.3rem}
figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}code{background:#f2f4f7;padding:0 .2rem}
"""

_CHECK = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", imgs.length + " " + bad.length);
  bad.forEach(function (i) { console.error("image did not decode: " + i.alt); });
});
</script>
"""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}{_CHECK}</body></html>")


def _asked(figures: dict[str, Any]) -> dict[str, Any]:
    """The ``test_<name>`` figures of extra metrics a plan's losses asked (``metrics``: core.metrics.EXTRA_METRICS)."""
    from ..core.metrics import EXTRA_METRICS

    return {k: v for k, v in figures.items() if k.startswith("test_") and k.removeprefix("test_") in EXTRA_METRICS}


def _run_body(run_dir: Path, result: dict[str, Any]) -> str:
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    m = result.get("metrics", {})
    parts = [f"<h1>{html.escape(str(result.get('plan', run_dir.name)))}</h1>"]
    if plan.get("description"):
        parts.append(f"<p>{html.escape(plan['description'])}</p>")
    e = html.escape
    parts.append(f"<p>{e(_fmt(result.get('epochs')))} epochs, seed {e(_fmt(result.get('seed')))}, transport "
                 f"{e(str(result.get('transport', '-')))}</p>")
    final = [(k.removeprefix("test_").replace("_", " "), v, (m.get("ci95") or {}).get(k)) for k, v in m.items()
             if k.startswith("test_") and isinstance(v, float)]
    asked = _asked(m.get("per_epoch", {}))  # a loss's extra metrics: the last evaluation's
    final += [(k.removeprefix("test_").replace("_", " "), v[-1], None) for k, v in asked.items()
              if k not in m and v and isinstance(v[-1], float)]
    if final:
        rows = f" ({m['test_rows']} rows)" if m.get("test_rows") else ""
        parts.append(f"<h2>Results on the test rows{html.escape(rows)}</h2>"
                     + _table(["", *(k for k, _, _ in final)],
                              [["value", *(v for _, v, _ in final)],
                               ["95 % interval", *(f"{ci[0]:.4g} - {ci[1]:.4g}" if ci else "-" for _, _, ci in final)]]))
    clinical = _clinical(result)
    if clinical:
        parts.append("<h2>The last evaluation</h2>" + _img(clinical, "confusion matrix, ROC curve and calibration, "
                                                            "or predicted against observed and residuals"))
    for task, t in m.get("tasks", {}).items():
        parts.append(f"<p>task <b>{html.escape(str(task))}</b> at {html.escape(str(t.get('party')))}: test accuracy "
                     f"{html.escape(_fmt(t.get('test_accuracy')))}</p>")
    topo = _topology(run_dir)
    if topo:
        parts.append("<h2>Topology</h2>" + _img(topo, "topology"))
    curves = _curves(m)
    if curves:
        parts.append("<h2>Curves</h2>" + _img(curves, "training curves"))
    rows = [[n, _human(p.get("bytes_sent"), "B"), _human(p.get("bytes_received"), "B"), _human(p.get("flops")),
             p.get("compute_s"), p.get("wait_s")] for n, p in result.get("parties", {}).items()]
    parts.append("<h2>Parties</h2>" + _table(["party", "bytes sent", "bytes received", "FLOPs", "compute s",
                                              "wait s"], rows))
    specs = plan.get("wires", {})
    wrows = []
    for w in result.get("wires", []):
        spec = next((v for k, v in specs.items() if w["name"].startswith(f"{k}->")), {})
        wrows.append([w["name"], w["src"], w["dst"], w["carries"], w.get("codec"), w.get("grad_codec", "-"),
                      _defenses(spec)])
    parts.append("<h2>Wires</h2>" + _table(["wire", "from", "to", "carries", "codec", "gradient codec",
                                            "defenses"], wrows))
    labels = [w for w in result.get("wires", []) if w["carries"] == "label"]
    if labels:
        parts.append("<p>" + "; ".join(f"labels of {html.escape(w['src'])} travel to {html.escape(w['dst'])} on "
                                       f"{html.escape(w['name'])}" for w in labels) + "</p>")
    privacy = result.get("privacy", {})
    parts.append("<h2>Privacy spent</h2>" + (_table(["wire", "epsilon", "delta"], [[k, p.get("epsilon"), p.get("delta")]
                                                                                  for k, p in privacy.items()])
                                            if privacy else "<p>No wire adds calibrated noise: no epsilon to report."
                                                            "</p>"))
    if "schedule" in result:
        s = result["schedule"]
        parts.append(f"<h2>Clients</h2><p>{html.escape(_fmt(s.get('clients')))} clients, schedule "
                     f"{html.escape(str(s.get('kind')))}, "
                     f"partition {html.escape(json.dumps(s.get('partition')))}</p>")
        sites = m.get("per_client", {})
        if m.get("scored") and sites:  # the headline is pooled over these sites' test rows; each on its own
            names = [k for k in ("test_accuracy", "test_roc_auc", "test_sensitivity", "test_specificity", "test_f1",
                                 "test_mae", "test_r2") if any(k in e for e in sites.values())]
            names += sorted({k for e in sites.values() for k in _asked(e)})  # the plan's extra metrics
            parts.append(f"<p>Test figures above: pooled over {html.escape(_fmt(m['scored'].get('rows')))} test rows "
                         f"of {len(sites)} clients. Per client:</p>"
                         + _table(["client", "rows", *(k.removeprefix("test_") for k in names)],
                                  [[c, e.get("rows"), *(e.get(k) for k in names)] for c, e in sites.items()]))
        if result.get("skipped"):
            parts.append(_table(["round", "client", "during", "reason"],
                                [[x["round"], x["client"], x["during"], x["reason"]] for x in result["skipped"][:50]]))
    parts.append("<h2>Audit</h2>" + _audit_section(run_dir))
    return "".join(parts)


def _compare_body(folder: Path, table: dict[str, Any]) -> str:
    parts = [f"<h1>compare: {html.escape(str(table.get('plan', folder.name)))}</h1>"]
    rows = table.get("rows") or table.get("methods") or []
    if isinstance(rows, dict):
        rows = [{"method": k, **v} for k, v in rows.items()]
    if rows:
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
        parts.append(_table(keys, [[r.get(k) for k in keys] for r in rows]))
    for png, caption in (("accuracy_vs_computation.png", "accuracy against per-client computation"),
                         ("bytes_per_client.png", "bytes per client")):
        if (folder / png).is_file():
            parts.append(f"<figure>{_img((folder / png).read_bytes(), caption)}<figcaption>{caption}</figcaption>"
                         "</figure>")
    return "".join(parts)


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run folder (``result.json``) or a compare folder (``compare.json``)."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder / "report.html"
    if (folder / "result.json").is_file():
        result = json.loads((folder / "result.json").read_text())
        page = _page(f"splitlearn report: {result.get('plan', folder.name)}", _run_body(folder, result))
    elif (folder / "compare.json").is_file():
        table = json.loads((folder / "compare.json").read_text())
        page = _page(f"splitlearn compare: {folder.name}", _compare_body(folder, table))
    else:
        raise ReportError(f"{folder}: neither a run folder (result.json) nor a compare folder (compare.json)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
