"""gRPC transport: one bidirectional stream (``/splitlearn.v1.SplitLearning/Connect``) per pair
of parties, mutually authenticated with TLS.

Raw bytes go over the stream (no (de)serialiser here): they are serialised ``Envelope``\\ s, parsed and checked
above, in :class:`splitlearn.wire.link.Link`. Who sent a buffer:

* the listening side takes the peer's name from the CN of its client certificate, which must be signed by the
  CA (``require_client_auth``); names not in ``accept``, or already connected, are refused with PERMISSION_DENIED
  and the server keeps serving; a certificate :class:`~.tls.PeerCheck` refuses (expired, revoked), UNAUTHENTICATED
  (and waiting for that peer ends); a process of another run (``x-splitlearn-run``) is turned away and dials again;
* the dialing side checks the listener's certificate against the CA with the expected peer name as TLS target
  name, so the peer it dialed is the peer it talks to, and by ``PeerCheck`` before it opens a stream.
Without credentials (insecure mode) the dialer states its name in the ``x-splitlearn-party`` header and the
listener believes it: nothing is authenticated or encrypted then.

``close()`` sends an empty frame (goodbye; never a valid message) on every stream, flushes and ends them. When a
peer's stream ends without a goodbye (error, cancellation, process killed), ``recv`` raises :class:`TransportClosed`
right after that peer's earlier buffers. After a goodbye it does so only once no other peer is still connected, so a
party still finishing with a third party is not stopped by a neighbour that is done (the runner's goodbye phase).

With ``reconnect_timeout`` a stream that breaks is not the end: the dialing side dials again with backoff, the
listening side takes the peer back, and what was sent meanwhile, or sent and not acknowledged before the break, is
sent again (the frames: :mod:`.frames`). A peer that does not come back within the timeout is lost
(:class:`TransportClosed`, naming it); one that comes back as a new process (another incarnation) starts its streams
from scratch and is reported as :class:`~splitlearn.wire.transport.base.PeerRestarted`. One thread per dialed peer
dials and dials again; at most one per peer waits for it to come back (a reconnect flood cannot pile threads up).
``is_connected``, ``broken_since`` and ``left`` (its goodbye) say where a peer stands without waiting;
``wait_broken(peer, timeout)`` waits for its stream to break. The link protocol's three events on one stream
(``stream_opened``, ``sync_received``, ``stream_ended``) are public methods the gRPC streams call: the protocol can
be driven and checked without gRPC.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from .base import PeerRestarted, Transport, TransportClosed, TransportError, TransportTimeout
from .frames import ACK, DATA, MAX_UNACKED_BYTES, SEQ, SYNC, SYNC_BYTES, PeerState, ack_frame, data_frame, sync_frame
from .grpc_channels import (METHOD, PARTY_HEADER, RUN_HEADER, bind, channel_options, dial_channel, make_server,
                            peer_name, why)
from .tls import UNREACHED, Credentials, PeerCheck

__all__ = ["GrpcTransport"]

log = logging.getLogger("splitlearn.wire.transport.grpc")

_END = object()  # in an outgoing queue: finish that stream
_BYE = b""  # sent before closing a stream cleanly; never a message (an Envelope always has a kind)
_CLOSED = object()  # in the inbox: this transport is closed


class _Lost:
    """In the inbox: the stream to ``peer`` is gone."""

    def __init__(self, peer: str, reason: str, restarted: bool = False):
        self.peer, self.reason, self.restarted = peer, reason, restarted


class GrpcTransport(Transport):
    """This party's end of the network. ``start()`` then ``wait_connected()`` before use."""

    def __init__(self, party: str, *, listen: str | None = None, dial: dict[str, str] | None = None,
                 accept: Iterable[str] = (), credentials: Credentials | None = None,
                 connect_timeout: float = 60.0, max_message_bytes: int = 256 * 2**20,
                 droppable: Iterable[str] = (), reconnect_timeout: float = 0.0, run: str = ""):
        self.party, self.listen, self.dial = party, listen, dict(dial or {})
        self.run = run  # the run it belongs to: a stream of another run's process is turned away (a service's)
        self.reconnect_timeout = reconnect_timeout  # seconds a broken stream may take to come back
        self.incarnation = secrets.token_bytes(8)  # this process's streams, told to peers in every SYNC
        self._peers: dict[str, PeerState] = {}
        self.droppable = frozenset(droppable)  # peers whose lost connection is logged, not raised
        self.accept, self.credentials = frozenset(accept), credentials
        self.connect_timeout, self.max_message_bytes = connect_timeout, max_message_bytes
        if party in self.dial or party in self.accept or set(self.dial) & self.accept:
            raise ValueError(f"{party}: a peer must be either dialed or accepted, and not be this party")
        if self.accept and not listen:
            raise ValueError(f"{party}: accepting {sorted(self.accept)} needs a listen address")
        if credentials is not None and credentials.party != party:
            raise ValueError(f"credentials are for {credentials.party!r}, not for {party!r}")
        self._check = PeerCheck(credentials) if credentials is not None else None  # expiry, revocation, role
        self.port: int | None = None
        self._cond = threading.Condition()
        self._out: dict[str, queue.Queue] = {}  # connected peer -> its outgoing queue
        self._seen: set[str] = set()  # peers that have been connected
        self._failed: dict[str, str] = {}  # peer -> why connecting to it gave up (dialing, or its certificate)
        self._problem: dict[str, str] = {}  # peer -> last connection problem
        self._channels: dict[str, grpc.Channel] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._space = threading.Condition()  # a peer's buffers waiting in the inbox are bounded (see _pump)
        self._queued: dict[str, int] = {}  # peer -> bytes of its buffers in the inbox
        self._closed = threading.Event()
        self._closed_at: float | None = None  # when close() began
        self._server: grpc.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._started = False

    # -- setting up ---------------------------------------------------------------------------
    @property
    def hard_limit(self) -> int:
        """What gRPC itself receives: twice ``max_message_bytes`` and a MiB, so that a message over the limit
        reaches the link, which refuses it naming the limit, while the stream goes on. A message over this
        breaks the stream (gRPC says no more than that to the receiver). It also bounds what one peer's
        buffers may hold in the inbox before it waits for this party to read them."""
        return 2 * self.max_message_bytes + 2**20

    def queued_bytes(self, peer: str) -> int:
        """Bytes of ``peer``'s buffers received and not read yet (at most about ``hard_limit``)."""
        with self._space:
            return self._queued.get(peer, 0)

    def _options(self) -> list[tuple[str, int]]:
        return channel_options(self.hard_limit, self.max_message_bytes)

    def start(self) -> GrpcTransport:
        """Bind the server (if ``listen``) and start dialing (if ``dial``); does not wait."""
        if self._started:
            raise TransportError(f"{self.party}: transport already started")
        self._started = True
        if self.listen:
            self._pool = ThreadPoolExecutor(2 * len(self.accept) + 4, thread_name_prefix="sl-serve")
            self._server = make_server(self._serve, self._pool, self._options())
            try:
                self.port = bind(self._server, self.listen, self.credentials)
            except RuntimeError as e:
                self.close()
                raise TransportError(f"{self.party}: cannot listen on {self.listen}: {e}") from None
            self._server.start()
        for peer, addr in self.dial.items():
            self._channels[peer] = dial_channel(addr, peer, self.credentials, self._options())
        for peer, addr in self.dial.items():
            threading.Thread(target=self._dial, args=(peer, addr), name=f"sl-dial-{peer}", daemon=True).start()
        return self

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until every dialed and accepted peer has connected (``connect_timeout`` by default)."""
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        expected = set(self.dial) | self.accept
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise TransportClosed(f"{self.party}: transport closed")
                if not (missing := sorted(expected - self._seen)):
                    return
                left = deadline - time.monotonic()
                if left <= 0 or any(p in self._failed for p in missing):
                    why = "; ".join(f"{p}: " + (self._failed.get(p) or self._problem.get(p) or (
                        f"no answer from {self.dial[p]}" if p in self.dial else "it did not dial in")) for p in missing)
                    raise TransportTimeout(f"{self.party}: not connected to {missing} within {timeout} s ({why})")
                self._cond.wait(min(left, 0.5))

    # -- streams --------------------------------------------------------------------------------
    def stream_opened(self, peer: str, out: queue.Queue) -> bool:
        """A new stream to ``peer`` whose outgoing frames go to ``out``: it begins with our SYNC; what we send waits for
        theirs. False (nothing attached) while ``peer`` has a stream or after close."""
        with self._cond:
            if self._closed.is_set() or peer in self._out:
                return False
            st = self._peers.setdefault(peer, PeerState())
            self._out[peer] = out
            out.put(sync_frame(self.incarnation, st.incarnation, st.opened()))
            self._seen.add(peer)
            self._problem.pop(peer, None)
            self._cond.notify_all()
        log.info("%s: connected to %s", self.party, peer)
        return True

    def sync_received(self, peer: str, out: queue.Queue, incarnation: bytes, ours: bytes, upto: int) -> None:
        """The peer's SYNC on the stream ``out`` (the peer's ``incarnation``, and the count ``upto`` of our frames it
        received): drop what it has, send again what it lacks (in order), then go on. ``ours``: the incarnation of this
        party that ``upto`` counts frames of; not this process (the peer received ``upto`` frames from an earlier one):
        nothing of ours is acknowledged."""
        restarted = False
        if ours != self.incarnation:
            upto = 0
        with self._cond:
            st = self._peers[peer]
            if st.incarnation is not None and st.incarnation != incarnation:  # a new process: from scratch
                restarted = True
                st.restarts += 1
                st.forget()
                upto = 0
            st.incarnation = incarnation
            st.ack(upto)
            for _, frame in st.unacked:
                out.put(frame)
            st.synced, st.lost_at, st.down_at, st.said_bye = True, None, None, False
            self._cond.notify_all()  # wakes the thread waiting for it to come back
        if restarted:
            log.warning("%s: %s came back as a new process", self.party, peer)
            self._inbox.put(_Lost(peer, f"{peer} restarted (a new process): the session with it begins again",
                                  restarted=True))

    def stream_ended(self, peer: str, out: queue.Queue, reason: str, clean: bool) -> bool:
        """The stream ``out`` to ``peer`` ended (``clean``: after its goodbye; ``reason``: why). True if the peer may
        come back (a dialer dials again)."""
        out.put(_END)
        back = False
        with self._cond:
            if self._out.get(peer) is not out:
                return False
            del self._out[peer]
            st = self._peers.get(peer)
            if st is not None:
                st.synced, st.down_at, st.said_bye = False, time.monotonic(), clean and not self._closed.is_set()
            self._cond.notify_all()
            if self._closed.is_set():
                return False
            if not clean and self.reconnect_timeout > 0 and st is not None:  # it may come back
                st.lost_at, st.lost_why, back = st.down_at, reason, True
                if not st.waiting:  # else the thread waiting already takes the new deadline
                    st.waiting = True
                    threading.Thread(target=self._await_return, args=(peer,), name=f"sl-await-{peer}",
                                     daemon=True).start()
            elif not clean or not self._out:
                self._inbox.put(_Lost(peer, reason))
        log.log(logging.INFO if clean else logging.WARNING, "%s: connection to %s ended: %s", self.party, peer, reason)
        return back

    def _await_return(self, peer: str) -> None:
        """A peer whose stream broke has ``reconnect_timeout`` seconds from its last break to come back (its SYNC on a
        new stream). One such thread per peer: it ends once the peer is back and follows each new break's deadline."""
        with self._cond:
            st = self._peers[peer]
            try:
                while not self._closed.is_set() and st.lost_at is not None:
                    left = st.lost_at + self.reconnect_timeout - time.monotonic()
                    if left <= 0:
                        st.gone = True
                        self._inbox.put(_Lost(peer, f"{st.lost_why}; it did not come back within "
                                                    f"{self.reconnect_timeout:g} s"))
                        return
                    self._cond.wait(left)  # woken by its return (sync_received), a new break and close
            finally:
                st.waiting = False

    def _pump(self, peer: str, out: queue.Queue, incoming: Iterator[bytes]) -> bool:
        """Move the peer's buffers to the inbox until its goodbye or the end of its stream; True if
        the peer may come back (see :meth:`stream_ended`)."""
        try:
            synced = False
            for data in incoming:
                if data == _BYE:
                    return self.stream_ended(peer, out, f"{peer} closed the connection", clean=True)
                kind = data[:1]
                if kind == SYNC and len(data) == SYNC_BYTES and not synced:
                    self.sync_received(peer, out, data[1:9], data[9:17], SEQ.unpack_from(data, 17)[0])
                    synced = True
                    continue
                if kind == SYNC and not synced:
                    raise TransportError(f"a SYNC of {len(data)} bytes, not {SYNC_BYTES}: the peer speaks another "
                                         "version of the link protocol (run the same splitlearn version on both sides)")
                if not synced or kind not in (DATA, ACK) or len(data) < 9 or kind == ACK and len(data) != 9:
                    raise TransportError(f"a frame the link protocol does not have ({len(data)} bytes)")
                seq = SEQ.unpack_from(data, 1)[0]
                st = self._peers[peer]
                if kind == ACK:
                    with self._cond:
                        st.ack(seq)
                    continue
                if seq <= st.received:
                    continue  # sent again after a reconnection: we have it
                if seq != st.received + 1:
                    raise TransportError(f"frame {seq} after frame {st.received}: frames were lost")
                if self._closed.is_set():  # nobody reads the inbox any more: a frame kept now is only memory
                    return self.stream_ended(peer, out, "this party closed", clean=True)
                payload = memoryview(data)[9:]  # no copy: protobuf parses the view
                with self._space:  # a peer sending faster than this party reads waits (gRPC flow control)
                    while self._queued.get(peer, 0) and self._queued[peer] + len(payload) > self.hard_limit \
                            and not self._closed.is_set():
                        self._space.wait(0.5)
                    self._queued[peer] = self._queued.get(peer, 0) + len(payload)
                if st.took(seq, len(payload)):  # (else the next frame sent the peer acknowledges it, frames.py)
                    out.put(ack_frame(seq))
                self._inbox.put((peer, payload))
            reason = "the stream ended without a goodbye"
        except Exception as e:  # noqa: BLE001 - grpc.RpcError and anything else ends the stream
            reason = str(e) if isinstance(e, TransportError) else why(e)
        # gRPC ends a stream that carried a message over its hard limit either with RESOURCE_EXHAUSTED or, depending
        # on timing, as a plain end of stream: the hint goes with every unclean end, as a possible cause.
        reason = (f"the stream from {peer} broke ({reason}); the peer's process may have stopped, the link dropped, "
                  f"or a message exceeded the transport's hard limit of {self.hard_limit} bytes (twice "
                  f"max_message_bytes, --max-message-mb, and a MiB)")
        return self.stream_ended(peer, out, reason, clean=False)

    @staticmethod
    def _drain(out: queue.Queue) -> Iterator[bytes]:
        while (item := out.get()) is not _END:
            yield item

    def _serve(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Server side of ``Connect``: authenticate, register, then stream both ways."""
        peer = peer_name(context, self.credentials)
        out: queue.Queue = queue.Queue()
        bad = self._check.accepted(context, peer) if self._check and peer in self.accept else None  # expired, revoked
        theirs = dict(context.invocation_metadata() or ()).get(RUN_HEADER, "")
        if not bad and theirs != self.run:  # another run's process, early or late: it dials again until its own comes
            log.info("%s: turned away %r of run %r (this is run %r)", self.party, peer, theirs, self.run)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.party} is in run {self.run!r}, not {theirs!r}")
        refusal = bad or ("it is not expected to connect" if peer not in self.accept else None
                          if self.stream_opened(peer, out) else "it is already connected (or this party is closing)")
        if refusal:
            log.warning("%s: refused a connection from %r (%s): %s", self.party, peer, context.peer(), refusal)
            self._problem[peer] = f"refused: {refusal}"  # said if it never connects (a valid one may still come)
            context.abort(grpc.StatusCode.UNAUTHENTICATED if bad else grpc.StatusCode.PERMISSION_DENIED,
                          f"{self.party} refused {peer!r}: {refusal}")
        context.add_callback(lambda: out.put(_END))
        context.send_initial_metadata(((PARTY_HEADER, self.party),))
        threading.Thread(target=self._pump, args=(peer, out, requests), name=f"sl-recv-{peer}", daemon=True).start()
        yield from self._drain(out)

    def _dial(self, peer: str, addr: str) -> None:
        """Client side, one thread per peer: connect (backoff) until ``connect_timeout``, then redial a break."""
        deadline, first = time.monotonic() + self.connect_timeout, True
        while (stream := self._open(peer, addr, deadline)) is not None:
            first = False
            if not self._pump(peer, *stream):
                return  # a goodbye, closing, or no reconnection
            with self._cond:
                deadline = (self._peers[peer].lost_at or time.monotonic()) + self.reconnect_timeout
        with self._cond:
            if first:  # a redial that gives up is reported by _await_return
                self._failed[peer] = self._problem.get(peer, "transport closed")
            self._cond.notify_all()

    def _open(self, peer: str, addr: str, deadline: float) -> tuple[queue.Queue, grpc.Call] | None:
        """A stream to ``peer``, attached (its outgoing queue and the call), or None by ``deadline``."""
        channel = self._channels[peer]
        connect = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        delay = 0.05
        ready = grpc.channel_ready_future(channel)  # one subscription: gRPC's poller races with close otherwise
        try:
            while not self._closed.is_set() and (left := deadline - time.monotonic()) > 0:
                try:
                    ready.result(timeout=min(left / 2, 1.0))
                except grpc.FutureTimeoutError:
                    pass  # (without credentials the stream's own error says why the channel is not ready)
                if self._check and (bad := self._check.dialed(addr, peer)):  # its certificate, by our checks first
                    self._problem[peer] = bad
                    if bad is not UNREACHED:
                        return None  # revoked, expired, not a party's: dialing again cannot help
                    self._closed.wait(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(2 * delay, 2.0)
                    continue  # not checked: no stream before it is
                out: queue.Queue = queue.Queue()
                try:
                    call = connect(self._drain(out), metadata=((PARTY_HEADER, self.party), (RUN_HEADER, self.run)))
                except ValueError:  # the channel was closed: this transport is closing
                    return None
                timer = threading.Timer(max(deadline - time.monotonic(), 0.1), call.cancel)
                timer.start()
                try:
                    header = dict(call.initial_metadata() or ()).get(PARTY_HEADER)
                finally:
                    timer.cancel()
                if header == peer:
                    if self.stream_opened(peer, out):
                        return out, call
                    call.cancel()  # closing meanwhile
                    return None
                call.cancel()
                out.put(_END)
                self._problem[peer] = (f"{addr} is party {header!r}, not {peer!r}" if header
                                       else f"cannot open a stream to {addr}: {why(call)}")
                if call.code() == grpc.StatusCode.UNAUTHENTICATED:  # the listener refused this party's certificate
                    return None
                log.debug("%s: dialing %s: %s", self.party, peer, self._problem[peer])
                self._closed.wait(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(2 * delay, 2.0)
            return None
        finally:
            ready.cancel()

    # -- the Transport interface -----------------------------------------------------------------
    def send(self, dst: str, data: bytes) -> None:
        if self._closed.is_set():
            raise TransportClosed(f"{self.party}: transport closed")
        if not data:
            raise TransportError(f"{self.party}: cannot send an empty message (it means goodbye on the wire)")
        if len(data) > self.max_message_bytes:
            raise TransportError(f"{self.party}: message of {len(data)} bytes to {dst!r} exceeds the limit of "
                                 f"{self.max_message_bytes}")
        if dst == self.party:
            self._inbox.put((dst, bytes(data)))
            return
        if dst not in self.dial and dst not in self.accept:
            raise TransportError(f"{self.party}: no party {dst!r} to send to (peers: "
                                 f"{sorted(set(self.dial) | self.accept)})")
        with self._cond:
            out, st = self._out.get(dst), self._peers.get(dst)
            if st is None or st.gone or (out is None and not self.reconnect_timeout):
                raise TransportError(f"{self.party}: not connected to {dst!r}")
            st.sent += 1
            frame = data_frame(st.sent, bytes(data))
            # kept until acknowledged: sent on the peer's SYNC if it has not come yet, and again after a reconnection
            if st.unacked_bytes + len(frame) > MAX_UNACKED_BYTES:
                raise TransportError(f"{self.party}: {dst!r} has not acknowledged {st.unacked_bytes} bytes")
            st.unacked.append((st.sent, frame))
            st.unacked_bytes += len(frame)
            if out is not None and st.synced:
                if (upto := st.owing()) is not None:  # what came from it, acknowledged before this frame
                    out.put(ack_frame(upto))
                out.put(frame)

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._inbox.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TransportTimeout(f"{self.party}: nothing received within {timeout} s") from None
            if item is _CLOSED:
                self._inbox.put(_CLOSED)  # keep later calls closed too
                raise TransportClosed(f"{self.party}: transport closed")
            if isinstance(item, _Lost):
                if item.peer in self.droppable:  # e.g. a client of a schedule: it is skipped, not fatal
                    continue
                if item.restarted:
                    raise PeerRestarted(item.peer, f"connection to {item.peer!r}: {item.reason}")
                raise TransportClosed(f"connection to {item.peer!r} lost: {item.reason}")
            if item[0] != self.party:
                with self._space:
                    self._queued[item[0]] -= len(item[1])
                    self._space.notify_all()
            return item

    def is_connected(self, peer: str) -> bool:
        """Whether ``peer``'s stream is up: connected and its SYNC received (see :class:`Transport`)."""
        if peer == self.party:
            return not self._closed.is_set()
        self._known(peer)
        with self._cond:
            st = self._peers.get(peer)
            return not self._closed.is_set() and peer in self._out and st is not None and st.synced

    def broken_since(self, peer: str) -> float | None:
        """When ``peer``'s stream last ended and has not come back (its SYNC on a new stream); after ``close()``, at the
        latest when this transport closed (see :class:`Transport`)."""
        if peer != self.party:
            self._known(peer)
        with self._cond:
            st = self._peers.get(peer)
            down = st.down_at if st is not None else None
            return self._closed_at if down is None else down

    def left(self, peer: str) -> bool:
        """Whether ``peer``'s stream ended with its goodbye and has not come back (see :class:`Transport`)."""
        self._known(peer)
        with self._cond:
            return peer in self._peers and self._peers[peer].said_bye and not self._peers[peer].synced

    def wait_broken(self, peer: str, timeout: float) -> float | None:
        """Wait up to ``timeout`` s (woken by the break) until ``peer``'s stream is down: :meth:`broken_since` then."""
        with self._cond:
            self._cond.wait_for(lambda: self.broken_since(peer) is not None, timeout)
            return self.broken_since(peer)

    def restarts(self, peer: str) -> int:
        """Times ``peer`` came back as a new process: its SYNC named another incarnation (see :class:`Transport`)."""
        self._known(peer)
        with self._cond:
            return st.restarts if (st := self._peers.get(peer)) is not None else 0

    def _known(self, peer: str) -> None:
        if peer not in self.dial and peer not in self.accept:
            raise TransportError(f"{self.party}: no link to party {peer!r} (peers: "
                                 f"{sorted(set(self.dial) | self.accept)})")

    def close(self, grace: float = 0.5) -> None:
        """Finish every stream (flushing what was sent, up to ``grace`` s), stop the server; pending and later ``recv``
        calls raise TransportClosed."""
        with self._cond:
            if self._closed.is_set():
                return
            deadline = time.monotonic() + grace  # what waits for a peer's SYNC goes out before the goodbye
            while any(not self._peers[p].synced for p in self._out) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._closed.set()
            self._closed_at = time.monotonic()
            self._cond.notify_all()  # the threads waiting for a peer to come back end
            for out in self._out.values():
                out.put(_BYE)
                out.put(_END)
            deadline = time.monotonic() + grace
            while self._out and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        for channel in self._channels.values():
            channel.close()  # ends the calls still open
        if self._server is not None:
            self._server.stop(grace=0).wait(grace)
            self._pool.shutdown(wait=False)
        self._inbox.put(_CLOSED)
