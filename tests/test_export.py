"""splitlearn export: every party's segments of every example plan as ONNX files that onnxruntime runs to torch's
outputs (within 1e-5), a trained run's with its standardisation folded in (equal to predict), the manifest, the
command, and the refusals."""

import hashlib
import json
import runpy
import shutil
import tomllib

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")

from typer.testing import CliRunner  # noqa: E402

import splitlearn  # noqa: E402
from splitlearn.cli import app  # noqa: E402
from splitlearn.core.dryrun import merge_inputs  # noqa: E402
from splitlearn.core.graph import build_graph  # noqa: E402
from splitlearn.core.specs import DataSpec, PlanError  # noqa: E402
from splitlearn.launch.results import load_preprocess, load_weights  # noqa: E402
from splitlearn.models import build_segment  # noqa: E402
from splitlearn.run.setup import prepare  # noqa: E402
from splitlearn.tools.export import export_party, export_plan  # noqa: E402

from .conftest import EXAMPLES  # noqa: E402

runner = CliRunner()
MADE = {"clinics/clinics.toml": "make_clinics.py", "diabetes/diabetes.toml": "make_diabetes.py",
        "hospitals/hospitals.toml": "make_images.py"}  # their data written by the example's own script, in tmp
SKIPPED = {name: "needs examples/notes/make_notes.py's corpus and base model (6 s at --small); the transformers "
           "path is exported and checked on a tiny Llama below" for name in ("notes/classify.toml", "notes/lm.toml")}
NAMES = sorted(p.name for p in EXAMPLES.glob("*.toml")) + sorted(MADE) + sorted(SKIPPED)
PLANS = [pytest.param(n, marks=pytest.mark.skip(reason=SKIPPED[n])) if n in SKIPPED else n for n in NAMES]


def test_every_example_plan_is_exported_made_or_skipped_with_its_reason():
    assert sorted(NAMES) == sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.toml"))


def _reference(graph, modules, inputs, rows):
    """Every node's value in torch on ``rows`` of each input (the segments in eval mode)."""
    values = {k: v[rows] for k, v in inputs.items()}
    with torch.no_grad():
        for n in graph.order:
            node = graph.nodes[n]
            if node.kind == "segment":
                values[n] = merge_inputs(node.merge or graph.plan.segments[n].merge, modules[n].eval(),
                                         [values[d] for d in node.inputs])
            elif node.kind == "output":
                values[n] = node.pick(values[node.inputs[0]])
    for seg, spec in graph.plan.segments.items():  # elements no node reads (the server's mask back) too
        for i, name in enumerate(spec.output_names):
            values[f"{seg}:{name}"] = values[seg][i]
    return values


def _run(folder, entry, feed):
    session = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
    names = [o["name"] for o in entry["outputs"]]
    return dict(zip(names, session.run(names, {k: np.asarray(v) for k, v in feed.items()})))


def _exports_match_torch(tmp_path, plan_path):
    plan, setups, _ = prepare(plan_path, check_only=True)
    graph = build_graph(plan)
    modules = {k: m for s in setups.values() for k, m in s.modules.items()}
    inputs = {k: v for s in setups.values() for k, v in s.inputs.items()}
    rows = torch.arange(5)
    want = _reference(graph, modules, inputs, rows)
    exported = []
    for party, setup in setups.items():
        if not setup.modules:
            continue
        out = tmp_path / party
        files = export_plan(plan, party, out, modules=modules, sample=inputs, preprocess=setup.preprocess)
        manifest = json.loads((out / "manifest.json").read_text())
        assert [f.name for f in files] == [*manifest["files"], "manifest.json"]
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        for entry in manifest["segments"]:
            feed = {}
            for i in entry["inputs"]:
                assert i["shape"][0] == "batch"
                if i.get("preprocess", "").startswith("folded"):  # raw rows in, standardised by the graph
                    src = i["from"]
                    cols = tuple(src["columns"]) if "columns" in src else None
                    feed[i["name"]] = setup.table.select(src["field"], cols)[rows.numpy()].astype(np.float32)
                else:
                    feed[i["name"]] = want[i["name"]].numpy()
            for name, got in _run(out, entry, feed).items():
                assert got.shape == tuple(want[name].shape), name
                assert np.abs(got - want[name].numpy()).max() <= 1e-5, (party, name)
            exported.append(entry["segment"])
    assert sorted(exported) == sorted(plan.segments)  # every segment, at its party
    return plan, setups


@pytest.mark.parametrize("name", PLANS)
def test_every_party_of_every_example_exports_and_onnxruntime_matches_torch(tmp_path, name):
    path = EXAMPLES / name
    if name in MADE:  # the example with its files written by its own script, in a copy
        work = tmp_path / "example"
        shutil.copytree(path.parent, work, ignore=shutil.ignore_patterns("*.csv", "data"))
        runpy.run_path(str(work / MADE[name]), run_name="__main__")
        path = work / path.name
    plan, setups = _exports_match_torch(tmp_path / "out", path)
    standardised = [p for p, s in setups.items() if s.modules and s.preprocess is not None and s.preprocess.stats]
    if name in MADE:  # their parties standardise (or normalise) their own rows: folded in, checked above on raw rows
        assert standardised
        for p in standardised:
            manifest = json.loads((tmp_path / "out" / p / "manifest.json").read_text())
            assert manifest["preprocess"] and all(v["folded"] for v in manifest["preprocess"].values())


def test_a_transformers_u_shape_exports_and_matches_torch_on_notes_of_other_lengths(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the llm extra (transformers) is not installed")
    pytest.importorskip("peft", reason="the llm extra (peft) is not installed")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, num_labels=3)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "lm")
    g = np.random.default_rng(0)
    lengths = g.integers(2, 11, 24)
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int64)
    ids = g.integers(1, 40, (24, 10)) * mask
    out = [{"name": "hidden", "vary": {1: 10}}, {"name": "mask", "vary": {1: 10}}]
    adapters = {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    plan = {"name": "tiny-notes", "data": DataSpec.of_arrays({"input_ids": ids, "attention_mask": mask, "y": ids[:, 0] % 3}),
            "train": {"epochs": 1, "batch_size": 8, "seed": 0},
            "parties": {"hospital": {"holds": {"input_ids": "input_ids", "attention_mask": "attention_mask", "y": "y"}},
                        "server": {}},
            "networks": {"lm": {"hf": {"folder": str(tmp_path / "lm"), "task": "classification"}}},
            "segments": {"bottom": {"party": "hospital", "network": "lm", "merge": "module", "cut": "model.layers.0",
                                    "inputs": ["hospital.input_ids", "hospital.attention_mask"], "outputs": out, **adapters},
                         "middle": {"party": "server", "network": "lm", "inputs": ["bottom"], "cut": "model.layers.1",
                                    "outputs": out, **adapters},
                         "top": {"party": "hospital", "network": "lm", "merge": "module",
                                 "inputs": ["middle:hidden", "hospital.attention_mask"], **adapters}},
            "losses": {"task": {"input": "top", "target": "hospital.y"}}}
    assert lengths[:5].max() < 10  # the rows compared are shorter than those the graphs were traced on
    _exports_match_torch(tmp_path / "out", plan)
    manifest = json.loads((tmp_path / "out" / "server" / "manifest.json").read_text())
    (middle,) = manifest["segments"]
    assert [(i["name"], i["shape"], i["from"]["kind"]) for i in middle["inputs"]] == [
        ("bottom:hidden", ["batch", "length", 16], "received"), ("bottom:mask", ["batch", "length"], "received")]
    assert [(o["name"], [t["party"] for t in o["to"]]) for o in middle["outputs"]] == [
        ("middle:hidden", ["hospital"]), ("middle:mask", [])]


# -- a trained run -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The vanilla example on the digits' raw pixel counts (0..16), standardised by the hospital, trained 1 epoch."""
    from sklearn.datasets import load_digits

    work = tmp_path_factory.mktemp("trained")
    d = load_digits()
    np.savez(work / "digits.npz", x=d.data.astype(np.float32), y=d.target.astype(np.int64))
    body = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    body["data"] = {"dataset": "npz", "path": str(work / "digits.npz"), "options": {"standardize": True}}
    splitlearn.train(body, epochs=1, out=work / "run")
    return work / "run", d.data.astype(np.float32)


def test_a_trained_run_exports_with_its_standardisation_folded_in_and_equals_predict(trained):
    run, x = trained
    export_party(run, "hospital")
    export_party(run, "server")
    bottom_dir, top_dir = run / "export" / "hospital", run / "export" / "server"
    (bottom,) = json.loads((bottom_dir / "manifest.json").read_text())["segments"]
    (top,) = json.loads((top_dir / "manifest.json").read_text())["segments"]
    assert bottom["inputs"][0]["preprocess"] == "folded into the graph: give raw rows"
    assert bottom["outputs"][0]["to"] == [{"party": "server", "wire": "bottom->top", "codec": "float32"}]
    assert top["inputs"][0]["from"] == {"kind": "received", "party": "hospital", "segment": "bottom",
                                        "wire": "bottom->top"}
    assert top["outputs"][0]["losses"] == ["digit"]
    predicted = splitlearn.predict(run, write=False)["digit"]
    raw = x[predicted["ids"]]  # the run's test rows, as the hospital holds them
    activation = _run(bottom_dir, bottom, {"hospital.x": raw})["bottom"]
    logits = _run(top_dir, top, {"bottom": activation})["top"]
    assert np.abs(logits - predicted["outputs"].numpy()).max() <= 1e-5
    plan = splitlearn.load_plan(json.loads((run / "plan.json").read_text()))
    module = build_segment(plan, "bottom")
    load_weights(run / "parties" / "hospital" / "weights.safetensors", {"bottom": module})
    mean, std = load_preprocess(run / "parties" / "hospital" / "preprocess.safetensors").stats["x"]
    assert (std != 1).any() and (mean != 0).any()  # a standardisation that changes the rows
    with torch.no_grad():
        torch_bottom = module.eval()(torch.from_numpy((raw - mean) / std)).numpy()
    assert np.abs(activation - torch_bottom).max() <= 1e-5


def test_without_folding_the_standardisation_is_saved_beside_the_graph(trained, tmp_path):
    run, x = trained
    files = export_party(run, "hospital", tmp_path / "raw", fold=False)
    assert sorted(f.name for f in files) == ["bottom.onnx", "manifest.json", "preprocess.json"]
    saved = json.loads((tmp_path / "raw" / "preprocess.json").read_text())["inputs"]["hospital.x"]
    mean, std = np.asarray(saved["mean"], np.float32), np.asarray(saved["std"], np.float32)
    (entry,) = json.loads((tmp_path / "raw" / "manifest.json").read_text())["segments"]
    assert entry["inputs"][0]["preprocess"] == "not folded: standardise the rows first (preprocess.json)"
    unfolded = _run(tmp_path / "raw", entry, {"hospital.x": (x[:7] - mean) / std})["bottom"]
    export_party(run, "hospital", tmp_path / "folded")
    (folded,) = json.loads((tmp_path / "folded" / "manifest.json").read_text())["segments"]
    assert np.abs(unfolded - _run(tmp_path / "folded", folded, {"hospital.x": x[:7]})["bottom"]).max() <= 1e-5
    module = build_segment(splitlearn.load_plan(json.loads((run / "plan.json").read_text())), "bottom")
    load_weights(run / "parties" / "hospital" / "weights.safetensors", {"bottom": module})
    with torch.no_grad():
        assert np.abs(unfolded - module.eval()(torch.from_numpy((x[:7] - mean) / std)).numpy()).max() <= 1e-5


def test_the_command_writes_the_files_and_manifest_and_refuses_to_overwrite_without_force(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "cli"
    r = runner.invoke(app, ["export", str(run), "--party", "server", "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "top.onnx"]
    assert f"wrote {out / 'top.onnx'}" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["party"], manifest["exporter"]["opset"], manifest["source"]["run"]) == ("server", 17, str(run.resolve()))
    r = runner.invoke(app, ["export", str(run), "--party", "server", "--out", str(out)])
    assert r.exit_code == 2 and "already holds files" in r.output and "--force" in r.output
    r = runner.invoke(app, ["export", str(run), "--party", "server", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["--party", "hopsital"], "the plan has no party 'hopsital'"),
    (["--party", "server", "--format", "tflite"], "no export format 'tflite'"),
])
def test_the_command_names_a_wrong_party_or_format(trained, args, message):
    r = runner.invoke(app, ["export", str(trained[0]), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_a_party_without_segments_is_refused_naming_what_can_be_exported(tmp_path):
    with pytest.raises(PlanError) as e:
        export_plan(EXAMPLES / "registry.toml", "registry", tmp_path)
    assert "party 'registry' runs no segment" in str(e.value) and "['hospital', 'server']" in str(e.value)
    assert not any(tmp_path.iterdir())


class Svd(torch.nn.Module):  # an op ONNX has no equivalent of at opset 17
    def forward(self, x):
        return torch.linalg.svdvals(x.reshape(len(x), 8, 8))


class Branchy(torch.nn.Module):  # Python branching on the batch size: traced on 2 rows, another value on others
    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x


class FixedSize(torch.nn.Module):  # a size read as a Python int: fixed at the traced batch
    def forward(self, x):
        return x.reshape(int(len(x)), 8, 8).sum(1)


@pytest.mark.parametrize("net, width, message", [
    (Svd(), 8, "cannot be exported to ONNX: "),
    (Branchy(), 64, "its ONNX graph gives other values than torch on 3 rows"),
    (FixedSize(), 8, "its ONNX graph fails on 3 rows (it was traced on 2)"),
])
def test_a_segment_the_exporter_refuses_or_gets_wrong_is_named_and_nothing_is_written(tmp_path, net, width, message):
    plan = {"name": "odd", "data": {"dataset": "digits"}, "train": {"epochs": 1, "batch_size": 8, "seed": 0},
            "parties": {"hospital": {"holds": {"x": "x", "y": "y"}}, "server": {}},
            "networks": {"odd": net, "head": torch.nn.Linear(width, 10)},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "odd"},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "head"}},
            "losses": {"digit": {"input": "top", "target": "hospital.y"}}}
    with pytest.raises(PlanError) as e:
        export_plan(plan, "hospital", tmp_path / "out")
    assert "segment 'bottom' (party 'hospital')" in str(e.value) and "entry 'segments.bottom'" in str(e.value)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()
    assert [f.name for f in export_plan(plan, "server", tmp_path / "server")] == ["top.onnx", "manifest.json"]


def test_an_onnx_bottom_sends_its_activation_over_the_authenticated_wire_to_the_servers_top(trained, tmp_path):
    """docs/serving.md: the hospital runs its exported bottom in onnxruntime and hands the activation to a
    ``Stage`` without a module (it passes its input on), over gRPC with mutual TLS; the server's ``Stage`` runs
    its trained top on what arrives (checked, metered): the predictions are ``splitlearn.predict``'s."""
    from splitlearn import Stage
    from splitlearn.wire.transport.tls import make_certs

    from .support import grpc_chain, in_threads

    run, x = trained
    folder = tmp_path / "hospital"
    export_party(run, "hospital", folder)
    (bottom,) = json.loads((folder / "manifest.json").read_text())["segments"]
    predicted = splitlearn.predict(run, write=False)["digit"]
    activation = _run(folder, bottom, {"hospital.x": x[predicted["ids"]]})["bottom"]  # the hospital's raw rows
    plan = splitlearn.load_plan(json.loads((run / "plan.json").read_text()))
    top = build_segment(plan, "top")
    load_weights(run / "parties" / "server" / "weights.safetensors", {"top": top})
    make_certs(["hospital", "server"], tmp_path / "certs")
    hospital, server = grpc_chain(tmp_path / "certs", ["server", "hospital"])[::-1]

    def send():
        with torch.no_grad(), Stage(None, hospital, next="server") as stage:
            stage.forward(torch.from_numpy(activation))
            return stage.meter.bytes_sent

    def serve():
        with torch.no_grad(), Stage(top.eval(), server, previous="hospital") as stage:
            return stage.forward()

    try:
        sent, logits = in_threads(send, serve)
    finally:
        hospital.close()
        server.close()
    assert sent >= activation.nbytes  # the activation itself crossed, float32
    assert torch.allclose(logits, predicted["outputs"], atol=1e-5)
    assert logits.argmax(1).tolist() == predicted["predictions"]
