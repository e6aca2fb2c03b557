"""The ``[train]`` entries of a plan: the schedule of steps, checkpoints, timeouts, pipelining, accumulation, the
global clip and early stopping (:mod:`splitlearn.core.stopping`); and how ``[clients]`` share the rows."""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from .specs import Strict

__all__ = ["EarlyStopSpec", "TrainSpec", "PartitionSpec"]

_SMALLER_IS_BETTER = ("loss", "ece", "mae", "rmse")  # the built-in figures minimised (the others maximised)


class EarlyStopSpec(Strict):
    """``[train] early_stop``: stop when the validation figure ``metric`` (``val_loss`` or ``val_<metric>``: a
    figure every evaluation gives, or an extra metric the loss asks) has not improved by more than
    ``min_delta`` for ``patience`` epochs; ``mode``: ``min`` or ``max`` (by default the metric's own direction,
    to be given for an extra metric); ``loss``: whose figure, where the plan has several losses. Needs ``[data]
    validation_fraction`` (:mod:`splitlearn.core.stopping`)."""

    metric: str = "val_loss"
    patience: int = Field(3, ge=1)
    mode: Literal["min", "max"] | None = None
    min_delta: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    loss: str | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        from .metrics import EXTRA_METRICS, METRICS, REGRESSION_METRICS

        accepted = [f"val_{m}" for m in ("loss", *METRICS, *REGRESSION_METRICS, *EXTRA_METRICS)]
        if v not in accepted:
            raise ValueError(f"unknown metric {v!r}: a validation figure, one of {accepted}")
        return v

    @model_validator(mode="after")
    def _direction(self) -> "EarlyStopSpec":
        from .metrics import METRICS, REGRESSION_METRICS

        name = self.metric[len("val_"):]
        if self.mode is None and name not in ("loss", *METRICS, *REGRESSION_METRICS):
            raise ValueError(f"early_stop.metric {self.metric!r} is an extra metric: say whether it improves "
                             'upwards or downwards with mode = "max" or "min"')
        return self

    @property
    def direction(self) -> str:
        """``min`` or ``max``: the mode given, else the metric's own."""
        if self.mode is not None:
            return self.mode
        return "min" if self.metric[len("val_"):] in _SMALLER_IS_BETTER else "max"


class TrainSpec(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)  # (numpy seeds are non-negative)
    # a checkpoint every this many training steps (and at every epoch's end) when the run has an --out folder
    checkpoint_every: int | None = Field(None, ge=1)
    # seconds a party waits for a peer whose link broke to come back (over gRPC) before it stops
    reconnect_timeout: float = Field(180.0, ge=0.0)
    # seconds one step (and the hello, the goodbye) may take as a whole before a party gives up, in every plan;
    # None: 120 s (Plan.step_timeout_s resolves it; clients.timeout bounds answers only)
    step_timeout: float | None = Field(None, gt=0.0)
    # micro-batches per training step, pipelined through the parties (GPipe); the gradients are the whole batch's
    pipeline: int = Field(1, ge=1, le=1024)
    # training batches per optimizer step (gradient accumulation: equals one batch this many times larger)
    accumulate: int = Field(1, ge=1)
    # with clip = "global": clip_grad_norm_ over every party's gradients of a network at once (core/precision.py)
    clip_grad_norm: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    clip: Literal["global"] | None = None
    # stop when a validation figure stops improving (needs [data] validation_fraction; splitlearn.core.stopping)
    early_stop: EarlyStopSpec | None = None

    @model_validator(mode="after")
    def _global_clip(self) -> "TrainSpec":
        if self.clip_grad_norm is not None and self.clip is None:
            raise ValueError("train.clip_grad_norm clips the norm over every party's gradients together: say so with "
                             "clip = \"global\" beside it (a party's own gradients are clipped by clip_grad_norm in "
                             "its optimizer table)")
        if self.clip is not None and self.clip_grad_norm is None:
            raise ValueError("train.clip = \"global\" needs the norm to clip to: train.clip_grad_norm = N")
        return self

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Callable[["TrainSpec"], dict[str, Any]]) -> dict[str, Any]:
        """``accumulate`` and the global clip are written only where given (a plan without them hashes as before
        they existed)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "accumulate" and v == 1)
                and not (k in ("clip_grad_norm", "clip", "early_stop") and v is None)}


class PartitionSpec(Strict):
    """How the training rows are shared among horizontal clients."""

    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0.0)  # dirichlet: small alpha gives each client few classes
