"""Messages between parties and their protobuf form: the only protobuf conversion code.

Transports move ``bytes``; :func:`encode` and :func:`decode` turn them into :class:`Message`
and back. :func:`decode` never executes anything it reads: a malformed buffer, an unknown
kind, a dtype outside the allow-list or a byte count that does not match the shape raises
:class:`~splitlearn.codec.WireError`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from .codec import DTYPES, MAX_ELEMENTS, Encoded, WireError
from .proto import splitlearn_pb2 as pb

__all__ = ["Kind", "Message", "encode", "decode", "kind_of", "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES"]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class Kind(enum.IntEnum):
    HELLO = pb.HELLO
    STEP = pb.STEP
    ACTIVATION = pb.ACTIVATION
    GRADIENT = pb.GRADIENT
    WEIGHTS = pb.WEIGHTS
    CHECKPOINT = pb.CHECKPOINT
    ACK = pb.ACK
    STOP = pb.STOP
    ERROR = pb.ERROR


@dataclass
class Message:
    kind: Kind
    sender: str
    receiver: str
    step: int = 0
    wire: str = ""
    tensors: dict[str, Encoded] = field(default_factory=dict)
    text: str = ""

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data the codecs produced (what a wire's tensor size predicts)."""
        return sum(e.nbytes for e in self.tensors.values())


def encode(msg: Message) -> bytes:
    env = pb.Envelope(sender=msg.sender, receiver=msg.receiver, step=msg.step, kind=int(msg.kind),
                      wire=msg.wire, text=msg.text)
    for name, e in msg.tensors.items():
        env.tensors.add(name=name, dtype=e.dtype, shape=list(e.shape), codec=e.codec, data=e.data, extra=e.extra)
    return env.SerializeToString()


def kind_of(data: bytes) -> Kind | None:
    """The kind of a buffer, or None if it is not a message of a known kind (nothing is checked else)."""
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
        return Kind(env.kind)
    except (DecodeError, ValueError):
        return None


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and check one message. Raises WireError on anything malformed."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
    except DecodeError as e:
        raise WireError(f"not a splitlearn message ({e})") from None
    try:
        kind = Kind(env.kind)
    except ValueError:
        raise WireError(f"unknown message kind {env.kind}") from None
    tensors: dict[str, Encoded] = {}
    for t in env.tensors:
        problem = None
        if t.dtype not in DTYPES:
            problem = f"tensor {t.name!r} has dtype {t.dtype!r}, which is not allowed; allowed: {sorted(DTYPES)}"
        elif any(d < 0 for d in t.shape) or math.prod(t.shape) > MAX_ELEMENTS:
            problem = f"tensor {t.name!r} of shape {list(t.shape)}: {math.prod(t.shape)} elements exceed the limit of {MAX_ELEMENTS}"
        elif t.name in tensors:
            problem = f"tensor {t.name!r} appears twice"
        if problem:
            raise WireError(problem, wire=env.wire, step=env.step)
        tensors[t.name] = Encoded(t.codec, t.dtype, tuple(t.shape), t.data, dict(t.extra))
    return Message(kind, env.sender, env.receiver, env.step, env.wire, tensors, env.text)
