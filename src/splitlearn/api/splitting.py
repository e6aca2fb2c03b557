"""A module of one's own, split: :func:`split_plan` makes the plan, :func:`split` trains it."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError, describe, importable_name
from ..core.load import load_plan
from ..run.report import Progress

from .training import Result, train

__all__ = ["split", "split_plan"]


_EMBEDDED = ("digits", "breast_cancer", "synthetic")


def _data_of(data: Any, id_column: str, label_column: str) -> DataSpec:
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, dict):
        return DataSpec.model_validate(data)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return DataSpec.of_arrays({"x": data[0], "y": data[1]})
    if isinstance(data, str) and data in _EMBEDDED:
        return DataSpec(dataset=data)
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser().resolve()
        if path.is_dir():
            return DataSpec(dataset="mnist", path=str(path))
        if path.suffix.lower() == ".csv" or not path.exists():
            return DataSpec(dataset="csv", path=str(path), id_column=id_column, label_column=label_column)
    raise PlanError(f"data {data!r:.80} is neither an embedded dataset {list(_EMBEDDED)}, a CSV file, an MNIST "
                    "folder nor a pair (inputs, labels) of tensors", entry="data",
                    hint="give e.g. data=\"digits\", data=\"patients.csv\" or data=(x, y)")


def _input_field(model: nn.Module | Callable[[], nn.Module], spec: DataSpec) -> str:
    """``x``, or ``image`` where the dataset has images and the model takes them (a CNN on digits)."""
    from ..data import DataError
    from ..run.rows import read_table as _table

    try:
        table = _table(spec, None, {})
    except DataError as e:
        raise PlanError(str(e), entry="data", hint="check the data given to split()") from None
    if "image" not in table.fields or "x" not in table.fields:
        return "x"
    with torch.random.fork_rng(devices=[]):  # building a throw-away copy leaves the caller's generator alone
        net = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    net.eval()
    with torch.no_grad():
        try:
            net(torch.from_numpy(np.ascontiguousarray(table.fields["x"][:1])))
            return "x"
        except Exception:  # noqa: BLE001 - it does not take flat rows: try the images
            return "image"


def _optimizer_entry(optimizer: Any, lr: float | None, momentum: float,
                     options: dict[str, Any] | None) -> dict[str, Any]:
    """The optimizer table of every party (as a plan file writes it) from what :func:`split_plan` was given."""
    target, kwargs = optimizer, {}
    if isinstance(optimizer, functools.partial):
        if optimizer.args:
            raise PlanError(f"functools.partial({describe(optimizer.func)}, ...) gives positional arguments: a plan "
                            "takes an optimizer's arguments by keyword", entry="optimizer",
                            hint="e.g. functools.partial(torch.optim.AdamW, betas=(0.9, 0.95))")
        target, kwargs = optimizer.func, dict(optimizer.keywords)
    if isinstance(target, str):
        entry: dict[str, Any] = {"factory": target} if ":" in target else {"name": target}
    elif isinstance(target, type) and issubclass(target, torch.optim.Optimizer) \
            and getattr(torch.optim, target.__name__, None) is target:
        entry = {"name": target.__name__}
    elif callable(target) and importable_name(target) is not None:
        entry = {"factory": importable_name(target)}
    else:
        raise PlanError(f"optimizer {describe(target)} cannot be written in the plan, which every party's process "
                        "reads", entry="optimizer",
                        hint="give a torch.optim optimizer's name (\"AdamW\") or class, a functools.partial of one, or "
                        "'module:function' naming a function other processes can import, called with the parameters "
                        "and returning a torch.optim.Optimizer")
    given = {**kwargs, **(options or {})}
    both = sorted(set(kwargs) & set(options or {})
                  | {k for k, v in (("lr", lr), ("momentum", momentum)) if v and k in given})
    if both:
        raise PlanError(f"{', '.join(both)} given twice (in the optimizer, optimizer_options, lr or momentum)",
                        entry="optimizer_options", hint="give each argument once")
    if "factory" in entry:
        if kwargs or lr is not None or momentum:
            raise PlanError(f"factory {entry['factory']!r} is called with the parameters only: it sets the optimizer's "
                            "arguments itself", entry="optimizer", hint="give lr, momentum and the like in the factory")
        return {**entry, **given}
    name = entry["name"]
    return {"name": name, "lr": 1e-3 if lr is None else lr,
            **({"momentum": momentum} if momentum or name == "sgd" else {}), **given}


def split_plan(model: nn.Module | Callable[[], nn.Module], cut: str | int | Sequence[str | int], *,
               data: Any = "digits", inputs: str | None = None, parties: Sequence[str] | None = None,
               epochs: int = 5, batch_size: int = 32, optimizer: Any = "adam", lr: float | None = None,
               momentum: float = 0.0, optimizer_options: dict[str, Any] | None = None, accumulate: int = 1,
               loss: str = "cross_entropy", codec: str = "float32", seed: int = 0,
               device: str = "auto", test_fraction: float | None = None, id_column: str = "id",
               label_column: str = "label", name: str = "split") -> Plan:
    """The plan :func:`split` trains: ``model`` cut after the named submodule(s) ``cut``.

    One cut gives a vanilla split (``client`` holds data and labels and runs the bottom,
    ``server`` the top; a label wire carries the labels). Two cuts give a U-shaped split (the
    client also runs the head and keeps its labels). ``parties`` names who runs each piece, in
    order: ``["hospital", "relay", "server"]`` with two cuts is a multi-hop plan. The first
    party holds the data. ``model`` may be an ``nn.Module`` (copied: the object stays yours)
    or a function returning one; for an ``nn.Sequential`` a cut is a layer's index.

    Every party trains with ``optimizer``: a ``torch.optim`` optimizer's name (any case) or class, a
    ``functools.partial`` of one (its keyword arguments taken), or a ``"module:function"`` string (or such an
    importable function) called with the parameters; ``lr`` (1e-3 unless given) and ``momentum`` go to a named
    one. ``optimizer_options`` is the rest of the optimizer table of a plan file: the optimizer's keyword
    arguments, ``no_decay``, ``schedule`` and ``clip_grad_norm``. ``accumulate``: training batches per
    optimizer step. A callable that is none of these is refused: the plan is written for every party's process.
    """
    cuts = [str(c) for c in ([cut] if isinstance(cut, (str, int)) else cut)]
    if not cuts:
        raise PlanError("give at least one cut (the name of the submodule after which to cut)", entry="cut")
    if parties is None:
        if len(cuts) > 2:
            raise PlanError(f"{len(cuts)} cuts: say which party runs each of the {len(cuts) + 1} pieces",
                            entry="parties", hint='e.g. parties=["hospital", "relay", "server", "hospital"]')
        parties = ["client", "server"] + (["client"] if len(cuts) == 2 else [])
    parties = list(parties)
    if len(parties) != len(cuts) + 1:
        raise PlanError(f"{len(cuts)} cut(s) make {len(cuts) + 1} pieces, but parties lists {len(parties)}: "
                        f"{parties}", entry="parties", hint="name one party per piece, in order")
    spec = _data_of(data, id_column, label_column)
    if test_fraction is not None:
        spec = spec.model_copy(update={"test_fraction": test_fraction})
    holder = parties[0]
    names = (["bottom", "top"] if len(parties) == 2 else ["bottom", "middle", "top"] if len(parties) == 3
             else [f"part{k + 1}" for k in range(len(parties))])
    segments: dict[str, dict] = {}
    for k, (seg, party) in enumerate(zip(names, parties)):
        segments[seg] = {"party": party, "inputs": [f"{holder}.x"] if k == 0 else [names[k - 1]], "network": "model",
                         **({"cut": cuts[k]} if k < len(cuts) else {})}
    opt = _optimizer_entry(optimizer, lr, momentum, optimizer_options)
    body = {
        "name": name, "data": spec, "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                                              **({"accumulate": accumulate} if accumulate != 1 else {})},
        "parties": {p: {"optimizer": opt, "device": device} for p in dict.fromkeys(parties)},
        "networks": {"model": model}, "segments": segments,
        "losses": {"task": {"input": names[-1], "target": f"{holder}.y", "kind": loss}},
        "wires": {seg: {"codec": codec, "grad_codec": codec} for seg in names[:-1]},
    }
    body["parties"][holder]["holds"] = {"x": inputs or _input_field(model, spec), "y": "y"}
    return load_plan(body)


def split(model: nn.Module | Callable[[], nn.Module], cut: str | int | Sequence[str | int], *,
          out: str | Path | None = None, on_step: Callable[[Progress], None] | None = None,
          timeout: float | None = None, **options: Any) -> Result:
    """Split ``model`` after the named submodule(s) ``cut``, train it across the parties in this
    process and return the :class:`Result` (``result.model`` is the trained module, whole).

    >>> result = splitlearn.split(model, cut="layer1", data="digits", epochs=1)
    >>> result["metrics"]["test_accuracy"], result.model

    ``options`` are those of :func:`split_plan` (``data``, ``epochs``, ``parties``, ``lr``, ...).
    """
    return train(split_plan(model, cut, **options), out=out, on_step=on_step, timeout=timeout)
