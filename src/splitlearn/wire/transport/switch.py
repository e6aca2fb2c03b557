"""One physical connection, two readers: a schedule's commands and the engine's turns.

With horizontal clients, ``hospital-3`` plays the plan's ``hospital`` during its turns, and
between turns it waits for commands. :class:`Switch` sorts what arrives into *control*
messages (commands, acknowledgements, weights) and *session* messages (a turn's hello,
activations, gradients, goodbye, errors), so neither reader loses the other's messages when
they overtake each other on different streams (a relay's hello can reach a client before the
coordinator's command to start the turn).

:meth:`Switch.session` is the transport of one turn: it speaks as the plan party and renames
only the bound peer (plan name -> physical name on the way out, back on the way in), and it
reads only from the turn's peers: what ``hospital-5`` sends during ``hospital-3``'s turn waits
(and is dropped as stale when the next turn starts), so it can neither speak for
``hospital`` nor stop the turn. What waits is capped per sender.

Over an in-process hub the Switch takes messages handed over whole (:meth:`Switch.take_messages`) when its
readers are Links: ``classify``, ``keep``, ``defer`` and ``size`` are then given a message or bytes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

from .base import Transport, TransportTimeout

log = logging.getLogger("splitlearn.wire.transport.switch")

__all__ = ["Switch", "MAX_HELD_BYTES", "WATCH_S"]

MAX_HELD_BYTES = 256 * 2**20  # held for the other reader, per peer; beyond that a peer's messages are dropped
WATCH_S = 0.5  # a turn's read that waits looks this often whether a peer of the turn is gone (Switch.session)


class Switch:
    """Sorts ``inner``'s messages with ``classify(data) -> "control" | "session"``; ``size(data)``: the bytes
    a held one counts (without it: ``len``, and bytes only, never a message handed over whole)."""

    def __init__(self, inner: Transport, classify: Callable[[Any], str], size: Callable[[Any], int] | None = None):
        self.inner, self.classify, self.size, self._sizes = inner, classify, size or len, size is not None
        self.held: dict[str, deque] = {"control": deque(), "session": deque()}
        self.held_bytes: dict[str, int] = {}
        self.dropped = 0  # messages dropped because their sender had too much held
        self.whole = False  # messages handed over whole (take_messages)

    def take_messages(self) -> bool:
        """Messages handed over whole from now on, where the connection can (its readers must be Links)."""
        self.whole = self.whole or (self._sizes and self.inner.take_messages())
        return self.whole

    def control(self) -> "_View":
        """The physical party's own view: commands, acknowledgements, weights."""
        return _View(self, "control", self.inner.party, {}, None)

    def session(self, party: str, aliases: dict[str, str], keep: Callable[[str, bytes], bool],
                peers: set[str], defer: Callable[[str, bytes], bool] | None = None,
                watch: Callable[[], None] | None = None) -> "_View":
        """A turn's view as plan party ``party`` with the physical ``peers`` of the turn: messages
        from anybody else wait for a later turn, as do those ``defer(peer, data)`` says belong to
        one (the next turn's hello, which can come while this turn says goodbye). Held session
        messages that ``keep(peer, data)`` rejects (left over from an earlier turn) are dropped first.
        ``watch()``: called every :data:`WATCH_S` seconds a read waits without a message; it raises
        (a TransportError) to end the wait, where a peer of the turn is gone."""
        held = self.held["session"]
        for p, d in [(p, d) for p, d in held if not keep(p, d)]:
            held.remove((p, d))
            self.held_bytes[p] -= self.size(d)
        return _View(self, "session", party, aliases, frozenset(peers), defer, watch)

    def _hold(self, kind: str, peer: str, data: Any) -> None:
        size = self.size(data)
        if self.held_bytes.get(peer, 0) + size > MAX_HELD_BYTES:
            self.dropped += 1
            log.warning("%s: dropped a message from %s: %d bytes of its messages are waiting already",
                        self.inner.party, peer, self.held_bytes.get(peer, 0))
            return
        self.held[kind].append((peer, data))
        self.held_bytes[peer] = self.held_bytes.get(peer, 0) + size

    def _take(self, kind: str, peers: frozenset | None, defer=None) -> tuple[str, bytes] | None:
        for item in self.held[kind]:
            if (peers is None or item[0] in peers) and not (defer is not None and defer(*item)):
                self.held[kind].remove(item)
                self.held_bytes[item[0]] -= self.size(item[1])
                return item
        return None

    def _recv(self, kind: str, timeout: float | None, peers: frozenset | None, defer=None,
              watch: Callable[[], None] | None = None) -> tuple[str, bytes]:
        item = self._take(kind, peers, defer)
        if item is not None:
            return item
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportTimeout(f"{self.inner.party}: nothing received within {timeout} s")
            if watch is None:
                peer, data = self.inner.recv(left)
            else:  # in slices: between them, whether a peer of the turn is gone
                try:
                    peer, data = self.inner.recv(WATCH_S if left is None else min(left, WATCH_S))
                except TransportTimeout:
                    watch()
                    continue
            got = self.classify(data)
            if got == kind and (peers is None or peer in peers) and not (defer is not None and defer(peer, data)):
                return peer, data
            self._hold(got, peer, data)


class _View(Transport):
    def __init__(self, switch: Switch, kind: str, party: str, aliases: dict[str, str], peers: frozenset | None,
                 defer: Callable[[str, bytes], bool] | None = None, watch: Callable[[], None] | None = None):
        self.switch, self.kind, self.party, self.peers, self.defer = switch, kind, party, peers, defer
        self.watch = watch
        self._out = dict(aliases)
        self._in = {v: k for k, v in aliases.items()}
        self.credentials = switch.inner.credentials  # the connection's own

    def send(self, dst: str, data: Any) -> None:
        self.switch.inner.send(self._out.get(dst, dst), data)

    def take_messages(self) -> bool:
        return self.switch.take_messages()

    def takes_messages(self, dst: str) -> bool:
        return self.switch.whole and self.switch.inner.takes_messages(self._out.get(dst, dst))

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        peer, data = self.switch._recv(self.kind, timeout, self.peers, self.defer, self.watch)
        return self._in.get(peer, peer), data

    def is_connected(self, peer: str) -> bool:
        return self.switch.inner.is_connected(self._out.get(peer, peer))

    def broken_since(self, peer: str) -> float | None:
        return self.switch.inner.broken_since(self._out.get(peer, peer))

    def close(self) -> None:  # the connection outlives a view
        pass
