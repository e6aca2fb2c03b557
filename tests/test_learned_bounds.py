"""Bounds learnt from the run (``[wires.SOURCE] max_jump``): values just inside ``max_abs`` cannot
wreck the model. A peer whose activations or gradients jump far past what the wire carried in its
first epoch is refused, counted per peer in ``result.json``, and the model trains as if it had
sent nothing but its honest values; ``max_jump = 0`` accepts them as before."""

from __future__ import annotations

import functools
import json
import tomllib

import pytest
import torch

import splitlearn
from splitlearn.core.bounds import LearntBounds
from splitlearn.core.load import load_plan
from splitlearn.core.graph import build_graph
from splitlearn.core.plan import plan_hash
from splitlearn.launch import threads as local
from splitlearn.run.checkpoint import Checkpoints, after_step
from splitlearn.run.report import RunError
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.codec import get_codec
from splitlearn.wire.messages import Kind
from splitlearn.wire.transport import InProcessHub

from .conftest import EXAMPLES
from .support import POISON, TARGETS, Poisoning, Server, f32, same_run, stop_after

pytestmark = pytest.mark.timeout(300)

ACT = "bottom->top"
EPOCHS = 2


def attack(monkeypatch, attacker: str, kind: Kind, steps: set[int]) -> None:
    """Every in-process run from here on has ``attacker`` poison ``steps``."""

    class Hub(InProcessHub):
        def transport(self, party):
            end = super().transport(party)
            return Poisoning(end, steps, kind) if party == attacker else end

    monkeypatch.setattr(local, "InProcessHub", Hub)


def vanilla(**wire):
    body = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    body["train"]["epochs"] = EPOCHS
    if wire:
        body["wires"] = {"bottom": wire}
    return load_plan(body)


def train_steps(plan, epoch: int) -> list[int]:
    _, setups, _ = prepare(plan)
    return [s.id for s in schedule(plan, setups["server"].splits) if s.mode == "train" and s.epoch == epoch]


@functools.cache
def honest():
    r = splitlearn.train(vanilla())
    return r["metrics"]["test_accuracy"], {(p, s): {k: v.detach().clone() for k, v in m.state_dict().items()}
                                           for p, mods in r.modules.items() for s, m in mods.items()}


def largest_weight(result, party: str) -> float:
    return max(float(p.detach().abs().max()) for m in result.modules[party].values() for p in m.parameters())


def jumps(result) -> dict[str, dict[str, int]]:
    return {p: v["refused_jumps"] for p, v in result["parties"].items()}


def same_weights(result) -> bool:
    _, clean = honest()
    now = {(p, s): m.state_dict() for p, mods in result.modules.items() for s, m in mods.items()}
    return all(torch.equal(now[p][k], clean[p][k]) for p in clean for k in clean[p])


def test_activations_of_9_9e5_are_refused_counted_and_leave_no_trace(monkeypatch):
    """During the first epoch: after 5 honest steps, 40 steps of 9.9e5 from the hospital."""
    plan = vanilla()
    attack(monkeypatch, "hospital", Kind.ACTIVATION, set(train_steps(plan, 0)[5:45]))
    r = splitlearn.train(plan)
    assert jumps(r) == {"hospital": {}, "server": {"hospital": 40}}
    assert len(r["parties"]["server"]["refused"]) == 40
    text = r["parties"]["server"]["refused"][0]
    assert "'hospital'" in text and ACT in text and "max_jump (1000)" in text and "so far" in text
    assert abs(r["metrics"]["test_accuracy"] - honest()[0]) < 0.005
    assert same_weights(r)  # the poisoned tensors never entered training


def test_gradients_of_9_9e5_are_refused_at_the_hospital(monkeypatch):
    """After the first epoch: 40 steps of 9.9e5 gradients from the server."""
    plan = vanilla()
    attack(monkeypatch, "server", Kind.GRADIENT, set(train_steps(plan, 1)[:40]))
    r = splitlearn.train(plan)
    assert jumps(r) == {"hospital": {"server": 40}, "server": {}}
    assert "in its first epoch" in r["parties"]["hospital"]["refused"][0]
    assert abs(r["metrics"]["test_accuracy"] - honest()[0]) < 0.005
    assert same_weights(r)


def test_max_jump_0_takes_the_gradients_as_before_and_they_wreck_the_model(monkeypatch):
    """Off, the same gradient attack is taken, as before this check: the issue's figures."""
    plan = vanilla(max_jump=0)
    attack(monkeypatch, "server", Kind.GRADIENT, set(train_steps(plan, 1)[:40]))
    r = splitlearn.train(plan)
    assert jumps(r) == {"hospital": {}, "server": {}}
    assert all(p["refused"] == [] for p in r["parties"].values())
    assert largest_weight(r, "hospital") > 1e6  # (0.4 in the honest run)
    assert r["metrics"]["test_accuracy"] < 0.2


def test_max_jump_0_takes_the_activations_as_before_and_they_wreck_the_server(monkeypatch):
    """Off, the activations are taken: the server's next gradients break max_abs, and the run stops."""
    plan = vanilla(max_jump=0)
    attack(monkeypatch, "hospital", Kind.ACTIVATION, set(train_steps(plan, 1)[:40]))
    with pytest.raises(RunError, match=r"the gradient tensor of step \d+ holds a value of magnitude .* over the "
                       "wire's max_abs"):
        splitlearn.train(plan)


def test_a_resumed_run_keeps_the_bounds_it_learnt(tmp_path, monkeypatch):
    """Resumed after the first epoch, the bound is the first epoch's (not learnt again from what
    comes next): the poison right after the resume is refused, and the run ends as one never stopped."""
    plan = vanilla().with_train(checkpoint_every=7)
    splitlearn.train(plan, out=tmp_path / "a")
    first = train_steps(plan, 1)
    with pytest.raises(Exception, match="stopped after"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(first[0] + 2))
    held = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints", plan_hash=plan_hash(plan)).cursors()
    assert max(held) == after_step(first[0] - 1)  # the first epoch's end (its last evaluation step)
    attack(monkeypatch, "hospital", Kind.ACTIVATION, set(first[:10]))
    splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["parties"]["server"]["refused_jumps"] == {"hospital": 10}


# tests/test_examples.py trains the others in full and asserts no refusal there
EXAMPLE_PLANS = sorted(p.stem for p in EXAMPLES.glob("*.toml") if p.stem not in TARGETS)


@pytest.mark.parametrize("name", EXAMPLE_PLANS)
def test_every_example_trains_without_a_learnt_bound_refusal(name):
    plan = load_plan(EXAMPLES / f"{name}.toml")
    assert {w.spec.max_jump for w in build_graph(plan).wires if w.carries == "activation"} == {1000}  # the default
    r = splitlearn.train(plan)
    assert r["parties"] and all(p["refused_jumps"] == {} and p["refused"] == [] for p in r["parties"].values())


@pytest.mark.parametrize("wire, train", [
    ({"noise": {"clip": 1.0, "sigma": 1.0}}, {}),
    ({"codec": "int8", "grad_codec": "topk:0.1"}, {}),
    ({"codec": "topk:0.2:ef", "grad_codec": "int8:channel"}, {}),
    ({"label_protection": {"kind": "max_norm"}}, {}),
    ({}, {"pipeline": 4}),
    ({}, {"epochs": 1, "batch_size": 1024}),  # a first epoch of two steps
])
def test_defenses_codecs_and_micro_batches_train_without_a_refusal(wire, train):
    plan = vanilla(**wire).with_train(**train)
    r = splitlearn.train(plan)
    assert all(p["refused_jumps"] == {} and p["refused"] == [] for p in r["parties"].values())


def test_an_evaluation_step_is_checked_against_the_first_epochs_bound_and_teaches_it_nothing():
    """The vanilla server, fed by hand: the first epoch's 45 training steps, then its evaluation."""
    srv = Server(steps=47)
    srv.greet()
    for i in range(45):
        srv.finish(i)
    ev = srv.steps[45]
    assert ev.mode == "eval" and srv.steps[44].mode == "train"
    act, lab = srv.good(45)
    honest_act = get_codec("float32").decode(act["t"])
    srv.h.send(Kind.ACTIVATION, ev.id, ACT, {"t": f32(torch.full_like(honest_act, POISON))})
    srv.h.send(Kind.ACTIVATION, ev.id, ACT, {"t": f32(honest_act * 10)})  # within the bound: taken
    srv.h.send(Kind.ACTIVATION, ev.id, "hospital.y->digit", lab)
    srv.finish(46)
    report = srv.done()
    assert report.refused_jumps == {"hospital": 1} and len(report.refused) == 1
    assert "in its first epoch" in report.refused[0]
    trained = max(float(get_codec("float32").decode(srv.good(i)[0]["t"]).abs().max()) for i in range(45))
    assert srv.party.bounds.top == {f"{ACT}/forward": trained}  # the evaluation's values taught nothing


def test_the_bound_follows_the_first_epoch_then_stays():
    b = LearntBounds()
    b.learn("w/forward", 0.0)  # the handshake's zeros or an unused output: no bound
    assert b.problem("w/forward", 1e5, 1000) is None
    b.learn("w/forward", 2.0)
    assert b.problem("w/forward", 2000.0, 1000) is None
    assert "so far (2)" in b.problem("w/forward", 2001.0, 1000)
    b.learn("w/forward", 3.0)
    b.freeze()  # the first evaluation step
    b.learn("w/forward", 2500.0)  # taken (it is within 1000x), but the bound no longer grows
    assert "in its first epoch (3)" in b.problem("w/forward", 3001.0, 1000)
    b.learn("w/backward", 0.5)  # a wire first seen after the freeze learns until the next one
    b.learn("w/backward", 0.7)
    assert b.problem("w/backward", 600.0, 1000) is None
    again = LearntBounds()
    again.load(json.loads(json.dumps(b.state())))  # what a checkpoint keeps
    assert again.state() == b.state() and again.problem("w/forward", 3001.0, 1000) is not None
