"""One party's side of a step: the stage protocol of DESIGN.md, over a :class:`~splitlearn.link.Link`.

Pure logic: no sockets and no files. The same code runs in an in-process simulation and in a
party process on another machine; only the transport under the link differs.

A step, at every party at once:

1. every local node runs forward as soon as its inputs are present (local data, or tensors
   received on a wire, which become leaves with ``requires_grad=True``); outputs feeding a
   wire are sent at once;
2. losses are computed where their input segment runs;
3. a stage runs backward once it holds the gradient of every tensor it sent (plus its local
   losses), then sends the gradient of every leaf it received back up its wire;
4. the party steps its optimizer once all its stages are done.

Evaluation runs 1-2 without gradients; prediction runs 1 only and skips label wires, so the
predictions stay at the party that owns the head. The *handshake* is an evaluation step on one
row of zeros: it checks the plan across parties and fixes the shape of every wire, against
which every later message is checked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .codec import Codec, WireError, dtype_name, get_codec
from .graph import Graph, Node, Stage, Wire
from .link import Link
from .messages import Kind, Message
from .plan import PlanError
from .transport.base import TransportTimeout

__all__ = ["Party", "StepOutput", "PartyError", "Mode", "dry_run", "merge_inputs", "LOSSES"]

Mode = Literal["train", "eval", "predict", "handshake"]


class PartyError(RuntimeError):
    """A party cannot go on (a peer stopped, a timeout, a refused message of ours)."""


def _bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(target.shape), target.float())


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.reshape(target.shape), target.float())


LOSSES = {"cross_entropy": F.cross_entropy, "bce": _bce, "mse": _mse}


def correct(kind: str, out: torch.Tensor, target: torch.Tensor) -> int:
    """Correct predictions in a batch (classification losses only)."""
    if kind == "cross_entropy":
        return int((out.argmax(-1) == target).sum())
    if kind == "bce":
        return int(((out.reshape(target.shape) > 0).long() == target.long()).sum())
    raise ValueError(f"no accuracy for loss kind {kind!r}")


def merge_inputs(how: str, module: nn.Module, xs: list[torch.Tensor]) -> torch.Tensor:
    """Run a segment on its inputs: concatenated on the feature dimension, summed, or as arguments."""
    if len(xs) == 1:
        return module(xs[0])
    if how == "concat":
        return module(torch.cat(xs, dim=1))
    if how == "sum":
        return module(torch.stack(xs).sum(0))
    return module(*xs)


@dataclass
class StepOutput:
    losses: dict[str, float] = field(default_factory=dict)  # loss name -> value (unweighted)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # loss name -> outputs of its head
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # loss name -> targets (eval)


class Party:
    """The stages of one party, its modules, optimizer and local data.

    ``data`` maps input nodes (``party.field``) to tensors over all aligned rows; a step
    reads the rows it is given. ``wire_shapes`` (wire -> dtype, shape without the batch
    dimension) is what the parties agreed; received tensors are checked against it.
    """

    def __init__(self, graph: Graph, name: str, link: Link, modules: dict[str, nn.Module],
                 optimizer: torch.optim.Optimizer | None, data: dict[str, torch.Tensor],
                 wire_shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None, timeout: float | None = 600.0,
                 predicting: bool = False, noise_secret: int | None = None):
        self.graph, self.name, self.link = graph, name, link
        self.meter = link.meter
        self.modules, self.optimizer, self.data = modules, optimizer, data
        self.wire_shapes = wire_shapes or {}
        self.timeout = timeout
        self.predicting = predicting  # a prediction run: no labels anywhere, not even at the handshake
        self.noise_secret = secrets.randbits(128) if noise_secret is None else noise_secret
        self.nodes = graph.nodes
        self.order = graph.local_order(name)
        self.stages = graph.stages_of(name)
        self.wires = {w.name: w for w in graph.wires if name in (w.src_party, w.dst_party)}
        self.sends_from: dict[str, list[Wire]] = {}
        for w in self.wires.values():
            if w.src_party == name:
                self.sends_from.setdefault(w.src, []).append(w)
        # encoders are per wire and direction (a codec may keep state, e.g. error feedback)
        self.encoders: dict[tuple[str, Kind], Codec] = {}
        for w in self.wires.values():
            if w.src_party == name:
                self.encoders[(w.name, Kind.ACTIVATION)] = get_codec(w.codec)
            elif w.carries == "activation":
                self.encoders[(w.name, Kind.GRADIENT)] = get_codec(w.grad_codec)
        self.label_only = graph.label_inputs() & set(self.order)
        self._early: dict[int, list[Message]] = {}
        self.stage_of = {n: s.index for s in self.stages for n in s.nodes}
        # NoPeek compares a wire's activations with the raw inputs they were computed from
        self.raw_inputs = {w.src: graph.raw_inputs(w.src) for w in self.wires.values() if w.src_party == name}
        self.num_classes = {n: int(data[n].max()) + 1 for n in self.order
                            if self.nodes[n].kind == "input" and n in data and not data[n].is_floating_point()
                            and data[n].numel()}
        self.observer: Callable[[str, str, "_StepState", torch.Tensor], None] | None = None
        self.finished: set[str] = set()  # neighbours that said they are done

    # -- the step ---------------------------------------------------------------------------

    def step(self, step: int, rows: torch.Tensor, mode: Mode) -> StepOutput:
        """Run one step on the given rows (positions into the aligned data) in ``mode``."""
        train = mode == "train"
        if mode == "handshake":
            rows = torch.zeros(1, dtype=torch.long)
        st = _StepState(step, rows, mode, skip_labels=mode == "predict" or (mode == "handshake" and self.predicting))
        st.todo = [n for n in self.order if not (st.skip_labels and n in self.label_only)]
        stages = list(self.stages) if train else []
        for m in self.modules.values():
            m.train(train)  # batch norm and dropout behave as in training only when training
        if train and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train):
            while True:
                progressed = True
                while progressed:
                    progressed = False
                    for n in list(st.todo):
                        if all(d in st.values for d in self._needs(n, st)):
                            self._forward(self.nodes[n], st)
                            st.todo.remove(n)
                            progressed = True
                    for s in list(stages):
                        if self._stage_ready(s, st):
                            self._backward(s, st)
                            stages.remove(s)
                            progressed = True
                if not st.todo and not stages:
                    break
                self._receive(st, stages)
        if train and self.optimizer is not None:
            with self.meter.timed("compute"):
                self.optimizer.step()
        return st.out

    def _needs(self, n: str, st: "_StepState") -> tuple[str, ...]:
        node = self.nodes[n]
        if node.kind == "loss" and st.skip_labels:
            return node.inputs[:1]  # the head's output only; labels are not needed
        return node.inputs

    def _forward(self, node: Node, st: "_StepState") -> None:
        batch = len(st.rows)
        if node.kind == "input":
            data = self.data[node.name]
            st.values[node.name] = torch.zeros_like(data[:1]) if st.mode == "handshake" else data[st.rows]
        elif node.kind == "segment":
            spec = self.graph.plan.segments[node.name]
            xs = [st.values[d] for d in node.inputs]
            if st.mode == "handshake":
                st.values[node.name] = _checked(self.graph, node, xs, lambda: merge_inputs(spec.merge, self.modules[node.name], xs))
            else:
                st.values[node.name] = self.meter.compute(
                    (node.name, batch), "forward", lambda: merge_inputs(spec.merge, self.modules[node.name], xs))
        else:  # loss
            spec = self.graph.plan.losses[node.name]
            out = st.values[node.inputs[0]]
            if st.skip_labels:
                st.out.predictions[node.name] = out.detach()
                return
            target = st.values[node.inputs[1]]
            if st.mode == "handshake":
                _checked(self.graph, node, [out, target], lambda: LOSSES[spec.kind](out, target))
                return
            loss = self.meter.compute((node.name, batch), "forward", lambda: LOSSES[spec.kind](out, target))
            st.losses[node.name] = loss
            st.out.losses[node.name] = float(loss.detach())
            if st.mode == "eval":
                st.out.predictions[node.name] = out.detach()
                st.out.targets[node.name] = target
        for w in self.sends_from.get(node.name, []):
            st.sent[w.name] = self._defend_forward(w, st)
            self._send(Kind.ACTIVATION, w, st, st.sent[w.name])

    # -- defenses (configured per wire; see splitlearn.privacy) -----------------------------

    def _rng(self, step: int, wire: Wire, salt: int) -> torch.Generator:
        """Defense noise: from this party's secret (never from the plan, which every party holds:
        a receiver could regenerate and subtract it), the step and the wire."""
        key = f"{self.noise_secret}/{step}/{wire.name}/{salt}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def _defend_forward(self, w: Wire, st: "_StepState") -> torch.Tensor:
        """What the sender puts on a wire: NoPeek adds a loss term; noise and randomized response change it."""
        value, spec = st.values[w.src], w.spec
        if st.mode == "handshake":
            return value
        if spec.nopeek and st.mode == "train":
            from .privacy.nopeek import distance_correlation

            raw = torch.cat([st.values[n].reshape(len(value), -1).float() for n in self.raw_inputs[w.src]], dim=1)
            st.extra.setdefault(self.stage_of[w.src], []).append(spec.nopeek * distance_correlation(raw, value))
        if spec.noise is not None:
            from .privacy.noise import clip_and_noise

            value = clip_and_noise(value, spec.noise.clip, spec.noise.sigma, self._rng(st.step, w, 1))
        if spec.randomized_response is not None and st.mode == "train":
            from .privacy.labels import randomized_response

            classes = self.num_classes[w.src]
            value = randomized_response(value, spec.randomized_response, classes, self._rng(st.step, w, 2))
        return value

    def _defend_backward(self, w: Wire, s: Stage, st: "_StepState", grad: torch.Tensor) -> torch.Tensor:
        """What the label holder returns on a wire: the gradient, protected if the plan says so."""
        lp = w.spec.label_protection
        if lp is None or st.mode != "train":
            return grad
        from .privacy import labels as protect

        if lp.kind == "max_norm":
            return protect.max_norm(grad, self._rng(st.step, w, 3))
        target = st.values[self.nodes[s.losses[0]].inputs[1]]
        return protect.marvell(grad, target, lp.strength, self._rng(st.step, w, 3))

    def _stage_ready(self, s: Stage, st: "_StepState") -> bool:
        return (not any(n in st.todo for n in s.nodes)
                and all(w in st.grads for w in s.sends if self.wires[w].carries == "activation"))

    def _backward(self, s: Stage, st: "_StepState") -> None:
        roots, grads = [], []
        for name in s.losses:
            roots.append(st.losses[name])
            grads.append(torch.tensor(self.graph.plan.losses[name].weight))
        for term in st.extra.get(s.index, []):
            roots.append(term)
            grads.append(None)
        for w in s.sends:
            wire = self.wires[w]
            if wire.carries == "activation":
                roots.append(st.sent[w])
                grads.append(st.grads[w])
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            self.meter.compute((("stage", s.index), len(st.rows)), "backward",
                               lambda: torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs]))
        for w in s.receives:
            wire = self.wires[w]
            if wire.carries == "activation":
                leaf = st.values[wire.src]
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self._send(Kind.GRADIENT, wire, st, self._defend_backward(wire, s, st, grad))

    # -- messages ---------------------------------------------------------------------------

    def _send(self, kind: Kind, wire: Wire, st: "_StepState", t: torch.Tensor) -> None:
        dst = wire.dst_party if kind == Kind.ACTIVATION else wire.src_party
        codec = self.encoders[(wire.name, kind)]
        if st.mode != "train":  # a codec's state (error feedback) belongs to training
            codec = get_codec(codec.name)
        with self.meter.timed("compute"):
            enc = codec.encode(t.detach())
        self.link.send(Message(kind, self.name, dst, st.step, wire.name, {"t": enc}))

    def _next_message(self, st: "_StepState", stages: list[Stage]) -> Message:
        if self._early.get(st.step):
            return self._early[st.step].pop(0)
        for old in [k for k in self._early if k <= st.step]:
            del self._early[old]
        try:
            return self.link.recv(self.timeout)
        except TransportTimeout:
            waiting = [n for n in st.todo] + [w for s in stages for w in s.sends if w not in st.grads]
            raise PartyError(f"{self.name}: nothing received for {self.timeout} s at step {st.step} "
                             f"while waiting for {waiting}") from None

    def _receive(self, st: "_StepState", stages: list[Stage]) -> None:
        msg = self._next_message(st, stages)
        if msg.kind == Kind.STOP and msg.text == "done":
            self.finished.add(msg.sender)
            if msg.sender in self._waiting_on(st, stages):
                raise PartyError(f"{self.name}: party {msg.sender!r} finished while step {st.step} still waits for it")
            return
        self.raise_if_stopped(msg)
        if msg.kind not in (Kind.ACTIVATION, Kind.GRADIENT):
            self.link.refuse(msg.sender, f"unexpected {msg.kind.name} message during step {st.step}", msg.step)
            return
        if msg.step > st.step:
            self.keep_early(msg, st.step)
            return
        if msg.step < st.step:
            return  # a duplicate of a finished step
        wire = self.wires.get(msg.wire)
        expected_sender = None
        if wire is not None:
            if msg.kind == Kind.ACTIVATION and wire.dst_party == self.name:
                expected_sender = wire.src_party
            elif msg.kind == Kind.GRADIENT and wire.src_party == self.name and wire.carries == "activation":
                expected_sender = wire.dst_party
        if expected_sender != msg.sender:
            self.link.refuse(msg.sender, f"no {msg.kind.name.lower()} from {msg.sender!r} is expected on this wire",
                             msg.step, msg.wire)
            return
        try:
            t = self._check_and_decode(msg, wire, st)
        except WireError as e:
            self.link.refuse(msg.sender, str(e), msg.step, msg.wire)
            return
        if self.observer is not None and st.mode in ("train", "eval"):
            self.observer(wire.name, "forward" if msg.kind == Kind.ACTIVATION else "backward", st, t)
        if msg.kind == Kind.ACTIVATION:
            if wire.src in st.values:
                return  # duplicate
            if st.mode == "train" and wire.carries == "activation":
                t.requires_grad_(True)
            st.values[wire.src] = t
        else:
            st.grads.setdefault(wire.name, t)

    def raise_if_stopped(self, msg: Message) -> None:
        """An ERROR, or a STOP other than "done": the sender gave up, and so does this party."""
        if msg.kind == Kind.ERROR or (msg.kind == Kind.STOP and msg.text != "done"):
            raise PartyError(f"{self.name}: party {msg.sender!r} stopped: {msg.text or 'no reason given'}")

    def keep_early(self, msg: Message, current: int) -> None:
        """Keep a message of a later step for when this party gets there (a bounded number)."""
        early = self._early.setdefault(msg.step, [])
        if msg.step > current + 2 or len(early) >= 4 * len(self.wires):  # no honest party runs that far ahead
            self.link.refuse(msg.sender, f"step {msg.step} is too far ahead of step {current}", msg.step, msg.wire)
            return
        early.append(msg)

    def _waiting_on(self, st: "_StepState", stages: list[Stage]) -> set[str]:
        """Parties this step still needs a message from."""
        parties = {self.wires[w].dst_party for s in stages for w in s.sends
                   if self.wires[w].carries == "activation" and w not in st.grads}
        for n in st.todo:
            parties |= {self.nodes[d].party for d in self._needs(n, st)
                        if d not in st.values and self.nodes[d].party != self.name}
        return parties

    def _check_and_decode(self, msg: Message, wire: Wire, st: "_StepState") -> torch.Tensor:
        if set(msg.tensors) != {"t"}:
            raise WireError(f"expected one tensor 't', got {sorted(msg.tensors)}")
        enc = msg.tensors["t"]
        want_codec = wire.codec if msg.kind == Kind.ACTIVATION else wire.grad_codec
        if enc.codec != get_codec(want_codec).name:
            raise WireError(f"codec {enc.codec!r} where {want_codec!r} was agreed")
        if msg.kind == Kind.GRADIENT:
            if wire.name not in st.sent:
                raise WireError("a gradient for an activation not sent yet in this step")
            sent = st.sent[wire.name]
            want_dtype, want_shape = dtype_name(sent.dtype), tuple(sent.shape)
        elif st.mode == "handshake":
            want_dtype, want_shape = enc.dtype, (1, *enc.shape[1:])
        elif wire.name in self.wire_shapes:
            dtype, shape = self.wire_shapes[wire.name]
            want_dtype, want_shape = dtype, (len(st.rows), *shape)
        else:
            want_dtype, want_shape = enc.dtype, (len(st.rows), *enc.shape[1:])
        if enc.dtype != want_dtype:
            raise WireError(f"dtype {enc.dtype} where {want_dtype} was agreed")
        if tuple(enc.shape) != want_shape:
            raise WireError(f"shape {list(enc.shape)} where {list(want_shape)} was expected")
        if st.mode == "handshake" and msg.kind == Kind.ACTIVATION:
            self.wire_shapes[wire.name] = (enc.dtype, tuple(enc.shape[1:]))
        return get_codec(enc.codec).decode(enc)


def _checked(graph: Graph, node: Node, xs: list[torch.Tensor], fn):
    """Run a segment or loss on a one-row sample; a failure is a PlanError naming the wires and shapes."""
    try:
        return fn()
    except Exception as e:
        came = ", ".join(f"{_via(graph, d, node.party)} with shape {list(x.shape)}" for d, x in zip(node.inputs, xs))
        what = "segment" if node.kind == "segment" else "loss"
        raise PlanError(f"{what} {node.name!r} (party {node.party!r}) cannot take {came}: {e}",
                        entry=f"{what}s.{node.name}",
                        hint="make what comes in match what this step expects (check 'layers', the network sizes, "
                        "the head's output width and the loss kind)") from None


def _via(graph: Graph, src: str, party: str) -> str:
    wire = graph.wire_between(src, party)
    return f"wire {wire.name!r}" if wire else repr(src)


@dataclass
class _StepState:
    step: int
    rows: torch.Tensor
    mode: Mode
    skip_labels: bool = False
    todo: list[str] = field(default_factory=list)
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # node -> tensor (local or received)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # wire -> gradient of what we sent on it
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    sent: dict[str, torch.Tensor] = field(default_factory=dict)  # wire -> the tensor sent on it (after defenses)
    extra: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # stage -> extra loss terms (NoPeek)
    out: StepOutput = field(default_factory=StepOutput)


def dry_run(graph: Graph, modules: dict[str, nn.Module], sample: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Run one sample through the whole graph in one process; return each wire's dtype and shape.

    ``sample`` maps input nodes to tensors with a batch dimension of 1 (label inputs may be
    missing, as when predicting). A failing segment or loss raises a :class:`PlanError` naming
    the wire and the shapes.
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
                xs = [values[d] for d in node.inputs]
                values[n] = _checked(graph, node, xs, lambda: merge_inputs(spec.merge, modules[n], xs))
            elif node.inputs[1] in values:
                out, target = values[node.inputs[0]], values[node.inputs[1]]
                _checked(graph, node, [out, target], lambda: LOSSES[graph.plan.losses[n].kind](out, target))
    return {w.name: (dtype_name(values[w.src].dtype), tuple(values[w.src].shape[1:])) for w in graph.wires
            if w.src in values}
