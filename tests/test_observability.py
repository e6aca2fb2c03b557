"""See and trust a run: clinical metrics, curves and experiment tracking, the HTML report in a
real browser, the audit's verdicts, and a command line without rough edges."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score, roc_auc_score

import splitlearn
from splitlearn.core.metrics import classification_metrics, expected_calibration_error

from .conftest import EXAMPLES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli(*args, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run([sys.executable, "-m", "splitlearn", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _here(*args):
    """A command run in this process by typer's runner (its ``exit_code`` and ``output``): for what a
    test only sets up, without a second interpreter importing torch; :func:`_cli` where the process
    itself (its exit status, its stderr) is what is checked."""
    from typer.testing import CliRunner

    from splitlearn.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# -- metrics -----------------------------------------------------------------------------------

def _final_outputs(run_dir):
    out = splitlearn.predict(run_dir, write=False)
    (task,) = out
    return out[task]


@pytest.mark.parametrize("plan", ["vertical", "vanilla"], ids=["binary", "ten classes"])
def test_metrics_equal_scikit_learn_on_the_same_predictions(tmp_path, plan):
    result = splitlearn.train(EXAMPLES / f"{plan}.toml", epochs=2, out=tmp_path / "run")
    m = result["metrics"]
    pred = _final_outputs(tmp_path / "run")  # the test rows, through the trained model, as at the last eval
    probs = pred["outputs"].float().softmax(-1).numpy().astype(np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    from splitlearn.run.setup import prepare

    _, setups, _ = prepare(EXAMPLES / f"{plan}.toml", epochs=1)
    holder = next(s for s in setups.values() if any(k.endswith(".y") for k in s.inputs))
    y = holder.inputs[next(k for k in holder.inputs if k.endswith(".y"))].numpy()
    ids = np.asarray(pred["ids"])
    y = y[np.searchsorted(holder.splits.ids, ids)]
    decided = probs.argmax(1)
    assert m["test_accuracy"] == pytest.approx(float((decided == y).mean()), abs=1e-12)
    if plan == "vertical":
        assert m["test_roc_auc"] == roc_auc_score(y, probs[:, 1])
        assert m["test_f1"] == f1_score(y, decided)
        assert m["test_sensitivity"] == recall_score(y, decided, pos_label=1)
        assert m["test_specificity"] == recall_score(y, decided, pos_label=0)
    else:
        assert m["test_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
        assert m["test_f1"] == f1_score(y, decided, average="macro")
        assert "test_sensitivity" not in m
    assert m["test_ece"] == pytest.approx(expected_calibration_error(probs, y), abs=1e-12)
    assert len(m["per_epoch"]["test_roc_auc"]) == 2 and m["per_epoch"]["test_accuracy"][-1] == m["test_accuracy"]
    assert [s for s, _ in m["train_loss_steps"]] == sorted(s for s, _ in m["train_loss_steps"])


def test_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    # bins: 0.9 -> (0.8, 0.9], 0.8 -> (0.7, 0.8], 0.7 -> (0.6, 0.7], 0.55 -> (0.5, 0.6]; each 1/4 of the rows
    assert expected_calibration_error(probs, y) == pytest.approx((0.1 + 0.8 + 0.3 + 0.45) / 4)
    assert classification_metrics(probs[:2], np.array([0, 0]))["roc_auc"] is None  # one class: no AUC


# -- tracking ----------------------------------------------------------------------------------

def test_tensorboard_and_mlflow_get_the_metrics_of_each_epoch(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    result = splitlearn.train(EXAMPLES / "vanilla.toml", epochs=2, log=f"tensorboard:{tmp_path / 'tb'}",
                              on_step=lambda p: seen.append(p.loss if p.mode == "train" else None))
    assert any(v is not None for v in seen)  # on_step carries the loss
    server = EventAccumulator(str(tmp_path / "tb" / "server"))
    server.Reload()
    acc = [(e.step, e.value) for e in server.Scalars("digit/test_accuracy")]
    assert acc == [(e, pytest.approx(v, abs=1e-6)) for e, v in enumerate(result["metrics"]["per_epoch"]["test_accuracy"])]
    assert len(server.Scalars("digit/train_loss_step")) == len([p for p in seen if p is not None])
    assert not (tmp_path / "tb" / "hospital").exists()  # only the party computing the loss streams it

    uri = f"file:{tmp_path / 'mlruns'}"
    result = splitlearn.train(EXAMPLES / "vertical.toml", epochs=2, log=f"mlflow:{uri}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("vertical")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"vertical:server", "vertical:run.summary"}
    history = client.get_metric_history(runs["vertical:server"].info.run_id, "malignant/test_roc_auc")
    assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(
        result["metrics"]["per_epoch"]["test_roc_auc"])
    params = runs["vertical:run.summary"].data.params
    assert params["seed"] == "0" and params["plan"] == "vertical"
    assert int(params["clinic_a.bytes_sent"]) == result["parties"]["clinic_a"]["bytes_sent"]


def test_a_missing_tracking_extra_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(splitlearn.PlanError, match=r"needs the mlflow package.*\n  hint: pip install 'splitlearn\[mlflow\]'"):
        splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, log="mlflow")


# -- the report, in a real browser -------------------------------------------------------------

def _chromium(page: Path, tmp: Path) -> tuple[str, str, Path]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2400"]
    dom = subprocess.run([CHROMIUM, *flags, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = tmp / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    return dom.stdout, dom.stderr, shot


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("kind", ["clients", "audited"])  # audited: a plain run's page and the audit's
def test_the_report_loads_in_chromium(tmp_path, kind):
    run = tmp_path / "run"
    plan = {"clients": "sequential", "audited": "u_shaped"}[kind]
    assert _here("run", EXAMPLES / f"{plan}.toml", "--in-process", "--epochs", "1", "--out", run, "-q").exit_code == 0
    if kind == "audited":
        assert _here("audit", run, "--decoder-epochs", "1").exit_code == 0  # the page, not the decoder, is checked
    r = _here("report", run)
    assert r.exit_code == 0, r.output
    page = run / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    dom, log, shot = _chromium(page, tmp_path)
    images = html.count("<img ")
    assert f'data-images="{images} 0"' in dom  # every image decoded (the page's own check ran)
    attack_figures = 0
    if kind == "audited":  # one figure per place a registered attack applies (tools/audit/attacks.py)
        audit = json.loads((run / "audit" / "audit.json").read_text())
        attack_figures = sum(1 for a in audit["attacks"].values() for r in a.get("results", []) if r.get("figure"))
        assert attack_figures >= 1
    # topology, curves, the last evaluation (and the inversion grid, and the attacks' figures)
    assert images == (4 + attack_figures if kind == "audited" else 3)
    errors = [line for line in log.splitlines() if "CONSOLE" in line and ("error" in line.lower())]
    assert errors == []
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] > 100 and pixels.std() > 0.05  # not a blank page
    if kind == "clients":
        assert "schedule sequential" in html and "10 clients" in html
    if kind == "audited":
        assert "no wire of this plan carries labels, yet hospital returns the gradients" in html


# -- the audit explains itself -----------------------------------------------------------------

def test_the_u_shaped_label_leak_is_explained_and_protection_works_there(tmp_path):
    plan = tomllib.loads((EXAMPLES / "u_shaped.toml").read_text())
    splitlearn.train(plan, epochs=2, out=tmp_path / "open")
    r = _here("audit", tmp_path / "open", "--decoder-epochs", "5")
    assert r.exit_code == 0, r.output
    out, flat = r.stdout, " ".join(r.stdout.split())
    assert "labels from" in out and "leaks" in out
    assert '[wires.middle] label_protection = { kind = "max_norm", strength = 1.0 }' in flat  # the protecting line
    assert max(len(line) for line in out.splitlines()) <= 80  # the table fits an 80-column terminal
    audit = json.loads((tmp_path / "open" / "audit" / "audit.json").read_text())
    open_auc = audit["wires"]["middle->head"]["verdicts"]["label_leakage"]["value"]
    assert open_auc > 0.95 and "thresholds" in audit
    plan["wires"] = {"middle": {"label_protection": {"kind": "max_norm", "strength": 1.0}}}
    splitlearn.train(plan, epochs=2, out=tmp_path / "protected")
    assert _here("audit", tmp_path / "protected", "--decoder-epochs", "5").exit_code == 0
    audit = json.loads((tmp_path / "protected" / "audit" / "audit.json").read_text())
    assert audit["wires"]["middle->head"]["verdicts"]["label_leakage"]["value"] < open_auc - 0.1


# -- the command line --------------------------------------------------------------------------

def test_help_imports_no_torch_and_there_is_a_version():
    code = ("import sys; from typer.testing import CliRunner; from splitlearn.cli import app; "
            "r = CliRunner().invoke(app, ['run', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    v = _cli("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"splitlearn {splitlearn.__version__}"


def test_out_is_never_overwritten_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")
    r = _cli("run", EXAMPLES / "vanilla.toml", "--in-process", "--epochs", "1", "--out", out, "-q")
    assert r.returncode == 2 and "already holds files" in r.stderr and "--force" in r.stderr
    assert (out / "result.json").read_text() == "{}"
    r = _here("run", EXAMPLES / "vanilla.toml", "--in-process", "--epochs", "1", "--out", out, "-q", "--force")
    assert r.exit_code == 0 and json.loads((out / "result.json").read_text())["plan"] == "vanilla"


def test_inspect_draws_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _here("inspect", EXAMPLES / "vanilla.toml")
    assert r.exit_code == 0 and list(tmp_path.iterdir()) == []
    r = _here("inspect", EXAMPLES / "vanilla.toml", "--png", tmp_path / "t.png")
    assert r.exit_code == 0 and (tmp_path / "t.png").stat().st_size > 10_000


BAD_PLAN = """
[train]
epochs = 0
batch_size = -1
[parties.a]
holds = { x = "x", y = "y" }
colour = "red"
[networks.n]
zoo = "mlp"
args = { sizes = [64, 10] }
[segments.s]
party = "a"
inputs = ["a.x"]
network = "n"
[losses.l]
input = "s"
target = "a.y"
"""


def _plan_with(tmp_path, network: str, data: str = "") -> Path:
    text = BAD_PLAN.replace("epochs = 0\nbatch_size = -1", "epochs = 1").replace('colour = "red"\n', "")
    text = text.replace('zoo = "mlp"\nargs = { sizes = [64, 10] }', network)
    p = tmp_path / "plan.toml"
    p.write_text(data + text)
    return p


@pytest.mark.parametrize("case", ["problems", "factory", "sequential", "labels", "data", "port"])
def test_user_mistakes_are_one_clear_message(tmp_path, case):
    if case == "problems":
        plan = tmp_path / "plan.toml"
        plan.write_text(BAD_PLAN)
        want = ["entry 'train.epochs'", "entry 'train.batch_size'", "entry 'parties.a.colour'", "2 more problem(s)"]
    elif case == "factory":
        (tmp_path / "boom.py").write_text("def make():\n    raise RuntimeError('out of memory')\n")
        plan = _plan_with(tmp_path, 'factory = "boom:make"')
        want = ["plan.toml, entry 'networks.n.factory'", "RuntimeError: out of memory"]
    elif case == "sequential":
        (tmp_path / "stack.py").write_text("from torch import nn\nclass Stack(nn.Sequential):\n    def __init__(self):\n"
                                           "        super().__init__(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n")
        plan = _plan_with(tmp_path, 'factory = "stack:Stack"')
        plan.write_text(plan.read_text().replace('network = "n"', 'network = "n"\nlayers = [0, 3]'))
        want = []  # it trains
    elif case == "labels":
        plan = _plan_with(tmp_path, 'zoo = "mlp"\nargs = { sizes = [64, 6] }')
        want = ["entry 'losses.l'", "take values 0..9, but the head", "gives 6 classes"]
    elif case == "data":
        plan = _plan_with(tmp_path, 'zoo = "mlp"\nargs = { sizes = [4, 2] }',
                          '[data]\ndataset = "csv"\npath = "gone.csv"\nid_column = "id"\n')
        want = ["plan.toml, entry 'data'", f"{(tmp_path / 'gone.csv').resolve()}: no such file"]
    else:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli("party", EXAMPLES / "vanilla.toml", "--name", "server", "--insecure", "--listen",
                 f"127.0.0.1:{port}", "--connect-timeout", "2")
        s.close()
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "add_port" not in r.stderr
        return
    r = _cli("run", plan, "--in-process", "--out", tmp_path / "out", "-q")
    assert "Traceback" not in r.stderr + r.stdout
    if not want:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, r.stdout + r.stderr
    text = " ".join(r.stderr.split())  # rich wraps long lines
    for w in want:
        assert w in text, r.stderr


def test_an_unexpected_error_is_one_line_without_debug(tmp_path):
    run = tmp_path / "run"
    assert _here("run", EXAMPLES / "vanilla.toml", "--in-process", "--epochs", "1", "--out", run, "-q").exit_code == 0
    (run / "result.json").write_text("[1, 2]")  # a damaged run folder: no message was written for this
    r = _cli("report", run)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--debug" in r.stderr
    r = _cli("--debug", "report", run)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_compare_table_has_readable_units(tmp_path):
    from splitlearn.tools.compare import format_compare

    text = format_compare({"plan": "p", "clients": 2, "epochs": 1, "partition": {"kind": "dirichlet", "alpha": 0.5},
                           "rows": [{"method": "sequential", "clients": 2, "per_client_tflops": 1.885e-05,
                                     "predicted_tflops": None, "per_client_gb": 0.0012, "predicted_gb": 0.0011,
                                     "accuracy": 0.9, "skipped": 0}]})
    assert "partition dirichlet (alpha 0.5)" in text and "18.9 MFLOPs" in text and "1.2 MB" in text
    assert "{" not in text and "e-05" not in text


def test_pictures_of_clients_plans_show_the_clients(tmp_path):
    from splitlearn.core.graph import build_graph
    from splitlearn.tools.viz import clients_text

    text = clients_text(build_graph(splitlearn.load_plan(EXAMPLES / "sequential.toml")))
    assert text.startswith("10 clients hospital-1 … hospital-10 (iid), schedule sequential")
    assert "passes its segments straight to the next client" in text


def test_the_report_escapes_what_a_result_holds_and_embeds_only_the_audits_pictures(tmp_path):
    from splitlearn.tools.report import write_report

    run = tmp_path / "run"
    splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, out=run)
    result = json.loads((run / "result.json").read_text())
    result["seed"] = "<script>alert(1)</script>"
    result["plan"] = "<img src=x onerror=alert(2)>"
    (run / "result.json").write_text(json.dumps(result))
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    (run / "audit").mkdir()
    (run / "audit" / "audit.json").write_text(json.dumps({"wires": {"bottom->top": {
        "sender": "hospital", "receiver": "server", "carries": "activation",
        "inversion": {"mse": 0.1, "figure": "../secret.png"}}}}))
    page = write_report(run).read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "&lt;script&gt;" in page
    assert page.count("<img ") == 3  # topology, curves, the last evaluation: the picture outside audit/ is not


def test_a_compare_folder_gets_its_report(tmp_path):
    from splitlearn.tools.report import write_report

    (tmp_path / "compare.json").write_text(json.dumps({"plan": "p", "clients": 2, "epochs": 1, "partition": {},
                                                       "rows": [{"method": "fedavg", "accuracy": 0.9,
                                                                 "accuracy_per_epoch": [0.9]}]}))
    page = write_report(tmp_path).read_text()
    assert "<td>fedavg</td>" in page and "<td>0.9</td>" in page


def test_macro_f1_averages_the_classes_that_are_there():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    assert classification_metrics(probs, np.array([0, 1, 1]))["f1"] == 1.0  # class 2 is in neither


def test_a_clients_run_streams_its_steps_in_order(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = splitlearn.train(EXAMPLES / "sequential.toml", epochs=1, log=f"tensorboard:{tmp_path / 'tb'}")
    server = EventAccumulator(str(tmp_path / "tb" / "server"))
    server.Reload()
    steps = [e.step for e in server.Scalars("digit/train_loss_step")]
    assert steps == list(range(len(steps))) and len(steps) >= 40  # ten clients' turns, one numbering
    assert [v for _, v in result["metrics"]["train_loss_steps"]] == pytest.approx(
        [e.value for e in server.Scalars("digit/train_loss_step")])
