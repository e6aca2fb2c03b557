"""Dropped links: a broken stream is dialled again, what was in flight is sent again and nothing
is delivered twice; a peer that does not come back in time is named; training over a link cut
for seconds ends with the weights of a run whose link never broke."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import splitlearn
from splitlearn.wire.transport import TransportClosed
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import load_credentials, make_certs

from .conftest import EXAMPLES
from .support import netns_pair, Proxy, free_port, weights


@pytest.fixture()
def pair(tmp_path):
    make_certs(["a", "b"], tmp_path)
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(tmp_path, "a"),
                      reconnect_timeout=15).start()
    proxy = Proxy(("127.0.0.1", a.port))
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{proxy.port}"}, credentials=load_credentials(tmp_path, "b"),
                      reconnect_timeout=15).start()
    a.wait_connected(10)
    b.wait_connected(10)
    yield a, b, proxy
    b.close()
    a.close()
    proxy.close()


def test_a_cut_link_is_dialled_again_and_every_message_arrives_once_in_order(pair):
    a, b, proxy = pair
    for i in range(5):
        b.send("a", f"before {i}".encode())
        a.send("b", f"reply {i}".encode())
    assert [a.recv(5)[1] for _ in range(5)] == [f"before {i}".encode() for i in range(5)]
    proxy.cut(refuse_for=1.5)
    for i in range(5):  # sent while the link is down: they wait, and go when it is back
        b.send("a", f"during {i}".encode())
        a.send("b", f"during {i}".encode())
    got_a = [a.recv(20)[1] for _ in range(5)]
    got_b = [b.recv(20)[1] for _ in range(10)]
    assert got_a == [f"during {i}".encode() for i in range(5)]
    assert got_b == [f"reply {i}".encode() for i in range(5)] + [f"during {i}".encode() for i in range(5)]
    with pytest.raises(Exception):  # nothing more: no duplicate was delivered
        a.recv(0.5)


def test_a_count_meant_for_an_earlier_process_acknowledges_nothing():
    """A party that comes back as a new process and sends at once (before its peer's SYNC) must not
    lose those frames to the count of frames the peer received from its earlier process."""
    import queue
    import secrets

    from splitlearn.wire.transport import frames

    t = GrpcTransport("b", dial={"a": "127.0.0.1:9"}, reconnect_timeout=5)  # a new process of b (not started)
    out: queue.Queue = queue.Queue()
    assert t.stream_opened("a", out)
    assert out.get_nowait() == frames.SYNC + t.incarnation + frames.NOBODY + frames.SEQ.pack(0)  # it knows no incarnation of a
    t.send("a", b"hello")
    t.send("a", b"again")
    assert out.empty()  # kept until a's SYNC says where to go on
    a_incarnation, earlier_b = secrets.token_bytes(8), secrets.token_bytes(8)
    t.sync_received("a", out, a_incarnation, earlier_b, 500)  # a received 500 frames from the b that died
    assert [out.get_nowait() for _ in range(2)] == [frames.DATA + frames.SEQ.pack(1) + b"hello", frames.DATA + frames.SEQ.pack(2) + b"again"]
    out2: queue.Queue = queue.Queue()  # the stream breaks; a tells the count of this process's frames
    assert t.stream_ended("a", out, "the stream broke", clean=False)  # a may come back: it is waited for
    assert t.stream_opened("a", out2)
    assert out2.get_nowait() == frames.SYNC + t.incarnation + a_incarnation + frames.SEQ.pack(0)
    t.sync_received("a", out2, a_incarnation, t.incarnation, 1)  # it has the first: only the second goes again
    assert out2.get_nowait() == frames.DATA + frames.SEQ.pack(2) + b"again" and out2.empty()


def test_frames_are_acknowledged_with_the_next_frame_sent_back_or_once_many_came():
    """An ACK only lets the sender drop the frames it keeps for a reconnection: a receiver acknowledges what came with
    the next frame it sends back (a step's reply), and at once only after ACK_EVERY frames or ACK_BYTES bytes (a
    one-way flow), so that the sender keeps a bounded amount; a SYNC acknowledges everything (tested above)."""
    from splitlearn.wire.transport import frames

    st = frames.PeerState()
    assert [st.took(seq, 100) for seq in range(1, 4)] == [False] * 3
    assert st.owing() == 3 and st.owing() is None  # the reply's ACK covers them, once
    assert [st.took(seq, 100) for seq in range(4, 4 + frames.ACK_EVERY)] == [False] * (frames.ACK_EVERY - 1) + [True]
    assert st.owing() is None  # that ACK went out at once
    assert st.took(4 + frames.ACK_EVERY, frames.ACK_BYTES) is True  # a large frame: at once
    assert st.took(5 + frames.ACK_EVERY, 1) is False and st.owing() == 5 + frames.ACK_EVERY


def test_a_peer_that_does_not_come_back_is_named_after_the_timeout(tmp_path):
    make_certs(["a", "b"], tmp_path)
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(tmp_path, "a"),
                      reconnect_timeout=1.0).start()
    proxy = Proxy(("127.0.0.1", a.port))
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{proxy.port}"}, credentials=load_credentials(tmp_path, "b"),
                      reconnect_timeout=1.0).start()
    a.wait_connected(10)
    b.wait_connected(10)
    proxy.cut(refuse_for=30)
    start = time.monotonic()
    with pytest.raises(TransportClosed, match=r"connection to 'b' lost: .*did not come back within 1 s"):
        a.recv(10)
    assert time.monotonic() - start < 8
    b.close()
    a.close()
    proxy.close()


def _reference(result) -> dict:
    """The weights of an in-process run, keyed as :func:`weights` keys a run folder's."""
    return {f"{p}/{seg}.{k}": v for p, mods in result.modules.items() for seg, m in mods.items()
            for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _party(plan: Path, name: str, certs: Path, out: Path, *extra: str, netns: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "splitlearn", "party", str(plan), "--name", name, "--certs", str(certs),
           "--out", str(out), "-q", *extra]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_step(proc: subprocess.Popen, step: int) -> None:
    """Read a party's ``--progress`` lines until it has finished ``step`` steps."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the party ended before the step"
        if line.startswith("progress ") and int(line.split()[1]) >= step:
            return
    raise AssertionError(f"no step {step} within 120 s")


def test_training_through_a_cut_link_ends_with_the_same_weights(tmp_path):
    """On loopback, the hospital reaches the server through a relay that the test cuts for 2 s mid-training."""
    port = free_port()
    plan = tmp_path / "plan.toml"
    text = (EXAMPLES / "vanilla.toml").read_text().replace("[parties.server]", f'[parties.server]\naddress = "127.0.0.1:{port}"')
    plan.write_text(text)
    reference = splitlearn.train(plan, epochs=1)
    certs = tmp_path / "certs"
    make_certs(["hospital", "server"], certs)
    out = tmp_path / "run"
    server = _party(plan, "server", certs, out, "--epochs", "1")
    proxy = Proxy(("127.0.0.1", port))  # until the server listens, the hospital's dials through it are closed
    hospital = _party(plan, "hospital", certs, out, "--epochs", "1", "--peer", f"server=127.0.0.1:{proxy.port}",
                      "--progress")
    try:
        _until_step(hospital, 10)  # of 45 training steps
        proxy.cut(refuse_for=2)
        outs = [p.communicate(timeout=120) for p in (hospital, server)]
    finally:  # a failed check leaves no party running
        for p in (hospital, server):
            if p.poll() is None:
                p.kill()
        proxy.close()
    assert hospital.returncode == 0 and server.returncode == 0, outs
    assert "connection to server ended: the stream from server broke" in outs[0][1]  # the cut hit the run
    assert _same(_reference(reference), weights(out)) == 0.0


_PROBE = f"sl-probe-{os.getpid()}"  # one per test process (test workers collect at the same time)
NETNS = shutil.which("ip") is not None and subprocess.run(["ip", "netns", "add", _PROBE], capture_output=True).returncode == 0
if NETNS:
    subprocess.run(["ip", "netns", "del", _PROBE], capture_output=True)


@pytest.mark.skipif(not NETNS, reason="network namespaces cannot be created here (needs root and iproute2)")
def test_a_link_down_for_five_seconds_between_namespaces(tmp_path):
    """Each party in its own namespace and address, joined by a veth pair that goes down for 5 s."""
    addr = {"server": "10.77.0.1", "hospital": "10.77.0.2"}

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    server = hospital = None
    with netns_pair("sl", addr) as (ns, veth), contextlib.ExitStack() as done:
        done.callback(lambda: [p.kill() for p in (server, hospital) if p is not None and p.poll() is None])
        text = (EXAMPLES / "vanilla.toml").read_text().replace(
            "[parties.server]", f'[parties.server]\naddress = "{addr["server"]}:7443"')
        plan = tmp_path / "plan.toml"
        plan.write_text(text)
        reference = splitlearn.train(plan, epochs=1)
        certs = tmp_path / "certs"
        make_certs(["hospital", "server"], certs)
        out = tmp_path / "run"
        server = _party(plan, "server", certs, out, "--epochs", "1", netns=ns["server"])
        hospital = _party(plan, "hospital", certs, out, "--epochs", "1", "--progress", netns=ns["hospital"])
        _until_step(hospital, 10)  # of 45 training steps
        sh("ip", "-n", ns["hospital"], "link", "set", veth[1], "down")
        time.sleep(5)
        assert hospital.poll() is None and server.poll() is None  # the run waits for the link
        sh("ip", "-n", ns["hospital"], "link", "set", veth[1], "up")
        outs = [p.communicate(timeout=180) for p in (hospital, server)]
        assert hospital.returncode == 0 and server.returncode == 0, outs
        assert _same(_reference(reference), weights(out)) == 0.0
