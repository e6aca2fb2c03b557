"""The built-in wire defenses, registered on import: ``nopeek``, ``noise``, ``label_protection``
and ``randomized_response`` (fields of :class:`~splitlearn.core.wirespec.WireSpec`), and ``mid``
(:mod:`splitlearn.privacy.mid`, a registered key: ``[wires.X] mid = { lambda = ..., bottleneck = ... }``),
registered after ``nopeek`` so that ``noise`` on the same wire noises what MID decodes.

The protocol lives in the core (:mod:`splitlearn.core.defense`) and the registry in
:mod:`splitlearn.core.registry`, which imports this module by name the first time the registry is
read. A defense of one's own is written against the core's protocol::

    from splitlearn.core.defense import Defense, register

    class Shift(Defense):
        key = "shift"
        def on_send(self, ctx, value):
            return value + ctx.config["by"]

    register(Shift())  # before the plan is loaded: [wires.bottom] shift = { by = 1.0 }
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.defense import ALL_MODES, Defense, SweepParam, WireContext, register
from ..core.graph import Graph, Wire
from ..core.plan import Plan
from ..core.specs import PlanError
from .mid import MID

__all__ = ["NoPeek", "Noise", "LabelProtection", "RandomizedResponse"]


# -- the built-ins ----------------------------------------------------------------------------

def _has_raw_inputs(graph: Graph, wire: Wire) -> bool:
    return wire.carries == "activation" and bool(graph.raw_inputs(wire.src))


def _holds_labels(graph: Graph, wire: Wire) -> bool:
    return wire.carries == "activation" and graph.receiver_computes_loss(wire)


class NoPeek(Defense):
    """The sender adds ``alpha * dCor(its raw inputs, the activations)`` to its stage's loss (training)."""

    key = "nopeek"
    sweep_params = (SweepParam("nopeek.alpha", "NoPeek weight: the sender adds alpha * dCor(raw inputs, activations) "
                               "to its loss", lambda current, x: x, _has_raw_inputs),)

    def validate(self, graph: Graph, wire: Wire, config: float) -> None:
        super().validate(graph, wire, config)
        if not graph.raw_inputs(wire.src):
            raise PlanError(f"nopeek on {wire.src!r}: party {wire.src_party!r} computes it from none of its own data, "
                            "so there is nothing to decorrelate it from", entry=f"wires.{wire.src}.nopeek",
                            hint="set it on a wire whose sender computes it from its raw inputs")

    def extra_loss(self, ctx: WireContext, value: Tensor) -> Tensor:
        from .nopeek import distance_correlation

        return ctx.config * distance_correlation(ctx.raw_inputs(), value)


def _sigma(current: dict | None, x: float) -> dict:
    current = current or {}
    return {**current, "clip": current.get("clip", 1.0), "sigma": x}


class Noise(Defense):
    """The sender clips every sample's activations and adds Gaussian noise (every step but the handshake)."""

    key = "noise"
    modes = ALL_MODES
    sweep_params = (SweepParam("noise.sigma", "Gaussian noise on the activations, std sigma * clip after per-sample "
                               "clipping (clip 1.0 unless the plan sets it)", _sigma),)

    def on_send(self, ctx: WireContext, value: Tensor) -> Tensor:
        from .noise import clip_and_noise

        return clip_and_noise(value, ctx.config.clip, ctx.config.sigma, ctx.rng(1))

    def privacy_spent(self, wire: Wire, config: Any, plan: Plan, samples: int, steps: int) -> dict:
        """(epsilon, delta) of the Gaussian mechanism (RDP accountant), sampling rate batch / rows per epoch."""
        from .noise import PrivacyAccountant

        per_epoch = samples / plan.train.epochs
        acc = PrivacyAccountant(config.sigma, min(1.0, plan.train.batch_size / per_epoch), config.delta)
        acc.step(steps)
        return {"epsilon": acc.epsilon(), "delta": config.delta, "sigma": config.sigma, "clip": config.clip,
                "steps": steps, "accountant": acc.backend}


def _strength(current: dict | None, x: float) -> dict:
    return {"kind": (current or {}).get("kind", "marvell"), "strength": x}


class LabelProtection(Defense):
    """The label holder adds noise to the gradients it returns (``marvell`` or ``max_norm``; training)."""

    key = "label_protection"
    sweep_params = (SweepParam("label_protection.strength", "Marvell-style noise the label holder adds to the "
                               "gradients it returns (the plan's kind, else marvell)", _strength, _holds_labels),)

    def validate(self, graph: Graph, wire: Wire, config: Any) -> None:
        super().validate(graph, wire, config)
        if not graph.receiver_computes_loss(wire):
            raise PlanError(f"label_protection on {wire.src!r}: party {wire.dst_party!r} computes no loss from it, so "
                            "it holds no labels to protect", entry=f"wires.{wire.src}.label_protection",
                            hint="protect the wire whose gradients the label holder returns")

    def check_data(self, graph: Graph, wire: Wire, config: Any, inputs: dict[str, Tensor]) -> None:
        if config.kind != "marvell":
            return
        targets = [inputs[n.inputs[1]] for n in graph.losses() if n.party == wire.dst_party and n.inputs[1] in inputs]
        if any(len(torch.unique(t)) > 2 for t in targets):
            raise PlanError(f"marvell label protection on {wire.src!r} needs binary labels", entry=f"wires.{wire.src}",
                            hint='use label_protection = { kind = "max_norm" } for more than two classes')

    def on_gradient(self, ctx: WireContext, grad: Tensor) -> Tensor:
        from . import labels

        if ctx.config.kind == "max_norm":
            return labels.max_norm(grad, ctx.rng(3))
        return labels.marvell(grad, ctx.target(), ctx.config.strength, ctx.rng(3))


class RandomizedResponse(Defense):
    """The label holder sends each label through randomized response of epsilon ``config`` (training)."""

    key = "randomized_response"
    carries = "label"

    def check_data(self, graph: Graph, wire: Wire, config: float, inputs: dict[str, Tensor]) -> None:
        if inputs.get(wire.src) is not None and inputs[wire.src].is_floating_point():
            raise PlanError(f"randomized_response on {wire.src!r} needs class labels, and {wire.src!r} holds numbers",
                            entry=f"wires.{wire.src}", hint="use it on the labels of a classification loss")

    def on_send(self, ctx: WireContext, value: Tensor) -> Tensor:
        from .labels import randomized_response

        return randomized_response(value, ctx.config, ctx.num_classes(), ctx.rng(2))


for _defense in (NoPeek(), MID(), Noise(), LabelProtection(), RandomizedResponse()):
    register(_defense)
