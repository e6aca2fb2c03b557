"""Loss kinds as a registry: what a plan's ``[losses.NAME] kind`` names.

A :class:`LossKind` says how to compute the loss, how to turn a head's outputs into
predictions and, for classification, how many of them are right. Register one before loading
a plan that uses it::

    losses.register(LossKind("l1", lambda out, t: (out.reshape(t.shape) - t.float()).abs().mean(),
                             decide=losses.first_column))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

__all__ = ["LossKind", "LOSS_KINDS", "LOSSES", "register", "get", "decide", "is_classification", "correct",
           "first_column"]


@dataclass(frozen=True)
class LossKind:
    """One kind of loss.

    ``fn(out, target)`` is the loss of a batch; ``decide(outputs)`` the predictions of a head
    (classes, or values for regression); ``correct(out, target)`` the right predictions in a
    batch (classification only: None otherwise); ``probabilities(outputs)`` each row's class
    probabilities (classification; gives the clinical metrics of :mod:`splitlearn.core.metrics`). ``indexes_classes``: targets are class indices
    into the head's last dimension (checked against its width); ``target_range``: the values a
    received target may take (others are refused).
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    decide: Callable[[Tensor], Tensor]
    correct: Callable[[Tensor, Tensor], int] | None = None
    indexes_classes: bool = False
    target_range: tuple[float, float] | None = None
    probabilities: Callable[[Tensor], Tensor] | None = None  # (rows, classes) from a head's outputs: AUC, F1, ECE

    @property
    def classification(self) -> bool:
        """Whether the kind has an accuracy."""
        return self.correct is not None


def first_column(outputs: Tensor) -> Tensor:
    """The first output of every row: a regression head's prediction."""
    return outputs.reshape(len(outputs), -1)[:, 0]


def _bce(out: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(target.shape), target.float())


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out.reshape(target.shape), target.float())


LOSS_KINDS: Registry[LossKind] = Registry("loss kind")  # the built-ins are registered below


def register(kind: LossKind, *, replace: bool = False) -> LossKind:
    """Add a loss kind under its name (a taken name only with ``replace``); plans validated afterwards may use it."""
    return LOSS_KINDS.register(kind.name, kind, replace=replace)


def get(kind: str) -> LossKind:
    """The registered loss kind ``kind``; a ValueError naming the registered kinds otherwise."""
    return LOSS_KINDS.get(kind)


def decide(kind: str, outputs: Tensor) -> Tensor:
    """Predictions from a head's outputs: class labels, or values for regression."""
    return get(kind).decide(outputs)


def is_classification(kind: str) -> bool:
    """Whether loss kind ``kind`` has an accuracy (:func:`correct`)."""
    return get(kind).classification


def correct(kind: str, out: Tensor, target: Tensor) -> int:
    """Correct predictions in a batch (classification kinds only: a ValueError otherwise)."""
    fn = get(kind).correct
    if fn is None:
        raise ValueError(f"no accuracy for loss kind {kind!r}")
    return fn(out, target)


class _Fns(Mapping[str, Callable[[Tensor, Tensor], Tensor]]):
    """Loss kind -> loss function, read from the registry when asked."""

    def __getitem__(self, kind: str) -> Callable[[Tensor, Tensor], Tensor]:
        return LOSS_KINDS[kind].fn

    def __iter__(self) -> Iterator[str]:
        return iter(LOSS_KINDS)

    def __len__(self) -> int:
        return len(LOSS_KINDS)


LOSSES: Mapping[str, Callable[[Tensor, Tensor], Tensor]] = _Fns()  # the functions alone, as engine.LOSSES was

def _two_classes(out: Tensor) -> Tensor:
    p = first_column(out).sigmoid()
    return torch.stack([1 - p, p], dim=1)


register(LossKind("cross_entropy", F.cross_entropy, decide=lambda out: out.argmax(-1),
                  correct=lambda out, t: int((out.argmax(-1) == t).sum()), indexes_classes=True,
                  probabilities=lambda out: out.reshape(len(out), -1).softmax(-1)))
register(LossKind("bce", _bce, decide=lambda out: (first_column(out) > 0).long(),
                  correct=lambda out, t: int(((out.reshape(t.shape) > 0).long() == t.long()).sum()),
                  target_range=(0.0, 1.0), probabilities=_two_classes))
register(LossKind("mse", _mse, decide=first_column))
