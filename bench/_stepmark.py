"""Step marks for bench/overhead.py: which engine step a profiler's sample belongs to, and each step's times.

:func:`install` wraps ``Party.step`` of splitlearn's engine in this process (party processes get it through
the ``sitecustomize.py`` that :func:`site_dir` writes, on ``PYTHONPATH``): each call goes through a function
named ``stepmark_<kind>[<party>]``, so a sampled stack says which party ran it and which kind of step it was,
and one line per step is appended to a file in the folder named by ``OVERHEAD_STEP_LOG``.

Kinds: ``steady`` is a training step whose party's previous step was a training step too; ``first`` any other
training step (the run's first, which counts FLOPs, and each epoch's first, which at one party waits for the
other's end-of-epoch work); ``other`` a handshake, evaluation or prediction step.

A line: ``pid tid party kind mode rows t0 t1`` (``tid``: the thread that ran the step; ``t0``, ``t1``:
``time.perf_counter()``), and with ``OVERHEAD_STEP_CPU=1`` the
process's threads' CPU at both ends, from ``/proc/self/task/*/schedstat`` (nanoseconds on a core, and
runnable but waiting for one): ``|tid:name:run0:wait0:run1:wait1,...`` (a thread
that is not Python's named ``os=`` and its ``comm``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

ENV = "OVERHEAD_STEP_LOG"
CPU_ENV = "OVERHEAD_STEP_CPU"
_lock = threading.Lock()
_fd: dict[tuple[int, str], int] = {}  # (pid, folder) -> the log file's descriptor (a forked child opens its own)


def _threads() -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, ns on a core, ns runnable and waiting for a core), every thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait, _ = f.read().split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        t = int(tid)
        name = names.get(t) or ("main" if t == os.getpid() else "os=" + comm)  # os=: no Python thread
        out[t] = (re.sub(r"[\s:,|]", "_", name), int(run), int(wait))
    return out


def _write(line: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    key = (os.getpid(), folder)
    with _lock:
        if key not in _fd:
            for old in [k for k in _fd if k[0] == key[0]]:  # an earlier run's folder
                os.close(_fd.pop(old))
            _fd[key] = os.open(Path(folder) / f"{key[0]}.steps", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(_fd[key], line.encode())


def install() -> None:
    """Wrap ``splitlearn.core.engine.Party.step`` (once per process)."""
    from splitlearn.core.engine import Party

    if getattr(Party.step, "stepmark", False):
        return
    inner = Party.step

    def call(self, *args, **kwargs):  # the template: its code is renamed per kind and party
        return inner(self, *args, **kwargs)

    renamed: dict[tuple[str, str], types.FunctionType] = {}

    def through(kind: str, party: str) -> types.FunctionType:
        if (kind, party) not in renamed:
            name = f"stepmark_{kind}[{party}]"
            code = call.__code__.replace(co_name=name, co_qualname=name)
            renamed[(kind, party)] = types.FunctionType(code, call.__globals__, name, None, call.__closure__)
        return renamed[(kind, party)]

    def step(self, step, rows, mode, *more, **kwargs):
        before = self.__dict__.get("_stepmark_mode")
        kind = ("steady" if before == "train" else "first") if mode == "train" else "other"
        self.__dict__["_stepmark_mode"] = mode
        cpu = os.environ.get(CPU_ENV) == "1"
        c0 = _threads() if cpu else {}
        t0 = time.perf_counter()
        try:
            return through(kind, self.name)(self, step, rows, mode, *more, **kwargs)
        finally:
            t1 = time.perf_counter()
            extra = ""
            if cpu:
                c1 = _threads()
                extra = "|" + ",".join(f"{t}:{c1[t][0]}:{c0[t][1]}:{c0[t][2]}:{c1[t][1]}:{c1[t][2]}"
                                       for t in c1 if t in c0)
            n = 1 if mode == "handshake" else len(rows)
            who = f"{os.getpid()} {threading.get_native_id()} {self.name}"
            _write(f"{who} {kind} {mode} {n} {t0:.6f} {t1:.6f}{extra}\n")

    step.stepmark = True
    Party.step = step


def site_dir() -> Path:
    """A folder holding a ``sitecustomize.py`` that installs the marks in every Python process started with it
    on ``PYTHONPATH`` (the launcher's forker, and so every party process forked from it)."""
    folder = Path(tempfile.mkdtemp(prefix="stepmark-"))
    here = str(Path(__file__).resolve().parent)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {here!r})\n"
        "try:\n    import _stepmark\n    _stepmark.install()\n"
        "except Exception as e:  # the run goes on unmarked; bench/overhead.py then finds no step lines\n"
        "    print('stepmark: not installed:', e, file=sys.stderr)\n")
    return folder


def read(folder: Path) -> list[dict]:
    """Every step line written under ``folder``."""
    rows = []
    for path in sorted(Path(folder).glob("*.steps")):
        for line in path.read_text().splitlines():
            head, _, cpu = line.partition("|")
            pid, tid, party, kind, mode, n, t0, t1 = head.split()
            threads = {}
            for item in filter(None, cpu.split(",")):
                thread, name, r0, w0, r1, w1 = item.split(":")
                threads[int(thread)] = (name, (int(r1) - int(r0)) / 1e9, (int(w1) - int(w0)) / 1e9)
            rows.append({"pid": int(pid), "tid": int(tid), "party": party, "kind": kind, "mode": mode, "rows": int(n),
                         "t0": float(t0), "t1": float(t1), "threads": threads})
    return rows


if __name__ == "__main__":  # pragma: no cover - a check by hand: python bench/_stepmark.py FOLDER
    for r in read(Path(sys.argv[1]))[:20]:
        print(r)
