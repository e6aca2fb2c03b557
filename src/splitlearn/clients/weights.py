"""Weight arithmetic of a ``[clients]`` run: a party's segments as one flat state, and the
sample-weighted average (FedAvg) of several."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["state_of", "load_state", "average"]


def state_of(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor of ``modules`` (segment -> module), named ``segment.key``."""
    return {f"{seg}.{k}": v for seg, mod in modules.items() for k, v in mod.state_dict().items()}


def load_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (as :func:`state_of` names it) into ``modules``, in place."""
    with torch.no_grad():
        for k, v in state_of(modules).items():
            v.copy_(state[k])


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of floating-point entries; integer entries (counters) from the first (on the CPU)."""
    total = float(sum(weights))
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].cpu().double() * (w / total) for s, w in zip(states, weights)).to(v.dtype)
        else:
            out[k] = v.cpu().clone()
    return out
