"""Streaming ingest of CSV, Parquet, NumPy (.npy/.npz) and IDX files into a dataset store.

Nothing is ever read whole: CSV goes through ``pyarrow.csv.open_csv`` in blocks, Parquet through
``ParquetFile.iter_batches``, NumPy and IDX files are read in row blocks from their headers on.
Two streaming passes:

* pass 1 profiles every column: row count, which columns are numeric, categories of string
  columns, class labels, means for imputation, and validates (non-numeric values in numeric
  columns, missing values under ``reject``, a single class, ...);
* pass 2 encodes and writes row chunks, computing the per-feature mean/std (float64, merged batch
  by batch) of exactly what was written.

Policies (recorded in the store's ``encodings`` attribute so prediction applies the same ones):

* **Columns**: the target is a name or 0-based index (negative allowed), default the last column;
  ``drop`` removes columns. A column is numeric when its values parse as numbers; a column whose
  values are mostly numbers but has a few that are not is an error (naming column and row); a
  column of strings is categorical.
* **Categorical features**: ``encoding="auto"`` one-hot encodes columns of at most 16 categories
  (features ``name=category``) and ordinal-encodes the others (codes 0..K-1 in sorted category
  order); ``"onehot"``/``"ordinal"`` force one. Categories unseen in training (``like=``) become an
  all-zero one-hot row, or the most frequent category's code for ordinal columns.
* **Labels**: string labels are stripped of whitespace and of one trailing ``.`` (adult.test writes
  ``<=50K.``) and become class indices into the sorted class names; integer labels with at most
  50 distinct values mean classification, other numbers regression (override with ``task``).
* **Missing values** (empty, ``?``, ``NA``, ``N/A``, ``NaN``, ``null``, ``None`` and +/-inf):
  ``impute`` (default) fills numeric features with the training mean and categorical features with
  the most frequent category; ``reject`` raises naming the column and row; ``drop`` drops the row.
  A missing target is an error unless ``drop``. The store never holds NaN.
* **CSV layout**: delimiter detected among ``, TAB ; | space`` (consistent count over the first
  lines); a space delimiter means whitespace-separated: runs of blanks are one separator and
  leading blanks are ignored (aligned columns). A header is detected when every field of the first
  line is non-numeric while some column below is numeric (override with ``header``).
* **Comments**: lines starting with ``comment`` (default ``|``, adult.test's first line) are
  skipped, as are blank lines (a comment line inside the data is skipped when its field count
  differs from the data's).
* ``like=TRAIN_STORE`` reuses the training store's columns, encodings, imputation values, classes
  and mean/std, so train and test agree; extra columns in the source are ignored.

Feature dtype is the source's compact dtype: uint8 when every feature is an integer in 0..255
(images, one-hot codes, letter's 0..15 features), else float32.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import IngestError
from pipeline.progress import Progress
from pipeline.store import (
    RunningStats,
    Store,
    check_not_inside,
    check_replaceable,
    create_store,
    default_chunk_rows,
    open_store,
)

FORMATS = ("csv", "parquet", "npy", "npz", "idx")
MISSING_TOKENS = ["", "?", "NA", "N/A", "NaN", "nan", "NAN", "null", "NULL", "None", "none"]
MISSING_POLICIES = {"impute": "impute", "impute-mean": "impute", "reject": "reject", "drop": "drop", "drop-row": "drop"}
ONEHOT_MAX = 16
MAX_CATEGORIES = 100_000
_MAX_COUNTED = 10_000  # distinct numbers counted per column (class labels, mixed columns)
MAX_CLASSES_INFERRED = 50
_NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|Inf|INF|infinity|Infinity)$"
CSV_BLOCK = 8 * 2**20
ARRAY_BLOCK_BYTES = 32 * 2**20
_CSV_SUFFIXES = {".csv", ".tsv", ".txt", ".data", ".dat", ".test", ".trn", ".tst", ".train"}


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def parse_rows(rows: str | slice | tuple | None) -> tuple[int, int | None]:
    """``"START:STOP"`` (either side may be empty) or a slice -> ``(start, stop)``."""
    if rows is None:
        return 0, None
    if isinstance(rows, slice):
        start, stop = rows.start, rows.stop
    elif isinstance(rows, tuple):
        start, stop = rows
    else:
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", str(rows))
        if not m:
            raise IngestError(f"--rows {rows!r} is not START:STOP (e.g. 0:16000 or 16000:)")
        start = int(m.group(1)) if m.group(1) else 0
        stop = int(m.group(2)) if m.group(2) else None
    start = int(start or 0)
    if start < 0 or (stop is not None and int(stop) < start):
        raise IngestError(f"--rows {rows!r}: need 0 <= START <= STOP")
    return start, (None if stop is None else int(stop))


def detect_format(src: Path) -> str:
    name = src.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".npy", ".npz"):
        return suffix[1:]
    if suffix in (".idx", ".ubyte") or re.search(r"idx\d", name):
        return "idx"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    with _open_text_bytes(src) as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
        if b"\x00" not in head and head:
            return "csv"
    except UnicodeDecodeError:
        pass
    raise IngestError(
        f"cannot tell the format of {str(src)!r} from its name or content; pass --format "
        f"{'|'.join(FORMATS)}"
    )


def _open_text_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


# --------------------------------------------------------------------------------------------
# CSV / Parquet: batches of Arrow columns
# --------------------------------------------------------------------------------------------


@dataclass
class _CsvLayout:
    delimiter: str
    header: bool
    names: list[str]
    skip: int  # lines before the data (leading comments + header)


def _sniff_csv(src: Path, delimiter: str | None, header: bool | None, comment: str) -> _CsvLayout:
    lines: list[str] = []
    skip = 0
    with _open_text(src) as text:
        for line in text:
            stripped = line.strip()
            if not lines and (not stripped or (comment and stripped.startswith(comment))):
                skip += 1
                continue
            if stripped and not (comment and stripped.startswith(comment)):
                lines.append(line.rstrip("\r\n"))
            if len(lines) >= 50:
                break
    if not lines:
        raise IngestError(f"source {str(src)!r} is empty (no data lines); check the file")
    if delimiter is None:
        sample = lines[1:] if len(lines) > 1 else lines
        for cand in (",", "\t", ";", "|", " "):
            counts = {ln.count(cand) for ln in sample}
            if len(counts) == 1 and counts != {0}:
                delimiter = cand
                break
        else:
            widths = {len(ln.split()) for ln in sample}
            delimiter = " " if len(widths) == 1 and widths != {1} else ","
    elif delimiter in ("\\t", "tab"):
        delimiter = "\t"
    elif delimiter in ("whitespace", "space", "\\s"):
        delimiter = " "
    if delimiter == " ":  # whitespace-separated: runs of spaces/tabs are one separator
        rows = [ln.split() for ln in lines]
    else:
        rows = list(csv.reader(lines, delimiter=delimiter, quotechar='"', skipinitialspace=True))
    first = [c.strip() for c in rows[0]]

    def numeric(v: str) -> bool:
        return bool(re.match(_NUM_RE, v.strip())) or v.strip() in MISSING_TOKENS

    if header is None:
        later_numeric = any(
            all(numeric(r[j]) for r in rows[1:] if j < len(r)) for j in range(len(first))
        ) if len(rows) > 1 else False
        header = all(not numeric(v) for v in first) and later_numeric
    if header:
        names = [v or f"c{j}" for j, v in enumerate(first)]
        if len(set(names)) != len(names):
            seen: dict[str, int] = {}
            out = []
            for v in names:
                seen[v] = seen.get(v, 0) + 1
                out.append(v if seen[v] == 1 else f"{v}.{seen[v] - 1}")
            names = out
        skip += 1
    else:
        names = [f"c{j}" for j in range(len(first))]
    return _CsvLayout(delimiter, bool(header), names, skip)


_WS_EDGES = re.compile(rb"(?m)^[ \t]+|[ \t]+(?=\r?$)")
_WS_RUNS = re.compile(rb"[ \t]+")


class _CollapseWhitespace(io.RawIOBase):
    """A byte stream with leading/trailing blanks removed and runs of spaces/tabs turned into one
    space, line by line, so pyarrow can parse whitespace-aligned columns with delimiter ' '."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            chunk = self.raw.read(2**20)
            if not chunk:
                return 0
            chunk += self.raw.readline()  # end on a line boundary
            self.buf = _WS_RUNS.sub(b" ", _WS_EDGES.sub(b"", chunk))
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _csv_batches(src: Path, layout: _CsvLayout, comment: str, block_size: int | None = None) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pcsv

    bad: list[Any] = []

    def handler(row: Any) -> str:
        text = (row.text or "").strip()
        if not text or (comment and text.startswith(comment)):
            return "skip"
        bad.append(row)
        return "error"

    try:
        source: Any = str(src)
        if layout.delimiter == " ":
            source = io.BufferedReader(_CollapseWhitespace(_open_text_bytes(src)), buffer_size=2**20)
        reader = pcsv.open_csv(
            source,
            read_options=pcsv.ReadOptions(column_names=layout.names, skip_rows=layout.skip, block_size=block_size or CSV_BLOCK),
            parse_options=pcsv.ParseOptions(
                delimiter=layout.delimiter, quote_char='"', ignore_empty_lines=True, invalid_row_handler=handler
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in layout.names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            line = _find_line(src, row.text)
            where = f"line {line}" if line else "a line"
            raise IngestError(
                f"ragged CSV: {where} of {str(src)!r} has {row.actual_columns} fields, expected "
                f"{row.expected_columns} ({row.text[:60]!r}); fix the row or pass --delimiter"
            ) from None
        raise IngestError(f"cannot parse {str(src)!r} as CSV ({exc}); check --delimiter/--format") from None


def _find_line(src: Path, text: str) -> int | None:
    with _open_text(src) as lines:
        for i, raw in enumerate(lines, 1):
            if raw.rstrip("\r\n") == text.rstrip("\r\n"):
                return i
    return None


def _parquet_batches(src: Path) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(src))
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestError(f"cannot read {str(src)!r} as Parquet ({exc}); check --format") from None
    with pf:
        yield from pf.iter_batches(batch_size=65536)


def _parquet_names(src: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(str(src)).names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestError(f"cannot read {str(src)!r} as Parquet ({exc}); check --format") from None


@dataclass
class _Parsed:
    """One batch of one column: numbers (NaN where missing / not a number) and masks."""

    values: np.ndarray  # float64
    missing: np.ndarray  # bool: missing token, null, NaN or inf
    nonnum: np.ndarray  # bool: present but not a number
    inf: np.ndarray  # bool
    strings: pa.Array | None  # trimmed strings (string columns only)


def _parse(arr: pa.Array) -> _Parsed:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        s = pc.fill_null(pc.utf8_trim_whitespace(arr), "")  # null -> "" (a missing token)
        miss = pc.is_in(s, value_set=pa.array(MISSING_TOKENS)).to_numpy(zero_copy_only=False)
        try:
            vals = pc.cast(pc.if_else(pa.array(miss), None, s), pa.float64()).to_numpy(zero_copy_only=False)
            nonnum = np.zeros(n, bool)
        except pa.ArrowInvalid:
            isnum = pc.match_substring_regex(s, _NUM_RE).to_numpy(zero_copy_only=False) & ~miss
            vals = pc.cast(pc.if_else(pa.array(isnum), s, None), pa.float64()).to_numpy(zero_copy_only=False)
            nonnum = ~isnum & ~miss
        vals = np.asarray(vals, np.float64)
        inf = np.isinf(vals)
        vals = np.where(inf, np.nan, vals)
        return _Parsed(vals, miss | inf, nonnum, inf, s)
    if pa.types.is_boolean(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        vals = np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
        inf = np.isinf(vals)
        miss = np.isnan(vals) | inf
        return _Parsed(np.where(inf, np.nan, vals), miss, np.zeros(n, bool), inf, None)
    raise IngestError(f"column type {arr.type} is not supported; cast it to a number or a string")


@dataclass
class _ColumnProfile:
    name: str
    n_num: int = 0
    n_nonnum: int = 0
    n_missing: int = 0
    first_nonnum: tuple[int, str] | None = None
    first_missing: tuple[int, str] | None = None
    nonnum_counts: dict[str, int] = field(default_factory=dict)
    num_counts: dict[float, int] | None = field(default_factory=dict)
    num_str_counts: dict[str, int] | None = field(default_factory=dict)
    total: float = 0.0
    minimum: float = np.inf
    maximum: float = -np.inf
    integral: bool = True

    def update(self, p: _Parsed, row0: int) -> None:
        ok = ~p.missing & ~p.nonnum
        v = p.values[ok]
        self.n_num += len(v)
        if len(v):
            self.total += float(v.sum())
            self.minimum = min(self.minimum, float(v.min()))
            self.maximum = max(self.maximum, float(v.max()))
            self.integral = self.integral and bool(np.all(v == np.round(v)))
            if self.num_counts is not None:
                u, c = np.unique(v, return_counts=True)
                if len(u) + len(self.num_counts) > _MAX_COUNTED:  # a continuous column: stop counting
                    self.num_counts = None
                else:
                    for a, b in zip(u.tolist(), c.tolist(), strict=True):
                        self.num_counts[a] = self.num_counts.get(a, 0) + b
            if p.strings is not None and self.num_str_counts is not None:
                vc = pc.value_counts(pc.filter(p.strings, pa.array(ok)))
                if len(vc) + len(self.num_str_counts) > _MAX_COUNTED:
                    self.num_str_counts = None
                else:
                    for item in vc.to_pylist():
                        self.num_str_counts[item["values"]] = self.num_str_counts.get(item["values"], 0) + item["counts"]
        nm = int(p.missing.sum())
        if nm:
            self.n_missing += nm
            if self.first_missing is None:
                i = int(np.argmax(p.missing))
                raw = "inf" if p.inf[i] else (p.strings[i].as_py() if p.strings is not None else "NaN")
                self.first_missing = (row0 + i, raw)
        nn = int(p.nonnum.sum())
        if nn:
            self.n_nonnum += nn
            if self.first_nonnum is None:
                i = int(np.argmax(p.nonnum))
                self.first_nonnum = (row0 + i, p.strings[i].as_py())  # type: ignore[index]
            vc = pc.value_counts(pc.filter(p.strings, pa.array(p.nonnum)))
            for item in vc.to_pylist():
                self.nonnum_counts[item["values"]] = self.nonnum_counts.get(item["values"], 0) + item["counts"]
            if len(self.nonnum_counts) > MAX_CATEGORIES:
                raise IngestError(
                    f"column {self.name!r} has more than {MAX_CATEGORIES:,} distinct strings (an identifier?); "
                    "leave it out with --drop"
                )

    @property
    def mean(self) -> float:
        return self.total / self.n_num if self.n_num else 0.0


def _clean_label(s: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(s, r"\.$", "")


def _resolve_column(spec: Any, names: list[str], what: str) -> str:
    if spec is None:
        return names[-1]
    if isinstance(spec, str) and spec in names:
        return spec
    try:
        idx = int(spec)
    except (TypeError, ValueError):
        raise IngestError(
            f"{what} column {spec!r} not found; columns are: {', '.join(names[:30])}"
            + (" ..." if len(names) > 30 else "")
        ) from None
    if not -len(names) <= idx < len(names):
        raise IngestError(f"{what} column index {idx} out of range; the source has {len(names)} columns (0-based)")
    return names[idx]


def _ingest_table(
    src: Path,
    dest: str,
    batches: Callable[[], Iterator[pa.RecordBatch]],
    names: list[str],
    source_attrs: dict[str, Any],
    *,
    target: Any,
    drop: Sequence[Any],
    task: str | None,
    rows: tuple[int, int | None],
    chunk_rows: int | None,
    codec: str | None,
    missing: str,
    encoding: str,
    like: Store | None,
    force: bool,
    progress: bool,
) -> Store:
    if like is not None:
        t_name = (like.attrs.get("target") or {}).get("name")
        tcol = _resolve_column(target if target is not None else t_name, names, "target")
        encs = like.attrs.get("encodings") or []
        feats = [e["name"] for e in encs]
        absent = [f for f in feats if f not in names]
        if absent:
            raise IngestError(
                f"columns {absent[:5]} of the training store {like.path!r} are not in {str(src)!r}; "
                "ingest a source with the same columns"
            )
        task = like.task
    else:
        tcol = _resolve_column(target, names, "target")
        dropped = {_resolve_column(d, names, "--drop") for d in drop}
        feats = [n for n in names if n != tcol and n not in dropped]
        if not feats:
            raise IngestError("no feature columns left after --target/--drop; keep at least one")
    start, stop = rows

    def ranged() -> Iterator[tuple[int, pa.RecordBatch]]:
        """Batches restricted to the requested data rows, with the index of their first row."""
        pos = 0
        for b in batches():
            n = b.num_rows
            lo, hi = max(start - pos, 0), n if stop is None else min(stop - pos, n)
            if hi > lo:
                yield pos + lo, b.slice(lo, hi - lo)
            pos += n
            if stop is not None and pos >= stop:
                return

    # ---- pass 1: profile and validate -------------------------------------------------------
    profiles = {c: _ColumnProfile(c) for c in [*feats, tcol]}
    n_seen = 0
    n_drop = 0
    prog = Progress(f"ingest {src.name}: pass 1/2", enabled=progress)
    for row0, b in ranged():
        drop_mask = np.zeros(b.num_rows, bool)
        for c in profiles:
            p = _parse(b.column(c))
            profiles[c].update(p, row0)
            drop_mask |= p.missing
        n_drop += int(drop_mask.sum())
        n_seen += b.num_rows
        prog.update(b.num_rows)
    prog.done()
    if n_seen == 0:
        raise IngestError(f"source {str(src)!r} has no data rows{' in --rows' if rows != (0, None) else ''}; check the file and --rows")
    n_out = n_seen - n_drop if missing == "drop" else n_seen
    if n_out == 0:
        raise IngestError("every row has a missing value; use --missing impute")

    # column kinds
    encodings: list[dict[str, Any]] = []
    if like is not None:
        encodings = [dict(e) for e in like.attrs["encodings"]]
    for c in feats:
        pr = profiles[c]
        enc = next((e for e in encodings if e["name"] == c), None)
        numeric_expected = enc["kind"] == "numeric" if enc else (pr.n_nonnum == 0 or pr.n_num > pr.n_nonnum)
        if numeric_expected and pr.n_nonnum:
            r, v = pr.first_nonnum  # type: ignore[misc]
            raise IngestError(
                f"column {c!r} is numeric but has the non-numeric value {v!r} at data row {r} (0-based); "
                "fix the value or mark it missing (empty, ?, NA)"
            )
        if missing == "reject" and pr.n_missing:
            r, v = pr.first_missing  # type: ignore[misc]
            raise IngestError(
                f"column {c!r} has a missing or infinite value ({v!r}) at data row {r} (0-based) and "
                "--missing reject was given; fix the data or use --missing impute/drop"
            )
        if enc is not None:
            continue
        if numeric_expected:
            encodings.append({"name": c, "kind": "numeric", "fill": pr.mean})
        else:
            counts = dict(pr.nonnum_counts)
            if pr.n_num:
                if pr.num_str_counts is None:
                    raise IngestError(f"column {c!r} mixes numbers and strings with too many values; clean it up")
                for k, v in pr.num_str_counts.items():
                    counts[k] = counts.get(k, 0) + v
            cats = sorted(counts)
            kind = encoding if encoding != "auto" else ("onehot" if len(cats) <= ONEHOT_MAX else "ordinal")
            fill = max(cats, key=lambda k: (counts[k], k))
            encodings.append({"name": c, "kind": kind, "categories": cats, "fill": fill})
    # feature layout
    feature_names: list[str] = []
    for e in encodings:
        e["offset"] = len(feature_names)
        if e["kind"] == "onehot":
            feature_names += [f"{e['name']}={k}" for k in e["categories"]]
        else:
            feature_names.append(e["name"])
    n_features = len(feature_names)

    # target
    tp = profiles[tcol]
    if tp.n_missing and missing != "drop":
        r, v = tp.first_missing  # type: ignore[misc]
        raise IngestError(
            f"target column {tcol!r} is missing ({v!r}) at data row {r} (0-based); fix it or pass --missing drop"
        )
    target_attrs: dict[str, Any] = {"name": tcol}
    string_labels = tp.n_nonnum > 0
    if like is not None:
        classes = like.classes
        lt = like.attrs.get("target") or {}
        string_labels = lt.get("kind") == "string"
        class_values = lt.get("class_values")
        if task == "classification":
            _check_known_labels(tp, classes or [], class_values, string_labels, like.path)
    else:
        if task is None:
            if string_labels:
                task = "classification"
            elif tp.integral and tp.num_counts is not None and len(tp.num_counts) <= MAX_CLASSES_INFERRED:
                task = "classification"
            else:
                task = "regression"
        if task == "classification":
            if string_labels:
                labels: dict[str, int] = {}
                for k, v in {**tp.nonnum_counts, **(tp.num_str_counts or {})}.items():
                    k2 = k[:-1] if k.endswith(".") else k
                    labels[k2] = labels.get(k2, 0) + v
                classes = sorted(labels)
                class_values = None
            else:
                if tp.num_counts is None or len(tp.num_counts) > 10_000:
                    raise IngestError(f"target column {tcol!r} has too many distinct values for classification; pass --task regression")
                vals = sorted(tp.num_counts)
                class_values = vals
                classes = [str(int(v)) if float(v).is_integer() else str(v) for v in vals]
            if len(classes) < 2:
                raise IngestError(
                    f"target column {tcol!r} has a single class {classes[0]!r}; a classifier needs at least 2 "
                    "(check --target, or pass --task regression)"
                )
        else:
            if string_labels:
                r, v = tp.first_nonnum  # type: ignore[misc]
                raise IngestError(
                    f"target column {tcol!r} has the non-numeric value {v!r} at data row {r} (0-based) but the "
                    "task is regression; pass --task classification or fix the value"
                )
            classes = None
            class_values = None
    target_attrs["kind"] = "string" if string_labels else "numeric"
    if class_values is not None:
        target_attrs["class_values"] = list(class_values)

    # dtype: uint8 if every feature is an integer in 0..255 and nothing gets a fractional fill
    compact = True
    for e in encodings:
        if e["kind"] == "numeric":
            pr = profiles[e["name"]]
            if not (pr.integral and pr.minimum >= 0 and pr.maximum <= 255) or (pr.n_missing and missing == "impute"):
                compact = False
        elif e["kind"] == "ordinal" and len(e["categories"]) > 256:
            compact = False
    x_dtype = np.uint8 if compact else np.float32
    y_dtype = np.int32 if task == "classification" else np.float32
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(n_features * np.dtype(x_dtype).itemsize, n_out)

    # ---- pass 2: encode and write --------------------------------------------------------------
    xstats = RunningStats(n_features)
    ystats = RunningStats(1)
    n_classes = len(classes) if classes else 0
    class_counts = np.zeros(n_classes, np.int64)
    unknown: dict[str, int] = {}
    value_sets = {e["name"]: pa.array(e["categories"], pa.string()) for e in encodings if e["kind"] != "numeric"}
    label_set = pa.array(classes, pa.string()) if classes and string_labels else None
    attrs = {
        "task": task,
        "classes": classes,
        "feature_names": feature_names,
        "encodings": encodings,
        "missing": missing,
        "source": source_attrs,
    }
    prog = Progress(f"ingest {src.name}: pass 2/2", total=n_seen, enabled=progress)
    with create_store(
        dest, n_features, x_dtype=x_dtype, y_dtype=y_dtype, chunk_rows=chunk_rows, codec=codec, force=force, attrs=attrs
    ) as w:
        for _row0, b in ranged():
            n = b.num_rows
            keep = np.ones(n, bool)
            X = np.zeros((n, n_features), np.float32)
            for e in encodings:
                p = _parse(b.column(e["name"]))
                if missing == "drop":
                    keep &= ~p.missing
                o = e["offset"]
                if e["kind"] == "numeric":
                    X[:, o] = np.where(p.missing, e["fill"], p.values)
                    continue
                s = pc.if_else(pa.array(p.missing), pa.scalar(e["fill"], pa.string()), p.strings)
                codes = pc.index_in(s, value_set=value_sets[e["name"]]).to_numpy(zero_copy_only=False)
                codes = np.asarray(pd_fill(codes), np.float64)
                unk = np.isnan(codes)
                if unk.any():
                    unknown[e["name"]] = unknown.get(e["name"], 0) + int(unk.sum())
                if e["kind"] == "onehot":
                    rows_ok = np.nonzero(~unk)[0]
                    X[rows_ok, o + codes[rows_ok].astype(np.int64)] = 1.0
                else:
                    fill_code = e["categories"].index(e["fill"])
                    X[:, o] = np.where(unk, fill_code, codes)
            tpar = _parse(b.column(tcol))
            if missing == "drop":
                keep &= ~tpar.missing
            if task == "classification":
                if string_labels:
                    lab = _clean_label(tpar.strings)  # type: ignore[arg-type]
                    y = pc.index_in(lab, value_set=label_set).to_numpy(zero_copy_only=False)
                    y = np.asarray(pd_fill(y), np.float64)
                else:
                    cv = np.asarray(class_values, np.float64)
                    pos = np.clip(np.searchsorted(cv, tpar.values), 0, len(cv) - 1)
                    y = np.where(cv[pos] == tpar.values, pos, np.nan)
                bad = np.isnan(y) & keep
                if bad.any():  # only reachable with like=: labels were checked in pass 1
                    raise IngestError(f"target column {tcol!r} has a label not among the classes {classes}")
                y = np.where(keep, y, 0).astype(np.int32)
            else:
                y = tpar.values.astype(np.float32)
            if not keep.all():
                X, y = X[keep], y[keep]
            Xc = X.astype(x_dtype, copy=False)
            if like is None:
                xstats.update(X)
            if task == "classification":
                class_counts += np.bincount(y, minlength=n_classes)
            else:
                ystats.update(y[:, None])
            w.append(Xc, y)
            prog.update(n)
        prog.done()
        if like is not None:
            w.attrs["mean"] = like.mean.tolist()
            w.attrs["std"] = like.std.tolist()
        else:
            w.attrs["mean"] = xstats.mean.tolist()
            w.attrs["std"] = xstats.std.tolist()
        if task == "classification":
            target_attrs["class_counts"] = class_counts.tolist()
        else:
            lt = (like.attrs.get("target") or {}) if like is not None else {}
            target_attrs["mean"] = lt.get("mean", ystats.mean.tolist())
            target_attrs["std"] = lt.get("std", ystats.std.tolist())
        w.attrs["target"] = target_attrs
        w.attrs["source"] = {
            **source_attrs,
            "rows": [start, stop],
            "rows_read": n_seen,
            "rows_dropped": n_seen - w.n_rows - w._pending_rows,
            "missing_imputed": {c: profiles[c].n_missing for c in feats if profiles[c].n_missing and missing == "impute"},
            "unknown_categories": unknown,
        }
    return w.commit_result  # type: ignore[attr-defined]


def pd_fill(a: Any) -> np.ndarray:
    """Arrow int array with nulls -> float64 NumPy with NaN."""
    return np.asarray(a, dtype=np.float64) if not isinstance(a, np.ndarray) or a.dtype == object else a.astype(np.float64)


def _check_known_labels(tp: _ColumnProfile, classes: list[str], class_values: Any, string_labels: bool, path: str) -> None:
    if string_labels:
        seen = {**tp.nonnum_counts, **(tp.num_str_counts or {})}
        seen_clean = {k[:-1] if k.endswith(".") else k for k in seen}
        unknown = sorted(seen_clean - set(classes))
    else:
        known = set(class_values or [])
        unknown = sorted(str(v) for v in (tp.num_counts or {}) if v not in known)
    if unknown:
        raise IngestError(
            f"labels {unknown[:5]} are not among the classes of the training store {path!r} ({classes[:10]}); "
            "check --target or ingest the training data with every class"
        )


# --------------------------------------------------------------------------------------------
# NumPy and IDX: blocks of rows
# --------------------------------------------------------------------------------------------


@dataclass
class _ArraySource:
    shape: tuple[int, ...]
    dtype: np.dtype
    open: Callable[[], Any]  # -> readable binary stream positioned at the first element
    name: str

    def blocks(self, rows_per_block: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        row_items = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        row_bytes = row_items * self.dtype.itemsize
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        with self.open() as f:
            if start:
                if f.seekable():
                    f.seek(start * row_bytes, io.SEEK_CUR)
                else:
                    _skip(f, start * row_bytes)
            pos = start
            while pos < stop:
                k = min(rows_per_block, stop - pos)
                buf = _read_exact(f, k * row_bytes, self.name)
                yield np.frombuffer(buf, dtype=self.dtype).reshape(k, *self.shape[1:])
                pos += k


def _read_exact(f: Any, n: int, name: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise IngestError(f"{name} is truncated (expected {n} more bytes, got {len(buf)}); re-download it")
    return buf


def _skip(f: Any, n: int) -> None:
    while n > 0:
        k = len(f.read(min(n, 2**24)))
        if k == 0:
            return
        n -= k


def _npy_source(opener: Callable[[], Any], name: str) -> _ArraySource:
    with opener() as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
        except ValueError as exc:
            raise IngestError(f"{name} is not a valid .npy array ({exc}); check --format") from None
        offset = f.tell()
    if dtype.hasobject:
        raise IngestError(f"{name} holds Python objects; save a numeric array")
    if fortran and len(shape) > 1:
        raise IngestError(f"{name} is Fortran-ordered; save it with np.ascontiguousarray")

    class _Opened:
        def __enter__(self) -> Any:
            self.f = opener()
            self.f.__enter__()
            _skip(self.f, offset) if not self.f.seekable() else self.f.seek(offset)
            return self.f

        def __exit__(self, *a: Any) -> None:
            self.f.__exit__(*a)

    return _ArraySource(tuple(shape), dtype, _Opened, name)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_source(path: Path) -> _ArraySource:
    def opener() -> Any:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")

    try:
        with opener() as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise IngestError(f"{str(path)!r} is not an IDX file (bad magic number); check --format")
            ndim = head[3]
            dims = np.frombuffer(_read_exact(f, 4 * ndim, str(path)), ">u4").astype(int)
    except (OSError, EOFError) as exc:
        if isinstance(exc, gzip.BadGzipFile) or "gzip" in str(exc).lower():
            raise IngestError(f"{str(path)!r} is not a valid gzip file ({exc}); re-download it") from None
        raise
    dtype = np.dtype(_IDX_TYPES[head[2]])
    offset = 4 + 4 * ndim

    class _Opened:
        def __enter__(self) -> Any:
            self.f = opener()
            _skip(self.f, offset)
            return self.f

        def __exit__(self, *a: Any) -> None:
            self.f.close()

    return _ArraySource(tuple(int(d) for d in dims), dtype, _Opened, str(path))


def _npz_sources(path: Path) -> tuple[_ArraySource, _ArraySource]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise IngestError(f"{str(path)!r} is not a valid .npz (zip) file; check --format") from None
    with zf:
        keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    for xk, yk in (("X", "y"), ("x", "y"), ("X", "Y"), ("data", "target"), ("x_train", "y_train"), ("images", "labels")):
        if xk in keys and yk in keys:
            break
    else:
        raise IngestError(f"{str(path)!r} has arrays {keys}; expected keys X and y (or x/y, data/target)")

    def member(k: str) -> Callable[[], Any]:
        def opener() -> Any:
            z = zipfile.ZipFile(path)
            f = z.open(f"{k}.npy")
            f._owner_zip = z  # keep the archive alive as long as the member
            return f

        return opener

    return _npy_source(member(xk), f"{path}[{xk}]"), _npy_source(member(yk), f"{path}[{yk}]")


def _ingest_arrays(
    src: Path,
    dest: str,
    xs: _ArraySource,
    ys: _ArraySource | None,
    source_attrs: dict[str, Any],
    *,
    target: Any,
    task: str | None,
    rows: tuple[int, int | None],
    chunk_rows: int | None,
    codec: str | None,
    missing: str,
    like: Store | None,
    force: bool,
    progress: bool,
) -> Store:
    n_total = xs.shape[0]
    tcol: int | None = None
    if ys is None:
        if len(xs.shape) != 2 or xs.shape[1] < 2:
            raise IngestError(
                f"{xs.name} has shape {xs.shape}: without --labels the target must be one of its columns "
                "(a 2-D array with at least 2 columns)"
            )
        tcol = int(target) if target is not None else -1
        if not -xs.shape[1] <= tcol < xs.shape[1]:
            raise IngestError(f"target column {target} out of range; the array has {xs.shape[1]} columns")
        tcol %= xs.shape[1]
    elif ys.shape[0] != n_total:
        raise IngestError(
            f"X has {n_total} rows but y has {ys.shape[0]} ({xs.name} vs {ys.name}); they must have the same length"
        )
    elif len(ys.shape) > 2:
        raise IngestError(f"labels {ys.name} have shape {ys.shape}; expected (n,) or (n, k)")
    start, stop = rows
    stop = n_total if stop is None else min(stop, n_total)
    if stop <= start:
        raise IngestError(f"source {str(src)!r} has no data rows{' in --rows' if rows != (0, None) else ''} (it has {n_total}); check --rows")
    row_items = int(np.prod(xs.shape[1:], dtype=np.int64)) if len(xs.shape) > 1 else 1
    n_features = row_items - (1 if tcol is not None else 0)
    if like is not None and like.n_features != n_features:
        raise IngestError(f"{xs.name} has {n_features} features but the training store {like.path!r} has {like.n_features}")
    block = max(1, ARRAY_BLOCK_BYTES // max(1, row_items * xs.dtype.itemsize))

    def pairs() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        xb = xs.blocks(block, start, stop)
        yb = ys.blocks(block, start, stop) if ys is not None else None
        pos = start
        for X in xb:
            X = X.reshape(len(X), -1)
            if yb is not None:
                y = next(yb)
            else:
                y = X[:, tcol]
                X = np.delete(X, tcol, axis=1)
            yield pos, X, y
            pos += len(X)

    floaty = xs.dtype.kind == "f"
    y_float = (ys.dtype if ys is not None else xs.dtype).kind == "f"
    # ---- pass 1 ---------------------------------------------------------------------------------
    total = np.zeros(n_features)
    count = np.zeros(n_features)
    n_bad_rows = 0
    label_counts: dict[float, int] | None = {}
    y_integral = True
    prog = Progress(f"ingest {src.name}: pass 1/2", total=stop - start, enabled=progress)
    for pos, X, y in pairs():
        if floaty:
            bad = ~np.isfinite(X)
            if bad.any():
                if missing == "reject":
                    r, c = np.argwhere(bad)[0]
                    raise IngestError(
                        f"column {int(c)} has a missing or infinite value ({X[r, c]}) at row {pos + int(r)} "
                        "(0-based) and --missing reject was given; fix the data or use --missing impute/drop"
                    )
                n_bad_rows += int(bad.any(axis=1).sum())
            Xf = np.where(bad, 0.0, X.astype(np.float64))
            total += Xf.sum(axis=0)
            count += (~bad).sum(axis=0)
        yv = np.asarray(y, np.float64)
        if y_float and not np.all(np.isfinite(yv)):
            r = int(np.argmax(~np.isfinite(yv.reshape(len(yv), -1)).any(axis=1)))
            if missing != "drop":
                raise IngestError(f"target is missing or infinite at row {pos + r} (0-based); fix it or pass --missing drop")
        if label_counts is not None and yv.ndim == 1:
            fin = yv[np.isfinite(yv)]
            y_integral = y_integral and bool(np.all(fin == np.round(fin)))
            u, c = np.unique(fin, return_counts=True)
            for a, b in zip(u.tolist(), c.tolist(), strict=True):
                label_counts[a] = label_counts.get(a, 0) + b
            if len(label_counts) > 10_000:
                label_counts = None
        prog.update(len(X))
    prog.done()
    y_tail = tuple(ys.shape[1:]) if ys is not None else ()
    if like is not None:
        task = like.task
        classes = like.classes
        class_values = (like.attrs.get("target") or {}).get("class_values")
        if task == "classification":
            known = set(class_values or [])
            unknown = sorted(v for v in (label_counts or {}) if v not in known)
            if unknown:
                raise IngestError(f"labels {unknown[:5]} are not among the classes of the training store {like.path!r}")
    else:
        if task is None:
            task = (
                "classification"
                if not y_tail and label_counts is not None and y_integral and len(label_counts) <= MAX_CLASSES_INFERRED
                else "regression"
            )
        if task == "classification":
            if y_tail or label_counts is None:
                raise IngestError("labels are not a 1-D array of class values; pass --task regression")
            class_values = sorted(label_counts)
            classes = [str(int(v)) if float(v).is_integer() else str(v) for v in class_values]
            if len(classes) < 2:
                raise IngestError(
                    f"the labels have a single class {classes[0] if classes else None!r}; a classifier needs at "
                    "least 2 (pass --task regression if this is a target value)"
                )
        else:
            classes = None
            class_values = None
    fill = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    src_dt = xs.dtype.newbyteorder("=") if xs.dtype.byteorder == ">" else xs.dtype
    if src_dt.kind == "b":
        x_dtype = np.dtype(np.uint8)
    elif src_dt.kind in "ui" and src_dt.itemsize <= 2:
        x_dtype = src_dt
    else:
        x_dtype = np.dtype(np.float32)
    n_out = (stop - start) - (n_bad_rows if missing == "drop" else 0)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(n_features * x_dtype.itemsize, n_out)
    y_dtype = np.int32 if task == "classification" else np.float32
    # ---- pass 2 ---------------------------------------------------------------------------------
    xstats = RunningStats(n_features)
    ystats = RunningStats(int(np.prod(y_tail)) if y_tail else 1)
    cv = np.asarray(class_values, np.float64) if class_values is not None else None
    counts = np.zeros(len(classes) if classes else 0, np.int64)
    attrs: dict[str, Any] = {
        "task": task,
        "classes": classes,
        "feature_names": [f"x{i}" for i in range(n_features)],
        "encodings": [],
        "missing": missing,
    }
    prog = Progress(f"ingest {src.name}: pass 2/2", total=stop - start, enabled=progress)
    with create_store(
        dest, n_features, y_shape_tail=y_tail, x_dtype=x_dtype, y_dtype=y_dtype,
        chunk_rows=chunk_rows, codec=codec, force=force, attrs=attrs,
    ) as w:
        for _pos, X, y in pairs():
            keep = np.ones(len(X), bool)
            if floaty:
                bad = ~np.isfinite(X)
                if bad.any():
                    if missing == "drop":
                        keep &= ~bad.any(axis=1)
                    else:
                        X = np.where(bad, fill.astype(X.dtype), X)
            yv = np.asarray(y, np.float64)
            if y_float:
                keep &= np.isfinite(yv.reshape(len(yv), -1)).all(axis=1)
            X, yv = X[keep], yv[keep]
            Xc = X.astype(x_dtype, copy=False)
            if task == "classification":
                yo = np.searchsorted(cv, yv).astype(np.int32)  # type: ignore[arg-type]
                counts += np.bincount(yo, minlength=len(counts))
            else:
                yo = yv.astype(np.float32)
                ystats.update(yo.reshape(len(yo), -1))
            if like is None:
                xstats.update(Xc)
            w.append(np.ascontiguousarray(Xc), yo)
            prog.update(len(X))
        prog.done()
        ref = like if like is not None else None
        w.attrs["mean"] = (ref.mean if ref is not None else xstats.mean).tolist()
        w.attrs["std"] = (ref.std if ref is not None else xstats.std).tolist()
        tattrs: dict[str, Any] = {"name": "labels" if ys is not None else f"x{tcol}", "kind": "numeric"}
        if class_values is not None:
            tattrs["class_values"] = list(class_values)
            tattrs["class_counts"] = counts.tolist()
        else:
            lt = (like.attrs.get("target") or {}) if like is not None else {}
            tattrs["mean"] = lt.get("mean", ystats.mean.tolist())
            tattrs["std"] = lt.get("std", ystats.std.tolist())
        w.attrs["target"] = tattrs
        w.attrs["source"] = {**source_attrs, "rows": [start, stop], "rows_read": stop - start, "rows_with_missing": n_bad_rows}
    return w.commit_result  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _md5(path: Path, limit: int = 256 * 2**20) -> str | None:
    """MD5 of files up to 256 MB (cheap next to parsing them); None for bigger ones."""
    import hashlib

    if path.stat().st_size > limit:
        return None
    h = hashlib.md5()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(2**22), b""):
            h.update(blk)
    return h.hexdigest()


def ingest(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    format: str | None = None,
    target: str | int | None = None,
    labels: str | os.PathLike | None = None,
    drop: Sequence[str | int] = (),
    task: str | None = None,
    delimiter: str | None = None,
    header: bool | None = None,
    comment: str = "|",
    rows: str | slice | None = None,
    chunk_rows: int | None = None,
    codec: str | None = None,
    missing: str = "impute",
    encoding: str = "auto",
    like: str | os.PathLike | Store | None = None,
    force: bool = False,
    progress: bool = False,
) -> Store:
    """Ingest ``src`` into a new store at ``dest`` and return it opened. See the module docstring."""
    path = Path(src)
    if not path.exists():
        raise IngestError(f"source file {str(src)!r} does not exist; check the path")
    if path.is_dir():
        raise IngestError(f"source {str(src)!r} is a directory; pass a file")
    if format is not None and format not in FORMATS:
        raise IngestError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise IngestError(f"source {str(src)!r} is empty; check the file")
    if missing not in MISSING_POLICIES:
        raise IngestError(f"unknown missing-value policy {missing!r}; choose impute, reject or drop")
    missing = MISSING_POLICIES[missing]
    if task not in (None, "classification", "regression"):
        raise IngestError(f"unknown task {task!r}; choose classification or regression")
    if encoding not in ("auto", "onehot", "ordinal"):
        raise IngestError(f"unknown encoding {encoding!r}; choose auto, onehot or ordinal")
    like_path = like.path if isinstance(like, Store) else like
    # --force replaces only a store this program wrote, never an input
    check_not_inside(dest, {"source file": path, "labels file": labels, "--like store": like_path})
    check_replaceable(dest, force)
    fmt = format or detect_format(path)
    row_range = parse_rows(rows)
    like_store = like if isinstance(like, Store) or like is None else open_store(like)
    if like_store is not None and task is not None and task != like_store.task:
        raise IngestError(f"--task {task} contradicts the training store's task {like_store.task}; drop --task")
    source_attrs: dict[str, Any] = {"path": str(path.resolve()), "format": fmt, "md5": _md5(path)}
    common = dict(rows=row_range, chunk_rows=chunk_rows, codec=codec, missing=missing, like=like_store, force=force, progress=progress)
    try:
        if fmt in ("csv", "parquet"):
            if fmt == "csv":
                layout = _sniff_csv(path, delimiter, header, comment)
                names = layout.names
                source_attrs.update(delimiter=layout.delimiter, header=layout.header)

                def batches() -> Iterator[pa.RecordBatch]:
                    return _csv_batches(path, layout, comment)
            else:
                names = _parquet_names(path)

                def batches() -> Iterator[pa.RecordBatch]:
                    return _parquet_batches(path)

            store = _ingest_table(
                path, os.fspath(dest), batches, names, source_attrs,
                target=target, drop=drop, task=task, encoding=encoding, **common,  # type: ignore[arg-type]
            )
        else:
            if labels and not Path(labels).exists():
                raise IngestError(f"labels file {str(labels)!r} does not exist; check the path")
            if drop:
                raise IngestError(f"--drop applies to CSV and Parquet sources, not {fmt}")
            if fmt == "npy":
                xs = _npy_source(lambda: open(path, "rb"), str(path))
                ys = _npy_source(lambda: open(labels, "rb"), str(labels)) if labels else None  # type: ignore[arg-type]
            elif fmt == "npz":
                xs, ys = _npz_sources(path)
            else:
                if not labels:
                    raise IngestError(f"IDX images {str(path)!r} need their labels file: pass --labels FILE")
                xs, ys = _idx_source(path), _idx_source(Path(labels))
            if labels:
                source_attrs["labels"] = str(Path(labels).resolve())
            store = _ingest_arrays(path, os.fspath(dest), xs, ys, source_attrs, target=target, task=task, **common)  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:
        raise IngestError(f"{str(src)!r} is not UTF-8 text ({exc.reason}); check --format") from None
    return store
