"""Datasets that need no download: scikit-learn's digits, breast cancer, wine and diabetes, and synthetic data."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from .table import DataError, Table

__all__ = ["digits", "breast_cancer", "wine", "diabetes", "synthetic", "SYNTHETIC_OPTIONS"]


def _sklearn_file(name: str) -> Path | None:
    """scikit-learn's copy of an embedded dataset's file, found without importing scikit-learn (which
    takes a party process 1.5 s); None where it is not there (another layout: load it through sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations if spec is not None else None) or ():
        path = Path(folder) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def digits() -> Table:
    """1797 8x8 handwritten digits: ``x`` (64 values in [0, 1]), ``image`` (1x8x8), ``y``, ``parity`` (y % 2)."""
    path = _sklearn_file("digits.csv.gz")
    if path is not None:  # the rows load_digits reads, as it reads them
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
        pixels, target = table[:, :-1], table[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.data, d.target
    x = (pixels / 16.0).astype(np.float32)
    y = target.astype(np.int64)
    return Table(np.arange(len(y), dtype=np.int64), {"x": x, "image": x.reshape(-1, 1, 8, 8), "y": y, "parity": y % 2},
                 {"x": [f"pixel_{i // 8}_{i % 8}" for i in range(64)]})


def breast_cancer() -> Table:
    """569 patients x 30 features, ``y`` 1 = benign.

    ``x`` is z-scored per column with the mean and standard deviation of all 569 rows
    (train and test alike), so every party derives the same values without coordination.
    """
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    return Table(np.arange(len(x), dtype=np.int64), {"x": x, "y": d.target.astype(np.int64)},
                 {"x": list(d.feature_names)})


def wine() -> Table:
    """178 wines x 13 measurements, ``y`` one of 3 cultivars; ``x`` z-scored like :func:`breast_cancer`'s."""
    from sklearn.datasets import load_wine

    d = load_wine()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    return Table(np.arange(len(x), dtype=np.int64), {"x": x, "y": d.target.astype(np.int64)},
                 {"x": list(d.feature_names)})


def diabetes() -> Table:
    """442 patients x 10 baseline measurements (scikit-learn's scaled values), ``y`` disease progression
    one year later (float32, 25 to 346): a regression target."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return Table(np.arange(len(d.target), dtype=np.int64),
                 {"x": d.data.astype(np.float32), "y": d.target.astype(np.float32)}, {"x": list(d.feature_names)})


SYNTHETIC_OPTIONS: dict[str, Any] = {"n": 1000, "features": 20, "classes": 2, "seed": 0, "image": None}


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"synthetic option {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def synthetic(**options: Any) -> Table:
    """Gaussian classes around random means: ``x`` (n, features) float32, ``y``; ``image`` (n, C, H, W) if asked.

    Options: ``n``, ``features``, ``classes``, ``seed``, ``image = [C, H, W]``. The same options give
    the same data everywhere; asking for ``image`` leaves ``x`` and ``y`` unchanged.
    """
    unknown = set(options) - set(SYNTHETIC_OPTIONS)
    if unknown:
        raise DataError(f"unknown synthetic option(s) {sorted(unknown)}; allowed: {sorted(SYNTHETIC_OPTIONS)}")
    o = {**SYNTHETIC_OPTIONS, **options}
    n, d, k = _int("n", o["n"], 1), _int("features", o["features"], 1), _int("classes", o["classes"], 2)
    rng = np.random.default_rng(_int("seed", o["seed"], 0))
    y = rng.integers(0, k, n).astype(np.int64)
    means = rng.normal(0.0, 1.5, (k, d))
    fields = {"x": (means[y] + rng.normal(0.0, 1.0, (n, d))).astype(np.float32), "y": y}
    if o["image"] is not None:
        shape = o["image"]
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise DataError(f"synthetic option image must be [C, H, W], got {shape!r}")
        shape = tuple(_int("image size", s, 1) for s in shape)
        patterns = rng.normal(0.0, 1.0, (k, *shape))
        fields["image"] = (patterns[y] + rng.normal(0.0, 1.0, (n, *shape))).astype(np.float32)
    return Table(np.arange(n, dtype=np.int64), fields)
