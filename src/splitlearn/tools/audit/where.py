"""Where an attacker sits in a plan's graph: the losses a wire's gradients come from, whose labels those are,
the segment a wire's tensor leaves, file names for wires, and the shape of a raw input that is an image.

Pure functions of the plan and its graph (no run folder): the per-wire measures
(:mod:`splitlearn.tools.audit.wires`) and the registered attacks (:mod:`splitlearn.tools.audit.attacks`)
share them.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ...core.graph import Graph, Node, Wire
    from ...core.plan import Plan

__all__ = ["wire_slug", "loss_sources", "foreign_losses", "image_shape", "source_segment", "plan_table",
           "main_accuracy", "row_classes"]


def wire_slug(name: str) -> str:
    """A file-name-safe form of a wire name: ``bottom->top`` -> ``bottom_to_top``."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name.replace("->", "_to_"))


def plan_table(src: str) -> str:
    """The plan's TOML table of the wire from ``src``: ``[wires.bottom]``, ``[wires."bottom:hidden"]``."""
    return f"[wires.{src}]" if re.fullmatch(r"[A-Za-z0-9_-]+", src) else f'[wires."{src}"]'


def loss_sources(graph: Graph, wire: Wire) -> list[Node]:
    """The losses the gradients returned on ``wire`` come from (downstream of its consumers)."""
    users: dict[str, list[str]] = {}
    for n in graph.nodes.values():
        for d in n.inputs:
            users.setdefault(d, []).append(n.name)
    seen, todo, losses = set(), list(wire.consumers), []
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        node = graph.nodes[n]
        if node.kind == "loss":
            losses.append(node)
        else:
            todo += users.get(n, [])
    order = {n: i for i, n in enumerate(graph.order)}
    return sorted(losses, key=lambda n: order[n.name])


def foreign_losses(graph: Graph, wire: Wire, party: str) -> list[Node]:
    """The losses downstream of ``wire`` whose labels ``party`` does not hold (what it may learn them from)."""
    return [n for n in loss_sources(graph, wire) if graph.nodes[n.inputs[1]].party != party]


def row_classes(plan: Plan, loss: str) -> bool:
    """Whether ``loss``'s target is one class index a row (not a regression target, not a token sequence)."""
    from ...core import losses

    kind = losses.get(plan.losses[loss].kind)
    return kind.indexes_classes and not kind.tokens


def source_segment(graph: Graph, wire: Wire) -> str:
    """The segment whose output ``wire`` carries (an output node's segment, else the source itself)."""
    node = graph.nodes[wire.src]
    return node.inputs[0] if node.kind == "output" else wire.src


def main_accuracy(result: dict[str, Any], plan: Plan, loss: str) -> float | None:
    """The test accuracy a run reached on ``loss`` (``result.json``), None where it has none."""
    metrics = result.get("metrics") or {}
    if len(plan.losses) > 1:
        return ((metrics.get("tasks") or {}).get(loss) or {}).get("test_accuracy")
    return metrics.get("test_accuracy")


def image_shape(plan: Plan, nodes: list[str], tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The image shape of the raw input, if it is one image field; None for tabular data.

    ``image`` fields carry their shape; the flat ``x`` of digits (64 -> 8x8) and MNIST
    (784 -> 28x28) is reshaped when the party holds all of its columns.
    """
    if len(nodes) != 1:
        return None
    t = tensors[nodes[0]]
    if t.dim() in (3, 4):
        return tuple(int(s) for s in t.shape[1:])
    if t.dim() != 2:
        return None
    party, local = nodes[0].split(".", 1)
    ref = plan.parties[party].holds[local]
    dataset = (plan.parties[party].data or plan.data).dataset
    width = int(t.shape[1])
    side = math.isqrt(width)
    full = ref.columns is None or tuple(ref.columns) == (0, width)
    if ref.field == "x" and dataset in ("digits", "mnist") and full and side * side == width:
        return (side, side)
    return None
