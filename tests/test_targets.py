"""Targets keep their meaning: the loss kind decides what a label column holds (class labels or
values), a mapping of text labels to classes is recorded, printed and used again by predict,
regression is scored with MAE, RMSE and R², and every headline figure says on how many rows it was
computed, with a 95 % bootstrap interval."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.datasets import load_diabetes
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from typer.testing import CliRunner

import splitlearn
from splitlearn.cli import app
from splitlearn.core.metrics import bootstrap_ci
from splitlearn.core.specs import DataSpec, PlanError
from splitlearn.run.setup import prepare

from .conftest import EXAMPLES

runner = CliRunner()


def _diabetes_csv(path, label=lambda y: f"{y:.1f}", order=None, rows=None):
    d = load_diabetes()
    names = list(d.feature_names)
    order = order or names
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pid", *order, "target"])
        for i in (range(len(d.target)) if rows is None else rows):
            values = dict(zip(names, d.data[i]))
            w.writerow([f"p{i:03d}", *[f"{values[c]:.6f}" for c in order], label(d.target[i])])
    return d


def _plan(path, kind="mse", width=1, epochs=3, classes=None) -> dict:
    options = {"standardize": True, **({"classes": classes} if classes else {})}
    return {"name": "progression", "train": {"epochs": epochs, "batch_size": 32, "seed": 0},
            "parties": {"clinic": {"holds": {"x": "x", "y": "y"},
                                   "data": {"dataset": "csv", "path": str(path), "id_column": "pid",
                                            "label_column": "target", "options": options},
                                   "optimizer": {"name": "adam", "lr": 0.01}},
                        "server": {"optimizer": {"name": "adam", "lr": 0.01}}},
            "networks": {"net": {"zoo": "mlp", "args": {"sizes": [10, 16, width]}}},
            "segments": {"bottom": {"party": "clinic", "inputs": ["clinic.x"], "network": "net", "layers": [0, 2]},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "net", "layers": [2, 3]}},
            "losses": {"progression": {"input": "top", "target": "clinic.y", "kind": kind}}}


def _toml(plan: dict) -> str:
    """The plan as TOML: one table per entry, inline values as JSON (valid TOML for these values)."""
    lines = []
    for key in ("name",):
        lines.append(f"{key} = {json.dumps(plan[key])}")
    for section in ("train", "parties", "networks", "segments", "losses"):
        entries = plan[section] if section != "train" else {None: plan["train"]}
        for name, body in entries.items():
            lines.append(f"[{section}{'.' + name if name else ''}]")
            for k, v in body.items():
                lines.append(f"{k} = {_inline(v)}")
    return "\n".join(lines) + "\n"


def _inline(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_inline(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    return "true" if v is True else "false" if v is False else json.dumps(v)


def test_a_float_target_under_mse_stays_a_float_on_the_wire_and_in_predictions(tmp_path):
    d = _diabetes_csv(tmp_path / "c.csv")
    plan, setups, shapes = prepare(_plan(tmp_path / "c.csv"))
    assert shapes["clinic.y->progression"][0] == "float32"  # was int64: class indices of the sorted strings
    y = setups["clinic"].inputs["clinic.y"]
    assert y.dtype.is_floating_point
    ids = setups["clinic"].splits.ids
    np.testing.assert_allclose(y.numpy(), d.target[[int(i[1:]) for i in ids]], rtol=1e-6)

    result = splitlearn.train(_plan(tmp_path / "c.csv", epochs=30), out=tmp_path / "run")
    out = splitlearn.predict(tmp_path / "run", write=False)["progression"]
    true = d.target[[int(i[1:]) for i in out["ids"]]]
    pred = np.asarray(out["predictions"])
    assert 25 <= np.median(pred) <= 346, "predictions are in the target's units"
    m = result["metrics"]
    assert m["test_rows"] == len(true) == 88  # 20 % of 442
    assert m["test_mae"] == pytest.approx(mean_absolute_error(true, pred), rel=1e-4)
    assert m["test_rmse"] == pytest.approx(np.sqrt(mean_squared_error(true, pred)), rel=1e-4)
    assert m["test_r2"] == pytest.approx(r2_score(true, pred), rel=1e-3, abs=1e-4)
    assert m["per_epoch"]["test_mae"][-1] == m["test_mae"] and len(m["per_epoch"]["test_mae"]) == 30
    lo, hi = m["ci95"]["test_mae"]
    assert lo < m["test_mae"] < hi
    assert "test_accuracy" not in m


def test_text_targets_under_a_regression_loss_are_refused_naming_file_line_column_and_value(tmp_path):
    _diabetes_csv(tmp_path / "c.csv", label=lambda y: "yes" if y > 140 else "no")
    with pytest.raises(PlanError, match=r"c\.csv, line 2, column 'target': target '(yes|no)' is not a finite number"):
        prepare(_plan(tmp_path / "c.csv"))


def test_classes_with_a_regression_loss_are_refused(tmp_path):
    _diabetes_csv(tmp_path / "c.csv")
    with pytest.raises(PlanError, match="classes is set, but the label column is a regression target"):
        prepare(_plan(tmp_path / "c.csv", classes=["a", "b"]))


def test_fractional_class_labels_are_refused_and_whole_floats_are_classes(tmp_path):
    spec = DataSpec.of_arrays({"x": np.zeros((20, 10), np.float32), "y": np.linspace(0, 1, 20)})
    plan = _plan(tmp_path / "unused.csv", kind="cross_entropy", width=2)
    plan["parties"]["clinic"]["data"] = None
    with pytest.raises(PlanError, match=r"holds 0\.05263.* not a class label, but loss 'progression' is a "
                                        r"classification loss"):
        prepare(plan, data=spec)
    whole = DataSpec.of_arrays({"x": np.zeros((20, 10), np.float32), "y": np.arange(20) % 2 * 1.0})
    setups = prepare(plan, data=whole)[1]
    assert setups["clinic"].inputs["clinic.y"].dtype.is_floating_point is False


def test_text_labels_are_mapped_by_a_recorded_printed_mapping_that_predict_keeps(tmp_path):
    _diabetes_csv(tmp_path / "c.csv", label=lambda y: "high" if y > 140 else "low")
    plan = _plan(tmp_path / "c.csv", kind="cross_entropy", width=2)
    (tmp_path / "plan.toml").write_text(_toml(plan))
    r = runner.invoke(app, ["run", str(tmp_path / "plan.toml"), "--in-process", "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 0, r.output
    assert ("labels of clinic.y: 'high' -> 0, 'low' -> 1 (their sorted values; set options.classes to choose the "
            "order); 'low' is the positive class") in " ".join(r.output.split())
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["parties"]["clinic"]["data"]["schema"]["y"]["classes"] == ["high", "low"]
    # new rows that are all 'low' would map 'low' to class 0 by their own sorted values: predict keeps the training's
    d = load_diabetes()
    lows = [i for i in range(len(d.target)) if d.target[i] <= 140][:30]
    _diabetes_csv(tmp_path / "new.csv", label=lambda y: "high" if y > 140 else "low", rows=lows)
    out = splitlearn.predict(tmp_path / "run", data={"clinic": str(tmp_path / "new.csv")})["progression"]
    assert out["classes"] == ["high", "low"]
    with open(tmp_path / "run" / "parties" / "server" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["progression"] for r in rows} <= {"high", "low"}
    assert [r["progression"] for r in rows] == [["high", "low"][k] for k in out["predictions"]]


def test_predict_names_a_missing_or_moved_feature_column(tmp_path):
    _diabetes_csv(tmp_path / "c.csv")
    splitlearn.train(_plan(tmp_path / "c.csv", epochs=1), out=tmp_path / "run")
    names = list(load_diabetes().feature_names)
    _diabetes_csv(tmp_path / "moved.csv", order=[names[1], names[0], *names[2:]])
    with pytest.raises(PlanError, match=r"its new data has the columns in another order"):
        splitlearn.predict(tmp_path / "run", data={"clinic": str(tmp_path / "moved.csv")})
    with open(tmp_path / "c.csv") as f, open(tmp_path / "missing.csv", "w", newline="") as g:
        w = csv.writer(g)
        for row in csv.reader(f):
            w.writerow(row[:3] + row[4:])  # no 'bmi'
    r = runner.invoke(app, ["predict", str(tmp_path / "run"), "--data", f"clinic={tmp_path / 'missing.csv'}"])
    assert r.exit_code == 2 and "its new data lacks column(s) ['bmi']" in r.output.replace("\n", "")


def test_the_embedded_diabetes_and_wine_datasets():
    d = splitlearn.data.load_table("diabetes")
    assert d.fields["y"].dtype == np.float32 and len(d) == 442 and d.fields["x"].shape == (442, 10)
    w = splitlearn.data.load_table("wine")
    assert sorted(np.unique(w.fields["y"]).tolist()) == [0, 1, 2] and w.fields["x"].shape == (178, 13)


def test_classification_headline_says_its_rows_and_interval(tmp_path):
    plan = {"name": "bc", "data": {"dataset": "breast_cancer"}, "train": {"epochs": 2, "seed": 0},
            "parties": {"h": {"holds": {"x": "x", "y": "y"}}, "s": {}},
            "networks": {"n": {"zoo": "mlp", "args": {"sizes": [30, 8, 2]}}},
            "segments": {"b": {"party": "h", "inputs": ["h.x"], "network": "n", "layers": [0, 2]},
                         "t": {"party": "s", "inputs": ["b"], "network": "n", "layers": [2, 3]}},
            "losses": {"y": {"input": "t", "target": "h.y"}}}
    m = splitlearn.train(plan)["metrics"]
    assert m["test_rows"] == 114
    for name in ("test_accuracy", "test_roc_auc", "test_sensitivity", "test_specificity", "test_f1"):
        lo, hi = m["ci95"][name]
        assert lo <= m[name] <= hi and hi - lo < 0.5, name


def test_bootstrap_intervals_match_a_direct_resampling():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 2, 150)
    p = np.clip(0.3 * t + rng.random(150) * 0.7, 0, 1)
    probs = np.stack([1 - p, p], 1)
    ci = bootstrap_ci(probs, t, classification=True, rounds=300, seed=5)
    idx = np.random.default_rng(5).integers(0, 150, (300, 150))
    direct = [roc_auc_score(t[i], p[i]) for i in idx]
    assert ci["roc_auc"] == pytest.approx([np.percentile(direct, 2.5), np.percentile(direct, 97.5)], abs=1e-12)
    assert bootstrap_ci(probs[:1], t[:1], classification=True) == {}


def test_bootstrap_intervals_of_a_multiclass_auc_with_tied_scores_match_a_direct_resampling():
    """The resamples' AUCs come from how often each row is drawn (no resample is ranked): macro one-vs-rest AUC
    with many tied scores, as scikit-learn computes it on each resample."""
    rng = np.random.default_rng(4)
    t = rng.integers(0, 3, 120)
    raw = np.round(rng.random((120, 3)) + 0.4 * np.eye(3)[t], 1)  # one decimal: ties everywhere
    probs = raw / raw.sum(1, keepdims=True)
    ci = bootstrap_ci(probs, t, classification=True, rounds=200, seed=9)
    idx = np.random.default_rng(9).integers(0, 120, (200, 120))
    direct = [roc_auc_score(t[i], probs[i], multi_class="ovr", average="macro") for i in idx]
    assert ci["roc_auc"] == pytest.approx([np.percentile(direct, 2.5), np.percentile(direct, 97.5)], abs=1e-12)


def test_square_brackets_survive_in_help_and_errors(tmp_path):
    r = runner.invoke(app, ["run", "--help"])
    assert "pip install 'splitlearn[ray]'" in " ".join(r.output.split())
    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "vanilla.toml").read_text().replace('dataset = "digits"', 'dataset = "digits"\n'
                                                                   'options = { bogus = 1 }'))
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and "unknown option(s) ['bogus'] for dataset 'digits'" in " ".join(r.output.split())
    r = runner.invoke(app, ["inspect", str(tmp_path / "plan[v2].toml")])  # rich markup ate "[v2]"
    assert r.exit_code == 2 and "plan[v2].toml: no such plan file" in " ".join(r.output.split())


def test_the_last_evaluation_curves_match_the_predictions_and_the_report_draws_them(tmp_path):
    from sklearn.metrics import confusion_matrix

    from splitlearn.tools.report import write_report

    _diabetes_csv(tmp_path / "c.csv", label=lambda y: "high" if y > 140 else "low")
    result = splitlearn.train(_plan(tmp_path / "c.csv", kind="cross_entropy", width=2), out=tmp_path / "run")
    out = splitlearn.predict(tmp_path / "run", write=False)["progression"]
    d = load_diabetes()
    true = [0 if d.target[int(i[1:])] > 140 else 1 for i in out["ids"]]  # 'high' -> 0, 'low' -> 1
    c = result["metrics"]["curves"]
    assert c["confusion"] == confusion_matrix(true, out["predictions"], labels=[0, 1]).tolist()
    assert sum(c["calibration"]["rows"]) == result["metrics"]["test_rows"] == len(true)
    assert c["roc"]["fpr"][0] == 0.0 and c["roc"]["tpr"][-1] == 1.0
    page = write_report(tmp_path / "run").read_text()
    assert "The last evaluation" in page and "95 % interval" in page

    _diabetes_csv(tmp_path / "r.csv")
    result = splitlearn.train(_plan(tmp_path / "r.csv", epochs=2), out=tmp_path / "reg")
    out = splitlearn.predict(tmp_path / "reg", write=False)["progression"]
    c = result["metrics"]["curves"]
    assert c["observed"] == pytest.approx([float(d.target[int(i[1:])]) for i in out["ids"]])
    assert c["predicted"] == pytest.approx(out["predictions"], rel=1e-5)
    assert "The last evaluation" in write_report(tmp_path / "reg").read_text()
