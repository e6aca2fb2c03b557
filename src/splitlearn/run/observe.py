"""What a party saw on its wires, kept for the leakage audit.

A :class:`Recorder` is attached to a party (``party.observer``) and keeps, per wire and
direction, the tensors the party *received* during training together with the sample ids
they belong to: the first ``max_rows`` rows of the run (early gradients leak labels most)
and the last ``max_rows`` (the trained model's smashed data). Nothing else is kept. Where a wire's shape
varies from batch to batch (a sequence length), its rows are kept zero-padded to the longest recorded (its
mask wire, padded alike, tells the padding apart).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

__all__ = ["Recorder"]


def _padded_cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' rows, one tensor: each dimension after the batch's zero-padded to its largest size."""
    most = [max(c.shape[d] for c in chunks) for d in range(1, chunks[0].ndim)]
    padded = []
    for c in chunks:
        pad = [x for d in reversed(range(1, c.ndim)) for x in (0, most[d - 1] - c.shape[d])]
        padded.append(torch.nn.functional.pad(c, pad) if any(pad) else c)
    return torch.cat(padded)


class Recorder:
    def __init__(self, ids: np.ndarray | None, max_rows: int = 4096):
        """``ids``: the party's sorted aligned sample ids; None for a party without data, which records
        positions in them (as a party with string ids does)."""
        self.ids, self.max_rows = ids, max_rows
        self.first: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.last: dict[tuple[str, str], deque] = {}
        self._count: dict[tuple[str, str], int] = {}

    def __call__(self, wire: str, direction: str, st, t: torch.Tensor) -> None:
        if st.mode != "train":
            return
        key = (wire, direction)
        # sample ids where they are integers; positions in the sorted ids where they are strings
        ids = self.ids
        rows = torch.as_tensor(ids[st.rows.numpy()]) if ids is not None and ids.dtype.kind in "iu" else st.rows.clone()
        t = t.detach().clone()
        seen = self._count.get(key, 0)
        if seen < self.max_rows:
            self.first.setdefault(key, []).append((rows, t))
        self._count[key] = seen + len(rows)
        last = self.last.setdefault(key, deque())
        last.append((rows, t))
        while sum(len(r) for r, _ in last) - len(last[0][0]) >= self.max_rows:
            last.popleft()

    def tensors(self) -> dict[str, torch.Tensor]:
        """``WIRE|DIRECTION|first|values`` / ``...|ids`` (and ``last``), ready for safetensors."""
        out: dict[str, torch.Tensor] = {}
        for part, store in (("first", self.first), ("last", self.last)):
            keep = slice(-self.max_rows, None) if part == "last" else slice(0, self.max_rows)
            for (wire, direction), chunks in store.items():
                values = _padded_cat([t for _, t in chunks])[keep]
                ids = torch.cat([r for r, _ in chunks])[keep]
                out[f"{wire}|{direction}|{part}|values"] = values.contiguous()
                # a party without data (or with string ids) knows only positions in the sorted aligned ids
                label = "ids" if self.ids is not None and self.ids.dtype.kind in "iu" else "positions"
                out[f"{wire}|{direction}|{part}|{label}"] = ids.to(torch.int64).contiguous()
        return out
