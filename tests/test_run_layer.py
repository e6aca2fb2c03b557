"""One run layer for every plan: clients runs get what plain runs have; schedules as strategies;
what the run layer says on the wire, round-tripped."""

import math

import pytest
import torch

import splitlearn
from splitlearn.api import train_prepared
from splitlearn.clients.context import Context
from splitlearn.clients.strategies import Strategy, strategy_of
from splitlearn.core.strategy import STRATEGIES
from splitlearn.wire.control import SendWeights, TakeTurn, WeightsLoaded
from splitlearn.privacy.noise import PrivacyAccountant
from splitlearn.launch.results import build_result
from splitlearn.run.report import Progress
from splitlearn.run.setup import prepare, setup_party
from splitlearn.launch.threads import run_local
from splitlearn.clients.baselines import method_plan
from splitlearn.wire import messages as m
from splitlearn.wire.codec import WireError

from .support import LogEvent, max_diff, module_state, tiny


def noisy(**clients):
    from splitlearn.core.wirespec import WireSpec

    return tiny(**clients).replace(wires={"bottom": WireSpec(noise={"clip": 5.0, "sigma": 1.0})})


def test_a_clients_plan_with_noise_reports_epsilon_over_every_turn():
    plan = noisy(count=3, schedule="sequential")
    result = splitlearn.train(plan)
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    b, epochs = plan.train.batch_size, plan.train.epochs
    expected = {}
    for c, share in zip(plan.clients.names(), ctx.shares):
        acc = PrivacyAccountant(1.0, min(1.0, b / len(share)), 1e-5)
        acc.step(epochs * math.ceil(len(share) / b))  # every noised step of every turn of this client
        expected[c] = acc.epsilon()
        assert result["parties"][c]["privacy"]["bottom->top"]["epsilon"] == pytest.approx(expected[c], rel=1e-12)
    top = result["privacy"]["bottom->top"]
    assert top["by"] == pytest.approx(expected, rel=1e-12)
    assert top["epsilon"] == pytest.approx(max(expected.values()), rel=1e-12)


def test_audit_of_a_three_client_sequential_run_has_a_distance_correlation_per_client(tmp_path):
    out = tmp_path / "run"
    splitlearn.train(tiny(count=3, schedule="sequential").with_train(epochs=1), out=out)
    from splitlearn.tools.audit import audit_run

    audit = audit_run(out, epochs=5)
    assert (out / "audit" / "audit.json").is_file()
    assert set(audit["clients"]) == {"hospital-1", "hospital-2", "hospital-3"}
    dcors = {c: a["wires"]["bottom->top"]["distance_correlation"] for c, a in audit["clients"].items()}
    assert all(isinstance(d, float) and 0 < d <= 1 for d in dcors.values()), dcors
    assert isinstance(audit["wires"]["bottom->top"]["distance_correlation"], float)  # all clients together


def test_the_step_timeout_reaches_the_turns_of_a_clients_run():
    plan = tiny(count=2, schedule="sequential", timeout=5.0).with_train(epochs=1)
    skipped = LogEvent("splitlearn.clients", "skipped hospital-2")

    def late(role, request, ins):  # hospital-2 starts its turn late: 1.5 s (within clients.timeout), or until skipped
        if isinstance(ins, TakeTurn) and role.name == "hospital-2":
            if role.step_timeout >= 5.0:  # the fault: 1.5 s late, over at once should the others give up on it
                skipped.wait(1.5)
            else:
                assert skipped.wait(60)  # the others gave up on it within the step timeout

    def run(**kw):
        p, setups, shapes = prepare(plan)
        return train_prepared(p, setups, shapes, faults={"hospital-2": late}, **kw)

    with skipped:
        assert run()["skipped"] == [] and not skipped.wait(0)  # late within the step timeout: never given up on
    with skipped:
        gave_up = run(timeout=0.5)["skipped"]
    assert [s["client"] for s in gave_up] == ["hospital-2"] and "within 0.5 s" in gave_up[0]["reason"]


@pytest.mark.parametrize("clients", [{}, {"count": 2, "schedule": "splitfed_v2"}])
def test_progress_carries_the_training_loss(clients):
    seen: list[Progress] = []
    result = splitlearn.train(tiny(**clients).with_train(epochs=2), on_step=seen.append)
    assert seen and seen[-1].done == seen[-1].total and seen[-1].epoch == 1 and seen[-1].epochs == 2
    train = [p for p in seen if p.mode == "train"]
    assert all(isinstance(p.loss, float) and p.loss > 0 for p in train)
    assert seen[0].unit == ("round" if clients else "step")
    if clients:  # a round's loss is the mean over its turns, as in result.json
        last_epoch = [p.loss for p in train if p.epoch == 1]
        assert last_epoch[-1] == pytest.approx(result["metrics"]["train_loss"][-1], rel=1e-9)


# -- one contract for every strategy ------------------------------------------------------------

def _one_client(schedule: str):
    base = tiny()
    if schedule == "fedavg":  # FedAvg trains the whole model at the client: compare with centralized
        from splitlearn.clients.baselines import centralized_plan

        return centralized_plan(base), method_plan(base, "fedavg", 1)
    return base, tiny(count=1, schedule=schedule)


BUILT_IN = ["sequential", "splitfed_v1", "splitfed_v2", "independent", "fedavg"]


def test_every_built_in_schedule_has_a_strategy():
    assert set(BUILT_IN) <= set(STRATEGIES)
    assert all(isinstance(STRATEGIES.get(k), Strategy) and STRATEGIES.get(k).name == k for k in BUILT_IN)


@pytest.mark.parametrize("schedule", sorted(BUILT_IN))
def test_strategy_contract_one_client_equals_the_plain_plan(schedule):
    plain_plan, clients_plan = _one_client(schedule)
    plain, setups, shapes = prepare(plain_plan)
    plain_result = build_result(plain, run_local(plain, setups, shapes))
    p, csetups, cshapes = prepare(clients_plan)
    reports = run_local(p, csetups, cshapes)
    result = build_result(p, reports)
    assert result["skipped"] == []
    one_model = STRATEGIES.get(schedule).one_model  # independent: the server's trained copy is the client's own
    for seg in ("bottom", "top") if one_model else ("bottom",):
        holder = setups.get("hospital") if seg in setups["hospital"].modules else setups["server"]
        mine = reports["hospital-1"].modules.get(seg) or reports["server"].modules[seg]
        assert max_diff(module_state(mine), module_state(holder.modules[seg])) < 1e-6, seg
    assert result["metrics"]["test_accuracy_per_epoch"] == pytest.approx(
        plain_result["metrics"]["test_accuracy_per_epoch"], abs=1e-9)


@pytest.mark.parametrize("schedule", ["fedavg", "splitfed_v1", "splitfed_v2"])  # the built-ins that average
def test_strategy_contract_averaging_is_weighted_by_samples(schedule):
    """Uneven shares: the federation's model is the sample-weighted mean of the clients' models."""
    from splitlearn.clients.weights import average

    kw = {"count": 3, "partition": {"kind": "dirichlet", "alpha": 0.3}}
    plan = (method_plan(tiny(**kw), "fedavg", 3) if schedule == "fedavg" else tiny(schedule=schedule, **kw))
    plan = plan.with_train(epochs=1)
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    sizes = [len(s) for s in ctx.shares]
    assert len(set(sizes)) == 3
    local = {}

    def capture(role, request, ins):  # the clients' own weights just before the averaged ones replace them
        if isinstance(ins, SendWeights) and ins.to == role.federation:
            local[role.name] = {k: v.clone() for k, v in role.client_state().items()}

    p, setups, shapes = prepare(plan)
    reports = run_local(p, setups, shapes, faults={c: capture for c in plan.clients.names()})
    assert set(local) == set(plan.clients.names())
    states = [local[c] for c in plan.clients.names()]
    got = {f"{seg}.{k}": v for seg, mod in reports["hospital-1"].modules.items() for k, v in mod.state_dict().items()}
    assert max_diff(got, average(states, sizes)) < 1e-6
    assert max_diff(got, average(states, [1, 1, 1])) > 1e-4


def test_strategies_own_their_rounds():
    plan = tiny(count=3, schedule="independent")
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    assert all(sorted(t.client for t in r.evals) == [0, 1, 2] for r in ctx.rounds)  # each evaluated on its own
    assert not strategy_of(plan).one_model and strategy_of(tiny(count=2)).one_model


# -- serialisation in one place -------------------------------------------------------------------

def _round_trip(msg: m.Message) -> m.Message:
    return m.decode(m.encode(msg))


def test_hello_command_reply_and_weights_round_trip():
    h = m.read_hello(_round_trip(m.hello("a", "b", "0123", "abcd")))
    assert h == {"protocol": m.PROTOCOL_VERSION, "plan_hash": "0123", "ids_hash": "abcd"}
    c = m.read_command(_round_trip(m.command("a", "b", TakeTurn(3, "hospital-2"), 7, 12.5)))
    assert c == (7, 12.5, TakeTurn(3, "hospital-2"))
    assert m.read_reply(_round_trip(m.reply("b", "a", 7, WeightsLoaded("fed")))) == (7, WeightsLoaded("fed"))
    state = {"bottom.0.weight": torch.randn(4, 3), "bottom.0.bias": torch.randn(4), "n": torch.tensor(3)}
    back = m.read_weights(_round_trip(m.weights("a", "b", state, 9)), state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_malformed_run_layer_texts_are_refused():
    bad = m.Message(m.Kind.COMMAND, "a", "b", text='{"do": 1}')
    with pytest.raises(WireError, match="'do' and 'request'"):
        m.read_command(bad)
    with pytest.raises(WireError, match="deadline is not a number"):
        m.read_command(m.Message(m.Kind.COMMAND, "a", "b", text='{"do": "x", "request": 1, "deadline": NaN}'))
    with pytest.raises(WireError, match="'reply' and 'request'"):
        m.read_reply(m.Message(m.Kind.ACK, "a", "b", text="[]"))
    state = {"w": torch.zeros(2)}
    poisoned = m.weights("a", "b", {"w": torch.tensor([1.0, math.nan])}, 1)
    with pytest.raises(WireError, match="non-finite"):
        m.read_weights(_round_trip(poisoned), state)
    with pytest.raises(WireError, match="do not fit"):
        m.read_weights(_round_trip(m.weights("a", "b", {"v": torch.zeros(2)}, 1)), state)
