"""Export a party's segments for serving outside splitlearn: one ONNX file per segment and a manifest.

``SEGMENT.onnx`` takes inputs named after what feeds them (a data field ``clinic_a.x``, or the segment whose tensor
it receives, ``bottom`` or ``bottom:hidden``) and gives outputs named after the segment or its elements; the batch
(and a sequence length where one varies) is dynamic. The party's preprocessing (``(value - mean) / std`` fitted on
its training rows, ``data/preprocess.py``) is folded in as the graph's first operations where a segment reads the
party's own data; where it cannot be (or ``fold=False``) it is saved beside it as ``preprocess.json``, and
``manifest.json`` says which, with each file's inputs and outputs, where each comes from and goes, and its sha256.

The exporter is torch's TorchScript-based one (``dynamo=False``): plain networks, torch.fx pieces and transformers
pieces alike, about 0.1 s a small segment; the torch.export-based one (``dynamo=True``) took 20 to 30 times longer
and refused the transformers pieces. Each graph is checked before it is written, onnxruntime against torch on rows
of another batch size (and sequence length) than those traced; what the exporter refuses or gets wrong is a
PlanError naming the segment."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..clients.results import predicting_plan
from ..core.defense import active
from ..core.dryrun import forward, merge_inputs
from ..core.graph import Graph, build_graph
from ..core.load import load_plan
from ..core.plan import Plan
from ..core.specs import PlanError
from ..data.preprocess import TARGET, Preprocess, TargetScale
from ..data.text import TEXT_FIELDS
from ..launch.results import load_preprocess, load_run_plan, load_weights, write_json
from ..models.build import build_segment

__all__ = ["export_party", "export_plan", "FORMATS", "OPSET", "TOLERANCE"]

FORMATS = ("onnx",)
OPSET = 17  # LayerNormalization and the ops of common networks; read by onnxruntime 1.12 and later
TOLERANCE = 1e-4  # the check before writing: |onnxruntime - torch| <= TOLERANCE * max(1, |torch|)
_RULE = "(value - mean) / std, elementwise in float32, on each row before it enters the graph"


def export_party(run_dir: str | Path, party: str, out: str | Path | None = None, format: str = "onnx", *,
                 fold: bool = True, force: bool = False) -> list[Path]:
    """Export ``party``'s trained segments from a run folder (``splitlearn run --out``) to ``out`` (default
    ``RUN_DIR/export/PARTY``): one ``SEGMENT.onnx`` each, ``manifest.json`` and, where the preprocessing is not
    folded in (``fold=False``), ``preprocess.json``. The shapes of what the party reads come from the data schema
    the run recorded (``result.json``); its weights and preprocessing from ``parties/PARTY/``. A folder that holds
    files is not written over without ``force``. Returns the files written; PlanError for what cannot be exported."""
    run_dir = Path(run_dir)
    _check_format(format)
    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    try:
        plan, _ = predicting_plan(load_run_plan(run_dir))  # a [clients] run: its one model, between plan parties
        graph = build_graph(plan)
        mine = _segments(graph, party)
    except PlanError as e:
        raise e.in_file(e.file or run_dir) from None
    weights = run_dir / "parties" / party / "weights.safetensors"
    if not weights.is_file():
        raise PlanError(f"no weights for party {party!r} at {weights}", file=run_dir,
                        hint="export from the run folder its training wrote (--out)")
    needed = _upstream(graph, mine)
    modules = {s: build_segment(plan, s) for s in graph.order if s in needed and graph.nodes[s].kind == "segment"}
    try:
        load_weights(weights, {s: modules[s] for s in mine})
        saved = {p: load_preprocess(run_dir / "parties" / p / "preprocess.safetensors") for p in plan.parties}
    except ValueError as e:
        raise PlanError(str(e), file=run_dir, hint="export from the run folder the weights came from") from None
    fields = _recorded_fields(run_dir, graph, needed)
    source = {"run": str(run_dir.resolve()), "weights": str(weights.resolve()), "weights_sha256": _sha256(weights)}
    try:
        return _export(graph, party, modules, fields, Path(out) if out else run_dir / "export" / party,
                       {p: v for p, v in saved.items() if v is not None}, fold=fold, force=force, source=source)
    except PlanError as e:
        raise e.in_file(e.file or run_dir) from None


def export_plan(plan: Plan | str | Path, party: str, out: str | Path, *, modules: dict[str, nn.Module] | None = None,
                preprocess: Preprocess | None = None, sample: dict[str, Any] | None = None, fold: bool = True,
                force: bool = False, format: str = "onnx") -> list[Path]:
    """:func:`export_party` from a plan instead of a run folder: ``modules`` (segment -> module) are the weights
    (those missing are built from the plan: its initial weights); ``sample`` maps input nodes (``party.field``) to
    rows as the segments take them (a tensor or a text field's rows), whose dtypes and row shapes the graphs take;
    ``preprocess`` is the party's. Without ``sample`` every party's data is read and the preprocessing fitted on
    the training rows, as training does."""
    _check_format(format)
    source_plan, given_modules = load_plan(plan), modules is not None
    plan, _ = predicting_plan(source_plan)
    graph = build_graph(plan)
    mine = _segments(graph, party)
    needed = _upstream(graph, mine)
    if sample is None:
        from ..run.setup import prepare

        _, setups, _ = prepare(source_plan, check_only=True)
        sample = {k: v for s in setups.values() for k, v in s.inputs.items()}
        modules = {**{k: m for s in setups.values() for k, m in s.modules.items()}, **(modules or {})}
        if preprocess is None and party in setups:
            preprocess = setups[party].preprocess
    given = modules or {}
    built = {s: given[s] if s in given else build_segment(plan, s) for s in graph.order
             if s in needed and graph.nodes[s].kind == "segment"}
    fields = {}
    for node in needed:
        if graph.nodes[node].kind == "input":
            if node not in sample:
                raise PlanError(f"the sample has no rows of {node!r}, which the segments of {party!r} read (through "
                                "the segments before them)", entry="sample", hint="give rows of every input node")
            value = sample[node]
            fields[node] = (str(value.dtype).removeprefix("torch."), tuple(value.shape[1:]))
    source = {"plan": plan.name, "weights": "given in Python" if given_modules else "the plan's initial weights"}
    try:
        return _export(graph, party, built, fields, Path(out), {party: preprocess} if preprocess is not None else {},
                       fold=fold, force=force, source=source)
    except PlanError as e:
        raise e.in_file(e.file or source_plan._source) from None


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise PlanError(f"no export format {format!r}", entry="--format", hint=f"choose one of {list(FORMATS)}")
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]  # writer, and checker
    if missing:
        raise PlanError(f"exporting to ONNX needs the onnx and onnxruntime packages (missing: {missing})",
                        entry="--format", hint="pip install 'splitlearn[onnx]'")


def _segments(graph: Graph, party: str) -> list[str]:
    """The party's segments in graph order; a PlanError for a party that is none of the plan's or runs none."""
    plan = graph.plan
    running = sorted({graph.nodes[n].party for n in graph.order if graph.nodes[n].kind == "segment"})
    if party not in plan.parties:
        raise PlanError(f"the plan has no party {party!r} (its parties: {sorted(plan.parties)})", entry="--party",
                        hint=f"name a party that runs segments: {running}")
    mine = [n for n in graph.local_order(party) if graph.nodes[n].kind == "segment"]
    if not mine:
        holds = sorted(plan.parties[party].holds)
        raise PlanError(f"party {party!r} runs no segment, so it has nothing to export (it holds {holds})",
                        entry="--party", hint=f"name a party that runs segments: {running}")
    return mine


def _upstream(graph: Graph, segments: list[str]) -> set[str]:
    """The nodes the segments are computed from, at any party (inputs, segments, outputs), themselves included."""
    seen, todo = set(), list(segments)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += graph.nodes[n].inputs
    return seen


def _recorded_fields(run_dir: Path, graph: Graph, needed: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each needed input node's dtype and row shape from the data schema the run recorded (``result.json``, or the
    party's own ``report.json`` on a machine of its own)."""
    entries: dict[str, dict] = {}
    for path in [run_dir / "result.json", *sorted((run_dir / "parties").glob("*/report.json"))]:
        try:
            body = json.loads(path.read_text())
            parties = body.get("parties") if path.name == "result.json" else {body.get("name"): body}
        except (OSError, ValueError, AttributeError):  # none, or no JSON object
            continue
        for name, entry in (parties or {}).items() if isinstance(parties, dict) else ():
            schema = ((entry or {}).get("data") or {}).get("schema") if isinstance(entry, dict) else None
            if isinstance(schema, dict) and schema:
                entries.setdefault(str(entry.get("plays") or name), schema)
    out = {}
    for node in sorted(n for n in needed if graph.nodes[n].kind == "input"):
        party, local = node.split(".", 1)
        field = (entries.get(party) or {}).get(local)
        if not (isinstance(field, dict) and isinstance(field.get("dtype"), str) and isinstance(field.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in field["shape"])):
            raise PlanError(f"the run records no dtype and shape of {node!r} (the data schema of party {party!r} in "
                            "result.json), and the exported graphs need them", file=run_dir,
                            hint="export from the folder of a finished 'splitlearn run' (it writes result.json)")
        out[node] = (field["dtype"], tuple(field["shape"]))
    return out


def _synthetic(graph: Graph, fields: dict[str, tuple[str, tuple[int, ...]]], rows: int, shorter: int,
               seed: int) -> dict[str, torch.Tensor]:
    """Rows shaped as ``fields`` say: floats drawn from a normal, integers 1; text fields ``shorter`` than their
    width (at least 1), the attention mask right-padded (each row after the first one token shorter)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node, (dtype, shape) in fields.items():
        kind = getattr(torch, dtype, None)
        if not isinstance(kind, torch.dtype):
            raise PlanError(f"input {node!r} has dtype {dtype!r}, which is no torch dtype", entry=f"parties."
                            f"{node.split('.')[0]}.holds", hint="give the field numbers (floats or integers)")
        (party, local), shape = node.split(".", 1), list(shape)
        text = bool(shape) and graph.plan.parties[party].holds[local].field in TEXT_FIELDS
        if text:
            shape[0] = max(1, shape[0] - shorter)
        if kind.is_floating_point:
            out[node] = torch.randn(rows, *shape, generator=g).to(kind)
        elif text and node.endswith(".attention_mask"):
            lengths = torch.clamp(shape[0] - torch.arange(rows), min=1)
            out[node] = (torch.arange(shape[0])[None] < lengths[:, None]).to(kind)
        else:
            out[node] = torch.ones(rows, *shape, dtype=kind)
    return out


def _forward(graph: Graph, modules: dict[str, nn.Module], values: dict[str, Any], needed: set[str]) -> dict[str, Any]:
    """Every needed node's value from the input nodes' ``values`` (no gradients; a segment that fails is named)."""
    def guard(node, xs, run):
        try:
            return run()
        except Exception as e:  # noqa: BLE001 - the user's module
            came = ", ".join(f"{d} {list(x.shape)}" for d, x in zip(node.inputs, xs))
            raise PlanError(f"segment {node.name!r} (party {node.party!r}) cannot run on rows shaped as the run's "
                            f"({came}): {type(e).__name__}: {e}", entry=f"segments.{node.name}",
                            hint="export with the plan the weights were trained with") from None

    return forward(graph, modules, values, needed, guard)


class _Serving(nn.Module):
    """A segment as it serves: its distinct inputs in, the preprocessing first where folded, its merge, and each
    element of a tuple or dict output as an output of its own."""

    def __init__(self, module: nn.Module, merge: str, inputs: list[str], order: list[str],
                 folded: dict[str, tuple[np.ndarray, np.ndarray]], outputs: list[str]):
        super().__init__()
        self.module, self.merge, self.inputs, self.order, self.outputs = module, merge, inputs, order, outputs
        self.folded = list(folded)
        for i, (mean, std) in enumerate(folded.values()):
            self.register_buffer(f"mean{i}", torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
            self.register_buffer(f"std{i}", torch.from_numpy(np.ascontiguousarray(std, dtype=np.float32)))

    def forward(self, *args: torch.Tensor) -> Any:
        given = dict(zip(self.order, args))
        for i, name in enumerate(self.folded):
            given[name] = (given[name] - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
        value = merge_inputs(self.merge, self.module, [given[d] for d in self.inputs])
        if isinstance(value, dict):
            return tuple(value[k.split(":", 1)[1]] for k in self.outputs)
        return tuple(value) if isinstance(value, (tuple, list)) else value


def _stats(graph: Graph, node: str, pre: Preprocess, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The preprocessing of a data input shaped like one of its rows (``shape``): its field's, its columns picked;
    a flattened image (``x`` from ``image``) takes each channel's over that channel's values. None without."""
    party, local = node.split(".", 1)
    ref = graph.plan.parties[party].holds[local]
    stats = {k: v for k, v in pre.stats.items() if not k.startswith(TARGET)}
    if ref.field in stats:
        mean, std = stats[ref.field]
        if ref.columns is not None and mean.ndim == 1:
            mean, std = mean[ref.columns[0]:ref.columns[1]], std[ref.columns[0]:ref.columns[1]]
    elif ref.field == "x" and "image" in stats:  # x is the normalised image, flattened (data/preprocess.py)
        mean, std = stats["image"]
        channels, width = mean.shape[0], (shape[0] if len(shape) == 1 else 0)
        if width % channels:
            return mean, std  # found unfoldable by the caller: the shapes do not broadcast
        mean, std = (np.repeat(v.reshape(channels), width // channels) for v in (mean, std))
        if ref.columns is not None:
            mean, std = mean[ref.columns[0]:ref.columns[1]], std[ref.columns[0]:ref.columns[1]]
    else:
        return None
    return mean.astype(np.float32), std.astype(np.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_out(out: Path, force: bool, clear: bool) -> None:
    """A new or empty folder; one that holds files only with ``force``, and (``clear``) then an earlier export's
    files removed (those its manifest lists, and the manifest), anything else left alone."""
    if out.is_file():
        raise PlanError(f"--out {out} is a file; give a folder", entry="--out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise PlanError(f"--out {out} already holds files (an earlier export?): give --force to replace that "
                            "export, or another --out", entry="--out")
        try:
            old = json.loads((out / "manifest.json").read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            old = {}
        for name in [*(old if isinstance(old, dict) else {}), "manifest.json"]:
            target = out / str(name)
            if clear and target.parent == out and target.is_file():
                target.unlink()
    if clear:
        out.mkdir(parents=True, exist_ok=True)


def _dim(d: int) -> str:
    """The name of a dynamic dimension: ``batch`` (0), ``length`` (1, a sequence's), ``size<d>``."""
    return "batch" if d == 0 else "length" if d == 1 else f"size{d}"


def _shape(shape: tuple[int, ...], varying: set[int]) -> list[Any]:
    return ["batch", *(_dim(d) if d in varying else n for d, n in enumerate(shape[1:], 1))]


def _export(graph: Graph, party: str, modules: dict[str, nn.Module], fields: dict[str, tuple[str, tuple[int, ...]]],
            out: Path, saved: dict[str, Preprocess], *, fold: bool, force: bool, source: dict) -> list[Path]:
    """Export ``party``'s segments (``modules`` holds them and every segment before them) to ``out``."""
    import onnxruntime as ort

    plan, pre = graph.plan, saved.get(party)
    mine = _segments(graph, party)
    needed = _upstream(graph, mine)
    modules = {k: (copy.deepcopy(m).cpu() if any(p.device.type != "cpu" for p in m.parameters()) else m)
               for k, m in modules.items()}
    _prepare_out(out, force, clear=False)  # (before the work: an export is not written over without force)
    modes = {k: m.training for k, m in modules.items()}
    for m in modules.values():
        m.eval()
    try:
        traced = _forward(graph, modules, _synthetic(graph, fields, 2, 0, seed=0), needed)
        checked = _forward(graph, modules, _synthetic(graph, fields, 3, 1, seed=1), needed)
        for values in (traced, checked):  # every element of the party's segments, read by a node or not
            for seg in mine:
                for i, n in enumerate(plan.segments[seg].output_names):
                    v = values[seg]
                    values[f"{seg}:{n}"] = v[n] if isinstance(v, dict) else v[i]
        files, entries, preprocessing, unfolded = {}, [], {}, {}
        for seg in mine:
            node, spec = graph.nodes[seg], plan.segments[seg]
            inputs = list(dict.fromkeys(node.inputs))
            outputs = [f"{seg}:{n}" for n in spec.output_names] or [seg]
            folded = {}
            for d in inputs:
                if graph.nodes[d].kind != "input":
                    continue
                stats = _stats(graph, d, pre, fields[d][1]) if pre is not None else None
                if stats is None:
                    continue
                row = fields[d][1]  # folded where the statistics broadcast over a row of floats
                can = fold and torch.is_floating_point(traced[d]) and stats[0].ndim == len(row) \
                    and all(m in (1, n) for m, n in zip(stats[0].shape, row))
                preprocessing[d] = {"field": plan.parties[party].holds[d.split(".", 1)[1]].field, "rule": _RULE,
                                    "folded": bool(can), "mean": stats[0].tolist(), "std": stats[1].tolist()}
                if can:
                    folded[d] = stats
                else:
                    unfolded[d] = preprocessing[d]
            serving = _Serving(modules[seg], node.merge or spec.merge, list(node.inputs), inputs, folded, outputs).eval()
            varying = {n: {d for d in range(1, traced[n].dim()) if traced[n].shape[d] != checked[n].shape[d]}
                       for n in [*inputs, *outputs]}  # (what the check rows vary: the batch, a sequence length)
            data = _to_onnx(serving, seg, node.party, inputs, outputs, traced, varying)
            got, want = _check(ort, data, serving, seg, node.party, inputs, outputs, checked)
            file = re.sub(r"[^A-Za-z0-9_.-]", "_", seg) + ".onnx"
            while file in files:
                file = "_" + file
            files[file] = data
            entries.append({"segment": seg, "file": file,
                            "inputs": [_input_entry(graph, party, d, traced[d], varying[d], preprocessing.get(d))
                                       for d in inputs],
                            "outputs": [_output_entry(graph, party, o, traced[o], varying[o], saved) for o in outputs],
                            "checked": {"rows": int(next(iter(checked[d] for d in inputs)).shape[0]),
                                        "max_abs_diff": max(got), "tolerance": want}})
    finally:
        for k, m in modules.items():
            m.train(modes[k])
    if unfolded:
        files["preprocess.json"] = json.dumps({"rule": _RULE, "inputs": unfolded}, indent=2).encode()
    _prepare_out(out, force, clear=True)  # every graph made and checked: now the files
    for file, data in files.items():
        (out / f".{file}.tmp").write_bytes(data)
        os.replace(out / f".{file}.tmp", out / file)
    manifest = {"format": "splitlearn-export", "version": 1, "plan": plan.name, "party": party, "source": source,
                "exporter": {"name": "torch.onnx.export, TorchScript-based (dynamo=False)", "opset": OPSET,
                             "torch": torch.__version__, "checked_with": f"onnxruntime {ort.__version__}"},
                "precision": plan.parties[party].precision, "segments": entries, "preprocess": preprocessing,
                "files": {f: hashlib.sha256(data).hexdigest() for f, data in files.items()}}
    write_json(out / "manifest.json", manifest)
    return [*(out / f for f in files), out / "manifest.json"]


def _to_onnx(serving: nn.Module, seg: str, party: str, inputs: list[str], outputs: list[str],
             traced: dict[str, Any], varying: dict[str, set[int]]) -> bytes:
    """The segment's ONNX graph traced on ``traced``, its batch and ``varying`` dimensions dynamic."""
    axes = {n: {d: _dim(d) for d in {0, *varying[n]}} for n in [*inputs, *outputs]}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # its deprecation notice, and the tracer's (the check below is the test)
            warnings.simplefilter("ignore")
            torch.onnx.export(serving, tuple(traced[d] for d in inputs), buffer, dynamo=False, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET)
    except Exception as e:  # noqa: BLE001 - whatever the exporter refuses
        raise PlanError(f"segment {seg!r} (party {party!r}) cannot be exported to ONNX: {type(e).__name__}: {_brief(e)}",
                        entry=f"segments.{seg}", hint="export a segment of standard torch layers (ONNX opset "
                        f"{OPSET}), or serve it with splitlearn") from None
    return buffer.getvalue()


def _brief(e: Exception) -> str:
    """An error's text on one line, its middle left out past 300 characters (its start and its end say most)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else f"{text[:150]} ... {text[-150:]}"


def _check(ort: Any, data: bytes, serving: nn.Module, seg: str, party: str, inputs: list[str], outputs: list[str],
           checked: dict[str, Any]) -> tuple[list[float], float]:
    """onnxruntime against torch on the check rows (another batch size and length than the traced rows): the
    largest difference of each output and the tolerance; a PlanError where they differ."""
    xs = [checked[d] for d in inputs]
    with torch.no_grad():
        ref = serving(*xs)
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 4  # (its errors: in the PlanError)
    rows = int(xs[0].shape[0]) if xs else 0
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got = session.run(outputs, {d: x.numpy() for d, x in zip(inputs, xs)})
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors
        raise PlanError(f"segment {seg!r} (party {party!r}): its ONNX graph fails on {rows} rows (it was traced on "
                        f"2): {_brief(e)}", entry=f"segments.{seg}", hint="the exporter fixed a size it traced; serve "
                        "this segment with splitlearn") from None
    worst, scale = [], max([1.0] + [float(r.abs().max()) for r in ref if r.numel() and r.is_floating_point()])
    for name, g, r in zip(outputs, got, ref):
        r = r.numpy()
        diff = float(np.abs(g.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
        if g.shape != r.shape or not diff <= TOLERANCE * scale:
            raise PlanError(f"segment {seg!r} (party {party!r}): its ONNX graph gives other values than torch on "
                            f"{rows} rows ({name}: shape {list(g.shape)} against {list(r.shape)}, largest difference "
                            f"{diff:.3g})", entry=f"segments.{seg}", hint="the exporter traced a branch that these rows "
                            "do not take; serve this segment with splitlearn")
        worst.append(diff)
    return worst, TOLERANCE * scale


def _input_entry(graph: Graph, party: str, name: str, value: torch.Tensor, varying: set[int],
                 pre: dict | None) -> dict[str, Any]:
    node = graph.nodes[name]
    entry: dict[str, Any] = {"name": name, "dtype": str(value.dtype).removeprefix("torch."),
                             "shape": _shape(tuple(value.shape), varying)}
    if node.kind == "input":
        ref = graph.plan.parties[party].holds[name.split(".", 1)[1]]
        entry["from"] = {"kind": "data", "party": party, "field": ref.field,
                         **({"columns": list(ref.columns)} if ref.columns is not None else {})}
        if pre is not None:
            entry["preprocess"] = "folded into the graph: give raw rows" if pre["folded"] else \
                "not folded: standardise the rows first (preprocess.json)"
        return entry
    producer = node.inputs[0] if node.kind == "output" else name
    wire = graph.wire_between(name, party)
    entry["from"] = ({"kind": "received", "party": node.party, "segment": producer, "wire": wire.name}
                     if wire is not None else {"kind": "local", "segment": producer})
    return entry


def _output_entry(graph: Graph, party: str, name: str, value: torch.Tensor, varying: set[int],
                  saved: dict[str, Preprocess]) -> dict[str, Any]:
    sends = [w for w in graph.wires if w.src == name]
    users = [n for n in graph.local_order(party) if name in graph.nodes[n].inputs]
    entry: dict[str, Any] = {
        "name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": _shape(tuple(value.shape), varying),
        "to": [{"party": w.dst_party, "wire": w.name, "codec": w.codec,
                **({"defenses": ds, "note": "splitlearn applies these defenses on the wire when it predicts; the graph "
                    "does not"} if (ds := [d.key for d, _ in active(w.spec) if "predict" in d.modes]) else {})}
               for w in sends],
        "segments": [n for n in users if graph.nodes[n].kind == "segment"],
        "losses": [n for n in users if graph.nodes[n].kind == "loss"]}
    for loss in entry["losses"]:
        owner, _, local = graph.plan.losses[loss].target.partition(".")
        scale: TargetScale | None = saved[owner].targets.get(local) if owner in saved else None
        if scale is not None:
            entry["target_scale"] = {"loss": loss, "mean": scale.mean, "std": scale.std,
                                     "rule": "the output is in standardised units: prediction = output * std + mean"}
    return entry
