"""Defects a new-user audit of `pipeline ingest` / `inspect` found: silent data loss, wrong
results, tracebacks and misleading output (one test, or a few, per finding)."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError, StoreError
from pipeline.ingest import UnseenCategoryWarning, ingest
from tests.pipeline.helpers import invoke as run
from tests.pipeline.helpers import one_line_error, read_all

AB = "a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n7,8,dog\n"


# ---- 1: integers beyond 2^53 ----------------------------------------------------------------------


def test_csv_integers_beyond_2_53_are_refused(tmp_path):
    (tmp_path / "bigy.csv").write_text("a,y\n1,9007199254740993\n2,9007199254740992\n3,9007199254740993\n5,7\n")
    with pytest.raises(IngestError, match=r"column 'y' holds the integer 9007199254740993, beyond 2\^53"):
        ingest(tmp_path / "bigy.csv", tmp_path / "o.zarr")
    (tmp_path / "bigx.csv").write_text("id,y\n9007199254740993,a\n2,b\n3,a\n")
    with pytest.raises(IngestError, match=r"column 'id' holds the integer .* --drop id"):
        ingest(tmp_path / "bigx.csv", tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_numpy_int64_labels_beyond_2_53_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "y.npy", np.array([2**53 + 1, 2**53, 2**53 + 1, 2**53]))
    with pytest.raises(IngestError, match=r"the labels '.*y.npy' hold the integer 9007199254740993, beyond 2\^53"):
        ingest(tmp_path / "x.npy", tmp_path / "o.zarr", labels=tmp_path / "y.npy")


# ---- 2: text Arrow parses as NaN ------------------------------------------------------------------


@pytest.mark.parametrize("token", ["-nan", "+nan", "nAn", "NaN(123)", "-NAN"])
def test_nan_spellings_are_missing(tmp_path, token):
    (tmp_path / "n.csv").write_text(f"a,b,label\n1,2,x\n{token},4,y\n5,6,x\n7,8,y\n")
    with pytest.raises(IngestError, match=rf"column 'a' has a missing or infinite value \('{re.escape(token)}'\)"):
        ingest(tmp_path / "n.csv", tmp_path / "o.zarr", missing="reject")
    st = ingest(tmp_path / "n.csv", tmp_path / "o.zarr")
    X, _ = read_all(st)
    assert np.isfinite(X).all() and X[1, 0] == pytest.approx(13 / 3, rel=1e-6)
    assert np.isfinite(st.mean).all() and st.attrs["source"]["missing_imputed"] == {"a": 1}


def test_nan_regression_target_is_missing(tmp_path):
    (tmp_path / "r.csv").write_text("a,t\n1,0.5\n2,-nan\n3,1.5\n4,2.5\n")
    with pytest.raises(IngestError, match=r"target column 't' is missing \('-nan'\)"):
        ingest(tmp_path / "r.csv", tmp_path / "o.zarr", task="regression")
    st = ingest(tmp_path / "r.csv", tmp_path / "o.zarr", task="regression", missing="drop")
    assert st.n_rows == 3 and np.isfinite(read_all(st)[1]).all()


def test_a_nan_reaching_the_store_is_refused():
    from pipeline.ingest import _check_no_nan
    from pipeline.ingest_plan import IngestPlan, TargetPlan

    plan = IngestPlan(["a", "b"], [], TargetPlan("y", "regression", False, None, None), np.dtype("f4"), 8, "x", 2)
    _check_no_nan(np.ones((2, 2), np.float32), np.zeros(2, np.float32), plan, 0)
    with pytest.raises(IngestError, match=r"NaN or infinite value reached the store's features \(feature 'b'\)"):
        _check_no_nan(np.array([[1, 2], [3, np.nan]], np.float32), np.zeros(2, np.float32), plan, 0)


# ---- 3: Parquet booleans and numbers meeting categories -------------------------------------------


def _mix(tmp_path):
    t = pa.table(
        {
            "flag": [True, False, True, False, True, None],
            "v": [1.5, 2.0, 2.5, 3.0, 0.5, 1.0],
            "y": ["p", "q", "p", "q", "p", "q"],
        }
    )
    pq.write_table(t, tmp_path / "mix.parquet")
    pacsv.write_csv(t, tmp_path / "mix.csv")


def test_parquet_booleans_like_a_csv_store(tmp_path):
    _mix(tmp_path)
    train = ingest(tmp_path / "mix.csv", tmp_path / "train.zarr")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenCategoryWarning)
        st = ingest(tmp_path / "mix.parquet", tmp_path / "test.zarr", like=train.path)
    assert st.feature_names == ["flag=false", "flag=true", "v"]
    np.testing.assert_array_equal(read_all(st)[0], read_all(train)[0])
    assert st.attrs["source"]["unknown_categories"] == {}


def test_csv_and_parquet_of_the_same_table_give_the_same_store(tmp_path):
    _mix(tmp_path)
    a = ingest(tmp_path / "mix.csv", tmp_path / "a.zarr")
    b = ingest(tmp_path / "mix.parquet", tmp_path / "b.zarr")
    assert a.feature_names == b.feature_names and a.attrs["encodings"] == b.attrs["encodings"]
    np.testing.assert_array_equal(read_all(a)[0], read_all(b)[0])
    # and either store serves as the --like store of the other format
    ingest(tmp_path / "mix.csv", tmp_path / "c.zarr", like=b.path)
    ingest(tmp_path / "mix.parquet", tmp_path / "d.zarr", like=a.path)


def test_dataset_files_disagreeing_on_a_type_keep_every_value(tmp_path):
    d = tmp_path / "mixdir"
    d.mkdir()
    pq.write_table(pa.table({"grade": [1, 2, 1, 2], "v": [1.0, 2, 3, 4], "label": list("xyxy")}), d / "p0.parquet")
    pq.write_table(
        pa.table({"grade": list("ABABCA"), "v": [1.0, 2, 3, 4, 5, 6], "label": list("xyxyxy")}), d / "p1.parquet"
    )
    st = ingest(d, tmp_path / "o.zarr")
    assert st.feature_names == ["grade=1", "grade=2", "grade=A", "grade=B", "grade=C", "v"]
    X = read_all(st)[0]
    assert (X[:, :5].sum(axis=1) == 1).all()  # every row has its grade
    assert st.attrs["source"]["unknown_categories"] == {}


def test_unseen_category_warning_names_the_store_and_no_none(tmp_path):
    (tmp_path / "tr.csv").write_text("c,label\nu,x\nv,y\nu,x\nv,y\n")
    (tmp_path / "te.csv").write_text("c,label\nw,x\n,y\n")
    tr = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    with pytest.warns(UnseenCategoryWarning) as rec:
        ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=tr.path)
    msg = str(rec[0].message)
    assert f"the training store {tr.path!r}" in msg and "None" not in msg and "'w'" in msg


# ---- 4: thousands separators ----------------------------------------------------------------------


def test_quoted_thousands_are_numbers(tmp_path):
    rows = "".join(f'"{v:,}",{i % 5},{i % 2}\n' for i, v in enumerate(range(500, 5000, 37)))
    (tmp_path / "p.csv").write_text("price,rooms,y\n" + rows)
    st = ingest(tmp_path / "p.csv", tmp_path / "o.zarr")
    assert st.attrs["encodings"][0]["kind"] == "numeric"
    np.testing.assert_array_equal(read_all(st)[0][:, 0], np.arange(500, 5000, 37))


def test_thousands_among_text_are_refused(tmp_path):
    (tmp_path / "p.csv").write_text('p,y\n"1,234",a\nabc,b\nxyz,a\ndef,b\n')
    with pytest.raises(IngestError, match=r"column 'p' holds numbers with thousands separators \('1,234'.*--drop p"):
        ingest(tmp_path / "p.csv", tmp_path / "o.zarr")


# ---- 7: labels that do not round-trip as numbers --------------------------------------------------


def test_code_labels_keep_their_text(tmp_path):
    (tmp_path / "c.csv").write_text("a,b,code\n1,2,007\n3,4,7\n5,6,010\n7,8,10\n9,9,01\n")
    st = ingest(tmp_path / "c.csv", tmp_path / "o.zarr")
    assert st.classes == ["007", "01", "010", "10", "7"]
    assert np.array(st.classes)[read_all(st)[1]].tolist() == ["007", "7", "010", "10", "01"]
    (tmp_path / "n.csv").write_text("a,y\n1,1\n2,2\n3,10\n4,2\n")  # plain integers stay numbers
    assert ingest(tmp_path / "n.csv", tmp_path / "n.zarr").attrs["target"]["kind"] == "numeric"


# ---- 8: Parquet datasets --------------------------------------------------------------------------


def test_dataset_files_in_natural_order(tmp_path):
    d = tmp_path / "dask_pq"
    d.mkdir()
    for k in range(12):
        i = np.arange(k * 10, (k + 1) * 10, dtype=float)
        pq.write_table(pa.table({"i": i, "label": np.where(i % 2 == 0, "x", "y")}), d / f"part.{k}.parquet")
    st = ingest(d, tmp_path / "o.zarr", rows="20:30")
    assert read_all(st)[0][:, 0].tolist() == list(range(20, 30))


def test_hive_partitions_are_columns(tmp_path):
    n = 40
    t = pa.table(
        {"i": np.arange(n, dtype=float), "label": np.where(np.arange(n) % 2, "y", "x"), "year": [2020, 2021] * 20}
    )
    pq.write_to_dataset(t, tmp_path / "hive", partition_cols=["year"])
    st = ingest(tmp_path / "hive", tmp_path / "o.zarr")
    assert st.feature_names == ["year", "i"] and st.attrs["target"]["name"] == "label"
    X = read_all(st)[0]
    assert sorted(set(X[:, 0].tolist())) == [2020, 2021] and (X[:, 0] == 2020 + X[:, 1] % 2).all()
    st = ingest(tmp_path / "hive", tmp_path / "y.zarr", target="year")
    assert st.classes == ["2020", "2021"]


# ---- 9: --labels where it does not apply ----------------------------------------------------------


def test_labels_refused_for_tables_and_npz(tmp_path):
    (tmp_path / "tr.csv").write_text(AB)
    np.save(tmp_path / "y.npy", np.array(["p", "q", "p", "q"]))
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 2)), y=np.array(["a", "b", "a", "b"]))
    pq.write_table(pacsv.read_csv(tmp_path / "tr.csv"), tmp_path / "tr.parquet")
    for src, fmt in (("tr.csv", "csv"), ("tr.parquet", "parquet"), ("d.npz", "npz")):
        with pytest.raises(IngestError, match=rf"--labels applies to .npy features and IDX images, not {fmt}"):
            ingest(tmp_path / src, tmp_path / "o.zarr", labels=tmp_path / "y.npy")
    assert not (tmp_path / "o.zarr").exists()


# ---- 13: a destination inside a store -------------------------------------------------------------


def test_destination_inside_a_store_is_refused(tmp_path):
    (tmp_path / "tr.csv").write_text(AB)
    tr = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    before = sorted(os.listdir(tmp_path / "tr.zarr"))
    for kw in ({"like": tr.path}, {}):
        with pytest.raises(IngestError, match=r"lies inside the Zarr store .*tr.zarr"):
            ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr" / "inner.zarr", **kw)
    assert sorted(os.listdir(tmp_path / "tr.zarr")) == before
    ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr", force=True)  # still replaceable


# ---- 14-17: tracebacks ----------------------------------------------------------------------------


def test_duplicate_column_names(tmp_path):
    (tmp_path / "dup.csv").write_text("a,a,a.1,y\n1,2,3,x\n4,5,6,y\n7,8,9,x\n")
    st = ingest(tmp_path / "dup.csv", tmp_path / "o.zarr")
    assert st.feature_names == ["a", "a.2", "a.1"] and read_all(st)[0][0].tolist() == [1, 2, 3]
    t = pa.Table.from_arrays([pa.array([1, 2, 3]), pa.array([4, 5, 6]), pa.array(list("xyx"))], ["a", "a", "label"])
    pq.write_table(t, tmp_path / "dup.parquet")
    r = run("ingest", tmp_path / "dup.parquet", tmp_path / "p.zarr")
    one_line_error(r, "column 'a' appears twice in", "rename one")


def test_delimiter_names_and_bad_delimiters(tmp_path):
    (tmp_path / "g.csv").write_text(AB)
    (tmp_path / "s.csv").write_text(AB.replace(",", ";"))
    assert ingest(tmp_path / "g.csv", tmp_path / "c.zarr", delimiter="comma").feature_names == ["a", "b"]
    assert ingest(tmp_path / "s.csv", tmp_path / "s.zarr", delimiter="semicolon").feature_names == ["a", "b"]
    for bad in (";;", "", "commas"):
        one_line_error(
            run("ingest", tmp_path / "g.csv", tmp_path / "d.zarr", "--delimiter", bad), "is not one character"
        )


def test_unwritable_destination_refused_before_reading(tmp_path, monkeypatch):
    import pipeline.ingest as ing

    (tmp_path / "g.csv").write_text(AB)

    def no_read(*a, **k):
        raise AssertionError("the source was read")

    monkeypatch.setattr(ing, "_sniff_csv", no_read)
    one_line_error(
        run("ingest", tmp_path / "g.csv", tmp_path / "g.csv" / "x.zarr"), "cannot create the store", "Not a directory"
    )
    one_line_error(run("ingest", tmp_path / "g.csv", "/proc/x.zarr"), "cannot create the store")
    assert sorted(os.listdir(tmp_path)) == ["g.csv"]


def test_huge_chunk_rows_and_wrong_text_encoding(tmp_path):
    (tmp_path / "g.csv").write_text(AB)
    st = ingest(tmp_path / "g.csv", tmp_path / "c.zarr", chunk_rows=100_000_000_000)
    assert st.n_rows == 4 and st.chunk_rows <= 1024
    one_line_error(
        run("ingest", tmp_path / "g.csv", tmp_path / "u.zarr", "--text-encoding", "utf-16"), "is not utf-16 text"
    )


# ---- 18, 19: encodings and compression ------------------------------------------------------------


def test_utf16_with_a_byte_order_mark_is_detected(tmp_path):
    text = "a\tcity\tlabel\n" + "".join(f"{i}\tZ{i % 2}\t{'xy'[i % 2]}\n" for i in range(20))
    (tmp_path / "u16.txt").write_text(text, encoding="utf-16")
    st = ingest(tmp_path / "u16.txt", tmp_path / "o.zarr")
    assert st.feature_names == ["a", "city=Z0", "city=Z1"] and st.attrs["source"]["text_encoding"] == "utf-16"


def test_zstd_and_bz2_are_refused_clearly(tmp_path):
    import bz2

    raw = AB.encode()
    with pa.CompressedOutputStream(str(tmp_path / "t.csv.zst"), "zstd") as f:
        f.write(raw)
    (tmp_path / "t.bz2data").write_bytes(bz2.compress(raw))
    with pytest.raises(IngestError, match=r"'.*t.csv.zst' is zstd-compressed, which is not read; decompress it"):
        ingest(tmp_path / "t.csv.zst", tmp_path / "o.zarr")
    with pytest.raises(IngestError, match=r"is zstd-compressed"):
        ingest(tmp_path / "t.csv.zst", tmp_path / "o.zarr", format="csv")
    with pytest.raises(IngestError, match=r"is bzip2-compressed"):
        ingest(tmp_path / "t.bz2data", tmp_path / "o.zarr", format="csv")
    assert not (tmp_path / "o.zarr").exists()


# ---- 12: inspect of a --like store ----------------------------------------------------------------


def test_inspect_like_store_shows_its_own_statistics(tmp_path):
    (tmp_path / "tr.csv").write_text(AB)
    (tmp_path / "te.csv").write_text("a,b,label\n100,200,cat\n300,400,dog\n500,600,cat\n")
    tr = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=tr.path)
    r = run("inspect", tmp_path / "te.zarr")
    assert r.exit_code == 0, r.output
    assert "training store" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("a "))
    assert line.split()[1:] == ["300", "163.3", "4", "2.236"]
    plain = run("inspect", tmp_path / "tr.zarr").output
    assert "training store" not in plain


# ---- 10, 11: comments -----------------------------------------------------------------------------


def test_comment_lines_of_the_data_width_are_skipped(tmp_path):
    (tmp_path / "cm.csv").write_text("name,b,label\nfoo,2,x\nbar,4,y\n#baz,6,x\nqux,8,y\n")
    st = ingest(tmp_path / "cm.csv", tmp_path / "o.zarr", comment="#")
    assert st.n_rows == 3 and "name=#baz" not in st.feature_names
    (tmp_path / "cm2.csv").write_text("a,b,label\n1,2,x\n3,4,y\n#5,6,x\n7,8,y\n")
    assert ingest(tmp_path / "cm2.csv", tmp_path / "o2.zarr", comment="#").n_rows == 3


def test_pipe_delimited_first_field_empty_is_data(tmp_path):
    (tmp_path / "pipe.txt").write_text("|2|x\n3|4|y\n5|6|x\n7|8|y\n")
    st = ingest(tmp_path / "pipe.txt", tmp_path / "o.zarr")
    assert st.n_rows == 4 and read_all(st)[0][:, 1].tolist() == [2, 4, 6, 8]


# ---- 6, 20: warning lines -------------------------------------------------------------------------


def test_command_warns_about_imputed_cells_and_rounded_integers(tmp_path):
    (tmp_path / "na.csv").write_text("region,sales,label\nEU,1,x\nNA,2,y\nEU,3,x\nNA,4,y\nAS,5,x\nEU,6,y\n")
    r = run("ingest", tmp_path / "na.csv", tmp_path / "na.zarr")
    assert r.exit_code == 0, r.output
    assert "warning: missing values" in r.stderr and "column 'region': 2 -> 'EU'" in r.stderr
    pq.write_table(pa.table({"id": pa.array([16777217, 16777218, 3]), "y": [0, 1, 0]}), tmp_path / "i.parquet")
    r = run("ingest", tmp_path / "i.parquet", tmp_path / "i.zarr")
    assert r.exit_code == 0 and "integers beyond 2^24 are stored rounded" in r.stderr and "'id'" in r.stderr
    assert StoreError  # imported for the error classes the command maps


def test_regression_targets_are_stored_unrounded(tmp_path) -> None:
    """A regression target keeps float64: float32 would round 1e8 + 0.25 k to multiples of 8,
    and every metric computed on the store (evaluate, validation) would score the rounding."""
    from pipeline.loader import ChunkLoader
    from pipeline.loop import prepare_targets
    from pipeline.store import open_store

    n = 400
    vals = 1e8 + 3 + 0.25 * np.arange(n)
    x = np.arange(n, dtype=np.float64) % 7
    csv = tmp_path / "big.csv"
    pacsv.write_csv(pa.table({"x": x, "price": vals}), str(csv))
    pq.write_table(pa.table({"x": x, "price": vals}), str(tmp_path / "big.parquet"))
    for src in (csv, tmp_path / "big.parquet"):
        st = ingest(src, tmp_path / f"{src.suffix[1:]}.zarr", target="price", chunk_rows=128)
        assert st.y.dtype == np.float64
        np.testing.assert_array_equal(st.y[:], vals)
        t = st.attrs["target"]
        assert t["mean"][0] == pytest.approx(vals.mean(), rel=1e-15)
        assert t["std"][0] == pytest.approx(vals.std(), rel=1e-12)
    # the loader hands training the targets as stored: standardized in float64, then float32
    st = open_store(tmp_path / "csv.zarr")
    loader = ChunkLoader(st, batch_size=64, shuffle=False)
    ys = [y for _, y in loader.epoch(0)]
    got = np.concatenate([prepare_targets(y, st.attrs["target"])[:, 0] for y in ys])
    want = ((vals - vals.mean()) / vals.std()).astype(np.float32)
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy"])
def test_a_feature_beyond_float32s_range_is_refused_naming_it(tmp_path, fmt):
    """1e39 fits a float64 but not the store's float32 features: it became infinity and the
    command ended with "internal error ... please report this"; it is refused naming the column
    and the fix, and nothing is created."""
    a = np.array([1.0, 2.0, 1e39, 3.0])
    if fmt == "csv":
        src = tmp_path / "s.csv"
        src.write_text("a,t\n" + "".join(f"{v:g},{i % 2}\n" for i, v in enumerate(a)))
        args = [src, tmp_path / "s.zarr"]
    elif fmt == "parquet":
        src = tmp_path / "s.parquet"
        pq.write_table(pa.table({"a": a, "t": [0, 1, 0, 1]}), src)
        args = [src, tmp_path / "s.zarr"]
    else:
        np.save(tmp_path / "s.npy", a.reshape(-1, 1))
        np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
        args = [tmp_path / "s.npy", tmp_path / "s.zarr", "--labels", tmp_path / "y.npy"]
    name = "x0" if fmt == "npy" else "a"
    line = one_line_error(run("ingest", *args), f"{name!r} holds 1e+39 at ", "row 2", "beyond the range of")
    assert "scale the column" in line and "--drop" in line and "internal error" not in line
    assert not (tmp_path / "s.zarr").exists()


def test_a_regression_target_too_large_to_standardize_is_refused(tmp_path):
    """A target near 1e308: its squares overflow, so the store was written with std [None] and
    training then failed with non-finite parameters; it is refused at ingest, nothing created."""
    src = tmp_path / "t.csv"
    src.write_text("a,t\n1,1e308\n2,-1e308\n3,1.5e308\n")
    line = one_line_error(run("ingest", src, tmp_path / "t.zarr", "--task", "regression"), "too large to standardize")
    assert "'t'" in line and "scale the column" in line
    assert not (tmp_path / "t.zarr").exists()


def test_inspect_shows_how_the_sources_text_was_read(tmp_path):
    """The decimal mark and the missing-value tokens ingest chose are what --like ingests follow
    and models compare; inspect shows them (they were only in the store's attributes)."""
    (tmp_path / "eu.csv").write_text("a;b;y\n1,5;2;x\n3,25;4;y\n1.234,5;5;x\n")
    (tmp_path / "na.csv").write_text("a,y\n1,NA\n2,x\n?,y\n")
    (tmp_path / "plain.csv").write_text("a,y\n1.5,x\n2,y\n")
    assert run("ingest", tmp_path / "eu.csv", tmp_path / "eu.zarr").exit_code == 0
    assert run("ingest", tmp_path / "na.csv", tmp_path / "na.zarr", "--missing-values", "?").exit_code == 0
    assert run("ingest", tmp_path / "plain.csv", tmp_path / "plain.zarr").exit_code == 0

    def read_line(store: str) -> list[str]:
        out = run("inspect", tmp_path / store).stdout
        return [ln for ln in out.splitlines() if ln.startswith("read ")]

    assert read_line("eu.zarr") == ["read     decimal commas, 1,5 is 1.5 (dots grouping thousands; --decimal comma)"]
    assert read_line("na.zarr") == ["read     missing values '', '?' (--missing-values)"]
    assert read_line("plain.zarr") == []
