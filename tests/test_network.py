"""Parties as processes over gRPC with mutual TLS: same weights as in-process, any start order,
a dead party ends the others, Ctrl-C stops everything, failures show up in the exit status."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import splitlearn
from splitlearn.launch.processes import launch
from splitlearn.clients.layout import connections
from splitlearn.core.load import load_plan
from splitlearn.wire.transport.tls import make_certs

from .conftest import EXAMPLES
from .support import descendants, free_port, kill_tree, party_cmd, process_state

pytestmark = pytest.mark.timeout(240)


def weights(run_dir, party):
    return load_file(str(run_dir / "parties" / party / "weights.safetensors"))


@pytest.mark.parametrize("name", ["vanilla", "u_shaped", "vertical"])
def test_grpc_training_equals_in_process_exactly(tmp_path, name):
    plan = EXAMPLES / f"{name}.toml"
    net = launch(plan, tmp_path / "grpc", epochs=1, seed=5)
    local = splitlearn.train(plan, epochs=1, seed=5, out=tmp_path / "local")
    assert net["transport"] == "grpc+mtls"
    for party in load_plan(plan).parties:
        a, b = weights(tmp_path / "grpc", party), weights(tmp_path / "local", party)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (party, k)
    assert net["metrics"] == local["metrics"]
    # the same messages of the same sizes crossed the network as the in-process queues
    for party, p in net["parties"].items():
        assert p["bytes_sent"] == local["parties"][party]["bytes_sent"]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until something accepts connections on ``port`` (the party ``proc`` listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.02)


def test_parties_started_in_reverse_order_still_train(tmp_path):
    plan = EXAMPLES / "multi_hop.toml"
    names = list(load_plan(plan).parties)
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    procs = []
    for n in reversed(names):  # the server first, the client last, each once the one before listens
        procs.append(subprocess.Popen(party_cmd(plan, n, tmp_path / "certs", ports, tmp_path / "out", "--epochs", "1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        if n != names[0]:  # every party but the client listens (the client only dials)
            _wait_listening(ports[n], procs[-1])
    local = splitlearn.train(plan, epochs=1)  # (while they train) the start order changes nothing
    outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(names), outs
    report = json.loads((tmp_path / "out" / "parties" / "server" / "report.json").read_text())
    assert report["metrics"]["digit"]["test_accuracy"][-1] == local["metrics"]["test_accuracy"]


def test_killing_one_party_ends_the_others_with_an_error(tmp_path):
    plan = tmp_path / "vanilla.toml"  # the hospital waits 1 s for the server to come back, then gives up
    plan.write_text((EXAMPLES / "vanilla.toml").read_text().replace("seed = 0", "seed = 0\nreconnect_timeout = 1", 1))
    names = list(load_plan(plan).parties)
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    hospital = subprocess.Popen(party_cmd(plan, "hospital", tmp_path / "certs", ports, tmp_path / "out",
                                          "--epochs", "500", "--progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = subprocess.Popen(party_cmd(plan, "server", tmp_path / "certs", ports, tmp_path / "out", "--epochs", "500"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(20):  # training is under way
        assert hospital.stdout.readline().startswith(b"progress")
    server.kill()
    t0 = time.monotonic()
    hospital.wait(timeout=60)
    assert time.monotonic() - t0 < 30
    assert hospital.returncode == 1
    error = json.loads((tmp_path / "out" / "parties" / "hospital" / "error.json").read_text())["error"]
    assert "server" in error
    assert "did not come back within 1 s" in error and "the last step both parties finished" in error


def test_a_party_stopped_with_sigterm_tells_its_neighbours_and_every_party_ends_at_once(tmp_path):
    """SIGTERM (a service's stop, ``systemctl stop``, ``kill``) stops a party as Ctrl-C does: it tells its
    neighbours why and closes its connections, exit status 143. Along the chain client -> relay_1 -> relay_2 ->
    server, relay_1 stopped mid-run: every other party ends within moments, naming it, though each would wait a
    minute for a broken link to come back (``reconnect_timeout``: what a party killed where it stood costs them)."""
    plan = tmp_path / "multi_hop.toml"
    plan.write_text((EXAMPLES / "multi_hop.toml").read_text().replace("seed = 0", "seed = 0\nreconnect_timeout = 60", 1))
    names = list(load_plan(plan).parties)
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    procs = {n: subprocess.Popen(party_cmd(plan, n, tmp_path / "certs", ports, tmp_path / "out", "--epochs", "500",
                                           *(["--progress"] if n == "client" else [])),
                                 stdout=subprocess.PIPE if n == "client" else subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True) for n in names}
    try:
        for _ in range(20):  # training is under way
            assert procs["client"].stdout.readline().startswith(b"progress")
        procs["relay_1"].send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        codes = {n: p.wait(timeout=60) for n, p in procs.items()}
        took = time.monotonic() - t0
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == {"client": 1, "relay_1": 143, "relay_2": 1, "server": 1}, codes
    assert took < 30, took  # (a broken link would be waited for 60 s)
    errors = {n: json.loads((tmp_path / "out" / "parties" / n / "error.json").read_text())["error"] for n in names}
    assert errors["relay_1"] == "stopped by SIGTERM"
    assert all("relay_1 was stopped (SIGTERM)" in errors[n] for n in ("client", "relay_2", "server")), errors


SHIELD_CHECK = """
import signal
from splitlearn.launch.stopping import Stopped, shielded, stop_on_sigterm

before = signal.getsignal(signal.SIGTERM)
finished = False
with stop_on_sigterm():
    with shielded():
        signal.raise_signal(signal.SIGTERM)  # noted, not raised: the block goes on
        finished = True
assert finished and signal.getsignal(signal.SIGTERM) is before
try:
    with stop_on_sigterm():
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")
except Stopped as e:
    assert str(e) == "SIGTERM" and isinstance(e, KeyboardInterrupt)
assert signal.getsignal(signal.SIGTERM) is before
print("ok")
"""


def test_sigterm_raises_stopped_in_a_party_process_except_while_it_closes_or_writes_its_report():
    """Inside ``stop_on_sigterm`` (a party process's run) SIGTERM raises ``Stopped``, a KeyboardInterrupt; inside
    ``shielded`` (closing its connections, writing its report) it is noted and what runs finishes; the handler
    before is put back after either. In a process of its own, whose main thread is the one that handles signals."""
    r = subprocess.run([sys.executable, "-c", SHIELD_CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


def test_run_exit_status_and_error_of_a_failed_party(tmp_path):
    bad = tmp_path / "bad.toml"
    # the server's file names a factory only its own process cannot build: the plan check in
    # `run` catches it before any process starts
    bad.write_text((EXAMPLES / "vanilla.toml").read_text().replace('zoo = "mlp"', 'factory = "nowhere.at_all:net"'))
    r = subprocess.run([sys.executable, "-m", "splitlearn", "run", str(bad), "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot import module 'nowhere.at_all'" in r.stderr
    assert not (tmp_path / "o" / "parties").exists()


def test_failed_party_surfaces_through_launch(tmp_path, monkeypatch):
    # a party whose data differs from the others' (a hash of the ids is compared at hello)
    csv = tmp_path / "a.csv"
    csv.write_text("id,f1,f2\n" + "".join(f"{i},{i % 3},{i % 5}\n" for i in range(40)))
    other = tmp_path / "b.csv"
    other.write_text("id,g1,y\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(1, 41)))
    plan = tmp_path / "ids.toml"
    plan.write_text(f"""
name = "ids"
[train]
epochs = 1
[parties.a]
holds = {{ x = "x" }}
source = {{ dataset = "csv", path = "{csv}", id_column = "id" }}
[parties.b]
holds = {{ x = "x", y = "y" }}
source = {{ dataset = "csv", path = "{other}", id_column = "id", label_column = "y" }}
[networks.ea]
zoo = "mlp"
args = {{ sizes = [2, 4], out_activation = true }}
[networks.head]
zoo = "mlp"
args = {{ sizes = [5, 2] }}
[segments.ea]
party = "a"
inputs = ["a.x"]
network = "ea"
[segments.head]
party = "b"
inputs = ["ea", "b.x"]
network = "head"
[losses.y]
input = "head"
target = "b.y"
""")
    from splitlearn.core.specs import PlanError

    with pytest.raises(PlanError, match="hold different ids"):
        launch(plan, tmp_path / "o")


def test_ctrl_c_stops_every_party_process(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "splitlearn", "run", str(EXAMPLES / "vanilla.toml"), "--epochs", "500",
                            "--out", str(tmp_path / "o"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    held = tmp_path / "o" / "parties" / "server" / "checkpoints"
    deadline = time.monotonic() + 60  # the parties are connected and training: the server saved its state before step 0
    try:
        while not (held.is_dir() and any(p.name.startswith("round-") for p in held.iterdir())) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert time.monotonic() < deadline and run.poll() is None
        # the party processes (forked from the launcher's forker, launch/forker.py) and the forker itself
        children = [p for p in descendants(run.pid) if "zombie" not in process_state(p)]
        assert len(children) >= 3
        os.kill(run.pid, signal.SIGINT)
        run.wait(timeout=30)
    finally:  # a failed check leaves no 500-epoch run behind
        if run.poll() is None:
            kill_tree(run.pid)
    assert run.returncode != 0
    deadline = time.monotonic() + 30  # each ends on its own (told by the launcher), within moments
    while (alive := [p for p in children if Path(f"/proc/{p}").exists() and "zombie" not in process_state(p)]) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive == []


def test_who_dials_whom():
    """The data holder dials (behind its firewall); relays and the server listen; along a chain,
    the party nearer the data dials; dial_out overrides."""
    plan = load_plan(EXAMPLES / "multi_hop.toml")
    assert connections(plan) == [("client", "relay_1"), ("client", "server"), ("relay_1", "relay_2"),
                                 ("relay_2", "server")]
    fw = plan.model_copy(update={"parties": {**plan.parties,
                                             "server": plan.parties["server"].model_copy(update={"dial_out": True})}})
    assert ("server", "relay_2") in connections(fw) and ("server", "client") in connections(fw)
    vertical = load_plan(EXAMPLES / "vertical.toml")
    assert sorted(connections(vertical)) == [("clinic_a", "server"), ("clinic_b", "server")]


def test_hospital_dials_the_server_by_default_and_the_label_owner_holds_the_result(tmp_path):
    """The whole deployment: the server listens, the hospital names it with --peer and never listens,
    each site writes its own folder; the label owner's holds the run's result, which report reads."""
    plan = EXAMPLES / "vanilla.toml"
    make_certs(["hospital", "server"], tmp_path / "certs")
    port = free_port()
    common = ["--certs", str(tmp_path / "certs"), "--epochs", "1", "-q"]
    server = subprocess.Popen([sys.executable, "-m", "splitlearn", "party", str(plan), "--name", "server",
                               "--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "server"), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hospital = subprocess.Popen([sys.executable, "-m", "splitlearn", "party", str(plan), "--name", "hospital",
                                 "--peer", f"server=127.0.0.1:{port}", "--out", str(tmp_path / "hospital"), *common],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # no --listen: it never listens
    local = splitlearn.train(plan, epochs=1)  # (while they train)
    outs = [p.communicate(timeout=120)[0].decode() for p in (server, hospital)]
    assert (server.returncode, hospital.returncode) == (0, 0), outs
    assert not (tmp_path / "hospital" / "result.json").exists()  # the label owner's folder holds the result
    result = json.loads((tmp_path / "server" / "result.json").read_text())
    assert result["metrics"]["test_accuracy"] == local["metrics"]["test_accuracy"]
    assert result["parties_missing"] == ["hospital"] and result["transport"] == "grpc+mtls"
    assert result["parties"]["server"]["bytes_sent"] == local["parties"]["server"]["bytes_sent"]
    from splitlearn.tools.report import write_report

    page = write_report(tmp_path / "server")
    text = page.read_text()
    assert "Results on the test rows" in text and f"{result['metrics']['test_accuracy']:.4g}" in text
