"""Run a plan in this process with one party's behaviour replaced: the harness of every active attack.

:func:`run_against` sets the plan up as ``splitlearn.train`` does, builds every physical party, hands the
attacker's participant to ``install`` before anything runs (the attack wraps its modules, its data or its
optimizer there: nothing of the engine changes), runs all parties in threads over the in-process transport,
and returns each party's report and participant (their trained modules included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ....clients.roles import physical_names
from ....core.plan import Plan
from ....launch.threads import run_local
from ....run.report import PartyReport
from ....run.setup import prepare

__all__ = ["Attacked", "run_against"]


@dataclass
class Attacked:
    """What a run against an attacker left: each physical party's report and participant (``.party.modules``:
    its trained modules)."""

    plan: Plan
    reports: dict[str, PartyReport]
    participants: dict[str, Any]


def run_against(plan: Plan | str | Path | dict, attacker: str, install: Callable[[Any], None], *,
                epochs: int | None = None, seed: int | None = None, record: bool = False) -> Attacked:
    """Train ``plan`` with ``install(participant)`` called on physical party ``attacker``'s participant once
    it is built, before any step; every other party is the engine's, honest. ``record``: every party keeps what
    it receives, as ``splitlearn train --out`` does for the audit."""
    checked, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    participants: dict[str, Any] = {}

    def built(name: str, participant: Any) -> None:
        participants[name] = participant
        if name == attacker:
            install(participant)

    names = physical_names(checked)
    if attacker not in names:
        raise ValueError(f"no party {attacker!r} in this plan: its parties are {', '.join(names)}")
    reports = run_local(checked, setups, shapes, record=record, built=built)
    return Attacked(checked, reports, participants)
