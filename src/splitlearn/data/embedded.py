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


def _csv_file(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(data float64, target int) of scikit-learn's ``load_csv_data`` file NAME (a header
    ``n,features,class names...``, then one row a sample, its target last), read as it reads it; None
    where the file is not there."""
    path = _sklearn_file(name)
    if path is None:
        return None
    with path.open(encoding="utf-8") as f:
        n, features = (int(v) for v in f.readline().split(",")[:2])
        table = np.loadtxt(f, delimiter=",", ndmin=2)
    if table.shape != (n, features + 1):
        return None  # another layout than the one read here: scikit-learn reads it
    return table[:, :-1], table[:, -1].astype(int)


def _zscored(data: np.ndarray, target: np.ndarray, names: list[str]) -> Table:
    x = ((data - data.mean(0)) / data.std(0)).astype(np.float32)
    return Table(np.arange(len(x), dtype=np.int64), {"x": x, "y": target.astype(np.int64)}, {"x": names})


_BREAST_CANCER = [f"{kind}{what}" for kind in ("mean ", "", "worst ") for what in (
    "radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity", "concave points",
    "symmetry", "fractal dimension")]
_BREAST_CANCER[10:20] = [f"{n} error" for n in _BREAST_CANCER[10:20]]
_WINE = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids",
         "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280/od315_of_diluted_wines",
         "proline"]
_DIABETES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def breast_cancer() -> Table:
    """569 patients x 30 features, ``y`` 1 = benign.

    ``x`` is z-scored per column with the mean and standard deviation of all 569 rows
    (train and test alike), so every party derives the same values without coordination.
    """
    read = _csv_file("breast_cancer.csv")
    if read is None:
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        read = d.data, d.target
    return _zscored(*read, list(_BREAST_CANCER))


def wine() -> Table:
    """178 wines x 13 measurements, ``y`` one of 3 cultivars; ``x`` z-scored like :func:`breast_cancer`'s."""
    read = _csv_file("wine_data.csv")
    if read is None:
        from sklearn.datasets import load_wine

        d = load_wine()
        read = d.data, d.target
    return _zscored(*read, list(_WINE))


def diabetes() -> Table:
    """442 patients x 10 baseline measurements (scikit-learn's scaled values), ``y`` disease progression
    one year later (float32, 25 to 346): a regression target."""
    data, target = _sklearn_file("diabetes_data_raw.csv.gz"), _sklearn_file("diabetes_target.csv.gz")
    if data is not None and target is not None:  # load_diabetes(scaled=True), as it computes it
        with gzip.open(data, mode="rt", encoding="utf-8") as f:
            x = np.loadtxt(f)
        with gzip.open(target, mode="rt", encoding="utf-8") as f:
            y = np.loadtxt(f)
        mean, std = np.nanmean(x, 0), np.nanstd(x, 0)  # sklearn.preprocessing.scale's steps (these columns
        x -= mean                                        # need none of its corrections: tested bit for bit)
        x /= std
        x /= x.shape[0] ** 0.5
    else:
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        x, y = d.data, d.target
    return Table(np.arange(len(y), dtype=np.int64), {"x": x.astype(np.float32), "y": y.astype(np.float32)},
                 {"x": list(_DIABETES)})


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
