"""Ingest of messy real-world exports: names holding line breaks, amounts written with currency or
percent signs, identifier columns, and a replacement of a store killed midway."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import IngestError, StoreError
from pipeline.ingest import ingest
from pipeline.store import open_store
from tests.pipeline.helpers import DATA, invoke, one_line_error, read_all

ROOT = Path(__file__).resolve().parents[2]

# ---- inspect: names holding line breaks ----------------------------------------------------------


def test_inspect_prints_names_with_line_breaks_escaped_on_one_line(tmp_path):
    src = tmp_path / "quoted.csv"
    rows = "".join(f"{i},{i % 3},{'xy'[i % 2]},{'yes' if i % 2 else 'no'}\n" for i in range(8))
    src.write_text('"order\nid",amount,"a\tb","bought\r\nit"\n' + rows)
    st = ingest(src, tmp_path / "q.zarr")
    assert st.feature_names == ["order\nid", "amount", "a\tb=x", "a\tb=y"]
    result = invoke("inspect", st.path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("features"))
    shown = [ln.split()[0] for ln in lines[start + 1 :]]
    assert shown == ["order\\nid", "amount", "a\\tb=x", "a\\tb=y"], result.output
    assert all(
        ln.startswith(("  ", "store", "task", "X ", "y ", "codec", "size", "source", "classes", "features"))
        for ln in lines
    )


def test_inspect_prints_a_target_name_with_a_line_break_on_one_line(tmp_path):
    src = tmp_path / "reg.csv"
    src.write_text('x,"price\n(EUR)"\n' + "".join(f"{i},{i * 1.5}\n" for i in range(60)))
    st = ingest(src, tmp_path / "r.zarr", task="regression")
    result = invoke("inspect", st.path)
    assert result.exit_code == 0, result.output
    assert [ln for ln in result.output.splitlines() if ln.startswith("target")] == [
        f"target   price\\n(EUR): mean {st.attrs['target']['mean']}, std {st.attrs['target']['std']}"
    ]
    assert not any(ln.startswith("(EUR)") for ln in result.output.splitlines())


# ---- amounts with currency or percent signs ----------------------------------------------------

AMOUNTS = {
    "dollars": ("${:,.2f}", ","),
    "euros before": ("€{:.0f}", ","),
    "euros after, decimal comma": ("{:.2f} €", ";"),
    "percent": ("{:.1f}%", ","),
    "accounting negatives": ("({:,.2f})", ","),
    "currency code": ("USD {:.2f}", ","),
}


def _amounts_csv(path: Path, form: str, sep: str, n: int = 40) -> None:
    rng = np.random.default_rng(3)
    lines = [sep.join(["qty", "price", "label"])]
    for i in range(n):
        v = form.format(float(rng.uniform(1, 5000)))
        if sep == ";":
            v = v.replace(".", ",")
        lines.append(sep.join([str(i % 7), f'"{v}"', "ab"[i % 2]]))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", list(AMOUNTS))
def test_a_column_of_formatted_amounts_is_refused_naming_it_and_the_fix(tmp_path, kind):
    form, sep = AMOUNTS[kind]
    src = tmp_path / "shop.csv"
    _amounts_csv(src, form, sep)
    result = invoke("ingest", src, tmp_path / "s.zarr")
    one_line_error(result, "column 'price'", "currency or percent sign", "--drop price", "plain numbers")
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(IngestError, match="column 'price'"):
        ingest(src, tmp_path / "s.zarr")
    st = ingest(src, tmp_path / "d.zarr", drop=["price"])
    assert st.feature_names == ["qty"]


def test_formatted_amounts_among_numbers_or_like_a_numeric_store_name_the_fix(tmp_path):
    mixed = tmp_path / "mixed.csv"
    mixed.write_text('price,label\n1200,a\n"$1,300.00",b\n900,a\n1000,b\n')
    with pytest.raises(IngestError, match=r"column 'price' is numeric but has 1 value\(s\) written with a currency"):
        ingest(mixed, tmp_path / "m.zarr")
    train = tmp_path / "train.csv"
    train.write_text("price,label\n1200,a\n1300,b\n900,a\n1000,b\n")
    st = ingest(train, tmp_path / "train.zarr")
    test = tmp_path / "test.csv"
    test.write_text("price,label\n$1200,a\n12%,b\n")
    result = invoke("ingest", test, tmp_path / "test.zarr", "--like", st.path)
    one_line_error(result, "column 'price'", "2 value(s) written with a currency or percent sign", "plain numbers")
    assert not (tmp_path / "test.zarr").exists()


def test_formatted_amounts_kept_as_categories_when_an_encoding_is_given(tmp_path):
    src = tmp_path / "survey.csv"
    src.write_text("score,label\n" + "".join(f"{(i % 4) * 25}%,{'ab'[i % 2]}\n" for i in range(40)))
    st = ingest(src, tmp_path / "s.zarr", encoding="onehot")
    assert st.feature_names == ["score=0%", "score=25%", "score=50%", "score=75%"]


def test_text_that_merely_holds_a_percent_sign_stays_categories(tmp_path):
    src = tmp_path / "cloth.csv"
    src.write_text(
        "fabric,label\n" + "".join(f"{['100% cotton', 'wool 50%', 'silk'][i % 3]},a{i % 2}\n" for i in range(30))
    )
    st = ingest(src, tmp_path / "c.zarr")
    assert st.feature_names == ["fabric=100% cotton", "fabric=silk", "fabric=wool 50%"]


def test_every_formatted_column_is_named_in_one_error(tmp_path):
    src = tmp_path / "bank.csv"
    rows = "".join(f'"${i},000.00",{i}%,"({i}.50)",{"ab"[i % 2]}\n' for i in range(1, 30))
    src.write_text("balance,rate,fee,label\n" + rows)
    with pytest.raises(IngestError) as err:
        ingest(src, tmp_path / "b.zarr")
    assert "--drop balance --drop rate --drop fee" in str(err.value)


# ---- identifier columns ----------------------------------------------------------------------------


def _orders_csv(path: Path, n: int = 300) -> None:
    lines = ["order_id,email,country,amount,returned"]
    for i in range(n):
        lines.append(f"ORD-{100000 + i},user{i}@example.com,{'DE FR US'.split()[i % 3]},{i % 50}.5,{'yn'[i % 2]}")
    path.write_text("\n".join(lines) + "\n")


def test_identifier_columns_are_refused_naming_them_and_drop(tmp_path):
    src = tmp_path / "orders.csv"
    _orders_csv(src)
    result = invoke("ingest", src, tmp_path / "o.zarr")
    one_line_error(result, "'order_id' (300 distinct values in 300 rows)", "'email'", "--drop order_id --drop email")
    assert not (tmp_path / "o.zarr").exists()
    st = ingest(src, tmp_path / "o.zarr", drop=["order_id", "email"])
    assert st.feature_names == ["country=DE", "country=FR", "country=US", "amount"]
    kept = ingest(src, tmp_path / "k.zarr", encoding="ordinal")
    assert kept.feature_names == ["order_id", "email", "country", "amount"]


def test_a_column_of_dates_is_refused_saying_so(tmp_path):
    import datetime as dt

    src = tmp_path / "statement.csv"
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(200)]
    src.write_text("date,amount,kind\n" + "".join(f"{d},{i * 1.5:.2f},{'ab'[i % 2]}\n" for i, d in enumerate(days)))
    with pytest.raises(IngestError, match=r"'date' \(200 distinct values in 200 rows; dates such as '2024-01-01'"):
        ingest(src, tmp_path / "s.zarr")
    assert ingest(src, tmp_path / "s.zarr", drop=["date"]).feature_names == ["amount"]


def test_a_column_of_many_repeated_categories_is_no_identifier(tmp_path):
    src = tmp_path / "zips.csv"
    src.write_text("zip,label\n" + "".join(f"z{i % 150:03d},{'ab'[i % 2]}\n" for i in range(600)))
    st = ingest(src, tmp_path / "z.zarr")
    assert len(st.attrs["encodings"][0]["categories"]) == 150


def test_the_bundled_adult_columns_are_still_categories(tmp_path):
    st = ingest(DATA / "adult" / "adult.data", tmp_path / "adult.zarr")
    kinds = {e["name"]: (e["kind"], len(e.get("categories") or [])) for e in st.attrs["encodings"]}
    assert kinds["c13"] == ("ordinal", 41) and st.n_features == 65  # native-country, its widest


# ---- a replacement of a store killed midway --------------------------------------------------------

_KILLED = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import pipeline.store as store
    from pipeline.ingest import ingest

    src, dest, when = sys.argv[1:4]
    replace, rmtree = os.replace, shutil.rmtree

    def killed_replace(a, b):
        if when == "between" and ".tmp-" in str(a) and os.path.basename(str(b)) == os.path.basename(dest):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(a, b)

    def killed_rmtree(p, *args, **kw):
        if when == "after" and ".old-" in str(p):
            os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(p, *args, **kw)

    store.os.replace, store.shutil.rmtree = killed_replace, killed_rmtree
    ingest(src, dest, force=True)
    """
)


def _table(path: Path, n: int) -> Path:
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(n)))
    return path


def _killed_replace(tmp_path: Path, when: str) -> Path:
    """A store of 10 rows at d.zarr, then an ingest of 16 rows replacing it killed ``when``."""
    dest = tmp_path / "d.zarr"
    ingest(_table(tmp_path / "old.csv", 10), dest)
    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    new = _table(tmp_path / "new.csv", 16)
    proc = subprocess.run([sys.executable, script, new, dest, when], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert any(p.name.startswith(".d.zarr.old-") for p in tmp_path.iterdir())
    return dest


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name)


def test_an_ingest_after_one_killed_between_the_renames_finishes_its_replacement(tmp_path):
    dest = _killed_replace(tmp_path, "between")
    assert not dest.exists()
    with pytest.raises(StoreError, match=r"exists; pass --force .*moved the finished store"):
        ingest(tmp_path / "old.csv", dest)
    assert _leftovers(tmp_path) == []
    assert open_store(dest).n_rows == 16  # the killed ingest's store, finished


def test_the_command_after_a_kill_between_the_renames_says_what_it_finished(tmp_path):
    dest = _killed_replace(tmp_path, "between")
    result = invoke("ingest", tmp_path / "old.csv", dest, "--force")
    assert result.exit_code == 0, result.output
    assert "warning: moved the finished store" in result.stderr
    assert _leftovers(tmp_path) == [] and open_store(dest).n_rows == 10


def test_an_ingest_after_one_killed_before_removing_the_old_store_removes_it(tmp_path):
    dest = _killed_replace(tmp_path, "after")
    assert open_store(dest).n_rows == 16
    with pytest.warns(UserWarning, match="removed .*the old store left by a replacement"):
        st = ingest(tmp_path / "old.csv", dest, force=True)
    assert _leftovers(tmp_path) == [] and st.n_rows == 10
    np.testing.assert_array_equal(read_all(st)[0][:, 0], np.arange(10))


def test_a_store_set_aside_by_an_earlier_version_is_named_not_removed(tmp_path):
    dest = tmp_path / "d.zarr"
    ingest(_table(tmp_path / "old.csv", 10), tmp_path / ".d.zarr.old-1234abcd")
    with pytest.warns(UserWarning, match=r"\.d\.zarr\.old-1234abcd' is left from a replacement .*put it back \(mv "):
        ingest(_table(tmp_path / "new.csv", 16), dest)
    assert open_store(tmp_path / ".d.zarr.old-1234abcd").n_rows == 10
    with pytest.warns(UserWarning, match=r"remove it \(rm -r .*\.d\.zarr\.old-1234abcd\)"):
        ingest(tmp_path / "new.csv", dest, force=True)
    assert open_store(tmp_path / ".d.zarr.old-1234abcd").n_rows == 10


# ---- a wide CSV: one parse per batch, not per column ------------------------------------------------


def _wide_csv(path: Path, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    X = rng.normal(size=(n, d)).round(3)
    missing = rng.random((n, d)) < 0.02
    cells = np.where(missing, "", X.astype(str))
    colors = np.array(["red", "green", "blue"])[rng.integers(0, 3, n)]
    labels = rng.integers(0, 3, n)
    lines = [",".join([*(f"f{j}" for j in range(d)), "color", "label"])]
    lines += [",".join([*cells[i], colors[i], str(labels[i])]) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return np.where(missing, np.nan, X), labels


def test_a_wide_csv_is_parsed_once_per_batch_and_reads_as_pandas_does(tmp_path, monkeypatch):
    import pandas as pd

    import pipeline.ingest as ingest_module

    src = tmp_path / "wide.csv"
    X, labels = _wide_csv(src, 300, 400)
    monkeypatch.setattr(ingest_module, "CSV_BLOCK", 64 * 1024)  # several batches, as a large file has
    calls = []
    parse = ingest_module._parse
    monkeypatch.setattr(
        ingest_module, "_parse", lambda *a, **k: calls.append(a[1] if len(a) > 1 else "?") or parse(*a, **k)
    )
    st = ingest(src, tmp_path / "wide.zarr")
    batches = -(-src.stat().st_size // (64 * 1024))
    assert len(calls) <= 2 * batches * 3, len(calls)  # per batch of a pass: the numbers at once, the text columns
    frame = pd.read_csv(src)
    got, y = read_all(st)
    means = np.nanmean(X, axis=0)
    np.testing.assert_allclose(got[:, :400], np.where(np.isnan(X), means, X).astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(got[:, 400:].argmax(axis=1), pd.Categorical(frame["color"]).codes)
    np.testing.assert_array_equal(y, labels)
    assert [e["fill"] for e in st.attrs["encodings"][:400]] == pytest.approx(means.tolist(), rel=1e-12)


def test_parsing_the_columns_of_a_batch_together_gives_what_each_alone_does():
    import pyarrow as pa

    from pipeline.ingest import _parse, _parse_many

    columns = {
        "plain": ["1", "2.5", "", "-3e2", "inf", "NaN", "7"],
        "thousands": ["1,234", "5", "12,345.5", "?", "0", "1", "2"],
        "text": ["a", "b", "1", "NA", "c", "a", "b"],
        "arrow only": ["1", "2", "INFINITY", "3", "4", "5", "6"],
        "big": ["9007199254740993", "1", "2", "3", "4", "5", "6"],
        "spaces": ["1\u00a0234", "7", "8", "9", "10", "11", "12"],
        "nan text": ["-nan", "nan(1)", "1", "2", "3", "4", "5"],
    }
    arrays = [pa.array(v, pa.string()) for v in columns.values()]
    names = list(columns)
    for kw in ({"marks": True}, {"marks": True, "decimal_comma": True, "dot_marks": True}, {}):
        together = _parse_many(arrays, names, [None] * len(names), [None] * len(names), [False] * len(names), **kw)
        for name, arr, p in zip(names, arrays, together, strict=True):
            alone = _parse(arr, name, **kw)
            np.testing.assert_array_equal(p.values, alone.values, err_msg=name)
            for f in ("missing", "nonnum", "inf", "thousands"):
                a, b = getattr(p, f), getattr(alone, f)
                assert (a is None or not a.any()) if b is None else np.array_equal(a, b), (name, f)
            assert p.text().to_pylist() == alone.text().to_pylist() and p.big == alone.big, name
            assert [m.tolist() for m in p.marks or []] == [m.tolist() for m in alone.marks or []] or not any(
                m.any() for m in (p.marks or []) + (alone.marks or [])
            ), name


def test_a_store_set_aside_by_a_running_writer_is_left_to_it(tmp_path):
    import warnings

    from pipeline.store import _host_digest, writer_marker

    me = writer_marker()
    aside = tmp_path / f".d.zarr.old-0123abcd-{_host_digest()}-{me['pid']}-{me['started']}"
    ingest(_table(tmp_path / "old.csv", 10), aside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = ingest(_table(tmp_path / "new.csv", 16), tmp_path / "d.zarr")
    assert st.n_rows == 16 and open_store(aside).n_rows == 10
