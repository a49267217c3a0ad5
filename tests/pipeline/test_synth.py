"""Synthetic stores: deterministic, streamed in bounded memory, learnable."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.synth import synth
from tests.pipeline.helpers import read_all


def test_deterministic_by_seed_not_chunking(tmp_path):
    a = synth(tmp_path / "a.zarr", rows=10_000, features=8, classes=4, seed=7, chunk_rows=1000)
    b = synth(tmp_path / "b.zarr", rows=10_000, features=8, classes=4, seed=7, chunk_rows=3333, codec="none")
    c = synth(tmp_path / "c.zarr", rows=10_000, features=8, classes=4, seed=8, chunk_rows=1000)
    Xa, ya = read_all(a)
    Xb, yb = read_all(b)
    Xc, _ = read_all(c)
    np.testing.assert_array_equal(Xa, Xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(Xa, Xc)
    assert a.classes == ["0", "1", "2", "3"] and a.task == "classification"
    counts = np.bincount(ya, minlength=4)
    assert counts.min() > 0.15 * len(ya), counts  # balanced-ish
    np.testing.assert_allclose(a.mean, Xa.mean(0), atol=1e-6)
    assert a.attrs["target"]["class_counts"] == counts.tolist()


def test_learnable(tmp_path):
    # the labels are a function of X: a nearest-centroid rule beats chance clearly,
    # and a regression target is predictable by least squares on tanh features of X
    st = synth(tmp_path / "c.zarr", rows=20_000, features=10, classes=3, noise=0.0, seed=1)
    X, y = read_all(st)
    cent = np.stack([X[y == k].mean(0) for k in range(3)])
    pred = np.argmin(((X[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() > 0.5
    r = synth(tmp_path / "r.zarr", rows=20_000, features=5, classes=None, noise=0.05, seed=1)
    X, y = read_all(r)
    assert r.task == "regression" and r.classes is None and y.dtype == np.float32
    F = np.c_[X, X**2, np.ones(len(X))]
    coef, *_ = np.linalg.lstsq(F, y, rcond=None)
    r2 = 1 - np.var(y - F @ coef) / np.var(y)
    assert r2 > 0.3, r2
    assert r.y_std[0] == pytest.approx(y.std(), rel=1e-4)


def test_large_store_in_bounded_memory(tmp_path):
    # 96 MB of float32 written with a 4 MB chunk size: peak memory stays a small fraction of it
    rows, features = 96 * 2**20 // (4 * 256), 256
    tracemalloc.start()
    try:
        st = synth(tmp_path / "big.zarr", rows=rows, features=features, classes=10, chunk_rows=4096, codec="none")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert st.n_rows == rows and st.X.nbytes == 96 * 2**20
    assert peak < st.X.nbytes / 5, (peak, st.X.nbytes)


def test_uint8_and_errors(tmp_path):
    st = synth(tmp_path / "u.zarr", rows=3000, features=16, classes=2, dtype="uint8")
    X, y = read_all(st)
    assert X.dtype == np.uint8 and X.std() > 10 and set(np.unique(y)) == {0, 1}
    with pytest.raises(StoreError, match="at least 2 classes"):
        synth(tmp_path / "e.zarr", rows=10, features=2, classes=1)
    with pytest.raises(StoreError, match="exists; pass --force"):
        synth(tmp_path / "u.zarr", rows=10, features=2, classes=2)
