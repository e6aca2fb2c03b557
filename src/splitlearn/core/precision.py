"""Mixed precision per party (a party's ``precision``): autocast, the wire's dtype, and loss scaling agreed by
the network; and the agreement of each optimizer step, which also carries a global clip's norm.

- ``"fp32"`` (the default): no autocast; the party computes as before.
- ``"bf16"``: the party's forward and its losses run under ``torch.autocast`` in bfloat16 (CPU or CUDA).
- ``"fp16"``: the same in float16, on CUDA only, with loss scaling (below).

**The wire follows.** Every floating activation a bf16/fp16 party sends is cast to its dtype (so its
gradient has that dtype too), and the ``float32`` codec sends a 16-bit float as itself, two bytes an element
(:class:`~splitlearn.wire.codec.Float32`): no codec to choose. The handshake then agrees on that dtype (a
peer's activation of another floating dtype is refused there, and every later message must carry the agreed
one, as ever). A float32 party takes such an activation upcast (its gradient goes back in the wire's dtype).

**Loss scaling is the network's.** As soon as one party is fp16 (:func:`loss_scaled`), every party scales its
losses by the common scale ``S`` before backward (the gradients on the wires are scaled, so 16-bit gradients
do not underflow), unscales its gradients before its optimizer steps and steps only if *no* party found an
overflow. Each optimizer step's verdict is agreed over a tree that spans the parties linked by activation
wires (:func:`agreement_tree`): a party tells its parent whether its subtree overflowed (a CREDIT message
whose text is ``finite`` or ``overflow``), the root decides, and the decision (``step`` or ``skip``) goes back
down. Every party applies torch's ``GradScaler`` rule to the same verdicts (:class:`LossScale`), so the scales
stay equal without ever being sent. In a training step a party that would send a non-finite tensor sends
zeros instead and reports an overflow, so nothing non-finite travels and the receivers' checks stay as they
are; they check received gradients unscaled (``max_abs``, learnt bounds), and defenses see them unscaled.

A verdict is taken only from the party's parent or a child in the tree, for the step being settled, once
(and the parent's only after this party told its own); anything else is refused. So a peer can make a step
be skipped, as it could make the step fail by withholding its gradient, and nothing more; a scale that falls
below :data:`MIN_SCALE` (some forty overflows in a row) stops the run, naming who reported them.

**A global clip rides on the same verdicts.** With ``[train] clip_grad_norm = N`` and ``clip = "global"``
every party of a network (the parties the tree spans) clips as ``torch.nn.utils.clip_grad_norm_(all
parameters, N)`` would on the unsplit model, and only squared norms travel: a party adds the sum of its
gradients' squared 2-norms (:meth:`~splitlearn.core.optimizing.PartyOptimizer.squared_norm`, after unscaling,
over the gradients its accumulation group gathered) to its children's and sends its parent ``finite <sum>``;
the root's sum is the network's, and ``step <total>`` goes back down (the number as ``repr`` writes a float, so
every party reads the very same one). Each party then scales its gradients by ``min(1, N / (sqrt(total) +
1e-6))`` (:meth:`~splitlearn.core.optimizing.PartyOptimizer.clip_to`) and steps. With loss scaling too, the
same two messages carry both (``overflow`` and ``skip`` without a number: a skipped step clips nothing). A
party on no activation wire (one that only sends labels) takes no part. One number per party per step; the
loss scale aside, nothing is kept, so checkpoints hold nothing new. A party whose own norm is not finite stops
the run (its gradients are lost, and nothing non-finite travels).

A number is taken under the rules of a verdict, and only as ``repr`` writes a finite float >= 0 (at most 32
characters); the total a parent sends cannot be below the sum this party told it. So a hostile peer can make
the network's norm larger than it is (every party's step smaller, down to nothing: as it could withhold or
zero its gradient) or smaller, down to the sum this party told (less clipping: as it could send larger
gradients); it can never make a gradient larger than unclipped (the factor is at most 1), nor have a
non-finite or negative norm used, nor make a party step on gradients that overflowed.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from ..wire.codec import WireError, dtype_name, floating
from ..wire.messages import Kind, Message, quote
from .specs import PlanError

if TYPE_CHECKING:
    from ..wire.link import Link
    from .graph import Graph, Wire
    from .optimizing import PartyOptimizer
    from .step import Mode, StepState

__all__ = ["DTYPES", "FP16_DEVICES", "MIN_SCALE", "Place", "LossScale", "Precision", "loss_scaled", "agreement_tree"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a precision -> its autocast (and wire) dtype
FP16_DEVICES = frozenset({"cuda"})  # where fp16 may run (CPU autocast in float16 is slow and not what AMP is for)
MIN_SCALE = 2.0 ** -24  # a loss scale below this (float16's smallest step) stops the run
_UP, _DOWN = ("finite", "overflow"), ("step", "skip")  # a child's report, a parent's decision
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?(e[+-][0-9]+)?$")  # a sum of squared norms as repr writes it: >= 0, no nan
_HALF = (torch.float16, torch.bfloat16)


def loss_scaled(graph: Graph) -> bool:
    """Whether the plan's losses are scaled: some party computes in fp16."""
    return any(p.precision == "fp16" for p in graph.plan.parties.values())


@dataclass(frozen=True)
class Place:
    """A party's place in the tree that agrees on each optimizer step's overflow verdict."""

    parent: str | None = None
    children: tuple[str, ...] = ()
    edges: dict[str, str] = field(default_factory=dict)  # neighbour in the tree -> the wire its verdicts name


def agreement_tree(graph: Graph, every_wire: bool = False) -> dict[str, Place]:
    """Every party's place: a breadth-first tree over the parties linked by activation wires (each connected
    piece apart), rooted at the first party in plan order that receives no activation (it finishes its
    backward last, so deciding there waits least), else at the first; a party on no activation wire decides
    alone. ``every_wire``: linked by any wire, label wires too (the epoch verdicts of
    :mod:`~splitlearn.core.stopping`, which a party that only sends labels must hear as well)."""
    return dict(graph.derived(("agreement_tree", every_wire), lambda: _agreement_tree(graph, every_wire)))


def _agreement_tree(graph: Graph, every_wire: bool) -> dict[str, Place]:
    links: dict[str, dict[str, str]] = {}
    for w in sorted(graph.wires, key=lambda w: w.name):
        if every_wire or w.carries == "activation":
            links.setdefault(w.src_party, {}).setdefault(w.dst_party, w.name)
            links.setdefault(w.dst_party, {}).setdefault(w.src_party, w.name)
    order = [p for p in graph.parties if p in links]
    fed = {w.dst_party for w in graph.wires if w.carries == "activation"}
    parent: dict[str, str | None] = {}
    for root in sorted(order, key=lambda p: (p in fed, order.index(p))):
        if root in parent:
            continue
        parent[root], queue = None, [root]
        while queue:
            p = queue.pop(0)
            for q in sorted(links[p], key=order.index):
                if q not in parent:
                    parent[q] = p
                    queue.append(q)
    places = {p: Place() for p in graph.parties}
    for p in order:
        kids = tuple(q for q in order if parent[q] == p)
        near = {q: links[p][q] for q in (*([parent[p]] if parent[p] else []), *kids)}
        places[p] = Place(parent[p], kids, near)
    return places


class LossScale:
    """``torch.amp.GradScaler``'s scale and its rule, with its defaults: the scale halves after a step that
    overflowed and doubles after ``growth_interval`` steps in a row that did not. Written out because the
    verdict is the network's, not this party's: GradScaler decides from its own optimizers' checks only.
    ``state_dict`` has GradScaler's keys."""

    def __init__(self, scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = scale, growth_factor, backoff_factor
        self.growth_interval, self.tracker = growth_interval, 0

    def update(self, overflow: bool) -> None:
        """After an optimizer step (``overflow``: the network skipped it)."""
        if overflow:
            self.scale, self.tracker = self.scale * self.backoff_factor, 0
            return
        self.tracker += 1
        if self.tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            self.scale, self.tracker = (grown if math.isfinite(grown) else self.scale), 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scale, tracker = state.get("scale"), state.get("_growth_tracker")
        if type(scale) is not float or not 0 < scale < math.inf or type(tracker) is not int or tracker < 0:
            raise ValueError(f"not a loss scale's state: {state!r}")
        self.scale, self.tracker = scale, tracker
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]


class Precision:
    """One party's precision: its autocast, the dtypes of its wires, and its side of loss scaling.

    ``trains``: the party trains segments (an fp16 party that does must be on CUDA; a prediction may run its
    float16 autocast on the CPU); ``error``: what a party raises when it cannot go on (the engine's ``PartyError``)."""

    def __init__(self, graph: Graph, name: str, device: torch.device, link: Link, trains: bool,
                 error: type[Exception]):
        plan = graph.plan
        self.name, self.link, self.error = name, link, error
        self.kind = plan.parties[name].precision
        self.dtype = DTYPES.get(self.kind)
        self.device_type = device.type
        if self.kind == "fp16" and trains and device.type not in FP16_DEVICES:
            raise PlanError(f"party {name!r} computes on {device}, but fp16 needs CUDA (autocast with loss scaling)",
                            entry=f"parties.{name}.precision",
                            hint='use precision = "bf16" on the CPU, or put the party on a CUDA device')
        # activation wires whose sender autocasts: their dtype is the sender's
        self.wire_dtypes = {w.name: DTYPES[plan.parties[w.src_party].precision] for w in graph.wires
                            if w.carries == "activation" and plan.parties[w.src_party].precision in DTYPES}
        # what this float32 party takes upcast: received activations of a party that autocasts
        self.upcast = set() if self.dtype is not None else {w.src for w in graph.wires if w.dst_party == name
                                                            and w.name in self.wire_dtypes}
        self.scale = LossScale() if loss_scaled(graph) else None
        self.clip = plan.train.clip_grad_norm if plan.train.clip == "global" else None  # the network's max norm
        self.place = agreement_tree(graph)[name]
        self.settling: int | None = None  # the message step of the optimizer step whose verdict is pending
        self.settled = -1  # the last step settled (verdicts of it or earlier are duplicates)
        self.heard: dict[str, bool] = {}  # child -> its subtree overflowed
        self.norms: dict[str, float] = {}  # child -> its subtree's sum of squared gradient norms (global clip)
        self.decided: bool | None = None  # the parent's decision: skip
        self.total: float | None = None  # the parent's total of squared norms over the network (global clip)
        self.told = ""  # what this party told its parent of its subtree ("": nothing yet)
        self.told_sum = 0.0  # the sum of squared norms it told (the total it hears back cannot be less)
        self.flagged = False  # since its gradient group began, the party replaced a non-finite tensor it sent
        self.epochs: Any = None  # the epoch verdicts' agreement (splitlearn.core.stopping.EpochAgreement), if any

    # -- computing -----------------------------------------------------------------------------

    def autocast(self) -> ContextManager[Any]:
        """The party's autocast (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` under the party's autocast (a loss)."""
        with self.autocast():
            return fn(*args)

    def take_input(self, node: str, t: torch.Tensor) -> torch.Tensor:
        """A segment's input: a float32 party upcasts what an autocasting party sent it."""
        return t.float() if node in self.upcast and t.dtype in _HALF else t

    def to_wire(self, wire: Wire, t: torch.Tensor) -> torch.Tensor:
        """What the party sends on ``wire``: a floating activation in the party's dtype (differentiably)."""
        if wire.name in self.wire_dtypes and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    @staticmethod
    def plain(t: torch.Tensor) -> torch.Tensor:
        """Outputs as the metrics take them: on the CPU, 16-bit floats as float32."""
        t = t.detach().cpu()
        return t.float() if t.dtype in _HALF else t

    # -- the wire ------------------------------------------------------------------------------

    def agreed(self, wire_shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Wire shapes known beforehand (a dry run in float32), with the dtype of an autocasting sender."""
        for w, dtype in self.wire_dtypes.items():
            if w in wire_shapes and floating(wire_shapes[w][0]):
                wire_shapes[w] = (dtype_name(dtype), wire_shapes[w][1])
        return wire_shapes

    def check_dtype(self, msg: Message, wire: Wire, st: StepState) -> None:
        """A WireError for a handshake activation of another floating dtype than its sender's precision."""
        want = self.wire_dtypes.get(wire.name)
        enc = msg.tensors.get("t")
        if st.mode != "handshake" or msg.kind != Kind.ACTIVATION or want is None or enc is None:
            return
        if floating(enc.dtype) and enc.dtype != dtype_name(want):
            raise WireError(f"dtype {enc.dtype} where {dtype_name(want)} was agreed (party {quote(wire.src_party)} "
                            f"computes in {self.kind_of(wire)})")

    def kind_of(self, wire: Wire) -> str:
        return next(k for k, d in DTYPES.items() if d == self.wire_dtypes[wire.name])

    def seen(self, msg: Message, st: StepState, t: torch.Tensor) -> torch.Tensor:
        """What the checks of a received tensor see: a loss-scaled training gradient unscaled."""
        if self.scale is None or msg.kind != Kind.GRADIENT or st.mode != "train":
            return t
        return t * (1.0 / self.scale.scale)

    def finite(self, t: torch.Tensor, mode: Mode) -> torch.Tensor:
        """What a loss-scaled training step sends: zeros (and an overflow reported) in place of a non-finite tensor."""
        if self.scale is None or mode != "train" or not t.is_floating_point() or bool(torch.isfinite(t).all()):
            return t
        self.flagged = True
        return torch.zeros_like(t)

    def unscaled(self, fn: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """``fn`` (a wire's defenses) applied to a gradient as unscaled, the result scaled again."""
        if self.scale is None:
            return fn(grad)
        return (fn(grad.float() / self.scale.scale) * self.scale.scale).to(grad.dtype)

    @property
    def loss_scale(self) -> float:
        """What the party's losses are multiplied by before backward (1: not loss-scaled)."""
        return 1.0 if self.scale is None else self.scale.scale

    # -- the verdict of each optimizer step ----------------------------------------------------

    def begin(self, step: int, mode: Mode, first: bool, last: bool) -> None:
        """A step begins (``step``: its message step id); ``first``/``last``: it opens/closes its gradient group."""
        self.heard, self.norms, self.decided, self.total, self.told = {}, {}, None, None, ""
        self.settled = -1 if mode == "handshake" else self.settled  # a new session: nothing settled in it yet
        agrees = self.scale is not None or self.clip is not None
        self.settling = step if agrees and mode == "train" and last else None
        if mode != "train" or first:
            self.flagged = False

    def take(self, msg: Message) -> None:
        """A verdict from a neighbour in the tree (a CREDIT with a text), or it is refused naming why. An epoch's
        verdict (``best``/``stop``, :mod:`~splitlearn.core.stopping`) goes to that agreement."""
        if self.epochs is not None and self.epochs.owns(msg):
            self.epochs.take(msg)
            return
        problem = self._problem(msg)
        if problem == "":
            return  # a duplicate of a settled step's
        if problem is not None:
            self.link.refuse(msg.sender, problem, msg.step, msg.wire)
        elif msg.sender == self.place.parent:
            word, number = self._read(msg.text)
            self.decided, self.total = word == "skip", number
        else:
            word, number = self._read(msg.text)
            self.heard[msg.sender] = word == "overflow"
            if number is not None:
                self.norms[msg.sender] = number

    def _problem(self, msg: Message) -> str | None:
        edges = self.place.edges
        if msg.sender not in edges:
            if self.scale is None:
                return "no gradient norm is expected from it (it is no neighbour in this party's agreement tree)"
            return "no overflow verdict is expected from it (it is no neighbour in this party's loss-scaled network)"
        if msg.wire != edges[msg.sender] or msg.tensors:
            return f"a verdict names wire {edges[msg.sender]!r} and carries no tensor"
        if 0 <= msg.step <= self.settled:
            return ""
        if msg.step != self.settling:
            return f"a verdict for step {msg.step}, which this party is not settling"
        parent = msg.sender == self.place.parent
        problem = self._text_problem(msg.text, _DOWN if parent else _UP)
        if problem is not None:
            return problem
        if parent and not self.told:
            return "a decision before this party told its own verdict"
        if (self.decided is not None) if parent else (msg.sender in self.heard):
            return f"a second verdict for step {msg.step}"
        if parent and self.told == "overflow" and msg.text != "skip":
            return "a decision to step after this party reported an overflow"
        total = self._read(msg.text)[1] if parent else None
        if total is not None and total < self.told_sum:
            return (f"a total of squared gradient norms of {quote(msg.text.split(' ', 1)[1])} for the network, "
                    f"below the {self.told_sum!r} of this party's subtree alone")
        return None

    def _text_problem(self, text: str, words: tuple[str, str]) -> str | None:
        """Why a verdict's text is not one of ``words`` (with a global clip: the first with a number), or None.
        The number is a sum of squared norms: finite and >= 0, as ``repr`` writes a float."""
        if self.clip is None:
            return None if text in words else f"a verdict is one of {list(words)}, not {quote(text)}"
        accepted = [f"{words[0]} <sum of squared gradient norms>"] + ([words[1]] if self.scale is not None else [])
        word, _, number = text.partition(" ")
        if word != words[0] and not (self.scale is not None and text == words[1]):
            return f"a verdict is one of {accepted}, not {quote(text)}"
        if word == words[0] and not (len(number) <= 32 and _NUMBER.match(number) and math.isfinite(float(number))):
            return f"a verdict's number is a finite sum of squared gradient norms >= 0, not {quote(number)}"
        return None

    @staticmethod
    def _read(text: str) -> tuple[str, float | None]:
        """A checked verdict's word and number (None: it has none)."""
        word, _, number = text.partition(" ")
        return word, float(number) if number else None

    def waiting(self) -> list[str]:
        """The verdicts this party waits for (a timeout's message names them)."""
        if self.settling is None:
            return self.epochs.waiting() if self.epochs is not None else []
        what = "overflow verdict" if self.scale is not None else "gradient norm"
        out = [f"the {what} of {c}" for c in self.place.children if c not in self.heard]
        return out + ([f"the decision of {self.place.parent}"] if self.told and self.decided is None else [])

    def settle(self, optimizer: PartyOptimizer | None, receive: Callable[[], None]) -> bool:
        """After the backward of a step that closes its gradient group: whether the optimizer steps. A loss-scaled
        party unscales its gradients and agrees on the verdict with the network first (``receive`` takes the next
        message), then moves its scale; with a global clip the verdict carries the squared norms, and the party
        clips its gradients to the network's norm."""
        if self.settling is None:
            return optimizer is not None
        overflow = self.flagged or (self.scale is not None and self._unscale(optimizer))
        mine = overflow
        squares = self._squared_norm(optimizer) if self.clip is not None and not overflow else 0.0
        while not all(c in self.heard for c in self.place.children):
            receive()
        overflow = overflow or any(self.heard.values())
        squares += sum(self.norms.get(c, 0.0) for c in self.place.children)  # (in tree order: one sum everywhere)
        if self.place.parent is not None:
            self.told_sum, self.told = squares, self._verdict(_UP, overflow, squares)
            self._send(self.place.parent, self.told)
            while self.decided is None:
                receive()
            overflow, squares = self.decided, self.total if self.total is not None else 0.0
        for c in self.place.children:
            self._send(c, self._verdict(_DOWN, overflow, squares))
        self.settled, self.settling, self.flagged = self.settling, None, False
        if self.clip is not None and not overflow and optimizer is not None:
            optimizer.clip_to(self.clip, math.sqrt(squares))
        if self.scale is None:
            return optimizer is not None
        self.scale.update(overflow)
        if self.scale.scale < MIN_SCALE:
            who = [self.name] * mine + [c for c, bad in self.heard.items() if bad] \
                + ([self.place.parent] if self.decided else [])
            raise self.error(f"{self.name}: the loss scale fell to {self.scale.scale:g}: every step overflowed for "
                             f"long (reported by {', '.join(map(quote, who))}); fp16 training cannot go on")
        return optimizer is not None and not overflow

    def _unscale(self, optimizer: PartyOptimizer | None) -> bool:
        """Divide the party's gradients by the scale; whether any is not finite."""
        grads = [p.grad for p in (optimizer.parameters() if optimizer is not None else []) if p.grad is not None]
        if not grads:
            return False
        inv = 1.0 / self.scale.scale
        for g in grads:
            g.mul_(inv)
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _squared_norm(self, optimizer: PartyOptimizer | None) -> float:
        """This party's sum of squared gradient norms; it stops the run if it is not finite (nothing non-finite
        travels, and the network's norm would be lost)."""
        squares = optimizer.squared_norm() if optimizer is not None else 0.0
        if not math.isfinite(squares):
            raise self.error(f"{self.name}: its gradients' norm is not finite at step {self.settling}, so the "
                             "network's norm for clip = \"global\" cannot be computed; training cannot go on")
        return squares

    def _verdict(self, words: tuple[str, str], overflow: bool, squares: float) -> str:
        """A verdict's text: the word, and with a global clip a step's sum of squared norms (exact as repr)."""
        if overflow:
            return words[1]
        return words[0] if self.clip is None else f"{words[0]} {squares!r}"

    def _send(self, peer: str, verdict: str) -> None:
        self.link.send(Message(Kind.CREDIT, self.name, peer, self.settling, self.place.edges[peer], text=verdict))
