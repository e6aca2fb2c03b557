"""One physical connection, two readers: a schedule's commands and the engine's turns.

With horizontal clients, ``hospital-3`` plays the plan's ``hospital`` during its turns, and
between turns it waits for commands. :class:`Switch` sorts what arrives into *control*
messages (commands, acknowledgements, weights) and *session* messages (a turn's hello,
activations, gradients, goodbye, errors), so neither reader loses the other's messages when
they overtake each other on different streams (a relay's hello can reach a client before the
coordinator's command to start the turn).

:meth:`Switch.session` is the transport of one turn: it speaks as the plan party and renames
only the bound peer (plan name -> physical name on the way out, back on the way in), so a
message from ``hospital-5`` that claims to be ``hospital`` during ``hospital-3``'s turn still
arrives under its authenticated name and is refused by the link as an impersonation.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from .base import Transport, TransportTimeout

__all__ = ["Switch"]

MAX_HELD = 10_000  # messages kept for the other reader; beyond that the oldest are dropped


class Switch:
    """Sorts ``inner``'s messages with ``classify(data) -> "control" | "session" | None`` (None: stale, dropped)."""

    def __init__(self, inner: Transport, classify: Callable[[bytes], str]):
        self.inner, self.classify = inner, classify
        self.held: dict[str, deque] = {"control": deque(maxlen=MAX_HELD), "session": deque(maxlen=MAX_HELD)}

    def control(self) -> "_View":
        """The physical party's own view: commands, acknowledgements, weights."""
        return _View(self, "control", self.inner.party, {})

    def session(self, party: str, aliases: dict[str, str], keep: Callable[[str, bytes], bool]) -> "_View":
        """A turn's view as plan party ``party``; held session messages that ``keep(peer, data)``
        rejects (left over from an earlier turn) are dropped first."""
        held = self.held["session"]
        kept = [(p, d) for p, d in held if keep(p, d)]
        held.clear()
        held.extend(kept)
        return _View(self, "session", party, aliases)

    def _recv(self, kind: str, timeout: float | None) -> tuple[str, bytes]:
        if self.held[kind]:
            return self.held[kind].popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportTimeout(f"{self.inner.party}: nothing received within {timeout} s")
            peer, data = self.inner.recv(left)
            got = self.classify(data)
            if got == kind:
                return peer, data
            if got is not None:
                self.held[got].append((peer, data))


class _View(Transport):
    def __init__(self, switch: Switch, kind: str, party: str, aliases: dict[str, str]):
        self.switch, self.kind, self.party = switch, kind, party
        self._out = dict(aliases)
        self._in = {v: k for k, v in aliases.items()}

    def send(self, dst: str, data: bytes) -> None:
        self.switch.inner.send(self._out.get(dst, dst), data)

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        peer, data = self.switch._recv(self.kind, timeout)
        return self._in.get(peer, peer), data

    def close(self) -> None:  # the connection outlives a view
        pass
