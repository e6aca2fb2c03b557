"""Helpers shared by the test files (no test file imports another, nor a private name of the
package): real ``splitlearn party`` processes and the hostile peer Mallory, run folders and their
weights, the plans several files train, a server played in a thread against a hospital played by
hand, and a TCP relay whose links the test cuts.

Peak memory is read from /proc while the process runs (``VmHWM``): the ``ru_maxrss`` that
``wait4`` gives for a child counts the memory of the test process it was forked from too."""

from __future__ import annotations

import contextlib
import csv
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

import numpy as np
import torch
from safetensors.torch import load_file

from splitlearn.core.engine import Party
from splitlearn.wire.transport.turns import wait_until
from splitlearn.core.load import load_plan
from splitlearn.core.plan import Plan, plan_hash
from splitlearn.launch.processes import free_port
from splitlearn.launch.threads import run_local
from splitlearn.models import build_segment
from splitlearn.run.session import run_party
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.codec import Encoded, get_codec
from splitlearn.wire.link import Link
from splitlearn.wire.messages import PROTOCOL_VERSION, Kind, Message, decode, encode, kind_of
from splitlearn.wire.transport import InProcessHub, TransportError
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import load_credentials

from .conftest import EXAMPLES

__all__ = ["POISON", "Poisoning", 
    # party processes (tests/test_hostile_processes.py, tests/test_align_hostile.py, the resume tests)
    "free_port", "party_cmd", "toml", "hwm_kib", "threads", "Proc", "Mallory", "descendants", "kill_tree",
    "process_state",
    # run folders and modules
    "weights", "same_run", "Stop", "stop_after", "max_diff", "module_state",
    # plans
    "TARGETS", "DROPOUT", "PLAN", "tiny", "split_mlp", "raw_cancer", "write_csv", "vertical_plan", "clinic_files",
    # a server in a thread against a hospital played by hand
    "ACT", "LABEL", "f32", "FakeHospital", "Server",
    # links the test cuts
    "Proxy",
    # the training recipe: split runs against plain PyTorch (tests/test_recipe.py)
    "norm_mlp", "recipe_sgd", "run_steps", "unsplit_segments", "worst_difference",
    # waiting on what a party logs
    "LogEvent",
]


class LogEvent(logging.Handler):
    """An event set when ``logger`` (or one below it) logs a message containing ``text``: a test
    waits on what a party says it did (a client skipped) instead of sleeping past it. Use as a
    context manager (the handler is removed on the way out)."""

    def __init__(self, logger: str, text: str):
        super().__init__(logging.DEBUG)
        self.logger, self.text, self.event = logging.getLogger(logger), text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()

    def wait(self, timeout: float) -> bool:
        """Whether it was logged within ``timeout`` s; a party of the thread launcher waiting here lets the other
        parties run meanwhile (they take turns on one thread: ``wire/transport/turns.py``)."""
        return wait_until(self.event.is_set, timeout)

    def __enter__(self) -> "LogEvent":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


# -- party processes (free_port is the launcher's: one set of ports handed out) -------------------

def party_cmd(plan: Path, name: str, certs: Path, ports: dict[str, int], out: Path, *extra: str) -> list[str]:
    """``splitlearn party`` for ``name``, listening on its port and dialing every other one."""
    cmd = [sys.executable, "-m", "splitlearn", "party", str(plan), "--name", name, "--certs", str(certs),
           "--listen", f"127.0.0.1:{ports[name]}", "--out", str(out), "-q", *extra]
    return cmd + [a for peer, port in ports.items() if peer != name for a in ("--peer", f"{peer}=127.0.0.1:{port}")]


def split_mlp(name: str, sizes: list[int], *, holder: str = "hospital", server: str = "server",
              loss: str = "digit", lr: float | None = None, **sections) -> dict:
    """A plan body: an MLP of ``sizes`` cut after its first layer, the bottom at ``holder`` (who holds
    ``x`` and ``y``), the rest at ``server``; ``sections`` (``data``, ``train``, ``clients``, ...) as given.
    Written as a file with :func:`toml`."""
    opt = {"optimizer": {"name": "sgd", "lr": lr}} if lr is not None else {}
    return {"name": name, **{k: v for k, v in sections.items() if k not in ("parties",)},
            "parties": {holder: {"holds": {"x": "x", "y": "y"}, **sections.get("parties", {}).get(holder, {}), **opt},
                        server: {**sections.get("parties", {}).get(server, {}), **opt}},
            "networks": {"mlp": {"zoo": "mlp", "args": {"sizes": sizes}}},
            "segments": {"bottom": {"party": holder, "inputs": [f"{holder}.x"], "network": "mlp", "layers": [0, 2]},
                         "top": {"party": server, "inputs": ["bottom"], "network": "mlp", "layers": [2, 3]}},
            "losses": {loss: {"input": "top", "target": f"{holder}.y"}}}


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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (party processes start sessions of their own: no process group has them all)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it; their pids, ``pid`` first."""
    victims = [pid, *descendants(pid)]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def process_state(pid: int) -> str:
    """The state line of a process from /proc, lower case (``"zombie"`` once it is gone)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


# -- run folders and modules -------------------------------------------------------------------


def weights(run: Path) -> dict[str, torch.Tensor]:
    """Every party's saved weights in a run folder, keyed ``party/segment.name``."""
    out = {}
    for folder in sorted((run / "parties").iterdir()):
        f = folder / "weights.safetensors"
        if f.is_file():
            out.update({f"{folder.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def same_run(a: Path, b: Path, count_bytes: bool = True) -> None:
    """``b`` ends as ``a``: weights and metrics, and (``count_bytes``) bytes and FLOPs per party."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) == 0.0
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert ra["metrics"]["test_accuracy_per_epoch"] == rb["metrics"]["test_accuracy_per_epoch"]
    assert ra["metrics"]["train_loss"] == rb["metrics"]["train_loss"]
    assert ra["metrics"].get("ci95") == rb["metrics"].get("ci95")  # drawn from the last evaluation, kept or not
    for p in ra["parties"] if count_bytes else ():
        assert ra["parties"][p]["bytes_sent"] == rb["parties"][p]["bytes_sent"], p
        assert ra["parties"][p]["flops"] == rb["parties"][p]["flops"], p


class Stop(Exception):
    """What :func:`stop_after` raises."""


def stop_after(n: int):
    """An ``on_step`` callback that stops the run (raises :class:`Stop`) at its ``n``-th step."""
    seen = {"k": 0}

    def on_step(pr) -> None:
        seen["k"] += 1
        if seen["k"] == n:
            raise Stop(f"stopped after {n} steps")

    return on_step


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts, over ``a``'s keys."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def module_state(mod) -> dict:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


# -- plans -------------------------------------------------------------------------------------

TARGETS = {  # plan -> minimum test accuracy (the figures)
    "vanilla": 0.90,
    "u_shaped": 0.90,
    "multi_hop": 0.90,
    "vertical": 0.93,
    "vertical_three": 0.93,
    "vertical_u_shaped": 0.93,
    "nopeek": 0.90,
    "vertical_nopeek": 0.93,
    "resnet": 0.95,  # a user's own nn.Module (examples/my_resnet.py), cut by name
}

# A factory module with Dropout at every party (written as ``dropout_nets.py`` next to PLAN)
DROPOUT = '''
from torch import nn


def bottom(width=16):
    return nn.Sequential(nn.Linear(15, width), nn.ReLU(), nn.Dropout(0.3))


def top():
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
'''

# A plan of two clinics and a server, each running Dropout (from DROPOUT, as dropout_nets.py)
PLAN = '''
[data]
dataset = "breast_cancer"
[train]
epochs = 2
batch_size = 32
seed = 7
[parties.clinic_a]
holds = { x = { field = "x", columns = [0, 15] } }
[parties.clinic_b]
holds = { x = { field = "x", columns = [15, 30] } }
[parties.server]
holds = { y = "y" }
[networks.bottom_a]
factory = "dropout_nets:bottom"
[networks.bottom_b]
factory = "dropout_nets:bottom"
[networks.top]
factory = "dropout_nets:top"
[segments.bottom_a]
party = "clinic_a"
inputs = ["clinic_a.x"]
network = "bottom_a"
[segments.bottom_b]
party = "clinic_b"
inputs = ["clinic_b.x"]
network = "bottom_b"
[segments.top]
party = "server"
inputs = ["bottom_a", "bottom_b"]
network = "top"
[losses.malignant]
input = "top"
target = "server.y"
'''


def tiny(hidden=16, **clients) -> Plan:
    """Digits, a two-layer MLP cut after the first ReLU, plain SGD (no optimizer state to hand off);
    ``clients`` (``count=``, ``schedule=`` ...) make it a ``[clients]`` plan of the hospital; a
    ``timeout`` given for its answers bounds each step too (``[train] step_timeout``), so a silent
    party is given up on as soon in a turn as between turns."""
    body = {
        "name": "tiny", "data": {"dataset": "digits"}, "train": {"epochs": 2, "batch_size": 32, "seed": 3},
        "parties": {"hospital": {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.1}},
                    "server": {"optimizer": {"name": "sgd", "lr": 0.1}}},
        "networks": {"mlp": {"zoo": "mlp", "args": {"sizes": [64, hidden, 10]}}},
        "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "mlp", "layers": [0, 2]},
                     "top": {"party": "server", "inputs": ["bottom"], "network": "mlp", "layers": [2, 3]}},
        "losses": {"digit": {"input": "top", "target": "hospital.y"}},
    }
    if clients:
        body["clients"] = {"template": "hospital", **clients}
        if "timeout" in clients:
            body["train"]["step_timeout"] = clients["timeout"]
    return load_plan(body)


def raw_cancer():
    """The breast cancer data set: features (float32) and labels (int64)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def write_csv(path, ids, x, y=None, names=None):
    """A CSV file of ``pid``, the feature columns and (``y`` given) ``outcome``."""
    names = names or [f"f{i}" for i in range(x.shape[1])]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pid", *names] + (["outcome"] if y is not None else []))
        for k, i in enumerate(ids):
            w.writerow([i, *[f"{v:.6g}" for v in x[k]]] + ([int(y[k])] if y is not None else []))


def vertical_plan(tmp_path, files: dict[str, str], align: str = "exact", standardize: bool = False,
                  label_at: str = "clinic_a") -> dict:
    """A plan body: one MLP bottom per clinic on its file (``files``: clinic -> CSV path), summed at
    the server's top; the labels at ``label_at``."""
    widths = {"clinic_a": 10, "clinic_b": 10, "clinic_c": 10}
    parties, networks, segments = {}, {}, {}
    for p, file in files.items():
        holds = {"x": "x"} if p != label_at else {"x": "x", "y": "y"}
        parties[p] = {"holds": holds, "data": {"dataset": "csv", "path": file, "id_column": "pid",
                                                "label_column": "outcome" if p == label_at else None,
                                                "options": {"standardize": standardize}}}
        networks[f"b_{p}"] = {"zoo": "mlp", "args": {"sizes": [widths[p], 8], "out_activation": True}}
        segments[f"b_{p}"] = {"party": p, "inputs": [f"{p}.x"], "network": f"b_{p}"}
    parties["server"] = {}
    networks["top"] = {"zoo": "mlp", "args": {"sizes": [8, 8, 2]}}
    segments["top"] = {"party": "server", "inputs": [f"b_{p}" for p in files], "merge": "sum", "network": "top"}
    return {"name": "clinics", "data": {"align": align}, "train": {"epochs": 2, "batch_size": 32, "seed": 0},
            "parties": parties, "networks": networks, "segments": segments,
            "losses": {"malignant": {"input": "top", "target": f"{label_at}.y"}}}


def clinic_files(tmp_path, missing_at_b: int = 0, rng_seed: int = 3):
    """Three clinics with ten columns each, string ids, each file's rows shuffled; clinic_b misses some ids.
    Returns (clinic -> file, clinic -> the ids it holds, every id)."""
    x, y = raw_cancer()
    ids = np.asarray([f"PAT-{i:05d}-Q" for i in range(len(y))])
    rng = np.random.default_rng(rng_seed)
    out, held = {}, {}
    for k, p in enumerate(("clinic_a", "clinic_b", "clinic_c")):
        keep = np.arange(len(y))
        if p == "clinic_b" and missing_at_b:
            keep = np.sort(rng.choice(len(y), len(y) - missing_at_b, replace=False))
        if p == "clinic_c":
            keep = keep[5:]  # the first five patients never went to clinic c
        order = rng.permutation(keep)
        file = tmp_path / f"{p}.csv"
        write_csv(file, ids[order], x[order, 10 * k:10 * k + 10], y[order] if p == "clinic_a" else None)
        out[p], held[p] = str(file), set(ids[keep].tolist())
    return out, held, ids


# -- a server in a thread against a hospital played by hand (the vanilla plan) -----------------

ACT, LABEL = "bottom->top", "hospital.y->digit"  # the vanilla plan's activation and label wires


def f32(t: torch.Tensor) -> Encoded:
    """``t`` encoded by the float32 codec."""
    return get_codec("float32").encode(t)


class FakeHospital:
    """Plays the hospital of the vanilla plan by hand, to send the server whatever we like."""

    def __init__(self, hub, plan, setup):
        self.t = hub.transport("hospital")
        self.plan, self.setup = plan, setup

    def send(self, kind, step, wire, tensors, text=""):
        self.t.send("server", encode(Message(kind, "hospital", "server", step, wire, tensors, text)))

    def recv(self):
        return decode(self.t.recv(10)[1])

    def hello(self, plan_hash_value):
        self.send(Kind.HELLO, 0, "", {}, json.dumps({"protocol": PROTOCOL_VERSION, "plan_hash": plan_hash_value,
                                                      "ids_hash": self.setup.ids_hash}))


class Server:
    """The vanilla plan's server in a thread, run through its session for ``steps``; the test plays the hospital."""

    def __init__(self, plan=None, steps=1, timeout=10.0, limits=None):
        self.plan, self.setups, self.shapes = prepare(plan or EXAMPLES / "vanilla.toml", epochs=1)
        self.steps = list(schedule(self.plan, self.setups["server"].splits))[:steps]
        self.hub = InProcessHub(["hospital", "server"])
        s = self.setups["server"]
        self.link = Link(self.hub.transport("server"), limits=limits)
        self.party = Party(s.graph, "server", self.link, s.modules, s.optimizer, s.inputs, {}, timeout=timeout)
        self.h = FakeHospital(self.hub, self.plan, self.setups["hospital"])
        self.box = {}
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        try:
            self.box["report"] = run_party(self.party, iter(self.steps), ids_hash=self.setups["server"].ids_hash)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.box["error"] = e

    def greet(self):
        """Hello and the handshake (one row of zeros on each wire)."""
        self.h.hello(plan_hash(self.plan))
        assert self.h.recv().kind == Kind.HELLO
        self.h.send(Kind.ACTIVATION, -1, ACT, {"t": self.encode(torch.zeros(1, 128))})
        self.h.send(Kind.ACTIVATION, -1, LABEL, {"t": get_codec("raw").encode(torch.zeros(1, dtype=torch.long))})

    def encode(self, t):
        """``t`` encoded by the activation wire's codec."""
        return get_codec(self.plan.wires["bottom"].codec if "bottom" in self.plan.wires else "float32").encode(t)

    def good(self, i=0):
        """The honest activation and labels of step i."""
        st = self.steps[i]
        hs = self.setups["hospital"]
        act = hs.modules["bottom"](hs.inputs["hospital.x"][st.rows]).detach()
        return {"t": self.encode(act)}, {"t": get_codec("raw").encode(hs.inputs["hospital.y"][st.rows])}

    def finish(self, i=0):
        """Send step i's honest activation and labels."""
        act, lab = self.good(i)
        self.h.send(Kind.ACTIVATION, self.steps[i].id, ACT, act)
        self.h.send(Kind.ACTIVATION, self.steps[i].id, LABEL, lab)

    def errors(self):
        """ERROR messages the server sent back (gradients are skipped)."""
        out = []
        while True:
            try:
                m = decode(self.h.t.recv(0.5)[1])
            except Exception:  # noqa: BLE001 - drained
                return out
            if m.kind == Kind.ERROR:
                out.append(m)

    def done(self):
        """Say goodbye, wait for the server's thread and return its report (it must not have failed)."""
        self.h.send(Kind.STOP, 0, "", {}, "done")
        self.thread.join(20)
        assert not self.thread.is_alive()
        assert "error" not in self.box, self.box.get("error")
        return self.box["report"]

    def weights(self):
        """A copy of the server's weights, keyed ``segment.name``."""
        return {f"{k}.{n}": v.detach().clone() for k, m in self.setups["server"].modules.items()
                for n, v in m.state_dict().items()}


# -- links the test cuts ----------------------------------------------------------------------


class Proxy:
    """A TCP relay on loopback whose connections the test can cut (and refuse for a while)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.open = threading.Event()
        self.open.set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # nothing listens there yet: the dialer sees its connection closed and dials again
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, refuse_for: float) -> None:
        """Break every connection now and refuse new ones for ``refuse_for`` seconds."""
        self.open.clear()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns.clear()
        threading.Timer(refuse_for, self.open.set).start()

    def close(self) -> None:
        self.server.close()
        self.cut(0)


POISON = 9.9e5  # just inside the default max_abs of 1e6 (issue #22's attack on values inside the bounds)


class Poisoning:
    """The attacker's end of a transport, under a party's real code: before each of its ``kind``
    messages of ``steps`` on the activation wire ``ACT`` it sends the same tensor filled with
    ``POISON``, then the honest one (so the run goes on wherever the poison is refused); the ERRORs
    it receives are kept in ``told``, not handed on."""

    def __init__(self, inner, steps: set[int], kind: Kind = Kind.ACTIVATION):
        self.inner, self.steps, self.kind, self.told = inner, steps, kind, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, dst: str, data: bytes) -> None:
        msg = decode(data)
        if msg.kind == self.kind and msg.wire == ACT and msg.step in self.steps:
            codec = get_codec(msg.tensors["t"].codec)
            bad = torch.full_like(codec.decode(msg.tensors["t"]), POISON)
            self.inner.send(dst, encode(Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire,
                                                {"t": codec.encode(bad)})))
        self.inner.send(dst, data)

    def recv(self, timeout=None):
        while True:
            peer, data = self.inner.recv(timeout)
            if kind_of(data) != Kind.ERROR:
                return peer, data
            self.told.append(decode(data).text)


# -- the training recipe: split runs against plain PyTorch (tests/test_recipe.py) -----------------


def norm_mlp(width: int = 16) -> torch.nn.Sequential:
    """A network factory (``tests.support:norm_mlp``): digits to ten classes through a LayerNorm."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, 10))


def recipe_sgd(params) -> torch.optim.Optimizer:
    """An optimizer factory (``tests.support:recipe_sgd``): what ``{ name = "SGD", lr = 0.05, momentum = 0.9 }`` makes."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def run_steps(plan: Plan, count: int | None = None) -> tuple[Plan, dict, list]:
    """``plan`` set up and checked (:func:`prepare`), then its schedule's first ``count`` steps (every step: None)
    run through the engine, every party in a thread: (plan, setups, the steps run)."""
    plan, setups, shapes = prepare(plan)
    steps = list(schedule(plan, next(iter(setups.values())).splits))[:count]
    run_local(plan, setups, shapes, steps=steps)
    return plan, setups, steps


def unsplit_segments(plan: Plan) -> dict[str, torch.nn.Module]:
    """Every segment of ``plan`` as its party builds it (the same initial weights): the pieces of the unsplit
    model, for plain PyTorch to train (test_equivalence's reference)."""
    return {seg: build_segment(plan, seg) for seg in plan.segments}


def worst_difference(setups: dict, ref: dict[str, torch.nn.Module]) -> float:
    """The largest difference between any party's trained segment and the same segment of ``ref``."""
    return max((a - ref[seg].state_dict()[k]).abs().max().item() for s in setups.values()
               for seg, mod in s.modules.items() for k, a in mod.state_dict().items())


# -- your own loop (tests/test_stage.py): parties in threads, over the in-process hub or gRPC with certificates ------

def in_threads(*calls) -> list:
    """Run each function in a thread of its own and return their results in order; the first exception raised
    in any of them is raised here (after every thread ended)."""
    results, errors = [None] * len(calls), [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a party's thread did not end within 120 s"
    for e in errors:
        if e is not None:
            raise e
    return results


def grpc_chain(certs: Path, parties: list[str]) -> list[GrpcTransport]:
    """A gRPC transport per party with its certificate (``certs``: from ``make_certs``), each listening on a free
    loopback port and dialing the party before it, connected; the caller closes them."""
    ports = {p: free_port() for p in parties}
    out = [GrpcTransport(p, listen=f"127.0.0.1:{ports[p]}" if k + 1 < len(parties) else None, accept=parties[k + 1:k + 2],
                         dial={parties[k - 1]: f"127.0.0.1:{ports[parties[k - 1]]}"} if k else {},
                         credentials=load_credentials(certs, p), connect_timeout=30).start()
           for k, p in enumerate(parties)]
    for t in out:
        t.wait_connected()
    return out


__all__ += ["in_threads", "grpc_chain"]


class FakeLink:
    """What an agreement over the tree (core/precision.py, core/stopping.py) sends and refuses, each refusal naming
    the peer."""

    def __init__(self):
        self.sent: list[Message] = []
        self.refused: list[str] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def refuse(self, peer: str, reason: str, step: int = 0, wire: str = "") -> None:
        self.refused.append(f"{peer}: {reason}")


class ServiceLines:
    """What a ``splitlearn serve`` process prints (a line per run whose state changes), read by a thread and waited
    on line by line: no polling of its runs."""

    def __init__(self, proc: subprocess.Popen):
        import queue

        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()

    def until(self, run: str, states: tuple[str, ...], timeout: float = 120.0) -> str:
        """The first line saying run ``run`` reached one of ``states`` (printed since the service started)."""
        import queue

        wanted = tuple(f"run {run!r}: {s}" for s in states)
        end = time.monotonic() + timeout
        k = 0
        while True:
            while k < len(self.seen):
                if self.seen[k].startswith(wanted):
                    return self.seen[k]
                k += 1
            try:
                self.seen.append(self.lines.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"run {run!r} never reached {states}; the service said {self.seen[-5:]}") from None


__all__ += ["ServiceLines"]


@contextlib.contextmanager
def netns_pair(prefix: str, addresses: dict[str, str]):
    """Two network namespaces joined by a veth pair, one per party of ``addresses`` (party -> its IPv4 address,
    /24): yields ({party: namespace}, (veth of the first, veth of the second)); removed on the way out (needs
    root and iproute2)."""
    tag = str(free_port())[-4:]
    ns = {p: f"{prefix}{p[0]}{tag}" for p in addresses}
    veth = tuple(f"{prefix[-1]}{p[0]}{tag}" for p in addresses)

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for (party, n), v in zip(ns.items(), veth):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{addresses[party]}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield ns, veth
    finally:
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


__all__ += ["netns_pair"]


def digits_halves_plan(folder: Path, *, epochs: int, wires: dict | None = None) -> dict:
    """Digits split between two clinics, the 4 left and the 4 right pixels of every row of 8 (written to
    ``folder/digits_halves.npz`` once), the labels at the server: bottoms mlp [32, 32], top mlp [64, 32, 10] over
    their concatenation, SGD lr 0.1 momentum 0.9, batch 64, seed 0 (the audit's reproductions run on it)."""
    from splitlearn.data.embedded import digits

    path = folder / "digits_halves.npz"
    if not path.exists():
        x = digits().fields["x"].reshape(-1, 8, 8)
        np.savez(path, left=x[:, :, :4].reshape(-1, 32), right=x[:, :, 4:].reshape(-1, 32), y=digits().fields["y"])
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    bottom = {"zoo": "mlp", "args": {"sizes": [32, 32], "out_activation": True}}
    return {"name": "digits_halves", "data": {"dataset": "npz", "path": str(path)},
            "train": {"epochs": epochs, "batch_size": 64, "seed": 0},
            "parties": {"clinic_a": {"holds": {"x": "left"}, "optimizer": sgd},
                        "clinic_b": {"holds": {"x": "right"}, "optimizer": sgd},
                        "server": {"holds": {"y": "y"}, "optimizer": sgd}},
            "networks": {"bottom_a": bottom, "bottom_b": bottom,
                         "top": {"zoo": "mlp", "args": {"sizes": [64, 32, 10]}}},
            "segments": {"bottom_a": {"party": "clinic_a", "inputs": ["clinic_a.x"], "network": "bottom_a"},
                         "bottom_b": {"party": "clinic_b", "inputs": ["clinic_b.x"], "network": "bottom_b"},
                         "top": {"party": "server", "inputs": ["bottom_a", "bottom_b"], "merge": "concat",
                                 "network": "top"}},
            "losses": {"digit": {"input": "top", "target": "server.y"}},
            "wires": wires or {}}
