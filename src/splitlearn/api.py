"""The calls most users need: :func:`split` a module of their own and train it, :func:`train` a
plan, and :func:`predict` from a finished run."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .core import losses
from .core.plan import DataSpec, Plan, PlanError
from .core.load import load_plan
from .data import batches
from .launch.threads import run_local
from .models import build_network
from .launch.results import build_result, load_run_plan, load_weights, save_party, save_result
from .run.session import PartyReport, Progress
from .run.setup import Step, check_plan, prepare, setup_party

__all__ = ["split", "split_plan", "train", "predict", "Result", "LAUNCHERS"]


class Result(dict):
    """What :func:`train` and :func:`split` return: the content of ``result.json`` (a dict: metrics,
    bytes, FLOPs per party, ...) and the trained modules, as objects.

    ``modules`` maps each party to its segments (``{"server": {"top": module}}``); :meth:`network`
    puts a network's trained segments back together as one module; ``model`` is that network
    when the plan has just one; :meth:`save` writes the run folder that ``out=`` writes.
    """

    def __init__(self, body: dict[str, Any], plan: Plan, reports: dict[str, PartyReport] | None = None,
                 read: Callable[[], dict[str, PartyReport]] | None = None):
        super().__init__(body)
        self.plan = plan
        self._given = reports
        self._read = read  # party processes trained: their weights are read from the run folder when asked

    @property
    def _reports(self) -> dict[str, PartyReport]:
        if self._given is None:
            self._given = self._read() if self._read is not None else {}
        return self._given

    @property
    def modules(self) -> dict[str, dict[str, nn.Module]]:
        """Each physical party's trained segments (clients of a ``[clients]`` plan each have theirs)."""
        return {p: dict(r.modules) for p, r in self._reports.items() if r.modules}

    def network(self, name: str | None = None) -> nn.Module:
        """A fresh copy of network ``name`` (the only one if omitted) holding the trained weights of
        every segment cut from it; with ``[clients]``, those of the run's model (the final client)."""
        plan = self.plan
        if name is None:
            if len(plan.networks) != 1:
                raise ValueError(f"the plan has networks {sorted(plan.networks)}: name one")
            name = next(iter(plan.networks))
        if name not in plan.networks:
            raise ValueError(f"no network {name!r}; the plan has {sorted(plan.networks)}")
        segments = [s for s, spec in plan.segments.items() if spec.network == name]
        whole = [s for s in segments if plan.segments[s].layers is None and plan.segments[s].cut is None]
        if len(segments) > 1 and len(whole) == len(segments):
            raise ValueError(f"network {name!r} runs whole in segments {segments}: take each from result.modules")
        net = build_network(plan, name).cpu()
        state: dict[str, torch.Tensor] = {}
        for s in segments:
            party = plan.segments[s].party
            if plan.clients is not None and party == plan.clients.template:
                party = self.get("final_client")
                if party is None:
                    raise ValueError(f"a {plan.clients.schedule} run has no single model: take each client's from "
                                     "result.modules")
            state.update({k: v.detach().cpu() for k, v in self._reports[party].modules[s].state_dict().items()})
        unexpected = set(state) - set(net.state_dict())
        if unexpected:  # the segments were not cut from this network: nothing would be loaded right
            raise ValueError(f"segments of {name!r} hold {sorted(unexpected)[:3]}, which the network has not")
        net.load_state_dict(state, strict=False)
        return net

    @property
    def model(self) -> nn.Module:
        """The trained network when the plan has one network (see :meth:`network`)."""
        return self.network()

    def save(self, out: str | Path) -> Path:
        """Write the run folder (``result.json``, ``plan.json``, ``parties/NAME/weights.safetensors``)
        that ``predict`` reads; what the audit needs is recorded only when training with ``out=``."""
        out = Path(out)
        for name, rep in self._reports.items():
            save_party(out / "parties" / name, rep)
        save_result(out, self.plan, dict(self))
        return out


LAUNCHERS = ("threads", "processes", "ray")


def train(plan: Plan | str | Path | dict, *, launcher: str = "threads", epochs: int | None = None,
          seed: int | None = None, out: str | Path | None = None, on_step: Callable[[Progress], None] | None = None,
          timeout: float | None = None, log: str | None = None, resume: bool = False, insecure: bool = False,
          link: str | None = None, ray_address: str | None = None) -> Result:
    """Train a plan; return (and with ``out``, write) the :class:`Result`.

    ``launcher`` says where the parties run: ``"threads"`` (every party in this process, over the
    in-process transport: the simulation), ``"processes"`` (one process per party on loopback gRPC
    with mutual TLS, throw-away certificates unless ``insecure``; ``link`` emulates a slow network,
    e.g. ``"50ms,100mbit"``) or ``"ray"`` (each party process a Ray actor on the cluster at
    ``ray_address``, default a local one). Processes read the plan from its file and write to ``out``
    (required), from which the result's modules are read back.

    Where the plan names a network, a plan built in Python may give an ``nn.Module`` (each
    party trains a copy of its part; the object is left as it is) or a function returning one (threads only).

    ``on_step`` is told the :class:`~splitlearn.run.session.Progress` after every step (with
    ``[clients]``: every round), with the training loss. ``timeout`` bounds each step (default
    600 s; with ``[clients]``, ``clients.timeout``, which also bounds each answer of the schedule).
    ``out`` receives ``result.json``, ``plan.json`` and per party ``parties/NAME/``: its weights
    (safetensors), what it received (for ``splitlearn audit``), its report and its checkpoints
    (``[train] checkpoint_every`` training steps, and every epoch's end); ``resume`` goes on from
    the last checkpoint every party holds there, to the same weights as a run never stopped. ``log`` streams
    the metrics to ``"tensorboard[:DIR]"`` or ``"mlflow[:URI]"`` (see :mod:`splitlearn.run.tracking`).
    """
    if launcher not in LAUNCHERS:  # before the data is read
        raise PlanError(f"unknown launcher {launcher!r}", entry="launcher", hint=f"choose one of {list(LAUNCHERS)}")
    checked, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    return train_prepared(checked, setups, shapes, launcher=launcher, source=plan, epochs=epochs, seed=seed, out=out,
                          on_step=on_step, timeout=timeout, log=log, resume=resume, insecure=insecure, link=link,
                          ray_address=ray_address)


def train_prepared(plan: Plan, setups: dict, shapes: dict, *, launcher: str = "threads",
                   source: Plan | str | Path | dict | None = None, epochs: int | None = None, seed: int | None = None,
                   out: str | Path | None = None, on_step: Callable[[Progress], None] | None = None,
                   timeout: float | None = None, faults: dict | None = None, log: str | None = None,
                   resume: bool = False, insecure: bool = False, link: str | None = None,
                   ray_address: str | None = None) -> Result:
    """:func:`train` after :func:`~splitlearn.run.setup.prepare` (which checks the plan end to end);
    ``source`` is what the plan was read from (party processes read it again), ``epochs`` and ``seed``
    the overrides it was prepared with."""
    from .run.tracking import finish_tracking, parse_log

    if launcher not in LAUNCHERS:
        raise PlanError(f"unknown launcher {launcher!r}", entry="launcher", hint=f"choose one of {list(LAUNCHERS)}")
    if resume and out is None:
        raise PlanError("resume needs the run folder (out) whose checkpoints to go on from", entry="--resume")
    if launcher != "threads":
        return _train_in_processes(plan, source, launcher, epochs=epochs, seed=seed, out=out, on_step=on_step,
                                   log=log, resume=resume, insecure=insecure, link=link, ray_address=ray_address)
    for given, what in ((link, "link"), (ray_address, "ray_address")):
        if given is not None:
            raise PlanError(f"{what} applies to party processes, not to launcher='threads'", entry=what)
    tracking = parse_log(log, out) if log else None
    reports = run_local(plan, setups, shapes, on_step=on_step, timeout=timeout, record=out is not None, faults=faults,
                        tracking=tracking, out=out, resume=resume)
    result = Result(build_result(plan, reports, {"transport": "in-process"}), plan, reports)
    if out is not None:
        result.save(out)
    if tracking is not None:
        finish_tracking(tracking, plan, result)
    return result


def _train_in_processes(plan: Plan, source: Any, launcher: str, *, out: str | Path | None, **kw: Any) -> Result:
    """One process per party (or Ray actor), from the plan's file; the modules read back from ``out``."""
    from .clients.layout import Topology
    from .run.setup import build_modules

    path = source if isinstance(source, (str, Path)) else getattr(source, "_source", None) or plan._source
    if path is None:
        raise PlanError(f"launcher={launcher!r} starts party processes, which read the plan from its file: this plan "
                        "was built in Python", entry="launcher", hint="save it as a TOML file, or use launcher='threads'")
    if out is None:
        raise PlanError(f"launcher={launcher!r}: party processes write their weights and reports to a run folder",
                        entry="out", hint="give out=FOLDER")
    out = Path(out)
    if launcher == "ray":
        from .launch.onray import launch_ray

        for what in ("link", "log"):
            if kw.get(what) is not None:
                raise PlanError(f"{what} is not available with launcher='ray'", entry=what)
        body = launch_ray(path, out, address=kw["ray_address"] or "local", epochs=kw["epochs"], seed=kw["seed"],
                          insecure=kw["insecure"], checked=plan, resume=kw["resume"])
    else:
        from .launch.processes import launch

        if kw.get("ray_address") is not None:
            raise PlanError("ray_address applies to launcher='ray'", entry="ray_address")
        body = launch(path, out, epochs=kw["epochs"], seed=kw["seed"], insecure=kw["insecure"], on_step=kw["on_step"],
                      checked=plan, log=kw["log"], resume=kw["resume"], link=kw["link"])

    def read() -> dict[str, PartyReport]:
        topo, reports = Topology.of(plan), {}
        for name in topo.names:
            plays, weights = topo.plays(plan, name), out / "parties" / name / "weights.safetensors"
            if plays is None or not weights.is_file():
                continue
            modules = build_modules(plan, plays, [s for s, spec in plan.segments.items() if spec.party == plays])
            load_weights(weights, modules)
            reports[name] = PartyReport(name, plays=plays, modules=modules)
        return reports

    return Result(body, plan, read=read)


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
    from .data import DataError
    from .run.setup import _table

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


def predict(run_dir: str | Path, data: DataSpec | dict | str | Path | None = None, *, write: bool = True,
            networks: dict[str, nn.Module | Callable[[], nn.Module]] | None = None,
            id_column: str | None = None) -> dict[str, dict]:
    """Run a trained plan forward on new data (default: the run's test split).

    ``data``: one source for every party (a :class:`DataSpec` or its dict), or one per party
    (``{"clinic_a": "a.csv", "clinic_b": DataSpec(...)}``; a path keeps the party's own
    settings), or one file's path when one party holds data; ``id_column`` names the id column of
    files given by path (default: as at training). Each party loads only its own weights and its own preprocessing (fitted on its
    training rows, saved beside its weights), so one new row is predicted as it would be in a
    batch. Predictions arrive at the party that owns each head and are written to
    ``RUN_DIR/parties/PARTY/predictions.csv`` (the decided class and, for classification, each
    class's probability; a target its holder standardised, ``standardize_target``, is predicted in its
    own units, with the holder's saved scale: ``outputs`` too); the returned dict maps each task to
    ``{"party", "ids", "outputs", "predictions", "probabilities", "classes", "unmatched"}`` (``classes``:
    the names text labels were mapped from in training; ``unmatched``: per party, the ids of its rows that not every party holds, when
    the plan aligns rows with ``align = "psi"``: they are not predicted). ``networks`` gives again the networks the run was given
    as Python objects (their architecture; the weights come from the run folder).
    """
    from .data.preprocess import wants_preprocess
    from .launch.results import load_preprocess
    from .run.setup import data_spec, holds_data, party_file, party_table

    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    plan = load_run_plan(run_dir, networks)
    if plan.clients is not None:
        from .clients.strategies import strategy_of

        if not strategy_of(plan.clients).one_model:
            raise PlanError(f"this run's schedule is {plan.clients.schedule!r}: every client trained a model of its "
                            "own and there is no single model to predict with", file=run_dir,
                            hint="each client's model: its own weights (parties/CLIENT/weights.safetensors) and the "
                                 "fixed parties' copy for it (parties/PARTY/weights-CLIENT.safetensors)")
    template = plan.clients.template if plan.clients is not None else None
    if plan.clients is not None:
        plan = plan.replace(clients=None)  # the run's one model, between the plan's parties
    aligned = plan.data.align == "psi"  # rows are matched as in training: by the ids every party holds
    if aligned:  # every party's rows are here, in one process: their intersection is taken directly
        plan = plan.replace(data=plan.data.model_copy(update={"align": "exact"}))
    per: dict[str, DataSpec] = {}
    holders = [p for p in plan.parties if holds_data(plan, p)]
    if isinstance(data, (str, Path)):
        if len(holders) != 1:
            raise PlanError(f"data {str(data)!r}: several parties hold data ({holders}); say whose each file is",
                            entry="--data", hint="--data NAME=FILE once per party (in Python: {NAME: FILE})")
        data = {holders[0]: data}
    if isinstance(data, dict) and data and all(isinstance(d, (str, Path)) for d in data.values()):
        unknown = sorted(set(data) - set(plan.parties))
        if unknown:
            raise PlanError(f"new data for {unknown}, which are no parties of the run", entry="--data",
                            hint=f"parties with data: {holders}")
    if isinstance(data, dict) and data and set(data) <= set(plan.parties) and "dataset" not in data:
        for party, d in data.items():
            if not holds_data(plan, party):
                raise PlanError(f"party {party!r} holds no data, so it takes no data file", entry="--data",
                                hint=f"parties with data: {[p for p in plan.parties if holds_data(plan, p)]}")
            if isinstance(d, (str, Path)):
                if not Path(d).expanduser().exists():
                    raise PlanError(f"data of {party!r}: no such file or folder {str(Path(d).expanduser().resolve())!r}",
                                    entry="--data")
                per[party] = party_file(plan, party, d)
                if id_column is not None:
                    per[party] = per[party].model_copy(update={"id_column": id_column})
            else:
                per[party] = d if isinstance(d, DataSpec) else DataSpec.model_validate(d)
        missing = [p for p in plan.parties if holds_data(plan, p) and p not in per]
        if missing:
            raise PlanError(f"new data for {sorted(per)} but not for {missing}: every party with data needs its rows",
                            entry="--data", hint="give --data NAME=FILE once for each party that holds data")
    elif data is not None:
        if not isinstance(data, (DataSpec, dict)):
            raise PlanError(f"predict takes data as a DataSpec or its dict, not a {type(data).__name__}", entry="data",
                            hint="for tensors: DataSpec.of_arrays({'x': x}) with the field names the plan's parties hold")
        spec = DataSpec.model_validate(data) if isinstance(data, dict) else data
        per = {p: spec for p in plan.parties if holds_data(plan, p)}
    per = {p: _without_absent_labels(d) for p, d in per.items()}
    new_rows = bool(per)  # new data: every row is predicted; else the run's test rows
    try:
        recorded = json.loads((run_dir / "result.json").read_text())
        final = recorded.get("final_client")
    except (OSError, ValueError, AttributeError):
        recorded, final = {}, None
    classes = _recorded_classes(plan, recorded if isinstance(recorded, dict) else {})
    for p, names in classes.items():  # new labels are read with the training's mapping, never a new sorted one
        if holds_data(plan, p):
            spec = per.get(p) or data_spec(plan, p, final if p == template else None)
            if spec is not None and spec.label_column and "classes" not in spec.options:
                per[p] = spec.model_copy(update={"options": {**spec.options, "classes": names}})
    cache: dict = {}
    setups = {}
    for p in plan.parties:
        folder = run_dir / "parties" / p
        try:
            pre = load_preprocess(folder / "preprocess.safetensors")
        except ValueError as e:
            raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
        spec = per.get(p)
        client = final if p == template else None  # per-client files: the final client's test rows
        if pre is None and holds_data(plan, p):
            own = spec or data_spec(plan, p, client or "")
            if own is not None and wants_preprocess(own.options):
                raise PlanError(f"party {p!r} standardises its data, but the run holds no preprocessing for it "
                                f"({folder / 'preprocess.safetensors'})", file=run_dir,
                                hint="train again with this version of splitlearn")
        try:
            if spec is not None and holds_data(plan, p):  # read once (cached): its columns checked before any use
                _check_columns(plan, p, party_table(plan, p, cache, spec, client),
                               recorded if isinstance(recorded, dict) else {})
            setups[p] = setup_party(plan, p, cache, spec, predict=True, preprocess=pre, client=client)
        except PlanError as e:
            raise e.in_file(e.file or run_dir) from None
    for p, s in setups.items():
        path = run_dir / "parties" / p / "weights.safetensors"
        if s.modules:
            if not path.is_file():
                raise PlanError(f"no weights for party {p!r} at {path}", file=run_dir, hint="train with --out first")
            try:
                load_weights(path, s.modules)
            except ValueError as e:
                raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
    unmatched: dict[str, list] = {}
    if aligned:
        holders = [s for s in setups.values() if s.table is not None]
        common = holders[0].splits.ids
        for s in holders[1:]:
            common = np.intersect1d(common, s.splits.ids)
        if not len(common):
            raise PlanError("no id is held by every party: nothing can be predicted", file=run_dir,
                            hint="give each party's rows of the same patients (matched by id)")
        for s in holders:
            alone = np.setdiff1d(s.splits.ids, common)
            if len(alone):
                if new_rows:  # (the run's own rows outside the intersection were never part of it)
                    unmatched[s.name] = alone.tolist()
                s.restrict(common)
    shapes = check_plan(setups)
    first = next(s for s in setups.values() if s.table is not None)
    rows = first.splits.test if not new_rows else np.arange(len(first.splits.ids))
    steps = [Step(i, "predict", 0, torch.from_numpy(rows[b]))
             for i, b in enumerate(batches(len(rows), plan.train.eval_batch_size, 0, 0, shuffle=False))]
    reports = run_local(plan, setups, shapes, steps=steps, predicting=True)
    ids = first.splits.ids[rows]
    out: dict[str, dict] = {}
    for party, rep in reports.items():
        for task, chunks in rep.predictions.items():
            outputs = torch.cat(chunks)
            kind = losses.get(plan.losses[task].kind)
            probs = kind.probabilities(outputs.float()) if kind.probabilities is not None else None
            owner, _, local = plan.losses[task].target.partition(".")
            saved = setups[owner].preprocess if owner in setups else None  # the holder's, from the run folder
            scale = saved.targets.get(local) if saved is not None else None
            if scale is not None:  # the model learnt the standardised target: predictions in its own units
                outputs = torch.from_numpy(scale.undo(outputs.numpy()))
            out[task] = {"party": party, "ids": ids.tolist(), "outputs": outputs,
                         "predictions": losses.decide(plan.losses[task].kind, outputs).tolist(),
                         "probabilities": None if probs is None else probs.tolist(),
                         "classes": classes.get(owner) if kind.classification else None,
                         "unmatched": unmatched}
        if rep.predictions and write:
            _write_predictions(run_dir / "parties" / party / "predictions.csv", out, party)
    return out


def _check_columns(plan: Plan, name: str, table: Any, result: dict) -> None:
    """New rows must have the feature columns the model was trained on, in the same order: a missing,
    extra or moved column is named (a model fed moved columns would predict nonsense without a word).
    Columns named in another way entirely (an embedded dataset's names against a file's) are left to the
    shape checks."""
    parties = result.get("parties") if isinstance(result.get("parties"), dict) else {}
    trained = ((parties.get(name) or {}).get("data") or {}).get("schema") or {}
    for local, ref in plan.parties[name].holds.items():
        want, have = (trained.get(local) or {}).get("columns"), table.columns.get(ref.field)
        if not isinstance(want, list) or have is None:
            continue
        if ref.columns is not None:
            have = have[ref.columns[0]:ref.columns[1]]
        if have != want and set(have) & set(want):  # (names from another source entirely: only counts can tell)
            missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
            problem = (f"lacks column(s) {missing}" if missing else f"has column(s) {extra} the model was not trained on"
                       if extra else f"has the columns in another order ({have}; trained on {want})")
            raise PlanError(f"party {name!r}: its new data {problem}", entry=f"parties.{name}.holds.{local}",
                            hint=f"give a file with the training's columns, in this order: {want}")


def _recorded_classes(plan: Plan, result: dict) -> dict[str, list[str]]:
    """Label holder -> the class names its labels were mapped to in training (``result.json``'s data schema),
    for the holders whose labels were text."""
    out: dict[str, list[str]] = {}
    parties = result.get("parties") if isinstance(result.get("parties"), dict) else {}
    for loss in plan.losses.values():
        owner, _, local = loss.target.partition(".")
        entries = [v for k, v in parties.items() if isinstance(v, dict) and (k == owner or v.get("plays") == owner)]
        for entry in entries:
            names = (((entry.get("data") or {}).get("schema") or {}).get(local) or {}).get("classes")
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                out[owner] = names
                break
    return out


def _without_absent_labels(spec: DataSpec) -> DataSpec:
    """New rows need no labels: a table without the training's label column is read without it."""
    if not spec.label_column or spec.dataset not in ("csv", "parquet") or not spec.path:
        return spec
    path = Path(spec.path).expanduser()
    try:
        if spec.dataset == "csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = [h.strip() for h in next(csv.reader(f), [])]
        else:
            import pyarrow.parquet as pq

            header = list(pq.read_schema(path).names)
    except Exception:  # noqa: BLE001 - the reader names the problem with the file
        return spec
    return spec if spec.label_column in header else spec.model_copy(update={"label_column": None})


def _write_predictions(path: Path, out: dict[str, dict], party: str) -> None:
    tasks = [t for t, v in out.items() if v["party"] == party]
    path.parent.mkdir(parents=True, exist_ok=True)
    def columns(t: str) -> list[str]:
        probs = out[t]["probabilities"]
        k = len(probs[0]) if probs else 0
        return [t] + [f"{t}_p{c}" for c in range(k)]

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *(c for t in tasks for c in columns(t))])
        for i, id_ in enumerate(out[tasks[0]]["ids"]):
            row = [id_]
            for t in tasks:
                names, decided = out[t].get("classes"), out[t]["predictions"][i]
                row.append(names[decided] if names and 0 <= decided < len(names) else decided)
                if out[t]["probabilities"]:
                    row += [f"{p:.6g}" for p in out[t]["probabilities"][i]]
            w.writerow(row)
