"""Bounds learnt from the run: a wire's activations and gradients may not jump far past the
magnitudes it carried in the first epoch (``[wires.SOURCE] max_jump``); and the sender's hijack guard
(``[wires.SOURCE] hijack_guard``, :mod:`splitlearn.privacy.hijack`) on the gradients it takes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..wire.codec import WireError
from ..wire.messages import Kind, Message
from .graph import Wire
from .step import StepState
from .wirespec import GUARDS

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Hijacked", "LearntBounds", "magnitude"]


class Hijacked(Exception):
    """The gradients a party took back on a wire look hijacked (``hijack_guard``): it stops training."""


class LearntBounds:
    """Bounds learnt from the run (``[wires.SOURCE] max_jump``), per wire and direction
    (``"WIRE/forward"``, ``"WIRE/backward"``): the largest magnitude the peer sent in training steps.

    Until the party's first evaluation step (the end of the first epoch's training) a value more
    than ``max_jump`` times the largest one so far is refused, and every value taken raises the
    bound; from then on the bound stays what the first epoch carried. A wire that carried only
    zeros so far (a handshake's row, an unused output) has no bound yet and keeps learning.
    ``refused`` counts the refusals per peer; :meth:`state` and :meth:`load` go in checkpoints.
    """

    def __init__(self, graph: Graph | None = None) -> None:
        self.graph = graph  # (a hijack guard needs it: which labels are the sender's)
        self.guards: dict[str, Any] = {}  # wire -> its hijack guard's watch (checkpointed with the bounds)
        self.guard_states: dict[str, Any] = {}  # wire -> a checkpoint's watch, taken up when the wire is next watched
        self.top: dict[str, float] = {}  # wire/direction -> largest magnitude taken in training
        self.fixed: set[str] = set()  # those whose bound no longer grows
        self.refused: dict[str, int] = {}  # peer -> values refused for jumping past a bound

    def problem(self, key: str, top: float, factor: float) -> str | None:
        """Why a value of magnitude ``top`` on ``key`` jumps too far (None: it does not)."""
        ref = self.top.get(key, 0.0)
        if ref <= 0.0 or top <= factor * ref:
            return None
        when = "in its first epoch" if key in self.fixed else "so far"
        return f"more than max_jump ({factor:g}) times the largest the wire carried {when} ({ref:.3g})"

    def learn(self, key: str, top: float) -> None:
        if key not in self.fixed and top > self.top.get(key, 0.0):
            self.top[key] = top

    def count(self, peer: str) -> None:
        self.refused[peer] = self.refused.get(peer, 0) + 1

    def freeze(self) -> None:
        """Fix every bound learnt so far (a wire still without one keeps learning)."""
        self.fixed.update(k for k, v in self.top.items() if v > 0.0)

    def state(self) -> dict[str, Any]:
        """What decides acceptance from here on, as JSON (for a checkpoint)."""
        guards = {**self.guard_states, **{w: g.state() for w, g in self.guards.items()}}
        return {"top": dict(self.top), "fixed": sorted(self.fixed), **({"guards": guards} if guards else {})}

    def load(self, state: dict[str, Any]) -> None:
        self.top = {str(k): float(v) for k, v in state.get("top", {}).items()}
        self.fixed = set(state.get("fixed", []))
        self.guards, self.guard_states = {}, dict(state.get("guards", {}))  # a resumed watch goes on where it was

    def check(self, msg: Message, wire: Wire, st: StepState, t: torch.Tensor,
              top: float | None = None) -> tuple[str, float] | None:
        """:meth:`jump`'s check, then, on a training gradient the bound takes, the wire's hijack guard (it raises
        :class:`Hijacked` where the gradients look hijacked)."""
        learnt = self.jump(msg, wire, st, t, top)
        guard = wire.spec.hijack_guard
        if (guard is not None and msg.kind == Kind.GRADIENT and st.mode == "train" and self.graph is not None
                and wire.name not in st.grads):  # (a duplicate of a gradient taken already is not scored again)
            if wire.name not in self.guards:
                self.guards[wire.name] = GUARDS.get(guard.detector).watcher(self.graph, wire, guard)
                if wire.name in self.guard_states:
                    self.guards[wire.name].load(self.guard_states.pop(wire.name))
            why = self.guards[wire.name].watch(st, t)
            if why is not None:
                raise Hijacked(why)
        return learnt

    def jump(self, msg: Message, wire: Wire, st: StepState, t: torch.Tensor,
             top: float | None = None) -> tuple[str, float] | None:
        """Refuse (and count, per peer) an activation or gradient more than the wire's ``max_jump``
        times larger in magnitude than its learnt bound; label wires, the handshake and integer
        tensors are left to their own checks. Returns what a training step teaches the bound (wire
        and direction, magnitude) once the tensor is taken; None otherwise. ``top``: its largest finite
        magnitude where already known (the value checks found it: :func:`magnitude` otherwise)."""
        factor = wire.spec.max_jump
        if (not factor or wire.carries == "label" or st.mode == "handshake" or not t.is_floating_point()
                or not t.numel()):
            return None
        key = f"{wire.name}/{'forward' if msg.kind == Kind.ACTIVATION else 'backward'}"
        top = magnitude(t) if top is None else top
        problem = self.problem(key, top, factor)
        if problem is not None:
            self.count(msg.sender)
            kind = msg.kind.name.lower()
            raise WireError(f"the {kind} tensor of step {st.step} holds a value of magnitude {top:.3g}, {problem}; "
                            "refused (raise max_jump on the wire if such jumps are expected; 0 turns this off)")
        return (key, top) if st.mode == "train" else None


def magnitude(t: torch.Tensor) -> float:
    """The largest finite magnitude in ``t`` (NaN and infinities, where a wire allows them, ignored)."""
    low, high = torch.aminmax(t.detach())  # one pass, no temporary
    top = float(max(-low, high))
    if not math.isfinite(top):
        top = float(t.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
    return top
