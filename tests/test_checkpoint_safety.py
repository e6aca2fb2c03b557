"""Checkpoints a resume can trust: the whole checkpoint is covered by its hash, a peer's word never
deletes one, what a peer makes a party hold before the handshake is bounded, and a resumed run
meters the bytes of a run never stopped."""

from __future__ import annotations

import json
import logging
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import splitlearn
from splitlearn.core.engine import Party, PartyError
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.specs import PlanError
from splitlearn.run.checkpoint import FILES, FORMAT, CheckpointError, Checkpoints, after_step, folder_name
from splitlearn.run.resume import agree_on_resume, held_by, usable_checkpoints
from splitlearn.wire.codec import Encoded, get_codec
from splitlearn.wire.control import START, Cursor
from splitlearn.run.session import run_party
from splitlearn.wire.messages import Kind, Limits, encode, hello, read_hello
from splitlearn.wire.transport.turns import settled, wait_until

from .conftest import EXAMPLES
from .support import ACT, LABEL, Server, same_run, stop_after, weights

pytestmark = pytest.mark.timeout(300)


def _stopped_run(tmp_path: Path, example: str = "vanilla", stop: int = 40):
    """(plan, run a never stopped, run b stopped after ``stop`` steps)."""
    body = load_plan(EXAMPLES / f"{example}.toml").with_train(epochs=2, checkpoint_every=5)
    splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after(stop))
    return body, tmp_path / "a", tmp_path / "b"


def _ck(run: Path, party: str, body) -> Checkpoints:
    return Checkpoints(run / "parties" / party / "checkpoints", plan_hash=plan_hash(body))


def _change_lr(folder: Path) -> None:
    """One byte of the manifest changed: the learning rate 0.05 becomes 0.95."""
    f = folder / "manifest.json"
    text = f.read_bytes()
    assert text.count(b'"lr": 0.05') >= 1
    f.write_bytes(text.replace(b'"lr": 0.05', b'"lr": 0.95', 1))


def _same_model(a: Path, b: Path) -> None:
    """The weights and metrics of a run never stopped (a run begun again also sent its resume hellos)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) == 0.0
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert ra["metrics"]["train_loss"] == rb["metrics"]["train_loss"]


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_changed_manifest_byte_makes_that_checkpoint_unusable_and_the_older_one_is_used(tmp_path, caplog):
    body, a, b = _stopped_run(tmp_path)
    ck = _ck(b, "server", body)
    older, latest = ck.cursors()
    _change_lr(ck.folder / folder_name(latest))
    assert ck.cursors() == [older]
    with caplog.at_level(logging.WARNING, logger="splitlearn"):
        splitlearn.train(body, out=b, resume=True)  # the hospital holds both: they agree on the older
    same_run(a, b)  # not 40 away from the run never stopped: the changed learning rate was never used
    said = _messages(caplog)
    assert f"{folder_name(latest)}: manifest.json does not match its SHA-256 in SHA256SUMS" in said
    assert f"hospital: resuming {older}, the last checkpoint every party holds, not " \
           f"{latest}, this party's last (['server'] do not hold it)" in said


def test_changed_checkpoints_everywhere_begin_the_run_again_keeping_them_aside(tmp_path, caplog):
    body, a, b = _stopped_run(tmp_path)
    before = {}
    for party in body.parties:
        ck = _ck(b, party, body)
        for cursor in ck.cursors():
            _change_lr(ck.folder / folder_name(cursor))
        before[party] = {p.relative_to(ck.folder): p.read_bytes() for p in ck.folder.rglob("*") if p.is_file()}
        assert ck.cursors() == []
    with caplog.at_level(logging.WARNING, logger="splitlearn"):
        splitlearn.train(body, out=b, resume=True)
    _same_model(a, b)
    said = _messages(caplog)
    for party in body.parties:
        aside = list((b / "parties" / party).glob("checkpoints.before-*"))
        assert len(aside) == 1, aside
        kept = {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()}
        assert kept == before[party]  # every byte still on disk
        assert f"{party}: beginning again from the start; the checkpoints held before were moved to {aside[0]}" in said


def test_a_peer_with_nothing_in_common_cannot_make_a_resumed_party_lose_its_checkpoints(tmp_path, caplog):
    """The hospital comes back with no checkpoint: the server begins again, its own checkpoints moved aside."""
    body, a, b = _stopped_run(tmp_path)
    server = _ck(b, "server", body)
    held = server.cursors()
    assert len(held) == 2
    files = {p.relative_to(server.folder): p.read_bytes() for p in server.folder.rglob("*") if p.is_file()}
    import shutil

    shutil.rmtree(_ck(b, "hospital", body).folder)
    with caplog.at_level(logging.WARNING, logger="splitlearn"):
        splitlearn.train(body, out=b, resume=True)
    _same_model(a, b)
    aside = list((b / "parties" / "server").glob("checkpoints.before-*"))
    assert len(aside) == 1
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == files
    assert Checkpoints(aside[0], plan_hash=plan_hash(body)).cursors() == held  # still usable by hand
    said = _messages(caplog)
    assert (f"server: resuming, but no checkpoint is held by every party (this party's last: {held[-1]}; "
            "['hospital'] do not hold it): from the start") in said
    assert f"server: beginning again from the start; the checkpoints held before were moved to {aside[0]}" in said


def test_going_back_further_than_a_partys_last_checkpoint_is_logged_with_both_steps(tmp_path, caplog):
    """Multi-hop: the client at one end lost its latest checkpoint; the server at the other end learns
    it through the relays, goes back with everyone and says so, naming both steps and the client."""
    body, a, b = _stopped_run(tmp_path, "multi_hop", stop=42)  # (after every party's checkpoint after step 39)
    client = _ck(b, "client", body)
    *_, older, latest = client.cursors()  # (it keeps more: its label wire to the server is gated, Checkpoints.lag)
    import shutil

    shutil.rmtree(client.folder / folder_name(latest))
    # the parties whose own last checkpoint is the client's lost one (the stop may come before a party took it)
    ahead = [p for p in ("relay_1", "relay_2", "server") if _ck(b, p, body).cursors()[-1] == latest]
    assert ahead
    with caplog.at_level(logging.WARNING, logger="splitlearn"):
        splitlearn.train(body, out=b, resume=True)
    same_run(a, b)
    said = _messages(caplog)
    for party in ahead:
        assert (f"{party}: resuming {older}, the last checkpoint every party holds, not "
                f"{latest}, this party's last (['client'] do not hold it)") in said


def _flood_tensor(nbytes: int) -> dict[str, Encoded]:
    return {"t": Encoded("float32", "float32", (1, nbytes // 4), bytes(nbytes))}


class _ResumingServer(Server):
    """The vanilla server started with --resume (it holds no checkpoint); the test plays the hospital."""

    def __init__(self, folder: Path, **kw):
        self.folder = folder
        super().__init__(**kw)

    def _work(self):
        try:
            self.box["report"] = run_party(self.party, iter(self.steps), ids_hash=self.setups["server"].ids_hash,
                                           checkpoints=Checkpoints(self.folder), resume=True)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.box["error"] = e

    def say(self, **more) -> None:
        self.h.t.send("server", encode(hello("hospital", "server", plan_hash(self.plan), more.pop("ids", ""), **more)))

    def heard(self) -> None:
        """The server's next hello, passing over its ERROR replies to what it refused."""
        while (m := self.h.recv()).kind != Kind.HELLO:
            assert m.kind == Kind.ERROR


def test_a_flood_before_the_resume_hello_is_bounded_by_the_stated_budget(tmp_path):
    """40 x 4 MiB sent between the hello and the resume hello: the server holds at most its budget
    (8 MiB here) of it, refuses the rest naming the hospital and the limit, and the honest run that
    follows works."""
    budget, size, count = 8 * 2**20, 4 * 2**20 - 4096, 40
    srv = _ResumingServer(tmp_path / "checkpoints", limits=Limits(early_bytes=budget))
    srv.say(ids=srv.setups["hospital"].ids_hash, resuming=True, checkpoints=[])
    srv.heard()
    received = lambda: sum(t.messages for t in srv.link.meter.received.values())  # noqa: E731
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            srv.h.send(Kind.ACTIVATION, 10**6, ACT, _flood_tensor(size))  # far ahead: never used
            deadline = time.monotonic() + 10
            while received() < i + 2 and time.monotonic() < deadline:  # (its hello first) one in flight at a time
                time.sleep(0.005)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert received() == count + 1
    # the budget, and the one message in flight: the sender's copies, the receiver's frame and parse (was 160 MiB)
    assert peak < budget + 5 * size, f"{peak / 2**20:.0f} MiB held before the resume hello"
    deadline = time.monotonic() + 10  # the last one is metered as it comes, refused a moment later
    while len(before := [r for r in srv.link.refused if "before the handshake" in r]) < count - 2 \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(before) == count - 2  # two fit in 8 MiB
    assert all("refused a message from 'hospital'" in r and "Limits.early_bytes" in r for r in before)
    srv.say(phase="resume")
    srv.heard()
    srv.h.send(Kind.ACTIVATION, -1, ACT, {"t": srv.encode(torch.zeros(1, 128))})
    srv.h.send(Kind.ACTIVATION, -1, LABEL, {"t": get_codec("raw").encode(torch.zeros(1, dtype=torch.long))})
    srv.finish()
    srv.done()
    assert Checkpoints(tmp_path / "checkpoints", plan_hash=plan_hash(srv.plan)).cursors() == \
        [START, after_step(srv.steps[0].id)]


def test_a_resumed_server_meters_the_messages_that_came_before_its_restore(tmp_path, monkeypatch):
    """vertical_three: every clinic's first step after the resume reaches the server during its
    handshake (forced here; it happens by chance otherwise): they are counted, as in a run never stopped."""
    body, a, b = _stopped_run(tmp_path, "vertical_three", stop=12)
    step = Party.step
    clinics = [p for p in body.parties if p != "server"]

    def server_waits_for_the_clinics(self, sid, rows, mode):
        if self.name == "server" and mode == "handshake":
            hub = self.link.transport.hub  # the server's inbox: the handshake and first step of every clinic
            # (the parties take turns on one thread: once the clinics wait for the server, nothing more comes)
            assert wait_until(lambda: hub.queued("server") >= 2 * len(clinics) or settled(), 20)
            assert hub.queued("server") >= 2, "no clinic's first step came during the server's handshake"
        return step(self, sid, rows, mode)

    monkeypatch.setattr(Party, "step", server_waits_for_the_clinics)
    splitlearn.train(body, out=b, resume=True)
    same_run(a, b)
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    for p in ra["parties"]:
        assert rb["parties"][p]["bytes_received"] == ra["parties"][p]["bytes_received"], p
        assert rb["parties"][p]["received"] == ra["parties"][p]["received"], p


def _registry_plan(folder: Path) -> dict:
    """Two feature sites, a label-only registry (it runs ahead of the server, up to flow control's
    window: here through every step), PSI, a checkpoint every 3 training steps."""
    from .plan_space import Study, build

    body = build(Study("regression", 2, "registry", "vanilla", 0, True, 1, 0), folder)
    body["train"]["checkpoint_every"] = 3
    return body


# (stopped run: the registry's goodbye reached the server before its checkpoints / never;
#  resumed run: it reaches the server after its restore / before it, during the handshake / during the
#  resume agreement, the sites' last hellos held back until it is sent)
@pytest.mark.parametrize("stopped, resumed", [("early", "after_restore"), ("never", "before_restore"),
                                              ("never", "before_agreement")])
def test_a_resumed_run_counts_the_goodbye_of_a_party_that_ran_ahead_once(tmp_path, monkeypatch, stopped, resumed):
    """The registry's STOP "done" (26 bytes) was counted twice (in the server's checkpoint and again when
    the resumed registry says goodbye) or not at all (wiped by the restore): the server's bytes_received
    differed from a run never stopped by one goodbye. Each order is forced here; they happen by chance."""
    import threading

    from splitlearn.run import checkpoint as ck
    from splitlearn.wire.link import Link

    body = _registry_plan(tmp_path / "data")
    splitlearn.train(body, out=tmp_path / "a")  # never stopped
    ev = {k: threading.Event() for k in ("goodbye", "stopping", "restored")}
    gate: dict[str, str | None] = {"goodbye": None, "handshake": None, "agreement": None}  # None: waits for nothing
    late: list[str] = []
    send, step, restore = Link.send, Party.step, ck.restore

    def wait(name: str) -> None:  # (the parties take turns on one thread: the others run meanwhile)
        if not wait_until(ev[name].is_set, 60):
            late.append(name)

    def gated_send(self, msg):
        if msg.kind == Kind.STOP and msg.sender == "registry" and msg.text == "done":
            if gate["goodbye"]:
                wait(gate["goodbye"])
            send(self, msg)
            ev["goodbye"].set()
            return
        if (gate["agreement"] and msg.kind == Kind.HELLO and msg.sender.startswith("site_")
                and read_hello(msg).get("phase") == "resume"):
            wait(gate["agreement"])
        send(self, msg)

    def gated_step(self, sid, rows, mode):
        if mode == "handshake" and self.name != "registry" and gate["handshake"]:
            wait(gate["handshake"])  # the server (and the sites, which it waits for) after the goodbye
        return step(self, sid, rows, mode)

    def restore_then_tell(party, tensors, manifest):
        restore(party, tensors, manifest)
        if party.name == "server":
            ev["restored"].set()

    monkeypatch.setattr(Link, "send", gated_send)
    monkeypatch.setattr(Party, "step", gated_step)
    monkeypatch.setattr(ck, "restore", restore_then_tell)
    seen = {"k": 0}

    def on_step(pr) -> None:  # the server's progress
        seen["k"] += 1
        if seen["k"] == 1 and stopped == "early":
            wait("goodbye")  # the goodbye is read before the server's step 3 ends: in its checkpoints
        if seen["k"] == 14:
            ev["stopping"].set()
            raise RuntimeError("stopped")

    gate["goodbye"] = "stopping" if stopped == "never" else None
    with pytest.raises(Exception, match="stopped"):
        splitlearn.train(body, out=tmp_path / "b", on_step=on_step)
    for e in ev.values():
        e.clear()
    gate["goodbye"] = "restored" if resumed == "after_restore" else None
    gate["handshake"] = "goodbye" if resumed == "before_restore" else None
    gate["agreement"] = "goodbye" if resumed == "before_agreement" else None
    splitlearn.train(body, out=tmp_path / "b", resume=True)
    assert not late, f"waited in vain for {late}"
    _same_model(tmp_path / "a", tmp_path / "b")
    ra, rb = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("a", "b"))
    assert rb["metrics"] == ra["metrics"]
    for p in ra["parties"]:
        for key in ("bytes_sent", "bytes_received", "sent", "received"):
            assert rb["parties"][p][key] == ra["parties"][p][key], (p, key)


# -- one cursor (round, step) and one resume rule for every plan ------------------------------------

def test_checkpoints_are_named_by_their_cursor_and_an_earlier_splitlearns_are_refused_naming_them(tmp_path, caplog):
    """A plain plan's checkpoints (round 0, after a step) and a [clients] plan's (the start of a round)
    are one kind of folder, ordered as cursors; a folder of splitlearn-checkpoint-2 (``step-N``,
    ``round-N``) or a manifest of an earlier format is never read, and each is named with the reason."""
    ck = Checkpoints(tmp_path / "checkpoints", plan_hash="p")
    plain, clients = [START, after_step(0), after_step(41)], [Cursor.after_round(0), Cursor.after_round(1)]
    names = [ck.save(c, {"w": torch.full((2,), float(i))}, {"party": "x"}).name for i, c in enumerate(plain + clients)]
    assert names == ["round-000000-step--00000001", "round-000000-step-000000000", "round-000000-step-000000041",
                     "round-000001-step--00000001", "round-000002-step--00000001"]
    assert ck.cursors() == [(1, -1), (2, -1)] and START == Cursor(0, -1) < after_step(41) < Cursor.after_round(0)
    tensors, manifest = ck.load(Cursor(1, -1))  # (the last KEEP are kept)
    assert torch.equal(tensors["w"], torch.full((2,), 3.0)) and manifest["cursor"] == [1, -1]
    for old in ("step-000000041", "round-000000001"):  # as splitlearn-checkpoint-2 named them
        (ck.folder / old).mkdir()
        (ck.folder / old / "manifest.json").write_text('{"format": "splitlearn-checkpoint-2"}')
    earlier = ck.folder / "round-000009-step-000000003"  # a new name over a manifest of an earlier format
    shutil.copytree(ck.folder / "round-000002-step--00000001", earlier)
    body = json.loads((earlier / "manifest.json").read_text()) | {"format": "splitlearn-checkpoint-2",
                                                                  "cursor": [9, 3]}
    (earlier / "manifest.json").write_text(json.dumps(body))
    (earlier / "SHA256SUMS").write_text(sha256_sums(earlier))
    with caplog.at_level(logging.WARNING, logger="splitlearn"):
        held = usable_checkpoints("x", ck)
    assert held == [(1, -1), (2, -1)]  # none of the earlier ones
    said = _messages(caplog)
    for old in ("step-000000041", "round-000000001"):
        assert f"x: checkpoint {old}: written by an earlier splitlearn (it named checkpoints step-N or round-N" in said
    assert ("x: checkpoint round-000009-step-000000003: written by an earlier splitlearn (splitlearn-checkpoint-2; "
            f"this one reads {FORMAT})") in said
    with pytest.raises(CheckpointError, match="round-000009-step-000000003: written by an earlier splitlearn"):
        ck.load(Cursor(9, 3))
    for c in ck.cursors():  # a party holding an earlier splitlearn's checkpoints only: refused, nothing set aside
        shutil.rmtree(ck.folder / folder_name(c))
    with pytest.raises(PlanError, match=r"x: resuming, but every checkpoint it holds was written by an earlier "
                                        r"splitlearn") as e:
        usable_checkpoints("x", ck)
    assert e.value.entry == "--resume" and (ck.folder / "step-000000041").is_dir()


def sha256_sums(folder: Path) -> str:
    """``SHA256SUMS`` of a checkpoint folder as ``sha256sum`` writes it."""
    import hashlib

    return "".join(f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n" for f in FILES)


def test_every_plan_resumes_from_the_last_cursor_every_party_holds_by_one_rule():
    """``agree_on_resume`` over cursors: a party lacking the latest takes everyone back to the last
    one all hold; nothing in common is from the start (None). The plain plans' hello agreement and
    the [clients] coordinator's rewind call this very function."""
    held = {"server": [START, after_step(9), after_step(14)], "hospital": [START, after_step(9)],
            "lab": [START, after_step(9), after_step(14)]}
    assert agree_on_resume("server", held, list(held)) == Cursor(0, 9)
    rounds = {"coordinator": [Cursor.after_round(r) for r in (-1, 0, 1)], "hospital-1": [Cursor.after_round(0)],
              "hospital-2": [Cursor.after_round(r) for r in (0, 1)]}
    assert agree_on_resume("coordinator", rounds, list(rounds)) == Cursor(1, -1)  # the end of round 0
    assert agree_on_resume("server", {"server": [after_step(9)], "hospital": [START]}, ["server", "hospital"]) is None
    with pytest.raises(PartyError, match=r"nobody said which checkpoints \['lab'\] hold"):
        agree_on_resume("server", {"server": [START]}, ["server", "lab"])
    from splitlearn.clients import recovery
    from splitlearn.run import resume, session as sessions

    assert sessions.agree_on_resume is resume.agree_on_resume is recovery.agree_on_resume


@pytest.mark.parametrize("told", [[[0, 3], [0]], [[-1, 3]], [[0, -2]], [[0, True]], [3], "[[0, 3]]",
                                  [[0, k] for k in range(1001)]])
def test_a_hello_holding_anything_but_cursors_is_refused_naming_the_peer(told):
    with pytest.raises(PartyError, match="server: 'hospital' resumes without telling which checkpoints it holds"):
        held_by("server", [START], {"hospital": {"checkpoints": told}})
    assert held_by("server", [START], {"hospital": {"checkpoints": [[0, 3], [0, -1], [0, 3]]}}) == \
        {"server": [START], "hospital": [START, Cursor(0, 3)]}


def test_a_checkpoint_keeps_the_last_evaluations_rows_and_a_run_resumed_from_it_draws_the_intervals_never_stopped(
        tmp_path):
    """Epoch checkpoints do not draw the bootstrap intervals (a thousand resamples an epoch): the last
    evaluation's scored rows go in the checkpoint, and a run resumed from the final one reports the intervals
    and curves of the run never stopped, drawn from those rows."""
    body = load_plan(EXAMPLES / "vanilla.toml").with_train(epochs=2)
    a = splitlearn.train(body, out=tmp_path / "a")
    ck = _ck(tmp_path / "a", "server", body)
    tensors, manifest = ck.load(ck.cursors()[-1])
    (loss,) = manifest["metrics"]["unsettled"]
    rows = a["metrics"]["test_rows"]
    assert tensors[f"metrics.{loss}.outputs"].shape == (rows, 10) and tensors[f"metrics.{loss}.targets"].shape == (rows,)
    assert manifest["metrics"]["unsettled"][loss][1] == rows
    assert manifest["metrics"]["ci"] == {}  # never drawn for a checkpoint
    b = splitlearn.train(body, out=tmp_path / "a", resume=True)  # every party finished: the result again
    assert a["metrics"]["ci95"] and b["metrics"]["ci95"] == a["metrics"]["ci95"]
    assert a["metrics"]["curves"] and b["metrics"]["curves"] == a["metrics"]["curves"]
    assert json.loads((tmp_path / "a" / "result.json").read_text())["metrics"]["ci95"] == a["metrics"]["ci95"]
