"""Secure aggregation of client updates (pure logic: no sockets, no files), in the manner of
SecAgg (Bonawitz et al., CCS 2017) with every pair of clients masking: the server (the federation)
learns the weighted sum of the surviving clients' vectors and nothing else of any one of them.

**Fixed point.** A client's values ``x`` (float64), times its weight ``w`` (its samples over the
round's, at most 1), become integers modulo 2^64 (:data:`MODULUS_BITS`):
``q = round(x * w * 2^32)`` (:data:`SCALE_BITS`), two's complement. Values beyond
:data:`MAX_ABS` (2^30) or not finite are refused, so the sum of weighted values (weights summing
to at most 1) never wraps. Rounding costs each client at most 2^-33 per value; the decoded
weighted mean over ``n`` survivors whose weights sum to ``W`` is within
``n * 2^-33 / W + (n + 8) * 2^-52 * max|x|`` of the exact weighted mean of the same inputs
(:func:`error_bound`; the second term covers float64 arithmetic, of this computation and of a
float64 reference), before the cast to the entry's own dtype.

**Masks.** Each client ``u`` makes two X25519 key pairs per round (``c``: to encrypt the shares
it sends the others through the server; ``s``: to agree a mask with every other client) and a
32-byte self-mask seed ``b``. It sends ``y = q + PRG(b) + sum_v ±PRG(agree(s_u, s_v))`` (``+``
towards clients after it in the roster, ``-`` before): the pairwise masks cancel in the sum.
The PRG is HKDF-SHA256 (the agreed secret or the seed, with a label naming the purpose and the
round) keying ChaCha20's keystream, read as little-endian uint64: a cryptographic stream cipher,
unlike a statistical generator (numpy's Philox), so a mask reveals nothing of its key or of the
masked value; it is fast in OpenSSL (``cryptography``) and gives the same words everywhere.

**Dropouts.** ``b`` and ``s_u``'s private key are Shamir-shared (:mod:`.shamir`, threshold ``t``)
among the round's clients, each share encrypted for its holder (ChaCha20-Poly1305 under a key
agreed with ``c``, one per direction). Once the masked vectors are in, each survivor sends the
shares of ``b`` of every survivor and of the private key ``s`` of every client that dropped, never
both for one client: the server removes the survivors' self masks and the dropped clients'
pairwise masks and is left with the sum. With fewer than ``t`` shares nothing is removed.

Randomness comes from ``random_bytes`` (``os.urandom`` in production; :func:`seeded_bytes` makes a
run reproducible in tests).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .shamir import SHARE_BYTES, ShamirError, reconstruct, share_from_bytes, share_to_bytes, split

__all__ = ["SCALE_BITS", "MODULUS_BITS", "MAX_ABS", "KEY_BYTES", "CIPHERTEXT_BYTES", "SecAggError", "Keys", "Roster",
           "SecAggClient", "SecAggServer", "encode", "decode", "error_bound", "default_threshold", "least_threshold",
           "mask_stream", "seeded_bytes"]

SCALE_BITS = 32  # fixed point: a value is counted in units of 2^-32
MODULUS_BITS = 64  # integers modulo 2^64 (numpy's uint64 wraps alike)
MAX_ABS = 2.0 ** 30  # the largest magnitude encoded: 2^30 * 2^32 = 2^62 leaves the sum room
KEY_BYTES = 32  # an X25519 key, a self-mask seed, a SHA-256 commitment
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16  # two shares and the Poly1305 tag
_NONCE = bytes(12)  # every share key is used once (fresh keys every round, one key per direction)


class SecAggError(ValueError):
    """A message of the protocol that cannot be used, or a round that cannot complete (the reason says which)."""


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A reproducible stream of bytes (ChaCha20 keyed by SHA-256 of ``seed``): tests only; production
    draws ``os.urandom``."""
    key = hashlib.sha256(f"splitlearn secagg test seed {seed}".encode()).digest()
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda n: enc.update(bytes(n))


def default_threshold(n: int) -> int:
    """Shares needed to unmask a round of ``n`` clients when the plan names none: ceil(2n/3), at
    least 2 (of one client the sum is its update)."""
    return max(2, math.ceil(2 * n / 3))


def least_threshold(n: int) -> int:
    """The smallest threshold a client accepts for a roster of ``n``: more than half of it (so a
    server that says different clients dropped to different clients cannot get both shares of
    one client) and at least 2."""
    return max(2, n // 2 + 1)


# -- fixed point ---------------------------------------------------------------------------------

def encode(values: np.ndarray, weight: float) -> np.ndarray:
    """``values * weight`` in fixed point modulo 2^64 (uint64). Refuses non-finite values, values
    beyond :data:`MAX_ABS` and a weight outside [0, 1] (SecAggError)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not 0.0 <= weight <= 1.0:
        raise SecAggError(f"a weight of {weight!r}: it must lie in [0, 1] (samples over the round's samples)")
    if x.size and not np.isfinite(x).all():
        raise SecAggError("a value that is not finite cannot be encoded")
    if x.size and np.abs(x).max() > MAX_ABS:
        raise SecAggError(f"a value of magnitude {float(np.abs(x).max()):.3g} is beyond the {MAX_ABS:.3g} "
                          "fixed point can carry")
    return np.rint(x * weight * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, weight: float) -> np.ndarray:
    """The weighted mean (float64) of a fixed-point sum whose clients' weights sum to ``weight``."""
    if not weight > 0:
        raise SecAggError("the survivors' weights sum to 0: there is no mean to decode")
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** SCALE_BITS / weight


def error_bound(weights: Sequence[float], total: float | None = None, max_abs: float = 1.0) -> float:
    """How far a decoded value may be from the exact weighted mean of the same inputs: ``weights``
    are the survivors' (e.g. their samples), ``total`` what each client's weight was divided by
    (the round's samples; default their sum), ``max_abs`` the largest magnitude among the inputs.
    ``n * 2^-33 / W + (n + 8) * 2^-52 * max_abs`` with ``W = sum(weights) / total``."""
    n, s = len(weights), float(sum(weights))
    if n == 0 or s <= 0:
        raise SecAggError("no survivor with a positive weight: nothing is decoded")
    share = s / (total if total is not None else s)
    return n * 2.0 ** -(SCALE_BITS + 1) / share + (n + 8) * 2.0 ** -52 * max_abs


# -- the pseudo-random masks -------------------------------------------------------------------

def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"splitlearn secagg v1|" + info).derive(secret)


def mask_stream(secret: bytes, length: int, purpose: bytes) -> np.ndarray:
    """``length`` uint64 words of ChaCha20's keystream under HKDF-SHA256(``secret``, ``purpose``)."""
    enc = Cipher(algorithms.ChaCha20(_hkdf(secret, purpose), bytes(16)), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise SecAggError("a public key of low order (no secret can be agreed with it)") from None


def _share_key(private: X25519PrivateKey, public: bytes, context: bytes, sender: str, receiver: str) -> bytes:
    return _hkdf(_agree(private, public), b"share|" + context + f"|{sender}|{receiver}".encode())


def _aad(context: bytes, sender: str, receiver: str) -> bytes:
    return context + f"|{sender}->{receiver}".encode()


def _check_key(public: bytes) -> None:
    """A public key must be 32 bytes and agree a secret (not of low order)."""
    if len(public) != KEY_BYTES:
        raise SecAggError(f"a public key of {len(public)} bytes, expected {KEY_BYTES}")
    _agree(X25519PrivateKey.from_private_bytes(bytes([9]) * 32), public)


@dataclass(frozen=True)
class Keys:
    """What a client advertises: its two public keys and a SHA-256 commitment to its self-mask seed
    (so the server can tell a seed rebuilt from wrong shares)."""

    c: bytes  # encrypts the shares sent to it
    s: bytes  # agrees the pairwise masks
    commitment: bytes

    def check(self) -> None:
        for key in (self.c, self.s):
            _check_key(key)
        if len(self.commitment) != KEY_BYTES:
            raise SecAggError(f"a commitment of {len(self.commitment)} bytes, expected {KEY_BYTES}")


@dataclass(frozen=True)
class Roster:
    """The clients that advertised keys (their order gives each its share's x = position + 1 and
    the signs of the pairwise masks), their keys, and the threshold ``t``."""

    names: tuple[str, ...]
    keys: Mapping[str, Keys]
    threshold: int

    def index(self, name: str) -> int:
        return self.names.index(name)


class SecAggClient:
    """One client's side of one round: :meth:`advertise`, :meth:`share`, :meth:`mask`,
    :meth:`unmask`, in that order. ``context`` names the round (it keys every derivation);
    ``required``: the threshold the plan asks for (None: :func:`default_threshold` of the roster)."""

    def __init__(self, name: str, context: bytes, required: int | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom):
        self.name, self.context, self.required, self.random_bytes = name, context, required, random_bytes
        self._c = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._s = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._seed = random_bytes(KEY_BYTES)
        self.keys = Keys(self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw(),
                         hashlib.sha256(self._seed).digest())
        self.roster: Roster | None = None
        self.peers: tuple[str, ...] = ()  # those whose masks it added (its shares came through)
        self._held: dict[str, tuple[int, int]] = {}  # client -> (share of its s key, share of its seed)
        self._answered = False

    def advertise(self) -> Keys:
        return self.keys

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Encrypted shares of its s private key and seed for every other client of ``roster``
        (checked: it is there with its own keys, and the threshold is one it accepts)."""
        n, t = len(roster.names), roster.threshold
        if roster.keys.get(self.name) != self.keys or self.name not in roster.names:
            raise SecAggError(f"the roster does not hold {self.name}'s own keys")
        if len(set(roster.names)) != n or set(roster.keys) != set(roster.names):
            raise SecAggError("the roster repeats a client or lacks one's keys")
        least = max(least_threshold(n), self.required if self.required is not None else default_threshold(n))
        if not least <= t <= n:
            raise SecAggError(f"a threshold of {t} for {n} clients: {self.name} accepts {least} to {n}")
        for who, k in roster.keys.items():
            try:
                k.check()
            except SecAggError as e:
                raise SecAggError(f"the keys of {who!r} in the roster: {e}") from None
        self.roster = roster
        s_shares = split(int.from_bytes(self._s.private_bytes_raw(), "big"), n, t, self.random_bytes)
        b_shares = split(int.from_bytes(self._seed, "big"), n, t, self.random_bytes)
        out = {}
        for i, v in enumerate(roster.names):
            if v == self.name:
                self._held[v] = (s_shares[i][1], b_shares[i][1])
                continue
            key = _share_key(self._c, roster.keys[v].c, self.context, self.name, v)
            plain = share_to_bytes(s_shares[i][1]) + share_to_bytes(b_shares[i][1])
            out[v] = ChaCha20Poly1305(key).encrypt(_NONCE, plain, _aad(self.context, self.name, v))
        return out

    def mask(self, received: Mapping[str, bytes], encoded: np.ndarray) -> np.ndarray:
        """The masked vector of ``encoded`` (:func:`encode`'s), given the shares the others sent it
        (``received``: sender -> ciphertext, routed by the server); its peers are those senders."""
        r = self.roster
        if r is None:
            raise SecAggError("shares before the roster")
        strangers = [u for u in received if u not in r.names or u == self.name]
        if strangers:
            raise SecAggError(f"shares from {strangers[0]!r}, who is not another client of the roster")
        if len(received) + 1 < r.threshold:
            raise SecAggError(f"shares of {len(received) + 1} clients, fewer than the threshold {r.threshold}")
        for u, ct in received.items():
            key = _share_key(self._c, r.keys[u].c, self.context, u, self.name)
            try:
                plain = ChaCha20Poly1305(key).decrypt(_NONCE, bytes(ct), _aad(self.context, u, self.name))
                self._held[u] = (share_from_bytes(plain[:SHARE_BYTES]), share_from_bytes(plain[SHARE_BYTES:]))
            except (InvalidTag, ShamirError):
                raise SecAggError(f"the shares from {u!r} do not decrypt (altered on the way)") from None
        self.peers = tuple(v for v in r.names if v in received or v == self.name)
        y = np.asarray(encoded, dtype=np.uint64).ravel().copy()
        y += mask_stream(self._seed, y.size, b"self|" + self.context)
        me = r.index(self.name)
        for v in self.peers:
            if v != self.name:
                m = mask_stream(_agree(self._s, r.keys[v].s), y.size, b"pair|" + self.context)
                if me < r.index(v):
                    y += m
                else:
                    y -= m
        return y

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """Its shares: of each survivor's seed (``b/NAME``) and each dropped client's s key (``s/NAME``);
        answered once per round, and only if the two lists split its peers and hold enough survivors."""
        if self._answered:
            raise SecAggError("a second request for shares in one round")
        if self.roster is None or not self.peers:
            raise SecAggError("a request for shares before the masked vector")
        s, d = set(survivors), set(dropped)
        if s & d or s | d != set(self.peers) or len(s) != len(survivors) or len(d) != len(dropped):
            raise SecAggError("the survivors and the dropped do not split the clients whose masks it added")
        if self.name not in s or len(s) < self.roster.threshold:
            raise SecAggError(f"{len(s)} survivors, fewer than the threshold {self.roster.threshold}, or without "
                              f"{self.name}")
        self._answered = True
        out = {f"b/{u}": share_to_bytes(self._held[u][1]) for u in survivors}
        out.update({f"s/{u}": share_to_bytes(self._held[u][0]) for u in dropped})
        return out


class SecAggServer:
    """The server's side of one round over ``names`` (the clients asked), vectors of ``length``
    words, threshold ``threshold``. Each ``add_*`` takes one client's message (SecAggError: it is
    unusable, and the client counts as dropped); each step after it closes a phase (SecAggError:
    fewer than the threshold are left). ``received`` keeps every message as it came."""

    def __init__(self, names: Sequence[str], threshold: int, length: int, context: bytes):
        if not 2 <= threshold <= len(names):
            raise SecAggError(f"a threshold of {threshold} for {len(names)} clients (2 to the clients)")
        self.names, self.threshold, self.length, self.context = tuple(names), threshold, length, context
        self.keys: dict[str, Keys] = {}
        self.shares: dict[str, dict[str, bytes]] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.unmasking: dict[str, dict[str, bytes]] = {}
        self.roster: Roster | None = None
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()

    def _enough(self, have: Sequence[str], what: str) -> None:
        if len(have) < self.threshold:
            raise SecAggError(f"{len(have)} of {len(self.names)} clients sent {what}, {self.threshold} needed")

    def add_keys(self, name: str, keys: Keys) -> None:
        if name not in self.names or name in self.keys or self.roster is not None:
            raise SecAggError("keys from a client that is not asked, or a second time")
        keys.check()
        self.keys[name] = keys

    def close_keys(self) -> Roster:
        """The roster of those that advertised keys, for every one of them."""
        names = tuple(n for n in self.names if n in self.keys)
        self._enough(names, "keys")
        self.roster = Roster(names, {n: self.keys[n] for n in names}, self.threshold)
        return self.roster

    def add_shares(self, name: str, shares: Mapping[str, bytes]) -> None:
        r = self.roster
        if r is None or name not in r.names or name in self.shares:
            raise SecAggError("shares from a client outside the roster, or a second time")
        want = set(r.names) - {name}
        if set(shares) != want:
            raise SecAggError(f"shares for {sorted(shares)[:4]}, expected one for each of {sorted(want)[:4]}")
        bad = [v for v, ct in shares.items() if len(ct) != CIPHERTEXT_BYTES]
        if bad:
            raise SecAggError(f"a share for {bad[0]!r} of {len(shares[bad[0]])} bytes, expected {CIPHERTEXT_BYTES}")
        self.shares[name] = {v: bytes(ct) for v, ct in shares.items()}

    def close_shares(self) -> dict[str, dict[str, bytes]]:
        """What each client that sent its shares receives: the shares the others sent it."""
        senders = [n for n in self.roster.names if n in self.shares]
        self._enough(senders, "shares")
        return {v: {u: self.shares[u][v] for u in senders if u != v} for v in senders}

    def add_masked(self, name: str, vector: np.ndarray) -> None:
        if name not in self.shares or name in self.masked or self.survivors:
            raise SecAggError("a masked vector from a client whose shares did not come, or a second time")
        v = np.asarray(vector)
        if v.dtype != np.uint64 or v.shape != (self.length,):
            raise SecAggError(f"a masked vector of {v.dtype}{list(v.shape)[:4]}, expected uint64[{self.length}]")
        self.masked[name] = v

    def close_masked(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(survivors, dropped): who sent a masked vector, and who shared its keys but did not."""
        peers = [n for n in self.roster.names if n in self.shares]
        self.survivors = tuple(n for n in peers if n in self.masked)
        self._enough(self.survivors, "masked vectors")
        self.dropped = tuple(n for n in peers if n not in self.masked)
        return self.survivors, self.dropped

    def add_unmask(self, name: str, shares: Mapping[str, bytes]) -> None:
        if name not in self.survivors or name in self.unmasking:
            raise SecAggError("shares for unmasking from a client that is no survivor, or a second time")
        want = {f"b/{u}" for u in self.survivors} | {f"s/{u}" for u in self.dropped}
        if set(shares) != want:
            raise SecAggError(f"unmasking shares named {sorted(shares)[:4]}, expected {sorted(want)[:4]}")
        try:
            self.unmasking[name] = {k: share_to_bytes(share_from_bytes(bytes(v))) for k, v in shares.items()}
        except ShamirError as e:
            raise SecAggError(str(e)) from None

    def _secret(self, key: str) -> bytes:
        r = self.roster
        points = [(r.index(h) + 1, share_from_bytes(got[key])) for h, got in self.unmasking.items()]
        try:
            return reconstruct(points, self.threshold).to_bytes(KEY_BYTES, "big")
        except (ShamirError, OverflowError):
            raise SecAggError(f"the shares of {key} do not give a {KEY_BYTES}-byte secret back") from None

    def total(self) -> np.ndarray:
        """The sum (uint64, modulo 2^64) of the survivors' encoded vectors: their self masks and the
        dropped clients' pairwise masks removed with the shares (at least the threshold's)."""
        self._enough(list(self.unmasking), "shares for unmasking")
        r, total = self.roster, np.zeros(self.length, dtype=np.uint64)
        for u in self.survivors:
            seed = self._secret(f"b/{u}")
            if hashlib.sha256(seed).digest() != r.keys[u].commitment:
                raise SecAggError(f"the shares of {u}'s seed rebuild another seed (a survivor sent a wrong share)")
            total += self.masked[u]
            total -= mask_stream(seed, self.length, b"self|" + self.context)
        for d in self.dropped:
            private = X25519PrivateKey.from_private_bytes(self._secret(f"s/{d}"))
            if private.public_key().public_bytes_raw() != r.keys[d].s:
                raise SecAggError(f"the shares of {d}'s key rebuild another key (a survivor sent a wrong share)")
            for u in self.survivors:  # u added +mask towards a later client, -mask towards an earlier one
                m = mask_stream(_agree(private, r.keys[u].s), self.length, b"pair|" + self.context)
                if r.index(u) < r.index(d):
                    total -= m
                else:
                    total += m
        return total
