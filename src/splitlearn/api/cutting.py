"""A module of one's own, cut into pieces for a training loop of one's own (:class:`~splitlearn.api.stage.Stage`)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..core.specs import PlanError
from ..models import build_segment
from .splitting import with_cut_outputs

__all__ = ["cut"]


def cut(model: nn.Module, after: str | int | Sequence[str | int]) -> list[nn.Module]:
    """``model`` cut after the named submodule(s) ``after``: ``len(after) + 1`` pieces, in order.

    The pieces are exactly those :func:`~splitlearn.api.splitting.split` and a plan's segments run for the
    same cuts (one compiler, :func:`~splitlearn.models.build_segment`): for an ``nn.Sequential`` a cut is a
    layer's index or name and a piece is a slice of it; any other module is cut with ``torch.fx`` after named
    submodules. Composed, the pieces compute what ``model`` does. Each piece is built from its own copy of
    ``model``: the pieces share no parameter or buffer with each other nor with ``model``, which stays yours.

    >>> bottom, top = splitlearn.cut(model, after="layer1")
    >>> top(bottom(x))  # == model(x)

    Raises :class:`~splitlearn.core.specs.PlanError` (entry ``after``) when a cut names no submodule, the
    cuts are out of order, leave a piece empty, or the model's input crosses one. A piece before a cut that a skip
    connection crosses returns a tuple (the cut's output, then the crossing values) and the piece after takes
    them as arguments: ``top(*bottom(x))``.
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"cut() takes an nn.Module, not {type(model).__name__}", entry="model",
                        hint="build the module first: splitlearn.cut(MyNet(), after=\"layer1\")")
    cuts = [str(c) for c in ([after] if isinstance(after, (str, int)) else after)]
    if not cuts:
        raise PlanError("give at least one cut (the name of the submodule after which to cut)", entry="after")
    names = [f"piece{k}" for k in range(len(cuts) + 1)]
    body = {  # the plan's segments are the pieces; data and loss only make the plan whole (nothing is read)
        "name": "cut", "data": {"dataset": "synthetic"},
        "parties": {f"p{k}": {"holds": {"x": "x", "y": "y"}} if k == 0 else {} for k in range(len(names))},
        "networks": {"model": model},
        "segments": {n: {"party": f"p{k}", "inputs": ["p0.x"] if k == 0 else [names[k - 1]], "network": "model",
                         **({"cut": cuts[k]} if k < len(cuts) else {})} for k, n in enumerate(names)},
        "losses": {"task": {"input": names[-1], "target": "p0.y", "kind": "mse"}},
    }
    try:
        plan = with_cut_outputs(body)  # a skip connection across a cut: the piece before returns a tuple
        pieces = [build_segment(plan, n) for n in names]
    except PlanError as e:
        raise PlanError(f"cannot cut {type(model).__name__} after {cuts}: {e.message}", entry="after",
                        hint="name submodules in the order the forward calls them, each leaving a piece after it "
                        "(an nn.Sequential: layer indices); see 'Cutting a network' in docs/plans.md") from None
    for p in pieces:
        p.training = model.training  # a slice of an nn.Sequential is a new container: it takes the model's mode
    return pieces
