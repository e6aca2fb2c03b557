"""Loss kinds as a registry: what a plan's ``[losses.NAME] kind`` names.

A :class:`LossKind` says how to compute the loss, how to turn a head's outputs into
predictions and, for classification, how many of them are right. Register one before loading
a plan that uses it::

    losses.register(LossKind("l1", lambda out, t: (out.reshape(t.shape) - t.float()).abs().mean(),
                             decide=losses.first_column))

A plan entry may also set options of its kind (:data:`LOSS_OPTIONS`: ``class_weights`` and
``label_smoothing`` for ``cross_entropy``, ``pos_weight`` for ``bce``) and extra ``metrics``. The
validated entry's ``kind`` is then a :class:`KindName`: the kind's name (compared, hashed and written
as the plain name) carrying those settings, so :func:`get` of it, wherever a party calls it, gives
the kind they configure, derived from the plan alone (a party process or a Ray actor reads the same
plan and builds the same loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.text import IGNORE_INDEX
from .registry import Registry

__all__ = ["LossKind", "LOSS_KINDS", "LOSSES", "LOSS_OPTIONS", "KindName", "register", "get", "check_options",
           "decide", "is_classification", "correct", "first_column", "causal_lm"]

LOSS_OPTIONS = ("class_weights", "pos_weight", "label_smoothing")  # keys of [losses.NAME] a kind may take


@dataclass(frozen=True)
class LossKind:
    """One kind of loss.

    ``fn(out, target)`` is the loss of a batch; ``decide(outputs)`` the predictions of a head
    (classes, or values for regression); ``correct(out, target)`` the right predictions in a
    batch (classification only: None otherwise); ``probabilities(outputs)`` each row's class
    probabilities (classification; gives the clinical metrics of :mod:`splitlearn.core.metrics`). ``indexes_classes``: targets are class indices
    into the head's last dimension (checked against its width); ``target_range``: the values a
    received target may take (others are refused). ``options``: the :data:`LOSS_OPTIONS` a plan
    entry of this kind may set, and ``configure(options)`` the loss function with them set (every
    other option is refused when the plan is loaded). ``metrics``: the extra metrics the plan entry
    asks (names of :data:`splitlearn.core.metrics.EXTRA_METRICS`; set by :func:`get` of a :class:`KindName`).
    ``ignore_index``: a target value left out of the loss (the label checks accept it besides the classes);
    ``tokens``: targets are token sequences ``[batch, tokens]`` scored per counted token, not per row
    (:func:`splitlearn.core.metrics.token_scores`).
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    decide: Callable[[Tensor], Tensor]
    correct: Callable[[Tensor, Tensor], int] | None = None
    indexes_classes: bool = False
    target_range: tuple[float, float] | None = None
    probabilities: Callable[[Tensor], Tensor] | None = None  # (rows, classes) from a head's outputs: AUC, F1, ECE
    options: tuple[str, ...] = ()
    configure: Callable[[Mapping[str, Any]], Callable[[Tensor, Tensor], Tensor]] | None = None
    metrics: tuple[str, ...] = ()
    ignore_index: int | None = None
    tokens: bool = False

    @property
    def classification(self) -> bool:
        """Whether the kind has an accuracy."""
        return self.correct is not None


class KindName(str):
    """A validated ``[losses.NAME]`` entry's ``kind``: the kind's name (a ``str`` equal to it, and written
    as it) that also carries the entry's ``options`` (``(key, value)`` pairs of :data:`LOSS_OPTIONS`
    it sets, lists as tuples) and extra ``metrics``, so that :func:`get` gives the kind they configure."""

    __slots__ = ("options", "metrics")

    def __new__(cls, name: str, options: tuple[tuple[str, Any], ...] = (), metrics: tuple[str, ...] = ()) -> "KindName":
        self = super().__new__(cls, name)
        self.options, self.metrics = options, metrics
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return KindName, (str(self), self.options, self.metrics)


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
    """The registered loss kind ``kind``; a ValueError naming the registered kinds otherwise. A
    :class:`KindName` (a plan entry's ``kind``) gives the kind with the entry's options and metrics."""
    found = LOSS_KINDS.get(str(kind))
    if not isinstance(kind, KindName) or not (kind.options or kind.metrics):
        return found
    if kind.options:
        check_options(str(kind), dict(kind.options))  # the kind may have been replaced since the plan was read
        found = dataclasses.replace(found, fn=found.configure(dict(kind.options)))
    return dataclasses.replace(found, metrics=kind.metrics)


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """A ValueError unless loss kind ``kind`` takes every one of ``options`` (the keys a plan entry sets):
    those of its ``options``, where it can ``configure`` a loss with them."""
    found = LOSS_KINDS.get(str(kind))
    takes = found.options if found.configure is not None else ()
    wrong = [k for k in options if k not in takes]
    if wrong:
        raise ValueError(f"loss kind {kind!r} takes {', '.join(takes) if takes else 'no options'}, "
                         f"not {', '.join(wrong)}")


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


def _cross_entropy_with(options: Mapping[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """``F.cross_entropy`` with ``class_weights`` (its ``weight``: the mean is weighted by the target's
    weight, as torch's) and ``label_smoothing``; a ValueError when the weights are not one per class."""
    weights, smoothing = options.get("class_weights"), float(options.get("label_smoothing") or 0.0)

    def fn(out: Tensor, target: Tensor) -> Tensor:
        w = None
        if weights is not None:
            if len(weights) != out.shape[-1]:
                raise ValueError(f"class_weights gives {len(weights)} weights, but the head gives {out.shape[-1]} "
                                 "classes: give one weight per class")
            w = torch.tensor(weights, dtype=out.dtype, device=out.device)
        return F.cross_entropy(out, target, weight=w, label_smoothing=smoothing)

    return fn


def _bce_with(options: Mapping[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """``F.binary_cross_entropy_with_logits`` with ``pos_weight`` (the positive rows' weight)."""
    pos = options.get("pos_weight")

    def fn(out: Tensor, target: Tensor) -> Tensor:
        pw = None if pos is None else torch.tensor([float(pos)], dtype=out.dtype, device=out.device)
        return F.binary_cross_entropy_with_logits(out.reshape(target.shape), target.float(), pos_weight=pw)

    return fn


register(LossKind("cross_entropy", F.cross_entropy, decide=lambda out: out.argmax(-1),
                  correct=lambda out, t: int((out.argmax(-1) == t).sum()), indexes_classes=True,
                  probabilities=lambda out: out.reshape(len(out), -1).softmax(-1),
                  options=("class_weights", "label_smoothing"), configure=_cross_entropy_with))
register(LossKind("bce", _bce, decide=lambda out: (first_column(out) > 0).long(),
                  correct=lambda out, t: int(((out.reshape(t.shape) > 0).long() == t.long()).sum()),
                  target_range=(0.0, 1.0), probabilities=_two_classes, options=("pos_weight",), configure=_bce_with))
register(LossKind("mse", _mse, decide=first_column))


def _shifted(out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The logits at positions 0..T-2 and the tokens they predict (1..T-1); a ValueError for other shapes."""
    if out.dim() != 3 or target.dim() != 2 or out.shape[:2] != target.shape:
        raise ValueError(f"causal_lm takes logits [batch, tokens, vocabulary] and targets [batch, tokens] of the "
                         f"same tokens; got logits {list(out.shape)} and targets {list(target.shape)}")
    return out[:, :-1], target[:, 1:]


def causal_lm(out: Tensor, target: Tensor) -> Tensor:
    """Next-token cross-entropy: the logits at position t score token t+1 of ``target`` (the shift is here), the
    mean over the counted tokens (those not :data:`IGNORE_INDEX`), in float32 as Hugging Face's causal LM loss;
    0 (with a zero gradient) for a batch with none."""
    logits, labels = _shifted(out, target)
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _next_token_right(out: Tensor, target: Tensor) -> int:
    logits, labels = _shifted(out, target)
    return int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())


register(LossKind("causal_lm", causal_lm, decide=lambda out: out.argmax(-1), correct=_next_token_right,
                  indexes_classes=True, ignore_index=IGNORE_INDEX, tokens=True))
