"""The entries of a plan, each validated on its own: parties and their data, networks, segments,
losses; a party's optimizer, its schedule and clipping come from :mod:`splitlearn.core.optimizing`, wires
(codecs, defenses, bounds) are :mod:`splitlearn.core.wirespec`'s and ``[train]`` :mod:`splitlearn.core.trainspec`'s.

:class:`~splitlearn.core.plan.Plan` puts them together (and checks what needs several of them);
:mod:`splitlearn.core.graph` checks the structure they make. :class:`PlanError`, the error of a plan
anywhere, is defined here too, and :class:`Strict`, every entry's base.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from .augspec import AugmentStep
from .hfspec import HFSpec, LoraSpec
from .optimizing import OptimizerSpec

__all__ = ["PlanError", "Strict", "DataSpec", "FieldRef", "ResourcesSpec", "PartySpec", "NetworkSpec", "SegmentSpec",
           "OutputSpec", "LossSpec", "refused_factory_package", "describe", "importable_name"]


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


class Strict(BaseModel):
    """A plan entry: unknown keys are refused, and a validated entry never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    """Where rows come from: an embedded dataset or a file the user already has.

    ``path`` may name each client's own file with ``{client}`` (``"data/{client}.csv"``) in the
    data of a ``[clients]`` template. ``align`` (the plan's ``[data]``) says how the parties'
    rows are matched: ``exact`` (every party holds the same ids) or ``psi`` (private set
    intersection: only the ids every party holds are kept, and no party learns the others' other ids).
    """

    dataset: Literal["digits", "breast_cancer", "wine", "diabetes", "synthetic", "mnist", "csv", "parquet", "npz", "images",
                     "text", "arrays", "torch"] = "digits"
    path: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # validation rows carved from the training rows (the plan's [data] only): metrics on them every epoch, the
    # best epoch's weights kept (splitlearn.core.stopping); written into the plan only where given
    validation_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    align: Literal["exact", "psi"] = "exact"
    options: dict[str, Any] = Field(default_factory=dict)
    _table: Any = PrivateAttr(default=None)  # dataset "arrays": the rows given in Python (splitlearn.split)
    _source: Any = PrivateAttr(default=None)  # dataset "torch": a Dataset or DataLoader given in Python

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

    @classmethod
    def of_torch(cls, data: Any, test_data: Any = None, test_fraction: float = 0.2) -> "DataSpec":
        """Rows of a map-style ``torch.utils.data.Dataset`` or a ``DataLoader`` over one, streamed
        (:mod:`splitlearn.data.torchdata`): items ``(x, y)`` or dicts of tensors; ``test_data`` (a Dataset or
        DataLoader) the test rows, else ``test_fraction`` of the dataset's positions (a DataLoader needs
        ``test_data``: its sampler draws from every row). In this process only (``launcher="threads"``)."""
        from ..data.torchdata import TorchSource

        spec = cls(dataset="torch", test_fraction=test_fraction)
        spec._source = TorchSource(data, test_data)
        return spec

    @model_serializer(mode="wrap")
    def _validation_if_given(self, handler: Callable[["DataSpec"], dict[str, Any]]) -> dict[str, Any]:
        """``validation_fraction`` is written only where given (a plan without it hashes as before it existed)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "validation_fraction" and v is None)}


def _half_open(v: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if v is not None and not (0 <= v[0] < v[1]):
        raise ValueError(f"{what} must be [start, stop) with 0 <= start < stop, got {list(v)}")
    return v


class FieldRef(Strict):
    """A field of the party's data, optionally a range ``[start, stop)`` of its feature columns."""

    field: str
    columns: tuple[int, int] | None = None

    @field_validator("columns")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return _half_open(v, "columns")


class ResourcesSpec(Strict):
    """What a party's process asks of a Ray cluster (``splitlearn run --ray``)."""

    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float | None = Field(None, ge=0.0)




class PartySpec(Strict):
    """One party: the data fields it holds (local name -> field) and its optimizer.

    ``precision``: ``fp32`` (the default), ``bf16`` (autocast in bfloat16, CPU or CUDA) or ``fp16`` (autocast in
    float16 with loss scaling, CUDA only); the activations it sends travel in that dtype
    (:mod:`splitlearn.core.precision`). Written into the plan only where it is not ``fp32``.

    ``augment``: per field it holds (its local name), image augmentation steps applied in order to its training
    batches only (:mod:`splitlearn.core.augment`). Written into the plan only where given.
    """

    holds: dict[str, FieldRef] = Field(default_factory=dict)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec | None = None  # the party's own rows (default: the plan's [data], a simulation)
    address: str | None = Field(None, pattern=r"^[\w.\-\[\]:]+:\d+$")  # where it listens ("host:port")
    dial_out: bool = False  # behind a firewall: it connects to its neighbours, never listens
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")  # where it computes (auto: cuda if present)
    resources: ResourcesSpec | None = None  # asked of a Ray cluster for its process (each client's, for a template)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of its forward and losses (fp16: CUDA only)
    augment: dict[str, list[AugmentStep]] = Field(default_factory=dict)  # field -> steps (training batches only)

    @model_validator(mode="before")
    @classmethod
    def _source_is_data(cls, v: Any) -> Any:
        # `source` is the earlier name of `data`
        if isinstance(v, dict) and "source" in v and "data" not in v:
            v = {("data" if k == "source" else k): x for k, x in v.items()}
        return v

    @field_validator("precision")
    @classmethod
    def _fp16_on_cuda(cls, v: str, info: ValidationInfo) -> str:
        if v == "fp16" and info.data.get("device") == "cpu":
            raise ValueError('fp16 needs CUDA (autocast with loss scaling), but device is "cpu": use '
                             'precision = "bf16" on the CPU, or device = "cuda"')
        return v

    @field_validator("augment")
    @classmethod
    def _held_images(cls, v: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        holds = info.data.get("holds")
        for f, steps in v.items():
            if holds is None:
                break  # holds itself is wrong: that error is the one to read
            if f not in holds:
                raise ValueError(f"augment names field {f!r}, which this party does not hold; it holds {sorted(holds)}")
            if not steps:
                raise ValueError(f"augment.{f} is an empty list of steps: give steps or remove the entry")
        return v

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Callable[["PartySpec"], dict[str, Any]]) -> dict[str, Any]:
        """``precision`` and ``augment`` are written only where given (a plan without them hashes as before they
        existed)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "precision" and v == "fp32" or k == "augment" and not v)}

    @field_validator("holds", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `holds = { x = "x" }` is short for `holds = { x = { field = "x" } }`
        if isinstance(v, dict):
            return {k: ({"field": f} if isinstance(f, str) else f) for k, f in v.items()}
        return v


class NetworkSpec(Strict):
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
    hf: HFSpec | None = None  # a transformers model folder (core.hfspec); written into the plan only where given
    _object: Any = PrivateAttr(default=None)

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Callable[["NetworkSpec"], dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k == "hf" and v is None)}

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
        if sum(x is not None for x in (self.zoo, self.factory, self.python, self.hf)) != 1:
            raise ValueError("give exactly one of 'zoo' (a model-zoo name), 'factory' ('package.module:function') or "
                             "'hf' (a transformers model folder)")
        if self.factory is not None and not re.match(r"^[\w.]+:[\w]+$", self.factory):
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        if self.factory is not None and self.factory.split(":")[0] == "__main__" and self._object is None:
            raise ValueError(f"factory {self.factory!r} lives in the script being run, which other processes cannot "
                             "import: put it in a module next to the plan, or pass the function itself in Python")
        return self


# Packages whose functions a plan may not call as factories: a plan file is data, and these
# would let it run commands or load pickles (``os:system``, ``torch:load``, ...).
_NOT_FACTORIES = {"torch", "numpy", "scipy", "sklearn", "pandas", "joblib", "dill", "cloudpickle", "safetensors",
                  "grpc", "google", "splitlearn", "typer", "click", "rich", "matplotlib", "pydantic", "cryptography",
                  "pip", "setuptools", "opacus", "IPython"}


def refused_factory_package(module_name: str) -> bool:
    """Whether a plan may not name a factory of this module (the standard library, torch, ...)."""
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names or top in _NOT_FACTORIES


def _is_module(obj: Any) -> bool:
    return any(c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module" for c in type(obj).__mro__)


def describe(obj: Any) -> str:
    """How ``plan.json`` names a Python object given as a network."""
    if _is_module(obj):
        return f"{type(obj).__module__}.{type(obj).__qualname__} object"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def importable_name(fn: Any) -> str | None:
    """``module:name`` if ``fn`` is a top-level function or class that importing finds again."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not re.match(r"^\w+$", name or ""):
        return None
    if refused_factory_package(module):  # torch's own classes: a plan file could not name them either
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - not importable: it stays an in-process object
        return None
    return f"{module}:{name}" if found is fn else None


class OutputSpec(Strict):
    """One element of a segment's tuple or dict output: its ``name`` (a dict's key) and, per dimension that may
    vary from batch to batch (a sequence length), the bound it may reach: ``vary = { 1 = 512 }``. Written as the
    bare name where nothing varies (``outputs = ["hidden", "mask"]``)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    vary: dict[int, int] = Field(default_factory=dict)  # dimension (1.., the batch is 0) -> largest size

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("vary")
    @classmethod
    def _bounds(cls, v: dict[int, int]) -> dict[int, int]:
        for dim, bound in v.items():
            if dim < 1 or bound < 1:
                raise ValueError(f"vary = {{ {dim} = {bound} }}: a dimension after the batch's (1 or more) and a "
                                 "bound of at least 1")
        return v

    @model_serializer(mode="wrap")
    def _short(self, handler: Callable[["OutputSpec"], dict[str, Any]]) -> Any:
        data = handler(self)
        return data["name"] if not data.get("vary") else data


class SegmentSpec(Strict):
    """Layers ``[start, stop)`` of a network, run by one party on one or more inputs.

    ``outputs``: where the module returns a tuple (the names of its elements, in order) or a dict (its keys),
    each element an :class:`OutputSpec`; a consumer reads one as ``"segment:name"``, or all of them (as
    positional arguments, in order) by the segment's bare name. Written into the plan only where given.
    """

    party: str
    inputs: list[str] = Field(min_length=1)
    network: str
    layers: tuple[int, int] | None = None  # an nn.Sequential's layers [start, stop)
    cut: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # ends after this submodule
    merge: Literal["concat", "sum", "secure_sum", "module"] = "concat"  # secure_sum: core/securesum.py
    outputs: list[OutputSpec] | None = Field(None, min_length=1)  # elements of a tuple or dict output
    lora: LoraSpec | None = None  # LoRA adapters on a transformers network's layers, the base frozen (core.hfspec)

    @model_validator(mode="after")
    def _one_bound(self) -> "SegmentSpec":
        if self.layers is not None and self.cut is not None:
            raise ValueError("give 'layers' (indices of an nn.Sequential) or 'cut' (a submodule's name), not both")
        names = [o.name for o in self.outputs or []]
        if len(set(names)) != len(names):
            raise ValueError(f"outputs {names} name an element twice")
        return self

    @property
    def output_names(self) -> list[str]:
        """The names of the elements of a tuple or dict output (none: the segment gives one tensor)."""
        return [o.name for o in self.outputs or []]

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Callable[["SegmentSpec"], dict[str, Any]]) -> dict[str, Any]:
        """``outputs`` is written only where given (a plan without it hashes as before it existed)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ("outputs", "lora") and v is None)}

    @field_validator("inputs", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return _half_open(v, "layers")


class LossSpec(Strict):
    """A loss computed where its ``input`` segment runs, against ``target`` (``party.field``).

    The options of its kind (``class_weights``, ``label_smoothing``: ``cross_entropy``; ``pos_weight``:
    ``bce``; :data:`splitlearn.core.losses.LOSS_OPTIONS`) and extra ``metrics`` (names of
    :data:`splitlearn.core.metrics.EXTRA_METRICS`) are checked here and carried by the validated
    ``kind`` (a :class:`~splitlearn.core.losses.KindName`); an entry that sets none is written, and
    hashed, as before they existed.
    """

    input: str
    target: str
    kind: str = "cross_entropy"  # a registered loss kind (splitlearn.core.losses)
    weight: float = Field(1.0, gt=0.0)
    class_weights: list[float] | None = Field(None, min_length=2)  # cross_entropy: one per class (torch's weight)
    pos_weight: float | None = Field(None, gt=0.0, allow_inf_nan=False)  # bce: the positive rows' weight
    label_smoothing: float | None = Field(None, ge=0.0, le=1.0)  # cross_entropy
    metrics: list[str] = Field(default_factory=list)  # extra test metrics by name, each as test_<name>

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from .losses import get

        get(v)  # raises ValueError naming the known kinds
        return v

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0.0 < w < float("inf") for w in v):  # NaN fails too
            raise ValueError(f"class_weights must be finite and above 0 (a batch holding only classes weighted 0 "
                             f"would have no loss at all: NaN), got {v}")
        return v

    @model_validator(mode="after")
    def _options(self) -> "LossSpec":
        """The options are those the kind takes, the metrics known and of the kind's sort; ``kind`` carries them."""
        from .losses import LOSS_OPTIONS, KindName, check_options
        from .metrics import check_metrics

        given = {k: getattr(self, k) for k in LOSS_OPTIONS if getattr(self, k) is not None}
        check_options(self.kind, given)  # ValueError: what the kind takes
        check_metrics(self.kind, self.metrics)
        options = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in given.items())
        object.__setattr__(self, "kind", KindName(self.kind, options, tuple(self.metrics)))  # frozen: set once, here
        return self

    @model_serializer(mode="wrap")
    def _set_only(self, handler: Callable[["LossSpec"], dict[str, Any]]) -> dict[str, Any]:
        """Options and metrics are written only where given (a plan without them hashes as before)."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ("class_weights", "pos_weight", "label_smoothing")
                                                      and v is None or k == "metrics" and not v)}
