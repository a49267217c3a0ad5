"""Ingest of files as spreadsheets, pandas and databases export them: quoted fields holding line
breaks, numbers grouped by spaces, booleans spelled TRUE/True/true."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pipeline.ingest as ingest_module
from pipeline.errors import IngestError
from pipeline.ingest import ingest
from tests.pipeline.helpers import read_all

RNG = np.random.default_rng(7)
N = 300
X1 = RNG.normal(size=N).round(3)
LABEL = np.where(X1 > 0, "up", "down")
NOTES = np.array(["plain", "two\nlines; here", 'said "hi",\r\nthen left'])[np.arange(N) % 3]


def _notes_frame() -> pd.DataFrame:
    return pd.DataFrame({"note": NOTES, "x": X1, "label": LABEL})


# ---- quoted fields holding line breaks ------------------------------------------------------------


@pytest.mark.parametrize(("sep", "decimal"), [(",", "."), (";", ",")])
def test_line_breaks_in_quoted_fields_keep_the_layout(tmp_path, sep, decimal):
    path = tmp_path / "notes.csv"
    _notes_frame().to_csv(path, sep=sep, decimal=decimal, index=False, lineterminator="\r\n")
    st = ingest(path, tmp_path / "notes.zarr")
    assert st.attrs["source"]["delimiter"] == sep and st.attrs["source"]["header"] is True
    assert st.n_rows == N and st.classes == ["down", "up"]
    assert [e["name"] for e in st.attrs["encodings"]] == ["note", "x"]
    assert sorted(st.attrs["encodings"][0]["categories"]) == sorted(set(NOTES.tolist()))
    X, y = read_all(st)
    np.testing.assert_allclose(X[:, 3], X1, rtol=1e-6)
    np.testing.assert_array_equal(np.array(st.classes)[y], LABEL)


def test_line_breaks_in_quoted_fields_across_read_blocks(tmp_path, monkeypatch):
    path = tmp_path / "notes.csv"
    _notes_frame().to_csv(path, index=False)
    monkeypatch.setattr(ingest_module, "CSV_BLOCK", 1024)  # a file of many blocks, as a large one is
    st = ingest(path, tmp_path / "notes.zarr")
    assert st.n_rows == N
    X, y = read_all(st)
    np.testing.assert_allclose(X[:, 3], X1, rtol=1e-6)
    np.testing.assert_array_equal(np.array(st.classes)[y], LABEL)


def test_a_header_name_holding_a_line_break(tmp_path):
    path = tmp_path / "h.csv"
    body = "".join(f"{X1[i]},{i % 4},{LABEL[i]}\n" for i in range(N))
    path.write_text('"price\n(EUR)",n,label\n' + body)
    st = ingest(path, tmp_path / "h.zarr")
    assert st.feature_names == ["price\n(EUR)", "n"] and st.n_rows == N
    np.testing.assert_allclose(read_all(st)[0][:, 0], X1, rtol=1e-6)


def test_a_quote_never_closed_names_the_line_it_opens(tmp_path):
    path = tmp_path / "stray.csv"
    rows = [f"{X1[i]},{LABEL[i]}" for i in range(N)]
    rows[40] = f'"{X1[40]},{LABEL[40]}'  # the quote opens a field that runs to the end of the file
    path.write_text("x,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(IngestError, match=r"the record starting on line 42 of .* a quote opening a field must close"):
        ingest(path, tmp_path / "stray.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray.csv"]


def test_a_quote_inside_a_field_is_a_character(tmp_path):
    items = np.array(['Monitor 24 " wide', 'Pipe 5" long', "Cable"])[np.arange(N) % 3]
    path = tmp_path / "inches.csv"
    path.write_text("item,x,label\n" + "".join(f"{items[i]},{X1[i]},{LABEL[i]}\n" for i in range(N)))
    st = ingest(path, tmp_path / "inches.zarr")
    assert st.n_rows == N and st.attrs["encodings"][0]["categories"] == sorted(set(items.tolist()))


# ---- numbers grouped by spaces ---------------------------------------------------------------------


def _grouped(v: float, sep: str, decimal: str) -> str:
    return f"{v:,.2f}".replace(",", "\0").replace(".", decimal).replace("\0", sep)


@pytest.mark.parametrize(
    ("sep", "delimiter", "decimal"),
    [("\u00a0", ";", ","), ("\u202f", "\t", ","), (" ", ";", ","), ("\u2009", ",", "."), ("\u00a0", ",", ".")],
)
def test_thousands_separated_by_spaces_are_numbers(tmp_path, sep, delimiter, decimal):
    price = np.round(RNG.uniform(-90_000, 2_000_000, N), 2)
    lines = [delimiter.join(["price", "qty", "label"])]
    lines += [delimiter.join([_grouped(price[i], sep, decimal), str(i % 7), LABEL[i]]) for i in range(N)]
    path = tmp_path / "prices.csv"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    st = ingest(path, tmp_path / "prices.zarr")
    assert st.attrs["encodings"][0]["kind"] == "numeric" and st.feature_names == ["price", "qty"]
    X, _ = read_all(st)
    np.testing.assert_allclose(X[:, 0], price, rtol=1e-6)
    np.testing.assert_allclose(st.attrs["mean"][0], price.astype(np.float32).mean(), rtol=1e-5)
    like = ingest(path, tmp_path / "again.zarr", like=st)  # a test file of the same export reads the same
    np.testing.assert_array_equal(read_all(like)[0], X)


def test_text_with_spaced_digits_stays_text(tmp_path):
    # postcodes, names, and in a comma file numbers a plain space separates ("800 600": a screen)
    codes = np.array(["123 45", "114 28", "A 100", "10 000 B", "800 600"])[np.arange(N) % 5]
    path = tmp_path / "codes.csv"
    path.write_text("code,x,label\n" + "".join(f"{codes[i]},{X1[i]},{LABEL[i]}\n" for i in range(N)))
    st = ingest(path, tmp_path / "codes.zarr")
    assert st.attrs["encodings"][0]["categories"] == sorted(set(codes.tolist()))


# ---- booleans spelled as each tool writes them --------------------------------------------------


@pytest.mark.parametrize(("train_fmt", "test_fmt"), [("TRUE", "parquet"), ("parquet", "True"), ("True", "true")])
def test_booleans_match_the_training_store_whatever_their_case(tmp_path, train_fmt, test_fmt):
    flag = (np.arange(N) % 3 == 0) | (X1 > 1)
    churn = X1 > 0.2

    def write(fmt: str, name: str):
        frame = pd.DataFrame({"x": X1, "flag": flag, "churn": churn})
        if fmt == "parquet":
            frame.to_parquet(tmp_path / f"{name}.parquet", index=False)
            return tmp_path / f"{name}.parquet"
        spell = {"TRUE": str.upper, "True": str.title, "true": str.lower}[fmt]
        for c in ("flag", "churn"):
            frame[c] = [spell(str(v)) for v in frame[c]]
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        return tmp_path / f"{name}.csv"

    train = ingest(write(train_fmt, "train"), tmp_path / "train.zarr")
    assert train.task == "classification" and len(train.classes) == 2
    test = ingest(write(test_fmt, "test"), tmp_path / "test.zarr", like=train)
    assert test.attrs["source"]["unknown_categories"] == {}
    X, y = read_all(test)
    np.testing.assert_array_equal(X, read_all(train)[0])
    np.testing.assert_array_equal(np.array(train.classes)[y], np.array(train.classes)[read_all(train)[1]])
    true_col = [n.lower() for n in train.feature_names].index("flag=true")
    np.testing.assert_array_equal(X[:, true_col], flag)


# ---- columns without a name: the index pandas and R write, a delimiter ending each line -----------


def test_the_index_pandas_and_r_write_to_csv_is_no_feature(tmp_path):
    frame = pd.DataFrame({"x": X1, "k": np.arange(N) % 5, "label": LABEL})
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv")  # the index as a first column without a name: ",x,k,label"
    frame[frame.k != 2].to_csv(tmp_path / "kept.csv")  # a filtered frame's index has gaps
    r_style = tmp_path / "r.csv"  # write.csv: quoted names, row names from 1
    r_style.write_text('"","x","k","label"\n' + "".join(f'"{i + 1}",{X1[i]},{i % 5},"{LABEL[i]}"\n' for i in range(N)))
    reference = ingest(tmp_path / "t.parquet", tmp_path / "p.zarr")
    for name in ("t", "r"):
        st = ingest(tmp_path / f"{name}.csv", tmp_path / f"{name}.zarr")
        assert st.feature_names == reference.feature_names == ["x", "k"]
        assert st.attrs["source"]["left_out"] == ["c0"]
        np.testing.assert_array_equal(read_all(st)[0], read_all(reference)[0])
        np.testing.assert_array_equal(read_all(st)[1], read_all(reference)[1])
    assert ingest(tmp_path / "kept.csv", tmp_path / "kept.zarr").feature_names == ["x", "k"]
    # read back without index_col and written again: pandas names the old index "Unnamed: 0"
    pd.read_csv(tmp_path / "t.csv").to_csv(tmp_path / "twice.csv")
    pd.read_csv(tmp_path / "t.csv").to_csv(tmp_path / "once.csv", index=False)
    for name, out in (("twice", ["c0", "Unnamed: 0"]), ("once", ["Unnamed: 0"])):
        st = ingest(tmp_path / f"{name}.csv", tmp_path / f"{name}.zarr")
        assert st.feature_names == ["x", "k"] and st.attrs["source"]["left_out"] == out
    test = ingest(tmp_path / "t.csv", tmp_path / "test.zarr", like=reference)
    np.testing.assert_array_equal(read_all(test)[0], read_all(reference)[0])
    # named by --target, or columns given by position: every column of the file counts
    assert ingest(tmp_path / "t.csv", tmp_path / "n.zarr", target="c0").attrs["target"]["name"] == "c0"
    assert ingest(tmp_path / "t.csv", tmp_path / "i.zarr", target=3).feature_names == ["c0", "x", "k"]


def test_a_first_column_without_a_name_holding_data_stays(tmp_path):
    region = np.array(["north", "south", "east"])[np.arange(N) % 3]
    path = tmp_path / "pivot.csv"
    path.write_text(",x,label\n" + "".join(f"{region[i]},{X1[i]},{LABEL[i]}\n" for i in range(N)))
    assert ingest(path, tmp_path / "p.zarr").feature_names == ["c0=east", "c0=north", "c0=south", "x"]
    shuffled = tmp_path / "shuffled.csv"  # row numbers out of order: a column of data as far as we know
    order = RNG.permutation(N)
    shuffled.write_text(",x,label\n" + "".join(f"{i},{X1[i]},{LABEL[i]}\n" for i in order))
    assert ingest(shuffled, tmp_path / "s.zarr").feature_names == ["c0", "x"]


@pytest.mark.parametrize("head", ["x;k;label;\n", "x;k;label\n", ""])  # the header ends with one too, or not
def test_a_delimiter_ending_each_line_makes_no_column(tmp_path, head):
    path = tmp_path / "trail.csv"
    path.write_text(head + "".join(f"{str(X1[i]).replace('.', ',')};{i % 4};{LABEL[i]};\n" for i in range(N)))
    st = ingest(path, tmp_path / "trail.zarr")
    assert st.n_rows == N and st.classes == ["down", "up"] and len(st.feature_names) == 2
    assert st.attrs["source"]["missing_imputed"] == {}
    X, y = read_all(st)
    np.testing.assert_allclose(X[:, 0], X1, rtol=1e-6)
    np.testing.assert_array_equal(np.array(st.classes)[y], LABEL)


def test_a_value_after_the_last_delimiter_is_refused_naming_the_fix(tmp_path):
    path = tmp_path / "trail.csv"
    path.write_text("x,label,\n" + "".join(f"{X1[i]},{LABEL[i]},\n" for i in range(N)) + "1.5,up,late\n")
    with pytest.raises(IngestError, match=r"data row 300 \(0-based\) holds 'late'.*--drop 2"):
        ingest(path, tmp_path / "trail.zarr")
    assert not (tmp_path / "trail.zarr").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["trail.csv"]
    st = ingest(path, tmp_path / "trail.zarr", drop=[2])
    assert st.n_rows == N + 1 and st.feature_names == ["x"]


# ---- Excel's delimiter line ------------------------------------------------------------------------


@pytest.mark.parametrize(("sep", "bom"), [(";", ""), (",", "\ufeff"), ("\t", "")])
def test_excels_sep_line_names_the_delimiter(tmp_path, sep, bom):
    decimal = "," if sep != "," else "."
    body = "".join(f"{str(X1[i]).replace('.', decimal)}{sep}{i % 3}{sep}{LABEL[i]}\r\n" for i in range(N))
    path = tmp_path / "excel.csv"
    path.write_text(f"{bom}sep={sep}\r\nx{sep}k{sep}label\r\n" + body, encoding="utf-8")
    st = ingest(path, tmp_path / "excel.zarr")
    assert st.attrs["source"]["delimiter"] == sep and st.feature_names == ["x", "k"] and st.n_rows == N
    X, y = read_all(st)
    np.testing.assert_allclose(X[:, 0], X1, rtol=1e-6)
    np.testing.assert_array_equal(np.array(st.classes)[y], LABEL)


# ---- the header pandas writes for a frame of an array -------------------------------------------


@pytest.mark.parametrize("index", [True, False])
def test_column_positions_as_names_are_the_header(tmp_path, index):
    features = RNG.normal(size=(N, 3)).round(3)
    frame = pd.DataFrame(features)  # columns 0, 1, 2
    frame[3] = (features[:, 0] > 0).astype(int)
    frame.to_csv(tmp_path / "array.csv", index=index)
    st = ingest(tmp_path / "array.csv", tmp_path / "array.zarr")
    assert st.attrs["source"]["header"] is True and st.n_rows == N  # not a data row of its own
    assert st.feature_names == ["0", "1", "2"] and st.classes == ["0", "1"]
    X, y = read_all(st)
    np.testing.assert_allclose(X, features, rtol=1e-6)
    np.testing.assert_array_equal(y, frame[3].to_numpy())


def test_a_first_row_of_positions_repeated_below_is_data(tmp_path):
    rows = ["0,1,2,3"] + [f"{i % 4},{(i + 1) % 4},{(i + 2) % 4},{3 if i % 4 == 0 else i % 3}" for i in range(N)]
    (tmp_path / "codes.csv").write_text("\n".join(rows) + "\n")  # "0,1,2,3" comes back at row 1: no header
    st = ingest(tmp_path / "codes.csv", tmp_path / "codes.zarr")
    assert st.attrs["source"]["header"] is False and st.n_rows == N + 1


# ---- a spreadsheet's error values in numeric columns ---------------------------------------------


def test_spreadsheet_error_values_are_named_with_the_option_that_reads_them(tmp_path):
    a = [str(v) for v in X1]
    b = [str(i % 9) for i in range(N)]
    a[10], a[20], b[30] = "#DIV/0!", "#N/A", "#VALUE!"
    path = tmp_path / "sheet.csv"
    path.write_text("a,b,label\n" + "".join(f"{a[i]},{b[i]},{LABEL[i]}\n" for i in range(N)))
    with pytest.raises(IngestError, match=r"'#DIV/0!' at data row 10.*--missing-values '\?,NA,#DIV/0!,#N/A,#VALUE!'$"):
        ingest(path, tmp_path / "sheet.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.csv"]
    st = ingest(path, tmp_path / "sheet.zarr", missing_values="?,NA,#DIV/0!,#N/A,#VALUE!")  # the one rerun
    assert st.attrs["source"]["missing_imputed"] == {"a": 2, "b": 1}


# ---- Windows-1252 text ------------------------------------------------------------------------------


def test_windows_text_is_named_as_cp1252_and_reads_with_it(tmp_path):
    items = np.array(["Café 5 €", "It’s", "naïve"])[np.arange(N) % 3]
    path = tmp_path / "win.csv"
    text = "item;x;label\r\n" + "".join(f"{items[i]};{str(X1[i]).replace('.', ',')};{LABEL[i]}\r\n" for i in range(N))
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(IngestError, match=r"byte 0xe9 on line 2 .*iconv -f cp1252 .*--text-encoding \(e\.g\. cp1252\)"):
        ingest(path, tmp_path / "win.zarr")
    st = ingest(path, tmp_path / "win.zarr", text_encoding="cp1252")
    assert st.attrs["encodings"][0]["categories"] == sorted(set(items.tolist()))
    latin = tmp_path / "latin.csv"  # no byte of Windows' own: Latin-1 is named, as before
    latin.write_bytes(text.replace("€", "EUR").replace("’", "'").encode("latin-1"))
    with pytest.raises(IngestError, match=r"iconv -f latin1 .*--text-encoding \(e\.g\. latin-1\)"):
        ingest(latin, tmp_path / "latin.zarr")
