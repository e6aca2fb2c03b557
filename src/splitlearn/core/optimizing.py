"""A party's optimizer and what a plan's training recipe adds around it.

- **Optimizers by name**: any :mod:`torch.optim` optimizer, matched to its class name in any case
  (``"AdamW"``, ``"adamw"``, ``"RMSprop"``), with its keyword arguments checked against the class's
  signature (:func:`optimizer_class`, :func:`optimizer_arguments`).
- **Schedules by name**: any :mod:`torch.optim.lr_scheduler` class the same way, with linear warmup
  (:func:`schedule_maker`), stepped after every optimizer step or once per epoch
  (:meth:`PartyOptimizer.begin_epoch`).
- **Clipping**: ``clip_grad_norm_`` over the party's own parameters before its optimizer steps; with
  ``[train] clip = "global"``, over every party's of the network, the norm agreed by
  :mod:`~splitlearn.core.precision` from each party's :meth:`PartyOptimizer.squared_norm`
  (:meth:`PartyOptimizer.clip_to`).
- **Accumulation**: an :class:`Update` says how one training step's gradients update the weights:
  its share of its group's rows (its losses are weighted by it), whether it opens the group (the
  gradients start from zero) and whether it closes it (the optimizer steps after it).

:class:`PartyOptimizer` holds the three together; its ``state_dict`` is the optimizer's plus the
schedule's position, which :meth:`~PartyOptimizer.load_state_dict` restores by replaying the
schedule from its start (every scheduler's own state is Python objects that no checkpoint file
carries faithfully; a replay computes the very same learning rates). The plan's entries for all
of it are here too (:class:`OptimizerSpec`, :class:`ScheduleSpec`: a party's ``optimizer`` table).
Errors are ``ValueError`` naming what is accepted; the plan's validation and the party's set-up
(:mod:`~splitlearn.run.setup`) turn them into ``PlanError`` naming the entry.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

if TYPE_CHECKING:  # torch is imported where it is used: a plan is read (and --help shown) without it
    import torch
    from torch import nn
    from torch.optim import lr_scheduler

__all__ = ["Update", "WHOLE", "optimizer_class", "scheduler_class", "accepted_arguments", "check_arguments",
           "optimizer_arguments", "checking_class", "schedule_maker", "ScheduleSpec", "OptimizerSpec", "no_decay_split", "PartyOptimizer"]

# classes of torch that a plan cannot use, and why
_REFUSED = {
    "sparseadam": "it takes sparse gradients only, and a party's segments give dense ones",
    "lbfgs": "its step needs a closure that evaluates the whole model again, which a party holding one piece "
             "cannot give",
    "lambdalr": "it takes a Python function (lr_lambda), which a plan cannot carry",
    "multiplicativelr": "it takes a Python function (lr_lambda), which a plan cannot carry",
    "sequentiallr": "it takes other schedulers: give one schedule (warmup_steps adds a linear warmup)",
    "chainedscheduler": "it takes other schedulers: give one schedule (warmup_steps adds a linear warmup)",
    "reducelronplateau": "it steps on a validation metric, which is not available yet",
}
_OURS = {"self", "params", "optimizer", "last_epoch", "verbose"}  # given by splitlearn, never by the plan


@dataclass(frozen=True)
class Update:
    """How one training step's gradients update a party's weights (``[train] accumulate``).

    ``share``: the step's rows over its group's (its losses enter backward weighted by it, so the
    group's gradients are those of one batch of all its rows); ``first``: it opens the group
    (gradients start from zero); ``last``: it closes it (the optimizer steps after it)."""

    share: float = 1.0
    first: bool = True
    last: bool = True


WHOLE = Update()  # a step that is a group of its own


def _classes(module: Any, base: type) -> dict[str, type]:
    """Public subclasses of ``base`` in ``module``, by lower-case name."""
    return {n.lower(): c for n in dir(module) if not n.startswith("_") and isinstance(c := getattr(module, n), type)
            and issubclass(c, base) and c is not base}


def _find(name: str, module: Any, base: type, what: str, instead: str) -> type:
    found = _classes(module, base)
    key = name.lower()
    if key in _REFUSED and key in found:
        raise ValueError(f"{what} {found[key].__name__} cannot be used: {_REFUSED[key]}")
    if key not in found:
        accepted = ", ".join(sorted((c.__name__ for k, c in found.items() if k not in _REFUSED), key=str.lower))
        raise ValueError(f"unknown {what} {name!r}; accepted (any case): {accepted}{instead}")
    return found[key]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The :mod:`torch.optim` optimizer named ``name`` (any case); ValueError listing those accepted."""
    import torch

    return _find(name, torch.optim, torch.optim.Optimizer, "optimizer", "; or factory = 'module:function'")


def scheduler_class(name: str) -> type[lr_scheduler.LRScheduler]:
    """The :mod:`torch.optim.lr_scheduler` class named ``name`` (any case); ValueError listing those accepted."""
    from torch.optim import lr_scheduler

    return _find(name, lr_scheduler, lr_scheduler.LRScheduler, "schedule", "")


@functools.lru_cache(maxsize=64)
def _parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    """``cls.__init__``'s parameters, read once per class (every client of a run makes its optimizer)."""
    return inspect.signature(cls.__init__).parameters


def accepted_arguments(cls: type) -> list[str]:
    """The keyword arguments a plan may give ``cls`` (its signature's, less those splitlearn gives)."""
    return [p.name for p in _parameters(cls).values()
            if p.name not in _OURS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_arguments(cls: type, given: dict[str, Any], what: str) -> None:
    """ValueError if ``given`` names an argument ``cls`` does not take (listing those it takes) or lacks one it
    needs; ``what``: how the message names it ("optimizer AdamW")."""
    params = _parameters(cls)
    accepted = accepted_arguments(cls)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValueError(f"{what} takes no argument {unknown[0]!r}; its arguments: {', '.join(accepted)}")
    missing = [k for k in accepted if params[k].default is inspect.Parameter.empty and k not in given]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)} (its arguments: {', '.join(accepted)})")


def optimizer_arguments(cls: type, lr: float, momentum: float, weight_decay: float,
                        arguments: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``cls``: ``lr``; ``momentum`` and ``weight_decay`` where it takes them (0 unless
    given, as the plan's ``sgd``, ``adam`` and ``adamw`` always had: not AdamW's own 0.01), a non-zero one it does
    not take refused; the others as given (lists as tuples, like ``betas``). ValueError naming what it takes."""
    accepted = accepted_arguments(cls)
    kwargs: dict[str, Any] = {"lr": lr}
    for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if key in accepted:
            kwargs[key] = value
        elif value:
            check_arguments(cls, {key: value}, f"optimizer {cls.__name__}")
    check_arguments(cls, {**kwargs, **arguments}, f"optimizer {cls.__name__}")
    return {**kwargs, **{k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}}


def schedule_maker(name: str, arguments: dict[str, Any],
                   warmup_steps: int = 0) -> Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]:
    """A function making the schedule for an optimizer: scheduler ``name`` with ``arguments``; with
    ``warmup_steps`` W, torch's ``LinearLR(start_factor=1 / (W + 1), total_iters=W)`` first, chained to it
    by ``SequentialLR(milestones=[W])``: its k-th step (from 0) uses ``lr * (k + 1) / (W + 1)``, then the
    schedule runs from its own start. ValueError on an argument it does not take or lacks."""
    cls = scheduler_class(name)
    check_arguments(cls, arguments, f"schedule {cls.__name__}")

    def make(optimizer: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
        from torch.optim import lr_scheduler

        main = cls(optimizer, **arguments)
        if not warmup_steps:
            return main
        warm = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps)
        return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])

    return make


def _plain(v: Any) -> bool:
    """A value a plan file can hold: a number, a string, a boolean, or a list of them."""
    return v is None or isinstance(v, (bool, int, float, str)) or isinstance(v, (list, tuple)) and all(map(_plain, v))


def _arguments_beside(cls: type[BaseModel], data: Any) -> Any:
    """Keys that are no field of ``cls`` are a torch class's keyword arguments: they move into ``arguments``
    (tuples given in Python as lists, as a plan file has them)."""
    if not isinstance(data, dict):
        return data
    given = data.get("arguments")
    clash = sorted(k for k in (given if isinstance(given, dict) else {}) if k in cls.model_fields and k != "arguments")
    if clash:  # one value per setting: never an argument that overrides a field in silence
        raise ValueError(f"arguments names {clash}, which are settings of this table: give them beside the name")
    extra = {k: v for k, v in data.items() if k not in cls.model_fields}
    if not extra:
        return data
    body = {k: v for k, v in data.items() if k not in extra}
    body["arguments"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in {**(body.get("arguments") or {}), **extra}.items()}
    return body


def _check_values(arguments: dict[str, Any], what: str) -> None:
    """ValueError unless every argument is a value a plan file can hold."""
    bad = [k for k, v in arguments.items() if not _plain(v)]
    if bad:
        raise ValueError(f"{what}: argument {bad[0]!r} must be a number, a string, a boolean or a list of them")


def _flat_arguments(data: dict[str, Any], unset: dict[str, Any]) -> dict[str, Any]:
    """A serialised entry with its ``arguments`` beside its fields (as a plan gives them) and the fields whose
    value is in ``unset`` left out (a plan without them is written, and hashed, as before they existed)."""
    arguments = data.pop("arguments", None) or {}
    return {**{k: v for k, v in data.items() if not (k in unset and v == unset[k])}, **arguments}


class ScheduleSpec(BaseModel):
    """A learning-rate schedule, in a party's optimizer table: ``schedule = { name = "CosineAnnealingLR",
    T_max = 100, every = "step", warmup_steps = 10 }``. ``name``: any ``torch.optim.lr_scheduler`` class (any
    case) but those taking functions, other schedulers or a metric; its keyword arguments beside it (checked
    against its signature; ``last_epoch`` is splitlearn's). ``every``: stepped after each optimizer step
    (``"step"``) or once per epoch (``"epoch"``). ``warmup_steps`` W: first a linear warmup counted in the same
    steps, the k-th (from 0) at ``lr * (k + 1) / (W + 1)``, then the schedule from its start (torch's ``LinearLR``
    chained by ``SequentialLR``; :func:`schedule_maker`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a plan entry (as splitlearn.core.specs.Strict)

    name: str
    every: Literal["step", "epoch"] = "step"
    warmup_steps: int = Field(0, ge=0)
    arguments: dict[str, Any] = Field(default_factory=dict)  # the scheduler's keyword arguments, given beside the rest

    @model_validator(mode="before")
    @classmethod
    def _beside(cls, data: Any) -> Any:
        return _arguments_beside(cls, data)

    @model_validator(mode="after")
    def _known(self) -> "ScheduleSpec":
        make = schedule_maker(self.name, self.arguments, self.warmup_steps)  # ValueError: what it takes
        _check_values(self.arguments, f"schedule {self.name}")
        import torch

        try:
            make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        except Exception as e:  # noqa: BLE001 - torch's own checks of the values
            raise ValueError(f"schedule {self.name} refused its arguments: {type(e).__name__}: {e}") from None
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: Callable[["ScheduleSpec"], dict[str, Any]]) -> dict[str, Any]:
        return _flat_arguments(handler(self), {})


class OptimizerSpec(BaseModel):
    """A party's optimizer: ``{ name = "AdamW", lr = 3e-4, betas = [0.9, 0.95], weight_decay = 0.1 }``.

    ``name``: any ``torch.optim`` optimizer (any case; not LBFGS, whose step needs a closure), its keyword
    arguments beside it, checked against its signature. ``lr`` (0.1 unless given) is given to every optimizer;
    ``momentum`` and ``weight_decay`` (0 unless given, also for AdamW) to those that take them, and a non-zero
    one is refused by the others. ``factory = "module:function"`` instead: a function of the user's (found as a
    network's factory is) called with the parameters, returning a ``torch.optim.Optimizer``; it sets every
    argument itself. ``no_decay``: parameters without weight decay (a group of their own; see
    :func:`no_decay_split` for what matches). ``schedule``: a :class:`ScheduleSpec`. ``clip_grad_norm``:
    ``torch.nn.utils.clip_grad_norm_`` over this party's parameters before each of its optimizer steps
    (``[train] clip = "global"`` clips over every party's of the network instead).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # a plan entry (as splitlearn.core.specs.Strict)

    name: str = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    arguments: dict[str, Any] = Field(default_factory=dict)  # the optimizer's other keyword arguments, given beside
    no_decay: list[str] = Field(default_factory=list)
    factory: str | None = Field(None, pattern=r"^[\w.]+:\w+$")  # 'module:function' (params) -> Optimizer
    schedule: ScheduleSpec | None = None
    clip_grad_norm: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _beside(cls, data: Any) -> Any:
        if isinstance(data, dict) and "clip" in data:
            raise ValueError(f"clip = {json.dumps(data['clip'], default=repr)}: the norm over every party's "
                             "gradients together is the network's, set in [train]: clip_grad_norm = N with "
                             "clip = \"global\"; clip_grad_norm = N here clips this party's own gradients")
        return _arguments_beside(cls, data)

    @field_validator("no_decay")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not all(v):
            raise ValueError("no_decay lists parts of parameter names, e.g. [\"bias\", \"norm\"]: none may be empty")
        return v

    @model_validator(mode="after")
    def _known(self) -> "OptimizerSpec":
        if self.factory is not None:
            given = sorted(({"name", "lr", "momentum", "weight_decay"} & self.model_fields_set) | set(self.arguments))
            if given:
                raise ValueError(f"factory {self.factory!r} makes the optimizer with its own arguments: give "
                                 f"{', '.join(given)} there, or name the optimizer instead of a factory")
            if self.factory.split(":")[0] == "__main__":
                raise ValueError(f"factory {self.factory!r} lives in the script being run, which other processes "
                                 "cannot import: put it in a module next to the plan")
            return self
        cls = optimizer_class(self.name)  # ValueError: those accepted
        kwargs = optimizer_arguments(cls, self.lr, self.momentum, self.weight_decay, self.arguments)
        _check_values(self.arguments, f"optimizer {cls.__name__}")
        import torch

        try:
            checking_class(cls)([torch.zeros(2, 2, requires_grad=True)], **kwargs)
        except Exception as e:  # noqa: BLE001 - torch's own checks of the values
            raise ValueError(f"optimizer {cls.__name__} refused its arguments: {type(e).__name__}: {e}") from None
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: Callable[["OptimizerSpec"], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        if self.factory is not None:  # it sets them: they are not written
            data = {k: v for k, v in data.items() if k not in ("name", "lr", "momentum", "weight_decay")}
        return _flat_arguments(data, {"no_decay": [], "factory": None, "schedule": None, "clip_grad_norm": None})


def checking_class(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """CLS for a throw-away instance that lets torch check the arguments: its ``add_param_group`` called as
    written, not through ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (1.8 s in
    every process that reads a plan: the launcher, ``inspect``, ``report``). The values are checked by the
    same code; the disabling matters only inside a compiled region, which a plan check is not."""
    plain = getattr(cls.add_param_group, "__wrapped__", None)
    if plain is None:
        return cls
    try:
        return type(cls.__name__, (cls,), {"add_param_group": plain, "__module__": cls.__module__})
    except TypeError:  # a class that cannot be subclassed so: checked as it is
        return cls


def no_decay_split(modules: dict[str, nn.Module], patterns: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters with weight decay, without) of a party's trainable parameters, each in module order.

    A parameter goes without weight decay when its name in its segment's module (as ``named_parameters``
    gives it: ``0.bias``, ``encoder.norm1.weight``) contains one of ``patterns`` (case-sensitive), or, when
    ``"norm"`` is one of them, when it is a parameter of a normalisation layer (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm, RMSNorm), whatever its name (an ``nn.Sequential``'s layers are named by index)."""
    from torch import nn

    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    decay, no_decay = [], []
    for module in modules.values():
        normed = {id(p) for m in module.modules() if "norm" in patterns and isinstance(m, norms)
                  for p in m.parameters(recurse=False)}
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if id(p) in normed or any(s in name for s in patterns) else decay).append(p)
    return decay, no_decay


class PartyOptimizer:
    """A party's optimizer with what its plan entry adds: a learning-rate schedule (``schedule``: a function
    making it for the optimizer; stepped after every optimizer step, ``every = "step"``, or once per epoch,
    ``"epoch"``: see :meth:`begin_epoch`) and ``clip`` (``clip_grad_norm_`` over its parameters before each
    step)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 schedule: Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler] | None = None,
                 every: str = "step", clip: float | None = None):
        self.optimizer, self.make_schedule, self.every, self.clip = optimizer, schedule, every, clip
        self.scheduler = schedule(optimizer) if schedule is not None else None
        self.steps = 0  # the schedule's steps so far
        self.epoch: int | None = None  # per epoch: the epoch of the last training step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def begin_epoch(self, epoch: int) -> None:
        """A training step of ``epoch`` comes: a schedule stepped per epoch steps once for each epoch since the
        last training step's. So each epoch trains at the learning rate of a schedule stepped at every epoch's
        end, and a party that sits an epoch out (a client not drawn) stays in step with the epochs."""
        if self.scheduler is not None and self.every == "epoch":
            last = 0 if self.epoch is None else self.epoch  # a party that first trains in a later epoch catches up
            if epoch > last:
                self._advance(epoch - last)
            self.epoch = max(last, epoch)

    def squared_norm(self) -> float:
        """The sum of the squared 2-norms of the party's gradients (as ``clip_grad_norm_`` takes each tensor's
        norm), in float64: its share of a global clip's total."""
        import torch

        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0).double() for g in grads])
        return float((norms * norms).sum())

    def clip_to(self, max_norm: float, total: float) -> None:
        """Scale the party's gradients as ``clip_grad_norm_(params, max_norm)`` would with ``total`` the norm over
        every parameter of the network: by ``max_norm / (total + 1e-6)`` where that is below 1, computed in the
        gradients' dtype (torch's rule, as its ``clip_grads_with_norm_`` of torch 2.6 and later has it)."""
        import torch

        for g in [p.grad for p in self.parameters() if p.grad is not None]:
            coef = max_norm / (torch.tensor(total, dtype=g.dtype, device=g.device) + 1e-6)
            g.mul_(torch.clamp(coef, max=1.0))

    def step(self) -> None:
        """Clip (its own gradients, where its entry says so), step the optimizer, then a schedule stepped per step."""
        if self.clip is not None:
            from torch import nn

            nn.utils.clip_grad_norm_(self.parameters(), self.clip)
        self.optimizer.step()
        if self.scheduler is not None and self.every == "step":
            self._advance(1)

    def _advance(self, n: int) -> None:
        with warnings.catch_warnings():  # a replay steps the schedule before this optimizer's first step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(n):
                self.scheduler.step()
        self.steps += n

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's ``state_dict``, with ``schedule`` (its steps and last epoch) where there is one."""
        sd = self.optimizer.state_dict()
        return sd if self.scheduler is None else {**sd, "schedule": {"steps": self.steps, "epoch": self.epoch}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a :meth:`state_dict`: the optimizer's state, then the schedule made again from the initial
        learning rates and stepped as often as it was."""
        state = dict(state)
        told = state.pop("schedule", None) or {"steps": 0, "epoch": None}
        self.optimizer.load_state_dict(state)
        if self.make_schedule is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        self.scheduler, self.steps = self.make_schedule(self.optimizer), 0
        self._advance(int(told["steps"]))
        self.epoch = told["epoch"]
