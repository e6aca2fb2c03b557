"""The secure sum of vertical parties' activations (``merge = "secure_sum"``): the party that merges them (the
*merger*) learns their sum and nothing else of any one of them. Pure logic: no sockets and no files.

**Fixed point.** A member sends its activation ``x`` (float32) as ``q = round(x * 2^32)`` modulo 2^64 (int64 on
the wire, two's complement) plus its masks. Magnitudes up to :data:`MAX_ABS` (2^24) and at most
:data:`MAX_PARTIES` (64) members keep the sum of the ``q`` below 2^62 in magnitude, so it never wraps; a larger
or non-finite activation is not sent (the member stops, saying why). The merger adds the masked tensors modulo
2^64 (the masks cancel), reads the sum as a signed integer and divides it by 2^32 (float64, then float32). The
decoded sum of ``k`` members is within ``k * 2^-33 + 2^-23 * (|X| + k * 2^-33)`` of the exact sum ``X`` of their
float32 values (:func:`error_bound`: each rounding to a multiple of 2^-32 costs at most 2^-33, the two casts
at most 2^-24 of the magnitude each). A plain ``sum`` merge rounds too, at each float32 addition (at most
``(k - 1) * 2^-24 * sum |x_i|``): the two merges differ by at most the sum of the two bounds.

**Keys and masks.** Each member draws an X25519 key per session (``os.urandom``) and the keys travel in two
rounds of hellos over the authenticated links (:meth:`SecureSum.agree`): each member tells its neighbours its
public key; each merger tells its neighbours the roster of its group's keys, each tagged by the authenticated
name of the hello it came in; a member checks the roster holds its own key and agrees
``K = HKDF-SHA256(X25519(own, theirs), "pair|SEGMENT|A|B")`` with every other member. Where the run has
certificates (party processes over mutual TLS) each member also signs :func:`key_statement` (the plan's hash, its
name, its key) with its party key and tells its certificate; the merger relays both with the key, and a member
agrees no key before every other member's certificate (the run's CA, that party's name, :class:`PeerCheck`'s
verdict) and signature check out, so a merger cannot put keys of its own in the roster. Without certificates
(every party in one process) the merger is trusted to relay the keys as they came. At message step ``s``
(a micro-batch, a block of a step's rows, is a message step of its own: ``step * pipeline + i``), member ``i``
adds ``sum_j ±PRG(K_ij, "SEGMENT|MODE|s")``, ``+`` towards members after it among the segment's inputs and ``-``
before, so the masks cancel in the sum. The PRG (:func:`keystream_parts`, which secure aggregation uses too):
HKDF-SHA256 of the key and the label keying ChaCha20's keystream, read as little-endian uint64 words, a
cryptographic stream cipher, so with two members or more each masked tensor is uniform modulo 2^64 to the
merger. The masks depend on the session's keys and the message step only: nothing is kept, and a resumed or
restarted session agrees new keys and masks its steps alike. Neither self masks nor secret sharing: every
vertical party is needed in every step (one that drops stops the run, as without masks).

**Gradient.** The merger trains on ``S + z_1 + ... + z_k``: ``S`` the decoded sum, each ``z_i`` a zero leaf in
place of member ``i``'s received tensor, so autograd gives every member's leaf the gradient of the sum (the same
for each, as in a plain ``sum``), which goes back on its wire as any gradient, in float.

Not covered: without certificates the merger relays the keys unchecked, so a merger that substitutes them (an
active attacker) can unmask; a member can bias the sum with any tensor (nothing checks a masked input; the decoded
sum is checked against the members' range and the wires' ``max_abs``, but not against ``max_jump``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..wire.messages import Kind, quote
from .plan import plan_hash
from .specs import PlanError

if TYPE_CHECKING:
    from ..wire.metering import Meter
    from .graph import Graph, Node, Wire
    from .step import StepState

__all__ = ["SCALE_BITS", "MAX_ABS", "MAX_PARTIES", "SecureSum", "check_secure_sums", "secure_groups", "encode",
           "decode", "error_bound", "keystream", "keystream_parts", "key_statement"]

SCALE_BITS = 32  # fixed point: a value is counted in units of 2^-32
MAX_ABS = 2.0 ** 24  # the largest magnitude a member sends
MAX_PARTIES = 64  # 64 * 2^24 * 2^32 = 2^62: the sum never wraps
_KEY_HEX = 64  # an X25519 public key, in hex
_CERTIFICATE_HEX = 2 * 16 * 1024  # a member's certificate (DER, at most 16 KiB), in hex
_SIGNATURE_HEX = 2 * 1024  # its signature of its key (ECDSA: about 72 bytes, RSA-4096: 512), in hex


def encode(x: torch.Tensor) -> np.ndarray:
    """``x`` in fixed point modulo 2^64 (uint64, flat); a ValueError for a value not finite or beyond :data:`MAX_ABS`."""
    a = x.detach().cpu().double().numpy().ravel()
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"holds {int((~np.isfinite(a)).sum())} non-finite value(s)")
    if a.size and np.abs(a).max() > MAX_ABS:
        raise ValueError(f"holds a value of magnitude {float(np.abs(a).max()):.3g}, beyond the 2^24 a secure sum's "
                         "fixed point carries")
    return np.rint(a * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """The float64 values of a fixed-point sum (uint64 modulo 2^64, read as signed)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** SCALE_BITS


def error_bound(parties: int, magnitude: float) -> float:
    """How far a decoded sum (float32) may be from the exact sum of ``parties`` float32 values whose exact sum has
    magnitude ``magnitude``: ``k * 2^-33 + 2^-23 * (magnitude + k * 2^-33)``."""
    rounding = parties * 2.0 ** -(SCALE_BITS + 1)
    return rounding + 2.0 ** -23 * (magnitude + rounding)


def keystream_parts(key: bytes, info: bytes, length: int, part: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """``length`` uint64 words (little-endian) of ChaCha20's keystream under HKDF-SHA256(``key``, ``info``), as
    (offset, words) parts of at most ``part`` words: the one PRG of the secure sum and of secure aggregation
    (:mod:`splitlearn.privacy.secagg`), a cryptographic stream whose words reveal nothing of its key."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
    enc = Cipher(algorithms.ChaCha20(derived, bytes(16)), mode=None).encryptor()
    for at in range(0, length, part):
        n = min(part, length - at)
        yield at, np.frombuffer(enc.update(bytes(8 * n)), dtype="<u8")


def keystream(key: bytes, purpose: bytes, length: int) -> np.ndarray:
    """``length`` uint64 words of a secure sum's mask: :func:`keystream_parts` under the secure sum's label."""
    parts = [words for _, words in keystream_parts(key, b"splitlearn securesum v1|" + purpose, length)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def key_statement(plan_digest: str, party: str, public: bytes) -> bytes:
    """What a member signs with its party key to vouch for its X25519 key ``public`` in the run of the plan whose hash
    is ``plan_digest`` (:func:`~splitlearn.core.plan.plan_hash`)."""
    return f"splitlearn securesum v1|key|{plan_digest}|{party}|".encode() + public


def _hex(value: Any, most: int) -> bytes | None:
    """Bytes from their hex, at most ``most`` characters (None: not such a text)."""
    if not isinstance(value, str) or len(value) > most:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def secure_groups(graph: Graph) -> dict[str, tuple[Wire, ...]]:
    """Each segment that merges by ``secure_sum``, with the wires of its inputs in their order (its members')."""
    return {name: tuple(graph.wire_between(d, graph.nodes[name].party) for d in graph.nodes[name].inputs)
            for name, seg in graph.plan.segments.items() if seg.merge == "secure_sum"}


def check_secure_sums(graph: Graph) -> None:
    """A PlanError for a secure sum the engine cannot serve: fewer than two inputs, an input of the merger's own or
    two of one party, more than :data:`MAX_PARTIES`, an input that also feeds another node at the merger (it would
    see it in the clear), a codec on a masked wire (the masked integers travel exactly), a party of the group
    computing in 16 bits, or a ``[clients]`` plan."""
    plan = graph.plan
    for name, seg in plan.segments.items():
        if seg.merge != "secure_sum":
            continue
        entry, node = f"segments.{name}.merge", graph.nodes[name]
        plan.check_secure_sum(entry)
        parties = [graph.nodes[d].party for d in node.inputs]
        own = [d for d, p in zip(node.inputs, parties) if p == node.party]
        if len(node.inputs) < 2 or own:
            what = (f"would sum {own[0]!r} of its own party {node.party!r} securely" if own else
                    "has one input: nothing to sum")
            raise PlanError(f"segment {name!r} {what}", entry=entry, hint="a secure sum hides each of two or more "
                            "parties' activations from the party that merges them: sum what other parties send, or "
                            'write merge = "sum"')
        if len(set(parties)) != len(parties) or len(parties) > MAX_PARTIES:
            raise PlanError(f"segment {name!r} sums inputs of parties {parties}: a secure sum takes one input per "
                            f"party, of at most {MAX_PARTIES} parties", entry=entry,
                            hint="merge one party's outputs in a segment of its own first")
        for d in node.inputs:
            w = graph.wire_between(d, node.party)
            others = [u for u in w.consumers if u != name]
            if others:
                raise PlanError(f"{d!r} feeds {others} at {node.party!r} besides the secure sum of segment {name!r}: "
                                f"{node.party!r} would hold it in the clear", entry=entry,
                                hint=f"let only {name!r} take {d!r} at {node.party!r}")
            if w.spec.codec != "float32":
                raise PlanError(f"wire {w.name!r} carries masked integers to the secure sum of segment {name!r}, "
                                f"exactly: codec {w.spec.codec!r} does not apply", entry=f"wires.{d}.codec",
                                hint="leave the codec out (grad_codec still applies to the gradient)")
        for p in dict.fromkeys([*parties, node.party]):
            if plan.parties[p].precision != "fp32":
                raise PlanError(f"party {p!r} computes in {plan.parties[p].precision}, but the secure sum of segment "
                                f"{name!r} sums float32 activations in fixed point", entry=f"parties.{p}.precision",
                                hint='leave precision at "fp32" for the parties of a secure sum')


def _public(value: Any) -> bytes | None:
    """An X25519 public key from its hex (None: not one)."""
    if not isinstance(value, str) or len(value) != _KEY_HEX:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


class SecureSum:
    """One party's part in the secure sums of a plan: a *member* masks what it sends into a group
    (:meth:`mask`), a *merger* keeps the masked tensors it receives (:meth:`take`) and gives its segment their
    decoded sum (:meth:`merged`); :meth:`agree` agrees the keys in a session's hellos. ``error``: what it raises
    when the run cannot go on (the engine's ``PartyError``); ``meter``: its work counts as compute."""

    def __init__(self, graph: Graph, name: str, meter: Meter, error: type[Exception],
                 random_bytes: Callable[[int], bytes] = os.urandom):
        self.graph, self.name, self.meter, self.error = graph, name, meter, error
        self.groups = secure_groups(graph)  # segment -> the wires of its inputs
        self.joins = {w.name: seg for seg, ws in self.groups.items() for w in ws if w.src_party == name}
        self.merges = {seg: ws for seg, ws in self.groups.items() if graph.nodes[seg].party == name}
        self.random_bytes = random_bytes
        self.pairs: dict[str, list[tuple[int, bytes]]] = {}  # segment -> (sign, pair key) per other member

    def agree(self, exchange: Callable[[str, dict[str, Any] | None], dict[str, dict[str, Any]]],
              certified: Any = None) -> None:
        """Agree the pair keys in two rounds of hellos (``exchange(phase, what to tell)``: every neighbour's hello of
        that phase): each member's public key, then each merger's roster of its group's keys. A member draws a new
        key every session, so no keystream of an earlier session (a step done again after a restart) is used again.
        ``certified``: the party's :class:`~splitlearn.privacy.secagg_certs.Certified` where the run has certificates
        (its ``certificate``, ``sign(data)`` and ``check(name, certificate, data, signature)``, which raises a
        ValueError): each member signs its key and checks every other member's signature before agreeing keys."""
        own = X25519PrivateKey.from_private_bytes(self.random_bytes(32)) if self.joins else None
        public = own.public_key().public_bytes_raw().hex() if own is not None else None
        digest = plan_hash(self.graph.plan)
        tell: dict[str, Any] | None = None
        if public is not None:
            tell = {"secure_key": public}
            if certified is not None:
                tell.update(secure_certificate=certified.certificate.hex(), secure_signature=certified.sign(
                    key_statement(digest, self.name, bytes.fromhex(public))).hex())
        heard = exchange("secure-keys", tell)
        rosters: dict[str, dict[str, dict[str, str]]] = {}
        for seg, wires in self.merges.items():
            rosters[seg] = {}
            for w in wires:
                hello = heard.get(w.src_party, {})
                told = hello.get("secure_key")
                if _public(told) is None:
                    raise self.error(f"{self.name}: party {quote(w.src_party)} told no X25519 key (32 bytes in hex) "
                                     f"for the secure sum of segment {seg!r}, but {quote(told)}")
                entry = rosters[seg][w.src_party] = {"key": told}
                for field, most in (("certificate", _CERTIFICATE_HEX), ("signature", _SIGNATURE_HEX)):
                    if f"secure_{field}" in hello:  # relayed as told; its members check it
                        if _hex(hello[f"secure_{field}"], most) is None:
                            raise self.error(f"{self.name}: party {quote(w.src_party)} told a {field} for its key "
                                             f"that is no hex of at most {most // 2} bytes")
                        entry[field] = hello[f"secure_{field}"]
        heard = exchange("secure-roster", {"secure_roster": rosters} if rosters else None)
        self.pairs = {}
        for seg in dict.fromkeys(self.joins.values()):
            merger, members = self.graph.nodes[seg].party, [w.src_party for w in self.groups[seg]]
            roster = heard.get(merger, {}).get("secure_roster")
            roster = roster.get(seg) if isinstance(roster, dict) else None
            if (not isinstance(roster, dict) or sorted(roster) != sorted(members)
                    or any(not isinstance(v, dict) or _public(v.get("key")) is None for v in roster.values())
                    or roster[self.name]["key"] != public):
                raise self.error(f"{self.name}: {merger!r} sent no roster of the keys of {members} with ours for the "
                                 f"secure sum of segment {seg!r}, but {quote(roster)}")
            me, pairs = members.index(self.name), []
            for i, p in enumerate(members):
                if p == self.name:
                    continue
                theirs = _public(roster[p]["key"])
                if certified is not None:  # the key is p's own: signed by p's certificate, issued by the run's CA
                    try:
                        certified.check(p, _hex(roster[p].get("certificate"), _CERTIFICATE_HEX) or b"",
                                        key_statement(digest, p, theirs),
                                        _hex(roster[p].get("signature"), _SIGNATURE_HEX) or b"")
                    except ValueError as e:
                        raise self.error(f"{self.name}: the key {merger!r} relayed for party {p!r} in the secure sum "
                                         f"of segment {seg!r} is not vouched for by the certificate of {p!r} ({e}); "
                                         "no key is agreed") from None
                try:
                    shared = own.exchange(X25519PublicKey.from_public_bytes(theirs))
                except ValueError:
                    raise self.error(f"{self.name}: the key of {p!r} in {merger!r}'s roster agrees no secret (a key "
                                     "of low order)") from None
                a, b = sorted((self.name, p))
                key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                           info=f"splitlearn securesum v1|pair|{seg}|{a}|{b}".encode()).derive(shared)
                pairs.append((1 if me < i else -1, key))
            self.pairs[seg] = pairs

    def mask(self, wire: Wire, kind: Kind, st: StepState, t: torch.Tensor) -> torch.Tensor:
        """What a member sends on ``wire``: an activation into a secure sum as masked fixed point (int64, on the
        CPU); anything else as it is."""
        seg = self.joins.get(wire.name)
        if seg is None or kind != Kind.ACTIVATION:
            return t
        if seg not in self.pairs:
            raise self.error(f"{self.name}: no keys agreed for the secure sum of segment {seg!r} (a session agrees "
                             "them before its handshake)")
        if not t.is_floating_point():
            raise self.error(f"{self.name}: the secure sum of segment {seg!r} sums floating activations; "
                             f"{wire.src!r} is {t.dtype}")
        with self.meter.timed("compute"):
            try:
                q = encode(t)
            except ValueError as e:
                raise self.error(f"{self.name}: its activation {wire.src!r} of step {st.step} {e}: it is not sent "
                                 f"into the secure sum of segment {seg!r}") from None
            for sign, key in self.pairs[seg]:
                m = keystream(key, f"{seg}|{st.mode}|{st.step}".encode(), q.size)
                if sign > 0:
                    q += m
                else:
                    q -= m
        return torch.from_numpy(q.view(np.int64).reshape(tuple(t.shape)))

    def take(self, wire: Wire, st: StepState, t: torch.Tensor) -> torch.Tensor:
        """A received activation as the step holds it: on a masked wire, a float32 zero leaf in place of the masked
        tensor, which is kept for :meth:`merged`; anything else as it is."""
        if not wire.masked:
            return t
        st.masked[wire.src] = t
        return torch.zeros(tuple(t.shape), dtype=torch.float32)

    def merged(self, node: Node, st: StepState, xs: list[torch.Tensor],
               observer: Callable[[str, str, StepState, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """A segment's inputs: for a secure sum, ``[S + z_1 + ... + z_k]`` (``S`` the decoded sum of the masked
        tensors, ``xs`` the zero leaves), ``S`` checked against the members' range and the wires' ``max_abs`` and
        told to ``observer`` (direction ``"sum"`` on each wire); else ``xs``."""
        wires = self.merges.get(node.name)
        if wires is None:
            return xs
        masked = [st.masked.pop(w.src) for w in wires]
        shapes = {w.name: list(m.shape) for w, m in zip(wires, masked)}
        if len({tuple(s) for s in shapes.values()}) != 1:
            raise PlanError(f"segment {node.name!r} (party {node.party!r}) cannot sum {shapes}: a secure sum takes "
                            "tensors of one shape", entry=f"segments.{node.name}",
                            hint="give the members' segments outputs of one width")
        with self.meter.timed("compute"):
            total = np.zeros(masked[0].numel(), dtype=np.uint64)
            for m in masked:
                total += m.numpy().view(np.uint64).ravel()
            s = torch.from_numpy(decode(total)).float().reshape(masked[0].shape)
        top = float(s.abs().max()) if s.numel() else 0.0
        # each member within its own wire's max_abs, as a plain sum checks them: their sum within the sum of those
        ceiling = min(len(wires) * MAX_ABS, sum(w.spec.max_abs for w in wires))
        if top > ceiling:
            raise self.error(f"{self.name}: the secure sum of segment {node.name!r} at step {st.step} decodes to a "
                             f"magnitude of {top:.3g}, beyond {ceiling:g} (its members' range, the sum of the wires' max_abs): "
                             f"the masks of {[w.src_party for w in wires]} do not cancel, or one of them sent such "
                             "values; which one cannot be told")
        if observer is not None and st.mode in ("train", "eval"):
            for w in wires:
                observer(w.name, "sum", st, s)
        out = s.to(xs[0].device)
        for x in xs:
            out = out + x
        return [out]
