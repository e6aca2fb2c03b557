"""Flow control (core/flow.py): a party with little to compute never runs into ``Limits.early_steps``.

A label-only party (a registry: it sends labels and never hears back) and a feature-only party in
evaluation (it sends activations, nothing comes back) used to run ahead of their consumer until it
refused them: "step 68 is too far ahead of step 3 (Limits.early_steps)". Now such a producer waits
for its consumer's credits, so the plans below train in every form (vanilla, vertical,
multi-task; U-shaped keeps its labels at the client by design, so a label-only party has no place
in it), in-process and over gRPC, to the weights of the unsplit model, with exact accounting.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import splitlearn
from splitlearn.core.engine import Party
from splitlearn.core.flow import flow_pairs
from splitlearn.core.graph import build_graph
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.run.checkpoint import Checkpoints, after_step
from splitlearn.models import build_segment
from splitlearn.launch.threads import run_local
from splitlearn.launch.processes import launch
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.link import Link
from splitlearn.wire.messages import Kind, Limits, Message, decode, encode
from splitlearn.wire.transport import InProcessHub
from splitlearn.wire.transport.base import TransportTimeout

from .conftest import EXAMPLES

pytestmark = pytest.mark.timeout(300)

SGD = 'optimizer = { name = "sgd", lr = 0.05, momentum = 0.9 }'

# the example's registry, with many evaluation steps (small evaluation batches): the feature
# parties race through them too, as the registry races through every step
VANILLA = (EXAMPLES / "registry.toml").read_text()

VERTICAL = f"""
name = "vertical_registry"
[data]
dataset = "breast_cancer"
[train]
epochs = 8
batch_size = 32
seed = 0
[parties.clinic_a]
holds = {{ x = {{ field = "x", columns = [0, 15] }} }}
{SGD}
[parties.clinic_b]
holds = {{ x = {{ field = "x", columns = [15, 30] }} }}
{SGD}
[parties.registry]
holds = {{ y = "y" }}
[parties.server]
{SGD}
[networks.bottom_a]
zoo = "mlp"
args = {{ sizes = [15, 16], out_activation = true }}
[networks.bottom_b]
zoo = "mlp"
args = {{ sizes = [15, 16], out_activation = true }}
[networks.top]
zoo = "mlp"
args = {{ sizes = [32, 16, 2] }}
[segments.bottom_a]
party = "clinic_a"
inputs = ["clinic_a.x"]
network = "bottom_a"
[segments.bottom_b]
party = "clinic_b"
inputs = ["clinic_b.x"]
network = "bottom_b"
[segments.top]
party = "server"
inputs = ["bottom_a", "bottom_b"]
merge = "concat"
network = "top"
[losses.malignant]
input = "top"
target = "registry.y"
"""

MULTI_TASK = f"""
name = "multi_task_registry"
[data]
dataset = "digits"
[train]
epochs = 8
batch_size = 32
seed = 0
[parties.hospital]
holds = {{ x = "x" }}
{SGD}
[parties.registry]
holds = {{ y = "y", parity = "parity" }}
[parties.digit_lab]
{SGD}
[parties.parity_lab]
{SGD}
[networks.trunk]
zoo = "mlp"
args = {{ sizes = [64, 128], out_activation = true }}
[networks.digit_head]
zoo = "mlp"
args = {{ sizes = [128, 64, 10] }}
[networks.parity_head]
zoo = "mlp"
args = {{ sizes = [128, 32, 2] }}
[segments.trunk]
party = "hospital"
inputs = ["hospital.x"]
network = "trunk"
[segments.digit_head]
party = "digit_lab"
inputs = ["trunk"]
network = "digit_head"
[segments.parity_head]
party = "parity_lab"
inputs = ["trunk"]
network = "parity_head"
[losses.digit]
input = "digit_head"
target = "registry.y"
[losses.parity]
input = "parity_head"
target = "registry.parity"
weight = 0.5
"""

# form -> (plan text, epochs, evaluation batch): each run has well over 64 steps
FORMS = {"vanilla": (VANILLA, 2, 8), "vertical": (VERTICAL, 2, 2), "multi_task": (MULTI_TASK, 2, 8)}


def composed(form: str, m: dict, x: dict) -> list[tuple[str, torch.Tensor, str]]:
    """The unsplit model of each form in plain PyTorch: (task, output, target field)."""
    if form == "vanilla":
        return [("digit", m["top"](m["bottom"](x["hospital.x"])), "registry.y")]
    if form == "vertical":
        h = torch.cat([m["bottom_a"](x["clinic_a.x"]), m["bottom_b"](x["clinic_b.x"])], dim=1)
        return [("malignant", m["top"](h), "registry.y")]
    t = m["trunk"](x["hospital.x"])
    return [("digit", m["digit_head"](t), "registry.y"), ("parity", m["parity_head"](t), "registry.parity")]


def write_plan(folder: Path, form: str, text: str | None = None, **train) -> Path:
    """The form's plan with ``[train]`` settings added (``eval_batch_size``, ``pipeline``)."""
    text = text or FORMS[form][0]
    extra = "".join(f"\n{k} = {v}" for k, v in train.items())
    path = folder / f"{form}.toml"
    path.write_text(text.replace("seed = 0", "seed = 0" + extra, 1))
    return path


def expected_credits(path: Path, epochs: int) -> dict[str, int]:
    """Per consumer, the credits the rhythm gives: a step id and mode rule, nothing else."""
    plan, setups, _ = prepare(path, epochs=epochs)
    steps = list(schedule(plan, next(iter(setups.values())).splits))
    out: dict[str, int] = {}
    for p in flow_pairs(build_graph(plan), Limits()):
        n = sum(1 for s in steps if s.mode in p.gated and s.id % p.every == p.every - 1)
        out[p.consumer] = out.get(p.consumer, 0) + n
    return out


def credits_sent(result) -> dict[str, int]:
    return {party: sum(r["messages"] for r in p["sent"] if r["direction"] == "credit")
            for party, p in result["parties"].items()}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_label_only_party_trains_to_the_unsplit_weights_in_process(tmp_path, form):
    _, epochs, eval_batch = FORMS[form]
    path = write_plan(tmp_path, form, eval_batch_size=eval_batch)
    plan, setups, shapes = prepare(path, epochs=epochs)
    steps = list(schedule(plan, next(iter(setups.values())).splits))
    assert len(steps) > 2 * Limits().early_steps  # far more than a party may be ahead: flow control is needed

    ref = {seg: build_segment(plan, seg) for seg in plan.segments}
    data = {k: v for s in setups.values() for k, v in s.inputs.items()}
    opt = torch.optim.SGD([p for mod in ref.values() for p in mod.parameters()], lr=0.05, momentum=0.9)
    for s in steps:
        if s.mode != "train":
            continue
        x = {k: v[s.rows] for k, v in data.items()}
        opt.zero_grad()
        loss = sum(plan.losses[task].weight * F.cross_entropy(out, x[target])
                   for task, out, target in composed(form, ref, x))
        loss.backward()
        opt.step()

    reports = run_local(plan, setups, shapes, steps=steps)

    assert all(not r.refused for r in reports.values()), {p: r.refused[:2] for p, r in reports.items()}
    worst = max((a - ref[seg].state_dict()[k]).abs().max().item() for party in setups.values()
                for seg, mod in party.modules.items() for k, a in mod.state_dict().items())
    assert worst <= 1e-6, f"{form}: split and unsplit parameters differ by {worst}"
    moved = max((a - b).abs().max().item() for seg in plan.segments
                for a, b in zip(ref[seg].state_dict().values(), build_segment(plan, seg).state_dict().values()))
    assert moved > 1e-3
    # the credits are messages like any other: metered, on the wire they credit
    got = {p: sum(row["messages"] for row in r.meter["sent"] if row["direction"] == "credit")
           for p, r in reports.items()}
    want = expected_credits(path, epochs)
    assert {p: n for p, n in got.items() if n} == {p: n for p, n in want.items() if n}
    assert sum(want.values()) > 0


@pytest.mark.parametrize("form", sorted(FORMS))
def test_label_only_party_over_grpc_equals_in_process_exactly(tmp_path, form):
    _, epochs, eval_batch = FORMS[form]
    path = write_plan(tmp_path, form, eval_batch_size=eval_batch)
    net = launch(path, tmp_path / "grpc", epochs=epochs, seed=3)
    local = splitlearn.train(path, epochs=epochs, seed=3, out=tmp_path / "local")
    for party in load_plan(path).parties:
        a = tmp_path / "grpc" / "parties" / party / "weights.safetensors"
        b = tmp_path / "local" / "parties" / party / "weights.safetensors"
        assert a.is_file() == b.is_file()
        if a.is_file():
            wa, wb = load_file(str(a)), load_file(str(b))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), party
    assert net["metrics"] == local["metrics"]
    for party, p in net["parties"].items():
        assert p["refused"] == [] and local["parties"][party]["refused"] == [], party
        assert p["sent"] == local["parties"][party]["sent"], party  # credits included, message for message
    assert credits_sent(net) == credits_sent(local) and sum(credits_sent(net).values()) > 0


def test_feature_only_parties_run_many_evaluation_steps(tmp_path):
    """Labels at the server, features at two clinics: in evaluation the clinics hear nothing back;
    one row per evaluation batch makes 114 evaluation steps an epoch, and they stay within a window."""
    text = (EXAMPLES / "vertical.toml").read_text()
    path = write_plan(tmp_path, "vertical_features", text, eval_batch_size=1)
    result = splitlearn.train(path, epochs=1)
    assert all(p["refused"] == [] for p in result["parties"].values())
    assert result["metrics"]["test_accuracy"] > 0.8
    assert credits_sent(result)["server"] == expected_credits(path, 1)["server"] > 0
    pairs = {(p.producer, p.consumer): p.gated for p in flow_pairs(build_graph(load_plan(path)), Limits())}
    assert pairs == {("clinic_a", "server"): {"eval", "predict"}, ("clinic_b", "server"): {"eval", "predict"}}


def test_label_only_party_with_pipelined_steps(tmp_path):
    """``pipeline = 2``: the registry's labels travel per micro-batch; training equals the synchronous run."""
    path = write_plan(tmp_path, "vanilla", eval_batch_size=8)
    sync = splitlearn.train(path, epochs=2)
    piped = splitlearn.train(write_plan(tmp_path, "vanilla", eval_batch_size=8, pipeline=2), epochs=2)
    worst = max((v.double() - sync.modules[p][seg].state_dict()[k].double()).abs().max().item()
                for p, mods in piped.modules.items() for seg, m in mods.items() for k, v in m.state_dict().items())
    assert worst < 1e-5
    assert all(p["refused"] == [] for p in piped["parties"].values())
    assert credits_sent(piped) == credits_sent(sync)  # the rhythm counts steps, not micro-batches


def test_which_pairs_wait_for_credits():
    """Only a producer that hears nothing back in a mode waits for credits in it: a party that gets
    gradients (training) or activations of the same step (U-shaped) never does."""
    def gated(name: str) -> dict:
        graph = build_graph(load_plan(EXAMPLES / f"{name}.toml"))
        return {(p.producer, p.consumer): set(p.gated) for p in flow_pairs(graph, Limits())}

    assert gated("registry") == {("hospital", "server"): {"eval", "predict"},
                                 ("registry", "server"): {"train", "eval"}}
    assert gated("vanilla") == {("hospital", "server"): {"eval", "predict"}}
    assert gated("u_shaped") == {}
    registry = flow_pairs(build_graph(load_plan(EXAMPLES / "registry.toml")), Limits())
    assert [(p.window, p.every) for p in registry] == [(32, 16), (32, 16)]  # half of Limits.early_steps
    vanilla = flow_pairs(build_graph(load_plan(EXAMPLES / "vanilla.toml")), Limits())
    assert [(p.window, p.every) for p in vanilla] == [(16, 8)]  # 2 wires: 2 messages a step held early
    small = flow_pairs(build_graph(load_plan(EXAMPLES / "registry.toml")), Limits(early_steps=6))
    assert [(p.window, p.every) for p in small] == [(3, 1), (3, 1)]


def test_a_credit_from_a_party_that_consumes_nothing_is_refused():
    from splitlearn.core.flow import FlowControl

    graph = build_graph(load_plan(EXAMPLES / "registry.toml"))
    flow = FlowControl(graph, "registry", Limits())
    assert flow.credit_problem(Message(Kind.CREDIT, "server", "registry", 15, "registry.y->digit")) is None
    assert "no credit is expected" in flow.credit_problem(Message(Kind.CREDIT, "hospital", "registry", 15, ""))
    assert "names wire" in flow.credit_problem(Message(Kind.CREDIT, "server", "registry", 15, "bottom->top"))
    assert "nothing else" in flow.credit_problem(Message(Kind.CREDIT, "server", "registry", -3, "registry.y->digit"))
    flow.begin_step(0, "train")  # the session's first step: the server is known to be at step -1 at least
    assert flow.blocked(31, "train") == []
    assert flow.blocked(32, "train") == ["server"]  # a window of 32 steps past the last known
    assert flow.blocked(32, "predict") == []  # it sends nothing when predicting
    flow.heard("server", 15)
    assert flow.blocked(47, "train") == [] and flow.blocked(48, "eval") == ["server"]


class _Watched:
    """A transport whose every ``recv`` is counted: the party is waiting for something."""

    def __init__(self, inner):
        self.inner, self.waits = inner, threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def recv(self, timeout=None):
        self.waits.release()
        return self.inner.recv(timeout)


def test_a_feature_only_party_stays_within_its_window_of_the_consumer():
    """The registry plan's hospital (features only) in 100 evaluation steps of one row: nothing comes
    back, so it sends steps 0..31 (a window of 32 past step -1, where every party starts), then waits;
    each credit the server sends lets it go exactly to the credited step plus the window."""
    plan, setups, _ = prepare(EXAMPLES / "registry.toml", epochs=1)
    hs = setups["hospital"]
    hub = InProcessHub(["hospital", "registry", "server"])
    watched = _Watched(hub.transport("hospital"))
    party = Party(hs.graph, "hospital", Link(watched), hs.modules, hs.optimizer, hs.inputs, {}, timeout=30.0)
    rows = torch.from_numpy(hs.splits.test[:100])
    done = threading.Event()

    def work():
        for i in range(100):
            party.step(i, rows[i:i + 1], "eval")
        done.set()

    threading.Thread(target=work, daemon=True).start()
    server = hub.transport("server")

    def sent_until_it_waits() -> list[int]:
        """The steps it sent until it waited (or, without flow control, finished)."""
        deadline = time.monotonic() + 60
        while not watched.waits.acquire(timeout=0.05) and not done.is_set():
            assert time.monotonic() < deadline, "the hospital neither waited nor finished"
        steps = []
        while True:
            try:
                msg = decode(server.recv(0.0 if steps or done.is_set() else 1.0)[1])
            except TransportTimeout:
                return steps
            assert (msg.kind, msg.wire) == (Kind.ACTIVATION, "bottom->top")
            steps.append(msg.step)

    assert sent_until_it_waits() == list(range(32))
    server.send("hospital", encode(Message(Kind.CREDIT, "server", "hospital", 15, "bottom->top")))
    assert sent_until_it_waits() == list(range(32, 48))
    assert not done.is_set()
    server.send("hospital", encode(Message(Kind.CREDIT, "server", "hospital", 79, "bottom->top")))
    assert done.wait(60)
    assert sorted(decode(server.recv(1.0)[1]).step for _ in range(52)) == list(range(48, 100))
    assert party.link.refused == []


class _Stop(Exception):
    pass


def test_a_resumed_registry_run_has_the_weights_and_every_byte_of_a_run_never_stopped(tmp_path):
    """Resumed after step 103 (past ``Limits.early_steps`` from the handshake's step -1): the registry
    sends labels of steps 104.. while the server may still be in its handshake, which expects them.
    Credits are part of the accounting a checkpoint holds (the messages of later steps read early
    are not, the credits owed for the steps done are): the resumed run's bytes, sent and received,
    are a run never stopped's."""
    body = load_plan(write_plan(tmp_path, "vanilla", eval_batch_size=8)).with_train(epochs=3, checkpoint_every=50)
    seen = {"k": 0}

    def stop_after_120(pr) -> None:
        seen["k"] += 1
        if seen["k"] == 120:
            raise _Stop("stopped after 120 steps")

    whole = splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 120 steps"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after_120)
    held = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints", plan_hash=plan_hash(body)).cursors()
    assert max(held) > after_step(Limits().early_steps)
    resumed = splitlearn.train(body, out=tmp_path / "b", resume=True)
    for party, p in whole["parties"].items():
        q = resumed["parties"][party]
        assert q["refused"] == [], party
        assert (q["bytes_sent"], q["bytes_received"]) == (p["bytes_sent"], p["bytes_received"]), party
        assert q["sent"] == p["sent"] and q["received"] == p["received"], party
    assert sum(credits_sent(whole).values()) > 0
    for party in ("hospital", "server"):
        wa, wb = (load_file(str(tmp_path / r / "parties" / party / "weights.safetensors")) for r in "ab")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), party
