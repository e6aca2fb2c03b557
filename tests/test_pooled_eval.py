"""A [clients] run's test metrics are pooled over every client's test rows, and reported per site.

Three hospitals with their own breast cancer files and very different class balance (78 %, 33 %
and 8 % malignant): the headline of a sequential and of a SplitFed v2 run is what scikit-learn
computes on the run's model's predictions over all three hospitals' test rows together."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, recall_score, roc_auc_score

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.run.setup import setup_party
from splitlearn.wire.control import LoadWeights

from .support import split_mlp, toml

MALIGNANT = {"hospital-1": (140, 40), "hospital-2": (50, 100), "hospital-3": (19, 217)}  # (malignant, benign)


def _hospital_files(folder) -> None:
    """One npz per hospital: standardised features, ``y`` 1 for malignant, string-free integer ids."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    y = (d.target == 0).astype(np.int64)  # scikit-learn's class 0 is malignant
    rng = np.random.default_rng(5)
    sick, well = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
    for name, (m, b) in MALIGNANT.items():
        rows = np.r_[sick[:m], well[:b]]
        sick, well = sick[m:], well[b:]
        np.savez(folder / f"{name}.npz", ids=rows.astype(np.int64), x=x[rows], y=y[rows])


def _plan(folder, schedule: str, epochs: int = 3) -> dict:
    return {"name": f"hospitals-{schedule}", "data": {"test_fraction": 0.2},
            "train": {"epochs": epochs, "batch_size": 16, "seed": 1},
            "parties": {"hospital": {"holds": {"x": "x", "y": "y"},
                                     "data": {"dataset": "npz", "path": str(folder / "{client}.npz")},
                                     "optimizer": {"name": "sgd", "lr": 0.02}},
                        "server": {"optimizer": {"name": "sgd", "lr": 0.02}}},
            "networks": {"mlp": {"zoo": "mlp", "args": {"sizes": [30, 8, 2]}}},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "mlp",
                                    "layers": [0, 2]},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "mlp", "layers": [2, 3]}},
            "losses": {"malignant": {"input": "top", "target": "hospital.y"}},
            "clients": {"template": "hospital", "count": 3, "schedule": schedule, "timeout": 60}}


def _direct(res, plan, sites: list[str] | None = None) -> tuple[dict, dict[str, int]]:
    """scikit-learn's figures on the run's model over the test rows of every hospital (or of
    ``sites``), and each one's row count."""
    bottom = res.modules[res["final_client"]]["bottom"]
    top = res.modules.get("server", res.modules[res["final_client"]])["top"]
    probs, ys, rows = [], [], {}
    for c in sites or plan.clients.names():
        s = setup_party(plan, "hospital", client=c, optimizer=False)
        test = torch.from_numpy(s.splits.test)
        with torch.no_grad():
            probs.append(top(bottom(s.inputs["hospital.x"][test])).softmax(-1).numpy())
        ys.append(s.inputs["hospital.y"][test].numpy().reshape(-1))
        rows[c] = len(test)
    p, y = np.concatenate(probs), np.concatenate(ys)
    decided = p.argmax(1)
    return {"test_accuracy": float((decided == y).mean()), "test_roc_auc": float(roc_auc_score(y, p[:, 1])),
            "test_f1": float(f1_score(y, decided)), "test_sensitivity": float(recall_score(y, decided, pos_label=1)),
            "test_specificity": float(recall_score(y, decided, pos_label=0))}, rows


@pytest.mark.parametrize("schedule", ["sequential", "splitfed_v2", "fedavg"])
def test_the_headline_is_pooled_over_every_hospitals_test_rows(tmp_path, schedule):
    """fedavg: the head is at the clients, each scores its own rows; the result pools their scores."""
    from splitlearn.clients.baselines import method_plan

    _hospital_files(tmp_path)
    plan = load_plan(_plan(tmp_path, schedule if schedule != "fedavg" else "sequential"))
    plan = method_plan(plan, "fedavg", 3) if schedule == "fedavg" else plan
    res = splitlearn.train(plan, out=tmp_path / "run")
    m = res["metrics"]
    expect, rows = _direct(res, plan)
    assert set(rows) == set(MALIGNANT) and all(n > 0 for n in rows.values())
    # the headline is scikit-learn's on the union of the rows (not any one hospital's, nor their mean)
    for name in ("test_roc_auc", "test_accuracy", "test_f1", "test_sensitivity", "test_specificity"):
        assert m[name] == pytest.approx(expect[name], abs=1e-6), name
    # which rows were scored, and each site on its own
    assert m["scored"]["rows"] == sum(rows.values()) == m["test_rows"]
    assert m["scored"]["clients"] == list(MALIGNANT) and m["scored"]["own_rows"] is True
    assert {c: e["rows"] for c, e in m["per_client"].items()} == rows
    # the old code scored one hospital's rows: sequential the last holder's (8 % malignant), SplitFed the first's
    old = m["per_client"]["hospital-3" if schedule == "sequential" else "hospital-1"]
    assert m["scored"]["rows"] != old["rows"] and m["test_accuracy"] != pytest.approx(old["test_accuracy"], abs=1e-9)
    mean = sum(e["test_accuracy"] * e["rows"] for e in m["per_client"].values()) / m["scored"]["rows"]
    assert m["test_accuracy"] == pytest.approx(mean, abs=1e-12)  # accuracy alone is additive over rows
    assert m["per_client"]["hospital-1"]["test_roc_auc"] != pytest.approx(m["test_roc_auc"], abs=1e-6)
    assert len(m["per_epoch"]["test_roc_auc"]) == 3 and m["per_epoch"]["test_rows"] == [m["scored"]["rows"]] * 3
    if schedule == "sequential":  # the holder's weights were lent for the evaluation: each keeps its own
        own = res.modules["hospital-1"]["bottom"].state_dict()
        final = res.modules[res["final_client"]]["bottom"].state_dict()
        assert res["final_client"] == "hospital-3" and not torch.equal(own["0.weight"], final["0.weight"])
    # the evaluation's own traffic is metered apart: every hospital received the model it scored
    bottom = 30 * 8 + 8
    for c in MALIGNANT:
        if c != res["final_client"] or schedule != "sequential":
            assert res["parties"][c]["eval"]["bytes_received"] >= 4 * bottom * 3, c


PLAN_TOML = toml(split_mlp("hospitals", [30, 8, 2], loss="malignant", lr=0.02, data={"test_fraction": 0.2},
                           train={"epochs": 2, "batch_size": 16, "seed": 1},
                           parties={"hospital": {"data": {"dataset": "npz", "path": "{client}.npz"}}},
                           clients={"template": "hospital", "count": 3, "schedule": "sequential", "timeout": 60}))


def test_compare_takes_per_client_files_and_shows_the_clinical_figures(tmp_path):
    from typer.testing import CliRunner

    from splitlearn.cli import app

    _hospital_files(tmp_path)
    plan = tmp_path / "hospitals.toml"
    plan.write_text(PLAN_TOML)
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare", str(plan), "--methods", "sequential,splitfed_v2,fedavg", "--out", str(out)])
    assert r.exit_code == 0, r.output
    header = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| method"))
    for column in ("| accuracy |", "| AUC |", "| sensitivity |", "| specificity |", "| F1 |", "| test rows |"):
        assert column in header and column in r.output, column
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    pooled = sum(e["rows"] for e in json.loads((out / "sequential" / "result.json").read_text())["metrics"]
                 ["per_client"].values())
    assert pooled > 47
    for m, row in rows.items():  # every method scored every hospital's test rows (fedavg: heads at the clients)
        result = json.loads((out / m / "result.json").read_text())["metrics"]
        assert row["clients"] == 3 and row["test_rows"] == pooled == result["scored"]["rows"], m
        assert row["roc_auc"] == result["test_roc_auc"] and 0 <= row["sensitivity"] <= 1, m
    # the unsplit baseline needs every row at one party: said plainly, not a traceback
    bad = CliRunner().invoke(app, ["compare", str(plan), "--methods", "centralized", "--out", str(tmp_path / "c2")])
    assert bad.exit_code == 2 and "its own file" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["compare", str(plan), "--clients", "5", "--out", str(tmp_path / "c3")])
    assert bad.exit_code == 2 and "3 clients" in bad.output


def test_a_site_that_cannot_score_is_left_out_and_the_result_says_which_rows_were_scored(tmp_path):
    from splitlearn.launch.threads import run_local
    from splitlearn.launch.results import build_result
    from splitlearn.run.setup import prepare

    _hospital_files(tmp_path)
    plan, setups, shapes = prepare(load_plan({**_plan(tmp_path, "sequential", epochs=2),
                                              "clients": {**_plan(tmp_path, "sequential")["clients"], "timeout": 1.0}}))

    def dies(role, request, ins):  # hospital-2's process is gone when the holder's weights are lent to it
        if isinstance(ins, LoadWeights) and ins.lend:
            raise SystemExit("killed")

    reports = run_local(plan, setups, shapes, faults={"hospital-2": dies})
    res = splitlearn.api.Result(build_result(plan, reports), plan, reports)
    m = res["metrics"]
    assert m["scored"]["clients"] == ["hospital-1", "hospital-3"] and set(m["per_client"]) == set(m["scored"]["clients"])
    expect, rows = _direct(res, plan, ["hospital-1", "hospital-3"])
    assert m["scored"]["rows"] == sum(rows.values())
    for name in ("test_accuracy", "test_roc_auc", "test_sensitivity"):
        assert m[name] == pytest.approx(expect[name], abs=1e-6), name
    assert {(s["client"], s["during"]) for s in res["skipped"]} >= {("hospital-2", "evaluation")}
