"""Horizontal clients as operating-system processes over gRPC with mutual TLS."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from splitlearn.launch.processes import launch
from splitlearn.clients.context import Context
from splitlearn.clients.roles import physical_names
from splitlearn.run.setup import setup_party
from splitlearn.core.load import load_plan
from splitlearn.wire.transport.tls import make_certs

from .conftest import EXAMPLES
from .support import free_port


def start_parties(plan_file, names: list[str], tmp_path, lead: str, *extra: str,
                  stderr=subprocess.DEVNULL) -> dict[str, subprocess.Popen]:
    """Every party of the plan as a ``splitlearn party`` process over mutual TLS (certificates made in ``tmp_path``),
    each in a session of its own; ``lead`` prints its progress on a pipe, ``extra`` are everyone's options."""
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    procs = {}
    for n in names:
        cmd = [sys.executable, "-m", "splitlearn", "party", str(plan_file), "--name", n, "--certs", str(tmp_path / "certs"),
               "--listen", f"127.0.0.1:{ports[n]}", "--connect-timeout", "60", *extra]
        cmd += [a for p in names if p != n for a in ("--peer", f"{p}=127.0.0.1:{ports[p]}")]
        cmd += ["--progress"] if n == lead else []
        procs[n] = subprocess.Popen(cmd, stdout=subprocess.PIPE if n == lead else subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
    return procs


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
    text = text.replace("seed = 0", "seed = 0\nreconnect_timeout = 1", 1)
    plan_file = tmp_path / "three.toml"
    plan_file.write_text(text)
    names = physical_names(load_plan(plan_file))
    assert names == ["server", "hospital-1", "hospital-2", "hospital-3"]
    procs = start_parties(plan_file, names, tmp_path, "server", "--out", str(tmp_path / "run"))
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


TRIPWIRE = """
import os, signal
from pathlib import Path

import torch


class Tripwire(torch.nn.Linear):
    \"\"\"A first layer that sends its own process a signal (SIGKILL: a crash; SIGINT: Ctrl-C) at its AT-th training
    forward, where the marker file names this process: "PID SIGNAL AT".\"\"\"

    def __init__(self, marker: str):
        super().__init__(64, 128)
        self.marker, self.trained = Path(marker), 0

    def forward(self, x):
        if self.training:
            self.trained += 1
            pid, sig, at = self.marker.read_text().split() if self.marker.exists() else ("", 0, 0)
            if pid == str(os.getpid()) and self.trained == int(at):
                os.kill(os.getpid(), int(sig))
        return super().forward(x)


def mlp(marker: str):
    return torch.nn.Sequential(Tripwire(marker), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))
"""


@pytest.mark.parametrize("schedule, how", [("sequential", signal.SIGKILL), ("fedavg", signal.SIGKILL),
                                           ("sequential", signal.SIGINT), ("sequential", signal.SIGTERM)],
                         ids=["killed", "fedavg-killed", "ctrl-c", "sigterm"])
def test_a_client_process_killed_inside_its_turn_fails_that_turn_at_once_not_after_the_step_timeout(tmp_path, schedule,
                                                                                                   how):
    """The coordinator waits inside a client's turn when the client's process dies (sequential: the server waits
    for its handshake's activation; FedAvg: the federation waits for the end of its local training): the turn fails
    as soon as the transport says the client is gone, naming why, not after the step timeout (60 s here, times the
    turn's steps for FedAvg; before, a client's loss reached no wait: the whole federation waited it out). Killed
    (SIGKILL), its stream is down past ``reconnect_timeout`` (1 s); stopped with Ctrl-C (SIGINT) or SIGTERM (a
    service's stop), it tells the turn's peers why and says goodbye, so a reconnect window of 60 s is not waited out.
    The client is then skipped and the other trains on."""
    text = (EXAMPLES / "sequential.toml").read_text()
    text = text.replace("count = 10", "count = 2").replace("epochs = 8", "epochs = 3").replace("timeout = 30", "timeout = 3")
    text = text.replace("seed = 0", f"seed = 0\nreconnect_timeout = {1 if how == signal.SIGKILL else 60}", 1)
    if schedule == "fedavg":  # the whole model at the client, averaged by a federation (as splitlearn compare runs it)
        server = '[parties.server]\noptimizer = { name = "sgd", lr = 0.05, momentum = 0.9 }\n'
        assert server in text
        text = text.replace(server, "").replace('party = "server"', 'party = "hospital"')
        text = re.sub(r'handoff = .*\n', "", text.replace('schedule = "sequential"', 'schedule = "fedavg"\nfederation = "fed"'))
    (tmp_path / "shares.toml").write_text(text)  # the same rows and shares, its own model (nothing imported here)
    shares = load_plan(tmp_path / "shares.toml")
    share = Context.from_setup(shares, setup_party(shares, "hospital")).shares[1]
    marker = tmp_path / "marker"
    text = text.replace('zoo = "mlp"\nargs = { sizes = [64, 128, 64, 10] }', f'factory = "tripwire:mlp"\nargs = {{ marker = "{marker}" }}')
    assert "tripwire:mlp" in text
    (tmp_path / "tripwire.py").write_text(TRIPWIRE)
    plan_file = tmp_path / "two.toml"
    plan_file.write_text(text)
    names = physical_names(load_plan(plan_file))
    coordinator = "fed" if schedule == "fedavg" else "server"
    assert names == [coordinator, "hospital-1", "hospital-2"]
    procs = start_parties(plan_file, names, tmp_path, coordinator, "--out", str(tmp_path / "run"), "--step-timeout", "60",
                          "--rejoin-wait", "1")
    steps = -(-len(share) // 32)  # hospital-2's training steps a round
    marker.write_text(f"{procs['hospital-2'].pid} {int(how)} {steps + 1}")  # its first training step of round 1
    try:
        first = procs[coordinator].stdout.readline().decode()  # the coordinator finished round 0
        assert first.startswith("progress 1 3 0 3 round train ")
        assert procs[coordinator].wait(timeout=50) == 0  # (waiting out the step timeout would take 60 s or more)
        assert procs["hospital-1"].wait(timeout=30) == 0
        assert procs["hospital-2"].wait(timeout=30) == (-signal.SIGKILL if how == signal.SIGKILL else 128 + how)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    report = json.loads((tmp_path / "run" / "parties" / coordinator / "report.json").read_text())
    (turn,) = [s for s in report["skipped"] if s["round"] == 1 and s["during"] == "train turn"]
    why = {signal.SIGKILL: "connection to 'hospital-2' lost, not back within 1 s",  # (its turn's peer: "hospital")
           signal.SIGINT: "hospital was stopped (Ctrl-C)", signal.SIGTERM: "hospital was stopped (SIGTERM)"}[how]
    assert turn["client"] == "hospital-2" and why in turn["reason"], turn
    assert {s["client"] for s in report["skipped"]} == {"hospital-2"} and (2, "hospital-2") in {
        (s["round"], s["client"]) for s in report["skipped"]}
    scorer = "hospital-1" if schedule == "fedavg" else coordinator  # (a federation's clients score the average)
    evals = [r for r in json.loads((tmp_path / "run" / "parties" / scorer / "report.json").read_text())["records"]
             if r["mode"] == "eval"]
    assert len(evals) == 3 and evals[-1]["losses"]["digit"]["test_accuracy"] > 0.5  # hospital-1 trained on


@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpoints", "none"])
def test_a_federation_process_stopped_for_good_ends_the_run_at_every_party_naming_it(tmp_path, checkpoints):
    """A fixed role (a federation of its own) stopped with SIGTERM mid-run and not started again: the run stops at
    every party, naming it. With checkpoints the coordinator first waits ``reconnect_timeout`` for it to come back as
    a new process (the run would go back to its last checkpoint with it); without, it stops at the first turn that
    fails. (Before, the run went on: every later turn failed, with checkpoints each waiting for it again.)"""
    text = (EXAMPLES / "sequential.toml").read_text().replace("count = 10", "count = 3").replace("epochs = 8", "epochs = 20")
    text = text.replace('schedule = "sequential"', 'schedule = "splitfed_v2"\nfederation = "fed"')
    plan_file = tmp_path / "splitfed.toml"
    plan_file.write_text(text.replace("seed = 0", "seed = 0\nreconnect_timeout = 2", 1))
    names = physical_names(load_plan(plan_file))
    assert names == ["server", "fed", "hospital-1", "hospital-2", "hospital-3"]
    procs = start_parties(plan_file, names, tmp_path, "server", "--log-format", "json",
                          *(["--out", str(tmp_path / "run")] if checkpoints else []), stderr=subprocess.PIPE)
    try:
        assert procs["server"].stdout.readline().decode().startswith("progress 1 20 0 20 round train ")
        procs["fed"].send_signal(signal.SIGTERM)
        said = {n: p.communicate(timeout=60)[1].decode() for n, p in procs.items()}  # (stderr read as it comes)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = {n: p.returncode for n, p in procs.items()}
    assert codes == {"server": 1, "fed": 143, "hospital-1": 1, "hospital-2": 1, "hospital-3": 1}, codes
    errors = {n: [json.loads(line)["message"] for line in text.splitlines() if line.startswith("{")
                  and json.loads(line)["level"] == "ERROR"] for n, text in said.items()}
    why = "fed is gone (fed closed its connection" + ("; not back as a new process within 2 s)" if checkpoints else ")")
    assert all(any(why in e for e in errors[n]) for n in names if n != "fed"), errors
    if checkpoints:
        assert json.loads((tmp_path / "run" / "parties" / "fed" / "error.json").read_text())["error"] == \
            "stopped by SIGTERM"


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
