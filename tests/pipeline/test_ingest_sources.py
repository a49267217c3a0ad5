"""Ingest of the files people export: header detection, delimiters and quotes, decimal commas,
comments, byte order marks, encodings, suffixes, Parquet types and datasets, NumPy labels,
``--drop`` of the last column, ``like=`` stores without encodings and unlabelled data."""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError
from pipeline.ingest import UnseenCategoryWarning, ingest
from tests.pipeline.helpers import read_all

A = np.random.default_rng(1).normal(size=120).round(3)
B = np.random.default_rng(2).normal(size=120).round(3)
YN = np.where(A + B > 0, "yes", "no")


def labels(store):
    return np.array(store.classes)[read_all(store)[1]]


def ab_csv(path, delimiter=",", head="a,b,label\n", fmt=str, encoding="utf-8"):
    body = "".join(f"{fmt(A[i])}{delimiter}{fmt(B[i])}{delimiter}{YN[i]}\n" for i in range(len(A)))
    path.write_text(head + body, encoding=encoding)
    return path


# ---- header detection ----------------------------------------------------------------------------


def test_header_of_an_all_categorical_file(tmp_path):
    rows = "".join(f"{['red', 'green', 'blue'][i % 3]},{'SML'[(i // 3) % 3]},{YN[i]}\n" for i in range(120))
    (tmp_path / "c.csv").write_text("color,size,label\n" + rows)
    st = ingest(tmp_path / "c.csv", tmp_path / "c.zarr")
    assert st.attrs["source"]["header"] is True and st.n_rows == 120
    assert st.classes == ["no", "yes"]
    assert st.feature_names == [f"color={c}" for c in ("blue", "green", "red")] + [f"size={c}" for c in "LMS"]


def test_header_with_numeric_looking_names(tmp_path):
    rows = "".join(f"n{i % 5},{A[i]},{B[i]},{YN[i]}\n" for i in range(120))
    (tmp_path / "y.csv").write_text("name,2019,2020,label\n" + rows)
    st = ingest(tmp_path / "y.csv", tmp_path / "y.zarr")
    X, _ = read_all(st)
    assert st.n_rows == 120 and st.classes == ["no", "yes"]
    assert st.feature_names == [f"name=n{i}" for i in range(5)] + ["2019", "2020"]
    np.testing.assert_allclose(X[:, 5], A, rtol=1e-6)


def test_headerless_files_stay_headerless(tmp_path):
    rows = "".join(f"{A[i]},{['u', 'v'][i % 2]},{YN[i]}\n" for i in range(120))
    (tmp_path / "h.csv").write_text(rows)
    st = ingest(tmp_path / "h.csv", tmp_path / "h.zarr")
    assert st.attrs["source"]["header"] is False and st.n_rows == 120
    np.testing.assert_array_equal(labels(st), YN)
    # a first value seen nowhere below, in a column of many categories (letter's layout), is data
    letters = ["Z"] + [chr(ord("A") + i % 14) for i in range(119)]
    (tmp_path / "l.csv").write_text("".join(f"{letters[i]},{i % 16},{i % 7}\n" for i in range(120)))
    st = ingest(tmp_path / "l.csv", tmp_path / "l.zarr", target=0)
    assert st.attrs["source"]["header"] is False and st.n_rows == 120 and "Z" in st.classes


# ---- delimiters, decimal commas, quotes, comments, byte order marks ------------------------------------


@pytest.mark.parametrize("given", [None, ";"])
def test_semicolon_file_with_decimal_commas(tmp_path, given):
    ab_csv(tmp_path / "e.csv", ";", "a;b;label\n", fmt=lambda v: str(v).replace(".", ","))
    st = ingest(tmp_path / "e.csv", tmp_path / "e.zarr", delimiter=given)
    X, _ = read_all(st)
    assert st.attrs["source"]["delimiter"] == ";" and st.attrs["source"]["decimal_comma"] is True
    assert st.feature_names == ["a", "b"] and st.classes == ["no", "yes"]
    np.testing.assert_allclose(X, np.c_[A, B], rtol=1e-6)
    np.testing.assert_array_equal(labels(st), YN)


def test_tab_file_with_decimal_commas(tmp_path):
    ab_csv(tmp_path / "t.tsv", "\t", "a\tb\tlabel\n", fmt=lambda v: str(v).replace(".", ","))
    (tmp_path / "t.txt").write_text((tmp_path / "t.tsv").read_text().split("\n", 1)[1])  # headerless
    for name in ("t.tsv", "t.txt"):
        st = ingest(tmp_path / name, tmp_path / f"{name}.zarr")
        assert st.attrs["source"]["delimiter"] == "\t"
        np.testing.assert_allclose(read_all(st)[0], np.c_[A, B], rtol=1e-6)


def test_comma_file_keeps_commas_out_of_numbers(tmp_path):
    (tmp_path / "q.csv").write_text('a,"b",label\n' + "".join(f'{A[i]},"1,5",{YN[i]}\n' for i in range(120)))
    st = ingest(tmp_path / "q.csv", tmp_path / "q.zarr")
    assert "decimal_comma" not in st.attrs["source"] and st.feature_names == ["a", "b=1,5"]


def test_quoted_fields_hold_the_delimiter(tmp_path):
    cities = ["New York", '"Paris, France"', "Los Angeles", '"Rome, Italy"']
    rows = "".join(f"{cities[i % 4]},{A[i]},{B[i]},{YN[i]}\n" for i in range(120))
    (tmp_path / "q.csv").write_text("city,temp,humidity,label\n" + rows)
    st = ingest(tmp_path / "q.csv", tmp_path / "q.zarr")
    assert st.attrs["source"]["delimiter"] == ","
    assert st.feature_names[:4] == ["city=Los Angeles", "city=New York", "city=Paris, France", "city=Rome, Italy"]
    X, _ = read_all(st)
    np.testing.assert_allclose(X[:, 4], A, rtol=1e-6)


def test_hash_comment_before_the_header(tmp_path):
    ab_csv(tmp_path / "h.csv", head="# exported 2026-01-01\n# by a tool\na,b,label\n")
    st = ingest(tmp_path / "h.csv", tmp_path / "h.zarr")
    assert st.feature_names == ["a", "b"] and st.n_rows == 120
    np.testing.assert_array_equal(labels(st), YN)
    ab_csv(tmp_path / "k.csv", head="# exported\n#a,b,label\n")  # a "#"-prefixed header
    st = ingest(tmp_path / "k.csv", tmp_path / "k.zarr")
    assert st.feature_names == ["a", "b"] and st.n_rows == 120


def test_byte_order_mark_is_not_part_of_the_name(tmp_path):
    ab_csv(tmp_path / "b.csv", head="\ufeffa,b,label\n")
    st = ingest(tmp_path / "b.csv", tmp_path / "b.zarr", target="a")
    assert st.attrs["target"]["name"] == "a" and st.task == "regression"
    np.testing.assert_allclose(read_all(st)[1], A, rtol=1e-6)


def test_no_feature_columns_names_the_delimiter(tmp_path):
    (tmp_path / "one.csv").write_text("value\n" + "".join(f"{i}\n" for i in range(10)))
    with pytest.raises(IngestError, match=r"has 1 column\(s\) \(value\) with the delimiter ',' \(detected\)"):
        ingest(tmp_path / "one.csv", tmp_path / "o.zarr")
    (tmp_path / "two.csv").write_text("a;b\n" + "".join(f"{i};{i % 2}\n" for i in range(10)))
    with pytest.raises(IngestError, match=r"\(c0\) with the delimiter ',' \(given\); .* pass --delimiter"):
        ingest(tmp_path / "two.csv", tmp_path / "o.zarr", delimiter=",")


def test_header_only_file(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label\n")
    with pytest.raises(IngestError, match=r"has a header line \(a, b, label\) but no data rows"):
        ingest(tmp_path / "h.csv", tmp_path / "h.zarr")
    assert not (tmp_path / "h.zarr").exists()


def test_latin1_text(tmp_path):
    rows = "".join(f"caf\xe9{i % 3},{A[i]},{YN[i]}\n" for i in range(120))
    (tmp_path / "l.csv").write_text("name,a,label\n" + rows, encoding="latin-1")
    with pytest.raises(IngestError, match=r"is not utf-8 text: byte 0xe9 on line 2 .* --text-encoding"):
        ingest(tmp_path / "l.csv", tmp_path / "l.zarr")
    st = ingest(tmp_path / "l.csv", tmp_path / "l.zarr", text_encoding="latin-1")
    assert st.feature_names[:3] == ["name=caf\xe90", "name=caf\xe91", "name=caf\xe92"]
    # invalid bytes only far below the sniffed lines: pyarrow's error becomes the same advice
    (tmp_path / "late.csv").write_text("a,label\n" + "1,x\n2,y\n" * 20_000 + "3,caf\xe9\n", encoding="latin-1")
    with pytest.raises(IngestError, match=r"is not utf-8 text: byte 0xe9 on line 40002 .* --text-encoding"):
        ingest(tmp_path / "late.csv", tmp_path / "t.zarr")
    with pytest.raises(IngestError, match="unknown text encoding 'nope'"):
        ingest(tmp_path / "l.csv", tmp_path / "n.zarr", text_encoding="nope")


def test_unknown_suffix_is_refused(tmp_path):
    (tmp_path / "d.json").write_text("".join(f'{{"a": {A[i]}, "label": "{YN[i]}"}}\n' for i in range(20)))
    with pytest.raises(IngestError, match=r"\.json files are not read; supported: CSV/text .* --format"):
        ingest(tmp_path / "d.json", tmp_path / "d.zarr")
    ab_csv(tmp_path / "t.export")
    st = ingest(tmp_path / "t.export", tmp_path / "t.zarr", format="csv")
    assert st.feature_names == ["a", "b"]


# ---- columns -------------------------------------------------------------------------------------


def test_drop_of_the_last_column_moves_the_default_target(tmp_path):
    rows = "".join(f"{A[i]},{B[i]},{YN[i]},{1000 + i}\n" for i in range(120))
    (tmp_path / "i.csv").write_text("a,b,label,row_id\n" + rows)
    st = ingest(tmp_path / "i.csv", tmp_path / "i.zarr", drop=["row_id"])
    assert st.attrs["target"]["name"] == "label" and st.feature_names == ["a", "b"]
    np.testing.assert_array_equal(labels(st), YN)
    with pytest.raises(IngestError, match="column 'label' is both --target and --drop"):
        ingest(tmp_path / "i.csv", tmp_path / "j.zarr", target="label", drop=["label"])


def test_like_a_store_without_encodings(tmp_path):
    X = np.c_[A, B, A - B]
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", (A > 0).astype(np.int64))
    tr = ingest(tmp_path / "x.npy", tmp_path / "tr.zarr", labels=tmp_path / "y.npy")
    assert tr.attrs["encodings"] == [] and tr.feature_names == ["x0", "x1", "x2"]
    rows = "".join(f"{X[i, 2]},{X[i, 0]},{X[i, 1]},{int(A[i] > 0)}\n" for i in range(120))
    (tmp_path / "named.csv").write_text("x2,x0,x1,labels\n" + rows)
    te = ingest(tmp_path / "named.csv", tmp_path / "te.zarr", like=tr)
    Xt, yt = read_all(te)
    assert te.n_features == 3 and te.feature_names == tr.feature_names
    np.testing.assert_allclose(Xt, X, rtol=1e-6)
    np.testing.assert_array_equal(yt, (A > 0).astype(int))
    ab_csv(tmp_path / "ab.csv")
    with pytest.raises(
        IngestError, match=r"no column encodings\) and its features \['x0', 'x1', 'x2'\] are not columns"
    ):
        ingest(tmp_path / "ab.csv", tmp_path / "bad.zarr", like=tr, target="label")
    assert not (tmp_path / "bad.zarr").exists()


def test_unseen_categories_warn_per_column(tmp_path):
    (tmp_path / "tr.csv").write_text(
        "c,d,label\n" + "".join(f"{'uv'[i % 2]},{'pq'[i % 2]},{YN[i]}\n" for i in range(40))
    )
    (tmp_path / "te.csv").write_text("c,d,label\nu,p,yes\nw,p,no\nw,z,no\nv,q,yes\n")
    ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    with pytest.warns(
        UnseenCategoryWarning, match=r"column 'c': 2 row\(s\), e.g. 'w'; column 'd': 1 row\(s\), e.g. 'z'"
    ):
        te = ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=tmp_path / "tr.zarr")
    assert te.attrs["source"]["unknown_categories"] == {"c": 2, "d": 1}


def test_target_with_labels_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.c_[A, B])
    np.save(tmp_path / "y.npy", (A > 0).astype(np.int64))
    with pytest.raises(IngestError, match="with --labels the labels file is the target; drop --target"):
        ingest(tmp_path / "x.npy", tmp_path / "s.zarr", labels=tmp_path / "y.npy", target=0)


# ---- NumPy ---------------------------------------------------------------------------------------


def test_npy_column_and_string_labels(tmp_path):
    X = np.c_[A, B]
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "ycol.npy", (A > 0).astype(np.int64)[:, None])
    st = ingest(tmp_path / "x.npy", tmp_path / "c.zarr", labels=tmp_path / "ycol.npy")
    assert st.task == "classification" and st.classes == ["0", "1"] and st.y.shape == (120,)
    np.testing.assert_array_equal(read_all(st)[1], (A > 0).astype(int))
    ystr = np.where(A > 0, "cat", "dog")
    np.save(tmp_path / "ystr.npy", ystr)
    st = ingest(tmp_path / "x.npy", tmp_path / "s.zarr", labels=tmp_path / "ystr.npy")
    assert st.task == "classification" and st.classes == ["cat", "dog"]
    np.testing.assert_array_equal(labels(st), ystr)
    assert st.attrs["target"]["class_counts"] == [int((A > 0).sum()), int((A <= 0).sum())]
    te = ingest(tmp_path / "x.npy", tmp_path / "t.zarr", labels=tmp_path / "ystr.npy", rows="0:50", like=st)
    np.testing.assert_array_equal(labels(te), ystr[:50])
    np.save(tmp_path / "yb.npy", np.where(A > 0, b"cat", b"emu"))
    st = ingest(tmp_path / "x.npy", tmp_path / "b.zarr", labels=tmp_path / "yb.npy")
    assert st.classes == ["cat", "emu"]
    with pytest.raises(IngestError, match="are strings"):
        ingest(tmp_path / "x.npy", tmp_path / "r.zarr", labels=tmp_path / "ystr.npy", task="regression")


def test_npy_structured_and_zero_d_arrays(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(tmp_path / "z.npy", np.array(3.0))
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    with pytest.raises(IngestError, match=r"s.npy is a structured array \(fields a, b\)"):
        ingest(tmp_path / "s.npy", tmp_path / "o.zarr")
    with pytest.raises(IngestError, match=r"z.npy holds a single value \(a 0-d array\)"):
        ingest(tmp_path / "z.npy", tmp_path / "o.zarr")
    with pytest.raises(IngestError, match=r"z.npy holds a single value"):
        ingest(tmp_path / "x.npy", tmp_path / "o.zarr", labels=tmp_path / "z.npy")


# ---- Parquet -------------------------------------------------------------------------------------


def test_parquet_integers_beyond_2_53(tmp_path):
    big = pa.array([2**62 + i for i in range(120)], pa.int64())
    pq.write_table(pa.table({"big": big, "a": A, "y": (A > 0).astype(np.int64)}), tmp_path / "b.parquet")
    with pytest.raises(
        IngestError, match=r"column 'big' holds the integer 4611686018427388\d+, beyond 2\^53.*--drop big"
    ):
        ingest(tmp_path / "b.parquet", tmp_path / "b.zarr")
    st = ingest(tmp_path / "b.parquet", tmp_path / "b.zarr", drop=["big"])
    assert st.feature_names == ["a"]
    ok = pa.array([2**53 - i for i in range(120)], pa.int64())  # exactly representable: accepted
    pq.write_table(pa.table({"n": ok, "y": (A > 0).astype(np.int64)}), tmp_path / "ok.parquet")
    np.testing.assert_array_equal(
        read_all(ingest(tmp_path / "ok.parquet", tmp_path / "ok.zarr"))[0][:2, 0], [2.0**53, 2.0**53]
    )


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array(np.arange(120).astype("datetime64[s]")), r"timestamp\[ms\]"),
        (pa.array(np.arange(120).astype("datetime64[D]")), r"date32\[day\]"),
        (pa.array([b"x"] * 120, pa.binary()), "binary"),
        (pa.array([[1, 2]] * 120, pa.list_(pa.int64())), "list<element: int64>"),
    ],
)
def test_parquet_unsupported_types_name_the_column(tmp_path, column, kind):
    pq.write_table(pa.table({"a": A, "label": YN, "odd": column}), tmp_path / "t.parquet")
    with pytest.raises(
        IngestError, match=rf"column 'odd' has the type {kind}, which is not supported; leave it out with --drop odd"
    ):
        ingest(tmp_path / "t.parquet", tmp_path / "t.zarr", target="label")
    st = ingest(tmp_path / "t.parquet", tmp_path / "t.zarr", drop=["odd"])  # the last column
    assert st.feature_names == ["a"] and st.attrs["target"]["name"] == "label"


def test_parquet_decimals_are_numbers(tmp_path):
    dec = pa.array([decimal.Decimal(str(v)) for v in A], pa.decimal128(10, 3))
    pq.write_table(pa.table({"d": dec, "label": YN}), tmp_path / "d.parquet")
    st = ingest(tmp_path / "d.parquet", tmp_path / "d.zarr")
    np.testing.assert_allclose(read_all(st)[0][:, 0], A, rtol=1e-6)


def test_parquet_dataset_directory(tmp_path):
    d = tmp_path / "ds.parquet"
    d.mkdir()
    for k, (a, b) in enumerate(((0, 50), (50, 120))):
        pq.write_table(pa.table({"a": A[a:b], "label": YN[a:b]}), d / f"part-{k:06d}.parquet")
    (d / "_SUCCESS").write_text("")
    st = ingest(d, tmp_path / "d.zarr")
    assert st.n_rows == 120 and st.attrs["source"]["format"] == "parquet"
    np.testing.assert_allclose(read_all(st)[0][:, 0], A, rtol=1e-6)
    np.testing.assert_array_equal(labels(st), YN)
    pq.write_table(pa.table({"z": A[:5]}), d / "part-000009.parquet")
    with pytest.raises(IngestError, match="a dataset's files must share their columns"):
        ingest(d, tmp_path / "e.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="is a directory without Parquet files"):
        ingest(tmp_path / "empty", tmp_path / "e.zarr")


# ---- unlabelled data -----------------------------------------------------------------------------


def test_unlabelled_data_under_like(tmp_path):
    ab_csv(tmp_path / "tr.csv")
    tr = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    (tmp_path / "new.csv").write_text("b,a\n" + "".join(f"{B[i]},{A[i]}\n" for i in range(30)))
    with pytest.raises(IngestError, match="target column 'label' not found.*pass --unlabelled"):
        ingest(tmp_path / "new.csv", tmp_path / "n.zarr", like=tr)
    st = ingest(tmp_path / "new.csv", tmp_path / "n.zarr", like=tr, unlabelled=True)
    X, y = read_all(st)
    assert st.attrs["labelled"] is False and st.classes == tr.classes and st.feature_names == ["a", "b"]
    np.testing.assert_allclose(X, np.c_[A, B][:30], rtol=1e-6)
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(st.mean, tr.mean)
    with pytest.raises(IngestError, match="--unlabelled needs --like"):
        ingest(tmp_path / "new.csv", tmp_path / "m.zarr", unlabelled=True)
    from click.testing import CliRunner

    from pipeline.cli import cli

    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "n.zarr")])
    assert shown.exit_code == 0, shown.output
    assert (
        f"labels   none (ingested with --unlabelled, for predict only); classes {', '.join(tr.classes)}" in shown.output
    )
    assert "classes  0:" not in shown.output  # no class counts of zeros standing in for labels


def test_unlabelled_store_predicts_like_its_labelled_twin(tmp_path):
    """Ingest unlabelled rows under --like, predict them with a trained model: the predictions are
    those of the same rows ingested with their labels; evaluate and train refuse the store."""
    from click.testing import CliRunner
    from distributed import Client, LocalCluster

    from pipeline.cli import cli
    from pipeline.config import TrainConfig
    from pipeline.inference import predict_store
    from pipeline.model import load_model
    from pipeline.train import train

    ab_csv(tmp_path / "tr.csv")
    ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    (tmp_path / "new.csv").write_text("a,b\n" + "".join(f"{A[i]},{B[i]}\n" for i in range(40)))
    (tmp_path / "lab.csv").write_text("a,b,label\n" + "".join(f"{A[i]},{B[i]},{YN[i]}\n" for i in range(40)))
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "ingest",
            str(tmp_path / "new.csv"),
            str(tmp_path / "new.zarr"),
            "--like",
            str(tmp_path / "tr.zarr"),
            "--unlabelled",
        ],
    )
    assert r.exit_code == 0 and "unlabelled: for predict only" in r.output, r.output
    ingest(tmp_path / "lab.csv", tmp_path / "lab.zarr", like=tmp_path / "tr.zarr")
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        cfg = TrainConfig().with_overrides(["epochs=2", "validation=0", "hidden=[8]"])
        train(str(tmp_path / "tr.zarr"), cfg, tmp_path / "run", client=client)
        model = load_model(tmp_path / "run")
        for name in ("new", "lab"):
            predict_store(model, str(tmp_path / f"{name}.zarr"), str(tmp_path / f"{name}.parquet"), client)
    new, lab = (pq.read_table(tmp_path / f"{n}.parquet").to_pydict() for n in ("new", "lab"))
    assert len(new["prediction"]) == 40 and new == lab
    back = ingest(
        tmp_path / "new.parquet", tmp_path / "back.zarr", target="row", task="regression"
    )  # predict's dataset
    assert back.n_rows == 40 and all(f.startswith("prediction=") for f in back.feature_names)
    np.testing.assert_array_equal(read_all(back)[1], np.arange(40))
    r = runner.invoke(cli, ["evaluate", str(tmp_path / "run"), str(tmp_path / "new.zarr")])
    assert r.exit_code == 1 and "has no targets (ingested with --unlabelled)" in r.stderr, r.output
    r = runner.invoke(cli, ["train", str(tmp_path / "new.zarr"), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 1 and "has no targets" in r.stderr and not (tmp_path / "run2").exists()
    from pipeline.errors import StoreError

    for store, val in ((tmp_path / "new.zarr", None), (tmp_path / "tr.zarr", str(tmp_path / "new.zarr"))):
        cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[8]"] + ([f"validation_store={val!r}"] if val else []))
        with pytest.raises(StoreError, match="has no targets"):  # the API refuses before any cluster work
            train(str(store), cfg, tmp_path / "run3", client=None)
    assert not (tmp_path / "run3").exists()


def test_command_prints_unseen_category_warnings(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    (tmp_path / "tr.csv").write_text("c,label\n" + "".join(f"{'uv'[i % 2]},{YN[i]}\n" for i in range(40)))
    (tmp_path / "te.csv").write_text("c,label\nu,yes\nw,no\nw,no\n")
    ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    r = CliRunner().invoke(
        cli,
        ["ingest", str(tmp_path / "te.csv"), str(tmp_path / "te.zarr"), "--like", str(tmp_path / "tr.zarr"), "--quiet"],
    )
    assert r.exit_code == 0, r.output
    assert (
        r.stderr.startswith("warning: categories unseen in the training store") and "column 'c': 2 row(s)" in r.stderr
    )
