"""Activation noise with a differential-privacy account.

:func:`clip_and_noise` is the Gaussian mechanism on the cut activations: every sample's
activation is clipped to L2 norm ``clip`` and noise of std ``sigma * clip`` is added, so one
sample changes the (sum of the) released activations by at most ``clip``. :class:`PrivacyAccountant`
turns ``sigma``, the sampling rate and the number of steps into (epsilon, delta) with the RDP
of the Poisson-subsampled Gaussian mechanism (Mironov et al. 2019), via Opacus when it is installed.
The sensitivity is ``clip`` under add/remove adjacency (as Opacus); under replace-one it is
``2 * clip``, so account with ``sigma / 2``. The account covers what is noised, nothing else.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["clip_and_noise", "PrivacyAccountant", "ORDERS", "eps_from_rdp", "rdp_subsampled_gaussian"]

# Opacus's default orders, plus a few smaller and larger ones (a tighter bound at very large or very small noise)
ORDERS = [1.01, 1.02, 1.03, 1.05, 1.07] + [1 + x / 10 for x in range(1, 100)] + [*range(12, 65), 80, 96, 128, 256]


def _randn(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped ``shape``, drawn on the generator's device, returned on ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def clip_and_noise(z: Tensor, clip: float, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Clip every sample of ``z`` (flattened) to L2 norm <= ``clip``, then add N(0, (sigma*clip)^2).

    Differentiable through the clipping (the noise is a constant); samples already within the
    norm are left unchanged.
    """
    flat = z.reshape(len(z), -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    out = (flat * (clip / norms.clamp_min(clip))).reshape(z.shape)
    if sigma > 0:
        out = out + sigma * clip * _randn(z.shape, z, generator)
    return out


def _log_erfc(x: float) -> float:
    if x < 20:
        return math.log(math.erfc(x))
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 / x**2 + 0.75 / x**4)


def _log_a(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha of the sampled Gaussian mechanism (Mironov et al. 2019; as TF-privacy)."""
    if float(alpha).is_integer():  # binomial expansion, exact
        i = np.arange(int(alpha) + 1)
        lgam = np.vectorize(math.lgamma)
        log_binom = lgam(alpha + 1) - lgam(i + 1) - lgam(alpha - i + 1)
        terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        return float(np.logaddexp.reduce(terms))
    # fractional order: the two-sided series of TF-privacy's _compute_log_a_frac
    log_a0 = log_a1 = -math.inf
    z0, coef, i = sigma**2 * math.log(1 / q - 1) + 0.5, 1.0, 0
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        log_s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        sign = 1.0 if coef > 0 else -1.0
        log_a0 = _log_add(log_a0, log_s0, sign)
        log_a1 = _log_add(log_a1, log_s1, sign)
        coef *= (alpha - i) / (i + 1)
        i += 1
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1, 1.0)


def _log_add(a: float, b: float, sign: float) -> float:
    """log(exp(a) + sign * exp(b)), for sign = +-1 (and exp(a) > exp(b) when subtracting)."""
    if sign > 0:
        return float(np.logaddexp(a, b))
    return a + math.log1p(-math.exp(b - a)) if b < a else -math.inf


def rdp_subsampled_gaussian(q: float, sigma: float, steps: int, orders: list[float] = ORDERS) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism at ``orders``."""
    if q == 0 or steps == 0:
        return np.zeros(len(orders))
    if sigma == 0:
        return np.full(len(orders), np.inf)
    if q == 1.0:
        return steps * np.asarray(orders, dtype=float) / (2 * sigma**2)
    return steps * np.array([_log_a(q, sigma, a) / (a - 1) for a in orders])


def eps_from_rdp(rdp: np.ndarray, delta: float, orders: list[float] = ORDERS) -> float:
    """(epsilon, delta) from RDP, with the conversion of Balle et al. 2020 (Theorem 21), as Opacus."""
    a = np.asarray(orders, dtype=float)
    eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(max(np.nanmin(eps), 0.0)) if not np.isnan(eps).all() else math.inf


class PrivacyAccountant:
    """Counts steps of the Gaussian mechanism (noise multiplier ``sigma``) on Poisson samples of
    rate ``sample_rate``, and reports epsilon at ``delta``.

    ``backend`` is ``"opacus"`` (its ``RDPAccountant``) when opacus is importable, else ``"builtin"``
    (orders 1.01..256, the same for both); assign ``"builtin"`` to force the latter.
    """

    def __init__(self, sigma: float, sample_rate: float, delta: float = 1e-5):
        if sigma < 0 or not 0 <= sample_rate <= 1 or not 0 < delta < 1:
            raise ValueError("need sigma >= 0, 0 <= sample_rate <= 1 and 0 < delta < 1")
        self.sigma, self.sample_rate, self.delta, self.steps = sigma, sample_rate, delta, 0
        try:
            from opacus.accountants import RDPAccountant  # noqa: F401
            self.backend = "opacus"
        except ImportError:
            self.backend = "builtin"

    def step(self, n: int = 1) -> None:
        """Account ``n`` more steps."""
        self.steps += n

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (the accountant's own by default)."""
        delta = self.delta if delta is None else delta
        if self.steps == 0 or self.sample_rate == 0:
            return 0.0
        if self.sigma == 0:
            return math.inf
        if self.backend == "opacus":
            from opacus.accountants import RDPAccountant

            acc = RDPAccountant()
            acc.history = [(self.sigma, self.sample_rate, self.steps)]
            with warnings.catch_warnings():  # very little noise: the best order is the smallest; eps is huge anyway
                warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
                return float(acc.get_epsilon(delta=delta, alphas=ORDERS))
        return eps_from_rdp(rdp_subsampled_gaussian(self.sample_rate, self.sigma, self.steps), delta)
