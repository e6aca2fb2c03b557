"""What the hospital and the server agree on before they train (docs/own-loop.md): the model and where it
is cut, the wire's settings, and the order of the rows. Each party imports it and keeps its own half."""

from __future__ import annotations

import threading

import torch
from sklearn.datasets import load_digits
from torch import nn

import splitlearn

BATCH = 32
ACCUMULATE = 2  # batches per optimizer step
WIRE = {"codec": "float16", "grad_codec": "float16"}  # both ends give the same settings (checked)
_BUILDING = threading.Lock()  # in one process (docs/own-loop.md) both parties build their half at once


def pieces() -> list[nn.Module]:
    """The bottom (the hospital's) and the top (the server's) of one model: both parties build it from
    the same seed, so the two halves are those of one initial model."""
    with _BUILDING, torch.random.fork_rng(devices=[]):  # torch's generator is the process's: one party at a time
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return splitlearn.cut(model, after=1)  # after the first ReLU: 128 values per sample cross


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits of scikit-learn, in the same order at both parties: the hospital uses the images,
    the server the labels (a lab that diagnosed the same patients)."""
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


def batches(epoch: int | None) -> list[torch.Tensor]:
    """The rows of each batch: the first 80% of a fixed shuffle are for training (shuffled again every
    epoch, from the epoch's seed), the rest for testing (``epoch=None``)."""
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(1234))
    train, test = order[:1437], order[1437:]
    if epoch is None:
        return list(test.split(BATCH))
    return list(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))].split(BATCH))
