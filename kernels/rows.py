"""Batch assembly for the data loader: gather rows, convert to float32 and standardize in one pass.

The loader keeps rows in the store's compact dtype (uint8 pixels stay uint8) and converts per
batch. In NumPy that is a fancy-index gather, a dtype conversion and two in-place passes for the
standardization, each a temporary or a sweep over the batch, all holding the GIL; on a 2-core
machine where every core also runs a training thread those passes cost a training step ~2 ms per
batch. Here one ``@njit(nogil=True)`` loop reads each selected row once and writes the float32
row once.

Dimension legend:
    P  rows the pool (or chunk) can hold
    B  batch size
    F  features per row
    K  target columns (1 for class labels and single regression targets)

Each function has a plain-NumPy specification below (``*_reference``, the loader's former code
path) and the tests check the two agree bit for bit: the arithmetic is the same float32
``(x - mean) * inv_std``, without fused multiply-adds. CPU only: batches are assembled on the
host whatever backend trains on them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


@njit(**_JIT)
def _take(out_x, out_y, pool_x, pool_y, rows, mean, inv_std):
    # out_x: (B, F) float32; out_y: (B, K); pool_x: (P, F); pool_y: (P, K); rows: (B,) int64
    n_feat = pool_x.shape[1]
    for k in range(rows.shape[0]):
        r = rows[k]
        for j in range(n_feat):
            out_x[k, j] = (np.float32(pool_x[r, j]) - mean[j]) * inv_std[j]
        for j in range(pool_y.shape[1]):
            out_y[k, j] = pool_y[r, j]


@njit(**_JIT)
def _fill_holes(pool_x, pool_y, n, sel):
    # pool_x: (P, F); pool_y: (P, K); sel: (B,) int64, sorted, distinct, < n.
    # The pool's live rows are [0, n); after the draw they are [0, n - B): every selected row
    # below the cut n - B (a hole) takes the next unselected row of the tail [n - B, n), in order.
    bs = sel.shape[0]
    cut = n - bs
    taken = np.zeros(bs, np.bool_)
    for k in range(bs):
        if sel[k] >= cut:
            taken[sel[k] - cut] = True
    m = 0
    for k in range(bs):
        h = sel[k]
        if h >= cut:
            break
        while taken[m]:
            m += 1
        src = cut + m
        m += 1
        for j in range(pool_x.shape[1]):
            pool_x[h, j] = pool_x[src, j]
        for j in range(pool_y.shape[1]):
            pool_y[h, j] = pool_y[src, j]


def _as_2d(y: np.ndarray) -> np.ndarray:
    return y.reshape(len(y), -1)


def take_rows(
    x: np.ndarray,  # (P, F) any real dtype
    y: np.ndarray,  # (P,) or (P, K)
    rows: np.ndarray,  # (B,) row indices into x and y
    mean: np.ndarray,  # (F,) float32
    inv_std: np.ndarray,  # (F,) float32
    y_dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray]:
    """``((x[rows] - mean) * inv_std`` as float32 (B, F), ``y[rows]`` as ``y_dtype``): new arrays."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_x = np.empty((len(rows), x.shape[1]), np.float32)
    out_y = np.empty((len(rows), *y.shape[1:]), y_dtype)
    _take(out_x, _as_2d(out_y), x, _as_2d(y), rows, mean, inv_std)
    return out_x, out_y


def draw_rows(
    pool_x: np.ndarray,  # (P, F) any real dtype; rows [0, n) are live
    pool_y: np.ndarray,  # (P,) or (P, K)
    n: int,
    sel: np.ndarray,  # (B,) sorted distinct row indices < n
    mean: np.ndarray,  # (F,) float32
    inv_std: np.ndarray,  # (F,) float32
    y_dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray]:
    """Take rows ``sel`` out of a shuffle pool: return them as :func:`take_rows` does and move the
    tail's unselected rows into their places, so the live rows become ``[0, n - len(sel))``."""
    sel = np.ascontiguousarray(sel, dtype=np.int64)
    out = take_rows(pool_x, pool_y, sel, mean, inv_std, y_dtype)
    _fill_holes(pool_x, _as_2d(pool_y), int(n), sel)
    return out


# -- the NumPy specification (the loader's former code path) ----------------------------------------


def take_rows_reference(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, y_dtype: np.dtype | type
) -> tuple[np.ndarray, np.ndarray]:
    xb = x[rows].astype(np.float32)
    xb -= mean
    xb *= inv_std
    return xb, y[rows].astype(y_dtype)


def draw_rows_reference(
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    n: int,
    sel: np.ndarray,
    mean: np.ndarray,
    inv_std: np.ndarray,
    y_dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray]:
    out = take_rows_reference(pool_x, pool_y, sel, mean, inv_std, y_dtype)
    cut = n - len(sel)
    holes = sel[sel < cut]
    if len(holes):
        tail = np.arange(cut, n)
        movers = tail[~np.isin(tail, sel, assume_unique=True)]
        pool_x[holes] = pool_x[movers]
        pool_y[holes] = pool_y[movers]
    return out
