"""Resume at every moment: one party process of a plan running over gRPC is SIGKILLed at a chosen
moment (before the first checkpoint, when only it has checkpointed, mid-run, during the PSI
alignment, after its last checkpoint) and started again with ``--resume``; the run ends as a run
never stopped, or begins again from the start where no checkpoint is common.

Each moment is reached deterministically: the victim runs through a small driver that freezes it
(and writes a flag file) at that point of its own progress; the test waits for the flag, then kills."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import splitlearn
from splitlearn.run.allocator import math_threads

from .conftest import EXAMPLES
from .support import free_port, party_cmd, same_run

DRIVER = '''
"""Run `splitlearn party` (argv), frozen at the moment FREEZE names (a flag file written first)."""
import os, sys, time
from pathlib import Path

from splitlearn.run import align, checkpoint, session
from splitlearn.wire import link

when, flag = os.environ.get("FREEZE", ""), Path(os.environ.get("FREEZE_FLAG", "/nonexistent"))
release = Path(os.environ.get("FREEZE_RELEASE", "/nonexistent"))


def freeze():
    flag.write_text("frozen")
    while not release.exists():
        time.sleep(0.02)


kind, _, arg = when.partition(":")
saves = []
save = checkpoint.Checkpoints.save


def saving(self, cursor, tensors, manifest):  # a plain plan's cursor: (0, step)
    if kind == "save-before" and cursor.step == int(arg):
        freeze()
    out = save(self, cursor, tensors, manifest)
    saves.append(cursor)
    if kind == "save-after" and cursor.step == int(arg) or kind == "save-after-nth" and len(saves) == int(arg):
        freeze()
    return out


checkpoint.Checkpoints.save = saving
pumped = []
pump = align.Alignment.pump


def pumping(self):
    pumped.append(1)
    if kind == "pump" and len(pumped) == int(arg):
        freeze()
    return pump(self)


align.Alignment.pump = pumping
send = link.Link.send


def sending(self, msg):
    if kind == "goodbye" and msg.kind.name == "STOP" and msg.text == "done":
        freeze()
    return send(self, msg)


link.Link.send = sending
from splitlearn.cli import main

sys.argv = ["splitlearn", *sys.argv[1:]]
main()
'''


@pytest.fixture(scope="module")
def clinics_files(tmp_path_factory) -> Path:
    """The clinics example with its CSVs written, once for the module (each test copies it)."""
    work = tmp_path_factory.mktemp("clinics_files") / "clinics"
    shutil.copytree(EXAMPLES / "clinics", work, ignore=shutil.ignore_patterns("*.csv"))
    subprocess.run([sys.executable, str(work / "make_clinics.py")], check=True, capture_output=True)
    return work


def _clinics(tmp_path: Path, files: Path) -> Path:
    """A copy of the clinics example (``files``: its CSVs written) with a checkpoint every 4 training steps."""
    work = tmp_path / "clinics"
    shutil.copytree(files, work)
    plan = work / "clinics.toml"
    plan.write_text(plan.read_text().replace("seed = 0", "seed = 0\ncheckpoint_every = 4", 1))
    return plan


def _multi_task(tmp_path: Path) -> Path:
    plan = tmp_path / "multi_task.toml"
    plan.write_text((EXAMPLES / "multi_task.toml").read_text().replace("seed = 0", "seed = 0\ncheckpoint_every = 8", 1))
    return plan


class Run:
    """Every party of ``plan`` as a `splitlearn party` process over mutual TLS, each through the driver."""

    def __init__(self, tmp_path: Path, plan: Path, epochs: int):
        from splitlearn.core.load import load_plan
        from splitlearn.wire.transport.tls import make_certs

        self.tmp, self.plan, self.epochs = tmp_path, plan, epochs
        self.names = list(load_plan(plan).parties)
        make_certs(self.names, tmp_path / "certs")
        self.ports = {n: free_port() for n in self.names}
        self.out = tmp_path / "run"
        (tmp_path / "driver.py").write_text(DRIVER)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(math_threads(len(self.names))),
                    "FREEZE_RELEASE": str(tmp_path / "release")}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, freeze: str = "", *extra: str) -> Path:
        """Start party ``name`` (frozen at ``freeze``, if given); the flag file that says it froze."""
        flag = self.tmp / f"frozen-{name}-{len(list(self.tmp.glob('frozen-*')))}"
        cmd = party_cmd(self.plan, name, self.tmp / "certs", self.ports, self.out, "--epochs", str(self.epochs),
                        "--step-timeout", "60", *extra)
        cmd[1:3] = [str(self.tmp / "driver.py")]  # `python driver.py ARGS` instead of `python -m splitlearn ARGS`
        self.procs[name] = subprocess.Popen(cmd, env={**self.env, "FREEZE": freeze, "FREEZE_FLAG": str(flag)},
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return flag

    def wait_for(self, flag: Path, name: str, timeout: float = 120) -> None:
        """Until party ``name`` froze (its ``flag`` written); an error if it ends first (others may finish)."""
        deadline = time.monotonic() + timeout
        while not flag.exists():
            assert time.monotonic() < deadline, f"{flag.name} never froze"
            code = self.procs[name].poll()
            assert code is None, f"{name} ended (exit {code}) before it froze: {self.procs[name].stderr.read()[-3000:]}"
            time.sleep(0.02)

    def kill_and_resume(self, name: str, flag: Path) -> None:
        """SIGKILL ``name`` once it froze, and start it again with --resume."""
        self.wait_for(flag, name)
        self.procs[name].kill()
        self.procs[name].wait(timeout=30)
        self.start(name, "", "--resume")

    def finish(self) -> dict[str, str]:
        """The errors of the parties that failed (none: {}); ``result.json`` made from every report."""
        from splitlearn.core.load import load_plan
        from splitlearn.launch.oneparty import write_partial_result
        from splitlearn.clients.layout import Topology

        errors = {n: p.communicate(timeout=240)[1].decode() for n, p in self.procs.items()}
        failed = {n: e[-3000:] for n, e in errors.items() if self.procs[n].returncode != 0}
        if not failed:  # the lead may have written it before the last report was there
            body = load_plan(self.plan).with_train(epochs=self.epochs)
            write_partial_result(body, Topology.of(body), self.out, "grpc+mtls")
        return failed


def _reference(tmp_path: Path, plan: Path, epochs: int) -> Path:
    """The same plan run never stopped (in-process: the bytes and weights of party processes)."""
    splitlearn.train(plan, epochs=epochs, out=tmp_path / "reference")
    return tmp_path / "reference"


# moment -> (the server's freeze, the clinics' freeze)
MOMENTS = {
    "before_the_first_checkpoint": ("save-before:-1", ""),
    "when_only_the_server_checkpointed": ("save-after:-1", "save-before:-1"),
    "mid_run": ("save-after-nth:3", ""),
    "during_psi_alignment": ("pump:3", ""),
}


@pytest.fixture(scope="module")
def clinics_reference(tmp_path_factory, clinics_files) -> Path:
    """The clinics plan run once, never stopped, for every moment's comparison."""
    folder = tmp_path_factory.mktemp("clinics_reference")
    return _reference(folder, _clinics(folder, clinics_files), 1)


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_the_clinics_server_killed_then_resumed(tmp_path, clinics_files, clinics_reference, moment):
    """The PSI plan's server SIGKILLed at ``moment`` and started again with --resume: the run ends
    with the weights, metrics and bytes of a run never stopped (a session that begins again from the start counts
    as a new run: its resuming hellos and resume agreement are not the run's traffic)."""
    plan, reference = _clinics(tmp_path, clinics_files), clinics_reference
    server, clinics = MOMENTS[moment]
    run = Run(tmp_path, plan, 1)
    flag = run.start("server", server)
    for n in run.names:
        if n != "server":
            run.start(n, clinics)
    run.kill_and_resume("server", flag)
    (tmp_path / "release").write_text("go")  # the clinics held at their first checkpoint go on
    failed = run.finish()
    assert not failed, "\n".join(f"{n}: {e[-1500:]}" for n, e in failed.items())
    same_run(reference, run.out)
    for party in run.names:  # a session begun again aligned the rows as read, not those an earlier one kept
        data = [json.loads((folder / "parties" / party / "report.json").read_text())["data"] for folder in (reference, run.out)]
        assert data[0].get("alignment") == data[1].get("alignment"), (party, data[0].get("alignment"), data[1].get("alignment"))


def test_a_party_killed_after_its_last_checkpoint_is_answered_by_the_finished_ones(tmp_path):
    """multi_task: digit_lab SIGKILLed after its final checkpoint, before its goodbye, once parity_lab
    finished and left; started again with --resume, the hospital (done with its steps) answers it from
    its final state: both end, with the weights, metrics and bytes of a run never stopped."""
    plan = _multi_task(tmp_path)
    reference = _reference(tmp_path, plan, 1)
    run = Run(tmp_path, plan, 1)
    flag = run.start("digit_lab", "goodbye")
    for n in ("hospital", "parity_lab"):
        run.start(n)
    run.wait_for(flag, "digit_lab")
    assert run.procs["parity_lab"].wait(timeout=120) == 0  # finished and gone
    run.kill_and_resume("digit_lab", flag)
    failed = run.finish()
    assert not failed, "\n".join(f"{n}: {e[-1500:]}" for n, e in failed.items())
    same_run(reference, run.out)
