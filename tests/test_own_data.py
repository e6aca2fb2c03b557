"""Each party brings its own data: files per party and per client, private id alignment,
preprocessing that travels with the weights, predict per party."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.core.specs import PlanError
from splitlearn.data.embedded import digits
from splitlearn.launch.threads import run_local
from splitlearn.run.report import RunError
from splitlearn.run.setup import prepare
from splitlearn.wire.transport.inprocess import InProcessTransport
from splitlearn.wire.messages import Message, encode

from .conftest import EXAMPLES
from .support import clinic_files, raw_cancer, vertical_plan, write_csv

psi = pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's "
                          "test command (pip install --no-deps openmined-psi)")


# -- private alignment -------------------------------------------------------------------------

def test_psi_aligns_three_clinics_to_exactly_the_intersection_and_no_other_id_travels(tmp_path, monkeypatch):
    files, held, all_ids = clinic_files(tmp_path, missing_at_b=20)
    inter = held["clinic_a"] & held["clinic_b"] & held["clinic_c"]
    assert 500 < len(inter) < len(all_ids) - 20
    sent: list[bytes] = []
    original = InProcessTransport.send

    def spy(self, dst, data):  # a message handed over whole in one process: the bytes the wire would carry
        sent.append(encode(data) if isinstance(data, Message) else bytes(data))
        original(self, dst, data)

    monkeypatch.setattr(InProcessTransport, "send", spy)
    res = splitlearn.train(vertical_plan(tmp_path, files, align="psi", standardize=True), out=tmp_path / "run")
    al = res["alignment"]
    assert al["method"] == "psi"
    assert {p: v["held"] for p, v in al["parties"].items()} == {p: len(h) for p, h in held.items()}
    assert {v["aligned"] for v in al["parties"].values()} == {len(inter)}
    rows = {p: res["parties"][p]["data"] for p in files}
    assert {r["train"] + r["test"] for r in rows.values()} == {len(inter)}
    # the alignment was metered like any other traffic
    align = [t for t in res["parties"]["clinic_b"]["sent"] if t["wire"] == "align"]
    assert align and align[0]["bytes"] > 1000  # blinded ids: tens of bytes each
    # no id outside the intersection is in any message, blinded or not; ids inside it are (the result)
    blob = b"".join(sent)
    outside = sorted(set(all_ids.tolist()) - inter)
    assert outside and not [i for i in outside if i.encode() in blob]
    assert sum(i.encode() in blob for i in list(inter)[:20]) == 20
    assert res["metrics"]["test_accuracy"] > 0.85


def test_exact_alignment_names_the_first_missing_ids(tmp_path):
    files, held, _ = clinic_files(tmp_path, missing_at_b=3)
    with pytest.raises(PlanError) as e:
        prepare(vertical_plan(tmp_path, files))
    missing = sorted(held["clinic_a"] - held["clinic_b"])
    text = str(e.value)
    assert "hold different ids" in text and missing[0] in text and 'align = "psi"' in text


# -- preprocessing travels with the weights ------------------------------------------------------

def test_predict_one_new_row_standardised_with_the_training_statistics(tmp_path):
    x, y = raw_cancer()
    ids = np.arange(len(y))
    write_csv(tmp_path / "train.csv", ids, x, y)
    plan = {"name": "one", "train": {"epochs": 2, "batch_size": 32, "seed": 0},
            "parties": {"clinic": {"holds": {"x": "x", "y": "y"},
                                   "data": {"dataset": "csv", "path": str(tmp_path / "train.csv"), "id_column": "pid",
                                            "label_column": "outcome", "options": {"standardize": True}}},
                        "server": {}},
            "networks": {"b": {"zoo": "mlp", "args": {"sizes": [30, 16], "out_activation": True}},
                         "t": {"zoo": "mlp", "args": {"sizes": [16, 2]}}},
            "segments": {"b": {"party": "clinic", "inputs": ["clinic.x"], "network": "b"},
                         "t": {"party": "server", "inputs": ["b"], "network": "t"}},
            "losses": {"y": {"input": "t", "target": "clinic.y"}}}
    res = splitlearn.train(plan, out=tmp_path / "run")
    assert (tmp_path / "run" / "parties" / "clinic" / "preprocess.safetensors").is_file()
    assert res["metrics"]["test_accuracy"] > 0.9
    # statistics of the training rows only
    from safetensors.torch import load_file

    n_train = res["parties"]["clinic"]["data"]["train"]
    stats = load_file(str(tmp_path / "run" / "parties" / "clinic" / "preprocess.safetensors"))
    setups = prepare(plan)[1]
    train_rows = setups["clinic"].splits.train
    assert len(train_rows) == n_train
    assert np.allclose(stats["x.mean"].numpy(), x[train_rows].mean(0), rtol=1e-5, atol=1e-4)
    assert not np.allclose(stats["x.mean"].numpy(), x.mean(0), rtol=1e-6, atol=1e-6)
    # a batch of new rows, and one of them alone (without labels: a new patient)
    write_csv(tmp_path / "batch.csv", ids[:40], x[:40])
    write_csv(tmp_path / "single.csv", ids[7:8], x[7:8])
    batch = splitlearn.predict(tmp_path / "run", {"clinic": str(tmp_path / "batch.csv")})["y"]
    single = splitlearn.predict(tmp_path / "run", {"clinic": str(tmp_path / "single.csv")})["y"]
    assert single["ids"] == [7]
    # the same rows given as one DataSpec's dict (a dict of strings, but no party's names)
    spec = {"dataset": "csv", "path": str(tmp_path / "batch.csv"), "id_column": "pid", "options": {"standardize": True}}
    assert splitlearn.predict(tmp_path / "run", spec, write=False)["y"]["predictions"] == batch["predictions"]
    # equal up to float rounding: matrix kernels may sum in another order for one row than for 40
    # (on some CPUs the last bits differ)
    assert torch.allclose(single["outputs"][0], batch["outputs"][7], rtol=1e-5, atol=1e-6)
    assert single["predictions"][0] == batch["predictions"][7]
    # ... and equal the trained model on the row standardised with the training statistics
    z = (torch.from_numpy(x[7:8]) - stats["x.mean"]) / stats["x.std"]
    mods = res.modules
    with torch.no_grad():
        expect = mods["server"]["t"](mods["clinic"]["b"](z))
    assert torch.allclose(expect[0], single["outputs"][0], atol=1e-6)
    # probabilities beside the class, at the head's owner
    probs = single["probabilities"][0]
    assert abs(sum(probs) - 1) < 1e-5 and int(np.argmax(probs)) == single["predictions"][0]
    head = (tmp_path / "run" / "parties" / "server" / "predictions.csv").read_text().splitlines()
    assert head[0] == "id,y,y_p0,y_p1"


def test_vertical_predict_takes_one_file_per_party(tmp_path):
    files, held, ids = clinic_files(tmp_path)
    run = tmp_path / "run"
    splitlearn.train(vertical_plan(tmp_path, files, align="psi", standardize=True), out=run)
    x, _ = raw_cancer()
    new = {}
    for k, p in enumerate(("clinic_a", "clinic_b", "clinic_c")):
        f = tmp_path / f"new_{p}.csv"
        order = [3, 1, 2] if p == "clinic_b" else [1, 2, 3]  # rows in any order: aligned by id
        write_csv(f, ids[[i + 100 for i in order]], x[[i + 100 for i in order], 10 * k:10 * k + 10])
        new[p] = str(f)
    out = splitlearn.predict(run, new)["malignant"]
    assert out["party"] == "server" and out["ids"] == [f"PAT-{i:05d}-Q" for i in (101, 102, 103)]
    assert len(out["probabilities"]) == 3
    with pytest.raises(PlanError, match="every party with data needs its rows"):
        splitlearn.predict(run, {"clinic_a": new["clinic_a"]})


# -- per-client files ----------------------------------------------------------------------------

def _sequential(tmp_path, per_client: bool) -> dict:
    body = load_plan(EXAMPLES / "sequential.toml").with_train(epochs=2).model_dump(mode="json")
    body["clients"] = {**body["clients"], "count": 3}
    if per_client:
        body["parties"]["hospital"]["data"] = {"dataset": "npz", "path": str(tmp_path / "{client}.npz")}
    return body


def test_each_client_reading_its_own_file_equals_the_shared_dataset(tmp_path):
    shared = load_plan(_sequential(tmp_path, False))
    plan, setups, shapes = prepare(shared)
    from splitlearn.clients.context import Context

    ctx = Context.from_setup(plan, setups["hospital"])
    table = digits()
    s = setups["hospital"].splits
    for k, share in enumerate(ctx.shares):  # each client's file: its share of the training rows, and the test rows
        rows = np.concatenate([s.ids[share], s.ids[s.test]])
        is_test = np.r_[np.zeros(len(share), np.int8), np.ones(len(s.test), np.int8)]
        np.savez(tmp_path / f"hospital-{k + 1}.npz", ids=rows, x=table.fields["x"][rows], y=table.fields["y"][rows],
                 is_test=is_test)
    a = run_local(plan, setups, shapes)
    p2, s2, sh2 = prepare(load_plan(_sequential(tmp_path, True)))
    b = run_local(p2, s2, sh2)
    for name in ("server", "hospital-1", "hospital-2", "hospital-3"):
        for seg, mod in a[name].modules.items():
            for k, v in mod.state_dict().items():
                assert torch.equal(v, b[name].modules[seg].state_dict()[k]), (name, seg, k)
    trained = [[r["rows"] for r in x["hospital-2"].records if r["mode"] == "train"] for x in (a, b)]
    assert trained[0] == trained[1]  # (with its own file each client also scores the model on its test rows)
    assert b["hospital-1"].data["rows"] == len(ctx.shares[0]) + len(s.test)


def test_clients_whose_files_differ_in_schema_stop_the_run_naming_both(tmp_path):
    t = digits()
    for k in (1, 2):
        n = 300
        x = t.fields["x"][:n] if k == 1 else t.fields["x"][:n, :60]
        np.savez(tmp_path / f"hospital-{k}.npz", x=x, y=t.fields["y"][:n])
    body = _sequential(tmp_path, True)
    body["clients"]["count"] = 2
    plan, setups, shapes = prepare(load_plan(body))
    with pytest.raises(RunError) as e:
        run_local(plan, setups, shapes)
    text = str(e.value)
    assert "hospital-1" in text and "hospital-2" in text and "'x'" in text and "[64]" in text and "[60]" in text


# -- clear errors ----------------------------------------------------------------------------------

def test_a_missing_file_names_the_party_and_the_path(tmp_path):
    files, _, _ = clinic_files(tmp_path)
    files["clinic_b"] = str(tmp_path / "nowhere.csv")
    with pytest.raises(PlanError) as e:
        prepare(vertical_plan(tmp_path, files))
    assert "clinic_b" in str(e.value) and "nowhere.csv" in str(e.value)


def test_a_non_numeric_cell_names_party_file_line_and_column(tmp_path):
    files, _, _ = clinic_files(tmp_path)
    lines = open(files["clinic_c"]).read().splitlines()
    cells = lines[4].split(",")
    cells[2] = "n/a"
    lines[4] = ",".join(cells)
    open(files["clinic_c"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(PlanError) as e:
        prepare(vertical_plan(tmp_path, files))
    text = str(e.value)
    assert "clinic_c" in text and "line 5" in text and "'f1'" in text and "'n/a'" in text


def test_an_unreadable_image_names_the_client_and_the_image(tmp_path):
    from PIL import Image

    t = digits()
    for k in (1, 2):
        for c in range(3):
            (tmp_path / f"hospital-{k}" / str(c)).mkdir(parents=True)
            for i in np.flatnonzero(t.fields["y"] == c)[:5]:
                Image.fromarray((t.fields["image"][i, 0] * 255).astype(np.uint8)).save(
                    tmp_path / f"hospital-{k}" / str(c) / f"{i}.png")
    bad = tmp_path / "hospital-2" / "1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    body = _sequential(tmp_path, True)
    body["clients"]["count"] = 2
    body["parties"]["hospital"]["data"] = {"dataset": "images", "path": str(tmp_path / "{client}")}
    from splitlearn.run.setup import setup_party

    plan = load_plan(body)
    assert len(setup_party(plan, "hospital", client="hospital-1").table) == 15
    with pytest.raises(PlanError) as e:
        setup_party(plan, "hospital", client="hospital-2")
    assert "hospital-2" in str(e.value) and "broken.png" in str(e.value)


# -- the examples ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, script, plan, epochs, floor", [
    ("clinics", "make_clinics.py", "clinics.toml", 3, 0.85),
    ("hospitals", "make_images.py", "hospitals.toml", 2, 0.8),
])
def test_the_own_data_examples_write_their_files_and_train(tmp_path, folder, script, plan, epochs, floor):
    import shutil
    import subprocess
    import sys

    work = tmp_path / folder
    shutil.copytree(EXAMPLES / folder, work, ignore=shutil.ignore_patterns("*.csv", "data"))
    subprocess.run([sys.executable, str(work / script)], check=True, capture_output=True)
    res = splitlearn.train(work / plan, epochs=epochs)
    assert res["metrics"]["test_accuracy"] > floor
    if folder == "clinics":  # 25 and 12 patients missing at two clinics (possibly the same ones)
        kept = {v["aligned"] for v in res["alignment"]["parties"].values()}
        assert len(kept) == 1 and 569 - 37 <= kept.pop() <= 569 - 25
