"""The transport interface: move bytes between named parties. Nothing else.

A transport knows who it is (``party``), sends a buffer to a party, and receives the next
buffer addressed to it together with the *authenticated* name of the party that sent it
(the in-process hub knows the caller; gRPC takes it from the peer's TLS certificate).
It also says, without waiting, whether a peer's stream is up (``is_connected``) and since when
it is down (``broken_since``), so a user need not wait for a peer that is still there.
Message parsing, checks and accounting live above it, in :class:`splitlearn.wire.link.Link`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Transport", "TransportError", "TransportClosed", "TransportTimeout", "PeerRestarted"]


class TransportError(RuntimeError):
    """The transport cannot deliver or receive."""


class TransportClosed(TransportError):
    """The transport was closed (locally or by the run being stopped)."""


class TransportTimeout(TransportError):
    """Nothing arrived within the timeout."""


class PeerRestarted(TransportClosed):
    """A peer came back as a new process: what it held (and what it was sent) is gone."""

    def __init__(self, peer: str, message: str):
        self.peer = peer
        super().__init__(message)


class Transport(ABC):
    party: str
    credentials: Any = None  # this party's own key and certificate where the transport authenticates peers by them

    @abstractmethod
    def send(self, dst: str, data: bytes) -> None:
        """Queue ``data`` for party ``dst``. Raises TransportError if ``dst`` is unreachable."""

    @abstractmethod
    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        """The next buffer for this party and the authenticated sender's name."""

    def is_connected(self, peer: str) -> bool:
        """Whether ``peer``'s stream is up now; never waits. False before it first connects, while
        its stream is broken (it may come back within ``reconnect_timeout``), after it left and after
        ``close()``. Raises TransportError for a party this transport has no link to. A transport
        that cannot tell (the default) says every peer is connected."""
        return self.broken_since(peer) is None

    def broken_since(self, peer: str) -> float | None:
        """``time.monotonic()`` when ``peer``'s stream last ended (broken, closed, or this transport
        closed) and has not come back since; None while it is up, and before it first connects."""
        return None

    def left(self, peer: str) -> bool:
        """Whether ``peer`` closed its end (said goodbye) and has not come back; never waits. A peer that left is
        not waited for as one whose stream broke. False for a transport that cannot tell (the default)."""
        return False

    def restarts(self, peer: str) -> int:
        """How many times ``peer`` came back as a new process (another incarnation) since this
        transport first heard from it; never waits. 0 for a transport that cannot tell (the default)."""
        return 0

    def take_messages(self) -> bool:
        """Ask to be handed messages whole from now on instead of bytes (in one process: nothing encoded); whether
        it will be. Only a transport every reader of which admits a message as a :class:`~splitlearn.wire.link.Link`
        does may say yes. The default: no, bytes only."""
        return False

    def takes_messages(self, dst: str) -> bool:
        """Whether party ``dst`` may be handed a message whole (else it is sent bytes). The default: no."""
        return False

    def close(self) -> None:
        """Release connections; later calls raise TransportClosed."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
