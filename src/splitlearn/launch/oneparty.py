"""One physical party in this process, over gRPC: :func:`run_one_party` is what ``splitlearn party``
runs (:func:`~splitlearn.launch.party.party_process`, in every party process a launcher starts,
and in a Ray actor). It builds its physical party from the plan and its own data, connects to its
neighbours and runs what :func:`~splitlearn.clients.parties.physical_party` gives it, as the thread
launcher does; the lead party writes the ``result.json`` its folder allows.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.plan import Plan
from ..core.specs import PlanError
from ..core.load import load_plan
from ..wire.messages import Limits
from .results import build_result, save_party, save_result
from ..run.report import PartyReport, Progress
from ..run.allocator import frozen_heap
from ..run.setup import setup_party
from ..clients.layout import Topology, own_data, with_dial_out
from ..clients.parties import physical_party
from ..clients.results import missing_part, predicting_plan
from ..clients.roles import client_of
from .predicting import PartyPrediction
from .status import PartyStatus, role_of
from .stopping import shielded

_log = logging.getLogger("splitlearn.launch.oneparty")

__all__ = ["run_one_party", "endpoints", "Endpoints", "write_partial_result", "progress_line", "tell_early",
           "TELL_WAIT_S"]


@dataclass
class Endpoints:
    listen: str | None
    dial: dict[str, str]
    accept: list[str]


def endpoints(plan: Plan, topo: Topology, name: str, listen: str | None, peers: dict[str, str]) -> Endpoints:
    """Where this party listens and whom it dials, from the command line or the plan."""
    dial = {}
    for peer in topo.dials(name):
        addr = peers.get(peer) or (plan.parties[peer].address if peer in plan.parties else None)
        if not addr:
            raise PlanError(f"party {name!r} must dial {peer!r} but has no address for it", entry=f"parties.{peer}.address",
                            hint=f"pass --peer {peer}=HOST:PORT or set parties.{peer}.address in the plan")
        dial[peer] = addr
    unknown = set(peers) - set(topo.names)
    if unknown:
        raise PlanError(f"--peer names unknown parties {sorted(unknown)}", hint=f"parties are {topo.names[:8]}")
    accept = topo.accepts(name)
    listen = listen or (plan.parties[name].address if name in plan.parties else None)
    if accept and not listen:
        raise PlanError(f"party {name!r} must listen for {accept} but has no address", entry=f"parties.{name}.address",
                        hint="pass --listen HOST:PORT or set the party's address in the plan")
    return Endpoints(listen if accept else None, dial, accept)


def _peak_rss() -> int:
    """This party's process at its largest, in bytes (its modules, data, buffers): Linux's VmHWM, which, unlike
    ``ru_maxrss``, does not carry over the launcher's peak across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # (bytes on macOS, KiB elsewhere)


def run_one_party(plan_path: str | Path, name: str, *, certs: Path | None, listen: str | None = None,
                  peers: dict[str, str] | None = None, out: Path | None = None, epochs: int | None = None,
                  seed: int | None = None, connect_timeout: float = 60.0, step_timeout: float | None = None,
                  on_step=None, dial_out: list[str] = (), limits: Limits | None = None,
                  log: str | None = None, data: str | Path | None = None, resume: bool = False,
                  rejoin_wait: float | None = None, generate: dict | None = None,
                  predict: str | Path | None = None, status: PartyStatus | None = None, run: str = "") -> PartyReport:
    """Run physical party ``name`` of the plan in this process, over gRPC. ``certs=None`` means
    insecure. ``step_timeout`` bounds each step as a whole (default: the plan's ``[train]
    step_timeout``, :meth:`~splitlearn.core.plan.Plan.step_timeout_s`); ``limits`` what a peer may
    make it hold; ``log`` where a party that computes a loss streams its metrics
    (``tensorboard[:DIR]``, ``mlflow[:URI]``); ``data`` this party's own file (``--data``), instead
    of the plan's data settings; ``resume``: go on from the last checkpoint in ``out`` that every party holds; ``rejoin_wait``: how long the coordinator of a
    ``[clients]`` plan waits for a failed party to come back as a new process (default: the plan's
    ``reconnect_timeout``); ``generate``: decode with the trained pieces of a run folder instead of training (a job
    of :func:`~splitlearn.launch.generating.job_of`); ``predict``: predict with the trained segments of this run
    folder (this site's part: its own rows, ``data``, or the plan's test rows), the predictions written where a head
    is (:class:`~splitlearn.launch.predicting.PartyPrediction`); ``run``: the run this process belongs to (a
    service's: a peer's process of another run is turned away and dials again); ``status``: what this party is doing, kept up to
    date for its status endpoint (:mod:`splitlearn.launch.status`)."""
    from ..wire.transport.grpc import GrpcTransport
    from ..run.tracking import parse_log
    from ..wire.transport.tls import load_credentials

    job: Any = None  # a job instead of training: generation or prediction, with its setup and steps
    if generate is not None:
        from .generating import party_job

        plan, job = party_job(generate, name)
    else:
        plan = load_plan(plan_path).with_train(epochs=epochs, seed=seed)
        if predict is not None:
            plan = predicting_plan(plan)[0]
            if out is not None and Path(out).resolve() == Path(predict).resolve():
                raise PlanError("--out names the run folder itself: its reports would be overwritten", entry="--out",
                                hint="predictions go to RUN/parties/NAME/predictions.csv; give --out another folder")
    limits = limits or Limits()
    if dial_out:
        plan = with_dial_out(plan, dial_out)
    topo = Topology.of(plan)
    if name not in topo.names:
        raise PlanError(f"no party {name!r} in the plan", hint=f"parties are {topo.names[:8]}")
    plays = topo.plays(plan, name)
    status = status or PartyStatus(name)  # (read only by a status endpoint)
    status.begin(plan.name, role_of(plan, name))
    on_step = status.chain(on_step)
    try:
        given = own_data(plan, name, data) if data is not None else None
        if predict is not None:
            job = PartyPrediction(plan, Path(predict), name, given)
        setup = job.setup if job is not None else \
            setup_party(plan, plays, data=given, client=client_of(plan, name)) if plays is not None else None
        # plan and data errors before connecting
    except PlanError as e:
        error = e.in_file(e.file or plan._source)
        with shielded():  # (a SIGTERM meanwhile does not replace the error)
            tell_early(plan, topo, name, error, certs=certs, listen=listen, peers=peers or {}, run=run,
                       wait=min(connect_timeout, TELL_WAIT_S))
        raise error from None
    tracking = parse_log(log, out) if log else None
    ends = endpoints(plan, topo, name, listen, peers or {})
    creds = load_credentials(certs, name) if certs is not None else None
    transport = GrpcTransport(name, listen=ends.listen, dial=ends.dial, accept=ends.accept, credentials=creds,
                              connect_timeout=connect_timeout, max_message_bytes=limits.message_bytes,
                              droppable=[p for p in (*ends.dial, *ends.accept) if p in topo.droppable],
                              reconnect_timeout=plan.train.reconnect_timeout, run=run)
    status.watch(transport=transport)
    transport.start()
    try:
        transport.wait_connected(connect_timeout)
        if resume and out is None:
            raise PlanError("--resume needs the --out folder whose checkpoints to go on from", entry="--resume")
        more = dict(steps=job.steps, predicting=True) if job is not None else {}
        part = physical_party(plan, name, setup, transport, timeout=step_timeout, record=out is not None and job is None,
                              limits=limits, tracking=tracking, out=None if job is not None else out, resume=resume,
                              rejoin_wait_s=plan.train.reconnect_timeout if rejoin_wait is None else rejoin_wait, **more)
        status.watch(meters=(part.link.meter, part.eval_meter))
        if job is not None:
            job.attach(part)
        with frozen_heap():  # no cyclic collection walks the process's libraries while it trains
            report = part.run(on_step)
        if job is not None:
            report = job.finish(report)
    finally:
        with shielded():  # its goodbye goes out whatever stops it (launch/stopping.py)
            transport.close()
    with shielded():  # the run is done: its report is written
        _write_reports(plan, topo, name, out, job, certs, report)
    return report


def _write_reports(plan: Plan, topo: Topology, name: str, out: Path | str | None, job: Any, certs: Path | None,
                   report: PartyReport) -> None:
    if out is not None:
        report.meter["peak_rss_bytes"] = _peak_rss()
        save_party(Path(out) / "parties" / name, report)
        if name == topo.lead and job is None:  # the label owner (or a schedule's coordinator) holds the run's result.json
            try:
                write_partial_result(plan, topo, Path(out), "grpc" if certs is None else "grpc+mtls")
            except Exception as e:  # noqa: BLE001 - the run itself succeeded; its report.json is written
                _log.warning("%s: no result.json from the reports in %s (%s); a launcher's gathers them all",
                             name, out, e)


TELL_WAIT_S = 10.0  # how long a party that cannot start waits for its neighbours, to tell them why


def tell_early(plan: Plan, topo: Topology, name: str, error: Exception, *, certs: Path | None, listen: str | None,
               peers: dict[str, str], run: str = "", wait: float = TELL_WAIT_S) -> None:
    """A party that cannot start (its data, its plan) tells its neighbours why, over a connection of its own for
    ``wait`` seconds at most: they stop at once, naming it, rather than waiting out their connect timeout for a
    party that never comes. Best effort: whatever goes wrong here is left to their deadlines."""
    from ..wire.messages import Kind, Message, encode
    from ..wire.transport.grpc import GrpcTransport
    from ..wire.transport.tls import load_credentials

    transport = None
    try:
        ends = endpoints(plan, topo, name, listen, peers)
        creds = load_credentials(certs, name) if certs is not None else None
        transport = GrpcTransport(name, listen=ends.listen, dial=ends.dial, accept=ends.accept, credentials=creds,
                                  connect_timeout=wait, run=run)
        transport.start()
        transport.wait_connected(wait)
        for peer in [*ends.dial, *ends.accept]:
            transport.send(peer, encode(Message(Kind.ERROR, name, peer, text=f"{name} failed: {error}")))
    except Exception as e:  # noqa: BLE001 - the neighbours' deadlines remain
        _log.info("%s: could not tell its neighbours why it stops (%s)", name, e)
    finally:
        if transport is not None:
            transport.close()


def write_partial_result(plan: Plan, topo: Topology, out: Path, transport: str) -> dict:
    """``result.json`` and ``plan.json`` in ``out`` from the party reports found there: on a deployment each
    site has its own folder, so the lead party's holds its own report (metrics, its traffic) and any other
    party's that shares the folder; ``parties_missing`` names the others (a ``[clients]`` plan needs them all).
    ``report`` and ``predict`` read it."""
    reports = {}
    for n in topo.names:
        f = out / "parties" / n / "report.json"
        if f.is_file():
            try:
                reports[n] = PartyReport(**json.loads(f.read_text()))
            except (ValueError, TypeError):
                continue  # a report of another version or a torn write: that party is listed as missing
    result = build_result(plan, reports, {"transport": transport})
    result.update(missing_part(plan, [n for n in topo.names if n not in reports]))
    save_result(out, plan, result)
    return result


def progress_line(p: Progress) -> str:
    """How a party process tells its launcher how far it is (one line on stdout)."""
    return f"progress {p.done} {p.total} {p.epoch} {p.epochs} {p.unit} {p.mode} {'-' if p.loss is None else repr(p.loss)}"
