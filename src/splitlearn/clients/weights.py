"""Weight arithmetic of a ``[clients]`` run: a party's segments as one flat state, the
sample-weighted average (FedAvg) of several, and a state as one vector of values (what secure
aggregation masks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["state_of", "load_state", "average", "flatten", "unflatten"]


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


def flatten(state: dict[str, torch.Tensor]) -> np.ndarray:
    """Every value of ``state`` as one float64 vector, its entries in the order of their sorted names."""
    parts = [state[k].detach().cpu().reshape(-1).double().numpy() for k in sorted(state)]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(values: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state of :func:`flatten`'s ``values`` with ``like``'s names, shapes and dtypes (integer
    entries, counters, rounded to the nearest)."""
    out, at = {}, 0
    for k in sorted(like):
        ref = like[k]
        v = torch.from_numpy(np.array(values[at:at + ref.numel()], dtype=np.float64)).reshape(ref.shape)
        out[k] = v.to(ref.dtype) if ref.is_floating_point() else v.round().to(ref.dtype)
        at += ref.numel()
    return {k: out[k] for k in like}
