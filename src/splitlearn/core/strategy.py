"""The core's side of a ``[clients]`` schedule: the registry of strategies and what one offers.

A plan's ``clients.schedule`` names an entry of :data:`STRATEGIES`; the built-ins live in
:mod:`splitlearn.clients.strategies` (loaded the first time the registry is read), and a user's
strategy is registered the same way::

    from splitlearn.core.strategy import STRATEGIES
    STRATEGIES.register("largest_two", LargestTwo())

A strategy is shaped like Flower's: it configures each round (a list of typed actions, see
:mod:`splitlearn.clients.actions`) and aggregates what went through; a generic coordinator
carries the actions out, and the strategy never calls back into it.
"""

from __future__ import annotations

from typing import Any, Protocol

from .registry import Registry

__all__ = ["STRATEGIES", "StrategyLike"]


class StrategyLike(Protocol):
    """What the core and the coordinator ask of a strategy (:class:`splitlearn.clients.strategies.Strategy`
    is the base the built-ins share)."""

    name: str
    one_model: bool  # the run ends with one model (False: one per client)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse ``[clients.options]`` this strategy does not take (a ValueError saying which)."""

    def rounds(self, plan: Any, shares: list, test_rows: Any, sites: list[int] | None = None) -> list: ...

    def own_copy(self, turn: Any) -> bool: ...

    def configure_train(self, plan: Any, rnd: Any, clients: list[str]) -> list: ...

    def aggregate_train(self, plan: Any, rnd: Any, result: Any) -> list: ...

    def configure_evaluate(self, plan: Any, rnd: Any, turn: Any, result: Any, holder: str | None) -> list: ...


STRATEGIES: Registry[StrategyLike] = Registry("schedule", builtins="splitlearn.clients.strategies")
