"""A party's messaging: encode, meter and send; receive, authenticate, decode and meter."""

from __future__ import annotations

import logging
import time

from .codec import WireError
from .messages import Kind, Limits, Message, encode, handed_over, parsed, quote, wire_size
from .metering import Meter
from .transport.base import Transport, TransportTimeout

__all__ = ["Link", "MAX_KEPT", "MAX_REASON"]

log = logging.getLogger("splitlearn.wire.link")

_DIRECTION = {Kind.ACTIVATION: "forward", Kind.GRADIENT: "backward", Kind.WEIGHTS: "weights",
              Kind.CREDIT: "credit"}  # credits: flow control (core/flow.py), metered like every message
MAX_KEPT = 100
MAX_REASON = 600  # characters of a refusal kept, logged and sent back


class Link:
    """Wraps a :class:`Transport` for one party. Refused messages are logged and kept in ``refused``.

    ``limits`` bound what a peer can make this party hold (see :class:`~splitlearn.wire.messages.Limits`).
    """

    def __init__(self, transport: Transport, meter: Meter | None = None, limits: Limits | None = None):
        self.transport = transport
        self.party = transport.party
        self.meter = meter or Meter(self.party)
        self.limits = limits or Limits()
        self.refused: list[str] = []  # the first MAX_KEPT refusals; refused_count counts them all
        self.refused_count = 0
        # in one process: messages handed over, not encoded (never to a wrapper that is no Transport of its own: one
        # forwarding attribute lookups would answer for the transport it wraps, and read the bytes itself)
        self.whole = isinstance(transport, Transport) and transport.take_messages()

    def send(self, msg: Message) -> None:
        """Meter ``msg`` at the bytes the wire carries and send it: encoded, or in one process handed over whole
        to a party that takes it so (no encoding; each tensor copied once, into memory the receiver owns, or one the
        sender lent, :class:`~splitlearn.wire.codec.Lent`, handed over as it is)."""
        if self.whole and self.transport.takes_messages(msg.receiver):
            whole = handed_over(msg)
            self.meter.on_send(msg.wire, _DIRECTION.get(msg.kind, "control"), wire_size(whole), msg.payload_bytes)
            self.transport.send(msg.receiver, whole)
            return
        data = encode(msg)
        self.meter.on_send(msg.wire, _DIRECTION.get(msg.kind, "control"), len(data), msg.payload_bytes)
        self.transport.send(msg.receiver, data)

    def refuse(self, peer: str, reason: str, step: int = 0, wire: str = "") -> None:
        """Record and log a refused message and tell the peer why; the party keeps running.

        Every string that came from the peer is quoted cut short (:func:`~splitlearn.wire.messages.quote`),
        so a refusal costs this party a bounded amount whatever the peer sent."""
        text = f"{self.party} refused a message from {quote(peer)}" + (f" on wire {quote(wire)}" if wire else "") \
            + f": {reason}"
        if len(text) > MAX_REASON:
            text = text[:MAX_REASON] + "..."
        self.refused_count += 1
        if self.refused_count > MAX_KEPT:  # a flooding peer: count it, but neither log nor answer every message
            return
        log.warning(text)
        self.refused.append(text)
        try:
            self.transport.send(peer, encode(Message(Kind.ERROR, self.party, peer, step, wire[:self.limits.name_chars], text=text)))
        except Exception:  # the peer may be gone or may not exist; refusing must not fail
            pass

    def admit(self, peer: str, data: bytes | Message) -> Message | None:
        """Decode a buffer from the authenticated ``peer`` (or check a message handed over whole in this process,
        against the same limits) and check who it claims to be from and for; None (after refusing it) when it is
        malformed, oversized or impersonating."""
        size = wire_size(data)
        try:
            msg = parsed(data, self.limits, size)
        except WireError as e:
            self.refuse(peer, str(e), e.step, e.wire)
            return None
        if msg.sender != peer:
            self.refuse(peer, f"it claims to come from {quote(msg.sender)} but the authenticated sender is "
                        f"{quote(peer)}", msg.step, msg.wire)
            return None
        if msg.receiver != self.party:
            self.refuse(peer, f"it is addressed to {quote(msg.receiver)}", msg.step, msg.wire)
            return None
        self.meter.on_recv(msg.wire, _DIRECTION.get(msg.kind, "control"), size, msg.payload_bytes)
        return msg

    def recv(self, timeout: float | None = None, *, deadline: float | None = None) -> Message:
        """The next acceptable message; malformed or impersonating ones are refused and skipped.

        ``timeout`` (seconds from now) or ``deadline`` (``time.monotonic()``) bounds the whole
        call, however many refused messages arrive meanwhile: raises TransportTimeout then."""
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportTimeout(f"{self.party}: no acceptable message within the time allowed")
            with self.meter.timed("wait"):
                peer, data = self.transport.recv(left)
            msg = self.admit(peer, data)
            if msg is not None:
                return msg
