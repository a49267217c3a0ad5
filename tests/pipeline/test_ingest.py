"""Ingest: every format round-trips, the bundled real datasets ingest as their sources say."""

from __future__ import annotations

import csv
import gzip
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError
from pipeline.ingest import UnseenCategoryWarning, ingest, parse_rows
from pipeline.store import StoreWriter
from tests.pipeline.helpers import DATA, read_all


def make_table(n=500, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n).round(4)
    b = rng.integers(0, 1000, n)
    color = rng.choice(["red", "green", "blue"], n)
    label = rng.choice(["yes", "no"], n)
    return a, b, color, label


def write_csv(path, delimiter=",", header=True, n=500):
    a, b, color, label = make_table(n)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(["a", "b", "color", "label"])
        for row in zip(a, b, color, label, strict=True):
            w.writerow(row)
    return a, b, color, label


def check_table_store(st, a, b, color, label):
    X, y = read_all(st)
    assert st.task == "classification" and st.classes == ["no", "yes"]
    assert st.feature_names[:2] in (["a", "b"], ["c0", "c1"])
    assert len(st.feature_names) == 5  # a, b, color one-hot (blue, green, red)
    np.testing.assert_allclose(X[:, 0], a, rtol=1e-6)
    np.testing.assert_array_equal(X[:, 1], b)
    onehot = X[:, 2:]
    np.testing.assert_array_equal(np.array(["blue", "green", "red"])[onehot.argmax(1)], color)
    assert (onehot.sum(1) == 1).all()
    np.testing.assert_array_equal(np.array(st.classes)[y], label)
    np.testing.assert_allclose(st.mean, X.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.std, X.astype(np.float64).std(0), rtol=1e-5)


@pytest.mark.parametrize(
    ("delimiter", "header", "name"),
    [(",", True, "t.csv"), (",", False, "t.csv"), ("\t", True, "t.tsv"), (";", False, "t.txt"), (" ", False, "t.data")],
)
def test_csv_round_trip(tmp_path, delimiter, header, name):
    cols = write_csv(tmp_path / name, delimiter, header)
    st = ingest(tmp_path / name, tmp_path / "s.zarr", chunk_rows=64)
    assert st.n_rows == 500 and st.n_chunks == 8 and st.attrs["source"]["header"] == header
    check_table_store(st, *cols)


def test_parquet_round_trip(tmp_path):
    a, b, color, label = make_table(3000)
    pq.write_table(
        pa.table({"a": a, "b": b, "color": color, "label": label}), tmp_path / "t.parquet", row_group_size=700
    )
    st = ingest(tmp_path / "t.parquet", tmp_path / "s.zarr", chunk_rows=1000)
    assert st.n_rows == 3000
    check_table_store(st, a, b, color, label)


def test_parquet_nulls_and_dictionary(tmp_path):
    t = pa.table(
        {
            "x": pa.array([1.0, None, 3.0, float("nan"), 5.0]),
            "c": pa.array(["u", "v", None, "v", "u"]).dictionary_encode(),
            "y": pa.array([0.5, 1.5, 2.5, 3.5, 4.5]),
        }
    )
    pq.write_table(t, tmp_path / "t.parquet")
    st = ingest(tmp_path / "t.parquet", tmp_path / "s.zarr")
    X, y = read_all(st)
    assert st.task == "regression" and st.feature_names == ["x", "c=u", "c=v"]
    np.testing.assert_allclose(X[:, 0], [1, 3, 3, 3, 5])  # mean of 1, 3, 5
    assert not np.isnan(X).any()
    np.testing.assert_allclose(y, [0.5, 1.5, 2.5, 3.5, 4.5])
    assert st.y_mean[0] == pytest.approx(2.5)


def test_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (700, 6, 4), dtype=np.uint8)
    y = rng.integers(0, 10, 700)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", y)
    st = ingest(tmp_path / "x.npy", tmp_path / "a.zarr", labels=tmp_path / "y.npy", chunk_rows=100)
    Xs, ys = read_all(st)
    assert st.X.dtype == np.uint8 and st.n_features == 24 and st.classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(Xs, X.reshape(700, -1))
    np.testing.assert_array_equal(ys, y)
    for keys, compress in ((("X", "y"), False), (("x", "y"), True), (("data", "target"), False)):
        f = tmp_path / f"{keys[0]}.npz"
        (np.savez_compressed if compress else np.savez)(f, **{keys[0]: X, keys[1]: y})
        st = ingest(f, tmp_path / f"{keys[0]}.zarr", rows="100:650")
        Xs, ys = read_all(st)
        np.testing.assert_array_equal(Xs, X.reshape(700, -1)[100:650])
        np.testing.assert_array_equal(ys, y[100:650])


def test_npy_float_target_column_and_nan(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(400, 4)).astype(np.float64)
    A[5, 1] = np.nan
    A[9, 2] = np.inf
    np.save(tmp_path / "a.npy", A)
    st = ingest(tmp_path / "a.npy", tmp_path / "a.zarr")  # target: last column, regression
    X, y = read_all(st)
    assert st.task == "regression" and X.dtype == np.float32 and st.n_features == 3
    assert np.isfinite(X).all()
    assert X[5, 1] == pytest.approx(np.nanmean(np.where(np.isinf(A[:, 1]), np.nan, A[:, 1])), rel=1e-5)
    np.testing.assert_allclose(y, A[:, 3], rtol=1e-6)
    st = ingest(tmp_path / "a.npy", tmp_path / "b.zarr", missing="drop")
    assert st.n_rows == 398
    with pytest.raises(IngestError, match=r"column 1 .* row 5"):
        ingest(tmp_path / "a.npy", tmp_path / "c.zarr", missing="reject")


def write_idx(path, arr, gz):
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[arr.dtype.type]
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 300).astype(np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"img-idx3-ubyte{sfx}", images, gz)
    write_idx(tmp_path / f"lab-idx1-ubyte{sfx}", labels, gz)
    st = ingest(
        tmp_path / f"img-idx3-ubyte{sfx}", tmp_path / "m.zarr", labels=tmp_path / f"lab-idx1-ubyte{sfx}", chunk_rows=128
    )
    X, y = read_all(st)
    assert st.X.dtype == np.uint8 and X.shape == (300, 784) and st.n_chunks == 3
    np.testing.assert_array_equal(X, images.reshape(300, -1))
    np.testing.assert_array_equal(y, labels)
    assert st.classes == [str(i) for i in range(10)]


def test_missing_policies_and_like(tmp_path):
    (tmp_path / "train.csv").write_text("num,cat,label\n1,a,x\n?,b,y\n3,,x\n5,a,y\n7,a,x\n")
    (tmp_path / "test.csv").write_text("num,cat,label\nNA,zzz,y\n2,b,x\n")
    st = ingest(tmp_path / "train.csv", tmp_path / "tr.zarr")
    X, _ = read_all(st)
    assert st.feature_names == ["num", "cat=a", "cat=b"]
    np.testing.assert_allclose(X[:, 0], [1, 4, 3, 5, 7])  # mean of 1, 3, 5, 7
    np.testing.assert_array_equal(X[2, 1:], [1, 0])  # missing category -> most frequent ("a")
    assert st.attrs["source"]["missing_imputed"] == {"num": 1, "cat": 1}
    assert ingest(tmp_path / "train.csv", tmp_path / "d.zarr", missing="drop").n_rows == 3
    with pytest.raises(IngestError, match=r"column 'num' .* data row 1"):
        ingest(tmp_path / "train.csv", tmp_path / "r.zarr", missing="reject")
    with pytest.warns(UnseenCategoryWarning, match=r"column 'cat': 1 row\(s\), e.g. 'zzz'"):
        te = ingest(tmp_path / "test.csv", tmp_path / "te.zarr", like=tmp_path / "tr.zarr")
    Xt, yt = read_all(te)
    assert te.feature_names == st.feature_names and te.classes == st.classes
    np.testing.assert_allclose(Xt, [[4, 0, 0], [2, 0, 1]])  # train mean; unknown category all zero
    np.testing.assert_array_equal(yt, [1, 0])
    np.testing.assert_array_equal(te.mean, st.mean)
    assert te.attrs["source"]["unknown_categories"] == {"cat": 1}


def test_ordinal_encoding_and_drop(tmp_path):
    rows = [f"{i},k{i % 20},{i % 3},{i % 2}" for i in range(200)]
    (tmp_path / "t.csv").write_text("n,code,junk,label\n" + "\n".join(rows) + "\n")
    st = ingest(tmp_path / "t.csv", tmp_path / "s.zarr", drop=["junk"])
    X, y = read_all(st)
    assert st.feature_names == ["n", "code"]  # 20 categories > 16: ordinal
    cats = st.attrs["encodings"][1]["categories"]
    np.testing.assert_array_equal(np.array(cats)[X[:, 1].astype(int)], [f"k{i % 20}" for i in range(200)])
    assert st.classes == ["0", "1"]
    st = ingest(
        tmp_path / "t.csv", tmp_path / "o.zarr", encoding="onehot", target="label", task="regression", force=True
    )
    assert st.n_features == 1 + 20 + 1 and st.task == "regression"


def test_rows_option():
    assert parse_rows("0:16000") == (0, 16000)
    assert parse_rows("16000:") == (16000, None)
    assert parse_rows(slice(5, 9)) == (5, 9)
    with pytest.raises(IngestError, match="START:STOP"):
        parse_rows("abc")


def test_interrupted_ingest_leaves_nothing(tmp_path, monkeypatch):
    write_csv(tmp_path / "t.csv", n=3000)
    original = StoreWriter.append
    calls = {"n": 0}

    def flaky(self, X, y):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, X, y)

    monkeypatch.setattr(StoreWriter, "append", flaky)
    monkeypatch.setattr("pipeline.ingest.CSV_BLOCK", 4096)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "t.csv", tmp_path / "s.zarr", chunk_rows=100)
    assert sorted(os.listdir(tmp_path)) == ["t.csv"]


# ------------------------------------------------------------------------------------------
# The bundled real datasets, compared with the source parsed by the csv module
# ------------------------------------------------------------------------------------------


def _rows(path, delimiter=",", skip_header=False):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter, skipinitialspace=True) if r and not r[0].startswith("|")]
    return rows[1:] if skip_header else rows


def test_adult(tmp_path):
    tr = ingest(DATA / "adult/adult.data", tmp_path / "tr.zarr")
    te = ingest(DATA / "adult/adult.test", tmp_path / "te.zarr", like=tmp_path / "tr.zarr")
    assert (tr.n_rows, te.n_rows) == (32561, 16281)
    assert tr.classes == te.classes == ["<=50K", ">50K"]
    cats = [e for e in tr.attrs["encodings"] if e["kind"] != "numeric"]
    assert len(cats) == 8
    assert tr.feature_names == te.feature_names
    for st, path in ((tr, DATA / "adult/adult.data"), (te, DATA / "adult/adult.test")):
        rows = _rows(path)
        assert len(rows) == st.n_rows
        X, y = read_all(st)
        labels = np.array([r[-1].rstrip(".") for r in rows])
        np.testing.assert_array_equal(np.array(st.classes)[y], labels)
        np.testing.assert_array_equal(X[:, 0], [float(r[0]) for r in rows])  # age
        assert np.isfinite(X).all()
    workclass = [r[1] for r in _rows(DATA / "adult/adult.data")]
    assert tr.attrs["source"]["missing_imputed"]["c1"] == workclass.count("?")


def test_letter(tmp_path):
    path = DATA / "letter/letter-recognition.data"
    st = ingest(path, tmp_path / "l.zarr", target=0)
    rows = _rows(path)
    X, y = read_all(st)
    assert st.n_rows == len(rows) == 20000 and st.n_features == 16 and X.dtype == np.uint8
    assert st.classes == [chr(ord("A") + i) for i in range(26)]
    np.testing.assert_array_equal(np.array(st.classes)[y], [r[0] for r in rows])
    np.testing.assert_array_equal(X, np.array([[int(v) for v in r[1:]] for r in rows]))


def test_shuttle(tmp_path):
    path = DATA / "shuttle/shuttle.trn"
    st = ingest(path, tmp_path / "s.zarr")
    rows = _rows(path, delimiter=" ")
    X, y = read_all(st)
    assert st.n_rows == len(rows) and st.task == "classification" and len(st.classes) == 7
    np.testing.assert_array_equal(np.array(st.classes)[y], [r[-1] for r in rows])
    np.testing.assert_array_equal(X, np.array([[float(v) for v in r[:-1]] for r in rows], np.float32))
    te = ingest(DATA / "shuttle/shuttle.tst", tmp_path / "t.zarr", like=tmp_path / "s.zarr")
    assert te.n_rows == 14500


def test_california_housing(tmp_path):
    path = DATA / "california_housing/housing.csv"
    st = ingest(path, tmp_path / "h.zarr", target="median_house_value")
    rows = _rows(path, skip_header=True)
    X, y = read_all(st)
    assert st.task == "regression" and st.n_rows == len(rows) == 20640
    assert st.attrs["source"]["missing_imputed"] == {"total_bedrooms": 207}
    assert sum(r[4] == "" for r in rows) == 207
    assert "ocean_proximity=NEAR BAY" in st.feature_names
    np.testing.assert_allclose(y, [float(r[8]) for r in rows], rtol=1e-6)
    tb = st.feature_names.index("total_bedrooms")
    known = np.array([float(r[4]) for r in rows if r[4]])
    miss = np.array([r[4] == "" for r in rows])
    np.testing.assert_allclose(X[miss, tb], known.mean(), rtol=1e-6)
    np.testing.assert_allclose(X[~miss, tb], known, rtol=1e-6)
    assert st.y_mean[0] == pytest.approx(np.mean([float(r[8]) for r in rows]), rel=1e-6)


def test_diamonds(tmp_path):
    path = DATA / "diamonds/diamonds.csv"
    st = ingest(path, tmp_path / "d.zarr", target="price")
    rows = _rows(path, skip_header=True)
    X, y = read_all(st)
    assert st.task == "regression" and st.n_rows == len(rows) == 53940
    np.testing.assert_allclose(y, [float(r[6]) for r in rows])
    cut = [n for n in st.feature_names if n.startswith("cut=")]
    assert sorted(c[4:] for c in cut) == sorted({r[1] for r in rows})
    idx = [st.feature_names.index(c) for c in cut]
    np.testing.assert_array_equal(np.array([c[4:] for c in cut])[X[:, idx].argmax(1)], [r[1] for r in rows])
    np.testing.assert_allclose(X[:, 0], [float(r[0]) for r in rows], rtol=1e-6)


def test_whitespace_aligned_columns(tmp_path):
    (tmp_path / "w.txt").write_text("  1.5   2  a\n 3.0  4   b\n10.25 6   a\n 7\t8 b\n\n")
    st = ingest(tmp_path / "w.txt", tmp_path / "w.zarr")
    X, y = read_all(st)
    assert st.attrs["source"]["delimiter"] == " " and st.classes == ["a", "b"]
    np.testing.assert_allclose(X, [[1.5, 2], [3, 4], [10.25, 6], [7, 8]])
    np.testing.assert_array_equal(y, [0, 1, 0, 1])
