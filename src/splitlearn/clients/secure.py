"""Secure aggregation of an averaging round (``[clients] secure_aggregation = true``): the protocol of
:mod:`splitlearn.privacy.secagg` carried by the schedule's own weights messages, so the federation
receives masked fixed-point vectors and shares, and recovers only the sample-weighted average of
the clients that stayed to the end.

A client told to send its weights to the federation (``SendWeights``) runs :func:`secure_send`; the
federation told to collect them runs :func:`secure_collect`. Every message of the protocol is a
``WEIGHTS`` message on wire :data:`SECAGG_WIRE` answering the coordinator's request, its phase in
its JSON text (``keys``, ``roster``, ``sign`` and ``signed`` under mutual TLS, ``shares``,
``masked``, ``unmask``, ``abort``), its bytes as raw ``uint8`` tensors (the masked vector: ``int64``
tensors ``y``, the uint64 words as they are, in parts of at most 64 MiB
(:attr:`~splitlearn.clients.securestate.SecureState.part_bytes`) and half a message's limit, each
added to the federation's running sum as it comes).

**Certificates.** Where the run has them (party processes over mutual TLS), each client's keys
travel with its certificate and every client signs the roster's digest with its party key; a client
shares its secrets only with the clients whose signature checks out against the run's CA and the
roster's name (:class:`~splitlearn.privacy.secagg_certs.Certified`). Without certificates (every
party in one process, or ``--insecure``) nothing is signed: the federation is trusted to relay the
keys as they came, a simulation of the protocol that the log says once.

**Rewinds.** A rewind trains a round again from the same checkpoint, bit for bit; unmasked over other
survivors, the two sums would give the difference away. So each client keeps a journal
(:class:`~splitlearn.clients.securestate.Journal`: outside the rewound state) of the survivors each of its updates
was unmasked with, says them with its keys when the same update comes again, and answers the
unmasking only for them; the federation leaves the other clients out of that round, or gives the
round up if one of them is missing.

The sample counts are public (the coordinator's ``Collect`` names them): a client multiplies its
values by its samples over the roster's before encoding, and the federation divides the sum by
the survivors' share. A client whose values cannot be encoded says so (``abort``) before it sends
any key, and the federation reports its reason at once. A client's message that cannot be used
(wrong phase, names, lengths or dtype: a masked vector that is not ``int64[L]``) is refused naming
the client, which is then out of the round as if it had dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from ..privacy.secagg import (CIPHERTEXT_BYTES, KEY_BYTES, Keys, Roster, SecAggClient, SecAggError, SecAggServer,
                              check_values, decode, encode)
from ..privacy.secagg_certs import MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES
from ..privacy.shamir import SHARE_BYTES
from ..wire.codec import Encoded, WireError
from ..wire.messages import Kind, Message, parse_json, quote
from ..wire.transport import TransportError
from .securestate import SecureState
from .weights import flatten, unflatten

if TYPE_CHECKING:
    from .participant import Participant

__all__ = ["SECAGG_WIRE", "LEFT_OUT", "PHASES", "SecurePhase", "round_context", "secure_send",
           "secure_collect"]

log = logging.getLogger(__name__)
_UNSIGNED_TOLD = threading.Event()  # the warning that nothing is signed: given once a process

SECAGG_WIRE = "secagg"  # the wire name of every message of the protocol (metered apart from plain weights)
LEFT_OUT = "left out of secure aggregation: "  # a reason of the federation's that is no refusal of the client's
PHASES = 5  # the federation's phases under certificates (keys, sign, shares, masked, unmask): each up to a timeout


@dataclass(frozen=True)
class SecurePhase:
    """Never sent: what a test's fault hook (:data:`~splitlearn.clients.participant.Fault`) is called
    with as a client enters each later phase of its secure aggregation (``sign``, ``shares``,
    ``masked``, ``unmask``), before it sends that phase's message. No
    :class:`~splitlearn.wire.control.Instruction` (every one of those is decodable from the wire)."""

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


def _body(msg: Message, phase: str, limits: Any) -> dict[str, Any]:
    """The JSON text of a protocol message of ``phase`` or ``abort``; SecAggError: another message, or another phase."""
    if msg.wire != SECAGG_WIRE:
        raise SecAggError(f"a message on wire {quote(msg.wire)} during secure aggregation (expected {SECAGG_WIRE!r})")
    try:
        body = parse_json(msg.text, limits)
    except WireError as e:
        raise SecAggError(str(e)) from None
    if not isinstance(body, dict) or body.get("phase") not in (phase, "abort"):
        got = body.get("phase") if isinstance(body, dict) else body
        raise SecAggError(f"a message of phase {quote(got)} where phase {phase!r} was due")
    if body["phase"] == "abort" and not isinstance(body.get("why"), str):
        raise SecAggError("an abort without its reason")
    return body


def _bytes(msg: Message, name: str, size: int, exact: bool = True) -> bytes:
    """Tensor ``name`` of ``msg``: raw uint8 bytes, exactly ``size`` of them (``exact``) or at most that many
    (SecAggError otherwise)."""
    enc = msg.tensors.get(name)
    if enc is None:
        raise SecAggError(f"no tensor {quote(name)}")
    n = len(enc.data)
    if enc.codec != "raw" or enc.dtype != "uint8" or tuple(enc.shape) != (n,) or enc.extra or \
            (n != size if exact else n > size):
        raise SecAggError(f"tensor {quote(name)} is {enc.codec} {enc.dtype}{list(enc.shape)[:4]}, expected raw "
                          f"uint8[{size if exact else f'at most {size}'}]")
    return bytes(enc.data)


def _names(body: dict[str, Any], key: str) -> list[str]:
    got = body.get(key)
    if not isinstance(got, list) or not all(isinstance(n, str) for n in got) or len(set(got)) != len(got):
        raise SecAggError(f"{key!r} is not a list of distinct names")
    return got


def _keys_of(msg: Message, prefix: str = "") -> Keys:
    if not prefix and not {"c", "s", "h"} <= set(msg.tensors) <= {"c", "s", "h", "x"}:
        raise SecAggError(f"keys named {sorted(quote(k) for k in msg.tensors)[:4]}, expected 'c', 's', 'h' (and 'x')")
    cert = _bytes(msg, f"x{prefix}", MAX_CERTIFICATE_BYTES, exact=False) if f"x{prefix}" in msg.tensors else b""
    return Keys(*(_bytes(msg, f"{k}{prefix}", KEY_BYTES) for k in "csh"), certificate=cert)


def _prefixed(msg: Message, prefix: str, size: int) -> dict[str, bytes]:
    """The tensors named ``prefix/NAME``, by NAME (SecAggError if another name is there)."""
    other = [k for k in msg.tensors if not k.startswith(prefix)]
    if other:
        raise SecAggError(f"a tensor named {quote(other[0])} where only {prefix!r}... names were due")
    return {k[len(prefix):]: _bytes(msg, k, size) for k in msg.tensors}


def _unfit(state: dict[str, Any]) -> str | None:
    """Why a client's weights cannot be encoded (the first entry that fails, named), or None."""
    for k in sorted(state):
        try:
            check_values(state[k].detach().cpu().double().numpy())
        except SecAggError as e:
            return f"its weights {k!r}: {e}"
    return None


# -- a client ------------------------------------------------------------------------------------

def secure_send(part: Participant, request: int, hook: Callable[[str], None] | None = None) -> None:
    """A client's side: its weights, masked, to the federation (``hook``: called with each later phase's
    name first). Whatever goes wrong (weights it cannot encode: said to the federation; the federation
    gave up; a message it cannot use; nothing came in time) leaves it out of the round, said in the log
    (and a message it cannot use refused, naming the federation); only a broken link raises."""
    fed, sec = part.federation, part.secure
    try:
        _send_client(part, sec, request, round_context(fed, request), hook or (lambda phase: None))
    except SecAggError as e:
        part.link.refuse(fed, f"secure aggregation: {e}", request, SECAGG_WIRE)
        why = f"{part.name} refused the federation's message: {e}"  # (an ERROR reaches no reader of the schedule's)
        part.link.send(_message(part.name, fed, request, {"phase": "abort", "why": why[:300]}))
    finally:
        sec.last = max(sec.last, request)


def _send_client(part: Participant, sec: SecureState, request: int, ctx: bytes, hook: Callable[[str], None]) -> None:
    fed, wait = part.federation, 2 * part.timeout
    state = part.client_state()
    values = flatten(state)
    try:
        check_values(values)
    except SecAggError as e:  # said before any key goes out: the federation reports it at once
        why = _unfit(state) or str(e)
        log.warning("%s: secure aggregation: out of this round: %s", part.name, why)
        part.link.send(_message(part.name, fed, request, {"phase": "abort", "why": f"{part.name} withdrew: {why}"}))
        return
    update = hashlib.sha256(values.tobytes()).hexdigest()
    bound = sec.journal.bound(update)
    me = SecAggClient(part.name, ctx, part.spec.secure_floor(), part.secure_random, bound)
    k, cert = me.advertise(), sec.certified
    part.link.send(_message(part.name, fed, request, {"phase": "keys", **({"bound": list(bound)} if bound else {})},
                            {"c": k.c, "s": k.s, "h": k.commitment, **({"x": cert.certificate} if cert else {})}))

    def step(phase: str) -> tuple[dict[str, Any], Message] | None:
        msg = part.take_weights([fed], request, wait).get(fed)
        if msg is None:
            log.warning("%s: secure aggregation: no %s from %s within %g s; out of this round", part.name, phase,
                        fed, wait)
            return None
        body = _body(msg, phase, part.limits)
        if body["phase"] == "abort":
            log.warning("%s: secure aggregation: %s gave up: %s", part.name, fed, quote(body["why"], 300))
            return None
        return body, msg

    if (got := step("roster")) is None:
        return
    body, msg = got
    names, threshold, samples = _names(body, "clients"), body.get("threshold"), body.get("samples")
    if not isinstance(threshold, int) or not isinstance(samples, list) or len(samples) != len(names) or \
            not all(isinstance(n, int) and n >= 0 for n in samples) or sum(samples) <= 0 or part.name not in names:
        raise SecAggError("a roster without its threshold, its clients' sample counts, or this client")
    strangers = [n for n in names if n not in part.clients]
    if strangers:
        raise SecAggError(f"a roster naming {quote(strangers[0])}, who is no client of this plan")
    roster = Roster(tuple(names), {n: _keys_of(msg, f"/{n}") for n in names}, threshold)
    me.check_roster(roster)
    weight = samples[names.index(part.name)] / sum(samples)
    if cert is not None:
        if body.get("signed") is not True:
            raise SecAggError("a roster whose keys are not signed, where this client has a certificate: the "
                              "federation could have put keys of its own in it")
        for n in names:
            cert.certificate_of(n, roster.keys[n].certificate)
        digest = roster.digest(ctx, json.dumps(samples).encode())
        hook("sign")
        part.link.send(_message(part.name, fed, request, {"phase": "sign"}, {"g": cert.sign(digest)}))
        if (got := step("signed")) is None:
            return
        signers = _names(got[0], "signers")
        if part.name not in signers or not set(signers) <= set(names):
            raise SecAggError("signers that are not the roster's, or without this client")
        for n in signers:
            cert.check(n, roster.keys[n].certificate, digest, _bytes(got[1], f"g/{n}", MAX_SIGNATURE_BYTES, False))
        roster = roster.among(signers)
    elif body.get("signed"):
        raise SecAggError("a roster to sign, and this client has no certificate (a run without TLS)")
    elif not sec.warned and not _UNSIGNED_TOLD.is_set():  # once a process: a simulation's clients are its threads
        sec.warned = True
        _UNSIGNED_TOLD.set()
        log.warning("%s: secure aggregation without certificates: the federation is trusted to relay the clients' "
                    "keys as they came (no client can check them)", part.name)
    shares = me.share(roster)
    hook("shares")
    part.link.send(_message(part.name, fed, request, {"phase": "shares"}, {f"to/{v}": c for v, c in shares.items()}))
    if (got := step("shares")) is None:
        return
    masked = me.mask(_prefixed(got[1], "from/", CIPHERTEXT_BYTES), encode(values, weight))
    del values
    hook("masked")
    words = max(1, min(sec.part_bytes, part.limits.message_bytes // 2) // 8)
    for at in range(0, masked.size, words):
        y = masked[at:at + words]
        part.link.send(Message(Kind.WEIGHTS, part.name, fed, request, SECAGG_WIRE,
                               {"y": Encoded("raw", "int64", (y.size,), y.astype("<u8").view("<i8").tobytes())},
                               json.dumps({"phase": "masked", "offset": at})))
    if (got := step("unmask")) is None:
        return
    survivors, dropped = _names(got[0], "survivors"), _names(got[0], "dropped")
    answer = me.unmask(survivors, dropped)
    sec.journal.record(update, tuple(survivors))  # before the answer goes: a rewind after it is held to them
    hook("unmask")
    part.link.send(_message(part.name, fed, request, {"phase": "unmask"}, answer))


# -- the federation ------------------------------------------------------------------------------

@dataclass
class _Round:
    """The federation's side of one round in progress: who is out and why."""

    part: Participant
    request: int
    clients: list[str]
    out: dict[str, str] = field(default_factory=dict)  # client -> why it is out (refused, withdrew, left out)

    def abort(self, clients: list[str], why: str) -> None:
        for c in clients:
            _send(self.part, _message(self.part.name, c, self.request, {"phase": "abort", "why": why[:300]}))

    def gather(self, senders: list[str], phase: str, take: Callable[[str, dict[str, Any], Message], bool],
               waited: bool = True) -> None:
        """Each sender's messages of ``phase`` within a timeout, given to ``take`` (True: that sender is done);
        a message it cannot use refuses and aborts its sender, an abort takes the sender out; a sender
        still not done at the end is told that the round goes on without it. ``waited``: False for the
        survivors' last phase (their vectors are in the sum whatever they answer: only the log says)."""
        part, pending = self.part, set(senders)

        def one(c: str, msg: Message) -> None:
            try:
                body = _body(msg, phase, part.limits)
                if body["phase"] == "abort":
                    log.warning("%s: secure aggregation (%s): %s", part.name, phase, quote(body["why"], 300))
                    if waited:
                        self.out[c] = LEFT_OUT + body["why"][:300]
                    pending.discard(c)
                elif take(c, body, msg):
                    pending.discard(c)
            except SecAggError as e:
                part.link.refuse(c, f"secure aggregation ({phase}): {e}", self.request, SECAGG_WIRE)
                pending.discard(c)
                if waited:
                    self.out[c] = str(e)[:300]
                    self.abort([c], f"its {phase} message was refused: {e}")

        for c in senders:
            early = part._early.pop((c, self.request), None)
            if early is not None:
                one(c, early)
        deadline = time.monotonic() + part.timeout

        def mine(msg: Message, _: Any, __: int) -> bool | None:
            if msg.kind != Kind.WEIGHTS or msg.step != self.request:
                return None
            if msg.sender in pending:
                one(msg.sender, msg)
            else:  # a client out of the round, or of this phase already: too late, dropped
                log.debug("%s: secure aggregation: dropping a late message of %s", part.name, msg.sender)
            return True

        gone, away = part.gone(pending, now=True), {}

        def left(_: str) -> None:  # asked once nothing is left to read: a pending sender that is gone is not waited
            for c in sorted(pending):  # for (every pending one: one that sent a part of its vector is no "want" left)
                if why := gone(c):
                    away[c] = why
                    pending.discard(c)
            return None  # (every client is still read: another's late message is dropped here, not kept for later)

        while pending and (rest := deadline - time.monotonic()) > 0:
            part.await_messages(self.clients, rest, mine, until=lambda: not pending, gone=left)
        late = sorted(pending) if waited else []
        self.abort(late, f"its {phase} message did not come within {part.timeout:g} s: the round goes on without it")
        for c in late:
            self.out.setdefault(c, f"{LEFT_OUT}its {phase} message did not come within {part.timeout:g} s")
        for c, why in away.items():
            log.warning("%s: secure aggregation (%s): %s", part.name, phase, why)
            if waited:
                self.out.setdefault(c, f"{LEFT_OUT}{why} before its {phase} message")


def secure_collect(part: Participant, clients: list[str], samples: list[int],
                   request: int) -> tuple[list[str], dict[str, str]]:
    """The federation's side: its new average from the masked vectors of ``clients`` (weighted by
    ``samples``); who is in it, and why each client is not (refused, or :data:`LEFT_OUT` and why).
    Fewer than the threshold left at any phase: no average (the global weights stay), every client still
    in the round told why (``abort``) and reported for that reason."""
    like, t, sec = part.global_state, part.spec.secure_floor(), part.secure
    weights = dict(zip(clients, samples))
    rnd = _Round(part, request, list(clients))
    log.info("%s: secure aggregation of request %d: %d clients, threshold %d (%s)", part.name, request, len(clients),
             t, "the plan's secure_threshold" if part.spec.secure_threshold else "ceil(2n/3) of a round's n clients")
    try:
        return _collect(part, rnd, clients, weights, t, like)
    except SecAggError as e:
        return _give_up(rnd, [c for c in clients if c not in rnd.out], f"secure aggregation could not complete: {e}")
    finally:
        sec.last = max(sec.last, request)


def _collect(part: Participant, rnd: _Round, clients: list[str], weights: dict[str, int], t: int,
             like: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    request, cert = rnd.request, part.secure.certified
    if len(clients) < t:
        return _give_up(rnd, clients, f"{len(clients)} clients trained this round and unmasking needs {t}: no average")
    server = SecAggServer(clients, t, sum(v.numel() for v in like.values()), round_context(part.name, request))
    bounds: dict[str, frozenset[str]] = {}

    def keys(c: str, body: dict[str, Any], msg: Message) -> bool:
        k = _keys_of(msg)
        if cert is not None:
            cert.certificate_of(c, k.certificate)
        if "bound" in body:
            bounds[c] = frozenset(_names(body, "bound"))
        server.add_keys(c, k)
        return True

    rnd.gather(clients, "keys", keys)
    among = None
    if bounds:  # the same update unmasked before (a rewind): those survivors again, or no average
        sets = set(bounds.values())
        if len(sets) > 1:
            raise SecAggError(f"clients say their updates were unmasked before with different survivors: "
                              f"{sorted(sorted(s) for s in sets)[:2]}")
        among = next(iter(sets))
        missing = sorted(among - set(server.keys))
        if missing:
            raise SecAggError(f"this round is done again after a rewind: it was unmasked before with "
                              f"{sorted(among)[:8]}, and {missing[:4]} sent no keys this time; other survivors would "
                              "give the difference of the two sums away")
        others = [c for c in server.keys if c not in among]
        why = f"this round is done again after a rewind, unmasked with the survivors of before ({sorted(among)[:8]})"
        rnd.abort(others, why)
        rnd.out.update({c: LEFT_OUT + why for c in others})
    roster = server.close_keys(among)
    counts = [weights[n] for n in roster.names]
    tensors = {f"{p}/{n}": v for n in roster.names for p, v in (("c", roster.keys[n].c), ("s", roster.keys[n].s),
                                                                 ("h", roster.keys[n].commitment),
                                                                 ("x", roster.keys[n].certificate)) if v}
    for n in roster.names:
        _send(part, _message(part.name, n, request, {"phase": "roster", "clients": list(roster.names), "threshold": t,
                                                      "samples": counts, "signed": cert is not None}, tensors))
    if cert is not None:
        digest, signatures = roster.digest(server.context, json.dumps(counts).encode()), {}

        def sign(c: str, body: dict[str, Any], msg: Message) -> bool:
            signatures[c] = _bytes(msg, "g", MAX_SIGNATURE_BYTES, exact=False)
            cert.check(c, roster.keys[c].certificate, digest, signatures[c])
            return True

        rnd.gather(list(roster.names), "sign", sign)
        signers = [n for n in roster.names if n in signatures and n not in rnd.out]
        if len(signers) < t:
            raise SecAggError(f"{len(signers)} of {len(clients)} clients signed the roster, {t} needed")
        server.roster = roster = roster.among(signers)
        for n in signers:
            _send(part, _message(part.name, n, request, {"phase": "signed", "signers": signers},
                                 {f"g/{s}": signatures[s] for s in signers}))
    rnd.gather(list(roster.names), "shares",
               lambda c, b, m: server.add_shares(c, _prefixed(m, "to/", CIPHERTEXT_BYTES)) is None)
    routed = server.close_shares()
    for v, got in routed.items():
        _send(part, _message(part.name, v, request, {"phase": "shares"}, {f"from/{u}": c for u, c in got.items()}))

    def masked(c: str, body: dict[str, Any], msg: Message) -> bool:
        enc, at = msg.tensors.get("y"), body.get("offset")
        if set(msg.tensors) != {"y"} or not isinstance(at, int) or enc.codec != "raw" or enc.dtype != "int64" or \
                len(enc.shape) != 1 or len(enc.data) != 8 * enc.shape[0] or enc.extra or not enc.shape[0]:
            what = f"{enc.dtype}{list(enc.shape)[:4]}" if enc is not None else f"tensors {sorted(msg.tensors)[:4]}"
            raise SecAggError(f"its masked vector is {what}, expected int64[{server.length}] (in parts)")
        server.add_masked(c, np.frombuffer(enc.data, dtype="<u8"), at)
        return server.received[c] == server.length

    rnd.gather(list(routed), "masked", masked)
    survivors, dropped = server.close_masked()
    if among is not None and set(survivors) != among:
        raise SecAggError(f"this round is done again after a rewind and was unmasked before with {sorted(among)[:8]}; "
                          f"{sorted(among - set(survivors))[:4]} did not send their masked vectors this time")
    for v in survivors:
        _send(part, _message(part.name, v, request, {"phase": "unmask", "survivors": list(survivors),
                                                      "dropped": list(dropped)}))
    rnd.gather(list(survivors), "unmask", lambda c, b, m: server.add_unmask(c, _prefixed(m, "", SHARE_BYTES)) is None,
               waited=False)  # a survivor that answers late is in the sum all the same
    total = server.total()
    for c, why in server.misfits.items():
        part.link.refuse(c, f"secure aggregation (unmask): {why}; the round was unmasked with the others' shares",
                         request, SECAGG_WIRE)
    share = sum(weights[c] for c in survivors) / max(1, sum(counts))
    if share <= 0:
        return _give_up(rnd, list(survivors), "the survivors trained on no rows: no average")
    part.global_state = unflatten(decode(total, share), like)
    if dropped:
        log.info("%s: secure aggregation of request %d: %s dropped out, their masks removed", part.name, request,
                 ", ".join(dropped))
    return list(survivors), rnd.out


def _send(part: Participant, msg: Message) -> None:
    """Send to a client; one that cannot be reached is out of the round (its message will not come)."""
    try:
        part.link.send(msg)
    except TransportError as e:
        log.warning("%s: secure aggregation: cannot reach %s: %s", part.name, msg.receiver, e)


def _give_up(rnd: _Round, clients: list[str], why: str) -> tuple[list[str], dict[str, str]]:
    """No average this round: every client in ``clients`` is told and reported for ``why``."""
    log.warning("%s: %s", rnd.part.name, why)
    rnd.abort(clients, why)
    return [], {**rnd.out, **{c: LEFT_OUT + why[:300] for c in clients if c not in rnd.out}}
