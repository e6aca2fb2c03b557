"""NoPeek (Vepakomma et al. 2020): penalise the distance correlation between raw inputs and
the cut activations, ``loss + alpha * distance_correlation(x, z)``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["distance_correlation"]

_EPS = 1e-12


def _centered_distances(x: Tensor) -> Tensor:
    """U-centred (Székely & Rizzo 2014) pairwise distances of the rows of ``x``; double-centred below 4 rows."""
    n, x = len(x), x.reshape(len(x), -1).double()
    if bool((x == x[:1]).all()):  # constant: no spread at all (the Gram formula below would leave rounding noise)
        return torch.zeros(n, n, dtype=x.dtype, device=x.device) * x.sum()
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0).add(_EPS).sqrt()
    if n < 4:
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    off = 1 - torch.eye(n, dtype=d.dtype, device=d.device)
    d = d * off
    c = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return c * off


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Distance correlation (Székely et al.) between two batches, a scalar in [0, 1].

    The first dimension indexes samples; other dimensions are flattened. From 4 samples on it is
    the bias-corrected estimator (Székely & Rizzo 2014; the plain V-statistic is far from 0 for
    independent high-dimensional data: ~0.38 for 500 samples of 30 and 16 independent normals),
    clipped at 0, then square-rooted. Exactly 1 for ``z == x``; a batch of one or a constant
    input gives 0. Differentiable in both arguments with finite gradients (the square root is
    linear below 1e-3). Computed in float64, returned in ``z``'s floating dtype.
    """
    if len(x) != len(z):
        raise ValueError(f"batch sizes differ: {len(x)} and {len(z)}")
    a, b = _centered_distances(x), _centered_distances(z)
    dcov2, dvar_x, dvar_z = (a * b).sum(), (a * a).sum(), (b * b).sum()
    prod = dvar_x * dvar_z
    ok = prod > 0  # a constant batch (or a batch of one) has no distance variance: dCor = 0
    r2 = torch.where(ok, dcov2 / torch.where(ok, prod, torch.ones_like(prod)).sqrt(), 0.0).clamp(0.0, 1.0)
    small = 1e-6  # below this dCor^2 the root is replaced by its chord, to keep the gradient bounded
    out = torch.where(r2 > small, r2.clamp_min(small).sqrt(), r2 / small**0.5)
    return out.to(z.dtype if z.is_floating_point() else torch.get_default_dtype())
