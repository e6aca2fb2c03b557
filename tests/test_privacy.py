"""splitlearn.privacy: the defenses as pure functions, and label leakage measured on real cut gradients.

The cut gradients come from a small split model trained by hand (no engine) on breast cancer:
bottom Linear(30, 16) + ReLU, top Linear(16, 2), cross entropy, SGD lr 0.05, batch 32, a fixed
stratified 80/20 split. The figures they give are in splitlearn/privacy/labels.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitlearn.privacy import (PrivacyAccountant, clip_and_noise, direction_attack_auc, distance_correlation,
                                marvell, max_norm, norm_attack_auc, randomized_response)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- NoPeek ----------------------------------------------------------------------------------

def test_distance_correlation_independent_identical_and_linear():
    g = gen()
    x = torch.randn(500, 30, generator=g)
    assert float(distance_correlation(x, torch.randn(500, 16, generator=g))) < 0.1
    assert abs(float(distance_correlation(x, x)) - 1) < 1e-5
    assert float(distance_correlation(x, x @ torch.randn(30, 16, generator=g))) > 0.7


@pytest.mark.parametrize("x, z", [
    (torch.randn(32, 3, 8, 8), torch.randn(32, 16)),
    (torch.ones(8, 5), torch.randn(8, 4)),  # constant input
    (torch.randn(1, 5), torch.randn(1, 4)),  # batch of one
    (torch.randn(3, 5), torch.randn(3, 4)),
    (torch.randn(4, 5).repeat(2, 1), torch.randn(8, 4)),  # duplicated rows
])
def test_distance_correlation_is_safe_and_differentiable(x, z):
    x, z = x.clone().requires_grad_(), z.clone().requires_grad_()
    r = distance_correlation(x, z)
    assert r.shape == () and 0 <= r.item() <= 1
    r.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()
    if len(x) == 1 or bool((x == x[0]).all()):
        assert r.item() == 0


# -- activation noise and accounting ---------------------------------------------------------

def test_clip_and_noise_clips_exactly_and_keeps_small_vectors():
    z = torch.randn(64, 4, 5, generator=gen()) * torch.linspace(0.01, 3, 64)[:, None, None]
    out = clip_and_noise(z, clip=2.0, sigma=0.0)
    norms, before = out.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1)
    assert (norms <= 2.0 * (1 + 1e-6)).all()
    assert torch.equal(out[before <= 2.0], z[before <= 2.0])
    assert torch.allclose(norms[before > 2.0], torch.tensor(2.0))


def test_clip_and_noise_noise_and_gradient():
    z = torch.randn(2000, 8, generator=gen()).requires_grad_()
    out = clip_and_noise(z, clip=1.0, sigma=0.5, generator=gen(1))
    assert abs((out - clip_and_noise(z, 1.0, 0.0)).std().item() - 0.5) < 0.02
    assert torch.equal(out, clip_and_noise(z, 1.0, 0.5, gen(1)))  # reproducible
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    zero = torch.zeros(3, 4, requires_grad=True)
    clip_and_noise(zero, 1.0, 0.0).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_accountant_monotone():
    def eps(sigma: float, steps: int) -> float:
        acc = PrivacyAccountant(sigma, sample_rate=0.01)
        acc.step(steps)
        return acc.epsilon()

    assert PrivacyAccountant(1.0, 0.01).epsilon() == 0.0
    assert PrivacyAccountant(1.0, 0.01).backend in ("opacus", "builtin")
    assert eps(1.0, 100) < eps(1.0, 1000) < eps(1.0, 10000)
    assert eps(0.8, 1000) > eps(1.0, 1000) > eps(2.0, 1000)
    acc = PrivacyAccountant(1.0, 0.01)
    for _ in range(10):
        acc.step()
    assert acc.steps == 10 and acc.epsilon(1e-3) < acc.epsilon(1e-6)


SETTINGS = [(1.0, 0.01, 1000), (1.1, 256 / 60000, 10000), (0.8, 0.05, 100), (2.0, 0.1, 500), (0.6, 0.02, 3000)]


@pytest.mark.parametrize("sigma, q, steps", SETTINGS)
def test_builtin_accountant_agrees_with_opacus(sigma, q, steps):
    pytest.importorskip("opacus.accountants", exc_type=ImportError, reason="opacus is an optional extra; the builtin accountant is used")
    acc = PrivacyAccountant(sigma, q)
    acc.step(steps)
    assert acc.backend == "opacus"
    reference = acc.epsilon()
    acc.backend = "builtin"
    assert reference > 0 and abs(acc.epsilon() / reference - 1) < 0.05


def test_builtin_accountant_without_opacus():
    acc = PrivacyAccountant(1.0, 0.01)
    acc.backend = "builtin"
    acc.step(1000)
    assert 1.5 < acc.epsilon() < 2.5  # 2.10 for the standard setting (Opacus gives the same)
    full = PrivacyAccountant(1.0, 1.0)
    full.backend = "builtin"
    full.step(1)  # no subsampling: the Gaussian mechanism's RDP alpha / (2 sigma^2)
    assert math.isfinite(full.epsilon()) and full.epsilon() > 1


# -- randomized response ---------------------------------------------------------------------

@pytest.mark.parametrize("epsilon, k", [(1.0, 2), (0.5, 10), (2.0, 4)])
def test_randomized_response_frequency(epsilon, k):
    n = 20000
    labels = torch.randint(0, k, (n,), generator=gen())
    out = randomized_response(labels, epsilon, k, gen(1))
    assert out.dtype == labels.dtype and out.shape == labels.shape and out.min() >= 0 and out.max() < k
    p = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    kept = float((out == labels).float().mean())
    assert abs(kept - p) < 3 * math.sqrt(p * (1 - p) / n)
    if k > 2:  # the other classes are uniform: label 0 becomes each of 1..k-1 equally often
        changed = out[(labels == 0) & (out != 0)]
        counts = torch.bincount(changed, minlength=k)[1:].float()
        assert (counts / counts.sum() - 1 / (k - 1)).abs().max() < 0.05


# -- label leakage on real cut gradients -----------------------------------------------------

def _data():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(xtr)
    return [torch.tensor(scaler.transform(a), dtype=torch.float32) for a in (xtr, xte)] + [torch.tensor(ytr),
                                                                                          torch.tensor(yte)]


def train_split(epochs: int = 20, protect=None, seed: int = 0):
    """Train bottom/top by hand; return test accuracy and the first epoch's per-sample cut gradients
    (as (gradients, labels) batches). ``protect(grad, labels, generator)`` changes the gradient the
    bottom receives; the top always trains on the true loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        return _train_split(epochs, protect, seed)
    finally:
        torch.set_num_threads(threads)


def _train_split(epochs: int, protect, seed: int):
    xtr, xte, ytr, yte = _data()
    torch.manual_seed(seed)
    bottom, top = nn.Sequential(nn.Linear(30, 16), nn.ReLU()), nn.Linear(16, 2)
    opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], lr=0.05)
    order, noise = gen(seed + 1), gen(seed + 2)
    first_epoch = []
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=order)
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            h = bottom(xtr[idx])
            cut = h.detach().requires_grad_()
            opt.zero_grad()
            F.cross_entropy(top(cut), ytr[idx], reduction="sum").backward()  # per-sample gradients at the cut
            grad = cut.grad
            if epoch == 0:
                first_epoch.append((grad.clone(), ytr[idx]))
            if protect is not None:
                grad = protect(grad, ytr[idx], noise)
            for p in top.parameters():
                p.grad /= len(idx)  # the mean loss
            h.backward(grad / len(idx))
            opt.step()
    with torch.no_grad():
        accuracy = float((top(bottom(xte)).argmax(1) == yte).float().mean())
    return accuracy, first_epoch


@pytest.fixture(scope="module")
def unprotected():
    return train_split()


def _protected(batches, protect, seed: int = 0):
    g = gen(seed)
    return torch.cat([protect(grad, y, g) for grad, y in batches]), torch.cat([y for _, y in batches])


def test_unprotected_gradients_leak_labels(unprotected):
    _, batches = unprotected
    grads, labels = torch.cat([g for g, _ in batches]), torch.cat([y for _, y in batches])
    assert grads.shape == (455, 16)
    assert direction_attack_auc(grads, labels) > 0.9  # measured 1.000: binary CE cut gradients are collinear
    assert 0.5 <= norm_attack_auc(grads, labels) <= 1  # measured 0.784 (the minority class has larger gradients)


def test_max_norm_hides_the_norm_not_the_direction(unprotected):
    _, batches = unprotected
    grads, labels = _protected(batches, lambda g, y, gen_: max_norm(g, gen_))
    assert norm_attack_auc(grads, labels) <= 0.6  # measured 0.505
    assert direction_attack_auc(grads, labels) > 0.9  # measured 0.988: the reason for marvell


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_marvell_hides_norm_and_direction(unprotected, seed):
    _, batches = unprotected
    grads, labels = _protected(batches, lambda g, y, gen_: marvell(g, y, generator=gen_), seed)  # default strength
    assert norm_attack_auc(grads, labels) <= 0.6  # measured 0.504-0.525
    assert direction_attack_auc(grads, labels) <= 0.6  # measured 0.548-0.572


def test_marvell_costs_little_accuracy(unprotected):
    accuracy, _ = unprotected
    protected, _ = train_split(protect=lambda g, y, gen_: marvell(g, y, generator=gen_))
    assert accuracy > 0.93  # measured 0.956
    assert protected >= accuracy - 0.02  # measured 0.956 (no loss; -0.35 points on average over 10 seeds)


def test_label_protections_shapes_and_errors():
    g = torch.randn(10, 2, 3, generator=gen())
    y = torch.tensor([0, 1] * 5)
    for out in (max_norm(g, gen()), marvell(g, y, 1.0, gen()), marvell(g, y.float()[:, None], 0.5, gen())):
        assert out.shape == g.shape and torch.isfinite(out).all()
    assert torch.equal(marvell(g, y, 0.0), g)
    assert torch.isfinite(marvell(g, torch.zeros(10, dtype=torch.long), 1.0, gen())).all()  # one class only
    norms = max_norm(torch.ones(4, 3), gen())
    assert torch.equal(norms, torch.ones(4, 3))  # equal norms: nothing to hide
    with pytest.raises(ValueError):
        marvell(g, torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError):
        marvell(g, y[:5])
