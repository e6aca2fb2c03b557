"""Experiment tracking: metrics streamed to TensorBoard or MLflow while a run trains.

``--log tensorboard[:DIR]`` and ``--log mlflow[:URI]`` (``splitlearn run``; ``log=`` in
:func:`splitlearn.train`). Every party that computes a loss streams its own: the train loss
of each step (``TASK/train_loss_step``) and each epoch's test metrics (``TASK/test_accuracy``,
``TASK/test_roc_auc``, ...), one TensorBoard run folder or MLflow run per party (in a clients
run: each turn's values at the turn's index, the train loss per step numbered across turns).
When the run ends, the launcher adds the run's summary (``run.summary``): the per-epoch metrics
of ``result.json`` (under ``result/``) and, as parameters, the plan, its hash, the seed and
each party's bytes and FLOPs. A tracker that fails (a full disk) is reported once and training
goes on.

Both are optional extras (``pip install splitlearn[tensorboard]`` / ``[mlflow]``); MLflow's
local file store (the default, ``RUN_DIR/mlruns``) works offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.plan import Plan, plan_hash
from ..core.specs import PlanError

__all__ = ["LogSpec", "parse_log", "Tracker", "open_tracker", "finish_tracking", "StepNumbers", "SUMMARY", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("tensorboard", "mlflow")
SUMMARY = "run.summary"  # the run's own tracker run: no party can be named so (names have no dots)


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
        if found is None:
            try:
                exp = self.client.create_experiment(experiment)
            except Exception:  # noqa: BLE001 - another party created it meanwhile
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                exp = found.experiment_id
        else:
            exp = found.experiment_id
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


class _Guarded:
    """A tracker whose failures are logged once; training goes on without it."""

    def __init__(self, inner: Tracker, who: str):
        self.inner, self.who, self.failed = inner, who, False

    def log(self, values: dict[str, float], step: int) -> None:
        if self.failed:
            return
        try:
            self.inner.log(values, step)
        except Exception as e:  # noqa: BLE001 - tracking must never end training
            self.failed = True
            log.warning("%s: metrics tracking stopped: %s: %s", self.who, type(e).__name__, e)

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception as e:  # noqa: BLE001
            log.warning("%s: closing the tracker failed: %s", self.who, e)


class StepNumbers:
    """A clients run's tracker: each turn restarts its step ids, so the train loss per step is
    numbered across turns, and every other value is logged at the turn's index."""

    def __init__(self, inner: Tracker):
        self.inner, self.steps, self.turn = inner, 0, 0

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if k.endswith("/train_loss_step"):
                self.inner.log({k: v}, self.steps)
                self.steps += 1
            else:
                self.inner.log({k: v}, self.turn)

    def close(self) -> None:
        self.inner.close()


def open_tracker(spec: LogSpec, plan: Plan, party: str) -> Tracker:
    """The tracker of party ``party`` (a run folder or an MLflow run of its own)."""
    if spec.kind == "tensorboard":
        inner: Tracker = _TensorBoard(Path(spec.where) / party)
    else:
        inner = _MLflow(spec.where, plan.name, f"{plan.name}:{party}", {**_params(plan), "party": party},
                        {"splitlearn.party": party})
    return _Guarded(inner, party)


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
        tb = _TensorBoard(Path(spec.where) / SUMMARY)
        tb.writer.add_text("parameters", "\n".join(f"- {k}: {v}" for k, v in params.items()))
        tracker: Tracker = tb
    else:
        tracker = _MLflow(spec.where, plan.name, f"{plan.name}:{SUMMARY}", params, {"splitlearn.party": SUMMARY})
    try:
        for name, values in per_epoch.items():
            for epoch, v in enumerate(values):
                tracker.log({f"result/{name}": v}, epoch)
    finally:
        tracker.close()
