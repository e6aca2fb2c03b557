"""Plans: the parties, their data, the segments they own and the losses, as validated data.

A plan is written in TOML (see ``examples/``) or built in Python with the same fields::

    plan = Plan.model_validate({"name": "vanilla", "parties": {...}, ...})

Structural checks that need the whole graph (cycles, dangling inputs, label wires) live in
:mod:`splitlearn.core.graph`; the entries, each checked on its own, and the plan's error
(:class:`~splitlearn.core.specs.PlanError`) in :mod:`splitlearn.core.specs` (import them from there);
this module checks what needs several of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import (Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# the entries' types (core/specs.py), those a plan holds
from .specs import DataSpec, LossSpec, NetworkSpec, PartySpec, PlanError, SegmentSpec
from .trainspec import PartitionSpec, TrainSpec
from .wirespec import WireSpec
from .specs import Strict as _Strict

__all__ = ["Plan", "ClientsSpec", "parse_plan", "plan_hash", "plan_parts", "plan_value", "differing_entries",
           "from_validation_error", "plan_dir", "beside_plan", "per_client", "with_clients", "STEP_TIMEOUT_S"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
STEP_TIMEOUT_S = 120.0  # seconds a step may take where neither the caller nor the plan says (every plan)


class ClientsSpec(_Strict):
    """Horizontal clients: ``count`` copies of the plan party ``template`` (named ``template-1``,
    ``template-2``, ...), each holding its own share of the training rows.

    ``schedule`` names a strategy registered in :data:`splitlearn.core.strategy.STRATEGIES`; the
    built-ins (:mod:`splitlearn.clients.strategies`): ``sequential`` (one client at a time; its
    weights go to the next one, ``handoff`` peer-to-peer or through the coordinator),
    ``splitfed_v1`` / ``splitfed_v2`` (every client trains each round; client halves averaged by
    the ``federation`` role; v1 keeps a server copy per client, averaged too, v2 one shared
    server), ``independent`` (no sharing), ``fedavg`` (the same averaging rounds, named for
    plans where the client holds the whole model; ``local_steps = 1`` makes it large-batch SGD).
    ``options`` (``[clients.options]``) go to the strategy, which checks them. ``secure_aggregation``:
    an averaging schedule's federation receives masked weights and recovers only their weighted
    average (:mod:`splitlearn.privacy.secagg`); ``secure_threshold``: the clients whose shares it
    needs to unmask a round (:meth:`secure_floor`: default ceil(2n/3) of the n clients a round draws).
    """

    template: str
    count: int = Field(ge=1, le=100_000)
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    schedule: str = "sequential"  # a registered strategy's name
    handoff: Literal["peer", "server"] = "peer"
    federation: str | None = None  # who averages: a party of the plan, or a name of its own (a separate role)
    local_epochs: int = Field(1, ge=1)  # averaging schedules: passes over the client's rows per round
    local_steps: int | None = Field(None, ge=1)  # averaging schedules: batches per round instead (1 = large-batch SGD)
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # averaging schedules: share of clients drawn each round
    timeout: float = Field(30.0, gt=0.0)  # seconds a client may take to answer before it is skipped
    options: dict[str, Any] = Field(default_factory=dict)  # [clients.options]: the strategy's own, checked by it
    secure_aggregation: bool = False  # averaging schedules: the federation sees masked weights, only their average
    secure_threshold: int | None = Field(None, ge=2)  # secure aggregation: shares needed to unmask a round

    @field_validator("partition", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v  # `partition = "iid"`

    @field_validator("schedule")
    @classmethod
    def _registered(cls, v: str) -> str:
        from .strategy import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown schedule {v!r}; registered: {sorted(STRATEGIES.names())}")
        return v

    @field_validator("options")
    @classmethod
    def _strategy_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from .strategy import STRATEGIES

        if info.data.get("schedule") in STRATEGIES:  # else the schedule's own error says why
            STRATEGIES.get(info.data["schedule"]).check_options(v)
        return v

    @field_validator("secure_aggregation")
    @classmethod
    def _averaging(cls, v: bool, info: ValidationInfo) -> bool:
        """Secure aggregation needs a schedule that averages and two clients a round at least."""
        from .strategy import STRATEGIES

        d = info.data
        if not v or "count" not in d or d.get("schedule") not in STRATEGIES:  # else their own errors say why
            return v
        if not getattr(STRATEGIES.get(d["schedule"]), "averages", False):
            raise ValueError(f"schedule {d['schedule']!r} does not average the clients' weights, so there is no sum "
                             "to protect: use splitfed_v1, splitfed_v2 or fedavg, or remove secure_aggregation")
        drawn = _drawn(d)
        if drawn < 2:
            raise ValueError(f"a round draws {drawn} client (count {d['count']}, fraction {d.get('fraction', 1.0):g}), "
                             "and of one client the sum is its update: draw 2 or more")
        return v

    @field_validator("secure_threshold")
    @classmethod
    def _threshold(cls, v: int | None, info: ValidationInfo) -> int | None:
        """At least ceil(2n/3) of the n clients a round draws (a federation telling different clients that
        different ones dropped, with fewer than n/3 colluding clients, cannot unmask one) and at most n."""
        d = info.data
        if v is None or "count" not in d or "secure_aggregation" not in d:
            return v
        if not d["secure_aggregation"]:
            raise ValueError("secure_threshold is for secure_aggregation = true: set that too, or remove it")
        drawn = _drawn(d)
        least = max(2, -(-2 * drawn // 3))
        if not least <= v <= drawn:
            raise ValueError(f"{v} with {drawn} clients a round: it must be at least two thirds of them and at most "
                             f"all ({least} to {drawn}); above, no round could be unmasked, below, a federation lying "
                             "about who dropped, helped by fewer than a third of the clients, could unmask one "
                             "client's weights")
        return v

    @model_serializer(mode="wrap")
    def _secure_if_set(self, handler: Callable[["ClientsSpec"], dict[str, Any]]) -> dict[str, Any]:
        """The secure aggregation entries are written only where set (a plan without them hashes as before)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ("secure_aggregation", "secure_threshold") and not v)}

    def names(self) -> list[str]:
        """The clients' party names: ``template-1`` ... ``template-count``."""
        return list(_client_names(self.template, self.count))

    def is_client(self, name: str) -> bool:
        """Whether ``name`` is one of :meth:`names` (asked for every party, every turn: not a list search)."""
        return name in _client_set(self.template, self.count)

    def secure_floor(self) -> int:
        """The threshold of every round of secure aggregation: ``secure_threshold``, else ceil(2n/3) (at
        least 2) of the n clients a round draws; the federation asks it, every client insists on it."""
        return self.secure_threshold or max(2, -(-2 * _drawn({"count": self.count, "fraction": self.fraction}) // 3))


@functools.lru_cache(maxsize=16)
def _client_names(template: str, count: int) -> tuple[str, ...]:
    return tuple(f"{template}-{k}" for k in range(1, count + 1))


@functools.lru_cache(maxsize=16)
def _client_set(template: str, count: int) -> frozenset[str]:
    return frozenset(_client_names(template, count))


def _drawn(fields: dict[str, Any]) -> int:
    """Clients a round of an averaging schedule draws, as :func:`splitlearn.clients.schedule.averaging_rounds` does."""
    return max(1, round(fields.get("fraction", 1.0) * fields["count"]))


class Plan(_Strict):
    """A split learning plan: a directed acyclic graph of inputs, segments and losses."""

    name: str
    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    parties: dict[str, PartySpec] = Field(min_length=1)
    networks: dict[str, NetworkSpec] = Field(min_length=1)
    segments: dict[str, SegmentSpec] = Field(min_length=1)
    losses: dict[str, LossSpec] = Field(min_length=1)
    wires: dict[str, WireSpec] = Field(default_factory=dict)
    clients: ClientsSpec | None = None  # horizontal clients played by one party of the plan
    _source: Path | None = PrivateAttr(default=None)  # the TOML file, for relative data paths

    @model_validator(mode="after")
    def _names(self) -> "Plan":
        for table in ("parties", "networks", "segments", "losses"):
            for key in getattr(self, table):
                if not _NAME.match(key):
                    raise ValueError(f"{table} name {key!r} must be letters, digits, '_' or '-' (no dots)")
        lower = [p.lower() for p in self.parties]
        if "ca" in lower or len(set(lower)) < len(lower):
            raise ValueError("party names must differ in more than case and may not be 'ca' "
                             "(certificates are named after parties, and the authority's is ca.pem)")
        for p, spec in self.parties.items():
            if spec.data is not None and spec.data.align != "exact":
                raise ValueError(f"parties.{p}.data.align: alignment is one for all parties: set it in [data]")
            if spec.data is not None and "{client}" in (spec.data.path or "") and (
                    self.clients is None or p != self.clients.template):
                raise ValueError(f"parties.{p}.data.path names {{client}}, which only a [clients] template's data can")
        if "{client}" in (self.data.path or ""):
            raise ValueError("data.path names {client}: give the pattern in the template's own data "
                             "([parties.TEMPLATE.data])")
        clash = set(self.segments) & set(self.losses)
        if clash:
            raise ValueError(f"names used for both a segment and a loss: {sorted(clash)}")
        c = self.clients
        if c is not None:
            if c.template not in self.parties:
                raise ValueError(f"clients.template {c.template!r} is not a party of the plan ({sorted(self.parties)})")
            client = re.compile(rf"^{re.escape(c.template.lower())}-([1-9][0-9]*)$")
            for other in [*self.parties, c.federation or ""]:
                m = client.match(other.lower())
                if m and int(m.group(1)) <= c.count:
                    raise ValueError(f"{other!r} is also the name of a client ({c.template}-1 ... {c.template}-{c.count})")
            if (c.federation or "").lower() == "ca":
                raise ValueError("clients.federation may not be 'ca' (the certificate authority's file is ca.pem)")
            if c.federation is not None and not _NAME.match(c.federation):
                raise ValueError(f"clients.federation {c.federation!r} must be letters, digits, '_' or '-'")
            if c.federation == c.template:
                raise ValueError("clients.federation cannot be the client template: name the server or a role of its own")
            if self.train.checkpoint_every is not None:  # never silently ignored
                raise ValueError("train.checkpoint_every: a [clients] plan takes its checkpoints at the end of every "
                                 "round (on the coordinator's word), not every N steps; remove it")
            for entry, value in (("train.early_stop", self.train.early_stop),
                                 ("data.validation_fraction", self.data.validation_fraction)):
                if value is not None:
                    raise ValueError(f"{entry} is for plain plans; a [clients] plan scores its test rows every round, "
                                     "and its clients hold no validation rows: remove it")
            for p, spec in self.parties.items():
                if spec.data is not None and "{client}" in (spec.data.path or "") and p != c.template:
                    raise ValueError(f"parties.{p}.data.path names {{client}}, but {p!r} is no client template: "
                                     f"only the data of {c.template!r} can be read per client")
            if c.local_steps is None and self.train.epochs % c.local_epochs:
                raise ValueError(f"clients.local_epochs ({c.local_epochs}) must divide train.epochs ({self.train.epochs}): "
                                 "a round is local_epochs passes")
            for p, spec in self.parties.items():  # learning-rate schedules the rounds would silently bend
                sched = spec.optimizer.schedule
                if sched is not None and sched.every == "epoch" and c.local_steps is None and c.local_epochs > 1:
                    raise ValueError(f"parties.{p}.optimizer.schedule: every = \"epoch\" with clients.local_epochs = "
                                     f"{c.local_epochs} would step once per round, not per epoch: use every = \"step\"")
                if sched is not None and p != c.template and c.schedule == "splitfed_v1":
                    raise ValueError(f"parties.{p}.optimizer.schedule: under splitfed_v1 {p}'s copies are made anew "
                                     "every round, so their schedule would start over each round: schedule the "
                                     "clients' optimizer, or use splitfed_v2")
        if self.train.clip == "global":  # one clipping per step: the network's, or each party's own
            own = [p for p, spec in self.parties.items() if spec.optimizer.clip_grad_norm is not None]
            if own:
                raise ValueError(f"parties.{own[0]}.optimizer.clip_grad_norm with train.clip = \"global\": the "
                                 "network clips every party's gradients together; remove the party's own clipping")
        from .stopping import check_plan as check_stopping

        check_stopping(self)  # validation rows and early stopping: what they need of the rest of the plan
        grouped = {"train.pipeline": self.train.pipeline, "train.accumulate": self.train.accumulate}
        for name, loss in self.losses.items():
            over = [f"{k} = {v}" for k, v in grouped.items() if v > 1]
            if loss.class_weights is not None and over:  # torch divides by each batch's sum of weights
                raise ValueError(f"losses.{name}.class_weights with {', '.join(over)}: a weighted mean over each part "
                                 "of a batch is not the whole batch's, so the gradients would not be the batch's; "
                                 "train without splitting the batch, or without class_weights")
        return self

    def step_timeout_s(self, given: float | None = None) -> float:
        """Seconds one step may take as a whole before a party gives up, for every launcher and participant:
        ``given`` (``train(timeout=)``, ``--step-timeout``), else ``[train] step_timeout``, else
        :data:`STEP_TIMEOUT_S`, whatever the schedule (``clients.timeout`` bounds a coordinator's
        wait for an answer, never a step)."""
        if given is not None:
            return given
        return self.train.step_timeout if self.train.step_timeout is not None else STEP_TIMEOUT_S

    def reads_for(self, party: str) -> str | None:
        """The client whose rows plan party ``party`` reads when the plan is checked end to end before a run
        (:func:`~splitlearn.run.setup.prepare`): the first client's file for a template whose clients each read
        their own (:func:`per_client`); None for every other party (its own rows)."""
        c = self.clients
        return f"{c.template}-1" if c is not None and party == c.template and per_client(self) else None

    def check_target_scaling(self, entry: str) -> None:
        """``standardize_target`` fits one scale on the rows of the party that holds the target: a ``[clients]``
        plan, whose clients would each fit their own, refuses it (PlanError naming ``entry``)."""
        if self.clients is not None:
            raise PlanError("standardize_target is not available in a [clients] plan yet: each client would fit its "
                            "own scale on its own rows", entry=entry, hint="remove the option, or train without "
                            "[clients]")

    def check_secure_sum(self, entry: str) -> None:
        """A secure sum (``merge = "secure_sum"``, :mod:`~splitlearn.core.securesum`) masks the vertical parties of
        one session: a ``[clients]`` plan, whose turns it is not built for, refuses it (PlanError naming ``entry``)."""
        if self.clients is not None:
            raise PlanError("a secure sum masks the activations of vertical parties of one run; a [clients] plan's "
                            "turns are not supported", entry=entry, hint='write merge = "sum"')

    def with_clients(self, **changes: Any) -> "Plan":
        """A copy whose ``[clients]`` is the plan's own with ``changes`` (a plan without one: new clients with
        ``changes``, which must name the ``template``)."""
        base = self.clients.model_dump() if self.clients is not None else {}
        return self.replace(clients=ClientsSpec.model_validate({**base, **changes}))._checked()

    def with_train(self, **changes: Any) -> "Plan":
        """A copy with the training settings that are not None changed (``epochs``, ``seed``, ...)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        try:
            train = TrainSpec.model_validate({**self.train.model_dump(), **changes})
        except ValidationError as e:
            err = from_validation_error(e)
            raise PlanError(err.message, entry=f"train.{err.entry}" if err.entry else "train", hint=err.hint) from None
        return self.replace(train=train)._checked()

    def replace(self, **fields: Any) -> "Plan":
        """A copy with some top-level fields replaced (each an entry already validated), remembering the file it came
        from: for the plans the package derives (the plan a finished run predicts with, a baseline), which are not
        checked again; a change a user asks for goes through :meth:`with_train` or :meth:`with_clients`, which are."""
        plan = self.model_copy(update=fields)
        plan._source = self._source
        return plan

    def _checked(self) -> "Plan":
        """This plan, once the checks across its entries pass as when it is read (a PlanError naming the entry)."""
        try:
            self._names()
        except ValueError as e:
            raise PlanError(str(e), hint="the plan was changed in Python") from None
        return self


_DEPLOYMENT = {"parties": {"__all__": {"address", "dial_out", "data", "device"}}, "train": {"step_timeout"}}


_HASHING = threading.Lock()
_HASHED: dict[int, tuple[weakref.ref, dict]] = {}  # id -> (the plan, weakly: it may hold the user's data and
# modules; its hash and parts): the last few plans hashed


def _hashed(plan: Plan) -> dict:
    """What :func:`plan_hash` and :func:`plan_parts` computed for this very plan object (a plan is frozen; every
    session of a [clients] run says both in each of its hellos)."""
    with _HASHING:
        got = _HASHED.get(id(plan))
        if got is None or got[0]() is not plan:  # (a dead reference never matches an id used again)
            if len(_HASHED) >= 8:
                _HASHED.pop(next(iter(_HASHED)))
            got = _HASHED[id(plan)] = (weakref.ref(plan), {})
        return got[1]


def plan_hash(plan: Plan) -> str:
    """A stable hash of everything that shapes the computation (parties must agree on it).

    Where parties run (addresses, who dials, devices), where each reads its own data and how long each
    waits for a step (``--step-timeout`` may differ per party anyway) are left out.
    """
    known = _hashed(plan)
    if "hash" not in known:
        body = json.dumps(plan.model_dump(mode="json", exclude=_DEPLOYMENT), sort_keys=True, separators=(",", ":"))
        known["hash"] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return known["hash"]


def plan_parts(plan: Plan, depth: int = 3) -> dict[str, str]:
    """The hashed body of :func:`plan_hash` entry by entry (``train.epochs``, ``parties.clinic.optimizer``,
    down to ``depth`` levels): parties whose plans differ can name the entries that differ."""
    known = _hashed(plan)
    if ("parts", depth) not in known:
        known[("parts", depth)] = _parts(plan, depth)
    return dict(known[("parts", depth)])


def _parts(plan: Plan, depth: int) -> dict[str, str]:
    body = plan.model_dump(mode="json", exclude=_DEPLOYMENT)
    out: dict[str, str] = {}

    def walk(value: Any, path: str, level: int) -> None:
        if isinstance(value, dict) and value and level < depth:
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), level + 1)
            return
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        out[path] = hashlib.sha256(text.encode()).hexdigest()[:8]

    walk(body, "", 0)
    return out


def plan_value(plan: Plan, entry: str) -> Any:
    """The value of a dotted entry of the plan as :func:`plan_parts` names it (None when absent)."""
    value: Any = plan.model_dump(mode="json", exclude=_DEPLOYMENT)
    for key in entry.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def differing_entries(ours: dict[str, str], theirs: Any) -> list[str]:
    """The entries whose hashes differ, or that one side has and the other lacks (sorted); [] if ``theirs``
    is not a mapping of entries to hashes."""
    if not isinstance(theirs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in theirs.items()):
        return []
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def _entry(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "tagged-")))


def _problem(e: dict[str, Any]) -> tuple[str, str, str]:
    """(entry, message, hint) of one pydantic error."""
    entry = _entry(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    hint = ""
    if e["type"] == "extra_forbidden":
        msg, hint = f"unknown key '{entry.rsplit('.', 1)[-1]}'", "remove it or check its spelling (see docs/plans.md)"
    elif e["type"] == "missing":
        msg, hint = "required entry is missing", "add it (see examples/ for complete plans)"
    return entry, msg, hint


def from_validation_error(err: ValidationError, file: str | Path | None = None) -> PlanError:
    """Every problem of a pydantic error at once, as a PlanError naming the first entry (and each
    further problem with its own entry on a line of its own)."""
    problems = [_problem(e) for e in err.errors()]
    entry, msg, hint = problems[0]
    if len(problems) > 1:
        more = "".join(f"\n  - entry '{en}': {m}" + (f" ({h})" if h else "") for en, m, h in problems[1:])
        msg = f"{msg}\n  and {len(problems) - 1} more problem(s):{more}"
    return PlanError(msg, entry=entry, hint=hint, file=file)


def parse_plan(source: str | Path | dict[str, Any] | Plan) -> Plan:
    """Read and validate a plan from a TOML file, a dict or an existing :class:`Plan`, entry by
    entry (:func:`splitlearn.core.load.load_plan` checks its graph too). Raises :class:`PlanError`
    naming the file and entry on any problem."""

    file: Path | None = None
    if isinstance(source, Plan):
        plan = source
    else:
        if isinstance(source, (str, Path)):
            file = Path(source)
            if not file.is_file():
                raise PlanError("no such plan file", hint="give the path of a .toml plan, e.g. examples/vanilla.toml", file=file)
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise PlanError(f"not valid TOML: {e}", hint="fix the syntax at the line shown", file=file) from None
            data.setdefault("name", file.stem)
        else:
            data = source
        try:
            plan = Plan.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e, file) from None
    if file is not None:
        plan._source = file
    return plan


def plan_dir(plan: Plan) -> Path | None:
    """The folder of the plan file, for resolving relative data paths (None if built in Python)."""
    return plan._source.parent if plan._source else None


def beside_plan(plan: Plan, path: str | Path) -> Path:
    """``path`` (a model folder, a tokenizer) as the plan means it: a relative one from the plan file's folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or plan_dir(plan) is None else plan_dir(plan) / path


def with_clients(plan: Plan) -> bool:
    """Whether the plan has a ``[clients]`` section (its template party played by many clients in turns)."""
    return plan.clients is not None


def per_client(plan: Plan) -> bool:
    """Whether each client reads its own file (its template's data path names ``{client}``)."""
    spec = plan.clients
    data = plan.parties[spec.template].data if spec is not None else None
    return data is not None and "{client}" in (data.path or "")
