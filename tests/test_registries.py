"""Defenses and loss kinds are registries: one defined here is picked up from a plan and runs."""

import copy
import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

import splitlearn
from splitlearn.core import defense, losses
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.registry import DEFENSES
from splitlearn.core.specs import PlanError
from splitlearn.core.wirespec import WireSpec
from splitlearn.tools.audit import parse_sweep
from splitlearn.tools.audit.sweep import plan_with, swept_wires

from .conftest import EXAMPLES

FIRST = "bottom->top|forward|first"  # what the server received on the activation wire, first rows of the run


class Shift(defense.Defense):
    """Adds a constant to the activations the sender puts on the wire (training and evaluation)."""

    key = "shift"
    modes = frozenset({"train", "eval"})
    sweep_params = (defense.SweepParam("shift.by", "a constant added to the activations",
                                       lambda current, x: {"by": x}),)

    def validate(self, graph, wire, config):
        super().validate(graph, wire, config)
        if not isinstance(config, dict) or set(config) != {"by"}:
            raise PlanError("shift takes { by = NUMBER }", entry=f"wires.{wire.src}.shift")

    def on_send(self, ctx, value):
        return value + ctx.config["by"]


@pytest.fixture
def shift():
    defense.register(Shift())
    yield
    DEFENSES.unregister("shift")


@pytest.fixture
def vanilla() -> dict:
    return tomllib.loads((EXAMPLES / "vanilla.toml").read_text())


def _received(out) -> tuple[torch.Tensor, torch.Tensor]:
    seen = load_file(out / "parties" / "server" / "observed.safetensors")  # the server holds no data: positions
    return seen[f"{FIRST}|positions"], seen[f"{FIRST}|values"]


def test_a_registered_defense_is_read_from_the_plan_and_changes_what_the_server_receives(shift, vanilla, tmp_path):
    shifted = copy.deepcopy(vanilla)
    shifted["wires"] = {"bottom": {"shift": {"by": 1.0}}}
    plan = load_plan(shifted)
    assert plan.wires["bottom"].extra_defenses == {"shift": {"by": 1.0}}
    assert [d.key for d, _ in defense.active(plan.wires["bottom"])] == ["shift"]
    # written back under its own key, and part of the plan hash
    assert plan.model_dump(mode="json")["wires"]["bottom"] == {**WireSpec().model_dump(mode="json"), "shift": {"by": 1.0}}
    assert plan_hash(plan) != plan_hash(load_plan(vanilla))
    assert plan_hash(load_plan(plan.model_dump(mode="json"))) == plan_hash(plan)

    splitlearn.train(vanilla, epochs=1, out=tmp_path / "plain")
    splitlearn.train(shifted, epochs=1, out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["wires"]["bottom"]["shift"] == {"by": 1.0}
    (ids, plain), (ids_shifted, values) = _received(tmp_path / "plain"), _received(tmp_path / "run")
    batch = vanilla["train"]["batch_size"]
    assert torch.equal(ids[:batch], ids_shifted[:batch])
    # the first step: the same bottom weights on the same rows, so exactly the plain activations plus 1
    assert torch.equal(values[:batch], plain[:batch] + 1.0)
    assert (plain[:batch] >= 0).all() and not torch.equal(values[:batch], plain[:batch])


def test_a_registered_defense_checks_its_setting_and_can_be_swept(shift, vanilla):
    vanilla["wires"] = {"bottom": {"shift": 1.0}}
    with pytest.raises(PlanError, match=r"shift takes \{ by = NUMBER \}") as info:
        load_plan(vanilla)
    assert info.value.entry == "wires.bottom.shift"
    vanilla["wires"] = {"hospital.y": {"shift": {"by": 1.0}}}
    assert "is a label wire: only randomized_response applies" in str(pytest.raises(PlanError, load_plan, vanilla).value)

    assert parse_sweep("shift.by=0,2") == ("shift.by", [0.0, 2.0])
    del vanilla["wires"]
    plan = load_plan(vanilla)
    wires = swept_wires(splitlearn.build_graph(plan), "shift.by", None)
    assert [w.name for w in wires] == ["bottom->top"]
    assert plan_with(plan, "shift.by", 2.0, wires).wires["bottom"].extra_defenses == {"shift": {"by": 2.0}}


@pytest.fixture
def l1():
    calls = []

    def fn(out, target):
        calls.append(len(target))
        return (out.reshape(target.shape) - target.float()).abs().mean()

    losses.register(losses.LossKind("l1", fn, decide=losses.first_column))
    yield calls
    losses.LOSS_KINDS.unregister("l1")


def test_a_registered_loss_kind_trains_from_a_plan(l1, vanilla):
    vanilla["networks"]["mlp"]["args"]["sizes"][-1] = 1  # one output: regress the digit
    vanilla["losses"]["digit"]["kind"] = "l1"
    result = splitlearn.train(vanilla, epochs=2)
    assert vanilla["train"]["batch_size"] in l1  # the registered function computed the training loss
    losses_per_epoch = result["metrics"]["train_loss"]
    assert len(losses_per_epoch) == 2 and losses_per_epoch[1] < losses_per_epoch[0]
    assert not losses.is_classification("l1")
    out = torch.tensor([[0.4, 9.0], [2.6, -1.0]])
    assert torch.equal(losses.decide("l1", out), torch.tensor([0.4, 2.6]))
    with pytest.raises(ValueError, match="no accuracy for loss kind 'l1'"):
        losses.correct("l1", out, torch.tensor([0.0, 3.0]))


def test_built_ins_are_registered_and_unknown_names_refused(vanilla):
    assert {"nopeek", "noise", "label_protection", "randomized_response"} <= set(DEFENSES)
    assert {"cross_entropy", "bce", "mse"} <= set(losses.LOSS_KINDS)
    assert {"nopeek.alpha", "noise.sigma", "label_protection.strength"} <= set(defense.sweep_params())
    out = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    assert torch.equal(losses.decide("cross_entropy", out), torch.tensor([1, 0]))
    assert torch.equal(losses.decide("bce", out), torch.tensor([1, 1]))
    assert losses.correct("cross_entropy", out, torch.tensor([1, 1])) == 1
    assert losses.correct("bce", out[:, :1], torch.tensor([[1], [0]])) == 1
    assert losses.is_classification("bce") and not losses.is_classification("mse")

    bad = copy.deepcopy(vanilla)
    bad["wires"] = {"bottom": {"shfit": {"by": 1.0}}}
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    assert "unknown key 'shfit'" in str(info.value) and info.value.entry == "wires.bottom.shfit"
    bad = copy.deepcopy(vanilla)
    bad["losses"]["digit"]["kind"] = "hinge"
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    assert "unknown loss kind 'hinge'" in str(info.value) and "cross_entropy" in str(info.value)
    assert info.value.entry == "losses.digit.kind"
    with pytest.raises(ValueError, match="wire setting"):
        defense.register(type("Codec", (defense.Defense,), {"key": "codec"})())


def test_a_registry_whose_built_ins_fail_to_import_says_so_at_every_read():
    """A failed import of the built-ins is not taken for an empty registry (``unknown ...; registered: []``)."""
    from splitlearn.core.registry import Registry

    broken = Registry("widget", builtins="splitlearn.no_such_module")
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="splitlearn.no_such_module"):
            broken.get("anything")
