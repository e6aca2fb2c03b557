"""What a received tensor message must be before a step takes it (or keeps it for a later step):
the agreed codec, dtype and shape, and values that cannot poison training.

Pure checks: each returns the problem or raises a :class:`~splitlearn.wire.codec.WireError`;
:class:`~splitlearn.core.engine.Party` refuses the message with it, and keeps nothing of it.
"""

from __future__ import annotations

import math

import torch

from ..wire.codec import WireError, check_values, decoded_bytes, dtype_name, extremes, floating, get_codec
from ..wire.messages import Kind, Limits, Message, quote
from .graph import Graph, Wire
from .losses import get as loss_kind
from .step import StepState

__all__ = ["WireShapes", "codec_for", "row_shape_problem", "early_problem", "decode_checked", "check_received_values"]

WireShapes = dict[str, tuple[str, tuple[int, ...]]]  # wire -> (dtype, shape without the batch dimension)


def codec_for(wire: Wire, dtype: str, kind: Kind = Kind.ACTIVATION) -> str:
    """The codec a tensor of ``dtype`` (as the handshake names it) travels in on ``wire``, the one rule of both
    ends (the sender: its tensor's dtype; the receiver: the agreed one, or in the handshake the message's):
    a gradient in the wire's ``grad_codec``; an activation in ``raw`` if it is no floating tensor (a mask,
    token ids, positions: float16, int8 or top-k would change them; labels travel exactly too), else in
    the wire's codec."""
    if kind == Kind.GRADIENT:
        return wire.grad_codec
    return "raw" if not floating(dtype) else wire.codec


def row_shape_problem(got: tuple[int, ...], want: tuple[int, ...], vary: tuple[tuple[int, int], ...]) -> str | None:
    """Why a row shape ``got`` (without the batch dimension) is not the agreed ``want``: every dimension exactly,
    but one the wire lets vary (``vary``: dimension counted with the batch's as 0, largest size) from 1 to its bound."""
    bounds = dict(vary)
    if len(got) != len(want) or any(
            not (1 <= g <= bounds[d + 1]) if d + 1 in bounds else g != w for d, (g, w) in enumerate(zip(got, want))):
        varying = "".join(f", dimension {d} from 1 to {b}" for d, b in vary)
        return f"rows of {list(got)[:8]} where rows of {list(want)}{varying} were agreed"
    return None


def early_problem(msg: Message, wire: Wire, wire_shapes: WireShapes, max_rows: int, limits: Limits) -> str | None:
    """Why a message of a later step cannot be what that step will accept (without decoding it):
    one tensor of the agreed codec, dtype and row shape, with no more rows than a step has."""
    enc = msg.tensors.get("t")
    if enc is None or len(msg.tensors) != 1:
        return f"expected one tensor 't', got {[quote(k) for k in list(msg.tensors)[:4]]}"
    rows = enc.shape[0] if enc.shape else 0
    if wire.name in wire_shapes:
        dtype, shape = wire_shapes[wire.name]
        if enc.dtype != dtype or row_shape_problem(tuple(enc.shape[1:]), tuple(shape), wire.vary):
            return f"{enc.dtype}{list(enc.shape)[:8]} where {dtype} with rows of {list(shape)} was agreed"
    want_codec = codec_for(wire, wire_shapes[wire.name][0] if wire.name in wire_shapes else enc.dtype, msg.kind)
    if enc.codec != get_codec(want_codec).name:
        return f"codec {quote(enc.codec)} where {want_codec!r} was agreed"
    if rows > (1 if msg.step < 0 else max_rows):  # (a micro-batch has fewer)
        return f"{rows} rows, more than a step has"
    if decoded_bytes(enc.dtype, math.prod(enc.shape)) > limits.tensor_bytes:
        return "larger than Limits.tensor_bytes once decoded"
    return None


def decode_checked(msg: Message, wire: Wire, st: StepState, wire_shapes: WireShapes) -> torch.Tensor:
    """The tensor of a message for step ``st``, once its codec, dtype and shape are what was agreed
    (a gradient: those of the activation sent); a WireError otherwise. In the handshake an
    activation's dtype and row shape become the wire's, in ``wire_shapes``."""
    if len(msg.tensors) != 1 or "t" not in msg.tensors:
        raise WireError(f"expected one tensor 't', got {sorted(msg.tensors)}")
    enc = msg.tensors["t"]
    if msg.kind == Kind.ACTIVATION and wire.masked and enc.dtype != "int64":  # (in the handshake too)
        raise WireError(f"dtype {enc.dtype} where a secure sum's masked int64 tensor is due (core/securesum.py)")
    if msg.kind == Kind.GRADIENT:
        if wire.name not in st.sent:
            raise WireError("a gradient for an activation not sent yet in this step")
        sent = st.sent[wire.name]
        if not sent.is_floating_point():
            raise WireError(f"a gradient for an activation of dtype {dtype_name(sent.dtype)}, which carries none")
        want_dtype, want_shape = dtype_name(sent.dtype), tuple(sent.shape)
    elif st.mode == "handshake":
        want_dtype, want_shape = enc.dtype, (1, *enc.shape[1:])
    elif wire.name in wire_shapes:
        dtype, shape = wire_shapes[wire.name]
        want_dtype, want_shape = dtype, (len(st.rows), *shape)
        if wire.vary and len(enc.shape) == len(want_shape) and enc.shape[0] == len(st.rows) \
                and not row_shape_problem(tuple(enc.shape[1:]), tuple(shape), wire.vary):
            want_shape = tuple(enc.shape)  # a varying dimension within its bound
    else:
        want_dtype, want_shape = enc.dtype, (len(st.rows), *enc.shape[1:])
    if enc.dtype != want_dtype:
        raise WireError(f"dtype {enc.dtype} where {want_dtype} was agreed")
    want_codec = codec_for(wire, want_dtype, msg.kind)
    if enc.codec != get_codec(want_codec).name:
        raise WireError(f"codec {enc.codec!r} where {want_codec!r} was agreed")
    if tuple(enc.shape) != want_shape:
        varying = "".join(f", dimension {d} from 1 to {b}" for d, b in wire.vary) if msg.kind == Kind.ACTIVATION else ""
        raise WireError(f"shape {list(enc.shape)} where {list(want_shape)}{varying} was expected")
    if st.mode == "handshake" and wire.vary and (problem := row_shape_problem(tuple(enc.shape[1:]),
                                                                            tuple(enc.shape[1:]), wire.vary)):
        raise WireError(problem)
    if st.mode == "handshake" and msg.kind == Kind.ACTIVATION:
        wire_shapes[wire.name] = (enc.dtype, tuple(enc.shape[1:]))
    return get_codec(enc.codec).decode(enc)


def check_received_values(msg: Message, wire: Wire, st: StepState, t: torch.Tensor, graph: Graph, party: str,
                          classes: dict[str, int]) -> float:
    """A WireError for values that would poison ``party``'s training: NaN or infinity, magnitudes
    past the wire's ``max_abs`` (activations and gradients), labels that are no class of the head
    (``classes``: label node -> classes, learnt in the handshake) or outside the loss's range. Returns the
    tensor's largest finite magnitude (:func:`~splitlearn.wire.codec.check_values`)."""
    spec = wire.spec
    label = wire.carries == "label"
    what = _Named(label, msg.kind, st.step)  # (its text is made only for an error)
    top = check_values(t, what, allow_nonfinite=spec.allow_nonfinite, max_abs=math.inf if label else spec.max_abs)
    if not label or st.mode == "handshake" or not t.numel():
        return top
    classes = classes.get(wire.src)
    ignored, ranges = graph.derived(("label_losses", party, wire.src), lambda: _label_losses(graph, party, wire.src))
    if classes is not None and len(ignored) == 1 and None not in ignored:  # a language model's -100: left out
        t = t[t != next(iter(ignored))]
        if not t.numel():
            return top
    if classes is not None:
        lo, hi = extremes(t)
        if lo < 0 or hi >= classes:
            raise WireError(f"{what} holds label {int(lo if lo < 0 else hi)}, outside the head's {classes} classes "
                            f"(0..{classes - 1})")
        return top
    if ranges:
        lo, hi = extremes(t)
        for kind, (low, high) in ranges:
            if lo < low or hi > high:
                raise WireError(f"{what} holds a value outside [{low:g}, {high:g}], which a {kind} loss "
                                "cannot take")
    return top


class _Named:
    """The name of a received tensor in an error ("the label tensor of step 3"), put together when it is shown."""

    def __init__(self, label: bool, kind: Kind, step: int):
        self.label, self.kind, self.step = label, kind, step

    def __str__(self) -> str:
        return f"the {'label' if self.label else self.kind.name.lower()} tensor of step {self.step}"

    def __format__(self, spec: str) -> str:
        return str(self)


def _label_losses(graph: Graph, party: str, label: str) -> tuple[set, list[tuple[str, tuple[float, float]]]]:
    """What ``party``'s losses taking the label node ``label`` make of it: their ``ignore_index`` values, and the
    (loss kind, range) of those whose targets have a range."""
    kinds = [loss_kind(graph.plan.losses[n.name].kind) for n in graph.losses()
             if n.party == party and n.inputs[1] == label]
    return ({k.ignore_index for k in kinds},
            [(k.name, k.target_range) for k in kinds if k.target_range is not None])
