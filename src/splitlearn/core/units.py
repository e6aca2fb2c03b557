"""Figures for people: ``18.9 MFLOPs``, ``4.1 kB`` (three significant digits, SI prefixes)."""

from __future__ import annotations

__all__ = ["human"]


def human(n: float | None, unit: str = "", missing: str = "-") -> str:
    """``n`` with the SI prefix that keeps it readable; ``missing`` for None."""
    if n is None:
        return missing
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.3g} {prefix}{unit}".strip()
        n /= 1000
    return f"{n:.3g} P{unit}"  # pragma: no cover
