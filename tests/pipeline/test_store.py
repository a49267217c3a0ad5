"""The Zarr dataset store: format, atomic writes, checksums, statistics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import StoreError
from pipeline.store import (
    DEFAULT_CODEC,
    FORMAT_VERSION,
    RunningStats,
    create_store,
    default_chunk_rows,
    describe,
    open_store,
    verify_store,
)


def _write(dest, n=1000, f=5, chunk_rows=128, codec="lz4", **kw):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (n, f), dtype=np.uint8)
    y = rng.integers(0, 3, n).astype(np.int32)
    with create_store(dest, f, x_dtype=np.uint8, y_dtype=np.int32, chunk_rows=chunk_rows, codec=codec,
                      attrs={"task": "classification", "classes": ["a", "b", "c"]}, **kw) as w:
        for a in range(0, n, 77):  # appends not aligned with chunks
            w.append(X[a : a + 77], y[a : a + 77])
    return X, y


def corrupt_chunk(store_path: str | Path, array: str, index: int) -> Path:
    """Flip one byte in the middle of a stored chunk file."""
    path = Path(store_path, array, "c", str(index), *(["0"] if array == "X" else []))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_round_trip_each_codec(tmp_path, codec):
    X, y = _write(tmp_path / "s.zarr", codec=codec)
    st = open_store(tmp_path / "s.zarr")
    assert (st.n_rows, st.n_features, st.chunk_rows, st.n_chunks) == (1000, 5, 128, 8)
    assert st.X.dtype == np.uint8 and st.y.dtype == np.int32
    assert st.attrs["format_version"] == FORMAT_VERSION and st.attrs["codec"] == codec
    assert type(st.X.compressors[-1]).__name__ == "Crc32cCodec"
    got = [st.read_chunk(i) for i in range(st.n_chunks)]
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), X)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
    assert st.chunk_slice(7) == slice(896, 1000)
    assert verify_store(st) == []
    assert os.listdir(tmp_path) == ["s.zarr"]  # no temp litter
    info = describe(st)
    assert info["rows"] == 1000 and info["bytes_on_disk"] > 0


def test_corrupted_chunk_is_named(tmp_path):
    _write(tmp_path / "s.zarr")
    corrupt_chunk(tmp_path / "s.zarr", "X", 3)
    st = open_store(tmp_path / "s.zarr")
    st.read_chunk(2)
    with pytest.raises(StoreError, match=r"chunk 3 of array 'X'.*s\.zarr"):
        st.read_chunk(3)
    bad = verify_store(st)
    assert len(bad) == 1 and "chunk 3" in bad[0]


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a pipeline store"):
        open_store(tmp_path / "plain.zarr")
    _write(tmp_path / "s.zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="newer"):
        open_store(tmp_path / "s.zarr")


def test_exists_needs_force(tmp_path):
    _write(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="exists; pass --force"):
        _write(tmp_path / "s.zarr")
    X, _ = _write(tmp_path / "s.zarr", n=300, force=True)
    assert open_store(tmp_path / "s.zarr").n_rows == 300


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, exc):
    _write(tmp_path / "old.zarr")
    with pytest.raises(exc):
        with create_store(tmp_path / "new.zarr", 3, x_dtype="float32", y_dtype="int32", chunk_rows=10, attrs={}) as w:
            w.append(np.zeros((55, 3), np.float32), np.zeros(55, np.int32))
            raise exc()
    assert sorted(os.listdir(tmp_path)) == ["old.zarr"]
    # and a forced overwrite that fails keeps the old store intact
    with pytest.raises(exc):
        with create_store(tmp_path / "old.zarr", 3, x_dtype="float32", y_dtype="int32", force=True, attrs={}) as w:
            raise exc()
    assert open_store(tmp_path / "old.zarr").n_rows == 1000
    assert sorted(os.listdir(tmp_path)) == ["old.zarr"]


def test_fsspec_memory_url():
    url = "memory://pipeline-test/s.zarr"
    with create_store(url, 2, x_dtype="float32", y_dtype="float32", chunk_rows=4, force=True,
                      attrs={"task": "regression"}) as w:
        w.append(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10, dtype=np.float32))
    st = open_store(url)
    assert st.n_rows == 10 and st.task == "regression" and st.attrs["codec"] == DEFAULT_CODEC
    np.testing.assert_array_equal(st.read_chunk(2)[1], [8, 9])


def test_running_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 3, (1000, 4))
    x[:, 3] = 7.0
    rs = RunningStats(4)
    for a in range(0, 1000, 93):
        rs.update(x[a : a + 93])
    np.testing.assert_allclose(rs.mean, x.mean(0))
    np.testing.assert_allclose(rs.std[:3], x.std(0)[:3])
    assert rs.std[3] == 1.0  # constant column: std 1, not 0


def test_default_chunk_rows():
    assert default_chunk_rows(784 * 4) * 784 * 4 == pytest.approx(16 * 2**20, rel=0.01)
    assert default_chunk_rows(10**9) == 1024
    assert default_chunk_rows(4) == 2**20
    assert default_chunk_rows(64, n_rows=16000) == 2048
