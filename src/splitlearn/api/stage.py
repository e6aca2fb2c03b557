"""Your own training loop, split: a :class:`Stage` runs one party's piece of a model over any transport.

The way ``torch.distributed.pipelining`` and Opacus wrap rather than replace: the optimizer, the
schedule, autocast, accumulation and logging stay in the user's loop; the stage only moves the
cut's activations forward and their gradients back, through the project's wire
(:class:`~splitlearn.wire.link.Link`, its codecs and meter) with a wire's defenses applied::

    # the hospital (first stage)                    # the server (last stage)
    stage = Stage(bottom, t, next="server")          stage = Stage(top, t, previous="hospital")
    for x in batches:                                for y in labels:
        stage.forward(x)                                 loss = crit(stage.forward(), y)
        stage.backward()                                 loss.backward()
        opt.step(); opt.zero_grad()                      stage.backward()
                                                         opt.step(); opt.zero_grad()

A middle stage has both ``previous`` and ``next``: ``forward()`` receives, ``backward()`` waits for
its output's gradient and sends its input's. What is received is checked as the engine checks it
(:mod:`~splitlearn.core.admission`): the agreed codec, dtype and row shape (fixed by the wire's first
activation; a gradient: those of the activation it answers), step order, values; nothing is
unpickled. Any refusal tells the peer (an ERROR message) and raises one error naming it.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.bounds import LearntBounds
from ..core.defense import Defense, WireContext, active, defends
from ..core.engine import PartyError
from ..core.admission import codec_for, decode_checked
from ..core.graph import Wire
from ..core.specs import PlanError
from ..core.wirespec import WireSpec
from ..core.step import StepState
from ..wire.codec import Codec, WireError, check_values, dtype_name, get_codec
from ..wire.link import MAX_KEPT, Link
from ..wire.messages import Kind, Limits, Message, quote
from ..wire.metering import Meter
from ..wire.transport.base import Transport, TransportClosed, TransportTimeout
from .layout import (assemble, call, elements_of, layout_of, layout_problem, settings_digest, shape_key,
                     wire_settings)

__all__ = ["Stage"]

_MODES = ("train", "eval")


@dataclass(frozen=True)
class _Context(WireContext):
    """A defense's view of a stage's step: the stage's raw inputs (NoPeek) and the labels given to
    :meth:`Stage.backward` (Marvell) instead of a plan's nodes."""

    inputs: Tensor | None = None
    labels: Tensor | None = None

    def raw_inputs(self) -> Tensor:
        return self.inputs.reshape(len(self.inputs), -1).float()

    def target(self) -> Tensor:
        if self.labels is None:
            raise PlanError(f"{self.wire.spec.label_protection.kind} label protection needs the labels: call "
                            "stage.backward(labels=y)", entry="receive.label_protection")
        return self.labels

    def num_classes(self) -> int:  # only label wires ask, and a stage carries activations
        raise PlanError("a stage carries activations, not labels", entry="send")


@dataclass
class _Forward:
    """One forward waiting for its backward: what it sent (and its step), what it received; per element of a
    tuple or dict output, by wire name (one tensor: the wire named after its sender)."""

    train: bool
    step: int | None = None  # of the activations sent; None for a last stage
    sent: dict[str, Tensor] | None = None
    extra: list[Tensor] = field(default_factory=list)  # the sender's extra loss terms (NoPeek)
    received: dict[str, Tensor] | None = None  # the input leaves, whose gradients go back to the previous stage
    received_step: int | None = None


def _overrides(defense: Defense, method: str) -> bool:
    return getattr(type(defense), method) is not getattr(Defense, method)


class Stage:
    """One party's piece of a split model, run in the user's own loop over ``transport``.

    ``module``: the piece (None: the stage passes its input on, e.g. a last stage whose head is in the
    user's code). ``previous``/``next``: the parties of the stages before and after (at least one).
    ``send``/``receive``: the settings of the wire to ``next`` and from ``previous``, a
    :class:`~splitlearn.core.wirespec.WireSpec` or its dict as a plan's ``[wires.X]`` writes it (``codec``,
    ``grad_codec``, defenses such as ``noise`` or ``label_protection``, ``max_abs``, ...). Both ends of a
    wire must give the same settings (checked at its first activation): the sender applies the sender's
    defenses, the receiver the receiver's. ``timeout``: seconds one call may wait for its peer.
    ``meter`` counts the bytes sent and received per wire (named after its sender) and direction, the
    FLOPs of the module's forward and of the backwards the stage runs, and the time spent waiting.

    A forward under ``torch.no_grad()`` is an evaluation: the next stage must receive it under
    ``no_grad`` too, and no gradient comes back. :meth:`close` (or leaving a ``with`` block) says goodbye;
    the transport stays the caller's to close.
    """

    def __init__(self, module: nn.Module | None, transport: Transport, *, previous: str | None = None,
                 next: str | None = None, send: WireSpec | dict[str, Any] | None = None,
                 receive: WireSpec | dict[str, Any] | None = None, timeout: float | None = 120.0,
                 limits: Limits | None = None, device: torch.device | str | None = None):
        self.party = transport.party
        if previous is None and next is None:
            raise PlanError("a stage needs a previous or a next stage (or both)", entry="previous",
                            hint='e.g. Stage(bottom, transport, next="server")', file=f"stage {self.party!r}")
        if self.party in (previous, next):
            raise PlanError(f"a stage cannot send to its own party {self.party!r}", entry="previous" if
                            previous == self.party else "next", file=f"stage {self.party!r}")
        self.module, self.transport, self.previous, self.next = module, transport, previous, next
        self.link = Link(transport, limits=limits)
        self.meter: Meter = self.link.meter
        self.limits = self.link.limits
        self.timeout = timeout
        self.device = torch.device(device) if device is not None else _device(module)
        self.out_wire = self.in_wire = None
        if next is not None:
            self.out_wire = Wire(self.party, self.party, self.party, next, "activation", (), wire_settings(send, "send", self.party))
            for d, _ in active(self.out_wire.spec):
                if d.key == "hijack_guard":  # silently unguarded would be worse than refused
                    raise PlanError("hijack_guard watches the gradients in a plan's sessions; a stage does not run "
                                    "it", entry="send.hijack_guard", hint="train the plan with splitlearn.train, or "
                                    "leave hijack_guard out of send=", file=f"stage {self.party!r}")
                if d.key == "nopeek" and previous is not None:
                    raise PlanError("nopeek decorrelates the activations from the raw inputs they are computed "
                                    "from, and this stage receives its input", entry="send.nopeek",
                                    hint="set it on the first stage's wire", file=f"stage {self.party!r}")
        elif send is not None:
            raise PlanError("send= sets the wire to the next stage, and this stage has none", entry="send",
                            file=f"stage {self.party!r}")
        if previous is not None:
            self.in_wire = Wire(previous, previous, previous, self.party, "activation", (self.party,),
                                wire_settings(receive, "receive", self.party))
        elif receive is not None:
            raise PlanError("receive= sets the wire from the previous stage, and this stage has none",
                            entry="receive", file=f"stage {self.party!r}")
        self.encoders: dict[Kind, Codec] = {}  # per direction (a codec may keep state: error feedback)
        if self.out_wire is not None:
            self.encoders[Kind.ACTIVATION] = get_codec(self.out_wire.spec.codec)
        if self.in_wire is not None:
            self.encoders[Kind.GRADIENT] = get_codec(self.in_wire.spec.grad_codec)
        self.noise_secret = secrets.randbits(128)  # defense noise: this party's secret, never shared
        self.bounds = LearntBounds()
        self.shapes: dict[str, tuple[str, tuple[int, ...]]] = {}  # each incoming wire's dtype and row shape, once agreed
        self.layout_in: str | None = None  # the structure the previous stage sends (its first activation says it)
        self.layout_out: str | None = None  # the structure this stage sends (fixed by its first forward)
        self.sent_steps = self.received_steps = 0
        self.pending: deque[_Forward] = deque()  # forwards waiting for their backward, oldest first
        self.kept: dict[Kind, deque[Message]] = {Kind.ACTIVATION: deque(), Kind.GRADIENT: deque()}
        self.finished: set[str] = set()  # neighbours that said goodbye
        self.closed = False

    # -- the loop's two calls ---------------------------------------------------------------------

    def forward(self, x: Any = None) -> Any:
        """Run the piece on ``x`` (a first stage) or on the input received from the previous stage, send
        its output to the next stage (after the wire's defenses) and return it (a last stage: to compute
        the loss on). A received input requires grad when the previous stage trains (its forward ran with
        gradients), and then so must this one.

        The piece may return a tuple or dict of tensors (a cut that a skip connection crosses): each element
        travels on a wire of its own (``party:0``, ``party:key``), checked against its own agreed dtype and
        shape, and the receiving stage's ``forward()`` returns the same structure (its piece takes a tuple as
        arguments, a dict as keyword arguments). Only floating elements carry a gradient back."""
        self._open()
        rec = _Forward(train=torch.is_grad_enabled())
        if self.previous is not None:
            if x is not None:
                raise TypeError(f"stage {self.party!r} receives its input from {self.previous!r}: call forward() "
                                "without an input")
            self._room()
            rec.received_step, rec.received, rec.train = self._take_activation()
            x = assemble(self.layout_in, list(rec.received.values()))
        elif x is None:
            raise TypeError(f"stage {self.party!r} is a first stage: give forward() its input")
        elif rec.train:
            self._room()
        if not rec.train:
            self.bounds.freeze()  # as the engine: the bounds are the first epoch's training's
        out = x if self.module is None else self.meter.compute(
            ("forward", shape_key(x)), "forward", lambda: call(self.module, x))
        if self.next is not None:
            self._send_forward(rec, x, out)
        if rec.train and (rec.sent is not None or rec.received is not None):
            self.pending.append(rec)
        return out

    def backward(self, labels: Tensor | None = None) -> None:
        """Backpropagate the oldest forward still waiting: with a next stage, wait for the gradient of the
        output sent and run backward from it into the module; with a previous one, send the gradient of
        the received input back (a last stage: after the user's ``loss.backward()``). ``labels``: the
        batch's labels, for a receiver's ``label_protection = { kind = "marvell" }``."""
        self._open()
        if not self.pending:
            raise RuntimeError(f"stage {self.party!r}: backward() without a forward waiting for it (a forward "
                               "under torch.no_grad(), or from a previous stage that did not train, waits for none)")
        if self.next is not None:
            rec, got = self._take_gradient()  # (none, at once, for a forward that sent no floating element)
            roots = [rec.sent[n] for n in got] + rec.extra
            grads = list(got.values()) + [None] * len(rec.extra)
            pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
            if pairs:
                self.meter.compute(("backward", shape_key(rec.sent)), "backward",
                                   lambda: torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs]))
        else:
            rec = self.pending.popleft()
        leaves = {n: t for n, t in (rec.received or {}).items() if t.is_floating_point()}
        if leaves and self.next is None and all(t.grad is None for t in leaves.values()):
            raise RuntimeError(f"stage {self.party!r}: no gradient reached the input of step "
                               f"{rec.received_step}: call loss.backward() before stage.backward()")
        for name, leaf in leaves.items():  # integer elements (a mask) carry no gradient back
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # an input the piece does not use
            wire = self._in(name)
            st = self._state(rec.received_step, len(grad), "train")
            for d, config in active(wire.spec):
                if _overrides(d, "on_gradient") and "train" in d.modes:
                    grad = d.on_gradient(_Context(self, wire, st, config, labels=labels), grad)
            self._send(Kind.GRADIENT, wire, rec.received_step, grad, train=True)
        rec.sent = rec.received = None
        rec.extra.clear()

    # -- goodbye ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye to the neighbours and wait (``timeout``) for theirs, so nothing in flight is lost
        when a process exits. Raises if a tensor still arrives: the two loops did not agree."""
        if self.closed:
            return
        self.closed = True
        for q in self.kept.values():
            if q:
                self._refuse(q[0], "it came before this stage finished and was never taken: the two loops run "
                             "different numbers of forwards or backwards")
        peers = [p for p in dict.fromkeys((self.previous, self.next)) if p is not None]
        for p in peers:
            self.link.send(Message(Kind.STOP, self.party, p, text="done"))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while any(p not in self.finished for p in peers):
            waiting = [p for p in peers if p not in self.finished]
            msg = self._recv(deadline, f"goodbye from {', '.join(map(repr, waiting))}")
            if msg.kind in (Kind.ACTIVATION, Kind.GRADIENT):
                what = "an activation" if msg.kind == Kind.ACTIVATION else "a gradient"
                self._refuse(msg, f"{what} of step {msg.step} after this stage finished: the two loops run "
                             "different numbers of forwards or backwards")

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            self.close()
            return
        if not self.closed:  # the user's loop failed: the neighbours stop instead of waiting for us
            self.closed = True
            for p in dict.fromkeys(x for x in (self.previous, self.next) if x is not None):
                try:
                    self.link.send(Message(Kind.STOP, self.party, p, text=f"{kind.__name__}: {error}"[:500]))
                except Exception:  # noqa: BLE001 - the peer may be gone; the user's error is what matters
                    pass

    # -- sending ----------------------------------------------------------------------------------

    def _send_forward(self, rec: _Forward, x: Any, out: Any) -> None:
        mode = "train" if rec.train else "eval"
        layout, items = layout_of(self.party, out)
        if self.layout_out is None:
            self.layout_out = layout
        elif layout != self.layout_out:
            raise TypeError(f"stage {self.party!r}: the piece returned {layout} where its first forward returned "
                            f"{self.layout_out}: every step sends the same structure")
        rec.step, self.sent_steps = self.sent_steps, self.sent_steps + 1
        rec.sent = {}
        for i, (name, value) in enumerate(items):
            wire = self._out(name)
            st = self._state(rec.step, len(value), mode)
            acting = [(d, _Context(self, wire, st, config, inputs=x)) for d, config in active(wire.spec)
                      if mode in d.modes and defends(wire, value)]
            for d, ctx in acting:
                term = d.extra_loss(ctx, value)
                if term is not None and rec.train:
                    rec.extra.append(term)
            for d, ctx in acting:
                value = d.on_send(ctx, value)
            rec.sent[name] = value
            text = mode  # the first says the wire's settings (and a tuple's or dict's layout)
            if rec.step == 0 and i == 0:
                text += f" {settings_digest(self.out_wire)}" + ("" if layout == "tensor" else f" {layout}")
            self._send(Kind.ACTIVATION, wire, rec.step, value, train=rec.train, text=text)

    def _out(self, name: str) -> Wire:
        """The wire an element of this stage's output travels on (the stage's wire settings)."""
        return self.out_wire if name == self.out_wire.name else Wire(name, self.party, self.party, self.next,
                                                                     "activation", (), self.out_wire.spec)

    def _in(self, name: str) -> Wire:
        return self.in_wire if name == self.in_wire.name else Wire(name, self.previous, self.previous, self.party,
                                                                   "activation", (self.party,), self.in_wire.spec)

    def _send(self, kind: Kind, wire: Wire, step: int, t: Tensor, *, train: bool, text: str = "") -> None:
        codec, want = self.encoders[kind], get_codec(codec_for(wire, dtype_name(t.dtype), kind))
        if not train or want.name != codec.name:  # (error feedback: training's; an integer tensor travels raw)
            codec = want
        dst = wire.dst_party if kind == Kind.ACTIVATION else wire.src_party
        with self.meter.timed("compute"):
            enc = codec.encode(t.detach().cpu())
        self.link.send(Message(kind, self.party, dst, step, wire.name, {"t": enc}, text=text))

    # -- receiving --------------------------------------------------------------------------------

    def _take_activation(self) -> tuple[int, dict[str, Tensor], bool]:
        """The next activations from the previous stage, checked: (their step, each element by wire name,
        whether it trains). The first says the wire's settings and, for a tuple or dict, its layout."""
        msg = self._next(Kind.ACTIVATION)
        words = msg.text.split(" ")
        if msg.step != self.received_steps:
            self._refuse(msg, f"an activation of step {msg.step} where step {self.received_steps} was expected")
        first = msg.step == 0
        if words[0] not in _MODES or not (len(words) in (2, 3) if first else len(words) == 1):
            self._refuse(msg, f"an activation whose text {quote(msg.text)} is not its mode ('train' or 'eval')"
                         + (" and the wire's settings" if first else ""))
        if first and words[1] != settings_digest(self.in_wire):
            self._refuse(msg, f"its wire settings differ from this stage's receive= settings "
                         f"({self.in_wire.spec.model_dump(exclude_defaults=True)}): give both ends the same")
        if first:
            layout = words[2] if len(words) == 3 else "tensor"
            problem = layout_problem(layout)
            if problem is None and len(elements_of(layout, self.previous)) > self.limits.early_messages:
                problem = f"its layout {quote(layout)} has more elements than Limits.early_messages"
            if problem is not None:
                self._refuse(msg, problem)
            self.layout_in = layout
        train = words[0] == "train"
        if train and not torch.is_grad_enabled():
            self._refuse(msg, f"step {msg.step} trains (its sender waits for the gradient), but this stage's "
                         "forward runs without gradients (torch.no_grad): run both stages in the same mode")
        received: dict[str, Tensor] = {}
        for i, name in enumerate(elements_of(self.layout_in, self.previous)):
            if i:
                msg = self._next(Kind.ACTIVATION)
                if msg.step != self.received_steps or msg.text != words[0]:
                    self._refuse(msg, f"an activation of step {msg.step} ({quote(msg.text)}) where the next element "
                                 f"of step {self.received_steps}, on wire {quote(name)}, was expected")
            if msg.wire != name:
                self._refuse(msg, f"an activation on wire {quote(msg.wire)} where wire {quote(name)} was expected "
                             f"(the layout {self.layout_in})")
            enc = msg.tensors.get("t")
            rows = enc.shape[0] if enc is not None and enc.shape else 0
            st = self._state(msg.step, rows, "train" if train else "eval")
            wire = self._in(name)
            t = self._checked(msg, wire, st, {name: self.shapes[name]} if name in self.shapes else {})
            if train and not t.is_floating_point() and self.layout_in == "tensor":
                self._refuse(msg, f"a training activation of dtype {enc.dtype}, which cannot carry a gradient")
            if name not in self.shapes:
                self.shapes[name] = (enc.dtype, tuple(enc.shape[1:]))  # agreed: every later activation has these
            t = t.to(self.device)
            if train and t.is_floating_point():
                t.requires_grad_(True)
            received[name] = t
        self.received_steps += 1
        return msg.step, received, train

    def _take_gradient(self) -> tuple[_Forward, dict[str, Tensor]]:
        """The gradients from the next stage of the floating elements one forward waiting sent, each checked
        against what it sent (an integer element gets none)."""
        oldest = self.pending[0]
        if not any(t.is_floating_point() for t in oldest.sent.values()):  # a mask alone: no gradient can come back
            self.pending.popleft()
            return oldest, {}
        msg = self._next(Kind.GRADIENT)
        rec = next((r for r in self.pending if r.step == msg.step), None)
        if rec is None:
            self._refuse(msg, f"a gradient of step {msg.step}, which no forward of this stage waits for")
        wanted = [n for n, t in rec.sent.items() if t.is_floating_point()]
        if not wanted:
            self._refuse(msg, f"a gradient of step {msg.step}, whose forward sent no floating element")
        got: dict[str, Tensor] = {}
        for i, name in enumerate(wanted):
            if i:
                msg = self._next(Kind.GRADIENT)
                if msg.step != rec.step:
                    self._refuse(msg, f"a gradient of step {msg.step} where that of step {rec.step} on wire "
                                 f"{quote(name)} was expected")
            if msg.wire != name:
                self._refuse(msg, f"a gradient on wire {quote(msg.wire)} where one on wire {quote(name)} was expected"
                             + (" (an integer element carries none)" if msg.wire in rec.sent else ""))
            st = self._state(msg.step, len(rec.sent[name]), "train")
            st.sent[name] = rec.sent[name]
            got[name] = self._checked(msg, self._out(name), st, {}).to(rec.sent[name].device)
        self.pending.remove(rec)
        return rec, got

    def _checked(self, msg: Message, wire: Wire, st: StepState, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> Tensor:
        """The message's tensor once the engine's checks pass: codec, dtype, shape, values, learnt bounds."""
        try:
            t = decode_checked(msg, wire, st, shapes)
            what = f"the {msg.kind.name.lower()} tensor of step {msg.step}"
            check_values(t, what, allow_nonfinite=wire.spec.allow_nonfinite, max_abs=wire.spec.max_abs)
            learnt = self.bounds.check(msg, wire, st, t)
        except WireError as e:
            self._refuse(msg, str(e))
        if learnt is not None:
            self.bounds.learn(*learnt)
        return t

    def _next(self, kind: Kind) -> Message:
        """The next activation (from ``previous``) or gradient (from ``next``): kept ones first. A message
        of the other kind is kept for later, within the per-peer limits."""
        peer = self.previous if kind == Kind.ACTIVATION else self.next
        what = f"{'activation' if kind == Kind.ACTIVATION else 'gradient'} from {peer!r}"
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self.kept[kind]:
            msg = self._recv(deadline, what, peer)
            if msg.kind == Kind.STOP:  # another neighbour's goodbye (noted)
                continue
            if msg.kind not in self.kept or msg.sender != (self.previous if msg.kind == Kind.ACTIVATION else self.next):
                self._refuse(msg, f"no {msg.kind.name.lower()} from {quote(msg.sender)} is expected by this stage")
            q = self.kept[msg.kind]
            if len(q) >= self.limits.early_messages or \
                    sum(m.payload_bytes for m in q) + msg.payload_bytes > self.limits.early_bytes:
                self._refuse(msg, "more messages ahead of this stage than Limits.early_messages or early_bytes allow")
            q.append(msg)
        return self.kept[kind].popleft()

    def _recv(self, deadline: float | None, what: str, peer: str | None = None) -> Message:
        """The next admitted tensor message or goodbye from anyone: a goodbye is noted (raised if it is
        ``peer``'s, whom this stage waits for), an ERROR or other STOP raised."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise PartyError(f"stage {self.party!r}: no {what} within {self.timeout} s")
            try:
                with self.meter.timed("wait"):
                    sender, data = self.transport.recv(left)
            except TransportTimeout:
                continue
            except TransportClosed as e:
                raise PartyError(f"stage {self.party!r}: the transport closed while waiting for {what} ({e})") from None
            msg = self.link.admit(sender, data)
            if msg is None:  # malformed, impersonating or misaddressed: refused (the peer was told) and raised
                raise WireError(self.link.refused[-1] if self.link.refused_count <= MAX_KEPT else
                                f"stage {self.party!r} refused a message from {quote(sender)}")
            if msg.kind == Kind.STOP and msg.text == "done":
                self.finished.add(msg.sender)
                if msg.sender == peer:
                    raise PartyError(f"stage {self.party!r}: party {quote(msg.sender)} finished while this stage "
                                     f"waits for {what}: the two loops run different numbers of steps")
                return msg
            if msg.kind in (Kind.ERROR, Kind.STOP):
                reason = msg.text[:500] or "no reason given"
                raise PartyError(f"stage {self.party!r}: party {quote(msg.sender)} stopped: {reason}")
            if msg.kind not in (Kind.ACTIVATION, Kind.GRADIENT):
                self._refuse(msg, f"unexpected {msg.kind.name} message")
            return msg

    def _refuse(self, msg: Message, reason: str) -> None:
        """Tell the peer why its message is refused, and raise that (naming it)."""
        self.link.refuse(msg.sender, reason, msg.step, msg.wire)
        raise WireError(f"stage {self.party!r} refused a message from {quote(msg.sender)}"
                        + (f" on wire {quote(msg.wire)}" if msg.wire else "") + f": {reason}",
                        wire=msg.wire, step=msg.step)

    # -- helpers ----------------------------------------------------------------------------------

    def _state(self, step: int, rows: int, mode: str) -> StepState:
        return StepState(step, torch.arange(rows), mode)  # type: ignore[arg-type]

    def _room(self) -> None:
        if len(self.pending) >= self.limits.early_steps:
            raise RuntimeError(f"stage {self.party!r}: {len(self.pending)} forwards wait for their backward "
                               "(Limits.early_steps): call backward(), or run evaluation under torch.no_grad()")

    def _open(self) -> None:
        if self.closed:
            raise RuntimeError(f"stage {self.party!r} is closed")


def _device(module: nn.Module | None) -> torch.device:
    """Where ``module`` computes: its first parameter's device (the CPU without any)."""
    p = next(iter(module.parameters()), None) if module is not None else None
    return p.device if p is not None else torch.device("cpu")
