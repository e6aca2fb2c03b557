"""Secure aggregation of client updates (pure logic: no sockets, no files), in the manner of
SecAgg (Bonawitz et al., CCS 2017) with every pair of clients masking: the server (the federation)
learns the weighted sum of the surviving clients' vectors and nothing else of any one of them.

**Fixed point.** A client's values ``x`` (float64), times its weight ``w`` (its samples over the
round's, at most 1), become integers modulo 2^64 (:data:`MODULUS_BITS`):
``q = round(x * w * 2^32)`` (:data:`SCALE_BITS`), two's complement. Values beyond
:data:`MAX_ABS` (2^30) or not finite are refused (:func:`check_values`), so the sum of weighted
values (weights summing to at most 1) never wraps. Rounding costs each client at most 2^-33 per
value; the decoded weighted mean over ``n`` survivors whose weights sum to ``W`` is within
``n * 2^-33 / W + (n + 8) * 2^-52 * max|x|`` of the exact weighted mean of the same inputs
(:func:`error_bound`; the second term covers float64 arithmetic, of this computation and of a
float64 reference), before the cast to the entry's own dtype.

**Masks.** Each client ``u`` makes two X25519 key pairs per round (``c``: to encrypt the shares
it sends the others through the server; ``s``: to agree a mask with every other client) and a
32-byte self-mask seed ``b``. It sends ``y = q + PRG(b) + sum_v ±PRG(agree(s_u, s_v))`` (``+``
towards clients after it in the roster, ``-`` before): the pairwise masks cancel in the sum.
The PRG (:func:`splitlearn.core.securesum.keystream_parts`, shared with the secure sum) is HKDF-SHA256
(the agreed secret or the seed, with a label naming the purpose and the round) keying ChaCha20's keystream, read as little-endian uint64: a cryptographic stream cipher
(unlike numpy's Philox, a mask reveals nothing of its key), fast in OpenSSL and the same words
everywhere. The server adds the masked vectors' parts into one running sum as they come.

**Dropouts.** ``b`` and ``s_u``'s private key are Shamir-shared (:mod:`.shamir`, threshold ``t``)
among the round's clients, each share encrypted for its holder (ChaCha20-Poly1305 under a key
agreed with ``c``, one per direction). Once the masked vectors are in, each survivor sends the
shares of ``b`` of every survivor and of the private key ``s`` of every client that dropped, never
both for one client: the server removes the survivors' self masks and the dropped clients'
pairwise masks and is left with the sum. With fewer than ``t`` shares nothing is removed; with
more, a wrong share is found (another ``t`` of them rebuild a secret that fits its commitment) and
its sender named (:attr:`SecAggServer.misfits`).

**The threshold.** A client accepts ``t >= ceil(2n/3)`` of a roster of ``n`` (:func:`least_threshold`):
a server that tells some clients that ``u`` survived and others that it dropped, helped by ``c``
colluding clients, gets both of ``u``'s secrets only if ``2t <= n + c``, so ``c < n/3`` colluders
cannot. A client also answers a round whose update it already unmasked once (a rewind trains it
again, bit for bit) only for the survivors of that time (``bound``): two sums over different
survivors would give the difference away.

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

from ..core.securesum import keystream_parts
from .shamir import SHARE_BYTES, ShamirError, reconstruct_checked, share_from_bytes, share_to_bytes, split

__all__ = ["SCALE_BITS", "MODULUS_BITS", "MAX_ABS", "KEY_BYTES", "CIPHERTEXT_BYTES", "MAX_TRIES", "SecAggError",
           "Keys", "Roster", "SecAggClient", "SecAggServer", "check_values", "encode", "decode", "error_bound",
           "default_threshold", "least_threshold", "mask_stream", "seeded_bytes"]

SCALE_BITS = 32  # fixed point: a value is counted in units of 2^-32
MODULUS_BITS = 64  # integers modulo 2^64 (numpy's uint64 wraps alike)
MAX_ABS = 2.0 ** 30  # the largest magnitude encoded: 2^30 * 2^32 = 2^62 leaves the sum room
KEY_BYTES = 32  # an X25519 key, a self-mask seed, a SHA-256 commitment
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16  # two shares and the Poly1305 tag
MAX_TRIES = 64  # sets of t shares the server tries per secret before it gives the round up
_NONCE = bytes(12)  # every share key is used once (fresh keys every round, one key per direction)
_STREAM_WORDS = 1 << 20  # masks are drawn and added 8 MiB at a time


class SecAggError(ValueError):
    """A message of the protocol that cannot be used, or a round that cannot complete (the reason says which)."""


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A reproducible stream of bytes (ChaCha20 keyed by SHA-256 of ``seed``): tests only; production
    draws ``os.urandom``."""
    key = hashlib.sha256(f"splitlearn secagg test seed {seed}".encode()).digest()
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda n: enc.update(bytes(n))


def default_threshold(n: int) -> int:
    """Shares needed to unmask a round that draws ``n`` clients when the plan names none: ceil(2n/3),
    at least 2 (of one client the sum is its update)."""
    return max(2, math.ceil(2 * n / 3))


def least_threshold(n: int) -> int:
    """The smallest threshold a client accepts for a roster of ``n``: ceil(2n/3) and at least 2, so a
    server lying about who dropped needs ``n/3`` colluding clients or more to unmask one (module docstring)."""
    return default_threshold(n)


# -- fixed point ---------------------------------------------------------------------------------

def check_values(values: np.ndarray) -> None:
    """SecAggError unless every value is finite and at most :data:`MAX_ABS` in magnitude (what
    :func:`encode` carries)."""
    x = np.asarray(values).ravel()
    if not x.size:
        return
    if not np.isfinite(x).all():
        raise SecAggError(f"{int((~np.isfinite(x)).sum())} of its {x.size} values are not finite (NaN or infinite) "
                          "and cannot be encoded")
    big = float(np.abs(x).max())
    if big > MAX_ABS:
        raise SecAggError(f"a value of magnitude {big:.3g} is beyond the {MAX_ABS:.3g} fixed point can carry")


def encode(values: np.ndarray, weight: float) -> np.ndarray:
    """``values * weight`` in fixed point modulo 2^64 (uint64). Refuses what :func:`check_values`
    refuses and a weight outside [0, 1] (SecAggError)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not 0.0 <= weight <= 1.0:
        raise SecAggError(f"a weight of {weight!r}: it must lie in [0, 1] (samples over the round's samples)")
    check_values(x)
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
    out = np.zeros(length, dtype=np.uint64)
    _add_mask(out, secret, purpose)
    return out


def _add_mask(y: np.ndarray, secret: bytes, purpose: bytes, subtract: bool = False) -> None:
    """``y`` += (or -=) :func:`mask_stream` of its length, in place, a piece at a time (no second vector)."""
    for at, words in keystream_parts(secret, b"splitlearn secagg v1|" + purpose, y.size, _STREAM_WORDS):
        if subtract:
            y[at:at + words.size] -= words
        else:
            y[at:at + words.size] += words


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


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
    """What a client advertises: its two public keys, a SHA-256 commitment to its self-mask seed
    (so the server can tell a seed rebuilt from wrong shares) and, where the run has certificates,
    its certificate (DER), whose key signs the roster (:meth:`Roster.digest`)."""

    c: bytes  # encrypts the shares sent to it
    s: bytes  # agrees the pairwise masks
    commitment: bytes
    certificate: bytes = b""

    def check(self) -> None:
        for key in (self.c, self.s):
            _check_key(key)
        if len(self.commitment) != KEY_BYTES:
            raise SecAggError(f"a commitment of {len(self.commitment)} bytes, expected {KEY_BYTES}")

    def same(self, other: "Keys | None") -> bool:
        """Whether ``other`` holds the same keys and commitment (whatever certificate it carries)."""
        return other is not None and (other.c, other.s, other.commitment) == (self.c, self.s, self.commitment)


@dataclass(frozen=True)
class Roster:
    """The clients that advertised keys (their order gives each its share's x = position + 1 and
    the signs of the pairwise masks), their keys, and the threshold ``t``."""

    names: tuple[str, ...]
    keys: Mapping[str, Keys]
    threshold: int

    def index(self, name: str) -> int:
        return self.names.index(name)

    def digest(self, context: bytes, extra: bytes = b"") -> bytes:
        """SHA-256 of everything the roster says (and ``extra``) in the round ``context``: what each client
        signs with its certificate's key, vouching for its own keys in it and for this round."""
        parts = [b"splitlearn secagg roster v1", context, str(self.threshold).encode(), extra]
        for n in self.names:
            k = self.keys[n]
            parts += [n.encode(), k.c, k.s, k.commitment, k.certificate]
        return _sha(b"".join(len(p).to_bytes(4, "big") + p for p in parts))

    def among(self, names: Sequence[str]) -> "Roster":
        """The roster of ``names`` only (in this roster's order), with the same threshold."""
        keep = tuple(n for n in self.names if n in set(names))
        return Roster(keep, {n: self.keys[n] for n in keep}, self.threshold)


class SecAggClient:
    """One client's side of one round: :meth:`advertise`, :meth:`share`, :meth:`mask`,
    :meth:`unmask`, in that order. ``context`` names the round (it keys every derivation);
    ``required``: the threshold the plan asks for (None: :func:`default_threshold` of the roster);
    ``bound``: the survivors this client's update was unmasked with before (a round done again
    after a rewind), the only ones it answers for."""

    def __init__(self, name: str, context: bytes, required: int | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom, bound: Sequence[str] | None = None):
        self.name, self.context, self.required, self.random_bytes = name, context, required, random_bytes
        self.bound = None if bound is None else frozenset(bound)
        self._c = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._s = X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))
        self._seed = random_bytes(KEY_BYTES)
        self.keys = Keys(self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw(),
                         _sha(self._seed))
        self.roster: Roster | None = None
        self.peers: tuple[str, ...] = ()  # those whose masks it added (its shares came through)
        self._held: dict[str, tuple[int, int]] = {}  # client -> (share of its s key, share of its seed)
        self._answered = False

    def advertise(self) -> Keys:
        return self.keys

    def check_roster(self, roster: Roster) -> None:
        """SecAggError unless ``roster`` holds this client with its own keys, repeats nobody, carries usable
        keys, and a threshold this client accepts."""
        n, t = len(roster.names), roster.threshold
        if not self.keys.same(roster.keys.get(self.name)) or self.name not in roster.names:
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

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Encrypted shares of its s private key and seed for every other client of ``roster``
        (checked first: :meth:`check_roster`)."""
        self.check_roster(roster)
        n, t = len(roster.names), roster.threshold
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
        y = np.array(encoded, dtype=np.uint64).ravel()
        _add_mask(y, self._seed, b"self|" + self.context)
        me = r.index(self.name)
        for v in self.peers:
            if v != self.name:  # + towards a later client, - towards an earlier one
                _add_mask(y, _agree(self._s, r.keys[v].s), b"pair|" + self.context, subtract=me > r.index(v))
        return y

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """Its shares: of each survivor's seed (``b/NAME``) and each dropped client's s key (``s/NAME``);
        answered once per round, only if the two lists split its peers and hold it and enough survivors,
        and (``bound``) only for the survivors it answered for when this update was unmasked before."""
        if self._answered:
            raise SecAggError("a second request for shares in one round")
        if self.roster is None or not self.peers:
            raise SecAggError("a request for shares before the masked vector")
        s, d = set(survivors), set(dropped)
        if s & d or s | d != set(self.peers) or len(s) != len(survivors) or len(d) != len(dropped):
            raise SecAggError("the survivors and the dropped do not split the clients whose masks it added")
        if self.name not in s:
            raise SecAggError(f"a request that counts {self.name} itself as dropped")
        if len(s) < self.roster.threshold:
            raise SecAggError(f"{len(s)} survivors, fewer than the threshold {self.roster.threshold}")
        if self.bound is not None and s != self.bound:
            raise SecAggError(f"this update was unmasked before (a round done again) with the survivors "
                              f"{sorted(self.bound)[:8]}; asked now for {sorted(s)[:8]}: the difference of the two "
                              "sums would give updates away")
        self._answered = True
        out = {f"b/{u}": share_to_bytes(self._held[u][1]) for u in survivors}
        out.update({f"s/{u}": share_to_bytes(self._held[u][0]) for u in dropped})
        return out


class SecAggServer:
    """The server's side of one round over ``names`` (the clients asked), vectors of ``length``
    words, threshold ``threshold``. Each ``add_*`` takes one client's message (SecAggError: it is
    unusable, and the client counts as dropped); each step after it closes a phase (SecAggError:
    fewer than the threshold are left). The masked vectors go into one running sum as their parts
    come (``received``: words so far per client); ``misfits``: survivors whose unmasking shares did
    not fit the others' (named, and left out of the reconstruction)."""

    def __init__(self, names: Sequence[str], threshold: int, length: int, context: bytes):
        if not 2 <= threshold <= len(names):
            raise SecAggError(f"a threshold of {threshold} for {len(names)} clients (2 to the clients)")
        self.names, self.threshold, self.length, self.context = tuple(names), threshold, length, context
        self.keys: dict[str, Keys] = {}
        self.shares: dict[str, dict[str, bytes]] = {}
        self.sum = np.zeros(length, dtype=np.uint64)
        self.received: dict[str, int] = {}
        self.unmasking: dict[str, dict[str, bytes]] = {}
        self.misfits: dict[str, str] = {}
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

    def close_keys(self, among: Sequence[str] | None = None) -> Roster:
        """The roster of those that advertised keys (``among``: of these only), for every one of them."""
        names = tuple(n for n in self.names if n in self.keys and (among is None or n in among))
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

    def add_masked(self, name: str, words: np.ndarray, offset: int = 0) -> None:
        """Words ``offset`` ... of ``name``'s masked vector (its parts in order), added to the sum at once."""
        got = self.received.get(name, 0)
        if name not in self.shares or self.survivors or got >= self.length:
            raise SecAggError("a masked vector from a client whose shares did not come, or a second time")
        v = np.asarray(words)
        if v.dtype != np.uint64 or v.ndim != 1 or offset != got or not 0 < v.size <= self.length - got:
            raise SecAggError(f"a masked vector of {v.dtype}{list(v.shape)[:4]}, expected uint64[{self.length - got}] "
                              f"or a first part of it, from word {got} (not {offset})")
        self.sum[got:got + v.size] += v
        self.received[name] = got + v.size

    def close_masked(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(survivors, dropped): who sent its whole masked vector, and who shared its keys but sent none.
        SecAggError naming a client that sent part of it only (those parts are in the sum for good)."""
        peers = [n for n in self.roster.names if n in self.shares]
        partial = [n for n in peers if 0 < self.received.get(n, 0) < self.length]
        if partial:
            raise SecAggError(f"{partial[0]} sent {self.received[partial[0]]} of the {self.length} words of its masked "
                              "vector; the words summed already cannot be taken out again")
        self.survivors = tuple(n for n in peers if self.received.get(n, 0) == self.length)
        self._enough(self.survivors, "masked vectors")
        self.dropped = tuple(n for n in peers if n not in self.survivors)
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

    def _secret(self, key: str, what: str, fits: Callable[[bytes], bool]) -> bytes:
        """The secret of the shares named ``key`` that ``fits`` (its commitment or public key), known
        misfits' shares tried last; a holder whose share is found wrong is named in :attr:`misfits`."""
        r = self.roster
        holders = sorted(self.unmasking, key=lambda h: (h in self.misfits, r.index(h)))
        points = [(r.index(h) + 1, share_from_bytes(self.unmasking[h][key])) for h in holders]

        def check(secret: int) -> bool:
            return secret < 1 << 8 * KEY_BYTES and fits(secret.to_bytes(KEY_BYTES, "big"))

        try:
            secret, wrong = reconstruct_checked(points, self.threshold, check, MAX_TRIES)
        except ShamirError as e:
            raise SecAggError(f"the shares of {what}: {e}") from None
        for i in wrong:
            self.misfits[holders[i]] = f"its share of {what} does not fit the other survivors' shares"
        return secret.to_bytes(KEY_BYTES, "big")

    def total(self) -> np.ndarray:
        """The sum (uint64, modulo 2^64) of the survivors' encoded vectors: their self masks and the
        dropped clients' pairwise masks removed with the shares (at least the threshold's)."""
        self._enough(list(self.unmasking), "shares for unmasking")
        r, total = self.roster, self.sum.copy()
        for u in self.survivors:
            seed = self._secret(f"b/{u}", f"{u}'s seed", lambda b, k=r.keys[u]: _sha(b) == k.commitment)
            _add_mask(total, seed, b"self|" + self.context, subtract=True)
        for d in self.dropped:
            raw = self._secret(f"s/{d}", f"{d}'s mask key", lambda b, k=r.keys[d]: _public(b) == k.s)
            private = X25519PrivateKey.from_private_bytes(raw)
            for u in self.survivors:  # u added +mask towards a later client, -mask towards an earlier one
                _add_mask(total, _agree(private, r.keys[u].s), b"pair|" + self.context,
                          subtract=r.index(u) < r.index(d))
        return total
