"""Secure aggregation of an averaging round (``[clients] secure_aggregation = true``): the protocol of
:mod:`splitlearn.privacy.secagg` carried by the schedule's own weights messages, so the federation
receives masked fixed-point vectors and shares, and recovers only the sample-weighted average of
the clients that stayed to the end.

A client told to send its weights to the federation (``SendWeights``) runs :func:`secure_send`; the
federation told to collect them runs :func:`secure_collect`. Every message of the protocol is a
``WEIGHTS`` message on wire :data:`SECAGG_WIRE` answering the coordinator's request, its phase in
its JSON text (``keys``, ``roster``, ``shares``, ``masked``, ``unmask``, ``abort``), its bytes as
raw ``uint8`` tensors (the masked vector: one ``int64`` tensor ``y``, the uint64 words as they
are). The federation tags each client's public keys with the sender's authenticated name (the
transport's: the certificate's under TLS) and hands every client the roster of those names.

The sample counts are public (the coordinator's ``Collect`` names them): a client multiplies its
values by its samples over the roster's before encoding, and the federation divides the sum by
the survivors' share. A client's message that cannot be used (wrong phase, names, lengths or
dtype: a masked vector that is not ``int64[L]``) is refused naming the client, which is then out
of the round as if it had dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from ..privacy.secagg import (CIPHERTEXT_BYTES, KEY_BYTES, Keys, Roster, SecAggClient, SecAggError, SecAggServer,
                              decode, default_threshold, encode)
from ..privacy.shamir import SHARE_BYTES
from ..wire.codec import Encoded, WireError
from ..wire.control import Instruction
from ..wire.messages import Kind, Message, parse_json, quote
from ..wire.transport import TransportError
from .weights import flatten, unflatten

if TYPE_CHECKING:
    from .participant import Participant

__all__ = ["SECAGG_WIRE", "SecurePhase", "round_context", "secure_send", "secure_collect"]

log = logging.getLogger(__name__)

SECAGG_WIRE = "secagg"  # the wire name of every message of the protocol (metered apart from plain weights)


@dataclass(frozen=True)
class SecurePhase(Instruction):
    """Never sent: what a test's fault hook (:data:`~splitlearn.clients.participant.Fault`) is called
    with as a client enters each later phase of its secure aggregation (``shares``, ``masked``,
    ``unmask``), before it sends that phase's message."""

    WORD: ClassVar[str] = "secure_phase"
    phase: str
    to: str


def round_context(federation: str, request: int) -> bytes:
    """What names one round's protocol (every key and mask of it is derived with it): the federation and the request."""
    return f"splitlearn secagg|{federation}|{request}".encode()


def _raw(data: bytes) -> Encoded:
    return Encoded("raw", "uint8", (len(data),), bytes(data))


def _message(sender: str, receiver: str, request: int, body: dict[str, Any],
             tensors: dict[str, bytes] | None = None) -> Message:
    return Message(Kind.WEIGHTS, sender, receiver, request, SECAGG_WIRE,
                   {k: _raw(v) for k, v in (tensors or {}).items()}, json.dumps(body))


def _body(msg: Message, phase: str, limits: Any, abort: bool = False) -> dict[str, Any]:
    """The JSON text of a protocol message of ``phase`` (or, ``abort``, one saying the round was given
    up); SecAggError: another message, or another phase."""
    if msg.wire != SECAGG_WIRE:
        raise SecAggError(f"a message on wire {quote(msg.wire)} during secure aggregation (expected {SECAGG_WIRE!r})")
    try:
        body = parse_json(msg.text, limits)
    except WireError as e:
        raise SecAggError(str(e)) from None
    if not isinstance(body, dict) or body.get("phase") not in (phase, "abort" if abort else phase):
        got = body.get("phase") if isinstance(body, dict) else body
        raise SecAggError(f"a message of phase {quote(got)} where phase {phase!r} was due")
    return body


def _bytes(msg: Message, name: str, size: int) -> bytes:
    """Tensor ``name`` of ``msg``: exactly ``size`` raw uint8 bytes (SecAggError otherwise)."""
    enc = msg.tensors.get(name)
    if enc is None:
        raise SecAggError(f"no tensor {quote(name)}")
    if enc.codec != "raw" or enc.dtype != "uint8" or tuple(enc.shape) != (size,) or len(enc.data) != size or enc.extra:
        raise SecAggError(f"tensor {quote(name)} is {enc.codec} {enc.dtype}{list(enc.shape)[:4]}, expected raw "
                          f"uint8[{size}]")
    return bytes(enc.data)


def _names(body: dict[str, Any], key: str) -> list[str]:
    got = body.get(key)
    if not isinstance(got, list) or not all(isinstance(n, str) for n in got):
        raise SecAggError(f"{key!r} is not a list of names")
    return got


def _keys_of(msg: Message) -> Keys:
    if set(msg.tensors) != {"c", "s", "h"}:
        raise SecAggError(f"keys named {sorted(quote(k) for k in msg.tensors)[:4]}, expected 'c', 's' and 'h'")
    return Keys(_bytes(msg, "c", KEY_BYTES), _bytes(msg, "s", KEY_BYTES), _bytes(msg, "h", KEY_BYTES))


def _prefixed(msg: Message, prefix: str, size: int) -> dict[str, bytes]:
    """The tensors named ``prefix/NAME``, by NAME (SecAggError if another name is there)."""
    other = [k for k in msg.tensors if not k.startswith(prefix)]
    if other:
        raise SecAggError(f"a tensor named {quote(other[0])} where only {prefix!r}... names were due")
    return {k[len(prefix):]: _bytes(msg, k, size) for k in msg.tensors}


# -- a client ------------------------------------------------------------------------------------

def secure_send(part: Participant, request: int, hook: Callable[[str], None] | None = None) -> None:
    """A client's side: its weights, masked, to the federation (``hook``: called with each later phase's
    name first). Whatever goes wrong (the federation gave up, a message it cannot use, nothing came in
    time) leaves it out of the round, said in the log (and a message it cannot use refused, naming the
    federation); only a broken link raises, as for plain weights."""
    fed, wait = part.federation, 2 * part.timeout
    me = SecAggClient(part.name, round_context(fed, request), part.spec.secure_threshold, part.secure_random)
    values = flatten(part.client_state())
    k = me.advertise()
    part.link.send(_message(part.name, fed, request, {"phase": "keys"}, {"c": k.c, "s": k.s, "h": k.commitment}))

    def step(phase: str) -> tuple[dict[str, Any], Message] | None:
        msg = part.take_weights([fed], request, wait).get(fed)
        if msg is None:
            log.warning("%s: secure aggregation: no %s from %s within %g s; out of this round", part.name, phase,
                        fed, wait)
            return None
        body = _body(msg, phase, part.limits, abort=True)
        if body["phase"] == "abort":
            log.warning("%s: secure aggregation: %s gave up: %s", part.name, fed, quote(body.get("why"), 300))
            return None
        return body, msg

    try:
        got = step("roster")
        if got is None:
            return
        body, msg = got
        names, threshold, samples = _names(body, "clients"), body.get("threshold"), body.get("samples")
        if not isinstance(threshold, int) or not isinstance(samples, list) or len(samples) != len(names) or \
                not all(isinstance(n, int) and n >= 0 for n in samples) or sum(samples) <= 0 or part.name not in names:
            raise SecAggError("a roster without its threshold, its clients' sample counts, or this client")
        keys = {n: Keys(_bytes(msg, f"c/{n}", KEY_BYTES), _bytes(msg, f"s/{n}", KEY_BYTES),
                        _bytes(msg, f"h/{n}", KEY_BYTES)) for n in names}
        shares = me.share(Roster(tuple(names), keys, threshold))
        weight = samples[names.index(part.name)] / sum(samples)
        if hook is not None:
            hook("shares")
        part.link.send(_message(part.name, fed, request, {"phase": "shares"}, {f"to/{v}": c for v, c in shares.items()}))
        got = step("shares")
        if got is None:
            return
        received = _prefixed(got[1], "from/", CIPHERTEXT_BYTES)
        masked = me.mask(received, encode(values, weight))
        if hook is not None:
            hook("masked")
        part.link.send(Message(Kind.WEIGHTS, part.name, fed, request, SECAGG_WIRE,
                               {"y": Encoded("raw", "int64", (masked.size,), masked.astype("<u8").view("<i8").tobytes())},
                               json.dumps({"phase": "masked"})))
        got = step("unmask")
        if got is None:
            return
        answer = me.unmask(_names(got[0], "survivors"), _names(got[0], "dropped"))
        if hook is not None:
            hook("unmask")
        part.link.send(_message(part.name, fed, request, {"phase": "unmask"}, answer))
    except SecAggError as e:
        part.link.refuse(fed, f"secure aggregation: {e}", request, SECAGG_WIRE)


# -- the federation ------------------------------------------------------------------------------

def secure_collect(part: Participant, clients: list[str], samples: list[int],
                   request: int) -> tuple[list[str], dict[str, str]]:
    """The federation's side: its new average from the masked vectors of ``clients`` (weighted by
    ``samples``); who is in it, and why each refused client was refused. Fewer than the threshold
    left at any phase: no average (the global weights stay), every client still in the round told
    why (``abort``) and reported as refused for that reason."""
    like = part.global_state
    weights = dict(zip(clients, samples))
    t = part.spec.secure_threshold or default_threshold(len(clients))
    refused: dict[str, str] = {}
    if not 2 <= t <= len(clients):
        return _give_up(part, clients, request, f"secure aggregation needs {t} clients of the round to unmask it, "
                                                 f"and {len(clients)} trained: no average this round", refused)
    server = SecAggServer(clients, t, sum(v.numel() for v in like.values()), round_context(part.name, request))

    def gather(senders: list[str], phase: str, add: Callable[[str, Message], None]) -> None:
        got = part.take_weights(senders, request, part.timeout)
        for c in senders:
            if c not in got:
                continue
            try:
                _body(got[c], phase, part.limits)
                add(c, got[c])
            except SecAggError as e:
                part.link.refuse(c, f"secure aggregation ({phase}): {e}", request, SECAGG_WIRE)
                refused[c] = str(e)[:300]
                _send_abort(part, [c], request, f"its {phase} message was refused: {e}")

    def masked(c: str, msg: Message) -> None:
        enc = msg.tensors.get("y")
        if set(msg.tensors) != {"y"} or enc.codec != "raw" or enc.dtype != "int64" or \
                tuple(enc.shape) != (server.length,) or len(enc.data) != 8 * server.length or enc.extra:
            what = f"{enc.dtype}{list(enc.shape)[:4]}" if enc is not None else f"tensors {sorted(msg.tensors)[:4]}"
            raise SecAggError(f"its masked vector is {what}, expected int64[{server.length}]")
        server.add_masked(c, np.frombuffer(enc.data, dtype="<i8").view(np.uint64).astype(np.uint64))

    try:
        gather(clients, "keys", lambda c, m: server.add_keys(c, _keys_of(m)))
        roster = server.close_keys()
        counts = [weights[n] for n in roster.names]
        tensors = {f"{p}/{n}": getattr(roster.keys[n], f) for n in roster.names
                   for p, f in (("c", "c"), ("s", "s"), ("h", "commitment"))}
        for n in roster.names:
            _send(part, _message(part.name, n, request, {"phase": "roster", "clients": list(roster.names),
                                                          "threshold": t, "samples": counts}, tensors))
        gather(list(roster.names), "shares", lambda c, m: server.add_shares(c, _prefixed(m, "to/", CIPHERTEXT_BYTES)))
        routed = server.close_shares()
        for v, got in routed.items():
            _send(part, _message(part.name, v, request, {"phase": "shares"}, {f"from/{u}": c for u, c in got.items()}))
        gather(list(routed), "masked", masked)
        survivors, dropped = server.close_masked()
        for v in survivors:
            _send(part, _message(part.name, v, request, {"phase": "unmask", "survivors": list(survivors),
                                                          "dropped": list(dropped)}))
        gather(list(survivors), "unmask", lambda c, m: server.add_unmask(c, _prefixed(m, "", SHARE_BYTES)))
        total = server.total()
    except SecAggError as e:
        still = [c for c in clients if c not in refused]
        return _give_up(part, still, request, f"secure aggregation could not complete: {e}", refused)
    share = sum(weights[c] for c in survivors) / max(1, sum(counts))
    if share <= 0:
        return _give_up(part, list(survivors), request, "the survivors trained on no rows: no average", refused)
    part.global_state = unflatten(decode(total, share), like)
    if dropped:
        log.info("%s: secure aggregation of request %d: %s dropped out, their masks removed", part.name, request,
                 ", ".join(dropped))
    return list(survivors), refused


def _send(part: Participant, msg: Message) -> None:
    """Send to a client; one that cannot be reached is out of the round (its message will not come)."""
    try:
        part.link.send(msg)
    except TransportError as e:
        log.warning("%s: secure aggregation: cannot reach %s: %s", part.name, msg.receiver, e)


def _send_abort(part: Participant, clients: list[str], request: int, why: str) -> None:
    for c in clients:
        _send(part, _message(part.name, c, request, {"phase": "abort", "why": why[:300]}))


def _give_up(part: Participant, clients: list[str], request: int, why: str,
             refused: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """No average this round: every client in ``clients`` is told and reported as refused for ``why``."""
    if why:
        log.warning("%s: %s", part.name, why)
    _send_abort(part, clients, request, why)
    return [], {**refused, **{c: why[:300] for c in clients if c not in refused}}
