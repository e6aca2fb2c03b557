"""The results contract (``result.json``) and what a run leaves on disk.

A run folder holds ``result.json``, ``plan.json`` (the plan as run) and, per party,
``parties/NAME/weights.safetensors``: only that party's segments, so each party's folder
can stay on that party's machine (under the ``independent`` schedule a fixed party keeps one copy
of its segments per client instead: ``parties/NAME/weights-CLIENT.safetensors``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.graph import Graph, build_graph
from ..core import losses
from ..core.metrics import METRICS, REGRESSION_METRICS
from ..core.plan import Plan, parse_plan, plan_dir
from ..core.specs import PlanError
from ..run.report import PartyReport
from ..clients.roles import plays_of
from ..clients.results import metric_histories, party_entry, schedule_part

__all__ = ["build_result", "summarize", "wires_of", "write_json", "save_party", "save_result",
           "save_weights", "load_weights", "save_preprocess", "load_preprocess", "non_finite", "plan_record", "load_run_plan",
           "RUN_OUTPUTS", "clear_run_folder"]


def summarize(plan: Plan, graph: Graph, tasks: dict[str, dict]) -> dict[str, Any]:
    """The ``metrics`` of a result from each loss's per-epoch history (``train_loss``,
    ``test_loss``, ``test_accuracy`` lists): the weighted sum of the training losses, the accuracy
    of the plan's first classification loss, and with several losses each task on its own."""
    order = [n.name for n in graph.losses() if n.name in tasks]
    epochs = max((len(tasks[k]["train_loss"]) for k in order), default=0)
    total = [sum(plan.losses[k].weight * tasks[k]["train_loss"][e] for k in order) for e in range(epochs)]
    metrics: dict[str, Any] = {"train_loss": total}
    classif = [k for k in order if tasks[k]["test_accuracy"]]
    main = classif[0] if classif else (order[0] if order else None)
    if classif:
        metrics["test_accuracy"] = tasks[main]["test_accuracy"][-1]
        metrics["test_accuracy_per_epoch"] = tasks[main]["test_accuracy"]
    if main is not None:  # the headline: the last evaluation's figures, the rows scored, their intervals
        tokens = ("loss", "perplexity", "tokens") if losses.get(plan.losses[main].kind).tokens else ()  # a language model
        for name in [*(METRICS[1:] if classif else REGRESSION_METRICS), *tokens, *plan.losses[main].metrics]:
            if tasks[main].get(f"test_{name}"):
                metrics[f"test_{name}"] = tasks[main][f"test_{name}"][-1]
        if tasks[main].get("test_rows"):
            metrics["test_rows"] = tasks[main]["test_rows"][-1]
        if tasks[main].get("ci95"):
            metrics["ci95"] = tasks[main]["ci95"]
        if tasks[main].get("curves"):
            metrics["curves"] = tasks[main]["curves"]
        metrics["per_epoch"] = {"train_loss": total, **{k: v for k, v in tasks[main].items()
                                                        if k.startswith("test_") and v}}
        metrics["train_loss_steps"] = tasks[main].get("train_loss_steps", [])
    if len(order) > 1:
        metrics["tasks"] = {k: {"party": graph.nodes[k].party,
                                **({"test_accuracy": tasks[k]["test_accuracy"][-1]} if tasks[k]["test_accuracy"] else {}),
                                **{n: v for n, v in tasks[k].items() if n != "test_accuracy" or not v}} for k in order}
        for k in order:
            if tasks[k]["test_accuracy"]:
                metrics["tasks"][k]["test_accuracy_per_epoch"] = tasks[k]["test_accuracy"]
    return metrics


def wires_of(graph: Graph) -> list[dict[str, Any]]:
    """The ``wires`` of a result: what each carries, from whom to whom, with which codecs."""
    return [{"name": w.name, "src": w.src_party, "dst": w.dst_party, "carries": w.carries,
             "codec": w.codec, **({"grad_codec": w.grad_codec} if w.carries == "activation" else {})}
            for w in graph.wires]


def build_result(plan: Plan, reports: dict[str, PartyReport], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the physical parties' reports into the ``result.json`` shape of docs/design.md: the
    same keys for every plan, and the schedule's own (:mod:`splitlearn.clients.results`: with
    ``[clients]`` the schedule, per-client cost, skipped clients and the client whose weights are
    the run's model)."""
    graph = build_graph(plan)
    tasks, scored = metric_histories(plan, reports)
    result: dict[str, Any] = {"plan": plan.name, "epochs": plan.train.epochs, "seed": plan.train.seed,
                              "metrics": {**summarize(plan, graph, tasks), **scored}, "wires": wires_of(graph)}
    parties = {name: party_entry(plan, rep) for name, rep in reports.items()}
    privacy = _privacy(plan, reports)
    if privacy:
        result["privacy"] = privacy
    aligned = {n: r.data["alignment"] for n, r in reports.items() if r.data.get("alignment")}
    if aligned:  # private alignment: how many rows each party had, and how many every party holds
        result["alignment"] = {"method": plan.data.align, "parties": aligned}
    result.update(schedule_part(plan, reports, parties))
    _per_token(result["wires"], parties, {w.name for w in graph.wires if w.carries == "label" and not w.vary})
    result["parties"] = parties
    result.update(extra or {})
    return result


def _per_token(wires: list[dict[str, Any]], parties: dict[str, dict], per_row: set[str]) -> None:
    """Text rows: each wire's bytes per real token (forward over every token stepped, backward over the trained
    ones), by the tokens the holder of the text counted (the wire's sender where it holds text); not for a label
    wire carrying one label a row (``per_row``)."""
    counted = {n: p for n, p in parties.items() if p.get("tokens_forward")}
    if not counted:
        return
    for w in wires:
        if w["name"] in per_row:
            continue
        holder = counted.get(w["src"]) or next(iter(counted.values()))
        forward, backward = holder["tokens_forward"], holder.get("tokens_backward", 0)
        back = _sent(parties, w["dst"], w["name"], "backward")  # (none on an integer element: no gradient)
        w["bytes_per_token"] = {"forward": round(_sent(parties, w["src"], w["name"], "forward") / forward, 3),
                                **({"backward": round(back / backward, 3)} if backward and back else {})}


def _sent(parties: dict[str, dict], party: str, wire: str, direction: str) -> int:
    return sum(t["bytes"] for t in parties.get(party, {}).get("sent", [])
               if t["wire"] == wire and t["direction"] == direction)


def _privacy(plan: Plan, reports: dict[str, PartyReport]) -> dict[str, dict]:
    """Per noised wire: the largest epsilon any sender spent (each client over all its turns)."""
    out: dict[str, dict] = {}
    for name, rep in reports.items():
        for wire, p in rep.privacy.items():
            entry = out.setdefault(wire, {**p, "by": {}})
            entry["by"][name] = p["epsilon"]
            if p["epsilon"] > entry["epsilon"]:
                entry.update({**p, "by": entry["by"]})
    return out


def save_party(folder: Path, report: PartyReport) -> None:
    """One physical party's part of a run folder: its weights, what it recorded for the audit
    and its report, in ``parties/NAME/`` (so it can stay on that party's machine)."""
    if report.modules:
        save_weights(folder / "weights.safetensors", report.modules)
    for client, modules in report.per_client.items():  # independent: a fixed party's copy for each client
        save_weights(folder / f"weights-{client}.safetensors", modules)
    if report.preprocess is not None and report.preprocess.stats:  # part of the model: predict uses it
        save_preprocess(folder / "preprocess.safetensors", report.preprocess)
    if report.observed:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".observed.safetensors.tmp"
        save_file(report.observed, str(tmp))
        os.replace(tmp, folder / "observed.safetensors")
    write_json(folder / "report.json", report.to_json())


def save_result(out: Path, plan: Plan, result: dict[str, Any]) -> None:
    """``plan.json`` and ``result.json``; with ``[clients]`` also the run's model (the final
    client's weights) under the plan party's name it plays, for ``predict``."""
    final = result.get("final_client")
    plays = plays_of(plan, str(final)) if final is not None else None
    if plays is not None:
        for file in ("weights.safetensors", "preprocess.safetensors"):
            src = out / "parties" / str(final) / file
            if src.is_file():
                dst = out / "parties" / plays / file
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    write_json(out / "plan.json", plan_record(plan))
    if plan._source is not None:  # factories next to the plan file are found from there again (predict, audit)
        result = {**result, "plan_file": str(plan._source.resolve())}
    write_json(out / "result.json", result)


def load_run_plan(run_dir: Path, networks: dict[str, Any] | None = None) -> Plan:
    """The plan of a run folder, its factories found next to the original plan file;
    ``networks`` replaces networks by Python objects (those the run was given in Python)."""
    from ..core.load import load_plan

    body = json.loads((run_dir / "plan.json").read_text())
    if networks:
        unknown = sorted(set(networks) - set(body.get("networks", {})))
        if unknown:
            raise PlanError(f"networks {unknown} are not networks of the run (it has {sorted(body.get('networks', {}))})",
                            file=run_dir / "plan.json", hint="name the networks as the plan does")
        body["networks"] = {**body["networks"], **networks}
    plan = parse_plan(body)
    try:
        source = json.loads((run_dir / "result.json").read_text()).get("plan_file")
    except (OSError, ValueError, AttributeError):
        source = None
    if isinstance(source, str) and Path(source).is_file():
        plan._source = Path(source)
    return load_plan(plan)


def plan_record(plan: Plan) -> dict[str, Any]:
    """The plan as run, for ``plan.json``: data paths made absolute, so a later ``predict`` or
    ``audit`` finds the files from wherever it is started."""
    body = plan.model_dump(mode="json")
    folder = plan_dir(plan)
    base = folder.resolve() if folder else Path.cwd()
    specs = [body["data"]] + [p["data"] for p in body["parties"].values() if p.get("data")]
    for spec in specs:
        if spec.get("path") and not Path(spec["path"]).expanduser().is_absolute():
            spec["path"] = str(base / spec["path"])
        tokenizer = spec.get("options", {}).get("tokenizer")
        if isinstance(tokenizer, str) and not Path(tokenizer).expanduser().is_absolute():
            spec["options"]["tokenizer"] = str(base / tokenizer)
    for net in body["networks"].values():  # a transformers model folder
        if net.get("hf") and not Path(net["hf"]["folder"]).expanduser().is_absolute():
            net["hf"]["folder"] = str(base / net["hf"]["folder"])
    for name, seg in body["segments"].items():  # a merge left to its default stays so (it depends on the inputs)
        if "merge" not in plan.segments[name].model_fields_set:
            del seg["merge"]
    return body


# what splitlearn writes at the top of a run folder (run, audit, report, tracking, compare, sweep)
RUN_OUTPUTS = ("result.json", "plan.json", "report.html", "parties", "audit", "tensorboard", "mlruns", "compare.json",
               "compare.md", "sweep.json", "sweep.md", "sweep.png", "accuracy_vs_computation.png", "bytes_per_client.png")


def clear_run_folder(out: Path, force: bool) -> None:
    """Make ``out`` ready for a new run, never overwriting silently: a folder that holds files needs
    ``force``, which removes what an earlier run wrote there (:data:`RUN_OUTPUTS`: an old audit must
    not describe the new run) and leaves anything else alone. PlanError otherwise."""
    import shutil

    out = Path(out)
    if out.is_file():
        raise PlanError(f"--out {out} is a file; give a folder", entry="--out")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        raise PlanError(f"--out {out} already holds files (an earlier run?): give --force to replace that run, or "
                        "another --out", entry="--out")
    for name in RUN_OUTPUTS:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(path: Path, modules: dict[str, nn.Module]) -> None:
    """One party's segments as safetensors (``segment.parameter`` keys), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{seg}.{k}": v.detach().cpu().contiguous().clone() for seg, m in modules.items()
               for k, v in m.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "splitlearn-segments", "segments": ",".join(modules)})
    os.replace(tmp, path)


def save_preprocess(path: Path, pre: Any) -> None:
    """A party's fitted preprocessing (``FIELD.mean``, ``FIELD.std``), beside its weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(pre.tensors(), str(tmp), metadata={"format": "splitlearn-preprocess"})
    os.replace(tmp, path)


def load_preprocess(path: Path) -> Any:
    """The preprocessing saved by :func:`save_preprocess` (None if the party had none)."""
    from ..data.preprocess import Preprocess

    if not path.is_file():
        return None
    try:
        return Preprocess.from_tensors(load_file(str(path)))
    except Exception as e:  # SafetensorError, DataError: a damaged file
        raise ValueError(f"{path}: not a readable preprocessing file ({e})") from None


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_weights(path: Path, modules: dict[str, nn.Module]) -> None:
    """Load a party's segments saved by :func:`save_weights` (safetensors: no code is run).

    Weights with NaN or infinite entries are refused: they would predict nonsense for every row."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}): "
                         "training diverged or was poisoned, and these weights cannot predict")
    for seg, m in modules.items():
        prefix = f"{seg}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing = set(m.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{path}: no weights for {sorted(missing)[:3]} of segment {seg!r}; was it saved from this plan?")
        try:
            m.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: the weights of segment {seg!r} do not fit its network "
                             f"(was the plan changed after training?): {str(e).splitlines()[0]}") from None
