"""The launchers from Python: ``splitlearn.train(plan, launcher=...)`` runs the same plan in threads or in
party processes to the same weights, and a party process is started through a function, not the CLI."""

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch

import splitlearn
from splitlearn.api import split_plan
from splitlearn.core.specs import PlanError
from splitlearn.launch.party import PartyOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_party_processes_from_python_train_to_the_weights_of_threads(tmp_path):
    """``launcher="processes"``: one process per party over gRPC with mutual TLS, forked through
    :func:`~splitlearn.launch.party.party_process`; the result's model is read back from the run folder
    and equals the in-process run's bit for bit (same seed, CPU)."""
    plan = EXAMPLES / "vanilla.toml"
    threads = splitlearn.train(plan, epochs=1, launcher="threads")
    processes = splitlearn.train(plan, epochs=1, launcher="processes", out=tmp_path / "run")
    assert _forkers() == []  # the forker that forked them is ended and reaped with the run
    assert processes["transport"] == "grpc+mtls" and threads["transport"] == "in-process"
    a, b = threads.model.state_dict(), processes.model.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert processes["metrics"]["test_accuracy"] == threads["metrics"]["test_accuracy"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"] == processes["metrics"]
    copy = processes.save(tmp_path / "copy")  # the folder the processes wrote, as they wrote it
    for name in ("result.json", "parties/server/report.json", "parties/hospital/weights.safetensors"):
        assert (copy / name).read_bytes() == (tmp_path / "run" / name).read_bytes()


def test_launcher_mistakes_are_one_clear_error(tmp_path):
    plan = EXAMPLES / "vanilla.toml"
    with pytest.raises(PlanError, match=r"(?s)unknown launcher 'gpu'.*threads.*processes.*ray"):
        splitlearn.train(plan, epochs=1, launcher="gpu")
    with pytest.raises(PlanError, match=r"write their weights and reports to a run folder"):
        splitlearn.train(plan, epochs=1, launcher="processes")
    built = split_plan(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)),
                                  cut=1, data="digits")
    with pytest.raises(PlanError, match=r"read the plan from its file: this plan was built in Python"):
        splitlearn.train(built, launcher="processes", out=tmp_path / "x")
    with pytest.raises(PlanError, match=r"link applies to party processes"):
        splitlearn.train(plan, epochs=1, link="50ms")
    with pytest.raises(PlanError, match=r"timeout does not reach launcher='processes': set \[train\] step_timeout"):
        splitlearn.train(plan, epochs=1, launcher="processes", out=tmp_path / "x", timeout=5.0)
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(PlanError, match=r"unknown optimizer 'sgdz'"):  # refused while the forker was warming up
        splitlearn.train({**tomllib.loads(plan.read_text()), "parties": {
            "hospital": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgdz", "lr": 0.1}},
            "server": {"optimizer": {"name": "sgd", "lr": 0.1}}}}, launcher="processes", out=tmp_path / "y")
    assert _forkers() == []  # the party processes' forker, started before the plan was read, is not left behind


def _forkers() -> list[int]:
    """This process's children that are party-process forkers (a zombie has no command line: not counted)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"forker" in cmd:
            found.append(int(stat.parent.name))
    return found


def test_party_options_travel_as_json_and_unknown_keys_are_refused():
    opts = PartyOptions("plan.toml", "server", insecure=True, peers={"hospital": "127.0.0.1:5"}, dial_out=("a",),
                        epochs=2, step_timeout_s=3.5)
    assert PartyOptions.from_json(opts.to_json()) == opts
    with pytest.raises(ValueError, match=r"unknown keys \['argv'\]"):
        PartyOptions.from_json(json.dumps({"plan": "p", "name": "n", "argv": ["party"]}))


def test_party_processes_wait_passively_after_a_short_spin_unless_the_user_says_otherwise(monkeypatch):
    """Party processes on one machine: math threads sleep while their party waits (PASSIVE), after a short spin
    between two operations (GOMP_SPINCOUNT); a user's own settings are kept as they are."""
    from splitlearn.launch.processes import child_env

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    env = child_env(2)
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"]) == ("PASSIVE", "25000")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert child_env(None)["GOMP_SPINCOUNT"] == "0"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    for policy in ("active", "PASSIVE"):  # the user's policy: GNU OpenMP's own spin for it (PASSIVE: none)
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        env = child_env(None)
        assert env["OMP_WAIT_POLICY"] == policy and "GOMP_SPINCOUNT" not in env


def test_every_party_process_tunes_the_allocator_however_it_started(monkeypatch, capsys):
    """Forked by the launcher, spawned or ``splitlearn party``: each runs ``party_process``, which tunes the C
    library's allocator first (before, a forked party, the launcher's default, never did)."""
    from splitlearn.launch.party import PartyOptions, party_process
    from splitlearn.run import allocator

    tuned = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda: tuned.append(True) or True)
    assert party_process(PartyOptions(plan="plan.toml", name="hospital")) == 2  # no --certs: refused at once
    assert tuned == [True] and "give --certs" in capsys.readouterr().err
