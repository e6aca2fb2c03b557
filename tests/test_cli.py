"""The command line: run writes the results contract, inspect flags label wires, predict delivers."""

import json

from typer.testing import CliRunner

from splitlearn.cli import app

from .conftest import EXAMPLES
from .support import split_mlp, toml

runner = CliRunner()


def test_run_in_process_writes_the_results_contract(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--in-process", "--epochs", "2", "--seed", "3",
                            "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and "hospital" in r.output
    res = json.loads((out / "result.json").read_text())
    assert res["plan"] == "vanilla" and res["epochs"] == 2 and res["seed"] == 3
    assert 0.0 <= res["metrics"]["test_accuracy"] <= 1.0 and len(res["metrics"]["train_loss"]) == 2
    assert {(w["name"], w["carries"]) for w in res["wires"]} == {("bottom->top", "activation"), ("hospital.y->digit", "label")}
    for p in ("hospital", "server"):
        assert {"bytes_sent", "bytes_received", "flops", "compute_s", "wait_s"} <= set(res["parties"][p])
    assert res["parties"]["hospital"]["bytes_sent"] == res["parties"]["server"]["bytes_received"]
    assert (out / "parties" / "hospital" / "weights.safetensors").is_file()
    assert (out / "parties" / "server" / "weights.safetensors").is_file()


def test_predict_delivers_to_the_head_owner_only(tmp_path):
    out = tmp_path / "u"
    assert runner.invoke(app, ["run", str(EXAMPLES / "u_shaped.toml"), "--in-process", "--epochs", "3", "--out", str(out),
                               "-q"]).exit_code == 0
    r = runner.invoke(app, ["predict", str(out)])
    assert r.exit_code == 0, r.output
    preds = (out / "parties" / "hospital" / "predictions.csv").read_text().splitlines()
    assert preds[0] == "id,digit," + ",".join(f"digit_p{c}" for c in range(10)) and len(preds) == 1 + 359
    assert not (out / "parties" / "server" / "predictions.csv").exists()
    # the predictions are those of the trained model: most match the labels
    from sklearn.datasets import load_digits

    y = load_digits().target
    right = sum(int(line.split(",")[1]) == y[int(line.split(",")[0])] for line in preds[1:])
    assert right / 359 >= 0.9


def test_predict_on_new_csv_rows(tmp_path):
    out = tmp_path / "v"
    assert runner.invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--in-process", "--epochs", "2", "--out", str(out),
                               "-q"]).exit_code == 0
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = ["id," + ",".join(f"p{i}" for i in range(64))]
    rows += [f"{1000 + i}," + ",".join(str(v / 16) for v in d.data[i]) for i in range(20)]
    csv = tmp_path / "new.csv"
    csv.write_text("\n".join(rows) + "\n")
    r = runner.invoke(app, ["predict", str(out), "--data", str(csv)])
    assert r.exit_code == 0, r.output
    lines = (out / "parties" / "server" / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("id,digit,digit_p0,") and [int(x.split(",")[0]) for x in lines[1:]] == list(range(1000, 1020))


def test_inspect_flags_label_wires_and_draws(tmp_path):
    png = tmp_path / "t.png"
    r = runner.invoke(app, ["inspect", str(EXAMPLES / "vanilla.toml"), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert "label wires: hospital.y->digit (labels of hospital travel to server)" in r.output
    assert "bottom->top: float32 [batch, 128]" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(app, ["inspect", str(EXAMPLES / "u_shaped.toml"), "--png", str(tmp_path / "u.png")])
    assert "no wire carries labels" in r.output


def test_bad_plan_is_a_clear_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "vanilla.toml").read_text().replace('inputs = ["bottom"]', 'inputs = ["botom"]'))
    r = runner.invoke(app, ["run", str(bad), "--in-process", "-q"])
    assert r.exit_code == 2
    assert "unknown segment 'botom'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()


def test_cost_command_prints_ours_beside_the_seed():
    r = runner.invoke(app, ["cost", "--model", "vgg16", "--dataset", "cifar10", "--clients", "100,500", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert 0.1548 / 29.4 / 1.5 < res["split_over_fedavg_flops"]["100"] < 0.1548 / 29.4 * 1.5  # the seed's ratio
    split = {row["clients"]: row for row in res["rows"] if row["method"] == "split"}
    assert abs(split[100]["gb"] / split[500]["gb"] - 5.0) < 0.01
    assert res["assumptions"]
    bad = runner.invoke(app, ["cost", "--clients", "ten"])
    assert bad.exit_code == 2 and "expected positive integers" in bad.output


def test_predict_with_damaged_weights_is_a_clear_error(tmp_path):
    out = tmp_path / "v"
    assert runner.invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--in-process", "--epochs", "1", "--out", str(out),
                               "-q"]).exit_code == 0
    (out / "parties" / "server" / "weights.safetensors").write_bytes(b"not safetensors")
    r = runner.invoke(app, ["predict", str(out)])
    assert r.exit_code == 2 and "not a readable safetensors file" in r.output and "Traceback" not in r.output


def test_plan_json_records_absolute_data_paths(tmp_path, monkeypatch):
    csv = tmp_path / "plans" / "rows.csv"
    csv.parent.mkdir()
    csv.write_text("id,a,b,y\n" + "".join(f"{i},{i % 3},{i % 5},{i % 2}\n" for i in range(60)))
    plan = tmp_path / "plans" / "p.toml"
    plan.write_text(toml(split_mlp("p", [2, 4, 2], holder="a", server="b", loss="y", train={"epochs": 1},
                                   data={"dataset": "csv", "path": "rows.csv", "id_column": "id", "label_column": "y"})))
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(plan), "--in-process", "--out", str(out), "-q"]).exit_code == 0
    assert json.loads((out / "plan.json").read_text())["data"]["path"] == str(csv)
    monkeypatch.chdir(tmp_path)  # elsewhere: predict still finds the rows
    r = runner.invoke(app, ["predict", str(out)])
    assert r.exit_code == 0, r.output


def test_compare_writes_a_result_per_method_the_table_and_both_pictures(tmp_path):
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["compare", str(EXAMPLES / "sequential.toml"), "--clients", "2", "--epochs", "1",
                            "--methods", "sequential,fedavg,centralized", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for m in ("sequential", "fedavg", "centralized"):
        assert "test_accuracy" in json.loads((out / m / "result.json").read_text())["metrics"]
    table = json.loads((out / "compare.json").read_text())
    rows = {row["method"]: row for row in table["rows"]}
    assert rows["sequential"]["per_client_tflops"] < rows["fedavg"]["per_client_tflops"]  # a third of the model
    assert (out / "accuracy_vs_computation.png").stat().st_size > 10_000
    assert (out / "bytes_per_client.png").stat().st_size > 5_000
    assert "| sequential | 2 |" in (out / "compare.md").read_text()
    bad = runner.invoke(app, ["compare", str(EXAMPLES / "sequential.toml"), "--methods", "sequential,magic"])
    assert bad.exit_code == 2 and "magic" in bad.output


def test_certs_for_a_plan_with_clients_covers_every_client(tmp_path):
    r = runner.invoke(app, ["certs", str(EXAMPLES / "sequential.toml"), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert {p.stem for p in tmp_path.glob("*.pem")} >= {"ca", "server", "hospital-1", "hospital-10"}
