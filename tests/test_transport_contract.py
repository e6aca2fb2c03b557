"""One contract, every transport: in-process and gRPC (mutual TLS on 127.0.0.1).

Three parties a, b, c. Over gRPC, a listens, b dials a and listens, c dials a and b, so both
the listening and the dialing end of a stream are covered.
"""

from __future__ import annotations

import threading
import time

import pytest

from splitlearn.wire.transport import (
    InProcessHub,
    TransportClosed,
    TransportError,
    TransportTimeout,
)

PARTIES = ["a", "b", "c"]


def _inprocess(tmp_path):
    hub = InProcessHub(PARTIES)
    return {p: hub.transport(p) for p in PARTIES}, hub.close  # InProcessTransport.close() is a no-op


def _grpc(tmp_path):
    from splitlearn.wire.transport.grpc import GrpcTransport
    from splitlearn.wire.transport.tls import load_credentials, make_certs

    make_certs(PARTIES, tmp_path)
    creds = {p: load_credentials(tmp_path, p) for p in PARTIES}
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b", "c"], credentials=creds["a"], connect_timeout=10).start()
    b = GrpcTransport("b", listen="127.0.0.1:0", dial={"a": f"127.0.0.1:{a.port}"}, accept=["c"],
                      credentials=creds["b"], connect_timeout=10).start()
    c = GrpcTransport("c", dial={"a": f"127.0.0.1:{a.port}", "b": f"127.0.0.1:{b.port}"}, credentials=creds["c"],
                      connect_timeout=10).start()
    ts = {"a": a, "b": b, "c": c}
    for t in ts.values():
        t.wait_connected(10)

    def close_all():
        for t in ts.values():
            t.close()

    return ts, close_all


@pytest.fixture(params=[_inprocess, _grpc], ids=["inprocess", "grpc"])
def parties(request, tmp_path):
    ts, close_all = request.param(tmp_path)
    yield ts, close_all
    close_all()


pytestmark = pytest.mark.timeout(60)


def test_exact_bytes_and_authenticated_sender(parties):
    ts, _ = parties
    for src in PARTIES:
        for dst in PARTIES:
            if src != dst:
                data = f"{src}->{dst}".encode() + bytes(range(256))
                ts[src].send(dst, data)
                assert ts[dst].recv(timeout=10) == (src, data)


def test_order_per_pair(parties):
    ts, _ = parties
    for i in range(200):
        ts["c"].send("a", i.to_bytes(4, "big"))
    got = [ts["a"].recv(timeout=10) for _ in range(200)]
    assert got == [("c", i.to_bytes(4, "big")) for i in range(200)]


def test_recv_timeout(parties):
    ts, _ = parties
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        ts["b"].recv(timeout=0.2)
    assert time.monotonic() - start < 5


def test_send_to_unknown_party(parties):
    ts, _ = parties
    with pytest.raises(TransportError, match="nobody"):
        ts["a"].send("nobody", b"x")


def test_closed(parties):
    ts, close_all = parties
    errors = []
    waiting = threading.Thread(target=lambda: errors.append(_raised(ts["a"].recv)))
    waiting.start()
    time.sleep(0.2)
    close_all()
    waiting.join(10)
    assert not waiting.is_alive() and errors and isinstance(errors[0], TransportClosed)
    for t in ts.values():
        with pytest.raises(TransportClosed):
            t.recv(timeout=1)
        with pytest.raises(TransportClosed):
            t.recv(timeout=1)  # stays closed
        with pytest.raises(TransportClosed):
            t.send("a" if t.party != "a" else "b", b"x")


def test_large_message(parties):
    ts, _ = parties
    data = bytes(range(256)) * (8 * 2**20 // 256)
    ts["c"].send("b", data)
    ts["a"].send("b", data[::-1])
    got = dict(ts["b"].recv(timeout=30) for _ in range(2))
    assert got == {"c": data, "a": data[::-1]}


def test_several_senders(parties):
    ts, _ = parties
    senders = [p for p in PARTIES if p != "b"]

    def blast(src):
        for i in range(50):
            ts[src].send("b", f"{src}{i}".encode())

    threads = [threading.Thread(target=blast, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [ts["b"].recv(timeout=10) for _ in range(100)]
    for s in senders:
        assert [d for p, d in got if p == s] == [f"{s}{i}".encode() for i in range(50)]
    with pytest.raises(TransportTimeout):
        ts["b"].recv(timeout=0.1)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def test_a_peer_that_closed_its_end_has_left_and_one_still_there_has_not(parties):
    """``left(peer)``: its goodbye came (a party closed its end: Ctrl-C, the end of its run), so nobody waits for it
    as for one whose stream broke and may come back (a client's turn ends at once: tests/test_clients_grpc.py)."""
    ts, _ = parties
    assert not ts["a"].left("b") and not ts["c"].left("b") and ts["a"].broken_since("b") is None
    ts["b"].close()
    for t in (ts["a"], ts["c"]):
        if hasattr(t, "wait_broken"):  # gRPC: the goodbye travels
            assert t.wait_broken("b", 10) is not None
        assert t.broken_since("b") is not None and t.left("b")
    assert not ts["a"].left("c") and not ts["c"].left("a")
