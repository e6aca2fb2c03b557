"""Real ``splitlearn party`` processes against a peer with a valid certificate played by the test
(tests/test_hostile_processes.py, tests/test_align_hostile.py): their command lines, their stderr
read as it comes, their peak memory and threads from /proc, and Mallory, the hostile peer, over
the gRPC transport with mutual TLS.

Peak memory is read from /proc while the process runs (``VmHWM``): the ``ru_maxrss`` that
``wait4`` gives for a child counts the memory of the test process it was forked from too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from splitlearn.wire.link import Link
from splitlearn.wire.messages import Kind, Message
from splitlearn.wire.transport import TransportError
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import load_credentials

__all__ = ["free_port", "party_cmd", "toml", "hwm_kib", "threads", "Proc", "Mallory"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def party_cmd(plan: Path, name: str, certs: Path, ports: dict[str, int], out: Path, *extra: str) -> list[str]:
    """``splitlearn party`` for ``name``, listening on its port and dialing every other one."""
    cmd = [sys.executable, "-m", "splitlearn", "party", str(plan), "--name", name, "--certs", str(certs),
           "--listen", f"127.0.0.1:{ports[name]}", "--out", str(out), "-q", *extra]
    return cmd + [a for peer, port in ports.items() if peer != name for a in ("--peer", f"{peer}=127.0.0.1:{port}")]


def toml(body: dict) -> str:
    """A plan body (as ``tomllib`` reads it, two levels of tables) written back as TOML."""
    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items() if x is not None) + "}"

    lines = [f"{k} = {val(v)}" for k, v in body.items() if not isinstance(v, dict)]
    for k, v in body.items():
        if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) and k != "data":
            for name, section in v.items():
                lines += [f"[{k}.{name}]", *(f"{a} = {val(b)}" for a, b in section.items() if b is not None)]
        elif isinstance(v, dict):
            lines += [f"[{k}]", *(f"{a} = {val(b)}" for a, b in v.items() if b is not None)]
    return "\n".join(lines) + "\n"


def _status(pid: int, key: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    return int(status.split(f"{key}:", 1)[1].split()[0]) if f"{key}:" in status else -1


def hwm_kib(pid: int) -> int:
    """The peak resident memory of a running process (KiB; -1 once it has exited)."""
    return _status(pid, "VmHWM")


def threads(pid: int) -> int:
    """The threads of a running process, every kind (Python's, gRPC's, the math library's)."""
    return _status(pid, "Threads")


class Proc:
    """A party process whose stderr is read as it comes (never blocking it on a full pipe);
    :meth:`wait_for` waits on a line, :meth:`end` on its exit."""

    def __init__(self, cmd: list[str]):
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        self.pid = self.p.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first line holding ``text``, once logged (AssertionError if the process ends without it)."""
        with self._cond:
            self._cond.wait_for(lambda: self._eof or any(text in x for x in self.lines), timeout)
            found = [x for x in self.lines if text in x]
            assert found, f"no line with {text!r} within {timeout} s (ended: {self._eof}): {self.stderr[-3000:]}"
            return found[0]

    def hwm(self) -> int:
        """Its peak resident memory so far (KiB); it must still run."""
        kib = hwm_kib(self.pid)
        assert kib > 0, f"the process ended before its memory was read: {self.stderr[-2000:]}"
        return kib

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.lines)

    @property
    def said(self) -> str:
        """What it logged, with the line breaks of its terminal output undone (for phrases)."""
        return " ".join(self.stderr.split())

    def end(self, timeout: float = 60) -> int:
        """Its exit status once it exits (killed after ``timeout``), and all it logged read."""
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.p.wait()
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """Its process group, if it still runs (the test's cleanup)."""
        if self.p.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.p.wait()


class Mallory:
    """A peer holding a valid certificate (``name``'s), dialing the real parties in ``dial``."""

    def __init__(self, certs: Path, name: str, dial: dict[str, int], incarnation: bytes | None = None):
        self.name = name
        self.transport = GrpcTransport(name, dial={p: f"127.0.0.1:{port}" for p, port in dial.items()},
                                       credentials=load_credentials(certs, name), connect_timeout=60)
        if incarnation is not None:  # the same process as streams opened by hand before
            self.transport.incarnation = incarnation
        self.transport.start()
        self.link = Link(self.transport)
        self.errors: list[str] = []  # the ERROR texts received so far

    def __enter__(self) -> Mallory:
        self.transport.wait_connected(60)
        return self

    def __exit__(self, *exc) -> None:
        self.transport.close()

    def send(self, msg: Message) -> bool:
        """False once the party is gone."""
        try:
            self.link.send(msg)
        except TransportError:
            return False
        return True

    def recv(self, kind: Kind, timeout: float = 60) -> Message:
        """The next message of ``kind``, noting every ERROR that comes meanwhile."""
        while True:
            msg = self.link.recv(timeout)
            if msg.kind == Kind.ERROR:
                self.errors.append(msg.text)
            if msg.kind == kind:
                return msg
