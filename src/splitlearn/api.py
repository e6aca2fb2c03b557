"""The two calls most users need: :func:`train` a plan and :func:`predict` from a finished run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .data import batches
from .engine import Party
from .plan import DataSpec, Plan, PlanError, load_plan
from safetensors.torch import save_file

from .observe import Recorder
from .results import build_result, load_weights, plan_record, save_weights, write_json
from .runner import Step, check_plan, prepare, run_parties, session, setup_party

__all__ = ["train", "predict"]


def train(plan: Plan | str | Path | dict, *, epochs: int | None = None, seed: int | None = None,
          out: str | Path | None = None, on_step: Callable[[Step], None] | None = None,
          timeout: float = 600.0) -> dict[str, Any]:
    """Train a plan with every party in this process; return (and with ``out``, write) the result.

    With ``[clients]``, ``on_step`` is called once per round of the schedule and
    ``clients.timeout`` (not ``timeout``) bounds how long a client may take to answer.

    ``out`` receives ``result.json``, ``plan.json`` and ``parties/NAME/weights.safetensors``.
    """
    plan, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    if plan.clients is not None:  # on_step is called once a round; clients.timeout bounds each answer
        progress = None if on_step is None else (lambda r: on_step(Step(r.index, "train", r.epoch, torch.empty(0))))
        return train_clients(plan, out=out, progress=progress)
    return train_prepared(plan, setups, shapes, out=out, on_step=on_step, timeout=timeout)


def train_clients(plan: Plan, *, out: str | Path | None = None, progress: Callable | None = None) -> dict[str, Any]:
    """A plan with ``[clients]``: every client and fixed party in this process (see :mod:`splitlearn.federation`)."""
    from .federation import merge_reports, run_clients

    reports = run_clients(plan, progress=progress)
    result = merge_reports(plan, reports)
    result["transport"] = "in-process"
    if out is not None:
        out = Path(out)
        for party, rep in reports.items():
            if rep["modules"]:
                save_weights(out / "parties" / party / "weights.safetensors", rep["modules"])
        if result["final_client"] is not None:  # the run's model under the plan's name, for predict
            save_weights(out / "parties" / plan.clients.template / "weights.safetensors",
                         reports[result["final_client"]]["modules"])
        write_json(out / "plan.json", plan_record(plan))
        write_json(out / "result.json", result)
    return result


def train_prepared(plan: Plan, setups: dict, shapes: dict, *, out: str | Path | None = None,
                   on_step: Callable[[Step], None] | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """:func:`train` after :func:`~splitlearn.runner.prepare` (which checks the plan end to end)."""
    observers = {p: Recorder(s.splits.ids) for p, s in setups.items()} if out is not None else None
    reports = run_parties(setups, shapes, on_step=on_step, timeout=timeout, observers=observers)
    graph = next(iter(setups.values())).graph
    result = build_result(plan, graph, reports, {"transport": "in-process"})
    if out is not None:
        out = Path(out)
        for party, s in setups.items():
            save_party(out / "parties" / party, s.modules, observers[party])
        write_json(out / "plan.json", plan_record(plan))
        write_json(out / "result.json", result)
    return result


def save_party(folder: Path, modules: dict, recorder: Recorder) -> None:
    """A party's weights and what it saw on its wires (for ``splitlearn audit``), in its own folder."""
    save_weights(folder / "weights.safetensors", modules)
    seen = recorder.tensors()
    if seen:
        save_file(seen, str(folder / "observed.safetensors"))


def predict_party(party: Party, steps: Iterator[Step], on_step: Callable | None = None,
                  ids_hash: str = "") -> dict[str, list[torch.Tensor]]:
    """One party's side of a prediction run: the outputs of the heads it owns, batch by batch."""
    preds: dict[str, list[torch.Tensor]] = {}
    with session(party, ids_hash):
        for step in steps:
            for k, v in party.step(step.id, step.rows, "predict").predictions.items():
                preds.setdefault(k, []).append(v)
            if on_step is not None:
                on_step(step)
    return preds


def predict(run_dir: str | Path, data: DataSpec | dict | None = None, *, write: bool = True) -> dict[str, dict]:
    """Run a trained plan forward on new data (default: the run's test split).

    Each party loads only its own weights. Predictions arrive at the party that owns each
    head and are written to ``RUN_DIR/parties/PARTY/predictions.csv``; the returned dict maps
    each task to ``{"party", "ids", "outputs", "predictions"}``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    plan = load_plan(json.loads((run_dir / "plan.json").read_text()))
    spec = DataSpec.model_validate(data) if isinstance(data, dict) else data
    cache: dict = {}
    setups = {p: setup_party(plan, p, cache, spec, predict=True) for p in plan.parties}
    for p, s in setups.items():
        path = run_dir / "parties" / p / "weights.safetensors"
        if s.modules:
            if not path.is_file():
                raise PlanError(f"no weights for party {p!r} at {path}", file=run_dir, hint="train with --out first")
            try:
                load_weights(path, s.modules)
            except ValueError as e:
                raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
    shapes = check_plan(setups)
    first = next(iter(setups.values()))
    rows = first.splits.test if spec is None else np.arange(len(first.splits.ids))
    bs = plan.train.eval_batch_size

    def steps(_s) -> Iterator[Step]:
        for i, b in enumerate(batches(len(rows), bs, 0, 0, shuffle=False)):
            yield Step(i, "predict", 0, torch.from_numpy(rows[b]))

    results = run_parties(setups, shapes, steps=steps, job=predict_party, predicting=True)
    ids = first.splits.ids[rows]
    out: dict[str, dict] = {}
    for party, preds in results.items():
        for task, chunks in preds.items():
            outputs = torch.cat(chunks)
            out[task] = {"party": party, "ids": ids.tolist(), "outputs": outputs,
                         "predictions": _decide(plan.losses[task].kind, outputs).tolist()}
        if preds and write:
            _write_predictions(run_dir / "parties" / party / "predictions.csv", out, party)
    return out


def _decide(kind: str, outputs: torch.Tensor) -> torch.Tensor:
    """Class labels from a head's outputs (values for regression)."""
    if kind == "cross_entropy":
        return outputs.argmax(-1)
    flat = outputs.reshape(len(outputs), -1)[:, 0]
    return (flat > 0).long() if kind == "bce" else flat


def _write_predictions(path: Path, out: dict[str, dict], party: str) -> None:
    tasks = [t for t, v in out.items() if v["party"] == party]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *tasks])
        for i, id_ in enumerate(out[tasks[0]]["ids"]):
            w.writerow([id_, *(out[t]["predictions"][i] for t in tasks)])
