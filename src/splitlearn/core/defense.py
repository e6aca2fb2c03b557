"""Wire defenses as the engine sees them: the :class:`Defense` protocol and what reads the registry of
them (:data:`~splitlearn.core.registry.DEFENSES`).

A :class:`Defense` sits at an edge of the step and leaves the protocol alone: at the sender,
:meth:`~Defense.extra_loss` (computed from the undefended value) and :meth:`~Defense.on_send`;
at the receiver, :meth:`~Defense.on_gradient` on the gradient it returns. A defense is named by
its key in ``[wires.SOURCE]``; the built-ins (``nopeek``, ``noise``, ``label_protection``,
``randomized_response``, fields of :class:`~splitlearn.core.wirespec.WireSpec`) live in
:mod:`splitlearn.privacy.defenses`, which the registry imports by name the first time it is read:
the core never imports it. Any other registered key is accepted in a plan too::

    class Shift(Defense):
        key = "shift"
        def on_send(self, ctx, value):
            return value + ctx.config["by"]

    register(Shift())  # before the plan is loaded: [wires.bottom] shift = { by = 1.0 }

Defense noise comes from :meth:`WireContext.rng`: the sending party's secret, never the plan.

A defense with trainable parameters (``mid``) returns them from :meth:`Defense.module`; they are built with
the sender's segment and kept in it as the child ``defense_KEY`` (:func:`attach_modules`, called where a
segment is built), so the sender's optimizer trains them and its weights and checkpoints hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .registry import DEFENSES
from .specs import PlanError
from .wirespec import WireSpec

if TYPE_CHECKING:  # torch is imported where a tensor is made: validating a plan does not load it
    import torch
    from torch import Tensor, nn

    from .engine import Party
    from .graph import Graph, Stage, Wire
    from .plan import Plan
    from .step import StepState

__all__ = ["ALL_MODES", "BUILT_IN_KEYS", "Defense", "SweepParam", "WireContext", "register", "active", "validate",
           "check_data", "privacy_spent", "sweep_params", "defends", "defend_forward", "defend_backward",
           "module_name", "attach_modules"]

ALL_MODES = frozenset({"train", "eval", "predict"})  # a defense never acts in the handshake
BUILT_IN_KEYS = ("nopeek", "noise", "label_protection", "randomized_response", "hijack_guard")  # fields of WireSpec


def _activation(graph: Graph, wire: Wire) -> bool:
    return wire.carries == "activation"


@dataclass(frozen=True)
class SweepParam:
    """A setting ``audit --sweep`` can vary: ``value(current, x)`` is the defense's new setting on
    a wire (``current``: its setting there, or None) for the swept value ``x``; ``applies`` tells
    the wires it can be set on."""

    name: str  # e.g. "noise.sigma"
    description: str
    value: Callable[[Any, float], Any]
    applies: Callable[[Graph, Wire], bool] = _activation


@dataclass(frozen=True)
class WireContext:
    """What a defense sees of the step: the party, the wire, the step state, its own setting and,
    on the way back, the stage returning the gradient."""

    party: Party
    wire: Wire
    state: StepState
    config: Any
    stage: Stage | None = None

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def step(self) -> int:
        return self.state.step

    def rng(self, salt: int | str) -> torch.Generator:
        """Noise for this step and wire from the party's secret (``noise_secret``: never from the plan, which every
        party holds, so a receiver could regenerate and subtract it); ``salt`` keeps defenses apart (the
        built-ins use 1, 2 and 3: give your defense's key)."""
        import hashlib

        import torch

        key = f"{self.party.noise_secret}/{self.state.step}/{self.wire.name}/{salt}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def raw_inputs(self) -> Tensor:
        """The sender's raw inputs the wire's value is computed from, one flat float row per sample."""
        import torch

        rows = len(self.state.values[self.wire.src])
        return torch.cat([self.state.values[n].reshape(rows, -1).float()
                          for n in self.party.raw_inputs[self.wire.src]], dim=1)

    def target(self) -> Tensor:
        """The labels of the returning stage's first loss (the receiver's side only)."""
        loss = self.party.nodes[self.stage.losses[0]]
        return self.state.values[loss.inputs[1]]

    def num_classes(self) -> int:
        """Classes of the labels the wire carries (the sender's side of a label wire)."""
        return self.party.num_classes[self.wire.src]

    def module(self, defense: Defense) -> nn.Module:
        """The trainable parameters ``defense`` keeps in the sender's segment (:meth:`Defense.module`); a
        PlanError where the segment was built without them (a module given from outside a plan)."""
        segment = getattr(self.party, "modules", {}).get(self.wire.src)
        child = dict(segment.named_children()).get(module_name(defense.key)) if segment is not None else None
        if child is None:
            raise PlanError(f"{defense.key} on {self.wire.src!r}: its parameters are not in the segment "
                            f"{self.wire.src!r} (the child {module_name(defense.key)!r})", entry=f"wires.{self.wire.src}",
                            hint="build the segment from the plan (models.build.build_segment attaches them)")
        return child


class Defense:
    """One defense. Subclasses set ``key`` (its key in ``[wires.SOURCE]``) and override what they need.

    ``carries``: the wires it applies to (``activation`` or ``label``); ``modes``: the steps it
    acts in; ``sweep_params``: what ``audit --sweep`` can set.
    """

    key: str = ""
    carries: str = "activation"
    modes: frozenset[str] = frozenset({"train"})
    sweep_params: tuple[SweepParam, ...] = ()

    def validate(self, graph: Graph, wire: Wire, config: Any) -> None:
        """Raise a PlanError for a structurally wrong use (checked when the plan is loaded)."""
        if wire.carries == self.carries:
            return
        if wire.carries == "label":
            raise PlanError(f"{wire.src!r} is a label wire: {_label_defenses()}", entry=f"wires.{wire.src}",
                            hint="labels travel exactly; put codecs and activation defenses on activation wires")
        raise PlanError(f"{self.key} applies to label wires, and {wire.src!r} carries activations",
                        entry=f"wires.{wire.src}", hint="set it on the wire of the labels, e.g. [wires.\"hospital.y\"]")

    def check_data(self, graph: Graph, wire: Wire, config: Any, inputs: dict[str, Tensor]) -> None:
        """Raise a PlanError if the data cannot take the defense (``inputs``: every party's input nodes)."""

    def extra_loss(self, ctx: WireContext, value: Tensor) -> Tensor | None:
        """A term the sender adds to its stage's loss, from the undefended value."""
        return None

    def on_send(self, ctx: WireContext, value: Tensor) -> Tensor:
        """What the sender puts on the wire instead of ``value``."""
        return value

    def on_gradient(self, ctx: WireContext, grad: Tensor) -> Tensor:
        """What the receiver returns instead of the gradient ``grad`` (training steps)."""
        return grad

    def privacy_spent(self, wire: Wire, config: Any, plan: Plan, samples: int, steps: int) -> dict | None:
        """The privacy the sender spent after ``steps`` training steps over ``samples`` rows, or None."""
        return None

    def handshake(self, ctx: WireContext, value: Tensor) -> None:
        """Told, at the handshake (before any step, the value of one row), what the wire carries: a defense whose
        layers take the wire's size makes them here, so the party's state is whole before its first step."""

    def module(self, plan: Plan, source: str, config: Any) -> nn.Module | None:
        """Trainable parameters the sender keeps for the wires from segment ``source`` (None: none); built with
        the segment, as its child ``defense_KEY`` (:func:`attach_modules`); :meth:`WireContext.module` finds it."""
        return None





def register(defense: Defense, *, replace: bool = False) -> Defense:
    """Add a defense under its key (a taken key only with ``replace``); plans validated afterwards may use the key."""
    key = defense.key
    if not key.isidentifier():
        raise ValueError(f"a defense key must be an identifier, got {key!r}")
    if key in WireSpec.model_fields and key not in BUILT_IN_KEYS:
        raise ValueError(f"{key!r} is a wire setting, not a defense key")
    if defense.carries not in ("activation", "label"):
        raise ValueError(f"defense {key!r}: carries must be 'activation' or 'label', got {defense.carries!r}")
    return DEFENSES.register(key, defense, replace=replace)


def active(spec: WireSpec) -> tuple[tuple[Defense, Any], ...]:
    """The defenses a wire's settings turn on, in registry order, each with its setting (found once per settings
    and registry: a party asks for every message)."""
    version = DEFENSES.version
    known = _ACTIVE.get(id(spec))
    if known is not None and known[0] is spec and known[1] == version:
        return known[2]
    out, fields = [], WireSpec.model_fields  # (read once: pydantic's class property costs microseconds a read)
    for key, defense in DEFENSES.items():
        if key in fields:
            config = getattr(spec, key)
            if config != fields[key].default:
                out.append((defense, config))
        elif key in spec.extra_defenses:
            out.append((defense, spec.extra_defenses[key]))
    if len(_ACTIVE) > 4096:  # (the settings of many plans, one process)
        _ACTIVE.clear()
    _ACTIVE[id(spec)] = (spec, version, tuple(out))  # (the settings are frozen; kept, so their id is not reused)
    return tuple(out)


_ACTIVE: dict[int, tuple[WireSpec, int, tuple]] = {}


def _label_defenses() -> str:
    keys = [k for k, d in DEFENSES.items() if d.carries == "label"]
    if not keys:
        return "no defense applies to it"
    return f"only {', '.join(keys)} {'applies' if len(keys) == 1 else 'apply'} to it"


def validate(graph: Graph, wire: Wire) -> None:
    """Every active defense's structural check of ``wire`` (:meth:`Defense.validate`)."""
    for defense, config in active(wire.spec):
        defense.validate(graph, wire, config)


def check_data(graph: Graph, inputs: dict[str, Tensor]) -> None:
    """The checks of every wire's defenses that need the data; ``inputs`` maps input nodes
    (``party.field``) to every party's tensors (labels may be missing, as when predicting)."""
    for wire in graph.wires:
        for defense, config in active(wire.spec):
            defense.check_data(graph, wire, config, inputs)


def privacy_spent(graph: Graph, party: str, samples: int, steps: int) -> dict[str, dict]:
    """Per wire ``party`` sends: what its defenses spent after ``steps`` training steps over
    ``samples`` rows in all (a client: over all its turns); wires spending nothing are left out."""
    out: dict[str, dict] = {}
    if not steps:
        return out
    for wire in graph.wires:
        if wire.src_party != party:
            continue
        for defense, config in active(wire.spec):
            spent = defense.privacy_spent(wire, config, graph.plan, samples, steps)
            if spent is not None:
                out.setdefault(wire.name, {}).update(spent)
    return out


def module_name(key: str) -> str:
    """The name of defense ``key``'s child in the sender's segment module."""
    return f"defense_{key}"


def attach_modules(plan: Plan, segment: str, module: nn.Module) -> nn.Module:
    """``module`` (segment ``segment``'s, just built) with the trainable parameters of the defenses of the wires
    it sends added as children (:meth:`Defense.module`): its party's optimizer trains them and its weights and
    checkpoints hold them. A child of an ``nn.Sequential`` runs last in its forward, so such a module must pass
    its input on unchanged."""
    spec = plan.wires.get(segment)
    if spec is None:
        return module
    for defense, config in active(spec):
        child = defense.module(plan, segment, config)
        if child is not None:
            module.add_module(module_name(defense.key), child)
    return module


def sweep_params() -> dict[str, tuple[Defense, SweepParam]]:
    """Every registered sweep parameter by name, with its defense."""
    return {p.name: (d, p) for d in DEFENSES.values() for p in d.sweep_params}


# -- at the edges of a step (Party._forward and Party._backward) ---------------------------------

def defends(wire: Wire, value: Tensor) -> bool:
    """Whether a wire's defenses act on ``value``: a label wire's always; an activation wire's on a floating
    tensor only (an integer one, a mask or token ids, travels exactly and carries no gradient). The one rule of
    the engine and of :class:`~splitlearn.api.stage.Stage`."""
    return wire.carries == "label" or value.is_floating_point()


def defend_forward(party: Party, wire: Wire, st: StepState) -> Tensor:
    """What the sender puts on a wire: each defense's extra loss term (kept in ``st.extra`` for the
    sending stage), from the undefended value, then each defense's change of it (never in the handshake;
    never on an integer activation: :func:`defends`)."""
    value = st.values[wire.src]
    if st.mode == "handshake" and defends(wire, value):  # what the wire carries, once: a defense's layers take its size
        for d, config in active(wire.spec):
            d.handshake(WireContext(party, wire, st, config), value)
    if st.mode == "handshake" or not defends(wire, value):
        return value
    acting = [(d, WireContext(party, wire, st, config)) for d, config in active(wire.spec) if st.mode in d.modes]
    for d, ctx in acting:
        term = d.extra_loss(ctx, value)
        if term is not None:
            st.extra.setdefault(party.stage_of[wire.src], []).append(term)
    for d, ctx in acting:
        value = d.on_send(ctx, value)
    return value


def defend_backward(party: Party, wire: Wire, stage: Stage, st: StepState, grad: Tensor) -> Tensor:
    """What the receiver returns on a wire: the gradient, changed by each of the wire's defenses (:func:`defends`)."""
    if not defends(wire, grad):
        return grad
    for d, config in active(wire.spec):
        if st.mode in d.modes:
            grad = d.on_gradient(WireContext(party, wire, st, config, stage), grad)
    return grad
