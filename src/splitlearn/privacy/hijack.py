"""The hijack guard (``[wires.X] hijack_guard``): the sender of an activation wire watches the gradients it gets back
and stops training when they do not depend on its labels as an honest server's do.

A server that hijacks the training of a client's encoder (feature-space hijacking, Pasquini et al. 2021) returns
gradients of a loss of its own (a critic's, towards a feature space it can invert) instead of the task's. The test
here is the label-dependence one: the gradient an honest server returns for row ``i`` is ``J_i^T (p_i - e_{y_i}) / B``
(cross-entropy through its head), so each row's gradient direction carries the row's label ``y_i``; FSHA's gradients
are computed without the labels (from the activations alone), so they depend on them only as far as the activations
do. Per training micro-batch the sender computes the share of the variance of its unit-length gradients that lies
between the classes of its own labels (R^2), adjusted for chance: ``(R^2 - e) / (1 - e)`` with
``e = (k - 1) / (B - 1)``, the exact expectation of R^2 over permutations of the ``k`` labels present among ``B`` rows
(a gradient independent of the labels scores 0 on average, an honest one near 1). With ``m`` the mean over the last
``window`` micro-batches (10), the guard fires when ``m < threshold`` (0.45) and either this is the session's first
full window (a hijack from the start) or ``m < drop * m'`` (0.55), ``m'`` the mean of the window that ended
``window`` micro-batches before this one began (a hijack that begins later: an honest head that fits its rows
lowers the figure too, but slowly). It fires on receiving the gradient, before the step's optimizer step, with an
error naming the wire, the step and the figure, which its neighbours are told.

It needs the labels of a classification loss downstream of the wire at the sender (a vanilla or U-shaped client;
checked when the plan is loaded). It only reads the gradients: a run it does not stop trains bit for bit as without
it. Measured (``tests/test_audit_fsha.py``): FSHA from the start fires it at its first window (step 9), one that
begins after 2 epochs 10 steps later; the honest examples never fired it (first windows 0.59 to 0.93; the MLP
examples' figure stays above 0.45 over whole runs, ``resnet.toml``'s falls to 0.15 by its third epoch, at worst 0.63
times the window 20 steps earlier). That is a measurement, not a bound. It misses a hijack that begins once the
encoder has learnt the task's features (after 4 epochs of the test's plan: the critic's gradients then separate by
class as the features do), and a server that holds the labels (vanilla) could mix label-dependent gradients into
a hijack to pass it; the window starts again after a resume (it is not checkpointed).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.defense import Defense, register
from ..core.registry import DEFENSES
from ..core.plan import with_clients
from ..core.specs import PlanError
from ..core.wirespec import GUARDS, HijackGuardSpec

if TYPE_CHECKING:
    from ..core.graph import Graph, Wire
    from ..core.step import StepState

__all__ = ["label_dependence", "label_node", "LabelWatch", "LabelDependence", "HijackGuardCheck"]


def label_dependence(grads: Tensor, labels: Tensor) -> float | None:
    """Chance-adjusted R^2 of the unit-length rows of ``grads`` by ``labels``: 0 on average for gradients
    independent of the labels, 1 for gradients that are one direction per class. None where it says nothing
    (fewer than two classes present, no more rows than classes, or no row with a gradient)."""
    g = grads.detach().reshape(len(grads), -1).double()
    norms = g.norm(dim=1)
    keep = norms > 0
    g, y = g[keep] / norms[keep, None], labels.reshape(-1)[keep.to(labels.device)].cpu()
    classes, index = torch.unique(y, return_inverse=True)
    k, rows = len(classes), len(y)
    if k < 2 or rows <= k:
        return None
    sums = torch.zeros(k, g.shape[1], dtype=g.dtype).index_add_(0, index, g)
    counts = torch.bincount(index, minlength=k).to(g.dtype)
    mean = g.mean(dim=0)
    between = float((((sums / counts[:, None]) - mean) ** 2).sum(dim=1) @ counts)
    total = float(((g - mean) ** 2).sum())
    if not total > 1e-9 * rows:  # every row one direction (to rounding), or a non-finite gradient: it says nothing
        return None
    chance = (k - 1) / (rows - 1)
    return (between / total - chance) / (1 - chance)


def _downstream_losses(graph: Graph, wire: Wire) -> list[str]:
    users: dict[str, list[str]] = {}
    for n in graph.nodes.values():
        for d in n.inputs:
            users.setdefault(d, []).append(n.name)
    seen: set[str] = set()
    todo, out = list(wire.consumers), []
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if graph.nodes[n].kind == "loss":
            out.append(n)
        else:
            todo += users.get(n, [])
    return [n for n in graph.order if n in out]


def label_node(graph: Graph, wire: Wire) -> str | None:
    """The sender's label node (``party.field``) of the first classification loss downstream of ``wire`` whose
    labels the sender holds; None where there is none."""
    from ..core.losses import get

    for name in _downstream_losses(graph, wire):
        target = graph.nodes[name].inputs[1]
        kind = get(graph.plan.losses[name].kind)
        if graph.nodes[target].party == wire.src_party and kind.indexes_classes and not kind.tokens:
            return target
    return None


class LabelWatch:
    """One sender's watch over one wire: the figures of its last ``3 * window`` training micro-batches."""

    def __init__(self, graph: Graph, wire: Wire, spec: HijackGuardSpec):
        self.wire, self.spec = wire, spec
        self.labels = label_node(graph, wire)
        self.pipeline = graph.plan.train.pipeline
        self.recent: deque[float] = deque(maxlen=3 * spec.window)
        self.taken = 0  # micro-batches with a figure, since the run began (a checkpoint keeps it)

    def state(self) -> dict[str, Any]:
        """Its figures and count, as JSON (a checkpoint: a resumed run is watched as the run never stopped)."""
        return {"recent": list(self.recent), "taken": self.taken}

    def load(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(v) for v in state.get("recent", [])), maxlen=3 * self.spec.window)
        self.taken = int(state.get("taken", 0))

    def watch(self, st: StepState, grad: Tensor) -> str | None:
        """Take the gradient of a training micro-batch; why it looks hijacked, or None."""
        if self.labels is None or self.labels not in st.values:
            return None
        figure = label_dependence(grad, st.values[self.labels])
        if figure is None:
            return None
        self.recent.append(figure)
        self.taken += 1
        w, figures = self.spec.window, list(self.recent)
        if self.taken < w:
            return None
        now = sum(figures[-w:]) / w
        if now >= self.spec.threshold:
            return None
        before = sum(figures[:w]) / w if len(figures) == 3 * w else None  # the window ending w steps before
        if self.taken == w:
            why = f"below the hijack_guard threshold {self.spec.threshold:g} from the start"
        elif before is not None and now < self.spec.drop * before:
            why = (f"below the hijack_guard threshold {self.spec.threshold:g} and below {self.spec.drop:g} times its "
                   f"mean {2 * w} to {3 * w} micro-batches before ({before:.3f})")
        else:
            return None  # an honest head that fits its rows: the dependence falls slowly
        return (f"the gradients returned on wire {self.wire.name!r} look hijacked at step {st.step // self.pipeline} "
                f"(their dependence on this party's labels {self.labels!r}, chance-adjusted R^2 of the unit gradients "
                f"by label, averaged over the last {w} training micro-batches, is {now:.3f}, {why}: an honest server's "
                "gradients depend on the labels); this party stops training")


class LabelDependence:
    """The ``labels`` detector: :class:`LabelWatch` per wire."""

    name = "labels"

    def watcher(self, graph: Graph, wire: Wire, spec: HijackGuardSpec) -> LabelWatch:
        return LabelWatch(graph, wire, spec)


class HijackGuardCheck(Defense):
    """The setting's structural check when the plan is loaded (it changes nothing the wire carries): an activation
    wire whose sender holds the labels of a classification loss downstream of it."""

    key = "hijack_guard"

    def validate(self, graph: Graph, wire: Wire, config: Any) -> None:
        entry = f"wires.{wire.src}.hijack_guard"
        if wire.carries != "activation":
            raise PlanError(f"hijack_guard on {wire.src!r}: it watches the gradients an activation wire brings back, "
                            "and this is a label wire", entry=entry, hint="set it on the sender's activation wire")
        if with_clients(graph.plan):
            raise PlanError(f"hijack_guard on {wire.src!r} with [clients] is not supported yet: each turn's session "
                            "would start a new watch, too short to judge, and a client stopped in one turn would train "
                            "again in the next", entry=entry, hint="set it in a plan without [clients]")
        if wire.spec.label_protection is not None:
            raise PlanError(f"hijack_guard and label_protection on {wire.src!r}: the noise the label holder adds to "
                            "the gradients it returns hides the very dependence on the labels the guard tests (an "
                            "honest vanilla run with max_norm raised it at step 40)", entry=entry,
                            hint="choose one of them for this wire")
        if label_node(graph, wire) is None:
            raise PlanError(f"hijack_guard on {wire.src!r}: party {wire.src_party!r} holds the labels of no "
                            "classification loss downstream of this wire, and the guard tests the gradients it gets "
                            "back against them", entry=entry,
                            hint="set it on the wire of a party that holds the labels (a vanilla or U-shaped client)")


GUARDS.register("labels", LabelDependence())
if "hijack_guard" not in DEFENSES:  # (loaded with the plan's first guard: GUARDS's built-in module is this one)
    register(HijackGuardCheck())
