"""Horizontal clients over any transport: a coordinator walks the schedule, everyone else follows.

The physical parties of a plan with ``[clients]``:

* **clients** ``T-1`` ... ``T-N`` play the plan's template party ``T``, one turn at a time, each
  with its own weights, optimizer and share of the rows;
* **fixed parties** (the plan's other parties, e.g. the server) take part in every turn;
* the **coordinator** (the federation role if it is a plan party, else the first fixed party,
  else the federation role) walks :func:`splitlearn.schedule.rounds` and tells each participant
  what to do next; it waits for an answer at most ``clients.timeout`` seconds, and a client
  that does not answer is skipped for that turn and reported (``skipped`` in the result): it
  may answer again later and take its next turns;
* the **federation** keeps the averaged client weights (sample-weighted FedAvg); it is the
  coordinator unless ``clients.federation`` names a role of its own.

A turn is the ordinary engine session (:func:`splitlearn.runner.run_party`) between the fixed
parties and one client, over a :class:`~splitlearn.transport.switch.Switch` view that lets
``T-k`` speak as ``T`` and keeps the turn's messages apart from the schedule's. Weights travel as ``WEIGHTS`` messages of raw tensors, checked
against the receiver's own state names, dtypes and shapes; commands are small JSON texts with
a deadline after which a late follower drops them. Every role meters what it sends and
receives (training and weight traffic apart from evaluation traffic).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .codec import WireError, check_values, get_codec
from .engine import Party, PartyError
from .graph import build_graph
from .link import Link
from .messages import Kind, Message, decode, kind_of, parse_json, quote
from .metering import Meter
from .plan import Plan, PlanError
from .results import summarize, wires_of
from .runner import PartySetup, RunError, make_optimizer, run_party, setup_party
from .schedule import Round, Turn, averaging, client_shares, rounds
from .transport import InProcessHub, TransportClosed, TransportError
from .transport.base import Transport, TransportTimeout
from .transport.switch import Switch

__all__ = ["roles", "coordinator_of", "federation_of", "plays_of", "Role", "run_clients", "merge_reports", "final_client"]

log = logging.getLogger("splitlearn.federation")
_RAW = get_codec("raw")


def federation_of(plan: Plan) -> str:
    """The party or role that averages client weights."""
    spec = plan.clients
    assert spec is not None
    if spec.federation:
        return spec.federation
    fixed = [p for p in plan.parties if p != spec.template]
    return fixed[0] if fixed else "federation"


def coordinator_of(plan: Plan) -> str:
    spec = plan.clients
    assert spec is not None
    fed = federation_of(plan)
    fixed = [p for p in plan.parties if p != spec.template]
    return fed if fed in plan.parties or not fixed else fixed[0]


def roles(plan: Plan) -> list[str]:
    """Every physical party of the plan: fixed parties, a separate federation, then the clients."""
    spec = plan.clients
    assert spec is not None
    fixed = [p for p in plan.parties if p != spec.template]
    fed = federation_of(plan)
    return fixed + ([fed] if fed not in fixed else []) + spec.names()


def plays_of(plan: Plan, name: str) -> str | None:
    """The plan party a physical party plays: the template for a client, itself for a fixed
    party, none for a federation of its own."""
    spec = plan.clients
    return spec.template if name in spec.names() else (name if name in plan.parties else None)


def ring_neighbours(plan: Plan, a: str, b: str) -> bool:
    """Clients that hand weights to each other directly (``handoff = "peer"``): k and k+1, N and 1."""
    names = plan.clients.names()
    i, j = names.index(a), names.index(b)
    return abs(i - j) == 1 or {i, j} == {0, len(names) - 1}


def connections(plan: Plan) -> list[tuple[str, str]]:
    """(dialer, listener) pairs of a horizontal plan: clients dial the fixed parties and the
    federation; with peer hand-off each client also dials its ring predecessor."""
    spec = plan.clients
    assert spec is not None
    fixed = [p for p in roles(plan) if p not in spec.names()]
    graph = build_graph(plan)
    out = []
    for i, a in enumerate(fixed):  # fixed parties among themselves, as in a plan without clients
        for b in fixed[i + 1:]:
            if b in graph.neighbours(a) or coordinator_of(plan) in (a, b):
                out.append((b, a))
    names = spec.names()
    for c in names:
        out += [(c, f) for f in fixed]
    if spec.schedule == "sequential" and spec.handoff == "peer" and len(names) > 1:
        out += [(names[k], names[k - 1]) for k in range(1, len(names))]
        if len(names) > 2:
            out.append((names[0], names[-1]))
    return out


# -- weights on the wire -----------------------------------------------------------------------

def state_of(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{seg}.{k}": v for seg, m in modules.items() for k, v in m.state_dict().items()}


def weights_message(sender: str, receiver: str, state: dict[str, torch.Tensor], step: int = 0) -> Message:
    return Message(Kind.WEIGHTS, sender, receiver, step, "weights",
                   tensors={k: _RAW.encode(v.detach()) for k, v in state.items()})


def read_weights(msg: Message, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a WEIGHTS message, checked name by name against our own state."""
    if set(msg.tensors) != set(like):
        missing, extra = sorted(set(like) - set(msg.tensors)), sorted(set(msg.tensors) - set(like))
        raise WireError(f"weights from {quote(msg.sender)} do not fit: missing {missing[:3]}, unexpected "
                        f"{[quote(k) for k in extra[:3]]}", wire="weights")
    out = {}
    for k, enc in msg.tensors.items():
        ref = like[k]
        if tuple(enc.shape) != tuple(ref.shape) or enc.dtype != str(ref.dtype).removeprefix("torch."):
            raise WireError(f"weight {k!r} from {quote(msg.sender)} is {enc.dtype}{list(enc.shape)[:8]}, expected "
                            f"{str(ref.dtype).removeprefix('torch.')}{list(ref.shape)}", wire="weights")
        out[k] = _RAW.decode(enc)
        check_values(out[k], f"weight {k!r} from {quote(msg.sender)}")  # one NaN would spread through averaging
    return out


def load_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in state_of(modules).items():
            v.copy_(state[k])


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of floating-point entries; integer entries (counters) from the first."""
    total = float(sum(weights))
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


@dataclass
class Context:
    """What every party derives alike from the plan: the graph, the clients' rows, the rounds."""

    graph: Any
    ids_hash: str
    shares: list[np.ndarray]
    rounds: list[Round]
    turns: dict[int, Turn]

    @classmethod
    def of(cls, plan: Plan, setup: PartySetup) -> "Context":
        shares = client_shares(plan, setup.splits.train, _labels(plan, setup))
        rs = rounds(plan, shares, setup.splits.test)
        return cls(setup.graph, setup.ids_hash, shares, rs, {t.index: t for r in rs for t in (*r.train, *r.evals)})


# -- one physical party ------------------------------------------------------------------------

@dataclass
class _Answer:
    ok: dict[str, Message] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _request_of(msg: Message) -> int | None:
    """The request a message answers: a WEIGHTS message's step, an ACK's ``request``."""
    if msg.kind == Kind.WEIGHTS:
        return msg.step
    try:
        r = parse_json(msg.text or "{}").get("request")
    except (WireError, AttributeError):
        return None
    return r if isinstance(r, int) else None


def _info(msg: Message) -> dict:
    try:
        out = parse_json(msg.text or "{}")
    except WireError:
        return {}
    return out if isinstance(out, dict) else {}


MAX_PENDING = 100  # commands a follower keeps while it waits for weights


class Role:
    """One physical party of a horizontal plan: what it holds and how it acts on commands.

    Every command carries a request id; the weights and the acknowledgement that answer it carry
    the same id, so an answer that comes too late is never taken for a later one.
    """

    def __init__(self, plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None, *,
                 timeout: float | None = None, fault: "Callable[[Role, dict], None] | None" = None,
                 context: "Context | None" = None):
        spec = plan.clients
        if spec is None:
            raise PlanError("the plan has no [clients] section")
        self.plan, self.spec, self.name = plan, spec, name
        self.clients = spec.names()
        self.coordinator, self.federation = coordinator_of(plan), federation_of(plan)
        if name not in roles(plan):
            raise PlanError(f"no party {name!r} in this plan", hint=f"parties are {roles(plan)[:6]} ...")
        self.plays = plays_of(plan, name)
        self.setup = setup if setup is not None or self.plays is None else setup_party(plan, self.plays)
        self.timeout = spec.timeout if timeout is None else timeout
        self.switch = Switch(transport, _classify)
        self.link = Link(self.switch.control(), Meter(name))
        self.eval_meter = Meter(name)
        self.fault = fault  # tests: called with each command before it is carried out
        ctx = context or Context.of(plan, self.setup or setup_party(plan, next(iter(plan.parties))))
        self.graph, self.ids_hash, self.rounds, self.turns = ctx.graph, ctx.ids_hash, ctx.rounds, ctx.turns
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.refused: list[str] = []
        self.global_state: dict[str, torch.Tensor] | None = None  # federation: the averaged client weights
        if name == self.federation:
            self.global_state = {k: v.clone() for k, v in state_of(
                {s: _build(plan, s) for s in _segments_of(self.graph, spec.template)}).items()}
        # fixed parties: a copy of their segments per client (splitfed_v1 for a round, independent for good)
        self.copies: dict[str, tuple[dict, torch.optim.Optimizer | None]] = {}
        self._requests = itertools.count(1)
        self._early: dict[tuple[str, int], Message] = {}  # (sender, request): weights that beat their command
        self._pending: deque[Message] = deque(maxlen=MAX_PENDING)  # follower: commands that came meanwhile

    # -- messages ---------------------------------------------------------------------------
    def _send(self, kind: Kind, to: str, text: Any = None) -> None:
        self.link.send(Message(kind, self.name, to, text=json.dumps(text) if text is not None else ""))

    def _command(self, party: str, request: int | None = None, **cmd: Any) -> int:
        """Send a command; its request id (a new one unless given)."""
        rid = next(self._requests) if request is None else request
        self._send(Kind.STEP, party, {**cmd, "request": rid, "deadline": time.time() + self.timeout})
        return rid

    def _ack(self, request: int, **info: Any) -> None:
        self._send(Kind.ACK, self.coordinator, {"request": request, **info})

    def _senders_of_weights(self) -> set[str]:
        """Who may send us weights: a client's ring neighbours, the coordinator and the federation;
        the federation's clients."""
        if self.name == self.federation:
            return set(self.clients)
        if self.plays != self.spec.template:
            return set()
        return {self.coordinator, self.federation} | {c for c in self.clients
                                                       if c != self.name and ring_neighbours(self.plan, c, self.name)}

    def _hold_weights(self, msg: Message) -> bool:
        """Keep weights that came before the command naming them (from an expected sender only;
        the oldest go beyond two per possible sender)."""
        allowed = self._senders_of_weights()
        if msg.sender not in allowed:
            return False
        self._early[(msg.sender, msg.step)] = msg
        while len(self._early) > 2 * len(allowed):
            del self._early[next(iter(self._early))]
        return True

    def _await(self, kind: Kind, senders: list[str], timeout: float,
               match: Callable[[Message], bool] | None = None) -> _Answer:
        """Messages of ``kind`` from each of ``senders`` (that ``match``); those that do not come in
        time are missing. Commands and early weights that come meanwhile are kept for later."""
        want, got = set(senders), {}
        deadline = time.monotonic() + timeout
        while want - set(got):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = self.link.recv(left)
            except TransportTimeout:
                break
            if msg.kind == kind and msg.sender in want and (match is None or match(msg)):
                got[msg.sender] = msg
            elif msg.kind == Kind.STEP and msg.sender == self.coordinator != self.name:
                self._pending.append(msg)
            elif msg.kind == Kind.WEIGHTS and self._hold_weights(msg):
                pass
            else:
                log.debug("%s: ignoring a late %s from %s", self.name, msg.kind.name, msg.sender)
        return _Answer(got, [s for s in senders if s not in got])

    def _take_weights(self, senders: list[str], request: int, timeout: float) -> dict[str, Message]:
        """The weights answering ``request`` from each sender that sends them in time."""
        got = {s: self._early.pop((s, request)) for s in senders if (s, request) in self._early}
        ans = self._await(Kind.WEIGHTS, [s for s in senders if s not in got], timeout,
                          match=lambda m: m.step == request)
        return {**got, **ans.ok}

    # -- a turn ----------------------------------------------------------------------------
    def _models(self, turn: Turn, client: str) -> tuple[dict, torch.optim.Optimizer | None]:
        sched = self.spec.schedule
        if self.plays == self.spec.template or not (sched == "independent" or
                                                    (sched == "splitfed_v1" and turn.mode == "train")):
            return self.setup.modules, self.setup.optimizer
        if client not in self.copies:  # from the shared model (v1: averaged at the end of every round)
            mods = copy.deepcopy(self.setup.modules)
            self.copies[client] = (mods, make_optimizer(self.plan, self.plays, mods))
        return self.copies[client]

    def run_turn(self, turn: Turn, client: str) -> tuple[bool, str]:
        """Take part in one turn with ``client``: (done, why not)."""
        t = self.spec.template
        fixed = {p for p in self.plan.parties if p != t}
        peers = ({client} | fixed) - {self.name} if self.plays != t else fixed
        tag = f"{self.ids_hash}/turn-{turn.index}"  # in every hello of this turn (the hello compares it)

        def keep(peer: str, data: bytes) -> bool:
            """A peer's hello for this very turn may have come before we got here; the rest is stale."""
            if peer not in peers or kind_of(data) != Kind.HELLO:
                return False
            try:
                return parse_json(decode(data).text).get("ids_hash") == tag
            except (AttributeError, WireError):
                return False

        view = self.switch.session(self.plays, {} if self.plays == t else {t: client}, keep, peers)
        link = Link(view, self.link.meter if turn.mode == "train" else self.eval_meter)
        modules, optimizer = self._models(turn, client)
        party = Party(self.graph, self.plays, link, modules, optimizer, self.setup.inputs, timeout=self.timeout)
        try:
            report = run_party(party, iter(turn.steps), ids_hash=tag)
        except (PartyError, PlanError, TransportError) as e:  # a peer that is gone or silent: failures as data
            self.refused += link.refused
            log.warning("%s: turn %d with %s failed: %s", self.name, turn.index, client, e)
            return False, str(e)
        self.refused += link.refused
        losses = {}
        for loss, h in report.metrics.items():
            key = "train_loss" if turn.mode == "train" else "test_loss"
            losses[loss] = {k: v[0] for k, v in h.items() if v}
            losses[loss].setdefault(key, None)
        self.records.append({"turn": turn.index, "round": turn.round, "epoch": turn.steps[0].epoch if turn.steps else 0,
                             "mode": turn.mode, "client": client, "rows": turn.rows, "losses": losses,
                             "train_s": report.meter.get("train_s", 0.0)})
        return True, ""

    # -- weights ---------------------------------------------------------------------------
    def _client_state(self) -> dict[str, torch.Tensor]:
        return state_of(self.setup.modules)

    def send_weights(self, to: str, request: int) -> None:
        state = self.global_state if self.name == self.federation and self.plays != self.spec.template \
            else self._client_state()
        self.link.send(weights_message(self.name, to, state, step=request))

    def load_weights(self, sender: str, request: int, ready: bool = False) -> None:
        """Client: take the weights answering ``request`` from ``sender`` (checked against ours), then
        say so. ``ready``: first tell the coordinator we are waiting (so they cannot overtake us)."""
        if ready:
            self._ack(request, ready=True)
        msg = self._take_weights([sender], request, self.timeout).get(sender)
        if msg is None:
            log.warning("%s: no weights from %s within %g s; training on with our own", self.name, sender,
                        self.timeout)
            self._ack(request, loaded=None, missing=sender)
            return
        try:
            load_state(self.setup.modules, read_weights(msg, self._client_state()))
        except WireError as e:
            self.link.refuse(sender, str(e), wire="weights")
            self._ack(request, loaded=None, refused=sender)
            return
        self._ack(request, loaded=sender)

    def collect(self, clients: list[str], samples: list[int], request: int) -> list[str]:
        """Federation: receive the clients' weights, average them (by samples); whose were averaged."""
        got = self._take_weights(clients, request, self.timeout)
        states, weights, used = [], [], []
        for c, n in zip(clients, samples):
            if c in got:
                try:
                    states.append(read_weights(got[c], self.global_state))
                    weights.append(n)
                    used.append(c)
                except WireError as e:
                    self.link.refuse(c, str(e), wire="weights")
        if states:
            self.global_state = average(states, weights)
        return used

    def merge_copies(self, clients: list[str], samples: list[int]) -> None:
        """SplitFed v1: this round's server copies, averaged into the shared model (by samples)."""
        pairs = [(state_of(self.copies[c][0]), n) for c, n in zip(clients, samples) if c in self.copies]
        if pairs:
            load_state(self.setup.modules, average([s for s, _ in pairs], [n for _, n in pairs]))
        self.copies.clear()

    # -- follower ------------------------------------------------------------------------------
    def follow(self) -> None:
        """Carry out the coordinator's commands until it says stop (clients, fixed parties, federation)."""
        while True:
            if self._pending:
                msg = self._pending.popleft()
            else:
                try:
                    msg = self.link.recv(None)
                except TransportClosed as e:
                    raise PartyError(f"{self.name}: lost the coordinator {self.coordinator!r} before it said "
                                     f"stop ({e})") from None
            if msg.kind == Kind.WEIGHTS:  # may overtake the command naming it (it came on another stream)
                if not self._hold_weights(msg):
                    self.link.refuse(msg.sender, "weights from a party that never sends us any", wire="weights")
                continue
            if msg.kind != Kind.STEP or msg.sender != self.coordinator:
                if msg.kind == Kind.ERROR:
                    log.info("%s: %s", self.name, msg.text)
                continue
            cmd = _info(msg)
            do, request = cmd.get("do"), cmd.get("request")
            if not isinstance(do, str) or not isinstance(request, int):
                self.link.refuse(msg.sender, "a command that is not JSON with 'do' and 'request'")
                continue
            if self.fault is not None:
                self.fault(self, cmd)
            if do == "stop":
                return
            try:
                if time.time() > float(cmd.get("deadline", 0)):
                    log.info("%s: dropping a command that is past its deadline: %s", self.name, quote(do))
                    continue
                self._carry_out(do, request, cmd)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                self.link.refuse(msg.sender, f"a malformed {quote(do)} command ({quote(str(e))})")

    def _carry_out(self, do: str, request: int, cmd: dict) -> None:
        is_client, is_fed = self.plays == self.spec.template, self.name == self.federation
        if do == "turn" and int(cmd["turn"]) in self.turns and self.plays is not None:
            ok, why = self.run_turn(self.turns[int(cmd["turn"])], str(cmd["client"]))
            if self.coordinator not in self.plan.parties:  # it takes no part in turns: tell it we are done
                self._ack(request, ok=ok, why=why)
        elif do == "send" and (is_client or is_fed):
            self.send_weights(str(cmd["to"]), request)
        elif do == "load" and is_client:
            with self._metering(bool(cmd.get("evaluation"))):
                self.load_weights(str(cmd["from"]), request, ready=bool(cmd.get("ready")))
        elif do == "collect" and is_fed:
            got = self.collect([str(c) for c in cmd["clients"]], [int(n) for n in cmd["samples"]], request)
            self._ack(request, averaged=got)
        elif do == "download" and is_fed:
            with self._metering(bool(cmd.get("evaluation"))):
                for c, r in zip(cmd["clients"], cmd["requests"]):
                    self.send_weights(str(c), int(r))
        elif do == "merge_copies" and self.setup is not None and not is_client:
            self.merge_copies([str(c) for c in cmd["clients"]], [int(n) for n in cmd["samples"]])
        else:
            self.link.refuse(self.coordinator, f"a command {quote(do)} that {self.name} does not carry out")

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

    # -- coordinator ---------------------------------------------------------------------------
    def coordinate(self, progress: Callable[[Round], None] | None = None) -> None:
        """Walk every round; skip clients that do not answer; stop everyone at the end."""
        fixed = [p for p in self.plan.parties if p != self.spec.template and p != self.name]
        others = fixed + ([self.federation] if self.federation not in (self.name, *fixed) else [])
        holder: str | None = None  # sequential: the client with the latest weights
        try:
            for rnd in self.rounds:
                names = [self.clients[k] for k in rnd.clients]
                if rnd.average:
                    names = self._download(rnd, names)
                done = []
                for turn in rnd.train:
                    c = self.clients[turn.client]
                    if c not in names:
                        continue
                    if self.spec.schedule == "sequential" and holder not in (None, c) \
                            and not self._handoff(rnd, holder, c):
                        continue
                    if self._turn(rnd, turn, c, fixed):
                        done.append(c)
                        holder = c
                if rnd.average and done:
                    self._average(rnd, done)
                    if self.spec.schedule == "splitfed_v1":
                        samples = [rnd.samples[self.clients.index(c)] for c in done]
                        if self.setup is not None:
                            self.merge_copies(done, samples)
                        for p in fixed:
                            self._command(p, do="merge_copies", clients=done, samples=samples)
                for turn in rnd.evals:
                    if turn.client is not None:
                        c = self.clients[turn.client]
                    elif rnd.average:  # a client that trained this round, given the averaged weights
                        c = next((c for c in done if self._download(rnd, [c], evaluation=True)), None)
                    else:
                        c = holder
                    if c is not None:
                        self._turn(rnd, turn, c, fixed)
                if progress is not None:
                    progress(rnd)
        finally:
            for p in [*others, *self.clients]:
                try:
                    self._command(p, do="stop")
                except TransportError:
                    pass

    def _skip(self, rnd: Round, party: str, what: str, why: str) -> None:
        self.skipped.append({"round": rnd.index, "client": party, "during": what, "reason": why})
        log.warning("%s: skipped %s in round %d (%s): %s", self.name, party, rnd.index, what, why)

    def _turn(self, rnd: Round, turn: Turn, client: str, fixed: list[str]) -> bool:
        rid = 0
        for p in [client, *fixed]:
            try:
                r = self._command(p, do="turn", turn=turn.index, client=client)
                rid = r if p == client else rid
            except TransportError as e:
                self._skip(rnd, client, f"{turn.mode} turn", f"cannot reach {p}: {e}")
                return False
        if self.plays is None:  # a plan of one party (FedAvg): the client trains alone and says when it is done
            limit = self.timeout * max(1, len(turn.steps))
            ans = self._await(Kind.ACK, [client], limit, match=lambda m: _request_of(m) == rid)
            if client in ans.ok and _info(ans.ok[client]).get("ok"):
                return True
            self._skip(rnd, client, f"{turn.mode} turn", f"no answer within {limit:g} s" if client not in ans.ok
                       else f"its turn failed: {_info(ans.ok[client]).get('why')}")
            return False
        ok, why = self.run_turn(turn, client)
        if not ok:
            self._skip(rnd, client, f"{turn.mode} turn", why)
        return ok

    def _handoff(self, rnd: Round, holder: str, client: str) -> bool:
        """Sequential: the latest weights go from ``holder`` to ``client`` (peer-to-peer between ring
        neighbours, else through this coordinator). False if ``client`` does not answer (its turn is
        skipped); if only the holder fails, the client trains on from its own weights (reported)."""
        peer = self.spec.handoff == "peer" and ring_neighbours(self.plan, holder, client)
        relayed = None
        if not peer:
            rid = next(self._requests)
            try:
                self._command(holder, request=rid, do="send", to=self.name)
                relayed = self._take_weights([holder], rid, self.timeout).get(holder)
            except TransportError:
                pass
            if relayed is None:
                self._skip(rnd, holder, "hand-off", f"its weights did not come within {self.timeout:g} s; "
                                                    f"{client} trains on from its own")
                return True
        rid = next(self._requests)
        try:
            self._command(client, request=rid, do="load", **{"from": holder if peer else self.name})
            if relayed is not None:
                self.link.send(Message(Kind.WEIGHTS, self.name, client, rid, "weights", relayed.tensors))
        except TransportError as e:
            self._skip(rnd, client, "hand-off", f"cannot reach it ({e}); its turn is skipped")
            return False
        if peer:
            try:
                self._command(holder, request=rid, do="send", to=client)
            except TransportError as e:  # the client will say that nothing came
                log.warning("%s: hand-off from %s: %s", self.name, holder, e)
        ans = self._await(Kind.ACK, [client], 2 * self.timeout, match=lambda m: _request_of(m) == rid)
        if client not in ans.ok:  # the client itself waits up to one timeout for the weights
            self._skip(rnd, client, "hand-off", f"no answer within {2 * self.timeout:g} s; its turn is skipped")
            return False
        if _info(ans.ok[client]).get("loaded") is None:
            self._skip(rnd, holder, "hand-off", f"its weights did not reach {client}; {client} trains on "
                                                "from its own")
        return True

    def _download(self, rnd: Round, names: list[str], evaluation: bool = False) -> list[str]:
        """Averaging schedules: the clients receive the federation's weights (at the start of a
        round, or before evaluating the averaged model: metered as evaluation traffic); who did."""
        apart = self.federation != self.name
        requests: dict[str, int] = {}
        for c in names:
            try:
                requests[c] = self._command(c, do="load", evaluation=evaluation, ready=evaluation and apart,
                                            **{"from": self.federation})
            except TransportError as e:
                self._skip(rnd, c, "download", f"cannot reach it: {e}")
        if evaluation and apart:  # the weights may not overtake the command: it decides the meter
            ready = self._await(Kind.ACK, list(requests), self.timeout,
                                match=lambda m: _request_of(m) == requests[m.sender] and _info(m).get("ready"))
            requests = {c: r for c, r in requests.items() if c in ready.ok}
        try:
            if apart:
                self._command(self.federation, do="download", clients=list(requests),
                              requests=list(requests.values()), evaluation=evaluation)
            else:
                with self._metering(evaluation):
                    for c, r in requests.items():
                        self.send_weights(c, r)
        except TransportError as e:
            log.warning("%s: download: %s", self.name, e)
        ans = self._await(Kind.ACK, list(requests), self.timeout,
                          match=lambda m: _request_of(m) == requests[m.sender] and "loaded" in _info(m))
        what = "evaluation download" if evaluation else "download"
        loaded = []
        for c in names:
            if c not in ans.ok:
                if c in requests:
                    self._skip(rnd, c, what, f"no answer within {self.timeout:g} s")
            elif _info(ans.ok[c]).get("loaded") != self.federation:
                self._skip(rnd, c, what, f"the federation's weights did not reach it ({_info(ans.ok[c])})")
            else:
                loaded.append(c)
        return loaded

    def _average(self, rnd: Round, done: list[str]) -> list[str]:
        """The clients that trained send their weights to the federation, which averages them."""
        rid = next(self._requests)
        sending = []
        for c in done:
            try:
                self._command(c, request=rid, do="send", to=self.federation)
                sending.append(c)
            except TransportError as e:
                self._skip(rnd, c, "averaging", f"cannot reach it: {e}")
        samples = [rnd.samples[self.clients.index(c)] for c in sending]
        if self.federation == self.name:
            got = self.collect(sending, samples, rid)
        else:
            try:
                self._command(self.federation, request=rid, do="collect", clients=sending, samples=samples)
            except TransportError as e:
                self._skip(rnd, self.federation, "averaging", f"cannot reach the federation: {e}")
                return []
            ans = self._await(Kind.ACK, [self.federation], 2 * self.timeout, match=lambda m: _request_of(m) == rid)
            if self.federation not in ans.ok:
                self._skip(rnd, self.federation, "averaging", f"the federation did not answer within "
                                                              f"{2 * self.timeout:g} s")
                return []
            got = list(_info(ans.ok[self.federation]).get("averaged") or [])
        for c in sending:
            if c not in got:
                self._skip(rnd, c, "averaging", f"its weights did not come within {self.timeout:g} s")
        return got

    # -- report --------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {"name": self.name, "plays": self.plays, "train": self.link.meter.summary(),
                "eval": self.eval_meter.summary(), "records": self.records, "skipped": self.skipped,
                "refused": self.refused + self.link.refused}


def _classify(data: bytes) -> str:
    """Commands, acknowledgements and weights are the schedule's; everything else belongs to a turn."""
    return "control" if kind_of(data) in (None, Kind.STEP, Kind.ACK, Kind.WEIGHTS) else "session"


def _segments_of(graph, party: str) -> list[str]:
    return [n for n in graph.local_order(party) if graph.nodes[n].kind == "segment"]


def _build(plan: Plan, segment: str) -> nn.Module:
    from .models import build_segment

    return build_segment(plan, segment)


def _labels(plan: Plan, setup: PartySetup) -> np.ndarray | None:
    """Class labels of the training rows for a Dirichlet partition: the template's field that a
    classification loss takes as its target (None for an iid partition: no labels needed)."""
    from .runner import party_table

    spec = plan.clients
    if spec.partition.kind != "dirichlet":
        return None
    holds = plan.parties[spec.template].holds
    fields = [holds[t.split(".", 1)[1]].field for t in (loss.target for loss in plan.losses.values()
                                                        if loss.kind in ("cross_entropy", "bce"))
              if t.split(".", 1)[0] == spec.template and t.split(".", 1)[1] in holds]
    if not fields:
        return None
    table = party_table(plan, spec.template).align(setup.splits.ids)
    y = np.asarray(table.fields.get(fields[0]))
    return y.reshape(len(y), -1)[:, 0][setup.splits.train] if y.dtype.kind in "iub" else None


# -- in-process ----------------------------------------------------------------------------------

def run_clients(plan: Plan, *, timeout: float | None = None, progress: Callable[[Round], None] | None = None,
                faults: "dict[str, Callable[[Role, dict], None]] | None" = None) -> dict[str, dict]:
    """Every physical party of a horizontal plan in a thread of this process; their reports."""
    names = roles(plan)
    hub = InProcessHub(names)
    cache: dict = {}
    template = plan.clients.template
    first = setup_party(plan, template, cache)
    fixed = {p: setup_party(plan, p, cache) for p in plan.parties if p != template}
    made: dict[str, Role] = {}
    ctx = Context.of(plan, first)
    for n in names:
        if n in plan.clients.names():
            mods = {s: _build(plan, s) for s in first.modules}
            s = PartySetup(plan, first.graph, template, mods, make_optimizer(plan, template, mods), first.inputs,
                           first.splits)
        else:
            s = fixed.get(n)
        made[n] = Role(plan, n, hub.transport(n), s, timeout=timeout, fault=(faults or {}).get(n), context=ctx)
    coord = coordinator_of(plan)
    errors: dict[str, str] = {}

    def work(n: str) -> None:
        try:
            made[n].coordinate(progress) if n == coord else made[n].follow()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[n] = f"{type(e).__name__}: {e}"
            if n == coord:
                hub.close()

    threads = [threading.Thread(target=work, args=(n,), name=f"role-{n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    threads[names.index(coord)].join()
    # the others end on their own once they have finished their last turn and read "stop";
    # a follower that is still silent after one timeout is stopped by closing the hub
    deadline = time.monotonic() + made[coord].timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    hub.close()
    for t in threads:
        t.join(timeout=5)
    if coord in errors:
        raise RunError({coord: errors[coord]})
    return {n: {**r.report(), "modules": r.setup.modules if r.setup else {}} for n, r in made.items()}


def final_client(plan: Plan, reports: dict[str, dict]) -> str | None:
    """The client whose weights were evaluated last: the run's model (sequential: the last holder;
    averaging schedules: the averaged weights). None for independent: every client has its own."""
    evals = [r for rep in reports.values() for r in rep["records"] if r["mode"] == "eval"]
    if not evals or plan.clients.schedule == "independent":
        return None
    return max(evals, key=lambda r: r["turn"])["client"]


def merge_reports(plan: Plan, reports: dict[str, dict]) -> dict[str, Any]:
    """The result of a horizontal run: metrics per epoch, per-party and per-client accounting."""
    spec = plan.clients
    graph = build_graph(plan)
    series: dict[str, dict[int, dict[str, list]]] = {}  # loss -> epoch -> (value, rows) pairs
    seen: set[tuple] = set()
    for rep in reports.values():
        for r in rep["records"]:
            for loss, v in r["losses"].items():
                if (r["turn"], loss) in seen:
                    continue
                seen.add((r["turn"], loss))
                e = series.setdefault(loss, {}).setdefault(r["epoch"], {})
                for name in ("train_loss", "test_loss", "test_accuracy"):
                    if (r["mode"] == "train") == (name == "train_loss") and v.get(name) is not None:
                        e.setdefault(name, []).append((v[name], r["rows"]))

    def means(per_epoch: dict[int, dict[str, list]], name: str) -> list[float]:  # row-weighted, per epoch
        pairs = [per_epoch[e][name] for e in sorted(per_epoch) if per_epoch[e].get(name)]
        return [sum(x * w for x, w in p) / sum(w for _, w in p) for p in pairs]

    tasks = {loss: {name: means(per_epoch, name) for name in ("train_loss", "test_loss", "test_accuracy")}
             for loss, per_epoch in series.items()}
    metrics = summarize(plan, graph, tasks)
    parties = {}
    for n, rep in reports.items():
        tr, ev = rep["train"], rep["eval"]
        parties[n] = {"plays": rep["plays"], "bytes_sent": tr["bytes_sent"], "bytes_received": tr["bytes_received"],
                      "flops": tr["flops"], "flops_forward": tr["flops_forward"], "flops_backward": tr["flops_backward"],
                      "compute_s": tr["compute_s"], "wait_s": tr["wait_s"], "sent": tr["sent"], "received": tr["received"],
                      "eval": {k: ev[k] for k in ("bytes_sent", "bytes_received", "flops")},
                      "refused": rep["refused"][:20]}
    clients = [parties[c] for c in spec.names() if c in parties]

    def per_client(key: str) -> dict[str, float]:
        vals = [c["bytes_sent"] + c["bytes_received"] if key == "bytes" else c[key] for c in clients]
        return {"mean": float(np.mean(vals)), "max": float(np.max(vals)), "min": float(np.min(vals))}

    coord = coordinator_of(plan)
    return {
        "plan": plan.name, "epochs": plan.train.epochs, "seed": plan.train.seed,
        "schedule": {"kind": spec.schedule, "clients": spec.count, "partition": spec.partition.model_dump(),
                     **({"handoff": spec.handoff} if spec.schedule == "sequential" else {}),
                     **({"federation": federation_of(plan), "local_epochs": spec.local_epochs,
                         "local_steps": spec.local_steps, "fraction": spec.fraction} if averaging(spec) else {}),
                     "coordinator": coord},
        "metrics": metrics,
        "wires": wires_of(graph),
        "per_client": {"flops": per_client("flops"), "bytes": per_client("bytes")},
        "skipped": reports[coord]["skipped"],
        "final_client": final_client(plan, reports),
        "parties": parties,
    }
