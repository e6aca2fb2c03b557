"""Pictures and plain-text summaries of a plan's topology.

:func:`draw_topology` draws the graph of a plan as a PNG: one coloured swim lane per party,
the inputs, segments and losses it holds as boxes placed left to right by depth, and arrows
for the edges. Wires (edges between parties) are thick: activations in blue, labels in red
and dashed, since a label wire is the one that gives a party's labels away.

:func:`describe` is the same information as text, printed by ``splitlearn inspect``.

Only the Agg canvas is used (no pyplot, no global backend change), so this works headless.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ..core.graph import Graph, Node, Wire
from ..core.units import human

__all__ = ["draw_topology", "topology_png", "render_topology", "wire_styles", "describe", "shape_text", "clients_text",
           "compare_figures"]

# light band / box fill / dark edge+text, one triple per party (cycled)
_PALETTE = [
    ("#e3eef9", "#a9c9ea", "#2f5f93"),
    ("#fdebd9", "#f8c596", "#a65a17"),
    ("#e3f2df", "#b5dcae", "#2f7a2f"),
    ("#eee3f4", "#d2b8e3", "#6a3f8c"),
    ("#fff6cc", "#ffe37a", "#8a7300"),
    ("#ddf3f3", "#a6dede", "#1f7373"),
    ("#f8e1e4", "#ecaab5", "#9c3b4b"),
    ("#ececec", "#c8c8c8", "#555555"),
]
_ACT = "#1f5fbf"
_LABEL = "#d62728"
_LOCAL = "#8c8c8c"
_LOSS_FACE, _LOSS_EDGE = "#ffd08a", "#b8660b"

# layout, in inches (one data unit of the drawing is one inch)
_LANE_LABEL_W = 1.9
_COL_W = 2.35
_ROW_H = 0.85
_LANE_PAD = 0.28
_LANE_GAP = 0.12
_SEG_W, _SEG_H = 1.7, 0.6
_IN_W, _IN_H = 1.45, 0.4
_LOSS_W, _LOSS_H = 1.45, 0.58
_DPI = 120


# --------------------------------------------------------------------------- helpers

def _layers_text(layers: tuple[int, int] | None) -> str:
    """``[start, stop)`` of the plan as the layers actually held (inclusive), e.g. ``layers 0-1``."""
    if layers is None:
        return ""
    a, b = layers
    return f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"


_ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}


def shape_text(dtype: str, shape: tuple[int, ...]) -> str:
    """``16×8×8 float32, 4.1 kB/sample``: what one sample puts on a wire before its codec."""
    values = 1
    for d in shape:
        values *= d
    dims = "×".join(map(str, shape)) or "1"
    return f"{dims} {dtype}, {human(values * _ITEM_BYTES.get(dtype, 4), 'B')}/sample"


def wire_styles(graph: Graph, shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """How each wire is drawn: ``{wire name: {color, linestyle, linewidth, annotation}}``.

    Label wires are red and dashed (they are the privacy-relevant ones), activation wires blue
    and solid, annotated with what travels each way (and the codec when it is not float32), and
    with ``shapes`` (from a dry run) the values and bytes per sample.
    """
    styles: dict[str, dict[str, Any]] = {}
    for w in graph.wires:
        size = f"\n{shape_text(*shapes[w.name])}" if shapes and w.name in shapes else ""
        if w.carries == "label":
            styles[w.name] = {"color": _LABEL, "linestyle": "--", "linewidth": 2.6, "annotation": "labels" + size}
        else:
            fwd = "act →" + (f" ({w.codec})" if w.codec != "float32" else "")
            bwd = "← grad" + (f" ({w.grad_codec})" if w.grad_codec != "float32" else "")
            styles[w.name] = {"color": _ACT, "linestyle": "-", "linewidth": 2.6,
                              "annotation": f"{fwd}\n{bwd}{size}"}
    return styles


def clients_text(graph: Graph) -> str:
    """One line on a ``[clients]`` plan's clients, schedule and hand-off ("" without clients)."""
    from ..clients.layout import schedule_line

    return schedule_line(graph.plan)


def _columns(graph: Graph) -> dict[str, int]:
    """x position of each node: its depth (longest path from an input).

    An input used only as a loss target is pulled right, next to its loss, so the label wire
    is short instead of crossing the whole figure; data still flows left to right.
    """
    depth: dict[str, int] = {}
    for n in graph.order:
        node = graph.nodes[n]
        depth[n] = 1 + max(depth[d] for d in node.inputs) if node.inputs else 0
    for n in graph.label_inputs():
        users = [m for m in graph.order if n in graph.nodes[m].inputs]
        if users:
            depth[n] = max(0, min(depth[u] for u in users) - 1)
    return depth


def _node_text(graph: Graph, node: Node, label_inputs: set[str]) -> tuple[str, str]:
    """(main line, small second line) of a node's box."""
    plan = graph.plan
    if node.kind == "input":
        return node.name, ("labels" if node.name in label_inputs else "")
    if node.kind == "segment":
        seg = plan.segments[node.name]
        sub = _layers_text(seg.layers) or (f"to {seg.cut}" if seg.cut else "")
        if seg.network != node.name:
            sub = f"{sub} ({seg.network})" if sub else seg.network
        if len(node.inputs) > 1:
            sub = f"{sub}, {seg.merge}" if sub else f"merge: {seg.merge}"
        return node.name, sub
    if node.kind == "output":  # one element of a segment's tuple or dict output
        return node.name, "output"
    loss = plan.losses[node.name]
    return f"loss {node.name}", loss.kind


def _fit(text: str, width_in: float, size: float) -> float:
    """A font size at most ``size`` at which ``text`` fits in ``width_in`` inches (roughly)."""
    longest = max((len(line) for line in text.split("\n")), default=1) or 1
    per_char = 0.62 * size / 72  # average glyph width of DejaVu Sans, in inches
    return max(5.5, min(size, size * width_in / (longest * per_char)))


def _arc_point(a: tuple[float, float], b: tuple[float, float], rad: float, t: float) -> tuple[float, float]:
    """Point ``t`` along matplotlib's ``arc3`` curve from ``a`` to ``b`` (a quadratic Bezier)."""
    (x1, y1), (x2, y2) = a, b
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    u = 1 - t
    return u * u * x1 + 2 * u * t * cx + t * t * x2, u * u * y1 + 2 * u * t * cy + t * t * y2


def _bend(a: tuple[float, float], b: tuple[float, float],
          boxes: dict[str, tuple[tuple[float, float], tuple[float, float]]]) -> float:
    """The smallest ``arc3`` curvature whose curve from ``a`` to ``b`` misses all ``boxes``."""
    margin = 0.08

    def hits(rad: float) -> int:
        count = 0
        for (x, y), (w, h) in boxes.values():
            for i in range(1, 40):
                px, py = _arc_point(a, b, rad, i / 40)
                if abs(px - x) <= w / 2 + margin and abs(py - y) <= h / 2 + margin:
                    count += 1
                    break
        return count

    best, fewest = 0.0, None
    for rad in (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45):
        k = hits(rad)
        if k == 0:
            return rad
        if fewest is None or k < fewest:
            best, fewest = rad, k
    return best


# --------------------------------------------------------------------------- drawing

def render_topology(graph: Graph, title: str | None = None, shapes: dict | None = None):
    """Draw the topology on a new Agg figure; return ``(figure, {wire name: [arrow patches]})``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch, Patch, Rectangle

    from ..clients.layout import clients_playing

    plan = graph.plan
    parties = graph.parties
    colour = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(parties)}
    label_inputs = graph.label_inputs()
    col = _columns(graph)
    ncols = max(col.values()) + 1

    # nodes of each (party, column) cell, stacked vertically: a node fed from a lane above goes
    # to the top of its cell, one fed from below to the bottom, so wires do not cross boxes
    lane = {p: i for i, p in enumerate(parties)}

    def pull(n: str) -> float:
        node = graph.nodes[n]
        srcs = [lane[graph.nodes[d].party] - lane[node.party] for d in node.inputs]
        return sum(srcs) / len(srcs) if srcs else 0.0

    cells: dict[tuple[str, int], list[str]] = {}
    for n in graph.order:
        cells.setdefault((graph.nodes[n].party, col[n]), []).append(n)
    for members in cells.values():
        members.sort(key=pull)
    rows = {p: max([len(v) for (q, _), v in cells.items() if q == p] or [1]) for p in parties}

    # sizes (inches)
    width = max(9.0, _LANE_LABEL_W + ncols * _COL_W + 0.3)
    if title is None:
        title = plan.name + (f": {plan.description}" if plan.description else "")
    schedule = clients_text(graph)
    if schedule:
        title += "\n" + schedule
    title_lines = [line for part in title.split("\n")
                   for line in textwrap.wrap(part, width=max(40, int(width * 72 / (0.6 * 13))))] or [""]
    title_h = 0.35 + 0.28 * len(title_lines)
    legend_ncol = 6 if width >= 13 else 3
    legend_h = 0.55 if legend_ncol == 6 else 0.8
    lane_h = {p: rows[p] * _ROW_H + 2 * _LANE_PAD for p in parties}
    lanes_h = sum(lane_h.values()) + _LANE_GAP * (len(parties) - 1)
    height = title_h + lanes_h + legend_h + 0.15

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()

    ax.text(width / 2, height - 0.22, "\n".join(title_lines), ha="center", va="top", fontsize=13,
            fontweight="bold", linespacing=1.3)

    # lanes
    centre: dict[str, tuple[float, float]] = {}
    patch: dict[str, Any] = {}
    extent: dict[str, tuple[float, float]] = {}
    top = height - title_h
    lane_right = _LANE_LABEL_W + ncols * _COL_W
    for p in parties:
        band, fill, dark = colour[p]
        y0 = top - lane_h[p]
        copies = clients_playing(plan, p)  # a [clients] template stands for its clients
        many = bool(copies)
        for k in (2, 1) if many else ():  # a stack of lanes: the template stands for its clients
            ax.add_patch(Rectangle((0.1 + 0.06 * k, y0 - 0.04 * k), lane_right - 0.1, lane_h[p], facecolor=band,
                                   edgecolor=dark, linewidth=0.6, zorder=-0.1 * k))
        ax.add_patch(Rectangle((0.1, y0), lane_right - 0.1, lane_h[p], facecolor=band, edgecolor=dark,
                               linewidth=0.8, zorder=0))
        ax.add_patch(Rectangle((0.1, y0), _LANE_LABEL_W - 0.2, lane_h[p], facecolor=fill, edgecolor="none",
                               alpha=0.55, zorder=0.5))
        spec = plan.parties[p]
        holds = ", ".join(spec.holds) if spec.holds else "no data"
        holds_txt = "\n".join(textwrap.wrap(f"holds: {holds}", 22))
        shown = f"{p} ×{len(copies)}" if many else p
        ax.text(0.25, y0 + lane_h[p] / 2 + 0.1, shown, ha="left", va="bottom", color=dark,
                fontsize=_fit(shown, _LANE_LABEL_W - 0.4, 11.5), fontweight="bold", zorder=4)
        ax.text(0.25, y0 + lane_h[p] / 2 + 0.02, holds_txt, ha="left", va="top", color=dark, fontsize=7.5,
                zorder=4)

        # nodes of the lane
        ymid = y0 + lane_h[p] / 2
        for c in range(ncols):
            members = cells.get((p, c), [])
            for j, n in enumerate(members):
                x = _LANE_LABEL_W + (c + 0.5) * _COL_W
                y = ymid + ((len(members) - 1) / 2 - j) * _ROW_H
                centre[n] = (x, y)
                node = graph.nodes[n]
                main, sub = _node_text(graph, node, label_inputs)
                if node.kind == "segment":
                    w, h = _SEG_W, _SEG_H
                    art = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.14",
                                         facecolor=fill, edgecolor=dark, linewidth=1.4, zorder=3)
                    size = _fit(main, w - 0.15, 10)
                    weight = "bold"
                elif node.kind == "input":
                    w, h = _IN_W, _IN_H
                    art = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.05",
                                         facecolor="white", edgecolor=dark, linewidth=1.0,
                                         linestyle=":" if n in label_inputs else "-", zorder=3)
                    size = _fit(main, w - 0.12, 8.5)
                    weight = "normal"
                else:
                    w, h = _LOSS_W, _LOSS_H
                    art = Ellipse((x, y), w, h, facecolor=_LOSS_FACE, edgecolor=_LOSS_EDGE, linewidth=1.4, zorder=3)
                    size = _fit(main, w - 0.3, 9)
                    weight = "bold"
                ax.add_patch(art)
                patch[n] = art
                extent[n] = (w, h)
                if sub:
                    ax.text(x, y + 0.02, main, ha="center", va="bottom", fontsize=size, fontweight=weight, zorder=4)
                    ax.text(x, y - 0.02, sub, ha="center", va="top", fontsize=_fit(sub, w - 0.15, 7.5),
                            color="#333333", zorder=4)
                else:
                    ax.text(x, y, main, ha="center", va="center", fontsize=size, fontweight=weight, zorder=4)
        top = y0 - _LANE_GAP

    # edges: local ones thin grey, wires thick and annotated once per wire; each edge is bent
    # just enough that it does not run through another node's box
    styles = wire_styles(graph, shapes)
    arrows: dict[str, list[Any]] = {w.name: [] for w in graph.wires}
    annotated: set[str] = set()
    boxes = {n: (centre[n], extent[n]) for n in centre}
    for n in graph.order:
        for d in graph.nodes[n].inputs:
            rad = _bend(centre[d], centre[n], {k: v for k, v in boxes.items() if k not in (d, n)})
            conn = f"arc3,rad={rad}"
            wire: Wire | None = graph.wire_between(d, graph.nodes[n].party)
            if wire is None or graph.nodes[d].party == graph.nodes[n].party:
                ax.add_patch(FancyArrowPatch(centre[d], centre[n], patchA=patch[d], patchB=patch[n],
                                             arrowstyle="-|>", mutation_scale=11, color=_LOCAL, linewidth=1.1,
                                             shrinkA=1, shrinkB=1, connectionstyle=conn, zorder=2))
                continue
            st = styles[wire.name]
            arrow = FancyArrowPatch(centre[d], centre[n], patchA=patch[d], patchB=patch[n],
                                    arrowstyle="-|>", mutation_scale=18, color=st["color"],
                                    linewidth=st["linewidth"], linestyle=st["linestyle"],
                                    shrinkA=2, shrinkB=2, connectionstyle=conn, zorder=2.5)
            arrow.set_gid(f"wire:{wire.name}")
            ax.add_patch(arrow)
            arrows[wire.name].append(arrow)
            if wire.name not in annotated:
                annotated.add(wire.name)
                xm, ym = _arc_point(centre[d], centre[n], rad, 0.5)
                ax.text(xm, ym, st["annotation"], ha="center", va="center",
                        fontsize=7.5, color=st["color"], fontweight="bold", zorder=5, linespacing=1.1,
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": st["color"],
                              "linewidth": 0.6, "alpha": 0.9})

    handles = [
        Patch(facecolor="white", edgecolor="#444444", label="data field (party.field)"),
        Patch(facecolor="#c8c8c8", edgecolor="#444444", label="segment (layers held)"),
        Patch(facecolor=_LOSS_FACE, edgecolor=_LOSS_EDGE, label="loss"),
        Line2D([], [], color=_LOCAL, linewidth=1.1, label="local edge"),
        Line2D([], [], color=_ACT, linewidth=2.6, label="activation wire (act → / ← grad)"),
        Line2D([], [], color=_LABEL, linewidth=2.6, linestyle="--", label="label wire (labels leave their party)"),
    ]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.04 / height), ncol=legend_ncol,
              fontsize=8, frameon=False, handlelength=2.6, columnspacing=1.4)
    return fig, arrows


def draw_topology(graph: Graph, path: str | Path, title: str | None = None,
                  shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> Path:
    """Draw the plan's topology (parties as lanes, nodes by depth, wires as arrows) as a PNG at ``path``.

    ``title`` defaults to the plan's name and description (and, with ``[clients]``, its clients,
    schedule and hand-off); ``shapes`` (wire -> dtype, shape) puts each wire's size per sample
    on it. Returns the path written.
    """
    path = Path(path)
    fig, _ = render_topology(graph, title, shapes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        fig.clear()
    return path


def topology_png(graph: Graph, shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> bytes:
    """The picture of :func:`draw_topology` as PNG bytes (for reports)."""
    import io

    fig, _ = render_topology(graph, None, shapes)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=_DPI, format="png")
    finally:
        fig.clear()
    return buf.getvalue()


# --------------------------------------------------------------------------- text

def _field_text(name: str, ref: Any) -> str:
    text = name if ref.field == name else f"{name}={ref.field}"
    if ref.columns is not None:
        text += f"[{ref.columns[0]}:{ref.columns[1]}]"
    return text


def describe(graph: Graph) -> str:
    """A plain-text summary: parties and what they hold, stages, wires, and the label wires."""
    plan = graph.plan
    label_inputs = graph.label_inputs()
    lines = [f"plan {plan.name}" + (f": {plan.description}" if plan.description else "")]

    lines.append("parties:")
    pw = max(len(p) for p in graph.parties)
    for p in graph.parties:
        spec = plan.parties[p]
        holds = [_field_text(k, ref) + (" (labels)" if f"{p}.{k}" in label_inputs else "")
                 for k, ref in spec.holds.items()]
        parts = ["holds " + (", ".join(holds) if holds else "no data")]
        segs = []
        for n in graph.local_order(p):
            if graph.nodes[n].kind != "segment":
                continue
            seg = plan.segments[n]
            detail = " ".join(t for t in (seg.network if seg.network != n or seg.layers else "",
                                          _layers_text(seg.layers) or (f"up to {seg.cut}" if seg.cut else "")) if t)
            segs.append(f"{n} ({detail})" if detail else n)
        if segs:
            parts.append("runs " + ", ".join(segs))
        losses = [f"{n.name} ({plan.losses[n.name].kind})" for n in graph.losses() if n.party == p]
        if losses:
            parts.append("loss " + ", ".join(losses))
        lines.append(f"  {p:<{pw}}  " + "; ".join(parts))

    lines.append("stages:")
    for s in graph.stages:
        text = f"  {s.party}[{s.index}]: {', '.join(s.nodes)}"
        if s.receives:
            text += f"; receives {', '.join(s.receives)}"
        if s.sends:
            text += f"; sends {', '.join(s.sends)}"
        lines.append(text)

    if graph.wires:
        lines.append("wires:")
        nw = max(len(w.name) for w in graph.wires)
        route = {w.name: f"{w.src_party} -> {w.dst_party}" for w in graph.wires}
        rw = max(len(r) for r in route.values())
        for w in graph.wires:
            codec = w.codec if w.carries == "label" else f"{w.codec}, grad {w.grad_codec}"
            lines.append(f"  {w.name:<{nw}}  {route[w.name]:<{rw}}  {w.carries:<10}  {codec}")
    else:
        lines.append("wires: none")

    labels = graph.label_wires()
    if labels:
        lines.append("label wires: " + ", ".join(
            f"{w.name} (labels of {w.src_party} travel to {w.dst_party})" for w in labels))
    else:
        lines.append("no wire carries labels")
    return "\n".join(lines)


def compare_figures(table: dict[str, Any], folder: str | Path) -> list[Path]:
    """The seed's two pictures for a ``compare`` run: validation accuracy against per-client
    computation (one curve per method, a point per epoch), and per-client bytes per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = table["rows"]
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        acc = [a for a in r["accuracy_per_epoch"] if a is not None]
        if not acc:
            continue
        # computation grows linearly with the epochs: the total split evenly over the epochs
        xs = [r["per_client_tflops"] * (i + 1) / len(acc) for i in range(len(acc))]
        ax.plot(xs, acc, marker="o", label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("per-client computation (TFLOPs, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{table['plan']}: {table['clients']} clients")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    first = folder / "accuracy_vs_computation.png"
    fig.savefig(first, dpi=120)

    fig = Figure(figsize=(6.4, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [r for r in rows if r["method"] != "centralized"]
    ax.bar([r["method"] for r in shown], [r["per_client_gb"] * 1e3 for r in shown], color="#4c72b0")
    ax.set_ylabel("per-client bytes sent + received (MB)")
    values = [r["per_client_gb"] for r in shown if r["per_client_gb"] > 0]
    if values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(f"communication per client, {table['clients']} clients")
    for i, r in enumerate(shown):
        ax.annotate(f"{r['per_client_gb'] * 1e3:.3g}", (i, r["per_client_gb"] * 1e3), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    second = folder / "bytes_per_client.png"
    fig.savefig(second, dpi=120)
    return [first, second]
