"""Every row of docs/bad-inputs.md, run.

The table is the specification: for each row, the quoted part of its message must appear in the
one line the user sees, the exit status (or the exception the API raises) must be the row's, and
the working directory must be exactly as it was (every file byte-for-byte), apart from what the
row says is created. A row without a case here, or a case without a row, fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Row:
    id: str
    fragment: str  # the quoted part of the message ("" for an accepted input)
    exit: str  # "0", "1", "2" or an exception class name
    afterwards: str


def doc_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.fullmatch(r"[A-Z]\d+", cells[0]):
            continue
        quoted = re.findall(r"`([^`]*)`", cells[3])
        assert len(quoted) <= 1, f"row {cells[0]}: quote one fragment of the message"
        assert cells[0] not in rows, f"row {cells[0]} appears twice"
        rows[cells[0]] = Row(cells[0], quoted[0] if quoted else "", cells[4], cells[5])
    return rows


ROWS = doc_rows()


# --------------------------------------------------------------------------------------------
# Running one row
# --------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as ``/``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    exit: str
    message: str
    created: set[str] = field(default_factory=set)  # top-level names the row may create


@dataclass
class Trial:
    """The working directory of one row, and how the bad input is tried."""

    path: Path
    shared: Shared
    before: dict[str, str] | None = None
    fixture: Callable[[str], object] | None = None  # another fixture of the module, by name
    stdout: str = ""  # what the last command printed on stdout
    stderr: str = ""  # and on stderr (warnings, notes)

    def write(self, name: str, text: str) -> Path:
        p = self.path / name
        p.write_text(text)
        return p

    def copy(self, src: Path, name: str) -> Path:
        dest = self.path / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
        return dest

    def cli(self, *args: str, created: set[str] | None = None) -> Outcome:
        """Run the command in-process; the message is its last stderr line (no traceback)."""
        self.before = snapshot(self.path)
        r = CliRunner().invoke(cli, [str(a) for a in args])
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        self.stdout, stderr = r.stdout, r.stderr
        self.stderr = stderr
        assert "Traceback" not in stderr, stderr
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        message = lines[-1] if lines and r.exit_code else ""
        if r.exit_code == 1:
            assert message.startswith("error: "), stderr
        return Outcome(str(r.exit_code), message, created or set())

    def call(self, fn: Callable[[], object]) -> Outcome:
        """Call the API; the message is the exception's."""
        self.before = snapshot(self.path)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the row names the class
            return Outcome(type(exc).__name__, str(exc))
        return Outcome("0", "")


CASES: dict[str, Callable[[Trial], Outcome]] = {}


def case(row_id: str) -> Callable:
    def register(fn: Callable[[Trial], Outcome]) -> Callable[[Trial], Outcome]:
        assert row_id not in CASES, row_id
        CASES[row_id] = fn
        return fn

    return register


GOOD_CSV = "a,b,c\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n"


# -- source files ----------------------------------------------------------------------------


@case("F1")
def _(t: Trial) -> Outcome:
    return t.cli("ingest", "missing.csv", "out.zarr")


@case("F2")
def _(t: Trial) -> Outcome:
    t.write("empty.csv", "")
    return t.cli("ingest", "empty.csv", "out.zarr")


@case("F3")
def _(t: Trial) -> Outcome:
    t.write("ragged.csv", "a,b,c\n1,2,x\n3,4\n5,6,x\n")
    return t.cli("ingest", "ragged.csv", "out.zarr")


@case("F4")
def _(t: Trial) -> Outcome:
    (t.path / "bad.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
    return t.cli("ingest", "bad.parquet", "out.zarr")


@case("F5")
def _(t: Trial) -> Outcome:
    np.save(t.path / "x.npy", np.zeros((10, 3), np.float32))
    np.save(t.path / "y.npy", np.zeros(7, np.int64))
    return t.cli("ingest", "x.npy", "out.zarr", "--labels", "y.npy")


@case("F6")
def _(t: Trial) -> Outcome:
    t.write("nan.csv", "a,b,c\n1,,x\n3,4,y\n")
    return t.cli("ingest", "nan.csv", "out.zarr", "--missing", "reject")


@case("F7")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--target", "nope")


@case("F8")
def _(t: Trial) -> Outcome:
    t.write("single.csv", "a,b,c\n1,2,x\n3,4,x\n")
    return t.cli("ingest", "single.csv", "out.zarr")


@case("F9")
def _(t: Trial) -> Outcome:
    t.write("ids.csv", "s,v,y\n" + "".join(f"id{i},{i % 7},{i % 2}\n" for i in range(100_001)))
    return t.cli("ingest", "ids.csv", "out.zarr")


@case("F10")
def _(t: Trial) -> Outcome:
    t.write("hostile.csv", "../../evil,/etc/passwd,c\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n")
    out = t.cli("ingest", "hostile.csv", "out.zarr", "--quiet", created={"out.zarr"})
    from pipeline.store import open_store

    assert open_store(str(t.path / "out.zarr")).feature_names == ["../../evil", "/etc/passwd"]
    assert not (t.path.parent / "evil").exists() and not (t.path / "etc").exists()
    return out


@case("F11")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--rows", "abc")


@case("F12")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--chunk-rows", "0")


@case("F13")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    t.copy(t.shared.store4, "old.zarr")
    return t.cli("ingest", "good.csv", "old.zarr")


@case("F14")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    t.copy(t.shared.store4, "train.zarr")
    return t.cli("ingest", "good.csv", "out.zarr", "--like", "train.zarr")


_AB = [
    (0.5, -1.25, "yes"),
    (-0.75, 0.5, "no"),
    (1.5, 0.25, "yes"),
    (-2.0, -0.5, "no"),
    (0.25, 1.0, "yes"),
    (-1.0, 0.75, "no"),
]


def _ab_rows(delimiter: str = ",") -> str:
    return "".join(f"{a}{delimiter}{b}{delimiter}{y}\n" for a, b, y in _AB)


def _open(t: Trial, name: str = "out.zarr"):
    from pipeline.store import open_store

    return open_store(str(t.path / name))


@case("F25")
def _(t: Trial) -> Outcome:
    t.write(
        "allcat.csv",
        "color,size,label\n"
        + "".join(
            f"{c},{s},{y}\n"
            for c, s, y in [
                ("red", "S", "no"),
                ("green", "S", "yes"),
                ("blue", "M", "no"),
                ("red", "M", "yes"),
                ("green", "L", "no"),
                ("blue", "L", "yes"),
            ]
        ),
    )
    out = t.cli("ingest", "allcat.csv", "out.zarr", created={"out.zarr"})
    assert _open(t).classes == ["no", "yes"] and _open(t).n_rows == 6
    return out


@case("F26")
def _(t: Trial) -> Outcome:
    t.write(
        "yearhdr.csv", "name,2019,2020,label\n" + "".join(f"n{i % 2},{a},{b},{y}\n" for i, (a, b, y) in enumerate(_AB))
    )
    out = t.cli("ingest", "yearhdr.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.feature_names == ["name=n0", "name=n1", "2019", "2020"] and st.n_rows == 6
    return out


@case("F27")
def _(t: Trial) -> Outcome:
    t.write("euro.csv", "a;b;label\n" + _ab_rows(";").replace(".", ","))
    out = t.cli("ingest", "euro.csv", "out.zarr", "--delimiter", ";", created={"out.zarr"})
    np.testing.assert_allclose(_open(t).read_chunk(0)[0], [[a, b] for a, b, _ in _AB])
    return out


@case("F28")
def _(t: Trial) -> Outcome:
    t.write(
        "idlast.csv", "a,b,label,row_id\n" + "".join(f"{a},{b},{y},{1000 + i}\n" for i, (a, b, y) in enumerate(_AB))
    )
    out = t.cli("ingest", "idlast.csv", "out.zarr", "--drop", "row_id", created={"out.zarr"})
    st = _open(t)
    assert st.attrs["target"]["name"] == "label" and st.feature_names == ["a", "b"]
    return out


@case("F29")
def _(t: Trial) -> Outcome:
    np.save(t.path / "x.npy", np.arange(12.0).reshape(6, 2))
    np.save(t.path / "ycol.npy", (np.arange(6) % 2)[:, None])
    out = t.cli("ingest", "x.npy", "out.zarr", "--labels", "ycol.npy", created={"out.zarr"})
    assert _open(t).task == "classification" and _open(t).classes == ["0", "1"]
    return out


@case("F30")
def _(t: Trial) -> Outcome:
    t.write("data.json", '{"a": 0.5, "label": "yes"}\n{"a": 1.5, "label": "no"}\n')
    return t.cli("ingest", "data.json", "out.zarr")


@case("F31")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    t.copy(t.shared.store4, "synth.zarr")
    return t.cli("ingest", "good.csv", "out.zarr", "--like", "synth.zarr", "--target", "c")


@case("F32")
def _(t: Trial) -> Outcome:
    t.write(
        "cities.csv",
        "city,temp,label\n"
        + "".join(
            f"{c},{a},{y}\n" for c, (a, _, y) in zip(['"Paris, France"', "Oslo", '"Rome, Italy"'] * 2, _AB, strict=True)
        ),
    )
    out = t.cli("ingest", "cities.csv", "out.zarr", created={"out.zarr"})
    assert _open(t).feature_names == ["city=Oslo", "city=Paris, France", "city=Rome, Italy", "temp"]
    return out


@case("F33")
def _(t: Trial) -> Outcome:
    t.write("hashcomment.csv", "# exported 2026-01-01\na,b,label\n" + _ab_rows())
    out = t.cli("ingest", "hashcomment.csv", "out.zarr", created={"out.zarr"})
    assert _open(t).feature_names == ["a", "b"] and _open(t).n_rows == 6
    return out


@case("F34")
def _(t: Trial) -> Outcome:
    t.write("headeronly.csv", "a,b,label\n")
    return t.cli("ingest", "headeronly.csv", "out.zarr")


@case("F35")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"big": pa.array([2**62] * 4, pa.int64()), "y": [0, 1, 0, 1]}), t.path / "big.parquet")
    return t.cli("ingest", "big.parquet", "out.zarr")


@case("F36")
def _(t: Trial) -> Outcome:
    np.save(t.path / "x.npy", np.arange(12.0).reshape(6, 2))
    np.save(t.path / "ystr.npy", np.array(["cat", "dog"] * 3))
    out = t.cli("ingest", "x.npy", "out.zarr", "--labels", "ystr.npy", created={"out.zarr"})
    st = _open(t)
    assert st.classes == ["cat", "dog"] and st.read_chunk(0)[1].tolist() == [0, 1] * 3
    return out


@case("F37")
def _(t: Trial) -> Outcome:
    np.save(t.path / "rec.npy", np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]))
    return t.cli("ingest", "rec.npy", "out.zarr")


@case("F38")
def _(t: Trial) -> Outcome:
    np.save(t.path / "scalar.npy", np.array(3.0))
    return t.cli("ingest", "scalar.npy", "out.zarr")


@case("F39")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ts = pa.array(np.arange(6).astype("datetime64[s]"))
    pq.write_table(
        pa.table({"a": [a for a, _, _ in _AB], "label": [y for *_, y in _AB], "ts": ts}), t.path / "ts.parquet"
    )
    return t.cli("ingest", "ts.parquet", "out.zarr")


@case("F40")
def _(t: Trial) -> Outcome:
    (t.path / "latin1.csv").write_text(
        "name,a,label\n" + "".join(f"caf\xe9{i},{a},{y}\n" for i, (a, _, y) in enumerate(_AB)), encoding="latin-1"
    )
    return t.cli("ingest", "latin1.csv", "out.zarr")


@case("F41")
def _(t: Trial) -> Outcome:
    t.write("bom.csv", "\ufeffa,b,label\n" + _ab_rows())
    out = t.cli("ingest", "bom.csv", "out.zarr", "--target", "a", created={"out.zarr"})
    assert _open(t).attrs["target"]["name"] == "a"
    return out


@case("F42")
def _(t: Trial) -> Outcome:
    from pipeline.ingest import ingest

    t.write("train.csv", "c,label\n" + "".join(f"{'uv'[i % 2]},{y}\n" for i, (*_, y) in enumerate(_AB)))
    t.write("test.csv", "c,label\nu,yes\nw,no\n")
    ingest(t.path / "train.csv", t.path / "train.zarr")
    out = t.cli("ingest", "test.csv", "out.zarr", "--like", "train.zarr", created={"out.zarr"})
    assert _open(t).attrs["source"]["unknown_categories"] == {"c": 1}
    return out


@case("F43")
def _(t: Trial) -> Outcome:
    np.save(t.path / "x.npy", np.arange(12.0).reshape(6, 2))
    np.save(t.path / "y.npy", np.arange(6) % 2)
    return t.cli("ingest", "x.npy", "out.zarr", "--labels", "y.npy", "--target", "0")


@case("F44")
def _(t: Trial) -> Outcome:
    t.write("new.csv", "a,b\n1,2\n3,4\n")
    return t.cli("ingest", "new.csv", "out.zarr", "--unlabelled")


@case("F45")
def _(t: Trial) -> Outcome:
    import zarr

    t.copy(t.shared.run, "run")
    t.copy(t.shared.store4, "new.zarr")
    zarr.open_group(str(t.path / "new.zarr"), mode="r+").attrs["labelled"] = False
    return t.cli("evaluate", "run", "new.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("F46")
def _(t: Trial) -> Outcome:
    (t.path / "folder").mkdir()
    t.write("folder/notes.txt", "not data")
    return t.cli("ingest", "folder", "out.zarr")


@case("F47")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--target", "c", "--drop", "c")


@case("F48")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--text-encoding", "nope")


@case("F49")
def _(t: Trial) -> Outcome:
    t.write("one.csv", "value\n1\n2\n3\n")
    return t.cli("ingest", "one.csv", "out.zarr")


@case("F50")
def _(t: Trial) -> Outcome:
    t.write("bigy.csv", "a,y\n1,9007199254740993\n2,9007199254740992\n3,9007199254740993\n5,7\n")
    return t.cli("ingest", "bigy.csv", "out.zarr")


@case("F51")
def _(t: Trial) -> Outcome:
    np.save(t.path / "x.npy", np.zeros((4, 2), np.float32))
    np.save(t.path / "ybig.npy", np.array([2**53 + 1, 2**53, 2**53 + 1, 2**53]))
    return t.cli("ingest", "x.npy", "out.zarr", "--labels", "ybig.npy")


@case("F52")
def _(t: Trial) -> Outcome:
    t.write("nan.csv", "a,b,label\n1,2,x\n-nan,4,y\n5,6,x\n7,8,y\n")
    return t.cli("ingest", "nan.csv", "out.zarr", "--missing", "reject")


@case("F53")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.ingest import ingest

    tab = pa.table({"flag": [True, False, True, False, True, None], "v": [1.5, 2, 2.5, 3, 0.5, 1], "y": list("pqpqpq")})
    pq.write_table(tab, t.path / "mix.parquet")
    pacsv.write_csv(tab, t.path / "mix.csv")
    ingest(t.path / "mix.csv", t.path / "train.zarr")
    out = t.cli("ingest", "mix.parquet", "out.zarr", "--like", "train.zarr", created={"out.zarr"})
    assert _open(t).feature_names == ["flag=false", "flag=true", "v"]
    assert _open(t).read_chunk(0)[0][:5, :2].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]
    return out


@case("F54")
def _(t: Trial) -> Outcome:
    t.write(
        "prices.csv",
        "price,rooms,y\n" + "".join(f'"{v:,}",{i % 5},{i % 2}\n' for i, v in enumerate(range(900, 1300, 50))),
    )
    out = t.cli("ingest", "prices.csv", "out.zarr", created={"out.zarr"})
    assert _open(t).read_chunk(0)[0][:, 0].tolist() == list(range(900, 1300, 50))
    return out


@case("F55")
def _(t: Trial) -> Outcome:
    t.write("mixed.csv", 'p,y\n"1,234",a\nabc,b\nxyz,a\ndef,b\n')
    return t.cli("ingest", "mixed.csv", "out.zarr")


@case("F56")
def _(t: Trial) -> Outcome:
    t.write("codes.csv", "a,b,code\n1,2,007\n3,4,7\n5,6,010\n7,8,10\n9,9,01\n")
    out = t.cli("ingest", "codes.csv", "out.zarr", created={"out.zarr"})
    assert _open(t).classes == ["007", "01", "010", "10", "7"]
    return out


@case("F57")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tab = pa.table({"i": [float(i) for i in range(8)], "label": list("xyxyxyxy"), "year": [2020, 2021] * 4})
    pq.write_to_dataset(tab, t.path / "hive", partition_cols=["year"])
    out = t.cli("ingest", "hive", "out.zarr", created={"out.zarr"})
    assert _open(t).feature_names == ["year", "i"]
    return out


@case("F58")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    np.save(t.path / "y.npy", np.arange(4) % 2)
    return t.cli("ingest", "good.csv", "out.zarr", "--labels", "y.npy")


@case("F59")
def _(t: Trial) -> Outcome:
    from pipeline.ingest import ingest

    t.write("good.csv", GOOD_CSV)
    ingest(t.path / "good.csv", t.path / "train.zarr")
    return t.cli("ingest", "good.csv", "train.zarr/inner.zarr", "--like", "train.zarr")


@case("F60")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [pa.array([1, 2, 3]), pa.array([4, 5, 6]), pa.array(["x", "y", "x"])]
    pq.write_table(pa.Table.from_arrays(arrays, names=["a", "a", "label"]), t.path / "dup.parquet")
    return t.cli("ingest", "dup.parquet", "out.zarr")


@case("F61")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--delimiter", ";;")


@case("F62")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "good.csv/x.zarr")


@case("F63")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--text-encoding", "utf-16")


@case("F64")
def _(t: Trial) -> Outcome:
    import pyarrow as pa

    with pa.CompressedOutputStream(str(t.path / "t.csv.zst"), "zstd") as f:
        f.write(GOOD_CSV.encode())
    return t.cli("ingest", "t.csv.zst", "out.zarr", "--format", "csv")


@case("F65")
def _(t: Trial) -> Outcome:
    t.write("amb.csv", "price;qty;y\n999;1;a\n1,234;2;b\n12,500;3;a\n5;4;b\n")
    return t.cli("ingest", "amb.csv", "out.zarr")


@case("F66")
def _(t: Trial) -> Outcome:
    t.write("both.csv", "w;pop;y\n0,5;1,234,567;a\n1,25;2,000,000;b\n2;15;a\n3;7;b\n")
    return t.cli("ingest", "both.csv", "out.zarr")


def _thousands_store(t: Trial) -> None:
    from pipeline.ingest import ingest

    t.write("train.csv", "price;qty;y\n1,234,567;1;a\n999;2;b\n12,500;3;a\n5;4;b\n")
    ingest(t.path / "train.csv", t.path / "train.zarr")


@case("F67")
def _(t: Trial) -> Outcome:
    _thousands_store(t)
    t.write("test.csv", "price;qty;y\n1,250;1;a\n7;2;b\n")
    return t.cli("ingest", "test.csv", "out.zarr", "--like", "train.zarr", "--decimal", "comma")


@case("F68")
def _(t: Trial) -> Outcome:
    _thousands_store(t)
    t.write("dec.csv", "price;qty;y\n7;1;a\n0,5;2;b\n")
    return t.cli("ingest", "dec.csv", "out.zarr", "--like", "train.zarr")


_REGIONS = "region,v,y\nNA,1,a\nEU,2,b\nNA,3,a\nNone,4,b\n,5,a\nEU,6,b\n?,7,a\nNA,8,b\n"


@case("F69")
def _(t: Trial) -> Outcome:
    t.write("regions.csv", _REGIONS)
    out = t.cli("ingest", "regions.csv", "out.zarr", "--missing-values", "?", created={"out.zarr"})
    st = _open(t)
    assert st.feature_names == ["region=EU", "region=NA", "region=None", "v"]
    assert st.attrs["source"]["missing_values"] == ["", "?"]
    return out


@case("F70")
def _(t: Trial) -> Outcome:
    from pipeline.ingest import ingest

    t.write("train.csv", _REGIONS)
    ingest(t.path / "train.csv", t.path / "train.zarr", missing_values="?")
    t.write("test.csv", "region,v,y\nNA,1,a\nNone,2,b\n")
    return t.cli("ingest", "test.csv", "out.zarr", "--like", "train.zarr", "--missing-values", "NA")


@case("F71")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", "out.zarr", "--missing-values=-999")


@case("F72")
def _(t: Trial) -> Outcome:
    t.write("mixed.csv", "w;v;y\n3,5;1.5;a\n1;2;b\n2;7;a\n")
    return t.cli("ingest", "mixed.csv", "out.zarr")


@case("F73")
def _(t: Trial) -> Outcome:
    t.write("eu.csv", "pop;qty;y\n1.234.567;1;a\n2.000.000;2;b\n999;3;a\n")
    return t.cli("ingest", "eu.csv", "out.zarr", "--decimal", "point")


_EURO = "p;q;y\n1.234,5;2;a\n2.500,25;3;b\n3,5;4;a\n999,1;5;b\n"


@case("F74")
def _(t: Trial) -> Outcome:
    from pipeline.ingest import ingest

    t.write("train.csv", _EURO)
    ingest(t.path / "train.csv", t.path / "train.zarr")
    t.write("pt.csv", "p;q;y\n7;1;a\n1.5;2;b\n")
    return t.cli("ingest", "pt.csv", "out.zarr", "--like", "train.zarr")


@case("F75")
def _(t: Trial) -> Outcome:
    from pipeline.ingest import ingest

    t.write("small.csv", "p;q;y\n0,5;2;a\n2,5;3;b\n3;4;a\n")
    import zarr

    small = ingest(t.path / "small.csv", t.path / "small.zarr")
    # as an earlier version wrote it: no record of what its dots were
    group = zarr.open_group(str(t.path / "small.zarr"), mode="r+")
    group.attrs["source"] = {k: v for k, v in small.attrs["source"].items() if k != "thousands_dot"}
    t.write("big.csv", "p;q;y\n7;1;a\n1.234,5;2;b\n")
    return t.cli("ingest", "big.csv", "out.zarr", "--like", "small.zarr")


@case("F76")
def _(t: Trial) -> Outcome:
    t.write("eu.csv", _EURO)
    out = t.cli("ingest", "eu.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.feature_names == ["p", "q"] and st.attrs["source"]["thousands_dot"] is True
    return out


@case("F77")
def _(t: Trial) -> Outcome:
    t.write("big.csv", "a,t\n1,x\n1e39,y\n2,x\n")
    return t.cli("ingest", "big.csv", "out.zarr")


@case("F78")
def _(t: Trial) -> Outcome:
    t.write("huge.csv", "a,t\n1,1e308\n2,-1e308\n3,1.5e308\n")
    return t.cli("ingest", "huge.csv", "out.zarr", "--task", "regression")


@case("F79")
def _(t: Trial) -> Outcome:
    (t.path / "ds").mkdir()
    pq.write_table(pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": ["p", "q"]}), t.path / "ds" / "part.0.parquet")
    pq.write_table(pa.table({"a": [5.0, 6.0], "y": ["q", "p"]}), t.path / "ds" / "part.1.parquet")
    return t.cli("ingest", "ds", "out.zarr")


@case("F80")
def _(t: Trial) -> Outcome:
    import decimal

    ids = pa.array([decimal.Decimal(1), decimal.Decimal(2**53 + 1)], pa.decimal128(38, 0))
    pq.write_table(pa.table({"id": ids, "a": [1.0, 2.0], "y": ["p", "q"]}), t.path / "d.parquet")
    return t.cli("ingest", "d.parquet", "out.zarr")


def _comma(v: float) -> str:
    return str(v).replace(".", ",")


@case("F81")
def _(t: Trial) -> Outcome:
    notes = ["plain", "two\nlines; here", 'said ""hi"",\r\nthen left']
    t.write(
        "notes.csv",
        '"note";"x\n(cm)";label\r\n'
        + "".join(f'"{notes[i % 3]}";{_comma(a)};{y}\r\n' for i, (a, _, y) in enumerate(_AB)),
    )
    out = t.cli("ingest", "notes.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.n_rows == len(_AB) and st.attrs["source"]["delimiter"] == ";"
    assert st.feature_names[-1] == "x\n(cm)" and len(st.attrs["encodings"][0]["categories"]) == 3
    np.testing.assert_allclose(st.read_chunk(0)[0][:, -1], [a for a, _, _ in _AB])
    return out


@case("F82")
def _(t: Trial) -> Outcome:
    rows = [f"{a},{y}" for a, _, y in _AB]
    rows[2] = '"' + rows[2]  # the quote opens a field that runs to the end of the file
    t.write("stray.csv", "x,label\n" + "\n".join(rows) + "\n")
    return t.cli("ingest", "stray.csv", "out.zarr")


@case("F83")
def _(t: Trial) -> Outcome:
    # a no-break space, a narrow no-break space, and a plain space (a semicolon file)
    prices = ["42\u00a0376,67", "1\u202f234,5", "2 500,25", "3,5", "999", "-12\u00a0000"]
    (t.path / "fr.csv").write_text(
        "prix;qte;label\n" + "".join(f"{p};{i};{y}\n" for i, (p, (*_, y)) in enumerate(zip(prices, _AB, strict=True))),
        encoding="utf-8",
    )
    out = t.cli("ingest", "fr.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.attrs["encodings"][0]["kind"] == "numeric" and st.feature_names == ["prix", "qte"]
    np.testing.assert_allclose(st.read_chunk(0)[0][:, 0], [42376.67, 1234.5, 2500.25, 3.5, 999, -12000], rtol=1e-6)
    return out


@case("F84")
def _(t: Trial) -> Outcome:
    flag = [True, False, False, True, True, False]
    churn = [y == "yes" for *_, y in _AB]
    t.write(
        "train.csv",
        "x,flag,churn\n"
        + "".join(f"{a},{str(f).upper()},{str(c).upper()}\n" for (a, *_), f, c in zip(_AB, flag, churn, strict=True)),
    )
    pq.write_table(pa.table({"x": [a for a, _, _ in _AB], "flag": flag, "churn": churn}), t.path / "test.parquet")
    t.cli("ingest", "train.csv", "train.zarr", "--quiet")
    out = t.cli("ingest", "test.parquet", "out.zarr", "--like", "train.zarr", created={"out.zarr"})
    test, train = _open(t).read_chunk(0), _open(t, "train.zarr").read_chunk(0)
    assert _open(t).attrs["source"]["unknown_categories"] == {}
    np.testing.assert_array_equal(test[0], train[0])
    np.testing.assert_array_equal(test[1], train[1])
    return out


@case("F85")
def _(t: Trial) -> Outcome:
    t.write("t.csv", ",x,k,label\n" + "".join(f"{i},{a},{i % 3},{y}\n" for i, (a, _, y) in enumerate(_AB)))
    t.cli("ingest", "t.csv", "c0.zarr", "--target", "c0", "--quiet")
    assert _open(t, "c0.zarr").attrs["target"]["name"] == "c0"  # named, the column counts
    out = t.cli("ingest", "t.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.feature_names == ["x", "k"] and st.attrs["target"]["name"] == "label"
    return out


@case("F86")
def _(t: Trial) -> Outcome:
    t.write("trail.csv", "x;k;label;\n" + "".join(f"{_comma(a)};{i % 3};{y};\n" for i, (a, _, y) in enumerate(_AB)))
    out = t.cli("ingest", "trail.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.attrs["target"]["name"] == "label" and st.feature_names == ["x", "k"] and st.n_rows == len(_AB)
    return out


@case("F87")
def _(t: Trial) -> Outcome:
    lines = [f"{_comma(a)};{i % 3};{y};\n" for i, (a, _, y) in enumerate(_AB * 10)]  # beyond the lines read first
    t.write("trail.csv", "x;k;label;\n" + "".join(lines) + "1,5;2;yes;late\n")
    t.cli("ingest", "trail.csv", "dropped.zarr", "--drop", "3", "--quiet")
    assert _open(t, "dropped.zarr").n_rows == len(lines) + 1
    out = t.cli("ingest", "trail.csv", "out.zarr")
    assert out.message.endswith("--drop 3"), out.message
    return out


@case("F88")
def _(t: Trial) -> Outcome:
    t.write(
        "excel.csv",
        "sep=;\r\nx;k;label\r\n" + "".join(f"{_comma(a)};{i % 3};{y}\r\n" for i, (a, _, y) in enumerate(_AB)),
    )
    out = t.cli("ingest", "excel.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.attrs["source"]["delimiter"] == ";" and st.feature_names == ["x", "k"] and st.n_rows == len(_AB)
    return out


@case("F89")
def _(t: Trial) -> Outcome:
    t.write("array.csv", ",0,1,2,3\n" + "".join(f"{i},{a},{b},{-a},{i % 2}\n" for i, (a, b, _) in enumerate(_AB)))
    out = t.cli("ingest", "array.csv", "out.zarr", created={"out.zarr"})
    st = _open(t)
    assert st.attrs["source"]["header"] is True and st.n_rows == len(_AB)
    assert st.feature_names == ["0", "1", "2"] and st.classes == ["0", "1"]
    return out


@case("F90")
def _(t: Trial) -> Outcome:
    a = [str(a) for a, _, _ in _AB]
    b = [str(i % 3) for i in range(len(_AB))]
    a[1], a[3], b[4] = "#DIV/0!", "#N/A", "#VALUE!"
    t.write("sheet.csv", "a,b,label\n" + "".join(f"{a[i]},{b[i]},{y}\n" for i, (*_, y) in enumerate(_AB)))
    t.cli("ingest", "sheet.csv", "read.zarr", "--missing-values", "?,NA,#DIV/0!,#N/A,#VALUE!", "--quiet")
    assert _open(t, "read.zarr").attrs["source"]["missing_imputed"] == {"a": 2, "b": 1}
    return t.cli("ingest", "sheet.csv", "out.zarr")


@case("F91")
def _(t: Trial) -> Outcome:
    amounts = ["$1,234.50", "12.5%", "(1,234.00)", "$87.10", "4.0%", "(12.00)"]
    t.write("shop.csv", "qty,price,label\n" + "".join(f'{i % 3},"{v}",{"ab"[i % 2]}\n' for i, v in enumerate(amounts)))
    # euros after the amount, in a semicolon file of decimal commas: refused alike
    t.write("eur.csv", "qty;price;label\n" + "".join(f"{i % 3};{i},50 €;{'ab'[i % 2]}\n" for i in range(6)))
    euros = t.cli("ingest", "eur.csv", "out.zarr")
    assert euros.exit == "1" and "column 'price' ('0,50 €' at data row 0 (0-based)) holds amounts" in euros.message
    out = t.cli("ingest", "shop.csv", "out.zarr")
    assert out.message.startswith("error: column 'price' ('$1,234.50' at data row 0 (0-based)) holds"), out.message
    return out


@case("F92")
def _(t: Trial) -> Outcome:
    t.write("mixed.csv", 'price,label\n1200,a\n"$1,300.00",b\n900,a\n1000,b\n')
    mixed = t.cli("ingest", "mixed.csv", "out.zarr")
    assert mixed.exit == "1" and "column 'price' is numeric but has 1 value(s)" in mixed.message, mixed
    t.write("train.csv", "price,label\n1200,a\n1300,b\n900,a\n1000,b\n")
    t.write("test.csv", "price,label\n$1200,a\n12%,b\n")
    t.cli("ingest", "train.csv", "train.zarr", "--quiet")
    return t.cli("ingest", "test.csv", "t.zarr", "--like", "train.zarr")


@case("F93")
def _(t: Trial) -> Outcome:
    countries = ["DE", "FR", "US"]
    rows = [f"ORD-{100000 + i},user{i}@example.com,{countries[i % 3]},{i % 50}.5,{'yn'[i % 2]}\n" for i in range(300)]
    t.write("orders.csv", "order_id,email,country,amount,returned\n" + "".join(rows))
    t.cli("ingest", "orders.csv", "dropped.zarr", "--drop", "order_id", "--drop", "email", "--quiet")
    assert _open(t, "dropped.zarr").feature_names == ["country=DE", "country=FR", "country=US", "amount"]
    t.cli("ingest", "orders.csv", "kept.zarr", "--encoding", "ordinal", "--quiet")
    assert _open(t, "kept.zarr").feature_names == ["order_id", "email", "country", "amount"]
    return t.cli("ingest", "orders.csv", "out.zarr")


@case("F94")
def _(t: Trial) -> Outcome:
    import datetime as dt

    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(200)]
    rows = "".join(f"{d},{i * 1.5:.2f},{'ab'[i % 2]}\n" for i, d in enumerate(days))
    t.write("statement.csv", "date,amount,kind\n" + rows)
    return t.cli("ingest", "statement.csv", "out.zarr")


_KILLED_SWAP = """
import os, signal, sys
import pipeline.store as store
from pipeline.ingest import ingest

src, dest = sys.argv[1:3]
replace = os.replace

def killed_replace(a, b):
    if ".tmp-" in str(a) and os.path.basename(str(b)) == os.path.basename(dest):
        os.kill(os.getpid(), signal.SIGKILL)  # the old store set aside, the new one not yet moved in
    return replace(a, b)

store.os.replace = killed_replace
ingest(src, dest, force=True)
"""


def _rows_csv(t: Trial, name: str, n: int) -> None:
    t.write(name, "a,b,label\n" + "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(n)))


@case("F95")
def _(t: Trial) -> Outcome:
    import subprocess
    import sys

    _rows_csv(t, "a.csv", 10)
    _rows_csv(t, "new.csv", 16)
    t.cli("ingest", "a.csv", "out.zarr", "--quiet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SWAP, "new.csv", "out.zarr"], env=env, capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in t.path.iterdir() if ".old-" in p.name or ".tmp-" in p.name)
    assert len(left) == 2 and not (t.path / "out.zarr").exists(), left
    out = t.cli("ingest", "a.csv", "out.zarr")
    assert out.message.endswith("completing a replacement that was stopped midway)"), out.message
    assert not any(".old-" in p.name or ".tmp-" in p.name for p in t.path.iterdir())
    assert _open(t).n_rows == 16  # the killed ingest's store, finished
    # the leftovers are gone and out.zarr replaced, as the row says; nothing else changed
    t.before = {k: v for k, v in t.before.items() if k.split("/")[0] not in left}
    out.created = {"out.zarr"}
    return out


@case("F96")
def _(t: Trial) -> Outcome:
    _rows_csv(t, "a.csv", 10)
    t.cli("ingest", "a.csv", ".out.zarr.old-1234abcd", "--quiet")  # set aside by an earlier version
    t.cli("ingest", "a.csv", "out.zarr", "--quiet")
    out = t.cli("ingest", "a.csv", "out.zarr", "--force", "--quiet", created={"out.zarr"})
    warning = [ln for ln in t.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and ".out.zarr.old-1234abcd' is left from a replacement of 'out.zarr'" in warning[0]
    assert "remove it (rm -r " in warning[0], warning
    assert _open(t, ".out.zarr.old-1234abcd").n_rows == 10
    t.before = {k: v for k, v in t.before.items() if k.split("/")[0] != "out.zarr"}  # replaced, as asked
    return out


@case("F97")
def _(t: Trial) -> Outcome:
    rows = "".join(f"{i},{i % 3},{'xy'[i % 2]},{'yes' if i % 2 else 'no'}\n" for i in range(8))
    t.write("quoted.csv", '"order\nid",amount,"a\tb","bought\r\nit"\n' + rows)
    t.cli("ingest", "quoted.csv", "out.zarr", "--quiet")
    out = t.cli("inspect", "out.zarr")
    lines = t.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("features"))
    assert [ln.split()[0] for ln in lines[start + 1 :]] == ["order\\nid", "amount", "a\\tb=x", "a\\tb=y"], t.stdout
    return out


@case("F15")
def _(t: Trial) -> Outcome:
    (t.path / "mydata").mkdir()
    t.write("mydata/notes.txt", "precious")
    t.write("mydata/train.csv", GOOD_CSV)
    return t.cli("ingest", "mydata/train.csv", "mydata", "--force")


@case("F16")
def _(t: Trial) -> Outcome:
    t.write("same.csv", GOOD_CSV)
    return t.cli("ingest", "same.csv", "same.csv", "--force")


@case("F17")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    return t.cli("ingest", "good.csv", ".", "--force")


@case("F18")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    t.cli("ingest", "good.csv", "train.zarr", "--quiet")
    return t.cli("ingest", "good.csv", "train.zarr", "--like", "train.zarr", "--force")


@case("F19")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    (t.path / "docs").mkdir()
    t.write("docs/notes.txt", "precious")
    return t.cli("ingest", "good.csv", "docs", "--force")


@case("F20")
def _(t: Trial) -> Outcome:
    t.write("train.csv", "a,y\n" + "".join(f"{i},{2 * i + 0.5}\n" for i in range(20)))
    assert t.cli("ingest", "train.csv", "train.zarr").exit == "0"
    t.write("test.csv", "a,y\n1,2.5\n2,abc\n3,6.5\n")
    return t.cli("ingest", "test.csv", "out.zarr", "--like", "train.zarr")


# -- stores ----------------------------------------------------------------------------------


@case("S1")
def _(t: Trial) -> Outcome:
    return t.cli("inspect", "nostore.zarr")


@case("S2")
def _(t: Trial) -> Outcome:
    (t.path / "notastore").mkdir()
    t.write("notastore/readme.txt", "not a store")
    return t.cli("inspect", "notastore")


@case("S3")
def _(t: Trial) -> Outcome:
    import zarr

    t.copy(t.shared.store4, "newer.zarr")
    zarr.open_group(str(t.path / "newer.zarr"), mode="r+").attrs["format_version"] = 99
    return t.cli("inspect", "newer.zarr")


@case("S4")
def _(t: Trial) -> Outcome:
    shutil.rmtree(t.copy(t.shared.store4, "noy.zarr") / "y")
    return t.cli("train", "noy.zarr", "--out", "run")


@case("S5")
def _(t: Trial) -> Outcome:
    chunk = t.copy(t.shared.store4, "bad.zarr") / "X" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return t.cli("inspect", "bad.zarr", "--verify")


@case("S6")
def _(t: Trial) -> Outcome:
    return t.cli("synth", "out.zarr", "--rows", "0", "--features", "4")


@case("S7")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.run, "run")
    t.copy(t.shared.store5, "five.zarr")
    return t.cli("evaluate", "run", "five.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("S8")
def _(t: Trial) -> Outcome:
    (t.path / "docs").mkdir()
    t.write("docs/notes.txt", "precious")
    return t.cli("synth", "docs", "--rows", "100", "--features", "3", "--force")


@case("S9")
def _(t: Trial) -> Outcome:
    t.cli("synth", "s.zarr", "--rows", "3000", "--features", "4", "--chunk-rows", "1024", "--quiet")
    (t.path / "s.zarr" / "X" / "c" / "1" / "0").unlink()
    return t.cli("inspect", "s.zarr", "--verify")


@case("S10")
def _(t: Trial) -> Outcome:
    t.cli("synth", "s.zarr", "--rows", "3000", "--features", "4", "--chunk-rows", "1024", "--quiet")
    (t.path / "s.zarr" / "y" / "c" / "2").unlink()
    return t.cli("inspect", "s.zarr", "--verify")


@case("S17")
def _(t: Trial) -> Outcome:
    t.write("d.csv", "a,b,t,u\n1,2,0.5,7.25\n3,4,1.5,8.5\n5,6,2.5,6.75\n7,8,3.5,9.125\n")
    t.cli("ingest", "d.csv", "t.zarr", "--target", "t", "--drop", "u", "--quiet")
    t.cli("ingest", "d.csv", "u.zarr", "--target", "u", "--drop", "t", "--quiet")
    return t.cli("train", "t.zarr", "--out", "run", "--set", "validation_store=u.zarr")


@case("S11")
def _(t: Trial) -> Outcome:
    t.write("good.csv", GOOD_CSV)
    t.write("swapped.csv", "b,a,c\n2,1,x\n4,3,y\n")
    t.cli("ingest", "good.csv", "s.zarr", "--quiet")
    t.cli("ingest", "swapped.csv", "swapped.zarr", "--quiet")
    return t.cli("train", "s.zarr", "--out", "run", "--set", "validation_store=swapped.zarr")


@case("S12")
def _(t: Trial) -> Outcome:
    return t.cli("train", "--sites", "nosites.toml", "--out", "run")


@case("S13")
def _(t: Trial) -> Outcome:
    return _train_sites(t, '[sites."a b"]\nstore = "a.zarr"\n')


@case("S14")
def _(t: Trial) -> Outcome:
    return _train_sites(t, "[sites.a]\n")


@case("S15")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.write("sites.toml", ONE_SITE)
    return t.cli("train", "s.zarr", "--sites", "sites.toml", "--out", "run")


@case("S16")
def _(t: Trial) -> Outcome:
    return _train_sites(t, "", name="empty.toml")


def _s3(t: Trial) -> str:
    """The URL of the bucket on the module's S3 server (``s3`` below)."""
    assert t.fixture is not None
    return str(t.fixture("s3"))


def _fresh_listings() -> None:
    """Forget what this process's S3 file system listed: another process wrote, or the service changed."""
    import s3fs

    s3fs.S3FileSystem().invalidate_cache()


def _bucket(url: str) -> list[str]:
    """The objects under ``url``."""
    import s3fs

    _fresh_listings()
    return sorted(s3fs.S3FileSystem().find(url.removeprefix("s3://")))


@case("S18")
def _(t: Trial) -> Outcome:
    bucket = _s3(t)
    before = _bucket(bucket)
    out = _predict_refused_before_connecting(t, "run", "s.zarr", f"{bucket}/p.parquet")
    assert _bucket(bucket) == before
    return out


_KILLED_S3_WRITER = """
import os, signal, sys
import numpy as np
from pipeline.store import create_store
w = create_store(sys.argv[1], 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={})
w.append(np.ones((30, 2), np.float32), np.zeros(30, np.int32))
os.kill(os.getpid(), signal.SIGKILL)
"""


@case("S19")
def _(t: Trial) -> Outcome:
    import subprocess
    import sys

    url = f"{_s3(t)}/killed.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_S3_WRITER, url], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    before = _bucket(url)
    out = t.cli("inspect", url)
    assert _bucket(url) == before and before, before
    return out


@case("S20")
def _(t: Trial) -> Outcome:
    absent = t.cli("inspect", f"{_s3(t)}/absent.zarr")
    assert absent.exit == "1" and f"store '{_s3(t)}/absent.zarr' does not exist; check the URL" in absent.message
    return t.cli("inspect", "s3://nobucket/s.zarr")


@case("S21")
def _(t: Trial) -> Outcome:
    return t.cli("ingest", "s3://b/x.csv", "s.zarr")


@case("S22")
def _(t: Trial) -> Outcome:
    import requests

    from pipeline.synth import synth

    url = f"{_s3(t)}/guarded.zarr"
    synth(url, rows=40, features=2, classes=2, seed=0)
    auth = f"{os.environ['AWS_ENDPOINT_URL']}/moto-api/reset-auth"
    requests.post(auth, data=b"0", timeout=10).raise_for_status()  # keys are checked from now on
    try:
        _fresh_listings()
        return t.cli("inspect", url)
    finally:
        requests.post(auth, data=b"inf", timeout=10).raise_for_status()


@case("S23")
def _(t: Trial) -> Outcome:
    """The command as a child process: this process's S3 file system keeps the endpoint it was made with."""
    import subprocess
    import sys

    url = f"{_s3(t)}/s.zarr"
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    t.before = snapshot(t.path)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "inspect", url], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr  # one line, nothing else
    return Outcome(str(done.returncode), done.stderr.strip())


@case("S24")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    offline = ("--scheduler", t.shared.unreachable, "--connect-timeout", "1")  # refused before connecting
    return t.cli("train", "s.zarr", "--out", "s3://b/run", *offline)


# -- training settings -----------------------------------------------------------------------


def _train_set(t: Trial, *args: str) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "run", *args)


for _id, _setting in {
    "C1": "batch_size=2000000",
    "C2": "batch_size=-5",
    "C3": "hidden=[1000000000]",
    "C4": "hidden=[0]",
    "C5": "bogus=1",
    "C6": "epochs=abc",
    "C7": "hidden=abc",
    "C8": "mode=bogus",
    "C9": "lr=-1",
    "C10": "validation=1.5",
    "C11": "noequals",
    "C31": "rho=1",
    "C32": "server_beta2=1",
    "C33": "activation=heaviside",
    "C15": "min_delta=nan",
    "C16": "min_delta=-0.01",
    "C17": "lr=inf",
    "C18": "weight_decay=inf",
    "C19": "seed=-1",
    "C51": "compression=gzip",
    "C52": "topk_fraction=0",
    "C63": "ps_shards=-1",
    "C56": "dp=global",
    "C57": "target_epsilon=3",
    "C59": "clip_quantile=0.5",
    "C60": "dp_delta=0",
}.items():
    case(_id)(lambda t, s=_setting: _train_set(t, "--set", s))


@case("C58")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "dp=central", "--set", "mode=async")


@case("C61")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "secure_aggregation=true", "--set", "dp=local")


@case("C62")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "secure_aggregation=true", "--set", "dp=central", "--set", "clip_quantile=0.5")


@case("C97")
def _(t: Trial) -> Outcome:
    import tomllib

    t.copy(t.shared.store4, "s.zarr")
    sets = ("lr=.002", "epochs=1", "validation=0", "hidden=[8]")
    out = t.cli("train", "s.zarr", "--out", "run", *(a for s in sets for a in ("--set", s)), "-q", created={"run"})
    lr = tomllib.loads((t.path / "run" / "config.toml").read_text())["lr"]
    assert lr == 0.002 and isinstance(lr, float), lr
    return out


@case("C98")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "hidden=[30000,30000]")


@case("C99")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "aggregator=median")


for _id, _setting in {
    "C34": ("placement=federated",),
    "C35": ("sites=sites.toml", "clients=10"),
    "C36": ("fraction_fit=0",),
    "C37": ("min_responses=0",),
    "C38": ("strategy=fedprox",),
    "C39": ("strategy=scaffold",),
    "C40": ("round_deadline=0",),
    "C41": ("clients=10", "partition=column"),
    "C42": ("aggregator=krum", "krum_f=2"),
    "C43": ("trim_fraction=0.5",),
    "C68": ("clients=10", "ps_shards=2"),
    "C69": ("secure_aggregation=true", "dp=central", "compression=int8"),
    "C70": ("dp=central", "ps_shards=2"),
    "C71": ("clients=10", "secure_aggregation=true"),
    "C72": ("ps_shared_memory=maybe",),
    "C74": ("site_grace=-1",),
    "C75": ("overlap_steps=0",),
    "C76": ("compress_replies=true", "compression=topk"),
    "C77": ("compress_replies=true", "compression=fp16", "mode=async"),
    "C78": ("compress_replies=true", "compression=fp16", "clients=10"),
    "C79": ("combine_pushes=true", "mode=async"),
    "C81": ("combine_pushes=true", "compression=int8"),
    "C82": ("blas_threads=0",),
}.items():
    case(_id)(lambda t, s=_setting: _train_set(t, *(a for v in s for a in ("--set", v))))


def _train_sites(t: Trial, text: str, *args: str, name: str = "sites.toml") -> Outcome:
    t.write(name, text)
    return t.cli("train", "--sites", name, "--out", "run", *args)


ONE_SITE = '[sites.a]\nstore = "a.zarr"\n'


@case("C44")
def _(t: Trial) -> Outcome:
    return _train_sites(t, ONE_SITE, "--set", "min_sites=3")


@case("C45")
def _(t: Trial) -> Outcome:
    return _train_sites(t, ONE_SITE, "--set", "validation_store=v.zarr")


@case("C12")
def _(t: Trial) -> Outcome:
    t.write("bad.toml", "epochs = [\n")
    return _train_set(t, "--config", "bad.toml")


@case("C13")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--config", "nonexist.toml")


@case("C14")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--workers", "0")


@case("C83")
def _(t: Trial) -> Outcome:
    from unittest import mock

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cluster was started for a refused configuration")

    with mock.patch("pipeline.cli._client", no_cluster):
        return _train_set(t, "--workers", "2", "--set", "blas_threads=2")


@case("C20")
def _(t: Trial) -> Outcome:
    t.write("server.toml", "lr = 0.01\n[server]\nlr = 0.5\n")
    return _train_set(t, "--config", "server.toml")


@case("C21")
def _(t: Trial) -> Outcome:
    t.write("twice.toml", "lr = 0.01\n[optimizer]\nlr = 0.5\n")
    return _train_set(t, "--config", "twice.toml")


@case("C22")
def _(t: Trial) -> Outcome:
    t.write("nested.toml", "[model]\nhidden = [8]\n[model.deep]\nwidth = 3\n")
    return _train_set(t, "--config", "nested.toml")


# -- runs and model files --------------------------------------------------------------------


def _model_dir(t: Trial, name: str) -> Path:
    d = t.path / name
    d.mkdir()
    return d


@case("M1")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "fresh", "--resume")


@case("M2")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    return t.cli("train", "s.zarr", "--out", "run", "--set", "epochs=1")


@case("M3")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    _model_dir(t, "empty")
    return t.cli("evaluate", "empty", "s.zarr")


@case("M4")
def _(t: Trial) -> Outcome:
    from pipeline.checkpoint import load_file, save_file

    t.copy(t.shared.store4, "s.zarr")
    arrays, meta = load_file(t.shared.run / "model.npz", "model")
    meta = {k: v for k, v in meta.items() if k not in ("kind", "format_version", "sha256")}
    meta["model_format"] = 99
    save_file(_model_dir(t, "newer") / "model.npz", "model", arrays, meta)
    return t.cli("evaluate", "newer", "s.zarr")


@case("M5")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    data = bytearray((t.shared.run / "model.npz").read_bytes())
    data[200] ^= 0xFF
    (_model_dir(t, "flipped") / "model.npz").write_bytes(bytes(data))
    return t.cli("evaluate", "flipped", "s.zarr")


@case("M6")
def _(t: Trial) -> Outcome:
    import zipfile

    t.copy(t.shared.store4, "s.zarr")
    src = t.shared.run / "model.npz"
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    import io

    params = np.load(io.BytesIO(members["params.npy"]))
    buf = io.BytesIO()
    np.save(buf, params + np.float32(1.0))  # a valid array, but not the one the checksum covers
    members["params.npy"] = buf.getvalue()
    with zipfile.ZipFile(_model_dir(t, "altered") / "model.npz", "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return t.cli("evaluate", "altered", "s.zarr")


@case("M30")
def _(t: Trial) -> Outcome:
    from matplotlib.figure import Figure

    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([1, 2, 3], [3, 1, 2])
    fig.savefig(t.path / "run" / "curves.png")  # the user's own image, at a plot's name
    return t.cli(
        "train",
        "s.zarr",
        "--out",
        "run",
        "--force",
        "--plots",
        "--scheduler",
        t.shared.unreachable,
        "--connect-timeout",
        "1",
    )


def _resume_offline(t: Trial, *sets: str) -> Outcome:
    """`pipeline train s.zarr --out run --resume --set SETTING ...` on the trial's copies of the
    shared store and run (``run`` copied already when its checkpoint was prepared), against an
    unreachable scheduler: a refusal comes before any cluster is reached."""
    t.copy(t.shared.store4, "s.zarr")
    if not (t.path / "run").exists():
        t.copy(t.shared.run, "run")
    settings = [a for setting in sets for a in ("--set", setting)]
    offline = ("--scheduler", t.shared.unreachable, "--connect-timeout", "1")
    return t.cli("train", "s.zarr", "--out", "run", "--resume", *settings, *offline)


@case("M31")
def _(t: Trial) -> Outcome:
    return _resume_offline(t, "hidden=[16]", "epochs=3")


@case("M32")
def _(t: Trial) -> Outcome:
    from pipeline.synth import synth

    synth(str(t.path / "other.zarr"), rows=300, features=4, classes=3, seed=1)  # the same layout, other rows
    t.copy(t.shared.run, "run")
    return t.cli(
        "train",
        "other.zarr",
        "--out",
        "run",
        "--resume",
        "--set",
        "epochs=3",
        "--scheduler",
        t.shared.unreachable,
        "--connect-timeout",
        "1",
    )


@case("M33")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.write("notes.txt", "mine")
    return t.cli("train", "s.zarr", "--out", "notes.txt/run", "--scheduler", t.shared.unreachable)


@case("M35")
def _(t: Trial) -> Outcome:
    t.cli("synth", "s.zarr", "--rows", "600", "--features", "4", "--quiet")
    t.before = snapshot(t.path)
    r = CliRunner().invoke(cli, ["train", "s.zarr", "--out", "run", "--set", "lr=1e30", "--set", "epochs=2", "-q"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr  # one line, no warning before it
    assert sorted(p.name for p in (t.path / "run").iterdir()) == ["config.toml"]
    return Outcome("1", r.stderr.strip(), {"run"})


@case("M34")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.synth import synth
    from pipeline.train import train

    synth(str(t.path / "s.zarr"), rows=400, features=4, classes=3, seed=0)
    cfg = TrainConfig().with_overrides(["clients=2", "rounds=1", "hidden=[8]", "validation=0"])
    train(str(t.path / "s.zarr"), cfg, t.path / "run", client=t.shared.client)
    synth(str(t.path / "s.zarr"), rows=400, features=4, classes=3, seed=1, force=True)  # other rows
    return t.cli(
        "train",
        "s.zarr",
        "--out",
        "run",
        "--resume",
        "--set",
        "rounds=2",
        "--scheduler",
        t.shared.unreachable,
        "--connect-timeout",
        "1",
    )


class _Boom:
    """Unpickling this would leave a file behind: proof that nothing was unpickled."""

    def __reduce__(self):
        return (Path.touch, (Path("UNPICKLED"),))


@case("M7")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    np.savez(_model_dir(t, "pickled") / "model.npz", params=np.array([_Boom()], dtype=object))
    out = t.cli("evaluate", "pickled", "s.zarr")
    assert not (t.path / "UNPICKLED").exists()
    return out


@case("M8")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    ck = t.copy(t.shared.run, "cut") / "checkpoint.npz"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    return t.cli("train", "s.zarr", "--out", "cut", "--resume")


@case("M9")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    _earlier_predictions(t, "old.parquet")
    # an unreachable scheduler: reaching it would fail, so the refusal comes first
    return t.cli(
        "predict", "run", "s.zarr", "old.parquet", "--scheduler", t.shared.unreachable, "--connect-timeout", "1"
    )


@case("C80")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    t.copy(t.shared.store4, "s.zarr")
    cfg = TrainConfig().with_overrides(
        ["hidden=[8]", "clients=4", "fraction_fit=0.5", "rounds=1", "mode=async", "concurrency=1", "buffer_size=3"]
    )
    train("s.zarr", cfg, "run", client=t.shared.client)  # 2 deltas buffered, no server step yet
    more = cfg.with_overrides(["rounds=2", "buffer_size=2"])
    return t.call(lambda: train("s.zarr", more, "run", client=t.shared.client, resume=True))


def _earlier_predictions(t: Trial, name: str) -> None:
    """A prediction output written by `pipeline predict` (on the shared cluster)."""
    from pipeline.inference import predict_store
    from pipeline.model import load_model

    predict_store(load_model(t.path / "run"), str(t.path / "s.zarr"), str(t.path / name), t.shared.client)


@case("M10")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    return t.cli("predict", "run", "s.zarr", "preds.txt")


@case("M36")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.run, "run")
    t.write("new.csv", "a,b,c,d\n1,2,3,4\n")
    unreachable = ("--scheduler", t.shared.unreachable, "--connect-timeout", "1")  # refused before connecting
    return t.cli("predict", "run", "new.csv", "p.parquet", *unreachable)


def _predict_refused_before_connecting(t: Trial, *args: str) -> Outcome:
    """`pipeline predict ARGS` beside a copy of the shared store and run, on an unreachable
    scheduler: the refusal comes before any connection."""
    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    return t.cli("predict", *args, "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M37")
def _(t: Trial) -> Outcome:
    return _predict_refused_before_connecting(t, "run", "s.zarr", "s.zarr/p.zarr")


@case("M38")
def _(t: Trial) -> Outcome:
    return _predict_refused_before_connecting(t, "s.zarr", "run", "p.parquet")


@case("M39")
def _(t: Trial) -> Outcome:
    return _resume_offline(t, "validation=0.3", "epochs=2")  # the shared run held out no rows


@case("M40")
def _(t: Trial) -> Outcome:
    from pipeline.checkpoint import load_file, save_file

    run = t.copy(t.shared.run, "run")
    # the driver killed in its first epoch, after one of its tasks finished: no model yet
    (run / "model.npz").unlink()
    (run / "history.json").unlink()
    arrays, meta = load_file(run / "checkpoint.npz", "checkpoint")
    tasks = sorted(task["name"] for task in meta["history"][0]["tasks"])
    meta.update(epoch=0, history=[], done_tasks=tasks[:1], progress={}, best_epoch=-1, best_loss=1e300)
    save_file(run / "checkpoint.npz", "checkpoint", arrays, meta)
    return _resume_offline(t, "batch_size=32")


def _damaged_checkpoint(t: Trial, name: str) -> None:
    """A copy of the shared run as a killed driver leaves it (a checkpoint, no model or history
    yet), its checkpoint then cut in half."""
    run = t.copy(t.shared.run, name)
    (run / "model.npz").unlink()
    (run / "history.json").unlink()
    ck = run / "checkpoint.npz"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])


@case("M41")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    _damaged_checkpoint(t, "cut")
    return t.cli("train", "s.zarr", "--out", "cut", "--resume", "--scheduler", t.shared.unreachable)


@case("M42")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.run, "runs/good")
    _damaged_checkpoint(t, "runs/cut")
    t.before = snapshot(t.path)
    r = CliRunner().invoke(cli, ["runs", "runs"])
    assert r.exit_code == 0 and not r.stderr, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["runs/good", "1"], r.output  # the table: the good run
    assert lines[2].startswith(
        "run directory 'runs/cut' holds a damaged checkpoint and no model.npz (checkpoint file "
        "'runs/cut/checkpoint.npz' is unreadable or truncated"
    ), r.output
    assert lines[2].endswith(
        "nothing to use or resume; restore its checkpoint.npz from a copy, or move checkpoint.npz out of "
        "'runs/cut' and start the run again with --force"
    ), r.output
    return Outcome("0", "")


def _edited_model(t: Trial, name: str, edit: Callable[[dict], object]) -> None:
    """A copy of the shared run whose model file's metadata was changed by ``edit`` (as a text
    editor would change it: the weights and their checksum are kept)."""
    from pipeline.checkpoint import load_file, save_file

    run = t.copy(t.shared.run, name)
    arrays, meta = load_file(run / "model.npz", "model")
    edit(meta)
    save_file(run / "model.npz", "model", arrays, meta)


@case("M43")
def _(t: Trial) -> Outcome:
    _edited_model(t, "edited", lambda meta: meta.__setitem__("task", "regression"))
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("predict", "edited", "s.zarr", "p.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M44")
def _(t: Trial) -> Outcome:
    from pipeline.errors import CheckpointError
    from pipeline.model import load_model

    _edited_model(t, "edited", lambda meta: meta["spec"].pop("hidden"))
    t.copy(t.shared.store4, "s.zarr")
    with pytest.raises(CheckpointError, match="its spec lacks hidden"):
        load_model(t.path / "edited")
    return t.cli("predict", "edited", "s.zarr", "p.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


def _shared_rows(t: Trial, n: int) -> tuple[object, np.ndarray]:
    """The shared run's model and the first ``n`` rows of its store."""
    from pipeline.model import load_model
    from pipeline.store import open_store

    return load_model(t.shared.run), np.asarray(open_store(str(t.shared.store4)).X[:n])


@case("M45")
def _(t: Trial) -> Outcome:
    model, X = _shared_rows(t, 3)
    rows = [dict(zip(model.feature_names, map(float, row), strict=True)) for row in X]
    return t.call(lambda: model.predict(rows))


@case("M46")
def _(t: Trial) -> Outcome:
    model, X = _shared_rows(t, 1)
    return t.call(lambda: model.predict(X[0]))


def _in_process_run(t: Trial) -> None:
    """s.zarr of 600 rows and run/, a run of 1 epoch trained on it in this process."""
    t.cli("synth", "s.zarr", "--rows", "600", "--features", "4", "--quiet")
    assert t.cli("train", "s.zarr", "--out", "run", "--set", "epochs=1", "--set", "hidden=[8]", "-q").exit == "0"


def _with_scheduler(t: Trial, name: str, **meta: object) -> Path:
    """A copy of the shared run whose checkpoint records, as a run on a scheduler started by hand
    does, the scheduler's address (and ``meta``)."""
    from pipeline.checkpoint import load_file, save_file

    run = t.copy(t.shared.run, name)
    arrays, ck = load_file(run / "checkpoint.npz", "checkpoint")
    ck = {k: v for k, v in ck.items() if k not in ("kind", "format_version", "sha256")}
    ck.update(cluster={"scheduler": "tcp://10.0.0.5:8786"}, **meta)
    save_file(run / "checkpoint.npz", "checkpoint", arrays, ck)
    return run


@case("M47")
def _(t: Trial) -> Outcome:
    _in_process_run(t)
    return t.cli("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=2", "--set", "lr=1e30", "-q")


@case("M48")
def _(t: Trial) -> Outcome:
    run = _with_scheduler(t, "stopped")
    (run / "model.npz").unlink()  # stopped before it wrote its model
    (run / "history.json").unlink()
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("evaluate", "stopped", "s.zarr")


@case("M49")
def _(t: Trial) -> Outcome:
    _with_scheduler(t, "runs/done", epoch=3)  # its resume checkpointed epoch 3, then was killed
    out = t.cli("runs", "runs")
    lines = t.stdout.splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["runs/done", "1"], t.stdout
    assert lines[2].startswith(
        "run directory 'runs/done' holds an interrupted resume: its checkpoint is after 3 epoch(s)"
    ), t.stdout
    assert "--out runs/done --resume --scheduler tcp://10.0.0.5:8786`, or write the model" in lines[2], t.stdout
    return out


@case("M50")
def _(t: Trial) -> Outcome:
    _in_process_run(t)
    run = t.path / "run"
    config = (run / "config.toml").read_text()
    (run / ".config.toml.tmp").write_text(config[: len(config) // 2])  # a writer SIGKILLed mid-write
    (run / ".history.json.tmp").write_text('{"epochs": [')
    (run / ".notes.tmp").write_text("the user's")
    listed = t.cli("runs", ".")
    assert listed.exit == "0" and t.stdout.splitlines()[1].split()[:2] == ["run", "1"], t.stdout
    out = t.cli("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=2", "-q", created={"run"})
    assert sorted(p.name for p in run.iterdir()) == [
        ".notes.tmp",
        "checkpoint.npz",
        "config.toml",
        "history.json",
        "model.npz",
    ]
    assert (run / ".notes.tmp").read_text() == "the user's" and "epochs = 2" in (run / "config.toml").read_text()
    t.before = {k: v for k, v in t.before.items() if k.split("/")[0] != "run"}  # the resumed run, as asked
    return out


@case("M11")
def _(t: Trial) -> Outcome:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    (t.path / "sales.parquet").mkdir()
    pq.write_table(
        pa.table({"region": ["north", "south"], "sales": [10.5, 7.25]}), t.path / "sales.parquet" / "2024.parquet"
    )
    return t.cli(
        "predict",
        "run",
        "s.zarr",
        "sales.parquet",
        "--force",
        "--scheduler",
        t.shared.unreachable,
        "--connect-timeout",
        "1",
    )


NAMED_CSV = "a,b,c,label\n" + "".join(f"{i % 5},{(i * 3) % 7},{i % 2},{'xyz'[i % 3]}\n" for i in range(30))


def _named_run(t: Trial) -> None:
    """train.zarr from a CSV with named columns and classes x, y, z, and a model of it in run/
    (untrained weights: only the model's description of its inputs matters here)."""
    from pipeline.config import TrainConfig
    from pipeline.ingest import ingest
    from pipeline.model import Model
    from pipeline.train import build_spec

    t.write("train.csv", NAMED_CSV)
    store = ingest(t.path / "train.csv", t.path / "train.zarr")
    cfg = TrainConfig().with_overrides(["hidden=[4]"])
    spec, target = build_spec(store, cfg)
    n = sum(a * b + b for a, b in zip([3, 4], [4, 3], strict=True))
    model = Model.from_training(store, spec, target, np.zeros(n, np.float32), cfg, [])
    (t.path / "run").mkdir()
    model.save(t.path / "run" / "model.npz")


@case("M12")
def _(t: Trial) -> Outcome:
    _named_run(t)
    t.write("swapped.csv", "b,a,c,label\n" + NAMED_CSV.split("\n", 1)[1])
    t.cli("ingest", "swapped.csv", "swapped.zarr", "--quiet")
    return t.cli("evaluate", "run", "swapped.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M13")
def _(t: Trial) -> Outcome:
    _named_run(t)
    rows = [ln for ln in NAMED_CSV.splitlines()[1:] if not ln.endswith(",x")]
    t.write("nox.csv", "a,b,c,label\n" + "\n".join(rows) + "\n")
    t.cli("ingest", "nox.csv", "nox.zarr", "--quiet")
    return t.cli("evaluate", "run", "nox.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M14")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.write("model.txt", "hidden = [64]\nlr = 0.01\n")
    return t.cli("evaluate", "model.txt", "s.zarr")


_HOLD_RUN = """
import sys, time
from pathlib import Path
from pipeline.train import RunDir
RunDir(Path(sys.argv[1])).claim(False, True).__enter__()
print("claimed", flush=True)
time.sleep(600)
"""


@case("M19")
def _(t: Trial) -> Outcome:
    import subprocess
    import sys

    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN, str(t.path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        return t.cli("train", "s.zarr", "--out", "run", "--force", "--scheduler", t.shared.unreachable)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _failed_run(t: Trial) -> None:
    t.copy(t.shared.store4, "s.zarr")
    (t.path / "failed").mkdir()
    shutil.copy2(t.shared.run / "config.toml", t.path / "failed" / "config.toml")


@case("M20")
def _(t: Trial) -> Outcome:
    _failed_run(t)
    return t.cli("train", "s.zarr", "--out", "failed")


@case("M21")
def _(t: Trial) -> Outcome:
    _failed_run(t)
    return t.cli("train", "s.zarr", "--out", "failed", "--resume")


@case("M22")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    (t.copy(t.shared.run, "cut") / "model.npz").unlink()
    return t.cli("evaluate", "cut", "s.zarr", "--scheduler", t.shared.unreachable)


@case("M23")
def _(t: Trial) -> Outcome:
    import subprocess
    import sys

    t.copy(t.shared.store4, "s.zarr")
    (t.path / "live").mkdir()
    shutil.copy2(t.shared.run / "config.toml", t.path / "live" / "config.toml")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_RUN, str(t.path / "live")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        return t.cli("evaluate", "live", "s.zarr", "--scheduler", t.shared.unreachable)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@case("M24")
def _(t: Trial) -> Outcome:
    _failed_run(t)
    return t.cli("predict", "failed", "s.zarr", "out.parquet", "--scheduler", t.shared.unreachable)


X_CSV = "x0,x1,x2,label\n" + NAMED_CSV.split("\n", 1)[1]


@case("M25")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.ingest import ingest
    from pipeline.model import Model
    from pipeline.train import build_spec

    t.write("train.csv", X_CSV)  # a real header that happens to read x0, x1, x2
    store = ingest(t.path / "train.csv", t.path / "train.zarr")
    cfg = TrainConfig().with_overrides(["hidden=[4]"])
    spec, target = build_spec(store, cfg)
    n = sum(a * b + b for a, b in zip([3, 4], [4, 3], strict=True))
    (t.path / "run").mkdir()
    Model.from_training(store, spec, target, np.zeros(n, np.float32), cfg, []).save(t.path / "run" / "model.npz")
    t.write("swapped.csv", "x1,x0,x2,label\n" + NAMED_CSV.split("\n", 1)[1])
    t.cli("ingest", "swapped.csv", "swapped.zarr", "--quiet")
    return t.cli("evaluate", "run", "swapped.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M26")
def _(t: Trial) -> Outcome:
    _named_run(t)  # column a of train.csv: 0..4, mean 2
    rows = [ln.split(",") for ln in NAMED_CSV.splitlines()[1:]]
    t.write("new.csv", "a,b,c,label\n" + "".join(f"{'' if int(a) > 1 else a},{b},{c},{y}\n" for a, b, c, y in rows))
    t.cli("ingest", "new.csv", "new.zarr", "--quiet")  # its own fill of a: the mean of 0 and 1
    return t.cli(
        "predict", "run", "new.zarr", "p.parquet", "--scheduler", t.shared.unreachable, "--connect-timeout", "1"
    )


@case("M27")
def _(t: Trial) -> Outcome:
    _named_run(t)
    t.write("other.csv", "a,b,c,grade\n" + NAMED_CSV.split("\n", 1)[1])
    t.cli("ingest", "other.csv", "other.zarr", "--quiet")
    return t.cli("evaluate", "run", "other.zarr", "--scheduler", t.shared.unreachable, "--connect-timeout", "1")


@case("M28")
def _(t: Trial) -> Outcome:
    from pipeline.model import load_model

    _named_run(t)
    rows = np.array([[1.0, 2.0, 0.0], [np.nan, 2.0, 0.0]])
    return t.call(lambda: load_model(t.path / "run").predict(rows))


@case("M29")
def _(t: Trial) -> Outcome:
    from pipeline.model import load_model

    t.write(
        "train.csv", "a,colour,label\n" + "".join(f"{i},{'red green blue'.split()[i % 3]},{i % 2}\n" for i in range(30))
    )
    from pipeline.config import TrainConfig
    from pipeline.ingest import ingest
    from pipeline.model import Model
    from pipeline.train import build_spec

    store = ingest(t.path / "train.csv", t.path / "train.zarr")
    cfg = TrainConfig().with_overrides(["hidden=[4]"])
    spec, target = build_spec(store, cfg)
    n = store.n_features * 4 + 4 + 4 * spec["n_out"] + spec["n_out"]
    (t.path / "run").mkdir()
    Model.from_training(store, spec, target, np.zeros(n, np.float32), cfg, []).save(t.path / "run" / "model.npz")
    raw = np.array([[1, "red"], [2, "blue"]], dtype=object)  # the CSV's own columns, not encoded
    return t.call(lambda: load_model(t.path / "run").predict(raw))


def _users_project(t: Trial) -> None:
    """A user's directory with their own files at names a run writes."""
    t.copy(t.shared.store4, "s.zarr")
    (t.path / "proj").mkdir()
    t.write("proj/config.toml", "[model]\nhidden = [8]\n# my notes\n")
    t.write("proj/curves.png", "mine\n")
    t.write("proj/history.json", '{"mine": 1}\n')


@case("C84")
def _(t: Trial) -> Outcome:
    _users_project(t)
    return t.cli("train", "s.zarr", "--out", "proj", "--force", "--config", "proj/config.toml", "--set", "epochs=1")


@case("C85")
def _(t: Trial) -> Outcome:
    _users_project(t)
    return t.cli("train", "s.zarr", "--out", "proj", "--config", "proj/config.toml", "--set", "epochs=1")


@case("C86")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "s.zarr", "--force", "--set", "epochs=1")


@case("C87")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.write("notes.txt", "my notes, not a report\n")
    return t.cli("train", "s.zarr", "--out", "run", "--report", "notes.txt", "--force")


@case("C88")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "run", "--report", "run")


@case("C89")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "clients=2", "--set", "epochs=5")


@case("C90")
def _(t: Trial) -> Outcome:
    return t.cli("runs", "nonexist")


@case("C91")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    t.copy(t.shared.run, "run")
    return t.cli("train", "s.zarr", "--out", "run", "--resume", "--scheduler", t.shared.unreachable)


@case("C92")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    t.copy(t.shared.store4, "s.zarr")
    cfg = TrainConfig(hidden=[8], clients=2, rounds=1, patience=0)
    train(str(t.path / "s.zarr"), cfg, t.path / "run", client=t.shared.client)
    return t.cli("train", "s.zarr", "--out", "run", "--resume", "--scheduler", t.shared.unreachable)


@case("C93")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "dp=central", "--set", "noise_multiplier=1.1", "--set", "target_epsilon=3")


# -- clusters and the parameter server -------------------------------------------------------


@case("K1")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "run", "--scheduler", t.shared.unreachable, "--connect-timeout", "2")


@case("K2")
def _(t: Trial) -> Outcome:
    t.copy(t.shared.store4, "s.zarr")
    return t.cli("train", "s.zarr", "--out", "run", "--scheduler", "foo://bar")


def _push(t: Trial, job: str, delta: np.ndarray, name: str = "p") -> Outcome:
    from distributed.protocol import to_serialize

    from pipeline.ps import ParameterServer

    ps = t.shared.ps
    before = ps.call("pull")
    out = t.call(
        lambda: ParameterServer(job, t.shared.client).call(
            "push", name=name, version=0, delta=to_serialize(delta), samples=1, batches=1, loss=0.0
        )
    )
    after = ps.call("pull")
    assert after["version"] == before["version"]
    np.testing.assert_array_equal(after["params"], before["params"])
    return out


@case("K3")
def _(t: Trial) -> Outcome:
    return _push(t, "nope", np.zeros(10, np.float32))


@case("K4")
def _(t: Trial) -> Outcome:
    return _push(t, t.shared.ps.job, np.zeros(11, np.float32))


@case("K5")
def _(t: Trial) -> Outcome:
    return _push(t, t.shared.ps.job, np.zeros(10, np.float64))


@case("K6")
def _(t: Trial) -> Outcome:
    return _push(t, t.shared.ps.job, np.zeros(10, np.float32), name="stranger")


@case("K7")
def _(t: Trial) -> Outcome:
    from pipeline.ps import ParameterServer

    jobs_before = t.shared.client.run_on_scheduler(_job_names)
    out = t.call(lambda: ParameterServer("../../etc/passwd", t.shared.client))
    assert t.shared.client.run_on_scheduler(_job_names) == jobs_before
    return out


def _compressed_push(t: Trial, codec: str, delta: object) -> Outcome:
    """A push to a fresh 10-parameter job of ``codec`` deltas (top-k: 2 entries a push); the
    job's weights and round must be unchanged afterwards."""
    from pipeline.ps import ParameterServer

    ps = ParameterServer(f"bad-inputs-{codec}", t.shared.client)
    ps.create(np.arange(10, dtype=np.float32), mode="async", compression=codec, topk_fraction=0.2, overwrite=True)
    ps.join("p")
    before = ps.call("pull")
    out = t.call(lambda: ps.call("push", name="p", version=0, delta=delta, samples=1, batches=1, loss=0.0))
    after = ps.call("pull")
    assert after["version"] == before["version"] == 0
    np.testing.assert_array_equal(after["params"], before["params"])
    ps.close()
    return out


def _topk(index: list[int]) -> dict:
    from distributed.protocol import to_serialize

    values = np.ones(len(index), np.float32)
    return {
        "codec": "topk",
        "n": 10,
        "k": 2,
        "index": to_serialize(np.array(index, np.int32)),
        "values": to_serialize(values),
    }


@case("C53")
def _(t: Trial) -> Outcome:
    return _compressed_push(t, "topk", _topk([3, 10]))


@case("C54")
def _(t: Trial) -> Outcome:
    from distributed.protocol import to_serialize

    return _compressed_push(t, "int8", to_serialize(np.zeros(10, np.float32)))


@case("C55")
def _(t: Trial) -> Outcome:
    return _compressed_push(t, "topk", _topk([4, 4]))


@case("C73")
def _(t: Trial) -> Outcome:
    return _compressed_push(t, "none", "shm")  # the shared-memory marker, but no segment was given


def _job_names(dask_scheduler) -> list[str]:
    return sorted(dask_scheduler.extensions["pipeline_ps"].jobs)


def _sharded_names(dask_scheduler) -> list[str]:
    return sorted(dask_scheduler.extensions["pipeline_ps"].sharded)


@case("C64")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    jobs_before = t.shared.client.run_on_scheduler(_job_names)
    cfg = TrainConfig().with_overrides(["epochs=1", "validation=0", "hidden=[8]", "ps_shards=2"])
    out = t.call(lambda: train(str(t.shared.store4), cfg, t.path / "run", client=t.shared.client))
    assert t.shared.client.run_on_scheduler(_job_names) == jobs_before
    assert t.shared.client.run_on_scheduler(_sharded_names) == []
    return out


@case("C65")
def _(t: Trial) -> Outcome:
    return _train_set(t, "--set", "ps_shards=2")


@case("C94")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    jobs_before = t.shared.client.run_on_scheduler(_job_names)
    cfg = TrainConfig().with_overrides(["epochs=1", "validation=0", "hidden=[]", "ps_shards=16"])
    out = t.call(lambda: train(str(t.shared.store4), cfg, t.path / "run", client=t.shared.client))
    assert t.shared.client.run_on_scheduler(_job_names) == jobs_before
    return out


@case("C95")
def _(t: Trial) -> Outcome:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    sets = ["epochs=1", "validation=0", "hidden=[8]", "dp=central", "clip_norm=1.0"]
    train(
        str(t.shared.store4),
        TrainConfig().with_overrides([*sets, "noise_multiplier=1.0"]),
        t.path / "run",
        client=t.shared.client,
    )
    cfg = TrainConfig().with_overrides([*sets, "noise_multiplier=10.0", "epochs=2"])
    return t.call(lambda: train(str(t.shared.store4), cfg, t.path / "run", client=t.shared.client, resume=True))


@case("C96")
def _(t: Trial) -> Outcome:
    from distributed import Client, LocalCluster

    from pipeline.config import TrainConfig
    from pipeline.train import train

    cfg = TrainConfig().with_overrides(["epochs=1", "validation=0", "hidden=[8]"])
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", resources={"ps-shard": 1}
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        return t.call(lambda: train(str(t.shared.store4), cfg, t.path / "run", client=client))


@case("C66")
def _(t: Trial) -> Outcome:
    client = t.shared.client
    shards = [["tcp://127.0.0.1:1", 0, 4], ["tcp://127.0.0.1:2", 5, 10]]
    out = t.call(lambda: client.sync(client.scheduler.ps_place, job="gap", shards=shards, n_params=10))
    assert client.run_on_scheduler(_sharded_names) == []
    return out


# -- Python API ------------------------------------------------------------------------------


def _fit(t: Trial, X: object, y: object, **params: object) -> Outcome:
    from sklearn.exceptions import NotFittedError

    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(max_iter=1, **params)
    out = t.call(lambda: est.fit(X, y))
    with pytest.raises(NotFittedError):
        est.predict(np.zeros((1, 3)))
    return out


_X = np.random.default_rng(0).random((40, 3))
_Y = np.arange(40) % 2


@case("A1")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, hidden_layer_sizes=(0,))


@case("A2")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, batch_size=-1)


@case("A3")
def _(t: Trial) -> Outcome:
    X = _X.copy()
    X[3, 1] = np.nan
    return _fit(t, X, _Y)


@case("A4")
def _(t: Trial) -> Outcome:
    return _fit(t, str(t.shared.store4), _Y)


@case("A5")
def _(t: Trial) -> Outcome:
    import dask.array as da

    X = _X.copy()
    X[3, 1] = np.nan
    return _fit(t, da.from_array(X, chunks=10), da.from_array(_Y, chunks=10))


@case("A6")
def _(t: Trial) -> Outcome:
    from pipeline.estimator import MLPClassifier

    est = MLPClassifier()
    out = t.call(lambda: est.partial_fit(_X, np.arange(len(_X)) % 3, classes=[0, 1]))
    assert not hasattr(est, "classes_") and not hasattr(est, "model_")
    return out


@case("A9")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, solver="lbfgs")


@case("A10")
def _(t: Trial) -> Outcome:
    return _fit(t, {"a": "a.zarr"}, _Y)


@case("A11")
def _(t: Trial) -> Outcome:
    return _fit(t, {}, None)


@case("A12")
def _(t: Trial) -> Outcome:
    return _fit(t, {"a b": "a.zarr"}, None)


@case("A13")
def _(t: Trial) -> Outcome:
    return _fit(t, {"a": 3}, None)


@case("A14")
def _(t: Trial) -> Outcome:
    return _fit(t, {"a": "a.zarr"}, None, client=t.shared.client)


@case("A15")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, options={"dp": "central"})


@case("A16")
def _(t: Trial) -> Outcome:
    from unittest import mock

    from pipeline import estimator

    def no_store(*args: object, **kwargs: object) -> None:
        raise AssertionError("a store was written for a refused configuration")

    started = dict(estimator._local)
    with mock.patch.object(estimator.MLPClassifier, "_write_store", no_store):
        out = _fit(t, _X, _Y, cluster_min_rows=0, options={"blas_threads": 2})
    assert estimator._local == started  # no cluster of the estimators' own was started
    return out


@case("A17")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, options={"hidden": [5]})


@case("A18")
def _(t: Trial) -> Outcome:
    from pipeline import estimator

    started = dict(estimator._local)
    out = _fit(t, _X, _Y, client="lcoal")
    assert estimator._local == started and not estimator._remote
    return out


@case("A19")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, options={"staleness": 4})


def _saved(t: Trial, make: Callable[[Path], object], path: str, **kwargs: object) -> Outcome:
    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0).fit(_X, _Y)
    make(t.path)
    return t.call(lambda: est.save(path, **kwargs))


@case("A20")
def _(t: Trial) -> Outcome:
    return _saved(t, lambda root: (root / "notes.csv").write_text("my,data\n1,2\n"), "notes.csv", overwrite=True)


@case("A21")
def _(t: Trial) -> Outcome:
    return _saved(t, lambda root: (root / "runs").mkdir(), "runs")


@case("A22")
def _(t: Trial) -> Outcome:
    from sklearn.exceptions import NotFittedError

    from pipeline.estimator import LinearRegression

    est = LinearRegression()
    out = t.call(lambda: est.fit(_X, _X[:, 0], sample_weight=np.ones(len(_X))))
    with pytest.raises(NotFittedError):
        est.predict(_X)
    return out


@case("A23")
def _(t: Trial) -> Outcome:
    from distributed import Client, LocalCluster
    from sklearn.exceptions import NotFittedError

    from pipeline.estimator import MLPClassifier

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        c = Client(cluster, set_as_default=False)
        c.close()
    est = MLPClassifier(client=c, cluster_min_rows=0)
    out = t.call(lambda: est.fit(_X, _Y))
    with pytest.raises(NotFittedError):
        est.predict(_X)
    return out


@case("A25")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, batch_size="auto")


@case("A26")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, learning_rate_init=None)


@case("A27")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, hidden_layer_sizes=(5.5,))


@case("A28")
def _(t: Trial) -> Outcome:
    from scipy import sparse

    return _fit(t, sparse.csr_matrix(_X), _Y, cluster_min_rows=0)


@case("A29")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, np.stack([_Y, 1 - _Y], axis=1))


@case("A30")
def _(t: Trial) -> Outcome:
    from pipeline.estimator import MLPClassifier

    big = _X.copy()
    big[2, 1] = 1e39
    fitted = _fit(t, big, _Y)  # refused, and the estimator stays unfitted
    assert fitted.exit == "ValueError" and "contains a value too large for float32" in fitted.message, fitted
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0).fit(_X, _Y)
    return t.call(lambda: clf.predict_proba(big))


@case("A31")
def _(t: Trial) -> Outcome:
    from scipy import sparse

    from pipeline.estimator import LogisticRegression

    est = LogisticRegression()
    out = t.call(lambda: est.fit(sparse.csr_matrix(_X), _Y))
    assert not hasattr(est, "model_")
    return out


def _warm(t: Trial, X: object, y: object, **change: object) -> Outcome:
    """A warm start refused: the fitted model is kept as it was."""
    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0, warm_start=True, random_state=0)
    est.fit(_X, _Y)
    before, curve = est.predict_proba(_X), list(est.loss_curve_)
    out = t.call(lambda: est.set_params(**change).fit(X, y))
    assert est.loss_curve_ == curve
    np.testing.assert_array_equal(est.predict_proba(_X), before)
    return out


@case("A32")
def _(t: Trial) -> Outcome:
    return _warm(t, _X, _Y, hidden_layer_sizes=(5,))


@case("A33")
def _(t: Trial) -> Outcome:
    return _warm(t, _X, np.arange(40) % 3)


@case("A34")
def _(t: Trial) -> Outcome:
    cluster = _warm(t, _X, _Y, cluster_min_rows=0)
    assert cluster.exit == "ValueError" and "trains on a Dask cluster from new weights" in cluster.message, cluster
    return _warm(t, str(t.path / "train.zarr"), None, cluster_min_rows=10_000)


@case("A35")
def _(t: Trial) -> Outcome:
    return _fit(t, _X, _Y, solver="sgd")


@case("A36")
def _(t: Trial) -> Outcome:
    from sklearn.exceptions import NotFittedError

    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(max_iter=1, early_stopping=True)
    out = t.call(lambda: est.partial_fit(_X, _Y, classes=[0, 1]))
    with pytest.raises(NotFittedError):
        est.predict(_X)
    return out


@case("A24")
def _(t: Trial) -> Outcome:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0).fit(_X, _Y)
    bad = _X.copy()
    bad[0, 0] = np.nan
    out = t.call(lambda: est.fit(bad, _Y))
    with pytest.raises(NotFittedError):
        check_is_fitted(est)
    with pytest.raises(NotFittedError):
        est.predict(_X)
    assert not [a for a in vars(est) if a.endswith("_")], vars(est)
    return out


def _store_call(t: Trial, method: str) -> Outcome:
    from pipeline import estimator
    from pipeline.estimator import MLPClassifier

    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0).fit(_X, _Y)
    started = dict(estimator._local)
    out = t.call(lambda: getattr(est, method)("mistyped.zarr"))
    assert estimator._local == started  # no cluster of the estimators' own was started
    return out


@case("A7")
def _(t: Trial) -> Outcome:
    return _store_call(t, "predict")


@case("A8")
def _(t: Trial) -> Outcome:
    return _store_call(t, "score")


# --------------------------------------------------------------------------------------------
# Fixtures and the tests
# --------------------------------------------------------------------------------------------


@dataclass
class Shared:
    store4: Path
    store5: Path
    run: Path
    client: object
    ps: object
    unreachable: str


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: bound, never listening.
    Kept bound, so no process (another test's scheduler or worker) can be given it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """Two small stores, a trained run, and a parameter-server job on a real LocalCluster."""
    from distributed import Client, LocalCluster

    from pipeline.config import TrainConfig
    from pipeline.ps import ParameterServer
    from pipeline.synth import synth
    from pipeline.train import train

    root = tmp_path_factory.mktemp("bad-inputs")
    store4, store5 = root / "s4.zarr", root / "s5.zarr"
    synth(str(store4), rows=400, features=4, classes=3, seed=0)
    synth(str(store5), rows=400, features=5, classes=3, seed=0)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
        _refusing_port() as port,
    ):
        cfg = TrainConfig().with_overrides(["epochs=1", "validation=0", "hidden=[8]"])
        run = train(str(store4), cfg, root / "run", client=client).run_dir
        ParameterServer.ensure_installed(client)
        ps = ParameterServer("bad-inputs", client)
        ps.create(np.arange(10, dtype=np.float32), mode="async")
        ps.join("p")
        yield Shared(store4, store5, Path(run), client, ps, f"tcp://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The URL of an empty bucket on a moto S3 server on 127.0.0.1 (tests/s3server.py)."""
    from tests.s3server import s3_bucket

    with s3_bucket("bad-inputs") as url:
        yield url


def test_the_table_and_the_cases_match() -> None:
    assert len(ROWS) >= 25
    assert set(ROWS) == set(CASES), (sorted(set(ROWS) - set(CASES)), sorted(set(CASES) - set(ROWS)))
    for row in ROWS.values():
        assert row.afterwards, f"row {row.id} says nothing about the data afterwards"
        assert row.fragment or row.exit == "0", f"row {row.id} quotes no message"


@pytest.mark.parametrize("row_id", list(ROWS))
def test_bad_input(
    row_id: str, shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    row = ROWS[row_id]
    monkeypatch.chdir(tmp_path)
    trial = Trial(tmp_path, shared, fixture=request.getfixturevalue)
    out = CASES[row_id](trial)
    assert out.exit == row.exit, (out.exit, out.message)
    assert row.fragment in out.message, out.message
    assert "\n" not in out.message.strip()
    after = snapshot(tmp_path)
    created = {k for k in after if k.split("/")[0] in out.created}
    assert out.created <= {k.split("/")[0] for k in created}, "the row's output was not created"
    assert {k: v for k, v in after.items() if k not in created} == trial.before
