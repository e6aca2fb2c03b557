"""Runs beyond one machine: party processes as Ray actors, and compare or sweep settings as Ray tasks.

Ray is an optional extra (``pip install 'splitlearn[ray]'``). With it:

* :func:`launch_ray` (``splitlearn run --ray [ADDRESS]``) places every physical party (each
  client of a ``[clients]`` plan too) as a named actor, ``splitlearn-RUN-NAME``, with the
  resources its plan party asks (``[parties.NAME] resources = { num_cpus = 1, num_gpus = 0 }``;
  without them a fair share of the cluster's CPUs). The parties still speak splitlearn's
  protocol to each other over gRPC with mutual TLS: certificates are made for the run and
  handed to each actor with its own key; each listening actor picks a port on its node and the
  dialers are told that node's address. So the wire, the accounting and every check are those of
  a deployment. Each actor returns its party folder (report, weights, what it recorded), which
  the driver writes into ``OUT/parties/NAME``.
* :func:`run_tasks` runs independent settings (the methods of ``compare``, the values of a
  sweep) as Ray tasks, as many at once as the cluster allows; without Ray, one after another.
  A setting that fails is returned as data (its error), and the others finish.

An actor that dies is reported with its party's name; a fixed party's death stops the others
at once (a client's is data: its coordinator skips it, as in a local run).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.plan import Plan
from ..core.specs import PlanError
from ..run.report import RunError

__all__ = ["require_ray", "connect", "launch_ray", "run_tasks", "TaskFailure", "folder_files", "write_files"]


def require_ray():
    """The ``ray`` module, or a PlanError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PlanError("--ray needs Ray, which is not installed", entry="--ray",
                        hint="pip install 'splitlearn[ray]'") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the Ray cluster at ``address`` ("auto": the one this machine belongs to; "local" or
    None: start one on this machine); a Ray already initialised in this process is used as it is."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "", "local") else address, ignore_reinit_error=True, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_python_path())}})
    return ray


def _python_path() -> list[str]:
    """Where this splitlearn (and a plan's factories next to it) are imported from, for the workers."""
    here = str(Path(__file__).resolve().parents[2])  # the folder holding the splitlearn package
    return [here, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by path relative to it (what a task sends back)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise RunError({"ray": f"a task sent back a file outside its folder: {rel!r}"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# -- settings as tasks ----------------------------------------------------------------------------

@dataclass
class TaskFailure:
    """A setting that failed: what went wrong (its error, or the worker's death)."""

    error: str


def run_tasks(fn: Callable[..., Any], items: list[tuple], *, ray_address: str | None = None,
              use_ray: bool = False, progress: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``fn(*item)`` for every item: its value, or a :class:`TaskFailure`. With ``use_ray`` as Ray
    tasks (in parallel as the cluster allows, one CPU each), else one after another here.
    ``progress(i, value)`` is told as each ends."""
    results: list[Any] = [None] * len(items)
    if not use_ray:
        for i, item in enumerate(items):
            try:
                results[i] = fn(*item)
            except Exception as e:  # noqa: BLE001 - failures as data
                results[i] = TaskFailure(f"{type(e).__name__}: {e}")
            if progress is not None:
                progress(i, results[i])
        return results
    ray = connect(ray_address)
    remote = ray.remote(num_cpus=1, max_retries=0)(fn)
    refs = {remote.remote(*item): i for i, item in enumerate(items)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs[done[0]]
        try:
            results[i] = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - a task's error, or its worker's death
            cause = getattr(e, "cause", None)
            results[i] = TaskFailure(f"{type(cause or e).__name__}: {cause or e}".splitlines()[0][:2000])
        if progress is not None:
            progress(i, results[i])
    return results


# -- party processes as actors ------------------------------------------------------------------

class _PartyActor:
    """One physical party, run in a Ray worker (see :func:`launch_ray`)."""

    def __init__(self, name: str):
        self.name = name
        self.port = None
        self._held = None  # the port's socket, bound until the party listens on it

    def address(self, listens: bool) -> str:
        """Where its neighbours dial it: this node's address and a port the kernel gave this actor
        (held bound until the party listens: two actors of one node never get the same)."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        if not listens:
            return host
        self._held = socket.socket()
        self._held.bind(("0.0.0.0", 0))
        self.port = self._held.getsockname()[1]
        return f"{host}:{self.port}"

    def run(self, plan_path: str, certs: dict[str, bytes] | None, peers: dict[str, str], options: dict) -> dict:
        """Run the party; its folder's files and its error (None when it finished). The actor's process is the
        party's: its allocator is tuned as every party process's (:func:`~splitlearn.launch.party.party_process`)."""
        from ..run.allocator import tune_allocator
        from .oneparty import run_one_party

        tune_allocator()
        if self._held is not None:  # the party binds it now
            self._held.close()
        with tempfile.TemporaryDirectory(prefix=f"splitlearn-{self.name}-") as tmp:
            cert_dir = None
            if certs is not None:
                cert_dir = Path(tmp) / "certs"
                write_files(cert_dir, certs)
            out = Path(tmp) / "out"
            error = None
            try:
                run_one_party(plan_path, self.name, certs=cert_dir, listen=f"0.0.0.0:{self.port}" if self.port else None,
                              peers=peers, out=out, rejoin_wait=0.0, **options)
            except Exception as e:  # noqa: BLE001 - told to the driver, by party
                error = str(e) or type(e).__name__
            folder = out / "parties" / self.name
            return {"files": folder_files(folder) if folder.is_dir() else {}, "error": error}


def _resources(plan: Plan, topo, ray) -> dict[str, dict[str, float]]:
    """Per physical party: what its plan party asks, else a fair share of the cluster's CPUs."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = max(0.01, min(1.0, total / max(1, len(topo.names))))
    out = {}
    for name in topo.names:
        plays = topo.plays(plan, name)
        asked = plan.parties[plays].resources if plays in plan.parties else None
        out[name] = {"num_cpus": asked.num_cpus if asked and asked.num_cpus is not None else share,
                     "num_gpus": asked.num_gpus if asked and asked.num_gpus is not None else 0.0}
    return out


def launch_ray(plan_path: str | Path, out: Path, *, address: str | None = None, epochs: int | None = None,
               seed: int | None = None, insecure: bool = False, timeout: float = 3600.0,
               checked: Plan | None = None, resume: bool = False) -> dict:
    """``splitlearn run --ray``: every physical party as a Ray actor (see the module's text); the
    merged result, as :func:`~splitlearn.launch.processes.launch` gives it."""
    from ..wire.transport.tls import make_certs, private_folder
    from .processes import child_env, gather
    from ..run.setup import prepare
    from ..clients.layout import Topology

    if resume:
        raise PlanError("--resume is not available with --ray: checkpoints stay on the nodes that took them",
                        entry="--ray", hint="resume the run with local processes, or start it again")
    ray = connect(address)
    plan = checked or prepare(plan_path, epochs=epochs, seed=seed)[0]
    out = Path(out)
    topo = Topology.of(plan)
    run_id = f"{int(time.time() * 1000) % 10**10}"
    env = {k: v for k, v in child_env(len(topo.names)).items()
           if k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join(_python_path())
    resources = _resources(plan, topo, ray)
    actor_cls = ray.remote(max_restarts=0)(_PartyActor)
    actors = {n: actor_cls.options(name=f"splitlearn-{run_id}-{n}", runtime_env={"env_vars": env},
                                   **resources[n]).remote(n) for n in topo.names}
    options = {"epochs": epochs, "seed": seed, "connect_timeout": max(60.0, 2.0 * len(topo.names))}
    errors: dict[str, str] = {}
    refs: dict[Any, str] = {}
    try:
        asked = {n: actors[n].address.remote(bool(topo.accepts(n))) for n in topo.names}
        addresses = {}
        for n, ref in asked.items():
            try:
                addresses[n] = ray.get(ref, timeout=300)
            except Exception as e:  # noqa: BLE001 - killed, out of memory or its node lost before it began
                errors[n] = f"its Ray actor died before the run began ({type(e).__name__})"
        if errors:  # no party can run without every address (a client too: the plan names its peers)
            raise RunError(errors)
        with private_folder(Path(out) / ".certs") as certs:  # in the run folder (0700): none left in /tmp
            if not insecure:
                make_certs(topo.names, Path(certs))
            for n in topo.names:
                peers = {p: addresses[p] for p in topo.dials(n)}  # those it dials (it learns who dials it from the plan)
                own = None if insecure else {k: v for k, v in folder_files(Path(certs)).items()
                                             if k in ("ca.pem", f"{n}.pem", f"{n}.key")}
                refs[actors[n].run.remote(str(plan_path), own, peers, options)] = n
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                errors.update({refs[r]: f"not done within {timeout:g} s" for r in pending})
                break
            name = refs[done[0]]
            try:
                got = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - the actor died (killed, out of memory, its node lost)
                got = {"files": {}, "error": f"its Ray actor died ({type(e).__name__})"}
            write_files(out / "parties" / name, got["files"])
            if got["error"] is not None:
                errors[name] = got["error"]
                if name not in topo.droppable:  # the run cannot go on: stop the others at once
                    break
    finally:
        for a in actors.values():
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
    return gather(plan, topo, out, errors, "grpc" + ("" if insecure else "+mtls") + "+ray")
