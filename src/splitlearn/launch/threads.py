"""The thread launcher: every physical party of any plan in this process, over the in-process transport
(messages handed over whole, metered at the bytes gRPC carries, so the same accounting).

The parties take turns on the calling thread (:class:`~splitlearn.wire.transport.turns.Turns`: each party a
greenlet that yields while it waits for a message), which is what a simulation's steps are anyway: one
party computes while the others wait. One thread means one math team, no interpreter lock handed over
and no thread woken per message (BENCHMARKS.md, *Per-step overhead*)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..core.engine import PartyError
from ..core.plan import Plan
from ..core.specs import PlanError
from ..wire.transport import InProcessHub, TransportClosed
from ..wire.transport.turns import TaskExit, Turns
from ..run.allocator import frozen_heap, math_threads
from ..run.report import PartyReport, Progress, RunError
from ..run.setup import PartySetup, Step
from ..clients.layout import Topology, physical_setups, shared_in_process
from ..clients.parties import physical_party

__all__ = ["run_local"]


def run_local(plan: Plan, setups: dict[str, PartySetup], shapes: dict | None = None, *,
              on_step: Callable[[Progress], None] | None = None, timeout: float | None = None,
              record: bool = False, faults: dict[str, Callable] | None = None,
              steps: list[Step] | None = None, predicting: bool = False,
              tracking: Any = None, out: Any = None, resume: bool = False,
              built: Callable[[str, Any], None] | None = None) -> dict[str, PartyReport]:
    """Run ``plan`` (set up and checked by :func:`~splitlearn.run.setup.prepare`) with every
    physical party a task of this thread (:class:`~splitlearn.wire.transport.turns.Turns`); their reports.
    ``on_step`` follows the lead party (a plain plan's
    loss party, the coordinator of a ``[clients]`` plan); ``timeout`` bounds each step (default: the
    plan's ``[train] step_timeout``, :meth:`~splitlearn.core.plan.Plan.step_timeout_s`); ``record``
    keeps what each party receives for the audit; ``faults`` (tests) are hooks of client roles;
    ``steps`` replace the plan's schedule (``predicting``: prediction steps, no labels anywhere);
    ``tracking`` (a :class:`~splitlearn.run.tracking.LogSpec`) streams each loss party's metrics;
    ``out``: the run folder (checkpoints are taken there); ``resume``: from the last checkpoint; ``built``: called
    with each party's name and participant once it is built, before any runs.

    A party whose failure is data (a client) is reported by the coordinator and the run goes on (its end of the
    hub closed, as its process would close its connection: what waits for it stops waiting); any other failure
    stops every party and raises :class:`RunError` naming the parties that failed first."""
    topo = Topology.of(plan)
    hub = InProcessHub(topo.names)
    held = physical_setups(plan, topo, setups)
    extra = shared_in_process(plan, setups)  # derived once, the same for every physical party
    parts, ends = {}, {n: hub.transport(n) for n in topo.names}
    for n in topo.names:
        kw = dict(extra)
        if faults and n in faults:
            kw["fault"] = faults[n]
        if steps is not None:
            kw.update(steps=steps, predicting=predicting)
        kw.update(out=out, resume=resume)
        parts[n] = physical_party(plan, n, held[n], ends[n], shapes=shapes, timeout=timeout,
                                  record=record, tracking=tracking, **kw)
        if built is not None:
            built(n, parts[n])
    reports: dict[str, PartyReport] = {}
    errors: dict[str, BaseException] = {}
    after: set[str] = set()  # parties that failed once the run was being stopped: consequences
    stopping: list[bool] = []  # [True] once the run is being stopped

    def work(name: str) -> None:
        try:
            reports[name] = parts[name].run(on_step if name == topo.lead else None)
        except BaseException as e:  # noqa: BLE001 - reported per party below (a killed client's SystemExit too)
            if isinstance(e, (TaskExit, KeyboardInterrupt)):  # the run is being ended: not the party's failure
                raise
            if stopping:
                after.add(name)
            errors[name] = e
            if name not in topo.droppable:
                stopping.append(True)
                hub.close()
            else:  # as its process would end: its connection closed, which the waits for it see at once
                ends[name].close()

    before = torch.get_num_threads()
    torch.set_num_threads(math_threads(len(topo.names)))  # what each party process would get (launch/processes.py)
    turns = Turns()
    tasks = {n: turns.spawn(f"party-{n}", lambda n=n: work(n)) for n in topo.names}
    try:
        with frozen_heap():  # no cyclic collection walks the process's libraries while the parties train
            _join(turns, [tasks[n] for n in topo.awaited], topo.grace_s, stopping, hub)
    finally:
        try:
            turns.close()
        finally:
            torch.set_num_threads(before)
    fatal = {p: e for p, e in errors.items() if p not in topo.droppable}
    root = {p: e for p, e in fatal.items() if not isinstance(e, TransportClosed) and p not in after} or fatal
    said = {p: (str(e) if isinstance(e, (PartyError, PlanError)) else f"{type(e).__name__}: {e}") for p, e in root.items()}
    errors.clear()  # (an error's traceback holds work's frame, whose cells hold errors and every party: a cycle)
    del fatal, root
    if said:
        raise RunError(said)
    for n, part in parts.items():  # a client that failed still reports what it did
        if n not in reports:
            reports[n] = part.report()
    return reports


def _join(turns: Turns, awaited: list, grace_s: float, stopping: list[bool], hub: InProcessHub) -> None:
    """Run the parties until those whose end is the run's (``awaited``) finish; the others end on their own
    once they have read "stop" and get ``grace_s`` for it, then the hub is closed under them."""
    turns.run(until=lambda: all(t.dead for t in awaited))
    turns.run(deadline=time.monotonic() + grace_s)
    stopping.append(True)
    hub.close()
    turns.run(deadline=time.monotonic() + 5)
