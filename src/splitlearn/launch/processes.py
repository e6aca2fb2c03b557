"""All of a plan's parties as operating-system processes on loopback, over gRPC (one party:
:mod:`splitlearn.launch.oneparty`).

:func:`launch` is ``splitlearn run``: throw-away certificates, one process per physical party on
127.0.0.1 (each runs :func:`~splitlearn.launch.oneparty.run_one_party`, as ``splitlearn party``
does), and the merged ``result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..core.plan import Plan
from ..core.specs import PlanError
from .forker import discard_early, start_early, take as take_forker
from .party import PartyOptions
from ..run.allocator import math_threads
from .results import build_result, save_result
from ..run.report import PartyReport, Progress, RunError
from ..run.setup import prepare
from ..clients.layout import Topology
from ..clients.results import failures_part

_log = logging.getLogger("splitlearn.launch.processes")

__all__ = ["launch", "warm_up", "cool_down", "gather", "free_port", "child_env", "GRACE_S"]


_taken: set[int] = set()  # ports this process handed out (a party may not have bound its own yet)


def free_port() -> int:
    """A free loopback port for a party to listen on, below the kernel's ephemeral range: a port
    the kernel gives out for outgoing connections could be taken by one of a hundred parties
    dialling before the party meant to listen on it binds it (measured: 2 of 101 lost theirs); none
    this process handed out before; any free port if that range is crowded (the tests take theirs here)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    with socket.socket() as s:  # the range is crowded: any port the kernel picks
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan_path: str | Path, out: Path, *, epochs: int | None = None, seed: int | None = None,
           insecure: bool = False, timeout: float = 3600.0, on_step=None, checked: Plan | None = None,
           log: str | None = None, resume: bool = False, link: str | None = None,
           jobs: dict[str, dict] | None = None, on_status=None, log_format: str = "text") -> dict:
    """``splitlearn run``: one process per physical party on loopback (mutual TLS with throw-away
    certificates unless ``insecure``); returns the merged result. Raises RunError naming each
    failed party whose failure ends the run (a client's is data: the coordinator reports it);
    Ctrl-C stops every process. ``checked``: the plan as already checked end to end by
    :func:`~splitlearn.run.setup.prepare` (otherwise it is checked here first; for ``jobs``, the run's plan,
    which each party process checks for its own part); ``resume``: every
    party goes on from the last checkpoint in ``out`` they all hold; ``link``: every connection
    through an emulated slow link, e.g. ``"50ms,100mbit"`` (:mod:`splitlearn.wire.transport.slowlink`);
    ``jobs``: per party, a generation job (:func:`~splitlearn.launch.generating.job_of`) instead of training: the
    parties' reports are returned then, by name, and no result is written. ``on_status``: each party process serves
    its live status on a free loopback port (:mod:`splitlearn.launch.status`), and ``on_status(name, url)`` is told
    where as it starts (``parties/NAME/status.url`` records it too); ``log_format``: ``text`` or ``json`` (the
    parties' log records as JSON lines in their ``party.log``)."""
    from ..wire.transport.tls import make_certs, private_folder

    from ..run.tracking import finish_tracking, parse_log

    if log_format not in ("text", "json"):
        raise PlanError(f"log_format {log_format!r}: choose text or json", entry="log_format")
    # many processes share one import of torch; the forker makes it while the plan is checked (3-4 s a run)
    forker = take_forker(child_env(None)) if _forking() else None
    relays = []
    try:  # nothing started is left behind by a plan or an option refused here
        plan = checked or prepare(plan_path, epochs=epochs, seed=seed, probe=True)[0]  # checked before any starts
        out = Path(out)
        tracking = parse_log(log, out) if log else None
        topo = Topology.of(plan)
        ports = {p: free_port() for p in topo.names}
        dial_ports = dict(ports)  # where a dialer finds each listener: itself, or the slow link in front of it
        if link is not None:
            from ..wire.transport.slowlink import SlowLink, parse_link

            try:
                rtt, bandwidth = parse_link(link)
            except ValueError as e:
                raise PlanError(str(e), entry="--link") from None
            for name in topo.names:
                if topo.accepts(name):
                    relays.append(SlowLink(("127.0.0.1", ports[name]), rtt=rtt, bandwidth=bandwidth).start())
                    dial_ports[name] = relays[-1].port
    except BaseException:
        if forker is not None:
            forker.kill()
        for relay in relays:
            relay.stop()
        raise
    procs: dict[str, Any] = {}
    env = child_env(len(topo.names))
    threads = None if "OMP_NUM_THREADS" in os.environ else math_threads(len(topo.names))  # the user's wins
    with private_folder(out / ".certs") as certs:  # in the run folder (0700): a SIGKILL leaves no key in /tmp
        if not insecure:
            make_certs(topo.names, Path(certs))
        try:
            for name in topo.names:
                folder = out / "parties" / name
                folder.mkdir(parents=True, exist_ok=True)
                for old in ("error.json", "report.json", "status.url"):  # nothing of an earlier run counts for this one
                    (folder / old).unlink(missing_ok=True)
                follow = name == topo.lead and on_step is not None  # only a pipe somebody reads: a full one blocks
                opts = PartyOptions(
                    str(plan_path), name, out=str(out), listen=f"127.0.0.1:{ports[name]}", progress=follow,
                    quiet=not follow, insecure=insecure, certs=None if insecure else certs, resume=resume,
                    rejoin_wait_s=0.0,  # nobody restarts a party here: a coordinator does not wait for one
                    # every process imports torch before it connects: on few cores many take a while to start
                    connect_timeout_s=float(max(60, 2 * len(topo.names))),
                    peers={**{p: f"127.0.0.1:{dial_ports[p]}" for p in topo.dials(name)},
                           **{p: f"127.0.0.1:{ports[p]}" for p in topo.accepts(name)}},
                    epochs=epochs, seed=seed, log=None if tracking is None else f"{tracking.kind}:{tracking.where}",
                    generate=jobs[name] if jobs else None, log_format=log_format,
                    status=None if on_status is None else f"127.0.0.1:{free_port()}")
                log_file = folder / "party.log"
                log_file.write_text("")
                if on_status is not None:
                    on_status(name, f"http://{opts.status}/")
                if forker is not None and not procs:  # the forker must be able to start; else new interpreters
                    try:
                        forker.wait_ready()
                    except RuntimeError as e:
                        _log.warning("starting party processes as new interpreters: %s", e)
                        forker = None
                if forker is not None:
                    stdout = log_file
                    if follow:  # its progress lines come through a named pipe
                        stdout = Path(certs) / "progress.fifo"
                        os.mkfifo(stdout)
                        threading.Thread(target=_follow_fifo, args=(stdout, on_step), daemon=True).start()
                    procs[name] = forker.start(name, opts.to_json(), stdout, log_file, threads=threads)
                    continue
                with open(log_file, "w") as log_fh:
                    procs[name] = subprocess.Popen([sys.executable, "-m", "splitlearn.launch.party", opts.to_json()],
                                                   stdout=subprocess.PIPE if follow else log_fh, stderr=log_fh,
                                                   start_new_session=True, env=env)
                if follow:
                    threading.Thread(target=_follow, args=(procs[name].stdout, on_step), daemon=True).start()
            codes, stopped = _wait(procs, timeout, topo.droppable)
        except BaseException:  # Ctrl-C, or a party that could not be started: none is left running
            _stop(procs)
            raise
        finally:
            if forker is not None:  # ended and reaped: a launch leaves no process behind
                if not procs or any(p.poll() is None for p in procs.values()):
                    forker.kill()  # (none started: it may still be warming up; else those still running)
                else:
                    forker.end()
            for relay in relays:
                relay.stop()
    errors = {}
    failed = [n for n, c in codes.items() if c != 0 and n not in stopped]
    for name, code in codes.items():
        if name in stopped and failed:  # the cause is the failed party, named on its own
            errors[name] = f"stopped by the launcher after {', '.join(failed)} failed"
        elif code != 0:
            err_file, log = out / "parties" / name / "error.json", out / "parties" / name / "party.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
            errors[name] = (json.loads(err_file.read_text())["error"] if err_file.is_file()
                            else (lines or [f"exit status {code}"])[-1])
    errors = {**{n: errors[n] for n in failed if n in errors}, **errors}  # the parties that failed first
    if jobs:
        return _reports(topo, out, errors)
    extra = {"link": {"rtt_s": rtt, "bandwidth_bit_s": bandwidth}} if link is not None else {}
    result = gather(plan, topo, out, errors, "grpc" + ("" if insecure else "+mtls"), extra)
    if tracking is not None:
        finish_tracking(tracking, plan, result)
    return result


def gather(plan: Plan, topo: Topology, out: Path, errors: dict[str, str], transport: str,
           extra: dict | None = None) -> dict:
    """The run's result from the party folders in ``out`` (written and saved); RunError naming
    the parties whose failure ends the run (a client's failure is data: ``failed_processes``)."""
    fatal = {n: e for n, e in errors.items() if n not in topo.droppable}
    if fatal:
        raise RunError(fatal)
    reports = {}
    for n in topo.names:
        f = out / "parties" / n / "report.json"
        if f.is_file():
            reports[n] = PartyReport(**json.loads(f.read_text()))
        elif n not in topo.droppable:
            raise RunError({n: f"it ended without writing {f}"})
    result = build_result(plan, reports, {"transport": transport})
    result.update(extra or {})
    result.update(failures_part(plan, errors))
    save_result(out, plan, result)
    return result


def _reports(topo: Topology, out: Path, errors: dict[str, str]) -> dict[str, PartyReport]:
    """Every party's report from its folder in ``out``; RunError naming the parties that failed."""
    if errors:
        raise RunError(errors)
    reports = {}
    for n in topo.names:
        f = out / "parties" / n / "report.json"
        if not f.is_file():
            raise RunError({n: f"it ended without writing {f}"})
        reports[n] = PartyReport(**json.loads(f.read_text()))
    return reports


def warm_up() -> None:
    """Start the forker of the next :func:`launch` of this process now, where party processes are forked: a
    launcher calls it before reading the plan, so that both happen at once (and :func:`cool_down` once it is
    done, launched or not)."""
    if _forking():
        start_early(child_env(None))


def cool_down() -> None:
    """End the forker :func:`warm_up` started if no launch took it (a plan refused first): a long-lived process,
    a notebook, keeps no idle forker."""
    discard_early()


def _forking() -> bool:
    """Whether party processes are forked from one warmed-up process (:mod:`splitlearn.launch.forker`):
    where the system can fork, unless ``SPLITLEARN_FORK=0`` asks for fresh interpreters."""
    return hasattr(os, "fork") and sys.platform.startswith("linux") and os.environ.get("SPLITLEARN_FORK", "1") != "0"


def _follow_fifo(path: Path, on_step) -> None:
    with open(path, "rb") as stream:  # opens once the lead party opens its end
        _follow(stream, on_step)


def child_env(parties: int | None) -> dict[str, str]:
    """Party processes on one machine take turns computing, so idle math threads must sleep, not
    spin on the cores the computing party needs (OMP_WAIT_POLICY=PASSIVE; measured on 2 cores:
    CNN split 1127-1293 -> 1333-1456 samples/s). Between two operations of one party's computation, though,
    they wait a moment before sleeping (GNU OpenMP's ``GOMP_SPINCOUNT``, 25,000 spins; PASSIVE alone is 0, the
    default without it 300,000): a party's next operation then finds its workers awake, and a party waiting for a
    message still leaves the cores to the other soon. A trade-off, measured on 2 cores over gRPC, 10 alternated runs
    each, medians: the bench CNN 1,292 -> 1,372 samples/s (+6%), the digits MLP, whose operations take microseconds
    so that the spin of the party that just sent overlaps the other's whole computation, 14,076 -> 13,115 (-7%);
    300,000 spins: CNN 1,196-1,248; ACTIVE: 256-271. More party
    processes than cores: one math thread each, or their thread pools fight (measured: 4 parties on 2 cores
    trained 3x faster). The user's own settings win. ``parties`` None: the thread count is left to each child
    (the forker, started before the plan is read, tells each child its count)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_WAIT_POLICY" not in env:  # (a user's own policy, PASSIVE or ACTIVE, spins as GNU OpenMP says for it)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.setdefault("GOMP_SPINCOUNT", "25000")
    if parties is not None:
        env.setdefault("OMP_NUM_THREADS", str(math_threads(parties)))  # as in-process runs use (launch/threads.py)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS pool would start a thread in the forker
    return env


def _follow(stream, on_step) -> None:
    """Relay the lead party's progress lines to ``on_step``."""
    for line in stream:
        parts = line.decode(errors="replace").split()
        if len(parts) == 8 and parts[0] == "progress":
            try:
                on_step(Progress(int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]), parts[5],
                                 None if parts[7] == "-" else float(parts[7]), parts[6]))
            except ValueError:
                continue


GRACE_S = 5.0  # after a party process failed, how long the others get to end by themselves (and say why)


def _wait(procs: dict[str, Any], timeout: float, droppable: frozenset[str] = frozenset()
          ) -> tuple[dict[str, int], list[str]]:
    """Exit codes once every process ended, and the parties the launcher stopped. No one restarts a
    party under ``splitlearn run``: once one that is not droppable failed, the others get
    :data:`GRACE_S` to end, then are stopped, rather than waiting out their ``reconnect_timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = {n: p.poll() for n, p in procs.items()}
        if all(c is not None for c in codes.values()):
            return codes, []
        failed = any(c not in (None, 0) and n not in droppable for n, c in codes.items())
        if failed:
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.1)
    stopped = [n for n, p in procs.items() if p.poll() is None]
    _stop(procs)
    return {n: (p.returncode if p.returncode is not None else -9) for n, p in procs.items()}, stopped


def _stop(procs: dict[str, Any]) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
