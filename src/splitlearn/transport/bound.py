"""Letting a physical party play a party of the plan for one turn: renaming at the transport.

With horizontal clients, ``hospital-3`` plays the plan's ``hospital`` while it trains. The
engine keeps talking about ``hospital``; :class:`Bound` maps that name to the physical peer
on the way out and back on the way in. Only the bound peer is renamed, so a message from
``hospital-5`` that claims to be ``hospital`` during ``hospital-3``'s turn still arrives under
its authenticated name and is refused by the link as an impersonation.
"""

from __future__ import annotations

from .base import Transport

__all__ = ["Bound"]


class Bound(Transport):
    """``inner`` seen as plan party ``party``, with ``aliases`` (plan name -> physical name)."""

    def __init__(self, inner: Transport, party: str, aliases: dict[str, str]):
        self.inner, self.party = inner, party
        self._out = dict(aliases)
        self._in = {v: k for k, v in aliases.items()}

    def send(self, dst: str, data: bytes) -> None:
        self.inner.send(self._out.get(dst, dst), data)

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        peer, data = self.inner.recv(timeout)
        return self._in.get(peer, peer), data

    def close(self) -> None:  # the inner transport outlives the turn
        pass
