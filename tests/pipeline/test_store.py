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
from tests.pipeline.helpers import corrupt_chunk


def _write(dest, n=1000, f=5, chunk_rows=128, codec="lz4", **kw):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (n, f), dtype=np.uint8)
    y = rng.integers(0, 3, n).astype(np.int32)
    with create_store(
        dest,
        f,
        x_dtype=np.uint8,
        y_dtype=np.int32,
        chunk_rows=chunk_rows,
        codec=codec,
        attrs={"task": "classification", "classes": ["a", "b", "c"]},
        **kw,
    ) as w:
        for a in range(0, n, 77):  # appends not aligned with chunks
            w.append(X[a : a + 77], y[a : a + 77])
    return X, y


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
    with create_store(
        url, 2, x_dtype="float32", y_dtype="float32", chunk_rows=4, force=True, attrs={"task": "regression"}
    ) as w:
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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_force_replaces_only_a_store_of_this_program(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("precious")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["owner"] = "someone else"
    (tmp_path / "file.zarr").write_text("a file")
    _write(tmp_path / "s.zarr")
    (tmp_path / "extra.zarr").mkdir()
    _write(tmp_path / "extra.zarr", force=True)
    (tmp_path / "extra.zarr" / "mine.txt").write_text("kept")  # a user file inside a store
    before = _tree(tmp_path)
    for name, reason in [
        ("docs", "holds notes.txt"),
        ("plain.zarr", "not a store written by this program"),
        ("file.zarr", "is a file"),
        ("extra.zarr", "holds mine.txt"),
    ]:
        with pytest.raises(StoreError, match=f"{reason}.*--force replaces only a store written by pipeline"):
            _write(tmp_path / name, n=10, force=True)
    assert _tree(tmp_path) == before
    (tmp_path / "empty.zarr").mkdir()  # an empty directory holds nothing to lose
    _write(tmp_path / "empty.zarr", n=10, force=True)
    _write(tmp_path / "s.zarr", n=10, force=True)
    assert open_store(tmp_path / "s.zarr").n_rows == 10 and open_store(tmp_path / "empty.zarr").n_rows == 10


def test_forced_replacement_swaps_in_only_a_complete_store(tmp_path, monkeypatch):
    import pipeline.store as store_mod

    _write(tmp_path / "s.zarr")
    seen = []
    original = store_mod.replace_dir

    def watch(tmp, dest):
        seen.append(open_store(dest).n_rows)  # the old store is whole until the swap
        assert open_store(tmp).n_rows == 300  # the new one is complete before it
        original(tmp, dest)

    monkeypatch.setattr(store_mod, "replace_dir", watch)
    _write(tmp_path / "s.zarr", n=300, force=True)
    assert seen == [1000] and open_store(tmp_path / "s.zarr").n_rows == 300
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]  # neither the old store nor temp litter


def test_a_killed_writer_leaves_a_temp_the_next_writer_removes(tmp_path):
    import subprocess
    import sys

    dest = tmp_path / "s.zarr"
    code = (
        "import os, numpy as np\n"
        "from pipeline.store import create_store\n"
        f"w = create_store({str(dest)!r}, 3, x_dtype='float32', y_dtype='int32', chunk_rows=10, attrs={{}})\n"
        "w.append(np.ones((25, 3), np.float32), np.zeros(25, np.int32))\n"
        "os._exit(9)  # killed: no cleanup runs\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 9
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith("s.zarr.tmp-")
    # a temporary of a writer that still runs (this process) and a stranger's are left alone
    with create_store(tmp_path / "s.zarr", 3, x_dtype="float32", y_dtype="int32", attrs={}) as w:
        w.append(np.ones((5, 3), np.float32), np.zeros(5, np.int32))
        (tmp_path / "s.zarr.tmp-foreign").mkdir()
        (tmp_path / "s.zarr.tmp-foreign" / "data.txt").write_text("not ours")
        live = Path(w.tmp).name
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "s.zarr.tmp-foreign"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "s.zarr.tmp-foreign"]
    assert "writer" not in open_store(dest).attrs


def test_every_chunk_is_written_even_when_it_equals_the_fill_value(tmp_path):
    # class-sorted labels and blank images: whole chunks of zeros, which Zarr skips by default
    with create_store(tmp_path / "s.zarr", 4, x_dtype=np.uint8, y_dtype=np.int32, chunk_rows=10, attrs={}) as w:
        w.append(np.zeros((25, 4), np.uint8), np.zeros(25, np.int32))
    st = open_store(tmp_path / "s.zarr")
    assert st.attrs["all_chunks_written"] is True
    assert all(st.chunk_exists(a, i) for a in ("X", "y") for i in range(3))
    assert verify_store(st) == []


@pytest.mark.parametrize("array", ["X", "y"])
def test_a_missing_chunk_is_named_not_read_as_zeros(tmp_path, array):
    from pipeline.loader import ChunkLoader

    _write(tmp_path / "s.zarr")
    chunk = Path(tmp_path, "s.zarr", array, "c", "3", *(["0"] if array == "X" else []))
    chunk.unlink()
    st = open_store(tmp_path / "s.zarr")
    st.read_chunk(2)
    msg = rf"chunk 3 of array '{array}' \(rows 384:512\) in store '.*s\.zarr' is missing"
    with pytest.raises(StoreError, match=msg):
        st.read_chunk(3)
    with pytest.raises(StoreError, match=msg):
        st.read_rows(300, 400)  # a range straddling chunks 2 and 3
    bad = verify_store(st)
    assert len(bad) == 1 and "chunk 3" in bad[0] and "missing" in bad[0]
    with pytest.raises(StoreError, match=msg), ChunkLoader(st, batch_size=64, shuffle=False) as loader:
        for _ in loader.epoch(0):
            pass


def test_stores_without_the_record_are_read_as_before(tmp_path):
    """A store written before every chunk was recorded may lack all-fill chunks legitimately."""
    _write(tmp_path / "s.zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    del g.attrs["all_chunks_written"]
    Path(tmp_path, "s.zarr", "y", "c", "1").unlink()
    st = open_store(tmp_path / "s.zarr")
    assert not st.check_chunks and (st.read_chunk(1)[1] == 0).all()
