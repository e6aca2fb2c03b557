"""Bytes on each wire are exactly what the codec produced plus the stated protobuf framing."""

import tomllib
from itertools import islice

import pytest
import torch

from splitlearn.wire.codec import get_codec
from splitlearn.core.graph import build_graph
from splitlearn.wire.messages import Kind, Message, encode
from splitlearn.core.load import load_plan
from splitlearn.run.setup import prepare, schedule
from splitlearn.launch.threads import run_local

from .conftest import EXAMPLES


def framing(kind: Kind, sender: str, receiver: str, step: int, wire: str, t: torch.Tensor, codec: str = "float32") -> int:
    """The protobuf envelope around one tensor: the serialised size minus the tensor bytes."""
    msg = Message(kind, sender, receiver, step, wire, {"t": get_codec(codec).encode(t)})
    return len(encode(msg)) - msg.payload_bytes


def test_activation_bytes_are_batch_times_width_times_four_plus_framing():
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    steps = list(islice(schedule(plan, setups["hospital"].splits), 3))
    assert all(len(s.rows) == 32 for s in steps)
    reports = run_local(plan, setups, shapes, steps=list(steps))

    width = 128  # layers [0, 2] of mlp([64, 128, 64, 10])
    assert shapes["bottom->top"] == ("float32", (width,))
    sent = {(r["wire"], r["direction"]): r for r in reports["hospital"].meter["sent"]}
    act = sent[("bottom->top", "forward")]
    # three steps of 32 rows, plus the handshake step: one row of zeros fixing the wire's shape
    assert act["messages"] == 4
    assert act["payload"] == (3 * 32 + 1) * width * 4
    expected_framing = sum(framing(Kind.ACTIVATION, "hospital", "server", s.id, "bottom->top", torch.zeros(32, width))
                           for s in steps) + framing(Kind.ACTIVATION, "hospital", "server", -1, "bottom->top",
                                                     torch.zeros(1, width))
    assert act["bytes"] - act["payload"] == expected_framing
    assert expected_framing <= 4 * 80  # a few dozen bytes per message

    labels = sent[("hospital.y->digit", "forward")]
    assert labels["payload"] == (3 * 32 + 1) * 8  # int64 labels

    # the gradient coming back has the same size, and what one side sent the other received
    got = {(r["wire"], r["direction"]): r for r in reports["server"].meter["received"]}
    assert got[("bottom->top", "forward")] == act
    back = {(r["wire"], r["direction"]): r for r in reports["server"].meter["sent"]}[("bottom->top", "backward")]
    assert back["payload"] == 3 * 32 * width * 4  # no gradient at the handshake
    control = sum(r["bytes"] for r in reports["hospital"].meter["sent"] if r["direction"] == "control")
    assert reports["hospital"].meter["bytes_sent"] == act["bytes"] + labels["bytes"] + control


def test_flops_per_party_match_hand_count():
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    steps = list(islice(schedule(plan, setups["hospital"].splits), 2))
    reports = run_local(plan, setups, shapes, steps=list(steps))
    b = 32
    # hospital: Linear(64,128) forward 2*b*64*128; backward computes only the weight gradient
    # (the input needs none): another 2*b*64*128
    hospital = reports["hospital"].meter
    assert hospital["flops_forward"] == 2 * (2 * b * 64 * 128)
    assert hospital["flops_backward"] == 2 * (2 * b * 64 * 128)
    # server: Linear(128,64) and Linear(64,10); backward: grad input and grad weight for both
    server = reports["server"].meter
    fwd = 2 * b * (128 * 64 + 64 * 10)
    assert server["flops_forward"] == 2 * fwd
    assert server["flops_backward"] == 2 * 2 * fwd


def test_label_wires_vanilla_one_u_shaped_none():
    vanilla = build_graph(load_plan(EXAMPLES / "vanilla.toml"))
    assert [(w.src_party, w.dst_party) for w in vanilla.label_wires()] == [("hospital", "server")]
    assert build_graph(load_plan(EXAMPLES / "u_shaped.toml")).label_wires() == []
    assert build_graph(load_plan(EXAMPLES / "vertical_u_shaped.toml")).label_wires() == []


def test_u_shaped_client_has_two_stages():
    g = build_graph(load_plan(EXAMPLES / "u_shaped.toml"))
    stages = g.stages_of("hospital")
    assert sorted(set(s.nodes) for s in stages) == sorted([{"hospital.x", "bottom"}, {"head", "digit", "hospital.y"}])


@pytest.mark.parametrize("codec,per_step", [("int8", 32 * 128 + 8), ("float16", 32 * 128 * 2),
                                            ("topk:0.1", 410 * 8)])
def test_wire_codecs_change_the_bytes_actually_sent(codec, per_step):
    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["wires"] = {"bottom": {"codec": codec, "grad_codec": codec}}
    plan, setups, shapes = prepare(plan, epochs=1)
    steps = list(islice(schedule(plan, setups["hospital"].splits), 3))
    reports = run_local(plan, setups, shapes, steps=list(steps))
    fwd = {(r["wire"], r["direction"]): r for r in reports["hospital"].meter["sent"]}[("bottom->top", "forward")]
    handshake = get_codec(codec).encode(torch.zeros(1, 128)).nbytes  # one row, same codec
    assert fwd["payload"] == 3 * per_step + handshake
    back = {(r["wire"], r["direction"]): r for r in reports["server"].meter["sent"]}[("bottom->top", "backward")]
    assert back["payload"] == 3 * per_step
