"""Datasets that need no download: scikit-learn's digits and breast cancer, and synthetic data."""

from __future__ import annotations

import numpy as np

from .table import DataError, Table

__all__ = ["digits", "breast_cancer", "synthetic"]


def digits() -> Table:
    """1797 8x8 handwritten digits: ``x`` (64 values in [0, 1]), ``image`` (1x8x8), ``y``, ``parity``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return Table(np.arange(len(y), dtype=np.int64), {"x": x, "image": x.reshape(-1, 1, 8, 8), "y": y, "parity": y % 2},
                 {"x": [f"pixel_{i // 8}_{i % 8}" for i in range(64)]})


def breast_cancer() -> Table:
    """569 patients x 30 features (z-scored with the statistics of all rows), ``y`` 1 = benign."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    return Table(np.arange(len(x), dtype=np.int64), {"x": x, "y": d.target.astype(np.int64)},
                 {"x": list(d.feature_names)})


_SYNTHETIC = {"n": 1000, "features": 20, "classes": 2, "seed": 0, "image": None}


def synthetic(**options) -> Table:
    """Gaussian classes with random means: ``x`` (n, features), ``y``; ``image`` (n, C, H, W) if asked.

    Options: ``n``, ``features``, ``classes``, ``seed``, ``image = [C, H, W]``.
    """
    unknown = set(options) - set(_SYNTHETIC)
    if unknown:
        raise DataError(f"unknown synthetic option(s) {sorted(unknown)}; allowed: {sorted(_SYNTHETIC)}")
    o = {**_SYNTHETIC, **options}
    n, d, k = int(o["n"]), int(o["features"]), int(o["classes"])
    if n < 1 or d < 1 or k < 2:
        raise DataError(f"synthetic data needs n >= 1, features >= 1 and classes >= 2, got n={n}, features={d}, classes={k}")
    rng = np.random.default_rng(int(o["seed"]))
    y = rng.integers(0, k, n).astype(np.int64)
    means = rng.normal(0.0, 1.5, (k, d))
    fields = {"x": (means[y] + rng.normal(0.0, 1.0, (n, d))).astype(np.float32), "y": y}
    if o["image"] is not None:
        shape = tuple(int(s) for s in o["image"])
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"synthetic image must be [C, H, W] with positive sizes, got {list(o['image'])}")
        patterns = rng.normal(0.0, 1.0, (k, *shape))
        fields["image"] = (patterns[y] + rng.normal(0.0, 1.0, (n, *shape))).astype(np.float32)
    return Table(np.arange(n, dtype=np.int64), fields)
