"""One party's side of a step: the stage protocol of docs/design.md, over a :class:`~splitlearn.wire.link.Link`.

Pure logic: no sockets and no files. The same code runs in an in-process simulation and in a
party process on another machine; only the transport under the link differs.

A step, at every party at once:

1. every local node runs forward as soon as its inputs are present (local data, or tensors received on a wire,
   which become leaves with ``requires_grad=True``); outputs feeding a wire are sent at once;
2. losses are computed where their input segment runs;
3. a stage runs backward once it holds the gradient of every tensor it sent (plus its local losses), then sends
   the gradient of every leaf it received back up its wire;
4. the party steps its optimizer once all its stages are done (with ``[train] accumulate``, once its
   gradient group is: :class:`~splitlearn.core.optimizing.Update`; with a party in fp16, once the network
   agreed that no party overflowed; with ``clip = "global"``, clipped to the norm the network agreed on the
   same way: :mod:`~splitlearn.core.precision`).

Evaluation runs 1-2 without gradients; prediction runs 1 only and skips label wires, so the predictions stay at
the party that owns the head. The *handshake* is an evaluation step on one row of zeros: it checks the plan
across parties and fixes the shape of every wire, against which every later message is checked.
"""

from __future__ import annotations

import functools
import secrets
import time
from typing import Callable

import torch
from torch import nn

from ..wire.codec import Codec, WireError, dtype_name, get_codec
from ..wire.link import Link
from ..wire.messages import Kind, Message, quote
from ..wire.transport.base import TransportTimeout
from ..data.text import Ragged
from .admission import check_received_values, codec_for, decode_checked, early_problem
from .augment import augmented
from .bounds import Hijacked, LearntBounds
from .defense import defend_backward, defend_forward
from .dryrun import check_labels, check_outputs, merge_inputs, run_checked
from .early import EarlyMessages
from .flow import FlowControl, graded
from .graph import Graph, Node, Stage, Wire
from .losses import get as loss_kind
from .optimizing import WHOLE, PartyOptimizer, Update
from .plan import STEP_TIMEOUT_S
from .precision import Precision
from .randomness import PartyRandom, party_seed
from .securesum import SecureSum
from .step import CPU, WRITTEN_AFTER_SENDING, Mode, Modes, StepOutput, StepState, placed

__all__ = ["Party", "PartyError", "SessionRestart"]


class PartyError(RuntimeError):
    """A party cannot go on (a peer stopped, a timeout, a refused message of ours)."""


class SessionRestart(Exception):
    """A neighbour began its session again (it went back to a checkpoint): so must this party.
    ``hello`` is that neighbour's new hello."""

    def __init__(self, hello: Message):
        self.hello = hello
        super().__init__(f"{hello.sender} began its session again")


class Party:
    """The stages of one party, its modules, optimizer and local data.

    ``data`` maps input nodes (``party.field``) to tensors over all aligned rows; a step
    reads the rows it is given. ``wire_shapes`` (wire -> dtype, shape without the batch
    dimension) is what the parties agreed; received tensors are checked against it.
    """

    def __init__(self, graph: Graph, name: str, link: Link, modules: dict[str, nn.Module],
                 optimizer: PartyOptimizer | None, data: dict[str, torch.Tensor],
                 wire_shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None, timeout: float | None = STEP_TIMEOUT_S,
                 predicting: bool = False, noise_secret: int | None = None, rng: PartyRandom | None = None):
        self.graph, self.name, self.link = graph, name, link
        self.meter = link.meter
        self.modules, self.optimizer, self.data = modules, optimizer, data
        # where it computes: its modules' device (data stay on the CPU; each batch moves when it is read)
        self.device = next((p.device for m in modules.values() for p in m.parameters()), torch.device("cpu"))
        # random layers draw from the party's own stream (seeded by the plan and its name), never a shared one
        self.rng = rng or PartyRandom(party_seed(graph.plan.train.seed, name), self.device)
        self.precision = Precision(graph, name, self.device, link, bool(modules) and not predicting, PartyError)
        self.wire_shapes = self.precision.agreed(wire_shapes or {})  # (an autocasting sender's wires: its dtype)
        self.timeout = timeout
        self.predicting = predicting  # a prediction run: no labels anywhere, not even at the handshake
        self.noise_secret = secrets.randbits(128) if noise_secret is None else noise_secret
        self.nodes = graph.nodes
        view = graph.party_view(name)  # (derived once per graph: a [clients] turn builds its parties every time)
        self.order, self.stages, self.wires, self.sends_from = view.order, view.stages, view.wires, view.sends_from
        self.label_only, self.stage_of, self.raw_inputs = view.label_only, view.stage_of, view.raw_inputs
        # encoders are per wire and direction (a codec may keep state, e.g. error feedback)
        self.encoders: dict[tuple[str, Kind], Codec] = {}
        for w in self.wires.values():
            if w.src_party == name:
                self.encoders[(w.name, Kind.ACTIVATION)] = get_codec(w.codec)
            elif w.carries == "activation":
                self.encoders[(w.name, Kind.GRADIENT)] = get_codec(w.grad_codec)
        self.limits = link.limits
        t = graph.plan.train
        self.max_rows = max(t.batch_size, t.eval_batch_size)  # no step is larger
        self.pipeline = t.pipeline  # micro-batches per training step (message step ids are step * pipeline + i)
        self.early = EarlyMessages(self.limits, self.pipeline)  # messages that came before this party got there
        self.classes: dict[str, int] = {}  # label node -> classes of the cross-entropy head it feeds (handshake)
        self._labels = {n: data[n] for n in self.order if self.nodes[n].kind == "input" and n in data  # labels held
                        and isinstance(data[n], torch.Tensor) and not data[n].is_floating_point() and data[n].numel()}
        self.observer: Callable[[str, str, StepState, torch.Tensor], None] | None = None
        self.finished: set[str] = set()  # neighbours that said they are done
        self.restartable = False  # a neighbour's new hello mid-run restarts the session (it has checkpoints)
        # credits: never a window ahead of a consumer; which pairs hear back follows the dtypes agreed (the handshake)
        self.flow = FlowControl(graph, name, self.limits, self.wire_shapes)
        self.last_step = -1  # the last step this party finished (a checkpoint is taken after it)
        self.resumed_at = -1  # the session's step to go on after (set by the session before its handshake)
        self.bounds = LearntBounds(graph)  # per wire and direction: the magnitudes its peer sent (``max_jump``)
        self.secure = SecureSum(graph, name, self.meter, PartyError)  # merge = "secure_sum": masks, keys, the sum
        self.modes = Modes()  # its modules' mode, set when it changes

    @functools.cached_property
    def num_classes(self) -> dict[str, int]:
        """Label node -> its classes (the largest label held, plus one), worked out when first asked (a label defense)."""
        return {n: int(d.max()) + 1 for n, d in self._labels.items()}

    def restart(self) -> None:
        """Forget what the session held (messages kept early, goodbyes) before it begins again."""
        self.early.clear()
        self.finished.clear()

    # -- the step ---------------------------------------------------------------------------

    def step(self, step: int, rows: torch.Tensor, mode: Mode, update: Update = WHOLE) -> StepOutput:
        """Run one step on the given rows (positions into the aligned data) in ``mode``; a training step updates the
        weights as ``update`` says (its gradient group: its losses weighted by its share).

        A training step with ``[train] pipeline = K`` runs as K micro-batches (rows split as evenly as possible) that
        flow through the parties as in GPipe: each runs forward as soon as its inputs are there and backward as soon
        as its gradients are, its loss weighted by its share of the rows, so the gradients accumulated over them are
        the whole batch's; the optimizer steps once. Micro-batch ``i`` of step ``s`` travels as message step
        ``s * K + i``."""
        train = mode == "train"
        if mode == "handshake":
            rows = torch.zeros(1, dtype=torch.long)
        text = next((d for d in self.data.values() if isinstance(d, Ragged)), None)
        if text is not None and mode in ("train", "eval"):  # text rows: their real tokens, once a step
            self.meter.count_tokens(int(text.lengths[rows].sum()), train)
        k = self.pipeline
        parts = [r for r in torch.tensor_split(rows, k)] if train and k > 1 else [rows]
        states = []
        for i, part in enumerate(parts):
            if not len(part):
                continue  # fewer rows than micro-batches
            st = self.begin(step * k + i, part, mode)
            st.share = update.share * len(part) / len(rows)
            st.todo = [n for n in self.order if not (st.skip_labels and n in self.label_only)]
            st.stages = list(self.stages) if train else []
            states.append(st)
        self.precision.begin(step * k, mode, update.first, update.last)
        self.modes.apply(self.modules, train)  # batch norm and dropout behave as in training only when training
        if train and self.optimizer is not None and update.first:
            self.optimizer.zero_grad(set_to_none=True)
        if mode == "handshake":
            self.flow.begin_session()
        else:
            self.flow.begin_step(step, mode)
        self._gate(states, step, mode)
        with torch.set_grad_enabled(train):
            while True:
                progressed = True
                while progressed:
                    progressed = False
                    for st in states:
                        for n in list(st.todo):
                            if all(d in st.values for d in self._needs(n, st)):
                                self._forward(self.nodes[n], st)
                                st.todo.remove(n)
                                progressed = True
                        for s in list(st.stages):
                            if self._stage_ready(s, st):
                                self._backward(s, st)
                                st.stages.remove(s)
                                progressed = True
                if all(not st.todo and not st.stages for st in states):
                    break
                if bad := [w for st in states if st.mode == "train" for w in st.written_after_sending()
                           if self._graded(self.wires[w], st.sent[w])]:  # (before its receiver reads, if lent)
                    raise PartyError(f"{self.name}: the tensor it sent on {sorted(set(bad))} {WRITTEN_AFTER_SENDING}")
                self._receive(states)
        if train and update.last and self.precision.settle(self.optimizer, lambda: self._receive(states)):
            with self.meter.timed("compute"):
                self.optimizer.step()
        for pair in self.flow.credits(step, mode):  # the producers that wait for this party: it finished the step
            self.link.send(Message(Kind.CREDIT, self.name, pair.producer, step * k, pair.wire))
        self.last_step = step
        if len(states) == 1:
            return states[0].out
        out = StepOutput()  # the whole batch's losses: the micro-batches' weighted by their rows
        for st in states:
            for name, v in st.out.losses.items():
                out.losses[name] = out.losses.get(name, 0.0) + len(st.rows) / len(rows) * v
        return out

    def begin(self, step: int, rows: torch.Tensor, mode: Mode) -> StepState:
        """The state of a new step; its deadline is ``timeout`` seconds from now, for the whole step."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if mode in ("eval", "predict"):
            self.bounds.freeze()  # the first epoch's training is over: what it carried is the bound
        return StepState(step, rows, mode, skip_labels=mode == "predict" or (mode == "handshake" and self.predicting),
                         deadline=deadline)

    def _needs(self, n: str, st: StepState) -> tuple[str, ...]:
        node = self.nodes[n]
        if node.kind == "loss" and st.skip_labels:
            return node.inputs[:1]  # the head's output only; labels are not needed
        return node.inputs

    def _forward(self, node: Node, st: StepState) -> None:
        if node.kind == "input":
            data = self.data[node.name]
            rows = torch.zeros_like(data[:1]) if st.mode == "handshake" else data[st.rows]
            st.values[node.name] = augmented(self.graph.plan, node, placed(rows, self.device), st.mode, self.rng)  # (training)
        elif node.kind == "segment":
            spec = self.graph.plan.segments[node.name]
            xs = [self.precision.take_input(d, st.values[d]) for d in node.inputs]
            xs = self.secure.merged(node, st, xs, self.observer)  # a secure sum: [the sum of its inputs]
            with self.rng.scope(), self.precision.autocast():
                merge = node.merge or spec.merge
                if st.mode == "handshake":
                    st.values[node.name] = run_checked(self.graph, node, xs,
                                                    lambda: merge_inputs(merge, self.modules[node.name], xs))
                    check_outputs(self.graph, node, st.values[node.name])  # the tuple or dict its outputs name
                else:
                    st.values[node.name] = self.meter.compute(  # FLOPs per input shapes (a sequence length varies)
                        (node.name, *(tuple(x.shape) for x in xs)), "forward",
                        lambda: merge_inputs(merge, self.modules[node.name], xs))
        elif node.kind == "output":  # one element of its segment's tuple or dict, on a wire of its own
            st.values[node.name] = node.pick(st.values[node.inputs[0]])
        else:  # loss
            spec = self.graph.plan.losses[node.name]
            out = st.values[node.inputs[0]]
            if st.skip_labels:
                st.out.predictions[node.name] = self.precision.plain(out)
                return
            target = st.values[node.inputs[1]]
            kind = loss_kind(spec.kind)
            if st.mode == "handshake":
                run_checked(self.graph, node, [out, target], lambda: self.precision.run(kind.fn, out, target))
                if kind.indexes_classes and not target.is_floating_point():
                    self.classes[node.inputs[1]] = out.shape[-1]  # and labels held here must be classes of the head
                    check_labels(node, self.data.get(node.inputs[1]), out.shape[-1], kind.ignore_index)
                return
            loss = self.meter.compute((node.name, tuple(out.shape), tuple(target.shape)), "forward",
                                      lambda: self.precision.run(kind.fn, out, target))
            st.losses[node.name] = loss
            st.out.losses[node.name] = float(loss.detach())
            if st.mode == "eval":
                st.out.predictions[node.name] = self.precision.plain(out)
                st.out.targets[node.name] = target.cpu()
        for w in self.sends_from.get(node.name, []):
            st.sent[w.name] = self.precision.to_wire(w, defend_forward(self, w, st))
            st.sent_as[w.name] = st.sent[w.name]._version
            self._send(Kind.ACTIVATION, w, st, st.sent[w.name])

    def _graded(self, wire: Wire, t: torch.Tensor | None = None) -> bool:
        """Whether a gradient travels back on ``wire``: an activation of a floating dtype (the agreed one, else that
        of ``t``, the tensor sent or received); an integer tensor (a mask, token ids) carries none."""
        dtype = self.wire_shapes[wire.name][0] if wire.name in self.wire_shapes else None
        return graded(wire, dtype if dtype is not None or t is None else dtype_name(t.dtype))

    def _stage_ready(self, s: Stage, st: StepState) -> bool:
        return (not any(n in st.todo for n in s.nodes)
                and all(w in st.grads for w in s.sends if self._graded(self.wires[w], st.sent.get(w))))

    def _backward(self, s: Stage, st: StepState) -> None:
        roots, grads, scale = [], [], self.precision.loss_scale  # (1 unless the network's losses are scaled)
        for name in s.losses:  # a micro-batch's loss counts by its share of the batch's rows
            roots.append(st.losses[name])
            weight = self.graph.plan.losses[name].weight * scale
            grads.append(torch.tensor(weight if st.share == 1.0 else weight * st.share, device=st.losses[name].device))
        for term in st.extra.get(s.index, []):
            roots.append(term)
            grads.append(None if st.share * scale == 1.0 else torch.tensor(st.share * scale, device=term.device))
        for w in s.sends:
            wire = self.wires[w]
            if self._graded(wire, st.sent[w]):
                roots.append(st.sent[w])
                grads.append(st.grads[w])
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            shapes = tuple(tuple(r.shape) for r, _ in pairs) + tuple(
                tuple(st.values[self.wires[w].src].shape) for w in s.receives)
            self.meter.compute((("stage", s.index), len(st.rows), *shapes), "backward",
                               lambda: torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs]))
        for w in s.receives:
            wire = self.wires[w]
            if self._graded(wire, st.values[wire.src]):
                leaf = st.values[wire.src]
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self._send(Kind.GRADIENT, wire, st,
                           self.precision.unscaled(lambda g: defend_backward(self, wire, s, st, g), grad))

    # -- messages ---------------------------------------------------------------------------

    def _send(self, kind: Kind, wire: Wire, st: StepState, t: torch.Tensor) -> None:
        dst = wire.dst_party if kind == Kind.ACTIVATION else wire.src_party
        t = self.secure.mask(wire, kind, st, t)  # into a secure sum: masked fixed point (int64)
        codec, want = self.encoders[(wire.name, kind)], get_codec(codec_for(wire, dtype_name(t.dtype), kind))
        if st.mode != "train" or want.name != codec.name:  # a codec's state (error feedback) belongs to training;
            codec = want  # an integer tensor travels exactly (raw)
        if st.mode == "handshake" and kind == Kind.ACTIVATION:  # what it sends is agreed, at its end as at the other's
            self.wire_shapes.setdefault(wire.name, (dtype_name(t.dtype), tuple(t.shape[1:])))
        # a training step's gradient, or an activation the receiver takes as its leaf (autograd refuses a write into
        # it) or an input of backward: lent (codec.Lent), in one process not copied; else the wire's bytes
        lent = st.mode == "train" and (kind == Kind.GRADIENT or self._graded(wire, t))
        with self.meter.timed("compute"):
            t = placed(self.precision.finite(t.detach(), st.mode), CPU)  # (on the wire: in host memory)
            enc = codec.encode_lent(t) if lent else codec.encode(t)
        self.link.send(Message(kind, self.name, dst, st.step, wire.name, {"t": enc}))

    def _next_message(self, states: list[StepState]) -> Message:
        kept = self.early.next_for([st.step for st in states])
        if kept is not None:
            return kept
        try:
            return self.link.recv(deadline=states[0].deadline)
        except TransportTimeout:
            waiting = [n for st in states for n in st.todo] + [w for st in states for s in st.stages for w in s.sends
                                                               if w not in st.grads
                                                               and self._graded(self.wires[w], st.sent.get(w))]
            first = states[0]
            waiting += [f"a credit from {c}" for c in self.flow.blocked(first.step // self.pipeline, first.mode)]
            waiting += self.precision.waiting()
            raise PartyError(f"{self.name}: step {states[0].step // self.pipeline} not done within its deadline of "
                             f"{self.timeout} s (still waiting for {sorted(set(waiting))})") from None

    def wait_after(self, step: int, done: Callable[[], bool]) -> None:
        """After step ``step``, take messages as its micro-batch 0 would (a later step's kept early, a verdict handed
        on, a finished step's dropped) until ``done()``, within one step's deadline: the epoch verdicts'
        wait (:mod:`~splitlearn.core.stopping`)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        st = StepState(step * self.pipeline, torch.zeros(0, dtype=torch.long), "eval", deadline=deadline)
        while not done():
            self._receive([st])

    def _gate(self, states: list[StepState], step: int, mode: Mode) -> None:
        """Flow control (:mod:`~splitlearn.core.flow`): before a step in which this party would send to a consumer
        without hearing back, wait until that consumer is at most a window behind; what comes meanwhile is taken as
        in the step (tensors of this step are kept in its state)."""
        while blocked := self.flow.blocked(step, mode):
            if gone := [c for c in blocked if c in self.finished]:
                raise PartyError(f"{self.name}: party {quote(gone[0])} finished while step {step} still waits for "
                                 "its credit")
            self._receive(states)

    def _take_credit(self, msg: Message) -> None:
        """A consumer's CREDIT: it finished the step it names (or it is refused, naming why)."""
        problem = self.flow.credit_problem(msg)
        if problem is not None:
            self.link.refuse(msg.sender, problem, msg.step, msg.wire)
        else:
            self.flow.credited(msg.sender, msg.step // self.pipeline)

    def _receive(self, states: list[StepState]) -> None:
        """Take the next message, for the micro-batch it belongs to (or as early or stale)."""
        msg = self._next_message(states)
        if msg.kind == Kind.CREDIT:  # flow control's, or (with a text) an optimizer step's verdict (precision.py)
            (self.precision.take if msg.text else self._take_credit)(msg)
            return
        if msg.kind in (Kind.ACTIVATION, Kind.GRADIENT):  # sent during its step: the sender reached it
            self.flow.heard(msg.sender, msg.step // self.pipeline)
        st = next((s for s in states if s.step == msg.step), states[0] if msg.step < states[0].step else states[-1])
        self.receive(msg, st, st.stages)

    def receive(self, msg: Message, st: StepState, stages: list[Stage] = ()) -> None:
        """Take one admitted message during step ``st``: use it, keep it for a later step, drop a stale duplicate, or
        refuse it (nothing is kept for a refused message)."""
        if msg.kind == Kind.STOP and msg.text == "done":
            self.finished.add(msg.sender)
            if msg.sender in self._waiting_on(st, stages):
                raise PartyError(f"{self.name}: party {quote(msg.sender)} finished while step {st.step} still waits for it")
            return
        self.raise_if_stopped(msg)
        if msg.kind == Kind.HELLO and self.restartable and msg.sender in self.graph.neighbours(self.name):
            raise SessionRestart(msg)
        if msg.kind not in (Kind.ACTIVATION, Kind.GRADIENT):
            self.link.refuse(msg.sender, f"unexpected {msg.kind.name} message during step {st.step}", msg.step)
            return
        if msg.step > st.step:
            self.keep_early(msg, st.step)
            return
        if msg.step < st.step:
            return  # a duplicate of a finished step
        wire = self._wire_for(msg)
        if wire is None:
            return
        try:
            self.precision.check_dtype(msg, wire, st)  # an autocasting sender's activations: in its dtype
            t = decode_checked(msg, wire, st, self.wire_shapes)
            seen = self.precision.seen(msg, st, t)  # a loss-scaled gradient is checked unscaled
            top = check_received_values(msg, wire, st, seen, self.graph, self.name, self.classes)
            learnt = self.bounds.check(msg, wire, st, seen, top)  # the largest magnitude found once; hijack_guard
        except WireError as e:
            self.link.refuse(msg.sender, str(e), msg.step, msg.wire)
            return
        except Hijacked as e:  # before this step's gradients are applied; the session tells the neighbours
            raise PartyError(f"{self.name}: {e}") from None
        if self.observer is not None and st.mode in ("train", "eval"):
            self.observer(wire.name, "forward" if msg.kind == Kind.ACTIVATION else "backward", st,
                          self.precision.plain(seen))
        if msg.kind == Kind.ACTIVATION:
            if wire.src in st.values:
                return  # duplicate
            t = placed(self.secure.take(wire, st, t), self.device)  # a masked one: kept, a zero leaf in its place
            if st.mode == "train" and self._graded(wire, t):
                t.requires_grad_(True)
            st.values[wire.src] = t
        else:
            if wire.name in st.grads:
                return  # duplicate
            st.grads[wire.name] = placed(t, self.device)
        if learnt is not None:  # only what enters the step teaches the bound
            self.bounds.learn(*learnt)

    def _wire_for(self, msg: Message) -> Wire | None:
        """The wire a tensor message may come on from its sender; None (refused) if none."""
        wire = self.wires.get(msg.wire)
        expected_sender = None
        if wire is not None:
            if msg.kind == Kind.ACTIVATION and wire.dst_party == self.name:
                expected_sender = wire.src_party
            elif msg.kind == Kind.GRADIENT and wire.src_party == self.name and self._graded(wire):
                expected_sender = wire.dst_party  # (not on a wire of an integer tensor, which carries none)
        if expected_sender != msg.sender:
            integer = msg.kind == Kind.GRADIENT and wire is not None and wire.carries == "activation" \
                and wire.src_party == self.name and not self._graded(wire)
            self.link.refuse(msg.sender, f"no {msg.kind.name.lower()} from {quote(msg.sender)} is expected on this wire"
                             + (" (its tensor is no floating one: it carries none)" if integer else ""),
                             msg.step, msg.wire)
            return None
        return wire

    def raise_if_stopped(self, msg: Message) -> None:
        """An ERROR, or a STOP other than "done": the sender gave up, and so does this party."""
        if msg.kind == Kind.ERROR or (msg.kind == Kind.STOP and msg.text != "done"):
            reason = msg.text[:500] + ("..." if len(msg.text) > 500 else "") if msg.text else "no reason given"
            raise PartyError(f"{self.name}: party {quote(msg.sender)} stopped: {reason}")

    def keep_early(self, msg: Message, current: int) -> None:
        """Keep a tensor message of a later step for when this party gets there.

        Only what the step will accept is kept, checked before it is held: a tensor message from the wire's sender, at
        most ``early_steps`` ahead, of the agreed codec, dtype and per-row shape with no more rows than a step has,
        within the per-peer ``early_messages`` and ``early_bytes`` limits. Anything else is refused and counted, and
        leaves nothing behind."""
        if msg.kind == Kind.CREDIT:  # (read before the handshake): taken at once, nothing kept
            self._take_credit(msg)
            return
        if msg.kind == Kind.STOP and msg.text == "done":  # a neighbour that needed nothing from this party finished
            self.finished.add(msg.sender)  # all it had to send (read before the handshake): its goodbye, noted
            return
        problem = None
        if msg.kind not in (Kind.ACTIVATION, Kind.GRADIENT):
            problem = f"unexpected {msg.kind.name} message before step {msg.step}"
        elif (msg.step // self.pipeline
              > (at := max(current // self.pipeline, self.resumed_at)) + self.limits.early_steps):  # (resumed: its step)
            problem = f"step {msg.step // self.pipeline} is too far ahead of step {at} (Limits.early_steps)"
        if problem:
            self.link.refuse(msg.sender, problem, msg.step, msg.wire)
            return
        if (wire := self._wire_for(msg)) is None:
            return
        problem = early_problem(msg, wire, self.wire_shapes, self.max_rows, self.limits) or self.early.budget_problem(msg)
        if problem:
            self.link.refuse(msg.sender, problem, msg.step, msg.wire)
            return
        self.early.keep(msg)

    @property
    def held_early(self) -> dict[str, tuple[int, int]]:
        """Per peer: (messages, payload bytes) held for steps this party has not reached yet."""
        return self.early.by_peer

    @property
    def kept_early(self) -> dict[int, list[Message]]:
        """Per message step: the messages kept for a step this party has not reached yet (a copy)."""
        return self.early.by_step

    def _waiting_on(self, st: StepState, stages: list[Stage]) -> set[str]:
        """Parties this step still needs a message from."""
        parties = {self.wires[w].dst_party for s in stages for w in s.sends
                   if self._graded(self.wires[w], st.sent.get(w)) and w not in st.grads}
        for n in st.todo:
            parties |= {self.nodes[d].party for d in self._needs(n, st)
                        if d not in st.values and self.nodes[d].party != self.name}
        return parties
