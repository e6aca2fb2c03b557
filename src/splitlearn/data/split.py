"""Deterministic train/test splits and batches: every party derives the same ones from the seed."""

from __future__ import annotations

import numpy as np

__all__ = ["train_test_split_ids", "batches"]


def train_test_split_ids(ids: np.ndarray, test_fraction: float, seed: int,
                         is_test: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids), each sorted. ``is_test`` (aligned with ``ids``) overrides the fraction."""
    ids = np.asarray(ids)
    if is_test is not None:
        mask = np.asarray(is_test).astype(bool)
        return np.sort(ids[~mask]), np.sort(ids[mask])
    perm = np.random.default_rng(seed).permutation(np.sort(ids))
    n_test = int(round(len(ids) * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Positions ``0..n-1`` in batches (the last may be smaller), shuffled per (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
