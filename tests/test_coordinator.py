"""The coordinator of a ``[clients]`` run against a fake transport: fake participants answer its
typed instructions at once (no model is trained, nothing waits), so what it tells whom, whom it
skips and reports, what it averages and how it rewinds are read off exactly."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from splitlearn.clients.coordinator import Coordinator
from splitlearn.clients.parties import make_role
from splitlearn.core.load import load_plan
from splitlearn.core.specs import PlanError
from splitlearn.clients.baselines import method_plan
from splitlearn.wire import control as c
from splitlearn.wire.messages import Kind, Message, decode, encode, read_command, reply, weights
from splitlearn.wire.transport.base import Transport, TransportError, TransportTimeout

from .support import tiny


class Fake:
    """A participant that answers each instruction at once, as an honest one would (weights it
    sends are all ``value``); ``fails``: the turns it fails; ``restarts_at``: the turn before
    which it comes back as a new process (it says so, and fails that turn)."""

    def __init__(self, name: str, value: float = 0.0, fails: set[int] = frozenset(), restarts_at: int | None = None,
                 census: tuple[int, int] = (0, 0)):
        self.name, self.value, self.fails, self.restarts_at, self.census = name, value, set(fails), restarts_at, census
        self.heard: list[c.Instruction] = []
        self.weights_in: list[Message] = []
        self.saved: list[c.Cursor] = []
        self.net: FakeNetwork | None = None

    def hear(self, msg: Message) -> list[Message]:
        if msg.kind == Kind.WEIGHTS:
            self.weights_in.append(msg)
            return []
        request, _, ins = read_command(msg)
        self.heard.append(ins)
        net = self.net
        out = [self._answer(request, a) for a in self.answer(request, ins)]
        if isinstance(ins, c.SendWeights):
            out.append(weights(self.name, ins.to, {k: torch.full_like(v, self.value) for k, v in net.like.items()},
                               request))
        if isinstance(ins, c.SendAverage):
            out += [weights(self.name, who, net.like, r) for who, r in zip(ins.clients, ins.requests)]
        return out

    def answer(self, request: int, ins: c.Instruction) -> list[c.Reply]:
        if isinstance(ins, c.TakeTurn):
            if ins.turn == self.restarts_at:
                self.restarts_at = None
                self.net.restarted[self.name] = 1
                return [c.Rejoined(tuple(self.saved)), c.TurnDone(False, "it restarted")]
            if self.net.coordinator_takes_turns:
                return []
            return [c.TurnDone(ins.turn not in self.fails, "out of memory" if ins.turn in self.fails else "")]
        if isinstance(ins, c.LoadWeights):
            return [c.Ready()] * ins.ready + [c.WeightsLoaded(ins.source)]
        if isinstance(ins, c.Census):
            return [c.CensusAnswer(*self.census, {"x": {"dtype": "float32", "columns": ["a"]}})]
        if isinstance(ins, c.Collect):
            return [c.Collected(ins.clients, {})]
        if isinstance(ins, c.Checkpoint):
            self.saved.append(ins.cursor)
            return [c.Saved(ins.cursor)]
        if isinstance(ins, c.WhichCheckpoints):
            return [c.CheckpointsHeld(tuple(self.saved))]
        if isinstance(ins, c.Restore):
            return [c.Restored(ins.cursor) if ins.cursor in self.saved else c.NotRestored(ins.cursor)]
        if isinstance(ins, c.StartOver):
            self.saved.clear()
            return [c.StartedOver()]
        return []  # Rows, SendWeights, Download, MergeCopies, Stop: nothing to say

    def _answer(self, request: int, answer: c.Reply) -> Message:
        return reply(self.name, self.net.party, 0 if isinstance(answer, c.Rejoined) else request, answer)

    def kinds(self) -> set[type]:
        return {type(i) for i in self.heard}


class FakeNetwork(Transport):
    """The coordinator's transport: what it sends reaches the named fake at once; what the fakes
    send to the coordinator waits in its inbox (a message between fakes reaches the other fake)."""

    def __init__(self, party: str, fakes: list[Fake], coordinator_takes_turns: bool = False):
        self.party, self.fakes = party, {f.name: f for f in fakes}
        self.inbox: deque[tuple[str, bytes]] = deque()
        self.restarted: dict[str, int] = {}
        self.coordinator_takes_turns = coordinator_takes_turns
        self.like: dict[str, torch.Tensor] = {}  # the clients' weights: names, dtypes and shapes
        for f in fakes:
            f.net = self

    def send(self, dst: str, data: bytes) -> None:
        if dst not in self.fakes:
            raise TransportError(f"no party {dst!r}")
        self._deliver(decode(data))

    def _deliver(self, msg: Message) -> None:
        if msg.receiver == self.party:
            self.inbox.append((msg.sender, encode(msg)))
            return
        for out in self.fakes[msg.receiver].hear(msg):
            self._deliver(out)

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        if not self.inbox:
            raise TransportTimeout("nothing more will come")
        return self.inbox.popleft()

    def restarts(self, peer: str) -> int:
        return self.restarted.get(peer, 0)


def test_fedavg_round_by_round_a_failing_client_is_skipped_and_a_restarted_one_rewinds_everyone(tmp_path):
    plan = method_plan(tiny(count=3, partition={"kind": "dirichlet", "alpha": 0.3}), "fedavg", 3).with_train(epochs=3)
    fakes = [Fake(f"hospital-{k}", value=float(k)) for k in (1, 2, 3)]
    net = FakeNetwork("federation", fakes)
    coord = make_role(plan, "federation", net, out=tmp_path, rejoin_wait_s=5.0)
    assert isinstance(coord, Coordinator)
    net.like = dict(coord.global_state)
    rounds = coord.rounds
    turn = {(r.index, coord.clients[t.client]): t.index for r in rounds for t in r.train}
    fakes[1].fails = {turn[0, "hospital-2"]}  # hospital-2 fails round 0 and takes part again in round 1
    fakes[2].restarts_at = turn[1, "hospital-3"]  # hospital-3 comes back as a new process in round 1
    coord.coordinate()

    assert coord.skipped == [{"round": 0, "client": "hospital-2", "during": "train turn",
                              "reason": "its turn failed: out of memory"}]
    assert coord.attempt == 1  # one rewind, for the one restart
    for f in fakes:
        assert f.kinds() == {c.LoadWeights, c.TakeTurn, c.SendWeights, c.Checkpoint, c.WhichCheckpoints, c.Restore,
                             c.Stop}
        assert [i for i in f.heard if isinstance(i, c.Restore)] == [c.Restore(c.Cursor(1, -1), 1)]  # end of round 0
        assert f.heard[-1] == c.Stop(None) and f.saved == [c.Cursor.after_round(r) for r in (-1, 0, 1, 2)]
    # who trained and sent weights in each round (round 1 twice: before and after the rewind)
    sends = [(f.name, i) for f in fakes for i in f.heard if isinstance(i, c.SendWeights)]
    assert sorted(n for n, _ in sends) == ["hospital-1"] * 3 + ["hospital-2"] * 2 + ["hospital-3"] * 3
    assert all(i == c.SendWeights("federation") for _, i in sends)
    # what the federation averaged: round 0 without hospital-2, weighted by the rows each trained on
    n0 = rounds[0].samples
    after0 = (1.0 * n0[0] + 3.0 * n0[2]) / (n0[0] + n0[2])
    downloads = [m for m in fakes[0].weights_in if m.sender == "federation"]
    first_of_round1 = downloads[2]  # round 0: download and evaluation download, then round 1's
    assert all(torch.allclose(coord_tensor(first_of_round1, k), torch.full_like(v, after0), atol=0, rtol=1e-6)
               for k, v in net.like.items())
    n2 = rounds[2].samples
    last = sum(k * n2[k - 1] for k in (1, 2, 3)) / sum(n2.values())
    assert all(torch.allclose(v, torch.full_like(v, last), rtol=1e-6) for v in coord.global_state.values())
    assert abs(last - 2.0) > 1e-3  # weighted by rows, not a plain mean


def coord_tensor(msg: Message, name: str) -> torch.Tensor:
    from splitlearn.wire.codec import get_codec

    return get_codec("raw").decode(msg.tensors[name])


def _relay_plan(tmp_path):
    """Hospital clients reading their own files, a relay and a server, a federation of its own."""
    body = tiny().model_dump()
    body["parties"]["relay"] = {"optimizer": {"name": "sgd", "lr": 0.1}}
    body["parties"]["hospital"]["data"] = {"dataset": "npz", "path": str(tmp_path / "{client}.npz")}
    body["networks"]["mlp"]["args"]["sizes"] = [64, 8, 8, 10]
    body["segments"] = {
        "bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "mlp", "layers": [0, 2]},
        "middle": {"party": "relay", "inputs": ["bottom"], "network": "mlp", "layers": [2, 4]},
        "top": {"party": "server", "inputs": ["middle"], "network": "mlp", "layers": [4, 5]}}
    body["train"]["epochs"] = 2
    return load_plan({**body, "clients": {"template": "hospital", "count": 3, "schedule": "splitfed_v1",
                                          "federation": "fed"}})


def test_splitfed_v1_with_a_federation_of_its_own_and_per_client_files(tmp_path):
    plan = _relay_plan(tmp_path)
    clients = [Fake(f"hospital-{k}", census=(40 + 10 * k, 5 * (k != 2))) for k in (1, 2, 3)]  # hospital-2: no test rows
    relay, fed = Fake("relay"), Fake("fed")
    net = FakeNetwork("server", [*clients, relay, fed], coordinator_takes_turns=True)
    coord = make_role(plan, "server", net, out=tmp_path / "run", resume=True)  # resuming, but nobody holds anything
    turns = []

    def run_turn(turn, client, model=None):  # the coordinator's own part in a turn: no model is trained
        turns.append((turn.index, turn.mode, client))
        return (turn.round, client) != (0, "hospital-2"), "hospital-2 is gone"

    coord.run_turn = run_turn
    coord.coordinate()

    assert [len(s) for s in coord.ctx.shares] == [50, 60, 70]  # the census's counts
    assert coord.skipped == [{"round": 0, "client": "hospital-2", "during": "train turn",
                              "reason": "hospital-2 is gone"}]
    every = {c.Rows, c.WhichCheckpoints, c.StartOver, c.Checkpoint, c.Stop}
    for f in clients:
        assert f.kinds() == every | {c.Census, c.LoadWeights, c.TakeTurn, c.SendWeights}
        assert c.Rows((50, 60, 70), (5, 0, 5)) in f.heard
    assert relay.kinds() == every | {c.TakeTurn, c.MergeServerCopies}
    assert fed.kinds() == every | {c.SendAverage, c.Collect}
    # round 0: hospital-2 is left out of the average and of the merge; round 1: everyone
    collects = [i for i in fed.heard if isinstance(i, c.Collect)]
    merges = [i for i in relay.heard if isinstance(i, c.MergeServerCopies)]
    r0, r1 = coord.rounds[0].samples, coord.rounds[1].samples
    assert collects == [c.Collect(("hospital-1", "hospital-3"), (r0[0], r0[2])),
                        c.Collect(("hospital-1", "hospital-2", "hospital-3"), (r1[0], r1[1], r1[2]))]
    assert [(m.clients, m.samples) for m in merges] == [(x.clients, x.samples) for x in collects]
    # every evaluation scores the averaged model on each site's own test rows: the two clients with test rows
    evals = [client for _, mode, client in turns if mode == "eval"]
    assert evals == ["hospital-1", "hospital-3"] * 2
    loads = [i for i in clients[0].heard if isinstance(i, c.LoadWeights)]
    assert c.LoadWeights("fed", ready=True, evaluation=True) in loads and c.LoadWeights("fed") in loads
    downloads = [i for i in fed.heard if isinstance(i, c.SendAverage) and i.evaluation]  # the average to each site
    assert downloads and {client for d in downloads for client in d.clients} == {"hospital-1", "hospital-3"}


def test_a_census_with_a_different_schema_stops_everyone_naming_the_difference(tmp_path):
    plan = _relay_plan(tmp_path)
    clients = [Fake(f"hospital-{k}", census=(40, 5)) for k in (1, 2, 3)]
    odd = clients[2]
    odd.answer = lambda request, ins: ([c.CensusAnswer(40, 5, {"x": {"dtype": "float64", "columns": ["a"]}})]
                                       if isinstance(ins, c.Census) else Fake.answer(odd, request, ins))
    net = FakeNetwork("server", [*clients, Fake("relay"), Fake("fed")], coordinator_takes_turns=True)
    coord = make_role(plan, "server", net)
    with pytest.raises(PlanError) as e:
        coord.coordinate()
    assert "the data of hospital-3 differs from hospital-1's in field 'x': its dtype is 'float64'" in str(e.value)
    for f in net.fakes.values():
        assert isinstance(f.heard[-1], c.Stop) and "hospital-3" in f.heard[-1].reason


def test_a_client_that_refuses_the_download_sits_the_round_out_and_is_reported():
    plan = method_plan(tiny(count=2), "fedavg", 2).with_train(epochs=2)
    fakes = [Fake("hospital-1", 1.0), Fake("hospital-2", 2.0)]
    first = fakes[0]
    refusals = iter([c.WeightsRefused("federation", "weight 'bottom.0.weight' is not finite")])
    first.answer = lambda request, ins: ([next(refusals, c.WeightsLoaded("federation"))]
                                         if isinstance(ins, c.LoadWeights) else Fake.answer(first, request, ins))
    net = FakeNetwork("federation", fakes)
    coord = make_role(plan, "federation", net)
    net.like = dict(coord.global_state)
    coord.coordinate()
    assert coord.skipped == [{"round": 0, "client": "hospital-1", "during": "download", "reason":
                              "the federation's weights: hospital-1 refused them: \"weight 'bottom.0.weight' is "
                              "not finite\""}]
    turns = [i.turn for i in first.heard if isinstance(i, c.TakeTurn)]
    round_of = {t.index: r.index for r in coord.rounds for t in (*r.train, *r.evals)}
    assert [round_of[t] for t in turns] == [1, 1]  # round 1's training turn and its evaluation; none in round 0
