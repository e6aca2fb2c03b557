"""gRPC transport under attack and when peers go away. After every refusal the listener must
still serve: a legitimate peer then exchanges a message with it."""

from __future__ import annotations

import os
import random
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from splitlearn.wire.codec import WireError
from splitlearn.wire.link import Link
from splitlearn.wire.messages import Kind, Message, decode, encode
from splitlearn.wire.transport import TransportClosed, TransportError, TransportTimeout
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.grpc_channels import METHOD
from splitlearn.wire.transport.tls import Credentials, load_credentials, make_certs

from .support import Proxy

pytestmark = pytest.mark.timeout(60)

PARTIES = ["hospital", "clinic_a", "mallory", "eve"]  # hospital listens; eve has a certificate but is not accepted
ACCEPT = ["clinic_a", "mallory"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_certs(PARTIES, d)
    return d


@pytest.fixture
def hospital(certs):
    t = GrpcTransport("hospital", listen="127.0.0.1:0", accept=ACCEPT, credentials=load_credentials(certs, "hospital"),
                      connect_timeout=10).start()
    yield t
    t.close()


def dialer(name: str, port: int, creds: Credentials | None, timeout: float = 10.0, target: str = "hospital"):
    return GrpcTransport(name, dial={target: f"127.0.0.1:{port}"}, credentials=creds, connect_timeout=timeout).start()


def still_serving(hospital: GrpcTransport, certs, link: Link | None = None) -> None:
    """A legitimate clinic connects (or is connected) and exchanges a message both ways."""
    clinic = dialer("clinic_a", hospital.port, load_credentials(certs, "clinic_a"))
    try:
        clinic.wait_connected(10)
        msg = Message(Kind.ACTIVATION, "clinic_a", "hospital", step=7, wire="w")
        clinic.send("hospital", encode(msg))
        if link is not None:
            assert link.recv(timeout=10) == msg
        else:
            assert hospital.recv(timeout=10) == ("clinic_a", encode(msg))
        hospital.send("clinic_a", b"pong")
        assert clinic.recv(timeout=10) == ("hospital", b"pong")
    finally:
        clinic.close()
    with pytest.raises(TransportClosed):  # the clinic was the only peer: its leaving is reported
        (link.transport if link else hospital).recv(timeout=10)


# -- certificates ---------------------------------------------------------------------------------
def test_certificates(certs, tmp_path):
    for p in PARTIES:
        assert stat.S_IMODE(os.stat(certs / f"{p}.key").st_mode) == 0o600
        assert load_credentials(certs, p).party == p
    assert stat.S_IMODE(os.stat(certs / "ca.key").st_mode) == 0o600
    for bad in ["", "a/b", "a b", "tab\t", "*"]:
        with pytest.raises(ValueError):
            make_certs([bad], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nobody\.pem.*splitlearn certs PLAN --out DIR"):
        load_credentials(certs, "nobody")
    (tmp_path / "x").mkdir()
    for f in ["ca.pem", "eve.key"]:
        (tmp_path / "x" / f).write_bytes((certs / f).read_bytes())
    (tmp_path / "x" / "eve.pem").write_bytes((certs / "clinic_a.pem").read_bytes())
    with pytest.raises(ValueError, match="not for party 'eve'"):
        load_credentials(tmp_path / "x", "eve")


# -- attacks --------------------------------------------------------------------------------------
def test_impersonation_in_envelope_is_refused(hospital, certs):
    link = Link(hospital)
    mallory = dialer("mallory", hospital.port, load_credentials(certs, "mallory"))
    mallory.wait_connected(10)
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(link.recv, 20)
        mallory.send("hospital", encode(Message(Kind.ACTIVATION, sender="clinic_a", receiver="hospital", step=1)))
        peer, data = mallory.recv(timeout=10)  # the refusal is sent back
        assert peer == "hospital" and decode(data).kind == Kind.ERROR
        assert len(link.refused) == 1 and "'clinic_a'" in link.refused[0] and "'mallory'" in link.refused[0]
        clinic = dialer("clinic_a", hospital.port, load_credentials(certs, "clinic_a"))
        clinic.wait_connected(10)
        legit = Message(Kind.ACTIVATION, "clinic_a", "hospital", step=1, wire="w")
        clinic.send("hospital", encode(legit))
        assert got.result(20) == legit
    clinic.close()
    mallory.close()


def test_garbage_over_authenticated_stream_is_refused(hospital, certs):
    junk = random.Random(0).randbytes(4096)
    with pytest.raises(WireError):
        decode(junk)
    link = Link(hospital)
    mallory = dialer("mallory", hospital.port, load_credentials(certs, "mallory"))
    mallory.wait_connected(10)
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(link.recv, 20)
        mallory.send("hospital", junk)
        assert decode(mallory.recv(timeout=10)[1]).kind == Kind.ERROR
        assert len(link.refused) == 1 and "'mallory'" in link.refused[0]
        mallory.close()
        with pytest.raises(TransportClosed, match="mallory"):
            got.result(20)
    still_serving(hospital, certs, link)


@pytest.mark.parametrize("trust", ["rogue CA", "real CA"])
def test_certificate_from_another_ca_cannot_connect(hospital, certs, tmp_path, trust):
    make_certs(["clinic_a"], tmp_path)  # a rogue CA issuing a certificate for an accepted name
    rogue = load_credentials(tmp_path, "clinic_a")
    if trust == "real CA":  # trusts the real listener, presents the rogue certificate
        rogue = Credentials((certs / "ca.pem").read_bytes(), rogue.cert, rogue.key, "clinic_a")
    attacker = dialer("clinic_a", hospital.port, rogue, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(TransportError):
        attacker.wait_connected(10)
    assert time.monotonic() - start < 8
    attacker.close()
    still_serving(hospital, certs)


def test_client_without_tls_cannot_connect(hospital, certs):
    attacker = dialer("clinic_a", hospital.port, None, timeout=1.0)
    with pytest.raises(TransportError):
        attacker.wait_connected(10)
    attacker.close()
    with grpc.insecure_channel(f"127.0.0.1:{hospital.port}") as channel:
        call = channel.stream_stream(METHOD)(iter([b"hello"]), metadata=(("x-splitlearn-party", "clinic_a"),),
                                             timeout=5)
        with pytest.raises(grpc.RpcError):
            list(call)
    still_serving(hospital, certs)


def test_party_not_accepted_is_refused(hospital, certs):
    eve = dialer("eve", hospital.port, load_credentials(certs, "eve"), timeout=1.0)
    with pytest.raises(TransportTimeout, match="PERMISSION_DENIED"):
        eve.wait_connected(10)
    eve.close()
    still_serving(hospital, certs)


def test_second_connection_with_same_name_is_refused(hospital, certs):
    creds = load_credentials(certs, "mallory")
    first = dialer("mallory", hospital.port, creds)
    first.wait_connected(10)
    second = dialer("mallory", hospital.port, creds, timeout=1.0)
    with pytest.raises(TransportTimeout, match="already connected"):
        second.wait_connected(10)
    second.close()
    first.send("hospital", b"still me")
    assert hospital.recv(timeout=10) == ("mallory", b"still me")
    first.close()
    with pytest.raises(TransportClosed):
        hospital.recv(timeout=10)
    still_serving(hospital, certs)


def test_dialer_checks_the_listener_name(hospital, certs):
    """clinic_a expects to reach 'mallory' at the hospital's address: the certificate says otherwise."""
    clinic = dialer("clinic_a", hospital.port, load_credentials(certs, "clinic_a"), timeout=1.0, target="mallory")
    with pytest.raises(TransportTimeout):
        clinic.wait_connected(10)
    clinic.close()
    still_serving(hospital, certs)


# -- connections -----------------------------------------------------------------------------------
def test_insecure_mode_names_by_header(certs):
    h = GrpcTransport("hospital", listen="127.0.0.1:0", accept=["clinic_a"]).start()
    try:
        c = dialer("clinic_a", h.port, None)
        c.wait_connected(10)
        c.send("hospital", b"plain")
        assert h.recv(timeout=10) == ("clinic_a", b"plain")
        eve = dialer("eve", h.port, None, timeout=1.0)
        with pytest.raises(TransportTimeout, match="PERMISSION_DENIED"):
            eve.wait_connected(10)
        eve.close()
        c.close()
    finally:
        h.close()


def test_start_in_any_order(certs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clinic = dialer("clinic_a", port, load_credentials(certs, "clinic_a"))
    time.sleep(0.5)  # the listener is not there yet
    h = GrpcTransport("hospital", listen=f"127.0.0.1:{port}", accept=["clinic_a"],
                      credentials=load_credentials(certs, "hospital")).start()
    try:
        clinic.wait_connected(10)
        h.wait_connected(10)
        clinic.send("hospital", b"late")
        assert h.recv(timeout=10) == ("clinic_a", b"late")
    finally:
        clinic.close()
        h.close()


@pytest.mark.parametrize("who_closes", ["dialer", "listener"])
def test_peer_closing_ends_recv(hospital, certs, who_closes):
    clinic = dialer("clinic_a", hospital.port, load_credentials(certs, "clinic_a"))
    clinic.wait_connected(10)
    closer, other = (clinic, hospital) if who_closes == "dialer" else (hospital, clinic)
    peer = "hospital" if closer is hospital else "clinic_a"
    closer.send(other.party, b"last words")  # sent right before closing: still delivered
    closer.close()
    start = time.monotonic()
    assert other.recv(timeout=10) == (peer, b"last words")
    with pytest.raises(TransportClosed, match=f"connection to '{peer}' lost"):
        other.recv(timeout=10)
    assert time.monotonic() - start < 5
    with pytest.raises(TransportError, match=peer):
        other.send(peer, b"x")
    clinic.close()


@pytest.mark.parametrize("victim", ["listener", "dialer"])
def test_broken_stream_ends_recv(hospital, certs, victim):
    """The connection drops without a goodbye (a relay between the two ends cuts it): the pending recv
    of either end fails at once."""
    relay = Proxy(("127.0.0.1", hospital.port))
    clinic = dialer("clinic_a", relay.port, load_credentials(certs, "clinic_a"))
    clinic.wait_connected(10)
    # a second peer stays connected: a broken stream is reported anyway (a clean close would not be)
    other = dialer("mallory", hospital.port, load_credentials(certs, "mallory"))
    other.wait_connected(10)
    end, peer = (hospital, "clinic_a") if victim == "listener" else (clinic, "hospital")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(end.recv, 10)
        time.sleep(0.1)
        relay.cut(refuse_for=0)  # (neither end dials again: no reconnect_timeout)
        with pytest.raises(TransportClosed, match=f"connection to '{peer}' lost"):
            waiting.result(10)
    clinic.close()
    other.close()
    relay.close()


def test_port_in_use(hospital, certs):
    with pytest.raises(TransportError, match="cannot listen"):
        GrpcTransport("clinic_a", listen=f"127.0.0.1:{hospital.port}", accept=["hospital"]).start()


def test_neighbour_leaving_cleanly_does_not_stop_the_rest(certs):
    """a-b-c: when a is done and closes, b still finishes with c (a runner's goodbye phase)."""
    creds = {p: load_credentials(certs, p) for p in ["hospital", "clinic_a", "mallory"]}
    b = GrpcTransport("hospital", listen="127.0.0.1:0", accept=["clinic_a", "mallory"], credentials=creds["hospital"]).start()
    a, c = (dialer(p, b.port, creds[p]) for p in ["clinic_a", "mallory"])
    try:
        for t in (a, b, c):
            t.wait_connected(10)
        a.send("hospital", b"stop")
        a.close()
        assert b.recv(timeout=10) == ("clinic_a", b"stop")
        threading.Timer(0.5, c.send, args=("hospital", b"stop too")).start()
        assert b.recv(timeout=10) == ("mallory", b"stop too")
        c.close()
        with pytest.raises(TransportClosed, match="mallory"):  # nobody left
            b.recv(timeout=10)
    finally:
        for t in (a, b, c):
            t.close()


def test_message_limits(certs):
    creds = {p: load_credentials(certs, p) for p in ["hospital", "clinic_a"]}
    h = GrpcTransport("hospital", listen="127.0.0.1:0", accept=["clinic_a"], credentials=creds["hospital"],
                      max_message_bytes=1000).start()
    c = GrpcTransport("clinic_a", dial={"hospital": f"127.0.0.1:{h.port}"}, credentials=creds["clinic_a"]).start()
    try:
        c.wait_connected(10)
        with pytest.raises(TransportError, match="empty"):  # an empty frame means goodbye on the wire
            c.send("hospital", b"")
        with pytest.raises(TransportError, match="exceeds the limit"):
            h.send("clinic_a", b"x" * 1001)
        c.send("hospital", b"x" * 5000)  # over the listener's limit: handed up, for its link to refuse by name
        assert h.recv(timeout=10) == ("clinic_a", b"x" * 5000)
        c.send("hospital", b"x" * (h.hard_limit + 1))  # over what gRPC takes: the stream breaks, naming the limit
        with pytest.raises(TransportClosed, match=r"clinic_a.*hard limit of 1050576 bytes"):
            h.recv(timeout=10)
    finally:
        c.close()
        h.close()
