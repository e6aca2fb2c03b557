"""Cut a user's ``nn.Module`` after named submodules, with ``torch.fx``.

The module is traced once with the cut submodules kept whole (fx "leaf" modules), and the
traced graph is divided at them: piece 0 runs from the inputs to the first cut submodule
(included), piece ``k`` from there to the next, the last piece to the output. Each piece is an
``fx.GraphModule`` over the very same submodules, so its ``state_dict`` keys are the module's
own (``layer1.0.conv1.weight``) and the pieces composed compute exactly what the module does.

The cut submodule's output crosses a cut, and so may any value computed before it and used after it
(a skip connection around the cut): the piece before then returns a tuple, the cut submodule's output
first and each crossing value after it in the order of the forward, named after its fx node
(:func:`cut_outputs`: what a plan's ``outputs`` lists), and the piece after takes them as arguments in
that order (a value crossing several cuts passes through the pieces between). The network's input
crossing a cut is refused (raw features never travel), and so are weights used on both sides.
"""

from __future__ import annotations

import threading

import torch.fx as fx
from torch import nn

__all__ = ["CutError", "cut_module", "cut_outputs"]


class CutError(ValueError):
    """A module that cannot be cut where asked, with the reason."""


class _KeepWhole(fx.Tracer):
    def __init__(self, whole: set[str]):
        super().__init__()
        self.whole = whole
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.whole or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # fx patches nn.Module.__call__ for the whole process while it traces: a module called by another thread
        # (a party already training beside the one cutting its model) runs as itself, not into this trace
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self.thread:  # (nn.Module.__getattr__ is patched as well)
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACING = threading.Lock()  # one fx trace at a time in this process (parties in threads build pieces at once)


def _trace(net: nn.Module, cuts: list[str]) -> fx.Graph:
    names = dict(net.named_modules())
    for c in cuts:
        if c not in names:
            top = [n for n, _ in net.named_children()]
            raise CutError(f"it has no submodule {c!r} (its top-level submodules: {top})")
    if len(set(cuts)) != len(cuts):
        raise CutError(f"the cuts {cuts} name a submodule twice")
    try:
        with _TRACING:  # fx patches nn.Module.__call__ for the whole process while it traces: two traces at once
            return _KeepWhole(set(cuts)).trace(net)  # would leave it patched for good (every later forward fails)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError from a user's forward, ...)
        raise CutError(f"torch.fx cannot trace its forward ({type(e).__name__}: {e}); a forward whose control flow "
                       "depends on tensor values cannot be cut by name") from None


def _assign(graph: fx.Graph, cuts: list[str]) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Each node's piece, and the node of each cut (its output is what crosses)."""
    piece, ends = 0, []
    where: dict[fx.Node, int] = {}
    for n in graph.nodes:
        if n.op == "output":
            continue
        if n.op == "call_module" and n.target in cuts:
            if n.target != (cuts[piece] if piece < len(cuts) else None):
                order = "is called more than once" if n.target in cuts[:piece] else "runs before the earlier cuts"
                raise CutError(f"submodule {n.target!r} {order}: cuts must follow the order of the forward "
                               f"(cuts given: {cuts})")
            where[n] = piece
            ends.append(n)
            piece += 1
            continue
        where[n] = piece
    if len(ends) < len(cuts):
        missing = cuts[len(ends)]
        raise CutError(f"submodule {missing!r} is never called by the forward, so nothing can be cut after it")
    for n in graph.nodes:  # a parameter read where it is used (fx may read it earlier, in another piece)
        if n.op == "get_attr":
            used = {where[u] if u.op != "output" else len(ends) for u in n.users}
            if len(used) == 1:
                where[n] = used.pop()
    _check_shared(graph, where)
    return where, ends


def _check_shared(graph: fx.Graph, where: dict[fx.Node, int]) -> None:
    """A submodule or parameter used on both sides of a cut would be two copies at two parties
    (tied weights drift apart): refused."""
    pieces: dict[str, set[int]] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            pieces.setdefault(str(n.target), set()).update(
                {where[n]} if n.op == "call_module" else {where[u] for u in n.users if u.op != "output"} | {where[n]})
    for target, used in pieces.items():
        if len(used) > 1:
            raise CutError(f"{target!r} is used on both sides of a cut (shared or tied weights): the parties would "
                           "train two copies of it. Cut where it is used on one side only")


def _crossings(graph: fx.Graph, where: dict[fx.Node, int], ends: list[fx.Node]) -> list[list[fx.Node]]:
    """Per piece but the last, the values it passes on besides its cut's output (in the order of the forward):
    those computed in it or before it and used after it. The network's input may not cross."""
    last = len(ends)
    latest: dict[fx.Node, int] = {}
    for n in graph.nodes:
        k = last if n.op == "output" else where[n]
        for a in n.all_input_nodes:
            if where[a] == k or (k > 0 and a is ends[k - 1]):
                continue
            if a.op == "placeholder":
                cut = ends[where[a]].target
                raise CutError(f"the network's input {a.name!r} (before the cut after {cut!r}) is also used after it, "
                               f"by {n.name!r}: raw features never travel. Move the cut so the input is used on one "
                               "side only")
            latest[a] = max(latest.get(a, k), k)
    return [[a for a in graph.nodes if a in latest and a is not ends[k] and where[a] <= k < latest[a]]
            for k in range(last)]


def _pieces(net: nn.Module, cuts: list[str]) -> list[fx.GraphModule]:
    graph = _trace(net, cuts)
    where, ends = _assign(graph, cuts)
    extra = _crossings(graph, where, ends)
    output = next(n for n in graph.nodes if n.op == "output")
    pieces = []
    for k in range(len(ends) + 1):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k > 0:
            for a in [ends[k - 1], *extra[k - 1]]:
                env[a] = g.placeholder(a.name.replace(".", "_"))
        for n in graph.nodes:
            if n.op != "output" and where[n] == k:
                env[n] = g.node_copy(n, lambda a: env[a])
        if k < len(ends):
            g.output(env[ends[k]] if not extra[k] else tuple(env[a] for a in [ends[k], *extra[k]]))
        else:
            g.output(fx.map_arg(output.args[0], lambda a: env[a]))
        piece = fx.GraphModule(net, g, class_name=f"{type(net).__name__}Piece{k}")
        piece.cut_outputs = [a.name for a in [ends[k], *extra[k]]] if k < len(ends) and extra[k] else []
        pieces.append(piece)
    return pieces


def cut_outputs(net: nn.Module, cuts: list[str]) -> list[list[str]]:
    """Per piece of ``cut_module(net, cuts)``: the names of the elements of the tuple it returns (its cut
    submodule's output, then the values crossing the cut), or ``[]`` where it returns one tensor."""
    return [p.cut_outputs for p in cut_module(net, cuts)]


def cut_module(net: nn.Module, cuts: list[str]) -> list[fx.GraphModule]:
    """``len(cuts) + 1`` pieces of ``net``: piece ``k`` ends with submodule ``cuts[k]``; the last runs to the output.

    A forward that reads ``self.training`` (``F.dropout(x, training=self.training)``) would be
    traced with that mode fixed, so it is refused (``nn.Dropout`` modules follow the mode).
    A piece that a skip connection leaves returns a tuple (``piece.cut_outputs`` names its elements).
    Raises :class:`CutError` if a cut names no submodule, the cuts are out of order, the forward
    cannot be traced, the network's input crosses a cut, or weights are used on both sides of one.
    """
    was = net.training
    try:
        net.train(True)
        training = _pieces(net, cuts)
        net.train(False)
        evaluating = _pieces(net, cuts)
    finally:
        net.train(was)
    for t, e in zip(training, evaluating):
        if t.code != e.code:
            raise CutError("its forward computes differently in training and in evaluation (it reads "
                           "self.training, e.g. F.dropout(x, training=self.training)), which a traced piece would fix "
                           "at one mode: use modules that follow the mode (nn.Dropout, nn.BatchNorm) instead")
    for p in training:
        p.train(was)
    return training
