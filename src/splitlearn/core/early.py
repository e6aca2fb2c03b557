"""Messages that come before the step they belong to: kept for it, within what one peer may make a
party hold, and handed back when the party gets there (:meth:`~splitlearn.core.engine.Party.keep_early`
checks what may be kept; this is where it is kept)."""

from __future__ import annotations

from typing import Iterator

from ..wire.messages import Limits, Message

__all__ = ["EarlyMessages"]


class EarlyMessages:
    """Tensor messages of later steps, by message step, and per sender what it holds here (messages, payload
    bytes), within ``Limits.early_messages`` (per micro-batch of ``pipeline``) and ``Limits.early_bytes``."""

    def __init__(self, limits: Limits, pipeline: int):
        self.limits, self.pipeline = limits, pipeline
        self.steps: dict[int, list[Message]] = {}  # message step -> messages that came before this party got there
        self.held: dict[str, list[int]] = {}  # sender -> [messages, bytes] it has here

    def clear(self) -> None:
        self.steps.clear()
        self.held.clear()

    def budget_problem(self, msg: Message) -> str | None:
        """Why ``msg`` would pass its sender's budget (None: it fits)."""
        held = self.held.get(msg.sender, [0, 0])
        if held[0] >= self.limits.early_messages * self.pipeline:  # (per micro-batch)
            return f"{held[0]} messages of later steps are held already (Limits.early_messages)"
        if held[1] + msg.payload_bytes > self.limits.early_bytes:
            return (f"{held[1]} bytes of later steps are held already and {msg.payload_bytes} more would pass "
                    f"the limit of {self.limits.early_bytes} (Limits.early_bytes)")
        return None

    def keep(self, msg: Message) -> None:
        """Hold ``msg`` (checked already, :meth:`budget_problem` among the checks) for its step."""
        held = self.held.setdefault(msg.sender, [0, 0])
        held[0] += 1
        held[1] += msg.payload_bytes
        self.steps.setdefault(msg.step, []).append(msg)

    def next_for(self, steps: list[int]) -> Message | None:
        """The first message kept for one of ``steps`` (in their order), no longer held; None when there is
        none, and then whatever was kept for those steps or earlier ones is let go."""
        for step in steps:
            kept = self.steps.get(step)
            if kept:
                return self._release(kept.pop(0))
        for old in [k for k in self.steps if k <= steps[-1]]:  # at most a few steps are held
            for msg in self.steps.pop(old):
                self._release(msg)
        return None

    def _release(self, msg: Message) -> Message:
        held = self.held[msg.sender]
        held[0] -= 1
        held[1] -= msg.payload_bytes
        return msg

    def later(self, step: int) -> Iterator[Message]:
        """The messages kept for steps after training step ``step`` (message steps count micro-batches)."""
        for held, msgs in self.steps.items():
            yield from (msgs if held // self.pipeline > step else ())

    @property
    def by_peer(self) -> dict[str, tuple[int, int]]:
        """Per peer: (messages, payload bytes) held."""
        return {p: (n, b) for p, (n, b) in self.held.items() if n}

    @property
    def by_step(self) -> dict[int, list[Message]]:
        """Per message step: the messages kept (a copy)."""
        return {step: list(msgs) for step, msgs in self.steps.items()}
