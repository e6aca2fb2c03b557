"""The audit's figures (matplotlib's Agg canvas on a private Figure: no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["inversion_grid", "sweep_plot", "attack_bars"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def inversion_grid(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor,
                   image_shape: Sequence[int] | None, title: str) -> Path:
    """Originals on the top row, the attacker's reconstructions below. Images are drawn as images;
    tabular rows as one heat map each (rows: samples, columns: features, same colour scale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(originals)
    if image_shape is not None:
        shape = tuple(image_shape)
        fig = _figure(1.3 * max(k, 1) + 0.8, 3.2)
        lo = float(torch.minimum(originals.min(), reconstructions.min())) if k else 0.0
        hi = float(torch.maximum(originals.max(), reconstructions.max())) if k else 1.0
        axes = fig.subplots(2, max(k, 1), squeeze=False)
        for row, (data, label) in enumerate(((originals, "original"), (reconstructions, "reconstructed"))):
            for i in range(max(k, 1)):
                ax = axes[row][i]
                ax.set_xticks([])
                ax.set_yticks([])
                if i >= k:
                    continue
                img = data[i].reshape(shape)
                if img.dim() == 3:
                    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
                ax.imshow(img.numpy(), cmap="gray", vmin=lo, vmax=hi)
            axes[row][0].set_ylabel(label)
    else:
        d = originals.shape[1] if k else 1
        fig = _figure(min(12.0, 1.5 + 0.25 * d), 4.0)
        axes = fig.subplots(2, 1, squeeze=False)
        lim = float(max(originals.abs().max(), reconstructions.abs().max())) if k else 1.0
        for row, (data, label) in enumerate(((originals, "original"), (reconstructions, "reconstructed"))):
            ax = axes[row][0]
            im = ax.imshow(data.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_ylabel(f"{label}\n(sample)")
            ax.set_yticks(range(k))
            fig.colorbar(im, ax=ax)
        from matplotlib.ticker import MaxNLocator

        for ax in (axes[0][0], axes[1][0]):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1][0].set_xlabel("feature")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return path


def sweep_plot(path: Path, param: str, rows: list[dict[str, Any]], figures: dict[str, str],
               join: bool = True) -> Path:
    """Test accuracy against each leakage figure (one panel each), points labelled by each row's
    ``label`` (its setting); ``join``: a line through the points (one parameter's
    values, in order; not a grid's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = [(k, label) for k, label in figures.items() if any(r.get(k) is not None for r in rows)]
    n = max(1, len(present))
    cols = min(3, n)
    fig = _figure(4.0 * cols, 3.4 * math.ceil(n / cols))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).reshape(-1)
    for ax in axes[len(present):]:
        ax.set_visible(len(present) == 0)
    for ax, (key, label) in zip(axes, present):
        pts = [(r[key], r["test_accuracy"], r["label"]) for r in rows
               if r.get(key) is not None and r.get("test_accuracy") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if join else "o")
        for x, y, v in pts:
            ax.annotate(v, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if not present:
        axes[0].text(0.5, 0.5, "no leakage figure measured", ha="center", va="center")
    fig.suptitle(f"sweep of {param}: accuracy vs leakage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def attack_bars(path: Path, title: str, values: dict[str, float], highlight: str, label: str = "accuracy") -> Path:
    """One bar per figure of an attack (its baselines, the attack ``highlight`` in red, the main task),
    each with its value written above it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(1.2 + 1.25 * len(values), 3.2)
    ax = fig.subplots()
    names = list(values)
    bars = ax.bar(range(len(names)), [values[n] for n in names],
                  color=["tab:red" if n == highlight else "tab:grey" for n in names])
    for b, n in zip(bars, names):
        ax.annotate(f"{values[n]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8, rotation=15)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
