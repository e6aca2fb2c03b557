"""The epochs of a run with a validation split: where each epoch's validation ends, the parties' agreement on
the best epoch after it (:class:`~splitlearn.core.stopping.EpochAgreement`), and the schedule once they stop early.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

from ..core.engine import Party, PartyError
from ..core.stopping import EpochAgreement
from .report import Metrics
from .setup import Step

__all__ = ["indices", "settles", "stopped", "epoch_agreement", "settle_epoch"]


def indices(start: int, length: Callable[[], int]) -> Iterator[int]:
    """``start``, ``start + 1``, ... while below ``length()`` (asked again each time: an early stop shortens it)."""
    i = start
    while i < length():
        yield i
        i += 1


def settles(todo: list[Step], i: int) -> bool:
    """Whether ``todo[i]`` is its epoch's last validation step (after it the parties agree on the best epoch)."""
    step = todo[i]
    return step.split == "validation" and (i + 1 == len(todo) or todo[i + 1].split != "validation"
                                           or todo[i + 1].epoch != step.epoch)


def stopped(todo: list[Step], step_id: int) -> list[Step]:
    """The schedule once the run stops after step ``step_id``: the test steps follow at once, numbered on."""
    at = next(i for i, s in enumerate(todo) if s.id == step_id)
    tests = [s for s in todo[at + 1:] if s.mode == "eval" and s.split == "test"]
    return todo[:at + 1] + [replace(s, id=step_id + 1 + j, epoch=todo[at].epoch) for j, s in enumerate(tests)]


def epoch_agreement(party: Party, full: list[Step]) -> EpochAgreement:
    """The party's side of the epoch verdicts, attached where its engine hands them (``precision.epochs``)."""
    ends = [s.id * party.pipeline for i, s in enumerate(full) if settles(full, i)]
    agreement = EpochAgreement(party.graph, party.name, party.link, ends, PartyError)
    party.precision.epochs = agreement
    return agreement


def settle_epoch(party: Party, agreement: EpochAgreement, step: Step, metrics: Metrics) -> bool:
    """Agree on the best epoch after ``step`` (its epoch's last validation step); keep the weights of a new best,
    and before the test steps (the last epoch's, or a stop) load the best epoch's. Whether the run stops."""
    loss, metric = agreement.loss, agreement.metric
    best, stop = agreement.settle(step.epoch, lambda: (metrics.hist.get(loss, {}).get(metric) or [None])[-1],
                                  lambda done: party.wait_after(step.id, done))
    if best == step.epoch:
        agreement.keep(party.modules)
    if stop or step.epoch == party.graph.plan.train.epochs - 1:
        agreement.use_best(party.modules)
    return stop
