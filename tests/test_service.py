"""A party service (``splitlearn serve``): each site keeps its party up with a key made at home; an administrator
submits runs to the services (``splitlearn submit``), which queue them and start their parts; a failing run is
recorded and the next one runs; a run can be stopped; only a current admin certificate of the authority is
heard (a revoked one, or a party's, is refused naming why)."""

import json
import shutil
import subprocess
import sys

import pytest

from splitlearn.launch.processes import free_port
from splitlearn.launch.service import ServiceError, list_runs, stop_run, submit
from splitlearn.wire.transport.authority import make_authority, make_request, revoke, sign_requests

from .support import ServiceLines, split_mlp, toml


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """An authority; the server's and the hospital's kits (each key made in its kit), an administrator (alice) and a
    second one (eve) whose certificate gets revoked; the two services running on loopback."""
    root = tmp_path_factory.mktemp("consortium")
    ca = root / "ca"
    make_authority(ca)
    kits = {p: root / "kits" / p for p in ("server", "hospital")}
    for p, kit in kits.items():
        sign_requests([make_request(p, kit)], ca)
        shutil.copy(ca / "ca.pem", kit)
    admins = root / "admins"
    for a in ("alice", "eve"):
        sign_requests([make_request(a, admins, role="admin")], ca)
    shutil.copy(ca / "ca.pem", admins)
    server_port = free_port()
    adam = {"optimizer": {"name": "adam", "lr": 0.01}}
    plan = split_mlp("svc", [64, 16, 10], data={"dataset": "digits"}, train={"epochs": 1, "batch_size": 32},
                     parties={"server": {"address": f"127.0.0.1:{server_port}", **adam}, "hospital": adam})
    (root / "plan.toml").write_text(toml(plan))
    bad = split_mlp("svc", [64, 16, 10], data={"dataset": "csv", "path": str(root / "missing.csv")},
                    parties={"server": {"address": f"127.0.0.1:{server_port}"}})
    (root / "bad.toml").write_text(toml(bad))
    admin_ports = {p: free_port() for p in kits}
    services = {p: subprocess.Popen([sys.executable, "-m", "splitlearn", "serve", "--kit", str(kit), "--name", p,
                                     "--admin", f"127.0.0.1:{admin_ports[p]}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for p, kit in kits.items()}
    for p, proc in services.items():  # each says where it takes runs once it listens
        line = proc.stdout.readline()
        assert "takes runs at https://127.0.0.1:" in line, line
    yield {"root": root, "ca": ca, "kits": kits, "admins": admins, "to": {p: f"127.0.0.1:{admin_ports[p]}"
                                                                        for p in kits},
           "said": {p: ServiceLines(proc) for p, proc in services.items()}}
    for proc in services.values():
        proc.terminate()
        proc.wait(timeout=15)


def wait_for(c, run, states, parties=("server", "hospital")):
    """The runs' entries at each service once its service said ``run`` reached one of ``states``."""
    for p in parties:
        c["said"][p].until(run, states)
    return {p: next(r for r in list_runs(c["to"][p], c["admins"], "alice")["runs"] if r["run"] == run)
            for p in parties}


def test_runs_submitted_to_the_services_queue_and_train_after_a_failing_one(consortium):
    c = consortium
    for p in ("server", "hospital"):
        assert submit(c["root"] / "bad.toml", c["to"][p], c["admins"], "alice", "broken")["state"] in ("queued",
                                                                                                      "running")
        submit(c["root"] / "plan.toml", c["to"][p], c["admins"], "alice", "second")  # queued behind it
    broken = wait_for(c, "broken", ("done", "failed"))
    assert broken["hospital"]["state"] == "failed" and "missing.csv" in broken["hospital"]["error"]
    assert broken["server"]["state"] == "failed"
    second = wait_for(c, "second", ("done", "failed"))
    assert {e["state"] for e in second.values()} == {"done"}, second  # the services took the next run
    result = json.loads((c["kits"]["server"] / "runs" / "second" / "result.json").read_text())  # the loss party's
    assert result["metrics"]["test_accuracy"] > 0.5 and result["transport"] == "grpc+mtls"  # 10 digits: chance 0.1
    with pytest.raises(ServiceError, match="run 'second' was submitted before"):
        submit(c["root"] / "plan.toml", c["to"]["server"], c["admins"], "alice", "second")


def test_a_run_is_stopped_queued_or_running(consortium):
    c = consortium
    submit(c["root"] / "plan.toml", c["to"]["hospital"], c["admins"], "alice", "alone")  # the server never gets it
    submit(c["root"] / "plan.toml", c["to"]["hospital"], c["admins"], "alice", "later")
    assert stop_run("later", c["to"]["hospital"], c["admins"], "alice")["state"] == "stopped"  # still queued
    wait_for(c, "alone", ("running",), parties=("hospital",))
    stop_run("alone", c["to"]["hospital"], c["admins"], "alice")  # waiting for a server that never comes
    got = wait_for(c, "alone", ("stopped", "failed", "done"), parties=("hospital",))
    assert got["hospital"]["state"] == "stopped" and got["hospital"]["error"] == "stopped by 'alice'"


def test_plans_with_code_odd_names_and_an_idle_client_do_not_get_through(consortium):
    import socket

    c = consortium
    body = split_mlp("svc", [64, 10], data={"dataset": "digits"})
    body["networks"]["mlp"] = {"factory": "yaml:unsafe_load", "args": {"stream": "!!python/object/apply:os.system"}}
    (c["root"] / "code.toml").write_text(toml(body))
    with pytest.raises(ServiceError, match="runs code of its own \\(networks.mlp.factory = 'yaml:unsafe_load'\\).*"
                                           "--allow-code"):
        submit(c["root"] / "code.toml", c["to"]["server"], c["admins"], "alice", "code")
    with pytest.raises(ServiceError, match="exists already"):  # the refused plan's folder is kept, and not reused
        submit(c["root"] / "plan.toml", c["to"]["server"], c["admins"], "alice", "code")
    for bad in ("nl\n", "../up", ".hidden"):
        with pytest.raises(ServiceError, match="run name"):
            submit(c["root"] / "plan.toml", c["to"]["server"], c["admins"], "alice", bad)
    host, port = c["to"]["server"].split(":")
    with socket.create_connection((host, int(port))):  # says nothing: holds only itself
        assert list_runs(c["to"]["server"], c["admins"], "alice")["party"] == "server"
    recorded = json.loads((c["kits"]["server"] / "runs" / "runs.json").read_text())
    assert "code" not in [r["run"] for r in recorded["runs"]] and all(r["state"] for r in recorded["runs"])


def test_only_a_current_administrator_is_heard(consortium):
    c = consortium
    assert list_runs(c["to"]["server"], c["admins"], "eve")["party"] == "server"
    revoke("eve", c["ca"])
    shutil.copy(c["ca"] / "crl.pem", c["kits"]["server"])  # the authority's new list reaches the site
    with pytest.raises(ServiceError, match="refused: certificate of 'eve' was revoked on"):
        list_runs(c["to"]["server"], c["admins"], "eve")
    with pytest.raises(ServiceError, match="refused: certificate of 'hospital' is for the role 'party', not an "
                                           "administrator's"):
        list_runs(c["to"]["server"], c["kits"]["hospital"], "hospital")
    r = subprocess.run([sys.executable, "-m", "splitlearn", "submit", str(c["root"] / "plan.toml"), "--to",
                        c["to"]["server"], "--certs", str(c["admins"]), "--as", "eve"], capture_output=True, text=True)
    assert r.returncode == 2 and "certificate of 'eve' was revoked" in r.stdout + r.stderr
