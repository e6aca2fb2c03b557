"""Plans built in Python, with user factories, train like TOML plans."""

import pytest
import torch

import splitlearn
from splitlearn.core.plan import Plan
from splitlearn.core.specs import PlanError
from splitlearn.run.setup import prepare


def python_plan(**network) -> dict:
    return {
        "name": "py",
        "data": {"dataset": "digits"},
        "train": {"epochs": 3, "batch_size": 32},
        "parties": {"phone": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "adam", "lr": 0.01}},
                    "cloud": {"optimizer": {"name": "adam", "lr": 0.01}}},
        "networks": {"net": network or {"factory": "tests.factories:tiny_mlp", "args": {"width": 48}}},
        "segments": {"bottom": {"party": "phone", "inputs": "phone.x", "network": "net", "layers": [0, 2]},
                     "top": {"party": "cloud", "inputs": ["bottom"], "network": "net", "layers": [2, 3]}},
        "losses": {"digit": {"input": "top", "target": "phone.y"}},
    }


def test_factory_plan_built_in_python_trains():
    result = splitlearn.train(python_plan())
    assert result["metrics"]["test_accuracy"] > 0.85
    plan, setups, shapes = prepare(python_plan())
    assert shapes["bottom->top"] == ("float32", (48,))  # the factory's kwargs reached it
    assert isinstance(setups["phone"].modules["bottom"][1], torch.nn.Tanh)


def test_plan_object_is_the_same_as_its_dict():
    assert Plan.model_validate(python_plan()) == Plan.model_validate(python_plan())


def test_factory_returning_no_module_is_refused():
    with pytest.raises(PlanError, match="not a torch.nn.Module"):
        prepare(python_plan(factory="tests.factories:not_a_module"))


def test_cutting_a_non_sequential_factory_is_refused():
    with pytest.raises(PlanError, match="cannot be cut at layer indices"):
        prepare(python_plan(factory="tests.factories:two_inputs"))


def test_module_merge_passes_inputs_as_arguments():
    plan = {
        "name": "two", "data": {"dataset": "breast_cancer"}, "train": {"epochs": 10},
        "parties": {"a": {"holds": {"x": {"field": "x", "columns": [0, 15]}}},
                    "b": {"holds": {"x": {"field": "x", "columns": [15, 30]}, "y": "y"}}},
        "networks": {"ea": {"zoo": "mlp", "args": {"sizes": [15, 16], "out_activation": True}},
                     "eb": {"zoo": "mlp", "args": {"sizes": [15, 16], "out_activation": True}},
                     "head": {"factory": "tests.factories:two_inputs", "args": {"width": 16}}},
        "segments": {"ea": {"party": "a", "inputs": ["a.x"], "network": "ea"},
                     "eb": {"party": "b", "inputs": ["b.x"], "network": "eb"},
                     "head": {"party": "b", "inputs": ["ea", "eb"], "network": "head", "merge": "module"}},
        "losses": {"y": {"input": "head", "target": "b.y"}},
    }
    result = splitlearn.train(plan)
    assert result["metrics"]["test_accuracy"] > 0.9
    assert [w["name"] for w in result["wires"]] == ["ea->head"]


def test_batch_norm_and_dropout_switch_off_outside_training(tmp_path):
    plan = python_plan(factory="tests.factories:bn_mlp", args={"width": 64})
    plan["segments"]["bottom"]["layers"] = [0, 3]  # Linear, BatchNorm, ReLU | Dropout, Linear
    plan["segments"]["top"]["layers"] = [3, 5]
    result = splitlearn.train(plan, out=tmp_path / "run")
    assert result["metrics"]["test_accuracy"] > 0.85
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "run" / "parties" / "phone" / "weights.safetensors"))
    assert before["bottom.1.num_batches_tracked"].item() == 3 * 45  # training steps only, not eval steps
    a = splitlearn.predict(tmp_path / "run", write=False)["digit"]["outputs"]
    b = splitlearn.predict(tmp_path / "run", write=False)["digit"]["outputs"]
    assert torch.equal(a, b)  # no dropout at prediction
