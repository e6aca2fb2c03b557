"""Prediction across sites (``splitlearn party PLAN --name NAME --predict RUN --data new.csv``): each site runs its
own part in its own process with its own new rows, over gRPC with mutual TLS; the rows are aligned as the plan
aligns them (PSI here: nobody learns another's ids); the predictions arrive only at the head's owner, equal to the
one-process ``predict`` of the same files."""

import csv
import subprocess

import numpy as np
import pytest

import splitlearn
from splitlearn.launch.processes import free_port
from splitlearn.wire.transport.tls import make_certs

from .support import clinic_files, party_cmd, raw_cancer, toml, vertical_plan, write_csv

pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's test "
                    "command (pip install --no-deps openmined-psi)")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_each_site_predicts_from_its_own_file_and_the_server_alone_gets_the_predictions(tmp_path):
    files, _, ids = clinic_files(tmp_path)
    plan = tmp_path / "clinics.toml"
    plan.write_text(toml(vertical_plan(tmp_path, files, align="psi", standardize=True)))
    run = tmp_path / "run"
    splitlearn.train(plan, out=run, epochs=1)
    x, _ = raw_cancer()
    new, rng = {}, np.random.default_rng(7)
    for k, p in enumerate(("clinic_a", "clinic_b", "clinic_c")):  # 40 new patients; b misses 3 of them, c has 2 more
        chosen = np.arange(200, 240) if p == "clinic_a" else np.setdiff1d(np.arange(200, 240), [205, 210, 233]) \
            if p == "clinic_b" else np.arange(200, 242)
        chosen = rng.permutation(chosen)  # each site's file in its own order
        new[p] = tmp_path / f"new_{p}.csv"
        write_csv(new[p], ids[chosen], x[chosen, 10 * k:10 * k + 10])
    want = splitlearn.predict(run, {p: str(f) for p, f in new.items()}, write=False)["malignant"]
    assert len(want["ids"]) == 37 and want["party"] == "server"

    certs, out = tmp_path / "certs", tmp_path / "pred"
    names = ["clinic_a", "clinic_b", "clinic_c", "server"]
    make_certs(names, certs)
    ports = {n: free_port() for n in names}
    procs = {n: subprocess.Popen(party_cmd(plan, n, certs, ports, out, "--predict", str(run),
                                           *(["--data", str(new[n])] if n in new else [])),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in names}
    logs = {n: p.communicate(timeout=120)[0] for n, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    written = run / "parties" / "server" / "predictions.csv"
    assert "37 predictions written to" in logs["server"] and str(written) in logs["server"]
    rows = _rows(written)
    assert rows[0] == ["id", "malignant", "malignant_p0", "malignant_p1"]
    # the server holds no ids: its rows are the positions of the aligned rows, in the order predict gives them
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(37)]
    assert [int(r[1]) for r in rows[1:]] == want["predictions"]
    got = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert np.abs(got - np.array(want["probabilities"])).max() < 1e-5  # (written with 6 significant digits)
    for n in ("clinic_a", "clinic_b", "clinic_c"):  # a site holding no head writes no predictions, but its ids
        assert not (run / "parties" / n / "predictions.csv").exists()
        assert _rows(run / "parties" / n / "predicted_rows.csv")[1:] == [[str(k), i] for k, i in enumerate(want["ids"])]
    # the unmatched ids (b lacks 205, 210, 233; c alone holds 240, 241) were never shown to another site
    assert not any(str(ids[i]) in logs["server"] for i in (205, 240))


def test_a_site_predicting_into_the_run_folder_itself_is_refused(tmp_path):
    files, _, _ = clinic_files(tmp_path)
    plan = tmp_path / "clinics.toml"
    plan.write_text(toml(vertical_plan(tmp_path, files)))
    r = subprocess.run(party_cmd(plan, "clinic_a", tmp_path, {"clinic_a": free_port()}, tmp_path / "run",
                                 "--predict", str(tmp_path / "run"), "--insecure"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--out names the run folder itself" in r.stderr
