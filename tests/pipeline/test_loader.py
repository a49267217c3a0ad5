"""The shuffled chunk loader: exactly-once, ordering, determinism, bounded memory, clean threads."""

from __future__ import annotations

import gc
import threading
import tracemalloc

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.loader import ChunkLoader
from pipeline.store import create_store, open_store
from tests.pipeline.helpers import corrupt_chunk, make_store


def ids(batches):
    return np.concatenate([X[:, 0] for X, _ in batches]).astype(np.int64)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "chunk-loader-prefetch"]


def test_every_row_once_new_order_each_epoch(tmp_path):
    st = make_store(tmp_path / "s.zarr")
    with ChunkLoader(st, batch_size=64, seed=3, normalize=False) as L:
        e0 = list(L.epoch(0))
        e1 = list(L.epoch(1))
        again = list(L.epoch(0))
    for e in (e0, e1):
        got = ids(e)
        assert sorted(got.tolist()) == list(range(5000))
        assert all(len(X) == 64 for X, _ in e[:-1])
        for X, y in e:
            assert X.dtype == np.float32 and X.flags.c_contiguous and y.dtype == np.int32
            np.testing.assert_array_equal(y, X[:, 0].astype(int) % 3)
    assert not np.array_equal(ids(e0), ids(e1))
    np.testing.assert_array_equal(ids(e0), ids(again))  # deterministic by (seed, epoch)
    with ChunkLoader(st, batch_size=64, seed=4, normalize=False) as L:
        assert not np.array_equal(ids(list(L.epoch(0))), ids(e0))
    # rows from different chunks mix inside a batch (the shuffle buffer spans several chunks)
    assert len(np.unique(e0[0][0][:, 0] // 500)) > 1
    assert not prefetch_threads()


def test_chunk_subset_ranges_and_drop_last(tmp_path):
    st = make_store(tmp_path / "s.zarr")
    L = ChunkLoader(st, chunks=[1, 4, 9], batch_size=100, normalize=False, drop_last=True)
    assert L.n_rows == 1500 and len(L) == 15
    got = ids(L.epoch(2))
    assert sorted(got.tolist()) == [*range(500, 1000), *range(2000, 2500), *range(4500, 5000)]
    L.close()
    R = ChunkLoader(st, ranges=[(10, 260), (4990, 5000)], batch_size=7, shuffle=False, normalize=False)
    assert R.n_rows == 260
    np.testing.assert_array_equal(ids(R.epoch(0)), [*range(10, 260), *range(4990, 5000)])
    R.close()


def test_sequential_order(tmp_path):
    st = make_store(tmp_path / "s.zarr", n=1234, chunk_rows=100)
    with ChunkLoader(st, batch_size=50, shuffle=False, normalize=False) as L:
        batches = list(L.epoch(5))
    np.testing.assert_array_equal(ids(batches), np.arange(1234))
    assert [len(X) for X, _ in batches][-1] == 1234 % 50


def test_normalization_and_compact_dtype(tmp_path):
    st = make_store(tmp_path / "s.zarr", dtype=np.uint8, n=255 * 4, chunk_rows=100)
    assert st.X.dtype == np.uint8
    with ChunkLoader(st, batch_size=128, seed=1) as L:
        X = np.concatenate([b[0] for b in L.epoch(0)])
    assert X.dtype == np.float32
    np.testing.assert_allclose(X.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(X.std(0), 1, atol=1e-4)


def test_regression_targets(tmp_path):
    st = make_store(tmp_path / "s.zarr", task="regression")
    with ChunkLoader(st, batch_size=32, normalize=False) as L:
        for X, y in L.epoch(0):
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, X[:, 0])


def test_bounded_memory_streaming(tmp_path):
    # 40 chunks of 1 MB = 40 MB of float32; the loader holds ~buffer + prefetch chunks at a time
    n, f, chunk = 40 * 2048, 128, 2048
    rng = np.random.default_rng(0)
    with create_store(
        tmp_path / "big.zarr",
        f,
        x_dtype=np.float32,
        y_dtype=np.int32,
        chunk_rows=chunk,
        codec="none",
        attrs={"task": "classification", "classes": ["0", "1"]},
    ) as w:
        for _ in range(0, n, chunk):
            w.append(rng.standard_normal((chunk, f), dtype=np.float32), np.zeros(chunk, np.int32))
    st = open_store(tmp_path / "big.zarr")
    store_bytes = st.X.nbytes
    tracemalloc.start()
    try:
        rows = 0
        with ChunkLoader(st, batch_size=256, buffer_chunks=2, prefetch=2) as L:
            for epoch in range(2):
                for X, _ in L.epoch(epoch):
                    rows += len(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 2 * n
    assert peak < store_bytes / 4, (peak, store_bytes)


def test_thread_stops_on_break_close_and_gc(tmp_path):
    st = make_store(tmp_path / "s.zarr", n=20000, chunk_rows=200)
    L = ChunkLoader(st, batch_size=10, prefetch=1)
    it = L.epoch(0)
    next(it)
    assert len(prefetch_threads()) == 1
    L.close()
    assert not prefetch_threads()
    L2 = ChunkLoader(st, batch_size=10, prefetch=1)
    for _ in L2.epoch(0):
        break
    gc.collect()
    assert not prefetch_threads()
    L3 = ChunkLoader(st, batch_size=10, prefetch=1)
    it = L3.epoch(0)
    next(it)
    del it, L3
    gc.collect()
    assert not prefetch_threads()


def test_reader_errors_reach_the_consumer(tmp_path):
    st = make_store(tmp_path / "s.zarr")
    corrupt_chunk(tmp_path / "s.zarr", "X", 6)
    seen: list = []
    with ChunkLoader(open_store(tmp_path / "s.zarr"), batch_size=100, shuffle=False, normalize=False) as L:
        with pytest.raises(StoreError, match="chunk 6 of array 'X'"):
            for batch in L.epoch(0):
                seen.append(batch)
    assert not prefetch_threads()
    # in order, every row before the bad chunk arrived, and the waits for them were counted
    assert ids(seen).tolist() == list(range(6 * 500))
    assert L.read_seconds > 0
    del st


def test_bad_arguments(tmp_path):
    st = make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="chunk 99"):
        ChunkLoader(st, chunks=[99])
    with pytest.raises(ValueError):
        ChunkLoader(st, batch_size=0)
    with ChunkLoader(str(tmp_path / "s.zarr")) as L:  # a path works too
        assert L.n_rows == 5000
