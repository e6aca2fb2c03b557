"""Training a plan: :func:`train` with a launcher, and the :class:`Result` it returns."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.load import load_plan
from ..core.plan import Plan
from ..core.specs import PlanError
from ..clients.results import model_holder
from ..launch.threads import run_local
from ..models import build_network
from ..models.hf import HFPiece
from ..launch.results import build_result, load_weights, save_party, save_result
from ..run.report import PartyReport, Progress
from ..run.setup import prepare

__all__ = ["Result", "train", "train_prepared", "LAUNCHERS"]


class Result(dict):
    """What :func:`train` and :func:`split` return: the content of ``result.json`` (a dict: metrics,
    bytes, FLOPs per party, ...) and the trained modules, as objects.

    ``modules`` maps each party to its segments (``{"server": {"top": module}}``); :meth:`network`
    puts a network's trained segments back together as one module; ``model`` is that network
    when the plan has just one; :meth:`save` writes the run folder that ``out=`` writes.
    """

    def __init__(self, body: dict[str, Any], plan: Plan, reports: dict[str, PartyReport] | None = None,
                 folder: Path | None = None):
        super().__init__(body)
        self.plan = plan
        self._given = reports
        self._folder = folder  # party processes trained and wrote it: weights are read from it when asked

    @property
    def _reports(self) -> dict[str, PartyReport]:
        if self._given is None:
            self._given = _read_weights(self.plan, self._folder) if self._folder is not None else {}
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
        trained = [s for s in segments if any(c.startswith("defense_") for c, _ in
                                              self._reports[model_holder(plan, plan.segments[s].party,
                                                                         self.get("final_client"))].modules[s].named_children())]
        if trained:  # (MID): the trained model runs the defense's layers between its segments; the network has none
            raise ValueError(f"segments {trained} of network {name!r} hold a defense's trained layers (their wires' "
                             f"[wires.X] mid): the model is its segments with them; take each from result.modules")
        net = build_network(plan, name).cpu()
        state: dict[str, torch.Tensor] = {}
        for s in segments:
            party = model_holder(plan, plan.segments[s].party, self.get("final_client"))
            state.update({k: v.detach().cpu() for k, v in self._reports[party].modules[s].state_dict().items()})
        unexpected = set(state) - set(net.state_dict())
        if unexpected:  # the segments were not cut from this network: nothing would be loaded right
            raise ValueError(f"segments of {name!r} hold {sorted(unexpected)[:3]}, which the network has not")
        net.load_state_dict(state, strict=False)
        return net.hf if isinstance(net, HFPiece) else net  # a transformers model: the model itself, adapters in

    @property
    def model(self) -> nn.Module:
        """The trained network when the plan has one network (see :meth:`network`)."""
        return self.network()

    def save(self, out: str | Path) -> Path:
        """Write the run folder (``result.json``, ``plan.json``, ``parties/NAME/weights.safetensors``)
        that ``predict`` reads; what the audit needs is recorded only when training with ``out=``.
        A run of party processes is copied from the folder they wrote, as they wrote it."""
        out = Path(out)
        if self._folder is not None:
            if out.resolve() != Path(self._folder).resolve():
                shutil.copytree(self._folder, out, dirs_exist_ok=True)
            return out
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
    in-process transport, the parties taking turns on the calling thread: the simulation), ``"processes"`` (one process per party on loopback gRPC
    with mutual TLS, throw-away certificates unless ``insecure``; ``link`` emulates a slow network,
    e.g. ``"50ms,100mbit"``) or ``"ray"`` (each party process a Ray actor on the cluster at
    ``ray_address``, default a local one). Processes read the plan from its file and write to ``out``
    (required), from which the result's modules are read back.

    Where the plan names a network, a plan built in Python may give an ``nn.Module`` (each
    party trains a copy of its part; the object is left as it is) or a function returning one (threads only).

    ``on_step`` is told the :class:`~splitlearn.run.report.Progress` after every step (with
    ``[clients]``: every round), with the training loss. ``timeout`` bounds each step (default: the
    plan's ``[train] step_timeout``, 120 s unless set, whatever the schedule; ``clients.timeout``
    bounds a coordinator's wait for an answer, never a step).
    ``out`` receives ``result.json``, ``plan.json`` and per party ``parties/NAME/``: its weights
    (safetensors), what it received (for ``splitlearn audit``), its report and its checkpoints
    (``[train] checkpoint_every`` training steps, and every epoch's end); ``resume`` goes on from
    the last checkpoint every party holds there, to the same weights as a run never stopped. ``log`` streams
    the metrics to ``"tensorboard[:DIR]"`` or ``"mlflow[:URI]"`` (see :mod:`splitlearn.run.tracking`).
    """
    _check_launcher(launcher)  # before the data is read
    from ..launch.processes import cool_down, warm_up

    if launcher == "processes":
        warm_up()  # the party processes' forker imports torch while the plan is read and checked
    try:
        checked, setups, shapes = prepare(plan, epochs=epochs, seed=seed, probe=launcher != "threads")
        return train_prepared(checked, setups, shapes, launcher=launcher, source=plan, epochs=epochs, seed=seed,
                              out=out, on_step=on_step, timeout=timeout, log=log, resume=resume, insecure=insecure,
                              link=link, ray_address=ray_address)
    finally:
        cool_down()  # a forker the run did not take (a plan refused first) is not left idle


def train_prepared(plan: Plan, setups: dict, shapes: dict, *, launcher: str = "threads",
                   source: Plan | str | Path | dict | None = None, epochs: int | None = None, seed: int | None = None,
                   out: str | Path | None = None, on_step: Callable[[Progress], None] | None = None,
                   timeout: float | None = None, faults: dict | None = None, log: str | None = None,
                   resume: bool = False, insecure: bool = False, link: str | None = None,
                   ray_address: str | None = None, on_status: Callable[[str, str], None] | None = None,
                   log_format: str = "text") -> Result:
    """:func:`train` after :func:`~splitlearn.run.setup.prepare` (which checks the plan end to end);
    ``source`` is what the plan was read from (party processes read it again), ``epochs`` and ``seed``
    the overrides it was prepared with; ``on_status``: party processes serve their live status, and each one's
    address is given to it (``name, url``); ``log_format``: ``json`` writes their logs as JSON lines."""
    from ..run.tracking import finish_tracking, parse_log

    _check_launcher(launcher)
    if resume and out is None:
        raise PlanError("resume needs the run folder (out) whose checkpoints to go on from", entry="--resume")
    if launcher != "processes":
        for given, what in ((on_status, "on_status"), (None if log_format == "text" else log_format, "log_format")):
            if given is not None:
                raise PlanError(f"{what} applies to party processes started by launcher='processes', not "
                                f"launcher={launcher!r}", entry=what)
    if launcher != "threads":
        for given, what, why in ((timeout, "timeout", "set [train] step_timeout in the plan: every party process reads "
                                  "it"), (faults, "faults", "faults are test hooks of in-process parties"),
                                 (on_step if launcher == "ray" else None, "on_step", "Ray actors report no progress")):
            if given is not None:
                raise PlanError(f"{what} does not reach launcher={launcher!r}: {why}", entry=what)
        setups.clear()  # each party process builds its own: the tables prepared here are not held for the run
        return _train_in_processes(plan, source, launcher, epochs=epochs, seed=seed, out=out, on_step=on_step,
                                   log=log, resume=resume, insecure=insecure, link=link, ray_address=ray_address,
                                   on_status=on_status, log_format=log_format)
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


def _check_launcher(launcher: str) -> None:
    if launcher not in LAUNCHERS:
        raise PlanError(f"unknown launcher {launcher!r}", entry="launcher", hint=f"choose one of {list(LAUNCHERS)}")


def _train_in_processes(plan: Plan, source: Any, launcher: str, *, out: str | Path | None, **kw: Any) -> Result:
    """One process per party (or Ray actor), from the plan's file; the modules read back from ``out``."""
    path = source if isinstance(source, (str, Path)) else getattr(source, "_source", None) or plan._source
    if path is None:
        raise PlanError(f"launcher={launcher!r} starts party processes, which read the plan from its file: this plan "
                        "was built in Python", entry="launcher", hint="save it as a TOML file, or use launcher='threads'")
    if out is None:
        raise PlanError(f"launcher={launcher!r}: party processes write their weights and reports to a run folder",
                        entry="out", hint="give out=FOLDER")
    kw = {**kw, "epochs": plan.train.epochs, "seed": plan.train.seed}  # as prepared (a with_train plan's own too)
    filed = load_plan(path).with_train(epochs=plan.train.epochs, seed=plan.train.seed)
    if filed.model_dump(mode="json") != plan.model_dump(mode="json"):  # the processes would run another plan
        raise PlanError(f"launcher={launcher!r} starts party processes, which read the plan from {path}, but this plan "
                        "differs from that file beyond its epochs and seed", entry="launcher",
                        hint="save the plan you mean to run as a file and train that, or use launcher='threads'")
    out = Path(out)
    if launcher == "ray":
        from ..launch.onray import launch_ray

        for what in ("link", "log"):
            if kw.get(what) is not None:
                raise PlanError(f"{what} is not available with launcher='ray'", entry=what)
        body = launch_ray(path, out, address=kw["ray_address"] or "local", epochs=kw["epochs"], seed=kw["seed"],
                          insecure=kw["insecure"], checked=plan, resume=kw["resume"])
    else:
        from ..launch.processes import launch

        if kw.get("ray_address") is not None:
            raise PlanError("ray_address applies to launcher='ray'", entry="ray_address")
        body = launch(path, out, epochs=kw["epochs"], seed=kw["seed"], insecure=kw["insecure"], on_step=kw["on_step"],
                      checked=plan, log=kw["log"], resume=kw["resume"], link=kw["link"], on_status=kw["on_status"],
                      log_format=kw["log_format"])

    return Result(body, plan, folder=out)


def _read_weights(plan: Plan, folder: Path) -> dict[str, PartyReport]:
    """Each physical party's trained segments, from the weights party processes wrote in ``folder``."""
    from ..clients.layout import Topology
    from ..run.setup import build_modules

    topo, reports = Topology.of(plan), {}
    for name in topo.names:
        plays, weights = topo.plays(plan, name), folder / "parties" / name / "weights.safetensors"
        if plays is None or not weights.is_file():
            continue
        modules = build_modules(plan, plays, [s for s, spec in plan.segments.items() if spec.party == plays])
        load_weights(weights, modules)
        reports[name] = PartyReport(name, plays=plays, modules=modules)
    return reports
