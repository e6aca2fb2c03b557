"""Horizontal clients as operating-system processes over gRPC with mutual TLS."""

import json
import os
import signal
import subprocess
import sys

from splitlearn.launch.processes import launch
from splitlearn.clients.roles import physical_names
from splitlearn.core.load import load_plan
from splitlearn.wire.transport.tls import make_certs

from .conftest import EXAMPLES
from .support import free_port


def test_ten_client_processes_complete_and_match_the_in_process_run(tmp_path):
    from splitlearn import train

    plan = EXAMPLES / "sequential.toml"
    result = launch(plan, tmp_path / "run", epochs=1)
    assert result["transport"] == "grpc+mtls"
    assert result["schedule"]["clients"] == 10 and not result["skipped"] and not result["failed_processes"]
    assert [p for p in result["parties"] if p.startswith("hospital-")] == [f"hospital-{k}" for k in range(1, 11)]
    same = train(load_plan(plan).with_train(epochs=1), out=tmp_path / "in-process")  # checkpoints, as the processes
    assert result["metrics"]["test_accuracy"] == same["metrics"]["test_accuracy"] > 0.5
    for name, p in result["parties"].items():  # the same FLOPs; bytes up to the commands' timestamps
        assert p["flops"] == same["parties"][name]["flops"]
        assert abs(p["bytes_sent"] - same["parties"][name]["bytes_sent"]) <= 64


def test_a_killed_client_process_is_skipped_and_the_run_completes(tmp_path):
    """A client that is gone for good: the coordinator waits ``reconnect_timeout`` for it to come
    back (it keeps checkpoints: --out), then skips it for the rest of the run. (Its hand-off in the round
    of the kill is waited for twice the clients' ``timeout``: the least that healthy clients on a loaded
    machine answer within, as in test_lying_client.py.)"""
    text = (EXAMPLES / "sequential.toml").read_text()
    text = text.replace("count = 10", "count = 3").replace("epochs = 8", "epochs = 4").replace("timeout = 30", "timeout = 3")
    text = text.replace("seed = 0", "seed = 0\nreconnect_timeout = 3", 1)
    plan_file = tmp_path / "three.toml"
    plan_file.write_text(text)
    names = physical_names(load_plan(plan_file))
    assert names == ["server", "hospital-1", "hospital-2", "hospital-3"]
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    procs = {}
    for n in names:
        cmd = [sys.executable, "-m", "splitlearn", "party", str(plan_file), "--name", n, "--certs", str(tmp_path / "certs"),
               "--out", str(tmp_path / "run"), "--listen", f"127.0.0.1:{ports[n]}", "--connect-timeout", "60"]
        cmd += [a for p in names if p != n for a in ("--peer", f"{p}=127.0.0.1:{ports[p]}")]
        if n == "server":
            cmd.append("--progress")
        procs[n] = subprocess.Popen(cmd, stdout=subprocess.PIPE if n == "server" else subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = procs["server"].stdout.readline().decode()  # the coordinator finished round 0
        assert first.startswith("progress 1 4 0 4 round train ")
        os.killpg(procs["hospital-2"].pid, signal.SIGKILL)
        assert procs["server"].wait(timeout=120) == 0
        for n in ("hospital-1", "hospital-3"):
            assert procs[n].wait(timeout=30) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    report = json.loads((tmp_path / "run" / "parties" / "server" / "report.json").read_text())
    skipped = {(s["round"], s["client"]) for s in report["skipped"]}
    assert {(2, "hospital-2"), (3, "hospital-2")} <= skipped  # from the round after the kill on
    assert {c for _, c in skipped} == {"hospital-2"}
    later = [s["reason"] for s in report["skipped"] if s["round"] > 1 and s["during"] == "checkpoint"]
    assert later and all("given up on earlier" in r for r in later)  # not asked, nor waited for, again
    evals = [r for r in report["records"] if r["mode"] == "eval"]
    assert len(evals) == 4 and evals[-1]["losses"]["digit"]["test_accuracy"] > 0.5  # training went on


def test_splitfed_with_a_federation_process_of_its_own_matches_in_process(tmp_path):
    from splitlearn import train

    text = (EXAMPLES / "sequential.toml").read_text().replace("count = 10", "count = 4").replace("epochs = 8", "epochs = 2")
    plan_file = tmp_path / "splitfed.toml"
    plan_file.write_text(text.replace('schedule = "sequential"', 'schedule = "splitfed_v2"\nfederation = "fed"'))
    result = launch(plan_file, tmp_path / "run")
    assert list(result["parties"])[:2] == ["server", "fed"] and not result["skipped"]
    same = train(load_plan(plan_file))
    assert result["metrics"]["test_accuracy_per_epoch"] == same["metrics"]["test_accuracy_per_epoch"]
    received = sum(r["payload"] for r in result["parties"]["fed"]["received"] if r["direction"] == "weights")
    assert received == 2 * 4 * (64 * 128 + 128) * 4  # every client's bottom, every round
