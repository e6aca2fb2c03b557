"""Pipelined split steps (``[train] pipeline = K``): micro-batches flow through the parties as in
GPipe and the gradients are the whole batch's, so training equals the synchronous run (weights
within 1e-5: only the order of float additions differs); the bytes are those of the synchronous
run plus the framing of the extra messages; the emulated slow link passes bytes unchanged."""

from __future__ import annotations

import pytest

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.launch.processes import launch

from .conftest import EXAMPLES

EXAMPLE_PLANS = ["vanilla", "u_shaped", "vertical", "multi_hop"]


def _plan(example: str, k: int, epochs: int = 1):
    return load_plan(EXAMPLES / f"{example}.toml").with_train(epochs=epochs, pipeline=k)


def _max_diff(a, b) -> float:
    worst = 0.0
    for party, mods in a.modules.items():
        for seg, m in mods.items():
            other = b.modules[party][seg].state_dict()
            for k, v in m.state_dict().items():
                worst = max(worst, (v.double() - other[k].double()).abs().max().item())
    return worst


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("example", EXAMPLE_PLANS)
def test_pipelined_training_equals_synchronous_in_process(example, k):
    sync = splitlearn.train(_plan(example, 1))
    piped = splitlearn.train(_plan(example, k))
    assert _max_diff(sync, piped) < 1e-5
    assert piped["metrics"]["train_loss"] == pytest.approx(sync["metrics"]["train_loss"], abs=1e-5)


# (every shape at depths 2 and 4 in-process above; over gRPC the transport is the same for any depth or shape)
@pytest.mark.parametrize("example, k", [("vanilla", 4), ("vertical", 2)])
def test_pipelined_training_over_grpc_equals_synchronous(tmp_path, example, k):
    """Over gRPC, a chain at K = 4 and a merge at K = 2 (both K for every example in-process, above)."""
    plan = tmp_path / f"{example}.toml"
    plan.write_text((EXAMPLES / f"{example}.toml").read_text().replace("seed = 0", f"seed = 0\npipeline = {k}", 1))
    over_grpc = launch(plan, tmp_path / "run", epochs=1)
    sync = splitlearn.train(_plan(example, 1))
    got = {f"{p}/{seg}.{key}": v for p, mods in sync.modules.items() for seg, m in mods.items()
           for key, v in m.state_dict().items()}
    from safetensors.torch import load_file

    worst = 0.0
    for name in got:
        party, key = name.split("/", 1)
        w = load_file(str(tmp_path / "run" / "parties" / party / "weights.safetensors"))[key]
        worst = max(worst, (w.double() - got[name].double()).abs().max().item())
    assert worst < 1e-5
    assert over_grpc["metrics"]["test_accuracy"] == pytest.approx(sync["metrics"]["test_accuracy"], abs=0.01)


def _slow_learner(plan):
    """The plan with plain SGD at a small rate: with batches of 3 rows, momentum 0.9 at 0.05 is
    chaotic (a 1e-6 change of the rate moves the final weights by 2), which would hide the check."""
    from splitlearn.core.plan import Plan

    body = plan.model_dump()
    for party in body["parties"].values():
        if party.get("optimizer"):
            party["optimizer"].update(lr=0.005, momentum=0.0)
    return Plan.model_validate(body)


def test_a_batch_that_does_not_divide_into_micro_batches_still_equals_the_whole_batch():
    """32 rows in 5 micro-batches: 7, 7, 6, 6, 6 (torch.tensor_split); 3 rows in 4: three of one row."""
    sync = splitlearn.train(_plan("vanilla", 1))
    assert _max_diff(sync, splitlearn.train(_plan("vanilla", 5))) < 1e-5
    small = _slow_learner(_plan("vanilla", 1).with_train(batch_size=3, epochs=1))
    assert _max_diff(splitlearn.train(small), splitlearn.train(small.with_train(pipeline=4))) < 1e-5


def test_pipelined_bytes_are_the_synchronous_bytes_plus_the_framing_of_the_extra_messages():
    """The same tensor payload on every wire; K messages per training step instead of one; and
    each message's framing (its envelope: kind, parties, step, wire, codec, dtype, shape) is the
    same to a byte or two (a longer step id), so the extra bytes are exactly the extra messages'
    framing."""
    k = 4
    sync, piped = splitlearn.train(_plan("u_shaped", 1)), splitlearn.train(_plan("u_shaped", k))
    for party, entry in sync["parties"].items():
        steps = entry["train_steps"]
        theirs = {(t["wire"], t["direction"]): t for t in piped["parties"][party]["sent"]}
        assert entry["sent"]
        for s in [t for t in entry["sent"] if t["direction"] != "control"]:  # the tensor wires
            p = theirs[(s["wire"], s["direction"])]
            assert p["payload"] == s["payload"], (party, s["wire"])
            assert p["messages"] == s["messages"] + (k - 1) * steps, (party, s["wire"])
            framing_s = (s["bytes"] - s["payload"]) / s["messages"]
            framing_p = (p["bytes"] - p["payload"]) / p["messages"]
            assert abs(framing_p - framing_s) <= 2, (party, s["wire"], framing_s, framing_p)
            assert p["bytes"] - s["bytes"] == (p["bytes"] - p["payload"]) - (s["bytes"] - s["payload"])


def test_training_through_the_emulated_slow_link_gives_the_same_weights(tmp_path):
    """Every connection of a run through a relay with a 10 ms round trip and 200 Mbit/s: the relay
    passes bytes unchanged, so the weights are those of a direct run, bit for bit (the in-process run:
    a direct party-process run equals it bit for bit, test_network.py)."""
    direct = splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, out=tmp_path / "direct")
    slow = launch(EXAMPLES / "vanilla.toml", tmp_path / "slow", epochs=1, link="10ms,200mbit")
    from safetensors.torch import load_file

    for party in ("hospital", "server"):
        a = load_file(str(tmp_path / "direct" / "parties" / party / "weights.safetensors"))
        b = load_file(str(tmp_path / "slow" / "parties" / party / "weights.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert slow["link"] == {"rtt_s": 0.01, "bandwidth_bit_s": 2e8}
    assert direct["metrics"]["test_accuracy"] == slow["metrics"]["test_accuracy"]
