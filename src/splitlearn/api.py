"""The two calls most users need: :func:`train` a plan and :func:`predict` from a finished run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .core import losses
from .core.plan import DataSpec, Plan, PlanError
from .core.load import load_plan
from .data import batches
from .run.local import run_local
from .run.results import build_result, load_weights, save_party, save_result
from .run.session import Progress
from .run.setup import Step, check_plan, prepare, setup_party

__all__ = ["train", "predict"]


def train(plan: Plan | str | Path | dict, *, epochs: int | None = None, seed: int | None = None,
          out: str | Path | None = None, on_step: Callable[[Progress], None] | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """Train a plan with every party in this process; return (and with ``out``, write) the result.

    ``on_step`` is told the :class:`~splitlearn.run.session.Progress` after every step (with
    ``[clients]``: every round), with the training loss. ``timeout`` bounds each step (default
    600 s; with ``[clients]``, ``clients.timeout``, which also bounds each answer of the schedule).
    ``out`` receives ``result.json``, ``plan.json`` and per party ``parties/NAME/``: its weights
    (safetensors), what it received (for ``splitlearn audit``) and its report.
    """
    plan, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    return train_prepared(plan, setups, shapes, out=out, on_step=on_step, timeout=timeout)


def train_prepared(plan: Plan, setups: dict, shapes: dict, *, out: str | Path | None = None,
                   on_step: Callable[[Progress], None] | None = None, timeout: float | None = None,
                   faults: dict | None = None) -> dict[str, Any]:
    """:func:`train` after :func:`~splitlearn.run.setup.prepare` (which checks the plan end to end)."""
    reports = run_local(plan, setups, shapes, on_step=on_step, timeout=timeout, record=out is not None, faults=faults)
    result = build_result(plan, reports, {"transport": "in-process"})
    if out is not None:
        out = Path(out)
        for name, rep in reports.items():
            save_party(out / "parties" / name, rep)
        save_result(out, plan, result)
    return result


def predict(run_dir: str | Path, data: DataSpec | dict | None = None, *, write: bool = True) -> dict[str, dict]:
    """Run a trained plan forward on new data (default: the run's test split).

    Each party loads only its own weights (a ``[clients]`` run: the run's model, saved under the
    plan's party name). Predictions arrive at the party that owns each head and are written to
    ``RUN_DIR/parties/PARTY/predictions.csv``; the returned dict maps each task to ``{"party",
    "ids", "outputs", "predictions"}``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    plan = load_plan(json.loads((run_dir / "plan.json").read_text()))
    if plan.clients is not None:
        plan = plan.replace(clients=None)  # the run's one model, between the plan's parties
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
    steps = [Step(i, "predict", 0, torch.from_numpy(rows[b]))
             for i, b in enumerate(batches(len(rows), plan.train.eval_batch_size, 0, 0, shuffle=False))]
    reports = run_local(plan, setups, shapes, steps=steps, predicting=True)
    ids = first.splits.ids[rows]
    out: dict[str, dict] = {}
    for party, rep in reports.items():
        for task, chunks in rep.predictions.items():
            outputs = torch.cat(chunks)
            out[task] = {"party": party, "ids": ids.tolist(), "outputs": outputs,
                         "predictions": losses.decide(plan.losses[task].kind, outputs).tolist()}
        if rep.predictions and write:
            _write_predictions(run_dir / "parties" / party / "predictions.csv", out, party)
    return out


def _write_predictions(path: Path, out: dict[str, dict], party: str) -> None:
    tasks = [t for t, v in out.items() if v["party"] == party]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *tasks])
        for i, id_ in enumerate(out[tasks[0]]["ids"]):
            w.writerow([id_, *(out[t]["predictions"][i] for t in tasks)])
