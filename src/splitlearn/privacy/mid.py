"""The mutual-information defense (MID; Zou et al., "Defending batch-level label inference and replacement
attacks in vertical federated learning", IEEE Trans. Big Data 2022; VFLAIR's ``MID``): a variational information
bottleneck on the cut, ``[wires.X] mid = { lambda = 0.01, bottleneck = 8 }``.

The sender maps each row of what it would send (``d`` values) through an encoder to a mean ``mu`` and a
standard deviation ``std`` of ``bottleneck`` values, sends ``decoder(mu + std * eps)`` (``eps`` ~ N(0, I) from
the party's secret, :meth:`~splitlearn.core.defense.WireContext.rng`) in training and ``decoder(mu)`` in
evaluation and prediction, and adds ``lambda * KL(N(mu, std^2) || N(0, I))`` (summed over the bottleneck, mean
over the rows) to its loss. The KL term bounds the information the wire carries about the sender's rows (the
variational bound ``I(X; Z) <= E KL``), so what the receiver sees of them, and what the gradients it returns
carry of its labels, shrinks as ``lambda`` grows. Encoder ``d -> 2 * bottleneck`` and decoder ``bottleneck -> d``,
one linear layer each (initialised to keep the variance, ``U(-sqrt(3 / in), sqrt(3 / in))``: deeper ones, or torch's
default initialisation, slowed the small networks measured here several times), ``std = softplus(s - 5)`` as
VFLAIR writes it (training starts nearly deterministic). The parameters live in the sender's segment
(:meth:`Bottleneck` as its child ``defense_mid``), sized at the handshake from the wire's width and
initialised from the plan seed and the sending segment's name, so every run of a plan starts from the same ones.

Unlike the paper, where the active party (the label holder) runs the bottleneck on what it receives, here
the sender runs it on what it sends (the defense protocol acts at the sender's edge of the step): the
gradients the feature party receives are those of the decoded sample, not of ``mu``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from ..core.defense import ALL_MODES, Defense, SweepParam, WireContext
from ..core.graph import Graph, Wire
from ..core.plan import Plan, with_clients
from ..core.specs import PlanError

__all__ = ["Bottleneck", "MID", "kl_to_standard_normal"]

_KEYS = ("lambda", "bottleneck")
_LAYERS = ("enc", "dec")


def kl_to_standard_normal(mu: Tensor, std: Tensor) -> Tensor:
    """``KL(N(mu, std^2) || N(0, I))`` summed over the last dimension, mean over the rows (a scalar)."""
    kl = 0.5 * (mu.pow(2) + std.pow(2) - 2 * std.clamp_min(1e-8).log() - 1)
    return kl.sum(-1).mean()


class Bottleneck(LazyModuleMixin, nn.Module):
    """MID's encoder and decoder, sized at the handshake (the wire's width ``d``; else at the first tensor they see); ``forward`` passes
    its input on unchanged (the module sits in the sender's segment, and an ``nn.Sequential`` runs it)."""

    def __init__(self, bottleneck: int, seed: int):
        super().__init__()
        self.bottleneck, self.seed = bottleneck, seed
        for layer in _LAYERS:
            self.register_parameter(f"{layer}_weight", UninitializedParameter())
            self.register_parameter(f"{layer}_bias", UninitializedParameter())

    def initialize_parameters(self, x: Any) -> None:  # noqa: D102 - LazyModuleMixin's hook
        if not self.has_uninitialized_params():
            return
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise PlanError("mid: the wire must carry one tensor with the batch dimension first",
                            entry="wires", hint="set mid on a wire of a segment that returns one tensor")
        d, k = int(x[0].numel()), self.bottleneck
        shapes = {"enc": (2 * k, d), "dec": (d, k)}
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for layer, (out, inp) in shapes.items():  # variance-keeping: U(-sqrt(3/in), sqrt(3/in))
                bound = math.sqrt(3 / inp)
                for name, shape in ((f"{layer}_weight", (out, inp)), (f"{layer}_bias", (out,))):
                    p = getattr(self, name)
                    p.materialize(shape, device=x.device, dtype=torch.float32)
                    p.copy_((torch.rand(shape, generator=g) * 2 - 1).mul_(bound))

    def forward(self, x: Any) -> Any:
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, std) of each row of ``x`` (flattened), in float32."""
        self.initialize_parameters(x)
        e = F.linear(x.reshape(len(x), -1).to(self.enc_weight.dtype), self.enc_weight, self.enc_bias)
        k = self.bottleneck
        return e[:, :k], F.softplus(e[:, k:] - 5.0)

    def decode(self, z: Tensor, like: Tensor) -> Tensor:
        """The bottleneck's ``z`` back to the shape and dtype of ``like``."""
        return F.linear(z, self.dec_weight, self.dec_bias).reshape(like.shape).to(like.dtype)


def _entry(wire: Wire) -> str:
    return f"wires.{wire.src}.mid"


def _check(config: Any, entry: str) -> None:
    if not isinstance(config, dict):
        raise PlanError(f"mid must be a table {{ lambda = ..., bottleneck = ... }}, got {config!r}", entry=entry,
                        hint="e.g. mid = { lambda = 0.01, bottleneck = 8 }")
    unknown = sorted(set(config) - set(_KEYS))
    missing = [k for k in _KEYS if k not in config]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise PlanError(f"mid has {what}: it takes lambda (the KL weight) and bottleneck (its width)", entry=entry,
                        hint="e.g. mid = { lambda = 0.01, bottleneck = 8 }")
    lam, k = config["lambda"], config["bottleneck"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise PlanError(f"mid.lambda must be a finite number >= 0, got {lam!r}", entry=entry,
                        hint="the weight of the KL term: 0.001 to 1 in the measurements of docs/privacy.md")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PlanError(f"mid.bottleneck must be a whole number >= 1, got {k!r}", entry=entry,
                        hint="the bottleneck's width, e.g. 8")


def _segment_source(graph: Graph, wire: Wire) -> bool:
    return wire.carries == "activation" and graph.nodes[wire.src].kind == "segment"


def _lambda(current: dict | None, x: float) -> dict:
    return {"bottleneck": (current or {}).get("bottleneck", 8), "lambda": x}


class MID(Defense):
    """The sender's variational information bottleneck on an activation wire (see the module's text)."""

    key = "mid"
    modes = ALL_MODES
    sweep_params = (SweepParam("mid.lambda", "MID: the sender sends a sample of a variational bottleneck and adds "
                               "lambda * KL(N(mu, std^2) || N(0, I)) to its loss (the plan's bottleneck, else 8)",
                               _lambda, _segment_source),)

    def validate(self, graph: Graph, wire: Wire, config: Any) -> None:
        super().validate(graph, wire, config)
        _check(config, _entry(wire))
        if with_clients(graph.plan):  # each client's and the federation's copy of its layers: not built yet
            raise PlanError("mid with [clients] is not supported yet: the clients' copies of its layers and their "
                            "average are not made", entry=_entry(wire), hint="train the plan without [clients], or "
                            "defend the wire with nopeek or noise")
        if graph.nodes[wire.src].kind != "segment":
            raise PlanError(f"mid on {wire.src!r}: its parameters live in the sending segment, and {wire.src!r} is "
                            f"a {graph.nodes[wire.src].kind}", entry=_entry(wire),
                            hint="set mid on the wire of a segment that returns one tensor")

    def module(self, plan: Plan, source: str, config: Any) -> nn.Module:
        _check(config, f"wires.{source}.mid")
        digest = hashlib.sha256(f"{plan.train.seed}/mid/{source}".encode()).digest()
        return Bottleneck(int(config["bottleneck"]), int.from_bytes(digest[:8], "little") >> 1)

    def handshake(self, ctx: WireContext, value: Tensor) -> None:
        ctx.module(self).initialize_parameters(value)  # sized before the party's state is first saved

    def _encoded(self, ctx: WireContext, value: Tensor) -> tuple[Tensor, Tensor]:
        key = (self.key, ctx.wire.name)  # the extra loss's encoding, reused by on_send for the same tensor
        held = ctx.state.notes.get(key)
        if held is None or held[0] is not value:
            held = ctx.state.notes[key] = (value, *ctx.module(self).encode(value))
        return held[1], held[2]

    def extra_loss(self, ctx: WireContext, value: Tensor) -> Tensor | None:
        if ctx.mode != "train":
            return None
        mu, std = self._encoded(ctx, value)
        return float(ctx.config["lambda"]) * kl_to_standard_normal(mu, std)

    def on_send(self, ctx: WireContext, value: Tensor) -> Tensor:
        mu, std = self._encoded(ctx, value)
        z = mu
        if ctx.mode == "train":
            eps = torch.randn(mu.shape, generator=ctx.rng(self.key)).to(device=mu.device, dtype=mu.dtype)
            z = mu + std * eps
        return ctx.module(self).decode(z, value)
