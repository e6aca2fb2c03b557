"""A party's messaging: encode, meter and send; receive, authenticate, decode and meter."""

from __future__ import annotations

import logging

from .codec import WireError
from .messages import Kind, Message, decode, encode
from .metering import Meter
from .transport.base import Transport

__all__ = ["Link"]

log = logging.getLogger("splitlearn.link")

_DIRECTION = {Kind.ACTIVATION: "forward", Kind.GRADIENT: "backward", Kind.WEIGHTS: "weights"}
MAX_KEPT = 100


class Link:
    """Wraps a :class:`Transport` for one party. Refused messages are logged and kept in ``refused``."""

    def __init__(self, transport: Transport, meter: Meter | None = None):
        self.transport = transport
        self.party = transport.party
        self.meter = meter or Meter(self.party)
        self.refused: list[str] = []  # the first MAX_KEPT refusals; refused_count counts them all
        self.refused_count = 0

    def send(self, msg: Message) -> None:
        data = encode(msg)
        self.meter.on_send(msg.wire, _DIRECTION.get(msg.kind, "control"), len(data), msg.payload_bytes)
        self.transport.send(msg.receiver, data)

    def refuse(self, peer: str, reason: str, step: int = 0, wire: str = "") -> None:
        """Record and log a refused message and tell the peer why; the party keeps running."""
        text = f"{self.party} refused a message from {peer!r}" + (f" on wire {wire!r}" if wire else "") + f": {reason}"
        self.refused_count += 1
        if self.refused_count > MAX_KEPT:  # a flooding peer: count it, but neither log nor answer every message
            return
        log.warning(text)
        self.refused.append(text)
        try:
            self.transport.send(peer, encode(Message(Kind.ERROR, self.party, peer, step, wire, text=text)))
        except Exception:  # the peer may be gone or may not exist; refusing must not fail
            pass

    def recv(self, timeout: float | None = None) -> Message:
        """The next acceptable message; malformed or impersonating ones are refused and skipped."""
        while True:
            with self.meter.timed("wait"):
                peer, data = self.transport.recv(timeout)
            try:
                msg = decode(data)
            except WireError as e:
                self.refuse(peer, str(e), e.step, e.wire)
                continue
            if msg.sender != peer:
                self.refuse(peer, f"it claims to come from {msg.sender!r} but the authenticated sender is {peer!r}",
                            msg.step, msg.wire)
                continue
            if msg.receiver != self.party:
                self.refuse(peer, f"it is addressed to {msg.receiver!r}", msg.step, msg.wire)
                continue
            self.meter.on_recv(msg.wire, _DIRECTION.get(msg.kind, "control"), len(data), msg.payload_bytes)
            return msg
