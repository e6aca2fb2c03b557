"""A reconnect flood cannot pile up threads: a peer with a valid certificate that opens and drops
1,000 streams leaves the listener's thread count flat, a party whose link is cut again and again
keeps one redial thread and at most one waiting thread per peer, and the honest traffic still
arrives once, in order. The transport tells its user at once whether a peer's stream is up."""

from __future__ import annotations

import secrets
import threading
import time

import grpc
import pytest

from splitlearn.wire.transport import InProcessHub, TransportError, TransportTimeout
from splitlearn.wire.transport.frames import NOBODY, SEQ, SYNC
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.grpc_channels import METHOD, PARTY_HEADER
from splitlearn.wire.transport.switch import Switch
from splitlearn.wire.transport.tls import load_credentials, make_certs

from .support import Proxy

pytestmark = pytest.mark.timeout(120)

FLOOD = 1000
SLACK = 12  # the server's thread pool filling up (2 * accepted + 4 workers) and a stream or two in flight


@pytest.fixture()
def certs(tmp_path):
    make_certs(["a", "b", "c"], tmp_path)
    return tmp_path


def _exchange(a: GrpcTransport, b: GrpcTransport, n: int, tag: str) -> None:
    """``n`` messages each way between a and b arrive once and in order."""
    for i in range(n):
        b.send("a", f"{tag} b{i}".encode())
        a.send("b", f"{tag} a{i}".encode())
    assert [a.recv(20) for _ in range(n)] == [("b", f"{tag} b{i}".encode()) for i in range(n)]
    assert [b.recv(20) for _ in range(n)] == [("a", f"{tag} a{i}".encode()) for i in range(n)]


def _flood(port: int, certs, n: int) -> int:
    """Party c (valid certificate) opens ``n`` streams to a one after another, each a SYNC and an end
    without a goodbye; returns the most Python threads seen after a stream ended."""
    creds = load_credentials(certs, "c")
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(creds.ca, creds.key, creds.cert),
                                  options=[("grpc.ssl_target_name_override", "a")])
    connect = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    sync = SYNC + secrets.token_bytes(8) + NOBODY + SEQ.pack(0)  # one process of c: no restart each time
    done = most = 0
    try:
        while done < n:
            call = connect(iter([sync]), metadata=((PARTY_HEADER, "c"),))
            try:
                frames = list(call)
            except grpc.RpcError as e:  # its previous stream is not detached yet: "already connected"
                assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
                continue
            assert frames and frames[0][:1] == SYNC  # a took c back: a reconnection
            done += 1
            most = max(most, threading.active_count())
    finally:
        channel.close()
    return most


def test_a_flood_of_reconnections_leaves_the_thread_count_flat(certs):
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b", "c"], credentials=load_credentials(certs, "a"),
                      reconnect_timeout=60).start()
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{a.port}"}, credentials=load_credentials(certs, "b"),
                      reconnect_timeout=60).start()
    try:
        b.wait_connected(10)
        _exchange(a, b, 20, "before")
        honest = threading.active_count()
        most = _flood(a.port, certs, FLOOD)
        assert most <= honest + SLACK, f"{most} threads after {FLOOD} reconnections, {honest} before"
        assert a.broken_since("c") is not None and not a.is_connected("c")  # its last stream ended: waited for
        assert a.is_connected("b") and a.broken_since("b") is None
        _exchange(a, b, 200, "after")  # the honest link works as before: nothing lost or duplicated
        with pytest.raises(TransportTimeout):  # and nothing more: no duplicate, no loss reported
            a.recv(0.3)
    finally:
        b.close()
        a.close()


def test_a_link_cut_again_and_again_keeps_one_redial_and_one_wait_per_peer(certs):
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(certs, "a"),
                      reconnect_timeout=60).start()
    proxy = Proxy(("127.0.0.1", a.port))
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{proxy.port}"}, credentials=load_credentials(certs, "b"),
                      reconnect_timeout=60).start()
    try:
        b.wait_connected(10)
        _exchange(a, b, 5, "before")
        honest = threading.active_count()
        most = 0
        for i in range(30):
            proxy.cut(refuse_for=0)
            b.send("a", f"cut {i}".encode())  # arrives only over a new connection
            assert a.recv(30) == ("b", f"cut {i}".encode())
            most = max(most, threading.active_count())
            names = [t.name for t in threading.enumerate()]
            assert names.count("sl-dial-a") <= 1 and names.count("sl-await-a") <= 1, names
            assert names.count("sl-await-b") <= 1, names
        assert most <= honest + SLACK, f"{most} threads after 30 cuts, {honest} before"
        _exchange(a, b, 50, "after")
        with pytest.raises(TransportTimeout):  # and nothing more: no duplicate, no loss reported
            a.recv(0.3)
    finally:
        b.close()
        a.close()
        proxy.close()


def test_connected_and_broken_since_say_at_once_where_a_peer_stands(certs):
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(certs, "a"),
                      reconnect_timeout=60).start()
    proxy = Proxy(("127.0.0.1", a.port))
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{proxy.port}"}, credentials=load_credentials(certs, "b"),
                      reconnect_timeout=60).start()
    try:
        b.wait_connected(10)
        _exchange(a, b, 1, "up")
        assert a.is_connected("b") and b.is_connected("a")
        assert a.broken_since("b") is None and b.broken_since("a") is None
        proxy.cut(refuse_for=3)
        cut = time.monotonic()
        broke = a.wait_broken("b", 10)  # woken by the break itself
        assert not a.is_connected("b") and cut - 1 <= a.broken_since("b") == broke <= time.monotonic()
        b.send("a", b"while down")
        assert a.recv(30) == ("b", b"while down")  # came back
        assert a.is_connected("b") and a.broken_since("b") is None
        with pytest.raises(TransportError, match="nobody"):
            a.is_connected("nobody")
    finally:
        b.close()
        a.close()
        proxy.close()
    assert not a.is_connected("b") and a.broken_since("b") is not None  # closed: nobody is connected


def test_in_process_peers_are_connected_until_they_close():
    hub = InProcessHub(["a", "b", "c"])
    a, b = hub.transport("a"), hub.transport("b")
    assert a.is_connected("b") and a.broken_since("b") is None
    b.close()
    assert not a.is_connected("b") and a.broken_since("b") <= time.monotonic()
    assert a.is_connected("c")
    with pytest.raises(TransportError, match="nobody"):
        a.is_connected("nobody")
    hub.close()
    assert not a.is_connected("c") and a.broken_since("c") is not None


def test_a_switch_view_asks_about_the_physical_peer():
    hub = InProcessHub(["server", "hospital-3"])
    server = hub.transport("server")
    view = Switch(server, lambda data: "session").session("server", {"hospital": "hospital-3"}, lambda p, d: True,
                                                          {"hospital-3"})
    assert view.is_connected("hospital")
    hub.transport("hospital-3").close()
    assert not view.is_connected("hospital") and view.broken_since("hospital") is not None
