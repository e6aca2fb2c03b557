"""Losses and metrics from the plan: ``class_weights``, ``label_smoothing`` and ``pos_weight`` in a
``[losses.NAME]`` entry train a split model exactly as torch's losses with those arguments train the
unsplit one; ``metrics = [...]`` adds scikit-learn's figures on the scored rows (one run, a party
process run, a [clients] run pooled over every site); every mistake is one PlanError naming the entry."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.core.specs import PlanError
from splitlearn.launch.threads import run_local
from splitlearn.models import build_segment
from splitlearn.run.setup import prepare, schedule, setup_party

from .support import split_mlp, toml

STEPS = 6
WEIGHTS = [0.5, 1.0, 2.0, 1.5, 0.25, 3.0, 1.0, 0.75, 2.5, 1.25]  # one per digit


def _digits(**loss) -> dict:
    body = split_mlp("weighted", [64, 32, 10], loss="digit", lr=0.1, train={"epochs": 1, "batch_size": 32, "seed": 3})
    body["losses"]["digit"].update(loss)
    return body


def _cancer(**loss) -> dict:
    body = split_mlp("cancer", [30, 8, 1], loss="benign", lr=0.1, data={"dataset": "breast_cancer"},
                     train={"epochs": 1, "batch_size": 32, "seed": 3})
    body["losses"]["benign"].update({"kind": "bce", **loss})
    return body


def _split_against_unsplit(body: dict, *loss_fns) -> tuple[list[float], float]:
    """STEPS training steps split (the engine, threads) and, for each of ``loss_fns``, unsplit (plain
    autograd) from the same weights: the largest difference of the split parameters from each unsplit
    model's, and how far training moved the parameters."""
    plan, setups, shapes = prepare(load_plan(body))
    first = next(iter(setups.values()))
    steps = list(islice(schedule(plan, first.splits), STEPS))
    assert all(s.mode == "train" for s in steps)
    data = {k: v for s in setups.values() for k, v in s.inputs.items()}
    refs = []
    for loss_fn in loss_fns:
        ref = {seg: build_segment(plan, seg) for seg in plan.segments}
        opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=0.1)
        for s in steps:
            x, y = data["hospital.x"][s.rows], data["hospital.y"][s.rows]
            opt.zero_grad()
            loss_fn(ref["top"](ref["bottom"](x)), y).backward()
            opt.step()
        refs.append(ref)
    run_local(plan, setups, shapes, steps=steps)
    split = {seg: mod for s in setups.values() for seg, mod in s.modules.items()}

    def gap(a: dict, b: dict) -> float:
        return max((x - y).abs().max().item() for seg in a for x, y in zip(a[seg].state_dict().values(),
                                                                            b[seg].state_dict().values()))

    return [gap(split, ref) for ref in refs], gap(refs[0], {seg: build_segment(plan, seg) for seg in plan.segments})


def _bce(loss: torch.nn.Module):
    return lambda out, y: loss(out.reshape(y.shape), y.float())


@pytest.mark.parametrize("case", ["class_weights", "label_smoothing", "both", "pos_weight"])
def test_loss_options_train_as_torch_losses_with_those_arguments(case):
    """Weights within 1e-6 of the unsplit model trained with torch's loss given the same arguments, and
    clearly apart from the one trained with the plain loss (the option took effect)."""
    w = torch.tensor(WEIGHTS)
    body, loss_fn, plain = {
        "class_weights": (_digits(class_weights=WEIGHTS), torch.nn.CrossEntropyLoss(weight=w),
                          torch.nn.CrossEntropyLoss()),
        "label_smoothing": (_digits(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                            torch.nn.CrossEntropyLoss()),
        "both": (_digits(class_weights=WEIGHTS, label_smoothing=0.2),
                 torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.2), torch.nn.CrossEntropyLoss()),
        "pos_weight": (_cancer(pos_weight=4.0), _bce(torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([4.0]))),
                       _bce(torch.nn.BCEWithLogitsLoss())),
    }[case]
    (same, other), moved = _split_against_unsplit(body, loss_fn, plain)
    assert same <= 1e-6, f"{case}: split and unsplit parameters differ by {same}"
    assert moved > 1e-3  # training moved them: the comparison is not vacuous
    assert other > 1e-4, f"{case}: the option changed nothing ({other})"


ASKED = ["balanced_accuracy", "matthews_corrcoef", "average_precision", "log_loss", "brier_score"]


def _sklearn(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The asked metrics as scikit-learn gives them on class probabilities ``probs`` of two classes."""
    decided = probs.argmax(1)
    return {"test_balanced_accuracy": skm.balanced_accuracy_score(y, decided),
            "test_matthews_corrcoef": skm.matthews_corrcoef(y, decided),
            "test_average_precision": skm.average_precision_score(y, probs[:, 1]),
            "test_log_loss": skm.log_loss(y, probs, labels=[0, 1]), "test_brier_score": skm.brier_score_loss(y, probs[:, 1])}


def _test_rows(plan) -> tuple[torch.Tensor, np.ndarray]:
    s = setup_party(plan, "hospital", optimizer=False)
    test = torch.from_numpy(s.splits.test)
    return s.inputs["hospital.x"][test], s.inputs["hospital.y"][test].numpy().reshape(-1)


def _probs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        p = model(x).softmax(-1).double().numpy()
    return p / p.sum(1, keepdims=True)


def test_extra_metrics_are_scikit_learns_on_the_models_test_predictions(tmp_path):
    """Each asked metric, every epoch, as ``test_<name>``: scikit-learn's value on the trained model's
    predictions of the test rows (computed here, apart from the run); the report shows them."""
    from splitlearn.tools.report import write_report

    body = split_mlp("asked", [30, 8, 2], loss="benign", lr=0.05, data={"dataset": "breast_cancer"},
                     train={"epochs": 2, "batch_size": 32, "seed": 4})
    body["losses"]["benign"]["metrics"] = ASKED
    plan = load_plan(body)
    res = splitlearn.train(plan, out=tmp_path / "run")
    x, y = _test_rows(plan)
    expect = _sklearn(_probs(res.model, x), y)
    per_epoch = res["metrics"]["per_epoch"]
    for name, value in expect.items():
        assert len(per_epoch[name]) == 2, name
        assert per_epoch[name][-1] == pytest.approx(value, abs=1e-6), name
    assert per_epoch["test_rows"][-1] == len(y)
    page = write_report(tmp_path / "run").read_text()
    assert "matthews corrcoef" in page and "average precision" in page


def test_a_party_process_derives_the_loss_options_and_metrics_from_the_plan(tmp_path):
    """launcher="processes": each party reads the plan file; the loss party weighs the classes and scores
    the asked metrics as the threads run does (same weights bit for bit, same figures)."""
    body = split_mlp("weighted", [30, 8, 2], loss="benign", lr=0.05, data={"dataset": "breast_cancer"},
                     train={"epochs": 1, "batch_size": 32, "seed": 4})
    body["losses"]["benign"].update(class_weights=[3.0, 0.5], label_smoothing=0.05, metrics=ASKED[:2])
    (tmp_path / "plan.toml").write_text(toml(body))
    threads = splitlearn.train(tmp_path / "plan.toml", launcher="threads")
    processes = splitlearn.train(tmp_path / "plan.toml", launcher="processes", out=tmp_path / "run")
    a, b = threads.model.state_dict(), processes.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("test_balanced_accuracy", "test_matthews_corrcoef"):
        assert processes["metrics"]["per_epoch"][name] == threads["metrics"]["per_epoch"][name]
        assert threads["metrics"][name] == threads["metrics"]["per_epoch"][name][-1]  # a headline figure too
    plain = splitlearn.train(load_plan({**body, "losses": {"benign": {"input": "top", "target": "hospital.y"}}}))
    assert not torch.equal(plain.model.state_dict()["0.weight"], b["0.weight"])  # the options took effect
    written = json.loads((tmp_path / "run" / "plan.json").read_text())["losses"]["benign"]
    assert written["class_weights"] == [3.0, 0.5] and written["metrics"] == ASKED[:2]


def _hospital_files(folder) -> list[str]:
    """Three hospitals' npz files of breast cancer rows (standardised features, ``y`` 1 = benign)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    names = []
    for k, rows in enumerate(np.array_split(np.random.default_rng(2).permutation(len(x)), 3), start=1):
        np.savez(folder / f"hospital-{k}.npz", ids=rows.astype(np.int64), x=x[rows], y=d.target[rows].astype(np.int64))
        names.append(f"hospital-{k}")
    return names


def test_clients_pool_the_extra_metrics_over_every_sites_test_rows(tmp_path):
    """A [clients] run: the asked metrics are scikit-learn's over the union of every hospital's test rows
    (not a mean of per-site figures), and each site's own figure is in ``per_client``."""
    sites = _hospital_files(tmp_path)
    body = split_mlp("sites", [30, 8, 2], loss="benign", lr=0.05, data={"test_fraction": 0.25},
                     train={"epochs": 1, "batch_size": 16, "seed": 1},
                     parties={"hospital": {"data": {"dataset": "npz", "path": str(tmp_path / "{client}.npz")}}},
                     clients={"template": "hospital", "count": 3, "schedule": "sequential", "timeout": 60})
    body["losses"]["benign"]["metrics"] = ["matthews_corrcoef", "average_precision"]
    plan = load_plan(body)
    res = splitlearn.train(plan)
    model = res.model
    xs, ys = {}, {}
    for c in sites:
        s = setup_party(plan, "hospital", client=c, optimizer=False)
        test = torch.from_numpy(s.splits.test)
        xs[c], ys[c] = s.inputs["hospital.x"][test], s.inputs["hospital.y"][test].numpy().reshape(-1)
    probs = {c: _probs(model, xs[c]) for c in sites}
    pooled = _sklearn(np.concatenate(list(probs.values())), np.concatenate(list(ys.values())))
    m = res["metrics"]
    assert m["scored"]["rows"] == sum(len(y) for y in ys.values())
    for name in ("test_matthews_corrcoef", "test_average_precision"):
        assert m["per_epoch"][name][-1] == pytest.approx(pooled[name], abs=1e-6), name
        for c in sites:
            assert m["per_client"][c][name] == pytest.approx(_sklearn(probs[c], ys[c])[name], abs=1e-6), (c, name)
    mean = sum(m["per_client"][c]["test_matthews_corrcoef"] * len(ys[c]) for c in sites) / m["scored"]["rows"]
    assert m["per_epoch"]["test_matthews_corrcoef"][-1] != pytest.approx(mean, abs=1e-4)  # pooled, not averaged


@pytest.mark.parametrize("entry, given, said", [
    ("losses.digit", {"pos_weight": 2.0}, "loss kind 'cross_entropy' takes class_weights, label_smoothing, not pos_weight"),
    ("losses.digit", {"kind": "bce", "label_smoothing": 0.1}, "loss kind 'bce' takes pos_weight, not label_smoothing"),
    ("losses.digit", {"kind": "mse", "class_weights": [1.0, 2.0]}, "loss kind 'mse' takes no options, not class_weights"),
    ("losses.digit", {"metrics": ["auroc"]},
     "unknown metric 'auroc'; loss kind 'cross_entropy' (classification) may ask ['balanced_accuracy', "),
    ("losses.digit", {"kind": "mse", "metrics": ["matthews_corrcoef"]},
     "metric 'matthews_corrcoef' is a classification metric; loss kind 'mse' (regression) may ask ['explained_variance', "),
    ("losses.digit", {"metrics": ["mape"]}, "metric 'mape' is a regression metric; loss kind 'cross_entropy'"),
    ("losses.digit", {"metrics": ["roc_auc"]}, "metric 'roc_auc' is given as test_roc_auc without asking"),
    ("losses.digit", {"metrics": ["log_loss", "log_loss"]}, "metric 'log_loss' is named twice"),
    ("losses.digit.class_weights", {"class_weights": [1.0, -1.0]}, "finite and above 0"),
    ("losses.digit.label_smoothing", {"label_smoothing": 1.5}, "less than or equal to 1"),
    ("losses.digit.pos_weight", {"kind": "bce", "pos_weight": 0.0}, "greater than 0"),
])
def test_a_wrong_option_or_metric_is_one_plan_error_naming_the_entry(entry, given, said):
    with pytest.raises(PlanError) as e:
        load_plan(_digits(**given))
    assert e.value.entry == entry and said in e.value.message, str(e.value)


def test_class_weights_not_one_per_class_are_refused_before_training():
    """Counted against the head's classes once the plan's check (one row through the graph) knows them."""
    with pytest.raises(PlanError) as e:
        prepare(load_plan(_digits(class_weights=[1.0, 2.0, 3.0])))
    assert "loss 'digit'" in e.value.message and e.value.entry == "losses.digit"
    assert "class_weights gives 3 weights, but the head gives 10 classes: give one weight per class" in e.value.message


def test_an_entry_without_options_is_written_and_hashed_as_before():
    """Options and metrics are written only where given: plans (and their checkpoints' plan hash) of
    before are unchanged; an entry with them carries them into plan.json and back."""
    from splitlearn.core.plan import plan_hash

    plain = load_plan(_digits())
    assert set(plain.model_dump()["losses"]["digit"]) == {"input", "target", "kind", "weight"}
    asked = load_plan(_digits(class_weights=WEIGHTS, metrics=["log_loss"]))
    again = load_plan(asked.model_dump(mode="json"))
    assert again.losses["digit"].kind.options == asked.losses["digit"].kind.options == (("class_weights", tuple(WEIGHTS)),)
    assert plan_hash(again) == plan_hash(asked) != plan_hash(plain)


def test_every_named_metric_is_scikit_learns_for_several_classes_and_for_regression():
    """The registry's figures on given scores, through the one scoring function, against scikit-learn
    called here (several classes: macro average precision, the multi-class Brier score; regression)."""
    from splitlearn.core.metrics import EXTRA_METRICS, Scores, evaluation_metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 200)
    y = rng.integers(0, 4, 200)
    asked = [m.name for m in EXTRA_METRICS.values() if m.classification]
    kind = load_plan(_digits(metrics=asked)).losses["digit"].kind
    got = evaluation_metrics(kind, [Scores(probs[:120], y[:120], 1.0, 120), Scores(probs[120:], y[120:], 1.0, 80)])
    d = probs.argmax(1)
    expect = {"balanced_accuracy": skm.balanced_accuracy_score(y, d), "matthews_corrcoef": skm.matthews_corrcoef(y, d),
              "cohen_kappa": skm.cohen_kappa_score(y, d), "average_precision": skm.average_precision_score(y, probs),
              "log_loss": skm.log_loss(y, probs), "brier_score": skm.brier_score_loss(y, probs, labels=[0, 1, 2, 3]),
              "precision": skm.precision_score(y, d, average="macro")}
    assert sorted(expect) == sorted(asked)
    for name, value in expect.items():
        assert got[f"test_{name}"] == pytest.approx(value, abs=1e-12), name
    true = rng.normal(3.0, 1.0, 50)
    pred = true + rng.normal(0.0, 0.3, 50)
    asked = [m.name for m in EXTRA_METRICS.values() if not m.classification]
    kind = load_plan(_digits(kind="mse", metrics=asked)).losses["digit"].kind
    got = evaluation_metrics(kind, [Scores(pred, true, 1.0, 50)])
    expect = {"explained_variance": skm.explained_variance_score(true, pred),
              "median_absolute_error": skm.median_absolute_error(true, pred), "max_error": skm.max_error(true, pred),
              "mape": skm.mean_absolute_percentage_error(true, pred)}
    assert sorted(expect) == sorted(asked)
    for name, value in expect.items():
        assert got[f"test_{name}"] == pytest.approx(value, abs=1e-12), name


def test_an_extra_metric_undefined_on_the_rows_is_none_not_nan():
    """Cohen's kappa of rows of one class only is undefined (sklearn gives NaN): the figure is None, so a result
    never holds NaN and the evaluation goes on."""
    from splitlearn.core import losses
    from splitlearn.core.metrics import Scores, evaluation_metrics

    kind = losses.KindName("cross_entropy", (), ("cohen_kappa", "balanced_accuracy"))
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], dtype=np.float32)
    got = evaluation_metrics(kind, [Scores(probs, np.zeros(3, dtype=np.int64), 0.3, 3, 3)])
    assert got["test_cohen_kappa"] is None and got["test_balanced_accuracy"] == 1.0
