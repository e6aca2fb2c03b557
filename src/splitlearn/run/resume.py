"""Going on from a checkpoint: the one rule by which the parties of any plan agree where to go on
(:func:`agree_on_resume`: the last :class:`~splitlearn.wire.control.Cursor` every party holds), fed
by the hellos of :func:`~splitlearn.run.session.session` in a plain plan (what each party holds
spreads one hop a round) and by the coordinator's ``CheckpointsHeld`` answers in a ``[clients]``
plan (:meth:`~splitlearn.clients.recovery.Recovery.rewind`); and a neighbour that comes back after
this party finished.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from ..core.engine import Party, PartyError
from ..core.plan import plan_hash
from ..core.specs import PlanError
from ..wire.codec import WireError
from ..wire.control import Cursor
from ..wire.messages import Kind, Message, encode, hello, quote, read_hello
from ..wire.metering import Meter, Traffic
from .checkpoint import after_step, goodbye_bytes, load_meter, meter_state

log = logging.getLogger("splitlearn.run.resume")

__all__ = ["MAX_HELD", "held_by", "learn_held", "agree_on_resume", "finished_neighbours", "answer_finished",
           "cursor_of", "cursors_of", "say_resume", "usable_checkpoints", "set_aside", "count_kept_messages",
           "ResumeTraffic"]

MAX_HELD = 1000  # checkpoints a party may say it holds


def cursor_of(value: Any) -> Cursor | None:
    """A cursor a peer sent, ``[round, step]`` (None: not one, or one before the start)."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        cursor = Cursor(*value)
        return cursor if cursor.problem() is None else None
    return None


def cursors_of(value: Any) -> list[Cursor] | None:
    """The cursors of the checkpoints a peer says a party holds, sorted (None: not at most
    :data:`MAX_HELD` ``[round, step]`` pairs)."""
    if not isinstance(value, list) or len(value) > MAX_HELD:
        return None
    out = [cursor_of(v) for v in value]
    return None if None in out else sorted(set(out))


def finished_neighbours(me: str, heard: dict[str, dict], ours: list[Cursor]) -> Cursor | None:
    """The cursor at which the neighbours that answered our resuming hello from their final state
    finished (None: none did); every neighbour must have, and this party must hold that cursor."""
    done = {p: h.get("finished") for p, h in heard.items() if "finished" in h}
    if not done:
        return None
    told = {p: cursor_of(v) for p, v in done.items()}
    cursors = set(told.values())
    cursor = cursors.pop()
    if cursors or cursor is None:
        raise PartyError(f"{me}: neighbours say they finished at different or malformed cursors (expected one "
                         f"[round, step]): {quote(done)}")
    rest = sorted(set(heard) - set(done))
    if rest:
        raise PartyError(f"{me}: {sorted(done)} finished {cursor} while {rest} go back to a checkpoint; "
                         "start every party again with --resume")
    if cursor not in ours:
        raise PartyError(f"{me}: {sorted(done)} finished {cursor}, but this party holds no checkpoint of it (it "
                         f"holds {[str(c) for c in ours]}); the run cannot go on")
    return cursor


def answer_finished(party: Party, msg: Message) -> None:
    """A neighbour that came back (its resuming hello) after this party finished every step: tell it
    the step this party finished at, and say goodbye again; it goes on from its checkpoint of that step.
    Neither its hello nor the answer is counted (a resume's agreement is not the run's traffic)."""
    try:
        theirs = read_hello(msg, party.link.limits)
    except WireError as e:
        party.link.refuse(msg.sender, f"a hello that cannot be read: {e}")
        return
    if theirs.get("resuming") is not True or theirs.get("phase", "hello") != "hello":
        return  # not a party that came back (nothing to answer)
    received = party.meter.received[(msg.wire, "control")]
    received.messages, received.bytes = received.messages - 1, received.bytes - len(encode(msg))
    counted = meter_state(party.meter)
    party.finished.discard(msg.sender)  # its goodbye, if any, was its earlier process's
    party.link.send(hello(party.name, msg.sender, plan_hash(party.graph.plan), "", resuming=True,
                          finished=list(after_step(party.last_step))))
    party.link.send(Message(Kind.STOP, party.name, msg.sender, text="done"))
    load_meter(party.meter, counted)
    log.warning("%s: %s came back after this party finished; told it to go on %s", party.name,
                msg.sender, after_step(party.last_step))


def held_by(me: str, ours: list[Cursor], heard: dict[str, dict]) -> dict[str, list[Cursor]]:
    """Which checkpoints (their cursors) this party and each neighbour hold, from the first hello."""
    known = {me: sorted(set(ours))}
    for peer, theirs in heard.items():
        held = cursors_of(theirs.get("checkpoints"))
        if held is None:
            raise PartyError(f"{me}: {quote(peer)} resumes without telling which checkpoints it holds (at most "
                             f"{MAX_HELD} [round, step] pairs): {quote(theirs.get('checkpoints'))}")
        known[peer] = held
    return known


def learn_held(me: str, known: dict[str, list[Cursor]], told: dict[str, dict], parties: list[str]) -> None:
    """Add what the neighbours know of every party's checkpoints to ``known``; a party said to
    hold other checkpoints than we heard stops the agreement, naming both."""
    for peer, theirs in told.items():
        held = theirs.get("held")
        if not isinstance(held, dict):
            raise PartyError(f"{me}: {quote(peer)} did not say which checkpoints the parties hold")
        for name, value in held.items():
            cursors = cursors_of(value)
            if name not in parties or cursors is None:
                raise PartyError(f"{me}: {quote(peer)} says party {quote(name)} holds checkpoints {quote(value)}: "
                                 f"expected a party of the plan and at most {MAX_HELD} [round, step] pairs")
            if name in known and known[name] != cursors:
                raise PartyError(f"{me}: {quote(peer)} says {name!r} holds the checkpoints {_named(cursors)}, but "
                                 f"{'this party holds' if name == me else 'we heard'} {_named(known[name])}")
            known[name] = cursors


def agree_on_resume(me: str, known: dict[str, list[Cursor]], parties: list[str]) -> Cursor | None:
    """Where every party goes on, in every plan: the last cursor every party of ``parties`` holds a
    checkpoint of (None: none in common, from the start)."""
    unknown = [p for p in parties if p not in known]
    if unknown:
        raise PartyError(f"{me}: resuming, but nobody said which checkpoints {unknown} hold")
    common = set.intersection(*(set(known[p]) for p in parties)) if parties else set()
    return max(common) if common else None


def say_resume(me: str, ours: list[Cursor], agreed: Cursor | None, known: dict[str, list[Cursor]]) -> None:
    """Log a resume that goes back further than this party's last checkpoint, with both cursors."""
    last = max(ours) if ours else None
    if last is None or agreed == last:
        return
    lacking = sorted(p for p, held in known.items() if last not in held)
    if agreed is None:
        log.warning("%s: resuming, but no checkpoint is held by every party (this party's last: %s; "
                    "%s do not hold it): from the start", me, last, lacking)
    else:
        log.warning("%s: resuming %s, the last checkpoint every party holds, not %s, this "
                    "party's last (%s do not hold it)", me, agreed, last, lacking)


def _named(cursors: list[Cursor]) -> str:
    return "[" + ", ".join(f"[{c.round}, {c.step}]" for c in cursors) + "]"


def usable_checkpoints(me: str, checkpoints: Any) -> list[Cursor]:
    """The cursors of the checkpoints this party can resume from; why any other is not usable is logged.
    A party that holds none it can use but some of an earlier splitlearn refuses to go on (PlanError):
    starting over would set that run's work aside unasked, for any plan."""
    if checkpoints is None:
        return []
    cursors, bad = checkpoints.scan()
    for why in bad:
        log.warning("%s: checkpoint %s: not used", me, why)
    earlier = [why for why in bad if "written by an earlier splitlearn" in why]
    if earlier and not cursors:
        raise PlanError(f"{me}: resuming, but every checkpoint it holds was {earlier[0].split(': ', 1)[1]}",
                        entry="--resume", hint="finish that run with the version that began it, or start it again "
                        "without --resume")
    return cursors


def set_aside(me: str, checkpoints: Any) -> None:
    """A resumed run that begins again keeps the checkpoints it had, moved aside, and says where."""
    moved = checkpoints.set_aside()
    if moved is not None:
        log.warning("%s: beginning again from the start; the checkpoints held before were moved to %s", me, moved)


def count_kept_messages(party: Party) -> None:
    """After a restore put the meter back: count again the messages of later steps that came before
    it (kept early) and the goodbyes of neighbours that ran ahead and finished already, whose bytes
    the restored meter does not hold (a checkpoint holds no goodbye); a run never stopped counts them."""
    for msgs in party.kept_early.values():
        for msg in msgs:
            direction = "forward" if msg.kind == Kind.ACTIVATION else "backward"
            party.meter.on_recv(msg.wire, direction, len(encode(msg)), msg.payload_bytes)
    for peer in party.finished:
        party.meter.on_recv("", "control", goodbye_bytes(peer, party.name), 0)


class ResumeTraffic:
    """What a resuming session sends and receives beyond a run never stopped: the resuming fields of its
    first hellos (``resuming``, ``checkpoints``) and the resume agreement's hellos. A session that agrees
    to begin again from the start takes them off its meter (:meth:`uncount`): it counts as a new run."""

    def __init__(self) -> None:
        self.sent, self.received = Traffic(), Traffic()  # messages and bytes beyond a new run's

    def note(self, side: str, msg: Message, fields: dict[str, Any]) -> None:
        """A hello sent or received (``side``), with its ``fields``: a first hello counts what it says beyond
        a new run's (the same fields less the resuming ones, as :func:`~splitlearn.wire.messages.hello` writes
        them), the resume agreement's all of it, any other phase (the rows, the secure sum's keys) nothing."""
        phase, extra = fields.get("phase", "hello"), self.sent if side == "sent" else self.received
        if phase == "hello":
            fresh = {k: v for k, v in fields.items() if k not in ("resuming", "checkpoints")}
            extra.bytes += len(encode(msg)) - len(encode(replace(msg, text=json.dumps(fresh))))
        elif isinstance(phase, str) and phase.startswith("resume"):
            extra.messages, extra.bytes = extra.messages + 1, extra.bytes + len(encode(msg))

    def uncount(self, meter: Meter) -> None:
        for table, extra in ((meter.sent, self.sent), (meter.received, self.received)):
            if extra.bytes or extra.messages:
                counted = table[("", "control")]
                counted.messages, counted.bytes = counted.messages - extra.messages, counted.bytes - extra.bytes
