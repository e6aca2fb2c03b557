"""What every physical party of every plan is: a :class:`Participant`, with its state, its weights,
its checkpoints (:mod:`~splitlearn.clients.saving`) and its one report. It takes part in turns
(:mod:`~splitlearn.clients.turns`), each the ordinary session
(:func:`splitlearn.run.session.run_party`). A plain plan's party (:mod:`~splitlearn.clients.peer`)
runs the trivial schedule's one turn straight over its transport. A coordinated schedule's party
exchanges the typed control messages of :mod:`splitlearn.wire.control` with the coordinator, and
its turns run between the fixed parties and one client over a
:class:`~splitlearn.wire.transport.switch.Switch` view that lets ``T-k`` speak as ``T`` and keeps
the turn's messages apart from the schedule's (commands, replies and weights). A command carries
a deadline after which a late follower drops it. Such a participant meters its training and weight
traffic apart from its evaluation traffic.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..core.graph import build_graph
from ..core.plan import Plan, per_client, plan_hash
from ..core.specs import PlanError
from ..core.randomness import PartyRandom, party_seed
from ..core import defense as defenses
from ..run.agreement import Agreement
from ..run.checkpoint import Checkpoints
from ..run.observe import Recorder
from ..run.report import PartyReport
from ..run.setup import PartySetup, setup_party
from ..wire.codec import WireError
from ..wire.control import Instruction, Rejoined, Reply, WeightsLoaded, WeightsMissing, WeightsRefused, Ready
from ..wire.link import Link
from ..wire.messages import (Kind, Limits, Message, kind_of, quote, read_reply, read_weights, reply, weights,
                              wire_size)
from ..wire.metering import Meter
from ..wire.transport.base import Transport, TransportError, TransportTimeout
from ..wire.transport.switch import WATCH_S, Switch
from .context import Context
from .results import RECORDED_CLIENTS, FederationRound, federation_record
from .roles import Duty, client_names, coordinator_of, duties_of, federation_of, physical_names, plays_of
from .scoring import EvaluationPool
from .secure import SECAGG_WIRE, secure_collect
from .securestate import SecureState
from .strategies import strategy_of
from .weights import average, load_state, state_of

__all__ = ["Participant", "Fault", "MAX_PENDING", "MAX_EARLY_WEIGHTS"]

log = logging.getLogger(__name__)

MAX_PENDING = 100  # commands a follower keeps while it waits for weights
MAX_EARLY_WEIGHTS = 1  # weights messages kept per sender before the command naming them; later ones are refused

Fault = Callable[["Participant", int, Instruction], None]  # tests: called with each command before it is carried out


class Participant:
    """One physical party of any plan: its state, messages, weights and report. Turns
    (:class:`~splitlearn.clients.turns.TurnTaking`) and checkpoints
    (:class:`~splitlearn.clients.saving.StateSaving`) build on it. A coordinated schedule's
    :class:`~splitlearn.clients.coordinator.Coordinator` walks the rounds and its
    :class:`~splitlearn.clients.follower.Follower` parties carry out its instructions; a plain
    plan's parties are :class:`~splitlearn.clients.peer.Peer` parties, each running the trivial
    schedule's one round (:class:`~splitlearn.clients.strategies.Trivial`). ``record``: keep what
    this party receives, per client, for the audit (the federation: what it averaged in its last round,
    each client's weights as received unless ``secure_aggregation``); ``rejoin_wait_s``: how long the coordinator
    waits for a failed party to come back as a new process (0: never)."""

    def __init__(self, plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None, *,
                 timeout: float | None = None, step_timeout: float | None = None, fault: Fault | None = None,
                 context: Context | None = None, record: bool = False, limits: Limits | None = None,
                 tracking: Any = None, out: Path | None = None, resume: bool = False, rejoin_wait_s: float = 0.0):
        if name not in physical_names(plan):
            raise PlanError(f"no party {name!r} in this plan", hint=f"parties are {physical_names(plan)[:6]} ...")
        self.plan, self.spec, self.name = plan, plan.clients, name
        self.strategy = strategy_of(plan)
        self.clients = client_names(plan)
        self.coordinator, self.federation = coordinator_of(plan), federation_of(plan)
        self.duties = duties_of(plan, name)
        self.plays = plays_of(plan, name)  # the plan party it plays in turns (None: a federation of its own)
        me = name if self.is_client else None
        self.setup = setup if setup is not None or self.plays is None else setup_party(plan, self.plays, client=me)
        self.step_timeout = plan.step_timeout_s(step_timeout)  # for a step of a turn
        # for an answer of the schedule (the trivial schedule has none: nobody instructs)
        self.timeout = timeout if timeout is not None else self.spec.timeout if self.spec else self.step_timeout
        self.limits = limits or Limits()
        # a coordinated schedule's own messages (commands, replies, weights) travel apart from its turns'
        self.switch = Switch(transport, _classify, wire_size) if self.strategy.coordinated else None
        self.link = Link(self.switch.control() if self.switch else transport, Meter(name), self.limits)
        self.eval_meter = Meter(name)
        self.fault = fault
        self.per_client = per_client(plan)
        self.ctx: Context | None = None
        self.record_ids: np.ndarray | None = None  # the ids of recorded rows (per-client data: positions)
        if not self.strategy.coordinated:  # its one round is derived once the hello told the rows (Peer)
            self.graph, self.ids_hash, self.rounds, self.turns = self.setup.graph, self.setup.ids_hash, [], {}
        elif not self.per_client:  # the shares of one dataset: every party derives them alike
            template = self.setup if self.is_client else setup_party(plan, self.spec.template, optimizer=False)
            self.record_ids = template.splits.ids
            self.adopt_context(context or Context.from_setup(plan, template))
        else:  # each client's own file: the coordinator's census tells everyone how many rows each has
            self.graph, self.ids_hash, self.rounds, self.turns = build_graph(plan), "", [], {}
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.refused: list[str] = []
        self.recorders: dict[str, Recorder] | None = {} if record and self.setup is not None else None
        self.recording = record  # the federation too: what it averaged in its last round (federation_record)
        self.last_round: FederationRound | None = None  # federation, recording: the last round it averaged
        self.train_work = {"samples": 0, "steps": 0}  # training this party did: what its noise spent
        self.rng: PartyRandom | None = None  # its random layers' stream (made at its first turn)
        self.tracking = tracking  # where the losses this party computes are streamed (splitlearn.run.tracking)
        self.tracker = None  # open while it runs (open_tracker), closed by close_tracker
        self.global_state: dict[str, torch.Tensor] | None = None  # federation: the averaged client weights
        self.secure_random: Callable[[int], bytes] = os.urandom  # secure aggregation's keys and masks (tests: seeded)
        # secure aggregation's journal, certificate kit (a party process's mutual TLS key) and latest request
        self.secure = SecureState.of(name, transport.credentials, out) \
            if self.spec is not None and self.spec.secure_aggregation else None
        if self.is_federation:
            self.global_state = {k: v.clone() for k, v in state_of(
                {s: _build(plan, s) for s in _segments_of(self.graph, self.spec.template)}).items()}
        # fixed parties: a copy of their segments per client (splitfed_v1 for a round, independent for good)
        self.copies: dict[str, tuple[dict, torch.optim.Optimizer | None]] = {}
        self.lent: dict[str, torch.Tensor] | None = None  # a client: the run's model, lent for one evaluation turn
        self.agreements: dict[str, Agreement] = {}  # turns: the last handshake with each peer (run/agreement.py)
        self.pool = EvaluationPool(plan)  # a head: the current evaluation's scores (all sites)
        self.plan_session: PartyReport | None = None  # the trivial schedule's one session (a Peer's)
        self._requests = itertools.count(1)
        self._early: dict[tuple[str, int], Message] = {}  # (sender, request): weights that beat their command
        self._pending: deque[Message] = deque(maxlen=MAX_PENDING)  # follower: commands that came meanwhile
        # checkpoints (with an --out folder): see _checkpoints
        self.checkpoints: Checkpoints | None = None
        if out is not None:
            self.checkpoints = self._checkpoints(Path(out) / "parties" / name / "checkpoints")
            if not resume:
                self.checkpoints.clear()
        elif resume:
            raise PlanError("resume needs the run folder (--out) whose checkpoints to go on from", entry="--resume")
        self.resuming = resume  # a follower started with --resume waits for the coordinator's word to rewind
        self.rejoin_wait_s = rejoin_wait_s
        self.attempt = 0  # times the schedule rewound to a checkpoint: in every turn's tag

    def _checkpoints(self, folder: Path) -> Checkpoints:
        """Where and when this party saves its state. A coordinated schedule: at the end of every
        round, on the coordinator's word (rewinding to one begins the schedule again from there,
        see :class:`~splitlearn.clients.recovery.Recovery`). The trivial schedule: every
        ``[train] checkpoint_every`` training steps and at every epoch's end, inside its one turn
        (:func:`~splitlearn.run.session.run_party`); a party that hears nothing while training (it
        sends labels only) runs ahead by up to flow control's window, so it keeps the checkpoints
        its neighbours may still hold as their last."""
        if self.strategy.coordinated:
            return Checkpoints(folder, plan_hash=plan_hash(self.plan))
        from ..core.flow import flow_pairs

        g, me = self.graph, self.name
        free = not any(w.dst_party == me or (w.src_party == me and w.carries == "activation") for w in g.wires)
        ahead = [p.window for p in flow_pairs(g, self.limits) if p.producer == me and free]
        return Checkpoints(folder, self.plan.train.checkpoint_every, lag=max(ahead, default=0),
                           plan_hash=plan_hash(self.plan))

    # -- what this participant is ------------------------------------------------------------
    @property
    def is_client(self) -> bool:
        return Duty.CLIENT in self.duties

    @property
    def is_federation(self) -> bool:
        return Duty.FEDERATION in self.duties

    @property
    def in_turns(self) -> bool:
        """Whether it takes part in turns (a client or a fixed party; not a federation of its own)."""
        return bool(self.duties & (Duty.CLIENT | Duty.FIXED))

    def _random(self, modules: dict[str, torch.nn.Module]) -> PartyRandom:
        """This physical party's own random stream (its random layers'), on its modules' device."""
        device = next((p.device for mod in modules.values() for p in mod.parameters()), "cpu")
        return PartyRandom(party_seed(self.plan.train.seed, self.name), device)

    def adopt_context(self, ctx: Context) -> None:
        self.ctx = ctx
        self.graph, self.ids_hash, self.rounds, self.turns = ctx.graph, ctx.ids_hash, ctx.rounds, ctx.turns

    def use_counts(self, train: list[int], test: list[int]) -> None:
        """Per-client data: the rows every client holds, from the census (one count per client)."""
        me = self.clients.index(self.name) if self.is_client else None
        self.adopt_context(Context.from_counts(self.plan, list(train), list(test), me, self.setup))

    # -- messages ---------------------------------------------------------------------------
    def _reply(self, request: int, answer: Reply) -> None:
        self.link.send(reply(self.name, self.coordinator, request, answer))

    def _senders_of_weights(self) -> set[str]:
        """Who may send us weights: a client's coordinator, federation and strategy peers; the
        federation's clients."""
        if self.is_federation:
            return set(self.clients)
        if not self.is_client:
            return set()
        return {self.coordinator, self.federation} | self.strategy.weight_senders(self.plan, self.name)

    def _hold_weights(self, msg: Message) -> bool:
        """Keep weights that came before the command naming them: from an expected sender only
        (False otherwise), at most :data:`MAX_EARLY_WEIGHTS` per sender; beyond that they are
        refused (an ERROR to the sender) and counted."""
        if msg.sender not in self._senders_of_weights():
            return False
        if msg.wire == SECAGG_WIRE and self.secure is not None and msg.step <= self.secure.last:
            log.debug("%s: dropping a secure aggregation message of finished request %d", self.name, msg.step)
            return True  # (an abort for a client that gave up already, a vector that came too late)
        held = [r for s, r in self._early if s == msg.sender]
        if len(held) >= MAX_EARLY_WEIGHTS:
            self.link.refuse(msg.sender, f"weights for request {msg.step} before any command named them, while its "
                             f"weights for request {held[0]} wait already: at most {MAX_EARLY_WEIGHTS} early weights "
                             "message per sender is kept", wire="weights")
            return True
        self._early[(msg.sender, msg.step)] = msg
        return True

    def _on_rejoined(self, party: str) -> None:
        """``party`` says it came back as a new process: only the coordinator acts on it."""

    def _restarts(self, party: str) -> int:
        """How many times the transport saw ``party`` come back as a new process (0: it cannot tell)."""
        try:
            return self.switch.inner.restarts(party)
        except TransportError:
            return 0

    def _restarts_known(self, peer: str) -> int:
        """The restarts of ``peer`` (new processes of it, as the transport saw them) this party's waits for it may
        run with: those seen when the wait begins (a coordinator: those it has taken into account, :mod:`.recovery`)."""
        return self._restarts(peer)

    def gone(self, peers: Iterable[str], now: bool = False) -> Callable[[str], str | None]:
        """Why each of ``peers`` is gone, or None: it came back as a new process since :meth:`_restarts_known` (``now``:
        since this call; the state a wait for it counted on is lost), closed its connection (its goodbye: Ctrl-C, a
        failure, the end of its run), or its stream is down past the transport's reconnect window. A client's loss is
        no error of the transport (its failure is data): every wait for it asks this (:meth:`await_messages`). A peer
        the transport cannot tell about (no link to it) is never gone."""
        if self.switch is None:  # (a plain plan's party: no client to lose)
            return lambda p: None
        inner = self.switch.inner
        known = {p: self._restarts(p) if now else self._restarts_known(p) for p in peers}
        window = getattr(inner, "reconnect_timeout", 0.0)

        def why(p: str) -> str | None:
            if self._restarts(p) > known.get(p, 0):
                return f"{p} came back as a new process: what was under way with it is lost"
            try:
                since = inner.broken_since(p)
                if since is not None and inner.left(p):
                    return f"{p} closed its connection"
            except TransportError:
                return None
            if since is not None and time.monotonic() - since > window:
                return f"connection to {p!r} lost" + f", not back within {window:g} s" * bool(window)
            return None
        return why

    def await_messages(self, senders: list[str], timeout: float, take: Callable[[Message, Reply | None, int], Any],
                       until: Callable[[], bool] | None = None,
                       gone: Callable[[str], str | None] | None = None) -> dict[str, Any]:
        """What ``take(message, reply, request)`` keeps (not None) of one message from each of
        ``senders``, as far as it comes within ``timeout`` s or until ``until()`` holds (replies decoded,
        a malformed one refused). A sender that is gone (``gone``, by default :meth:`gone` of the senders as of
        now) is not waited for any longer: looked at whenever :data:`~splitlearn.wire.transport.switch.WATCH_S` s
        pass without a message. Commands, early weights (:attr:`early_weights`) and rejoin notices that come
        meanwhile are kept or acted on."""
        want, got = set(senders), {}
        gone = gone or self.gone(want, now=True)
        deadline = time.monotonic() + timeout
        while want - set(got) and not (until is not None and until()):
            look = min(deadline, time.monotonic() + WATCH_S)
            try:
                msg = self.link.recv(deadline=look)
            except TransportTimeout:  # (only with nothing left to read: what a sender said before it went is taken)
                if not look <= time.monotonic() < deadline:  # the end, or a transport that did not wait: nothing comes
                    break
                want -= {s for s in want - set(got) if gone(s)}
                continue
            answer, request = None, 0
            if msg.kind == Kind.ACK:
                try:
                    request, answer = read_reply(msg, self.limits)
                except WireError as e:
                    self.link.refuse(msg.sender, str(e))
                    continue
            kept = take(msg, answer, request) if msg.sender in want else None
            if kept is not None:
                got[msg.sender] = kept
            elif msg.kind == Kind.COMMAND and msg.sender == self.coordinator != self.name:
                self._pending.append(msg)
            elif msg.kind == Kind.WEIGHTS and self._hold_weights(msg):
                pass
            elif isinstance(answer, Rejoined):
                self._on_rejoined(msg.sender)
            else:
                log.debug("%s: ignoring a late %s from %s", self.name, msg.kind.name, quote(msg.sender))
        return got

    def replies(self, senders: list[str], timeout: float, request: int | dict[str, int],
                *of: type[Reply], gone: Callable[[str], str | None] | None = None) -> dict[str, Reply]:
        """The replies to ``request`` (one id, or one per sender) of the types ``of`` that come in time (``gone``: see
        :meth:`await_messages`)."""
        def take(msg: Message, answer: Reply | None, rid: int) -> Reply | None:
            expected = request if isinstance(request, int) else request[msg.sender]
            return answer if isinstance(answer, of) and rid == expected else None

        return self.await_messages(senders, timeout, take, gone=gone)

    def take_weights(self, senders: list[str], request: int, timeout: float,
                     gone: Callable[[str], str | None] | None = None) -> dict[str, Message]:
        """The weights answering ``request`` from each sender that sends them in time (taken from
        :attr:`early_weights` first; the senders' early weights for other requests are dropped; ``gone``: see
        :meth:`await_messages`)."""
        got = {s: self._early.pop((s, request)) for s in senders if (s, request) in self._early}
        for key in [k for k in self._early if k[0] in senders]:  # another request's: stale, one request at a time
            del self._early[key]
        ans = self.await_messages([s for s in senders if s not in got], timeout,
                                  lambda msg, _, __: msg if msg.kind == Kind.WEIGHTS and msg.step == request else None,
                                  gone=gone)
        return {**got, **ans}

    @property
    def early_weights(self) -> list[tuple[str, int]]:
        """(sender, request) of each weights message kept because it came before the command naming
        it (at most :data:`MAX_EARLY_WEIGHTS` per sender), in the order they came."""
        return list(self._early)

    # -- weights ---------------------------------------------------------------------------
    def client_state(self) -> dict[str, torch.Tensor]:
        return state_of(self.setup.modules)

    def send_weights(self, to: str, request: int) -> None:
        state = self.global_state if self.is_federation and not self.is_client else self.client_state()
        self.link.send(weights(self.name, to, state, request))

    def load_weights(self, sender: str, request: int, ready: bool = False, lend: bool = False) -> None:
        """Client: take the weights answering ``request`` from ``sender`` (checked against ours), then
        say so. ``ready``: first tell the coordinator we are waiting (so they cannot overtake us);
        ``lend``: keep them for the next evaluation turn only (our own weights stay as they are)."""
        if ready:
            self._reply(request, Ready())
        gone = self.gone([sender], now=True)
        msg = self.take_weights([sender], request, self.timeout, gone=gone).get(sender)
        if msg is None:
            why = gone(sender)
            log.warning("%s: no weights from %s (%s); training on with our own", self.name, sender,
                        why or f"not within {self.timeout:g} s")
            self._reply(request, WeightsMissing(sender, (why or "")[:300]))
            return
        try:
            state = read_weights(msg, self.client_state())
            if lend:
                self.lent = state
            else:
                load_state(self.setup.modules, state)
        except WireError as e:
            self.link.refuse(sender, str(e), wire="weights")
            self._reply(request, WeightsRefused(sender, str(e)[:300]))
            return
        self._reply(request, WeightsLoaded(sender))

    def collect(self, clients: list[str], samples: list[int], request: int) -> tuple[list[str], dict[str, str]]:
        """Federation: receive the clients' weights, average them (by samples); whose were averaged,
        and why each refused client's were refused. Under ``secure_aggregation`` the weights come
        masked and only their average is recovered (:func:`~splitlearn.clients.secure.secure_collect`)."""
        if self.spec.secure_aggregation:  # nothing of one client's in the clear: the average alone is kept
            used, refused = secure_collect(self, clients, samples, request)
            if used and self.recording:
                self.last_round = FederationRound(self.global_state)
            return used, refused
        got = self.take_weights(clients, request, self.timeout)
        states, shares, used, refused = [], [], [], {}
        for c, n in zip(clients, samples):
            if c in got:
                try:
                    states.append(read_weights(got[c], self.global_state))
                    shares.append(n)
                    used.append(c)
                except WireError as e:
                    self.link.refuse(c, str(e), wire="weights")
                    refused[c] = str(e)[:300]
        if states:
            self.global_state = average(states, shares)
            if self.recording:  # for the audit: each client's weights as received, this round's only
                kept = list(zip(used, states, shares))[:RECORDED_CLIENTS]  # a bounded record: the first clients
                self.last_round = FederationRound(self.global_state, {c: st for c, st, _ in kept}, {c: n for c, _, n in kept})
        return used, refused

    def merge_copies(self, clients: list[str], samples: list[int]) -> None:
        """SplitFed v1: this round's server copies, averaged into the shared model (by samples)."""
        pairs = [(state_of(self.copies[c][0]), n) for c, n in zip(clients, samples) if c in self.copies]
        if pairs:
            load_state(self.setup.modules, average([s for s, _ in pairs], [n for _, n in pairs]))
        self.copies.clear()

    @contextmanager
    def _metering(self, evaluation: bool) -> Iterator[None]:
        """Count the traffic inside as evaluation traffic (or, by default, as training traffic)."""
        if not evaluation:
            yield
            return
        train, self.link.meter = self.link.meter, self.eval_meter
        try:
            yield
        finally:
            self.link.meter = train

    # -- report --------------------------------------------------------------------------------
    def open_tracker(self) -> None:
        """Open the tracker when this party computes a loss, as its run begins (never at construction: a
        launcher builds every party before it runs any, and one that fails to build would leave it open)."""
        if self.tracking is not None and self.in_turns and any(n.party == self.plays for n in self.graph.losses()):
            from ..run.tracking import StepNumbers, open_tracker

            tracker = open_tracker(self.tracking, self.plan, self.name)
            self.tracker = StepNumbers(tracker) if self.strategy.coordinated else tracker  # turns number steps anew

    def close_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def took_part(self, session: PartyReport) -> None:
        """Count a session this participant ran (a turn, or a peer's one round): the training its
        noise spent."""
        self.train_work["samples"] += session.meter.get("train_samples", 0)
        self.train_work["steps"] += session.meter.get("train_steps", 0)

    def report(self) -> PartyReport:
        """What this participant did, for every plan: its accounting, refusals, privacy spent, what it
        recorded, its model and data; a coordinated schedule's turns (``records``, pooled by the
        heads) and skips; the trivial schedule's one session (``plan_session``: the per-epoch
        metrics, timings, predictions and bounds of a plain plan's party, which meters evaluation
        traffic with its training as every plain plan always has)."""
        self.close_tracker()
        self.records = self.pool.close(self.records)
        self.pool.settle()
        session = self.plan_session or PartyReport(self.name)
        privacy = {}
        if self.in_turns and self.train_work["steps"]:
            privacy = defenses.privacy_spent(self.graph, self.plays, self.train_work["samples"],
                                             self.train_work["steps"])
        observed = {}
        for client, rec in (self.recorders or {}).items():
            observed.update({(f"{client}/{k}" if client else k): v for k, v in rec.tensors().items()})
        if self.last_round is not None:  # the federation: what it averaged in its last round
            observed.update(federation_record(self.last_round))
        modules, per_client_modules = self.setup.modules if self.setup else {}, {}
        if not self.strategy.one_model and self.copies:  # each client's copy is its model; the shared one never trained
            modules, per_client_modules = {}, {c: mods for c, (mods, _) in self.copies.items()}
        return PartyReport(self.name, metrics=session.metrics, plays=self.plays,
                           meter={**self.link.meter.summary(), **session.meter},
                           eval_meter=self.eval_meter.summary() if self.strategy.coordinated else {},
                           refused=self.refused + self.link.refused, privacy=privacy, records=self.records,
                           skipped=self.skipped, modules=modules, per_client=per_client_modules, observed=observed,
                           predictions=session.predictions, data=self.setup.data_report() if self.setup else {},
                           preprocess=self.setup.preprocess if self.setup else None,
                           refused_jumps=session.refused_jumps, scores=session.scores, stopping=session.stopping)


def _classify(data: bytes | Message) -> str:
    """Commands, replies and weights are the schedule's; everything else belongs to a turn (bytes, or in one
    process a message handed over whole)."""
    return "control" if kind_of(data) in (None, Kind.COMMAND, Kind.ACK, Kind.WEIGHTS) else "session"


def _segments_of(graph: Any, party: str) -> list[str]:
    return [n for n in graph.local_order(party) if graph.nodes[n].kind == "segment"]


def _build(plan: Plan, segment: str) -> torch.nn.Module:
    from ..models import build_segment

    return build_segment(plan, segment)
