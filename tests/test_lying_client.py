"""A client with a valid identity that lies to the coordinator cannot stop or stall the federation.

Each role of a ``[clients]`` plan runs in a thread over the in-process transport, with checkpoints
(an ``--out`` folder) and a coordinator that waits for failed parties to come back (``rejoin_wait_s``),
as party processes do; one test runs real party processes over mutual TLS.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from splitlearn.clients.context import Context
from splitlearn.clients.participant import Participant
from splitlearn.core.engine import PartyError
from splitlearn.core.plan import Plan
from splitlearn.run.setup import prepare
from splitlearn.clients.layout import Topology, physical_setups
from splitlearn.clients.parties import physical_party
from splitlearn.wire.control import Rejoined, SendWeights, TakeTurn
from splitlearn.wire.messages import encode, reply
from splitlearn.wire.messages import weights as weights_message
from splitlearn.wire.transport import InProcessHub
from splitlearn.wire.transport.inprocess import InProcessTransport

from .conftest import EXAMPLES
from .support import free_port, party_cmd, tiny

pytestmark = pytest.mark.timeout(240)


class Incarnations(InProcessTransport):
    """The coordinator's end of the hub, told by the test when a peer 'came back as a new process'
    (what the gRPC transport learns from a new incarnation in the peer's SYNC)."""

    def __init__(self, hub: InProcessHub, party: str):
        super().__init__(hub, party)
        self.seen: dict[str, int] = {}

    def restarts(self, peer: str) -> int:
        return self.seen.get(peer, 0)


def launch(plan: Plan, out: Path, faults: dict | None = None, rejoin_wait_s: float = 30.0, box: dict | None = None):
    """Every role of ``plan`` in a thread, with checkpoints in ``out``: (roles, what each ended with:
    its report or its exception). ``box["coord"]``: the coordinator's transport, for the hooks."""
    plan, setups, shapes = prepare(plan)
    topo = Topology.of(plan)
    hub = InProcessHub(topo.names)
    held = physical_setups(plan, topo, setups)
    ctx = Context.from_setup(plan, setups[plan.clients.template])
    coord = Incarnations(hub, topo.coordinator)
    if box is not None:
        box["coord"] = coord
    roles = {n: physical_party(plan, n, held[n], coord if n == topo.coordinator else hub.transport(n), context=ctx,
                               fault=(faults or {}).get(n), out=out, rejoin_wait_s=rejoin_wait_s)
             for n in topo.names}
    ended: dict = {}

    def work(n: str) -> None:
        try:
            ended[n] = roles[n].run(None)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            ended[n] = e

    threads = {n: threading.Thread(target=work, args=(n,), daemon=True) for n in topo.names}
    for t in threads.values():
        t.start()
    threads[topo.coordinator].join(200)
    for t in threads.values():
        t.join(30)
    hub.close()
    assert set(ended) == set(topo.names), f"still running: {set(topo.names) - set(ended)}"
    return roles, ended


def _lie(role: Participant) -> None:
    """Say 'I came back as a new process' (as a follower started with --resume does)."""
    role.link.send(reply(role.name, role.coordinator, 0, Rejoined(tuple(role.checkpoints.cursors()))))


def _fail_turns(role: Participant) -> None:
    role.run_turn = lambda *a, **k: (False, "this client fails its turn")


def test_a_client_that_claims_restarts_it_never_made_sends_nobody_back(tmp_path):
    """Issue case 2: hospital-2 says it came back before every turn, then fails the turn. The old
    coordinator believed it and sent every party back 20 times, then gave up (exit 1)."""
    plan = tiny(count=3, schedule="sequential", timeout=1.0).with_train(epochs=3)
    lies = []

    def liar(role, request, ins):
        if isinstance(ins, TakeTurn):
            lies.append(ins.turn)
            _lie(role)
            _fail_turns(role)

    roles, ended = launch(plan, tmp_path, {"hospital-2": liar})
    assert all(not isinstance(e, BaseException) for e in ended.values()), ended  # every party: the run completed
    server = roles["server"]
    assert server.attempt == 0  # nobody went back to a checkpoint
    claims = [r for r in ended["server"].refused if "says it came back as a new process" in r]
    assert len(lies) == 3 and len(claims) == 3 and all("hospital-2" in r for r in claims)
    turns = [s for s in server.skipped if s["during"] == "train turn"]
    assert [(s["round"], s["client"]) for s in turns] == [(0, "hospital-2"), (1, "hospital-2"), (2, "hospital-2")]
    assert {s["client"] for s in server.skipped} == {"hospital-2"}
    assert not server.given_up  # it stayed connected: never waited for


def test_a_real_restart_sends_everyone_back_once_and_no_more(tmp_path):
    """One restart the transport saw (a new incarnation): every party goes back once; the same
    client's later claims are refused."""
    plan = tiny(count=3, schedule="sequential", timeout=1.0).with_train(epochs=2)
    box: dict = {"claims": 0}

    def restarts_once_then_lies(role, request, ins):
        if not isinstance(ins, TakeTurn):
            return
        if not box["claims"]:  # it really came back as a new process: the coordinator's transport saw it
            box["coord"].seen["hospital-2"] = 1
            role.resuming = True  # and waits for the word to go back, dropping this turn
        else:
            _fail_turns(role)
        box["claims"] += 1
        _lie(role)

    roles, ended = launch(plan, tmp_path, {"hospital-2": restarts_once_then_lies}, box=box)
    assert all(not isinstance(e, BaseException) for e in ended.values()), ended
    assert box["claims"] >= 2
    assert roles["server"].attempt == 1  # once, for the one restart
    refused = [r for r in ended["server"].refused if "says it came back as a new process" in r]
    assert len(refused) == box["claims"] - 1


def test_an_honest_client_told_to_stop_because_the_run_failed_fails_naming_why(tmp_path):
    """A restart that holds no checkpoint the others hold ends the run: every party is told why
    and ends with that error (the old coordinator sent a plain stop: the clients 'succeeded')."""
    plan = tiny(count=3, schedule="sequential", timeout=1.0).with_train(epochs=2)
    box: dict = {}

    def restarts_empty(role, request, ins):
        if isinstance(ins, TakeTurn) and "done" not in box:
            box["done"] = True
            box["coord"].seen["hospital-2"] = 1  # a new process ...
            role.checkpoints.set_aside()  # ... with nothing to go back to
            role.resuming = True
            _lie(role)

    roles, ended = launch(plan, tmp_path, {"hospital-2": restarts_empty}, box=box)
    assert isinstance(ended["server"], PartyError)
    assert "no checkpoint is held by every party" in str(ended["server"])
    for honest in ("hospital-1", "hospital-3"):
        e = ended[honest]
        assert isinstance(e, PartyError), f"{honest} ended with {e!r}"
        assert "server stopped the run" in str(e) and "no checkpoint is held by every party" in str(e)


@pytest.mark.parametrize("schedule, during, culprit", [("splitfed_v2", "averaging", "hospital-2"),
                                                        ("sequential", "hand-off", "hospital-1")])
def test_refused_weights_are_skipped_at_once_naming_the_refusal(tmp_path, caplog, schedule, during, culprit):
    """Issue case 8: weights that are refused (here: NaN) skip their sender at once, the reason says
    they were refused and why; nobody waits for a party whose stream never broke."""
    plan = tiny(count=3, schedule=schedule, handoff="server", timeout=1.0).with_train(epochs=2)
    poisoned = []

    def poison(role, request, ins):
        if not isinstance(ins, SendWeights) or poisoned:
            return
        poisoned.append(request)
        real = role.send_weights

        def bad(to, request):
            nan = {k: torch.full_like(v, float("nan")) for k, v in role.client_state().items()}
            role.link.send(weights_message(role.name, to, nan, request))
            role.send_weights = real

        role.send_weights = bad

    with caplog.at_level(logging.WARNING, logger="splitlearn.clients"):
        roles, ended = launch(plan, tmp_path, {culprit: poison}, rejoin_wait_s=60.0)
    assert poisoned and all(not isinstance(e, BaseException) for e in ended.values()), ended
    skips = [s for s in roles["server"].skipped if s["during"] == during]
    assert [s["client"] for s in skips] == [culprit]
    assert "refused" in skips[0]["reason"] and "non-finite" in skips[0]["reason"], skips[0]
    assert "did not come" not in skips[0]["reason"]
    assert not [r for r in caplog.records if "waiting up to" in r.getMessage()]  # not waited for
    assert not roles["server"].given_up


def test_early_weights_are_bounded_per_sender(tmp_path):
    """Issue case 9: one client cannot fill what the federation keeps for weights that come
    before their command: one message per sender is kept, the rest refused and counted."""
    plan, setups, _ = prepare(tiny(count=3, schedule="splitfed_v2", timeout=1.0))
    topo = Topology.of(plan)
    hub = InProcessHub(topo.names)
    held = physical_setups(plan, topo, setups)
    server = physical_party(plan, "server", held["server"], hub.transport("server"),
                            context=Context.from_setup(plan, setups["hospital"]))
    state = server.global_state
    flood, other = hub.transport("hospital-1"), hub.transport("hospital-3")
    for request in range(100, 106):  # six unsolicited weights messages from one client
        flood.send("server", encode(weights_message("hospital-1", "server", state, request)))
    other.send("server", encode(weights_message("hospital-3", "server", state, 7)))
    server.await_messages(["hospital-2"], 30.0, lambda *_: None,
                          until=lambda: len(server.early_weights) + server.link.refused_count >= 7)
    assert sorted(server.early_weights) == [("hospital-1", 100), ("hospital-3", 7)]
    refusals = [r for r in server.link.refused if "early weights" in r]
    assert server.link.refused_count == 5 and len(refusals) == 5 and all("hospital-1" in r for r in refusals)
    got = server.take_weights(["hospital-1", "hospital-3"], 7, 0.01)  # hospital-3's request comes
    assert list(got) == ["hospital-3"] and not server.early_weights  # hospital-1's other request was stale: dropped
    hub.close()


LIAR = '''
import sys

import splitlearn.clients.participant as participant
from splitlearn.wire.control import Rejoined, TakeTurn
from splitlearn.wire.messages import reply

made = participant.Participant.__init__


def lying(self, *a, **k):  # hospital-2's own certificate and code: it only lies
    made(self, *a, **k)

    def liar(role, request, ins):
        if isinstance(ins, TakeTurn):
            role.link.send(reply(role.name, role.coordinator, 0, Rejoined(tuple(role.checkpoints.cursors()))))
            role.run_turn = lambda *a, **k: (False, "this client fails its turn")

    self.fault = liar


participant.Participant.__init__ = lying
sys.argv = ["splitlearn", *sys.argv[1:]]
from splitlearn.cli import main

main()
'''


def test_a_lying_client_process_stops_nobody_and_every_process_says_how_the_run_ended(tmp_path):
    """Issue case 2 against real ``splitlearn party`` processes over mutual TLS: hospital-2 (a valid
    certificate) claims a restart before each of its turns and fails them. The old server went back
    to a checkpoint 20 times and exited 1, the honest clients exited 0; now the run completes,
    the claims are refused and hospital-2 is skipped, named."""
    from splitlearn.clients.roles import physical_names
    from splitlearn.core.load import load_plan
    from splitlearn.wire.transport.tls import make_certs

    text = (EXAMPLES / "sequential.toml").read_text()
    text = text.replace("count = 10", "count = 3").replace("epochs = 8", "epochs = 2").replace("timeout = 30", "timeout = 3")
    plan = tmp_path / "three.toml"
    plan.write_text(text.replace("seed = 0", "seed = 0\nreconnect_timeout = 60\nstep_timeout = 3", 1))  # a step as an answer
    (tmp_path / "liar.py").write_text(LIAR)
    names = physical_names(load_plan(plan))
    make_certs(names, tmp_path / "certs")
    ports = {n: free_port() for n in names}
    out = tmp_path / "run"
    procs = {}
    for n in names:
        cmd = party_cmd(plan, n, tmp_path / "certs", ports, out)
        if n == "hospital-2":
            cmd = [sys.executable, str(tmp_path / "liar.py"), *cmd[3:]]  # python liar.py party PLAN ...
        procs[n] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        errors = {n: procs[n].communicate(timeout=200)[1].decode() for n in ("server", "hospital-1", "hospital-3")}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert {n: procs[n].returncode for n in errors} == {"server": 0, "hospital-1": 0, "hospital-3": 0}, errors
    assert "went back to a checkpoint" not in errors["server"] and "waiting up to" not in errors["server"]
    report = json.loads((out / "parties" / "server" / "report.json").read_text())
    claims = [r for r in report["refused"] if "says it came back as a new process" in r]
    assert len(claims) == 2 and all("hospital-2" in r for r in claims)  # one per turn it had
    assert [(s["round"], s["client"], s["during"]) for s in report["skipped"]] == \
        [(0, "hospital-2", "train turn"), (1, "hospital-2", "train turn")]
    evals = [r for r in report["records"] if r["mode"] == "eval"]
    assert len(evals) == 2 and evals[-1]["losses"]["digit"]["test_accuracy"] > 0.5  # training went on


def test_a_restart_that_never_says_back_is_waited_for_once(tmp_path, caplog):
    """The transport saw hospital-2 come back as a new process, but it never says 'back' (started
    without --resume) and fails its turns: waited for once (up to ``rejoin_wait_s``), then skipped at
    once, nobody going back."""
    plan = tiny(count=3, schedule="sequential", timeout=1.0).with_train(epochs=3)
    box: dict = {}

    def silent_restart(role, request, ins):
        if isinstance(ins, TakeTurn):
            box["coord"].seen["hospital-2"] = 1
            _fail_turns(role)

    with caplog.at_level(logging.WARNING, logger="splitlearn.clients"):
        roles, ended = launch(plan, tmp_path, {"hospital-2": silent_restart}, rejoin_wait_s=2.0, box=box)
    assert all(not isinstance(e, BaseException) for e in ended.values()), ended
    waits = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waits) == 1 and "hospital-2" in waits[0]
    assert roles["server"].attempt == 0 and not roles["server"].given_up  # connected: not given up on
    assert [s["round"] for s in roles["server"].skipped if s["during"] == "train turn"] == [0, 1, 2]
