"""Each party's own random stream for its random layers (Dropout and the like).

Torch's random layers draw from its one global generator, which parties running in threads of
one process would share and race on, and which no plan seeds. A :class:`PartyRandom` holds a
party's own generator state, seeded from the plan seed and the party's name: for each forward
the global generator is set to that state, under one lock for the whole process, and the
advanced state is kept afterwards, so the same plan and seed draw the same numbers at every
party however the parties are run (threads, processes, machines) and the caller's generator is
left as it was.
"""

from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["PartyRandom", "party_seed"]

_GLOBAL = threading.RLock()  # the one global generator of this process


def party_seed(plan_seed: int, party: str) -> int:
    """The seed of a party's random stream (a different stream for every party name)."""
    return (plan_seed * 1_000_033 + zlib.crc32(f"party:{party}".encode())) % (2**63 - 1)


class PartyRandom:
    """A party's random stream on its device (the CPU generator, and CUDA's where it computes)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = None
        if self.device.type == "cuda":
            self.cuda = torch.Generator(device=self.device).manual_seed(seed).get_state()

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Inside, torch's global generator draws this party's stream."""
        with _GLOBAL:
            saved = torch.get_rng_state()
            torch.set_rng_state(self.cpu)
            saved_cuda = None
            if self.cuda is not None:
                saved_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self.cuda, self.device)
            try:
                yield
            finally:
                self.cpu = torch.get_rng_state()
                torch.set_rng_state(saved)
                if saved_cuda is not None:
                    self.cuda = torch.cuda.get_rng_state(self.device)
                    torch.cuda.set_rng_state(saved_cuda, self.device)

    def state(self) -> dict[str, torch.Tensor]:
        """The stream's position (for a checkpoint)."""
        return {"cpu": self.cpu.clone(), **({"cuda": self.cuda.clone()} if self.cuda is not None else {})}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.cpu = state["cpu"].clone()
        if self.cuda is not None and "cuda" in state:
            self.cuda = state["cuda"].clone()
