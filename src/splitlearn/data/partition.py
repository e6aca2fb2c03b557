"""Sharing rows among horizontal clients: iid, or non-iid with a Dirichlet prior over labels."""

from __future__ import annotations

import numpy as np

from .table import DataError

__all__ = ["partition"]


def partition(labels: np.ndarray, clients: int, *, alpha: float | None = None, seed: int = 0) -> list[np.ndarray]:
    """Disjoint positions of ``labels`` for each client, covering every row once.

    ``alpha=None``: iid, an even random split. Otherwise, for every class the rows of that class
    are divided among the clients in proportions drawn from Dirichlet(alpha) (Hsu et al., 2019):
    small alpha gives each client few classes, large alpha approaches iid.
    """
    labels = np.asarray(labels)
    if clients < 1:
        raise DataError(f"clients must be at least 1, got {clients}")
    if clients > len(labels):
        raise DataError(f"{clients} clients but only {len(labels)} rows: every client needs at least one")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]
    if alpha <= 0:
        raise DataError(f"the Dirichlet alpha must be positive, got {alpha}")
    shares: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(rows)).astype(int)[:-1]
        for k, part in enumerate(np.split(rows, cuts)):
            shares[k].append(part)
    out = [np.sort(np.concatenate(s)) for s in shares]
    empty = [k for k, p in enumerate(out) if len(p) == 0]
    for k in empty:  # a client drew nothing: give it one row of the largest share
        donor = int(np.argmax([len(p) for p in out]))
        out[k], out[donor] = out[donor][-1:], out[donor][:-1]
    return out
