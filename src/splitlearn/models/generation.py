"""Greedy decoding across the pieces of a cut transformers model, each with its own key/value cache.

The prompt goes through every piece once; then each new token does: piece 0 embeds it and runs its blocks
against its cache, the hidden state of that one position crosses each cut (``[1, 1, H]``), the last piece
gives the next token's logits. Only what crosses is counted (:class:`Decoded`): the same bytes the wires
would carry at float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .hf import HFPiece

__all__ = ["Decoded", "greedy"]


@dataclass
class Decoded:
    """New token ids, the bytes that crossed each cut (forward, per cut) and the decoding time."""

    tokens: list[int]
    crossed: list[int] = field(default_factory=list)  # bytes over each cut, prompt included
    prompt_crossed: list[int] = field(default_factory=list)  # of which the prompt's pass
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_token(self) -> list[float]:
        """Per cut: bytes a new token's hidden state takes across it (the prompt's pass left out)."""
        n = max(len(self.tokens) - 1, 1)  # the last token is decided, not sent on
        return [(c - p) / n for c, p in zip(self.crossed, self.prompt_crossed)]


@torch.no_grad()
def greedy(pieces: Sequence[HFPiece], prompt: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | None = None) -> Decoded:
    """Decode ``max_new_tokens`` after ``prompt`` (token ids ``[1, P]``) greedily through ``pieces`` in order
    (stopping early at ``eos_token_id``). Equal, token for token, to the unsplit model's greedy decoding."""
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt is token ids of shape [1, P], got {list(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for p in pieces:
        p.eval()
    caches = [p.new_cache() for p in pieces]
    out = Decoded([], [0] * (len(pieces) - 1))
    new, mask, past = prompt, torch.ones_like(prompt), 0
    start = time.perf_counter()
    for step in range(max_new_tokens):
        positions = torch.arange(past, past + new.shape[1]).unsqueeze(0)
        x = new
        for k, (piece, cache) in enumerate(zip(pieces, caches)):
            y = piece(x, mask, cache=cache, position_ids=positions)
            if k < len(pieces) - 1:
                x = y[0]
                out.crossed[k] += x.numel() * x.element_size()
            else:
                x = y
        if step == 0:
            out.prompt_crossed = list(out.crossed)
        token = int(x[0, -1].argmax())
        out.tokens.append(token)
        past += new.shape[1]
        new = torch.tensor([[token]], dtype=prompt.dtype)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        if eos_token_id is not None and token == eos_token_id:
            break
    out.seconds = time.perf_counter() - start
    return out
