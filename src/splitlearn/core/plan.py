"""Plans: the parties, their data, the segments they own and the losses, as validated data.

A plan is written in TOML (see ``examples/``) or built in Python with the same fields::

    plan = Plan.model_validate({"name": "vanilla", "parties": {...}, ...})

Structural checks that need the whole graph (cycles, dangling inputs, label wires) live in
:mod:`splitlearn.core.graph`; this module checks each entry on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer,
                      model_validator)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Plan", "PlanError", "ClientsSpec", "parse_plan", "plan_hash", "per_client"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class PlanError(ValueError):
    """A plan that cannot run, with where (file, entry) and what to change."""

    def __init__(self, message: str, *, entry: str = "", hint: str = "", file: str | Path | None = None):
        self.message, self.entry, self.hint = message, entry, hint
        self.file = str(file) if file else None
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "plan"
        if self.entry:
            where += f", entry '{self.entry}'"
        text = f"{where}: {self.message}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")

    def in_file(self, file: str | Path | None) -> "PlanError":
        """The same error, naming the plan file."""
        return PlanError(self.message, entry=self.entry, hint=self.hint, file=file or self.file)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """Where rows come from: an embedded dataset or a file the user already has.

    ``path`` may name each client's own file with ``{client}`` (``"data/{client}.csv"``) in the
    data of a ``[clients]`` template. ``align`` (the plan's ``[data]``) says how the parties'
    rows are matched: ``exact`` (every party holds the same ids) or ``psi`` (private set
    intersection: only the ids every party holds are kept, and no party learns the others' other ids).
    """

    dataset: Literal["digits", "breast_cancer", "wine", "diabetes", "synthetic", "mnist", "csv", "parquet", "npz", "images",
                     "arrays"] = "digits"
    path: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    align: Literal["exact", "psi"] = "exact"
    options: dict[str, Any] = Field(default_factory=dict)
    _table: Any = PrivateAttr(default=None)  # dataset "arrays": the rows given in Python (splitlearn.split)

    @classmethod
    def of_arrays(cls, fields: dict[str, Any], test_fraction: float = 0.2) -> "DataSpec":
        """Rows given in Python as arrays or tensors of equal length (``{"x": X, "y": y}``), ids 0..n-1."""
        from ..data import DataError, Table
        import numpy as np

        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                  for k, v in fields.items()}
        lengths = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
        if len(set(lengths.values())) != 1 or not min(lengths.values()):
            raise DataError(f"the arrays must have the same, non-zero number of rows; got {lengths}")
        spec = cls(dataset="arrays", test_fraction=test_fraction)
        spec._table = Table(np.arange(next(iter(lengths.values())), dtype=np.int64), arrays)
        return spec


def _half_open(v: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if v is not None and not (0 <= v[0] < v[1]):
        raise ValueError(f"{what} must be [start, stop) with 0 <= start < stop, got {list(v)}")
    return v


class FieldRef(_Strict):
    """A field of the party's data, optionally a range ``[start, stop)`` of its feature columns."""

    field: str
    columns: tuple[int, int] | None = None

    @field_validator("columns")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return _half_open(v, "columns")


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class ResourcesSpec(_Strict):
    """What a party's process asks of a Ray cluster (``splitlearn run --ray``)."""

    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float | None = Field(None, ge=0.0)


class PartySpec(_Strict):
    """One party: the data fields it holds (local name -> field) and its optimizer."""

    holds: dict[str, FieldRef] = Field(default_factory=dict)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec | None = None  # the party's own rows (default: the plan's [data], a simulation)
    address: str | None = Field(None, pattern=r"^[\w.\-\[\]:]+:\d+$")  # where it listens ("host:port")
    dial_out: bool = False  # behind a firewall: it connects to its neighbours, never listens
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")  # where it computes (auto: cuda if present)
    resources: ResourcesSpec | None = None  # asked of a Ray cluster for its process (each client's, for a template)

    @model_validator(mode="before")
    @classmethod
    def _source_is_data(cls, v: Any) -> Any:
        # `source` is the earlier name of `data`
        if isinstance(v, dict) and "source" in v and "data" not in v:
            v = {("data" if k == "source" else k): x for k, x in v.items()}
        return v

    @field_validator("holds", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `holds = { x = "x" }` is short for `holds = { x = { field = "x" } }`
        if isinstance(v, dict):
            return {k: ({"field": f} if isinstance(f, str) else f) for k, f in v.items()}
        return v


class NetworkSpec(_Strict):
    """A network from the model zoo (``zoo``), a user factory ``package.module:function``, or,
    in Python, an object: an ``nn.Module`` or a callable returning one (``python`` then names it).

    ``networks = {"net": model}`` and ``{"net": {"factory": make, "args": {...}}}`` are accepted
    where a plan is built in Python. A callable importable by its qualified name is also recorded
    as ``factory`` (so party processes and ``predict`` can rebuild it); anything else lives only
    in this process and ``python`` describes it in ``plan.json``.
    """

    zoo: str | None = None
    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    python: str | None = None  # a Python object given in place of a factory: what it is (the object is private)
    _object: Any = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _objects(cls, data: Any, handler: Callable[[Any], "NetworkSpec"]) -> "NetworkSpec":
        obj = None
        if callable(data) and not isinstance(data, BaseModel):
            data, obj = {}, data
        elif isinstance(data, dict) and callable(data.get("factory")):
            data = dict(data)
            obj = data.pop("factory")
        if obj is None:
            return handler(data)
        if "python" in data or "zoo" in data:
            raise ValueError("give a Python object alone, not with 'zoo' or 'python'")
        if _is_module(obj) and data.get("args"):
            raise ValueError(f"'args' are given to a factory, but {type(obj).__name__} is an nn.Module object")
        name = None if _is_module(obj) else importable_name(obj)
        data = {**data, "factory": name} if name else {**data, "python": describe(obj)}
        spec = handler(data)
        spec._object = obj
        return spec

    @model_validator(mode="after")
    def _one_source(self) -> "NetworkSpec":
        if sum(x is not None for x in (self.zoo, self.factory, self.python)) != 1:
            raise ValueError("give exactly one of 'zoo' (a model-zoo name) or 'factory' ('package.module:function')")
        if self.factory is not None and not re.match(r"^[\w.]+:[\w]+$", self.factory):
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        if self.factory is not None and self.factory.split(":")[0] == "__main__" and self._object is None:
            raise ValueError(f"factory {self.factory!r} lives in the script being run, which other processes cannot "
                             "import: put it in a module next to the plan, or pass the function itself in Python")
        return self


def _is_module(obj: Any) -> bool:
    return any(c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module" for c in type(obj).__mro__)


def describe(obj: Any) -> str:
    """How ``plan.json`` names a Python object given as a network."""
    if _is_module(obj):
        return f"{type(obj).__module__}.{type(obj).__qualname__} object"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def importable_name(fn: Any) -> str | None:
    """``module:name`` if ``fn`` is a top-level function or class that importing finds again."""
    import importlib

    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not re.match(r"^\w+$", name or ""):
        return None
    from ..models.build import refused_factory_package

    if refused_factory_package(module):  # torch's own classes: a plan file could not name them either
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - not importable: it stays an in-process object
        return None
    return f"{module}:{name}" if found is fn else None


class SegmentSpec(_Strict):
    """Layers ``[start, stop)`` of a network, run by one party on one or more inputs."""

    party: str
    inputs: list[str] = Field(min_length=1)
    network: str
    layers: tuple[int, int] | None = None  # an nn.Sequential's layers [start, stop)
    cut: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # ends after this submodule
    merge: Literal["concat", "sum", "module"] = "concat"

    @model_validator(mode="after")
    def _one_bound(self) -> "SegmentSpec":
        if self.layers is not None and self.cut is not None:
            raise ValueError("give 'layers' (indices of an nn.Sequential) or 'cut' (a submodule's name), not both")
        return self

    @field_validator("inputs", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return _half_open(v, "layers")


class LossSpec(_Strict):
    """A loss computed where its ``input`` segment runs, against ``target`` (``party.field``)."""

    input: str
    target: str
    kind: str = "cross_entropy"  # a registered loss kind (splitlearn.core.losses)
    weight: float = Field(1.0, gt=0.0)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from .losses import get

        get(v)  # raises ValueError naming the known kinds
        return v


class NoiseSpec(_Strict):
    """Per-sample L2 clipping of the activations to ``clip``, then Gaussian noise of std ``sigma * clip``."""

    clip: float = Field(gt=0.0)
    sigma: float = Field(ge=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class LabelProtectionSpec(_Strict):
    """Noise the label holder adds to the gradients it returns (see :mod:`splitlearn.privacy.labels`)."""

    kind: Literal["marvell", "max_norm"] = "marvell"
    strength: float = Field(1.0, ge=0.0)


class WireSpec(_Strict):
    """Per-wire settings; the wire is named by its source node (segment or ``party.field``).

    Besides the built-in defenses below, a key may name any defense registered in
    :mod:`splitlearn.privacy.defenses` when the plan is validated: its setting is kept in
    ``extra_defenses`` and written back under its own key.
    """

    codec: str = "float32"  # forward
    grad_codec: str = "float32"  # backward
    nopeek: float = Field(0.0, ge=0.0)  # sender adds nopeek * dCor(its raw inputs, the activations) to its loss
    noise: NoiseSpec | None = None  # sender clips and noises the activations it sends
    label_protection: LabelProtectionSpec | None = None  # receiver protects the gradients it returns
    randomized_response: float | None = Field(None, gt=0.0)  # label wires: epsilon of label DP (training only)
    allow_nonfinite: bool = False  # receivers refuse NaN and infinite values unless this is set
    max_abs: float = Field(1e6, gt=0.0)  # receivers refuse activations and gradients larger in magnitude (inf: none)
    # receivers refuse activations and gradients more than this many times larger in magnitude than the
    # largest the wire carried in its first epoch (so far, during it): a bound learnt from the run (0: none)
    max_jump: float = Field(1000.0, ge=0.0)
    extra_defenses: dict[str, Any] = Field(default_factory=dict)  # registered defenses that are no field: key -> setting

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data: Any) -> Any:
        """Keys naming a registered defense that is no field move into ``extra_defenses``."""
        if not isinstance(data, dict):
            return data
        from ..privacy.defenses import DEFENSES

        extra = {k: v for k, v in data.items() if k not in cls.model_fields and k in DEFENSES}
        if not extra:
            return data
        body = {k: v for k, v in data.items() if k not in extra}
        body["extra_defenses"] = {**(body.get("extra_defenses") or {}), **extra}
        return body

    @field_validator("extra_defenses")
    @classmethod
    def _known(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ..privacy.defenses import DEFENSES

        for key in v:
            if key in cls.model_fields or key not in DEFENSES:
                raise ValueError(f"{key!r} is no registered defense (registered: {sorted(DEFENSES)})")
        return v

    @model_serializer(mode="wrap")
    def _flat(self, handler: Callable[["WireSpec"], dict[str, Any]]) -> dict[str, Any]:
        """Registered defenses are written under their own keys, as a plan gives them."""
        data = handler(self)
        extra = data.pop("extra_defenses", None) or {}
        return {**data, **extra}

    @field_validator("codec", "grad_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from ..wire.codec import get_codec

        get_codec(v)  # raises ValueError naming the known codecs
        return v


class TrainSpec(_Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    seed: int = 0
    # a checkpoint every this many training steps (and at every epoch's end) when the run has an --out folder
    checkpoint_every: int | None = Field(None, ge=1)
    # seconds a party waits for a peer whose link broke to come back (over gRPC) before it stops
    reconnect_timeout: float = Field(180.0, ge=0.0)
    # micro-batches per training step, pipelined through the parties (GPipe); the gradients are the whole batch's
    pipeline: int = Field(1, ge=1, le=1024)


class PartitionSpec(_Strict):
    """How the training rows are shared among horizontal clients."""

    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0.0)  # dirichlet: small alpha gives each client few classes


Schedule = Literal["sequential", "splitfed_v1", "splitfed_v2", "independent", "fedavg"]


class ClientsSpec(_Strict):
    """Horizontal clients: ``count`` copies of the plan party ``template`` (named ``template-1``,
    ``template-2``, ...), each holding its own share of the training rows.

    Schedules (see :mod:`splitlearn.clients.schedule`): ``sequential`` (one client at a time; its
    weights go to the next one, ``handoff`` peer-to-peer or through the coordinator),
    ``splitfed_v1`` / ``splitfed_v2`` (every client trains each round; client halves averaged by
    the ``federation`` role; v1 keeps a server copy per client, averaged too, v2 one shared
    server), ``independent`` (no sharing), ``fedavg`` (the same averaging rounds, named for
    plans where the client holds the whole model; ``local_steps = 1`` makes it large-batch SGD).
    """

    template: str
    count: int = Field(ge=1, le=100_000)
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    schedule: Schedule = "sequential"
    handoff: Literal["peer", "server"] = "peer"
    federation: str | None = None  # who averages: a party of the plan, or a name of its own (a separate role)
    local_epochs: int = Field(1, ge=1)  # averaging schedules: passes over the client's rows per round
    local_steps: int | None = Field(None, ge=1)  # averaging schedules: batches per round instead (1 = large-batch SGD)
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # averaging schedules: share of clients drawn each round
    timeout: float = Field(30.0, gt=0.0)  # seconds a client may take to answer before it is skipped

    @field_validator("partition", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v  # `partition = "iid"`

    def names(self) -> list[str]:
        """The clients' party names: ``template-1`` ... ``template-count``."""
        return [f"{self.template}-{k}" for k in range(1, self.count + 1)]


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
            for p, spec in self.parties.items():
                if spec.data is not None and "{client}" in (spec.data.path or "") and p != c.template:
                    raise ValueError(f"parties.{p}.data.path names {{client}}, but {p!r} is no client template: "
                                     f"only the data of {c.template!r} can be read per client")
            if c.local_steps is None and self.train.epochs % c.local_epochs:
                raise ValueError(f"clients.local_epochs ({c.local_epochs}) must divide train.epochs ({self.train.epochs}): "
                                 "a round is local_epochs passes")
        return self

    def with_train(self, **changes: Any) -> "Plan":
        """A copy with the training settings that are not None changed (``epochs``, ``seed``, ...)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        return self.replace(train=self.train.model_copy(update=changes))

    def replace(self, **fields: Any) -> "Plan":
        """A copy with some top-level fields replaced, remembering the file it came from."""
        plan = self.model_copy(update=fields)
        plan._source = self._source
        return plan


_DEPLOYMENT = {"parties": {"__all__": {"address", "dial_out", "data", "device"}}}


def plan_hash(plan: Plan) -> str:
    """A stable hash of everything that shapes the computation (parties must agree on it).

    Where parties run (addresses, who dials, devices) and where each reads its own data are left out.
    """
    body = json.dumps(plan.model_dump(mode="json", exclude=_DEPLOYMENT), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def plan_parts(plan: Plan, depth: int = 3) -> dict[str, str]:
    """The hashed body of :func:`plan_hash` entry by entry (``train.epochs``, ``parties.clinic.optimizer``,
    down to ``depth`` levels): parties whose plans differ can name the entries that differ."""
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


def per_client(plan: Plan) -> bool:
    """Whether each client reads its own file (its template's data path names ``{client}``)."""
    spec = plan.clients
    data = plan.parties[spec.template].data if spec is not None else None
    return data is not None and "{client}" in (data.path or "")
