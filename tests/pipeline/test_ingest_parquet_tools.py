"""Ingest of the Parquet datasets Dask, Spark and pandas write: their index columns, files whose
schemas drift, all-None columns, the tools' file layouts, and memory bounded by a column chunk
read at a time rather than by a file's size."""

from __future__ import annotations

import decimal
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError
from pipeline.ingest import _parquet_batches, ingest
from tests.pipeline.helpers import read_all

RNG = np.random.default_rng(7)
N = 300
A = RNG.normal(size=N)
B = RNG.integers(0, 100, N)
C = RNG.choice(["x", "y", "z"], N)
LABEL = np.where(A > 0, "pos", "neg")
ID = RNG.permutation(N) * 3  # an index of no range


def table(lo: int = 0, hi: int = N) -> pa.Table:
    return pa.table({"a": A[lo:hi], "b": B[lo:hi], "c": C[lo:hi], "label": LABEL[lo:hi]})


def pandas_file(path, t: pa.Table, index: np.ndarray, name: str | None) -> None:
    """``t`` written as pandas writes a frame with a non-range index (Dask: the name
    ``__null_dask_index__``): the index as the last column, ``__index_level_0__`` when unnamed,
    and named in the schema's pandas metadata (:func:`test_pandas_file_is_what_pandas_writes`)."""
    field = name or "__index_level_0__"
    cols = [{"name": c, "field_name": c} for c in t.column_names] + [{"name": name, "field_name": field}]
    t = t.append_column(field, pa.array(index))
    meta = {"index_columns": [field], "columns": cols}
    pq.write_table(t.replace_schema_metadata({b"pandas": json.dumps(meta).encode()}), path)


def labels(store) -> np.ndarray:
    return np.array(store.classes)[read_all(store)[1]]


# ---- the index columns pandas and Dask write -------------------------------------------------------


def test_dask_index_column_is_neither_target_nor_feature(tmp_path):
    # what dask.dataframe's to_parquet(write_metadata_file=True) writes of a frame with a default index
    d = tmp_path / "ds"
    d.mkdir()
    for k, (lo, hi) in enumerate(((0, 100), (100, 200), (200, N))):
        pandas_file(d / f"part.{k}.parquet", table(lo, hi), np.arange(lo, hi), "__null_dask_index__")
    schema = pq.read_schema(d / "part.0.parquet")
    pq.write_metadata(schema, d / "_common_metadata")
    pq.write_metadata(schema, d / "_metadata")
    assert pq.read_schema(tmp_path / "ds" / "part.0.parquet").names[-1] == "__null_dask_index__"
    st = ingest(tmp_path / "ds", tmp_path / "s.zarr")
    assert st.task == "classification" and st.attrs["target"]["name"] == "label"
    assert st.feature_names == ["a", "b", "c=x", "c=y", "c=z"]
    np.testing.assert_array_equal(labels(st), LABEL)
    np.testing.assert_array_equal(read_all(st)[0][:, 0], A.astype(np.float32))
    # named, it is a column as before
    st = ingest(tmp_path / "ds", tmp_path / "i.zarr", target="__null_dask_index__")
    assert st.task == "regression" and st.attrs["target"]["name"] == "__null_dask_index__"
    np.testing.assert_array_equal(read_all(st)[1], np.arange(N))
    st = ingest(tmp_path / "ds", tmp_path / "d.zarr", drop=["__null_dask_index__"])
    assert st.attrs["target"]["name"] == "label"


def test_pandas_index_columns(tmp_path):
    even = B % 2 == 0
    pandas_file(tmp_path / "f.parquet", table().filter(pa.array(even)), np.nonzero(even)[0], None)  # a filtered frame
    assert "__index_level_0__" in pq.read_schema(tmp_path / "f.parquet").names
    st = ingest(tmp_path / "f.parquet", tmp_path / "f.zarr")
    assert st.attrs["target"]["name"] == "label" and "__index_level_0__" not in st.feature_names
    np.testing.assert_array_equal(labels(st), LABEL[even])
    # a named index is data: a feature placed first, and the default target stays the last data column
    pandas_file(tmp_path / "n.parquet", table(), ID, "id")
    st = ingest(tmp_path / "n.parquet", tmp_path / "n.zarr")
    assert st.attrs["target"]["name"] == "label"
    assert st.feature_names[:3] == ["id", "a", "b"]
    np.testing.assert_array_equal(read_all(st)[0][:, 0], ID)
    # a training store with such a column as a feature (a file without pandas metadata) finds it
    plain = table().filter(pa.array(even))
    plain = plain.add_column(0, "__index_level_0__", pa.array(np.nonzero(even)[0]))
    pq.write_table(plain, tmp_path / "p.parquet")
    train = ingest(tmp_path / "p.parquet", tmp_path / "p.zarr")
    assert train.feature_names[0] == "__index_level_0__"
    st = ingest(tmp_path / "f.parquet", tmp_path / "t.zarr", like=train)
    np.testing.assert_array_equal(read_all(st)[0][:, 0], np.nonzero(even)[0])


def test_pandas_file_is_what_pandas_writes(tmp_path):
    """The files above carry the index as pandas itself writes it (checked where pandas is installed)."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(table().to_pydict())
    even = B % 2 == 0
    cases = [
        (df[even], table().filter(pa.array(even)), np.nonzero(even)[0], None),
        (df.set_index(pd.Index(ID, name="id")), table(), ID, "id"),
        (
            df.set_axis(pd.Index(np.arange(N))).rename_axis("__null_dask_index__"),
            table(),
            np.arange(N),
            "__null_dask_index__",
        ),
    ]
    for k, (frame, t, index, name) in enumerate(cases):
        frame.to_parquet(tmp_path / f"pandas{k}.parquet")
        pandas_file(tmp_path / f"ours{k}.parquet", t, index, name)
        real, ours = (pq.read_table(tmp_path / f"{w}{k}.parquet") for w in ("pandas", "ours"))
        assert real.column_names == ours.column_names
        for got in (real, ours):
            meta = got.schema.pandas_metadata
            assert meta["index_columns"] == [ours.column_names[-1]]
            assert meta["columns"][-1]["name"] == name and meta["columns"][-1]["field_name"] == ours.column_names[-1]
        assert real.column(ours.column_names[-1]).to_pylist() == ours.column(ours.column_names[-1]).to_pylist()


# ---- layouts and types of the tools' datasets ----------------------------------------------------------


def expected_column(tables: list[pa.Table], name: str) -> np.ndarray:
    return np.concatenate([pc.cast(t.column(name), pa.float64()).to_numpy(zero_copy_only=False) for t in tables])


def test_spark_and_hive_layouts_keep_every_row_once_in_name_order(tmp_path):
    d = tmp_path / "spark"
    d.mkdir()
    uid = "0b7c5d4e-8f1a-4e63-9d2b-7a1f3c5e9d20"
    bounds = [0, 100, 100, 220, N]  # an empty file among them
    for k in range(len(bounds) - 1):
        t = table(bounds[k], bounds[k + 1])
        name = f"part-{k:05d}-{uid}-c000.snappy.parquet"
        pq.write_table(t, d / name, row_group_size=37, compression=["snappy", "zstd", "gzip", "none"][k])
        (d / f".{name}.crc").write_bytes(b"\x00crc")
    (d / "_SUCCESS").write_text("")
    (d / "._SUCCESS.crc").write_bytes(b"\x00")
    st = ingest(d, tmp_path / "s.zarr")
    assert st.n_rows == N
    np.testing.assert_array_equal(read_all(st)[0][:, 0], A.astype(np.float32))
    np.testing.assert_array_equal(labels(st), LABEL)
    h = tmp_path / "hive"
    for m in (1, 2, 10):  # month=2 before month=10
        (h / "year=2020" / f"month={m}").mkdir(parents=True)
        pq.write_table(
            pa.table({"a": A[m * 10 : m * 10 + 10], "label": LABEL[m * 10 : m * 10 + 10]}),
            h / "year=2020" / f"month={m}" / "part.0.parquet",
        )
    st = ingest(h, tmp_path / "h.zarr")
    assert st.feature_names[:2] == ["year", "month"]
    X = read_all(st)[0]
    np.testing.assert_array_equal(X[:, 1], np.repeat([1, 2, 10], 10))
    np.testing.assert_array_equal(
        X[:, 2], np.concatenate([A[m * 10 : m * 10 + 10] for m in (1, 2, 10)]).astype(np.float32)
    )


def test_drifting_schemas_and_types_are_exact(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    tables = []
    for k in range(3):
        r = np.random.default_rng(k)
        n = 0 if k == 2 else 400
        nint = pa.array(r.integers(-50, 50, n), pa.int64(), mask=r.random(n) < 0.1)
        cols = {
            "nint": nint,
            "mixed": pa.array(r.integers(-9, 9, n), pa.int64()) if k == 0 else pa.array(r.normal(size=n)),
            "f16": pa.array(r.normal(size=n).astype(np.float16)),
            "i8": pa.array(r.integers(-128, 127, n).astype(np.int8)),
            "u64": pa.array(r.integers(0, 2**20, n).astype(np.uint64)),
            "dec": pa.array(
                [decimal.Decimal(int(v)).scaleb(-2) for v in r.integers(-(10**6), 10**6, n)], pa.decimal128(12, 2)
            ),
            "s": pa.array(r.choice(["u", "v"], n)).dictionary_encode() if k == 0 else pa.array(r.choice(["u", "v"], n)),
            "y": pa.array(r.normal(size=n), pa.float32()),
        }
        names = list(cols) if k != 1 else list(reversed(cols))  # another column order
        t = pa.table({c: cols[c] for c in names})
        pq.write_table(t, d / f"part.{k}.parquet", row_group_size=150, compression="zstd")
        tables.append(t)
    st = ingest(d, tmp_path / "d.zarr", target="y")
    X, y = read_all(st)
    assert st.n_rows == 800
    for e in st.attrs["encodings"]:
        if e["kind"] == "numeric":
            col = expected_column(tables, e["name"])
            np.testing.assert_array_equal(X[:, e["offset"]], np.where(np.isnan(col), e["fill"], col).astype(np.float32))
    np.testing.assert_array_equal(y, expected_column(tables, "y"))
    s = np.concatenate([t.column("s").cast(pa.string()).to_numpy(zero_copy_only=False) for t in tables])
    s_enc = next(e for e in st.attrs["encodings"] if e["name"] == "s")
    np.testing.assert_array_equal(X[:, s_enc["offset"] + 1], (s == "v").astype(np.float32))


def test_all_none_column_of_one_file_is_missing_values(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(table(0, 150), d / "part.0.parquet")
    other = table(150, N)  # pandas writes a file's all-None column with the type null
    other = other.set_column(other.column_names.index("c"), "c", pa.nulls(len(other)))
    pq.write_table(other, d / "part.1.parquet")
    assert pa.types.is_null(pq.read_schema(d / "part.1.parquet").field("c").type)
    st = ingest(d, tmp_path / "s.zarr")
    assert st.n_rows == N
    X = read_all(st)[0]
    enc = next(e for e in st.attrs["encodings"] if e["name"] == "c")
    fill = enc["categories"].index(enc["fill"])
    np.testing.assert_array_equal(X[150:, enc["offset"] + fill], 1.0)
    np.testing.assert_array_equal(
        X[:150, enc["offset"] : enc["offset"] + 3].argmax(1), np.searchsorted(["x", "y", "z"], C[:150])
    )


def test_column_missing_from_one_file_is_named_and_can_be_dropped(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(table(0, 100), d / "part.0.parquet")
    pq.write_table(table(100, N).drop_columns(["b"]), d / "part.1.parquet")
    with pytest.raises(IngestError, match=r"column 'b' of .*part\.0\.parquet' is not in .*part\.1\.parquet'.*--drop b"):
        ingest(d, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    st = ingest(d, tmp_path / "s.zarr", drop=["b"])
    assert st.n_rows == N and st.feature_names == ["a", "c=x", "c=y", "c=z"]
    np.testing.assert_array_equal(labels(st), LABEL)
    # a like= ingest reads only the training store's columns: the others may come and go
    ingest(d, tmp_path / "t.zarr", like=st)
    train = ingest(d / "part.0.parquet", tmp_path / "b.zarr")
    with pytest.raises(IngestError, match="column 'b' .* training store's columns"):
        ingest(d, tmp_path / "u.zarr", like=train)


# ---- memory ------------------------------------------------------------------------------------------


def test_reading_a_file_holds_a_column_chunk_not_the_file(tmp_path):
    n = 600_000
    t = pa.table({f"f{j}": np.random.default_rng(j).normal(size=n) for j in range(8)})  # 38 MB, incompressible
    pq.write_table(t, tmp_path / "big.parquet", row_group_size=50_000, compression="none")
    del t
    size = (tmp_path / "big.parquet").stat().st_size
    peak, rows = 0, 0
    for b in _parquet_batches(tmp_path / "big.parquet", [f"f{j}" for j in range(8)]):
        rows += b.num_rows
        peak = max(peak, pa.total_allocated_bytes())
        del b
    assert rows == n
    assert peak < size / 2, f"{peak:,} bytes held while reading a {size:,}-byte file"


def test_integer_decimals_beyond_2_53_are_refused_as_integers_are(tmp_path):
    big = [decimal.Decimal(2**53 + 1)] + [decimal.Decimal(k) for k in range(N - 1)]
    y = pa.array([decimal.Decimal(int(v)) for v in B], pa.decimal128(20, 0))
    t = pa.table({"a": A, "id": pa.array(big, pa.decimal128(38, 0)), "y": y})
    pq.write_table(t, tmp_path / "d.parquet")
    with pytest.raises(IngestError, match=r"column 'id' holds the integer 9007199254740993, beyond 2\^53.*--drop id"):
        ingest(tmp_path / "d.parquet", tmp_path / "d.zarr", task="regression")
    assert not (tmp_path / "d.zarr").exists()
    st = ingest(tmp_path / "d.parquet", tmp_path / "d.zarr", task="regression", drop=["id"])
    np.testing.assert_array_equal(read_all(st)[1], B.astype(np.float64))


def test_an_empty_frame_without_columns_among_the_files(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(table(0, 150), d / "part.0.parquet")
    pq.write_table(pa.table({}), d / "part.1.parquet")  # a day without data (pandas: DataFrame()): no rows, no columns
    pq.write_table(table(150, N), d / "part.2.parquet")
    st = ingest(d, tmp_path / "s.zarr")
    assert st.n_rows == N and st.attrs["target"]["name"] == "label"
    np.testing.assert_array_equal(read_all(st)[0][:, 0], A.astype(np.float32))
    np.testing.assert_array_equal(labels(st), LABEL)
