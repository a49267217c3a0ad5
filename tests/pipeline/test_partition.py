"""Simulated clients' partitions of a store, and reading rows by id, on real Zarr stores."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, StoreError
from pipeline.loader import held_out_mask
from pipeline.partition import PARTITIONS, make_partition, open_partition, round_shares
from pipeline.store import create_store, open_store, read_rows_at
from tests.pipeline.helpers import make_store, read_all

N_CLASSES = 5


def _store(path: Path, n: int = 6000, chunk_rows: int = 250, sorted_labels: bool = False):
    """Labels 0..4 at random (or sorted by class); X[:, 0] = row id, X[:, 1] = an integer site
    id 0..6, X[:, 2] = a fractional value."""
    rng = np.random.default_rng(42)
    y = rng.integers(0, N_CLASSES, n).astype(np.int32)
    if sorted_labels:
        y = np.sort(y)
    X = np.zeros((n, 3), np.float32)
    X[:, 0] = np.arange(n)
    X[:, 1] = rng.integers(0, 7, n)
    X[:, 2] = rng.random(n)
    with create_store(
        path,
        3,
        x_dtype=np.float32,
        y_dtype=np.int32,
        chunk_rows=chunk_rows,
        attrs={"task": "classification", "classes": list("abcde"), "feature_names": ["id", "site", "frac"]},
    ) as w:
        w.append(X, y)
    return open_store(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return _store(tmp_path_factory.mktemp("part") / "s.zarr")


def _all_rows(p) -> np.ndarray:
    return np.concatenate([p.rows(k) for k in range(p.n_clients)])


def _labels(store) -> np.ndarray:
    return read_all(store)[1].astype(np.int64)


def _skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's class mix and the global one."""
    glob = counts.sum(0) / counts.sum()
    mix = counts / np.maximum(1, counts.sum(1, keepdims=True))
    return float(0.5 * np.abs(mix - glob).sum(1).mean())


# -- reading rows by id ---------------------------------------------------------------------------


def test_read_rows_at_returns_the_rows_in_the_order_asked(tmp_path: Path) -> None:
    st = make_store(tmp_path / "s.zarr", n=3000, chunk_rows=500)
    X_all, y_all = read_all(st)
    rows = np.array([2999, 3, 1200, 3, 501, 499, 0, 2500], np.int64)  # any order, a repeat, 5 chunks
    X, y = read_rows_at(st, rows)
    np.testing.assert_array_equal(X, X_all[rows])
    np.testing.assert_array_equal(y, y_all[rows])
    X2, y2 = read_rows_at(st, rows, labels=False)
    np.testing.assert_array_equal(X2, X_all[rows])
    assert not y2.any() and y2.dtype == y_all.dtype
    X0, y0 = read_rows_at(st, np.empty(0, np.int64))
    assert X0.shape == (0, 3) and y0.shape == (0,)
    with pytest.raises(StoreError, match="row 3000 is outside"):
        read_rows_at(st, np.array([1, 3000]))
    with pytest.raises(StoreError, match="1-D integer"):
        read_rows_at(st, np.array([1.0]))


def test_read_rows_at_reads_only_the_chunks_holding_the_rows_and_checks_them(tmp_path: Path) -> None:
    st = make_store(tmp_path / "s.zarr", n=3000, chunk_rows=500)
    X_all, _ = read_all(st)
    os.remove(Path(st.path, "X", "c", "3", "0"))  # chunk 3: rows 1500:2000
    st = open_store(st.path)
    rows = np.array([10, 2600, 1499], np.int64)
    np.testing.assert_array_equal(read_rows_at(st, rows)[0], X_all[rows])  # chunk 3 never read
    with pytest.raises(StoreError, match="chunk 3 of array 'X'.*missing"):
        read_rows_at(st, np.array([10, 1600]))


# -- the kinds ------------------------------------------------------------------------------------


def test_iid_gives_near_equal_parts_with_the_global_class_mix(store, tmp_path: Path) -> None:
    p = make_partition(store, 10, "iid", seed=1, out=tmp_path / "p")
    sizes = p.sizes()
    assert sizes.sum() == store.n_rows and sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(np.sort(_all_rows(p)), np.arange(store.n_rows))  # every row once
    for k in range(p.n_clients):
        assert np.all(np.diff(p.rows(k)) > 0)  # sorted within the client
    counts = p.class_counts(store)
    glob = np.bincount(_labels(store), minlength=N_CLASSES) / store.n_rows
    np.testing.assert_allclose(counts / sizes[:, None], np.tile(glob, (10, 1)), atol=0.06)
    assert _skew(counts) < 0.05
    meta = json.loads(Path(p.path, "meta.json").read_text())
    assert meta["kind"] == "iid" and meta["n_clients"] == 10 and meta["seed"] == 1
    assert meta["store"] == os.path.abspath(store.path) and meta["store_rows"] == store.n_rows


def test_iid_draws_each_part_at_random_even_over_class_sorted_rows(tmp_path: Path) -> None:
    st = _store(tmp_path / "sorted.zarr", n=4000, sorted_labels=True)
    p = make_partition(st, 4, "iid", seed=0, out=tmp_path / "p")
    assert _skew(p.class_counts(st)) < 0.05  # not contiguous row ranges (each one class)


def test_dirichlet_counts_follow_the_drawn_shares_and_small_alpha_skews_more(store, tmp_path: Path) -> None:
    labels = _labels(store)
    n_c = np.bincount(labels, minlength=N_CLASSES)
    skews = {}
    for alpha in (0.1, 100.0):
        p = make_partition(store, 8, "dirichlet", alpha=alpha, seed=3, out=tmp_path / f"p{alpha}")
        shares = np.load(Path(p.path, "shares.npy"))
        assert shares.shape == (N_CLASSES, 8)
        counts = p.class_counts(store)  # (clients, classes), counted from the store's labels
        np.testing.assert_array_equal(counts.T, p.counts)
        np.testing.assert_array_equal(counts.sum(0), n_c)
        assert np.all(np.abs(counts.T - n_c[:, None] * shares) < 1)  # the shares, up to rounding
        assert p.sizes().min() >= 1
        np.testing.assert_array_equal(np.sort(_all_rows(p)), np.arange(store.n_rows))
        skews[alpha] = _skew(counts)
    assert skews[0.1] > 0.4 > 0.05 > skews[100.0], skews


def test_classes_gives_each_client_exactly_k_labels_split_evenly(store, tmp_path: Path) -> None:
    p = make_partition(store, 6, "classes", classes=2, seed=0, out=tmp_path / "p")
    counts = p.class_counts(store)
    assert ((counts > 0).sum(1) == 2).all()
    holders = (counts > 0).sum(0)
    assert holders.max() - holders.min() <= 1  # 12 holdings over 5 labels: 2 or 3 each
    n_c = np.bincount(_labels(store), minlength=N_CLASSES)
    for c in range(N_CLASSES):
        got = counts[counts[:, c] > 0, c]
        assert got.sum() == n_c[c] and got.max() - got.min() <= 1
    np.testing.assert_array_equal(np.sort(_all_rows(p)), np.arange(store.n_rows))
    # two clients, one label each: three labels have no holder and their rows are left out
    q = make_partition(store, 2, "classes", classes=1, seed=0, out=tmp_path / "q")
    meta = json.loads(Path(q.path, "meta.json").read_text())
    assert meta["unassigned"] == store.n_rows - q.sizes().sum() > 0
    with pytest.raises(ConfigError, match="partition_classes = 6 is more than the store's 5 classes"):
        make_partition(store, 3, "classes", classes=6, out=tmp_path / "r")


def test_column_makes_one_client_per_value(store, tmp_path: Path) -> None:
    X_all, _ = read_all(store)
    p = make_partition(store, 0, "column", column="site", out=tmp_path / "p")
    assert p.n_clients == 7
    assert json.loads(Path(p.path, "meta.json").read_text())["values"] == list(range(7))
    for k in range(7):
        X, _ = p.read(store, k)
        assert (X[:, 1] == k).all() and len(X) == (X_all[:, 1] == k).sum()
    q = make_partition(store, 7, "column", column="site", out=tmp_path / "q")
    np.testing.assert_array_equal(_all_rows(q), _all_rows(p))
    with pytest.raises(ConfigError, match="7 distinct values .* but clients = 5; set clients = 7 or 0"):
        make_partition(store, 5, "column", column="site", out=tmp_path / "r")
    with pytest.raises(ConfigError, match="'frac' holds non-integer values"):
        make_partition(store, 0, "column", column="frac", out=tmp_path / "r")
    with pytest.raises(ConfigError, match="'nope' is not a column"):
        make_partition(store, 0, "column", column="nope", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


# -- seeds, held-out rows, refusals, memory --------------------------------------------------------


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "classes"])
def test_same_seed_same_partition_other_seed_another(store, tmp_path: Path, kind: str) -> None:
    a = make_partition(store, 5, kind, seed=7, out=tmp_path / "a")
    b = make_partition(store, 5, kind, seed=7, out=tmp_path / "b")
    c = make_partition(store, 5, kind, seed=8, out=tmp_path / "c")
    for name in ("offsets.npy", "rows.npy", "counts.npy"):
        assert Path(a.path, name).read_bytes() == Path(b.path, name).read_bytes()
    assert not np.array_equal(_all_rows(a), _all_rows(c))
    reopened = open_partition(a.path)
    assert reopened.kind == kind and np.array_equal(reopened.rows(2), a.rows(2))
    assert a.mismatch(store, 5, kind, seed=7) is None
    assert a.mismatch(store, 5, kind, seed=8) == "its seed is 7, not 8"
    assert a.mismatch(store, 6, kind, seed=7) == "its n_clients is 5, not 6"


@pytest.mark.parametrize("kind", PARTITIONS)
def test_held_out_rows_are_never_assigned(store, tmp_path: Path, kind: str) -> None:
    held = held_out_mask(store, 0, store.n_rows, 0.2, 5)
    assert 1000 < held.sum() < 1400
    p = make_partition(
        store, 0 if kind == "column" else 4, kind, column="site", seed=1, exclude_held_out=(0.2, 5), out=tmp_path / "p"
    )
    rows = _all_rows(p)
    if kind == "classes":  # 4 clients x 2 labels cover all 5 labels: nothing left out
        assert json.loads(Path(p.path, "meta.json").read_text())["unassigned"] == 0
    np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(~held))


def test_refusals_are_one_line_and_leave_nothing(store, tmp_path: Path) -> None:
    out = tmp_path / "p"
    cases = [
        ((6001, "iid"), {}, "clients = 6001 is more than the store's 6000 training rows"),
        ((4, "dirichlet"), {"alpha": 0.0}, "partition_alpha must be a number > 0"),
        ((4, "dirichlet"), {"alpha": float("nan")}, "partition_alpha must be a number > 0"),
        ((4, "shards"), {}, "unknown partition 'shards'"),
        ((0, "iid"), {}, "clients must be >= 1"),
        ((4, "classes"), {"classes": 0}, "partition_classes must be an int >= 1"),
        ((4, "column"), {}, "needs partition_column"),
        ((4, "iid"), {"exclude_held_out": (1.0, 0)}, r"held-out fraction must be in \[0, 1\)"),
    ]
    for args, kw, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            make_partition(store, *args, out=out, **kw)
        assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="leaves some of the 3000 clients with fewer than 1 rows"):
        make_partition(store, 3000, "dirichlet", alpha=0.01, out=out)
    reg = make_store(tmp_path / "reg.zarr", n=1000, task="regression")
    with pytest.raises(ConfigError, match="splits by class; .* is a regression store: use iid"):
        make_partition(reg, 4, "dirichlet", out=out)
    assert make_partition(reg, 4, "iid", out=out).sizes().tolist() == [250] * 4
    with pytest.raises(StoreError, match="exists; pass force=True"):
        make_partition(store, 4, "iid", out=out)
    assert make_partition(store, 3, "iid", out=out, force=True).n_clients == 3
    with pytest.raises(StoreError, match="exists and is not a partition"):
        make_partition(store, 4, "iid", out=tmp_path / "reg.zarr", force=True)
    with pytest.raises(StoreError, match="holds no partition"):
        open_partition(tmp_path / "reg.zarr")


def test_round_shares_sums_exactly_and_stays_within_a_row() -> None:
    shares = np.random.default_rng(0).dirichlet(np.full(50, 0.3))
    counts = round_shares(1001, shares)
    assert counts.sum() == 1001 and np.all(np.abs(counts - 1001 * shares) < 1)


def test_memory_is_chunks_and_clients_not_rows(tmp_path: Path) -> None:
    n, chunk = 400_000, 4000
    with create_store(
        tmp_path / "big.zarr",
        1,
        x_dtype=np.uint8,
        y_dtype=np.int32,
        chunk_rows=chunk,
        attrs={"task": "classification", "classes": list("abcde")},
    ) as w:
        rng = np.random.default_rng(0)
        for _ in range(n // chunk):
            w.append(np.zeros((chunk, 1), np.uint8), rng.integers(0, 5, chunk).astype(np.int32))
    st = open_store(tmp_path / "big.zarr")
    make_partition(st, 2, "dirichlet", out=tmp_path / "warm")  # modules imported, caches filled
    tracemalloc.start()
    try:
        p = make_partition(st, 100, "dirichlet", alpha=0.5, seed=0, out=tmp_path / "p")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.sizes().sum() == n
    assert peak < n * 2, peak  # a permutation of the rows is n * 8 bytes, an int32 owner per row n * 4


def test_a_loader_over_a_clients_rows_streams_exactly_them(tmp_path: Path) -> None:
    from pipeline.loader import ChunkLoader

    st = make_store(tmp_path / "s.zarr", n=3000, chunk_rows=500)  # X[:, 0] is the row id
    p = make_partition(st, 3, "iid", seed=2, out=tmp_path / "p")
    rows = p.rows(1)[p.rows(1) < 1500]  # chunks 0-2 only
    os.remove(Path(st.path, "X", "c", "4", "0"))  # never read
    st = open_store(st.path)
    with ChunkLoader(st, rows=rows, batch_size=64, normalize=False, seed=1) as loader:
        assert loader.n_rows == len(rows) and len(loader.units) == 3
        for epoch in (0, 1):
            got = np.concatenate([X[:, 0] for X, _ in loader.epoch(epoch)]).astype(np.int64)
            np.testing.assert_array_equal(np.sort(got), rows)
    held = {"fraction": 0.2, "seed": 3, "keep": "train"}
    with ChunkLoader(st, rows=rows, batch_size=64, normalize=False, holdout=held) as loader:
        keep = rows[~held_out_mask(st, 0, 3000, 0.2, 3)[rows]]
        got = np.concatenate([X[:, 0] for X, _ in loader.epoch(0)]).astype(np.int64)
        assert loader.n_rows == len(keep) and np.array_equal(np.sort(got), keep)
    with pytest.raises(ValueError, match="one of chunks, ranges and rows"):
        ChunkLoader(st, chunks=[0], rows=rows)
    with pytest.raises(ValueError, match="outside the store's 3000 rows"):
        ChunkLoader(st, rows=[5, 3000])
