"""A stage's wires (:class:`~splitlearn.api.stage.Stage`): their settings, checked as a plan's ``[wires.X]`` and
digested so that both ends compare them, and how its output travels: a tensor on the stage's wire, or each tensor
of a tuple or dict on a wire of its own (``party:0``, ``party:key``), the structure announced by the first activation
as its *layout* (``tensor``, ``tuple:N``, ``dict:k1,k2``) and rebuilt by the receiver."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from ..core.graph import Wire
from ..core.plan import from_validation_error
from ..core.specs import PlanError
from ..core.wirespec import WireSpec
from ..wire.messages import quote

__all__ = ["wire_settings", "settings_digest", "layout_of", "assemble", "elements_of", "shape_key", "call", "layout_problem"]


def layout_of(party: str, out: Any) -> tuple[str, list[tuple[str, Tensor]]]:
    """How a piece's output travels: its layout (``tensor``, ``tuple:N`` or ``dict:k1,k2``) and each element
    with the name of its wire (``party``, ``party:0``, ``party:key``). TypeError for anything else."""
    if isinstance(out, Tensor):
        return "tensor", [(party, out)]
    if isinstance(out, (tuple, list)) and out:
        items = [(f"{party}:{i}", t) for i, t in enumerate(out)]
        layout = f"tuple:{len(out)}"
    elif isinstance(out, dict) and out:
        bad = [k for k in out if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise TypeError(f"stage {party!r}: the piece returned a dict with key {bad[0]!r}; a stage sends a dict "
                            "whose keys are names (identifiers)")
        items, layout = [(f"{party}:{k}", t) for k, t in out.items()], "dict:" + ",".join(out)
    else:
        raise TypeError(f"stage {party!r}: the piece returned {type(out).__name__}; a stage sends a tensor, or a "
                        "tuple or dict of tensors")
    bad = [n for n, t in items if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"stage {party!r}: element {bad[0].split(':', 1)[1]!r} of the piece's output is no tensor")
    return layout, items


def assemble(layout: str, values: list[Tensor]) -> Any:
    """The structure a previous stage's piece returned, of the tensors received."""
    if layout == "tensor":
        return values[0]
    if layout.startswith("tuple:"):
        return tuple(values)
    return dict(zip(layout.split(":", 1)[1].split(","), values))


def elements_of(layout: str, party: str) -> list[str]:
    """The wire names of a layout's elements, in order."""
    if layout == "tensor":
        return [party]
    if layout.startswith("tuple:"):
        return [f"{party}:{i}" for i in range(int(layout.split(":", 1)[1]))]
    return [f"{party}:{k}" for k in layout.split(":", 1)[1].split(",")]


def shape_key(x: Any) -> tuple:
    """The shapes and dtypes of a tensor, or of a tuple's or dict's tensors (what a compute record is keyed by)."""
    values = x if isinstance(x, (tuple, list)) else list(x.values()) if isinstance(x, dict) else [x]
    return tuple((tuple(v.shape), v.dtype) for v in values if isinstance(v, Tensor))


def call(module: nn.Module, x: Any) -> Any:
    """A piece on its input: a tuple received as its arguments, a dict as keyword arguments."""
    if isinstance(x, tuple):
        return module(*x)
    if isinstance(x, dict):
        return module(**x)
    return module(x)


def layout_problem(layout: str) -> str | None:
    """Why a layout a peer announced is not one (None if it is): ``tensor``, ``tuple:N`` (N < 10,000) or
    ``dict:key,...`` with keys that are names, each once."""
    if layout != "tensor" and not re.fullmatch(r"tuple:[1-9]\d{0,3}|dict:[A-Za-z_]\w*(,[A-Za-z_]\w*)*", layout):
        return f"its layout {quote(layout)} is none of 'tuple:N' and 'dict:key,...'"
    keys = layout.split(":", 1)[1].split(",") if layout.startswith("dict:") else []
    if len(keys) != len(set(keys)):
        return f"its layout {quote(layout)} names an element twice"
    return None


def wire_settings(given: WireSpec | dict[str, Any] | None, entry: str, party: str) -> WireSpec:
    """A stage's ``send=`` or ``receive=`` settings, checked as a plan's ``[wires.X]`` entry is (one PlanError naming
    the entry)."""
    if isinstance(given, WireSpec):
        return given
    try:
        return WireSpec.model_validate(given or {})
    except ValidationError as e:
        err = from_validation_error(e)
        raise PlanError(err.message, entry=f"{entry}.{err.entry}" if err.entry else entry, hint=err.hint,
                        file=f"stage {party!r}") from None


def settings_digest(wire: Wire) -> str:
    """A digest of a wire's settings: the first activation carries it, and the receiver compares it with its own."""
    body = json.dumps(wire.spec.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]
