"""Deterministic train/test splits and batches: every party derives the same ones from the seed."""

from __future__ import annotations

import numpy as np

from .table import DataError

__all__ = ["train_test_split_ids", "validation_count", "validation_split_ids", "batches"]

_VALIDATION = 0x76616C  # the validation rows' own stream beside the test split's ("val")


def train_test_split_ids(ids: np.ndarray, test_fraction: float, seed: int,
                         is_test: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids), each sorted ascending.

    The test set is ``round(len(ids) * test_fraction)`` ids drawn by a permutation of the sorted ids
    from ``np.random.default_rng(seed)``, so it depends only on the ids, fraction and seed.
    ``is_test`` (aligned with ``ids``, e.g. MNIST's official split) overrides the fraction.
    """
    ids = np.asarray(ids)
    if is_test is not None:
        mask = np.asarray(is_test).astype(bool).reshape(-1)
        if len(mask) != len(ids):
            raise DataError(f"is_test has {len(mask)} entries for {len(ids)} ids")
        return np.sort(ids[~mask]), np.sort(ids[mask])
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(np.sort(ids))
    n_test = int(round(len(ids) * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def validation_count(train: int, fraction: float) -> int:
    """How many of ``train`` training rows are carved out for validation: ``round(train * fraction)``; a
    DataError unless both the validation and the training rows that remain are at least one."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {fraction}")
    n = int(round(train * fraction))
    if not 0 < n < train:
        raise DataError(f"validation_fraction = {fraction} of {train} training rows leaves "
                        f"{'no validation' if n <= 0 else 'no training'} row")
    return n


def validation_split_ids(train_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, validation ids) carved from ``train_ids``, each sorted ascending: the
    :func:`validation_count` first ids of a permutation of the sorted ids by ``default_rng([seed, "val"])``,
    so, as the test split, they depend only on the ids, the fraction and the seed (every party of an aligned
    plan derives the same rows)."""
    ids = np.sort(np.asarray(train_ids))
    n = validation_count(len(ids), fraction)
    perm = np.random.default_rng([seed, _VALIDATION]).permutation(ids)
    return np.sort(perm[n:]), np.sort(perm[:n])


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Positions ``0..n-1`` in batches (the last may be smaller), shuffled by ``default_rng([seed, epoch])``."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
