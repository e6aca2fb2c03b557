"""Bring your own model: nn.Module objects and callables in Python, modules cut at named
submodules with torch.fx, factories next to the plan, a device per party."""

import copy
import os
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import splitlearn
from splitlearn import PlanError
from splitlearn.api import split_plan
from splitlearn.data import load_table
from splitlearn.models import build_network, build_segment
from splitlearn.launch.threads import run_local
from splitlearn.run.setup import prepare, schedule

from .resnet import Pair, ReadsMode, ResNet, Skip, Stack, Tied, resnet

STEPS = 6


def _train_steps(plan, steps=STEPS):
    plan, setups, shapes = prepare(plan)
    first = next(iter(setups.values()))
    todo = [s for s in islice(schedule(plan, first.splits), steps)]
    assert all(s.mode == "train" for s in todo)
    return plan, setups, shapes, todo


@pytest.mark.parametrize("cuts", [["layer1"], ["layer1", "layer2"]], ids=["vanilla", "u_shaped"])
def test_a_resnet_cut_by_name_trains_as_the_unsplit_module(cuts):
    torch.manual_seed(1)
    model = ResNet()
    snapshot = copy.deepcopy(model.state_dict())
    plan = split_plan(model, cuts, data="digits", epochs=1, optimizer="sgd", lr=0.05, momentum=0.9)
    plan, setups, shapes, steps = _train_steps(plan)
    assert shapes["bottom->" + ("middle" if len(cuts) == 2 else "top")] == ("float32", (8, 8, 8))  # layer1's output
    # the pieces hold the module's own parameter names, and start from the object's weights
    pieces = {s: m for p in setups.values() for s, m in p.modules.items()}
    assert set(pieces["bottom"].state_dict()) == {k for k in model.state_dict() if k.startswith(("conv1", "bn1", "layer1"))}
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    x, y = setups["client"].inputs["client.x"], setups["client"].inputs["client.y"]
    for s in steps:
        opt.zero_grad()
        F.cross_entropy(ref(x[s.rows]), y[s.rows]).backward()
        opt.step()

    run_local(plan, setups, shapes, steps=steps)

    trained = {k: v for m in pieces.values() for k, v in m.state_dict().items()}
    assert set(trained) == set(ref.state_dict())  # every parameter and buffer, in exactly one piece
    worst = max((trained[k].double() - v.double()).abs().max().item() for k, v in ref.state_dict().items())
    assert worst <= 1e-6, f"split and unsplit ResNet differ by {worst}"
    moved = max((a.double() - b.double()).abs().max().item()
                for a, b in zip(ref.state_dict().values(), snapshot.values()))
    assert moved > 1e-3  # training moved the weights; and the object passed in stayed as it was:
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_split_trains_and_returns_the_trained_module(tmp_path):
    torch.manual_seed(0)
    model = ResNet()
    before = copy.deepcopy(model.state_dict())
    result = splitlearn.split(model, cut="layer1", data="digits", epochs=2, out=tmp_path / "run")
    assert result["metrics"]["test_accuracy"] > 0.8
    assert set(result.modules) == {"client", "server"}
    whole = result.model
    assert type(whole) is ResNet
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's object untouched
    # the reassembled module predicts what the split parties predicted
    pred = splitlearn.predict(tmp_path / "run", networks={"model": model}, write=False)["task"]
    x = torch.from_numpy(load_table("digits").fields["image"])
    whole.eval()
    with torch.no_grad():
        expect = whole(x[torch.tensor(pred["ids"])])
    assert (expect - pred["outputs"]).abs().max().item() <= 1e-5
    with pytest.raises(PlanError, match=r"network 'model' was given in Python as tests\.resnet\.ResNet object"):
        splitlearn.predict(tmp_path / "run", write=False)


def test_split_takes_tensors_and_a_sequential_subclass():
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    y = (x[:, :4].sum(1) > 0).long()
    result = splitlearn.split(Stack(width=16), cut=1, data=(x, y), epochs=10, lr=1e-2)
    assert [m.__class__.__name__ for m in result.modules["server"]["top"]] == ["Linear", "ReLU", "Linear"]  # the rest
    assert result["metrics"]["test_accuracy"] > 0.9


def test_module_objects_equal_factories():
    base = {"name": "own", "data": {"dataset": "digits"}, "train": {"epochs": 1},
            "parties": {"hospital": {"holds": {"x": "image", "y": "y"}}, "server": {}},
            "segments": {"bottom": {"party": "hospital", "inputs": "hospital.x", "network": "net", "cut": "layer1"},
                         "top": {"party": "server", "inputs": "bottom", "network": "net"}},
            "losses": {"digit": {"input": "top", "target": "hospital.y"}}}
    by_name = {**base, "networks": {"net": {"factory": "tests.resnet:resnet", "args": {"width": 4}}}}
    initial = build_network(splitlearn.load_plan(by_name), "net")  # what the factory builds under the plan's seed
    as_object = {**base, "networks": {"net": initial}}
    as_callable = {**base, "networks": {"net": {"factory": resnet, "args": {"width": 4}}}}
    assert splitlearn.load_plan(as_callable).networks["net"].factory == "tests.resnet:resnet"  # importable: by name
    results = [splitlearn.train(p) for p in (by_name, as_object, as_callable)]
    states = [r.model.state_dict() for r in results]
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    assert results[0]["metrics"] == results[1]["metrics"] == results[2]["metrics"]


def test_a_skip_connection_across_the_cut_crosses_on_a_wire_of_its_own():
    shapes = prepare(split_plan(Skip(), cut="middle"))[2]  # tests/test_multi_tensor.py trains it
    assert shapes["bottom:middle->top"] == shapes["bottom:relu->top"] == ("float32", (32,))
    plan = split_plan(Skip(), cut="first")  # the skip stays on one side of this cut
    assert prepare(plan)[2]["bottom->top"] == ("float32", (32,))


def test_a_forward_reading_self_training_and_a_tuple_output_are_refused():
    with pytest.raises(PlanError, match=r"computes differently in training and in evaluation \(it reads self.training"):
        prepare(split_plan(ReadsMode(), cut="a"))
    with pytest.raises(PlanError, match=r"segment 'bottom' \(party 'client'\) gives a tuple, not one tensor"):
        prepare(split_plan(Pair(), cut="a"))


def test_two_plans_with_one_factory_module_name_are_not_confused(tmp_path):
    for name, width in (("one", 16), ("two", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samename.py").write_text(
            f"from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(64, {width}), nn.ReLU(), "
            f"nn.Linear({width}, 10))\n")
        (tmp_path / name / "plan.toml").write_text(PLAN.replace('factory = "mynet:make"\nargs = { width = 24 }',
                                                                 'factory = "samename:make"').replace(
            'cut = "encoder"', "layers = [0, 2]"))
    assert prepare(tmp_path / "one" / "plan.toml")[2]["bottom->top"] == ("float32", (16,))
    with pytest.raises(PlanError, match=r"a module 'samename' from .*one/samename.py is already imported"):
        prepare(tmp_path / "two" / "plan.toml")


def test_weights_used_on_both_sides_of_a_cut_are_refused():
    with pytest.raises(PlanError, match=r"'a' is used on both sides of a cut \(shared or tied weights\)"):
        prepare(split_plan(Tied(), cut="b"))


@pytest.mark.parametrize("cut, message", [
    ("layer9", r"it has no submodule 'layer9' \(its top-level submodules: \['conv1', 'bn1', 'layer1'"),
    (["layer2", "layer1"], r"submodule 'layer1' runs before the earlier cuts"),
])
def test_bad_cuts_are_plan_errors(cut, message):
    with pytest.raises(PlanError, match=message):
        prepare(split_plan(ResNet(), cut))


def test_indices_on_a_module_and_a_missing_rest():
    plan = split_plan(ResNet(), "layer1").model_dump()
    plan["networks"] = {"model": {"factory": "tests.resnet:resnet"}}
    plan["segments"]["bottom"] = {**plan["segments"]["bottom"], "cut": None, "layers": [0, 2]}
    with pytest.raises(PlanError, match=r"is a ResNet, which cannot be cut at layer indices.*\n  hint: cut it after a "
                                        r"named submodule"):
        prepare(plan)


def test_a_sequential_segment_without_layers_runs_the_rest():
    plan = {"name": "rest", "data": {"dataset": "digits"}, "train": {"epochs": 1},
            "parties": {"phone": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "adam", "lr": 0.01}},
                        "cloud": {"optimizer": {"name": "adam", "lr": 0.01}}},
            "networks": {"net": {"factory": "tests.resnet:Stack"}},
            "segments": {"bottom": {"party": "phone", "inputs": "phone.x", "network": "net", "layers": [0, 2]},
                         "top": {"party": "cloud", "inputs": ["bottom"], "network": "net"}},
            "losses": {"digit": {"input": "top", "target": "phone.y"}}}
    p = splitlearn.load_plan(plan)
    assert list(build_segment(p, "top").state_dict()) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert splitlearn.train(plan)["metrics"]["test_accuracy"] > 0.5


def test_a_factory_that_raises_is_named_with_its_message():
    def broken(**_):
        raise RuntimeError("no GPU memory left")

    plan = split_plan(Stack(), 1).model_dump()
    with pytest.raises(PlanError, match=r"building network 'model' failed: RuntimeError: no GPU memory left"):
        prepare({**plan, "networks": {"model": broken}})


def test_a_factory_in_main_is_refused_in_a_plan_file():
    with pytest.raises(PlanError, match="lives in the script being run, which other processes cannot import"):
        splitlearn.load_plan({**split_plan(Stack(), 1).model_dump(), "networks": {"model": {"factory": "__main__:make"}}})


def test_cuda_without_cuda_is_a_clear_error_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    plan = split_plan(Stack(), 1, device="cuda").model_dump()
    plan["networks"] = {"model": {"factory": "tests.resnet:Stack"}}
    with pytest.raises(PlanError, match=r"party 'client' asks for device 'cuda', but this machine has no CUDA device"):
        splitlearn.train(plan)
    plan["parties"]["client"]["device"] = "auto"
    plan["parties"]["server"]["device"] = "cpu"
    result = splitlearn.train(plan, epochs=1)
    assert all(p.device.type == "cpu" for mods in result.modules.values() for m in mods.values() for p in m.parameters())


FACTORY = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


def make(width=32):
    return Net(width)
'''

PLAN = '''
[train]
epochs = 2
[parties.hospital]
holds = { x = "x", y = "y" }
optimizer = { name = "adam", lr = 0.01 }
[parties.server]
optimizer = { name = "adam", lr = 0.01 }
[networks.net]
factory = "mynet:make"
args = { width = 24 }
[segments.bottom]
party = "hospital"
inputs = ["hospital.x"]
network = "net"
cut = "encoder"
[segments.top]
party = "server"
inputs = ["bottom"]
network = "net"
[losses.digit]
input = "top"
target = "hospital.y"
'''


def test_a_factory_next_to_the_plan_needs_no_pythonpath(tmp_path):
    """In-process and in party processes, from another working directory, without PYTHONPATH."""
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "mynet.py").write_text(FACTORY)
    (tmp_path / "plan" / "own.toml").write_text(PLAN)
    (tmp_path / "elsewhere").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = textwrap.dedent(f"""
        import sys, splitlearn
        assert not any('plan' in p for p in sys.path)
        r = splitlearn.train({str(tmp_path / 'plan' / 'own.toml')!r})
        print(r['metrics']['test_accuracy'], r['wires'][0]['name'])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    accuracy, wire = out.stdout.split()
    assert float(accuracy) > 0.85 and wire == "bottom->top"
    run = subprocess.run([sys.executable, "-m", "splitlearn", "run", "../plan/own.toml", "--out", "r", "--epochs", "1"],
                         cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    pred = subprocess.run([sys.executable, "-m", "splitlearn", "predict", "r"], cwd=tmp_path / "elsewhere", env=env,
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stdout + pred.stderr
    assert (tmp_path / "elsewhere" / "r" / "parties" / "server" / "predictions.csv").is_file()


def test_the_python_example_runs_from_any_folder(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    out = subprocess.run([sys.executable, str(script), "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.split()[2].rstrip(";"))
    assert accuracy > 0.9, out.stdout
