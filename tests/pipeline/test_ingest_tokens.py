"""What a comma in a number is (``--decimal``) and which text is a missing value
(``--missing-values``): chosen once, recorded in the store's ``source`` attribute, and followed by
``--like`` ingests so the same text means the same in the training and the test store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.errors import IngestError
from pipeline.ingest import ingest
from pipeline.store import open_store
from tests.pipeline.helpers import invoke as run
from tests.pipeline.helpers import one_line_error, read_all

# a semicolon file whose only comma numbers have three digits after one comma: 1.234 or 1234?
AMBIGUOUS = "price;qty;y\n999;1;a\n1,234;2;b\n12,500;3;a\n5;4;b\n"


# ---- decimal comma or thousands separator -----------------------------------------------------------


def test_ambiguous_commas_are_refused_naming_column_example_and_fix(tmp_path):
    (tmp_path / "p.csv").write_text(AMBIGUOUS)
    with pytest.raises(
        IngestError,
        match=r"column 'price' has numbers such as '1,234' \(data row 1, 0-based\) that read as 1\.234 with a "
        r"decimal comma or 1234 with a thousands separator.*; pass --decimal comma or --decimal point$",
    ):
        ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()
    (tmp_path / "t.tsv").write_text(AMBIGUOUS.replace(";", "\t"))  # a tab file alike
    with pytest.raises(IngestError, match=r"column 'price' has numbers such as '1,234'"):
        ingest(tmp_path / "t.tsv", tmp_path / "t.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "t.tsv"]


def test_the_command_refuses_ambiguous_commas_in_one_line(tmp_path):
    (tmp_path / "p.csv").write_text(AMBIGUOUS)
    r = run("ingest", tmp_path / "p.csv", tmp_path / "p.zarr")
    one_line_error(r, "column 'price'", "'1,234'", "--decimal comma or --decimal point")
    assert not (tmp_path / "p.zarr").exists()
    r = run("ingest", tmp_path / "p.csv", tmp_path / "p.zarr", "--decimal", "point")
    assert r.exit_code == 0, r.output
    assert read_all(open_store(str(tmp_path / "p.zarr")))[0][:, 0].tolist() == [999, 1234, 12500, 5]


def test_decimal_option_reads_commas_either_way_and_is_recorded(tmp_path):
    (tmp_path / "p.csv").write_text(AMBIGUOUS)
    point = ingest(tmp_path / "p.csv", tmp_path / "point.zarr", decimal="point")
    comma = ingest(tmp_path / "p.csv", tmp_path / "comma.zarr", decimal="comma")
    np.testing.assert_array_equal(read_all(point)[0][:, 0], [999, 1234, 12500, 5])
    np.testing.assert_allclose(read_all(comma)[0][:, 0], [999, 1.234, 12.5, 5], rtol=1e-6)
    assert point.attrs["source"]["decimal_comma"] is False and comma.attrs["source"]["decimal_comma"] is True


def test_several_groups_mean_thousands_for_the_whole_file(tmp_path):
    # 1,234,567 can only be thousands: the file's 1,234 are thousands too (one convention per file)
    (tmp_path / "p.csv").write_text("price;pop;y\n1,234;1,234,567;a\n999;2,000,000;b\n12,500;15;a\n5;7;b\n")
    st = ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    X, _ = read_all(st)
    np.testing.assert_array_equal(X[:, 0], [1234, 999, 12500, 5])
    np.testing.assert_array_equal(X[:, 1], [1234567, 2000000, 15, 7])
    assert st.feature_names == ["price", "pop"] and st.attrs["source"]["decimal_comma"] is False


def test_both_conventions_in_one_file_are_refused(tmp_path):
    (tmp_path / "p.csv").write_text("w;pop;y\n0,5;1,234,567;a\n1,25;2,000,000;b\n2;15;a\n3;7;b\n")
    with pytest.raises(
        IngestError,
        match=r"column 'w' has '0,5' at data row 0 \(0-based\), a number with a decimal comma, but column 'pop' "
        r"has '1,234,567' at data row 0, with thousands separators; write every number of the file one way",
    ):
        ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


def test_a_given_decimal_refuses_numbers_only_the_other_reading_fits(tmp_path):
    (tmp_path / "p.csv").write_text("w;pop;y\n0,5;1;a\n1,25;2;b\n2;15;a\n3;7;b\n")
    with pytest.raises(IngestError, match=r"column 'w' has '0,5' .* but --decimal point reads commas as thousands"):
        ingest(tmp_path / "p.csv", tmp_path / "p.zarr", decimal="point")
    (tmp_path / "t.csv").write_text("w;pop;y\n1;1,234,567;a\n2;2;b\n2;15;a\n3;7;b\n")
    with pytest.raises(IngestError, match=r"'1,234,567' .* but --decimal comma reads commas as decimal commas; pass"):
        ingest(tmp_path / "t.csv", tmp_path / "t.zarr", decimal="comma")
    with pytest.raises(IngestError, match=r"unknown --decimal 'dot'; choose auto, comma"):
        ingest(tmp_path / "t.csv", tmp_path / "t.zarr", decimal="dot")
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "t.zarr").exists()


def test_unambiguous_decimal_commas_decide_and_like_follows_them(tmp_path):
    # 0,25 and 3,75 can only be decimal commas: the file's 1,250 is 1.25, recorded for --like ingests
    (tmp_path / "tr.csv").write_text("a;b;y\n0,25;1,250;p\n3,75;2;q\n1;4;p\n2;5;q\n")
    train = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    np.testing.assert_allclose(read_all(train)[0], [[0.25, 1.25], [3.75, 2], [1, 4], [2, 5]], rtol=1e-6)
    assert train.attrs["source"]["decimal_comma"] is True
    # a comma-delimited test file with a quoted "1,250": read as the training store read it
    (tmp_path / "te.csv").write_text('a,b,y\n1,"1,250",p\n"0,5",2,q\n')
    test = ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=train)
    np.testing.assert_allclose(read_all(test)[0], [[1, 1.25], [0.5, 2]], rtol=1e-6)
    assert test.attrs["source"]["decimal_comma"] is True


def test_like_follows_a_thousands_store_and_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "tr.csv").write_text("price;qty;y\n1,234,567;1;a\n999;2;b\n12,500;3;a\n5;4;b\n")
    train = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    (tmp_path / "te.csv").write_text("price;qty;y\n1,250;1;a\n7;2;b\n")  # alone it would be refused as ambiguous
    test = ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=train)
    np.testing.assert_array_equal(read_all(test)[0][:, 0], [1250, 7])
    with pytest.raises(IngestError, match=r"--decimal comma contradicts the --like store .*; drop --decimal"):
        ingest(tmp_path / "te.csv", tmp_path / "te2.zarr", like=train, decimal="comma")
    (tmp_path / "dec.csv").write_text("price;qty;y\n0,5;1;a\n7;2;b\n")
    with pytest.raises(
        IngestError,
        match=r"column 'price' has '0,5' .* a number with a decimal comma, but the --like store .* reads commas as "
        r"thousands separators; write it with a decimal point \(0\.5\)",
    ):
        ingest(tmp_path / "dec.csv", tmp_path / "te2.zarr", like=train)
    assert not (tmp_path / "te2.zarr").exists()


def test_the_store_records_the_reading_only_when_a_number_had_a_comma(tmp_path):
    # comma file: "3,655" is 3655 (unchanged), recorded so a --like ingest of a ';' file reads 1,250 as 1250
    (tmp_path / "c.csv").write_text('price,y\n"3,655",a\n12,b\n"1,000",a\n7,b\n')
    st = ingest(tmp_path / "c.csv", tmp_path / "c.zarr")
    assert read_all(st)[0][:, 0].tolist() == [3655, 12, 1000, 7] and st.attrs["source"]["decimal_comma"] is False
    # no comma in any number: either reading gives this store, and a --like ingest decides from its data
    (tmp_path / "s.csv").write_text("a;b;y\n1;2;p\n3;4;q\n5;6;p\n")
    plain = ingest(tmp_path / "s.csv", tmp_path / "s.zarr")
    assert "decimal_comma" not in plain.attrs["source"]
    (tmp_path / "s2.csv").write_text("a;b;y\n1,5;2;p\n3;4;q\n")
    np.testing.assert_allclose(read_all(ingest(tmp_path / "s2.csv", tmp_path / "s2.zarr", like=plain))[0][0], [1.5, 2])


def test_decimal_and_missing_values_apply_to_text_sources_only(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(8.0).reshape(4, 2))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
    with pytest.raises(IngestError, match=r"--decimal applies to the text of CSV and Parquet sources, not npy"):
        ingest(tmp_path / "x.npy", tmp_path / "o.zarr", labels=tmp_path / "y.npy", decimal="comma")
    with pytest.raises(IngestError, match=r"--missing-values applies to the text of CSV and Parquet sources, not npy"):
        ingest(tmp_path / "x.npy", tmp_path / "o.zarr", labels=tmp_path / "y.npy", missing_values="?")
    assert not (tmp_path / "o.zarr").exists()


# ---- missing-value tokens --------------------------------------------------------------------------

REGIONS = "region,v,y\nNA,1,a\nEU,2,b\nNA,3,a\nNone,4,b\n,5,a\nEU,6,b\n?,7,a\nNA,8,b\n"


def test_missing_values_keep_na_and_none_as_categories(tmp_path):
    (tmp_path / "r.csv").write_text(REGIONS)
    default = ingest(tmp_path / "r.csv", tmp_path / "d.zarr")  # NA and None are missing by default
    assert default.feature_names == ["region=EU", "v"] and "missing_values" not in default.attrs["source"]
    st = ingest(tmp_path / "r.csv", tmp_path / "r.zarr", missing_values="?")
    assert st.feature_names == ["region=EU", "region=NA", "region=None", "v"]
    assert st.attrs["source"]["missing_values"] == ["", "?"]
    assert st.attrs["source"]["missing_imputed"] == {"region": 2}  # the empty field and "?"
    X, _ = read_all(st)
    assert X[:, :3].sum(axis=0).tolist() == [2, 5, 1]  # the two missing cells became NA, the most frequent


def test_only_the_empty_field_is_missing(tmp_path):
    (tmp_path / "r.csv").write_text(REGIONS)
    st = ingest(tmp_path / "r.csv", tmp_path / "r.zarr", missing_values=[""])
    assert st.feature_names == ["region=?", "region=EU", "region=NA", "region=None", "v"]
    assert st.attrs["source"]["missing_values"] == [""] and st.attrs["source"]["missing_imputed"] == {"region": 1}
    with pytest.raises(IngestError, match=r"column 'region' has a missing or infinite value \(''\) at data row 4"):
        ingest(tmp_path / "r.csv", tmp_path / "x.zarr", missing_values="", missing="reject")


def test_nan_spellings_stay_missing_whatever_the_list(tmp_path):
    (tmp_path / "n.csv").write_text("a,b,y\n1,2,p\nNaN,4,q\nnan,6,p\n-nan,8,q\n3,inf,p\n5,10,q\n")
    st = ingest(tmp_path / "n.csv", tmp_path / "n.zarr", missing_values="")
    X, _ = read_all(st)
    assert np.isfinite(X).all() and st.feature_names == ["a", "b"]
    np.testing.assert_allclose(X[:, 0], [1, 3, 3, 3, 3, 5], rtol=1e-6)
    assert st.attrs["source"]["missing_imputed"] == {"a": 3, "b": 1}


def test_numbers_cannot_be_missing_value_tokens(tmp_path):
    (tmp_path / "r.csv").write_text(REGIONS)
    with pytest.raises(IngestError, match=r"--missing-values .-999. is a number, which is never a missing value"):
        ingest(tmp_path / "r.csv", tmp_path / "r.zarr", missing_values="NA,-999")
    assert not (tmp_path / "r.zarr").exists()


def test_like_follows_the_stores_missing_values_and_refuses_another_list(tmp_path):
    (tmp_path / "r.csv").write_text(REGIONS)
    train = ingest(tmp_path / "r.csv", tmp_path / "tr.zarr", missing_values="?")
    (tmp_path / "te.csv").write_text("region,v,y\nNA,1,a\nNone,2,b\n?,3,a\n")
    test = ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=train)
    X, _ = read_all(test)
    assert test.feature_names == train.feature_names and test.attrs["source"]["missing_values"] == ["", "?"]
    np.testing.assert_array_equal(X[:, :3], [[0, 1, 0], [0, 0, 1], [0, 1, 0]])  # "?" -> the training fill NA
    with pytest.raises(
        IngestError,
        match=r"--missing-values 'NA' differs from the list the --like store .* was ingested with \('\?'\); "
        r"drop --missing-values",
    ):
        ingest(tmp_path / "te.csv", tmp_path / "te2.zarr", like=train, missing_values="NA")
    assert not (tmp_path / "te2.zarr").exists()


def test_parquet_strings_follow_the_missing_values(tmp_path):
    t = pa.table({"region": ["NA", "EU", None, "NA", "None", "EU"], "v": [1.0, 2, 3, 4, 5, 6], "y": list("ababab")})
    pq.write_table(t, tmp_path / "r.parquet")
    st = ingest(tmp_path / "r.parquet", tmp_path / "r.zarr", missing_values="")
    assert st.feature_names == ["region=EU", "region=NA", "region=None", "v"]
    assert st.attrs["source"]["missing_imputed"] == {"region": 1}  # the null


def test_the_command_takes_missing_values_and_names_them_in_its_warning(tmp_path):
    (tmp_path / "r.csv").write_text(REGIONS)
    r = run("ingest", tmp_path / "r.csv", tmp_path / "r.zarr", "--missing-values", "?")
    assert r.exit_code == 0, r.output
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: missing values")]
    assert warning == [
        "warning: missing values (empty, ?, NaN, inf) imputed, cells per column: column 'region': 2 -> 'NA' "
        "(--missing reject refuses them; --missing-values TOKENS sets which text is missing)"
    ]
    r = run("ingest", tmp_path / "r.csv", tmp_path / "d.zarr")
    assert "--missing-values TOKENS sets which text is missing" in r.stderr
    r = run("ingest", tmp_path / "r.csv", tmp_path / "x.zarr", "--like", tmp_path / "r.zarr", "--missing-values", "")
    one_line_error(r, "--missing-values '' differs from the list", "drop --missing-values")
    assert not (tmp_path / "x.zarr").exists()


# ---- dots separating thousands beside a decimal comma ---------------------------------------------

EURO = "p;q;y\n1.234,5;2;a\n2.500,25;3;b\n3,5;4;a\n999,1;5;b\n"


def test_dots_separating_thousands_read_as_numbers_beside_decimal_commas(tmp_path):
    (tmp_path / "eu.csv").write_text(EURO)
    st = ingest(tmp_path / "eu.csv", tmp_path / "eu.zarr")
    assert st.feature_names == ["p", "q"]  # not one-hot categories p=1.234,5, p=2.500,25, ...
    np.testing.assert_allclose(read_all(st)[0][:, 0], [1234.5, 2500.25, 3.5, 999.1], rtol=1e-6)
    assert st.attrs["source"]["decimal_comma"] is True and st.attrs["source"]["thousands_dot"] is True
    (tmp_path / "big.csv").write_text("a;b;y\n1.234.567,89;-12.345,678;p\n0,5;1.000.000;q\n2;3;p\n")
    X, _ = read_all(ingest(tmp_path / "big.csv", tmp_path / "big.zarr"))
    np.testing.assert_allclose(X, [[1234567.89, -12345.678], [0.5, 1e6], [2, 3]], rtol=1e-6)


def test_several_dot_groups_decide_and_one_dot_of_three_digits_is_thousands(tmp_path):
    # 1.234.567 can only be thousands: the file's dots are thousands separators, so 1.234 is 1234
    (tmp_path / "p.csv").write_text("pop;n;y\n1.234.567;1.234;a\n2.000.000;12.500;b\n999;7;a\n5;8;b\n")
    st = ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    X, _ = read_all(st)
    np.testing.assert_array_equal(X, [[1234567, 1234], [2000000, 12500], [999, 7], [5, 8]])
    assert st.feature_names == ["pop", "n"] and st.attrs["source"]["thousands_dot"] is True
    (tmp_path / "t.tsv").write_text("1.234,5\t7\ta\n2.500,25\t8\tb\n9.999,75\t9\ta\n")  # tabs, not commas, split it
    X, _ = read_all(ingest(tmp_path / "t.tsv", tmp_path / "t.zarr"))
    np.testing.assert_allclose(X, [[1234.5, 7], [2500.25, 8], [9999.75, 9]], rtol=1e-6)


def test_one_dot_of_three_digits_follows_the_files_decimal_comma(tmp_path):
    # 0,5 says the file writes decimal commas: its 1.234 is 1234 (a decimal point would mix conventions)
    (tmp_path / "p.csv").write_text("w;n;y\n0,5;1.234;a\n1,25;12.500;b\n2;7;a\n")
    st = ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    np.testing.assert_allclose(read_all(st)[0], [[0.5, 1234], [1.25, 12500], [2, 7]], rtol=1e-6)
    (tmp_path / "g.csv").write_text("w;n;y\n7;1.234;a\n1;12.500;b\n2;7;a\n")
    np.testing.assert_array_equal(
        read_all(ingest(tmp_path / "g.csv", tmp_path / "g.zarr", decimal="comma"))[0][:, 1], [1234, 12500, 7]
    )
    # without comma numbers dots stay decimal points and nothing is recorded, as before
    (tmp_path / "d.csv").write_text("w;n;y\n1.5;1.234;a\n2.25;12.500;b\n2;7;a\n")
    st = ingest(tmp_path / "d.csv", tmp_path / "d.zarr")
    np.testing.assert_allclose(read_all(st)[0], [[1.5, 1.234], [2.25, 12.5], [2, 7]], rtol=1e-6)
    assert "decimal_comma" not in st.attrs["source"] and "thousands_dot" not in st.attrs["source"]
    # a comma-delimited file is read as before: "1.234,5" and 1.234.567 are text there
    (tmp_path / "c.csv").write_text('a,b,y\n"1.234,5",1.234.567,p\n2,3,q\n')
    st = ingest(tmp_path / "c.csv", tmp_path / "c.zarr")
    assert st.feature_names == ["a=1.234,5", "a=2", "b=1.234.567", "b=3"] and "decimal_comma" not in st.attrs["source"]


def test_decimal_commas_beside_decimal_points_are_refused(tmp_path):
    (tmp_path / "m.csv").write_text("w;v;y\n3,5;1.5;a\n1;2;b\n2;7;a\n")
    with pytest.raises(
        IngestError,
        match=r"^column 'w' has '3,5' at data row 0 \(0-based\), a number with a decimal comma, but column 'v' "
        r"has '1\.5' at data row 0, with a decimal point; write every number of the file one way$",
    ):
        ingest(tmp_path / "m.csv", tmp_path / "m.zarr")
    (tmp_path / "g.csv").write_text("w;v;y\n1;0.25;a\n1.234.567;2;b\n2;7;a\n")
    with pytest.raises(
        IngestError,
        match=r"column 'w' has '1\.234\.567' at data row 1 \(0-based\), a number with dots as thousands separators, "
        r"but column 'v' has '0\.25' at data row 0, with a decimal point",
    ):
        ingest(tmp_path / "g.csv", tmp_path / "g.zarr")
    r = run("ingest", tmp_path / "m.csv", tmp_path / "m.zarr")
    one_line_error(r, "'3,5'", "'1.5'", "write every number of the file one way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.csv", "m.csv"]


def test_a_decimal_point_decides_ambiguous_commas(tmp_path):
    # 2.5 says the file writes decimal points: its 1,234 is 1234, as 0,5 would make it 1.234
    (tmp_path / "p.csv").write_text("price;w;y\n1,234;2.5;a\n12,500;3;b\n999;4;a\n")
    st = ingest(tmp_path / "p.csv", tmp_path / "p.zarr")
    np.testing.assert_allclose(read_all(st)[0], [[1234, 2.5], [12500, 3], [999, 4]], rtol=1e-6)
    assert st.attrs["source"]["decimal_comma"] is False and "thousands_dot" not in st.attrs["source"]


def test_a_given_decimal_refuses_dot_numbers_only_the_other_reading_fits(tmp_path):
    (tmp_path / "p.csv").write_text("w;v;y\n1,5;1.5;a\n2;3;b\n")
    with pytest.raises(
        IngestError,
        match=r"column 'v' has '1\.5' at data row 0 \(0-based\), a number with a decimal point, but --decimal comma "
        r"reads commas as decimal commas and dots as thousands separators; pass --decimal point$",
    ):
        ingest(tmp_path / "p.csv", tmp_path / "p.zarr", decimal="comma")
    (tmp_path / "e.csv").write_text("w;v;y\n1.234,5;1;a\n2;3;b\n")
    with pytest.raises(
        IngestError,
        match=r"column 'w' has '1\.234,5' .* a number with a decimal comma, but --decimal point reads commas as "
        r"thousands separators; pass --decimal comma$",
    ):
        ingest(tmp_path / "e.csv", tmp_path / "e.zarr", decimal="point")
    (tmp_path / "g.csv").write_text("w;v;y\n1.234.567;1;a\n2;3;b\n")
    r = run("ingest", tmp_path / "g.csv", tmp_path / "g.zarr", "--decimal", "point")
    one_line_error(r, "'1.234.567'", "dots as thousands separators", "--decimal point reads dots as decimal points")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv", "g.csv", "p.csv"]


def test_like_reads_dots_as_the_store_did(tmp_path):
    (tmp_path / "tr.csv").write_text(EURO)
    train = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    # a comma-delimited test file with a quoted "1.234,5" and a 1.234: read as the training store read its numbers
    (tmp_path / "te.csv").write_text('p,q,y\n"1.234,5",1.234,a\n"0,5",2,b\n')
    test = ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=train)
    np.testing.assert_allclose(read_all(test)[0], [[1234.5, 1234], [0.5, 2]], rtol=1e-6)
    assert test.attrs["source"]["thousands_dot"] is True
    (tmp_path / "pt.csv").write_text("p;q;y\n1.5;2;a\n")
    with pytest.raises(
        IngestError,
        match=r"column 'p' has '1\.5' .* a number with a decimal point, but the --like store .* reads commas as "
        r"decimal commas and dots as thousands separators; write it with a decimal comma \(1,5\)$",
    ):
        ingest(tmp_path / "pt.csv", tmp_path / "x.zarr", like=train)
    assert not (tmp_path / "x.zarr").exists()


def test_like_a_decimal_comma_store_without_thousands_dot_reads_dots_as_decimal_points(tmp_path):
    # a decimal-comma store of an earlier version records no reading of dots: its --like ingests
    # read them as decimal points, as such stores always did, and refuse "1.234,5"
    (tmp_path / "tr.csv").write_text("p;q;y\n0,5;2;a\n2,5;3;b\n3;4;a\n")
    made = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr")
    assert made.attrs["source"]["decimal_comma"] is True and made.attrs["source"]["thousands_dot"] is True
    group = zarr.open_group(str(tmp_path / "tr.zarr"), mode="r+")
    group.attrs["source"] = {k: v for k, v in made.attrs["source"].items() if k != "thousands_dot"}
    train = open_store(tmp_path / "tr.zarr")
    (tmp_path / "te.csv").write_text("p;q;y\n1.5;1.234;a\n3,5;2;b\n")
    np.testing.assert_allclose(
        read_all(ingest(tmp_path / "te.csv", tmp_path / "te.zarr", like=train))[0], [[1.5, 1.234], [3.5, 2]], rtol=1e-6
    )
    (tmp_path / "g.csv").write_text("p;q;y\n1.234,5;1;a\n")
    with pytest.raises(
        IngestError,
        match=r"column 'p' has '1\.234,5' at data row 0 \(0-based\), a number with dots as thousands separators, but "
        r"the --like store .* reads dots as decimal points; write it without them \(1234,5\)$",
    ):
        ingest(tmp_path / "g.csv", tmp_path / "x.zarr", like=train)
    # a store whose commas were thousands separators refuses dots that separate thousands
    (tmp_path / "th.csv").write_text("p;q;y\n1,234,567;1;a\n2;3;b\n")
    thousands = ingest(tmp_path / "th.csv", tmp_path / "th.zarr")
    with pytest.raises(
        IngestError,
        match=r"'1\.234,5' .* reads commas as thousands separators; write it with a decimal point \(1234\.5\)$",
    ):
        ingest(tmp_path / "g.csv", tmp_path / "x.zarr", like=thousands)
    assert not (tmp_path / "x.zarr").exists()
