"""In-process transport: one inbox per party, for simulations and tests.

An inbox is a :class:`~splitlearn.wire.transport.turns.Mailbox`: a party run as a task of
:class:`~splitlearn.wire.transport.turns.Turns` (the thread launcher's parties) yields its turn while it waits for
a message; a party in a thread of its own blocks as on a queue.

Besides bytes it carries a message handed over whole (:func:`~splitlearn.wire.messages.handed_over`: no encoding,
one copy of each tensor) to a party that takes messages (:meth:`InProcessTransport.take_messages`: its
:class:`~splitlearn.wire.link.Link` reads this transport, and whatever else reads it must take a message as a
:class:`~splitlearn.wire.link.Link` does); any other party gets bytes."""

from __future__ import annotations

import threading
import time
from typing import Any

from .base import Transport, TransportClosed, TransportError, TransportTimeout
from .turns import Empty, Mailbox

__all__ = ["InProcessHub", "InProcessTransport"]

_CLOSED = object()


class InProcessHub:
    """Connects the parties of one process. ``hub.transport(name)`` is that party's end."""

    def __init__(self, parties: list[str]):
        self._queues: dict[str, Mailbox] = {p: Mailbox() for p in parties}
        self._closed = threading.Event()
        self._left: dict[str, float] = {}  # party -> when it closed its end (time.monotonic())
        self._closed_at: float | None = None
        self._whole: set[str] = set()  # parties that take messages handed over whole

    def transport(self, party: str) -> "InProcessTransport":
        if party not in self._queues:
            raise TransportError(f"party {party!r} is not part of this hub ({sorted(self._queues)})")
        return InProcessTransport(self, party)

    def queued(self, party: str) -> int:
        """How many buffers sent to ``party`` it has not received yet (a closed end's mark counts as one)."""
        if party not in self._queues:
            raise TransportError(f"party {party!r} is not part of this hub ({sorted(self._queues)})")
        return self._queues[party].qsize()

    def close(self) -> None:
        """Stop every party: their pending and later ``recv`` calls raise TransportClosed."""
        self._closed_at = self._closed_at or time.monotonic()
        self._closed.set()
        for q in self._queues.values():
            q.put(_CLOSED)


class InProcessTransport(Transport):
    def __init__(self, hub: InProcessHub, party: str):
        self.hub, self.party = hub, party

    def send(self, dst: str, data: Any) -> None:
        """Queue ``data`` for ``dst``: bytes (kept as they are now), or a message handed over whole to a party
        that takes messages (:meth:`takes_messages`)."""
        if self.hub._closed.is_set():
            raise TransportClosed("the in-process hub is closed")
        if dst not in self.hub._queues:
            raise TransportError(f"no party {dst!r} to send to")
        if dst in self.hub._left:  # (its end will read nothing again: nothing is kept for it)
            raise TransportError(f"{dst} closed its connection")
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        elif dst not in self.hub._whole:
            raise TransportError(f"{dst!r} takes bytes, not a message handed over whole")
        self.hub._queues[dst].put((self.party, data))

    def take_messages(self) -> bool:
        """From now on this party may be handed messages whole: its readers (a Link, or a Switch whose readers are
        Links) admit them. Not a subclass's: it may read or change the bytes (a test's hostile peer)."""
        if type(self) is not InProcessTransport:
            return False
        self.hub._whole.add(self.party)
        return True

    def takes_messages(self, dst: str) -> bool:
        """Whether ``dst`` may be handed a message whole (else it is sent bytes)."""
        return dst in self.hub._whole

    def close(self) -> None:
        """This party's end only: its pending and later ``recv`` calls raise TransportClosed."""
        self.hub._left.setdefault(self.party, time.monotonic())
        self.hub._queues[self.party].put(_CLOSED)

    def left(self, peer: str) -> bool:
        """Whether ``peer`` closed its end (see :class:`~.base.Transport`)."""
        return self.broken_since(peer) is not None and peer in self.hub._left

    def broken_since(self, peer: str) -> float | None:
        """When ``peer`` closed its end, or the hub was closed; None while both are open."""
        if peer not in self.hub._queues:
            raise TransportError(f"no party {peer!r} in this hub")
        return self.hub._left.get(peer, self.hub._closed_at)

    def recv(self, timeout: float | None = None) -> tuple[str, Any]:
        """The next buffer (or, for a party that takes messages, message) and its sender."""
        try:
            item = self.hub._queues[self.party].get(timeout=timeout)
        except Empty:
            raise TransportTimeout(f"{self.party}: nothing received within {timeout} s") from None
        if item is _CLOSED:
            self.hub._queues[self.party].put(_CLOSED)  # keep later calls closed too
            raise TransportClosed("the in-process hub is closed")
        return item
