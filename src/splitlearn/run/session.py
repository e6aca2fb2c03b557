"""The session every party runs, whatever the plan: hello, handshake, the steps, goodbye.

:func:`run_party` takes a party through its steps inside a :func:`session` and returns its
:class:`~splitlearn.run.report.PartyReport`: the metrics of the losses it computes, its accounting,
what it refused and the privacy its noise spent. A turn of a horizontal client is the same session.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from ..core.engine import Party, PartyError, SessionRestart
from ..core.optimizing import WHOLE
from ..core.plan import differing_entries, plan_hash, plan_parts, plan_value
from ..core.specs import PlanError
from ..wire.codec import WireError
from ..wire.control import START, Cursor
from ..wire.link import Link
from ..wire.messages import PROTOCOL_VERSION, Kind, Message, encode, hello, quote, read_hello
from ..wire.transport import PeerRestarted, TransportError, TransportTimeout
from .agreement import Agreement
from .report import Metrics, PartyReport, Progress
from .epochs import epoch_agreement, indices, settle_epoch, settles, stopped
from .resume import (ResumeTraffic, agree_on_resume, answer_finished, count_kept_messages, finished_neighbours,
                     held_by, learn_held, say_resume, set_aside, usable_checkpoints)
from .setup import Step, accumulated

log = logging.getLogger("splitlearn.run.session")

__all__ = ["session", "run_party", "MAX_ROWS", "MAX_RESTARTS"]

MAX_ROWS = 2**31 - 1  # rows a hello may count (a party without data makes index arrays of them)


def _held_size(msg: Message) -> int:
    """Bytes a kept message takes, about: its payload, text and names (each at most ``Limits.name_chars``)."""
    return msg.payload_bytes + len(msg.text) + 256 * (1 + len(msg.tensors))


class _Ahead:
    """Messages of a later phase that come during the hello, the alignment and the resume
    agreement: held per peer within the budget of messages held for later steps,
    ``Limits.early_messages`` (per micro-batch) and ``Limits.early_bytes``. Past it, or from a
    party that is not a neighbour, a message is refused (the sender named and told, the refusal
    counted) and nothing of it is kept: an honest neighbour sends at most its hello of the next
    phase and one step's messages ahead, far within the budget."""

    def __init__(self, party: Party, neighbours: list[str], first: Iterable[Message] = ()):
        self.party, self.neighbours = party, set(neighbours)
        self.messages: list[Message] = []
        self.held: dict[str, list[int]] = {}  # sender -> [messages, bytes] in self.messages
        for msg in first:
            self.keep(msg)

    def keep(self, msg: Message) -> None:
        limits, held = self.party.limits, self.held.setdefault(msg.sender, [0, 0])
        size = _held_size(msg)
        problem = None
        if msg.sender not in self.neighbours:
            problem = f"{msg.kind.name} from a party that is not a neighbour of {self.party.name!r}"
        elif held[0] >= limits.early_messages * self.party.pipeline:
            problem = (f"{held[0]} of its messages are held before the handshake already (hello, alignment, "
                       "resume; Limits.early_messages)")
        elif held[1] + size > limits.early_bytes:
            problem = (f"{held[1]} bytes of its messages are held before the handshake already (hello, alignment, "
                       f"resume) and {size} more would pass the limit of {limits.early_bytes} (Limits.early_bytes)")
        if problem:
            self.party.link.refuse(msg.sender, problem, msg.step, msg.wire)
            return
        held[0] += 1
        held[1] += size
        self.messages.append(msg)

    def take(self) -> list[Message]:
        """Every message held, in order of arrival; none is held afterwards."""
        out, self.messages = self.messages, []
        self.held.clear()
        return out


@contextmanager
def session(party: Party, ids_hash: str = "", setup: Any = None, checkpoints: list[Cursor] | None = None,
            first: list[Message] = (), agreed: Agreement | None = None) -> Iterator[dict]:
    """Hello (protocol, plan and ids must match), a handshake step fixing wire shapes, then the
    caller's steps, then goodbye. A failure is sent to the neighbours before it is raised.

    ``setup`` (a :class:`~splitlearn.run.setup.PartySetup`): a session over the party's own data.
    Its hello tells how many rows it holds; a party without data learns them from the first hello
    that tells (and only then says hello itself, so the count travels on along the graph). With
    ``[data] align = "psi"``, the hello is followed by the private alignment
    (:mod:`~splitlearn.run.align`) and a second hello with the aligned rows.

    ``checkpoints``: resume; the cursors of the checkpoints this party holds. The neighbours tell
    theirs (``[round, step]`` pairs), each party picks the last cursor every party holds
    (:func:`~splitlearn.run.resume.agree_on_resume`), and a second hello checks that they picked the
    same (naming both otherwise). Yields ``{"resume": cursor}`` (None: no checkpoint in common, from
    the start; (0, -1) is the checkpoint taken before the first step).

    ``agreed``: what an earlier turn's handshake with the same peer fixed (:mod:`~splitlearn.run.agreement`),
    taken instead of the handshake where the peer holds the same one; else kept from this session's."""
    link, me = party.link, party.name
    neighbours = party.graph.neighbours(me)
    psi = setup is not None and party.graph.plan.data.align == "psi"
    ahead = _Ahead(party, neighbours, first)  # messages of a later phase that came early (or began a restart)
    extra = ResumeTraffic() if checkpoints is not None else None  # off the meter if it begins again from the start

    def deadline() -> float | None:  # the hello, like the goodbye, has one deadline however much arrives
        return None if party.timeout is None else time.monotonic() + party.timeout

    def exchange(phase: str, ids: str, rows: tuple[int, int] | None, counts: bool, tell: dict | None = None,
                 agree: dict | None = None) -> dict[str, dict]:
        """One round of hellos; ``counts``: they carry the row counts (``rows`` None: ours, learnt
        from the first neighbour that tells, are told on only then); ``tell``: more to say;
        ``agree``: more that must be equal on both sides. Each neighbour's hello, by name."""
        ours = {"protocol": PROTOCOL_VERSION, "plan_hash": plan_hash(party.graph.plan), "ids_hash": ids,
                **(agree or {})}
        sent = False
        got: dict[str, dict] = {}

        parts = plan_parts(party.graph.plan) if phase == "hello" else None  # to name what differs, if it does

        def say() -> None:
            for p in neighbours:
                msg = hello(me, p, ours["plan_hash"], ids, rows=list(rows) if rows else None,
                            phase=phase if phase != "hello" else None, plan_parts=parts, **(agree or {}),
                            **(tell or {}), target_scale=setup.scale_hello(p) if counts and setup is not None else None)
                link.send(msg)
                if extra is not None:
                    extra.note("sent", msg, json.loads(msg.text))

        if rows is not None or not counts:
            say()
            sent = True
        heard: set[str] = set()
        until = deadline()
        pending = ahead.take()
        while heard != set(neighbours) or not sent:
            msg = pending.pop(0) if pending else _recv(
                link, until, f"{me}: no hello from {sorted(set(neighbours) - heard) or neighbours} within "
                             f"{party.timeout} s")
            party.raise_if_stopped(msg)
            if msg.kind != Kind.HELLO or msg.sender not in neighbours:
                if phase == "hello" and msg.sender in neighbours and msg.sender not in heard and msg.kind != Kind.ERROR:
                    continue  # before a neighbour's hello: its earlier session's, stale
                ahead.keep(msg)
                continue
            try:
                theirs = read_hello(msg, link.limits)
            except WireError as e:
                link.refuse(msg.sender, f"a hello that cannot be read: {e}")
                continue
            if theirs.get("phase", "hello") != phase:
                ahead.keep(msg)
                continue
            if phase == "hello" and theirs.get("resuming") is not ours.get("resuming"):
                if ours.get("resuming"):
                    continue  # its earlier session's hello: it begins again on ours (or says why it cannot)
                if party.restartable and theirs.get("resuming") is True:
                    raise SessionRestart(msg)  # it came back: this party goes back with it
            for key, value in ours.items():
                if key == "ids_hash" and not (value and theirs.get(key)):
                    continue  # a party without data has no ids to compare
                if not _same(theirs.get(key), value):  # true is not protocol 1, [0, 9.0] not the cursor [0, 9]
                    if key == "plan_hash" and parts is not None:
                        _plan_differs(me, msg.sender, party.graph.plan, parts, theirs.get("plan_parts"))
                    raise PartyError(f"{me}: {key} differs from {quote(msg.sender)}'s: ours is {value!r}, "
                                     f"theirs is {quote(theirs.get(key))}" + (
                                         " (both must run the same plan file with the same --epochs/--seed)"
                                         if key == "plan_hash" else _ids_hint(party, ids) if key == "ids_hash" else
                                         " (a checkpoint is used only when every party holds it)"
                                         if key == "resume_from" else ""))
            told = theirs.get("rows")
            if counts and told is not None:
                if not (isinstance(told, list) and len(told) == 2 and all(type(v) is int and 0 <= v <= MAX_ROWS for v in told)):
                    link.refuse(msg.sender, f"a hello with rows {quote(told)}: expected [train, test] counts "
                                f"of at most {MAX_ROWS}")
                    continue
                if rows is None:
                    rows = (told[0], told[1])
                    setup.count(*rows)
                elif list(rows) != told:
                    raise PartyError(f"{me}: {quote(msg.sender)} holds {told[0]} training and {told[1]} test rows, "
                                     f"we {'hold' if setup.table is not None else 'were told'} {rows[0]} and "
                                     f"{rows[1]}" + _ids_hint(party, ids))
            if counts and setup is not None and "target_scale" in theirs:  # the scale of targets it standardised
                try:
                    setup.learn_scales(msg.sender, theirs["target_scale"])
                except ValueError as e:
                    link.refuse(msg.sender, f"a hello that cannot be read: {e}")
                    continue
            heard.add(msg.sender)
            got[msg.sender] = theirs
            if extra is not None:
                extra.note("received", msg, theirs)
            if not sent and rows is not None:
                say()
                sent = True
        for msg in pending:  # held within the budget before: they fit again
            ahead.keep(msg)
        return got

    try:
        held = setup.rows if setup is not None and setup.table is not None else None
        # counts travel in the first hello, or (psi) in a second one once the rows are aligned
        resuming = checkpoints is not None
        tell = {"checkpoints": checkpoints} if resuming else {}
        tell.update(agreed.told() if agreed is not None else {})
        if psi and held is not None:  # how many ids it aligns: what its requests are bounded by (run/align.py)
            tell["id_count"] = len(setup.own_ids)
        heard = exchange("hello", "" if psi else ids_hash, None if psi else held, setup is not None and not psi,
                         tell=tell or None, agree={"resuming": True} if resuming else None)
        done = finished_neighbours(me, heard, checkpoints) if resuming else None
        if done is not None:  # its neighbours finished: this party is at its final checkpoint, with them
            party.resumed_at = done.step
            yield {"resume": done, "finished": True}
        else:
            yield from _agree_and_handshake(party, setup, checkpoints, heard, exchange, ahead, psi, extra,
                                            agreed, ids_hash)
        for p in neighbours:
            link.send(Message(Kind.STOP, me, p, text="done"))
        until = deadline()
        while not set(neighbours) <= party.finished:
            try:
                msg = _recv(link, until, f"{me}: no goodbye from {sorted(set(neighbours) - party.finished)} "
                            f"within {party.timeout} s")
            except PeerRestarted:
                continue  # done with every step: a neighbour that comes back is answered from the final state
            party.raise_if_stopped(msg)
            if msg.kind == Kind.STOP:
                party.finished.add(msg.sender)
            elif msg.kind == Kind.HELLO and msg.sender in neighbours and party.restartable:
                answer_finished(party, msg)
                until = deadline()
    except (SessionRestart, PeerRestarted):
        raise  # begun again by run_party: nobody is told to stop
    except (PartyError, PlanError, TransportError, KeyboardInterrupt) as e:  # (Ctrl-C, SIGTERM: it was stopped)
        _tell_neighbours(party, e)
        raise


def _tell_neighbours(party: Party, error: BaseException) -> None:
    """Tell every neighbour why this party stops, so none waits out its deadline for it."""
    text = (f"{party.name} was stopped ({str(error) or 'Ctrl-C'})" if isinstance(error, KeyboardInterrupt)
            else f"{party.name} failed: {error}")
    for p in party.graph.neighbours(party.name):
        try:
            party.link.send(Message(Kind.ERROR, party.name, p, text=text))
        except Exception:  # noqa: BLE001 - the neighbour may be gone already
            pass


def _agree_and_handshake(party: Party, setup: Any, checkpoints: list[Cursor] | None, heard: dict[str, dict],
                         exchange: Callable[..., dict[str, dict]], ahead: _Ahead, psi: bool,
                         extra: ResumeTraffic | None, agreed: Agreement | None, tag: str) -> Iterator[dict]:
    """The session between the first hello and the steps: the PSI alignment and the rows hello, the
    resume agreement, the handshake; yields ``{"resume": cursor}``. A resume from the start counts as a new run
    (``extra``: what the resuming hellos said beyond a new run's)."""
    link, me = party.link, party.name
    resuming = checkpoints is not None
    known = held_by(me, checkpoints, heard) if resuming else {}
    if psi:
        from .align import align_psi

        kept = align_psi(link, party.graph, me, setup.own_ids if setup.table is not None else None,
                         timeout=party.timeout, keep=ahead.keep, first=ahead.take(), hellos=heard)
        if kept is not None:
            setup.restrict(kept)
            party.data = setup.inputs
        exchange("rows", setup.ids_hash, setup.rows if setup.table is not None else None, True)
    resume = None
    if resuming:  # what each party holds spreads one hop a round, until every party knows every party's
        parties = list(party.graph.plan.parties)
        for r in range(len(parties) - 2):
            learn_held(me, known, exchange(f"resume-{r}", "", None, False, tell={"held": known}), parties)
        resume = agree_on_resume(me, known, parties)
        exchange("resume", "", None, False, agree={"resume_from": None if resume is None else list(resume)})
        say_resume(me, checkpoints, resume, known)
        if resume is None:
            extra.uncount(party.meter)
    party.resumed_at = -1 if resume is None else resume.step  # where every party goes on (flow control)
    if party.secure.groups:  # merge = "secure_sum": the members agree their mask keys (core/securesum.py)
        party.secure.agree(lambda phase, tell: exchange(phase, "", None, False, tell=tell), _certified(party))
    for msg in ahead.take():
        party.keep_early(msg, -2)  # before the handshake (step -1)
    if agreed is not None and agreed.held(party, heard):
        agreed.take(party)  # (what the same handshake fixed at both: a turn's again)
    else:
        party.step(-1, None, "handshake")
        if agreed is not None:
            agreed.keep(party, tag)
    yield {"resume": resume}


def _certified(party: Party) -> Any:
    """A member's kit to sign its secure-sum key and check the others' under mutual TLS, else None (logged)."""
    from ..privacy.secagg_certs import Certified  # (cryptography's x509: for a secure sum only)
    credentials = party.link.transport.credentials
    if party.secure.joins and credentials is None:
        log.warning("%s: secure sum without certificates: the merger is trusted to relay the keys", party.name)
    return Certified(credentials) if party.secure.joins and credentials is not None else None


def _same(theirs: Any, ours: Any) -> bool:
    """Whether a neighbour's hello value is ours exactly: the same JSON, types included all the way
    down (``True`` is not ``1``, ``9.0`` is not ``9``, inside lists too)."""
    if type(theirs) is type(ours) and type(ours) in _PLAIN and theirs == ours:  # (most of a hello: no JSON made)
        return True
    return json.dumps(theirs, sort_keys=True) == json.dumps(ours, sort_keys=True)


_PLAIN = (str, int, bool, type(None))  # equal values of one of these types (the very type) write the same JSON


def _plan_differs(me: str, peer: str, plan: Any, ours: dict[str, str], theirs: Any) -> None:
    """Raise the error naming the first entries where a neighbour's plan differs from ours (when it said)."""
    entries = differing_entries(ours, theirs)
    if not entries:
        return
    shown = "; ".join(f"{e} (ours: {json.dumps(plan_value(plan, e))[:80] if e in ours else 'absent'}"
                      f"{', theirs: absent' if e not in theirs else ''})" for e in entries[:5])
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    raise PartyError(f"{me}: the plan differs from {quote(peer)}'s at {shown}{more} (both must run the same plan "
                     "file with the same --epochs/--seed)")


def _ids_hint(party: Party, ids: str) -> str:
    if not ids or party.graph.plan.data.align == "psi":
        return ""
    return ('; the parties must hold the same sample ids (or set [data] align = "psi" to keep only the ids '
            "every party holds)")


def _recv(link: Link, deadline: float | None, why: str) -> Message:
    try:
        return link.recv(deadline=deadline)
    except TransportTimeout:
        raise PartyError(why) from None


MAX_RESTARTS = 20  # sessions begun again after a neighbour went back to a checkpoint, per run


def _captured(party: Party, metrics: Metrics, timing: dict, epoch: int | None) -> tuple[dict, dict]:
    """A checkpoint's (tensors, manifest) of ``party`` after a step: its state, its metrics, its timing."""
    from .checkpoint import capture  # (torch's files: imported where a run is)

    state, kept = metrics.checkpoint()
    tensors, manifest = capture(party, {"metrics": state, "timing": timing, "epoch": epoch})
    return {**tensors, **kept}, manifest


def run_party(party: Party, steps: Iterator[Step] | Callable[[], Iterator[Step]],
              on_step: Callable[[Progress], None] | None = None, ids_hash: str = "", tracker: Any = None,
              setup: Any = None, checkpoints: Any = None, resume: bool = False, intervals: bool = True,
              agreed: Agreement | None = None) -> PartyReport:
    """Run a party through the schedule; collect the metrics of the losses it computes (and
    stream them to ``tracker``, a :class:`~splitlearn.run.tracking.Tracker`). Its report is what the
    session knows (metrics, accounting and timings, refusals, predictions, scores); what the party
    spent and recorded over all its sessions is its participant's to report
    (:meth:`~splitlearn.clients.participant.Participant.report`). ``steps`` may be
    a function giving them once the hello has told how many rows there are (``setup``: the
    party's own data, see :func:`session`). ``checkpoints`` (a
    :class:`~splitlearn.run.checkpoint.Checkpoints`): take one every ``every`` training steps and
    at every epoch's end; ``resume``: go on from the last one every party holds. With ``[train] accumulate``
    the steps are taken in gradient groups (:func:`~splitlearn.run.setup.accumulated`), and a checkpoint that
    falls inside a group is taken at its end: no checkpoint holds gradients half accumulated. ``intervals`` False:
    the report's metrics leave out the last evaluation's bootstrap intervals and curves (none is drawn).
    ``agreed``: a turn's handshake kept, :func:`session`'s."""
    from ..wire.metering import Meter
    from .checkpoint import after_step, capture, load_meter, meter_state, restore

    epochs = party.graph.plan.train.epochs
    if checkpoints is not None:
        checkpoints.plan_hash = plan_hash(party.graph.plan)
        if not resume:
            checkpoints.clear()
        party.restartable = True
    initial = None  # the state before any step, in memory: a session begun again with no checkpoint in common goes back to it
    first: list[Message] = []  # a neighbour's new hello that began a restart
    full: list[Step] | None = None  # the schedule (with validation: every epoch's, before any early stop)
    validating = party.graph.plan.data.validation_fraction is not None
    for attempt in range(MAX_RESTARTS + 1):
        metrics = Metrics(party, tracker, setup)
        predictions: dict[str, list] = {}
        epoch = None
        timing = {"train_s": 0.0, "train_samples": 0, "train_steps": 0, "first_step_s": 0.0, "first_step_samples": 0}
        try:
            held = usable_checkpoints(party.name, checkpoints) if resume else None
        except PlanError as e:  # it cannot go on from what it holds: its neighbours hear why at once
            _tell_neighbours(party, e)
            raise
        if attempt:  # what this session counts (a checkpoint's meter replaces it where one is common)
            load_meter(party.meter, meter_state(Meter(party.name)))
            for msg in first:  # the hello that began it, counted before
                party.meter.on_recv(msg.wire, "control", len(encode(msg)), msg.payload_bytes)
        try:
            with session(party, ids_hash, setup, held, first, agreed) as info:
                if initial is None and checkpoints is not None and not info.get("finished"):  # (after the handshake:
                    initial = capture(party, {})  # a defense's layers are sized; finished, nothing begins again)
                if full is None:
                    full = accumulated(list(steps() if callable(steps) else steps), party.graph.plan.train.accumulate)
                todo = full
                agreement = epoch_agreement(party, full) if validating else None
                start, due = 0, False  # due: a checkpoint waits for the end of the gradient group
                if info["resume"] is not None:  # the state at that cursor, as it was (accounting included)
                    tensors, manifest = checkpoints.load(info["resume"])
                    restore(party, tensors, manifest)
                    if agreement is not None and agreement.stopped is not None:  # it stopped early before
                        todo = stopped(full, agreement.steps[agreement.stopped] // party.pipeline)
                    count_kept_messages(party)
                    metrics.load(manifest["metrics"], tensors)
                    timing, epoch = manifest["timing"], manifest["epoch"]
                    start = next((i for i, st in enumerate(todo) if st.id > info["resume"].step), len(todo))
                    if info.get("finished") and start < len(todo):
                        raise PartyError(f"{party.name}: its neighbours finished {info['resume']}, but "
                                         f"this party's schedule goes on to step {todo[-1].id}")
                elif attempt:  # begun again with no checkpoint in common: from the start, as a new run
                    restore(party, initial[0], {**initial[1], "meter": meter_state(party.meter)})
                if info["resume"] is None and checkpoints is not None:  # the state before the first step
                    if resume:
                        set_aside(party.name, checkpoints)
                    checkpoints.save(START, *_captured(party, metrics, timing, None))
                for i in indices(start, lambda: len(todo)):
                    step = todo[i]
                    if epoch is not None and step.epoch != epoch:
                        metrics.close_epoch(epoch)
                    epoch = step.epoch
                    t0 = time.perf_counter()
                    try:
                        if step.mode == "train" and party.optimizer is not None:
                            party.optimizer.begin_epoch(step.epoch)  # (a schedule stepped per epoch)
                        more = (step.update,) if step.update != WHOLE else ()  # (a group of its own: the default)
                        out = party.step(step.id, step.rows, step.mode, *more)
                    except (PeerRestarted, SessionRestart):
                        raise
                    except TransportError as e:  # a peer gone for good (after waiting for it to come back)
                        raise PartyError(f"{party.name}: {e} (during step {step.id}; the last step both parties "
                                         f"finished: {todo[i - 1].id if i else 'none'})") from None
                    if step.mode == "train":
                        dt = time.perf_counter() - t0
                        if not timing["train_steps"]:  # includes one-off work: FLOP counting, allocator warm-up
                            timing["first_step_s"], timing["first_step_samples"] = dt, len(step.rows)
                        timing["train_s"] += dt
                        timing["train_samples"] += len(step.rows)
                        timing["train_steps"] += 1
                    metrics.add(step, out)
                    if step.mode == "predict":
                        for k, v in out.predictions.items():
                            predictions.setdefault(k, []).append(v)
                    settled = agreement is not None and settles(todo, i)
                    if settled:  # the epoch's last validation step: the network agrees on its best epoch
                        metrics.close_epoch(epoch)
                        epoch = None
                        if settle_epoch(party, agreement, step, metrics):
                            todo = stopped(todo, step.id)  # every party drops the same epochs
                    if checkpoints is not None and step.mode in ("train", "eval"):
                        last = i + 1 == len(todo) or todo[i + 1].epoch != step.epoch or settled
                        every = checkpoints.every
                        due = due or step.mode == "train" and bool(every) and timing["train_steps"] % every == 0
                        if last or due and step.update.last:
                            due = False
                            if last and epoch is not None:  # the epoch is complete: its metrics go in the checkpoint
                                metrics.close_epoch(epoch)
                                epoch = None
                            checkpoints.save(after_step(step.id), *_captured(party, metrics, timing, epoch))
                    if on_step is not None:
                        loss = next(iter(out.losses.values()), None)
                        on_step(Progress(i + 1, len(todo), step.epoch, epochs, "step", loss, step.mode))
            break
        except (PeerRestarted, SessionRestart) as e:
            if checkpoints is None:
                raise PartyError(f"{party.name}: {e}, and this party keeps no checkpoints to go back to "
                                 "(give it an --out folder)") from None
            if attempt == MAX_RESTARTS:
                raise PartyError(f"{party.name}: the session began again {MAX_RESTARTS} times; giving up") from None
            log.warning("%s: %s; going back to the last checkpoint every party holds", party.name, e)
            first = [e.hello] if isinstance(e, SessionRestart) else []
            party.restart()
            resume = True
    if epoch is not None:
        metrics.close_epoch(epoch)
    report = PartyReport(party.name, metrics.history(intervals), {**party.meter.summary(), **timing}, list(party.link.refused),
                         plays=party.name, modules=party.modules, predictions=predictions, scores=metrics.scores)
    report.refused_jumps = dict(party.bounds.refused)
    held = {id(t): t for m in party.modules.values() for t in [*m.parameters(), *m.buffers()]}  # shared once
    report.meter["weights_bytes"] = sum(t.numel() * t.element_size() for t in held.values())
    if validating:
        a = party.precision.epochs
        report.stopping = {"best_epoch": a.best, "stopped_at": a.stopped, "metric": a.metric, "loss": a.loss}
    return report
