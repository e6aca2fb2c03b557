"""SDAR (Zhu et al., NDSS 2025) replayed by the audit (issue #26): an honest-but-curious server with same-domain
auxiliary data rebuilds the client's inputs (vanilla and U-shaped) and its labels (U-shaped).

Runs (seeds fixed, trained in-process, 8 epochs as the examples): examples/vanilla.toml and
examples/u_shaped.toml with ``[data] test_fraction = 0.5``, so the server's auxiliary rows (the run's test rows,
which no party trains on and whose activations are never recorded) are a disjoint half of digits; and
vanilla.toml again with ``[wires.bottom] nopeek = 1.0``.
"""

import tomllib

import pytest

import splitlearn
from splitlearn.tools.audit import audit_run
from splitlearn.tools.audit.attacks import LEAKS, describe_attacks
import splitlearn.tools.audit.sdar  # noqa: F401  (registers "sdar"; a built-in once the registry lists it)

from .conftest import EXAMPLES

EPOCHS = 8


def _plan(example: str, **wires) -> dict:
    plan = tomllib.loads((EXAMPLES / f"{example}.toml").read_text())
    plan["data"]["test_fraction"] = 0.5  # the server's auxiliary half: the rows the run does not train on
    if wires:
        plan["wires"] = {"bottom": wires}
    return plan


def _sdar(folder, plan: dict, epochs: int = EPOCHS) -> dict:
    result = splitlearn.train(plan, out=folder, epochs=epochs)
    section = audit_run(folder, attacks=["sdar"])["attacks"]["sdar"]
    (found,) = section["results"]
    return {**found, "main_task": result["metrics"]["test_accuracy"],
            "train_loss": result["metrics"]["train_loss"][-1]}


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    return _sdar(tmp_path_factory.mktemp("sdar") / "vanilla", _plan("vanilla"))


def test_sdar_rebuilds_digits_at_under_half_the_inversion_decoders_error_on_the_same_rows(vanilla):
    r = vanilla
    assert r["kind"] == "vanilla" and r["attacker"] == "server" and r["labels_of_recorded_rows"] == "received"
    assert r["aux_rows"] + r["recorded_rows"] == 1797  # disjoint halves: the test rows and the training rows
    assert r["same_rows"]  # scored on the rows the inversion decoder is scored on
    # measured 0.136 against 0.308 (ratio 0.44); the issue asks at most half
    assert r["relative_mse_on_inversion_rows"] <= 0.5 * r["inversion_relative_mse"]
    assert r["relative_mse"] <= 0.2 and r["verdict"] == LEAKS
    assert r["ssim"] >= r["ssim_mean_guess"] + 0.4  # measured 0.95 against 0.37
    assert "nopeek" in r["remedy"]


def test_sdar_infers_the_labels_of_a_u_shaped_run_it_never_receives(tmp_path):
    r = _sdar(tmp_path / "u_shaped", _plan("u_shaped"))
    assert r["kind"] == "u_shaped" and r["labels_of_recorded_rows"] == "the simulated head's guesses"
    assert r["label_accuracy"] >= 0.95  # measured 0.990 (majority 0.110); SDAR on CIFAR-10: 0.973
    assert r["label_majority"] < 0.15
    assert r["relative_mse"] <= 0.2  # and the inputs as well as in the vanilla run (measured 0.140)


def test_nopeek_more_than_doubles_sdars_error_for_a_point_of_accuracy(vanilla, tmp_path):
    defended = _sdar(tmp_path / "nopeek", _plan("vanilla", nopeek=1.0))
    # measured 0.136 -> 0.324 (x2.4) for 0.932 -> 0.929 test accuracy, and 2.9x the final training loss (0.053 -> 0.152),
    # as the paper's distance-correlation penalty: about twice the MSE at a large cost in training loss
    assert defended["relative_mse"] >= 2 * vanilla["relative_mse"]
    assert defended["main_task"] >= vanilla["main_task"] - 0.02
    assert defended["train_loss"] >= 2 * vanilla["train_loss"]


def test_sdar_refuses_a_run_that_leaves_it_too_few_auxiliary_rows(tmp_path):
    plan = _plan("vanilla")
    plan["data"]["test_fraction"] = 0.02  # 36 test rows
    splitlearn.train(plan, out=tmp_path / "run", epochs=1)
    (found,) = audit_run(tmp_path / "run", attacks=["sdar"])["attacks"]["sdar"]["results"]
    assert "36 auxiliary rows" in found["why_not"] and "test_fraction" in found["why_not"]


def test_sdar_declares_what_the_server_needs():
    d = describe_attacks()["sdar"]
    assert d["mode"] == "passive" and "disjoint" in d["needs"] and "labels" in d["needs"]
    assert "its own trained segment" in d["needs"] and "initial weights" in d["needs"]
