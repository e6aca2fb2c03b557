"""A party process's live status: what it is doing, served while it runs.

:class:`PartyStatus` holds it (run, party, role, state, step of total, epoch, last loss, bytes sent
and received, connected peers, last error), fed by the party process
(:func:`~splitlearn.launch.oneparty.run_one_party`: its progress callback, its meters, its transport).
:class:`StatusServer` serves it over HTTP on a thread (``splitlearn party --status HOST:PORT``,
loopback unless told otherwise, GET only): ``/metrics`` in Prometheus's text format (its own
registry; the party as a label), ``/status.json`` and ``/``, a self-contained page polling
``/status.json`` every second. :class:`PartyWatch` sets up all a party process shows of itself
at once: its process title (``splitlearn party NAME (run PLAN)``), its log format (``json``: one
JSON object per record on stderr) and its status endpoint. Nothing here raises into the training:
a status server that cannot start or answer is a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from ..core.plan import Plan
    from ..run.report import Progress

_log = logging.getLogger("splitlearn.launch.status")

__all__ = ["PartyStatus", "StatusServer", "PartyWatch", "JsonLogFormatter", "STATES", "LOG_FORMATS", "LINGER_S",
           "parse_address", "serve_status", "role_of", "set_title", "use_json_logs"]

STATES = ("starting", "connecting", "training", "evaluating", "done", "failed")
LOG_FORMATS = ("text", "json")
LINGER_S = 3.0  # once a party ended, how long its endpoint waits for a watcher to read the final state


def set_title(title: str) -> None:
    """Name this process in ``ps`` and ``/proc/PID/cmdline`` (nothing where setproctitle is missing)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency; a title is only a convenience
        return
    setproctitle(title)


def parse_address(text: str, option: str = "--status") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``PORT`` or ``:PORT`` alone: 127.0.0.1) as (host, port);
    a ValueError naming ``option`` and what to give."""
    given = text.strip()
    host, sep, port = given.rpartition(":")
    if not sep:
        host, port = "", given
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)


def role_of(plan: "Plan", name: str) -> str:
    """What physical party ``name`` is, in words: data holder, label holder or server (computing the loss),
    client, federation, coordinator."""
    from ..core.graph import build_graph
    from ..clients.layout import holds_raw_data
    from ..clients.roles import Duty, duties_of, plays_of

    try:
        duties, plays = duties_of(plan, name), plays_of(plan, name)
        losses = {n.party for n in build_graph(plan).losses()}
    except Exception:  # noqa: BLE001 - a plan the party itself will refuse, naming why
        return "party"
    words = []
    if Duty.CLIENT in duties:
        words.append(f"client playing {plays}")
    elif Duty.FIXED in duties and plays is not None:
        holds = plan.parties[plays].holds
        kind = "data holder" if holds_raw_data(plan, plays) else "label holder" if holds else "server"
        words.append(kind + (f" playing {plays}" if plays != name else ""))
    if plays is not None and plays in losses:
        words.append("computes the loss")
    words += [w for d, w in ((Duty.FEDERATION, "federation"), (Duty.COORDINATOR, "coordinator")) if d in duties]
    return ", ".join(words) or "party"


class PartyStatus:
    """What one party process is doing. The party's thread writes it, the status server's threads read
    :meth:`snapshot`; every method is safe from any thread and never raises."""

    def __init__(self, party: str, *, title: bool = False):
        self.party, self.title = party, title  # title: name this process once its run is known
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = dict(run="", role="", state="starting", mode="", unit="step", step=0, total=0,
                                            epoch=0, epochs=0, loss=None, last_error=None)
        self.started_at = self._updated = time.time()
        self._transport: Any = None
        self._meters: tuple[Any, ...] = ()
        self.ended = threading.Event()

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self._fields.update(fields)
            self._updated = time.time()

    def begin(self, run: str, role: str) -> None:
        """The plan is read: its name and this party's role (and the process's title, if it names it)."""
        self._set(run=run, role=role)
        if self.title:
            set_title(f"splitlearn party {self.party} (run {run})")

    def watch(self, transport: Any = None, meters: Iterable[Any] = ()) -> None:
        """Peers from ``transport`` (connecting until the meters come); bytes from ``meters`` (training)."""
        if transport is not None:
            self._transport = transport
            self._set(state="connecting")
        meters = tuple(meters)
        if meters:
            self._meters = meters
            self._set(state="training")

    def progress(self, p: "Progress") -> None:
        """A step (or a round) is done."""
        fields = dict(step=p.done, total=p.total, epoch=p.epoch + 1, epochs=p.epochs, unit=p.unit, mode=p.mode,
                      state="training" if p.mode == "train" else "evaluating")
        if p.loss is not None and p.mode == "train":
            fields["loss"] = float(p.loss)
        self._set(**fields)

    def chain(self, on_step: Callable[["Progress"], None] | None) -> Callable[["Progress"], None]:
        """A progress callback that updates this status, then calls ``on_step`` (if any)."""
        def step(p: "Progress") -> None:
            try:
                self.progress(p)
            except Exception as e:  # noqa: BLE001 - the status never stops the training
                _log.debug("%s: progress not shown: %r", self.party, e)
            if on_step is not None:
                on_step(p)

        return step

    def note_error(self, text: str) -> None:
        """A warning or error this party logged, or why it failed."""
        self._set(last_error=text)

    def end(self, error: str | None = None) -> None:
        """The party is done, or failed with ``error``."""
        self._set(state="done" if error is None else "failed", **({} if error is None else {"last_error": error}))
        self.ended.set()

    def _bytes(self) -> tuple[int, int]:
        sent = received = 0
        try:
            for m in {id(m): m for m in self._meters}.values():  # a participant's training and evaluation meters
                sent += sum(t.bytes for t in list(m.sent.values()))
                received += sum(t.bytes for t in list(m.received.values()))
        except Exception:  # noqa: BLE001 - a table changing under us: this snapshot says 0, the next one more
            return 0, 0
        return sent, received

    def _peers(self) -> dict[str, bool]:
        t = self._transport
        if t is None:
            return {}
        try:
            return {p: bool(t.is_connected(p)) for p in sorted({*getattr(t, "dial", {}), *getattr(t, "accept", ())})}
        except Exception:  # noqa: BLE001 - a transport closing under us
            return {}

    def snapshot(self) -> dict[str, Any]:
        """The status as ``/status.json`` serves it."""
        with self._lock:
            body = dict(self._fields, updated_at=self._updated)
        sent, received = self._bytes()
        return {"party": self.party, "pid": os.getpid(), **body, "bytes_sent": sent, "bytes_received": received,
                "peers": self._peers(), "started_at": self.started_at, "now": time.time()}


class _Collector:
    """``/metrics``: the status as Prometheus metrics, read when scraped."""

    def __init__(self, status: PartyStatus):
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        s = self.status.snapshot()
        party = [s["party"]]
        info = InfoMetricFamily("splitlearn_party", "the party process: its run and role", labels=["party"])
        info.add_metric(party, {"run": s["run"], "role": s["role"], "pid": str(s["pid"])})
        yield info
        state = GaugeMetricFamily("splitlearn_party_state", "1 for the state the party is in",
                                  labels=["party", "state"])
        for name in STATES:
            state.add_metric([s["party"], name], float(s["state"] == name))
        yield state
        for name, key, text in (("step", "step", "steps (rounds for a [clients] schedule) done of the run"),
                                ("steps", "total", "steps (rounds) of the run"),
                                ("epoch", "epoch", "the epoch under way, from 1"),
                                ("epochs", "epochs", "epochs of the run"),
                                ("loss", "loss", "the last training loss this party computed"),
                                ("updated_timestamp_seconds", "updated_at", "when the status last changed")):
            if s[key] is not None:
                g = GaugeMetricFamily(f"splitlearn_party_{name}", text, labels=["party"])
                g.add_metric(party, float(s[key]))
                yield g
        for name, key in (("sent", "bytes_sent"), ("received", "bytes_received")):
            c = CounterMetricFamily(f"splitlearn_party_{name}_bytes", f"bytes this party {name} on its wires",
                                    labels=["party"])
            c.add_metric(party, float(s[key]))
            yield c
        peers = GaugeMetricFamily("splitlearn_party_peer_connected", "1 while the peer's stream is up",
                                  labels=["party", "peer"])
        for peer, up in s["peers"].items():
            peers.add_metric([s["party"], peer], float(up))
        yield peers


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``127.x.y.z``, ``::1``): never a name that merely starts so."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "splitlearn-status"
    timeout = 10.0  # a client that connects and says nothing does not hold a thread for ever

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback and host and not _is_loopback(host):  # a rebound name ("127.evil.example") too
            self._send(403, b"a loopback status endpoint answers loopback names only\n", "text/plain")
            return  # (another site's page, through a name it rebinds to 127.0.0.1, reads nothing)
        ended = self.server.status.ended.is_set()  # (read before the snapshot: an ended one's shows the end)
        try:
            if path == "/":
                self._send(200, _PAGE.encode(), "text/html; charset=utf-8")
                return
            if path == "/status.json":
                body, kind = json.dumps(self.server.status.snapshot()).encode(), "application/json"
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                body, kind = generate_latest(self.server.registry), CONTENT_TYPE_LATEST
            else:
                self._send(404, b"not found: the status is at /, /status.json and /metrics\n", "text/plain")
                return
        except Exception as e:  # noqa: BLE001 - the training goes on whatever a request meets
            _log.debug("status request %s failed: %r", path, e)
            self._send(500, b"the status could not be read\n", "text/plain")
            return
        self.server.watched.set()
        self._send(200, body, kind)
        if ended:  # a watcher read the end, all of it: the process need not wait any more (before the body was
            self.server.final_read.set()  # written, it could end while the reply was half sent)

    def _refuse(self) -> None:
        self._send(405, b"only GET\n", "text/plain", {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815

    def _send(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Type": kind, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff", "Content-Security-Policy": _CSP, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no line per request on stderr
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], status: PartyStatus):
        import socket

        from prometheus_client import CollectorRegistry

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.status, self.watched, self.final_read = status, threading.Event(), threading.Event()
        self.loopback = _is_loopback(address[0])
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(status))
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hung up: nothing to say
        _log.debug("status request from %s failed", client_address, exc_info=True)


class StatusServer:
    """``status`` served over HTTP at ``host:port`` (port 0: any free one) on a daemon thread."""

    def __init__(self, status: PartyStatus, host: str = "127.0.0.1", port: int = 0):
        self._server = _Server((host, port), status)  # OSError: the address cannot be bound
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sl-status", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/"

    def close(self, linger: float = 0.0) -> None:
        """Stop serving; if somebody watched the status, once the final state was read or after ``linger``
        seconds."""
        if linger > 0 and self._server.status.ended.is_set() and self._server.watched.is_set():
            self._server.final_read.wait(linger)
        self._server.shutdown()
        self._server.server_close()


def serve_status(status: PartyStatus, address: tuple[str, int]) -> StatusServer | None:
    """A :class:`StatusServer` for ``status``; None, with a warning, where it cannot start."""
    try:
        return StatusServer(status, *address)
    except Exception as e:  # noqa: BLE001 - the party trains without its status endpoint
        _log.warning("%s: no status endpoint at %s:%s (%s); the party runs without one", status.party, *address, e)
        return None


class JsonLogFormatter(logging.Formatter):
    """A log record as one JSON object: time (UTC, ISO 8601), level, logger, party, message (and exception)."""

    def __init__(self, party: str):
        super().__init__()
        self.party = party

    def format(self, record: logging.LogRecord) -> str:
        body = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "party": self.party, "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def use_json_logs(party: str) -> None:
    """Every log record of this process (Python's warnings too) as a JSON line on stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(party))
    root.addHandler(handler)
    logging.captureWarnings(True)


class _LastError(logging.Handler):
    def __init__(self, status: PartyStatus):
        super().__init__(logging.WARNING)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.status.note_error(record.getMessage())


class PartyWatch:
    """All a party process shows of itself, set up at once: its title, its log format (``text`` or
    ``json``) and, given ``status`` (``HOST:PORT``), its status endpoint, whose address goes to
    ``OUT/parties/NAME/status.url`` where there is an ``out`` folder. A ValueError names an option
    that cannot be used."""

    def __init__(self, party: str, *, status: str | None = None, log_format: str = "text", out: str | None = None):
        if log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format {log_format!r}: choose one of {', '.join(LOG_FORMATS)}")
        address = None if status is None else parse_address(status)
        self.json = log_format == "json"
        set_title(f"splitlearn party {party}")
        if self.json:
            use_json_logs(party)
        self.status = PartyStatus(party, title=True)
        self._noted = _LastError(self.status)
        logging.getLogger("splitlearn").addHandler(self._noted)
        self.server = serve_status(self.status, address) if address is not None else None
        if self.server is not None:
            self.say(logging.INFO, f"party {party}: status at {self.server.url}")
        if self.server is not None and out is not None:
            try:
                folder = Path(out) / "parties" / party
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "status.url").write_text(self.server.url + "\n")
            except OSError as e:
                _log.warning("%s: cannot record the status address in %s (%s)", party, out, e)

    def say(self, level: int, text: str) -> None:
        """A line for whoever runs the party: ``level: text`` on stderr, or a JSON log record."""
        if self.json:  # whatever the loggers' level: it is said to whoever runs the party
            logger = logging.getLogger("splitlearn.launch.party")
            logger.handle(logger.makeRecord(logger.name, level, "(party)", 0, text, None, None))
        else:
            print(f"{logging.getLevelName(level).lower()}: {text}", file=sys.stderr, flush=True)
            if level >= logging.WARNING:  # (a JSON record reaches the status through its handler)
                self.status.note_error(text)

    def end(self, error: str | None = None, linger: float = LINGER_S) -> None:
        """The party is done (or failed with ``error``): an endpoint somebody watched serves that until it is
        read, at most ``linger`` seconds, then stops."""
        self.status.end(error)
        logging.getLogger("splitlearn").removeHandler(self._noted)
        if self.server is not None:
            try:
                self.server.close(linger)
            except Exception as e:  # noqa: BLE001 - the party's work is done whatever its endpoint does
                _log.debug("closing the status endpoint: %r", e)


_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>splitlearn party</title>
<link rel="icon" href="data:,">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 46em; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; margin-bottom: .2em; } .sub { color: #666; margin-top: 0; }
.state { display: inline-block; padding: .1em .6em; border-radius: .8em; background: #ddd; font-weight: 600; }
.state.training, .state.evaluating { background: #cde8ff; } .state.done { background: #cfeccf; }
.state.failed { background: #f7c9c9; } .state.connecting, .state.starting { background: #f5e6b8; }
.bar { height: 1.1em; background: #eee; border-radius: .3em; overflow: hidden; margin: .6em 0; }
.fill { height: 100%; width: 0; background: #3b82c4; transition: width .4s; }
table { border-collapse: collapse; width: 100%; } td { padding: .25em .5em; border-bottom: 1px solid #eee; }
td:first-child { color: #666; width: 11em; } .err { color: #a11; white-space: pre-wrap; } .off { color: #a11; }
#conn { color: #a11; min-height: 1.2em; }
</style></head>
<body data-state="loading">
<h1>party <span id="party">-</span> <span id="state" class="state">loading</span></h1>
<p class="sub">run <span id="run">-</span> &middot; <span id="role">-</span> &middot; pid <span id="pid">-</span></p>
<div class="bar"><div class="fill" id="fill"></div></div>
<table>
<tr><td>progress</td><td><span id="unit">step</span> <span id="step">0</span> of <span id="total">0</span>
 (<span id="pct">0</span>%) &middot; <span id="mode">-</span></td></tr>
<tr><td>epoch</td><td><span id="epoch">-</span> of <span id="epochs">-</span></td></tr>
<tr><td>last training loss</td><td id="loss">-</td></tr>
<tr><td>bytes sent</td><td id="sent">-</td></tr>
<tr><td>bytes received</td><td id="received">-</td></tr>
<tr><td>peers</td><td id="peers">-</td></tr>
<tr><td>last error</td><td id="error" class="err">none</td></tr>
<tr><td>updated</td><td id="updated">-</td></tr>
</table>
<p id="conn"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function human(n) {
  const prefixes = ["", "k", "M", "G", "T", "P"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < prefixes.length - 1) { n /= 1000; i++; }
  return (i ? n.toPrecision(3) : String(n)) + " " + prefixes[i] + "B";
}
function show(s) {
  $("party").textContent = s.party; $("run").textContent = s.run || "-"; $("role").textContent = s.role || "-";
  $("pid").textContent = s.pid; $("state").textContent = s.state; $("state").className = "state " + s.state;
  document.body.dataset.state = s.state; document.title = s.party + ": " + s.state + " (splitlearn)";
  $("unit").textContent = s.unit; $("step").textContent = s.step; $("total").textContent = s.total;
  const pct = s.total ? Math.floor(100 * s.step / s.total) : 0;
  $("pct").textContent = pct; $("fill").style.width = pct + "%"; $("mode").textContent = s.mode || "-";
  $("epoch").textContent = s.epoch || "-"; $("epochs").textContent = s.epochs || "-";
  $("loss").textContent = s.loss === null ? "-" : s.loss.toPrecision(5);
  $("sent").textContent = human(s.bytes_sent); $("received").textContent = human(s.bytes_received);
  const peers = Object.entries(s.peers);
  const said = peers.map(([name, up]) => name + (up ? " (connected)" : " (not connected)"));
  $("peers").textContent = said.join(", ") || "-";
  $("peers").className = peers.some(([, up]) => !up) ? "off" : "";
  $("error").textContent = s.last_error || "none";
  $("updated").textContent = new Date(s.updated_at * 1000).toLocaleTimeString() + " (" +
    Math.max(0, Math.round(s.now - s.updated_at)) + " s ago)";
}
async function poll() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    show(await r.json());
    $("conn").textContent = "";
  } catch (e) {
    $("conn").textContent = "no answer from the party process (it may have ended)";
  }
}
poll();
setInterval(poll, 1000);
</script>
</body></html>
"""
