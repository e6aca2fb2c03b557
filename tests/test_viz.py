"""The topology figure and the text description of a plan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from splitlearn.core.graph import build_graph
from splitlearn.core.plan import Plan
from splitlearn.tools.viz import render_topology, wire_styles, describe, draw_topology

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PLANS = sorted(p.stem for p in EXAMPLES.glob("*.toml"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _graph(name: str):
    with open(EXAMPLES / f"{name}.toml", "rb") as f:
        plan = Plan.model_validate(tomllib.load(f) | {"name": name})
    return build_graph(plan)


def _rgba(colour):
    from matplotlib.colors import to_rgba

    return tuple(round(c, 3) for c in to_rgba(colour))


def test_all_examples_present():
    assert {"vanilla", "u_shaped", "vertical", "vertical_three", "multi_task", "multi_hop",
            "vertical_u_shaped"} <= set(PLANS)


@pytest.mark.parametrize("name", PLANS)
def test_draw_topology_writes_png(name, tmp_path):
    import matplotlib.image as mpimg

    target = tmp_path / "sub" / f"{name}.png"
    out = draw_topology(_graph(name), target)
    assert out == target and isinstance(out, Path)
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    img = mpimg.imread(target)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 500


def test_draw_topology_accepts_str_path_and_title(tmp_path):
    out = draw_topology(_graph("vanilla"), str(tmp_path / "v.png"), title="custom title")
    assert out == tmp_path / "v.png" and out.read_bytes().startswith(PNG_SIGNATURE)


def test_figure_grows_with_parties_and_depth():
    small, _ = render_topology(_graph("vanilla"))
    big, _ = render_topology(_graph("multi_hop"))
    (sw, sh), (bw, bh) = small.get_size_inches(), big.get_size_inches()
    assert bw > sw and bh > sh


def test_describe_vanilla_one_label_wire():
    text = describe(_graph("vanilla"))
    last = text.splitlines()[-1]
    assert last.startswith("label wires: ")
    assert last.count("labels of") == 1
    assert "hospital.y->digit" in last
    assert "labels of hospital travel to server" in last
    assert "hospital" in text and "server" in text
    assert "bottom->top" in text and "activation" in text


def test_describe_u_shaped_no_label_wire():
    text = describe(_graph("u_shaped"))
    assert text.splitlines()[-1] == "no wire carries labels"
    assert "label wires:" not in text
    assert "bottom->middle" in text and "middle->head" in text


@pytest.mark.parametrize("name", PLANS)
def test_describe_lists_every_party_and_wire(name):
    g = _graph(name)
    text = describe(g)
    for party in g.parties:
        assert party in text
    for w in g.wires:
        assert w.name in text
    labels = g.label_wires()
    assert text.splitlines()[-1].startswith("label wires:" if labels else "no wire carries labels")


def test_wire_styles_label_red_dashed_activation_blue_solid():
    g = _graph("vanilla")
    styles = wire_styles(g)
    assert set(styles) == {w.name for w in g.wires}
    for w in g.wires:
        st = styles[w.name]
        if w.carries == "label":
            assert _rgba(st["color"]) == _rgba("#d62728") and st["linestyle"] == "--"
            assert st["annotation"] == "labels"
        else:
            assert _rgba(st["color"]) == _rgba("#1f5fbf") and st["linestyle"] == "-"
            assert "act" in st["annotation"] and "grad" in st["annotation"]


def test_vanilla_figure_has_red_dashed_label_arrow():
    g = _graph("vanilla")
    fig, arrows = render_topology(g)
    drawn = {id(p) for ax in fig.axes for p in ax.patches}
    (label,) = g.label_wires()
    (act,) = [w for w in g.wires if w.carries == "activation"]
    assert len(arrows[label.name]) == 1 and len(arrows[act.name]) == 1

    red = arrows[label.name][0]
    assert id(red) in drawn and red.get_gid() == f"wire:{label.name}"
    r, gr, b, _ = red.get_edgecolor()
    assert r > 0.7 and gr < 0.3 and b < 0.3  # red
    assert red.get_linestyle() == "--"

    blue = arrows[act.name][0]
    assert id(blue) in drawn
    r, gr, b, _ = blue.get_edgecolor()
    assert b > 0.6 and r < 0.3  # blue
    assert blue.get_linestyle() == "-"
    assert blue.get_linewidth() > 2 and red.get_linewidth() > 2

    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "labels" in texts and any("act" in t and "grad" in t for t in texts)


def test_u_shaped_figure_has_no_label_arrow():
    g = _graph("u_shaped")
    fig, arrows = render_topology(g)
    reds = [p for ax in fig.axes for p in ax.patches
            if (p.get_gid() or "").startswith("wire:") and p.get_linestyle() == "--"]
    assert reds == [] and len(arrows) == 2


def test_codec_shown_on_compressed_wire():
    with open(EXAMPLES / "vanilla.toml", "rb") as f:
        data = tomllib.load(f) | {"name": "vanilla_int8", "wires": {"bottom": {"codec": "int8", "grad_codec": "float16"}}}
    g = build_graph(Plan.model_validate(data))
    st = wire_styles(g)["bottom->top"]
    assert "int8" in st["annotation"] and "float16" in st["annotation"]
    assert "int8, grad float16" in describe(g)
