"""A message's ``Envelope`` (``wire/proto/splitlearn.proto``) written by hand, field by field as protobuf writes it,
and its length worked out without writing it: what :func:`~splitlearn.wire.messages.encode` and
:func:`~splitlearn.wire.messages.encoded_size` give. Pure arithmetic on a message's fields (kind, sender, receiver,
step, wire, tensors, text); parsing is protobuf's (:func:`~splitlearn.wire.messages.decode`).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["envelope", "size"]


def envelope(msg: Any) -> bytes:
    """The serialised ``Envelope`` of ``msg``, as protobuf writes it (the round-trip tests parse it
    with protobuf), built from its parts in one join: a tensor's bytes are copied once, from its
    own memory into the message (protobuf would copy them into the envelope, then out of it)."""
    return b"".join(_parts(msg))


def size(msg: Any) -> int:
    """``len(envelope(msg))``, counted without building it (a message handed over in one process is metered at the
    bytes the wire would carry): the arithmetic of :func:`_parts`, field by field (every field number is below 16,
    so each key is one byte). The sizes of a message's names and of a tensor's header are kept once worked out
    (a few microseconds a message, every message of a step)."""
    size = _names_size(msg.sender, msg.receiver, msg.wire, int(msg.kind))
    if msg.text:
        size += _str_size(msg.text)
    if msg.step:
        size += 1 + _varint_size(msg.step)
    for name, e in msg.tensors.items():
        n = len(e.data) if isinstance(e.data, (bytes, bytearray)) else memoryview(e.data).nbytes
        body = _header_size(name, e.dtype, e.codec, tuple(e.shape))
        if n:
            body += 1 + _varint_size(n) + n
        for k, v in e.extra.items():
            kb = len(k.encode())
            entry = 1 + _varint_size(kb) + kb + 1 + _varint_size(len(v)) + len(v)
            body += 1 + _varint_size(entry) + entry
        size += 1 + _varint_size(body) + body
    return size


@functools.lru_cache(maxsize=4096)  # (a run's messages have a few dozen of each)
def _names_size(sender: str, receiver: str, wire: str, kind: int) -> int:
    """The bytes of a message's sender, receiver, wire and kind fields."""
    return _str_size(sender) + _str_size(receiver) + _str_size(wire) + (1 + _varint_size(kind) if kind else 0)


@functools.lru_cache(maxsize=4096)
def _header_size(name: str, dtype: str, codec: str, shape: tuple[int, ...]) -> int:
    """The bytes of a tensor's name, dtype, codec and shape fields."""
    body = _str_size(name) + _str_size(dtype) + _str_size(codec)
    if shape:
        dims = sum(_varint_size(d) for d in shape)
        body += 1 + _varint_size(dims) + dims
    return body


def _varint_size(n: int) -> int:
    """``len(_varint(n))``."""
    n &= (1 << 64) - 1
    return 1 if n < 0x80 else (n.bit_length() + 6) // 7


def _str_size(value: str) -> int:
    """``len(_string(f, value))`` for a field number below 16."""
    n = len(value.encode()) if not value.isascii() else len(value)
    return 1 + _varint_size(n) + n if n else 0


def _parts(msg: Any) -> list[bytes | memoryview]:
    tensors = []
    for name, e in msg.tensors.items():
        body = [_string(1, name), _string(2, e.dtype)]
        if e.shape:
            dims = b"".join(_varint(d) for d in e.shape)
            body.append(_key(3) + _varint(len(dims)) + dims)
        body.append(_string(4, e.codec))
        head = b"".join(body)
        data = e.data if isinstance(e.data, memoryview) else memoryview(e.data)
        data_field = [_key(5) + _varint(data.nbytes), data] if data.nbytes else []
        extra = [_entry(k, v) for k, v in e.extra.items()]
        size = len(head) + sum(len(x) if isinstance(x, bytes) else x.nbytes for x in data_field) + sum(map(len, extra))
        tensors += [_key(6) + _varint(size), head, *data_field, *extra]
    parts = [_string(1, msg.sender), _string(2, msg.receiver)]
    if msg.step:
        parts.append(b"\x18" + _varint(msg.step))
    if int(msg.kind):
        parts.append(b"\x20" + _varint(int(msg.kind)))
    parts.append(_string(5, msg.wire))
    return [*parts, *tensors, _string(7, msg.text)]


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint; a negative int64 as its 64-bit two's complement (ten bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # length-delimited


def _string(field_number: int, value: str | bytes) -> bytes:
    """A string or bytes field (nothing for an empty one, as proto3 writes it)."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return _key(field_number) + _varint(len(raw)) + raw if raw else b""


def _entry(key: str, value: bytes) -> bytes:
    """One entry of the tensor's ``extra`` map (field 6: a message of key 1 and value 2)."""
    body = b"\x0a" + _varint(len(key.encode())) + key.encode() + b"\x12" + _varint(len(value)) + bytes(value)
    return _key(6) + _varint(len(body)) + body
