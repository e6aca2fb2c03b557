"""Preprocessing that is part of the model: statistics fitted on a party's training rows.

``standardize = true`` (tables) z-scores each feature column; ``normalize = true`` (images)
standardises each channel; ``normalize = { mean = [...], std = [...] }`` uses given values;
``standardize_target = true`` (a label holder's regression targets) z-scores each target the
party holds (one mean and one std per target): the model trains on the standardised target, and
predictions and metrics are turned back into the target's own units (:class:`TargetScale`).
The statistics are fitted on the training rows only, saved beside the party's weights
(``preprocess.safetensors``) and used again, unchanged, by ``predict``: one new row is
transformed exactly as it would be inside a batch, and as the training rows were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .table import DataError, Table

__all__ = ["Preprocess", "TargetScale", "fit_preprocess", "fit_target_scale", "wants_preprocess", "TARGET"]

TARGET = "target:"  # saved target scales are keyed ``target:LOCAL`` (a field name holds no ':')


@dataclass(frozen=True)
class TargetScale:
    """A regression target's standardisation: the model sees ``(y - mean) / std``; :meth:`undo` gives
    its outputs (and the standardised targets) back in the target's own units."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise DataError(f"a target scale needs a finite mean and a finite std above 0, got mean {self.mean!r} "
                            f"and std {self.std!r}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def undo(self, values: np.ndarray) -> np.ndarray:
        """Standardised values (a head's outputs) back in the target's units, in float64."""
        return np.asarray(values, dtype=np.float64) * self.std + self.mean

    def undo_target(self, values: np.ndarray) -> np.ndarray:
        """Standardised targets back in their units, in float32 as targets are held: the original values
        again up to float32 rounding (mostly exactly)."""
        return self.undo(values).astype(np.float32)

    def describe(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def read(cls, value: object) -> "TargetScale":
        """From :meth:`describe`'s ``{"mean": m, "std": s}`` as a peer sends it; a DataError otherwise."""
        if not (isinstance(value, dict) and set(value) == {"mean", "std"}
                and all(type(v) in (int, float) for v in value.values())):
            raise DataError(f"a target scale must be {{\"mean\": number, \"std\": number}}, got {str(value)[:200]}")
        try:
            return cls(float(value["mean"]), float(value["std"]))
        except OverflowError:  # an integer beyond any float
            raise DataError("a target scale's mean or std is too large for a float") from None


@dataclass(frozen=True)
class Preprocess:
    """Per field: ``(value - mean) / std``, with ``mean`` and ``std`` shaped like one row
    (a table's columns) or broadcast per channel (an image's ``[C, 1, 1]``)."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # and ``target:LOCAL`` scales

    @property
    def targets(self) -> dict[str, TargetScale]:
        """The standardised targets: the party's local input name -> its scale."""
        return {k[len(TARGET):]: TargetScale(float(m.reshape(-1)[0]), float(s.reshape(-1)[0]))
                for k, (m, s) in self.stats.items() if k.startswith(TARGET)}

    def with_targets(self, targets: dict[str, TargetScale]) -> "Preprocess":
        """This preprocessing with ``targets``' scales instead of any it had."""
        kept = {k: v for k, v in self.stats.items() if not k.startswith(TARGET)}
        for local, t in targets.items():
            kept[TARGET + local] = (np.array([t.mean], np.float32), np.array([t.std], np.float32))
        return Preprocess(kept)

    def apply(self, table: Table) -> Table:
        """The feature fields standardised (target scales apply to the targets, not here)."""
        features = {k: v for k, v in self.stats.items() if not k.startswith(TARGET)}
        if not features:
            return table
        fields = dict(table.fields)
        for name, (mean, std) in features.items():
            if name not in fields:
                raise DataError(f"the saved preprocessing is for field {name!r}, which this data lacks "
                                f"(it has {sorted(fields)})")
            arr = fields[name]
            try:
                fits = np.broadcast_shapes(arr.shape[1:], mean.shape) == arr.shape[1:]
            except ValueError:
                fits = False
            if not fits:
                raise DataError(f"field {name!r} has rows of shape {list(arr.shape[1:])}, but its saved "
                                f"preprocessing was fitted on rows of shape {list(mean.shape)}")
            fields[name] = ((arr - mean) / std).astype(np.float32)
        if "image" in features and "x" in fields and "x" not in features:  # x is the flattened image
            fields["x"] = fields["image"].reshape(len(table), -1)
        return Table(table.ids, fields, table.columns)

    def tensors(self) -> dict[str, Any]:
        """For safetensors: ``FIELD.mean`` and ``FIELD.std``."""
        import torch

        out = {}
        for name, (mean, std) in self.stats.items():
            out[f"{name}.mean"] = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))
            out[f"{name}.std"] = torch.from_numpy(np.ascontiguousarray(std, dtype=np.float32))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> "Preprocess":
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        stats = {}
        for n in names:
            if f"{n}.mean" not in tensors or f"{n}.std" not in tensors:
                raise DataError(f"the saved preprocessing of field {n!r} lacks its mean or std")
            mean, std = (tensors[f"{n}.{k}"].numpy().astype(np.float32) for k in ("mean", "std"))
            if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise DataError(f"the saved preprocessing of field {n!r} is damaged (shapes {list(mean.shape)} "
                                f"and {list(std.shape)}, or values that are not finite and positive)")
            stats[n] = (mean, std)
        return cls(stats)


def wants_preprocess(options: dict[str, Any]) -> bool:
    return any(bool(options.get(k)) for k in ("standardize", "normalize", "standardize_target"))


def fit_target_scale(values: np.ndarray) -> TargetScale:
    """The scale of a regression target fitted on its training rows (one mean and std over every value;
    a constant target keeps std 1), rounded to float32 as it is saved, so predict undoes exactly what
    training did."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not len(v) or not np.isfinite(v).all():
        raise DataError("standardize_target needs finite target values on the training rows"
                        + ("" if len(v) else " (there are none)"))
    std = float(np.float32(v.std()))
    return TargetScale(float(np.float32(v.mean())), std if std > 0 else 1.0)


def _safe_std(std: np.ndarray) -> np.ndarray:
    return np.where(std > 0, std, 1.0).astype(np.float32)


def fit_preprocess(options: dict[str, Any], table: Table, train: np.ndarray) -> Preprocess:
    """The preprocessing a data source's options ask for, fitted on the rows at ``train``."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = table.take(train) if len(train) else table
    if options.get("standardize"):
        x = rows.fields.get("x")
        if x is None or x.ndim != 2:
            raise DataError("standardize needs a table of feature columns (field 'x')")
        stats["x"] = (x.mean(0, dtype=np.float64).astype(np.float32), _safe_std(x.std(0, dtype=np.float64)))
    norm = options.get("normalize")
    if norm:
        img = rows.fields.get("image")
        if img is None or img.ndim != 4:
            raise DataError("normalize needs images (field 'image', [C, H, W] per row)")
        c = img.shape[1]
        if isinstance(norm, dict):
            mean = np.asarray(norm.get("mean"), dtype=np.float32).reshape(-1)
            std = np.asarray(norm.get("std"), dtype=np.float32).reshape(-1)
            if mean.shape != (c,) or std.shape != (c,) or not (std > 0).all():
                raise DataError(f"normalize: mean and std need one value per channel ({c}), std above 0; "
                                f"got mean {mean.tolist()} and std {std.tolist()}")
        else:
            mean = img.mean((0, 2, 3), dtype=np.float64).astype(np.float32)
            std = _safe_std(img.std((0, 2, 3), dtype=np.float64))
        stats["image"] = (mean.reshape(c, 1, 1), std.reshape(c, 1, 1))
    return Preprocess(stats)
