"""How the parameter server combines a round's deltas: weighted mean and robust aggregators.

Plain NumPy over flat float32 vectors, no state (the parameter server's :class:`pipeline.ps.job.Job`
calls :func:`aggregate` once a round):

- ``mean``: the mean weighted by ``weights`` (each client's samples; equal weights when they sum
  to 0), summed in the order given, each delta times its float32 weight (the parameter server's
  arithmetic since before the robust aggregators, bit for bit);
- ``median``: the coordinate-wise median (unweighted, FedMedian);
- ``trimmed_mean``: per coordinate, the ``floor(trim_fraction * n)`` largest and as many smallest
  values are cut and the rest averaged (unweighted);
- ``krum`` (Blanchard et al. 2017): each delta's score is the sum of its squared distances to its
  ``n - krum_f - 2`` nearest other deltas (at least 1), and the delta with the smallest score is
  the result; ``krum_m > 1`` (multi-Krum) takes the weighted mean of the ``krum_m`` best-scored.

The coordinate-wise aggregators work on blocks of coordinates (``BLOCK`` at a time), so their
scratch memory is ``n_deltas x BLOCK`` values beyond the deltas themselves; Krum needs the
``n x n`` Gram matrix, accumulated in float64 block by block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.errors import PSError

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
BLOCK = 1 << 16  # coordinates per block of the coordinate-wise aggregators


def check(method: str, trim_fraction: float = 0.1, krum_f: int = 1, krum_m: int = 1) -> None:
    """Raise :class:`PSError` naming the first argument :func:`aggregate` cannot use."""
    if method not in AGGREGATORS:
        raise PSError(f"unknown aggregator {method!r}; use one of {', '.join(AGGREGATORS)}")
    if not (isinstance(trim_fraction, (int, float)) and 0 <= trim_fraction < 0.5):
        raise PSError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    for key, value, low in (("krum_f", krum_f, 0), ("krum_m", krum_m, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise PSError(f"{key} must be an int >= {low}, got {value!r}")


def aggregate(
    deltas: Sequence[np.ndarray],
    weights: np.ndarray | Sequence[float],
    method: str,
    *,
    trim_fraction: float = 0.1,
    krum_f: int = 1,
    krum_m: int = 1,
    out: np.ndarray | None = None,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """Combine ``deltas`` (equal-length float32 vectors) with ``method`` (module docstring) into
    ``out`` (a new vector when None) and return it. ``weights``: one per delta (samples).
    ``work``: a scratch vector of the same length for the NumPy path of ``mean`` (vectors that are not
    contiguous float32; allocated when None)."""
    check(method, trim_fraction, krum_f, krum_m)
    n = len(deltas)
    if n == 0:
        raise PSError("aggregate needs at least one delta")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n or not np.isfinite(w).all() or (w < 0).any():
        raise PSError(f"aggregate needs {n} finite weights >= 0, got {len(w)}")
    size = deltas[0].shape
    if any(d.shape != size for d in deltas):
        raise PSError("aggregate: the deltas differ in length")
    if out is None:
        out = np.empty(size, np.float32)
    if method == "mean":
        return _mean(deltas, w, out, work)
    if method == "krum":
        chosen = krum_select(deltas, krum_f, krum_m)
        if len(chosen) == 1:
            np.copyto(out, deltas[chosen[0]])
            return out
        return _mean([deltas[i] for i in chosen], w[chosen], out, work)
    k = math.floor(trim_fraction * n) if method == "trimmed_mean" else 0
    for a in range(0, size[0], BLOCK):
        b = min(size[0], a + BLOCK)
        block = np.stack([d[a:b] for d in deltas])
        if method == "median":
            np.median(block, axis=0, out=out[a:b])
        else:
            block.sort(axis=0)
            np.mean(block[k : n - k], axis=0, out=out[a:b])
    return out


def _mean(deltas: Sequence[np.ndarray], w: np.ndarray, out: np.ndarray, work: np.ndarray | None) -> np.ndarray:
    """The weighted mean: each delta times its float32 weight, summed in order (a compiled
    pass per delta, :func:`kernels.codec.weighted_mean_into`, for contiguous float32 vectors;
    NumPy's multiply and add, the same float32 operations, otherwise)."""
    total = float(w.sum())
    shares = np.array([float(w[i]) / total if total else 1 / len(deltas) for i in range(len(deltas))], np.float32)
    if out.dtype == np.float32 and out.flags.c_contiguous and all(d.dtype == np.float32 for d in deltas):
        from kernels.codec import weighted_mean_into  # numba: loaded off the event loop by the server

        return weighted_mean_into(list(deltas), shares, out)
    tmp = work if work is not None else np.empty_like(out)
    for i, d in enumerate(deltas):
        np.multiply(d, shares[i], out=out if i == 0 else tmp)
        if i:
            out += tmp
    return out


def krum_scores(deltas: Sequence[np.ndarray], krum_f: int) -> np.ndarray:
    """Each delta's Krum score: the sum of its squared distances to its ``n - krum_f - 2``
    nearest other deltas (at least one; 0 for a lone delta)."""
    n = len(deltas)
    if n == 1:
        return np.zeros(1)
    gram = np.zeros((n, n), np.float64)
    for a in range(0, deltas[0].shape[0], BLOCK):
        block = np.stack([d[a : a + BLOCK] for d in deltas]).astype(np.float64)
        gram += block @ block.T
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    closest = max(1, n - int(krum_f) - 2)
    return np.sort(dist, axis=1)[:, :closest].sum(axis=1)


def krum_select(deltas: Sequence[np.ndarray], krum_f: int, krum_m: int = 1) -> list[int]:
    """Indices of the ``krum_m`` deltas with the smallest Krum scores, best first (ties: the
    earlier delta)."""
    scores = krum_scores(deltas, krum_f)
    return [int(i) for i in np.argsort(scores, kind="stable")[: min(int(krum_m), len(deltas))]]
