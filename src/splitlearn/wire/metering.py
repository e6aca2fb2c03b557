"""What one party computes and sends: bytes per wire and direction, FLOPs, time.

Bytes are the exact length of the serialised messages (``bytes``) and of the tensor data the
codecs produced (``payload``); the difference is the protobuf framing. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``; since they depend only on shapes, each
(piece, input shapes) is counted once and reused. A computation counted runs under the counter's dispatch mode,
which may decompose an operation (a softmax's or SiLU's backward) and round it differently: the counted keys are
kept in checkpoints (:meth:`Meter.counted`), so a resumed run counts, and rounds, where the uninterrupted run did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Meter", "Traffic"]


@dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0
    payload: int = 0

    def add(self, nbytes: int, payload: int) -> None:
        self.messages += 1
        self.bytes += nbytes
        self.payload += payload


_TRAFFIC = tuple(f.name for f in fields(Traffic))


@dataclass
class Meter:
    party: str
    sent: dict[tuple[str, str], Traffic] = field(default_factory=dict)  # (wire, direction) -> traffic
    received: dict[tuple[str, str], Traffic] = field(default_factory=dict)
    flops_forward: int = 0
    flops_backward: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    tokens_forward: int = 0  # real (unpadded) tokens of the text rows stepped forward: training and evaluation
    tokens_backward: int = 0  # of which trained (their gradients came back)
    _flop_cache: dict[str, int] = field(default_factory=dict, repr=False)  # repr(key) -> FLOPs
    _by_key: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)  # the same by key (no repr a step)

    def on_send(self, wire: str, direction: str, nbytes: int, payload: int) -> None:
        self.sent.setdefault((wire, direction), Traffic()).add(nbytes, payload)

    def on_recv(self, wire: str, direction: str, nbytes: int, payload: int) -> None:
        self.received.setdefault((wire, direction), Traffic()).add(nbytes, payload)

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes for t in self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(t.bytes for t in self.received.values())

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward

    def count_tokens(self, n: int, trained: bool) -> None:
        """A step's text rows had ``n`` real tokens (forward; ``trained``: their gradients come back too)."""
        self.tokens_forward += n
        self.tokens_backward += n if trained else 0

    @property
    def counted(self) -> dict[str, int]:
        """The FLOPs of each computation counted so far (by its key): what a checkpoint keeps."""
        return dict(self._flop_cache)

    @counted.setter
    def counted(self, value: dict[str, int]) -> None:
        self._flop_cache = {str(k): int(v) for k, v in value.items()}
        self._by_key = {}

    def compute(self, key: tuple, phase: str, fn: Callable[[], object]) -> object:
        """Run ``fn``, timing it and adding its FLOPs (counted once per ``key``) to ``phase``."""
        t0 = time.perf_counter()
        flops = self._by_key.get(key)
        if flops is not None:
            out = fn()
        else:
            name = repr(key)  # (what a checkpoint keeps)
            if name in self._flop_cache:
                out = fn()
                flops = self._flop_cache[name]
            else:
                with FlopCounterMode(display=False) as counter:
                    out = fn()
                flops = self._flop_cache[name] = counter.get_total_flops()
            self._by_key[key] = flops
        self.compute_s += time.perf_counter() - t0
        if phase == "forward":
            self.flops_forward += flops
        else:
            self.flops_backward += flops
        return out

    def timed(self, what: str) -> "_Timed":
        """A context that adds the seconds spent inside to ``what``: ``wait``, else compute."""
        return _Timed(self, what == "wait")

    def summary(self) -> dict:
        def table(d: dict[tuple[str, str], Traffic]) -> list[dict]:
            return [{"wire": w, "direction": k, **{f: getattr(t, f) for f in _TRAFFIC}}  # (asdict: a deep copy)
                    for (w, k), t in sorted(d.items())]

        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "flops": self.flops,
            "flops_forward": self.flops_forward,
            "flops_backward": self.flops_backward,
            "compute_s": round(self.compute_s, 4),
            "wait_s": round(self.wait_s, 4),
            "sent": table(self.sent),
            "received": table(self.received),
            **({"tokens_forward": self.tokens_forward, "tokens_backward": self.tokens_backward}
               if self.tokens_forward else {}),  # a party holding text: the tokens its rows had
        }


class _Timed:
    """:meth:`Meter.timed` (a class, not a generator: it is entered a few times every step)."""

    __slots__ = ("meter", "wait", "t0")

    def __init__(self, meter: Meter, wait: bool):
        self.meter, self.wait, self.t0 = meter, wait, 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        if self.wait:
            self.meter.wait_s += dt
        else:
            self.meter.compute_s += dt
