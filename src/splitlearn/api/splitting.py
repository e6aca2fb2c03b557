"""A module of one's own, split: :func:`split_plan` makes the plan, :func:`split` trains it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError
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


def split_plan(model: nn.Module | Callable[[], nn.Module], cut: str | int | Sequence[str | int], *,
               data: Any = "digits", inputs: str | None = None, parties: Sequence[str] | None = None,
               epochs: int = 5, batch_size: int = 32, optimizer: str = "adam", lr: float = 1e-3,
               momentum: float = 0.0, loss: str = "cross_entropy", codec: str = "float32", seed: int = 0,
               device: str = "auto", test_fraction: float | None = None, id_column: str = "id",
               label_column: str = "label", name: str = "split") -> Plan:
    """The plan :func:`split` trains: ``model`` cut after the named submodule(s) ``cut``.

    One cut gives a vanilla split (``client`` holds data and labels and runs the bottom,
    ``server`` the top; a label wire carries the labels). Two cuts give a U-shaped split (the
    client also runs the head and keeps its labels). ``parties`` names who runs each piece, in
    order: ``["hospital", "relay", "server"]`` with two cuts is a multi-hop plan. The first
    party holds the data. ``model`` may be an ``nn.Module`` (copied: the object stays yours)
    or a function returning one; for an ``nn.Sequential`` a cut is a layer's index.
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
    opt = {"name": optimizer, "lr": lr, **({"momentum": momentum} if optimizer == "sgd" else {})}
    body = {
        "name": name, "data": spec, "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed},
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
