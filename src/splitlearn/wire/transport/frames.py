"""The resumable link under :class:`~splitlearn.wire.transport.grpc.GrpcTransport`: its frames, and
what one side keeps of a peer so that a stream that breaks can go on where it stopped.

Frames carry a sequence number per direction: ``D`` + seq + bytes (data), and the receiver
acknowledges them with ``A`` + seq (all frames up to seq: before the next frame it sends that peer, or after
:data:`ACK_EVERY` frames or :data:`ACK_BYTES` bytes), dropping those it already has. Each new stream begins with
a SYNC: ``S`` + the sender's incarnation + the receiver's incarnation as the sender knows it +
the last seq it received from that incarnation, so both sides know where to go on (a count
meant for an earlier process of the receiver acknowledges nothing). What is not acknowledged is
kept, at most :data:`MAX_UNACKED_BYTES` per peer, and sent again on the peer's next SYNC.
"""

from __future__ import annotations

import struct
from collections import deque

__all__ = ["DATA", "ACK", "SYNC", "SEQ", "NOBODY", "SYNC_BYTES", "MAX_UNACKED_BYTES", "ACK_EVERY", "ACK_BYTES",
           "PeerState", "sync_frame", "data_frame", "ack_frame"]

DATA, ACK, SYNC = b"D", b"A", b"S"
SEQ = struct.Struct("<Q")
NOBODY = bytes(8)  # in a SYNC: the peer's incarnation is not known yet
SYNC_BYTES = 1 + 8 + 8 + SEQ.size  # kind, two incarnations, a seq
MAX_UNACKED_BYTES = 1 << 30  # what a party keeps for a peer that has not acknowledged it
# a receiver acknowledges with the next frame it sends the peer, or once this many frames or bytes came unacknowledged
# (an ACK only lets the sender drop what it keeps: one a frame was a frame more each way for every message)
ACK_EVERY, ACK_BYTES = 16, 8 << 20


def sync_frame(ours: bytes, theirs: bytes | None, received: int) -> bytes:
    """The SYNC that begins a stream: our incarnation, the peer's (as far as we know it) and the
    last seq we received from it."""
    return SYNC + ours + (theirs or NOBODY) + SEQ.pack(received)


def data_frame(seq: int, data: bytes) -> bytes:
    return DATA + SEQ.pack(seq) + data


def ack_frame(seq: int) -> bytes:
    return ACK + SEQ.pack(seq)


class PeerState:
    """One peer's side of the resumable link: sequence numbers both ways, what is not acknowledged."""

    def __init__(self) -> None:
        self.sent = 0  # last seq assigned to a frame for the peer
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.unacked_bytes = 0
        self.received = 0  # last seq delivered from the peer
        self.acked = 0  # the last seq of the peer's we acknowledged (an ACK, or our SYNC)
        self.owed = 0  # bytes of the peer's received since
        self.incarnation: bytes | None = None  # the peer's, from its first SYNC
        self.lost_at: float | None = None  # when its stream broke and may come back (None: connected, or never)
        self.lost_why = ""
        self.down_at: float | None = None  # when its stream last ended, broken or closed (None: up, or never)
        self.said_bye = False  # its stream ended with its goodbye (it closed its end), and it has not come back
        self.synced = False  # its SYNC came on the current stream: frames may go out
        self.gone = False  # it did not come back in time
        self.waiting = False  # a thread waits for it to come back (one at most: see GrpcTransport._await_return)
        self.restarts = 0  # times it came back with another incarnation (a new process)

    def opened(self) -> int:
        """A new stream: not synced yet, no goodbye; its SYNC acknowledges what came (the count, returned)."""
        self.synced = self.said_bye = False
        self.acked, self.owed = self.received, 0
        return self.received

    def forget(self) -> None:
        """The peer came back as a new process: both ways start from scratch."""
        self.sent = self.received = self.unacked_bytes = self.acked = self.owed = 0
        self.unacked.clear()

    def took(self, seq: int, n: int) -> bool:
        """Frame ``seq`` of the peer's (``n`` bytes) was delivered: whether to acknowledge it at once, with
        :data:`ACK_EVERY` frames or :data:`ACK_BYTES` bytes unacknowledged (else the next frame sent it does)."""
        self.received, self.owed = seq, self.owed + n
        if seq - self.acked < ACK_EVERY and self.owed < ACK_BYTES:
            return False
        self.acked, self.owed = seq, 0
        return True

    def owing(self) -> int | None:
        """The last seq of the peer's to acknowledge before a frame is sent it (None: all are)."""
        if self.received <= self.acked:
            return None
        self.acked, self.owed = self.received, 0
        return self.received

    def ack(self, upto: int) -> None:
        while self.unacked and self.unacked[0][0] <= upto:
            self.unacked_bytes -= len(self.unacked.popleft()[1])
