"""Horizontal clients over any transport: a coordinator walks the schedule, everyone else follows.

The physical parties of a plan with ``[clients]``:

* **clients** ``T-1`` ... ``T-N`` play the plan's template party ``T``, one turn at a time, each
  with its own weights, optimizer and share of the rows;
* **fixed parties** (the plan's other parties, e.g. the server) take part in every turn;
* the **coordinator** (the federation role if it is a plan party, else the first fixed party,
  else the federation role) walks the rounds of the plan's strategy
  (:mod:`splitlearn.clients.strategies`) and tells each participant what to do next; it waits
  for an answer at most ``clients.timeout`` seconds, and a client that does not answer is
  skipped for that turn and reported (``skipped`` in the result): it may answer again later;
* the **federation** keeps the averaged client weights (sample-weighted FedAvg); it is the
  coordinator unless ``clients.federation`` names a role of its own.

A turn is the ordinary session (:func:`splitlearn.run.session.run_party`) between the fixed
parties and one client, over a :class:`~splitlearn.wire.transport.switch.Switch` view that lets
``T-k`` speak as ``T`` and keeps the turn's messages apart from the schedule's. Commands,
acknowledgements and weights are built and read in :mod:`splitlearn.wire.messages`; a command
carries a deadline after which a late follower drops it. Every role meters what it sends and
receives (training and weight traffic apart from evaluation traffic).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections import deque
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..core.engine import Party, PartyError
from ..core.randomness import PartyRandom, party_seed
from ..core.graph import build_graph
from ..core.plan import Plan, PlanError, plan_hash
from ..run import checkpoint as ck
from ..run.observe import Recorder
from ..core import losses
from ..privacy import defenses
from ..run.session import PartyReport, Progress, run_party
from ..run.setup import PartySetup, make_optimizer, setup_party
from ..wire.codec import WireError
from ..wire import messages as m
from ..wire.link import Link
from ..wire.messages import Kind, Message, quote
from ..wire.metering import Meter
from ..wire.transport import TransportClosed, TransportError
from ..wire.transport.base import Transport, TransportTimeout
from ..wire.transport.switch import Switch
from .layout import coordinator_of, federation_of, per_client, plays_of, roles
from .schedule import Round, Turn, client_shares, rounds
from .strategies import strategy_of

__all__ = ["Coordinator", "Follower", "make_role", "Context", "schema_difference", "pooled_metrics"]

log = logging.getLogger("splitlearn.clients.roles")


# -- weights -----------------------------------------------------------------------------------

def state_of(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{seg}.{k}": v for seg, mod in modules.items() for k, v in mod.state_dict().items()}


def load_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in state_of(modules).items():
            v.copy_(state[k])


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of floating-point entries; integer entries (counters) from the first (on the CPU)."""
    total = float(sum(weights))
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].cpu().double() * (w / total) for s, w in zip(states, weights)).to(v.dtype)
        else:
            out[k] = v.cpu().clone()
    return out


@dataclass
class Context:
    """What every party derives alike from the plan: the graph, the clients' rows, the rounds."""

    graph: Any
    ids_hash: str
    shares: list[np.ndarray]
    rounds: list[Round]
    turns: dict[int, Turn]

    tests: list[np.ndarray] | None = None  # per-client data: each client's own test rows

    @classmethod
    def of(cls, plan: Plan, setup: PartySetup) -> "Context":
        shares = client_shares(plan, setup.splits.train, _labels(plan, setup))
        rs = rounds(plan, shares, setup.splits.test)
        return cls(setup.graph, setup.ids_hash, shares, rs, {t.index: t for r in rs for t in (*r.train, *r.evals)})

    @classmethod
    def of_counts(cls, plan: Plan, train: list[int], test: list[int], me: int | None = None,
                  setup: PartySetup | None = None) -> "Context":
        """Each client reads its own file: its rows are its own (the client ``me`` knows their
        positions; every other party only how many there are, from the census)."""
        shares = [np.arange(n, dtype=np.int64) for n in train]
        tests = [np.arange(n, dtype=np.int64) for n in test]
        if me is not None and setup is not None:
            shares[me], tests[me] = setup.splits.train, setup.splits.test
        sites = [k for k, n in enumerate(test) if n > 0]  # every evaluation scores each of them
        rs = rounds(plan, shares, tests[0] if tests else np.zeros(0, dtype=np.int64), sites)
        return cls(build_graph(plan), "", shares, rs, {t.index: t for r in rs for t in (*r.train, *r.evals)}, tests)

    def steps_of(self, plan: Plan, turn: Turn, client: int) -> tuple:
        """A turn's steps; with per-client data an evaluation runs on its site's own test rows."""
        if self.tests is None or turn.mode != "eval":
            return turn.steps
        from .schedule import eval_steps

        site = client if turn.site is None else turn.site
        return eval_steps(plan, self.tests[site], turn.steps[0].epoch if turn.steps else 0)


Scores = tuple[np.ndarray, np.ndarray, float, int]  # head outputs (probabilities), targets, loss sum, rows


def pooled_metrics(kind: str, parts: list[Scores]) -> dict[str, Any]:
    """Test metrics over the union of the rows of ``parts`` (several clients' test rows), computed
    on all the rows together (never a mean of per-client figures): the test loss, the rows, those
    of :mod:`splitlearn.core.metrics` (classification, or regression) and their 95 % bootstrap
    intervals (``ci95``)."""
    from ..core.metrics import bootstrap_ci, classification_metrics, curves, regression_metrics

    rows = sum(n for *_, n in parts)
    if not rows:
        return {}
    out: dict[str, Any] = {"test_loss": sum(s for _, _, s, _ in parts) / rows, "test_rows": rows}
    outputs = np.concatenate([o for o, *_ in parts])
    targets = np.concatenate([t for _, t, *_ in parts])
    lk = losses.get(kind)
    if lk.probabilities is None and lk.classification:  # no probabilities: accuracy only
        out["test_accuracy"] = float((outputs.reshape(-1) == targets.reshape(-1)).mean())
        return out
    classification = lk.probabilities is not None
    found = (classification_metrics if classification else regression_metrics)(outputs, targets)
    out.update({f"test_{k}": v for k, v in found.items()})
    out["ci95"] = {f"test_{k}": v for k, v in bootstrap_ci(outputs, targets, classification=classification).items()}
    out["curves"] = curves(outputs, targets, classification=classification)
    return out


class _Scoring(Party):
    """A turn's party that keeps its heads' outputs of evaluation steps, with the targets and the
    loss, so the run's test metrics can be pooled over every client's test rows."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.scored: dict[str, list[Scores]] = {}

    def step(self, step: int, rows: torch.Tensor, mode: Any) -> Any:
        out = super().step(step, rows, mode)
        if mode == "eval":
            for k, pred in out.predictions.items():
                if k in out.targets and k in out.losses:
                    kind = losses.get(self.graph.plan.losses[k].kind)
                    pred = pred.detach().float().cpu()
                    probs = kind.probabilities(pred) if kind.probabilities is not None else kind.decide(pred)
                    self.scored.setdefault(k, []).append((probs.numpy(), out.targets[k].detach().cpu().numpy(),
                                                          out.losses[k] * len(rows), len(rows)))
        return out


@dataclass
class _Answer:
    ok: dict[str, Message] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


MAX_PENDING = 100  # commands a follower keeps while it waits for weights
MAX_GOING_BACK = 20  # times a run may go back to a checkpoint (a party that fails every time ends it)
MAX_EARLY_WEIGHTS = 1  # weights messages kept per sender before the command naming them; later ones are refused
POLL_S = 0.5  # while waiting for a party to come back, how often its stream's state is looked at again


# -- one physical party ------------------------------------------------------------------------

class Role:
    """What every physical party of a horizontal plan does: take part in turns, send and load
    weights, answer the coordinator. :class:`Coordinator` walks the schedule; :class:`Follower`
    carries out its commands. ``record``: keep what this party receives, per client, for the audit.
    """

    def __init__(self, plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None, *,
                 timeout: float | None = None, step_timeout: float | None = None,
                 fault: "Callable[[Role, dict], None] | None" = None, context: Context | None = None,
                 record: bool = False, limits: m.Limits | None = None, tracking: Any = None,
                 out: Path | None = None, resume: bool = False, returns: float = 0.0):
        spec = plan.clients
        if spec is None:
            raise PlanError("the plan has no [clients] section")
        self.plan, self.spec, self.name = plan, spec, name
        self.strategy = strategy_of(spec)
        self.clients = spec.names()
        self.coordinator, self.federation = coordinator_of(plan), federation_of(plan)
        if name not in roles(plan):
            raise PlanError(f"no party {name!r} in this plan", hint=f"parties are {roles(plan)[:6]} ...")
        self.plays = plays_of(plan, name)
        me = name if name in spec.names() else None
        self.setup = setup if setup is not None or self.plays is None else setup_party(plan, self.plays, client=me)
        self.timeout = spec.timeout if timeout is None else timeout  # for an answer of the schedule
        self.step_timeout = self.timeout if step_timeout is None else step_timeout  # for a step of a turn
        self.limits = limits or m.Limits()
        self.switch = Switch(transport, _classify)
        self.link = Link(self.switch.control(), Meter(name), self.limits)
        self.eval_meter = Meter(name)
        self.fault = fault  # tests: called with each command before it is carried out
        self.per_client = per_client(plan)
        self.ctx: Context | None = None
        self.record_ids: np.ndarray | None = None  # the ids of recorded rows (per-client data: positions)
        if not self.per_client:  # the shares of one dataset: every party derives them alike
            template = self.setup if self.plays == spec.template else setup_party(plan, spec.template, optimizer=False)
            self.record_ids = template.splits.ids
            self.use(context or Context.of(plan, template))
        else:  # each client's own file: the coordinator's census tells everyone how many rows each has
            self.graph, self.ids_hash, self.rounds, self.turns = build_graph(plan), "", [], {}
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.refused: list[str] = []
        self.recorders: dict[str, Recorder] | None = {} if record and self.setup is not None else None
        self.noised = {"samples": 0, "steps": 0}  # training this party did, for the privacy its noise spent
        self.rng: PartyRandom | None = None  # its random layers' stream (made at its first turn)
        self.tracker = None  # streams the losses this party computes in its turns (splitlearn.run.tracking)
        if tracking is not None and self.plays is not None and any(n.party == self.plays for n in self.graph.losses()):
            from ..run.tracking import open_tracker

            from ..run.tracking import StepNumbers

            self.tracker = StepNumbers(open_tracker(tracking, plan, name))
        self.global_state: dict[str, torch.Tensor] | None = None  # federation: the averaged client weights
        if name == self.federation:
            self.global_state = {k: v.clone() for k, v in state_of(
                {s: _build(plan, s) for s in _segments_of(self.graph, spec.template)}).items()}
        # fixed parties: a copy of their segments per client (splitfed_v1 for a round, independent for good)
        self.copies: dict[str, tuple[dict, torch.optim.Optimizer | None]] = {}
        self.lent: dict[str, torch.Tensor] | None = None  # a client: the run's model, lent for one evaluation turn
        self._pool: dict[str, list[Scores]] = {}  # a head: the current evaluation's scores per loss (all sites)
        self._pool_of: tuple[int, int] | None = None  # (round, attempt) of that evaluation
        self._requests = itertools.count(1)
        self._early: dict[tuple[str, int], Message] = {}  # (sender, request): weights that beat their command
        self._pending: deque[Message] = deque(maxlen=MAX_PENDING)  # follower: commands that came meanwhile
        # checkpoints (with an --out folder): every party saves its state at the end of every round, on the
        # coordinator's word; going back to one begins the schedule again from there (see Coordinator)
        self.checkpoints: ck.Checkpoints | None = None
        if out is not None:
            self.checkpoints = ck.Checkpoints(Path(out) / "parties" / name / "checkpoints", label="round",
                                              plan_hash=plan_hash(plan))
            if not resume:
                self.checkpoints.clear()
        elif resume:
            raise PlanError("resume needs the run folder (--out) whose checkpoints to go on from", entry="--resume")
        self.resuming = resume  # a follower started with --resume waits for the coordinator's word to go back
        self.returns = returns  # seconds to wait for a failed party to come back as a new process (0: never)
        self.attempt = 0  # times the schedule went back to a checkpoint: in every turn's tag
        self._returned: set[str] = set()  # parties that came back as new processes (said so, and proven)
        self._waited: set[str] = set()  # parties waited for in vain (never again)
        self._restarts_taken: dict[str, int] = {}  # per party: its restarts (seen by the transport) believed

    def use(self, ctx: Context) -> None:
        self.ctx = ctx
        self.graph, self.ids_hash, self.rounds, self.turns = ctx.graph, ctx.ids_hash, ctx.rounds, ctx.turns

    def use_counts(self, train: list[int], test: list[int]) -> None:
        """Per-client data: the rows every client holds, from the census."""
        if len(train) != len(self.clients) or len(test) != len(self.clients):
            raise ValueError(f"row counts for {len(train)} clients; the plan has {len(self.clients)}")
        me = self.clients.index(self.name) if self.name in self.clients else None
        self.use(Context.of_counts(self.plan, [int(n) for n in train], [int(n) for n in test], me, self.setup))

    # -- messages ---------------------------------------------------------------------------
    def _command(self, party: str, request: int | None = None, **args: Any) -> int:
        """Send a command; its request id (a new one unless given)."""
        rid = next(self._requests) if request is None else request
        do = args.pop("do")
        self.link.send(m.command(self.name, party, do, rid, time.time() + self.timeout, **args))
        return rid

    def _ack(self, request: int, **info: Any) -> None:
        self.link.send(m.ack(self.name, self.coordinator, request, **info))

    def _senders_of_weights(self) -> set[str]:
        """Who may send us weights: a client's coordinator, federation and strategy peers; the
        federation's clients."""
        if self.name == self.federation:
            return set(self.clients)
        if self.plays != self.spec.template:
            return set()
        return {self.coordinator, self.federation} | self.strategy.weight_senders(self.plan, self.name)

    def _hold_weights(self, msg: Message) -> bool:
        """Keep weights that came before the command naming them: from an expected sender only
        (False otherwise), at most :data:`MAX_EARLY_WEIGHTS` per sender; beyond that they are
        refused (an ERROR to the sender) and counted."""
        if msg.sender not in self._senders_of_weights():
            return False
        held = [r for s, r in self._early if s == msg.sender]
        if len(held) >= MAX_EARLY_WEIGHTS:
            self.link.refuse(msg.sender, f"weights for request {msg.step} before any command named them, while its "
                             f"weights for request {held[0]} wait already: at most {MAX_EARLY_WEIGHTS} early weights "
                             "message per sender is kept", wire="weights")
            return True
        self._early[(msg.sender, msg.step)] = msg
        return True

    def _restarts(self, party: str) -> int:
        """How many times the transport saw ``party`` come back as a new process (0: it cannot tell)."""
        try:
            return self.switch.inner.restarts(party)
        except TransportError:
            return 0

    def _broken(self, party: str) -> bool:
        """Whether ``party``'s stream is broken now (the transport knows; never waits)."""
        try:
            return self.switch.inner.broken_since(party) is not None
        except TransportError:
            return False

    def _back(self, party: str) -> None:
        """``party`` says it came back as a new process (resuming). Believed once per restart the
        transport saw (another incarnation of it); otherwise refused, named and counted. A
        coordinator that itself resumes takes every party back anyway: nothing to believe."""
        if self.name != self.coordinator or (self.resuming and isinstance(self, Coordinator)):
            return
        seen = self._restarts(party)
        if seen > self._restarts_taken.get(party, 0):
            self._restarts_taken[party] = seen
            self._returned.add(party)  # the coordinator goes back with it
            return
        self.link.refuse(party, "it says it came back as a new process, but the transport saw no new process of it "
                         f"since its last restart ({seen} restarts): not believed, nobody goes back")

    def _await(self, kind: Kind, senders: list[str], timeout: float,
               match: Callable[[Message], bool] | None = None, until: Callable[[], bool] | None = None) -> _Answer:
        """Messages of ``kind`` from each of ``senders`` (that ``match``); those that do not come in
        time are missing. Commands and early weights that come meanwhile are kept for later."""
        want, got = set(senders), {}
        deadline = time.monotonic() + timeout
        while want - set(got) and not (until is not None and until()):
            try:
                msg = self.link.recv(deadline=deadline)
            except TransportTimeout:
                break
            if msg.kind == kind and msg.sender in want and (match is None or match(msg)):
                got[msg.sender] = msg
            elif msg.kind == Kind.STEP and msg.sender == self.coordinator != self.name:
                self._pending.append(msg)
            elif msg.kind == Kind.WEIGHTS and self._hold_weights(msg):
                pass
            elif msg.kind == Kind.ACK and m.read_ack(msg, self.limits)[1].get("back") is True:
                self._back(msg.sender)
            else:
                log.debug("%s: ignoring a late %s from %s", self.name, msg.kind.name, quote(msg.sender))
        return _Answer(got, [s for s in senders if s not in got])

    def _acks(self, senders: list[str], timeout: float, request: int | dict[str, int],
              has: str | None = None) -> dict[str, dict]:
        """The acknowledgements of ``request`` (one id, or one per sender) that come in time, as info
        dicts; with ``has``, only those holding that key."""
        def match(msg: Message) -> bool:
            rid, info = m.read_ack(msg, self.limits)
            want = request if isinstance(request, int) else request[msg.sender]
            return rid == want and (has is None or has in info)

        ans = self._await(Kind.ACK, senders, timeout, match=match)
        return {s: m.read_ack(msg, self.limits)[1] for s, msg in ans.ok.items()}

    def _take_weights(self, senders: list[str], request: int, timeout: float) -> dict[str, Message]:
        """The weights answering ``request`` from each sender that sends them in time."""
        got = {s: self._early.pop((s, request)) for s in senders if (s, request) in self._early}
        for key in [k for k in self._early if k[0] in senders]:  # another request's: stale, one request at a time
            del self._early[key]
        ans = self._await(Kind.WEIGHTS, [s for s in senders if s not in got], timeout,
                          match=lambda msg: msg.step == request)
        return {**got, **ans.ok}

    # -- a turn ----------------------------------------------------------------------------
    def _models(self, turn: Turn, client: str, model: str | None = None) -> tuple[dict, torch.optim.Optimizer | None]:
        if self.plays == self.spec.template and model is not None:  # another client's weights, for this turn only
            if self.lent is None:
                raise PartyError(f"{self.name}: no weights of {model} came to evaluate")
            mods = copy.deepcopy(self.setup.modules)
            load_state(mods, self.lent)
            return mods, None
        if self.plays == self.spec.template or not self.strategy.own_copy(turn):
            return self.setup.modules, self.setup.optimizer
        if client not in self.copies:  # from the shared model (v1: averaged at the end of every round)
            mods = copy.deepcopy(self.setup.modules)
            self.copies[client] = (mods, make_optimizer(self.plan, self.plays, mods))
        return self.copies[client]

    def run_turn(self, turn: Turn, client: str, model: str | None = None) -> tuple[bool, str]:
        """Take part in one turn with ``client`` (evaluating ``model``'s weights, lent to it, when
        not its own): (done, why not)."""
        t = self.spec.template
        fixed = {p for p in self.plan.parties if p != t}
        peers = ({client} | fixed) - {self.name} if self.plays != t else fixed
        # in every hello of this turn (the hello compares it); a turn done again after going back differs from the first
        tag = f"{self.ids_hash}/turn-{turn.index}" + (f"/again-{self.attempt}" if self.attempt else "")

        def turn_of(data: bytes) -> str | None:
            """The turn tag of a hello (None: no readable hello)."""
            if m.kind_of(data) != Kind.HELLO:
                return None
            try:
                return m.read_hello(m.decode(data, self.limits), self.limits).get("ids_hash")
            except WireError:
                return None

        def keep(peer: str, data: bytes) -> bool:
            """A peer's hello for this very turn may have come before we got here; the rest is stale."""
            return peer in peers and turn_of(data) == tag

        def defer(peer: str, data: bytes) -> bool:
            """Another turn's hello (the next one's can come while this one says goodbye): it waits."""
            found = turn_of(data)
            return found is not None and found != tag

        view = self.switch.session(self.plays, {} if self.plays == t else {t: client}, keep, peers, defer)
        link = Link(view, self.link.meter if turn.mode == "train" else self.eval_meter, self.limits)
        try:
            modules, optimizer = self._models(turn, client, model)
        except PartyError as e:
            return False, str(e)
        finally:
            self.lent = None if self.plays == t else self.lent
        if self.rng is None:  # this physical party's own random stream, kept from turn to turn
            self.rng = self._random(modules)
        party = _Scoring(self.graph, self.plays, link, modules, optimizer, self.setup.inputs, timeout=self.step_timeout,
                      rng=self.rng)
        if self.recorders is not None:
            party.observer = self.recorders.setdefault(client if self.plays != t else "", Recorder(self.record_ids))
        try:
            if self.tracker is not None:
                self.tracker.turn = turn.index
            turn_steps = self.ctx.steps_of(self.plan, turn, self.clients.index(client)) if self.ctx else turn.steps
            report = run_party(party, iter(turn_steps), ids_hash=tag, tracker=self.tracker)
        except (PartyError, PlanError, TransportError) as e:  # a peer that is gone or silent: failures as data
            self.refused += link.refused
            log.warning("%s: turn %d with %s failed: %s", self.name, turn.index, client, e)
            return False, str(e)
        self.refused += link.refused
        self.noised["samples"] += report.meter.get("train_samples", 0)
        self.noised["steps"] += report.meter.get("train_steps", 0)
        losses, steps = {}, {}
        for loss, h in report.metrics.items():
            key = "train_loss" if turn.mode == "train" else "test_loss"
            losses[loss] = {k: v[0] for k, v in h.items() if v and k not in ("train_loss_steps", "ci95", "curves")}
            losses[loss].setdefault(key, None)
            if h.get("train_loss_steps"):
                steps[loss] = [v for _, v in h["train_loss_steps"]]
        record = {"turn": turn.index, "round": turn.round, "epoch": turn.steps[0].epoch if turn.steps else 0,
                  "mode": turn.mode, "client": client, "rows": sum(len(x.rows) for x in turn_steps), "losses": losses,
                  "steps": steps, "train_s": report.meter.get("train_s", 0.0)}
        if model is not None:
            record["model"] = model
        self.records.append(record)
        if turn.mode == "eval" and party.scored:
            self._pool_scores(turn, client, party.scored, record)
        return True, ""

    def _pool_scores(self, turn: Turn, client: str, scored: dict[str, list[Scores]], record: dict) -> None:
        """A head's evaluation turn: add its scores to the pool of the round's evaluation (every
        site it scores; :meth:`_close_pool` writes the pooled record once they are all in). A
        client head with its own test rows also keeps its scores in the turn's record, so the
        run's result can pool them over every client."""
        if self._pool_of != (turn.round, self.attempt):
            self._close_pool()
            self._pool_of = (turn.round, self.attempt)
        for loss, parts in scored.items():
            self._pool.setdefault(loss, []).extend(parts)
            if self.per_client and self.plays == self.spec.template:
                record.setdefault("scores", {})[loss] = {
                    "outputs": np.concatenate([o for o, *_ in parts]).tolist(),
                    "targets": np.concatenate([t for _, t, *_ in parts]).tolist(),
                    "loss_sum": float(sum(x for *_, x, _ in parts)), "rows": int(sum(n for *_, n in parts))}

    def _close_pool(self) -> None:
        """Write the pooled record of the evaluation whose scores are pooled (``mode = "pooled"``:
        the metrics over the union of every site's test rows), and empty the pool."""
        if not self._pool or self._pool_of is None:
            return
        rnd = self._pool_of[0]
        evals = [r for r in self.records
                 if r["mode"] == "eval" and r["round"] == rnd and set(r["losses"]) & set(self._pool)]
        pooled = {"mode": "pooled", "round": rnd, "epoch": evals[-1]["epoch"] if evals else 0,
                  "turns": [r["turn"] for r in evals], "clients": [r["client"] for r in evals],
                  "rows": sum(r["rows"] for r in evals),
                  "losses": {k: pooled_metrics(self.plan.losses[k].kind, v) for k, v in self._pool.items()}}
        self.records = [r for r in self.records if not (r["mode"] == "pooled" and r["round"] == rnd)] + [pooled]
        self._pool, self._pool_of = {}, None

    # -- weights ---------------------------------------------------------------------------
    def _client_state(self) -> dict[str, torch.Tensor]:
        return state_of(self.setup.modules)

    def send_weights(self, to: str, request: int) -> None:
        state = self.global_state if self.name == self.federation and self.plays != self.spec.template \
            else self._client_state()
        self.link.send(m.weights(self.name, to, state, request))

    def load_weights(self, sender: str, request: int, ready: bool = False, lend: bool = False) -> None:
        """Client: take the weights answering ``request`` from ``sender`` (checked against ours), then
        say so. ``ready``: first tell the coordinator we are waiting (so they cannot overtake us);
        ``lend``: keep them for the next evaluation turn only (our own weights stay as they are)."""
        if ready:
            self._ack(request, ready=True)
        msg = self._take_weights([sender], request, self.timeout).get(sender)
        if msg is None:
            log.warning("%s: no weights from %s within %g s; training on with our own", self.name, sender,
                        self.timeout)
            self._ack(request, loaded=None, missing=sender)
            return
        try:
            state = m.read_weights(msg, self._client_state())
            if lend:
                self.lent = state
            else:
                load_state(self.setup.modules, state)
        except WireError as e:
            self.link.refuse(sender, str(e), wire="weights")
            self._ack(request, loaded=None, refused=sender, why=str(e)[:300])
            return
        self._ack(request, loaded=sender)

    def collect(self, clients: list[str], samples: list[int], request: int) -> tuple[list[str], dict[str, str]]:
        """Federation: receive the clients' weights, average them (by samples); whose were averaged,
        and why each refused client's were refused."""
        got = self._take_weights(clients, request, self.timeout)
        states, weights, used, refused = [], [], [], {}
        for c, n in zip(clients, samples):
            if c in got:
                try:
                    states.append(m.read_weights(got[c], self.global_state))
                    weights.append(n)
                    used.append(c)
                except WireError as e:
                    self.link.refuse(c, str(e), wire="weights")
                    refused[c] = str(e)[:300]
        if states:
            self.global_state = average(states, weights)
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

    # -- checkpoints ---------------------------------------------------------------------------
    def _random(self, modules: dict[str, nn.Module]) -> PartyRandom:
        device = next((p.device for mod in modules.values() for p in mod.parameters()), "cpu")
        return PartyRandom(party_seed(self.plan.train.seed, self.name), device)

    def capture(self, rnd: int) -> None:
        """Save this party's state at the end of round ``rnd`` (-1: before the first): weights,
        optimizers (and the server copies kept per client), the federation's average, the random
        stream, meters, records and the privacy spent."""
        self._close_pool()  # the round's evaluation is over: its pooled record goes in the checkpoint
        tensors, optim = {}, {}
        if self.setup is not None:
            tensors.update(ck.module_tensors(self.setup.modules))
            t, optim = ck.optimizer_tensors(self.setup.optimizer)
            tensors.update(t)
        copies = {}
        for c, (mods, opt) in self.copies.items():
            tensors.update(ck.module_tensors(mods, f"copy.{c}.module."))
            t, copies[c] = ck.optimizer_tensors(opt, f"copy.{c}.optim.")
            tensors.update(t)
        for k, v in (self.global_state or {}).items():
            tensors[f"global.{k}"] = v.detach().cpu().contiguous().clone()
        for k, v in (self.rng.state() if self.rng is not None else {}).items():
            tensors[f"rng.{k}"] = v
        self.checkpoints.save(rnd, tensors, {
            "format": ck.FORMAT, "party": self.name, "round": rnd, "optimizer": optim, "copies": copies,
            "random": self.rng is not None, "meter": ck.meter_state(self.link.meter),
            "eval_meter": ck.meter_state(self.eval_meter), "records": self.records, "skipped": self.skipped,
            "refused": self.refused, "noised": self.noised, "holder": getattr(self, "holder", None)})

    def restore(self, rnd: int, attempt: int) -> None:
        """Go back to the state :meth:`capture` saved at the end of round ``rnd``."""
        tensors, man = self.checkpoints.load(rnd)
        if self.setup is not None:
            ck.load_modules(self.setup.modules, tensors)
            ck.load_optimizer(self.setup.optimizer, tensors, man["optimizer"])
        self.copies = {}
        for c, entry in man["copies"].items():
            mods = copy.deepcopy(self.setup.modules)
            opt = make_optimizer(self.plan, self.plays, mods)
            ck.load_modules(mods, tensors, f"copy.{c}.module.")
            ck.load_optimizer(opt, tensors, entry, f"copy.{c}.optim.")
            self.copies[c] = (mods, opt)
        if self.global_state is not None:
            self.global_state = {k: tensors[f"global.{k}"] for k in self.global_state}
        self.rng = None
        if man["random"]:
            self.rng = self._random(self.setup.modules if self.setup is not None else {})
            self.rng.load({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
        ck.load_meter(self.link.meter, man["meter"])
        ck.load_meter(self.eval_meter, man["eval_meter"])
        self.records, self.skipped, self.refused, self.noised = (man["records"], man["skipped"], man["refused"],
                                                                 man["noised"])
        if isinstance(self, Coordinator):
            self.holder = man["holder"]
        self.attempt, self.resuming = attempt, False
        self.lent, self._pool, self._pool_of = None, {}, None
        self._early.clear()
        self._pending.clear()

    # -- report --------------------------------------------------------------------------------
    def close_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def report(self) -> PartyReport:
        self.close_tracker()
        self._close_pool()
        privacy = {}
        if self.plays is not None and self.noised["steps"]:
            privacy = defenses.privacy_spent(self.graph, self.plays, self.noised["samples"], self.noised["steps"])
        observed = {}
        for client, rec in (self.recorders or {}).items():
            observed.update({(f"{client}/{k}" if client else k): v for k, v in rec.tensors().items()})
        modules, per_client = self.setup.modules if self.setup else {}, {}
        if not self.strategy.one_model and self.copies:  # each client's copy is its model; the shared one never trained
            modules, per_client = {}, {c: mods for c, (mods, _) in self.copies.items()}
        return PartyReport(self.name, plays=self.plays, meter=self.link.meter.summary(),
                           eval_meter=self.eval_meter.summary(), refused=self.refused + self.link.refused,
                           privacy=privacy, records=self.records, skipped=self.skipped,
                           modules=modules, per_client=per_client, observed=observed,
                           data=self.setup.data_report() if self.setup else {},
                           preprocess=self.setup.preprocess if self.setup else None)


class Follower(Role):
    """A client, a fixed party or a federation of its own: carries out the coordinator's commands,
    dispatched by name through :attr:`COMMANDS`, until it says stop."""

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        try:
            if self.resuming:  # a new process: the coordinator tells which checkpoint every party goes back to
                self._ack(0, back=True, held=self.checkpoints.steps())
            self.follow()
        finally:
            self.close_tracker()
        return self.report()

    WHILE_RESUMING = frozenset({"held", "restore", "stop", "rows", "census"})

    def follow(self) -> None:
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
                    log.info("%s: %s", self.name, msg.text[:500])
                continue
            try:
                cmd = m.read_command(msg, self.limits)
            except WireError as e:
                self.link.refuse(msg.sender, str(e))
                continue
            if self.fault is not None:
                self.fault(self, {"do": cmd.do, "request": cmd.request, **cmd.args})
            if cmd.do == "stop":
                if cmd.args.get("reason"):  # the run was stopped for a reason that concerns us all
                    raise PartyError(f"{self.name}: {self.coordinator} stopped the run: {str(cmd.args['reason'])[:600]}")
                return
            if time.time() > cmd.deadline:
                log.info("%s: dropping a command that is past its deadline: %s", self.name, quote(cmd.do))
                continue
            if self.resuming and cmd.do not in self.WHILE_RESUMING:  # our state is not the others' yet
                log.info("%s: waiting for the word to go back to a checkpoint; dropping %s", self.name, quote(cmd.do))
                continue
            handler = self.COMMANDS.get(cmd.do)
            if handler is None or not handler.allowed(self):
                self.link.refuse(msg.sender, f"a command {quote(cmd.do)} that {self.name} does not carry out")
                continue
            try:
                handler.run(self, cmd.request, cmd.args)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                self.link.refuse(msg.sender, f"a malformed {quote(cmd.do)} command ({quote(str(e))})")

    # -- the commands ----------------------------------------------------------------------------
    def _turn(self, request: int, a: dict) -> None:
        turn = self.turns.get(int(a["turn"]))
        if turn is None:
            raise ValueError(f"no turn {quote(a['turn'])}")
        model = a.get("model")
        if model is not None and model not in self.clients:
            raise ValueError(f"no client {quote(model)} whose weights to evaluate")
        if a["client"] not in self.clients:
            raise ValueError(f"no client {quote(a['client'])} to take the turn with")
        ok, why = self.run_turn(turn, a["client"], model)
        if self.coordinator not in self.plan.parties:  # it takes no part in turns: tell it we are done
            self._ack(request, ok=ok, why=why)

    def _census(self, request: int, a: dict) -> None:
        self._ack(request, rows=list(self.setup.rows), schema=self.setup.schema())

    def _rows(self, request: int, a: dict) -> None:
        self.use_counts(list(a["train"]), list(a["test"]))

    def _load(self, request: int, a: dict) -> None:
        with self._metering(bool(a.get("evaluation"))):
            self.load_weights(str(a["from"]), request, ready=bool(a.get("ready")), lend=bool(a.get("lend")))

    def _send(self, request: int, a: dict) -> None:
        with self._metering(bool(a.get("evaluation"))):
            if a["to"] not in roles(self.plan):
                raise ValueError(f"no party {quote(a['to'])} to send weights to")
            self.send_weights(a["to"], request)

    def _collect(self, request: int, a: dict) -> None:
        got, refused = self.collect([str(c) for c in a["clients"]], [int(n) for n in a["samples"]], request)
        self._ack(request, averaged=got, refused=refused)

    def _download(self, request: int, a: dict) -> None:
        with self._metering(bool(a.get("evaluation"))):
            for c, r in zip(a["clients"], a["requests"]):
                self.send_weights(str(c), int(r))

    def _checkpoint(self, request: int, a: dict) -> None:
        self.capture(int(a["round"]))
        self._ack(request, saved=int(a["round"]))

    def _held(self, request: int, a: dict) -> None:
        self._ack(request, held=self.checkpoints.steps())

    def _restore(self, request: int, a: dict) -> None:
        if a["round"] is None:  # no checkpoint in common: from the start (what it held is moved aside, not lost)
            moved = self.checkpoints.set_aside()
            log.warning("%s: told to begin again from the start%s", self.name,
                        f" (checkpoints moved to {moved})" * bool(moved))
            self.resuming = False
            self._ack(request, restored="start")
            return
        rnd = int(a["round"])
        if rnd not in self.checkpoints.steps():
            self._ack(request, restored=None)
            return
        self.restore(rnd, int(a["attempt"]))
        self._ack(request, restored=rnd)

    @dataclass(frozen=True)
    class _Handler:
        run: Callable[["Follower", int, dict], None]
        allowed: Callable[["Follower"], bool]

    COMMANDS: dict[str, "_Handler"] = {}


def _is_client(r: Role) -> bool:
    return r.plays == r.spec.template


def _is_federation(r: Role) -> bool:
    return r.name == r.federation


Follower.COMMANDS = {
    "turn": Follower._Handler(Follower._turn, lambda r: r.plays is not None),
    "send": Follower._Handler(Follower._send, lambda r: _is_client(r) or _is_federation(r)),
    "load": Follower._Handler(Follower._load, _is_client),
    "census": Follower._Handler(Follower._census, lambda r: _is_client(r) and r.per_client),
    "rows": Follower._Handler(Follower._rows, lambda r: r.per_client and r.ctx is None),
    "collect": Follower._Handler(Follower._collect, _is_federation),
    "download": Follower._Handler(Follower._download, _is_federation),
    "checkpoint": Follower._Handler(Follower._checkpoint, lambda r: r.checkpoints is not None),
    "held": Follower._Handler(Follower._held, lambda r: r.checkpoints is not None),
    "restore": Follower._Handler(Follower._restore, lambda r: r.checkpoints is not None),
    "merge_copies": Follower._Handler(
        lambda r, req, a: r.merge_copies([str(c) for c in a["clients"]], [int(n) for n in a["samples"]]),
        lambda r: r.setup is not None and not _is_client(r)),
}


class _Returned(Exception):
    """A failed party came back as a new process (it lost its state since the last checkpoint)."""

    def __init__(self, party: str):
        super().__init__(party)
        self.party = party


class Coordinator(Role):
    """Walks the strategy's rounds; skips clients that do not answer; stops everyone at the end."""

    holder: str | None = None  # the client with the latest weights (sequential)
    _counts: tuple[list[int], list[int]] | None = None  # per-client data: the census's row counts

    def run(self, progress: Callable[[Progress], None] | None = None) -> PartyReport:
        try:
            self.coordinate(progress)
        finally:
            self.close_tracker()
        return self.report()

    def coordinate(self, progress: Callable[[Progress], None] | None = None) -> None:
        """Walk the rounds; then tell every party to stop: plainly when the run is done, with the
        reason when it failed (so every party ends saying how the run really ended)."""
        fixed = [p for p in self.plan.parties if p != self.spec.template and p != self.name]
        others = fixed + ([self.federation] if self.federation not in (self.name, *fixed) else [])
        everyone = [*others, *self.clients]
        try:
            self._walk(fixed, everyone, progress)
        except BaseException as e:
            self._stop(everyone, str(e) or type(e).__name__)
            raise
        self._stop(everyone, None)

    def _stop(self, everyone: list[str], reason: str | None) -> None:
        for p in everyone:
            try:
                self._command(p, do="stop", **({"reason": reason[:600]} if reason else {}))
            except TransportError:
                pass

    def _walk(self, fixed: list[str], everyone: list[str], progress: Callable[[Progress], None] | None) -> None:
        others = [p for p in everyone if p not in self.clients]
        if self.per_client:
            self.census(others)
        i = 0
        if self.checkpoints is not None:
            i = self.go_back(everyone, "resuming") if self.resuming else None
            if i is None:  # from the start: every party saves its state before the first round
                if self.resuming:  # nothing in common: every party (resuming too) begins again
                    self.begin_again(everyone)
                self.checkpoint_everyone(-1, everyone)
                i = 0
        while i < len(self.rounds):
            rnd = self.rounds[i]
            try:
                self._round(rnd, fixed)
                if self.checkpoints is not None:
                    self.checkpoint_everyone(rnd.index, everyone, rnd)
            except _Returned as e:
                i = self.go_back(everyone, f"{e.party} came back as a new process")
                if i is None:
                    raise PartyError(f"{self.name}: {e.party} came back as a new process, but no checkpoint is "
                                     "held by every party") from None
                continue
            if progress is not None:
                progress(self._progress(rnd))
            i += 1

    def _round(self, rnd: Round, fixed: list[str]) -> None:
        names = self.strategy.before_round(self, rnd, [self.clients[k] for k in rnd.clients])
        done = []
        for turn in rnd.train:
            c = self.clients[turn.client]
            if c not in names or not self.strategy.before_turn(self, rnd, c):
                continue
            if self._turn(rnd, turn, c, fixed):
                done.append(c)
                self.holder = c
        if done:
            self.strategy.after_round(self, rnd, done)
        for turn in rnd.evals:
            pick = self.strategy.eval_client(self, rnd, turn, done)
            if pick is not None:
                self._turn(rnd, turn, pick[0], fixed, model=pick[1])

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_everyone(self, index: int, everyone: list[str], rnd: Round | None = None) -> None:
        """Every party (this one too) saves its state as of the end of round ``index``."""
        rid = next(self._requests)
        asked, why = [], {}
        for p in everyone:
            if p in self._waited:  # it did not come back when waited for: not asked (nor waited for) again
                why[p] = "it was given up on earlier in the run (it did not come back in time)"
                continue
            try:
                self._command(p, request=rid, do="checkpoint", round=index)
                asked.append(p)
            except TransportError as e:
                log.warning("%s: checkpoint: cannot reach %s: %s", self.name, p, e)
                why[p] = f"cannot reach it: {e}"
        self.capture(index)
        ans = self._acks(asked, self.timeout, rid, has="saved")
        for p in everyone:
            if p not in ans and rnd is not None:
                self._skip(rnd, p, "checkpoint", why.get(p, f"it did not say within {self.timeout:g} s that it saved "
                                                             "its state"))

    def begin_again(self, everyone: list[str]) -> None:
        """Resuming, but no checkpoint is held by every party: every party begins the run again."""
        rid = next(self._requests)
        for p in everyone:
            try:
                self._command(p, request=rid, do="restore", round=None, attempt=0)
            except TransportError:
                pass
        self._acks(everyone, self.timeout, rid, has="restored")
        moved = self.checkpoints.set_aside()  # a peer's word never deletes checkpoints
        self.resuming = False
        log.warning("%s: resuming, but no checkpoint is held by every party: from the start%s", self.name,
                    f" (checkpoints moved to {moved})" * bool(moved))

    def go_back(self, everyone: list[str], why: str) -> int | None:
        """Every party goes back to the last round whose checkpoint all of them hold; the index of
        the round to do next (None: no round is held by all). Parties that do not answer are left
        out (and reported)."""
        if self.per_client and self._counts is not None:  # a new process knows no row counts yet
            for p in self._returned & set(everyone):
                try:
                    self._command(p, do="rows", train=self._counts[0], test=self._counts[1])
                except TransportError:
                    pass
        rid = next(self._requests)
        for p in everyone:
            try:
                self._command(p, request=rid, do="held")
            except TransportError:
                pass
        ans = self._acks(everyone, self.timeout, rid, has="held")
        common = set(self.checkpoints.steps())
        for p, info in ans.items():
            held = info["held"] if isinstance(info["held"], list) else []
            common &= {r for r in held if type(r) is int}
        missing = [p for p in everyone if p not in ans and p not in self._waited]
        if missing:  # it would keep a later state than the others: the run could not stay consistent
            raise PartyError(f"{self.name}: {why}, but {missing[:5]} did not say within {self.timeout:g} s which "
                             "checkpoints they hold, so not every party can go back to the same round")
        if not common:
            log.warning("%s: %s, but no checkpoint is held by every party", self.name, why)
            return None
        rnd = max(common)
        self.attempt += 1
        if self.attempt > MAX_GOING_BACK:
            raise PartyError(f"{self.name}: the parties went back to a checkpoint {MAX_GOING_BACK} times; giving up "
                             f"({why})")
        rid = next(self._requests)
        for p in ans:
            try:
                self._command(p, request=rid, do="restore", round=rnd, attempt=self.attempt)
            except TransportError as e:
                raise PartyError(f"{self.name}: {why}; cannot tell {p} to go back to round {rnd}: {e}") from None
        self.restore(rnd, self.attempt)
        got = self._acks(list(ans), 3 * self.timeout, rid, has="restored")
        failed = [p for p in ans if got.get(p, {}).get("restored") != rnd]
        if failed:
            raise PartyError(f"{self.name}: {why}; going back to the end of round {rnd}, {failed} did not")
        log.warning("%s: %s; every party went back to the end of round %d", self.name, why, rnd)
        self._returned.clear()
        return next((i for i, r in enumerate(self.rounds) if r.index > rnd), len(self.rounds))

    def _came_back(self, party: str) -> str | None:
        """The party that came back as a new process (``party``, which failed, or another: the
        failure may be a neighbour's), proven by the transport (see :meth:`_back`); None if none
        did. It is waited for only while the transport says one may come back (:meth:`_away`), up to
        ``returns`` seconds; ``party``, still away then, is not waited for again. A party that is
        connected is not waited for at all. Parties given up on are not taken back."""
        self._returned -= self._waited
        if not self._returned and party not in self._waited and self._away(party):
            log.warning("%s: waiting up to %g s for %s to come back (away: %s)", self.name, self.returns, party,
                        self._away(party))
            deadline = time.monotonic() + self.returns
            while not self._returned and self._away(party) and (left := deadline - time.monotonic()) > 0:
                self._await(Kind.ACK, [party], min(left, POLL_S), match=lambda msg: False,  # a 'back': _returned
                            until=lambda: bool(self._returned - self._waited))
                self._returned -= self._waited
            if not self._returned:
                for p in self._away(party):  # a restart that never said 'back' is not waited for again
                    self._restarts_taken[p] = self._restarts(p)
                if self._broken(party):
                    self._waited.add(party)
        return sorted(self._returned)[0] if self._returned else None

    def _away(self, party: str) -> list[str]:
        """Who may yet come back as a new process: ``party`` or a fixed role whose stream is broken
        now, or that the transport saw restart without saying so yet."""
        roles_ = [party, *(p for p in roles(self.plan) if p not in self.clients and p not in (self.name, party))]
        return [p for p in roles_ if self._broken(p) or self._restarts(p) > self._restarts_taken.get(p, 0)]

    def _progress(self, rnd: Round) -> Progress:
        losses = [v["train_loss"] for r in self.records if r["round"] == rnd.index and r["mode"] == "train"
                  for v in r["losses"].values() if v.get("train_loss") is not None]
        return Progress(rnd.index + 1, len(self.rounds), rnd.epoch, self.plan.train.epochs, "round",
                        sum(losses) / len(losses) if losses else None)

    def census(self, others: list[str]) -> None:
        """Per-client data: ask every client how many rows it holds and what they look like (no
        row travels); the first client's schema is the one the others must have; then tell
        everyone the counts, from which each derives the same rounds. A client that does not
        answer gets no rows (and no turns)."""
        rid = next(self._requests)
        for c in self.clients:
            try:
                self._command(c, request=rid, do="census")
            except TransportError as e:
                log.warning("%s: census: cannot reach %s: %s", self.name, c, e)
        ans = self._acks(self.clients, self.timeout, rid, has="rows")
        train, test, first = [], [], None
        for c in self.clients:
            rows = ans.get(c, {}).get("rows")
            if not (isinstance(rows, list) and len(rows) == 2 and all(isinstance(v, int) and v >= 0 for v in rows)):
                self.skipped.append({"round": 0, "client": c, "during": "census",
                                     "reason": "no answer" if c not in ans else f"rows {quote(rows)}"})
                train.append(0)
                test.append(0)
                continue
            schema = ans[c].get("schema")
            if first is None:
                first = (c, schema)
            elif schema != first[1]:
                problem = schema_difference(first[1], schema, first[0], c)
                for p in [*others, *self.clients]:  # every party stops, naming the problem
                    try:
                        self._command(p, do="stop", reason=problem)
                    except TransportError:
                        pass
                raise PlanError(problem, entry=f"parties.{self.spec.template}.data",
                                hint="every client's file needs the same columns, dtypes, image shape and classes")
            train.append(rows[0])
            test.append(rows[1])
        self._counts = (train, test)
        for p in [*others, *self.clients]:
            try:
                self._command(p, do="rows", train=train, test=test)
            except TransportError as e:
                log.warning("%s: census: cannot reach %s: %s", self.name, p, e)
        self.use_counts(train, test)

    def _skip(self, rnd: Round, party: str, what: str, why: str) -> None:
        back = self._came_back(party) if self.checkpoints is not None and self.returns > 0 else None
        if back is not None:
            raise _Returned(back)  # it comes back as a new process: every party goes back to a checkpoint
        self.skipped.append({"round": rnd.index, "client": party, "during": what, "reason": why})
        log.warning("%s: skipped %s in round %d (%s): %s", self.name, party, rnd.index, what, why)

    def _turn(self, rnd: Round, turn: Turn, client: str, fixed: list[str], model: str | None = None) -> bool:
        """``client`` takes its turn (evaluating ``model``'s weights, lent to it, when not its own)."""
        rid = 0
        lent = {"model": model} if model is not None else {}
        for p in [client, *fixed]:
            try:
                r = self._command(p, do="turn", turn=turn.index, client=client, **lent)
                rid = r if p == client else rid
            except TransportError as e:
                self._skip(rnd, client, f"{turn.mode} turn", f"cannot reach {p}: {e}")
                return False
        if self.plays is None:  # a plan of one party (FedAvg): the client trains alone and says when it is done
            limit = self.timeout * max(1, len(turn.steps))
            ans = self._acks([client], limit, rid)
            if client in ans and ans[client].get("ok"):
                return True
            self._skip(rnd, client, f"{turn.mode} turn", f"no answer within {limit:g} s" if client not in ans
                       else f"its turn failed: {ans[client].get('why')}")
            return False
        ok, why = self.run_turn(turn, client, model)
        if not ok:
            self._skip(rnd, client, f"{turn.mode} turn", why)
        return ok

    def lend(self, rnd: Round, holder: str, client: str) -> bool:
        """Evaluation on another site's test rows: the run's model (``holder``'s weights) goes to
        ``client`` by way of this coordinator, kept there for that one turn (its own weights stay
        as they are); metered as evaluation traffic. False (the site is skipped) if they did not
        get there."""
        rid = next(self._requests)
        with self._metering(True):
            try:
                self._command(holder, request=rid, do="send", to=self.name, evaluation=True)
                got = self._take_weights([holder], rid, self.timeout).get(holder)
            except TransportError:
                got = None
            if got is None:
                self._skip(rnd, holder, "evaluation", f"its weights did not come within {self.timeout:g} s; "
                                                      f"{client}'s test rows are not scored")
                return False
            rid = next(self._requests)
            try:
                self._command(client, request=rid, do="load", evaluation=True, lend=True, **{"from": self.name})
                self.link.send(Message(Kind.WEIGHTS, self.name, client, rid, "weights", got.tensors))
            except TransportError as e:
                self._skip(rnd, client, "evaluation", f"cannot reach it: {e}")
                return False
            ans = self._acks([client], 2 * self.timeout, rid, has="loaded")
        if ans.get(client, {}).get("loaded") != self.name:
            self._skip(rnd, client, "evaluation", f"the weights of {holder}: {_not_loaded(ans.get(client), client)}")
            return False
        return True

    def handoff(self, rnd: Round, holder: str, client: str) -> bool:
        """Sequential: the latest weights go from ``holder`` to ``client`` (peer-to-peer between ring
        neighbours, else through this coordinator). False if ``client`` does not answer (its turn is
        skipped); if only the holder fails, the client trains on from its own weights (reported)."""
        peer = holder in self.strategy.weight_senders(self.plan, client)
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
        ans = self._acks([client], 2 * self.timeout, rid)
        if client not in ans:  # the client itself waits up to one timeout for the weights
            self._skip(rnd, client, "hand-off", f"no answer within {2 * self.timeout:g} s; its turn is skipped")
            return False
        if ans[client].get("loaded") is None:
            self._skip(rnd, holder, "hand-off", f"{_not_loaded(ans[client], client)}; {client} trains on from its own")
        return True

    def download(self, rnd: Round, names: list[str], evaluation: bool = False) -> list[str]:
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
            ready = self._acks(list(requests), self.timeout, requests, has="ready")
            requests = {c: r for c, r in requests.items() if c in ready}
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
        ans = self._acks(list(requests), self.timeout, requests, has="loaded")
        what = "evaluation download" if evaluation else "download"
        loaded = []
        for c in names:
            if c not in ans:
                if c in requests:
                    self._skip(rnd, c, what, f"no answer within {self.timeout:g} s")
            elif ans[c].get("loaded") != self.federation:
                self._skip(rnd, c, what, f"the federation's weights: {_not_loaded(ans[c], c)}")
            else:
                loaded.append(c)
        return loaded

    def average(self, rnd: Round, done: list[str]) -> list[str]:
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
        refused: dict = {}
        if self.federation == self.name:
            got, refused = self.collect(sending, samples, rid)
        else:
            try:
                self._command(self.federation, request=rid, do="collect", clients=sending, samples=samples)
            except TransportError as e:
                self._skip(rnd, self.federation, "averaging", f"cannot reach the federation: {e}")
                return []
            ans = self._acks([self.federation], 2 * self.timeout, rid)
            if self.federation not in ans:
                self._skip(rnd, self.federation, "averaging", f"the federation did not answer within "
                                                              f"{2 * self.timeout:g} s")
                return []
            got = ans[self.federation].get("averaged")
            got = [c for c in got if c in sending] if isinstance(got, list) else []
            refused = ans[self.federation].get("refused")
            refused = refused if isinstance(refused, dict) else {}
        for c in sending:
            if c in refused:  # it is there, and sent what the federation refused: skipped at once
                self._skip(rnd, c, "averaging", f"its weights were refused by {self.federation}: {quote(refused[c])}")
            elif c not in got:
                self._skip(rnd, c, "averaging", f"its weights did not come within {self.timeout:g} s")
        return got

    def merge_copies_everywhere(self, clients: list[str], samples: list[int]) -> None:
        """SplitFed v1: every fixed party (this one too) merges the round's copies of its segments."""
        if self.setup is not None:
            self.merge_copies(clients, samples)
        for p in self.plan.parties:
            if p not in (self.spec.template, self.name):
                self._command(p, do="merge_copies", clients=clients, samples=samples)


def schema_difference(a: dict, b: dict, who_a: str, who_b: str) -> str:
    """The first difference of two data schemas, naming both parties, the field and both values."""
    a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
    for f in sorted(set(a) | set(b)):
        if f not in a or f not in b:
            return f"{who_a if f in a else who_b} holds field {f!r}, {who_b if f in a else who_a} does not"
        for k in sorted(set(a[f]) | set(b[f])):
            va, vb = a[f].get(k), b[f].get(k)
            if va != vb:
                if k == "columns" and isinstance(va, list) and isinstance(vb, list):
                    extra = [c for c in vb if c not in va][:3] or [c for c in va if c not in vb][:3]
                    at = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
                    return (f"the data of {who_b} differs from {who_a}'s in field {f!r}: column {at} is "
                            f"{quote(vb[at] if at < len(vb) else None)} at {who_b} and "
                            f"{quote(va[at] if at < len(va) else None)} at {who_a} (columns only one has: {extra})")
                return (f"the data of {who_b} differs from {who_a}'s in field {f!r}: its {k} is {quote(vb)} at "
                        f"{who_b} and {quote(va)} at {who_a}")
    return f"the data of {who_b} differs from {who_a}'s"


def make_role(plan: Plan, name: str, transport: Transport, setup: PartySetup | None = None, **kw: Any) -> Role:
    """The role physical party ``name`` plays: the coordinator, or a follower."""
    cls = Coordinator if name == coordinator_of(plan) else Follower
    return cls(plan, name, transport, setup, **kw)


def _not_loaded(info: dict | None, client: str) -> str:
    """Why weights did not get into ``client``, from its acknowledgement: refused (and why), or not come."""
    info = info if isinstance(info, dict) else {}
    if info.get("refused") is not None:
        return f"{client} refused them: {quote(info.get('why'))}"
    if info.get("missing") is not None:
        return f"they did not reach {client} within {client}'s timeout"
    return f"{client} did not say it loaded them ({quote(info)})"


def _classify(data: bytes) -> str:
    """Commands, acknowledgements and weights are the schedule's; everything else belongs to a turn."""
    return "control" if m.kind_of(data) in (None, Kind.STEP, Kind.ACK, Kind.WEIGHTS) else "session"


def _segments_of(graph, party: str) -> list[str]:
    return [n for n in graph.local_order(party) if graph.nodes[n].kind == "segment"]


def _build(plan: Plan, segment: str) -> nn.Module:
    from ..models import build_segment

    return build_segment(plan, segment)


def _labels(plan: Plan, setup: PartySetup) -> np.ndarray | None:
    """Class labels of the training rows for a Dirichlet partition: the template's field that a
    classification loss takes as its target (None for an iid partition: no labels needed)."""
    from ..run.setup import party_table

    spec = plan.clients
    if spec.partition.kind != "dirichlet":
        return None
    holds = plan.parties[spec.template].holds
    fields = [holds[t.split(".", 1)[1]].field for t in (loss.target for loss in plan.losses.values()
                                                        if losses.is_classification(loss.kind))
              if t.split(".", 1)[0] == spec.template and t.split(".", 1)[1] in holds]
    if not fields:
        return None
    table = party_table(plan, spec.template).align(setup.splits.ids)
    y = np.asarray(table.fields.get(fields[0]))
    return y.reshape(len(y), -1)[:, 0][setup.splits.train] if y.dtype.kind in "iub" else None
