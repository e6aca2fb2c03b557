"""Label-leakage attacks on the cut gradients a party without labels receives (Li et al. 2021).

Both report ``max(auc, 1 - auc)``: 0.5 means the attack learns nothing, 1.0 that it recovers
every label. See :mod:`splitlearn.privacy.labels` for the figures measured against the defenses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["norm_attack_auc", "direction_attack_auc"]


def _auc(labels: Tensor, scores: Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.cpu().numpy(), scores.detach().double().cpu().numpy()))


def norm_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """AUC of the per-sample gradient L2 norm as a score for label 1 (best of both orientations)."""
    auc = _auc(labels.reshape(-1), torch.linalg.vector_norm(grads.reshape(len(grads), -1).double(), dim=1))
    return max(auc, 1 - auc)


def direction_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """Cosine-similarity attack: the attacker takes one sample's gradient as reference and scores
    every other sample by its cosine with it, for "same label as the reference". ``max(auc, 1 - auc)``
    is taken per reference, then averaged over 10 references spread evenly over the samples:
    noise that flips a reference's direction inverts its ranking, which still splits the labels,
    so averaging the raw AUCs first would let such references cancel out and hide the leak."""
    g, y = grads.reshape(len(grads), -1).double(), labels.reshape(-1)
    aucs = []
    for r in torch.linspace(0, len(g) - 1, min(10, len(g))).long().tolist():
        others = torch.arange(len(g)) != r
        same = (y[others] == y[r]).long()
        if 0 < int(same.sum()) < len(same):
            auc = _auc(same, F.cosine_similarity(g[others], g[r:r + 1], dim=1))
            aucs.append(max(auc, 1 - auc))
    if not aucs:
        raise ValueError("need both labels among the samples")
    return sum(aucs) / len(aucs)
