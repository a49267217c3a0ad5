"""Secure aggregation: pairwise masks that cancel in the sum, so the server only learns the sum.

Each round every participant makes a fresh X25519 key pair and sends only its public key to
the parameter server, which relays the round's public keys (the roster) to every participant
once all of them have sent theirs. Participants ``i`` and ``j`` agree on a shared secret
(X25519), derive a 32-byte seed from it with HKDF-SHA256 (bound to the job, the round and
its attempt) and expand the seed into a mask vector with a Philox generator: both hold the
same ``PRG(seed_ij)``, nobody else can compute it.

Participant ``i`` sends ``quantize(delta_i) + sum_{j != i} s_ij PRG(seed_ij)  (mod 2**32)``
with ``s_ij = +1`` if ``i`` sorts before ``j``, else ``-1``: each pair's masks appear once
with each sign, so they cancel exactly in the sum of all the roster's vectors, which is the
sum of the quantized deltas. Every masked vector on its own (and every partial sum short of
the whole roster) is uniformly distributed in Z_(2**32)^n to whoever lacks the seeds.

Quantization makes the cancellation exact: the delta is clipped to L2 norm ``clip`` (so every
coordinate lies in [-clip, clip]) and rounded to the integers ``rint(x * scale)``, stored
modulo 2**32. :func:`scale_for` chooses ``scale`` so that the sum of ``n`` such integers,
at most ``n (clip x scale + 1/2)`` in absolute value, stays below 2**31: read as a signed
32-bit integer the sum modulo 2**32 is the true sum, and :func:`dequantize` divides it by
``scale``. The rounding error is at most ``1 / (2 scale)`` per coordinate and participant.

A participant that disappears before every masked vector of the round has arrived leaves its
pairwise masks uncancelled. The parameter server then discards the round's partial sum and
redoes the round with the survivors: they exchange fresh keys (a new attempt, so new seeds)
and send their same deltas masked for the smaller roster (see docs/privacy.md for why this
and not SecAgg's secret-shared seeds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MODULUS_BITS = 32
KEY_BYTES = 32  # an X25519 public key, raw


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 private key and its raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def round_info(job: str, version: int, attempt: int, roster: list[str]) -> bytes:
    """What a round's seeds are bound to: the job, the round, its attempt and its roster."""
    digest = hashlib.sha256("\0".join(roster).encode()).hexdigest()
    return f"pipeline-secagg/{job}/{version}/{attempt}/{digest}".encode()


def pair_seed(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """The 32-byte seed a participant shares with one peer (X25519, then HKDF-SHA256)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint32 from ``seed`` (Philox keyed by the seed's first 16 bytes,
    counter from the rest): the same seed gives the same vector on every machine."""
    key = int.from_bytes(seed[:16], "little")
    counter = int.from_bytes(seed[16:32], "little")
    gen = np.random.Generator(np.random.Philox(key=key, counter=counter))
    return gen.integers(0, 1 << MODULUS_BITS, size=n, dtype=np.uint32)


def scale_for(n: int, clip: float) -> float:
    """The fixed-point scale for ``n`` participants whose coordinates lie in [-clip, clip]:
    ``n (clip x scale + 1/2) <= 2**31 - 1``, so their sum never wraps around 32 bits."""
    if n < 1 or clip <= 0:
        raise ValueError(f"secure aggregation needs n >= 1 and clip > 0, got n={n}, clip={clip}")
    return ((2 ** (MODULUS_BITS - 1) - 1) / n - 0.5) / clip


def quantize(delta: np.ndarray, scale: float) -> np.ndarray:
    """``rint(delta x scale)`` as uint32 modulo 2**32 (two's complement for negatives)."""
    return np.rint(delta.astype(np.float64) * scale).astype(np.int64).astype(np.uint32)


def roster_share(name: str, roster: Mapping[str, object], weights: Mapping[str, int] | None) -> float:
    """The factor participant ``name`` multiplies its clipped delta by before quantizing, so
    that the server's equal-weight mean of the roster's sum (the sum divided by the roster's
    size) is the mean weighted by ``weights`` (name -> sample count) over the roster:
    ``n x w_name / sum of the roster's w``. The factors of a roster sum to ``n``, so the sum's
    coordinates stay within ``n x clip`` and the fixed-point range of :func:`scale_for` holds.
    1.0 (equal weights) without ``weights`` or when one member's weight is unknown."""
    if not weights or any(m not in weights for m in roster):
        return 1.0
    total = sum(max(0, int(weights[m])) for m in roster)
    if total <= 0:
        return 1.0
    return len(roster) * max(0, int(weights[name])) / total


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """The float32 sum from a uint32 sum of quantized vectors (read as signed 32-bit)."""
    return (total.view(np.int32).astype(np.float64) / scale).astype(np.float32)


def mask(
    quantized: np.ndarray,
    name: str,
    private: X25519PrivateKey,
    roster: Mapping[str, bytes],
    info: bytes,
) -> np.ndarray:
    """``quantized`` plus participant ``name``'s pairwise masks with every other member of
    ``roster`` (name -> public key), ``+`` towards peers that sort after ``name``, ``-``
    towards those before (mod 2**32): a new uint32 vector."""
    out = quantized.astype(np.uint32, copy=True)
    for peer in sorted(roster):
        if peer == name:
            continue
        m = prg(pair_seed(private, roster[peer], info), out.size)
        if name < peer:
            out += m  # uint32 arithmetic wraps: addition modulo 2**32
        else:
            out -= m
    return out
