"""splitlearn: split learning in one engine, every configuration as a plan.

The names below are imported on first use, so ``splitlearn --help`` starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Plan", "PlanError", "load_plan", "build_graph", "split", "train", "predict", "generate", "Result", "cut",
           "Stage"]

_HOME = {"Plan": ".core.plan", "PlanError": ".core.specs", "load_plan": ".core.load", "build_graph": ".core.graph",
         "split": ".api", "train": ".api", "predict": ".api", "generate": ".api", "Result": ".api", "cut": ".api",
         "Stage": ".api"}

if TYPE_CHECKING:  # pragma: no cover
    from .api import Result, Stage, cut, generate, predict, split, train
    from .core.graph import build_graph
    from .core.load import load_plan
    from .core.plan import Plan
    from .core.specs import PlanError


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        try:  # a subpackage, as an eager package would have it imported: splitlearn.tools, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'splitlearn' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
