"""Transports move bytes between parties; see :mod:`.base` for the interface."""

from .base import PeerRestarted, Transport, TransportClosed, TransportError, TransportTimeout
from .inprocess import InProcessHub, InProcessTransport

__all__ = ["PeerRestarted", "Transport", "TransportError", "TransportClosed", "TransportTimeout", "InProcessHub", "InProcessTransport"]
