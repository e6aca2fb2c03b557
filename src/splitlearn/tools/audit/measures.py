"""The leakage measures, as pure functions of tensors (no files, no plans).

- :func:`smashed_dcor`: distance correlation between raw inputs and the smashed data;
- :func:`invert`: a model-inversion attack: a decoder from smashed data to raw inputs trained on
  an auxiliary share of the rows, scored (MSE, SSIM) on the others;
- :func:`label_leakage`: the norm and direction attacks on the gradients a party receives;
- :func:`ssim`: structural similarity of image batches.

Each takes what the attacking party holds (and, to score the attack, the ground truth) and
returns plain numbers; :mod:`splitlearn.tools.audit.run` finds the tensors in a run folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["smashed_dcor", "invert", "Inversion", "label_leakage", "ssim", "latest_per_id"]


@contextmanager
def _one_thread() -> Iterator[None]:
    """The attacks are many small steps: extra threads only wait on each other (badly so on a busy
    machine), so they run on one; the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def latest_per_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per sample id: its last occurrence (rows are in the order they were recorded)."""
    ids_np = ids.numpy()
    rev = ids_np[::-1]
    uniq, first_in_rev = np.unique(rev, return_index=True)
    pos = len(ids_np) - 1 - first_in_rev
    order = np.sort(pos)  # keep recording order
    idx = torch.from_numpy(order)
    return ids[idx], values[idx]


def _subsample(n: int, k: int, seed: int) -> torch.Tensor:
    if n <= k:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def smashed_dcor(raw: torch.Tensor, smashed: torch.Tensor, max_rows: int = 1000, seed: int = 0) -> tuple[float, int]:
    """Distance correlation between raw inputs and smashed data (rows aligned), on up to ``max_rows``
    rows drawn at random; returns (dCor, rows used)."""
    from ...privacy.nopeek import distance_correlation

    if len(raw) != len(smashed):
        raise ValueError(f"{len(raw)} raw rows but {len(smashed)} smashed rows")
    keep = _subsample(len(raw), max_rows, seed)
    x = raw[keep].reshape(len(keep), -1).double()
    z = smashed[keep].reshape(len(keep), -1).double()
    with torch.no_grad(), _one_thread():
        return float(distance_correlation(x, z)), len(keep)


# -- model inversion -------------------------------------------------------------------------

def _gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, window: int | None = None) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image of two batches ``(N, H, W)`` or ``(N, C, H, W)``.

    Gaussian window (sigma 1.5) of ``window`` pixels (default 7, or the largest odd size that fits),
    valid positions only, constants ``K1 = 0.01``, ``K2 = 0.03``; channels are averaged. For 8x8
    digits a 7x7 window leaves 2x2 positions per image: a coarse but well-defined figure.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {list(a.shape)} and {list(b.shape)}")
    if a.dim() == 3:
        a, b = a[:, None], b[:, None]
    if a.dim() != 4:
        raise ValueError(f"expected (N, H, W) or (N, C, H, W) images, got shape {list(a.shape)}")
    n, c, h, w = a.shape
    side = min(h, w)
    win = window or min(7, side if side % 2 else side - 1)
    win = max(1, min(win, side))
    k = _gaussian_window(win).to(torch.float64)
    x = a.reshape(n * c, 1, h, w).double()
    y = b.reshape(n * c, 1, h, w).double()
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x ** 2
    syy = F.conv2d(y * y, k) - mu_y ** 2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2))


@dataclass
class Inversion:
    """What the attack achieved, and a few originals with their reconstructions for a figure."""

    figures: dict[str, Any]
    originals: torch.Tensor  # (k, features) of evaluation rows
    reconstructions: torch.Tensor


def _decoder(d_in: int, d_out: int, hidden: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, d_out))


def invert(smashed: torch.Tensor, raw: torch.Tensor, *, aux_fraction: float = 0.1, seed: int = 0, epochs: int = 200,
           image_shape: tuple[int, ...] | None = None, hidden: int = 256, lr: float = 1e-3, batch_size: int = 64,
           show: int = 8) -> Inversion:
    """Train a decoder (MLP, Adam, MSE) from smashed data to raw inputs on ``aux_fraction`` of the
    rows (the attacker's auxiliary data) and score it on the other rows.

    Rows are one per sample. Returns the reconstruction MSE, the MSE of the best constant guess
    (the mean of the auxiliary rows) for scale, and for images (``image_shape`` (H, W) or (C, H, W))
    the mean SSIM (and that of the constant guess). The decoder's outputs are clipped to the value
    range of the auxiliary rows, which the attacker knows (per feature for tabular data).
    """
    if not 0 < aux_fraction < 1:
        raise ValueError(f"aux_fraction must be in (0, 1), got {aux_fraction}")
    n = len(raw)
    if n != len(smashed):
        raise ValueError(f"{n} raw rows but {len(smashed)} smashed rows")
    n_aux = int(round(aux_fraction * n))
    if n_aux < 2 or n - n_aux < 1:
        raise ValueError(f"{n} rows are too few for an auxiliary share of {aux_fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    aux, ev = perm[:n_aux], perm[n_aux:]
    z = smashed.reshape(n, -1).float()
    x = raw.reshape(n, -1).float()
    mu, sd = z[aux].mean(0), z[aux].std(0)
    sd = sd.clamp_min(max(1e-3 * float(sd.max()), 1e-8))  # units (near) constant on the aux rows stay bounded
    zs = (z - mu) / sd
    if image_shape is not None:  # pixel range; per feature for tabular data
        lo, hi = x[aux].min(), x[aux].max()
    else:
        lo, hi = x[aux].min(0).values, x[aux].max(0).values

    model = _decoder(zs.shape[1], x.shape[1], hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    with torch.enable_grad(), _one_thread():
        for _ in range(epochs):
            order = aux[torch.randperm(n_aux, generator=g)]
            for i in range(0, n_aux, batch_size):
                b = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                F.mse_loss(model(zs[b]), x[b]).backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        rec = torch.maximum(torch.minimum(model(zs[ev]), hi), lo)
        truth = x[ev]
        mse = float(F.mse_loss(rec, truth))
        baseline = float(F.mse_loss(x[aux].mean(0, keepdim=True).expand_as(truth), truth))
    figures: dict[str, Any] = {"mse": mse, "mse_mean_guess": baseline,
                               "relative_mse": mse / baseline if baseline > 0 else None,
                               "aux_rows": int(n_aux), "eval_rows": int(len(ev)), "epochs": epochs}
    if image_shape is not None:
        shape = tuple(image_shape)
        data_range = float(truth.max() - truth.min()) or 1.0
        s = ssim(truth.reshape(len(ev), *shape), rec.reshape(len(ev), *shape), data_range)
        guess = x[aux].mean(0, keepdim=True).expand_as(truth)
        figures["ssim"] = float(s.mean())
        figures["ssim_mean_guess"] = float(ssim(truth.reshape(len(ev), *shape), guess.reshape(len(ev), *shape),
                                                data_range).mean())
        figures["image_shape"] = list(shape)
    else:
        figures["ssim"] = None
        figures["ssim_note"] = "tabular features have no spatial structure: SSIM is defined for images only"
    k = min(show, len(ev))
    return Inversion(figures, truth[:k].clone(), rec[:k].clone())


# -- label leakage ---------------------------------------------------------------------------

def label_leakage(grads: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """How well the party receiving ``grads`` (one row per sample) can tell the ``labels``.

    Binary labels: the norm attack (a larger gradient norm marks the rarer class) and the
    direction attack (the sign of the cosine between two gradients says whether they share a
    label), both from :mod:`splitlearn.privacy.attacks`, as max(auc, 1 - auc): 0.5 = no leakage.
    More classes: the direction AUC of "same class as a reference gradient" (the same attack,
    which compares labels for equality); the norm attack separates two classes only: null.
    """
    from ...privacy.attacks import direction_attack_auc, norm_attack_auc

    labels = labels.reshape(-1).long()
    g = grads.reshape(len(grads), -1).float()
    classes = sorted(int(c) for c in torch.unique(labels))
    out: dict[str, Any] = {"rows": int(len(g)), "classes": len(classes)}
    if len(classes) < 2:
        out.update(norm_auc=None, direction_auc=None, note="one class only among these rows: nothing to tell apart")
    elif len(classes) == 2:
        binary = (labels == classes[1]).long()
        out.update(norm_auc=float(norm_attack_auc(g, binary)), direction_auc=float(direction_attack_auc(g, binary)),
                   positive_share=float(binary.float().mean()))
    else:
        out.update(norm_auc=None, direction_auc=float(direction_attack_auc(g, labels)),
                   note=f"{len(classes)} classes: the norm attack separates two classes only (null); the direction "
                        "AUC is that of 'same class as a reference gradient'")
    return out
