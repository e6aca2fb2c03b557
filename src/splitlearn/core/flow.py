"""Flow control: no party runs more than a bounded window of steps ahead of a party that consumes its messages.

A producer that hears from a consumer in every step of a mode (a gradient back in training, an
activation of the same step) cannot run ahead of it. One that does not, in some mode, is *gated*
in that mode: a label-only party (it sends labels and never hears back), one whose every wire to
the consumer carries an integer tensor (a mask, token ids: no gradient comes back, see
:func:`graded`), and any sender in evaluation or prediction. Whether a wire carries a gradient
follows its dtype, agreed at the handshake, which both ends of it know: both derive the same
pairs from it (:class:`FlowControl` derives them again once the dtypes are agreed).

Before a gated step ``t`` a producer waits until it knows the consumer finished step
``t - window`` or later. It knows that from any step-tagged message of the consumer (a message of
step ``s`` is sent during step ``s``) and from the consumer's CREDIT messages: after each step
``s`` with ``s % every == every - 1`` of a mode in which the pair is gated, the consumer tells the
producer it finished ``s``. The rhythm depends only on the step ids and modes, which every party
shares, so a resumed run sends exactly the credits of a run never stopped, and
``every <= window // 2`` puts a credit in every window: no party waits forever.

``window`` is half of what the consumer would keep early from the producer (``Limits.early_steps``,
and ``Limits.early_messages`` over the producer's wires to it), so a legitimate producer never
meets those limits, which keep refusing whatever a hostile peer sends beyond them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..wire.codec import floating
from ..wire.messages import Limits, Message
from .graph import Graph, Wire

__all__ = ["Pair", "FlowControl", "flow_pairs", "graded", "MODES"]

MODES = ("train", "eval", "predict")  # the handshake is one step: never gated, never credited


@dataclass(frozen=True)
class Pair:
    """A producer and a consumer of its forward messages that needs credits in ``gated`` modes."""

    producer: str
    consumer: str
    wire: str  # the wire a credit names (the first of the producer's wires to the consumer)
    gated: frozenset[str]  # modes in which the producer sends to the consumer and hears nothing back
    window: int  # steps the producer may be ahead of the last step it knows the consumer finished
    every: int  # the consumer credits the steps s with s % every == every - 1


def _used(w: Wire, mode: str) -> bool:
    """Whether a forward wire carries a message in a step of ``mode`` (label wires: not in prediction)."""
    return not (w.carries == "label" and mode == "predict")


def graded(wire: Wire, dtype: str | None) -> bool:
    """Whether a gradient travels back on ``wire`` in training: an activation of a floating dtype (``dtype``: the
    agreed one, as the handshake names it; None: not agreed yet, taken as floating), or a secure sum's masked input
    (int64 on the wire, the sum's gradient back: :mod:`~splitlearn.core.securesum`). An integer tensor (a mask,
    token ids) and a label carry none. The one rule of both ends (:meth:`~splitlearn.core.engine.Party._graded`)."""
    return wire.carries == "activation" and (wire.masked or dtype is None or floating(dtype))


def flow_pairs(graph: Graph, limits: Limits, dtypes: Mapping[str, str] | None = None) -> list[Pair]:
    """Every (producer, consumer) pair gated in some mode, with its window and credit rhythm; ``dtypes``: the
    agreed dtype of each wire known (a training pair hears back only if one of its wires is :func:`graded`)."""
    dtypes = dtypes or {}
    return list(graph.derived(("flow_pairs", limits, tuple(sorted(dtypes.items()))),
                              lambda: _flow_pairs(graph, limits, dtypes)))


def _flow_pairs(graph: Graph, limits: Limits, dtypes: Mapping[str, str]) -> list[Pair]:
    pairs = []
    for producer, consumer in sorted({(w.src_party, w.dst_party) for w in graph.wires}):
        out = [w for w in graph.wires if (w.src_party, w.dst_party) == (producer, consumer)]
        back = [w for w in graph.wires if (w.src_party, w.dst_party) == (consumer, producer)]
        gated = frozenset(m for m in MODES if any(_used(w, m) for w in out)
                          and not any(_used(w, m) for w in back)
                          and not (m == "train" and any(graded(w, dtypes.get(w.name)) for w in out)))
        if gated:
            window = max(1, min(limits.early_steps, limits.early_messages // len(out)) // 2)
            pairs.append(Pair(producer, consumer, sorted(w.name for w in out)[0], gated, window,
                              max(1, window // 2)))
    return pairs


class FlowControl:
    """One party's side of flow control: what it knows of its consumers, which credits it owes."""

    def __init__(self, graph: Graph, party: str, limits: Limits,
                 agreed: Mapping[str, tuple[str, tuple[int, ...]]] | None = None):
        """``agreed``: the party's live map of wire -> (dtype, row shape), filled by the handshake (both ends of a
        wire: the sender with what it sent, the receiver with what it took); the pairs follow its dtypes."""
        self.graph, self.party, self.limits = graph, party, limits
        self.agreed = agreed if agreed is not None else {}
        self.mine = sorted(w.name for w in graph.wires if party in (w.src_party, w.dst_party))
        self._key: tuple | None = None
        self._out: dict[str, Pair] = {}
        self._owed: list[Pair] = []
        self.known: dict[str, int] = {}  # consumer -> the last step it is known to have reached
        self.unread: dict[str, list[int]] = {}  # consumer -> steps done whose credit has not come yet
        self.first = True  # the next step after the handshake is the session's first

    def _derive(self) -> None:
        """The pairs again if a dtype of this party's wires was agreed since (the handshake)."""
        key = tuple(map(self.agreed.get, self.mine))  # (looked at before every step: no generator)
        if key != self._key:
            self._key = key
            pairs = flow_pairs(self.graph, self.limits, {w: a[0] for w, a in zip(self.mine, key) if a is not None})
            self._out = {p.consumer: p for p in pairs if p.producer == self.party}
            self._owed = [p for p in pairs if p.consumer == self.party]

    @property
    def out(self) -> dict[str, Pair]:
        """The consumers that gate this party, by name."""
        self._derive()
        return self._out

    @property
    def owed(self) -> list[Pair]:
        """The pairs whose producer this party credits."""
        self._derive()
        return self._owed

    def begin_session(self) -> None:
        """A handshake: what was known belongs to an earlier session."""
        self.known.clear()
        self.unread.clear()
        self.first = True

    def begin_step(self, step: int, mode: str) -> None:
        """Before a step: on the session's first (after a resume, any step), every party starts there."""
        if self.first:
            self.first = False
            for c in self.out:
                self.known[c] = max(self.known.get(c, -1), step - 1)
        for c, p in self.out.items():
            if mode in p.gated and step % p.every == p.every - 1:
                self.unread.setdefault(c, []).append(step)

    def credited(self, peer: str, step: int) -> None:
        """A credit of ``step`` came from ``peer`` (credits come in order: earlier ones came before)."""
        self.heard(peer, step)
        if peer in self.unread:
            self.unread[peer] = [s for s in self.unread[peer] if s > step]

    def heard(self, peer: str, step: int) -> None:
        """A message of ``step`` (a training step id) came from ``peer``: it reached that step."""
        if peer in self.out and step > self.known.get(peer, -1):
            self.known[peer] = step

    def blocked(self, step: int, mode: str) -> list[str]:
        """The consumers this party must hear from before it runs ``step``."""
        return [c for c, p in self.out.items() if mode in p.gated and self.known.get(c, -1) < step - p.window]

    def credits(self, step: int, mode: str) -> list[Pair]:
        """The pairs whose producer this party credits once it finished ``step``."""
        return [p for p in self.owed if mode in p.gated and step >= 0 and step % p.every == p.every - 1]

    def credit_problem(self, msg: Message) -> str | None:
        """Why a CREDIT message is not one this party expects (None: it is)."""
        pair = self.out.get(msg.sender)
        if pair is None:
            return "no credit is expected from it (it consumes nothing this party sends without answering)"
        if msg.wire != pair.wire:
            return f"a credit from it names wire {pair.wire!r}"
        if msg.tensors or msg.text or msg.step < 0:
            return "a credit is a step id and a wire name, nothing else"
        return None
