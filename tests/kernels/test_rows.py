"""The loader's batch-assembly kernels against their NumPy specification, bit for bit."""

from __future__ import annotations

import inspect

import numba
import numpy as np
import pytest

from kernels import rows


def _pool(rng, p, f, x_dtype, y_shape, y_dtype):
    if np.dtype(x_dtype).kind == "u":
        x = rng.integers(0, 256, (p, f)).astype(x_dtype)
    else:
        x = (rng.standard_normal((p, f)) * 50 + 3).astype(x_dtype)
    y = rng.integers(0, 7, (p, *y_shape)) if np.dtype(y_dtype).kind in "iu" else rng.standard_normal((p, *y_shape))
    return x, y.astype(y_dtype)


CASES = [
    (np.uint8, (), np.int64, np.int32),  # pixels and class labels
    (np.float32, (), np.float32, np.float32),  # features and one regression target
    (np.float64, (3,), np.float64, np.float32),  # several regression targets
    (np.int16, (), np.int32, np.int32),
]


@pytest.mark.parametrize(("x_dtype", "y_shape", "y_dtype", "out_y"), CASES)
def test_take_rows_equals_numpy(x_dtype, y_shape, y_dtype, out_y):
    rng = np.random.default_rng(1)
    x, y = _pool(rng, 300, 37, x_dtype, y_shape, y_dtype)
    mean = (rng.standard_normal(37) * 10).astype(np.float32)
    inv_std = rng.uniform(0.01, 2, 37).astype(np.float32)
    idx = rng.permutation(300)[:64]
    got_x, got_y = rows.take_rows(x, y, idx, mean, inv_std, out_y)
    want_x, want_y = rows.take_rows_reference(x, y, idx, mean, inv_std, out_y)
    assert got_x.dtype == np.float32 and got_x.flags.c_contiguous and got_x.shape == (64, 37)
    assert got_y.dtype == np.dtype(out_y) and got_y.shape == (64, *y_shape)
    np.testing.assert_array_equal(got_x, want_x)  # same float32 arithmetic: exactly equal
    np.testing.assert_array_equal(got_y, want_y)


@pytest.mark.parametrize(("x_dtype", "y_shape", "y_dtype", "out_y"), CASES)
def test_draw_rows_equals_numpy_and_leaves_the_same_pool(x_dtype, y_shape, y_dtype, out_y):
    rng = np.random.default_rng(2)
    x, y = _pool(rng, 500, 11, x_dtype, y_shape, y_dtype)
    mean = rng.standard_normal(11).astype(np.float32)
    inv_std = rng.uniform(0.5, 2, 11).astype(np.float32)
    x_ref, y_ref = x.copy(), y.copy()
    n = 450  # rows [450, 500) are spare capacity, never read
    for bs in (32, 32, 100, 7):
        sel = np.sort(rng.choice(n, size=bs, replace=False))
        got = rows.draw_rows(x, y, n, sel, mean, inv_std, out_y)
        want = rows.draw_rows_reference(x_ref, y_ref, n, sel, mean, inv_std, out_y)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        n -= bs
        np.testing.assert_array_equal(x[:n], x_ref[:n])  # the live rows, in the same slots
        np.testing.assert_array_equal(y[:n], y_ref[:n])


def test_draw_rows_takes_every_row_exactly_once():
    rng = np.random.default_rng(3)
    n = 1000
    x = np.arange(n, dtype=np.float64).reshape(n, 1)
    y = np.arange(n)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    seen = []
    while n:
        sel = np.sort(rng.choice(n, size=min(64, n), replace=False))
        bx, by = rows.draw_rows(x, y, n, sel, zero, one, np.int64)
        np.testing.assert_array_equal(bx[:, 0].astype(np.int64), by)
        seen.extend(by.tolist())
        n -= len(sel)
    assert sorted(seen) == list(range(1000))


def test_row_kernels_release_the_gil():
    jitted = [obj for obj in vars(rows).values() if isinstance(obj, numba.core.registry.CPUDispatcher)]
    assert len(jitted) == inspect.getsource(rows).count("\n@njit(") == 2
    for fn in jitted:
        assert fn.targetoptions.get("nogil") is True
        assert fn.targetoptions.get("fastmath") is False
