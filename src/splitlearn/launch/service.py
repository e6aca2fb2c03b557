"""A party service: one party of a consortium kept up between runs (``splitlearn serve --kit DIR``).

An administrator holding an ``admin`` certificate of the consortium's authority submits a run to each party's
service (``splitlearn submit PLAN --to HOST:PORT``): the service writes the plan into a folder of its own
(``KIT/runs/RUN/``), queues it, and starts its party of it as a party process when its turn comes (one run at a
time, in order), with the kit's key and certificates and the site's own rows (``--data``). A run that fails is
recorded as failed (with its party's error) and the next one starts; a run can be stopped, queued or running.

The administration interface is HTTPS with mutual TLS on its own address: the client must present a
certificate of the kit's authority for the role ``admin`` (TLS itself refuses one of another authority or
expired), not on the kit's revocation list (``crl.pem``, read again when it changes); anything else is
refused (403) naming why. Requests are JSON, at most :data:`MAX_BODY` bytes: ``GET /runs``, ``POST /runs``
``{"run": NAME, "plan": TOML}``, ``POST /runs/NAME/stop``. A submitted plan that would run code of its own
(a ``factory``) is refused unless the service allows it (``allow_code``): an administrator's certificate
is not a review of the code. The runs are recorded in ``KIT/runs/runs.json``: a service started again takes
up the queued ones, and a run it was running is recorded as failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["Service", "RunEntry", "submit", "list_runs", "stop_run", "MAX_BODY", "ServiceError"]

log = logging.getLogger("splitlearn.launch.service")

MAX_BODY = 1 << 20  # a plan is a few KiB; more is refused (413)
_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServiceError(RuntimeError):
    """A service or a request to one that cannot do what was asked: the message says why."""


@dataclass
class RunEntry:
    """One submitted run at a service: ``state`` queued, running, done, failed or stopped."""

    run: str
    state: str
    submitted: str
    by: str
    folder: str
    started: str | None = None
    ended: str | None = None
    error: str | None = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Service:
    """Party ``name`` of a kit (``kit``: its ``ca.pem``, ``NAME.pem``, ``NAME.key``, ``crl.pem``), taking runs on
    ``admin`` (HOST:PORT, HTTPS with mutual TLS). ``data``: this site's rows for every run (``--data``);
    ``listen``/``peers``: as ``splitlearn party`` takes them (default: the plan's addresses); ``status``: where
    each run's party process serves its live status (``splitlearn party --status``); ``on_change``: told each
    run's entry when its state changes."""

    def __init__(self, kit: str | Path, name: str, admin: str, *, data: str | None = None, listen: str | None = None,
                 peers: dict[str, str] | None = None, connect_timeout_s: float = 60.0, status: str | None = None,
                 allow_code: bool = False, on_change: Any = None):
        from ..wire.transport.tls import PeerCheck, load_credentials

        self.kit, self.name = Path(kit).resolve(), name
        self.creds = load_credentials(self.kit, name)  # its own pair fits, not expired or revoked: else it says why
        self.check = PeerCheck(self.creds)
        self.data, self.listen, self.peers, self.connect_timeout_s = data, listen, dict(peers or {}), connect_timeout_s
        self.status = status  # HOST:PORT where each run's party process serves its live status
        self.allow_code = allow_code  # plans with a factory (code of their own) are run
        self.on_change = on_change  # called with a run's entry whenever its state changes (serve prints it)
        self.runs: dict[str, RunEntry] = {}
        self.queue: deque[str] = deque()
        self.current: subprocess.Popen | None = None
        self.cond = threading.Condition()
        self.closing = False
        host, _, port = admin.rpartition(":")
        self.server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), _handler(self))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.kit / "ca.pem"))
        ctx.load_cert_chain(str(self.kit / f"{name}.pem"), str(self.kit / f"{name}.key"))
        # the TLS handshake runs in each request's thread, with a timeout: an idle client holds only its own
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: log.info(  # a failed handshake: that client's problem
            "%s: a request from %s failed: %s", name, address, sys.exc_info()[1])
        self.address = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        (self.kit / "runs").mkdir(exist_ok=True)
        self._load()

    # -- the administrator's requests ---------------------------------------------------------------

    def admin_refusal(self, der: bytes | None) -> tuple[str | None, str]:
        """(why the client certificate is refused or None, the name it carries): the parties' own check, for the
        role ``admin``."""
        from cryptography import x509

        try:
            cert = x509.load_der_x509_certificate(der or b"")
        except ValueError:
            return "no readable client certificate", "?"
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        who = str(names[0]) if names else "?"
        try:
            return self.check.verdict(cert, who, role="admin"), who
        except Exception as e:  # noqa: BLE001 - CertificateError: a revocation list it cannot read refuses all
            return f"this service cannot check certificates: {e}", who

    def _save(self, changed: RunEntry) -> None:
        """``runs.json``: every run and its state (under the lock), after ``changed``'s state changed."""
        if self.on_change is not None:
            self.on_change(changed)
        tmp = self.kit / "runs" / ".runs.json.tmp"
        tmp.write_text(json.dumps({"runs": [asdict(e) for e in self.runs.values()], "queue": list(self.queue)}))
        os.replace(tmp, self.kit / "runs" / "runs.json")

    def _load(self) -> None:
        """The runs of an earlier life of this service: the queued ones queued again, a running one failed."""
        try:
            body = json.loads((self.kit / "runs" / "runs.json").read_text())
            entries = [RunEntry(**e) for e in body["runs"]]
            queue = [r for r in body["queue"] if isinstance(r, str)]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{self.kit / 'runs' / 'runs.json'} cannot be read ({e}): move it aside to start afresh")
        for e in entries:
            if e.state == "running":
                e.state, e.ended, e.error = "failed", _now(), "the service stopped while it ran"
            self.runs[e.run] = e
        self.queue.extend(r for r in queue if r in self.runs and self.runs[r].state == "queued")

    def submit(self, run: str, plan_text: str, by: str) -> RunEntry:
        """Queue run ``run`` of the plan ``plan_text`` (TOML); ServiceError naming what does not fit."""
        from ..clients.layout import Topology
        from ..core.load import load_plan
        from ..core.specs import PlanError

        if not isinstance(run, str) or not _RUN.fullmatch(run):
            raise ServiceError(f"run name {str(run)[:80]!r}: letters, digits, '_', '.', '-', at most 64, not starting "
                               "with a dot or a dash")
        if not isinstance(plan_text, str):
            raise ServiceError("the plan must be the plan file's text (TOML)")
        with self.cond:
            if run in self.runs:
                raise ServiceError(f"run {run!r} was submitted before ({self.runs[run].state}): name the new one "
                                   "differently")
            folder = self.kit / "runs" / run
            if folder.exists():
                raise ServiceError(f"{folder} exists already (a refused plan's?): name the run differently")
            folder.mkdir(parents=True)
            (folder / "plan.toml").write_text(plan_text)
            try:
                plan = load_plan(folder / "plan.toml")
                names = Topology.of(plan).names
                code = _code_entries(plan.model_dump(mode="json"))
                if code and not self.allow_code:
                    raise ServiceError(f"the plan of run {run!r} runs code of its own ({', '.join(code[:3])}); this "
                                       "service runs only plans without a factory (start it with --allow-code)")
                if self.name not in names:
                    raise ServiceError(f"the plan of run {run!r} has no party {self.name!r} (its parties: {names[:8]})")
            except (PlanError, ValueError, ServiceError) as e:
                (folder / "plan.toml").rename(folder / "refused-plan.toml")
                raise e if isinstance(e, ServiceError) else ServiceError(f"the plan of run {run!r} cannot run: {e}") \
                    from None
            entry = self.runs[run] = RunEntry(run, "queued", _now(), by, str(folder))
            self.queue.append(run)
            self._save(entry)
            self.cond.notify_all()
        log.info("%s: run %r submitted by %r", self.name, run, by)
        return entry

    def stop(self, run: str, by: str) -> RunEntry:
        """Stop run ``run``: dropped from the queue, or its party process ended (SIGTERM: it tells its neighbours
        and says goodbye, :mod:`.stopping`; SIGKILL if it has not ended 10 s later)."""
        with self.cond:
            entry = self.runs.get(run)
            if entry is None:
                raise ServiceError(f"no run {run!r} here")
            if entry.state == "queued":
                self.queue.remove(run)
                entry.state, entry.ended, entry.error = "stopped", _now(), f"stopped by {by!r} before it started"
                self._save(entry)
                return entry
            if entry.state != "running" or self.current is None:
                raise ServiceError(f"run {run!r} is {entry.state}: there is nothing to stop")
            entry.error = f"stopped by {by!r}"
            proc = self.current
        _end(proc)
        return entry

    def listing(self) -> list[dict[str, Any]]:
        with self.cond:
            return [asdict(e) for e in self.runs.values()]

    # -- running the queue ------------------------------------------------------------------------

    def _work(self) -> None:
        from .party import PartyOptions

        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.closing:
                    return
                entry = self.runs[self.queue.popleft()]
                folder = Path(entry.folder)
                opts = PartyOptions(str(folder / "plan.toml"), self.name, certs=str(self.kit), listen=self.listen,
                                    peers=self.peers, out=str(folder), quiet=True, data=self.data,
                                    connect_timeout_s=self.connect_timeout_s, run=entry.run, status=self.status)
                with open(folder / "party.log", "w") as logf:
                    self.current = subprocess.Popen([sys.executable, "-m", "splitlearn.launch.party", opts.to_json()],
                                                    stdout=logf, stderr=logf, start_new_session=True)
                entry.state, entry.started = "running", _now()
                self._save(entry)
            log.info("%s: run %r started (pid %d)", self.name, entry.run, self.current.pid)
            code = self.current.wait()
            with self.cond:
                self.current = None
                entry.ended = _now()
                if entry.error is not None and entry.error.startswith("stopped"):
                    entry.state = "stopped"
                elif code == 0:
                    entry.state = "done"
                else:
                    entry.state, entry.error = "failed", _party_error(folder, self.name, code)
                self._save(entry)
            log.info("%s: run %r %s", self.name, entry.run, entry.state)

    def serve_forever(self) -> None:
        """Take runs until :meth:`close` (or SIGTERM / Ctrl-C in ``splitlearn serve``)."""
        worker = threading.Thread(target=self._work, name="sl-service-runs", daemon=True)
        worker.start()
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.close()
            worker.join(timeout=10)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            proc = self.current
            self.cond.notify_all()
        if proc is not None:
            _end(proc)
        self.server.shutdown()
        self.server.server_close()


def _code_entries(body: Any, where: str = "") -> list[str]:
    """The plan entries that name code to import and run (``factory``, a Python object's ``python``)."""
    found = []
    if isinstance(body, dict):
        for k, v in body.items():
            if k in ("factory", "python") and v:
                found.append(f"{where}{k} = {str(v)[:60]!r}")
            else:
                found += _code_entries(v, f"{where}{k}.")
    elif isinstance(body, list):
        for i, v in enumerate(body):
            found += _code_entries(v, f"{where}{i}.")
    return found


def _end(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _party_error(folder: Path, name: str, code: int) -> str:
    err = folder / "parties" / name / "error.json"
    try:
        return str(json.loads(err.read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        lines = (folder / "party.log").read_text(errors="replace").strip().splitlines() \
            if (folder / "party.log").is_file() else []
        return (lines or [f"its party process ended with status {code}"])[-1]


def _handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "splitlearn-service"
        timeout = 10  # seconds a client may take for the TLS handshake and its request

        def setup(self) -> None:
            self.request.settimeout(self.timeout)
            self.request.do_handshake()  # here, in this request's thread (an idle client blocks nobody else)
            super().setup()

        def log_message(self, fmt: str, *args: Any) -> None:  # through logging, not stderr
            log.debug("%s: " + fmt, service.name, *args)

        def _answer(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _admin(self) -> str | None:
            why, who = service.admin_refusal(self.connection.getpeercert(binary_form=True))
            if why is not None:
                log.warning("%s: refused a request from %r: %s", service.name, who, why)
                self._answer(403, {"error": why})
                return None
            return who

        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            if self._admin() is None:
                return
            if self.path.rstrip("/") == "/runs":
                self._answer(200, {"party": service.name, "runs": service.listing()})
            else:
                self._answer(404, {"error": f"no {self.path[:100]!r} here: GET /runs"})

        def do_POST(self) -> None:  # noqa: N802
            who = self._admin()
            if who is None:
                return
            try:
                size = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BODY:
                self._answer(413, {"error": f"a request body of {size} bytes: at most {MAX_BODY}"})
                return
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self._answer(400, {"error": f"the request is not a JSON object ({e})"})
                return
            parts = self.path.strip("/").split("/")
            try:
                if parts == ["runs"]:
                    entry = service.submit(body.get("run"), body.get("plan"), who)
                    self._answer(201, asdict(entry))
                elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "stop":
                    self._answer(200, asdict(service.stop(parts[1], who)))
                else:
                    self._answer(404, {"error": f"no {self.path[:100]!r} here: POST /runs or /runs/NAME/stop"})
            except ServiceError as e:
                self._answer(409, {"error": str(e)})

    return Handler


# -- the administrator's side --------------------------------------------------------------------

def _request(to: str, certs: str | Path, admin: str, method: str, path: str, body: dict | None = None) -> Any:
    """One request to the service at ``to`` as administrator ``admin`` (its ``ca.pem``, ``ADMIN.pem``,
    ``ADMIN.key`` in ``certs``); its JSON answer, or ServiceError with the service's reason."""
    import http.client

    certs = Path(certs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # a service's certificate names its party, not its host; the authority is checked
    ctx.load_verify_locations(cafile=str(certs / "ca.pem"))
    try:
        ctx.load_cert_chain(str(certs / f"{admin}.pem"), str(certs / f"{admin}.key"))
    except (OSError, ssl.SSLError) as e:
        raise ServiceError(f"cannot read the administrator's certificate and key {admin}.pem/.key in {certs}: {e}") \
            from None
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit():
        raise ServiceError(f"--to {to!r}: give HOST:PORT of a service's --admin address")
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), context=ctx, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
    except (OSError, ssl.SSLError, ValueError, http.client.HTTPException) as e:
        raise ServiceError(f"no answer from the service at {to}: {e}") from None
    finally:
        conn.close()
    if resp.status >= 400:
        raise ServiceError(f"the service at {to} refused: {answer.get('error', resp.status)}")
    return answer


def submit(plan: str | Path, to: str, certs: str | Path, admin: str, run: str | None = None) -> dict[str, Any]:
    """Submit the plan file ``plan`` as run ``run`` (default: the plan's name and the time) to the service at
    ``to``; the queued entry."""
    from ..core.load import load_plan

    text = Path(plan).read_text()
    run = run or f"{load_plan(plan).name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return _request(to, certs, admin, "POST", "/runs", {"run": run, "plan": text})


def list_runs(to: str, certs: str | Path, admin: str) -> dict[str, Any]:
    """The service's party and its runs, as :class:`RunEntry` dicts."""
    return _request(to, certs, admin, "GET", "/runs")


def stop_run(run: str, to: str, certs: str | Path, admin: str) -> dict[str, Any]:
    return _request(to, certs, admin, "POST", f"/runs/{run}/stop", {})
