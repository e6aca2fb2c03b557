"""Bad plans are refused before any training, naming the file, the entry and what to change."""

import copy
import tomllib

import pytest

from splitlearn.core.specs import PlanError
from splitlearn.core.load import load_plan
from splitlearn.run.setup import prepare

from .conftest import EXAMPLES


@pytest.fixture
def vanilla() -> dict:
    return tomllib.loads((EXAMPLES / "vanilla.toml").read_text())


def refused(plan: dict, *, dry_run: bool = False) -> PlanError:
    with pytest.raises(PlanError) as info:
        prepare(plan) if dry_run else load_plan(plan)
    return info.value


def test_unknown_party(vanilla):
    vanilla["segments"]["top"]["party"] = "sever"
    e = refused(vanilla)
    assert e.entry == "segments.top.party"
    assert "unknown party 'sever'" in str(e) and "did you mean 'server'" in str(e)


def test_unknown_segment(vanilla):
    vanilla["segments"]["top"]["inputs"] = ["botom"]
    e = refused(vanilla)
    assert e.entry == "segments.top.inputs"
    assert "unknown segment 'botom'" in str(e) and "did you mean 'bottom'" in str(e)


def test_cycle(vanilla):
    vanilla["segments"]["bottom"]["inputs"] = ["hospital.x", "top"]
    e = refused(vanilla)
    assert "cycle" in str(e) and "bottom" in str(e) and "top" in str(e)


def test_input_nothing_produces(vanilla):
    vanilla["segments"]["bottom"]["inputs"] = ["hospital.image"]
    e = refused(vanilla)
    assert e.entry == "segments.bottom.inputs"
    assert "nothing produces input 'hospital.image'" in str(e)
    assert "parties.hospital.holds" in e.hint


def test_loss_target_nobody_holds(vanilla):
    vanilla["losses"]["digit"]["target"] = "server.y"
    e = refused(vanilla)
    assert e.entry == "losses.digit.target"
    assert "the loss target 'server.y' is held by nobody" in str(e)


def test_shape_mismatch_at_a_wire_found_by_dry_run(vanilla):
    vanilla["segments"]["bottom"]["layers"] = [0, 3]  # bottom now ends with 64 values, top expects 128
    load_plan(copy.deepcopy(vanilla))  # structurally fine...
    e = refused(vanilla, dry_run=True)  # ...but the dry run on one sample finds the mismatch
    assert e.entry == "segments.top"
    assert "bottom->top" in str(e) and "[1, 64]" in str(e)


def test_factory_that_cannot_be_imported(vanilla):
    vanilla["networks"]["mlp"] = {"factory": "no_such_package.models:make_net", "args": {}}
    e = refused(vanilla, dry_run=True)
    assert e.entry == "networks.mlp.factory"
    assert "cannot import module 'no_such_package.models'" in str(e)


def test_factory_function_missing(vanilla):
    vanilla["networks"]["mlp"] = {"factory": "tests.factories:no_such_function"}
    e = refused(vanilla, dry_run=True)
    assert "has no function 'no_such_function'" in str(e)


def test_party_with_nothing_to_do(vanilla):
    vanilla["parties"]["observer"] = {}
    e = refused(vanilla)
    assert e.entry == "parties.observer"
    assert "nothing to do" in str(e)


def test_raw_features_never_travel(vanilla):
    vanilla["segments"]["top"]["inputs"] = ["hospital.x"]
    e = refused(vanilla)
    assert "raw data 'hospital.x'" in str(e)


def test_unknown_key_and_missing_entry(vanilla):
    bad = copy.deepcopy(vanilla)
    bad["segments"]["top"]["layer"] = [2, 5]
    e = refused(bad)
    assert e.entry == "segments.top.layer" and "unknown key 'layer'" in str(e)
    del vanilla["losses"]
    assert refused(vanilla).entry == "losses"


def test_errors_name_the_plan_file(tmp_path):
    text = (EXAMPLES / "vanilla.toml").read_text().replace('party = "server"', 'party = "srv"')
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(path) in str(info.value) and "segments.top.party" in str(info.value)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = 'x'\n[parties\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "nope.toml")


def test_defenses_on_the_wrong_wire_or_data(vanilla):
    bad = copy.deepcopy(vanilla)
    bad["wires"] = {"hospital.y": {"nopeek": 0.5}}
    assert "label wire" in str(refused(bad))
    bad["wires"] = {"bottom": {"randomized_response": 1.0}}
    assert "applies to label wires" in str(refused(bad))
    bad["wires"] = {"bottom": {"codec": "zip"}}
    assert "unknown codec 'zip'" in str(refused(bad))
    bad["wires"] = {"bottom": {"label_protection": {"kind": "marvell"}}}  # digits have ten classes
    e = refused(bad, dry_run=True)
    assert "needs binary labels" in str(e) and e.entry == "wires.bottom"
    bad["wires"] = {"top": {}}
    assert "no wire leaves 'top'" in str(refused(bad))


def test_party_names_that_clash_as_certificates(vanilla):
    bad = copy.deepcopy(vanilla)
    bad["parties"]["Hospital"] = bad["parties"]["hospital"]
    assert "differ in more than case" in str(refused(bad))
    bad = copy.deepcopy(vanilla)
    bad["parties"]["ca"] = bad["parties"].pop("server")
    assert "may not be 'ca'" in str(refused(bad))


@pytest.mark.parametrize("factory", ["os:system", "subprocess:run", "torch:load", "builtins:eval", "pickle:loads"])
def test_a_plan_cannot_call_system_or_unpickling_functions(vanilla, factory):
    vanilla["networks"]["mlp"] = {"factory": factory, "args": {"command": "touch /tmp/splitlearn-pwned"}}
    e = refused(vanilla, dry_run=True)
    assert "is not a network factory" in str(e) and e.entry == "networks.mlp.factory"


def test_a_plan_changed_in_python_is_checked_as_when_read(vanilla):
    """``train(plan, epochs=0)`` once ran no epoch and reported no figure, and a negative seed failed deep in numpy:
    a plan's copy (``with_train``, ``replace``) is validated like a plan read from its file, naming the entry."""
    import splitlearn

    plan = load_plan(vanilla)
    with pytest.raises(PlanError, match=r"entry 'train.epochs': Input should be greater than or equal to 1"):
        splitlearn.train(plan, epochs=0)
    with pytest.raises(PlanError, match=r"entry 'train.seed'"):
        plan.with_train(seed=-1)
    assert plan.with_train(epochs=plan.train.epochs + 1).train.epochs == plan.train.epochs + 1
    clients = load_plan(EXAMPLES / "sequential.toml")  # a cross-entry refusal: a [clients] plan takes no checkpoint_every
    with pytest.raises(PlanError, match="train.checkpoint_every: a \\[clients\\] plan takes its checkpoints"):
        clients.with_train(checkpoint_every=3)
