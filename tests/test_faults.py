"""Checkpoints and resume: a run stopped anywhere (an error, or every process killed with
SIGKILL) and started again with resume ends with the weights, metrics and bytes of a run never
stopped; a checkpoint torn by a kill during its write is never used."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.run.checkpoint import Checkpoints, after_step, folder_name
from splitlearn.wire.control import Cursor

from .conftest import EXAMPLES
from .support import DROPOUT, PLAN, free_port, kill_tree, party_cmd, process_state, same_run, stop_after, weights



def dropout_plan(folder: Path) -> Path:
    """The Dropout plan of test_randomness (support.PLAN), its factory module under a name of its own (one module
    name is one module in a process)."""
    (folder / "fault_nets.py").write_text(DROPOUT)
    (folder / "dropout.toml").write_text(PLAN.replace("dropout_nets:", "fault_nets:"))
    return folder / "dropout.toml"


@pytest.mark.parametrize("example", ["vanilla", "u_shaped", "multi_hop", "dropout"])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, example):
    plan = dropout_plan(tmp_path) if example == "dropout" else EXAMPLES / f"{example}.toml"
    body = load_plan(plan).with_train(epochs=2, checkpoint_every=7)
    splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 30 steps"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after(30))
    held = Checkpoints(tmp_path / "b" / "parties" / next(iter(body.parties)) / "checkpoints",
                       plan_hash=plan_hash(body)).cursors()
    assert len(held) == 2 and max(held) < after_step(30)  # the last two, both before the stop
    splitlearn.train(body, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")


def test_a_torn_checkpoint_is_never_used(tmp_path):
    body = load_plan(EXAMPLES / "vanilla.toml").with_train(epochs=2, checkpoint_every=5)
    splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after(40))
    ck = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints", plan_hash=plan_hash(body))
    older, latest = ck.cursors()
    state = ck.folder / folder_name(latest) / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a kill in the middle of the write
    (ck.folder / f".{folder_name(after_step(latest.step + 5))}.tmp").mkdir()  # and one that never got its rename
    assert ck.cursors() == [older]
    splitlearn.train(body, out=tmp_path / "b", resume=True)  # the hospital holds both: they agree on the older
    same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("lost", ["the last all hold", "every checkpoint"])
def test_parties_holding_different_checkpoints_agree_on_the_last_they_all_hold(tmp_path, lost):
    """One party lost checkpoints: the parties go on from the last they all still hold, or, holding none in common,
    begin again from the start, counted as a new run (the resuming hellos are not the run's traffic)."""
    import shutil

    body = load_plan(EXAMPLES / "multi_hop.toml").with_train(epochs=2, checkpoint_every=5)
    splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after(40))
    held = {p: Checkpoints(tmp_path / "b" / "parties" / p / "checkpoints", plan_hash=plan_hash(body))
            for p in body.parties}
    common = set.intersection(*(set(ck.cursors()) for ck in held.values()))
    first = next(iter(body.parties))  # the party at one end of the chain
    if lost == "every checkpoint":
        shutil.rmtree(held[first].folder)
        expected = None
    else:  # which ones each holds depends on where each party was when the run stopped
        shutil.rmtree(held[first].folder / folder_name(max(common)))
        expected = max(common - {max(common)}, default=None)
    splitlearn.train(body, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")
    set_aside = sorted(p for p in body.parties if list((tmp_path / "b" / "parties" / p).glob("checkpoints.before-*")))
    assert set_aside == (sorted(set(body.parties) - {first} if lost == "every checkpoint" else body.parties)
                         if expected is None else [])


def test_every_party_process_killed_with_sigkill_then_resumed(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text((EXAMPLES / "vanilla.toml").read_text().replace("seed = 0", "seed = 0\ncheckpoint_every = 5", 1))
    cli = [sys.executable, "-m", "splitlearn", "run", str(plan), "--epochs", "1", "-q"]
    splitlearn.train(plan, epochs=1, out=tmp_path / "a")  # = party processes, exactly (test_network)
    proc = subprocess.Popen([*cli, "--out", str(tmp_path / "b")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints",
                     plan_hash=plan_hash(load_plan(plan).with_train(epochs=1)))
    deadline = time.monotonic() + 120
    while len(ck.cursors()) < 2 and time.monotonic() < deadline:  # mid-epoch: after the second checkpoint
        time.sleep(0.05)
    victims = kill_tree(proc.pid)  # the launcher and every party process it started
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # SIGKILL is delivered at once; the kernel reaps a moment later
    while (alive := [p for p in victims[1:] if Path(f"/proc/{p}").exists() and "zombie" not in process_state(p)]) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive
    assert not (tmp_path / "b" / "result.json").exists()
    from typer.testing import CliRunner

    from splitlearn.cli import app

    # the same command, its launcher in this process (the party processes are new ones all the same)
    done = CliRunner().invoke(app, [*cli[3:], "--out", str(tmp_path / "b"), "--resume"])
    assert done.exit_code == 0, done.output
    same_run(tmp_path / "a", tmp_path / "b")


def test_resume_without_a_run_folder_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from splitlearn.cli import app

    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--out", str(tmp_path / "none"), "--resume"])
    assert r.exit_code != 0 and "holds no run to go on with" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--out", str(tmp_path), "--resume", "--force"])
    assert r.exit_code != 0 and "give one of them" in " ".join(r.output.split())


def test_a_new_run_clears_an_earlier_runs_checkpoints_and_resume_ignores_another_plans(tmp_path):
    body = load_plan(EXAMPLES / "vanilla.toml").with_train(epochs=2, checkpoint_every=5)
    splitlearn.train(body, out=tmp_path / "a")
    folder = tmp_path / "a" / "parties" / "server" / "checkpoints"
    assert Checkpoints(folder, plan_hash=plan_hash(body)).cursors()
    other = body.with_train(seed=3)  # another plan (hash): its run may not go on from these
    assert Checkpoints(folder, plan_hash=plan_hash(other)).cursors() == []
    splitlearn.train(other, out=tmp_path / "a", resume=True)  # nothing in common: from the start
    splitlearn.train(other, out=tmp_path / "b")  # (only the resume's hellos add bytes)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) == 0.0
    short = body.with_train(epochs=1)
    splitlearn.train(short, out=tmp_path / "a")  # from the start: only its own checkpoints are left
    names = sorted(p.name for p in folder.iterdir())
    assert names == [folder_name(c) for c in Checkpoints(folder, plan_hash=plan_hash(short)).cursors()]
    # a plain plan is one round: its checkpoints are named by their cursors (0, step), after steps of the run
    assert len(names) == 2 and all(re.fullmatch(r"round-000000-step-\d{9}", n) for n in names), names


# (the server of a plan killed mid-run: tests/test_resume_moments.py, on the PSI plan of the clinics)
@pytest.mark.parametrize("example, victim", [("multi_hop", "relay_1")])  # (a client killed: the SplitFed test below)
def test_one_party_killed_and_restarted_with_resume_while_the_others_wait(tmp_path, example, victim):
    """SIGKILL one party process mid-epoch; its neighbours wait for it; started again with --resume it
    goes back to the last checkpoint every party holds, they go back with it, and the run ends with
    the weights of a run never stopped."""
    from splitlearn.wire.transport.tls import make_certs

    plan = tmp_path / f"{example}.toml"
    plan.write_text((EXAMPLES / f"{example}.toml").read_text().replace("seed = 0", "seed = 0\ncheckpoint_every = 4", 1))
    body = load_plan(plan).with_train(epochs=1)  # killed at about step 8 of 45
    reference = splitlearn.train(body)
    names = list(body.parties)
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    out = tmp_path / "run"
    from splitlearn.run.allocator import math_threads

    # the math threads `splitlearn run` gives parties sharing this machine (as in-process runs use)
    env = {**os.environ, "OMP_NUM_THREADS": str(math_threads(len(names)))}
    procs = {n: subprocess.Popen(party_cmd(plan, n, tmp_path / "certs", ports, out, "--epochs", "1"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in names}
    ck = Checkpoints(out / "parties" / victim / "checkpoints", plan_hash=plan_hash(body))
    deadline = time.monotonic() + 120
    while len([c for c in ck.cursors() if c.step >= 0]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    procs[victim].kill()  # SIGKILL, mid-epoch
    procs[victim].wait(timeout=30)
    procs[victim] = subprocess.Popen(party_cmd(plan, victim, tmp_path / "certs", ports, out, "--epochs", "1",
                                               "--resume"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    errors = {n: p.communicate(timeout=240)[1].decode() for n, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), errors
    ref = {f"{p}/{seg}.{k}": v for p, mods in reference.modules.items() for seg, m in mods.items()
           for k, v in m.state_dict().items()}
    got = weights(out)
    assert ref.keys() == got.keys()
    assert max((ref[k].double() - got[k].double()).abs().max().item() for k in ref) == 0.0


def _clients_plan(folder: Path, schedule: str, count: int = 3, epochs: int = 3) -> Path:
    """The sequential example with ``schedule``, ``count`` clients, short timeouts and ``epochs``."""
    text = (EXAMPLES / "sequential.toml").read_text()
    text = text.replace('schedule = "sequential"', f'schedule = "{schedule}"').replace("count = 10", f"count = {count}")
    text = text.replace("timeout = 30 ", "timeout = 5 ").replace("epochs = 8", f"epochs = {epochs}")
    text = text.replace("seed = 0", "seed = 0\nreconnect_timeout = 60", 1)
    plan = folder / f"{schedule}.toml"
    plan.write_text(text)
    return plan


def _same_weights(a: Path, b: Path) -> None:
    """The weights of every physical party that ``b`` holds equal ``a``'s (``b`` may lack the
    launcher's summary: the template's final model, ``parties/hospital``)."""
    ref, got = weights(a), weights(b)
    if "hospital/bottom.0.weight" not in got:
        ref = {k: v for k, v in ref.items() if not k.startswith("hospital/")}
    assert ref.keys() == got.keys() and ref
    assert max((ref[k].double() - got[k].double()).abs().max().item() for k in ref) == 0.0


@pytest.mark.parametrize("schedule", ["sequential", "splitfed_v1", "splitfed_v2"])
def test_a_clients_run_stopped_after_a_round_resumes_to_the_same_weights(tmp_path, schedule):
    """Every role saves its state at the end of every round (weights, optimizers, server copies,
    the federation's average, random streams, records); resume goes back to the last round all hold."""
    plan = load_plan(_clients_plan(tmp_path, schedule))
    reference = splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 2 steps"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(2))
    ck = Checkpoints(tmp_path / "b" / "parties" / "hospital-2" / "checkpoints", plan_hash=plan_hash(plan))
    held = ck.cursors()
    assert held == [Cursor.after_round(0), Cursor.after_round(1)]  # the last two rounds' ends (the start is gone)
    # named by their cursors, as a plain plan's are: the end of round r is the start of round r + 1
    assert sorted(p.name for p in ck.folder.iterdir()) == ["round-000001-step--00000001", "round-000002-step--00000001"]
    resumed = splitlearn.train(plan, out=tmp_path / "b", resume=True)
    _same_weights(tmp_path / "a", tmp_path / "b")
    assert resumed["metrics"]["test_accuracy_per_epoch"] == reference["metrics"]["test_accuracy_per_epoch"]
    assert resumed["metrics"]["train_loss"] == reference["metrics"]["train_loss"]
    for p in reference["parties"]:  # the FLOPs of a run never stopped (its bytes: plus the resume's commands)
        assert resumed["parties"][p]["flops"] == reference["parties"][p]["flops"], p
    assert not resumed.get("skipped")


def test_one_splitfed_client_killed_and_restarted_with_resume_while_the_others_wait(tmp_path):
    """SplitFed v2 over mutual TLS, one process per role: SIGKILL a client mid-run; the coordinator
    finds its turn failed and waits for it; started again with --resume it says so, every party goes
    back to the end of the last round all of them hold, and the run ends with the weights of a run
    never stopped."""
    from splitlearn.run.allocator import math_threads
    from splitlearn.wire.transport.tls import make_certs

    plan = _clients_plan(tmp_path, "splitfed_v2", epochs=2)  # killed in round 1, the last: resumed from round 0's end
    body = load_plan(plan)
    splitlearn.train(body, out=tmp_path / "reference")
    names = ["server", *body.clients.names()]
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    out, victim = tmp_path / "run", "hospital-2"
    env = {**os.environ, "OMP_NUM_THREADS": str(math_threads(len(names)))}
    procs = {n: subprocess.Popen(party_cmd(plan, n, tmp_path / "certs", ports, out), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in names}
    ck = Checkpoints(out / "parties" / victim / "checkpoints", plan_hash=plan_hash(body))
    deadline = time.monotonic() + 120
    while Cursor.after_round(0) not in ck.cursors() and time.monotonic() < deadline:  # round 0 is done: kill it
        time.sleep(0.02)  # in round 1
    procs[victim].kill()
    procs[victim].wait(timeout=30)
    procs[victim] = subprocess.Popen(party_cmd(plan, victim, tmp_path / "certs", ports, out, "--resume"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors = {n: p.communicate(timeout=240)[1].decode() for n, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), errors
    assert "came back as a new process; every party went back to the end of round" in errors["server"]
    _same_weights(tmp_path / "reference", out)
