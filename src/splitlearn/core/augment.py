"""Image augmentation of a party's training batches (``[parties.NAME.augment]``).

A party lists, per input field it holds (the local name in ``holds``), steps applied in order to the
rows of that field in every training step, and only there: evaluation, prediction and the handshake
see the rows as they are. Each row draws its own crop offset, flip coin and jitter factors, all at
once for the batch (no loop over rows), from the party's own random stream
(:class:`~splitlearn.core.randomness.PartyRandom`, seeded by the plan and the party's name, its state in
checkpoints): the same plan and seed augment the same rows the same way in every run, in threads or
processes, and a resumed run goes on bit for bit.

Steps (``kind`` and its arguments; :data:`~splitlearn.core.augspec.AUGMENT_STEPS`):

- ``random_crop``: pad each side by ``padding`` (``padding_mode`` ``"constant"`` with ``fill``, ``"reflect"``
  or ``"replicate"``), then crop back to the image's size at an offset drawn per row: the image shifts by
  at most ``padding`` pixels each way and keeps its shape (as torchvision's ``RandomCrop(size, padding)``);
- ``hflip`` / ``vflip``: flip each row with chance ``p`` (default 0.5);
- ``color_jitter``: factors drawn per row from ``[max(0, 1 - v), 1 + v]`` for ``brightness`` (scales the
  values), ``contrast`` (blends with the row's mean grey) and ``saturation`` (blends with its grey image;
  three channels only), applied in that order (torchvision draws the order; a fixed one needs no draw),
  clipped to ``clamp = [low, high]`` after each where given (torchvision's float images clip to [0, 1];
  standardised images have no such range, so nothing is clipped unless asked).

Written in torch, not with ``kornia``: the draws are exactly the party's stream (torch's generator, drawn
on the CPU whatever the device, so a CPU and a CUDA party augment alike), with no extra package to
install at every party; the three operations are a few tensor lines each.

The plan's entries are :class:`~splitlearn.core.specs.PartySpec`'s ``augment`` (the steps'
kinds and arguments checked when the plan is read, naming what is accepted); the field's rows must be floating
images ``(N, C, H, W)`` that every step can take, which the handshake checks (:func:`augmented`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .augspec import ColorJitterStep, FlipStep, RandomCropStep
from .specs import PlanError

if TYPE_CHECKING:
    from .graph import Node
    from .plan import Plan
    from .randomness import PartyRandom

__all__ = ["Step", "crop", "flip", "jitter", "augment", "check_images", "augmented"]


Step = RandomCropStep | FlipStep | ColorJitterStep


def crop(s: RandomCropStep, x: torch.Tensor) -> torch.Tensor:
    """Pad each side by ``s.padding``, then crop back to the image's size at an offset drawn per row."""
    n, c, h, w = x.shape
    p = s.padding
    dy, dx = torch.randint(0, 2 * p + 1, (2, n)).to(x.device)  # where each row's crop starts in the padded image
    if s.padding_mode == "constant":
        padded = F.pad(x, (p, p, p, p), value=s.fill)
    else:
        padded = F.pad(x, (p, p, p, p), mode=s.padding_mode)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def flip(s: FlipStep, x: torch.Tensor) -> torch.Tensor:
    """Flip each row (left-right for ``hflip``, upside down for ``vflip``) whose coin comes up, with chance ``s.p``."""
    coin = (torch.rand(len(x)) < s.p).to(x.device)
    return torch.where(coin[:, None, None, None], x.flip(-1 if s.kind == "hflip" else -2), x)


def jitter(s: ColorJitterStep, x: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation in that order, each with a factor per row (nothing drawn for a 0)."""
    for name, blend in (("brightness", None), ("contrast", _mean_grey), ("saturation", _grey)):
        v = getattr(s, name)
        if not v:
            continue
        lo = max(0.0, 1.0 - v)
        f = (lo + (1.0 + v - lo) * torch.rand(len(x))).to(device=x.device, dtype=x.dtype)[:, None, None, None]
        x = x * f if blend is None else x * f + blend(x) * (1 - f)
        if s.clamp is not None:
            x = x.clamp(*s.clamp)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Each row's grey image (N, 1, H, W): luminance for three channels (torchvision's weights), else their mean."""
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _mean_grey(x: torch.Tensor) -> torch.Tensor:
    """Each row's mean grey value (N, 1, 1, 1)."""
    return _grey(x).mean((1, 2, 3), keepdim=True)


_OPS: dict[type, Callable[..., torch.Tensor]] = {RandomCropStep: crop, FlipStep: flip, ColorJitterStep: jitter}


def check_images(steps: list[Step], sample: torch.Tensor, entry: str) -> None:
    """A PlanError naming ``entry`` unless the field's rows (``sample``, with a batch dimension) are floating
    images (N, C, H, W) that every step can take."""
    shape = list(sample.shape[1:])
    if sample.dim() != 4 or not sample.is_floating_point():
        raise PlanError(f"augmentation needs floating images (N, C, H, W), but the field's rows are {sample.dtype} "
                        f"with shape {shape}", entry=entry,
                        hint="augment a field of images (digits' `image` is 1x8x8), or remove the entry")
    c, h, w = shape
    for i, s in enumerate(steps):
        if isinstance(s, RandomCropStep) and s.padding_mode == "reflect" and s.padding >= min(h, w):
            raise PlanError(f"random_crop with padding_mode = \"reflect\" needs padding below the image's size "
                            f"({h}x{w}), got {s.padding}", entry=f"{entry}.{i}", hint="pad less, or use \"replicate\"")
        if isinstance(s, ColorJitterStep) and s.saturation and c != 3:
            raise PlanError(f"color_jitter saturation needs three colour channels, but the images have {c}",
                            entry=f"{entry}.{i}", hint="leave saturation out for these images")


def augment(steps: list[Step], x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) through ``steps`` in order, every draw from torch's global CPU generator (so: inside
    the party's :meth:`~splitlearn.core.randomness.PartyRandom.scope`)."""
    for s in steps:
        x = _OPS[type(s)](s, x)
    return x


def augmented(plan: Plan, node: Node, x: torch.Tensor, mode: str, rng: PartyRandom) -> torch.Tensor:
    """An input node's rows as a step of ``mode`` takes them: augmented in training where the plan says so, drawing
    from the party's stream ``rng``; checked at the handshake; as they are otherwise."""
    field = node.name.split(".", 1)[1]
    steps = plan.parties[node.party].augment.get(field)
    if not steps or mode not in ("train", "handshake"):
        return x
    if mode == "handshake":
        check_images(steps, x, f"parties.{node.party}.augment.{field}")
        return x
    with rng.scope():
        return augment(steps, x)
