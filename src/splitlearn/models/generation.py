"""Greedy decoding across the pieces of a cut transformers model, each with its own key/value cache.

The prompt goes through every piece once; then each new token does: piece 0 embeds it and runs its blocks
against its cache, the hidden state of that one position crosses each cut (``[1, 1, H]``), the last piece
gives the next token's logits. :class:`CachedPiece` is a piece with its cache (strict about what may follow
what), :class:`Decoding` the text owner's prompt and tokens, :class:`Feed` its text fields for the engine
(``splitlearn.launch.generating`` runs generation as steps of a run), :class:`Watch` a party's bytes per new
token. :func:`greedy` chains the pieces in this process (counting what would cross, at float32).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .hf import HFPiece

__all__ = ["Decoded", "greedy", "Decoding", "Feed", "Watch", "CachedPiece"]


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
    """Decode ``max_new_tokens`` after ``prompt`` (token ids ``[1, P]``) greedily through ``pieces`` in order, in
    this process (stopping early at ``eos_token_id``), each with its cache (:class:`CachedPiece`, as in a run).
    Equal, token for token, to the unsplit model's greedy decoding."""
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt is token ids of shape [1, P], got {list(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    decoding = Decoding(prompt[0].tolist())
    cached = [CachedPiece(p.eval(), Watch(), decoding if k == len(pieces) - 1 else None, starts=1)
              for k, p in enumerate(pieces)]
    out = Decoded([], [0] * (len(pieces) - 1))
    decoding.live, decoding.started = True, time.perf_counter()
    for step in range(max_new_tokens):
        x, mask = decoding.ids(), decoding.mask()
        for k, piece in enumerate(cached):
            x = piece(x, mask)
            if k < len(cached) - 1:
                x = x[0]
                out.crossed[k] += x.numel() * x.element_size()
        if step == 0:
            out.prompt_crossed = list(out.crossed)
        if eos_token_id is not None and decoding.tokens[-1] == eos_token_id:
            break
    out.tokens, out.seconds = list(decoding.tokens), decoding.seconds
    return out


# -- decoding across party processes: the engine's steps, one new token each -------------------------------------

class Decoding:
    """The text owner's side of split generation through the engine: step 0 feeds the prompt, step ``k`` the
    token step ``k - 1`` decided; the last piece (the owner's, :class:`CachedPiece`) decides each token. A read
    of a slice (``[:1]``: the handshake's stand-in row) decides nothing."""

    def __init__(self, prompt: Sequence[int]):
        if not prompt:
            raise ValueError("the prompt has no token")
        self.prompt = torch.tensor([list(prompt)], dtype=torch.int64)  # [1, P]
        self.tokens: list[int] = []
        self.live = False  # False while the handshake runs the pieces on stand-ins
        self.started: float | None = None
        self.seconds = 0.0

    def ids(self) -> torch.Tensor:
        """What the first piece embeds now: the prompt ``[1, P]``, then the last token ``[1, 1]``."""
        return self.prompt if not self.tokens else torch.tensor([[self.tokens[-1]]], dtype=torch.int64)

    def mask(self) -> torch.Tensor:
        """Every position so far ``[1, P + k]``: one sequence, no padding."""
        return torch.ones(1, self.prompt.shape[1] + len(self.tokens), dtype=torch.int64)

    def decide(self, logits: torch.Tensor) -> None:
        if self.live:
            self.tokens.append(int(logits[0, -1].argmax()))
            self.seconds = time.perf_counter() - (self.started or time.perf_counter())


class Feed:
    """A text field of the owner's data during generation (``input_ids`` or ``attention_mask``): indexed by a
    step's rows it gives :meth:`Decoding.ids` or :meth:`Decoding.mask`, as a text field gives its rows."""

    dtype = torch.int64

    def __init__(self, decoding: Decoding, field: str):
        if field not in ("input_ids", "attention_mask"):
            raise ValueError(f"generation feeds token ids and their mask, not {field!r}")
        self.decoding, self.field = decoding, field

    def __len__(self) -> int:
        return 1

    @property
    def shape(self) -> torch.Size:
        return self.__getitem__(slice(0, 1)).shape

    def is_floating_point(self) -> bool:
        return False

    def __getitem__(self, rows: Any) -> torch.Tensor:
        d = self.decoding
        if not isinstance(rows, slice) and not d.live:  # the first real step: the clock starts
            d.live, d.started = True, time.perf_counter()
        return d.ids() if self.field == "input_ids" else d.mask()


@dataclass
class Watch:
    """A party's accounting of generation: the bytes it had sent on each wire when the first new token began
    (its first call on a cache), so that what each new token costs is told apart from the prompt's pass."""

    meter: Any = None  # the party's wire.metering.Meter, once its participant is built
    at_first_token: dict[str, int] | None = None

    def first_token(self) -> None:
        if self.at_first_token is None and self.meter is not None:
            self.at_first_token = self.sent()

    def sent(self) -> dict[str, int]:
        return {w: t.bytes for (w, d), t in self.meter.sent.items() if d == "forward"}

    def bytes_per_token(self, new_tokens: int) -> dict[str, float]:
        """Per wire this party sends: the bytes of a new token (the prompt's pass left out), averaged over the
        ``new_tokens - 1`` that crossed (the last is decided, not sent on)."""
        if self.meter is None or self.at_first_token is None or new_tokens < 2:
            return {}
        now = self.sent()
        return {w: (b - self.at_first_token.get(w, 0)) / (new_tokens - 1) for w, b in now.items()}


class CachedPiece(nn.Module):
    """A piece run during generation, with a key/value cache of its own blocks. Its first ``starts`` calls begin a
    sequence (input as long as its mask: a new cache): under the engine the handshake's stand-ins, then the
    prompt. Every later call continues it by exactly one position (positions after the cache's); anything else,
    such as a peer sending a whole sequence again, is refused naming ``source`` (who sends this piece its input).
    The owner's last piece decides each token (``decoding``)."""

    def __init__(self, piece: HFPiece, watch: Watch, decoding: Decoding | None = None, *, starts: int = 2,
                 source: str = "the previous piece"):
        super().__init__()
        self.piece, self.watch, self.decoding, self.starts, self.source = piece, watch, decoding, starts, source
        self.cache: Any = None
        self.calls = 0

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        new, seen = x.shape[1], attention_mask.shape[1]
        call, self.calls = self.calls, self.calls + 1
        if call < self.starts:
            if new != seen:
                raise ValueError(f"generation: {self.source} sent {new} position(s) with a mask of {seen} where a "
                                 "sequence begins (as many as its mask)")
            self.cache = self.piece.new_cache()
        else:
            past = self.cache.get_seq_length()
            if new != 1 or seen != past + 1:
                raise ValueError(f"generation: {self.source} sent {new} new position(s) with a mask of {seen}; each "
                                 f"step after the prompt carries exactly one, position {past}")
            self.watch.first_token()
        positions = torch.arange(seen - new, seen, device=x.device).unsqueeze(0)
        out = self.piece(x, attention_mask, cache=self.cache, position_ids=positions)
        if self.decoding is not None and self.piece.last:
            self.decoding.decide(out)
        return out
