"""Studies as people bring them: string patient ids, rows aligned by PSI, party processes. The audit
joins what each party recorded with the right rows, and predict matches new rows as training did."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import splitlearn
from splitlearn.tools.audit.run import audit_run
from splitlearn.wire.transport.tls import make_certs

from .conftest import EXAMPLES
from .support import free_port, party_cmd


@pytest.fixture
def psi():
    return pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's "
                               "test command (pip install --no-deps openmined-psi)")


def _clinics(tmp_path, missing: dict[str, list[int]]) -> dict:
    """Breast cancer split over two clinics by columns, string ids in each clinic's own order, some
    patients missing at one clinic or the other; the diagnosis at clinic_a; PSI alignment."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    rng = np.random.default_rng(0)
    parties, networks, segments = {}, {}, {}
    for k, (name, cols) in enumerate((("clinic_a", slice(0, 15)), ("clinic_b", slice(15, 30)))):
        rows = [i for i in rng.permutation(len(x)) if i not in missing.get(name, [])]
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient", *[f"f{j}" for j in range(15)], *(["diagnosis"] if k == 0 else [])])
            for i in rows:
                w.writerow([f"P{i:04d}", *[f"{v:.6g}" for v in x[i, cols]],
                            *(["benign" if d.target[i] else "malignant"] if k == 0 else [])])
        parties[name] = {"holds": {"x": "x", **({"y": "y"} if k == 0 else {})},
                         "data": {"dataset": "csv", "path": str(path), "id_column": "patient",
                                  **({"label_column": "diagnosis"} if k == 0 else {})}}
        networks[name] = {"zoo": "mlp", "args": {"sizes": [15, 8], "out_activation": True}}
        segments[name] = {"party": name, "inputs": [f"{name}.x"], "network": name}
    parties["server"] = {}
    networks["top"] = {"zoo": "mlp", "args": {"sizes": [8, 2]}}
    segments["top"] = {"party": "server", "inputs": ["clinic_a", "clinic_b"], "merge": "sum", "network": "top"}
    return {"name": "clinics", "data": {"align": "psi"}, "train": {"epochs": 2, "batch_size": 32, "seed": 0},
            "parties": parties, "networks": networks, "segments": segments,
            "losses": {"diagnosis": {"input": "top", "target": "clinic_a.y"}}}


def test_audit_of_a_psi_run_with_string_ids_joins_the_right_rows(tmp_path, psi):
    plan = _clinics(tmp_path, {"clinic_a": list(range(0, 40)), "clinic_b": list(range(30, 60))})
    result = splitlearn.train(plan, out=tmp_path / "run")
    assert result["parties"]["clinic_a"]["data"]["alignment"] == {"held": 529, "aligned": 509}
    audit = audit_run(tmp_path / "run", epochs=20)  # was: "party 'clinic_a' holds no rows for some recorded ids"
    wires = audit["wires"]
    # the label wire carries the labels in the clear: joined with the right rows, every one agrees
    assert wires["clinic_a.y->diagnosis"]["labels_exposed"]["agreement"] == 1.0
    for w in ("clinic_a->top", "clinic_b->top"):  # activations of 8 ReLU units depend strongly on their inputs
        assert wires[w]["distance_correlation"] > 0.5, wires[w]


def test_audit_of_a_party_process_run_equals_the_in_process_audit(tmp_path):
    # a party without data numbers its rows in schedule order; its records were read as sample ids, so the
    # audit of every party-process run joined activations and labels with other patients' rows (agreement 0.10)
    plan = EXAMPLES / "vanilla.toml"
    r = subprocess.run([sys.executable, "-m", "splitlearn.cli", "run", str(plan), "--epochs", "1", "--out",
                        str(tmp_path / "procs"), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    splitlearn.train(plan, epochs=1, out=tmp_path / "inproc")
    # (the decoder's epochs change neither figure compared: dCor and label agreement are of the records)
    procs, inproc = (audit_run(tmp_path / d, epochs=1)["wires"] for d in ("procs", "inproc"))
    assert procs["hospital.y->digit"]["labels_exposed"]["agreement"] == 1.0
    assert procs["bottom->top"]["distance_correlation"] == pytest.approx(inproc["bottom->top"]["distance_correlation"],
                                                                        abs=1e-6)
    assert procs["bottom->top"]["distance_correlation"] > 0.5


def test_predict_on_a_psi_run_matches_rows_and_lists_the_unmatched(tmp_path, psi):
    plan = _clinics(tmp_path, {"clinic_a": [1, 2, 3], "clinic_b": [3, 4, 5, 6]})
    splitlearn.train(plan, out=tmp_path / "run")
    own = splitlearn.predict(tmp_path / "run")["diagnosis"]  # the run's test rows (was: "set align = psi")
    assert len(own["ids"]) == 113 and own["unmatched"] == {}  # 20 % of the 563 patients both clinics hold
    assert own["classes"] == ["benign", "malignant"]
    new = splitlearn.predict(tmp_path / "run", data={"clinic_a": str(tmp_path / "clinic_a.csv"),
                                                     "clinic_b": str(tmp_path / "clinic_b.csv")})["diagnosis"]
    assert len(new["ids"]) == 563
    assert new["unmatched"] == {"clinic_a": ["P0004", "P0005", "P0006"], "clinic_b": ["P0001", "P0002"]}
    with open(tmp_path / "run" / "parties" / "server" / "predictions.csv") as f:
        assert {r["diagnosis"] for r in csv.DictReader(f)} <= {"benign", "malignant"}


_DIES = '''
import os
from torch import nn


class DiesAtCall(nn.Module):
    """A bottom whose process dies (no goodbye, no error message) at its 15th forward in a party process."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(64, 16), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 15 and os.environ.get("SPLITLEARN_TEST_DIE") == "1":
            os._exit(9)
        return self.lin(x).relu()


def bottom():
    return DiesAtCall()
'''


def _dying_plan(tmp_path):
    (tmp_path / "dies.py").write_text(_DIES)
    plan = tmp_path / "dies.toml"
    plan.write_text('''name = "dies"
[train]
epochs = 50
[parties.hospital]
holds = { x = "x", y = "y" }
[parties.server]
[networks.bottom]
factory = "dies:bottom"
[networks.top]
zoo = "mlp"
args = { sizes = [16, 10] }
[segments.bottom]
party = "hospital"
inputs = ["hospital.x"]
network = "bottom"
[segments.top]
party = "server"
inputs = ["bottom"]
network = "top"
[losses.digit]
input = "top"
target = "hospital.y"
''')
    return plan


def test_the_launcher_names_a_dead_party_at_once(tmp_path):
    plan = _dying_plan(tmp_path)
    env = {**os.environ, "SPLITLEARN_TEST_DIE": "1"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "splitlearn", "run", str(plan), "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, timeout=170, env=env)
    took = time.monotonic() - start
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "party hospital failed: exit status 9" in err, err
    assert "party server failed: stopped by the launcher after hospital failed" in err
    assert err.index("party hospital failed") < err.index("party server failed")
    assert took < 60, f"the launcher waited {took:.0f} s (reconnect_timeout is 180 s)"


# (party processes, each site its own folder, leave the result at the label owner, which report reads:
# test_network.py::test_hospital_dials_the_server_by_default_and_the_label_owner_holds_the_result)


def test_parties_whose_plans_differ_are_told_which_entries(tmp_path):
    server_plan = tmp_path / "server.toml"
    server_plan.write_text((EXAMPLES / "vanilla.toml").read_text().replace("epochs = 8", "epochs = 3"))
    make_certs(["hospital", "server"], tmp_path / "certs")
    ports = {n: free_port() for n in ("hospital", "server")}
    procs = [subprocess.Popen(party_cmd(plan, n, tmp_path / "certs", ports, tmp_path / "out"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for n, plan in (("server", server_plan), ("hospital", EXAMPLES / "vanilla.toml"))]
    outs = [" ".join(p.communicate(timeout=120)[0].decode().split()) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    # whichever reads the other's hello first names the entry; the other is told its reason
    said = [o for o in outs if "the plan differs from" in o]
    assert said and all("at train.epochs (ours: " in o for o in said), outs
    assert all("train.epochs" in o for o in outs), outs


def test_the_diabetes_study_regression_at_a_label_only_registry_over_psi(tmp_path, psi):
    import shutil

    work = tmp_path / "diabetes"
    shutil.copytree(EXAMPLES / "diabetes", work, ignore=shutil.ignore_patterns("*.csv"))
    subprocess.run([sys.executable, str(work / "make_diabetes.py")], check=True, capture_output=True)
    local = splitlearn.train(work / "diabetes.toml", epochs=6)
    m = local["metrics"]
    kept = {v["aligned"] for v in local["alignment"]["parties"].values()}
    assert len(kept) == 1 and 442 - 28 <= kept.pop() <= 442 - 12  # 12, 9 and 7 patients missing at three sites
    assert m["test_r2"] > 0.2 and m["test_mae"] < 70 and m["test_rows"] > 80
    assert [w["name"] for w in local["wires"] if w["src"] == "registry"] == ["registry.y->progression"]
    # in-process here, for time: over party processes, a label-only registry equals in-process in
    # tests/test_flow_control.py, and PSI chains of three holders run in tests/test_resume_moments.py
