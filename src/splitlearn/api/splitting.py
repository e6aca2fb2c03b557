"""A module of one's own, split: :func:`split_plan` makes the plan, :func:`split` trains it."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pydantic import ValidationError

from ..core.plan import Plan, from_validation_error
from ..core.specs import DataSpec, PlanError, describe, importable_name
from ..core.load import load_plan
from ..run.report import Progress

from .training import Result, train

__all__ = ["split", "split_plan", "with_cut_outputs"]


_EMBEDDED = ("digits", "breast_cancer", "synthetic")


def _data_of(data: Any, id_column: str, label_column: str) -> DataSpec:
    """``data`` as the plan's ``[data]``. A torch ``Dataset`` or ``DataLoader`` (or a pair ``(train, test)`` of them)
    is streamed (:mod:`splitlearn.data.torchdata`): a DataLoader's sampler, collate_fn and workers are used."""
    from ..data import DataError
    from ..data.torchdata import is_torch_data

    if isinstance(data, DataSpec):
        return data
    if isinstance(data, dict):
        return DataSpec.model_validate(data)
    torch_pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(map(is_torch_data, data))
    if is_torch_data(data) or torch_pair:
        try:
            return DataSpec.of_torch(*(data if torch_pair else (data,)))
        except DataError as e:
            raise PlanError(str(e), entry="data", hint="give a map-style Dataset or a DataLoader over one (and the "
                            "test rows apart: data=(loader, test_loader))") from None
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
                    "folder, a pair (inputs, labels) of tensors nor a torch Dataset or DataLoader", entry="data",
                    hint="give e.g. data=\"digits\", data=\"patients.csv\" or data=(x, y)")


def _data_with(spec: DataSpec, **changes: Any) -> DataSpec:
    """``spec`` with the ``changes`` given (not None), each validated as a plan's ``[data]`` entry would be; rows
    given in Python stay."""
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        return spec
    try:
        DataSpec.model_validate({**spec.model_dump(), **given})
    except ValidationError as e:
        err = from_validation_error(e)
        raise PlanError(err.message, entry=err.entry, hint=err.hint) from None
    return spec.model_copy(update=given)


def _input_field(model: nn.Module | Callable[[], nn.Module], spec: DataSpec) -> str:
    """``x``, or ``image`` where the dataset has images and the model takes them (a CNN on digits)."""
    from ..data import DataError
    from ..run.rows import read_table as _table

    if spec.dataset == "torch":  # its fields are the items' own: x (or give inputs=)
        return "x"
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
               device: str = "auto", test_fraction: float | None = None, test_data: Any = None,
               validation_fraction: float | None = None, early_stop: dict[str, Any] | None = None,
               id_column: str = "id", label_column: str = "label", name: str = "split") -> Plan:
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

    ``data`` may be a torch ``Dataset`` or ``DataLoader`` (read a batch at a time, in this process), its test rows
    ``test_data`` (another one). ``validation_fraction`` carves validation rows from the training rows, scored every
    epoch; ``early_stop`` (``{"metric": "val_roc_auc", "patience": 3}``) stops when their figure stops improving,
    keeping the best epoch's weights (a plan's ``[data]`` and ``[train]`` entries of the same names).
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
    if test_data is not None:
        from ..data.torchdata import is_torch_data

        if not (is_torch_data(data) and is_torch_data(test_data)):
            raise PlanError("test_data gives the test rows of a torch Dataset or DataLoader apart: give both data and "
                            "test_data as such", entry="test_data", hint="other data: test_fraction=0.2")
        data = (data, test_data)
    spec = _data_with(_data_of(data, id_column, label_column), test_fraction=test_fraction,
                      validation_fraction=validation_fraction)
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
                                              **({"accumulate": accumulate} if accumulate != 1 else {}),
                                              **({"early_stop": early_stop} if early_stop is not None else {})},
        "parties": {p: {"optimizer": opt, "device": device} for p in dict.fromkeys(parties)},
        "networks": {"model": model}, "segments": segments,
        "losses": {"task": {"input": names[-1], "target": f"{holder}.y", "kind": loss}},
        "wires": {seg: {"codec": codec, "grad_codec": codec} for seg in names[:-1]},
    }
    body["parties"][holder]["holds"] = {"x": inputs or _input_field(model, spec), "y": "y"}
    return with_cut_outputs(body)


def with_cut_outputs(body: dict[str, Any], network: str = "model") -> Plan:
    """The plan of ``body``, its segments cut from ``network`` declaring the ``outputs`` a skip connection across
    their cut makes them return (:func:`~splitlearn.models.cut.cut_outputs`); a cut that cannot be made is left
    for building the segments to refuse, naming why."""
    from ..models import build_network
    from ..models.cut import CutError, cut_outputs

    from ..models.build import is_hf_network

    plan = load_plan(body)
    if is_hf_network(plan, network):  # its pieces return (hidden states, mask): declared where the plan is made
        return plan
    mine = [s for s, seg in plan.segments.items() if seg.network == network]
    cuts = [plan.segments[s].cut for s in mine if plan.segments[s].cut is not None]
    if not cuts or any(plan.segments[s].layers is not None for s in mine):
        return plan
    try:
        names = cut_outputs(build_network(plan, network), cuts)
    except (CutError, PlanError):
        return plan
    bounded = [s for s in mine if plan.segments[s].cut is not None]
    if not any(names):
        return plan
    for seg, outputs in zip(bounded, names):
        if outputs:
            body["segments"][seg]["outputs"] = outputs
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
