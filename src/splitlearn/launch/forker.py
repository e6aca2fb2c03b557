"""Party processes forked from one warmed-up process, so that a hundred of them fit in memory.

A Python process that has imported torch holds about 150 MiB of its own memory, and one that
has trained a step more; ``splitlearn run`` of a plan with 100 clients would need 28 GiB. The
launcher instead starts one *forker* (``python -m splitlearn.launch.forker``): it imports torch and
splitlearn once, trains one tiny step (torch initialises its kernels and allocator lazily),
freezes its objects out of the garbage collector's reach (``gc.freeze``: the collector would
otherwise write to every page) and then forks each party process on request. A child shares the
forker's pages until it writes to them: measured, a few MiB of its own before it starts its party.

The forker is single-threaded (fork copies only the calling thread) and creates no gRPC channel
before forking (each child starts its own). It reads one JSON request per line on stdin
(``{"name", "options", "stdout", "stderr"}``: the party's :class:`~splitlearn.launch.party.PartyOptions`
as JSON and the files for the child's output), answers ``{"name", "pid"}`` once forked and ``{"pid", "code"}`` when a child
ends, and exits when its stdin closes and its children have ended. Each child begins a session of
its own (its pid is its process group) and runs :func:`~splitlearn.launch.party.party_process`.
"""

from __future__ import annotations

import gc
import json
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["Forker", "Forked", "PRELOAD", "serve", "start_early", "take", "discard_early"]

PRELOAD = ("grpc", "splitlearn.launch.party", "splitlearn.launch.oneparty", "splitlearn.clients.coordinator",
           "splitlearn.clients.follower", "splitlearn.wire.transport.grpc", "splitlearn.run.align",
           "splitlearn.data.formats", "safetensors.torch", "sklearn.metrics")


# -- the launcher's side ---------------------------------------------------------------------------

class Forked:
    """A party process forked by the :class:`Forker`: ``pid``, ``poll()``, ``wait()``,
    ``returncode`` as in :class:`subprocess.Popen`."""

    def __init__(self, forker: "Forker", name: str, pid: int):
        self.forker, self.name, self.pid = forker, name, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.forker.proc.poll() is not None:  # nobody reports for it any more
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -9
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.forker.cond:
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    import subprocess

                    raise subprocess.TimeoutExpired(self.name, timeout or 0)
                self.forker.cond.wait(left if left is not None else 1.0)
        return self.returncode


class Forker:
    """The launcher's handle on the forker process (started with ``env``: the party processes' own)."""

    def __init__(self, env: dict[str, str]):
        import subprocess

        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "splitlearn.launch.forker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.ready = False
        self.cond = threading.Condition()
        self.by_pid: dict[int, Forked] = {}
        self.started: dict[str, int] = {}
        self.ended: dict[int, int] = {}  # codes of children whose handle was not made yet
        threading.Thread(target=self._read, name="sl-forker", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if msg.get("ready"):
                    self.ready = True
                elif "code" in msg:
                    child = self.by_pid.get(msg["pid"])
                    if child is None:
                        self.ended[msg["pid"]] = msg["code"]
                    else:
                        child.returncode = msg["code"]
                elif "pid" in msg:
                    self.started[msg["name"]] = msg["pid"]
                self.cond.notify_all()
        with self.cond:  # the forker is gone: its children are watched by pid from now on (Forked.poll)
            self.cond.notify_all()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once the forker has warmed up; RuntimeError if it cannot fork (it says why)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.ready:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    why = self.proc.stderr.read().decode(errors="replace").strip().splitlines() \
                        if self.proc.poll() is not None else []
                    self.kill()
                    raise RuntimeError(f"the forker cannot start party processes: {(why or ['no answer'])[-1]}")
                self.cond.wait(0.2)

    def start(self, name: str, options: str, stdout: str | Path, stderr: str | Path,
              timeout: float = 120.0, threads: int | None = None) -> Forked:
        """Fork a party process running the party of ``options`` (:class:`~splitlearn.launch.party.PartyOptions`
        as JSON; its output to the files given; ``threads``: its math threads, else torch's default there)."""
        request = {"name": name, "options": options, "stdout": str(stdout), "stderr": str(stderr), "threads": threads}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self.cond:
            while name not in self.started:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the forker did not start {name!r} (exit status {self.proc.poll()})")
                self.cond.wait(0.5)
            pid = self.started.pop(name)
            child = self.by_pid[pid] = Forked(self, name, pid)
            if pid in self.ended:
                child.returncode = self.ended.pop(pid)
        return child

    def close(self) -> None:
        """No more children: the forker exits once those it has end."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        """End it now, and the children it started that are still running (each leads a session of its own:
        killed by pid), and reap it: nothing of it is left."""
        import signal

        with self.cond:
            running = [pid for pid, child in self.by_pid.items() if child.returncode is None]
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:  # (reaped already: its group id may be another's by now)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def end(self, grace: float = 10.0) -> None:
        """No more children: close its input and wait until it exits, once those it has end (else, after
        ``grace`` seconds, :meth:`kill`)."""
        import subprocess

        self.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()


_early: Forker | None = None  # started before the plan is read: it imports torch meanwhile


def start_early(env: dict[str, str]) -> None:
    """Start a forker now (``env``: the party processes' own), for the next :func:`take` of this process:
    it imports torch (3-4 s) while the launcher reads and checks the plan. Unused, it ends with this
    process (its input closes)."""
    global _early
    if _early is None:
        _early = Forker(env)


def discard_early() -> None:
    """End the forker :func:`start_early` started, if no :func:`take` took it."""
    global _early
    forker, _early = _early, None
    if forker is not None:
        forker.kill()


def take(env: dict[str, str]) -> Forker:
    """The forker :func:`start_early` started, if it was for ``env``; else a new one."""
    global _early
    forker, _early = _early, None
    if forker is not None and forker.env == env and forker.proc.poll() is None:
        return forker
    if forker is not None:  # started for other settings, or gone
        _early = forker
        discard_early()
    return Forker(env)


# -- the forker process ----------------------------------------------------------------------------

def _warm_up() -> None:
    """Import what a party process runs, and train one tiny step, so that the children share it."""
    import torch
    from torch import nn

    import importlib

    for module in PRELOAD:  # grpc imported only: no channel before a fork
        importlib.import_module(module)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP thread pool before a fork: a child would wait on it for ever
    with torch.random.fork_rng():  # the children's global generator is the one a new process has
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long))
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)  # the pool is made at a child's first parallel region
    extra = len(os.listdir("/proc/self/task")) - 1 if os.path.isdir("/proc/self/task") else 0
    if extra:
        raise RuntimeError(f"the forker has {extra} threads besides its own: forking would copy their locks")


def _child(request: dict[str, Any]) -> None:
    """In the forked child: a session of its own, its output to its files, then the command."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = out if request["stderr"] == request["stdout"] else \
            os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        # the inherited objects stay frozen: a collection over them would write to every shared page
        from splitlearn.launch.party import PartyOptions, party_process
        from splitlearn.run.allocator import SINGLE_RUN

        SINGLE_RUN["process"] = True  # its one run's heap is frozen too, for good: the process ends with it

        if request.get("threads"):  # before its first parallel region makes the pool
            import torch

            torch.set_num_threads(int(request["threads"]))
        sys.argv = ["splitlearn-party", request["name"]]
        code = party_process(PartyOptions.from_json(request["options"]))
    except BaseException:  # noqa: BLE001 - whatever it is, the child ends here, saying so
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _say(out: IO[bytes], msg: dict) -> None:
    out.write((json.dumps(msg) + "\n").encode())
    out.flush()


def serve() -> None:
    from splitlearn.launch.status import set_title

    set_title("splitlearn forker")  # (each child names its party: splitlearn.launch.status.PartyWatch)
    _warm_up()
    out = sys.stdout.buffer
    fd = sys.stdin.fileno()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # told the launcher it can fork: children's errors go to their logs
    pending = b""
    children: set[int] = set()
    reading = True
    gc.collect()
    gc.freeze()
    _say(out, {"ready": True})
    while reading or children:
        if reading:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    reading = False
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = json.loads(line)
                    pid = os.fork()
                    if pid == 0:
                        _child(request)
                    children.add(pid)
                    _say(out, {"name": request["name"], "pid": pid})
        else:
            time.sleep(0.1)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            _say(out, {"pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
