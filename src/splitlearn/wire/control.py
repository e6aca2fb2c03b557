"""The typed control messages of a ``[clients]`` run: what a coordinator tells a participant
(*instructions*, sent as ``COMMAND``) and what a participant answers (*replies*, sent as ``ACK``).

Each is a frozen dataclass whose fields are JSON values (``int``, ``bool``, ``str``, ``None``,
tuples of them, a ``dict[str, str]``, a JSON object or a :class:`Cursor`, a ``[round, step]`` pair);
:mod:`splitlearn.wire.messages` encodes
them (:func:`~splitlearn.wire.messages.command`, :func:`~splitlearn.wire.messages.reply`) and
decodes them with every field's type checked (a malformed one is a ``WireError`` naming it).
``WORD`` is the name on the wire; ``problem`` says what is wrong with values of the right types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

__all__ = ["Cursor", "START", "Instruction", "Reply", "INSTRUCTIONS", "REPLIES", "TakeTurn", "SendWeights",
           "LoadWeights", "Census", "Rows", "Collect", "SendAverage", "Checkpoint", "WhichCheckpoints", "Restore", "StartOver",
           "MergeServerCopies", "Stop",
           "TurnDone", "CensusAnswer", "Collected", "Saved", "CheckpointsHeld", "Restored", "NotRestored",
           "StartedOver", "Ready", "WeightsLoaded", "WeightsMissing", "WeightsRefused", "Rejoined"]


class Cursor(NamedTuple):
    """Where a run is, and what a checkpoint holds: the state after step ``step`` of round ``round``
    (``step`` -1: at the start of the round, before any of its steps). Ordered as pairs. A plain plan
    (the trivial schedule, one round) goes from (0, -1) to (0, k) after step id k; the end of round r
    of a ``[clients]`` plan is the start of the next one, (r + 1, -1). Every run starts at (0, -1)."""

    round: int
    step: int

    @classmethod
    def after_round(cls, index: int) -> Cursor:
        """The end of round ``index`` (-1: before the first round), as the start of the next one."""
        return cls(index + 1, -1)

    def problem(self) -> str | None:
        """What is wrong with the values (None: nothing); a cursor is never before the start."""
        if self.round < 0 or self.step < -1:
            return f"cursor {list(self)} is before the start of the run (round >= 0, step >= -1)"
        return None

    def __str__(self) -> str:
        return f"after step {self.step} of round {self.round}" if self.step >= 0 else \
            f"at the start of round {self.round}"


START = Cursor(0, -1)  # every run's first cursor: before its first round and step


class _Typed:
    WORD: ClassVar[str] = ""

    def problem(self) -> str | None:
        """What is wrong with the values (their types are checked already); None if nothing. Here: any
        cursor a field holds (alone or in a tuple) that is before the start of the run."""
        for value in vars(self).values():
            for c in value if isinstance(value, tuple) and not isinstance(value, Cursor) else (value,):
                if isinstance(c, Cursor) and c.problem():
                    return c.problem()
        return None


def _counts(what: str, values: tuple[int, ...]) -> str | None:
    bad = [v for v in values if v < 0]
    return f"{what} holds a negative count {bad[0]}" if bad else None


class Instruction(_Typed):
    """What a coordinator tells one participant to do."""


class Reply(_Typed):
    """What a participant answers to an instruction (or, :class:`Rejoined`, says unasked)."""


# -- instructions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TakeTurn(Instruction):
    """Take part in turn ``turn`` with ``client``; ``model``: the client whose weights (lent to
    ``client`` beforehand) it evaluates, when not its own."""

    WORD: ClassVar[str] = "turn"
    turn: int
    client: str
    model: str | None = None


@dataclass(frozen=True)
class SendWeights(Instruction):
    """Send this participant's weights to ``to`` (``evaluation``: metered as evaluation traffic)."""

    WORD: ClassVar[str] = "send"
    to: str
    evaluation: bool = False


@dataclass(frozen=True)
class LoadWeights(Instruction):
    """Load the weights ``source`` sends for this request. ``ready``: first reply :class:`Ready`
    (so the weights cannot overtake this instruction); ``lend``: keep them for the next evaluation
    turn only; ``evaluation``: metered as evaluation traffic."""

    WORD: ClassVar[str] = "load"
    source: str
    ready: bool = False
    lend: bool = False
    evaluation: bool = False


@dataclass(frozen=True)
class Census(Instruction):
    """A client reading its own file: say how many rows it holds and what they look like."""

    WORD: ClassVar[str] = "census"


@dataclass(frozen=True)
class Rows(Instruction):
    """The training and test rows each client holds (from the census), in client order."""

    WORD: ClassVar[str] = "rows"
    train: tuple[int, ...]
    test: tuple[int, ...]

    def problem(self) -> str | None:
        if len(self.train) != len(self.test):
            return f"{len(self.train)} training and {len(self.test)} test counts"
        return _counts("train", self.train) or _counts("test", self.test)


@dataclass(frozen=True)
class Collect(Instruction):
    """Federation: receive the weights of ``clients`` for this request and average them,
    weighted by ``samples``."""

    WORD: ClassVar[str] = "collect"
    clients: tuple[str, ...]
    samples: tuple[int, ...]

    def problem(self) -> str | None:
        if len(self.clients) != len(self.samples):
            return f"{len(self.clients)} clients and {len(self.samples)} sample counts"
        return _counts("samples", self.samples)


@dataclass(frozen=True)
class SendAverage(Instruction):
    """Federation: send the averaged weights to each of ``clients``, answering its request."""

    WORD: ClassVar[str] = "download"
    clients: tuple[str, ...]
    requests: tuple[int, ...]
    evaluation: bool = False

    def problem(self) -> str | None:
        if len(self.clients) != len(self.requests):
            return f"{len(self.clients)} clients and {len(self.requests)} requests"
        return None


@dataclass(frozen=True)
class Checkpoint(Instruction):
    """Save this participant's state as of ``cursor`` (the end of a round: the next one's start)."""

    WORD: ClassVar[str] = "checkpoint"
    cursor: Cursor


@dataclass(frozen=True)
class WhichCheckpoints(Instruction):
    """Say the cursors of the checkpoints this participant holds."""

    WORD: ClassVar[str] = "held"


@dataclass(frozen=True)
class Restore(Instruction):
    """Go back to the checkpoint of ``cursor``; ``attempt``: the times the run went back so far."""

    WORD: ClassVar[str] = "restore"
    cursor: Cursor
    attempt: int


@dataclass(frozen=True)
class StartOver(Instruction):
    """No checkpoint is held by every participant: begin the run again from the start."""

    WORD: ClassVar[str] = "start_over"


@dataclass(frozen=True)
class MergeServerCopies(Instruction):
    """A fixed party: average this round's copies of its segments (one per client in
    ``clients``, weighted by ``samples``) into its shared ones."""

    WORD: ClassVar[str] = "merge_copies"
    clients: tuple[str, ...]
    samples: tuple[int, ...]

    def problem(self) -> str | None:
        if len(self.clients) != len(self.samples):
            return f"{len(self.clients)} clients and {len(self.samples)} sample counts"
        return _counts("samples", self.samples)


@dataclass(frozen=True)
class Stop(Instruction):
    """The run is over: plainly (``reason`` None), or failed for ``reason``."""

    WORD: ClassVar[str] = "stop"
    reason: str | None = None


# -- replies -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnDone(Reply):
    """A participant's turn ended (told by those in a plan whose coordinator takes no part in turns)."""

    WORD: ClassVar[str] = "turn_done"
    ok: bool
    why: str = ""


@dataclass(frozen=True)
class CensusAnswer(Reply):
    """The rows a client holds and its data's schema (field -> what it looks like)."""

    WORD: ClassVar[str] = "census"
    train: int
    test: int
    schema: dict[str, Any]

    def problem(self) -> str | None:
        return _counts("rows", (self.train, self.test))


@dataclass(frozen=True)
class Collected(Reply):
    """Federation: whose weights it averaged, and why each refused client's were refused."""

    WORD: ClassVar[str] = "collected"
    averaged: tuple[str, ...]
    refused: dict[str, str]


@dataclass(frozen=True)
class Saved(Reply):
    WORD: ClassVar[str] = "saved"
    cursor: Cursor


@dataclass(frozen=True)
class CheckpointsHeld(Reply):
    WORD: ClassVar[str] = "held"
    cursors: tuple[Cursor, ...]


@dataclass(frozen=True)
class Restored(Reply):
    WORD: ClassVar[str] = "restored"
    cursor: Cursor


@dataclass(frozen=True)
class NotRestored(Reply):
    """It holds no checkpoint of ``cursor``."""

    WORD: ClassVar[str] = "not_restored"
    cursor: Cursor


@dataclass(frozen=True)
class StartedOver(Reply):
    WORD: ClassVar[str] = "started_over"


@dataclass(frozen=True)
class Ready(Reply):
    """A client waits for the weights of a :class:`LoadWeights` with ``ready``."""

    WORD: ClassVar[str] = "ready"


@dataclass(frozen=True)
class WeightsLoaded(Reply):
    WORD: ClassVar[str] = "loaded"
    source: str


@dataclass(frozen=True)
class WeightsMissing(Reply):
    """The weights of ``source`` did not come (the client trains on with its own): ``why``, where the client could
    tell (``source`` is gone: it left, came back as a new process, or its link is down); else within its timeout."""

    WORD: ClassVar[str] = "missing"
    source: str
    why: str = ""


@dataclass(frozen=True)
class WeightsRefused(Reply):
    """The weights of ``source`` came but did not fit or were not finite."""

    WORD: ClassVar[str] = "refused"
    source: str
    why: str


@dataclass(frozen=True)
class Rejoined(Reply):
    """Said unasked (request 0) by a participant started again as a new process to resume: the
    cursors of the checkpoints it holds."""

    WORD: ClassVar[str] = "rejoined"
    cursors: tuple[Cursor, ...]


INSTRUCTIONS: dict[str, type[Instruction]] = {c.WORD: c for c in (
    TakeTurn, SendWeights, LoadWeights, Census, Rows, Collect, SendAverage, Checkpoint, WhichCheckpoints, Restore,
    StartOver, MergeServerCopies, Stop)}
REPLIES: dict[str, type[Reply]] = {c.WORD: c for c in (
    TurnDone, CensusAnswer, Collected, Saved, CheckpointsHeld, Restored, NotRestored, StartedOver, Ready, WeightsLoaded,
    WeightsMissing, WeightsRefused, Rejoined)}
