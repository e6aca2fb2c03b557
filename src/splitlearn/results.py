"""The results contract (``result.json``) and what a run leaves on disk.

A run folder holds ``result.json``, ``plan.json`` (the plan as run) and, per party,
``parties/NAME/weights.safetensors``: only that party's segments, so each party's folder
can stay on that party's machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
import torch
from torch import nn

from .graph import Graph
from .plan import Plan

__all__ = ["build_result", "summarize", "wires_of", "write_json", "save_weights", "load_weights", "non_finite"]


def summarize(plan: Plan, graph: Graph, tasks: dict[str, dict]) -> dict[str, Any]:
    """The ``metrics`` of a result from each loss's per-epoch history (``train_loss``,
    ``test_loss``, ``test_accuracy`` lists): the weighted sum of the training losses, the accuracy
    of the plan's first classification loss, and with several losses each task on its own."""
    order = [n.name for n in graph.losses() if n.name in tasks]
    epochs = max((len(tasks[k]["train_loss"]) for k in order), default=0)
    total = [sum(plan.losses[k].weight * tasks[k]["train_loss"][e] for k in order) for e in range(epochs)]
    metrics: dict[str, Any] = {"train_loss": total}
    classif = [k for k in order if tasks[k]["test_accuracy"]]
    if classif:
        metrics["test_accuracy"] = tasks[classif[0]]["test_accuracy"][-1]
        metrics["test_accuracy_per_epoch"] = tasks[classif[0]]["test_accuracy"]
    if len(order) > 1:
        metrics["tasks"] = {k: {"party": graph.nodes[k].party,
                                **({"test_accuracy": tasks[k]["test_accuracy"][-1]} if tasks[k]["test_accuracy"] else {}),
                                "test_loss": tasks[k]["test_loss"],
                                "train_loss": tasks[k]["train_loss"]} for k in order}
    return metrics


def wires_of(graph: Graph) -> list[dict[str, Any]]:
    """The ``wires`` of a result: what each carries, from whom to whom, with which codecs."""
    return [{"name": w.name, "src": w.src_party, "dst": w.dst_party, "carries": w.carries,
             "codec": w.codec, **({"grad_codec": w.grad_codec} if w.carries == "activation" else {})}
            for w in graph.wires]


def build_result(plan: Plan, graph: Graph, reports: dict, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the party reports into the ``result.json`` shape of DESIGN.md."""
    tasks: dict[str, dict] = {}
    for rep in reports.values():
        tasks.update(rep.metrics)
    result = {
        "plan": plan.name,
        "epochs": plan.train.epochs,
        "seed": plan.train.seed,
        "metrics": summarize(plan, graph, tasks),
        "wires": wires_of(graph),
        "parties": {name: {**rep.meter, "refused": rep.refused, **({"privacy": rep.privacy} if rep.privacy else {})}
                    for name, rep in reports.items()},
    }
    result.update(extra or {})
    return result


def plan_record(plan: Plan) -> dict[str, Any]:
    """The plan as run, for ``plan.json``: data paths made absolute, so a later ``predict`` or
    ``audit`` finds the files from wherever it is started."""
    body = plan.model_dump(mode="json")
    base = plan._source.parent.resolve() if plan._source else Path.cwd()
    specs = [body["data"]] + [p["source"] for p in body["parties"].values() if p.get("source")]
    for spec in specs:
        if spec.get("path") and not Path(spec["path"]).expanduser().is_absolute():
            spec["path"] = str(base / spec["path"])
    return body


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
    tensors = {f"{seg}.{k}": v.detach().contiguous().clone() for seg, m in modules.items() for k, v in m.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "splitlearn-segments", "segments": ",".join(modules)})
    os.replace(tmp, path)


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
