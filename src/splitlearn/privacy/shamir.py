"""Shamir secret sharing over the prime field of :data:`PRIME` (pure logic).

A secret (an integer below the prime: a 32-byte key fits) is the constant term of a random
polynomial of degree ``threshold - 1``; share ``x`` is the polynomial's value at ``x`` (1, 2, ...).
Any ``threshold`` shares give the secret back by Lagrange interpolation at 0; fewer say nothing
about it (every secret is equally likely given them). The coefficients come from ``random_bytes``
(``os.urandom`` in production; a seeded stream in tests, :func:`~splitlearn.privacy.secagg.seeded_bytes`).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Sequence

__all__ = ["PRIME", "SHARE_BYTES", "ShamirError", "split", "reconstruct", "interpolate", "reconstruct_checked",
           "share_to_bytes", "share_from_bytes"]

PRIME = (1 << 521) - 1  # the Mersenne prime 2^521 - 1: any 256-bit secret is a field element
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one share's value, big-endian


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, repeated or out of the field)."""


def _random_element(random_bytes: Callable[[int], bytes]) -> int:
    return int.from_bytes(random_bytes(SHARE_BYTES + 16), "big") % PRIME  # 128 extra bits: bias below 2^-128


def split(secret: int, n: int, threshold: int,
          random_bytes: Callable[[int], bytes] = os.urandom) -> list[tuple[int, int]]:
    """``n`` shares ``(x, y)`` of ``secret`` at x = 1 ... n, any ``threshold`` of which give it back."""
    if not 0 <= secret < PRIME:
        raise ShamirError(f"a secret must lie in [0, 2^521 - 1), got one of {secret.bit_length()} bits")
    if not 1 <= threshold <= n:
        raise ShamirError(f"threshold {threshold} for {n} shares: it must be between 1 and the shares")
    coeffs = [secret] + [_random_element(random_bytes) for _ in range(threshold - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def reconstruct(shares: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret of ``shares`` (the first ``threshold`` of them), by Lagrange interpolation at 0;
    a :class:`ShamirError` if there are fewer, or their ``x`` repeat or lie outside the field."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed to give the secret back")
    return interpolate(list(shares)[:threshold], 0)


def interpolate(shares: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial of degree ``len(shares) - 1`` through ``shares`` (at 0: the
    secret; at another share's x: what that share must be if it fits the same polynomial)."""
    xs = [xi for xi, _ in shares]
    if len(set(xs)) < len(xs) or any(not 0 < xi < PRIME or not 0 <= y < PRIME for xi, y in shares):
        raise ShamirError("shares repeat an x or lie outside the field")
    value = 0
    for j, (xj, yj) in enumerate(shares):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (xm - x) % PRIME
                den = den * (xm - xj) % PRIME
        value = (value + yj * num * pow(den, -1, PRIME)) % PRIME
    return value


def reconstruct_checked(shares: Sequence[tuple[int, int]], threshold: int, fits: Callable[[int], bool],
                        max_tries: int = 64) -> tuple[int, list[int]]:
    """The secret of ``shares`` that ``fits`` (a commitment, a public key), and the positions of the
    shares found wrong: the first ``threshold`` shares, else sets that leave out one share, then two,
    ... (at most ``max_tries`` sets). A share is found wrong when it lies off the polynomial of the set
    that fits and was in a set that did not. ShamirError when no set tried fits."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed to give the secret back")
    tried: set[tuple[int, ...]] = set()
    doubted: set[int] = set()
    for k in range(len(shares) - threshold + 1):
        for out in itertools.combinations(range(len(shares)), k):
            use = tuple(i for i in range(len(shares)) if i not in out)[:threshold]
            if use in tried:
                continue
            if len(tried) >= max_tries:
                break
            tried.add(use)
            points = [shares[i] for i in use]
            secret = interpolate(points, 0)
            if fits(secret):
                wrong = [i for i in sorted(doubted - set(use)) if interpolate(points, shares[i][0]) != shares[i][1]]
                return secret, wrong
            doubted.update(use)
    raise ShamirError(f"no {threshold} of the {len(shares)} shares give it back ({len(tried)} sets tried): more "
                      f"than {len(shares) - threshold} of them are wrong (or the tries ran out)")


def share_to_bytes(y: int) -> bytes:
    """A share's value as :data:`SHARE_BYTES` big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """A share's value from its bytes (exactly :data:`SHARE_BYTES`, below the prime), else a :class:`ShamirError`."""
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"a share of {len(data)} bytes, expected {SHARE_BYTES}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ShamirError("a share outside the field")
    return y
