"""Loading a plan: each entry validated (:mod:`~splitlearn.core.plan`), then its structure
(:mod:`~splitlearn.core.graph`); a plan returned here is sound. Above both, so neither imports the other's
caller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .graph import build_graph
from .plan import Plan, parse_plan
from .specs import PlanError

__all__ = ["load_plan"]


def load_plan(source: str | Path | dict[str, Any] | Plan) -> Plan:
    """Read and validate a plan from a TOML file, a dict or an existing :class:`Plan`.

    Raises :class:`PlanError` naming the file and entry on any problem; the graph is checked
    too (:func:`~splitlearn.core.graph.build_graph`) so a returned plan is structurally sound.
    """
    plan = parse_plan(source)
    try:
        build_graph(plan)
    except PlanError as e:
        raise e.in_file(_plan_file(source)) from None
    return plan


def _plan_file(source: Any) -> Path | None:
    return Path(source) if isinstance(source, (str, Path)) else None
