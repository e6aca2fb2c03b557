"""Parties as operating-system processes over gRPC: one party here, or all of them on loopback.

:func:`run_one_party` is ``splitlearn party``: it builds its party from the plan and its own
data, connects to its neighbours and runs the same :func:`~splitlearn.runner.run_party` as the
in-process simulation. :func:`launch` is ``splitlearn run``: throw-away certificates, one
process per party on 127.0.0.1, and the merged ``result.json``.

Who dials whom: for each pair of neighbours, a party marked ``dial_out`` (behind a firewall)
dials the other; otherwise the party later in the plan dials the earlier one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import Party
from .graph import Graph, build_graph
from .link import Link
from .messages import Limits
from .plan import Plan, PlanError
from .api import save_party
from .observe import Recorder
from .results import build_result, plan_record, save_weights, write_json
from .runner import PartyReport, RunError, Step, prepare, run_party, schedule, setup_party

__all__ = ["connections", "run_one_party", "launch", "PartyFailed", "tune_allocator"]


class PartyFailed(RuntimeError):
    """This party stopped with an error (already written to its error.json)."""


def connections(plan: Plan, graph: Graph | None = None) -> list[tuple[str, str]]:
    """(dialer, listener) for every pair of parties that exchange messages."""
    graph = graph or build_graph(plan)
    names = list(plan.parties)
    out = []
    for a in names:
        for b in graph.neighbours(a):
            if names.index(b) <= names.index(a):
                continue  # each pair once, a before b
            da, db = plan.parties[a].dial_out, plan.parties[b].dial_out
            if da and db:
                raise PlanError(f"parties {a!r} and {b!r} exchange messages but both only dial out",
                                entry=f"parties.{b}.dial_out", hint="one of each pair of neighbours must listen")
            out.append((a, b) if da else (b, a))
    return out


def with_dial_out(plan: Plan, names: list[str]) -> Plan:
    """The plan with these parties marked ``dial_out`` (give every party the same list)."""
    unknown = set(names) - set(plan.parties)
    if unknown:
        raise PlanError(f"--dial-out names unknown parties {sorted(unknown)}", hint=f"parties are {sorted(plan.parties)}")
    return plan.replace(parties={n: (p.model_copy(update={"dial_out": True}) if n in names else p)
                                 for n, p in plan.parties.items()})


@dataclass
class Endpoints:
    listen: str | None
    dial: dict[str, str]
    accept: list[str]


def endpoints(plan: Plan, name: str, listen: str | None, peers: dict[str, str]) -> Endpoints:
    """Where this party listens and whom it dials, from the command line or the plan."""
    pairs = _pairs(plan)
    dial_to = [lst for d, lst in pairs if d == name]
    accept = [d for d, lst in pairs if lst == name]
    dial = {}
    for peer in dial_to:
        addr = peers.get(peer) or (plan.parties[peer].address if peer in plan.parties else None)
        if not addr:
            raise PlanError(f"party {name!r} must dial {peer!r} but has no address for it", entry=f"parties.{peer}.address",
                            hint=f"pass --peer {peer}=HOST:PORT or set parties.{peer}.address in the plan")
        dial[peer] = addr
    names = _physical(plan)
    unknown = set(peers) - set(names)
    if unknown:
        raise PlanError(f"--peer names unknown parties {sorted(unknown)}", hint=f"parties are {names[:8]}")
    listen = listen or (plan.parties[name].address if name in plan.parties else None)
    if accept and not listen:
        raise PlanError(f"party {name!r} must listen for {accept} but has no address", entry=f"parties.{name}.address",
                        hint="pass --listen HOST:PORT or set the party's address in the plan")
    return Endpoints(listen if accept else None, dial, accept)


def _physical(plan: Plan) -> list[str]:
    """The processes a plan needs: its parties, or with ``[clients]`` every client and role."""
    if plan.clients is None:
        return list(plan.parties)
    from .federation import roles

    return roles(plan)


def _pairs(plan: Plan) -> list[tuple[str, str]]:
    if plan.clients is None:
        return connections(plan)
    from .federation import connections as client_connections

    return client_connections(plan)


def run_role(plan: Plan, name: str, transport_factory, out: Path | None, on_round=None) -> dict:
    """One physical party of a plan with ``[clients]`` (see :mod:`splitlearn.federation`)."""
    from .federation import Role, coordinator_of, plays_of

    plays = plays_of(plan, name)
    setup = setup_party(plan, plays) if plays is not None else None  # plan and data errors before connecting
    transport = transport_factory()
    try:
        role = Role(plan, name, transport, setup)
        if name == coordinator_of(plan):
            role.coordinate(on_round)
        else:
            role.follow()
    finally:
        transport.close()
    report = role.report()
    if out is not None:
        folder = Path(out) / "parties" / name
        if role.setup is not None and role.setup.modules:
            save_weights(folder / "weights.safetensors", role.setup.modules)
        write_json(folder / "report.json", report)
    return report


def run_one_party(plan_path: str | Path, name: str, *, certs: Path | None, listen: str | None = None,
                  peers: dict[str, str] | None = None, out: Path | None = None, epochs: int | None = None,
                  seed: int | None = None, connect_timeout: float = 60.0, step_timeout: float = 120.0,
                  on_step=None, dial_out: list[str] = (), limits: Limits | None = None) -> PartyReport:
    """Run party ``name`` of the plan in this process, over gRPC. ``certs=None`` means insecure.

    ``step_timeout`` bounds each step as a whole; ``limits`` what a peer may make it hold."""
    from .transport.grpc import GrpcTransport
    from .transport.tls import load_credentials

    from .plan import load_plan

    plan = load_plan(plan_path).with_train(epochs=epochs, seed=seed)
    limits = limits or Limits()
    if plan.clients is not None:
        if name not in _physical(plan):
            raise PlanError(f"no party {name!r} in the plan", hint=f"parties are {_physical(plan)[:8]} ...")
        if dial_out:
            raise PlanError("--dial-out does not apply to a plan with [clients]: clients always dial the server",
                            entry="clients", hint='use handoff = "server" if clients cannot listen for each other')
        ends = endpoints(plan, name, listen, peers or {})
        creds = load_credentials(certs, name) if certs is not None else None
        clients = set(plan.clients.names())

        def factory():
            t = GrpcTransport(name, listen=ends.listen, dial=ends.dial, accept=ends.accept, credentials=creds,
                              connect_timeout=connect_timeout, max_message_bytes=limits.message_bytes,
                              expendable=[p for p in (*ends.dial, *ends.accept) if p in clients])
            t.start()
            t.wait_connected(connect_timeout)
            return t

        report = run_role(plan, name, factory, out, on_round=(lambda r: on_step(Step(r.index, "train", r.epoch,
                                                                                      torch.empty(0))))
                          if on_step else None)
        return PartyReport(name, meter=report["train"])
    plan, setup = _own_setup(plan_path, name, epochs, seed)
    if dial_out:
        plan = with_dial_out(plan, dial_out)
    ends = endpoints(plan, name, listen, peers or {})
    creds = load_credentials(certs, name) if certs is not None else None
    transport = GrpcTransport(name, listen=ends.listen, dial=ends.dial, accept=ends.accept, credentials=creds,
                              connect_timeout=connect_timeout, max_message_bytes=limits.message_bytes)
    transport.start()
    try:
        transport.wait_connected(connect_timeout)
        party = Party(setup.graph, name, Link(transport, limits=limits), setup.modules, setup.optimizer, setup.inputs,
                      timeout=step_timeout)
        recorder = party.observer = Recorder(setup.splits.ids) if out is not None else None
        report = run_party(party, schedule(plan, setup.splits), on_step, ids_hash=setup.ids_hash)
    finally:
        transport.close()
    if out is not None:
        folder = Path(out) / "parties" / name
        save_party(folder, setup.modules, recorder)
        write_json(folder / "report.json", report.__dict__)
    return report


def _own_setup(plan_path, name, epochs, seed):
    from .plan import load_plan

    plan = load_plan(plan_path).with_train(epochs=epochs, seed=seed)
    if name not in plan.parties:
        raise PlanError(f"no party {name!r} in the plan", hint=f"parties are {sorted(plan.parties)}")
    return plan, setup_party(plan, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan_path: str | Path, out: Path, *, epochs: int | None = None, seed: int | None = None,
           insecure: bool = False, timeout: float = 3600.0, on_step=None, checked: Plan | None = None) -> dict:
    """``splitlearn run``: one process per party on loopback (mutual TLS with throw-away
    certificates unless ``insecure``); returns the merged result. Raises RunError naming each
    failed party; Ctrl-C stops every process. ``checked``: the plan as already checked end to
    end by :func:`~splitlearn.runner.prepare` (otherwise it is checked here first)."""
    from .transport.tls import make_certs

    plan = checked or prepare(plan_path, epochs=epochs, seed=seed)[0]  # all checks before starting anything
    out = Path(out)
    graph = build_graph(plan)
    lead = next(n.party for n in graph.losses())
    names = _physical(plan)
    pairs = _pairs(plan)
    if plan.clients is not None:
        from .federation import coordinator_of

        lead = coordinator_of(plan)
    ports = {p: _free_port() for p in names}
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="splitlearn-certs-") as certs:
        if not insecure:
            make_certs(names, Path(certs))
        for name in names:
            folder = out / "parties" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.json").unlink(missing_ok=True)
            follow = name == lead and on_step is not None  # only a pipe somebody reads: a full one blocks
            cmd = [sys.executable, "-m", "splitlearn", "party", str(plan_path), "--name", name, "--out", str(out),
                   "--listen", f"127.0.0.1:{ports[name]}", "--progress" if follow else "--quiet"]
            cmd += ["--insecure"] if insecure else ["--certs", certs]
            for peer in names:
                if peer != name and any(name in pair and peer in pair for pair in pairs):
                    cmd += ["--peer", f"{peer}=127.0.0.1:{ports[peer]}"]
            if epochs is not None:
                cmd += ["--epochs", str(epochs)]
            if seed is not None:
                cmd += ["--seed", str(seed)]
            with open(folder / "party.log", "w") as log:
                procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE if follow else log, stderr=log,
                                               start_new_session=True, env=_child_env(len(names)))
        if on_step is not None:
            threading.Thread(target=_follow, args=(procs[lead].stdout, on_step), daemon=True).start()
        try:
            codes = _wait(procs, timeout)
        except KeyboardInterrupt:
            _stop(procs)
            raise
    errors = {}
    for name, code in codes.items():
        if code != 0:
            err_file, log = out / "parties" / name / "error.json", out / "parties" / name / "party.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
            errors[name] = (json.loads(err_file.read_text())["error"] if err_file.is_file()
                            else (lines or [f"exit status {code}"])[-1])
    if plan.clients is not None:
        return _merge_roles(plan, out, names, errors, insecure)
    if errors:
        raise RunError(errors)
    reports = {n: PartyReport(**json.loads((out / "parties" / n / "report.json").read_text())) for n in plan.parties}
    result = build_result(plan, graph, reports, {"transport": "grpc" + ("" if insecure else "+mtls")})
    write_json(out / "plan.json", plan_record(plan))
    write_json(out / "result.json", result)
    return result


def _merge_roles(plan: Plan, out: Path, names: list[str], errors: dict[str, str], insecure: bool) -> dict:
    """The result of a horizontal run over gRPC: a failed client is skipped (already in the
    coordinator's report), a failed coordinator or fixed party fails the run."""
    from .federation import merge_reports

    clients = set(plan.clients.names())
    fatal = {n: e for n, e in errors.items() if n not in clients}
    if fatal:
        raise RunError(fatal)
    reports = {}
    for n in names:
        f = out / "parties" / n / "report.json"
        if f.is_file():
            reports[n] = json.loads(f.read_text())
    result = merge_reports(plan, reports)
    result["transport"] = "grpc" + ("" if insecure else "+mtls")
    final = out / "parties" / str(result["final_client"]) / "weights.safetensors"
    if result["final_client"] is not None and final.is_file():  # the run's model under the plan's name
        (out / "parties" / plan.clients.template).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, out / "parties" / plan.clients.template / "weights.safetensors")
    result["failed_processes"] = errors
    write_json(out / "plan.json", plan_record(plan))
    write_json(out / "result.json", result)
    return result


def tune_allocator() -> bool:
    """Keep large buffers on the heap (glibc): messages of megabytes are otherwise mapped and unmapped
    for every copy, and their pages faulted in each time (measured: encoding a 2 MB activation took
    5 ms instead of 0.23 ms). Freed memory is returned to the system only above 256 MB. A no-op
    (False) where the C library is not glibc; the party processes and the CLI call it."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 256 * 2**20))
    except (OSError, AttributeError):
        return False


def _child_env(parties: int) -> dict[str, str]:
    """Party processes on one machine take turns computing, so idle math threads must sleep, not
    spin on the cores the computing party needs (OMP_WAIT_POLICY=PASSIVE; measured on 2 cores:
    CNN split 1127-1293 -> 1333-1456 samples/s). More party processes than cores: one math thread
    each, or their thread pools fight (measured: 4 parties on 2 cores trained 3x faster). The
    user's own settings win."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cores = os.cpu_count() or 1
    if parties > cores and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cores // parties))
    return env


def _follow(stream, on_step) -> None:
    """Relay the lead party's progress lines ("step ID EPOCH MODE") to ``on_step``."""
    for line in stream:
        parts = line.decode(errors="replace").split()
        if len(parts) == 4 and parts[0] == "step":
            on_step(Step(int(parts[1]), parts[3], int(parts[2]), torch.empty(0)))


def _wait(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = {n: p.poll() for n, p in procs.items()}
        if all(c is not None for c in codes.values()):
            return codes
        time.sleep(0.1)
    _stop(procs)
    return {n: (p.returncode if p.returncode is not None else -9) for n, p in procs.items()}


def _stop(procs: dict[str, subprocess.Popen]) -> None:
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
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
