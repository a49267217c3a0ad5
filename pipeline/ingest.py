"""Streaming ingest of CSV, Parquet, NumPy (.npy/.npz) and IDX files into a dataset store.

Nothing is ever read whole: CSV goes through ``pyarrow.csv.open_csv`` in blocks, Parquet through
``ParquetFile.iter_batches``, NumPy and IDX files are read in row blocks from their headers on.
Two streaming passes:

* pass 1 profiles every column: row count, which columns are numeric, categories of string
  columns, class labels, means for imputation, and validates (non-numeric values in numeric
  columns, missing values under ``reject``, a single class, ...);
* pass 2 encodes and writes row chunks, computing the per-feature mean/std (float64, merged batch
  by batch) of exactly what was written.

Between the passes, :mod:`pipeline.ingest_plan` turns the profile (and the ``like=`` store) into
an :class:`~pipeline.ingest_plan.IngestPlan`: features and encodings, task, classes, dtypes, chunk
size and where the statistics come from, decided without reading or writing a file. Each source
then encodes its batches (tables: Arrow record batches; arrays: row blocks) and one writer,
``_write``, streams them into the store as the plan says.

Policies (recorded in the store's ``encodings`` attribute so prediction applies the same ones):

* **Columns**: the target is a name or 0-based index (negative allowed), default the last column
  that is not dropped; ``drop`` removes columns (they are not even read from Parquet). A column
  is numeric when its values parse as numbers; a column whose values are mostly numbers but has a
  few that are not is an error (naming column and row); a column of strings is categorical.
  Under ``encoding="auto"``, a text column of amounts with a currency or percent sign or in
  accounting parentheses (``$1,234.50``, ``12.5%``, ``(1,234.00)``) is refused (its categories
  would order ``$10`` before ``$9``), as is an identifier: more than 100 distinct values, more than
  half its rows (order IDs, e-mails, free text); the error names every such column and the
  ``--drop`` options, and an explicit encoding keeps them as categories.
* **Categorical features**: ``encoding="auto"`` one-hot encodes columns of at most 16 categories
  (features ``name=category``) and ordinal-encodes the others (codes 0..K-1 in sorted category
  order); ``"onehot"``/``"ordinal"`` force one. Categories unseen in training (``like=``) become an
  all-zero one-hot row, or the most frequent category's code for ordinal columns.
* **Labels**: string labels are stripped of whitespace and of one trailing ``.`` (adult.test writes
  ``<=50K.``) and become class indices into the sorted class names; integer labels with at most
  50 distinct values mean classification, other numbers regression (override with ``task``).
* **Missing values** (empty, ``?``, ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, any other text
  Arrow reads as NaN such as ``-nan`` or ``NaN(1)``, and +/-inf; ``missing_values`` replaces the
  tokens, so a category ``NA`` can be kept, while the empty field, NaN spellings and inf stay
  missing; the list is recorded in ``source.missing_values`` when not the default):
  ``impute`` (default) fills numeric features with the training mean and categorical features with
  the most frequent category; ``reject`` raises naming the column and row; ``drop`` drops the row.
  A missing target is an error unless ``drop``. The store never holds NaN.
* **CSV layout**: delimiter detected among ``, TAB ; | space``: the one that splits the first lines,
  header included and quoted fields respected, into the same number of fields (``;`` wins a tie
  with ``,``); a space delimiter means whitespace-separated: runs of blanks are one separator and
  leading blanks are ignored (aligned columns). Errors about columns name the delimiter and whether
  it was detected. With a delimiter other than ``,``, numbers may have a decimal comma (``1,5``,
  the convention of semicolon files, with dots separating thousands: ``1.234,5``, ``1.234.567``)
  or thousands separators (``1,234,567``, with a decimal point): the file's numbers decide for all
  of them (``1.234`` is 1234 beside ``0,5``), a file mixing the two (``0,5`` and ``1.5``) or whose
  only comma numbers are like ``1,234`` is refused, and ``decimal`` says it instead
  (``source.decimal_comma`` records the reading, and with decimal commas ``source.thousands_dot``
  what dots were); without comma numbers dots are decimal points. A header is
  detected when every field of the first line is non-numeric while some column below is
  numeric, or when the columns vote for it: a numeric column
  whose first field is not a number, or a column of few categories whose first field is none of
  them, votes for; a column of few categories whose first field is one of them votes against
  (override with ``header``; under ``like=``, a first line holding the training columns is the
  header). A UTF-8 byte order mark is dropped. Text is UTF-8 unless
  ``text_encoding`` says otherwise; undecodable bytes are an error naming the line.
* **Comments**: lines starting with ``comment`` (default ``|``, adult.test's first line) are
  skipped wherever they are, as are blank lines, and ``#`` lines before the first line, except a
  last one with the data's field count, which is the header (``#id,a,label``). When the
  delimiter is the comment text (``|``), no line is a comment: ``|2|x`` starts with an empty field.
* **Numbers as text**: in a comma-delimited file ``"3,655"`` is 3655 (a column mixing such numbers
  with other text is refused); integers beyond 2^53 are refused as in Parquet. Class labels whose
  text a number would change (``007``, ``01``, or ``7`` next to ``007``) stay text.
* **Formats**: from the suffix (``--format`` overrides); an unknown suffix (``.json``, ``.xlsx``) is
  refused, a name without a suffix is CSV when it starts as UTF-8 text; compressions other than
  gzip are refused; a UTF-16 byte order mark selects UTF-16. A directory is a Parquet dataset: its
  ``*.parquet`` files in natural name order (``part.2`` before ``part.10``; ``_metadata``,
  ``_SUCCESS`` and hidden files skipped), with the same columns in any order and types (a column
  some files lack is refused unless dropped; files without rows may have any), hive partition
  keys (``year=2020/``) read first, as text columns. The index pandas and Dask write is no data
  column: an unnamed one (``__index_level_0__``, ``__null_dask_index__``) is left out unless
  ``target``/``drop`` names it, a named one comes first (the default target stays the last data
  column). A file's all-None column (the type null) is missing values. Parquet booleans are the
  categories ``false``/``true`` (as a CSV of them); numbers meeting a categorical encoding are
  matched as their text (``1``). Integer decimals (``DECIMAL(38,0)``) beyond 2^53 are refused as
  integers are.
  Parquet integers beyond 2^53, and types other than numbers, booleans, decimals and strings
  (timestamps, dates, binary, lists), are errors naming the column and suggesting ``drop``.
* **NumPy labels**: ``(n,)`` or ``(n, 1)`` numbers, or strings (class names).
* ``like=TRAIN_STORE`` reuses the training store's columns, encodings, imputation values, classes,
  mean/std, decimal mark and missing-value tokens, so train and test agree; extra columns in the
  source are ignored. Categories the training data did not have raise an
  :class:`UnseenCategoryWarning` with counts per column. A training store without encodings
  (``synth``, NumPy) matches the source's columns by its feature names (``x0``, ``x1``, ...),
  all numeric. ``unlabelled=True`` ingests a source without the target
  column: ``y`` holds zeros, the store's ``labelled`` attribute is false, and only ``predict``
  accepts it.

Feature dtype is the source's compact dtype: uint8 when every feature is an integer in 0..255
(images, one-hot codes, letter's 0..15 features), else float32.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import shlex
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import IngestError, StoreError
from pipeline.ingest_plan import (
    ROW_PLACE,
    ArrayProfile,
    IngestPlan,
    LabelProfile,
    Training,
    big_integer_error,
    data_row,
    plan_arrays,
    plan_table,
    select_columns,
)
from pipeline.progress import Progress
from pipeline.store import (
    RunningStats,
    Store,
    check_not_inside,
    check_replaceable,
    create_store,
    empty_local_dir,
    finish_interrupted_replace,
    is_url,
    open_store,
    outermost_store,
    unwritable_reason,
)

FORMATS = ("csv", "parquet", "npy", "npz", "idx")
MISSING_TOKENS = ["", "?", "NA", "N/A", "NaN", "nan", "NAN", "null", "NULL", "None", "none"]
MISSING_POLICIES = {"impute": "impute", "impute-mean": "impute", "reject": "reject", "drop": "drop", "drop-row": "drop"}
MAX_CATEGORIES = 100_000
_MAX_COUNTED = 10_000  # distinct numbers counted per column (class labels, mixed columns)
_NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|Inf|INF|infinity|Infinity)$"
_DECIMAL_COMMA_RE = r"^([+-]?\d*),(\d+(?:[eE][+-]?\d+)?)$"  # 1,5 under a delimiter other than ","
# "1,234": a decimal comma (1.234) or a thousands separator (1234), the text cannot tell
_AMBIGUOUS_COMMA_RE = r"^[+-]?[1-9]\d{0,2},\d{3}$"
# "1.234,5", "1.234.567", "-12.345,678": dots separating thousands, before a decimal comma or none
_DOT_GROUPS_RE = r"^[+-]?[1-9]\d{0,2}(?:\.\d{3})+(?:,\d+)?$"
# "1.234": a decimal point (1.234) or a dot thousands separator (1234), the text cannot tell
_AMBIGUOUS_DOT_RE = r"^[+-]?[1-9]\d{0,2}\.\d{3}$"
_DOT_GROUP_START_RE = r"^[+-]?[1-9]\d{0,2}\.\d{3}(?:$|[.,])"  # how both of these start
# "1 234,5", "12 345 678", "1 234.5": no-break, narrow no-break or thin spaces separating thousands,
# as spreadsheets in French, Nordic or Slavic locales write them; read as "1234,5", "12345678". A
# plain space does so only where commas may be decimal (a delimiter other than ","), those locales'
# files: in a comma file "800 600" may be two numbers of a text
_GROUP_SPACES = "\u00a0\u202f\u2009"


def _space_groups_re(plain: bool) -> tuple[str, str]:
    """The regular expressions of a whole number grouped by spaces and of how one starts."""
    sp = f"[{' ' if plain else ''}{_GROUP_SPACES}]"
    return rf"^[+-]?[1-9]\d{{0,2}}(?:{sp}\d{{3}})+(?:[.,]\d+)?$", rf"^[+-]?[1-9]\d{{0,2}}{sp}\d{{3}}"


DECIMAL_CHOICES = ("auto", "comma", "point")
CSV_BLOCK = 8 * 2**20
PARQUET_BUFFER = 2**20  # bytes of a Parquet column chunk read at a time
ARRAY_BLOCK_BYTES = 32 * 2**20
_CSV_SUFFIXES = {".csv", ".tsv", ".txt", ".data", ".dat", ".test", ".trn", ".tst", ".train"}


class UnseenCategoryWarning(UserWarning):
    """A source ingested ``like=`` a training store has categories the training data did not."""


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


_SUPPORTED = (
    "CSV/text (" + " ".join(sorted(_CSV_SUFFIXES)) + "), Parquet (.parquet .pq, or a directory of them), "
    "NumPy (.npy .npz), IDX (.idx .ubyte); any of them .gz"
)


def detect_format(src: Path) -> str:
    """The format of ``src`` from its suffix; a name without a suffix (or a numbered one, ``x.1``)
    is CSV when its start is UTF-8 text. An unknown suffix (.json, .xlsx, ...) is refused:
    ``--format`` overrides. A directory is a Parquet dataset."""
    if src.is_dir():
        return "parquet"
    name = src.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    known = suffix in (".parquet", ".pq", ".npy", ".npz", ".idx", ".ubyte", *_CSV_SUFFIXES)
    packed = {".zst": "zstd", ".zstd": "zstd", ".bz2": "bzip2", ".xz": "xz", ".lz4": "lz4", ".zip": "zip"}
    if suffix in packed:
        raise IngestError(
            f"{str(src)!r} is {packed[suffix]}-compressed, which is not read; decompress it first (e.g. "
            f"{_DECOMPRESS[packed[suffix]]} {src.name}), or compress it with gzip"
        )
    if suffix and not known and not suffix[1:].isdigit() and not re.search(r"idx\d", name):
        raise IngestError(
            f"cannot tell the format of {str(src)!r}: {suffix} files are not read; supported: {_SUPPORTED}; "
            f"pass --format {'|'.join(FORMATS)} if it is one of them"
        )
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
        f"cannot tell the format of {str(src)!r} from its name or content; pass --format {'|'.join(FORMATS)}"
    )


def _open_text_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> Any:
    """Text lines of ``path`` (gzip or plain); a UTF-8 byte order mark is dropped."""
    encoding = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, errors=errors, newline="")
    return open(path, encoding=encoding, errors=errors, newline="")


# --------------------------------------------------------------------------------------------
# CSV / Parquet: batches of Arrow columns
# --------------------------------------------------------------------------------------------


@dataclass
class _CsvLayout:
    delimiter: str
    header: bool
    names: list[str]
    skip: int  # lines before the data (leading comments + header)
    decimal_comma: bool = False  # "1,5" is the number 1.5 (delimiter other than ",")
    detected: bool = False  # the delimiter was detected, not given
    encoding: str = "utf-8"  # text encoding of the file
    comment: str = ""  # lines starting with this are skipped ("" when it is the delimiter)
    # first columns without a name (or named "Unnamed: 0" as pandas names such a column) holding
    # increasing integers: the row labels pandas' to_csv and R's write.csv write (",a,b" over
    # "0,...", "1,..."), no data
    index: list[str] = field(default_factory=list)
    # a last column without a name, empty in every line read: a delimiter ending each line ("a,b,")
    trailing: str | None = None

    def describe(self) -> str:
        """The delimiter, as error messages show it: "delimiter ';' (detected)"."""
        shown = {"\t": "tab", " ": "whitespace"}.get(self.delimiter, self.delimiter)
        return f"delimiter {shown!r} ({'detected' if self.detected else 'given'})"


def _text_error(src: Path, exc: UnicodeDecodeError | None = None, encoding: str = "utf-8") -> IngestError:
    """The message for text that does not decode, naming the first bad byte and its line (the
    whole file is scanned for it: this is the error path)."""
    bad = exc.object[exc.start : exc.start + 1].hex() if exc is not None and isinstance(exc.object, bytes) else "?"
    where = ""
    codec = "utf-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    # a byte 0x80-0x9f in a line that does not decode is Windows-1252 (the euro sign, curly quotes),
    # which Latin-1 would read as control characters: the lines after the first bad one may tell
    windows, first = False, None
    try:
        with _open_text_bytes(src) as f:
            for i, raw in enumerate(f, 1):
                try:
                    raw.decode(codec)
                except UnicodeDecodeError as e:
                    if first is None:
                        first, where, bad = i, f" on line {i}", raw[e.start : e.start + 1].hex()
                    windows = re.search(rb"[\x80-\x9f]", raw) is not None
                if windows or (first is not None and i - first >= 10_000):
                    break
    except (OSError, EOFError):
        pass
    legacy, short = ("cp1252", "cp1252") if windows else ("latin-1", "latin1")
    return IngestError(
        f"{str(src)!r} is not {encoding} text: byte 0x{bad}{where} does not decode; re-encode the file as "
        f"UTF-8 (e.g. iconv -f {short} -t utf-8) or pass its encoding with --text-encoding (e.g. {legacy})"
    )


def _fields(line: str, delimiter: str) -> list[str]:
    """The fields of one record; quoted fields may hold the delimiter and line breaks (a line
    break outside quotes ends the record)."""
    if delimiter == " ":
        return line.split()
    rows = csv.reader(io.StringIO(line, newline=""), delimiter=delimiter, quotechar='"', skipinitialspace=True)
    return next(rows, [])


_MAX_RECORD_LINES = 1000  # lines a quoted field of the sniffed records may span (more: a stray quote)


def _open_quote(line: str, inside: bool = False) -> bool:
    """Whether ``line`` ends inside a quoted field (``inside``: it starts inside one), so that the
    record goes on on the next line (Excel, pandas and databases quote a field holding a line
    break). A quote opens a field only at its start (after the line start or one of ``, TAB ; |``,
    and blanks after them), as the CSV parsers read it (``5" pipe`` and ``24 " screen`` hold a
    quote); inside, ``""`` is a quote and a lone one closes the field."""
    if '"' not in line:
        return inside
    start, i = not inside, 0
    while i < len(line):
        ch = line[i]
        if inside:
            if ch == '"':
                if line[i + 1 : i + 2] == '"':
                    i += 1
                else:
                    inside = False
        elif ch == '"' and start:
            inside = True
        else:
            if ch in ",;\t|\r\n":
                start = True
            elif ch != " ":  # a blank keeps what came before it
                start = False
            i += 1
            continue
        start = False
        i += 1
    return inside


def _detect_delimiter(lines: list[str]) -> str:
    """The first of ``, TAB ; |`` that splits every line (header included, quotes respected) into
    the same number (> 1) of fields, then whitespace; failing that, the same tests without the
    first line (a header of a different shape); else ",". When "," and another one fit, the
    other wins if it is ";" or its fields hold decimal commas ("1,5", "1.234,5"): files with those
    delimiters write decimal commas, comma files rarely hold semicolons."""
    decimal = re.compile(f"{_DECIMAL_COMMA_RE}|{_DOT_GROUPS_RE}")
    for sample in (lines, lines[1:] or lines):
        fits = []
        for cand in (",", "\t", ";", "|", " "):
            widths = {len(_fields(ln, cand)) for ln in sample}
            if len(widths) == 1 and widths != {1}:
                fits.append(cand)
        if len(fits) > 1 and fits[0] == ",":
            other = fits[1]
            if other == ";" or any("," in f and decimal.match(f.strip()) for ln in sample for f in _fields(ln, other)):
                return other
        if fits:
            return fits[0]
    return ","


def _is_header(rows: list[list[str]], numeric: Callable[[str], bool], missing: Sequence[str] = MISSING_TOKENS) -> bool:
    """Whether the first row names the columns.

    Yes when every field of it is non-numeric while some column below is numeric, or when the
    columns below vote for it and none against: a numeric column whose first field is not a
    number votes for; a column of repeated strings (categories, labels) votes for when its
    first field is none of them, against when it is one (only columns of at most a quarter as many
    distinct strings as lines vote, so a rare first value of a headerless file is not taken for a
    name). A header-only file is a header when none of its fields is a number. A first row of the
    column positions ``0,1,2,...`` (or from 1; after an empty field, the index's name) is the header
    pandas writes for a frame of an array (``pd.DataFrame(X).to_csv()``), unless a row below repeats it.
    """
    first, body = [v.strip() for v in rows[0]], rows[1:]
    if not body:
        return all(not numeric(v) for v in first)
    positions = first[1:] if first[0] == "" else first
    if len(positions) >= 3 and positions[0] in ("0", "1") and all([v.strip() for v in r] != first for r in body):
        if positions == [str(j + int(positions[0])) for j in range(len(positions))]:
            return True
    for_, against, some_numeric = 0, 0, False
    for j, v in enumerate(first):
        col = [r[j].strip() for r in body if j < len(r) and r[j].strip() not in missing]
        if not col:
            continue
        if all(numeric(c) for c in col):
            some_numeric = True
            for_ += not numeric(v)
        elif not any(numeric(c) for c in col):
            distinct = set(col)
            if len(distinct) <= max(2, len(col) // 4):  # few categories, each seen several times
                if v in distinct:
                    against += 1
                else:
                    for_ += 1
    if some_numeric and all(not numeric(v) for v in first):
        return True
    return for_ > 0 and against == 0


def _sniff_csv(
    src: Path,
    delimiter: str | None,
    header: bool | None,
    comment: str,
    text_encoding: str = "utf-8",
    expected: Sequence[str] = (),
    missing: Sequence[str] = MISSING_TOKENS,
) -> _CsvLayout:
    """The layout of a CSV source. ``expected``: column names the source should have (those of a
    ``like=`` store); a first line holding them all is the header. ``missing``: the missing-value
    tokens."""
    lines: list[str] = []  # the first records (a quoted field may hold line breaks)
    spans: list[int] = []  # the lines of the file each of them takes
    lead_hash: list[str] = []  # "#" lines before the first line: comments, or a "#"-prefixed header
    skip = 0
    pending: list[str] = []  # the lines so far of a record whose quoted field holds a line break
    sep_hint = None
    try:
        with _open_text(src, text_encoding) as text:
            for line in text:
                if pending:
                    pending.append(line)
                    if _open_quote(line, inside=True) and len(pending) < _MAX_RECORD_LINES:
                        continue
                    lines.append("".join(pending).rstrip("\r\n"))
                    spans.append(len(pending))
                    pending = []
                    if len(lines) >= 50:
                        break
                    continue
                stripped = line.strip()
                hint = re.fullmatch(r"sep=(.)", line.rstrip("\r\n")) if skip == 0 and not lines else None
                if hint is not None and not lead_hash:  # Excel's first line "sep=;" names the delimiter
                    sep_hint = hint.group(1)
                    skip += 1
                    continue
                if not lines and (not stripped or (comment and stripped.startswith(comment))):
                    skip += 1 + len(lead_hash)
                    lead_hash = []
                    continue
                if not lines and stripped.startswith("#"):
                    lead_hash.append(line.rstrip("\r\n"))
                    continue
                if stripped and not (comment and stripped.startswith(comment)):
                    if _open_quote(line):
                        pending = [line]
                        continue
                    lines.append(line.rstrip("\r\n"))
                    spans.append(1)
                if len(lines) >= 50:
                    break
            if pending:  # the file ends inside a quoted field (the parser names the line)
                lines.append("".join(pending).rstrip("\r\n"))
                spans.append(len(pending))
    except UnicodeDecodeError as exc:
        raise _text_error(src, exc, text_encoding) from None
    except UnicodeError as exc:  # "UTF-16 stream does not start with BOM"
        raise IngestError(
            f"{str(src)!r} is not {text_encoding} text ({exc}); pass its encoding with --text-encoding "
            "(e.g. utf-8, latin-1, cp1252)"
        ) from None
    if not lines:
        raise IngestError(f"source {str(src)!r} is empty (no data lines); check the file")
    detected = delimiter is None
    if delimiter is None:
        delimiter = sep_hint or _detect_delimiter(lines)
    else:
        delimiter = _delimiter_option(delimiter)
    if comment and comment == delimiter:  # "|2|x" with the delimiter "|": an empty first field, not a comment
        layout = _sniff_csv(src, delimiter, header, "", text_encoding, expected, missing)
        layout.detected = detected
        return layout
    if lead_hash and header is not False:  # the last "#" line is the header when it has the data's shape
        width = len(_fields(lines[0], delimiter))
        if width > 1 and len(_fields(lead_hash[-1], delimiter)) == width:  # "#id,a,label"
            lines.insert(0, lead_hash.pop()[1:])
            spans.insert(0, 1)
            header = True
    skip += len(lead_hash)  # the other "#" lines are comments
    rows = [_fields(ln, delimiter) for ln in lines]
    first = [c.strip() for c in rows[0]]
    decimal_comma = delimiter != ","
    num_re = re.compile(_NUM_RE if not decimal_comma else f"{_NUM_RE}|{_DECIMAL_COMMA_RE}|{_DOT_GROUPS_RE}")

    def numeric(v: str) -> bool:
        return bool(num_re.match(v.strip())) or v.strip() in missing

    if header is None:
        header = bool(expected) and set(expected) <= set(first) or _is_header(rows, numeric, missing)
    if header:
        names = [v or f"c{j}" for j, v in enumerate(first)]
        if len(set(names)) != len(names):  # a, a, a.1 -> a, a.2, a.1: generated names clash with none
            taken, seen, out = set(names), {}, []
            for v in names:
                if v not in seen:
                    seen[v] = 0
                    out.append(v)
                    continue
                k = seen[v] + 1
                while f"{v}.{k}" in taken:
                    k += 1
                seen[v] = k
                taken.add(f"{v}.{k}")
                out.append(f"{v}.{k}")
            names = out
        skip += spans[0]
    else:
        names = [f"c{j}" for j in range(len(first))]
    body = rows[1:] if header else rows
    width = len(names)
    if header and body and all(len(r) == width + 1 and not r[-1].strip() for r in body):
        names.append(next(f"c{j}" for j in range(width, 2 * width + 2) if f"c{j}" not in names))  # "a,b" over "1,2,"
        width += 1
    index: list[str] = []
    for j, v in enumerate(first[: width - 2] if header and len(body) > 1 else []):  # a feature and a target stay
        if v and not re.fullmatch(r"Unnamed: \d+", v):
            break
        labels = [r[j].strip() if j < len(r) else "" for r in body]
        if not all(re.fullmatch(r"\d+", t) for t in labels) or any(
            int(a) >= int(b) for a, b in zip(labels, labels[1:], strict=False)
        ):
            break
        index.append(names[j])
    trailing = None
    if width > 2 and (not header or len(first) < width or not first[-1]) and body:
        if all(len(r) == width and not r[-1].strip() for r in body):
            trailing = names[-1]
    return _CsvLayout(
        delimiter, bool(header), names, skip, decimal_comma, detected, text_encoding, comment, index, trailing
    )


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


def _unnamed_left_out(layout: _CsvLayout, target: Any, drop: Sequence[Any], expected: Collection[str]) -> list[str]:
    """The columns without a name that are no data of a CSV source (:attr:`_CsvLayout.index`,
    :attr:`_CsvLayout.trailing`), as the index pandas writes is none of a Parquet file: left out
    unless ``--target``, ``--drop`` or the ``like=`` store (``expected``) names them, and none when
    ``--target`` or ``--drop`` gives a column by position (positions count every column of the file)."""
    specs = [c for c in (target, *drop) if c is not None]
    if any(str(c) not in layout.names and re.fullmatch(r"\s*-?\d+\s*", str(c)) for c in specs):
        return []
    named = {str(c) for c in specs} | set(expected)
    return [c for c in (*layout.index, layout.trailing) if c is not None and c not in named]


def _csv_batches(
    src: Path, layout: _CsvLayout, block_size: int | None = None, empty: str | None = None
) -> Iterator[pa.RecordBatch]:
    """The record batches of a CSV source, every column as text. ``empty``: a column left out as
    the trailing delimiter's (:attr:`_CsvLayout.trailing`), refused when a line holds a value in it."""
    import pyarrow.csv as pcsv

    comment = layout.comment

    bad: list[Any] = []
    n_rows = 0

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
            read_options=pcsv.ReadOptions(
                column_names=layout.names,
                skip_rows=layout.skip,
                block_size=block_size or CSV_BLOCK,
                encoding=layout.encoding,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=layout.delimiter,
                quote_char='"',
                ignore_empty_lines=True,
                invalid_row_handler=handler,
                # a quoted field may hold a line break (Excel, pandas, databases); without this a file
                # larger than a block stops with "CSV parser got out of sync with chunker"
                newlines_in_values=True,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in layout.names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        for b in reader:
            if comment and b.num_rows:  # a line starting with the comment text, even of the data's width
                first = pc.utf8_ltrim_whitespace(b.column(0))
                hit = pc.fill_null(pc.starts_with(first, pattern=comment), False)
                if pc.any(hit).as_py():
                    b = b.filter(pc.invert(hit))
            if empty is not None:
                held = pc.not_equal(pc.utf8_trim_whitespace(b.column(empty)), "").to_numpy(zero_copy_only=False)
                if held.any():
                    i = int(np.argmax(held))
                    raise IngestError(
                        f"the last column of {str(src)!r} has no name and was empty in the first lines (a "
                        f"delimiter ending each line), but data row {n_rows + i} (0-based) holds "
                        f"{b.column(empty)[i].as_py()!r} in it; name it in the header, or leave it out with "
                        f"--drop {len(layout.names) - 1}"
                    )
            n_rows += b.num_rows
            yield b
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            first, *more = re.split(r"\r\n|\r|\n", row.text)  # a quoted field may hold line breaks
            line = _find_line(src, first)
            where = (f"the record starting on line {line}" if more else f"line {line}") if line else "a line"
            quote = "; a quote opening a field must close it" if more else ""
            raise IngestError(
                f"ragged CSV: {where} of {str(src)!r} has {row.actual_columns} fields, expected "
                f"{row.expected_columns} ({row.text[:60]!r}) with the {layout.describe()}; fix the row or "
                f"pass --delimiter{quote}"
            ) from None
        if "UTF8" in str(exc) or "UTF-8" in str(exc):
            raise _text_error(src, None, layout.encoding) from None
        raise IngestError(f"cannot parse {str(src)!r} as CSV ({exc}); check --delimiter/--format") from None


def _find_line(src: Path, text: str) -> int | None:
    with _open_text(src, errors="replace") as lines:
        for i, raw in enumerate(lines, 1):
            if raw.rstrip("\r\n") == text.rstrip("\r\n"):
                return i
    return None


def _natural_key(path: Path) -> tuple:
    """``part.2`` before ``part.10`` (Dask and Spark number their files without padding)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix()))


def _parquet_files(src: Path) -> list[Path]:
    """``src`` itself, or the ``*.parquet``/``*.pq`` files of a dataset directory (what ``predict``
    writes) in natural name order (``part.2`` before ``part.10``), hidden ones (``.name``,
    ``_name``) left out."""
    if not src.is_dir():
        return [src]
    files = sorted(
        (
            p
            for p in src.rglob("*")
            if p.is_file()
            and p.suffix.lower() in (".parquet", ".pq")
            and not any(part.startswith((".", "_")) for part in p.relative_to(src).parts)
        ),
        key=lambda p: _natural_key(p.relative_to(src)),
    )
    if not files:
        raise IngestError(f"source {str(src)!r} is a directory without Parquet files; pass a file or a Parquet dataset")
    return files


_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _partitions(src: Path, path: Path) -> dict[str, str | None]:
    """The hive-style partition keys of a dataset file (``year=2020/part-0.parquet``) and their
    values, as text (a CSV of the data would hold them so); None for the null partition."""
    from urllib.parse import unquote

    if path == src:
        return {}
    out: dict[str, str | None] = {}
    for part in path.relative_to(src).parts[:-1]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[unquote(k)] = None if v == _HIVE_NULL else unquote(v)
    return out


def _parquet_batches(src: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of ``columns``; hive partition keys are columns of text values."""
    import pyarrow.parquet as pq

    for path in _parquet_files(src):
        keys = _partitions(src, path)
        try:
            # pre_buffer (pyarrow's default) reads every row group of the file before the first batch:
            # a file's whole size in memory; a buffered stream reads a column chunk 1 MiB at a time
            pf = pq.ParquetFile(str(path), pre_buffer=False, buffer_size=PARQUET_BUFFER)
        except (pa.ArrowInvalid, OSError) as exc:
            raise IngestError(f"cannot read {str(path)!r} as Parquet ({exc}); check --format") from None
        with pf:
            if pf.metadata.num_rows == 0:  # its columns need not be the dataset's (see _parquet_names)
                continue
            file_cols = None if columns is None else [c for c in columns if c not in keys]
            for b in pf.iter_batches(batch_size=65536, columns=file_cols):
                if keys:
                    extra = [k for k in keys if columns is None or k in columns]
                    b = pa.RecordBatch.from_arrays(
                        [*b.columns, *(pa.array([keys[k]] * b.num_rows, pa.string()) for k in extra)],
                        names=[*b.schema.names, *extra],
                    )
                yield b


def _parquet_row_place(src: Path) -> Callable[[int], str | None]:
    """Where data row ``r`` of the dataset directory ``src`` is: its file (relative to ``src``) and
    its row there, counted as :func:`_parquet_batches` reads them; the files' footers are read only
    when an error names a row."""

    def place(r: int) -> str | None:
        import pyarrow.parquet as pq

        start = 0
        for path in _parquet_files(src):
            try:
                n = pq.read_metadata(str(path)).num_rows
            except (pa.ArrowInvalid, OSError):
                return None
            if r < start + n:
                return f"row {r - start} of file {path.relative_to(src).as_posix()!r}"
            start += n
        return None

    return place


_UNNAMED_INDEX = re.compile(r"__index_level_\d+__|__null_dask_index__")


def _pandas_index(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """The columns a file's pandas metadata (written by pandas and Dask) marks as the index: those
    without a name of their own (``__index_level_0__``, Dask's ``__null_dask_index__``: row labels,
    never data) and the named ones (``df.set_index("id")``)."""
    try:
        meta = schema.pandas_metadata or {}
    except ValueError:  # metadata that is not JSON: no index known
        return [], []
    index = [c for c in meta.get("index_columns") or [] if isinstance(c, str)]  # a RangeIndex is no column
    names = {c.get("field_name"): c.get("name") for c in meta.get("columns") or [] if isinstance(c, dict)}
    unnamed = [c for c in index if names.get(c) is None or _UNNAMED_INDEX.fullmatch(c)]
    return unnamed, [c for c in index if c not in unnamed]


def _parquet_names(
    src: Path, named: Collection[str] = (), dropped: Collection[str] = (), needed: Collection[str] | None = None
) -> list[str]:
    """The columns of a Parquet file or dataset: hive partition keys first, then the named index
    columns pandas and Dask write, then the files' other columns (so the default target stays the
    files' last data column). An unnamed index (``__index_level_0__``, ``__null_dask_index__``) is
    left out unless ``named`` (by ``--target``, ``--drop`` or the ``like=`` store). Files may lack
    a column that is ``dropped``, or (``needed``: the columns a ``like=`` store reads) not needed;
    a file without rows (pandas writes an empty frame without columns) may have any columns."""
    import pyarrow.parquet as pq

    keys: list[str] | None = None
    files = _parquet_files(src)
    columns: dict[Path, list[str]] = {}  # the files with rows (an empty one has no values to miss) and their columns
    empty: dict[Path, list[str]] = {}
    index: list[str] = []
    for path in files:
        try:
            meta = pq.read_metadata(str(path))
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise IngestError(f"cannot read {str(path)!r} as Parquet ({exc}); check --format") from None
        these = list(schema.names)
        dup = next((c for c in these if these.count(c) > 1), None)
        if dup is not None:
            raise IngestError(f"column {dup!r} appears twice in {str(path)!r}; rename one and write the file again")
        unnamed, named_index = _pandas_index(schema)
        these = [c for c in these if c not in unnamed or c in named]
        index += [c for c in named_index if c not in index]
        part = list(_partitions(src, path))
        if keys is None:
            keys = part
        elif set(part) != set(keys):
            raise IngestError(
                f"{str(path)!r} lies under the partition directories {part or 'none'}, not those of the other files "
                f"of the dataset {str(src)!r} ({keys or 'none'}); a dataset's files must share their partitioning"
            )
        clash = next((k for k in part if k in these), None)
        if clash is not None:
            raise IngestError(
                f"{str(path)!r} has a column {clash!r} and lies under a partition directory {clash}=...; "
                "rename one of them"
            )
        (columns if meta.num_rows else empty)[path] = these
    where: dict[str, list[Path]] = {}  # column -> the files that have it, columns in first-seen order
    for path, these in (columns or empty).items():
        for c in these:
            where.setdefault(c, []).append(path)
    counted = list(columns or empty)
    odd = [
        c
        for c, having in where.items()
        if any(p not in having for p in counted) and c not in dropped and (needed is None or c in needed)
    ]
    if odd:
        c, having = odd[0], where[odd[0]]
        lacking = next(p for p in counted if p not in having)
        more = f" (nor is {', '.join(map(repr, odd[1:6]))}{' ...' if len(odd) > 6 else ''})" if len(odd) > 1 else ""
        fix = (
            "ingest files that all have the training store's columns"
            if needed is not None
            else f"leave {'them' if more else 'it'} out with {' '.join(f'--drop {o}' for o in odd[:6])}, "
            "or write the files with the same columns"
        )
        raise IngestError(
            f"column {c!r} of {str(having[0])!r} is not in {str(lacking)!r}{more}; a dataset's files must share "
            f"their columns: {fix}"
        )
    cols = [c for c in where if c not in index]
    return [*(keys or []), *(c for c in index if c in where), *cols]


@dataclass
class _Parsed:
    """One batch of one column: numbers (NaN where missing / not a number) and masks."""

    values: np.ndarray  # float64
    missing: np.ndarray  # bool: missing token, null, NaN or inf
    nonnum: np.ndarray  # bool: present but not a number
    inf: np.ndarray  # bool
    strings: pa.Array | None  # trimmed strings (string columns only)
    raw: pa.Array | None = None  # a column of numbers: the array, for its text form
    thousands: np.ndarray | None = None  # bool: a number written with thousands separators ("3,655")
    big: tuple[int, str] | None = None  # (index, text) of the first integer beyond 2^53 in a text column
    # bool masks of the numbers of each kind of :data:`_MARKS` (what decides ``decimal="auto"``; pass 1 only)
    marks: list[np.ndarray] | None = None
    _text: pa.Array | None = None

    def text(self) -> pa.Array:
        """The values as text: the trimmed strings, or the numbers as Arrow writes them ("1", "2.5",
        as a CSV of the same data holds them); "" where null."""
        if self.strings is not None:
            return self.strings
        if self._text is None:
            self._text = pc.fill_null(pc.cast(self.raw, pa.string()), "")
        return self._text


_SAFE_INT = 2**53  # integers beyond this lose digits as float64
# text Arrow parses as NaN ("-nan", "nAn", "NaN(123)"): a missing value, never a number
_NAN_RE = r"(?i)^[+-]?nan(\(.*\))?$"
_THOUSANDS_RE = r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$"  # "3,655", "1,234,567.5" (comma-delimited sources)
# kinds of numbers by the marks in them, which decide how a file's commas and dots read:
_DEC = 0  # only a decimal comma fits: "1,5", "0,125", "1234,5", and dots grouping thousands "1.234,5", "1.234.567"
_THOU = 1  # only thousands separators fit: "1,234,567", "1,234.5"
_AMB = 2  # either comma: "1,234" (1.234 or 1234)
_POINT = 3  # only a decimal point fits: "1.5", "0.234", "1234.5"
_AMB_DOT = 4  # either dot: "1.234" (1.234 or 1234)
_GROUPS = 5  # the _DEC numbers with dots ("1.234,5", "1.234.567"), which only dot thousands separators read
_MARKS = 6


def _first_big(vals: np.ndarray, text: pa.Array) -> tuple[int, str] | None:
    """The first value written as an integer beyond 2^53 (its float64 is rounded)."""
    with np.errstate(invalid="ignore"):
        cand = np.nonzero(np.abs(vals) >= _SAFE_INT)[0]
    for i in cand[:1000].tolist():
        t = str(text[i].as_py()).replace(",", "")
        if re.fullmatch(r"[+-]?\d+", t) and abs(int(t)) > _SAFE_INT:
            return i, str(text[i].as_py())
    return None


def _parse(
    arr: pa.Array,
    name: str = "?",
    decimal_comma: bool = False,
    as_text: bool | None = None,
    missing: pa.Array | None = None,
    marks: bool = False,
    thousands_dot: bool = False,
    dot_marks: bool = False,
    booleans: dict[str, str] | None = None,
) -> _Parsed:
    """Parse one batch of column ``name``. ``decimal_comma``: "1,5" is the number 1.5; otherwise a
    number may have thousands separators ("3,655"). ``thousands_dot`` (with ``decimal_comma``):
    dots separate thousands ("1.234,5" is 1234.5, "1.234" 1234) and "1.5" is not a number; without
    it dots are decimal points. ``as_text``: True reads numbers and booleans
    as their text (a column the store encodes as categories), False reads booleans as 0/1 (a
    numeric column of a ``like=`` store); None (pass 1): booleans are text, as in a CSV file.
    ``missing``: the missing-value tokens (default :data:`MISSING_TOKENS`; a NaN spelling is
    missing whatever they are). ``marks``: also find the numbers of each kind of :data:`_MARKS`
    (:attr:`_Parsed.marks`), those with dots only with ``dot_marks``. ``booleans``: how the ``like=``
    store spells the booleans of this column (:func:`_boolean_spelling`), which booleans and their
    text in another case (``TRUE``, ``True``, ``true``) take."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if pa.types.is_null(arr.type):  # pandas writes a file's all-None column so: every value missing
        arr = pa.nulls(n, pa.string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    if pa.types.is_decimal(arr.type):
        if arr.type.scale <= 0 and len(arr) - arr.null_count:  # integers (Spark's DECIMAL(38,0)): as int64 ones
            mm = pc.min_max(arr)
            lo, hi = int(mm["min"].as_py()), int(mm["max"].as_py())
            if max(abs(lo), abs(hi)) > _SAFE_INT:
                raise big_integer_error(name, hi if abs(hi) > _SAFE_INT else lo)
        arr = pc.cast(arr, pa.float64(), safe=False)
    if booleans is not None and pa.types.is_boolean(arr.type):
        arr = pc.if_else(arr, booleans.get("true", "true"), booleans.get("false", "false"))
    numbers = pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
    if (as_text and (numbers or pa.types.is_boolean(arr.type))) or (as_text is None and pa.types.is_boolean(arr.type)):
        arr = pc.cast(arr, pa.string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = pc.fill_null(pc.utf8_trim_whitespace(arr), "")  # null -> "" (a missing token)
        if booleans is not None:  # "TRUE" in a file whose store holds "true" (or the reverse)
            low = pc.utf8_lower(text)
            for word, spelt in booleans.items():
                text = pc.if_else(pc.equal(low, word), spelt, text)
        s = text
        groups_re, start_re = _space_groups_re(plain=decimal_comma)
        if pc.any(pc.match_substring_regex(text, start_re)).as_py():  # "1 234,5": 1234,5
            grouped = pc.match_substring_regex(text, groups_re)
            s = pc.if_else(grouped, pc.replace_substring_regex(text, f"[ {_GROUP_SPACES}]", ""), text)
        num_s = s
        thousands = None
        has_comma = pc.any(pc.match_substring(s, ",")).as_py()
        dotted = pc.match_substring(s, ".") if (dot_marks and marks) or (decimal_comma and thousands_dot) else None
        has_dot = dotted is not None and pc.any(dotted).as_py()
        kinds = None
        if marks and (has_comma or (dot_marks and has_dot)):

            def match(rx: str, t: pa.Array = s) -> np.ndarray:
                return pc.match_substring_regex(t, rx).to_numpy(zero_copy_only=False)

            kinds = [np.zeros(n, bool) for _ in range(_MARKS)]
            if has_comma:
                dec, amb = match(_DECIMAL_COMMA_RE), match(_AMBIGUOUS_COMMA_RE)
                kinds[_DEC], kinds[_THOU], kinds[_AMB] = dec & ~amb, match(_THOUSANDS_RE) & ~dec, amb
            if dot_marks and has_dot:
                amb_dot, groups = kinds[_AMB_DOT], kinds[_GROUPS]
                if pc.any(pc.match_substring_regex(s, _DOT_GROUP_START_RE)).as_py():  # most decimals are not
                    amb_dot = match(_AMBIGUOUS_DOT_RE)
                    groups = match(_DOT_GROUPS_RE) & ~amb_dot
                kinds[_DEC] |= groups
                # the other numbers with a dot (found below when the reading of dots leaves them numbers)
                kinds[_POINT] = dotted.to_numpy(zero_copy_only=False) & ~amb_dot & ~groups
                if decimal_comma and thousands_dot:
                    kinds[_POINT] &= match(_NUM_RE)
                kinds[_AMB_DOT], kinds[_GROUPS] = amb_dot, groups
        if decimal_comma and thousands_dot and has_dot:  # "1.234,5" -> "1234,5"; "1.5" is no number
            groups = pc.match_substring_regex(s, _DOT_GROUPS_RE)
            num_s = pc.if_else(groups, pc.replace_substring(s, ".", ""), pc.if_else(dotted, "x", s))
        if decimal_comma and has_comma:
            num_s = pc.replace_substring_regex(num_s, _DECIMAL_COMMA_RE, r"\1.\2")
        elif has_comma:
            th = pc.match_substring_regex(s, _THOUSANDS_RE)
            if pc.any(th).as_py():
                thousands = th.to_numpy(zero_copy_only=False)
                num_s = pc.if_else(th, pc.replace_substring(s, ",", ""), s)
        tokens = pa.array(MISSING_TOKENS, pa.string()) if missing is None else missing
        miss = pc.is_in(text, value_set=tokens).to_numpy(zero_copy_only=False)
        miss = miss | pc.match_substring_regex(text, _NAN_RE).to_numpy(zero_copy_only=False)
        try:
            vals = pc.cast(pc.if_else(pa.array(miss), None, num_s), pa.float64()).to_numpy(zero_copy_only=False)
            nonnum = np.zeros(n, bool)
        except pa.ArrowInvalid:
            isnum = pc.match_substring_regex(num_s, _NUM_RE).to_numpy(zero_copy_only=False) & ~miss
            vals = pc.cast(pc.if_else(pa.array(isnum), num_s, None), pa.float64()).to_numpy(zero_copy_only=False)
            nonnum = ~isnum & ~miss
        vals = np.asarray(vals, np.float64)
        miss = miss | (np.isnan(vals) & ~nonnum)  # anything else Arrow reads as NaN is missing too
        inf = np.isinf(vals)
        vals = np.where(inf | miss, np.nan, vals)
        if thousands is not None:
            thousands = thousands & ~miss & ~nonnum
        if kinds is not None:
            if not (decimal_comma and thousands_dot):
                kinds[_POINT] &= ~nonnum
            kinds = [k & ~miss for k in kinds]
        return _Parsed(vals, miss | inf, nonnum, inf, text, None, thousands, _first_big(vals, num_s), kinds)
    if pa.types.is_boolean(arr.type) or numbers:
        if pa.types.is_integer(arr.type) and arr.type.bit_width == 64 and len(arr) - arr.null_count:
            mm = pc.min_max(arr)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if max(abs(lo), abs(hi)) > _SAFE_INT:
                raise big_integer_error(name, hi if abs(hi) > _SAFE_INT else lo)
        vals = np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
        inf = np.isinf(vals)
        miss = np.isnan(vals) | inf
        return _Parsed(np.where(inf, np.nan, vals), miss, np.zeros(n, bool), inf, None, arr)
    raise IngestError(
        f"column {name!r} has the type {arr.type}, which is not supported; leave it out with --drop {name}, "
        "or cast it to a number or a string"
    )


def _parse_many(
    arrays: Sequence[pa.Array],
    names: Sequence[str],
    as_text: Sequence[bool | None],
    booleans: Sequence[dict[str, str] | None],
    texts: Sequence[bool],
    **kw: Any,
) -> list[_Parsed]:
    """:func:`_parse` of one batch of each column of ``arrays`` (``kw``: its other options), giving
    the same :class:`_Parsed` each. The text columns are parsed as one array: in a wide file (a CSV of
    10,000 columns holds about 100 rows per block) Arrow's cost per call, not the values, would
    dominate. A column where the text pattern of a number finds other text (Arrow may read some as
    numbers), or holding integers beyond 2^53, is parsed alone, as are all when Arrow refuses one;
    so are the ``texts`` columns, known to hold text (categories, or text seen in an earlier batch),
    which would otherwise be parsed twice."""
    arrs = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    out: list[_Parsed | None] = [None] * len(arrs)
    fast = [i for i, a in enumerate(arrs) if a.type == pa.string() and booleans[i] is None and not texts[i] and len(a)]
    if len(fast) > 1:
        starts = np.concatenate([[0], np.cumsum([len(arrs[i]) for i in fast])]).tolist()
        try:
            whole: _Parsed | None = _parse(pa.concat_arrays([arrs[i] for i in fast]), "?", **kw)
        except pa.ArrowInvalid:
            whole = None
        if whole is not None:
            with np.errstate(invalid="ignore"):
                big = np.abs(whole.values) >= _SAFE_INT
            for k, i in enumerate(fast):
                lo, hi = starts[k], starts[k + 1]
                if whole.nonnum[lo:hi].any() or big[lo:hi].any():
                    continue
                out[i] = _Parsed(
                    whole.values[lo:hi],
                    whole.missing[lo:hi],
                    whole.nonnum[lo:hi],
                    whole.inf[lo:hi],
                    whole.strings.slice(lo, hi - lo),
                    None,
                    None if whole.thousands is None else whole.thousands[lo:hi],
                    None,
                    None if whole.marks is None else [m[lo:hi] for m in whole.marks],
                )
    return [
        p if p is not None else _parse(a, c, as_text=t, booleans=b, **kw)
        for p, a, c, t, b in zip(out, arrs, names, as_text, booleans, strict=True)
    ]


@dataclass
class _ColumnProfile:
    name: str
    n_num: int = 0
    n_nonnum: int = 0
    n_missing: int = 0
    first_nonnum: tuple[int, str] | None = None
    first_missing: tuple[int, str] | None = None
    nonnum_counts: dict[str, int] = field(default_factory=dict)
    # the distinct numbers and the distinct texts of numbers, with counts (None: more than _MAX_COUNTED),
    # as :class:`_Counts` of per-batch pieces (a wide file's columns hold mostly distinct numbers: a dict
    # per column updated value by value costs a Python step per cell); read as dicts: num_counts, num_str_counts
    numbers: _Counts = field(default_factory=lambda: _Counts(float))
    number_texts: _Counts = field(default_factory=lambda: _Counts(str))
    total: float = 0.0
    minimum: float = np.inf
    maximum: float = -np.inf
    integral: bool = True
    n_thousands: int = 0  # numbers written with thousands separators ("3,655")
    first_thousands: tuple[int, str] | None = None
    first_big: tuple[int, str] | None = None  # (row, text) of an integer beyond 2^53 written as text
    # numbers of each kind of _MARKS ("1,5", "1,234,567", "1,234", "1.5", "1.234", "1.234,5"), the first's (row, text)
    n_marks: list[int] = field(default_factory=lambda: [0] * _MARKS)
    first_marks: list[tuple[int, str] | None] = field(default_factory=lambda: [None] * _MARKS)

    def update(self, p: _Parsed, row0: int, number_texts: tuple[Any, np.ndarray] | None = None) -> None:
        """Add one batch of the column (``row0``: its first data row). ``number_texts``: the distinct
        texts of its numbers and their counts, when counted already (:func:`_number_texts`)."""
        ok = ~p.missing & ~p.nonnum
        v = p.values[ok]
        self.n_num += len(v)
        for k, mask in enumerate(p.marks or ()):
            if mask.any():
                self.n_marks[k] += int(mask.sum())
                if self.first_marks[k] is None:
                    i = int(np.argmax(mask))
                    self.first_marks[k] = (row0 + i, p.text()[i].as_py())
        if p.thousands is not None and p.thousands.any():
            self.n_thousands += int(p.thousands.sum())
            if self.first_thousands is None:
                i = int(np.argmax(p.thousands))
                self.first_thousands = (row0 + i, p.text()[i].as_py())
        if p.big is not None and self.first_big is None:
            self.first_big = (row0 + p.big[0], p.big[1])
        if len(v):
            self.total += float(v.sum())
            self.minimum = min(self.minimum, float(v.min()))
            self.maximum = max(self.maximum, float(v.max()))
            self.integral = self.integral and bool(np.all(v == np.round(v)))
            if self.numbers.counting:  # a continuous column stops counting
                u, c = np.unique(v, return_counts=True)
                self.numbers.add(u, c)
            if self.number_texts.counting:  # the numbers' text: categories, or labels kept as text
                if number_texts is None:
                    vc = pc.value_counts(pc.filter(p.text(), pa.array(ok)))
                    number_texts = vc.field("values"), vc.field("counts").to_numpy()
                self.number_texts.add(*number_texts)
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
                self.first_nonnum = (row0 + i, p.strings[i].as_py())
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

    @property
    def num_counts(self) -> dict[float, int] | None:
        """The distinct numbers and their counts; None when more than :data:`_MAX_COUNTED`."""
        return self.numbers.as_dict()

    @property
    def num_str_counts(self) -> dict[str, int] | None:
        """The distinct texts of the numbers and their counts; None when more than :data:`_MAX_COUNTED`."""
        return self.number_texts.as_dict()


class _Counts:
    """Distinct values of a column and their counts, kept as the per-batch pieces (distinct values,
    counts) that NumPy or Arrow count, merged only when their total could pass :data:`_MAX_COUNTED`
    (then counting stops, as a dict would when a batch's distinct values and the ones so far pass it)
    and when read."""

    def __init__(self, kind: type) -> None:
        self.kind = kind  # float (NumPy arrays) or str (Arrow arrays)
        self.pieces: list[tuple[Any, np.ndarray]] | None = []
        self.bound = 0  # the pieces' lengths: at least the number of distinct values so far

    @property
    def counting(self) -> bool:
        return self.pieces is not None

    def add(self, values: Any, counts: np.ndarray) -> None:
        """One batch's distinct values and counts."""
        if self.pieces is None:
            return
        if len(counts) + self.bound > _MAX_COUNTED:
            self._merge()
            if len(counts) + self.bound > _MAX_COUNTED:
                self.pieces = None
                return
        self.pieces.append((values, counts))
        self.bound += len(counts)

    def _merge(self) -> None:
        if self.pieces is None or len(self.pieces) < 2:
            return
        counts = np.concatenate([c for _, c in self.pieces]).astype(np.int64)
        if self.kind is float:
            u, inv = np.unique(np.concatenate([v for v, _ in self.pieces]), return_inverse=True)
            merged: tuple[Any, np.ndarray] = (u, np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64))
        else:
            t = pa.table({"v": pa.concat_arrays([_texts(v) for v, _ in self.pieces]), "c": counts}).group_by("v")
            t = t.aggregate([("c", "sum")])
            merged = (t.column("v").combine_chunks(), t.column("c_sum").to_numpy())
        self.pieces = [merged]
        self.bound = len(merged[1])

    def as_dict(self) -> dict[Any, int] | None:
        if self.pieces is None:
            return None
        self._merge()
        if not self.pieces:
            return {}
        values, counts = self.pieces[0]
        keys = values.tolist() if self.kind is float else _texts(values).to_pylist()
        return dict(zip(keys, counts.tolist(), strict=True))


def _texts(values: pa.Array | tuple[pa.Array, np.ndarray]) -> pa.Array:
    """Text values of a :class:`_Counts` piece as a string array: an array, or a batch's dictionary
    of texts and the indices of this column's (:func:`_number_texts`)."""
    if isinstance(values, tuple):
        dictionary, indices = values
        values = dictionary.take(pa.array(indices))
    return values if values.type == pa.string() else values.cast(pa.string())  # large_string in some files


def _number_texts(parsed: Sequence[_Parsed], counting: Sequence[bool]) -> list[tuple[Any, np.ndarray] | None]:
    """The distinct texts of the numbers of each column of a batch and their counts (as
    :meth:`_ColumnProfile.update` counts them), for the ``counting`` columns with numbers, found in
    one pass over the batch: one count per column would cost Arrow's per-call time 10,000 times in a
    CSV of 10,000 columns. None for the others."""
    out: list[tuple[Any, np.ndarray] | None] = [None] * len(parsed)
    cols = [i for i, p in enumerate(parsed) if counting[i] and p.text().type == pa.string()]
    if len(cols) < 2:
        return out
    oks = [~parsed[i].missing & ~parsed[i].nonnum for i in cols]
    ok = np.concatenate(oks)
    which = np.repeat(np.arange(len(cols)), [len(m) for m in oks])[ok]
    texts = pa.concat_arrays([parsed[i].text() for i in cols]).filter(pa.array(ok))
    coded = pc.dictionary_encode(texts)
    dictionary, indices = coded.dictionary, coded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keys, counts = np.unique(which * max(len(dictionary), 1) + indices, return_counts=True)
    bounds = np.searchsorted(keys // max(len(dictionary), 1), np.arange(len(cols) + 1))
    for k, i in enumerate(cols):
        lo, hi = bounds[k], bounds[k + 1]
        if hi > lo:
            out[i] = (dictionary, keys[lo:hi] % max(len(dictionary), 1)), counts[lo:hi]
    return out


def _clean_label(s: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(s, r"\.$", "")


def _boolean_spelling(categories: Sequence[Any] | None) -> dict[str, str] | None:
    """How a store's categories (or classes) spell booleans, e.g. ``{"false": "FALSE", "true":
    "TRUE"}``, when they are ``true``/``false`` in some case: Excel and R write ``TRUE``, pandas
    ``True``, Spark and Parquet ``true``, and a file of one ingested like a store of another
    holds the same values. None for other categories."""
    if not categories:
        return None
    spelt = {str(c).lower(): str(c) for c in categories}
    if set(spelt) - {"false", "true"} or len(spelt) != len(categories):
        return None
    return spelt


@dataclass
class _Options:
    """How to write, shared by table and array sources."""

    rows: tuple[int, int | None]
    chunk_rows: int | None
    codec: str | None
    missing: str
    training: Training | None
    force: bool
    progress: bool


@dataclass
class _Table:
    """A CSV or Parquet source: its columns and a reader of record batches of some of them."""

    path: Path
    batches: Callable[[list[str]], Iterator[pa.RecordBatch]]
    names: list[str]
    attrs: dict[str, Any]  # the store's ``source`` attribute so far
    decimal_comma: bool = False  # how ``decimal="auto"`` reads commas first (a delimiter other than ",")
    layout: str = ""  # the CSV delimiter, as errors show it
    decimal: str = "auto"  # "comma" / "point": given, or the like= store's; "auto": the data decide
    decimal_by: str = ""  # who fixed ``decimal``, as errors name it ("--decimal point", the like= store)
    missing_values: list[str] = field(default_factory=lambda: list(MISSING_TOKENS))
    # what a dot in a number is when commas are decimal: None, thousands separators ("1.234,5" is
    # 1234.5); True: so, as the like= store recorded; False: decimal points ("1.5"), as a like=
    # store of an earlier version (no record of dots) read them. A decimal-comma store records it
    # as ``source.thousands_dot``
    thousands_dot: bool | None = None


def _profile_table(
    batches: Iterator[tuple[int, pa.RecordBatch]],
    columns: list[str],
    decimal_comma: bool,
    prog: Progress,
    as_text: dict[str, bool | None] | None = None,
    missing: pa.Array | None = None,
    thousands_dot: bool = False,
    dot_marks: bool = False,
    booleans: dict[str, dict[str, str]] | None = None,
) -> tuple[dict[str, _ColumnProfile], int, int]:
    """Pass 1 over a table: the profile of each column, the rows read and the rows with a
    missing value (those ``--missing drop`` drops). ``as_text``: how to read each column (see
    :func:`_parse`; None for all: as the source's types say); ``missing``: the missing-value tokens;
    ``thousands_dot``, ``dot_marks``: as :func:`_parse` takes them; ``booleans``: per column, as
    :func:`_parse` takes it."""
    profiles = {c: _ColumnProfile(c) for c in columns}
    n_seen = 0
    n_drop = 0
    for row0, b in batches:
        drop_mask = np.zeros(b.num_rows, bool)
        parsed = _parse_many(
            [b.column(c) for c in profiles],
            list(profiles),
            [(as_text or {}).get(c) for c in profiles],
            [(booleans or {}).get(c) for c in profiles],
            [pr.n_nonnum > 0 for pr in profiles.values()],
            decimal_comma=decimal_comma,
            missing=missing,
            marks=True,
            thousands_dot=thousands_dot,
            dot_marks=dot_marks,
        )
        texts = _number_texts(parsed, [pr.number_texts.counting for pr in profiles.values()])
        for c, p, t in zip(profiles, parsed, texts, strict=True):
            profiles[c].update(p, row0, t)
            drop_mask |= p.missing
        n_drop += int(drop_mask.sum())
        n_seen += b.num_rows
        prog.update(b.num_rows)
    prog.done()
    return profiles, n_seen, n_drop


def _ingest_table(
    table: _Table,
    dest: str,
    opts: _Options,
    *,
    target: Any,
    drop: Sequence[Any],
    task: str | None,
    encoding: str,
    unlabelled: bool = False,
) -> Store:
    src, names, missing = table.path, table.names, opts.missing
    tokens = pa.array(table.missing_values, pa.string())
    cols = select_columns(
        names,
        target=target,
        drop=drop,
        training=opts.training,
        unlabelled=unlabelled,
        src=str(src),
        layout=table.layout,
    )
    start, stop = opts.rows

    def ranged() -> Iterator[tuple[int, pa.RecordBatch]]:
        """Batches restricted to the requested data rows, with the index of their first row."""
        pos = 0
        for b in table.batches(cols.read):
            n = b.num_rows
            lo, hi = max(start - pos, 0), n if stop is None else min(stop - pos, n)
            if hi > lo:
                yield pos + lo, b.slice(lo, hi - lo)
            pos += n
            if stop is not None and pos >= stop:
                return

    # ---- pass 1: profile and validate -------------------------------------------------------
    training = opts.training
    as_text: dict[str, bool | None] = {}
    booleans: dict[str, dict[str, str]] = {}  # columns of booleans, as the training store spells them
    if training is not None:  # read each column as the training store encodes it
        as_text = {e["name"]: e["kind"] != "numeric" for e in cols.encodings or []}
        spelt = {e["name"]: _boolean_spelling(e.get("categories")) for e in cols.encodings or []}
        if cols.target is not None:
            as_text[cols.target] = training.target.get("kind") == "string"
            if as_text[cols.target]:
                spelt[cols.target] = _boolean_spelling(training.classes)
        booleans = {c: b for c, b in spelt.items() if b is not None}
    # "auto" reads commas first as the delimiter suggests and dots as decimal points, then as the
    # numbers say (a second pass 1 only when they say otherwise: commas that separate thousands in a
    # semicolon or tab file, or dots that do beside decimal commas)
    decimal_comma = table.decimal == "comma" or (table.decimal == "auto" and table.decimal_comma)
    thousands_dot = table.decimal == "comma" and table.thousands_dot is not False
    dot_marks = table.decimal != "auto" or table.decimal_comma  # dots tell nothing in a comma file

    def profile() -> tuple[dict[str, _ColumnProfile], int, int]:
        prog = Progress(f"ingest {src.name}: pass 1/2", enabled=opts.progress)
        return _profile_table(
            ranged(), cols.read, decimal_comma, prog, as_text, tokens, thousands_dot, dot_marks, booleans
        )

    profiles, n_seen, n_drop = profile()
    decided = _decide_decimal(profiles, table, decimal_comma, thousands_dot, as_text)
    # numbers the reading of dots changes ("1.234", "1.234,5"; "1.5" beside decimal commas is refused)
    dots = any(pr.n_marks[_AMB_DOT] or pr.n_marks[_GROUPS] for pr in profiles.values())
    if decided is not None:
        comma = decided == "comma"
        dot = comma and table.thousands_dot is not False
        if comma != decimal_comma or (dot != thousands_dot and dots):
            decimal_comma, thousands_dot = comma, dot
            profiles, n_seen, n_drop = profile()
        thousands_dot = dot
        table.attrs["decimal_comma"] = comma  # absent: no number had a comma (a like= ingest decides from its data)
        if comma:  # what dots are in a decimal-comma store, so a like= ingest reads them the same
            table.attrs["thousands_dot"] = dot  # (absent in stores of earlier versions: decimal points)
    if n_seen == 0:
        if opts.rows == (0, None) and table.attrs.get("header"):
            raise IngestError(
                f"source {str(src)!r} has a header line ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}) "
                "but no data rows; check the file"
            )
        raise IngestError(
            f"source {str(src)!r} has no data rows{' in --rows' if opts.rows != (0, None) else ''}; "
            "check the file and --rows"
        )
    plan = plan_table(
        cols,
        profiles,
        n_out=n_seen - n_drop if missing == "drop" else n_seen,
        task=task,
        encoding=encoding,
        missing=missing,
        training=opts.training,
        chunk_rows=opts.chunk_rows,
    )

    # ---- pass 2: encode (the writer writes) -------------------------------------------------------
    tcol, target_plan, encodings, n_features = cols.target, plan.target, plan.encodings, plan.n_features
    unknown: dict[str, int] = {}
    unknown_example: dict[str, str] = {}
    value_sets = {e["name"]: pa.array(e["categories"], pa.string()) for e in encodings if e["kind"] != "numeric"}
    classes = target_plan.classes
    label_set = pa.array(classes, pa.string()) if classes and target_plan.string_labels else None

    def encoded() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for _row0, b in ranged():
            n = b.num_rows
            keep = np.ones(n, bool)
            X = np.zeros((n, n_features), np.float32)
            parsed = _parse_many(
                [b.column(e["name"]) for e in encodings],
                [e["name"] for e in encodings],
                [e["kind"] != "numeric" for e in encodings],
                [booleans.get(e["name"]) for e in encodings],
                [e["kind"] != "numeric" for e in encodings],
                decimal_comma=decimal_comma,
                missing=tokens,
                thousands_dot=thousands_dot,
            )
            for e, p in zip(encodings, parsed, strict=True):
                if missing == "drop":
                    keep &= ~p.missing
                o = e["offset"]
                if e["kind"] == "numeric":
                    _check_float32_range(p.values, ~p.missing, e["name"], _row0)
                    X[:, o] = np.where(p.missing, e["fill"], p.values)
                    continue
                s = pc.if_else(pa.array(p.missing), pa.scalar(e["fill"], pa.string()), p.text())
                codes = pc.index_in(s, value_set=value_sets[e["name"]]).to_numpy(zero_copy_only=False)
                codes = np.asarray(pd_fill(codes), np.float64)
                unk = np.isnan(codes)
                if unk.any():
                    unknown[e["name"]] = unknown.get(e["name"], 0) + int(unk.sum())
                    unknown_example.setdefault(e["name"], s[int(np.argmax(unk))].as_py())
                if e["kind"] == "onehot":
                    rows_ok = np.nonzero(~unk)[0]
                    X[rows_ok, o + codes[rows_ok].astype(np.int64)] = 1.0
                else:
                    fill_code = e["categories"].index(e["fill"])
                    X[:, o] = np.where(unk, fill_code, codes)
            tpar = (
                _parse(
                    b.column(tcol),
                    tcol,
                    decimal_comma,
                    target_plan.string_labels,
                    tokens,
                    thousands_dot=thousands_dot,
                    booleans=booleans.get(tcol),
                )
                if tcol is not None
                else None
            )
            if tpar is not None and missing == "drop":
                keep &= ~tpar.missing
            if tpar is None:
                y = np.zeros(n, target_plan.dtype)
            elif target_plan.task == "classification":
                if target_plan.string_labels:
                    lab = _clean_label(tpar.text())
                    y = pc.index_in(lab, value_set=label_set).to_numpy(zero_copy_only=False)
                    y = np.asarray(pd_fill(y), np.float64)
                else:
                    cv = np.asarray(target_plan.class_values, np.float64)
                    pos = np.clip(np.searchsorted(cv, tpar.values), 0, len(cv) - 1)
                    y = np.where(cv[pos] == tpar.values, pos, np.nan)
                bad = np.isnan(y) & keep
                if bad.any():  # only reachable with like=: labels were checked in pass 1
                    raise IngestError(f"target column {tcol!r} has a label not among the classes {classes}")
                y = np.where(keep, y, 0).astype(np.int32)
            else:
                y = tpar.values.astype(np.float64)
            if not keep.all():
                X, y = X[keep], y[keep]
            yield X, y, n

    rounded = _rounded_integers(plan, profiles)

    def summary(n_read: int, n_written: int) -> dict[str, Any]:
        return {
            "rows": [start, stop],
            "rows_read": n_read,
            "rows_dropped": n_read - n_written,
            "missing_imputed": {
                c: profiles[c].n_missing for c in cols.features if profiles[c].n_missing and missing == "impute"
            },
            "unknown_categories": unknown,
            **({"rounded_integers": rounded} if rounded else {}),
        }

    store = _write(dest, plan, encoded(), table.attrs, summary, opts, f"ingest {src.name}: pass 2/2", n_seen)
    if unknown:
        where = f"the training store {training.path!r}" if training is not None else "pass 1 (a bug: please report it)"

        def example(c: str) -> str:
            return f", e.g. {unknown_example[c]!r}" if unknown_example.get(c) is not None else ""

        warnings.warn(
            f"categories unseen in {where}, encoded as unknown (all-zero one-hot, or the most "
            "frequent category's code): "
            + "; ".join(f"column {c!r}: {k:,} row(s){example(c)}" for c, k in unknown.items()),
            UnseenCategoryWarning,
            stacklevel=3,
        )
    return store


def _decide_decimal(
    profiles: dict[str, _ColumnProfile],
    table: _Table,
    read_comma: bool,
    read_dot: bool,
    as_text: dict[str, bool | None],
) -> str | None:
    """What the commas of numbers are: "comma" (1,5 is 1.5; ``source.decimal_comma`` true),
    "point" (1,234 is 1234; false), or None when no number has one (both readings give the same
    store; absent). Pass 1 read them as ``read_comma`` says, and dots as thousands separators if
    ``read_dot``; columns of text (and categories of a like= store) do not count.

    A file has one convention: a decimal comma with dots separating thousands ("1,5", "1.234,5",
    "1.234.567"), or a decimal point with commas separating thousands ("1.5", "1,234,567"). A
    number only one fits ("1,5", "0,125", "1234,5", "1.234,5", "1.234.567"; "1,234,567", "1,234.5")
    makes every comma and dot of the file read so; a file holding both is refused, as is one
    holding decimal commas and decimal points ("1,5" and "1.5"). Numbers either fits ("1,250",
    ``999`` beside ``1,234``; "1.250") are read as the rest of the file says, a decimal point
    ("1.5") saying it too, and a file whose only comma numbers are such is refused: a guess would
    be wrong by a factor of a thousand. Without comma numbers dots stay decimal points ("1.234" is
    1.234). A given ``decimal`` (or the like= store's) is followed, and numbers only the other
    reading fits are refused. In a comma-delimited file (or Parquet), "auto" reads commas as
    thousands separators and dots as decimal points."""
    found: list[tuple[str, int, str] | None] = [None] * _MARKS  # first (column, row, text) of each kind
    for c, pr in profiles.items():
        n = pr.n_marks
        if as_text.get(c) or not any(n):
            continue
        # numbers only the other reading reads
        other = n[_THOU] + (n[_POINT] if read_dot else n[_GROUPS]) if read_comma else n[_DEC]
        text = pr.n_nonnum - other
        if text and pr.n_num + other <= text:
            continue  # a column of text: its commas and dots are text too
        for k, first in enumerate(pr.first_marks):
            if first is not None and found[k] is None:
                found[k] = (c, *first)
    dec, thou, amb, point, _, groups = found
    if table.decimal != "auto":
        given = table.decimal_by.startswith("--decimal")
        if table.decimal == "comma":
            dots = table.thousands_dot is not False
            bad = thou or (point if dots else groups)
        else:
            bad = dec
        if bad is not None:
            c, r, v = bad
            if bad is thou:
                what, reads = "with thousands separators", "commas as decimal commas"
                fix = "pass --decimal point" if given else f"write it without separators ({v.replace(',', '')})"
            elif bad is point:
                what, reads = "with a decimal point", "commas as decimal commas and dots as thousands separators"
                fix = "pass --decimal point" if given else f"write it with a decimal comma ({v.replace('.', ',')})"
            elif table.decimal == "comma":  # "1.234,5" for a like= store whose dots are decimal points
                what, reads = "with dots as thousands separators", "dots as decimal points"
                fix = f"write it without them ({v.replace('.', '')})"
            else:
                what = "with a decimal comma" if "," in v else "with dots as thousands separators"
                reads = "commas as thousands separators" if "," in v else "dots as decimal points"
                fix = "pass --decimal comma" if given else f"write it with a decimal point ({_as_point(v)})"
                if not given and "," not in v:
                    fix = f"write it without separators ({_as_point(v)})"
            raise IngestError(
                f"column {c!r} has {v!r} at {data_row(r)}, a number {what}, but {table.decimal_by} reads {reads}; {fix}"
            )
        return table.decimal
    if not table.decimal_comma:
        return "point" if thou or amb else None
    for other, how in ((thou, "thousands separators"), (point, "a decimal point")):
        if dec and other:
            (c, r, v), (c2, r2, v2) = dec, other
            what = "a decimal comma" if "," in v else "dots as thousands separators"
            if other is thou and "," not in v:
                how = "commas as thousands separators"
            raise IngestError(
                f"column {c!r} has {v!r} at {data_row(r)}, a number with {what}, but column {c2!r} "
                f"has {v2!r} at data row {r2}, with {how}; write every number of the file one way"
            )
    if dec:
        return "comma"
    if thou or (amb and point):
        return "point"
    if amb:
        c, r, v = amb
        raise IngestError(
            f"column {c!r} has numbers such as {v!r} (data row {r}, 0-based) that read as {v.replace(',', '.')} "
            f"with a decimal comma or {v.replace(',', '')} with a thousands separator, and no number of the file "
            "tells which; pass --decimal comma or --decimal point"
        )
    return None


def _as_point(v: str) -> str:
    """A number with a decimal comma and dots separating thousands written with a decimal point
    ("1.234,5" -> "1234.5")."""
    return v.replace(".", "").replace(",", ".")


def _rounded_integers(plan: IngestPlan, profiles: dict[str, _ColumnProfile]) -> dict[str, float]:
    """Numeric feature columns of integers beyond 2^24, which float32 features hold rounded,
    and their largest magnitude (``source.rounded_integers``; the command warns)."""
    if plan.x_dtype != np.float32:
        return {}
    out = {}
    for e in plan.encodings:
        pr = profiles.get(e["name"])
        if e["kind"] == "numeric" and pr is not None and pr.n_num and pr.integral:
            top = max(abs(pr.minimum), abs(pr.maximum))
            if top > 2**24:
                out[e["name"]] = top
    return out


def pd_fill(a: Any) -> np.ndarray:
    """Arrow int array with nulls -> float64 NumPy with NaN."""
    return (
        np.asarray(a, dtype=np.float64) if not isinstance(a, np.ndarray) or a.dtype == object else a.astype(np.float64)
    )


# --------------------------------------------------------------------------------------------
# The writer, shared by tables and arrays
# --------------------------------------------------------------------------------------------


def _write(
    dest: str,
    plan: IngestPlan,
    batches: Iterable[tuple[np.ndarray, np.ndarray, int]],
    source: dict[str, Any],
    summary: Callable[[int, int], dict[str, Any]],
    opts: _Options,
    label: str,
    total: int,
) -> Store:
    """Write the encoded ``batches`` (features, targets, rows read) into a new store at ``dest``
    as ``plan`` says, merging the feature statistics (unless the plan takes the training
    store's) and the class counts or target statistics of what is written. ``summary(rows
    read, rows written)``: what the source attribute adds once every batch is written."""
    target = plan.target
    xstats = RunningStats(plan.n_features)
    ystats = RunningStats(int(np.prod(target.shape)) if target.shape else 1)
    class_counts = np.zeros(len(target.classes) if target.classes else 0, np.int64)
    count_classes = plan.labelled and target.task == "classification"
    y_stats = plan.labelled and target.task != "classification"
    n_read = n_written = 0
    prog = Progress(label, total=total, enabled=opts.progress)
    with create_store(
        dest,
        plan.n_features,
        y_shape_tail=target.shape,
        x_dtype=plan.x_dtype,
        y_dtype=target.dtype,
        chunk_rows=plan.chunk_rows,
        codec=opts.codec,
        force=opts.force,
        attrs=plan.store_attrs(source),
    ) as w:
        for X, y, n in batches:
            with np.errstate(over="ignore"):  # a finite value beyond float32's range: named below
                Xc = np.ascontiguousarray(X.astype(plan.x_dtype, copy=False))
            _check_no_nan(Xc, y, plan, n_written, X)
            xstats.update(Xc)  # this store's own statistics (under like=, next to the training store's)
            if count_classes:
                class_counts += np.bincount(y, minlength=len(class_counts))
            elif y_stats:
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
                    ystats.update(y.reshape(len(y), -1))
            w.append(Xc, y)
            n_read += n
            n_written += len(Xc)
            prog.update(n)
        prog.done()
        if y_stats and not (np.isfinite(ystats.mean).all() and np.isfinite(ystats.m2).all()):
            raise IngestError(
                f"the target {target.name!r} holds values too large to standardize in float64 (its squares "
                "overflow; the largest magnitude allowed is about 1e154); scale the column, e.g. to other units"
            )
        w.attrs.update(plan.final_attrs(xstats, ystats, class_counts))
        own: dict[str, Any] = {}
        if plan.training_stats is not None:  # the data's own statistics, for inspect
            own["feature_stats"] = {"mean": xstats.mean.tolist(), "std": xstats.std.tolist()}
            if y_stats and n_written:
                own["target_stats"] = {"mean": ystats.mean.tolist(), "std": ystats.std.tolist()}
        w.attrs["source"] = {**source, **summary(n_read, n_written), **own}
    return w.commit_result


def _check_float32_range(values: np.ndarray, present: np.ndarray, name: str, row0: int) -> None:
    """Refuse a feature value beyond float32's range (features are stored as float32), naming the
    column and its 0-based data row, instead of storing it as infinity."""
    top = float(np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):
        over = present & (np.abs(values) > top)
    if over.any():
        r = int(np.argmax(over))
        raise IngestError(
            f"column {name!r} holds {float(values[r]):g} at {data_row(row0 + r)}, beyond the range of "
            f"float32 features (+-{top:.3g}); scale the column (e.g. to other units) or leave it out with --drop"
        )


def _check_no_nan(X: np.ndarray, y: np.ndarray, plan: IngestPlan, row0: int, source: np.ndarray | None = None) -> None:
    """The store never holds NaN: every missing value was imputed, refused or dropped before. A
    feature whose value in ``source`` (the rows before their cast to the store's dtype) is
    finite but beyond the store's float range is the user's to scale: refused naming it."""
    for what, a in (("features", X), ("targets", y)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            r = int(np.argmax(~np.isfinite(a.reshape(len(a), -1)).all(axis=1)))
            col = int(np.argmax(~np.isfinite(a.reshape(len(a), -1)[r]))) if what == "features" else 0
            name = f" (feature {plan.feature_names[col]!r})" if what == "features" else ""
            if what == "features" and source is not None:
                value = np.asarray(source).reshape(len(a), -1)[r, col]
                if np.isfinite(value):
                    top = float(np.finfo(a.dtype).max)
                    raise IngestError(
                        f"feature {plan.feature_names[col]!r} holds {float(value):g} at written row {row0 + r}, "
                        f"beyond the range of the store's {a.dtype} features (+-{top:.3g}); scale the column "
                        "(e.g. to other units) or leave it out with --drop"
                    )
            raise IngestError(
                f"internal error: a NaN or infinite value reached the store's {what}{name} at written row "
                f"{row0 + r}; nothing was written: please report this with the source file"
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
    # column-major on disk (np.save of a Fortran-ordered array, as pandas' to_numpy() gives):
    # read by seeking, one run of rows per element of a row
    fortran: bool = False

    def blocks(self, rows_per_block: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        row_items = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        row_bytes = row_items * self.dtype.itemsize
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        with self.open() as f:
            if self.fortran and len(self.shape) > 1:
                yield from self._fortran_blocks(f, row_items, rows_per_block, start, stop)
                return
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

    def _fortran_blocks(
        self, f: Any, row_items: int, rows_per_block: int, start: int, stop: int
    ) -> Iterator[np.ndarray]:
        """Row blocks of a column-major array: element ``j`` of a row (the row's trailing indices
        flattened first-fastest) holds all rows in one run, so a block is one read per element."""
        base, n, item = f.tell(), self.shape[0], self.dtype.itemsize
        pos = start
        while pos < stop:
            k = min(rows_per_block, stop - pos)
            runs = np.empty((row_items, k), dtype=self.dtype)
            for j in range(row_items):
                f.seek(base + (j * n + pos) * item)
                runs[j] = np.frombuffer(_read_exact(f, k * item, self.name), dtype=self.dtype)
            # runs[j] is trailing element j in Fortran order: reversed dims in C order, then transposed
            yield np.ascontiguousarray(runs.reshape(*self.shape[:0:-1], k).transpose())
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


def _npy_source(opener: Callable[[], Any], name: str, seekable: bool = False) -> _ArraySource:
    """The array of an .npy stream; ``seekable``: the stream is a file, which can be read in
    column-major (Fortran) order."""
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
    if dtype.names:
        raise IngestError(
            f"{name} is a structured array (fields {', '.join(dtype.names[:6])}); save a plain array, "
            "e.g. np.column_stack([a[f] for f in a.dtype.names])"
        )
    if dtype.hasobject:
        raise IngestError(f"{name} holds Python objects; save a numeric array")
    if len(shape) == 0:
        raise IngestError(f"{name} holds a single value (a 0-d array); save one row per sample")
    if fortran and len(shape) > 1 and not seekable:  # a zip member: a backward seek decompresses it again
        raise IngestError(f"{name} is Fortran-ordered inside an archive; save it with np.ascontiguousarray")

    class _Opened:
        def __enter__(self) -> Any:
            self.f = opener()
            self.f.__enter__()
            _skip(self.f, offset) if not self.f.seekable() else self.f.seek(offset)
            return self.f

        def __exit__(self, *a: Any) -> None:
            self.f.__exit__(*a)

    return _ArraySource(tuple(shape), dtype, _Opened, name, fortran=bool(fortran))


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
    for xk, yk in (
        ("X", "y"),
        ("x", "y"),
        ("X", "Y"),
        ("data", "target"),
        ("x_train", "y_train"),
        ("images", "labels"),
    ):
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


def _profile_arrays(
    pairs: Iterator[tuple[int, np.ndarray, np.ndarray]],
    xs: _ArraySource,
    ys: _ArraySource | None,
    tcol: int | None,
    *,
    n_features: int,
    rows: int,
    missing: str,
    label: str,
    progress: bool,
) -> ArrayProfile:
    """Pass 1 over arrays: sums of the finite features (for imputation), rows with a missing or
    infinite feature, and the labels (strings, or numbers and whether they are integers);
    refuses missing features under ``reject`` and missing targets unless ``drop``."""
    floaty = xs.dtype.kind == "f"
    y_float = (ys.dtype if ys is not None else xs.dtype).kind == "f"
    y_str = ys is not None and ys.dtype.kind in "US"
    str_counts: dict[str, int] = {}
    total = np.zeros(n_features)
    count = np.zeros(n_features)
    n_bad_rows = 0
    label_counts: dict[float, int] | None = {}
    y_integral = True
    prog = Progress(label, total=rows, enabled=progress)
    for pos, X, y in pairs:
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
        if y_str:
            u, c = np.unique(np.char.strip(y.astype(str)), return_counts=True)
            for a, b in zip(u.tolist(), c.tolist(), strict=True):
                str_counts[a] = str_counts.get(a, 0) + b
            if len(str_counts) > MAX_CATEGORIES:
                raise IngestError(
                    f"labels {ys.name} have more than {MAX_CATEGORIES:,} distinct strings; they are not classes"
                )
            prog.update(len(X))
            continue
        if y.dtype.kind in "iu" and y.dtype.itemsize == 8 and y.size:
            big = max(abs(int(y.min())), abs(int(y.max())))
            if big > _SAFE_INT:
                value = int(y.max()) if abs(int(y.max())) == big else int(y.min())
                what = f"the labels {ys.name!r}" if ys is not None else f"target column {tcol}"
                raise IngestError(
                    f"{what} hold the integer {value}, beyond 2^53, which a float64 cannot hold exactly "
                    "(an identifier?); save them as strings (np.save(path, y.astype(str))) to keep them as "
                    "class names"
                )
        yv = np.asarray(y, np.float64)
        if y_float and not np.all(np.isfinite(yv)):
            r = int(np.argmax(~np.isfinite(yv.reshape(len(yv), -1)).any(axis=1)))
            if missing != "drop":
                raise IngestError(
                    f"target is missing or infinite at row {pos + r} (0-based); fix it or pass --missing drop"
                )
        if label_counts is not None and yv.ndim == 1:
            fin = yv[np.isfinite(yv)]
            y_integral = y_integral and bool(np.all(fin == np.round(fin)))
            u, c = np.unique(fin, return_counts=True)
            for a, b in zip(u.tolist(), c.tolist(), strict=True):
                label_counts[a] = label_counts.get(a, 0) + b
            if len(label_counts) > _MAX_COUNTED:
                label_counts = None
        prog.update(len(X))
    prog.done()
    y_tail = tuple(ys.shape[1:]) if ys is not None else ()
    labels = LabelProfile(
        kind="string" if y_str else "numeric",
        strings=str_counts,
        values=label_counts,
        integral=y_integral,
        scalar=not y_tail,
        kind_from_dtype=True,
        subject=f"the labels {ys.name!r}" if ys is not None else f"target column {tcol}",
        hint="pass --task regression if this is a target value",
    )
    return ArrayProfile(
        xs.dtype,
        total,
        count,
        n_bad_rows,
        rows,
        labels,
        y_tail,
        "labels" if ys is not None else f"x{tcol}",
    )


def _ingest_arrays(
    src: Path,
    dest: str,
    xs: _ArraySource,
    ys: _ArraySource | None,
    source_attrs: dict[str, Any],
    opts: _Options,
    *,
    target: Any,
    task: str | None,
) -> Store:
    like, missing, rows = opts.training, opts.missing, opts.rows
    n_total = xs.shape[0]
    tcol: int | None = None
    if xs.dtype.kind not in "biuf":
        raise IngestError(f"{xs.name} has dtype {xs.dtype}; features must be numbers (bool, integer or float)")
    if ys is not None and len(ys.shape) == 2 and ys.shape[1] == 1 and (like is None or like.y_ndim == 1):
        ys = _ArraySource(ys.shape[:1], ys.dtype, ys.open, ys.name)  # (n, 1) labels are (n,) labels
    y_str = ys is not None and ys.dtype.kind in "US"
    if ys is not None and not y_str and ys.dtype.kind not in "biuf":
        raise IngestError(f"labels {ys.name} have dtype {ys.dtype}; save numbers or strings")
    if y_str and (len(ys.shape) != 1 or task == "regression"):
        raise IngestError(
            f"labels {ys.name} are strings: they must be one class name per row, (n,) and a classification"
        )
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
        raise IngestError(
            f"source {str(src)!r} has no data rows{' in --rows' if rows != (0, None) else ''} "
            f"(it has {n_total}); check --rows"
        )
    row_items = int(np.prod(xs.shape[1:], dtype=np.int64)) if len(xs.shape) > 1 else 1
    n_features = row_items - (1 if tcol is not None else 0)
    if like is not None and like.n_features != n_features:
        raise IngestError(
            f"{xs.name} has {n_features} features but the training store {like.path!r} has {like.n_features}"
        )
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
    profile = _profile_arrays(
        pairs(),
        xs,
        ys,
        tcol,
        n_features=n_features,
        rows=stop - start,
        missing=missing,
        label=f"ingest {src.name}: pass 1/2",
        progress=opts.progress,
    )
    plan = plan_arrays(profile, task=task, missing=missing, training=like, chunk_rows=opts.chunk_rows)

    # ---- pass 2 ---------------------------------------------------------------------------------
    target_plan, fill = plan.target, plan.fill
    cv = np.asarray(target_plan.class_values, np.float64) if target_plan.class_values is not None else None
    class_names = np.asarray(target_plan.classes if y_str else [], dtype=str)

    def encoded() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for _pos, X, y in pairs():
            n = len(X)
            keep = np.ones(n, bool)
            if floaty:
                bad = ~np.isfinite(X)
                if bad.any():
                    if missing == "drop":
                        keep &= ~bad.any(axis=1)
                    else:
                        X = np.where(bad, fill.astype(X.dtype), X)
            yv = np.char.strip(y.astype(str)) if y_str else np.asarray(y, np.float64)
            if y_float:
                keep &= np.isfinite(yv.reshape(len(yv), -1)).all(axis=1)
            X, yv = X[keep], yv[keep]
            if y_str:
                yo = np.searchsorted(class_names, yv).astype(np.int32)
            elif target_plan.task == "classification":
                yo = np.searchsorted(cv, yv).astype(np.int32)
            else:
                yo = yv.astype(np.float64)
            yield X, yo, n

    def summary(n_read: int, n_written: int) -> dict[str, Any]:
        return {"rows": [start, stop], "rows_read": stop - start, "rows_with_missing": profile.rows_with_missing}

    return _write(dest, plan, encoded(), source_attrs, summary, opts, f"ingest {src.name}: pass 2/2", stop - start)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


_DELIMITER_NAMES = {
    "comma": ",",
    "semicolon": ";",
    "pipe": "|",
    "tab": "\t",
    "\\t": "\t",
    "space": " ",
    "whitespace": " ",
    "\\s": " ",
}


def _delimiter_option(delimiter: str | None) -> str | None:
    """``--delimiter``: one character, or the name of one (comma, semicolon, pipe, tab, space)."""
    if delimiter is None:
        return None
    d = _DELIMITER_NAMES.get(delimiter.lower(), delimiter)
    if len(d) != 1 or d in ('"', "\n", "\r"):
        raise IngestError(
            f"--delimiter {delimiter!r} is not one character; pass one character, or comma, semicolon, pipe, "
            "tab or space"
        )
    return d


def _missing_values_option(missing_values: str | Sequence[str] | None) -> list[str] | None:
    """``--missing-values``: the text read as a missing value, comma-separated (a list in the API),
    in place of :data:`MISSING_TOKENS`; the empty field is always one, so ``""`` means only it.
    None: the default list. A number cannot be a token: the same column in Parquet holds numbers,
    which no token matches."""
    if missing_values is None:
        return None
    given = missing_values.split(",") if isinstance(missing_values, str) else list(missing_values)
    tokens = [""]
    for t in given:
        if not isinstance(t, str):
            raise IngestError(f"--missing-values holds {t!r}, which is not text; pass text such as NA,?")
        t = t.strip()
        number = any(re.match(rx, t) for rx in (_NUM_RE, _DECIMAL_COMMA_RE, _THOUSANDS_RE, _DOT_GROUPS_RE))
        if number and not re.match(r"(?i)^[+-]?inf", t):
            raise IngestError(
                f"--missing-values {t!r} is a number, which is never a missing value (in Parquet it stays a "
                "number); replace it in the file with an empty field, or leave it out of the list"
            )
        if t not in tokens:
            tokens.append(t)
    return tokens


def _shown_tokens(tokens: Sequence[str]) -> str:
    """Missing-value tokens as ``--missing-values`` takes them ("NA,?"; "" for only the empty field)."""
    return ",".join(t for t in tokens if t)


def _like_choices(
    like: Store, decimal: str, missing_values: list[str] | None
) -> tuple[str, str, list[str] | None, bool | None]:
    """The decimal mark, who fixed it, the missing-value tokens and the reading of dots (see
    :attr:`_Table.thousands_dot`) of an ingest like= ``like``: the store's, which a source ingested
    like it must follow (a different choice given is refused)."""
    src = like.attrs.get("source") or {}
    if src.get("format") not in ("csv", "parquet"):  # NumPy, IDX, synth: no text was parsed
        return decimal, "--decimal " + decimal, missing_values, None
    theirs = src.get("missing_values") or MISSING_TOKENS
    if missing_values is not None and set(missing_values) != set(theirs):
        raise IngestError(
            f"--missing-values {_shown_tokens(missing_values)!r} differs from the list the --like store "
            f"{like.path!r} was ingested with ({_shown_tokens(theirs)!r}); drop --missing-values (the store's "
            "list applies), so the same text means the same in both stores"
        )
    tokens = list(theirs) if "missing_values" in src else None
    mark = {True: "comma", False: "point"}.get(src.get("decimal_comma"))
    if mark is None:  # no number of the training data had a comma: this source decides
        return decimal, "--decimal " + decimal, tokens, None
    if decimal not in ("auto", mark):
        reads = "decimal commas" if mark == "comma" else "thousands separators"
        raise IngestError(
            f"--decimal {decimal} contradicts the --like store {like.path!r}, whose numbers were read with commas "
            f"as {reads} (--decimal {mark}); drop --decimal (the store's reading applies)"
        )
    # a decimal-comma store without thousands_dot read dots as decimal points ("1.5"), or had none
    return mark, f"the --like store {like.path!r}", tokens, bool(src.get("thousands_dot"))


def _check_not_in_store(dest: str | os.PathLike) -> None:
    """Refuse a destination inside an existing Zarr store (the --like store, any other): the new
    store would become part of it (as ``train --out`` refuses)."""
    spath = os.fspath(dest)
    if is_url(spath):
        return
    store = outermost_store(spath, itself=False)  # the destination itself: replaced with --force
    if store is not None:
        shown = os.path.relpath(store) if store.is_relative_to(Path.cwd()) else str(store)
        raise IngestError(
            f"destination {spath!r} lies inside the Zarr store {shown!r}; writing there would change that store: "
            "choose a destination outside data stores"
        )


_COMPRESSED = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x04\x22\x4d\x18": "lz4",
    b"PK\x03\x04": "zip",
}
_DECOMPRESS = {"zstd": "zstd -d", "bzip2": "bunzip2", "xz": "unxz", "lz4": "lz4 -d", "zip": "unzip"}


def _check_not_compressed(path: Path) -> None:
    """Refuse a CSV compressed other than with gzip (read as text it would be garbage)."""
    if path.is_dir():
        return
    with _open_text_bytes(path) as f:
        head = f.read(8)
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            raise IngestError(
                f"{str(path)!r} is {name}-compressed, which is not read; decompress it first (e.g. "
                f"{_DECOMPRESS[name]} {path.name}), or compress it with gzip"
            )


def _bom_encoding(path: Path) -> str | None:
    """The encoding a UTF-16/UTF-32 byte order mark announces (Excel's "Unicode text"), or None."""
    if path.is_dir():
        return None
    with _open_text_bytes(path) as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return None


def _finish_interrupted_replace(dest: str | os.PathLike) -> list[str]:
    """Finish a replacement of ``dest`` that a killed ingest (or other writer) left midway, before
    this ingest decides whether ``dest`` exists (:func:`pipeline.store.finish_interrupted_replace`).
    Returns what was done and, for each store set aside that it cannot judge, how to settle it."""
    done, left = finish_interrupted_replace(dest)
    there = os.path.lexists(os.fspath(dest))
    for aside in left:
        fix = (
            f"remove it (rm -r {shlex.quote(str(aside))}) if {os.fspath(dest)!r} holds the store you want"
            if there
            else f"put it back (mv {shlex.quote(str(aside))} {shlex.quote(os.fspath(dest))}) or remove it"
        )
        done.append(
            f"{str(aside)!r} is left from a replacement of {os.fspath(dest)!r} that was stopped (by an earlier "
            f"version of this program, on another host, or while removing it), which ingest cannot finish; it was "
            f"left as it is: {fix}"
        )
    return done


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
    unlabelled: bool = False,
    text_encoding: str = "utf-8",
    decimal: str = "auto",
    missing_values: str | Sequence[str] | None = None,
) -> Store:
    """Ingest ``src`` into a new store at ``dest`` and return it opened. See the module docstring.

    ``unlabelled`` (with ``like``): the source has no target column; the store's ``y`` holds
    zeros and its ``labelled`` attribute is false, so it can be predicted but not evaluated or
    trained on. ``text_encoding``: the character encoding of a CSV source (default UTF-8).
    ``decimal``: what a comma in a number is: ``"comma"`` (1,5 is 1.5, and dots separate thousands:
    1.234,5 is 1234.5), ``"point"`` (1,234 is 1234) or ``"auto"`` (see :func:`_decide_decimal`).
    ``missing_values``: the text that is a missing value (a list, or comma-separated), in place of
    :data:`MISSING_TOKENS`; the empty field always is. Under ``like``, both are the training store's (recorded in its
    ``source.decimal_comma``, ``source.thousands_dot`` and ``source.missing_values``); a different
    one given is refused.
    """
    if is_url(os.fspath(src)):
        raise IngestError(
            f"source {os.fspath(src)!r} is a URL; ingest reads local files: download it first (e.g. aws s3 cp "
            f"{os.fspath(src)} .) and ingest the copy"
        )
    path = Path(src)
    if not path.exists():
        raise IngestError(f"source file {str(src)!r} does not exist; check the path")
    if path.is_dir() and format not in (None, "parquet"):
        raise IngestError(f"source {str(src)!r} is a directory; pass a file (only Parquet datasets are directories)")
    if format is not None and format not in FORMATS:
        raise IngestError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if labels is not None and target is not None:
        raise IngestError(
            "--target names a column of the source, but with --labels the labels file is the target; drop --target"
        )
    if unlabelled and like is None:
        raise IngestError("--unlabelled needs --like TRAIN_STORE (the training store gives the columns and classes)")
    if unlabelled and (target is not None or labels is not None):
        raise IngestError("--unlabelled ingests data without targets; drop --target/--labels")
    try:
        "".encode(text_encoding)
    except LookupError:
        raise IngestError(f"unknown text encoding {text_encoding!r}; pass e.g. utf-8, latin-1 or cp1252") from None
    if not path.is_dir() and path.stat().st_size == 0:
        raise IngestError(f"source {str(src)!r} is empty; check the file")
    if missing not in MISSING_POLICIES:
        raise IngestError(f"unknown missing-value policy {missing!r}; choose impute, reject or drop")
    missing = MISSING_POLICIES[missing]
    if task not in (None, "classification", "regression"):
        raise IngestError(f"unknown task {task!r}; choose classification or regression")
    if encoding not in ("auto", "onehot", "ordinal"):
        raise IngestError(f"unknown encoding {encoding!r}; choose auto, onehot or ordinal")
    if decimal not in DECIMAL_CHOICES:
        raise IngestError(f"unknown --decimal {decimal!r}; choose auto, comma (1,5 is 1.5) or point (1,234 is 1234)")
    tokens = _missing_values_option(missing_values)
    if tokens is not None and set(tokens) == set(MISSING_TOKENS):
        tokens = None
    delimiter = _delimiter_option(delimiter)
    like_path = like.path if isinstance(like, Store) else like
    # --force replaces only a store this program wrote, never an input
    check_not_inside(dest, {"source file": path, "labels file": labels, "--like store": like_path})
    _check_not_in_store(dest)
    # an empty directory the user made for the store holds nothing to lose: filled without --force
    # (replaced by the finished store; a failed ingest leaves it as it was, empty)
    recovered = [] if is_url(os.fspath(dest)) else _finish_interrupted_replace(dest)
    force = force or empty_local_dir(dest)
    try:
        check_replaceable(dest, force)
    except StoreError as exc:  # the command prints no warning of a refused ingest: the error says it
        if recovered:
            raise StoreError(f"{exc} (before that, {'; '.join(recovered)})") from None
        raise
    for what in recovered:
        warnings.warn(what, UserWarning, stacklevel=2)
    if not is_url(os.fspath(dest)):
        where, why = unwritable_reason(dest)
        if why is not None:
            raise IngestError(
                f"cannot create the store {os.fspath(dest)!r}: {why} (creating a directory in {str(where)!r}); "
                "choose a writable destination"
            )
    fmt = format or detect_format(path)
    if labels is not None and fmt not in ("npy", "idx"):
        raise IngestError(
            f"--labels applies to .npy features and IDX images, not {fmt} sources"
            + (
                " (an .npz holds its own labels); drop --labels"
                if fmt == "npz"
                else "; name the target column with --target"
            )
        )
    if fmt == "csv":
        _check_not_compressed(path)
        if text_encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
            text_encoding = _bom_encoding(path) or text_encoding
    row_range = parse_rows(rows)
    like_store = like if isinstance(like, Store) or like is None else open_store(like)
    if like_store is not None and task is not None and task != like_store.task:
        raise IngestError(f"--task {task} contradicts the training store's task {like_store.task}; drop --task")
    decimal_by, given_decimal, given_tokens = "--decimal " + decimal, decimal, tokens
    thousands_dot = None
    if like_store is not None:
        decimal, decimal_by, tokens, thousands_dot = _like_choices(like_store, decimal, tokens)
    source_attrs: dict[str, Any] = {
        "path": str(path.resolve()),
        "format": fmt,
        "md5": _md5(path) if path.is_file() else None,
    }
    if like_store is not None:  # its mean/std normalise this store: inspect says so
        source_attrs["like"] = like_store.path if is_url(like_store.path) else os.path.abspath(like_store.path)
    if tokens is not None and fmt in ("csv", "parquet"):  # absent: MISSING_TOKENS
        source_attrs["missing_values"] = tokens
    choices = {
        "decimal": decimal,
        "decimal_by": decimal_by,
        "missing_values": tokens or list(MISSING_TOKENS),
        "thousands_dot": thousands_dot,
    }
    opts = _Options(
        rows=row_range,
        chunk_rows=chunk_rows,
        codec=codec,
        missing=missing,
        training=Training.of(like_store) if like_store is not None else None,
        force=force,
        progress=progress,
    )
    # a dataset of several files: an error naming a data row names its file too
    places = ROW_PLACE.set(_parquet_row_place(path) if fmt == "parquet" and path.is_dir() else None)
    try:
        if fmt in ("csv", "parquet"):
            if fmt == "csv":
                expected = [e["name"] for e in like_store.attrs.get("encodings") or []] if like_store else []
                layout = _sniff_csv(
                    path, delimiter, header, comment, text_encoding, expected, choices["missing_values"]
                )
                left_out = _unnamed_left_out(layout, target, drop, expected)
                names = [n for n in layout.names if n not in left_out]
                source_attrs.update(delimiter=layout.delimiter, header=layout.header)
                if left_out:
                    source_attrs["left_out"] = left_out
                if text_encoding != "utf-8":
                    source_attrs["text_encoding"] = text_encoding

                def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
                    return _csv_batches(path, layout, empty=layout.trailing if layout.trailing in left_out else None)

                table = _Table(path, batches, names, source_attrs, layout.decimal_comma, layout.describe(), **choices)
            else:

                def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
                    return _parquet_batches(path, columns)

                training = opts.training
                given = [c for c in (target, *drop) if isinstance(c, str)]
                needed = None
                if training is not None:  # the columns the training store reads; files may lack others
                    needed = {*(e["name"] for e in training.encodings), *training.feature_names}
                    needed.add(target if isinstance(target, str) else training.target.get("name"))
                    given += sorted(c for c in needed if c is not None)
                names = _parquet_names(path, set(given), {c for c in drop if isinstance(c, str)}, needed)
                table = _Table(path, batches, names, source_attrs, **choices)
            store = _ingest_table(
                table,
                os.fspath(dest),
                opts,
                target=target,
                drop=drop,
                task=task,
                encoding=encoding,
                unlabelled=unlabelled,
            )
        else:
            if labels and not Path(labels).exists():
                raise IngestError(f"labels file {str(labels)!r} does not exist; check the path")
            if drop:
                raise IngestError(f"--drop applies to CSV and Parquet sources, not {fmt}")
            if unlabelled:
                raise IngestError(f"--unlabelled applies to CSV and Parquet sources, not {fmt}")
            for given, opt in ((given_decimal != "auto", "--decimal"), (given_tokens is not None, "--missing-values")):
                if given:
                    raise IngestError(f"{opt} applies to the text of CSV and Parquet sources, not {fmt}; drop {opt}")
            if fmt == "npy":
                xs = _npy_source(lambda: open(path, "rb"), str(path), seekable=True)
                ys = _npy_source(lambda: open(labels, "rb"), str(labels), seekable=True) if labels else None
            elif fmt == "npz":
                xs, ys = _npz_sources(path)
            else:
                if not labels:
                    raise IngestError(f"IDX images {str(path)!r} need their labels file: pass --labels FILE")
                xs, ys = _idx_source(path), _idx_source(Path(labels))
            if labels:
                source_attrs["labels"] = str(Path(labels).resolve())
            store = _ingest_arrays(path, os.fspath(dest), xs, ys, source_attrs, opts, target=target, task=task)
    except UnicodeDecodeError as exc:
        raise _text_error(path, exc, text_encoding) from None
    except UnicodeError as exc:
        raise IngestError(
            f"{str(path)!r} is not {text_encoding} text ({exc}); pass its encoding with --text-encoding "
            "(e.g. utf-8, latin-1, cp1252)"
        ) from None
    finally:
        ROW_PLACE.reset(places)
    return store
