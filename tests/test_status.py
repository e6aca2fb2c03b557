"""A party process's live status while a run trains: its endpoint (``/status.json``, ``/metrics`` in
Prometheus's format, the page in a real browser), ``splitlearn status``, process titles and JSON log lines.

One run of party processes (vanilla, over an emulated 30 ms link, so that each step takes at least a
round trip: slow enough to watch) serves every test here; the last one waits for its end."""

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from splitlearn.cli import app
from splitlearn.launch.processes import launch

from .conftest import EXAMPLES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EPOCHS = 4
PARTIES = ("hospital", "server")
DEADLINE_S = 120.0


class LiveRun:
    """``splitlearn run --status --log-format json`` of vanilla.toml on a thread of this process."""

    def __init__(self, out: Path):
        self.out, self.urls, self.result, self.error = out, {}, None, None
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.result = launch(EXAMPLES / "vanilla.toml", self.out, epochs=EPOCHS, insecure=True, link="30ms",
                                 on_status=self.urls.__setitem__, log_format="json")
        except BaseException as e:  # noqa: BLE001 - the tests say what it was
            self.error = e

    def status(self, party: str) -> dict | None:
        """The party's /status.json, or None while its endpoint does not answer."""
        try:
            with urllib.request.urlopen(self.urls[party] + "status.json", timeout=5) as r:
                return json.loads(r.read())
        except (OSError, KeyError):
            return None


def _until(condition, what: str, run: LiveRun, timeout: float = DEADLINE_S):
    """Poll ``condition`` until it gives something true (returned), or fail saying what never came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert run.error is None, f"the run failed before {what}: {run.error}"
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def _training(run: LiveRun, party: str, after: int = 0) -> dict | None:
    s = run.status(party)
    return s if s is not None and s["state"] in ("training", "evaluating") and s["step"] > after else None


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> LiveRun:
    with pytest.MonkeyPatch.context() as env:  # gRPC's own log lines are off, as under `splitlearn run` (--debug: on)
        env.setenv("GRPC_VERBOSITY", "NONE")
        run = LiveRun(tmp_path_factory.mktemp("status") / "run")
        _until(lambda: run.status("server") and run.status("hospital"), "answer from both status endpoints", run)
    yield run
    run.thread.join(timeout=DEADLINE_S)


def _get(url: str, method: str = "GET", host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_endpoint_follows_the_training_in_json_and_prometheus_metrics(live):
    first = _until(lambda: _training(live, "server"), "step at the server", live)
    assert (first["run"], first["party"], first["role"]) == ("vanilla", "server", "server, computes the loss")
    assert first["peers"] == {"hospital": True} and first["bytes_sent"] > 0 and first["bytes_received"] > 0
    assert first["epochs"] == EPOCHS and 1 <= first["epoch"] <= EPOCHS and first["step"] < first["total"]
    later = _until(lambda: _training(live, "server", after=first["step"]), "later step", live)
    assert later["step"] > first["step"] and later["bytes_received"] > first["bytes_received"]
    code, body = _get(live.urls["server"] + "metrics")
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    server = (("party", "server"),)
    assert samples[("splitlearn_party_step", server)] >= later["step"]
    assert samples[("splitlearn_party_steps", server)] == later["total"]
    assert samples[("splitlearn_party_epochs", server)] == EPOCHS
    assert samples[("splitlearn_party_sent_bytes_total", server)] >= later["bytes_sent"]
    assert samples[("splitlearn_party_peer_connected", (("party", "server"), ("peer", "hospital")))] == 1
    states = {dict(k[1])["state"]: v for k, v in samples.items() if k[0] == "splitlearn_party_state"}
    assert sum(states.values()) == 1 and states["training"] + states["evaluating"] == 1
    assert samples[("splitlearn_party_info", (("party", "server"), ("pid", str(first["pid"])),
                                              ("role", "server, computes the loss"), ("run", "vanilla")))] == 1
    hospital = live.status("hospital")
    assert hospital["role"] == "data holder" and hospital["peers"] == {"server": True}
    assert _get(live.urls["server"] + "nothing")[0] == 404
    assert _get(live.urls["server"] + "status.json", method="POST")[0] == 405
    assert _get(live.urls["server"] + "status.json", host="attacker.example")[0] == 403  # no DNS rebinding
    assert _get(live.urls["server"] + "status.json", host="127.0.0.1.nip.io")[0] == 403  # nor a loopback-like name


def test_each_party_process_is_titled_with_its_party_and_run(live):
    for party in PARTIES:
        pid = live.status(party)["pid"]
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        assert title == f"splitlearn party {party} (run vanilla)"
        parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]  # forked from the forker
        assert Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == "splitlearn forker"


def test_splitlearn_status_prints_the_table_or_one_error_line(live):
    s = _until(lambda: _training(live, "server"), "step at the server", live)
    address = live.urls["server"].removeprefix("http://").rstrip("/")
    r = CliRunner().invoke(app, ["status", address])
    assert r.exit_code == 0, r.output
    assert "party server of run vanilla" in r.output and "server, computes the loss" in r.output
    shown = re.search(r"step\s+│\s+(\d+) of (\d+)", r.output)
    assert shown and int(shown[1]) >= s["step"] and int(shown[2]) == s["total"]
    assert re.search(r"(training|evaluating)", r.output) and "hospital (connected)" in r.output
    as_json = CliRunner().invoke(app, ["status", live.urls["server"], "--json"])  # the URL a launcher prints works too
    assert as_json.exit_code == 0 and json.loads(as_json.output)["party"] == "server"
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    refused = CliRunner().invoke(app, ["status", f"127.0.0.1:{closed}"])
    assert refused.exit_code == 2
    assert refused.output.startswith(f"error: no party status at 127.0.0.1:{closed}: Connection refused")
    assert len(refused.output.strip().splitlines()) == 1 and "Traceback" not in refused.output


def _dom(url: str, tmp: Path) -> tuple[str, str]:
    """The page's DOM after about two polls of /status.json, and Chromium's log."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=1500"]
    out = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return out.stdout, out.stderr


def _shown(dom: str, field: str) -> str:
    found = re.search(rf'id="{field}"[^>]*>([^<]*)<', dom)
    assert found, f"no {field} in the page: {dom[:2000]}"
    return found[1]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_status_page_shows_the_step_advancing_in_chromium(live, tmp_path):
    _until(lambda: _training(live, "server"), "step at the server", live)
    url = live.urls["server"]
    _, html = _get(url)
    assert b"http://" not in html and b"https://" not in html  # self-contained: nothing to fetch elsewhere
    first, log = _dom(url, tmp_path)
    second, log2 = _dom(url, tmp_path)
    errors = [line for line in (log + log2).splitlines() if "CONSOLE" in line and "error" in line.lower()]
    assert errors == []
    for dom in (first, second):
        assert _shown(dom, "party") == "server" and _shown(dom, "run") == "vanilla"
        assert _shown(dom, "state") in ("training", "evaluating", "done")
        assert _shown(dom, "peers").startswith("hospital (connected)") and _shown(dom, "sent").endswith("B")
        assert int(_shown(dom, "total")) > 0 and int(_shown(dom, "epochs")) == EPOCHS
    assert 0 < int(_shown(first, "step")) < int(_shown(second, "step"))


def test_the_run_ends_done_its_addresses_recorded_and_its_logs_json_lines(live):
    final = {}

    def both_done() -> bool:
        for party in PARTIES:
            s = live.status(party) if party not in final else None
            if s is not None and s["state"] == "done":
                final[party] = s
        return len(final) == len(PARTIES)

    _until(both_done, "'done' from both parties", live)
    live.thread.join(timeout=DEADLINE_S)
    assert live.error is None and live.result is not None
    result = live.result
    for party in PARTIES:
        s = final[party]
        assert s["step"] == s["total"] > 0 and s["epoch"] == EPOCHS
        assert (s["bytes_sent"], s["bytes_received"]) == (result["parties"][party]["bytes_sent"],
                                                          result["parties"][party]["bytes_received"])
        folder = live.out / "parties" / party
        assert (folder / "status.url").read_text().strip() == live.urls[party]
        lines = (folder / "party.log").read_text().splitlines()
        assert [line for line in lines if not line.startswith("{")] == []  # every line of the log is a JSON record
        records = [json.loads(line) for line in lines]
        assert records and all(set(r) == {"time", "level", "logger", "party", "message"} for r in records)
        assert {r["party"] for r in records} == {party}
        assert any(r["level"] == "WARNING" and "--insecure" in r["message"] for r in records)
        assert any(r["message"] == f"party {party}: status at {live.urls[party]}" for r in records)
    assert final["server"]["loss"] == result["metrics"]["train_loss_steps"][-1][1]  # the last step's loss


def test_options_for_the_status_and_logs_are_checked_first(tmp_path):
    for args, said in ((["--status", "nowhere"], "--status 'nowhere': expected HOST:PORT"),
                       (["--log-format", "xml"], "--log-format 'xml': choose one of text, json")):
        r = CliRunner().invoke(app, ["party", str(EXAMPLES / "vanilla.toml"), "--name", "server", "--insecure", *args])
        assert r.exit_code == 2 and said in r.output, r.output
    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "vanilla.toml"), "--in-process", "--status", "--out",
                                 str(tmp_path / "run")])
    assert r.exit_code == 2 and "--status and --log-format apply to party processes" in r.output, r.output


def test_the_final_status_is_read_whole_before_the_process_may_end(monkeypatch):
    """A party process that ended waits (``close(linger)``) until a watcher has read its final status: that read
    counts once the reply is written, not when it begins (the process could end, and the watcher get a reply cut
    short)."""
    import http.server
    import threading

    from splitlearn.launch.status import PartyStatus, StatusServer

    state = PartyStatus("server")
    state.end()
    server = StatusServer(state)
    closers = []
    end_headers = http.server.BaseHTTPRequestHandler.end_headers

    def headers_sent(self):  # the reply's head is out, its body not yet: may the process end now?
        end_headers(self)
        closer = threading.Thread(target=server.close, kwargs={"linger": 30})
        closer.start()
        closer.join(1)  # it must still be waiting for the read to end (it cannot end before the body is written)
        closers.append((closer, closer.is_alive()))

    monkeypatch.setattr(http.server.BaseHTTPRequestHandler, "end_headers", headers_sent)
    with urllib.request.urlopen(server.url + "status.json", timeout=10) as r:
        got = json.loads(r.read())
    assert got["state"] == "done"
    (closer, waiting), = closers
    assert waiting  # while the reply was being written, closing waited
    closer.join(10)
    assert not closer.is_alive()  # and once the reply was read whole, it ended (well before its 30 s)
