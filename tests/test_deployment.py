"""A whole deployment, each site in its own network namespace and address, as an IT department would do it with
the command line: the authority, keys made per site, requests signed, kits provisioned; a party service at each
site; a run submitted to both services and its live status read over HTTP mid-run; each site predicting from its
own machine (equal to the one-process predict); a second run; then the hospital revoked and refused by name."""

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import splitlearn
from splitlearn.launch.processes import free_port

from .conftest import EXAMPLES
from .support import ServiceLines, netns_pair

_PROBE = f"sl-dprobe-{free_port()}"
NETNS = shutil.which("ip") is not None and subprocess.run(["ip", "netns", "add", _PROBE],
                                                         capture_output=True).returncode == 0
if NETNS:
    subprocess.run(["ip", "netns", "del", _PROBE], capture_output=True)
ADDR = {"server": "10.78.0.1", "hospital": "10.78.0.2"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def cli(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``splitlearn ARGS`` (inside namespace ``ns``)."""
    cmd = [sys.executable, "-m", "splitlearn", *args]
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd] if ns else cmd, capture_output=True, text=True, timeout=180)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def sites():
    """Two namespaces joined by a veth pair: the server's and the hospital's."""
    with netns_pair("sd", ADDR) as (ns, _):
        yield ns


def runs(ns: str, to: str, admin: Path) -> dict:
    return {r["run"]: r for r in json.loads(cli("runs", "--at", to, "--certs", str(admin), "--as", "alice", "--json",
                                                 ns=ns).stdout)["runs"]}


def until(check, what, deadline_s: float = 150):
    """Poll ``check`` until it gives something truthy (with a deadline); ``what`` names it in the error (a function:
    called then, to say what was seen last)."""
    end = time.monotonic() + deadline_s
    while (got := check()) is None or got is False:
        assert time.monotonic() < end, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.3)
    return got


@pytest.mark.skipif(not NETNS, reason="network namespaces cannot be created here (needs root and iproute2)")
def test_a_consortium_deploys_from_kits_trains_watches_predicts_and_revokes(tmp_path, sites):
    plan = tmp_path / "plan.toml"  # 6 epochs: a run of 2 (3 s) could end between two polls of its status mid-run
    plan.write_text((EXAMPLES / "vanilla.toml").read_text().replace(
        "[parties.server]", f'[parties.server]\naddress = "{ADDR["server"]}:7443"').replace("epochs = ", "epochs = 6 #"))
    ca, kits, admin = tmp_path / "ca", tmp_path / "kits", tmp_path / "admin"
    cli("authority", "--out", str(ca))
    cli("provision", str(plan), "--ca", str(ca), "--out", str(kits))
    for site in ("server", "hospital"):  # at each site, in its own kit: the key never leaves it
        cli("keys", "--name", site, "--out", str(kits / site))
    cli("keys", "--name", "alice", "--out", str(admin), "--role", "admin")
    cli("sign", str(kits / "server" / "server.csr"), str(kits / "hospital" / "hospital.csr"), str(admin / "alice.csr"),
        "--ca", str(ca))
    shutil.copy(ca / "ca.pem", admin)
    assert not any(p.name == "ca.key" for p in kits.rglob("*"))
    to = {s: f"{ADDR[s]}:7400" for s in sites}
    services = {s: subprocess.Popen(["ip", "netns", "exec", sites[s], sys.executable, "-m", "splitlearn", "serve",
                                     "--kit", str(kits / s), "--name", s, "--admin", to[s], "--status",
                                     f"{ADDR[s]}:7500", "--connect-timeout", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for s in sites}
    try:
        for s, proc in services.items():
            assert "takes runs at" in proc.stdout.readline()
        said = {s: ServiceLines(proc) for s, proc in services.items()}  # a line per run whose state changes
        for s in sites:  # the administrator, from the server's network
            cli("submit", str(plan), "--to", to[s], "--certs", str(admin), "--as", "alice", "--run", "first",
                ns=sites["server"])

        read = ("import json, sys, urllib.request\ntry:\n    print(urllib.request.urlopen(sys.argv[1], timeout=2).read()"
                ".decode())\nexcept OSError:\n    print('{}')")

        seen = {"last": None, "states": []}

        def stepping():  # the hospital's live status, over HTTP from the server's network, mid-run (a light poller)
            r = subprocess.run(["ip", "netns", "exec", sites["server"], sys.executable, "-c", read,
                                f"http://{ADDR['hospital']}:7500/status.json"], capture_output=True, text=True)
            state = json.loads(r.stdout or "{}")
            seen["last"] = state or r.stderr[-300:]
            if state.get("state") not in seen["states"]:
                seen["states"].append(state.get("state"))
            return state if state.get("state") == "training" and state.get("step", 0) >= 2 else None

        mid = until(stepping, lambda: f"the hospital's status mid-run (states seen, in order: {seen['states']}; the last "
                                      f"status: {str(seen['last'])[:400]}; the services said: "
                                      f"{ {s: (said[s].seen + list(said[s].lines.queue))[-5:] for s in said} })")
        assert mid["run"] == "vanilla" and mid["peers"] == {"server": True} and mid["bytes_sent"] > 0
        for s in sites:
            said[s].until("first", ("done", "failed"))
        assert all(runs(sites["server"], to[s], admin)["first"]["state"] == "done" for s in sites)
        result = json.loads((kits / "server" / "runs" / "first" / "result.json").read_text())
        assert result["transport"] == "grpc+mtls" and result["metrics"]["test_accuracy"] > 0.8  # 10 digits: chance 0.1

        # each site predicts from its own machine, with its kit; the server holds the head
        site_runs = {s: kits / s / "runs" / "first" for s in sites}
        preds = {s: subprocess.Popen(["ip", "netns", "exec", sites[s], sys.executable, "-m", "splitlearn", "party",
                                      str(plan), "--name", s, "--certs", str(kits / s), "--predict", str(site_runs[s]),
                                      "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for s in sites}
        outs = {s: p.communicate(timeout=120)[0] for s, p in preds.items()}
        assert all(p.returncode == 0 for p in preds.values()), outs
        merged = tmp_path / "merged"  # every site's part in one folder: the one-process predict's input
        shutil.copytree(site_runs["server"], merged)
        shutil.copytree(site_runs["hospital"] / "parties" / "hospital", merged / "parties" / "hospital")
        want = splitlearn.predict(merged, write=False)["digit"]
        with open(site_runs["server"] / "parties" / "server" / "predictions.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        assert [int(r[1]) for r in rows] == want["predictions"] and len(rows) == len(want["ids"]) > 300

        for s in sites:  # a second run, taken by the same services
            cli("submit", str(plan), "--to", to[s], "--certs", str(admin), "--as", "alice", "--run", "second",
                ns=sites["server"])
        assert all(said[s].until("second", ("done", "failed")) == "run 'second': done" for s in sites)

        cli("revoke", "hospital", "--ca", str(ca))
        shutil.copy(ca / "crl.pem", kits / "server")  # the authority's new list reaches the server
        for s in sites:
            cli("submit", str(plan), "--to", to[s], "--certs", str(admin), "--as", "alice", "--run", "third",
                ns=sites["server"])
        for s in sites:
            said[s].until("third", ("done", "failed"))
        third = {s: runs(sites["server"], to[s], admin)["third"] for s in sites}
        assert {e["state"] for e in third.values()} == {"failed"}
        assert "certificate of 'hospital' was revoked" in third["hospital"]["error"] + third["server"]["error"]
    finally:
        for proc in services.values():
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert Path(kits / "hospital" / "hospital.key").stat().st_mode & 0o077 == 0  # the key stayed private
