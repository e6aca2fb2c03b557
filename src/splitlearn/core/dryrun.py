"""Running a plan's nodes on one sample row: how a segment takes its inputs, and the checks that
turn a failing segment or loss into a :class:`~splitlearn.core.specs.PlanError` naming the wires
and shapes (the handshake of :class:`~splitlearn.core.engine.Party`, and :func:`dry_run` in one process).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data.text import Ragged
from ..wire.codec import dtype_name
from .graph import Graph, Node
from .losses import get as loss_kind
from .specs import PlanError

__all__ = ["merge_inputs", "forward", "check_labels", "check_outputs", "run_checked", "dry_run"]


def merge_inputs(how: str, module: nn.Module, xs: list[torch.Tensor]) -> torch.Tensor:
    """Run a segment on its inputs: concatenated on the feature dimension, summed (``secure_sum`` too: in one
    process there is nothing to hide; a party's engine gives it the decoded sum alone), or as arguments."""
    if len(xs) == 1:
        return module(xs[0])
    if how == "concat":
        return module(torch.cat(xs, dim=1))
    if how in ("sum", "secure_sum"):
        return module(torch.stack(xs).sum(0))
    return module(*xs)


def forward(graph: Graph, modules: dict[str, nn.Module], values: dict[str, Any], needed: set[str] | None = None,
            guard: Callable[[Node, list[Any], Callable[[], Any]], Any] | None = None) -> dict[str, Any]:
    """The value of every segment and output node (those in ``needed``, if given) from the input nodes' ``values``,
    in one process, without gradients: the whole network as the parties compute it. ``guard(node, xs, run)``, if
    given, runs each segment (to say what failed in the caller's words)."""
    values = dict(values)
    with torch.no_grad():
        for n in graph.order:
            node = graph.nodes[n]
            if node.kind in ("input", "loss") or (needed is not None and n not in needed):
                continue
            if node.kind == "output":
                values[n] = node.pick(values[node.inputs[0]])
                continue
            xs = [values[d] for d in node.inputs]
            run = (lambda node=node, xs=xs: merge_inputs(node.merge or graph.plan.segments[node.name].merge,
                                                         modules[node.name], xs))
            values[n] = run() if guard is None else guard(node, xs, run)
    return values


def check_outputs(graph: Graph, node: Node, value: Any, rows: int = 1) -> None:
    """A PlanError unless segment ``node`` gives what its plan entry says: one tensor, or (with ``outputs``) a tuple
    of that many tensors or a dict of those keys, each a tensor with the batch dimension first (``rows``: the rows
    that went in, one in the handshake and the dry run)."""
    names = graph.plan.segments[node.name].output_names
    where = f"segment {node.name!r} (party {node.party!r})"
    if not names:
        if not isinstance(value, torch.Tensor):
            raise PlanError(f"{where} gives a {type(value).__name__}, not one tensor: a segment's output is what its "
                            "wire carries", entry=f"segments.{node.name}",
                            hint="list the elements of a tuple or dict output in its 'outputs', or end the segment "
                            "where the network's value is a single tensor")
        _check_rows(node, where, "its output", value, rows, f"segments.{node.name}")
        return
    if isinstance(value, (tuple, list)):
        got, elements = f"a tuple of {len(value)}", list(value)
        fits = len(value) == len(names)
    elif isinstance(value, dict):
        got, elements = f"a dict of keys {list(value)[:8]}", list(value.values())
        fits = list(value) == names
    else:
        got, elements, fits = f"a {type(value).__name__}", [], False
    if not fits:
        raise PlanError(f"{where} gives {got}, but its outputs are {names}", entry=f"segments.{node.name}.outputs",
                        hint="list one name per element of the tuple it returns (a dict: its keys, in order)")
    for name, e in zip(names, elements):
        if not isinstance(e, torch.Tensor):
            raise PlanError(f"{where}: its output {name!r} is a {type(e).__name__}, no tensor: a shape or number "
                            "crosses the cut", entry=f"segments.{node.name}.outputs",
                            hint="compute it after the cut (e.g. from the shape of a tensor there): every element "
                            "of a segment's output travels as a tensor with a row per sample")
        _check_rows(node, where, f"its output {name!r}", e, rows, f"segments.{node.name}.outputs")


def _check_rows(node: Node, where: str, what: str, t: torch.Tensor, rows: int, entry: str) -> None:
    """A PlanError unless ``t`` has the batch dimension first (``rows`` rows): a wire carries a row per sample."""
    if t.dim() and t.shape[0] == rows:
        return
    raise PlanError(f"{where}: {what} has shape {list(t.shape)}, which has no batch dimension ({rows} row"
                    f"{'s' if rows != 1 else ''} went in): it is the same for every row (a position table, "
                    "a mean over the batch) and cannot travel as rows", entry=entry,
                    hint="compute such a value after the cut, where it is used (or end the segment before it)")


def check_labels(node: Node, labels: torch.Tensor | Ragged | None, classes: int, ignore: int | None = None) -> None:
    """A PlanError unless every label of a cross-entropy loss is a class of its head (``ignore``: a value the loss
    leaves out, accepted too: a language model's -100)."""
    if isinstance(labels, Ragged):
        labels = labels.values  # (padding holds ``ignore``)
    if labels is not None and ignore is not None:
        labels = labels[labels != ignore]
    if labels is None or not labels.numel() or labels.is_floating_point():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise PlanError(f"loss {node.name!r}: the labels {node.inputs[1]!r} take values {lo}..{hi}, but the head "
                        f"{node.inputs[0]!r} gives {classes} classes (0..{classes - 1})", entry=f"losses.{node.name}",
                        hint="make the head's output width the number of classes, or number the classes from 0")


def run_checked(graph: Graph, node: Node, xs: list[torch.Tensor], fn: Callable[[], Any]) -> Any:
    """Run a segment or loss on a one-row sample; a failure is a PlanError naming the wires and shapes."""
    try:
        return fn()
    except Exception as e:
        came = ", ".join(f"{_via(graph, d, node.party)} with shape {list(x.shape)}" for d, x in zip(node.inputs, xs))
        what = "segment" if node.kind == "segment" else "loss"
        raise PlanError(f"{what} {node.name!r} (party {node.party!r}) cannot take {came}: {e}",
                        entry=f"{'segments' if node.kind == 'segment' else 'losses'}.{node.name}",
                        hint="make what comes in match what this step expects (check 'layers', the network sizes, "
                        "the head's output width and the loss kind)") from None


def _via(graph: Graph, src: str, party: str) -> str:
    wire = graph.wire_between(src, party)
    return f"wire {wire.name!r}" if wire else repr(src)


def dry_run(graph: Graph, modules: dict[str, nn.Module], sample: dict[str, torch.Tensor],
            labels: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Run one sample through the whole graph in one process; return each wire's dtype and shape.

    ``sample`` maps input nodes to tensors with a batch dimension of 1 (label inputs may be
    missing, as when predicting). A failing segment or loss raises a :class:`PlanError` naming
    the wire and the shapes; so do ``labels`` (whole label columns) that are no class of their head.
    """
    values: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n in graph.order:
            node = graph.nodes[n]
            if node.kind == "input":
                if n in sample:
                    values[n] = sample[n]
            elif node.kind == "segment":
                spec = graph.plan.segments[n]
                device = next((p.device for p in modules[n].parameters()), None)
                xs = [values[d] if device is None else values[d].to(device) for d in node.inputs]
                values[n] = run_checked(graph, node, xs, lambda: merge_inputs(node.merge or spec.merge, modules[n], xs))
                check_outputs(graph, node, values[n], len(xs[0]) if xs and xs[0].dim() else 1)
            elif node.kind == "output":
                values[n] = node.pick(values[node.inputs[0]])
            elif node.inputs[1] in values:
                out, target = values[node.inputs[0]], values[node.inputs[1]].to(values[node.inputs[0]].device)
                kind = loss_kind(graph.plan.losses[n].kind)
                run_checked(graph, node, [out, target], lambda: kind.fn(out, target))
                if kind.indexes_classes and labels:
                    check_labels(node, labels.get(node.inputs[1]), out.shape[-1], kind.ignore_index)
    return {w.name: ("int64" if w.masked else dtype_name(values[w.src].dtype), tuple(values[w.src].shape[1:]))
            for w in graph.wires if w.src in values}  # (a secure sum's input travels masked, core/securesum.py)
