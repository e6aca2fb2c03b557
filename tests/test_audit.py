"""The leakage audit: attacks where the attacker sits, defenses that lower them, sweeps, the command."""

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import splitlearn
from splitlearn.tools.audit import AuditError, audit_run, parse_sweep, sweep
from splitlearn.tools.audit.measures import invert, label_leakage, latest_per_id, ssim
from splitlearn.tools.audit.wires import WIRE_MEASURES
from splitlearn.cli import app
from splitlearn.core import engine
from splitlearn.core.wirespec import LabelProtectionSpec
from splitlearn.core.load import load_plan

from .conftest import EXAMPLES

DECODER_EPOCHS = 60  # enough for the decoder to beat the mean guess on digits; keeps the tests fast
MARVELL = LabelProtectionSpec().strength  # the privacy module's default strength


def _vertical(tmp_path_factory, protection: dict | None):
    body = load_plan(EXAMPLES / "vertical.toml").model_dump(mode="json")
    if protection:
        body["wires"] = {src: {"label_protection": protection} for src in ("bottom_a", "bottom_b")}
    out = tmp_path_factory.mktemp("vertical")
    # each party draws its noise from a secret of its own, new every run: pinned here (to the first
    # value tried) so that the figures below are those of one reproducible run. Over 220 secrets, the
    # test accuracy with Marvell ranged 0.825-0.965 (plain: 0.956); 1 in 200 fell below the bound.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "secrets", SimpleNamespace(randbits=lambda bits: 0))
        result = splitlearn.train(body, epochs=3, out=out)
    return result, audit_run(out, epochs=DECODER_EPOCHS, attacks=sorted(WIRE_MEASURES))  # the per-wire measures


@pytest.fixture(scope="module")
def vertical_plain(tmp_path_factory):
    return _vertical(tmp_path_factory, None)


@pytest.fixture(scope="module")
def vertical_marvell(tmp_path_factory):
    return _vertical(tmp_path_factory, {"kind": "marvell", "strength": MARVELL})


def test_clinics_learn_the_labels_from_unprotected_gradients(vertical_plain):
    _, audit = vertical_plain
    for wire, clinic in (("bottom_a->top", "clinic_a"), ("bottom_b->top", "clinic_b")):
        leak = audit["wires"][wire]["label_leakage"]
        assert leak["attacker"] == clinic and leak["label_holder"] == "server" and leak["classes"] == 2
        assert leak["direction_auc"] > 0.9
        assert 0.5 <= leak["norm_auc"] <= 1.0  # reported (classes are nearly balanced: near chance here)
        # the server receives the smashed data of the clinic's 15 features: tabular, so no SSIM
        assert 0 < audit["wires"][wire]["distance_correlation"] <= 1
        inv = audit["wires"][wire]["inversion"]
        assert inv["ssim"] is None and "tabular" in inv["ssim_note"] and inv["mse"] < inv["mse_mean_guess"]


def test_marvell_hides_the_labels_from_both_clinics(vertical_plain, vertical_marvell):
    (plain_res, plain), (prot_res, prot) = vertical_plain, vertical_marvell
    for wire in ("bottom_a->top", "bottom_b->top"):
        before, after = plain["wires"][wire]["label_leakage"], prot["wires"][wire]["label_leakage"]
        assert after["direction_auc"] < before["direction_auc"]
        # measured at strength 1: direction ~0.51 (from > 0.96), norm ~0.50-0.51 (from 0.50-0.53: near chance
        # already, as the classes are nearly balanced, so it cannot fall much)
        assert after["direction_auc"] <= 0.6 and after["norm_auc"] <= 0.6
        assert prot["wires"][wire]["defenses"]["label_protection"]["kind"] == "marvell"
    assert prot_res["metrics"]["test_accuracy"] >= plain_res["metrics"]["test_accuracy"] - 0.1


def test_u_shaped_server_learns_labels_and_the_hospital_leaks_images(tmp_path):
    splitlearn.train(EXAMPLES / "u_shaped.toml", epochs=2, out=tmp_path)
    audit = audit_run(tmp_path, epochs=DECODER_EPOCHS, attacks=sorted(WIRE_MEASURES))
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["wires"].keys() == audit["wires"].keys() == {"bottom->middle", "middle->head"}
    # gradients the server received for the activations it sent to the hospital's head
    server = audit["wires"]["middle->head"]
    leak = server["label_leakage"]
    assert leak["attacker"] == "server" and leak["labels"] == "hospital.y" and leak["classes"] == 10
    assert leak["norm_auc"] is None and "two classes" in leak["note"] and leak["direction_auc"] > 0.8
    assert server["distance_correlation"] is None and "no data of its own" in server["why_not"]["inversion"]
    # the hospital's activations at the server: dCor and an inversion of the 8x8 images
    hosp = audit["wires"]["bottom->middle"]
    assert hosp["attacker"] == "server" and hosp["raw_inputs"] == ["hospital.x"]
    assert 0.5 < hosp["distance_correlation"] <= 1
    inv = hosp["inversion"]
    assert inv["image_shape"] == [8, 8] and inv["mse"] < inv["mse_mean_guess"] and inv["ssim"] > inv["ssim_mean_guess"]
    assert "'hospital' holds the labels" in hosp["why_not"]["label_leakage"]
    assert (tmp_path / inv["figure"]).is_file() and (tmp_path / "audit" / "inversion_bottom_to_middle.png").is_file()


def test_sweep_nopeek_lowers_distance_correlation(tmp_path):
    res = sweep(EXAMPLES / "vanilla.toml", "nopeek.alpha", [0, 0.5], tmp_path, epochs=2, decoder_epochs=DECODER_EPOCHS)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["param"] == "nopeek.alpha" and saved["wires"] == ["bottom->top"]
    assert [r["value"] for r in saved["rows"]] == [0, 0.5]
    assert all(0 < r["test_accuracy"] <= 1 for r in saved["rows"])
    plain, nopeek = res["rows"]
    assert nopeek["distance_correlation"] < plain["distance_correlation"]  # same seed, same batches
    assert json.loads((tmp_path / "nopeek.alpha=0.5" / "plan.json").read_text())["wires"]["bottom"]["nopeek"] == 0.5
    assert (tmp_path / "sweep.png").is_file() and "| 0.5 |" in (tmp_path / "sweep.md").read_text()
    # each setting's defense score (after VFLAIR's DCS) against the first setting's accuracy, as the module states it
    from splitlearn.tools.audit.score import dcs, strength

    assert dcs(0.0, 0.0) == 1.0 and dcs(1.0, 1.0) == 0.5 and dcs(0.5, -0.2) == dcs(0.5, 0.0)
    for r in saved["rows"]:
        parts = [strength(r["distance_correlation"], 0.0, True),  # (vanilla: the labels travel, no label leakage)
                 strength(r["inversion_relative"], 1.0, False)]
        inv = json.loads((tmp_path / f"nopeek.alpha={r['value']:g}" / "audit" / "audit.json").read_text())[
            "wires"]["bottom->top"]["inversion"]
        assert r["inversion_relative"] == inv["mse"] / inv["mse_mean_guess"]
        lost = plain["test_accuracy"] - r["test_accuracy"]
        assert r["dcs"] == sum(dcs(a, lost) for a in parts) / 2 and 0.5 <= r["dcs"] <= 1
    assert "| DCS |" in (tmp_path / "sweep.md").read_text() and "DCS: the defense score" in (tmp_path / "sweep.md").read_text()


def test_audit_of_a_folder_without_a_plan_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["audit", str(tmp_path)])
    assert r.exit_code == 2
    assert "plan.json is missing" in r.output and "Traceback" not in r.output
    with pytest.raises(AuditError, match="plan.json"):
        audit_run(tmp_path)


@pytest.mark.parametrize("text, message", [("alpha=1", "unknown parameter"), ("nopeek.alpha=x", "not a number"),
                                           ("nopeek.alpha=-1", ">= 0"), ("nopeek.alpha", "PARAM=V1,V2")])
def test_bad_sweeps_exit_2_with_a_message(text, message):
    with pytest.raises(AuditError, match=message):
        parse_sweep(text)
    r = CliRunner().invoke(app, ["audit", str(EXAMPLES / "vanilla.toml"), "--sweep", text])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_measures_on_known_cases():
    # SSIM: 1 for identical images, lower for noise
    a = torch.rand(4, 8, 8)
    assert torch.allclose(ssim(a, a, 1.0), torch.ones(4, dtype=torch.float64))
    assert float(ssim(a, torch.rand(4, 8, 8), 1.0).mean()) < 0.5
    # the last occurrence of each id, in recording order
    ids, vals = latest_per_id(torch.tensor([3, 1, 3, 2]), torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    assert ids.tolist() == [1, 3, 2] and vals.reshape(-1).tolist() == [1.0, 2.0, 3.0]
    # a decoder inverts an invertible linear map far better than the mean guess
    x = torch.rand(400, 10)
    inv = invert(x @ torch.randn(10, 20), x, aux_fraction=0.5, epochs=100)
    assert inv.figures["mse"] < 0.2 * inv.figures["mse_mean_guess"] and inv.figures["ssim"] is None
    # gradients whose direction is the label are found out; a label-free direction is not
    y = torch.randint(0, 2, (300,))
    g = (2.0 * y - 1)[:, None] * torch.ones(300, 5) + 0.1 * torch.randn(300, 5)
    assert label_leakage(g, y)["direction_auc"] > 0.95
    assert label_leakage(torch.randn(300, 5), y)["direction_auc"] < 0.65


def test_a_failing_sweep_setting_is_listed_as_failed_while_the_others_finish(tmp_path, monkeypatch):
    real = splitlearn.api.train  # what each setting of a sweep trains with

    def flaky(plan, **kw):
        if any(w.nopeek == 0.5 for w in plan.wires.values()):  # the setting nopeek.alpha=0.5
            raise RuntimeError("the run diverged")
        return real(plan, **kw)

    monkeypatch.setattr(splitlearn.api, "train", flaky)
    got = sweep(EXAMPLES / "nopeek.toml", "nopeek.alpha", [0.0, 0.5], tmp_path / "s", epochs=1, decoder_epochs=5)
    assert [r.get("failed") for r in got["rows"]] == [None, "RuntimeError: the run diverged"]
    assert got["rows"][0]["test_accuracy"] is not None
    assert "| 0.5 | failed: RuntimeError: the run diverged |" in (tmp_path / "s" / "sweep.md").read_text()


def test_a_sweep_of_two_parameters_trains_every_combination(tmp_path):
    out = tmp_path / "grid"
    r = CliRunner().invoke(app, ["audit", str(EXAMPLES / "nopeek.toml"), "--sweep", "nopeek.alpha=0,0.5", "--sweep",
                                 "noise.sigma=0,0.2", "--epochs", "1", "--decoder-epochs", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["params"] == ["nopeek.alpha", "noise.sigma"] and saved["param"] == "nopeek.alpha x noise.sigma"
    grid = [(0, 0), (0, 0.2), (0.5, 0), (0.5, 0.2)]
    assert [(r["values"]["nopeek.alpha"], r["values"]["noise.sigma"]) for r in saved["rows"]] == grid
    for (alpha, sigma), row in zip(grid, saved["rows"]):  # each run trained with both settings on its wire
        wire = json.loads((out / f"nopeek.alpha={alpha:g},noise.sigma={sigma:g}" / "plan.json").read_text())["wires"]
        assert wire["bottom"]["nopeek"] == alpha and (wire["bottom"].get("noise") or {}).get("sigma", 0) == sigma
        assert (row["epsilon"] is None) == (sigma == 0)  # the noise's epsilon; unbounded without noise
    table = (out / "sweep.md").read_text()
    assert "| nopeek.alpha | noise.sigma | test accuracy |" in table and "| 0.5 | 0.2 |" in table
    assert (out / "sweep.png").is_file()
    r = CliRunner().invoke(app, ["audit", str(EXAMPLES / "nopeek.toml"), "--sweep", "nopeek.alpha=0",
                                 "--sweep", "nopeek.alpha=1", "--out", str(tmp_path / "twice")])
    assert r.exit_code == 2 and "given twice" in r.output
