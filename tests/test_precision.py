"""Mixed precision per party (issue #24, item 5): ``precision = "bf16"`` autocasts a party's forward and losses,
``"fp16"`` adds loss scaling agreed by the whole network; the wire carries the party's dtype.

This machine has no GPU: fp16 is refused on the CPU, so the fp16 tests allow it there (``FP16_DEVICES``
patched; CPU autocast in float16 exists) to run the loss scaling, the agreement on skipped steps and the
scale's checkpoint, which do not depend on the device. What they cannot show is CUDA's own kernels.
"""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
import torch.nn.functional as F

import splitlearn
from splitlearn.core import precision
from splitlearn.core.graph import build_graph
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.precision import LossScale, Precision, agreement_tree
from splitlearn.core.specs import PlanError
from splitlearn.launch.threads import run_local
from splitlearn.run.checkpoint import Checkpoints
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.messages import Kind, Message

from .conftest import EXAMPLES
from .support import FakeLink, same_run, stop_after, unsplit_segments, worst_difference

SGD = {"name": "SGD", "lr": 0.05, "momentum": 0.9}


def body(hospital: str = "fp32", server: str = "fp32", weight: float = 1.0, **train) -> dict:
    """Digits through ``support.norm_mlp`` (Linear, LayerNorm, ReLU | Linear), cut after the ReLU: the bottom at the
    hospital (features and labels), the top and the loss at the server, each party in the precision given; the loss
    weighted ``weight`` and the learning rate divided by it (so the steps taken are those of weight 1)."""
    sgd = {**SGD, "lr": SGD["lr"] / weight}
    return {"name": "precision", "data": {"dataset": "digits"},
            "train": {"epochs": 1, "batch_size": 32, "seed": 3, **train},
            "parties": {"hospital": {"holds": {"x": "x", "y": "y"}, "optimizer": sgd, "precision": hospital},
                        "server": {"optimizer": sgd, "precision": server}},
            "networks": {"net": {"factory": "tests.support:norm_mlp"}},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "net", "layers": [0, 3]},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "net", "layers": [3, 4]}},
            "losses": {"digit": {"input": "top", "target": "hospital.y", "weight": weight}}}


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 allowed on the CPU (see the module's docstring)."""
    monkeypatch.setattr(precision, "FP16_DEVICES", frozenset({"cuda", "cpu"}))


def split_and_unsplit(plan_body: dict, steps: int, autocast: torch.dtype | None,
                      scaler: torch.amp.GradScaler | None = None, spoil=None):
    """``steps`` training steps of the plan through the engine, and of its unsplit model (the same segments) in plain
    PyTorch under ``torch.autocast("cpu", autocast)`` (None: none; with ``scaler``: torch's AMP recipe).
    ``spoil(i)`` says whether the bottom's first weight gets infinite gradients in training step ``i``, in both.
    (plan, setups, the unsplit segments)."""
    plan, setups, shapes = prepare(load_plan(plan_body))
    train = [s for s in schedule(plan, setups["hospital"].splits) if s.mode == "train"][:steps]
    ref = unsplit_segments(plan)
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=plan.parties["server"].optimizer.lr,
                          momentum=0.9)
    x, y = setups["hospital"].inputs["hospital.x"], setups["hospital"].inputs["hospital.y"]
    weight = plan.losses["digit"].weight
    for i, s in enumerate(train):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = weight * F.cross_entropy(ref["top"](ref["bottom"](x[s.rows])), y[s.rows])
        (loss if scaler is None else scaler.scale(loss)).backward()
        if spoil is not None and spoil(i):
            ref["bottom"][0].weight.grad.fill_(math.inf)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    if spoil is not None:
        spoiling(setups["hospital"].modules["bottom"][0].weight, spoil)
    run_local(plan, setups, shapes, steps=train)
    return plan, setups, ref


def spoiling(param: torch.nn.Parameter, spoil) -> None:
    """``param``'s gradient made infinite in the backward passes ``i`` (0, 1, ...) where ``spoil(i)``."""
    calls = iter(range(1 << 30))
    param.register_hook(lambda g: torch.full_like(g, math.inf) if spoil(next(calls)) else g)


def moved(plan, ref) -> float:
    """How far training moved the weights of ``ref`` from the initial ones."""
    start = unsplit_segments(plan)
    return max((a - b).abs().max().item() for seg in plan.segments
               for a, b in zip(ref[seg].state_dict().values(), start[seg].state_dict().values()))


# Tolerance of split against unsplit in 16 bits: 1e-6, as float32's equivalence (test_equivalence). Both sides run the
# same 16-bit kernels on the same 16-bit tensors (the cut's activation is 16-bit under autocast either way, and its
# gradient on the wire is the one autograd computes); the weights stay float32 and autocast computes the loss in
# float32. Measured here: 0.0. What another machine's kernels may change is the order of float32 sums: one ulp added to
# every weight of the bottom moves the bf16 reference by 1.5e-8 after 12 steps, far inside 1e-6, while training in bf16
# instead of float32 moves the weights by more than 1e-4 (asserted below, so the tolerance separates them).
TOLERANCE = 1e-6


def test_bf16_split_training_equals_the_unsplit_model_under_the_same_autocast():
    plan, setups, ref = split_and_unsplit(body("bf16", "bf16"), 12, torch.bfloat16)
    assert worst_difference(setups, ref) <= TOLERANCE
    assert moved(plan, ref) > 1e-3  # training moved the weights: the comparison is not vacuous
    fp32 = split_and_unsplit(body(), 12, None)[2]
    assert max((fp32[s].state_dict()[k] - ref[s].state_dict()[k]).abs().max().item() for s in ref
               for k in ref[s].state_dict()) > 1e-4  # and the split run computed in bf16, not in float32


def test_bf16_activations_and_gradients_travel_in_half_the_bytes_of_fp32():
    runs = {p: splitlearn.train(load_plan(body(p, p))) for p in ("fp32", "bf16")}
    payload = {p: {(t["wire"], t["direction"]): t["payload"] for party in r["parties"].values() for t in party["sent"]}
               for p, r in runs.items()}
    for direction in ("forward", "backward"):  # 16 values a row each way, 2 bytes each instead of 4
        assert payload["bf16"][("bottom->top", direction)] * 2 == payload["fp32"][("bottom->top", direction)]
    assert payload["bf16"][("hospital.y->digit", "forward")] == payload["fp32"][("hospital.y->digit", "forward")]
    assert "credit" not in {d for _, d in payload["bf16"]}  # no verdicts: nothing is loss-scaled in bf16
    assert runs["bf16"]["metrics"]["test_accuracy"] > 0.5


def test_a_bf16_run_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    plan = load_plan(body("bf16", "bf16", epochs=2, checkpoint_every=10))
    splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 27 steps"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(27))
    splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")


def test_fp16_split_training_equals_torch_amp_with_its_grad_scaler_skipped_steps_included(fp16_on_cpu):
    """A loss weighted 3000 overflows float16 in most of the first steps (the scale starts at 2^16): torch's
    GradScaler skips them and halves its scale each time; the network skips the same steps, every party together,
    and ends with the same weights (TOLERANCE, above)."""
    scaler = torch.amp.GradScaler("cpu")
    plan, setups, ref = split_and_unsplit(body("fp16", "fp16", weight=3000.0), 12, torch.float16, scaler)
    assert scaler.get_scale() <= 2.0 ** 10  # at least six of the 12 steps were skipped
    assert worst_difference(setups, ref) <= TOLERANCE
    assert moved(plan, ref) > 1e-3


def test_an_overflow_at_one_party_skips_the_step_at_every_party(fp16_on_cpu):
    """The hospital's gradients turn infinite in steps 2 and 5, the server's stay finite: the server skips those
    steps too (its weights equal those of torch's AMP, which skips the whole unsplit model's step)."""
    scaler = torch.amp.GradScaler("cpu")
    plan, setups, ref = split_and_unsplit(body("fp16", "fp16"), 8, torch.float16, scaler, spoil=lambda i: i in (2, 5))
    assert scaler.get_scale() == 2.0 ** 14  # two steps skipped
    assert worst_difference(setups, ref) <= TOLERANCE


def test_the_verdict_travels_along_a_chain_of_relays(fp16_on_cpu):
    """multi_hop: client -> relay_1 -> relay_2 -> server. The server's gradients overflow in step 3: its verdict
    goes up three hops to the client, which decides, and the decision three hops down: every party took 9 of 10
    optimizer steps (Adam counts them)."""
    with open(EXAMPLES / "multi_hop.toml", "rb") as f:
        chain = tomllib.load(f)
    for party in chain["parties"].values():
        party.update(precision="fp16", optimizer={"name": "Adam", "lr": 0.01})
    plan, setups, shapes = prepare(load_plan(chain))
    tree = agreement_tree(build_graph(plan))
    assert [(p, tree[p].parent) for p in plan.parties] == [("client", None), ("relay_1", "client"),
                                                           ("relay_2", "relay_1"), ("server", "relay_2")]
    steps = [s for s in schedule(plan, setups["client"].splits) if s.mode == "train"][:10]
    spoiling(next(setups["server"].modules["last"].parameters()), lambda i: i == 3)
    reports = run_local(plan, setups, shapes, steps=steps)
    for name, s in setups.items():
        assert {int(v["step"]) for v in s.optimizer.optimizer.state.values()} == {9}, name
    verdicts = {t["wire"]: t["messages"] for t in reports["relay_1"].meter["sent"] if t["direction"] == "credit"}
    assert verdicts == {"first->second": 10, "second->third": 10}  # a step's verdict up to the client, its decision
    assert not any(r.refused for r in reports.values())  # down to relay_2: one message each way per step and wire


def test_a_fp16_run_resumes_bit_identical_with_its_loss_scale(fp16_on_cpu, tmp_path):
    plan = load_plan(body("fp16", "fp16", weight=3000.0, epochs=2, checkpoint_every=10))
    splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 27 steps"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(27))
    held = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints", plan_hash=plan_hash(plan))
    manifest = held.load(held.cursors()[-1])[1]
    assert manifest["loss_scale"]["scale"] < 2.0 ** 16  # what a resume must not start again from
    splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")


# -- the agreement, the scale and the dtype, one party at a time -----------------------------------------------------



def verdict(sender: str, receiver: str, step: int, text: str, wire: str = "bottom->top") -> Message:
    return Message(Kind.CREDIT, sender, receiver, step, wire, text=text)


def party_precision(name: str, hospital: str = "fp16", server: str = "fp16") -> tuple[Precision, FakeLink]:
    link = FakeLink()
    graph = build_graph(load_plan(body(hospital, server)))
    return Precision(graph, name, torch.device("cpu"), link, True, RuntimeError), link


def test_a_verdict_is_taken_only_from_a_tree_neighbour_for_the_step_being_settled_and_once(fp16_on_cpu):
    server, link = party_precision("server")  # the hospital (it receives no activation) is the root: the server
    # is its child
    assert (server.place.parent, server.place.children) == ("hospital", ())
    server.begin(5, "train", True, True)
    for msg, says in [(verdict("mallory", "server", 5, "skip"), "no overflow verdict is expected"),
                      (verdict("hospital", "server", 5, "skip", wire="x"), "names wire 'bottom->top'"),
                      (verdict("hospital", "server", 6, "skip"), "step 6, which this party is not settling"),
                      (verdict("hospital", "server", 5, "skip"), "a decision before this party told its own"),
                      (verdict("hospital", "server", 5, "overflow"), "one of ['step', 'skip']")]:
        server.take(msg)
        assert says in link.refused[-1]
    refused = len(link.refused)
    inbox = [verdict("hospital", "server", 5, "skip"), verdict("hospital", "server", 5, "step")]
    assert server.settle(None, lambda: server.take(inbox.pop(0))) is False  # the hospital's decision: skip
    assert [(m.receiver, m.step, m.text) for m in link.sent] == [("hospital", 5, "finite")]
    assert server.scale.scale == 2.0 ** 15 and len(link.refused) == refused
    server.take(inbox.pop(0))  # a late duplicate of a settled step's: dropped, nothing changes
    assert server.scale.scale == 2.0 ** 15 and len(link.refused) == refused

    root, link = party_precision("hospital")
    root.begin(0, "train", True, True)
    root.take(verdict("server", "hospital", 0, "overflow"))
    root.take(verdict("server", "hospital", 0, "finite"))
    assert "a second verdict for step 0" in link.refused[-1]
    assert root.settle(None, lambda: pytest.fail("the root has heard its child")) is False
    assert [(m.receiver, m.text) for m in link.sent] == [("server", "skip")]


def test_a_step_that_closes_no_gradient_group_settles_nothing_and_bf16_scales_nothing(fp16_on_cpu):
    server, link = party_precision("server")
    server.begin(3, "train", True, False)  # accumulating: the optimizer does not step after it
    server.take(verdict("hospital", "server", 3, "skip"))
    assert "not settling" in link.refused[-1]
    assert server.settle(None, lambda: pytest.fail("nothing to wait for")) is False and not link.sent
    plain, link = party_precision("server", "bf16", "bf16")
    assert plain.scale is None and plain.loss_scale == 1.0
    plain.begin(0, "train", True, True)
    assert plain.settle(None, lambda: pytest.fail("nothing to agree on")) is False and not link.sent


def test_the_loss_scale_follows_grad_scalers_rule():
    ours, theirs = LossScale(growth_interval=3), torch.amp.GradScaler("cpu", growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    for overflow in [False, False, False, True, False, True, True, False, False, False, False]:
        theirs.scale(torch.ones(()))  # (GradScaler makes its scale on its first use)
        p.grad = torch.full((2,), math.inf if overflow else 1.0)
        theirs.unscale_(opt)
        theirs.step(opt)
        theirs.update()
        ours.update(overflow)
        assert ours.scale == theirs.get_scale()
        assert ours.state_dict()["_growth_tracker"] == theirs.state_dict()["_growth_tracker"]
    back = LossScale()
    back.load_state_dict(ours.state_dict())
    assert back.state_dict() == ours.state_dict()


def test_a_handshake_activation_of_another_dtype_than_the_senders_precision_is_refused():
    from splitlearn.core.step import StepState
    from splitlearn.wire.codec import WireError, get_codec

    server, _ = party_precision("server", "bf16", "fp32")
    st = StepState(-1, torch.zeros(1, dtype=torch.long), "handshake")
    as_float32 = Message(Kind.ACTIVATION, "hospital", "server", -1, "bottom->top",
                         {"t": get_codec("float32").encode(torch.zeros(1, 16))})
    wire = next(w for w in build_graph(load_plan(body("bf16"))).wires if w.name == "bottom->top")
    with pytest.raises(WireError, match="dtype float32 where bfloat16 was agreed .party 'hospital' computes in bf16"):
        server.check_dtype(as_float32, wire, st)
    server.check_dtype(Message(Kind.ACTIVATION, "hospital", "server", -1, "bottom->top",
                               {"t": get_codec("float32").encode(torch.zeros(1, 16, dtype=torch.bfloat16))}), wire, st)


# -- the plan entry --------------------------------------------------------------------------------------------------

def test_precision_is_written_and_hashed_only_where_it_is_not_fp32():
    fp32, bf16 = load_plan(body()), load_plan(body("bf16"))
    assert "precision" not in fp32.model_dump()["parties"]["hospital"]  # so plans without it hash as before it existed
    assert bf16.model_dump()["parties"]["hospital"]["precision"] == "bf16"
    assert plan_hash(fp32) != plan_hash(bf16)  # the parties must agree on it: it shapes the wire


@pytest.mark.parametrize("party,says", [
    ({"precision": "fp8"}, "Input should be 'fp32', 'bf16' or 'fp16'"),
    ({"precision": "fp16", "device": "cpu"}, 'fp16 needs CUDA'),
])
def test_a_wrong_precision_is_refused_naming_the_entry(party, says):
    plan = body()
    plan["parties"]["hospital"].update(party)
    with pytest.raises(PlanError) as e:
        load_plan(plan)
    assert "parties.hospital.precision" in str(e.value) and says in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto is CUDA on this machine: fp16 runs there")
def test_fp16_on_a_party_that_computes_on_the_cpu_is_refused_naming_the_entry():
    with pytest.raises(PlanError) as e:
        splitlearn.train(load_plan(body("bf16", "fp16")))
    assert "parties.server.precision" in str(e.value) and "fp16 needs CUDA" in str(e.value)
