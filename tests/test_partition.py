"""Horizontal partitions: disjoint, complete, deterministic; Dirichlet skews the labels."""

import numpy as np
import pytest

from splitlearn.data import DataError, load_table, partition


def labels():
    return load_table("digits").fields["y"]


@pytest.mark.parametrize("alpha", [None, 0.1, 100.0])
def test_partition_covers_every_row_once(alpha):
    y = labels()
    parts = partition(y, 7, alpha=alpha, seed=3)
    assert len(parts) == 7 and all(len(p) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    again = partition(y, 7, alpha=alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_is_even_and_dirichlet_is_skewed():
    y = labels()

    def spread(parts):  # mean over clients of the share of their most common class
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    iid = partition(y, 10, seed=0)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    assert spread(iid) < 0.2  # about 1/10 of each class
    assert spread(partition(y, 10, alpha=0.1, seed=0)) > 0.5  # a few classes per client
    assert spread(partition(y, 10, alpha=1000.0, seed=0)) < 0.2


def test_bad_partitions():
    with pytest.raises(DataError, match="at least 1"):
        partition(labels(), 0)
    with pytest.raises(DataError, match="only 3 rows"):
        partition(np.array([0, 1, 0]), 4)
    with pytest.raises(DataError, match="alpha must be positive"):
        partition(labels(), 3, alpha=0.0)
