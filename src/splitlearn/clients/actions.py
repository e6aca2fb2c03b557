"""What a strategy asks for in a round, as data: the coordinator
(:class:`~splitlearn.clients.coordinator.Coordinator`) carries each action out in order, and
:class:`RoundResult` tells the strategy what went through.

Within a round, a client that an action could not prepare (its download or hand-off failed, or
it could not be reached) is *out*: its later :class:`Train` actions of the round are skipped.
Every failure is reported (``skipped`` in the result) by the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import Turn

__all__ = ["Action", "Download", "HandOff", "Train", "Average", "MergeCopies", "Evaluate", "RoundResult"]


@dataclass(frozen=True)
class Download:
    """The federation's averaged weights go to ``clients``; those that do not load them are out."""

    clients: tuple[str, ...]


@dataclass(frozen=True)
class HandOff:
    """The latest weights (of the client whose turn went through last) go to ``client``, unless it
    holds them already (or nobody trained yet): peer-to-peer where the strategy links the two
    (:meth:`~splitlearn.clients.strategies.Strategy.weight_senders`), else by way of the
    coordinator. If only the holder fails, ``client`` trains on from its own weights; if
    ``client`` cannot be reached, it is out."""

    client: str


@dataclass(frozen=True)
class Train:
    """``client`` takes training turn ``turn`` (skipped if it is out)."""

    turn: Turn
    client: str


@dataclass(frozen=True)
class Average:
    """``clients`` send their weights to the federation, which averages them, weighted by the rows
    each trained on this round."""

    clients: tuple[str, ...]


@dataclass(frozen=True)
class MergeCopies:
    """Every fixed party averages the copies of its segments that ``clients`` trained this round
    into its shared ones (weighted by their rows)."""

    clients: tuple[str, ...]


@dataclass(frozen=True)
class Evaluate:
    """Evaluation turn ``turn``, run by a client with the weights it scores:

    * ``model`` given: the weights of client ``model`` are lent to ``candidates[0]`` for the turn;
    * ``federation_weights``: the federation's average, downloaded to each candidate in order,
      until one loads it (that one runs the turn);
    * else ``candidates[0]`` scores its own weights.
    """

    turn: Turn
    candidates: tuple[str, ...]
    federation_weights: bool = False
    model: str | None = None


Action = Download | HandOff | Train | Average | MergeCopies | Evaluate


@dataclass(frozen=True)
class RoundResult:
    """What went through in a round's training: who trained (in order), who was out."""

    trained: tuple[str, ...]
    failed: tuple[str, ...]
