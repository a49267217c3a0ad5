"""Compiled loops for the parameter server's bf16 and top-k delta codecs, and for the
sample-weighted mean a worker's tasks push as one (``combine_pushes``).

Every push of a compressed delta is encoded on the worker that sends it. In NumPy the bf16
encoder takes four passes and three temporaries (~0.7 ms per million entries here) and the
top-k one an ``argpartition`` of the magnitudes and a sort of the chosen indices (12-30 ms per
million entries at 1%: as much as a third of a CPU worker's 8-step round, and many times a GPU
worker's). These ``@njit(nogil=True)`` loops do the same in one pass (bf16) and in three over
the vector (top-k). (int8's NumPy encoder, ~1.3 ms per million, is left as it is: a scalar
loop was not faster without letting the compiler reorder float operations.)

Their specification is the NumPy code they replace (:mod:`pipeline.ps.wire` says what each
codec sends), and the tests hold them to it bit for bit:

* **bf16**: the top 16 bits of each float32, rounded to nearest even
  (``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``, in uint32 arithmetic), and back by a shift.
* **top-k**: the ``k`` entries of largest magnitude, their indices in increasing order. Where
  entries of equal magnitude straddle the cut, the lowest indices are taken (NumPy's
  ``argpartition`` leaves that choice unspecified, so there the two may pick different
  entries: the same magnitudes, at other indices; for the exact zeros of inactive units, the
  usual tie, the decoded vector is the same). The selection is a radix select on the float32
  bit patterns of ``|x|``, which order as the magnitudes do: a histogram of the top 11 bits
  over every entry finds the bucket holding the k-th largest, the next 11 and the last 10 bits
  are resolved among that bucket's entries, and one pass in index order writes the chosen
  indices, already sorted.

* **weighted sum** (:func:`weighted_sum`): ``sum_j shares[j] * deltas[j]`` in one pass over the
  ``k`` inputs, each product rounded to float32 and added in order, as NumPy's ``multiply`` then
  ``+=`` per delta do (no fused multiply-add: ``fastmath`` is off): bit for bit the server's
  weighted mean (:func:`pipeline.fedagg.aggregate`) of the same deltas. NumPy takes two passes
  and a temporary per delta (7.8 ms for 8 deltas of 1e6 entries here, one thread).

* **the server's round** (:func:`weighted_mean_into`, :func:`sgd_step`): the weighted mean of a
  sync round's deltas, one pass per delta (the same compiled signatures whatever the number of
  deltas: one for writable deltas, one for read-only ones, both loaded when a job is created,
  :func:`pipeline.ps.wire.warm_server_loops`), and the server's SGD step with its
  weights' moving average (``ema``) in one pass: NumPy takes two passes per delta and five for
  the step (1.4 ms a round for the 535,818 weights of a 784-512-256-10 MLP here, in the
  scheduler's event loop while every worker waits for the reply). Bit for bit the NumPy code
  they replace (:func:`weighted_sum_reference`, :func:`sgd_step_reference`).

A NaN is not finite: a delta holding one fails the job on the server whatever was selected
(its bits sort above infinity here). The module loads numba on first use
(:mod:`pipeline.ps.wire` imports it with the first bf16 or top-k vector); the compiled loops
are cached beside it.

Dimension legend: N entries, K kept entries, C entries in the k-th largest's first-digit bucket.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


@njit(**_JIT)
def _bf16_bits(bits: np.ndarray, out: np.ndarray) -> None:
    # bits: (N,) uint32 of float32; out: (N,) uint16
    for i in range(bits.shape[0]):
        b = np.uint32(bits[i])
        out[i] = np.uint16((b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@njit(**_JIT)
def _bf16_widen(top: np.ndarray, out: np.ndarray) -> None:
    # top: (N,) uint16; out: (N,) uint32 bits of float32
    for i in range(top.shape[0]):
        out[i] = np.uint32(top[i]) << np.uint32(16)


@njit(**_JIT)
def _topk_select(x: np.ndarray, bits: np.ndarray, k: int, index: np.ndarray, values: np.ndarray) -> None:
    # x: (N,) float32, bits: (N,) its uint32 view; index: (K,) int32, increasing; values: (K,) = x[index]
    n = x.shape[0]
    low = np.uint32(0x7FFFFFFF)  # |x| as bits (the sign cleared): ordered as |x| is
    # radix select of the k-th largest pattern, 11 + 11 + 10 bits from the top: the first
    # digit over every entry, the other two over the entries of the first digit's bucket
    counts = np.zeros(1 << 11, np.int64)
    for i in range(n):
        counts[(bits[i] & low) >> np.uint32(21)] += 1
    need = k  # how many of the largest entries with the digits fixed so far are still to place
    d = (1 << 11) - 1
    while d > 0 and counts[d] < need:
        need -= counts[d]
        d -= 1
    prefix = np.uint32(d) << np.uint32(21)
    cand = np.empty(counts[d], np.uint32)
    j = 0
    for i in range(n):
        m = bits[i] & low
        if (m >> np.uint32(21)) == np.uint32(d):
            cand[j] = m
            j += 1
    for shift, width in ((10, 11), (0, 10)):
        counts = np.zeros(1 << width, np.int64)
        mask = np.uint32((1 << width) - 1)
        high = ~np.uint32((1 << (shift + width)) - 1)  # the digits already fixed
        for m in cand:
            if (m & high) == prefix:
                counts[(m >> np.uint32(shift)) & mask] += 1
        d = (1 << width) - 1
        while d > 0 and counts[d] < need:
            need -= counts[d]
            d -= 1
        prefix |= np.uint32(d) << np.uint32(shift)
    # prefix is the k-th largest pattern: every entry above it is kept, and the first ``need``
    # entries equal to it in index order
    j = 0
    for i in range(n):
        m = bits[i] & low
        if m > prefix or (m == prefix and need > 0):
            if m == prefix:
                need -= 1
            index[j] = i
            values[j] = x[i]
            j += 1


@njit(**_JIT)
def _weighted_sum(deltas, shares, out):
    # deltas: k-tuple of (N,) float32; shares: (k,) float32; out: (N,) float32
    for i in range(out.shape[0]):
        acc = deltas[0][i] * shares[0]
        for j in range(1, len(deltas)):
            acc = acc + deltas[j][i] * shares[j]
        out[i] = acc


@njit(**_JIT)
def _scaled_add(out, delta, share, first):
    # out, delta: (N,) float32; share: float32. first: out = delta * share; else out += delta * share
    if first:
        for i in range(out.shape[0]):
            out[i] = delta[i] * share
    else:
        for i in range(out.shape[0]):
            out[i] = out[i] + delta[i] * share


@njit(**_JIT)
def _sgd_step(params, grad, lr, average, keep, mode):
    # params, grad, average: (N,) float32; lr, keep: float32. mode 0: no average; 1: the
    # average's first update (it becomes the weights); 2: average += (params - average) * keep
    for i in range(params.shape[0]):
        p = params[i] - grad[i] * lr
        params[i] = p
        if mode == 1:
            average[i] = average[i] + (p - average[i])
        elif mode == 2:
            average[i] = average[i] + (p - average[i]) * keep


def weighted_mean_into(
    deltas: list[np.ndarray] | tuple[np.ndarray, ...], shares: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """``sum_j shares[j] * deltas[j]`` into ``out`` (float32 vectors of one length, contiguous;
    ``shares`` float32), a pass per delta; bit for bit :func:`weighted_sum_reference`."""
    shares = np.asarray(shares, dtype=np.float32).reshape(-1)
    if not len(deltas) or len(deltas) != shares.size:
        raise ValueError(f"weighted_mean_into needs k >= 1 vectors and k shares, got {len(deltas)} and {shares.size}")
    if any(d.shape != out.shape for d in deltas):
        shapes = sorted({d.shape for d in deltas})
        raise ValueError(f"weighted_mean_into: every delta must have out's shape {out.shape}, got {shapes}")
    for j, d in enumerate(deltas):
        _scaled_add(out, np.ascontiguousarray(d, dtype=np.float32), shares[j], j == 0)
    return out


def sgd_step(params: np.ndarray, grad: np.ndarray, lr: float, average: np.ndarray | None, keep: float | None) -> None:
    """In place: ``params -= grad * lr``, then, with ``average``, ``average += (params -
    average) * keep`` (``keep`` None: ``average += params - average``, its first update), all in
    float32 and one pass; bit for bit :func:`sgd_step_reference`. Contiguous float32 vectors."""
    if average is None:
        _sgd_step(params, grad, np.float32(lr), params, np.float32(0), 0)
    else:
        _sgd_step(
            params, grad, np.float32(lr), average, np.float32(0 if keep is None else keep), 1 if keep is None else 2
        )


def sgd_step_reference(
    params: np.ndarray, grad: np.ndarray, lr: float, average: np.ndarray | None, keep: float | None
) -> None:
    """:func:`sgd_step` in NumPy, operation by operation as the server's optimizer took it."""
    tmp = np.multiply(grad, np.float32(lr))
    params -= tmp
    if average is not None:
        np.subtract(params, average, out=tmp)
        if keep is not None:
            tmp *= np.float32(keep)
        average += tmp


def weighted_sum(
    deltas: tuple[np.ndarray, ...] | list[np.ndarray], shares: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``sum_j shares[j] * deltas[j]`` (float32 vectors of one length, ``shares`` float32, in
    order) into ``out`` (a new vector when None); bit for bit :func:`weighted_sum_reference`."""
    parts = tuple(np.ascontiguousarray(d, dtype=np.float32).reshape(-1) for d in deltas)
    shares = np.ascontiguousarray(shares, dtype=np.float32).reshape(-1)
    if not parts or len(parts) != shares.size or any(d.size != parts[0].size for d in parts):
        raise ValueError(
            f"weighted_sum needs k >= 1 vectors of one length and k shares, got {len(parts)} and {shares.size}"
        )
    if out is None:
        out = np.empty(parts[0].size, np.float32)
    _weighted_sum(parts, shares, out)
    return out


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """The bf16 halves (uint16) of a float32 vector ``x``, rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.size, np.uint16)
    _bf16_bits(x.view(np.uint32), out)
    return out


def bf16_decode(top: np.ndarray) -> np.ndarray:
    """The float32 vector of bf16 halves ``top`` (uint16): a new array."""
    top = np.ascontiguousarray(top, dtype=np.uint16).reshape(-1)
    out = np.empty(top.size, np.uint32)
    _bf16_widen(top, out)
    return out.view(np.float32)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, values)``: the ``k`` (1 to N) entries of ``x`` of largest magnitude, indices
    increasing (int32), ``values = x[index]``; ties at the cut go to the lowest indices."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if not 1 <= k <= x.size:
        raise ValueError(f"k must be in [1, {x.size}], got {k}")
    index = np.empty(k, np.int32)
    values = np.empty(k, np.float32)
    _topk_select(x, x.view(np.uint32), int(k), index, values)
    return index, values


# -- the specification: the NumPy expressions the loops replace ----------------------------------


def bf16_encode_reference(x: np.ndarray) -> np.ndarray:
    """:func:`bf16_encode` in NumPy (four passes): what the tests and ``bench.ps_compression`` compare with."""
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    return ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)


def topk_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` in NumPy (``argpartition`` and a sort; which of equal magnitudes at the cut
    it takes is unspecified): what the tests and ``bench.ps_compression`` compare with."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    index = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype(np.int32)
    return index, x[index]


def weighted_sum_reference(deltas: tuple[np.ndarray, ...] | list[np.ndarray], shares: np.ndarray) -> np.ndarray:
    """:func:`weighted_sum` in NumPy (a multiply and an add per delta, as
    :func:`pipeline.fedagg.aggregate`'s weighted mean): what the tests compare with."""
    out = np.multiply(deltas[0], np.float32(shares[0]))
    for d, w in zip(deltas[1:], shares[1:], strict=True):
        out += np.multiply(d, np.float32(w))
    return out
