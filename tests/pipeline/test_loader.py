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
            assert y.dtype == np.float64  # standardized in float64 (prepare_targets), then float32
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


def _counting_reads(st, monkeypatch):
    """Record each ``read_rows`` call of ``st`` (the store's decode of a row range)."""
    reads = []
    real = st.read_rows

    def read_rows(a, b, labels=True):
        reads.append((a, b))
        return real(a, b, labels)

    monkeypatch.setattr(st, "read_rows", read_rows)
    return reads


def test_row_cache_gives_the_same_batches_and_reads_each_chunk_once(tmp_path, monkeypatch):
    from pipeline.loader import RowCache

    st = make_store(tmp_path / "s.zarr", n=5000, f=4, chunk_rows=500)
    reads = _counting_reads(st, monkeypatch)
    # ranges cut inside chunks (as sync shares are) and one range over a chunk boundary
    ranges = [(130, 1480), (2210, 2790), (4000, 4512)]
    holdout = {"fraction": 0.1, "seed": 5, "keep": "train"}
    common = dict(ranges=ranges, batch_size=64, seed=2, holdout=holdout, buffer_chunks=2)
    with ChunkLoader(st, **common) as plain:
        want = [list(plain.epoch(e)) for e in range(3)]
    assert len(reads) == 3 * len(ranges)
    reads.clear()
    cache = RowCache(2**20)
    with ChunkLoader(st, cache=cache, cache_scope="job-a", **common) as kept:
        got = [list(kept.epoch(0))]
        touched = {c for a, b in ranges for c in range(a // 500, (b - 1) // 500 + 1)}
        assert len(reads) == cache.reads == len(touched) == len(cache)
        assert sorted(reads) == [(c * 500, c * 500 + 500) for c in sorted(touched)]  # whole chunks
        got += [list(kept.epoch(e)) for e in (1, 2)]
        # once every chunk is kept, an epoch starts no reader thread: the units come from the
        # cache in the consumer's own thread
        running = kept.epoch(3)
        next(running)
        assert kept._threads == []
        running.close()
    assert len(reads) == len(touched) and cache.hits > 0  # epochs 1 to 3 read nothing
    with ChunkLoader(st, cache=RowCache(2**20), cache_scope="job-a", **common) as fresh:
        running = fresh.epoch(0)  # nothing kept yet: read ahead by a thread
        next(running)
        assert len(fresh._threads) == 1
        running.close()
    for w, g in zip(want, got, strict=True):
        assert len(w) == len(g)
        for (Xw, yw), (Xg, yg) in zip(w, g, strict=True):
            np.testing.assert_array_equal(Xg, Xw)
            np.testing.assert_array_equal(yg, yw)
    # the held-out rows stay out, and another scope (a job) or selection is another entry
    from pipeline.loader import held_out_mask

    held = np.flatnonzero(held_out_mask(st, 0, 5000, 0.1, 5))
    assert len(held) == 500 and not np.isin(ids(got[0]), held).any()
    with ChunkLoader(st, cache=cache, cache_scope="job-b", **common) as other:
        list(other.epoch(0))
    assert len(cache) == 2 * len(touched)


def test_row_cache_streams_a_store_over_its_bound_and_evicts_to_it(tmp_path, monkeypatch):
    from pipeline.loader import RowCache

    st = make_store(tmp_path / "s.zarr", n=5000, f=4, chunk_rows=500)
    need = RowCache.store_bytes(st)
    assert need == 5000 * (4 * 4 + 4 + 8)
    small = RowCache(need - 1)
    reads = _counting_reads(st, monkeypatch)
    with ChunkLoader(st, batch_size=100, cache=small) as L:
        for e in range(2):
            list(L.epoch(e))
    assert len(reads) == 20 and len(small) == 0 and small.reads == 0  # streamed both epochs
    fits = RowCache(need)
    with ChunkLoader(st, batch_size=100, cache=fits) as L:
        list(L.epoch(0))
    assert len(fits) == 10 and fits.nbytes == need
    fits.resize(need // 2)
    assert fits.nbytes <= need // 2 and len(fits) == 5
    fits.clear()
    assert len(fits) == 0 and fits.nbytes == 0
    # prediction (labels=False) and given row ids never use the cache
    with ChunkLoader(st, batch_size=100, cache=fits, labels=False) as L:
        assert L._cache is None
    with ChunkLoader(st, batch_size=100, cache=fits, rows=np.arange(0, 5000, 3)) as L:
        assert L._cache is None
