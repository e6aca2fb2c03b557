"""Several tensors across a cut (issue #24 item 9): a skip connection crossing a cut, a segment returning a
tuple or dict, each element on a wire of its own (its own dtype and shape, a dimension that may vary up to a
bound), gradients back for the floating ones only."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitlearn
from splitlearn import PlanError
from splitlearn.api import split_plan
from splitlearn.core.load import load_plan
from splitlearn.core.specs import DataSpec
from splitlearn.run.setup import prepare

from .support import run_steps, unsplit_segments, worst_difference

STEPS = 5


class Residual(nn.Module):
    """``a`` crosses the cut after ``layer1``: ``head(layer1(a) + a)``."""

    def __init__(self):
        super().__init__()
        self.f, self.layer1, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        a = torch.relu(self.f(x))
        return self.head(torch.relu(self.layer1(a)) + a)


class Encoder(nn.Module):
    """Returns (hidden float, integer mask): the mask gets no gradient."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x)), (x[:, :16] > 4).long()


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)

    def forward(self, hidden, mask):
        return self.lin(hidden * (1 + mask))


def test_a_skip_connection_across_the_cut_trains_as_the_unsplit_module():
    torch.manual_seed(0)
    model = Residual()
    plan = split_plan(model, "layer1", data="digits", epochs=1, optimizer="sgd", lr=0.1)
    assert plan.segments["bottom"].output_names == ["layer1", "relu"]  # filled in: the cut's output, then `a`
    plan, setups, steps = run_steps(plan, STEPS)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = setups["client"].inputs["client.x"], setups["client"].inputs["client.y"]
    assert all(s.mode == "train" for s in steps)
    for s in steps:
        opt.zero_grad()
        F.cross_entropy(ref(x[s.rows]), y[s.rows]).backward()
        opt.step()
    trained = {k: v for st in setups.values() for m in st.modules.values() for k, v in m.state_dict().items()}
    assert set(trained) == set(ref.state_dict())
    worst = max((trained[k].double() - v.double()).abs().max().item() for k, v in ref.state_dict().items())
    assert worst <= 1e-6, f"split and unsplit residual differ by {worst}"
    assert (ref.f.weight - model.f.weight).abs().max() > 1e-4  # the skip's gradient reached the bottom
    bottom, top = splitlearn.cut(model, after="layer1")  # the own-loop pieces: the tuple goes in as arguments
    assert torch.allclose(top(*bottom(x[:4])), model(x[:4]))


def _tuple_plan(**segment):
    body = {
        "name": "pair", "data": DataSpec.of_arrays({"x": torch.randint(0, 9, (40, 64)).float(),
                                                     "y": torch.randint(0, 10, (40,))}),
        "train": {"epochs": 1, "batch_size": 8},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.1}},
                    "server": {"optimizer": {"name": "sgd", "lr": 0.1}}},
        "networks": {"enc": Encoder(), "head": Head()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": ["hidden", "mask"]},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "head", **segment}},
        "losses": {"task": {"input": "top", "target": "client.y"}},
    }
    return load_plan(body)


@pytest.mark.parametrize("inputs", [["bottom"], ["bottom:hidden", "bottom:mask"]], ids=["bare", "named"])
def test_a_segment_returning_a_tuple_trains_as_unsplit_with_no_gradient_for_the_mask(inputs):
    plan = _tuple_plan(inputs=inputs, **({"merge": "module"} if len(inputs) > 1 else {}))
    assert plan.model_dump()["segments"]["bottom"]["outputs"] == ["hidden", "mask"]
    ref = unsplit_segments(plan)
    plan, setups, steps = run_steps(plan, STEPS)
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=0.1)
    x, y = setups["client"].inputs["client.x"], setups["client"].inputs["client.y"]
    for s in [s for s in steps if s.mode == "train"]:
        opt.zero_grad()
        F.cross_entropy(ref["top"](*ref["bottom"](x[s.rows])), y[s.rows]).backward()
        opt.step()
    assert worst_difference(setups, ref) <= 1e-6
    wires = {w.name: w for w in plan_graph(plan).wires}
    assert set(wires) == {"bottom:hidden->top", "bottom:mask->top", "client.y->task"}


def plan_graph(plan):
    from splitlearn.core.graph import build_graph

    return build_graph(plan)


class Tokens(nn.Module):
    """Token rows (0: padding) embedded to the batch's longest row: (hidden [B, L, 4], integer mask [B, L])."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x):
        ids = x[:, :max(1, int((x != 0).sum(1).max()))].long()
        return self.emb(ids), (ids != 0).long()


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, hidden, mask):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.lin((hidden * m).sum(1) / m.sum(1).clamp(min=1))


def _token_plan(bound: int, longest: int = 6):
    g = torch.Generator().manual_seed(3)
    lengths = torch.where(torch.rand(48, generator=g) < 0.1, longest, torch.randint(1, 3, (48,), generator=g))
    lengths[0] = 1  # the dry run's row (the first) is short; batches are longer
    x = torch.randint(1, 10, (48, 12), generator=g) * (torch.arange(12) < lengths[:, None])
    vary = {"vary": {1: bound}}
    return load_plan({
        "name": "tokens", "data": DataSpec.of_arrays({"x": x, "y": torch.randint(0, 3, (48,), generator=g)}),
        "train": {"epochs": 1, "batch_size": 8},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.1}},
                    "server": {"optimizer": {"name": "sgd", "lr": 0.1}}},
        "networks": {"enc": Tokens(), "head": Pool()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": [{"name": "hidden", **vary}, {"name": "mask", **vary}]},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "head"}},
        "losses": {"task": {"input": "top", "target": "client.y"}},
    })


def test_a_varying_sequence_dimension_is_taken_up_to_its_bound_and_refused_past_it():
    plan = _token_plan(bound=12)
    assert plan.model_dump()["segments"]["bottom"]["outputs"][0] == {"name": "hidden", "vary": {1: 12}}
    ref = unsplit_segments(plan)
    plan, setups, steps = run_steps(plan, 4)
    x, y = setups["client"].inputs["client.x"], setups["client"].inputs["client.y"]
    lengths = {int((x[s.rows] != 0).sum(1).max()) for s in steps}
    assert len(lengths) > 1  # the batches did vary
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=0.1)
    for s in [s for s in steps if s.mode == "train"]:
        opt.zero_grad()
        F.cross_entropy(ref["top"](*ref["bottom"](x[s.rows])), y[s.rows]).backward()
        opt.step()
    assert worst_difference(setups, ref) <= 1e-6

    with pytest.raises(Exception, match=r"bottom:hidden->top.*where \[8, 1, 4\], dimension 1 from 1 to 2 was "
                                        r"expected") as e:
        run_steps(_token_plan(bound=2), 4)  # a batch as long as 6 on a wire bound to 2
    assert "refused" in str(e.value)


def test_a_message_missing_its_tensor_or_of_another_dtype_is_refused():
    from splitlearn.core.admission import decode_checked
    from splitlearn.core.step import StepState
    from splitlearn.wire.codec import WireError, get_codec
    from splitlearn.wire.messages import Kind, Message

    plan = _token_plan(bound=12)
    wires = {w.name: w for w in plan_graph(plan).wires}
    shapes = {"bottom:hidden->top": ("float32", (1, 4)), "bottom:mask->top": ("int64", (1,))}
    st = StepState(3, torch.arange(2), "train")

    def msg(wire, t):
        tensors = {} if t is None else {"t": get_codec("float32" if t.is_floating_point() else "raw").encode(t)}
        return Message(Kind.ACTIVATION, "client", "server", 3, wire, tensors)

    assert decode_checked(msg("bottom:mask->top", torch.ones(2, 5, dtype=torch.long)), wires["bottom:mask->top"], st,
                          shapes).shape == (2, 5)
    with pytest.raises(WireError, match="expected one tensor 't', got \\[\\]"):
        decode_checked(msg("bottom:mask->top", None), wires["bottom:mask->top"], st, shapes)
    with pytest.raises(WireError, match="dtype float32 where int64 was agreed"):
        decode_checked(msg("bottom:mask->top", torch.ones(2, 5)), wires["bottom:mask->top"], st, shapes)
    lossy = Message(Kind.ACTIVATION, "client", "server", 3, "bottom:mask->top",
                    {"t": get_codec("float16").encode(torch.ones(2, 5, dtype=torch.long))})
    with pytest.raises(WireError, match="codec 'float16' where 'raw' was agreed"):  # an integer travels exactly
        decode_checked(lossy, wires["bottom:mask->top"], st, shapes)
    with pytest.raises(WireError, match=r"shape \[2, 13, 4\] where \[2, 1, 4\], dimension 1 from 1 to 12"):
        decode_checked(msg("bottom:hidden->top", torch.ones(2, 13, 4)), wires["bottom:hidden->top"], st, shapes)
    with pytest.raises(WireError, match=r"shape \[2, 5, 3\] where \[2, 1, 4\]"):  # other dimensions exactly
        decode_checked(msg("bottom:hidden->top", torch.ones(2, 5, 3)), wires["bottom:hidden->top"], st, shapes)
    st.sent["bottom:mask->top"] = torch.ones(2, 5, dtype=torch.long)
    grad = Message(Kind.GRADIENT, "server", "client", 3, "bottom:mask->top",
                   {"t": get_codec("float32").encode(torch.ones(2, 5, dtype=torch.long))})
    with pytest.raises(WireError, match="a gradient for an activation of dtype int64, which carries none"):
        decode_checked(grad, wires["bottom:mask->top"], st, shapes)


def test_stage_sends_a_tuple_each_tensor_on_its_wire_and_returns_it_whole():
    from splitlearn import Stage
    from splitlearn.wire.transport import InProcessHub

    torch.manual_seed(0)
    enc, head = Encoder(), Head()
    ref_enc, ref_head = copy.deepcopy(enc), copy.deepcopy(head)
    x, y = torch.randint(0, 9, (6, 64)).float(), torch.randint(0, 10, (6,))
    F.cross_entropy(ref_head(*ref_enc(x)), y).backward()
    hub = InProcessHub(["hospital", "server"])
    hospital = Stage(enc, hub.transport("hospital"), next="server")
    server = Stage(head, hub.transport("server"), previous="hospital")
    for _ in range(2):  # the second step: the layout is known, each element checked against its agreed shape
        for m in (enc, head):
            m.zero_grad()
        hospital.forward(x)
        out = server.forward()
        F.cross_entropy(out, y).backward()
        server.backward()
        hospital.backward()
    assert server.shapes == {"hospital:0": ("float32", (16,)), "hospital:1": ("int64", (16,))}
    got = [p.grad for m in (enc, head) for p in m.parameters()]
    assert max((a - b.grad).abs().max().item() for a, b in zip(got, [*ref_enc.parameters(), *ref_head.parameters()])) \
        <= 1e-6
    sent = {w for (w, direction) in hospital.meter.sent}
    assert {"hospital:0", "hospital:1"} <= sent  # metered per tensor; the mask's wire carried no gradient back:
    assert ("hospital:1", "backward") not in hospital.meter.received and ("hospital:0", "backward") in \
        hospital.meter.received


def test_inspect_lists_each_tensor_with_its_dtype_shape_and_bound(tmp_path):
    from typer.testing import CliRunner

    from splitlearn.cli import app

    (tmp_path / "tokmodels.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Tokens(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.emb = nn.Embedding(10, 4)\n\n    def forward(self, x):\n"
        "        ids = x[:, :3].long().clamp(0, 9)\n        return self.emb(ids), (ids != 0).long()\n\n"
        "class Pool(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = nn.Linear(4, 10)\n\n"
        "    def forward(self, hidden, mask):\n        return self.lin(hidden.mean(1))\n\n"
        "def tokens():\n    return Tokens()\n\ndef pool():\n    return Pool()\n")
    (tmp_path / "plan.toml").write_text(
        'name = "tokens"\n[data]\ndataset = "digits"\n[parties.client]\nholds = { x = "x", y = "y" }\n'
        '[parties.server]\n[networks.enc]\nfactory = "tokmodels:tokens"\n'
        '[networks.head]\nfactory = "tokmodels:pool"\n'
        '[segments.bottom]\nparty = "client"\ninputs = ["client.x"]\nnetwork = "enc"\n'
        'outputs = [{ name = "hidden", vary = { 1 = 512 } }, "mask"]\n'
        '[segments.top]\nparty = "server"\ninputs = ["bottom"]\nnetwork = "head"\n'
        '[losses.task]\ninput = "top"\ntarget = "client.y"\n')
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "plan.toml")])
    assert result.exit_code == 0, result.output
    hidden = r"bottom:hidden->top: float32 \[batch, 3 \(1\.\.512\), 4\] +48 B a row \(up to 8192 B\)"
    said = " ".join(result.output.split())  # (as the console wraps it)
    assert re.search(hidden, said), result.output
    assert re.search(r"bottom:mask->top: int64 \[batch, 3\] +24 B a row \(exact, no gradient: codecs and defenses "
                     r"act on floating tensors only\)", said), result.output


@pytest.mark.parametrize("change, says", [
    ({"top": {"inputs": ["bottom:hiden"]}}, "(?s)segment 'bottom' has no output 'hiden'.*did you mean 'hidden'\\? its "
                                            "outputs are \\['hidden', 'mask'\\]"),
    ({"top": {"inputs": ["top2:x"]}}, "'top2:x' names unknown segment 'top2'"),
    ({"loss": "bottom"}, "(?s)segment 'bottom' gives several outputs \\['hidden', 'mask'\\]: a loss takes one.*"
                         "name one as 'bottom:hidden'"),
    ({"top": {"inputs": ["bottom"], "merge": "concat"}}, "cannot merge them by 'concat'"),
])
def test_references_to_elements_are_checked(change, says):
    body = {
        "name": "pair", "data": {"dataset": "digits"},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}}, "server": {}},
        "networks": {"enc": Encoder(), "head": Head()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": ["hidden", "mask"]},
                     "top": {"party": "server", "network": "head", "inputs": ["bottom"], **change.get("top", {})}},
        "losses": {"task": {"input": change.get("loss", "top"), "target": "client.y"}},
    }
    with pytest.raises(PlanError, match=says):
        load_plan(body)


def test_a_plan_file_cut_across_a_skip_without_its_outputs_names_what_to_write():
    body = {
        "name": "skip", "data": {"dataset": "digits"},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}}, "server": {}},
        "networks": {"model": Residual()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "model", "cut": "layer1"},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "model"}},
        "losses": {"task": {"input": "top", "target": "client.y"}},
    }
    with pytest.raises(PlanError, match=re.escape('write outputs = ["layer1", "relu"] in segments.bottom')) as e:
        prepare(load_plan(body))
    assert e.value.entry == "segments.bottom.outputs"


# -- integer elements: flow control, exact codecs, defenses, the batch dimension (review of #24 item 9) -------------

class Bottom(nn.Module):
    """(hidden float, integer mask) of 8 features."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)), (x[:, :4] > 0).long()


class OnMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, m):
        return self.lin(m.float())


def test_a_party_fed_only_an_integer_element_credits_its_producer_and_the_run_trains_as_unsplit():
    """s2 takes only the mask: nothing comes back to the client from it in training, so the client is held by its
    credits (before, it was not, and the first evaluation step past the window waited for a credit never sent)."""
    from splitlearn.core.flow import FlowControl
    from splitlearn.core.graph import build_graph
    from splitlearn.wire.messages import Limits

    g = torch.Generator().manual_seed(0)
    plan = load_plan({
        "name": "intflow", "data": DataSpec.of_arrays({"x": torch.randn(100, 8, generator=g),
                                                        "y": torch.randint(0, 3, (100,), generator=g)}),
        "train": {"epochs": 1, "batch_size": 2, "step_timeout": 20},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.1}},
                    "s1": {"optimizer": {"name": "sgd", "lr": 0.1}}, "s2": {"optimizer": {"name": "sgd", "lr": 0.1}}},
        "networks": {"enc": Bottom(), "top": nn.Linear(4, 3), "aux": OnMask()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": ["hidden", "mask"]},
                     "top": {"party": "s1", "inputs": ["bottom:hidden"], "network": "top"},
                     "aux": {"party": "s2", "inputs": ["bottom:mask"], "network": "aux"}},
        "losses": {"task": {"input": "top", "target": "client.y"}, "auxloss": {"input": "aux", "target": "client.y"}},
    })
    graph = build_graph(plan)
    agreed = {"bottom:hidden->top": ("float32", (4,)), "bottom:mask->aux": ("int64", (4,))}
    gated = {p: {c: set(pair.gated) for c, pair in FlowControl(graph, p, Limits(), dict(agreed)).out.items()}
             for p in ("client", "s2")}
    assert gated["client"] == {"s1": {"eval", "predict"}, "s2": {"train", "eval", "predict"}}
    assert [p.producer for p in FlowControl(graph, "s2", Limits(), dict(agreed)).owed] == ["client"]  # s2 credits
    window = FlowControl(graph, "client", Limits(), dict(agreed)).out["s2"].window
    ref = unsplit_segments(plan)
    plan, setups, steps = run_steps(plan)
    train = [s for s in steps if s.mode == "train"]
    assert len(train) == 40 > 2 * window and steps[-1].mode == "eval"  # evaluation far past the window
    x, y = setups["client"].inputs["client.x"], setups["client"].inputs["client.y"]
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=0.1)
    for s in train:
        opt.zero_grad()
        hidden, mask = ref["bottom"](x[s.rows])
        (F.cross_entropy(ref["top"](hidden), y[s.rows]) + F.cross_entropy(ref["aux"](mask), y[s.rows])).backward()
        opt.step()
    assert worst_difference(setups, ref) <= 1e-6


class BigIds(nn.Module):
    """(hidden float, token ids above 2**24: a float32 rounds them, float16/int8/top-k ruin them)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x)), x[:, :16].long() + 2 ** 40 + 1


class OnIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)

    def forward(self, hidden, ids):
        return self.lin(hidden * (ids - 2 ** 40).float())


@pytest.mark.parametrize("wire", [{"codec": "float16", "grad_codec": "float16"}, {"codec": "int8"},
                                  {"codec": "topk:0.25:ef"}, {"noise": {"sigma": 0.5, "clip": 1.0}},
                                  {"nopeek": 0.5}], ids=["float16", "int8", "topk", "noise", "nopeek"])
def test_an_integer_element_travels_exactly_and_undefended_whatever_the_wire_sets(wire):
    from splitlearn.launch.threads import run_local
    from splitlearn.run.setup import schedule

    g = torch.Generator().manual_seed(0)
    plan = load_plan({
        "name": "ids", "data": DataSpec.of_arrays({"x": torch.randint(0, 9, (40, 64), generator=g).float(),
                                                    "y": torch.randint(0, 10, (40,), generator=g)}),
        "train": {"epochs": 1, "batch_size": 8},
        "parties": {"client": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.1}},
                    "server": {"optimizer": {"name": "sgd", "lr": 0.1}}},
        "networks": {"enc": BigIds(), "head": OnIds()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": ["hidden", "ids"]},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "head"}},
        "losses": {"task": {"input": "top", "target": "client.y"}},
        "wires": {"bottom": wire},
    })
    plan, setups, shapes = prepare(plan)
    sent, got = [], []
    setups["client"].modules["bottom"].register_forward_hook(lambda m, i, out: sent.append(out))
    setups["server"].modules["top"].register_forward_hook(lambda m, i, out: got.append(i))
    steps = list(schedule(plan, setups["client"].splits))
    reports = run_local(plan, setups, shapes, steps=steps)
    assert not any(r.refused for r in reports.values())
    assert len(got) == len(sent) == len(steps) + 1  # the handshake, then every step
    assert all(torch.equal(s[1], r[1]) and r[1].dtype == torch.int64 for s, r in zip(sent, got))
    assert int(got[-1][1].max()) > 2 ** 40  # (float32 would have rounded these)
    hidden = max((s[0].detach() - r[0].detach()).abs().max().item() for s, r in zip(sent[1:], got[1:]))
    if "noise" in wire:
        assert hidden > 0.05  # the float element is noised
    elif "nopeek" in wire:
        assert hidden == 0.0  # nopeek changes the loss, not what travels
    trained = setups["client"].modules["bottom"].lin.weight
    assert torch.isfinite(trained).all()


def test_a_gradient_on_the_wire_of_an_integer_element_is_refused_at_once():
    from splitlearn.core.engine import Party
    from splitlearn.wire.codec import get_codec
    from splitlearn.wire.link import Link
    from splitlearn.wire.messages import Kind, Message
    from splitlearn.wire.transport import InProcessHub

    plan = _tuple_plan()
    graph = plan_graph(plan)
    hub = InProcessHub(["client", "server"])
    shapes = {"bottom:hidden->top": ("float32", (16,)), "bottom:mask->top": ("int64", (16,))}
    client = Party(graph, "client", Link(hub.transport("client")), {}, None, {}, dict(shapes))
    grad = {"t": get_codec("float32").encode(torch.ones(8, 16))}
    client.keep_early(Message(Kind.GRADIENT, "server", "client", 5, "bottom:mask->top", grad), 3)
    assert client.kept_early == {}
    said = client.link.refused[-1]
    assert "no gradient from 'server' is expected on this wire (its tensor is no floating one" in said
    client.keep_early(Message(Kind.GRADIENT, "server", "client", 5, "bottom:hidden->top", grad), 3)
    assert list(client.kept_early) == [5]  # the floating element's gradient is kept as ever


class Flat(nn.Module):
    def __init__(self, crossing):
        super().__init__()
        self.lin, self.crossing = nn.Linear(64, 16), crossing

    def forward(self, x):
        h = self.lin(x)
        return h, self.crossing(x, h)


@pytest.mark.parametrize("crossing, says", [
    (lambda x, h: h.mean(0), r"its output 'extra' has shape \[16\], which has no batch dimension"),
    (lambda x, h: torch.zeros(7, 16), r"its output 'extra' has shape \[7, 16\], which has no batch dimension"),
    (lambda x, h: x.shape[0], "its output 'extra' is a int, no tensor: a shape or number crosses the cut"),
], ids=["mean", "table", "number"])
def test_an_element_without_the_batch_dimension_is_refused_when_the_plan_is_checked(crossing, says):
    body = {
        "name": "pos", "data": DataSpec.of_arrays({"x": torch.randn(20, 64), "y": torch.randint(0, 10, (20,))}),
        "parties": {"client": {"holds": {"x": "x", "y": "y"}}, "server": {}},
        "networks": {"enc": Flat(crossing), "head": Head()},
        "segments": {"bottom": {"party": "client", "inputs": ["client.x"], "network": "enc",
                                "outputs": ["hidden", "extra"]},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "head"}},
        "losses": {"task": {"input": "top", "target": "client.y"}},
    }
    with pytest.raises(PlanError, match=says) as e:
        prepare(load_plan(body))
    assert e.value.entry == "segments.bottom.outputs" and "after the cut" in str(e.value)


def test_stage_sends_integer_elements_exactly_and_a_mask_alone_waits_for_no_gradient():
    from splitlearn import Stage
    from splitlearn.wire.transport import InProcessHub

    torch.manual_seed(0)
    x, y = torch.randint(0, 9, (6, 64)).float(), torch.randint(0, 10, (6,))
    wire = {"codec": "float16", "noise": {"sigma": 0.5, "clip": 1.0}}
    hub = InProcessHub(["hospital", "server"])
    enc, head = BigIds(), OnIds()
    got = []
    head.register_forward_pre_hook(lambda m, args: got.append(args))
    hospital = Stage(enc, hub.transport("hospital"), next="server", send=wire, timeout=5)
    server = Stage(head, hub.transport("server"), previous="hospital", receive=wire, timeout=5)
    hidden, ids = hospital.forward(x)
    F.cross_entropy(server.forward(), y).backward()
    server.backward()
    hospital.backward()
    assert torch.equal(got[0][1], ids) and int(ids.max()) > 2 ** 40  # exact, though the wire says float16
    assert (got[0][0] - hidden).abs().max() > 0.05  # the float element is noised
    assert enc.lin.weight.grad is not None


    class Ids(nn.Module):
        def forward(self, v):
            return (v.long() + 2 ** 40,)

    hub = InProcessHub(["hospital", "server"])
    first = Stage(Ids(), hub.transport("hospital"), next="server", timeout=5)
    last = Stage(None, hub.transport("server"), previous="hospital", timeout=5)
    for _ in range(2):  # training forwards (gradients enabled) that send no floating element
        first.forward(x)
        (received,) = last.forward()
        assert torch.equal(received, x.long() + 2 ** 40)
        last.backward()  # nothing to send back
        first.backward()  # returns at once: no gradient can come (before, a PartyError after its 5 s timeout)
    assert not first.pending and not last.pending


def test_pieces_cut_in_several_threads_at_once_leave_every_later_forward_alone():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces; two traces at once used to leave
    it patched for good, and every later forward of the process failed ("module is not installed as a submodule").
    Parties in threads build their pieces at the same time: the traces take turns."""
    import threading

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    call, failed = nn.Module.__call__, []

    def build():
        try:
            for _ in range(60):
                splitlearn.cut(Net(), after="a")
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == [] and nn.Module.__call__ is call
    assert nn.Linear(4, 2)(torch.ones(1, 4)).shape == (1, 2)


def test_a_forward_in_another_thread_while_a_model_is_cut_runs_as_itself():
    """While fx traces, nn.Module.__call__ is patched for the whole process: a forward that another thread runs
    then (a party training while its neighbour, in the same process, still cuts its model: docs/own-loop.md's
    in-process example failed about one run in fifteen) went into the trace and failed ("module is not installed
    as a submodule"). It now runs as itself, to the same output."""
    import threading

    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(5, 8)
    want, stop, seen = net(x), threading.Event(), {"runs": 0, "errors": []}

    def forwards():
        while not stop.is_set():
            try:
                assert torch.equal(net(x), want)
                seen["runs"] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                seen["errors"].append(repr(e))
                return

    t = threading.Thread(target=forwards)
    t.start()
    try:
        for _ in range(5):  # a long trace: 300 layers, so the other thread runs during it
            splitlearn.cut(nn.Sequential(*[nn.Linear(8, 8) for _ in range(300)]), after=1)
    finally:
        stop.set()
        t.join()
    assert seen["errors"] == [] and seen["runs"] > 0
