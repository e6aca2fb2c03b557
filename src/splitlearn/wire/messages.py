"""Messages between parties and their protobuf form: the only protobuf conversion code.

Transports move ``bytes``; :func:`encode` and :func:`decode` turn them into :class:`Message`
and back. :func:`decode` never executes anything it reads: a malformed buffer, an unknown
kind, a dtype outside the allow-list or a byte count that does not match the shape raises
:class:`~splitlearn.wire.codec.WireError`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from . import envelope
from .codec import DTYPES, MAX_ELEMENTS, Encoded, Lent, Owned, WireError, decoded_bytes
from .control import INSTRUCTIONS, REPLIES, Instruction, Reply
from .proto import splitlearn_pb2 as pb

__all__ = ["Kind", "Message", "Limits", "encode", "decode", "encoded_size", "wire_size", "parsed", "handed_over",
           "checked", "kind_of", "parse_json", "quote", "PROTOCOL_VERSION",
           "MAX_MESSAGE_BYTES", "hello", "read_hello", "command", "read_command", "reply", "read_reply", "weights",
           "read_weights", "QUOTE_CHARS"]

PROTOCOL_VERSION = 7  # 2: typed COMMAND/ACK control messages (wire/control.py) instead of commands in STEP;
# 3: checkpoints named by a cursor [round, step] (wire/control.Cursor) in control messages and hellos
# 4: the float32 codec sends a 16-bit float as itself; a CREDIT with a text is a step's agreement (core/precision.py:
# an fp16 overflow verdict, a global clip's squared norm)
# 5: a PSI setup is the holder's raw blinded set (run/align.py; the Bloom filter gave false positives); an integer
# tensor travels raw on any wire; epoch verdicts (core/stopping.py) as CREDIT texts
# 6: WeightsMissing says why the weights did not come (their sender is gone), where the client can tell
# 7: a turn's hello tells the tag of the last handshake with its peer ("agreed"): both telling the same skip it
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
QUOTE_CHARS = 80  # a peer's string quoted in a refusal or an error is cut to this many characters


@dataclass(frozen=True)
class Limits:
    """What one peer may make this party hold: the bounds a peer with a valid certificate meets.

    ``message_bytes`` bounds a serialised envelope (the gRPC transport refuses larger ones too);
    ``tensor_bytes`` what one received tensor may take once decoded (a top-k or int8 tensor is
    small on the wire and large in memory); ``name_chars`` the sender, receiver, wire, tensor and
    codec names; ``text_bytes`` and ``json_depth`` the text of a hello, a schedule command or a
    reason; ``early_messages`` and ``early_bytes`` what a party keeps per peer for steps it has
    not reached yet, at most ``early_steps`` ahead (anything beyond is refused and counted);
    ``max_dims`` the dimensions of a tensor.
    """

    message_bytes: int = MAX_MESSAGE_BYTES
    tensor_bytes: int = MAX_MESSAGE_BYTES
    name_chars: int = 256
    text_bytes: int = 1 << 20
    json_depth: int = 32
    early_messages: int = 64
    early_bytes: int = MAX_MESSAGE_BYTES
    early_steps: int = 64  # how far ahead of this party a message may be (flow control keeps honest ones within half)
    max_dims: int = 16  # dimensions of a tensor's shape


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a peer's string, cut to ``limit`` characters with its length said."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def parse_json(text: str, limits: Limits = Limits()) -> Any:
    """JSON a peer sent (a hello, a schedule command): size and nesting are checked before parsing,
    so no text can exhaust the recursion limit or the memory. Raises WireError."""
    if len(text) > limits.text_bytes:
        raise WireError(f"a text of {len(text)} characters exceeds the limit of {limits.text_bytes}")
    depth = deepest = 0
    openers = text.count("[") + text.count("{")  # (those in strings too: no text nests deeper than its openers)
    for b in _BRACKETS.findall(_STRING.sub("", text)) if openers > limits.json_depth else ():
        depth += 1 if b in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limits.json_depth:
                raise WireError(f"JSON nested deeper than {limits.json_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WireError(f"not valid JSON ({quote(str(e))})") from None


class Kind(enum.IntEnum):
    HELLO = pb.HELLO
    ACTIVATION = pb.ACTIVATION
    GRADIENT = pb.GRADIENT
    WEIGHTS = pb.WEIGHTS
    COMMAND = pb.COMMAND  # a coordinator's instruction (wire/control.py)
    ACK = pb.ACK  # a participant's reply to a command
    STOP = pb.STOP
    ERROR = pb.ERROR
    ALIGN = pb.ALIGN
    CREDIT = pb.CREDIT  # flow control (core/flow.py): the sender finished a step; with a text, a step's agreement


@dataclass
class Message:
    kind: Kind
    sender: str
    receiver: str
    step: int = 0
    wire: str = ""
    tensors: dict[str, Encoded] = field(default_factory=dict)
    text: str = ""
    # handed over in one process (handed_over): its encoded_size, counted once for the sender's meter, the
    # receiver's admission and a Switch's held bytes alike (a message is not changed once built)
    wire_bytes: int | None = field(default=None, repr=False, compare=False)
    # a hello read once (read_hello): its limits and body; handed over in one process, a turn's hello is read by the
    # switch (which turn it is for) and by the session
    read_as: tuple[Limits, str, dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data the codecs produced (what a wire's tensor size predicts)."""
        return sum(e.nbytes for e in self.tensors.values())


def encode(msg: Message) -> bytes:
    """The serialised ``Envelope`` of ``msg``, as protobuf writes it (the round-trip tests parse it
    with protobuf), built from its parts in one join: a tensor's bytes are copied once, from its
    own memory into the message (protobuf would copy them into the envelope, then out of it)."""
    return envelope.envelope(msg)


def encoded_size(msg: Message) -> int:
    """``len(encode(msg))``, counted without building it (a message handed over in one process is metered at the
    bytes the wire would carry)."""
    return envelope.size(msg)


def wire_size(data: bytes | Message) -> int:
    """The bytes ``data`` takes on the wire: a buffer's length, or a message handed over whole's
    :func:`encoded_size` (counted when it was handed over)."""
    if isinstance(data, Message):
        return encoded_size(data) if data.wire_bytes is None else data.wire_bytes
    return len(data)


def parsed(data: bytes | Message, limits: Limits = Limits(), size: int | None = None) -> Message:
    """A message from a peer: a buffer decoded (:func:`decode`), or a message handed over whole checked against the
    same limits (:func:`checked`; ``size``: its :func:`wire_size`, if known). Raises WireError."""
    return checked(data, limits, size) if isinstance(data, Message) else decode(data, limits)


def handed_over(msg: Message) -> Message:
    """``msg`` as one party of this process hands it to another without encoding it: each tensor's bytes copied
    once, into memory the receiver then owns (:class:`~splitlearn.wire.codec.Owned`: decoding takes it without a
    copy), so the sender may change its tensors as soon as it has sent; a tensor its sender lent
    (:class:`~splitlearn.wire.codec.Lent`) is handed over as it is, not copied. Its size on the wire is counted
    here, once (``wire_bytes``: what :func:`wire_size` gives). A message whose every tensor is lent whole is handed
    over itself (a training step's activations and gradients: nothing to copy, nothing to build again)."""
    if msg.tensors and all(isinstance(e.data, Lent) and not e.extra for e in msg.tensors.values()):
        msg.wire_bytes = encoded_size(msg)
        return msg
    whole = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire,
                    {k: e if isinstance(e.data, Lent) and not e.extra else  # (lent whole: nothing to copy)
                        Encoded(e.codec, e.dtype, e.shape, e.data if isinstance(e.data, Lent) else Owned(e.data),
                                dict(e.extra)) for k, e in msg.tensors.items()},
                    msg.text)
    whole.wire_bytes = encoded_size(whole)
    return whole


def kind_of(data: bytes | Message) -> Kind | None:
    """The kind of a buffer, or None if it is not a message of a known kind (nothing is checked else); a message
    handed over whole in one process (:func:`handed_over`): its kind."""
    if isinstance(data, Message):
        return data.kind
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
        return Kind(env.kind)
    except (DecodeError, ValueError):
        return None


def _numel(shape) -> int:
    """Elements of a shape, or -1 for a negative dimension, or MAX_ELEMENTS + 1 past it (stops early)."""
    n = 1
    for d in shape:
        if d < 0:
            return -1
        n *= d
        if n > MAX_ELEMENTS:
            return MAX_ELEMENTS + 1
    return n


def decode(data: bytes, limits: Limits = Limits()) -> Message:
    """Parse and check one message against ``limits``. Raises WireError on anything malformed.

    Every size is checked before anything is kept: the envelope, each name and text, and what
    each tensor would take in memory once decoded. Peer strings in the error are cut short.
    """
    if len(data) > limits.message_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {limits.message_bytes} "
                        "(Limits.message_bytes)")
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
    except (DecodeError, RecursionError) as e:
        raise WireError(f"not a splitlearn message ({quote(str(e))})") from None
    try:
        kind = Kind(env.kind)
    except ValueError:
        raise WireError(f"unknown message kind {env.kind}") from None
    _check_envelope(env.sender, env.receiver, env.wire, env.step, env.text, limits)
    tensors: dict[str, Encoded] = {}
    for t in env.tensors:
        problem = _tensor_problem(t.name, t.codec, t.dtype, t.shape, t.extra, limits)
        if problem is None and t.name in tensors:
            problem = f"tensor {quote(t.name)} appears twice"
        if problem:
            raise WireError(problem, wire=env.wire, step=env.step)
        tensors[t.name] = Encoded(t.codec, t.dtype, tuple(t.shape), t.data, dict(t.extra))
    return Message(kind, env.sender, env.receiver, env.step, env.wire, tensors, env.text)


def checked(msg: Message, limits: Limits = Limits(), size: int | None = None) -> Message:
    """:func:`decode`'s checks on a message handed over in this process (:func:`handed_over`): the same limits,
    the same errors, as if it had been encoded and decoded (``size``: its :func:`encoded_size`, if known).
    Raises WireError."""
    size = wire_size(msg) if size is None else size
    if size > limits.message_bytes:
        raise WireError(f"message of {size} bytes exceeds the limit of {limits.message_bytes} (Limits.message_bytes)")
    _check_envelope(msg.sender, msg.receiver, msg.wire, msg.step, msg.text, limits)
    for name, e in msg.tensors.items():
        problem = _tensor_problem(name, e.codec, e.dtype, e.shape, e.extra, limits)
        if problem:
            raise WireError(problem, wire=msg.wire, step=msg.step)
    return msg


def _check_envelope(sender: str, receiver: str, wire: str, step: int, text: str, limits: Limits) -> None:
    for what, name in (("sender", sender), ("receiver", receiver), ("wire", wire)):
        if len(name) > limits.name_chars:
            raise WireError(f"its {what} name {quote(name)} is longer than {limits.name_chars} characters")
    if len(text) > limits.text_bytes:
        raise WireError(f"its text of {len(text)} characters exceeds the limit of {limits.text_bytes}",
                        wire=wire, step=step)


def _tensor_problem(name: str, codec: str, dtype: str, shape: Any, extra: Any, limits: Limits) -> str | None:
    """What is wrong with a tensor's header (dimensions, names, dtype, elements, decoded size), or None."""
    numel = _numel(shape) if len(shape) <= limits.max_dims else -1
    if len(shape) > limits.max_dims:
        return f"tensor {quote(name)} has {len(shape)} dimensions, more than {limits.max_dims}"
    if max(len(name), len(codec), len(dtype), *(len(k) for k in extra)) > limits.name_chars:
        return f"tensor {quote(name)} has a name, codec, dtype or buffer name longer than {limits.name_chars}"
    if dtype not in DTYPES:
        return f"tensor {quote(name)} has dtype {quote(dtype)}, which is not allowed; allowed: {sorted(DTYPES)}"
    if numel < 0 or numel > MAX_ELEMENTS:
        return (f"tensor {quote(name)} of shape {list(shape)[:8]}: "
                + ("a negative dimension" if numel < 0 else f"its elements exceed the limit of {MAX_ELEMENTS}"))
    if decoded_bytes(dtype, numel) > limits.tensor_bytes:
        return (f"tensor {quote(name)} of shape {list(shape)[:8]} would take {decoded_bytes(dtype, numel)} "
                f"bytes decoded, over the limit of {limits.tensor_bytes} (Limits.tensor_bytes)")
    return None


# -- what the run layer says: the hello, the schedule's commands and replies, weights ------------

def hello(sender: str, receiver: str, plan_hash: str, ids_hash: str, **more: Any) -> Message:
    """The first message of a session: what both sides must agree on (``more``: the rows the
    sender holds, ``[train, test]``, for a session over its own data; ``phase``: a later hello)."""
    return Message(Kind.HELLO, sender, receiver, text=json.dumps(
        {"protocol": PROTOCOL_VERSION, "plan_hash": plan_hash, "ids_hash": ids_hash,
         **{k: v for k, v in more.items() if v is not None}}))


def read_hello(msg: Message, limits: Limits = Limits()) -> dict[str, Any]:
    """The fields of a peer's hello (protocol, plan_hash, ids_hash), a dict of the caller's (the values in it are
    shared with the message's later readers: read them, do not change them). Raises WireError."""
    kept = msg.read_as
    if kept is not None and kept[0] == limits and kept[1] is msg.text:  # read before, against the same limits
        return dict(kept[2])
    body = parse_json(msg.text, limits)
    if not isinstance(body, dict):
        raise WireError("its hello is not a JSON object")
    msg.read_as = (limits, msg.text, body)
    return dict(body)


def command(sender: str, receiver: str, instruction: Instruction, request: int, deadline: float) -> Message:
    """A coordinator's ``instruction``, answering to ``request``, to be dropped after ``deadline``
    (``time.time()``)."""
    return Message(Kind.COMMAND, sender, receiver, text=json.dumps(
        {"do": instruction.WORD, "request": request, "deadline": deadline, **_fields(instruction)}))


def read_command(msg: Message, limits: Limits = Limits()) -> tuple[int, float, Instruction]:
    """(request, deadline, instruction) of a command, every field's type checked. Raises WireError."""
    body = parse_json(msg.text or "{}", limits)
    if not isinstance(body, dict) or not isinstance(body.get("do"), str) or type(body.get("request")) is not int:
        raise WireError("a command that is not JSON with 'do' and 'request'")
    do, request, deadline = body.pop("do"), body.pop("request"), body.pop("deadline", None)
    if type(deadline) not in (int, float) or deadline != deadline or abs(deadline) > 1e300:
        raise WireError(f"a {quote(do)} command whose deadline is not a number")
    if do not in INSTRUCTIONS:
        raise WireError(f"an unknown command {quote(do)} (known: {sorted(INSTRUCTIONS)})")
    return request, float(deadline), _typed(INSTRUCTIONS[do], body, f"{quote(do)} command")


def reply(sender: str, receiver: str, request: int, answer: Reply) -> Message:
    """A participant's ``answer`` to command ``request`` (0: said unasked)."""
    return Message(Kind.ACK, sender, receiver, text=json.dumps(
        {"reply": answer.WORD, "request": request, **_fields(answer)}))


def read_reply(msg: Message, limits: Limits = Limits()) -> tuple[int, Reply]:
    """(request, reply) of an acknowledgement, every field's type checked. Raises WireError."""
    body = parse_json(msg.text or "{}", limits)
    if not isinstance(body, dict) or not isinstance(body.get("reply"), str) or type(body.get("request")) is not int:
        raise WireError("a reply that is not JSON with 'reply' and 'request'")
    word, request = body.pop("reply"), body.pop("request")
    if word not in REPLIES:
        raise WireError(f"an unknown reply {quote(word)} (known: {sorted(REPLIES)})")
    return request, _typed(REPLIES[word], body, f"{quote(word)} reply")


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


_HINTS: dict[type, tuple[dict[str, Any], dict[str, dataclasses.Field]]] = {}  # a class's type hints and fields


def _typed(cls: type, body: dict[str, Any], what: str) -> Any:
    """An instance of ``cls`` from the JSON object ``body``: no field unknown or missing, each of
    its declared type (lists become tuples), then :meth:`problem` asked. Raises WireError."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    hints, fields = _HINTS[cls]
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise WireError(f"a {what} with unknown fields {', '.join(quote(k) for k in unknown[:3])}")
    values = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING:
                raise WireError(f"a {what} without its field {name!r}")
            continue
        try:
            values[name] = _of_type(body[name], hints[name])
        except TypeError:
            raise WireError(f"a {what} whose field {name!r} is not {_type_name(hints[name])}: "
                            f"{quote(json.dumps(body[name]))}") from None
    out = cls(**values)
    problem = out.problem()
    if problem:
        raise WireError(f"a {what} whose fields do not fit: {problem}")
    return out


def _of_type(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` (int, bool, str, Any, X | None, tuple[X, ...], dict[str, X], a NamedTuple from a
    list); TypeError if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint in (int, bool, str):
        if type(value) is not hint:
            raise TypeError
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _of_type(value, next(a for a in args if a is not type(None)))
    if origin is tuple and isinstance(value, list):
        return tuple(_of_type(v, args[0]) for v in value)
    if origin is dict and isinstance(value, dict):
        return {k: _of_type(v, args[1]) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):  # a NamedTuple: a list
        kinds = typing.get_type_hints(hint)
        if isinstance(value, list) and len(value) == len(hint._fields):
            return hint(*(_of_type(v, kinds[f]) for v, f in zip(value, hint._fields)))
    raise TypeError


def _type_name(hint: Any) -> str:
    pair = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
    if isinstance(pair, type) and issubclass(pair, tuple) and hasattr(pair, "_fields"):  # a NamedTuple (a Cursor)
        return ("a list of " if pair is not hint else "") + f"[{', '.join(pair._fields)}]"
    return {int: "an integer", bool: "true or false", str: "a string"}.get(hint, str(hint).replace("typing.", ""))


def weights(sender: str, receiver: str, state: dict[str, Any], request: int) -> Message:
    """Model weights (name -> tensor) as raw tensors, answering ``request``."""
    from .codec import get_codec

    raw = get_codec("raw")
    return Message(Kind.WEIGHTS, sender, receiver, request, "weights",
                   tensors={k: raw.encode(v.detach().cpu()) for k, v in state.items()})


def read_weights(msg: Message, like: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a WEIGHTS message, checked name by name against ``like`` (our own state):
    the same names, dtypes and shapes, and no NaN or infinity (one would spread through averaging)."""
    from .codec import check_values, get_codec

    if set(msg.tensors) != set(like):
        missing, extra = sorted(set(like) - set(msg.tensors)), sorted(set(msg.tensors) - set(like))
        raise WireError(f"weights from {quote(msg.sender)} do not fit: missing {missing[:3]}, unexpected "
                        f"{[quote(k) for k in extra[:3]]}", wire="weights")
    raw, out = get_codec("raw"), {}
    for k, enc in msg.tensors.items():
        ref = like[k]
        want = str(ref.dtype).removeprefix("torch.")
        if tuple(enc.shape) != tuple(ref.shape) or enc.dtype != want:
            raise WireError(f"weight {k!r} from {quote(msg.sender)} is {enc.dtype}{list(enc.shape)[:8]}, expected "
                            f"{want}{list(ref.shape)}", wire="weights")
        out[k] = raw.decode(enc)
        check_values(out[k], f"weight {k!r} from {quote(msg.sender)}")
    return out
