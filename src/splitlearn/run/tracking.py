"""Experiment tracking: metrics streamed to TensorBoard or MLflow while a run trains.

``--log tensorboard[:DIR]`` and ``--log mlflow[:URI]`` (``splitlearn run``; ``log=`` in
:func:`splitlearn.train`). Every party that computes a loss streams its own: the train loss
of each step (``TASK/train_loss_step``) and each epoch's test metrics (``TASK/test_accuracy``,
``TASK/test_roc_auc``, ...), one TensorBoard run folder or MLflow run per party. When the run
ends, the launcher adds the run's summary: the per-epoch metrics of ``result.json`` (under
``result/``) and, as parameters, the plan, its hash, the seed and each party's bytes and FLOPs.

Both are optional extras (``pip install splitlearn[tensorboard]`` / ``[mlflow]``); MLflow's
local file store (the default, ``RUN_DIR/mlruns``) works offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.plan import Plan, PlanError, plan_hash

__all__ = ["LogSpec", "parse_log", "Tracker", "open_tracker", "finish_tracking"]

KINDS = ("tensorboard", "mlflow")


@dataclass(frozen=True)
class LogSpec:
    kind: str  # tensorboard | mlflow
    where: str  # a folder (tensorboard) or a tracking URI (mlflow)


def parse_log(spec: str, out: str | Path | None = None) -> LogSpec:
    """``tensorboard[:DIR]`` or ``mlflow[:URI]``; the defaults are ``OUT/tensorboard`` and ``file:OUT/mlruns``."""
    kind, _, where = spec.partition(":")
    if kind not in KINDS:
        raise PlanError(f"--log {spec!r}: expected tensorboard[:DIR] or mlflow[:URI]", entry="log")
    base = Path(out) if out is not None else Path("runs")
    _require(kind)
    if kind == "tensorboard":
        return LogSpec(kind, str(Path(where or base / "tensorboard").resolve()))
    return LogSpec(kind, where or f"file:{(base / 'mlruns').resolve()}")


def _require(kind: str) -> None:
    import importlib.util

    module = "tensorboard" if kind == "tensorboard" else "mlflow"
    if importlib.util.find_spec(module) is None:
        raise PlanError(f"--log {kind} needs the {module} package, which is not installed", entry="log",
                        hint=f"pip install 'splitlearn[{kind}]'")


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]):
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the offline local store, on purpose
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        exp = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp, run_name=run_name, tags=tags).info.run_id
        for k, v in params.items():
            self.client.log_param(self.run_id, k, v)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if v is not None:
                self.client.log_metric(self.run_id, k, float(v), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _params(plan: Plan) -> dict[str, Any]:
    return {"plan": plan.name, "plan_hash": plan_hash(plan), "seed": plan.train.seed, "epochs": plan.train.epochs,
            "batch_size": plan.train.batch_size}


def open_tracker(spec: LogSpec, plan: Plan, party: str) -> Tracker:
    """The tracker of party ``party`` (a run folder or an MLflow run of its own)."""
    if spec.kind == "tensorboard":
        return _TensorBoard(Path(spec.where) / party)
    return _MLflow(spec.where, plan.name, f"{plan.name}:{party}", {**_params(plan), "party": party},
                   {"splitlearn.party": party})


def finish_tracking(spec: LogSpec, plan: Plan, result: dict[str, Any]) -> None:
    """The run's summary as its own tracker run (``result``): per-epoch metrics, and the plan,
    seed and per-party bytes and FLOPs as parameters."""
    params = dict(_params(plan))
    for name, p in result.get("parties", {}).items():
        params[f"{name}.bytes_sent"] = p.get("bytes_sent")
        params[f"{name}.bytes_received"] = p.get("bytes_received")
        params[f"{name}.flops"] = p.get("flops")
    per_epoch = result.get("metrics", {}).get("per_epoch", {})
    if spec.kind == "tensorboard":
        tb = _TensorBoard(Path(spec.where) / "result")
        tb.writer.add_text("parameters", "\n".join(f"- {k}: {v}" for k, v in params.items()))
        tracker: Tracker = tb
    else:
        tracker = _MLflow(spec.where, plan.name, f"{plan.name}:result", params, {"splitlearn.party": "result"})
    try:
        for name, values in per_epoch.items():
            for epoch, v in enumerate(values):
                tracker.log({f"result/{name}": v}, epoch)
    finally:
        tracker.close()
