"""The audit's backdoor by a feature party (Villain, USENIX Security 2023; issue #26): an active attack, run against
honest parties in-process, reproduced on digits with its margin and falling under per-row clipping.

Digits split into left and right halves (4 of each row's 8 pixels) between two clinics, labels at the server,
bottoms mlp [32, 32], top mlp [64, 32, 10], SGD lr 0.1 momentum 0.9, batch 64, 6 epochs, seed 0. The attacker
(either clinic) knows the labels of 4 training rows of class 0, infers the other rows of class 0 from the gradients
it gets back in its first epoch, poisons 1 % of the training rows with Villain's trigger and adds it at test time.
"""

import pytest

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.tools.audit import audit_run
from splitlearn.tools.audit.active import backdoor as villain
from splitlearn.tools.audit.attacks import LEAKS, get_attack

from .conftest import EXAMPLES
from .support import digits_halves_plan


EPOCHS = 6


def _digits_plan(folder, wires: dict | None = None) -> dict:
    return digits_halves_plan(folder, epochs=EPOCHS, wires=wires)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A run of the plan audited as ``splitlearn audit RUN --attack backdoor`` audits it: both clinics attack."""
    folder = tmp_path_factory.mktemp("backdoor")
    splitlearn.train(_digits_plan(folder), out=folder / "run")
    audit = audit_run(folder / "run", attacks=["backdoor"])
    return folder, {r["attacker"]: r for r in audit["attacks"]["backdoor"]["results"]}


def test_the_backdoor_is_a_registered_active_attack_of_a_feature_party():
    attack = get_attack("backdoor")
    assert isinstance(attack, villain.Backdoor)
    assert attack.active and attack.describe()["mode"] == "active" and attack.attacker == "feature party"


@pytest.mark.parametrize("attacker", ["clinic_a", "clinic_b"])
def test_a_feature_party_plants_a_backdoor_with_one_percent_poisoning_at_under_a_point_of_main_task(audited,
                                                                                                    attacker):
    folder, results = audited
    r = results[attacker]
    assert "why_not" not in r, r.get("why_not")
    assert r["poisoned_share"] <= 0.01 and r["poisoned_rows"] == 14  # 1 % of the 1437 training rows
    assert r["inference_precision"] >= 0.9  # the rows it inferred from its gradients are of the target class
    assert r["success"] >= 0.9  # Villain: over 93 % with 1 % poisoning
    assert r["baseline"] <= 0.1  # the trigger alone, on the honest run's model, turns almost nothing
    assert r["accuracy_drop_points"] <= 1.0  # main task within a point of the honest run's, same seed
    assert r["main_task_accuracy_honest"] >= 0.9
    assert r["verdict"] == LEAKS and "clip = 1.0" in r["remedy"]
    assert (folder / "run" / r["figure"]).is_file()


def test_per_row_clipping_of_the_attackers_activations_stops_the_backdoor_at_no_main_task_cost(tmp_path, audited):
    plain = audited[1]["clinic_b"]
    r = villain.backdoor(_digits_plan(tmp_path, {"bottom_b": {"noise": {"clip": 1.0, "sigma": 0.0}}}), "clinic_b")
    assert r.inference_precision >= 0.9  # it still finds its target rows and poisons them
    assert r.success <= 0.2 < plain["success"]  # but the trigger, clipped to a row's size, no longer works
    assert r.clean_honest >= plain["main_task_accuracy_honest"] - 0.01  # the defense costs the main task nothing


def test_where_a_backdoor_applies():
    assert [(p.attacker, p.segment, p.loss_party) for p in villain.places(load_plan(
        EXAMPLES / "vertical.toml"))] == [("clinic_a", "bottom_a", "server"), ("clinic_b", "bottom_b", "server")]
    vanilla = villain.places(load_plan(EXAMPLES / "vanilla.toml"))  # the hospital holds its labels
    assert isinstance(vanilla, str) and "whose labels it does not hold" in vanilla
    with pytest.raises(ValueError, match="no feature party can plant a backdoor in this plan"):
        villain.backdoor(EXAMPLES / "vanilla.toml")
    with pytest.raises(ValueError, match="at least 2 epochs"):
        villain.backdoor(EXAMPLES / "vertical.toml", epochs=1)
    with pytest.raises(ValueError, match=r"'server' \(any segment\) cannot plant a backdoor here; those that can: "
                                         r"clinic_a \(bottom_a\), clinic_b \(bottom_b\)"):
        villain.backdoor(EXAMPLES / "vertical.toml", "server")


def test_under_psi_the_attacker_works_on_the_rows_its_alignment_kept(tmp_path):
    """The attacker's row positions are those of its aligned data (a PSI alignment replaces its splits during the
    session): the rows it poisons are its own aligned training rows, of the target class."""
    from .support import clinic_files, vertical_plan

    files, held, _ = clinic_files(tmp_path, missing_at_b=40)
    plan = vertical_plan(tmp_path, files, align="psi", standardize=True)
    plan["train"]["epochs"] = 3
    r = villain.backdoor(plan, "clinic_b")
    assert r.poisoned >= 1 and r.poisoned_share <= 0.01
    assert r.inference_precision >= 0.9  # measured 1.0; 0.75 when it read the splits from before the alignment
    assert r.success >= 0.9
