"""Horizontal clients: schedules equal their unsplit counterparts, exact accounting, skipped clients."""

import gc
import json
import logging
import threading
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

from splitlearn.clients.baselines import centralized_plan, method_plan
from splitlearn.tools.compare import predict_cost
from splitlearn.clients.context import Context
from splitlearn.wire.control import Checkpoint, LoadWeights, SendWeights, TakeTurn
from splitlearn.core.strategy import STRATEGIES
from splitlearn.clients.secure import SecurePhase
from splitlearn.launch.results import build_result as merge_reports
from splitlearn.wire.messages import weights as weights_message
from splitlearn.wire.messages import Kind
from splitlearn.models import build_segment
from splitlearn.core.plan import Plan
from splitlearn.core.specs import PlanError
from splitlearn.core.load import load_plan
from splitlearn.run.setup import prepare, setup_party
from splitlearn.launch.threads import run_local
from splitlearn.core.engine import Party
from splitlearn.run.agreement import Agreement

from .support import LogEvent, max_diff, module_state, tiny


def run_clients(plan: Plan, **kw) -> dict:
    """Every physical party of the plan in this process: their reports."""
    plan, setups, shapes = prepare(plan)
    return run_local(plan, setups, shapes, **kw)


def run_parties(setups, shapes) -> dict:
    plan = next(iter(setups.values())).plan
    return run_local(plan, setups, shapes)


def test_sequential_peer_handoff_equals_centralized_on_the_same_batches():
    plan = tiny(count=3, schedule="sequential", handoff="peer")
    reports = run_clients(plan)
    # the reference: the unsplit model, one optimizer, every client's batches in the schedule's order
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    data = setup_party(plan, "hospital").inputs
    ref = {s: build_segment(plan, s) for s in ("bottom", "top")}
    before = {s: module_state(m) for s, m in ref.items()}
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=0.1)
    for rnd in ctx.rounds:
        for turn in rnd.train:
            for step in turn.steps:
                opt.zero_grad()
                F.cross_entropy(ref["top"](ref["bottom"](data["hospital.x"][step.rows])),
                                data["hospital.y"][step.rows]).backward()
                opt.step()
    last = reports["hospital-3"].modules["bottom"]  # the last client holds the latest bottom
    assert max_diff(module_state(last), module_state(ref["bottom"])) < 1e-5
    assert max_diff(module_state(reports["server"].modules["top"]), module_state(ref["top"])) < 1e-5
    assert max_diff(module_state(ref["bottom"]), before["bottom"]) > 1e-2  # and training did move the weights
    # every client trained on its own rows, disjoint and together all the training rows
    rows = [torch.cat([s.rows for s in t.steps]) for t in ctx.rounds[0].train]
    assert sum(len(r) for r in rows) == len(torch.unique(torch.cat(rows))) == sum(len(s) for s in ctx.shares)


@pytest.mark.parametrize("schedule", ["splitfed_v1", "splitfed_v2", "sequential"])
def test_one_client_equals_the_plain_plan(schedule):
    plain, setups, shapes = prepare(tiny())
    plain_reports = run_parties(setups, shapes)
    plan = tiny(count=1, schedule=schedule)
    reports = run_clients(plan)
    assert max_diff(module_state(reports["hospital-1"].modules["bottom"]),
                    module_state(setups["hospital"].modules["bottom"])) < 1e-6
    assert max_diff(module_state(reports["server"].modules["top"]), module_state(setups["server"].modules["top"])) < 1e-6
    ours = merge_reports(plan, {k: v for k, v in reports.items()})["metrics"]
    theirs = plain_reports["server"].metrics["digit"]
    assert ours["test_accuracy_per_epoch"] == pytest.approx(theirs["test_accuracy"], abs=1e-9)
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)


def test_fedavg_with_one_client_and_one_local_step_equals_centralized_sgd():
    base = tiny()
    central, setups, shapes = prepare(centralized_plan(base))
    run_parties(setups, shapes)
    fed = method_plan(base, "large_batch", 1)
    assert fed.clients.schedule == "fedavg" and fed.clients.local_steps == 1
    reports = run_clients(fed)
    mine = reports["hospital-1"].modules
    for seg in ("bottom", "top"):
        assert max_diff(module_state(mine[seg]), module_state(setups["hospital"].modules[seg])) < 1e-6


def _payload(table: list, wire: str, direction: str) -> int:
    return sum(r["payload"] for r in table if r["wire"] == wire and r["direction"] == direction)


def test_bytes_and_flops_of_each_method_match_a_hand_count():
    hidden = 8
    bottom_values = 64 * hidden + hidden  # Linear(64, 8): weight + bias
    model_values = bottom_values + hidden * 10 + 10
    # sequential, 2 clients, 1 epoch: activations up and gradients down, one hand-off 1 -> 2
    plan = tiny(hidden, count=2, schedule="sequential").with_train(epochs=1)
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    res = merge_reports(plan, run_clients(plan))
    for k, name in enumerate(("hospital-1", "hospital-2")):
        rows = len(ctx.shares[k])
        p = res["parties"][name]
        wire = next(w["name"] for w in res["wires"] if w["carries"] == "activation")
        assert _payload(p["sent"], wire, "forward") == (rows + 1) * hidden * 4  # + the handshake's one row
        assert _payload(p["received"], wire, "backward") == rows * hidden * 4
        # forward 2*64*8 per row; backward only the weight gradient (the input is raw data): 2*64*8;
        # the handshake's row of zeros is not training work and is not counted
        assert p["flops"] == rows * 2 * (2 * 64 * hidden)
    assert _payload(res["parties"]["hospital-1"]["sent"], "weights", "weights") == bottom_values * 4
    assert _payload(res["parties"]["hospital-2"]["received"], "weights", "weights") == bottom_values * 4

    # FedAvg, 2 clients, 2 rounds of one local epoch: the whole model down and up each round
    fed = method_plan(tiny(hidden), "fedavg", 2)
    res = merge_reports(fed, run_clients(fed))
    ctx = Context.from_setup(fed, setup_party(fed, "hospital"))
    for k, name in enumerate(("hospital-1", "hospital-2")):
        p = res["parties"][name]
        assert _payload(p["received"], "weights", "weights") == 2 * model_values * 4
        assert _payload(p["sent"], "weights", "weights") == 2 * model_values * 4
        rows = 2 * len(ctx.shares[k])  # two epochs
        fwd = 2 * 64 * hidden + 2 * hidden * 10
        bwd = 2 * 64 * hidden + 2 * (2 * hidden * 10)  # layer 2 also passes a gradient down to layer 1
        assert p["flops"] == rows * (fwd + bwd)

    # SplitFed v2, 2 clients, 2 rounds: the bottom down and up each round beside the activations
    sf = tiny(hidden, count=2, schedule="splitfed_v2")
    ctx = Context.from_setup(sf, setup_party(sf, "hospital"))
    res = merge_reports(sf, run_clients(sf))
    for k, name in enumerate(("hospital-1", "hospital-2")):
        p = res["parties"][name]
        assert _payload(p["received"], "weights", "weights") == _payload(p["sent"], "weights", "weights") \
            == 2 * bottom_values * 4
        wire = next(w["name"] for w in res["wires"] if w["carries"] == "activation")
        # + the first turn's handshake row: the second turn's session takes what that handshake agreed
        assert _payload(p["sent"], wire, "forward") == (2 * len(ctx.shares[k]) + 1) * hidden * 4
        assert p["flops"] == 2 * len(ctx.shares[k]) * 2 * (2 * 64 * hidden)

    # centralized: one party, no bytes; its meter also holds the evaluation forward passes
    central, setups, shapes = prepare(centralized_plan(tiny(hidden)))
    rep = run_parties(setups, shapes)["hospital"]
    train, test = len(setups["hospital"].splits.train), len(setups["hospital"].splits.test)
    fwd = 2 * 64 * hidden + 2 * hidden * 10
    bwd = 2 * 64 * hidden + 2 * (2 * hidden * 10)
    assert rep.meter["bytes_sent"] == 0
    assert rep.meter["flops"] == 2 * (train * (fwd + bwd) + test * fwd)

    # large-batch SGD: one step per round, the model down and up every step
    lb = method_plan(tiny(hidden), "large_batch", 2)
    ctx = Context.from_setup(lb, setup_party(lb, "hospital"))
    res = merge_reports(lb, run_clients(lb))
    steps = len(ctx.rounds)
    assert steps == 2 * -(-max(len(s) for s in ctx.shares) // 32)
    for name in ("hospital-1", "hospital-2"):
        assert _payload(res["parties"][name]["received"], "weights", "weights") == steps * model_values * 4
        assert _payload(res["parties"][name]["sent"], "weights", "weights") == steps * model_values * 4


@pytest.mark.parametrize("schedule", ["splitfed_v2", "splitfed_v1", "sequential"])
def test_a_clients_later_turns_take_its_first_handshake_and_train_bit_for_bit_as_with_one_a_turn(schedule,
                                                                                                  monkeypatch):
    plan = tiny(8, count=3, schedule=schedule).with_train(epochs=3)
    counted = []
    step = Party.step

    def counting(self, *args, **kwargs):
        counted.append(args[2] if len(args) > 2 else kwargs.get("mode"))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Party, "step", counting)
    kept = run_clients(plan)
    kept_handshakes, turns = counted.count("handshake"), merge_reports(plan, kept)
    counted.clear()
    monkeypatch.setattr(Agreement, "held", lambda self, party, heard: False)  # a handshake every turn, as before
    every = run_clients(plan)
    assert kept_handshakes == 2 * 3  # each client's first turn, at the client and at the server
    assert counted.count("handshake") > 2 * 3 * 3  # a turn each, more than one a client and epoch
    for name in ("server", "hospital-1", "hospital-2", "hospital-3"):
        for seg, module in kept[name].modules.items():
            assert max_diff(module_state(module), module_state(every[name].modules[seg])) == 0.0, (name, seg)
    assert turns["metrics"] == merge_reports(plan, every)["metrics"]


def test_an_agreement_read_back_from_a_checkpoint_is_the_one_kept_and_anything_else_holds_none():
    kept = Agreement("ids/turn-3", {"bottom->top": ("float32", (8,))}, {"hospital.y": 10})
    assert Agreement.loaded(json.loads(json.dumps(kept.state()))) == kept
    for bad in (None, 3, "x", ["t", "not a dict", {}], [5, {}, {}], ["t", {"w": ["float32", ["a"]]}, {}],
                ["t", {}, {"hospital.y": "ten"}]):
        assert Agreement.loaded(bad) == Agreement(), bad  # a handshake at the next turn


@pytest.mark.parametrize("method", ["sequential", "splitfed_v2", "fedavg", "large_batch"])
def test_measured_per_client_cost_is_within_two_percent_of_the_cost_model(method):
    base = tiny(128, count=4).with_train(epochs=2)
    plan = method_plan(base, method, 4)
    res = merge_reports(plan, run_clients(plan))
    train_rows = sum(len(s) for s in Context.from_setup(plan, setup_party(plan, "hospital")).shares)
    pred = predict_cost(plan, method, train_rows)
    assert res["per_client"]["flops"]["mean"] == pytest.approx(pred["flops"], rel=0.02)
    assert res["per_client"]["bytes"]["mean"] == pytest.approx(pred["bytes"], rel=0.02)


def test_a_client_that_stops_answering_is_skipped_reported_and_the_run_completes():
    plan = tiny(count=3, schedule="sequential", timeout=1.0).with_train(epochs=3)
    state = {"turns": 0}

    def dies(role, request, ins):  # hospital-2 trains once, then its process is gone
        if isinstance(ins, TakeTurn):
            state["turns"] += 1
            if state["turns"] == 2:
                raise SystemExit("killed")

    logging.disable(logging.WARNING)  # (the test's log capture would keep the failures' records, and what they name)
    try:
        reports = run_clients(plan, faults={"hospital-2": dies})
    finally:
        logging.disable(logging.NOTSET)
    res = merge_reports(plan, reports)
    held = [weakref.ref(m) for r in reports.values() for m in r.modules.values()]
    del reports
    gc.collect(1)  # what the next run in this process collects before it freezes the heap (run/allocator.py)
    # no old cycle keeps the parties (the failed one's error held the run's frame, and it every party: the next run
    # of a sweep froze all of them for its own length)
    assert held and all(r() is None for r in held)
    skipped = {(s["round"], s["client"]) for s in res["skipped"]}
    assert {(1, "hospital-2"), (2, "hospital-2")} <= skipped
    assert all(c == "hospital-2" for _, c in skipped)
    assert len(res["metrics"]["test_accuracy_per_epoch"]) == 3 and res["metrics"]["test_accuracy"] > 0.5


FAILING_AT = {"turn": TakeTurn, "load": LoadWeights, "send": SendWeights, "checkpoint": Checkpoint,
              "secure": SecurePhase}
AVERAGING = ["fedavg", "splitfed_v1", "splitfed_v2"]
FAILURES = ([(s, m, "") for s in sorted(STRATEGIES.names()) for m in ("turn", "load", "send", "checkpoint")]
            + [(s, m, "federation apart") for s in AVERAGING for m in ("load", "send")]  # its Collect, SendAverage
            + [(s, "secure", "secure aggregation") for s in AVERAGING])  # its phases: the second, "masked"


@pytest.mark.parametrize("schedule, moment, variant", FAILURES, ids=lambda v: str(v).replace(" ", "-") or "plain")
def test_a_client_failing_at_any_command_is_skipped_at_once_naming_that_it_left(tmp_path, schedule, moment, variant):
    """Every schedule, a client failing when a command of each kind comes (its second of that kind: it has done
    one): its process would close its connection, and every wait for it, the turn's, a hand-off's, a download's,
    the federation's collection (a federation of its own too), secure aggregation's phases, a checkpoint's, stops at
    once, its skip naming that it left, never the minute its answers and steps may take (``clients.timeout``,
    ``[train] step_timeout``). The others train on."""
    extra = {"federation": "fed"} if variant else {}
    if variant == "secure aggregation":
        extra["secure_aggregation"] = True
    plan = tiny(count=3, schedule=schedule, timeout=60.0, **extra).with_train(epochs=3)
    seen = {"n": 0}

    def fails(role, request, ins):
        if isinstance(ins, FAILING_AT[moment]):
            seen["n"] += 1
            if seen["n"] == 2:
                raise SystemExit("killed")

    logging.disable(logging.WARNING)
    try:
        start = time.monotonic()
        reports = run_clients(plan, faults={"hospital-2": fails}, out=tmp_path if moment == "checkpoint" else None)
        took = time.monotonic() - start
    finally:
        logging.disable(logging.NOTSET)
    res = merge_reports(plan, reports)
    reasons = {(s["round"], s["during"]): s["reason"] for s in res["skipped"]}
    assert {s["client"] for s in res["skipped"]} <= {"hospital-2"}, res["skipped"]
    assert (seen["n"] >= 2) == bool(reasons), (seen, reasons)  # (a schedule that never sends it that command twice)
    assert all("hospital-2 closed its connection" in r for r in reasons.values()), reasons
    assert took < 50, took  # (every wait above is a minute long: not one of them was waited out)
    assert len(res["metrics"]["test_accuracy_per_epoch"]) == 3


def test_a_client_that_misses_its_turn_rejoins_later():
    plan = tiny(count=3, schedule="splitfed_v2", timeout=1.0).with_train(epochs=3)
    state = {"away": False}

    def away(role, request, ins):  # hospital-3 is away during round 0 until skipped, and answers again afterwards
        if isinstance(ins, TakeTurn) and not state["away"]:
            state["away"] = True
            assert skipped.wait(60)

    with LogEvent("splitlearn.clients", "skipped hospital-3 in round 0") as skipped:
        reports = run_clients(plan, faults={"hospital-3": away})
    res = merge_reports(plan, reports)
    assert {s["client"] for s in res["skipped"]} == {"hospital-3"}
    assert min(s["round"] for s in res["skipped"]) == 0
    trained = {r["round"] for r in reports["hospital-3"].records if r["mode"] == "train"}
    assert 2 in trained  # back in a later round


def test_client_plan_errors_name_the_entry():
    with pytest.raises(PlanError, match="clients.template"):
        load_plan({**tiny().model_dump(), "clients": {"template": "nobody", "count": 2}})
    with pytest.raises(PlanError, match="count"):
        load_plan({**tiny().model_dump(), "clients": {"template": "hospital", "count": 0}})
    with pytest.raises(PlanError, match="also the name of a client"):
        body = tiny().model_dump()
        body["parties"]["hospital-2"] = body["parties"]["server"]
        load_plan({**body, "clients": {"template": "hospital", "count": 3}})


def test_handoff_through_the_server_moves_the_same_weights_by_way_of_the_server():
    peer = run_clients(tiny(count=3, schedule="sequential", handoff="peer"))
    plan = tiny(count=3, schedule="sequential", handoff="server")
    via = run_clients(plan)
    for name in ("hospital-1", "hospital-2", "hospital-3"):
        assert max_diff(module_state(via[name].modules["bottom"]), module_state(peer[name].modules["bottom"])) == 0
    res = merge_reports(plan, via)
    values = 64 * 16 + 16
    hand_offs = 3 * 2 - 1  # every turn but the first receives the latest bottom
    assert _payload(res["parties"]["server"]["received"], "weights", "weights") == hand_offs * values * 4
    assert _payload(res["parties"]["server"]["sent"], "weights", "weights") == hand_offs * values * 4


def test_a_federation_of_its_own_averages_like_the_server_does():
    at_server = run_clients(tiny(count=3, schedule="splitfed_v2"))
    plan = tiny(count=3, schedule="splitfed_v2", federation="fed")
    apart = run_clients(plan)
    assert "fed" in apart and apart["fed"].plays is None
    for name in ("hospital-1", "server"):
        for seg, m in apart[name].modules.items():
            assert max_diff(module_state(m), module_state(at_server[name].modules[seg])) < 1e-6
    res = merge_reports(plan, apart)
    assert _payload(res["parties"]["fed"]["received"], "weights", "weights") > 0  # the weights went to it
    assert _payload(res["parties"]["server"]["received"], "weights", "weights") == 0  # and not to the server


def test_a_dirichlet_partition_gives_clients_different_label_mixes():
    plan = tiny(count=4, partition={"kind": "dirichlet", "alpha": 0.1})
    setup = setup_party(plan, "hospital")
    ctx = Context.from_setup(plan, setup)
    y = setup.inputs["hospital.y"]
    classes = [len(torch.unique(y[torch.from_numpy(s)])) for s in ctx.shares]
    assert min(classes) < 10  # with alpha 0.1 some client misses classes (iid: every client has all ten)
    assert sum(len(s) for s in ctx.shares) == len(setup.splits.train)
    res = merge_reports(plan, run_clients(plan))
    assert res["schedule"]["partition"] == {"kind": "dirichlet", "alpha": 0.1}
    assert len(res["metrics"]["test_accuracy_per_epoch"]) == 2


def test_rounds_of_each_schedule():
    def made(**kw):
        plan = tiny(count=4, **kw)
        return Context.from_setup(plan, setup_party(plan, "hospital"))

    seq = made(schedule="sequential")
    assert [r.clients for r in seq.rounds] == [(0, 1, 2, 3)] * 2  # one round per epoch, clients in turn
    assert all(not r.average and len(r.evals) == 1 and r.evals[0].client is None for r in seq.rounds)
    assert all([s.id for s in t.steps] == list(range(len(t.steps))) for t in seq.turns.values())  # a session each
    assert sorted(seq.turns) == list(range(len(seq.turns)))  # turns are numbered across the run

    half = made(schedule="fedavg", fraction=0.5, local_epochs=2).rounds
    assert len(half) == 1 and len(half[0].clients) == 2 and half[0].average  # 2 epochs = one round of 2 passes
    for turn in half[0].train:
        assert turn.rows == 2 * len(seq.shares[turn.client])

    lb = made(schedule="fedavg", local_steps=1)
    per_pass = -(-max(len(s) for s in lb.shares) // 32)
    assert len(lb.rounds) == 2 * per_pass and all(len(t.steps) == 1 for r in lb.rounds for t in r.train)
    assert sum(1 for r in lb.rounds if r.evals) == 2  # evaluated once per epoch

    ind = made(schedule="independent")
    assert [t.client for t in ind.rounds[0].evals] == [0, 1, 2, 3]  # every client's own model is evaluated


def test_a_client_speaking_out_of_turn_changes_nothing():
    """hospital-1, done with its only turn, keeps sending while hospital-2 trains: a hello claiming
    to be the plan's hospital, an error meant to stop the server, weights nobody asked for. The
    run ends with exactly the weights of a clean run."""
    from splitlearn.wire.messages import Message, encode

    plan = tiny(count=2, schedule="sequential").with_train(epochs=1)
    clean = run_clients(plan)
    started, bursts = threading.Event(), []

    def mallory(role, request, ins):
        if not isinstance(ins, SendWeights) or started.is_set():  # its hand-off to hospital-2, right before that turn
            return
        started.set()
        raw, state = role.switch.inner, role.client_state()

        def keep_sending():
            try:
                for i in range(200):
                    raw.send("server", encode(Message(Kind.HELLO, "hospital", "server", text="{}")))
                    raw.send("server", encode(Message(Kind.ERROR, "hospital-1", "server", text="stop, says hospital-1")))
                    raw.send("server", encode(Message(Kind.ACTIVATION, "hospital", "server", i, "bottom->top")))
                    raw.send("hospital-2", encode(weights_message("hospital-1", "hospital-2", state, 10_000 + i)))
                    bursts.append(i)
                    time.sleep(0.002)
            except Exception:  # the run is over and the hub closed
                pass

        threading.Thread(target=keep_sending, daemon=True).start()

    attacked = run_clients(plan, faults={"hospital-1": mallory})
    assert started.is_set() and len(bursts) > 5
    res = merge_reports(plan, attacked)
    assert res["skipped"] == []
    for name in ("hospital-1", "hospital-2", "server"):
        for seg, m in attacked[name].modules.items():
            assert max_diff(module_state(m), module_state(clean[name].modules[seg])) == 0
    assert res["metrics"] == merge_reports(plan, clean)["metrics"]


def test_fedavg_averages_by_samples():
    """Uneven shares (Dirichlet): the federation's model is the sample-weighted mean of the clients'."""
    from splitlearn.clients.weights import average

    plan = method_plan(tiny(count=3, partition={"kind": "dirichlet", "alpha": 0.3}).with_train(epochs=1), "fedavg", 3)
    ctx = Context.from_setup(plan, setup_party(plan, "hospital"))
    sizes = [len(s) for s in ctx.shares]
    assert len(set(sizes)) == 3  # uneven, so a plain mean would differ
    local = {}

    def capture(role, request, ins):  # the clients' own weights just before the averaged ones replace them
        if isinstance(ins, SendWeights) and ins.to == "federation" or isinstance(ins, (SendWeights, LoadWeights)) \
                and ins.evaluation:
            local.setdefault(role.name, {k: v.clone() for k, v in role.client_state().items()})

    faults = {c: capture for c in plan.clients.names()}
    reports = run_clients(plan, faults=faults)
    assert set(local) == set(plan.clients.names())
    states = [local[c] for c in plan.clients.names()]
    expected = average(states, sizes)
    plain = average(states, [1, 1, 1])
    got = {f"{seg}.{k}": v for seg, m in reports["hospital-1"].modules.items() for k, v in m.state_dict().items()}
    assert max_diff(got, expected) < 1e-6
    assert max_diff(got, plain) > 1e-4


def test_clients_with_two_fixed_parties_train_and_splitfed_v1_merges_every_copy():
    body = tiny().model_dump()
    body["parties"]["relay"] = {"optimizer": {"name": "sgd", "lr": 0.1}}
    body["networks"]["mlp"]["args"]["sizes"] = [64, 32, 32, 10]  # 0 Linear, 1 ReLU, 2 Linear, 3 ReLU, 4 Linear
    body["train"]["epochs"] = 4
    body["segments"] = {
        "bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "mlp", "layers": [0, 2]},
        "middle": {"party": "relay", "inputs": ["bottom"], "network": "mlp", "layers": [2, 4]},
        "top": {"party": "server", "inputs": ["middle"], "network": "mlp", "layers": [4, 5]}}
    for schedule in ("sequential", "splitfed_v1"):
        plan = load_plan({**body, "clients": {"template": "hospital", "count": 3, "schedule": schedule}})
        reports = run_clients(plan)
        res = merge_reports(plan, reports)
        assert res["skipped"] == [] and res["metrics"]["test_accuracy"] > 0.35  # measured 0.81 / 0.45; chance 0.1
        start = build_segment(plan, "middle")
        # the relay learned
        assert max_diff(module_state(reports["relay"].modules["middle"]), module_state(start)) > 1e-3


def test_local_epochs_must_divide_the_epochs():
    with pytest.raises(PlanError, match="must divide"):
        tiny(count=2, schedule="fedavg", local_epochs=3)


def test_multi_task_clients_report_every_task_of_every_epoch():
    from .conftest import EXAMPLES

    body = load_plan(EXAMPLES / "multi_task.toml").with_train(epochs=2).model_dump()
    plan = load_plan({**body, "clients": {"template": "hospital", "count": 2}})
    reports = run_clients(plan)
    res = merge_reports(plan, reports)
    assert set(res["metrics"]["tasks"]) == {"digit", "parity"} and res["skipped"] == []
    for lab in ("digit_lab", "parity_lab"):  # each head's party evaluated the final model too
        assert [r["epoch"] for r in reports[lab].records if r["mode"] == "eval"] == [0, 1]
    for task in res["metrics"]["tasks"].values():
        assert None not in task["test_loss"] and len(task["test_loss"]) == 2
        assert task["test_accuracy"] > 0.6


def test_every_simulated_client_starts_from_the_same_weights_in_storage_of_its_own():
    """Clients are given copies of one fresh build (not one build each): equal weights, none shared."""
    from splitlearn.clients.layout import Topology, physical_setups

    from .conftest import EXAMPLES

    plan, setups, _ = prepare(EXAMPLES / "sequential.toml")
    held = physical_setups(plan, Topology.of(plan), setups)
    clients = [s for n, s in held.items() if s is not None and n.startswith(plan.clients.template + "-")]
    assert len(clients) == plan.clients.count == 10
    fresh = build_segment(plan, "bottom").state_dict()
    seen = set()
    for s in clients:
        state = s.modules["bottom"].state_dict()
        assert all(torch.equal(state[k], fresh[k]) for k in fresh)
        seen.update(t.data_ptr() for t in state.values())
        assert s.optimizer.param_groups[0]["params"][0] is next(s.modules["bottom"].parameters())
    assert len(seen) == len(clients) * len(fresh)  # no client trains another's tensors


def test_clients_of_a_network_deepcopy_cannot_copy_are_each_built(tmp_path):
    """weight_norm keeps a computed weight (not a leaf) that deepcopy refuses: each client is built instead."""
    from splitlearn.clients.layout import Topology, physical_setups

    from .conftest import EXAMPLES

    (tmp_path / "wnnet.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.utils.weight_norm("
                                       "nn.Linear(64, 128)), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))\n")
    text = (EXAMPLES / "sequential.toml").read_text()
    assert 'zoo = "mlp"\nargs = { sizes = [64, 128, 64, 10] }' in text
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(text.replace('zoo = "mlp"\nargs = { sizes = [64, 128, 64, 10] }', 'factory = "wnnet:make"')
                         .replace("count = 10", "count = 3"))
    plan, setups, _ = prepare(plan_file)
    held = physical_setups(plan, Topology.of(plan), setups)
    clients = [s.modules["bottom"] for n, s in held.items() if s is not None and n.startswith("hospital-")]
    assert len(clients) == 3 and len({id(m) for m in clients}) == 3
    first = clients[0].state_dict()
    assert all(torch.equal(m.state_dict()[k], first[k]) for m in clients[1:] for k in first)


@pytest.mark.parametrize("schedule", ["splitfed_v2", "sequential", "fedavg"])
def test_in_one_process_a_clients_messages_are_handed_over_whole_and_metered_as_bytes(schedule, monkeypatch):
    """Through each physical party's Switch (commands, weights, turns) nothing is encoded in one process, and each
    party's meter counts what the same run counts when every message travels as bytes (the commands' texts
    aside, whose timestamps differ from run to run); the weights trained are the same. A training step's activations
    and gradients are lent, not copied; weights never are. Every coordinated schedule reads through a Switch: a split
    one, a hand-off one, and FedAvg with a federation of its own."""
    from splitlearn.wire import link
    from splitlearn.wire.codec import Lent
    from splitlearn.wire.transport.inprocess import InProcessTransport

    plan = (method_plan(tiny(), "fedavg", 3) if schedule == "fedavg"
            else tiny(count=3, schedule=schedule)).with_train(epochs=1)
    encoded, handed = [], []
    real, hand = link.encode, link.handed_over

    def counting(msg):
        encoded.append(msg.kind)
        return real(msg)

    def handing(msg):
        handed.extend((msg.kind, isinstance(e.data, Lent)) for e in msg.tensors.values())
        return hand(msg)

    monkeypatch.setattr(link, "encode", counting)
    monkeypatch.setattr(link, "handed_over", handing)
    whole = run_clients(plan)
    assert encoded == []  # every message handed over whole
    # a training step's tensors lent (codec.Lent), never weights (the sender goes on changing its model): copied
    assert {kind for kind, lent in handed if lent} == (set() if schedule == "fedavg" else {Kind.ACTIVATION, Kind.GRADIENT})
    assert (Kind.WEIGHTS, False) in handed and (Kind.WEIGHTS, True) not in handed
    monkeypatch.setattr(InProcessTransport, "take_messages", lambda self: False)  # bytes, as before this change
    as_bytes = run_clients(plan)
    assert Kind.WEIGHTS in encoded and Kind.COMMAND in encoded  # as bytes, the schedule's messages were encoded
    assert schedule == "fedavg" or (len(encoded) > 100 and Kind.HELLO in encoded)  # and the turns' (FedAvg has none)
    for name, rep in whole.items():
        for table in ("sent", "received"):
            rows = {(r["wire"], r["direction"]): r for r in rep.meter[table]}
            other = {(r["wire"], r["direction"]): r for r in as_bytes[name].meter[table]}
            assert rows.keys() == other.keys()
            for key, r in rows.items():
                assert r["messages"] == other[key]["messages"] and r["payload"] == other[key]["payload"]
                if key[1] != "control":  # tensors, weights, credits: to the byte
                    assert r["bytes"] == other[key]["bytes"], (name, table, key)
        for seg, mod in rep.modules.items():
            assert max_diff(module_state(mod), module_state(as_bytes[name].modules[seg])) == 0.0
    assert sum(len(rep.modules) for rep in whole.values()) >= 2
