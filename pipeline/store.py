"""The dataset store: one Zarr v3 group per dataset.

Layout::

    DEST/                 Zarr v3 group; attributes describe the dataset (see ``Store.attrs``)
      X                   (n_rows, n_features), the source's compact dtype (uint8 stays uint8)
      y                   (n_rows,) int32 class indices, or float64 (n_rows,) / (n_rows, k) targets (float32 in
                          stores written before, and by pipeline synth)

Both arrays are chunked along rows only, with the same ``chunk_rows``, so row-chunk ``i`` of ``X``
and of ``y`` hold the same rows and a chunk is the unit of reading and of work. Every chunk goes
through the compressor and then ``Crc32cCodec``: a corrupted chunk fails its checksum on read and
:meth:`Store.read_chunk` names the array, the chunk and the store.

Writers (:func:`create_store`) write beside the destination (``DEST.tmp-xxxxxxxx``) and rename into
place when everything succeeded, so an interrupted ingest leaves no half-written store. The
temporary group records its writer (host, process id and start time); a temporary left by a
writer that was killed is removed by the next writer to the same destination, on the same host,
once that process is gone. Nothing else is ever removed.

Replacing (``force``) is allowed only over a store this program wrote: a directory holding nothing
but ``zarr.json``, ``X`` and ``y`` whose group attributes carry ``format_version`` (or an empty
directory). A folder of documents, a source file or any other data is refused, never deleted.
The old store is renamed aside, the new one renamed into place, and only then is the old one
removed, so an interruption never leaves the destination empty-handed. A writer killed between those
steps leaves the old store set aside (``.DEST.old-*``, its name recording the replacing temporary and
the writer); the next writer to ``DEST`` finishes that replacement (:func:`finish_interrupted_replace`).

Every chunk of ``X`` and ``y`` is written, including chunks equal to the fill value (Zarr skips
those by default), and the store records it (``all_chunks_written``). Zarr reads an absent chunk
as the fill value, so for such stores :meth:`Store.read_rows` and :func:`verify_store` check that
every chunk they read exists and name a missing one instead of returning zeros.
"""

from __future__ import annotations

import datetime as _dt
import errno
import glob
import json
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.errors import PipelineError, StoreError

FORMAT_VERSION = 1
CODECS = ("lz4", "zstd", "none")
# Default codec, chosen by read speed (bench/io.py on this 2-core machine, 150k x 784 float32, 16 MB
# chunks, page cache warm): plain zarr read none/lz4/zstd-1 = 2450/1885/974 MB/s, through the
# shuffled loader 1525/1129/788 MB/s. Uncompressed chunks read fastest and leave the scarce cores
# to training; compression saved little here (lz4: 1.1x on Gaussian floats, 1.3x on letter's uint8).
# Pick --codec lz4 for compressible data on slow disks or object stores, where bytes cost more.
DEFAULT_CODEC = "none"
# Target bytes of one row chunk of X: big enough that per-chunk overhead (task, metadata, a
# decompress call) is amortised, small enough that a loader buffering 4 chunks plus 2 in flight
# stays within ~100-200 MB. bench/io.py, plain lz4 read by chunk size 4/16/64 MB: 1620/1885/733 MB/s.
TARGET_CHUNK_BYTES = 16 * 2**20
# Seconds opening a store on an object store, or checking what is at a URL, waits for the service:
# its client retries a silent endpoint for many minutes (s3fs: 5 tries of botocore's 5, 15 s each).
REMOTE_TIMEOUT = 60.0
MIN_CHUNK_ROWS = 1024


def default_chunk_rows(bytes_per_row: int, n_rows: int | None = None) -> int:
    """Rows per chunk so one chunk of ``X`` holds about 16 MB (clamped to [1024, 2**20] rows).

    When ``n_rows`` is known and small, chunks shrink so the store still has about 8 chunks
    (never below 1024 rows): the shuffled loader and the task planner need several chunks.
    """
    rows = TARGET_CHUNK_BYTES // max(1, int(bytes_per_row))
    rows = int(min(max(rows, MIN_CHUNK_ROWS), 2**20))
    if n_rows is not None and n_rows > 0:
        rows = min(rows, max(MIN_CHUNK_ROWS, math.ceil(n_rows / 8 / 256) * 256))
    return rows


def _compressors(codec: str, itemsize: int) -> list[Any]:
    if codec == "lz4":
        comp: list[Any] = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)]
    elif codec == "zstd":
        comp = [ZstdCodec(level=1)]
    elif codec == "none":
        comp = []
    else:
        raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return [*comp, Crc32cCodec()]


def is_url(path: str) -> bool:
    """Whether ``path`` names a remote location (``scheme://``), not a local one (``file://`` is local)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s[len("file://") :] if s.startswith("file://") else s


class RunningStats:
    """Per-column count, mean and sum of squared deviations in float64, merged batch by batch
    (Chan et al.'s parallel update), so statistics of a file need one streaming pass."""

    def __init__(self, n: int) -> None:
        self.count = 0
        self.mean = np.zeros(n, np.float64)
        self.m2 = np.zeros(n, np.float64)

    def update(self, x: np.ndarray) -> None:
        """Merge the rows of ``x`` (any dtype), in slices of ~256K values to bound float64 temporaries."""
        x = np.asarray(x).reshape(len(x), -1)
        step = max(1, 2**18 // max(1, x.shape[1]))
        for a in range(0, len(x), step):
            self._merge(np.array(x[a : a + step], dtype=np.float64))  # a copy: modified in place

    def _merge(self, x: np.ndarray) -> None:
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        x -= mb
        np.square(x, out=x)
        m2b = x.sum(axis=0)
        n = self.count + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.count * nb / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation with zeros (constant columns) replaced by 1."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std > 0, std, 1.0)


class Store:
    """An opened dataset store. ``X``/``y`` are lazy Zarr arrays; use :meth:`read_chunk`."""

    def __init__(self, path: str, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        try:
            self.X: zarr.Array = group["X"]
            self.y: zarr.Array = group["y"]
        except KeyError as exc:
            raise StoreError(
                f"store {path!r} lacks array {exc}; it is damaged: re-create it with `pipeline ingest`"
            ) from None
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.n_rows = int(self.X.shape[0])
        self.n_features = int(self.X.shape[1])
        self.chunk_rows = int(self.X.chunks[0])
        self.n_chunks = math.ceil(self.n_rows / self.chunk_rows) if self.n_rows else 0
        self.task: str = self.attrs.get("task", "classification")
        classes = self.attrs.get("classes")
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.feature_names: list[str] = list(
            self.attrs.get("feature_names") or [f"f{i}" for i in range(self.n_features)]
        )
        self.mean = np.asarray(self.attrs.get("mean", np.zeros(self.n_features)), np.float64)
        std = np.asarray(self.attrs.get("std", np.ones(self.n_features)), np.float64)
        self.std = np.where(std > 0, std, 1.0)
        target = self.attrs.get("target") or {}
        k = 1 if self.y.ndim == 1 else int(self.y.shape[1])
        self.y_mean = np.asarray(target.get("mean", np.zeros(k)), np.float64)
        self.y_std = np.asarray(target.get("std", np.ones(k)), np.float64)
        # Stores that record writing every chunk get each chunk's existence checked once, on
        # its first read (one stat, or one request on an object store, per chunk and array).
        self.check_chunks = bool(self.attrs.get("all_chunks_written"))
        self._present: set[tuple[str, int]] = set()

    def __repr__(self) -> str:
        return (
            f"Store({self.path!r}, rows={self.n_rows}, features={self.n_features}, "
            f"task={self.task}, chunks={self.n_chunks}x{self.chunk_rows})"
        )

    def chunk_slice(self, i: int) -> slice:
        """Rows of chunk ``i`` (the last chunk's ``stop`` is clipped to ``n_rows``)."""
        if not 0 <= i < self.n_chunks:
            raise StoreError(f"store {self.path!r} has {self.n_chunks} chunks; chunk {i} does not exist")
        return slice(i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows))

    def chunk_exists(self, name: str, i: int) -> bool:
        """Whether row-chunk ``i`` of array ``name`` ("X" or "y") is stored (not merely implied)."""
        arr = self.X if name == "X" else self.y
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        if not is_url(self.path):
            return os.path.isfile(os.path.join(_local(self.path), name, *key.split("/")))
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.path)
        return bool(fs.exists(f"{root.rstrip('/')}/{name}/{key}"))

    def check_chunks_exist(self, name: str, rows: slice) -> None:
        """Raise :class:`StoreError` naming the first chunk of ``rows`` absent from array ``name``."""
        if not self.check_chunks or rows.stop <= rows.start:
            return
        for i in range(rows.start // self.chunk_rows, (rows.stop - 1) // self.chunk_rows + 1):
            if (name, i) in self._present:
                continue
            a, b = i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows)
            try:
                there = self.chunk_exists(name, i)
            except Exception as exc:  # an object store that refuses or cannot be reached
                if not is_url(self.path):
                    raise
                raise StoreError(self._unreachable(i, name, slice(a, b), exc)) from exc
            if not there:
                raise StoreError(
                    f"chunk {i} of array {name!r} (rows {a}:{b}) in store {self.path!r} is missing "
                    "(Zarr would read it as zeros); re-create the store from its source"
                )
            self._present.add((name, i))

    def _unreachable(self, chunk: int | str, name: str, rows: slice, exc: BaseException) -> str:
        """The message for a chunk of a store on an object store that could not be fetched: the
        service failed (down, refusing, denying), the chunk may well be intact."""
        return (
            f"chunk {chunk} of array {name!r} (rows {rows.start}:{rows.stop}) of store {self.path!r} could not be "
            f"fetched from its object store ({_first_line(exc)}); check the endpoint (AWS_ENDPOINT_URL), the network "
            "and the credentials, then run again"
        )

    def _read(self, name: str, rows: slice, chunk: int | str) -> np.ndarray:
        arr = self.X if name == "X" else self.y
        self.check_chunks_exist(name, rows)
        try:
            return np.asarray(arr[rows])
        except Exception as exc:  # checksum mismatch, truncated or undecodable chunk
            if is_url(self.path) and not isinstance(exc, (ValueError, RuntimeError, TypeError)):
                raise StoreError(self._unreachable(chunk, name, rows, exc)) from exc  # not the chunk's fault
            detail = str(exc).split(". ")[0].strip().rstrip(".")
            raise StoreError(
                f"chunk {chunk} of array {name!r} (rows {rows.start}:{rows.stop}) in store {self.path!r} "
                f"is corrupted or unreadable ({type(exc).__name__}: {detail}); re-create the store from its source"
            ) from exc

    def read_rows(self, start: int, stop: int, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Raw (compact dtype) ``X`` and ``y`` of rows ``start:stop``. With ``labels=False``
        (prediction) ``y`` is not read: zeros of its dtype and shape stand in for it."""
        sl = slice(start, stop)
        c0 = start // self.chunk_rows
        c1 = max(c0, (stop - 1) // self.chunk_rows)
        chunk: int | str = c0 if c0 == c1 else f"{c0}-{c1}"
        X = self._read("X", sl, chunk)
        if not labels:
            return X, np.zeros((stop - start,) + tuple(self.y.shape[1:]), dtype=self.y.dtype)
        return X, self._read("y", sl, chunk)

    def read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (compact dtype) ``X`` rows and ``y`` of row-chunk ``i``."""
        sl = self.chunk_slice(i)
        return self._read("X", sl, i), self._read("y", sl, i)

    def codec(self) -> str:
        return str(self.attrs.get("codec", "?"))


def read_rows_at(store: Store, rows: np.ndarray, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw (compact dtype) ``X[rows]`` and ``y[rows]``, in the order of ``rows`` (any order,
    repeats allowed), reading only the chunks that hold them, one chunk at a time: memory is
    one chunk's worth beyond the result. Every chunk read is checked as :meth:`Store.read_rows`
    checks it (present, checksum). With ``labels=False`` ``y`` is not read: zeros stand in."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise StoreError(f"row ids must be a 1-D integer array, got {rows.dtype} of shape {rows.shape}")
    n = len(rows)
    X = np.empty((n, store.n_features), store.X.dtype)
    y = np.zeros((n, *store.y.shape[1:]), store.y.dtype)
    if not n:
        return X, y
    lo_all, hi_all = int(rows.min()), int(rows.max())
    if lo_all < 0 or hi_all >= store.n_rows:
        bad = lo_all if lo_all < 0 else hi_all
        raise StoreError(f"row {bad} is outside store {store.path!r}, which has {store.n_rows} rows")
    order = np.argsort(rows, kind="stable")
    srt = rows[order].astype(np.int64)
    chunk_of = srt // store.chunk_rows
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of)) + 1, [n]])
    for i, j in zip(cuts[:-1], cuts[1:], strict=True):
        c = int(chunk_of[i])
        lo, hi = int(srt[i]), int(srt[j - 1]) + 1
        sl, at, dest = slice(lo, hi), srt[i:j] - lo, order[i:j]
        X[dest] = store._read("X", sl, c)[at]
        if labels:
            y[dest] = store._read("y", sl, c)[at]
    return X, y


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _remote_failure(url: str, exc: BaseException) -> str | None:
    """What keeps the store at ``url`` from opening, in one line naming the fix, when the object
    store is the cause: no package for the scheme, access denied, the endpoint unreachable, no
    such bucket or key. None when the store is there and its contents are to blame."""
    if isinstance(exc, ImportError):
        return f"cannot open {url!r} ({_first_line(exc)}); install the fsspec package of its scheme (s3fs for s3://)"
    if isinstance(exc, PermissionError):
        return (
            f"access to {url!r} is denied ({_first_line(exc)}); check the credentials (e.g. AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE) in the environment of this process and of every worker"
        )
    if not isinstance(exc, (FileNotFoundError, KeyError, ValueError, TypeError)):
        # our own time limit (REMOTE_TIMEOUT), or the client's
        why = f"no answer within {REMOTE_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else _first_line(exc)
        return (
            f"cannot reach the object store of {url!r} ({why}); check its endpoint "
            "(AWS_ENDPOINT_URL), the network, and that the service is up"
        )
    import fsspec

    try:  # nothing found: which part of the URL is missing
        fs, root = fsspec.core.url_to_fs(url)
        bucket = fs._strip_protocol(root).split("/", 1)[0]
        if not fs.exists(bucket, timeout=REMOTE_TIMEOUT):
            return f"bucket {bucket!r} of {url!r} does not exist; check the URL, or create the bucket"
        if not fs.exists(root, timeout=REMOTE_TIMEOUT):
            return f"store {url!r} does not exist; check the URL, or create it with `pipeline ingest`"
    except Exception as again:  # noqa: BLE001 - denied or unreachable now: say so
        return _remote_failure(url, again) if not isinstance(again, (FileNotFoundError, ValueError)) else None
    return None


def _remote_exists(url: str) -> bool:
    """Whether anything is at ``url``, for a writer about to create it there: a missing bucket, an
    object store that refuses or cannot be reached is a :class:`StoreError` naming it, before any work."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root, timeout=REMOTE_TIMEOUT):
            return True
        bucket = fs._strip_protocol(root).split("/", 1)[0]
        bucket_there = fs.exists(bucket, timeout=REMOTE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - no package, denied, unreachable: one line each
        raise StoreError(_remote_failure(url, exc) or f"cannot write {url!r} ({_first_line(exc)})") from None
    if not bucket_there:
        raise StoreError(f"bucket {bucket!r} of {url!r} does not exist; check the URL, or create the bucket")
    return False


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    """Open the store at ``path`` (a local path or an fsspec URL such as ``s3://bucket/x.zarr``)."""
    spath = os.fspath(path)
    if not is_url(spath):
        local = _local(spath)
        if not os.path.exists(local):
            raise StoreError(f"store {spath!r} does not exist; create it with `pipeline ingest` or `pipeline synth`")
        target: Any = local
    else:
        target = spath
    try:
        if is_url(spath):  # an endpoint that takes connections but never answers must not hang the caller
            from zarr.api.asynchronous import open_group
            from zarr.core.sync import sync

            group = zarr.Group(sync(open_group(target, mode=mode), timeout=REMOTE_TIMEOUT))
        else:
            group = zarr.open_group(target, mode=mode)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        remote = _remote_failure(spath, exc) if is_url(spath) else None
        raise StoreError(
            remote
            or f"{spath!r} is not a pipeline store ({type(exc).__name__}: {exc}); create one with `pipeline ingest`"
        ) from None
    except Exception as exc:
        if type(exc).__name__ in ("GroupNotFoundError", "NodeTypeValidationError", "ContainsArrayError"):
            raise StoreError(f"{spath!r} is not a pipeline store; create one with `pipeline ingest`") from None
        remote = _remote_failure(spath, exc) if is_url(spath) else None
        if remote is None:
            raise
        raise StoreError(remote) from None
    version = group.attrs.get("format_version")
    if version is None and isinstance(group.attrs.get("writer"), Mapping):
        # an object store has no rename: its writer writes in place and adds format_version last
        w = group.attrs["writer"]
        raise StoreError(
            f"store {spath!r} is unfinished: its writer (process {w.get('pid')} on {w.get('host')}) stopped before "
            "completing it, or is still writing it; create it again with `pipeline ingest ... --force`"
        )
    if version is None:
        raise StoreError(
            f"{spath!r} is a Zarr group but not a pipeline store (no format_version); create one with `pipeline ingest`"
        )
    if int(version) > FORMAT_VERSION:
        raise StoreError(
            f"store {spath!r} has format_version {version}, newer than this pipeline's "
            f"{FORMAT_VERSION}; upgrade the pipeline package"
        )
    return Store(spath, group)


# --------------------------------------------------------------------------------------------
# Whether a store holds rows laid out like the ones a model was trained on
# --------------------------------------------------------------------------------------------


def layout_of(store: Store) -> dict[str, Any]:
    """What rows and labels mean in ``store``: the reference :func:`layout_mismatch` compares with."""
    return {
        "n_features": store.n_features,
        "feature_names": store.feature_names,
        "encodings": store.attrs.get("encodings") or [],
        "task": store.task,
        "classes": store.classes,
        "reading": source_reading(store),
    }


def source_reading(store: Any) -> dict[str, Any]:
    """How ingest read the text of ``store``'s source, where it recorded it: ``decimal_comma``
    (True: ``1,5`` was 1.5; False: commas were thousands separators; absent: no number had a
    comma), ``thousands_dot`` (with decimal commas, True: dots grouped thousands, ``1.234`` was
    1234; False or absent: dots were decimal points) and ``missing_values`` (the tokens that
    were missing values; absent: the default list)."""
    source = store.attrs.get("source") if isinstance(getattr(store, "attrs", None), Mapping) else None
    if not isinstance(source, Mapping):
        return {}
    return {k: source[k] for k in ("decimal_comma", "thousands_dot", "missing_values") if k in source}


def _reading_mismatch(ref: Mapping[str, Any], store: Any) -> str | None:
    """Whether ``store``'s numbers were read with another decimal mark than the reference's (a
    model's or a training store's, as :func:`layout_of` gives it): ``1,250`` is then 1.25 in one
    and 1250 in the other, in a numeric column no other check sees. A side that records no mark
    made no choice (its file had no comma numbers). Other missing-value tokens show as other
    encodings, fills or columns, which :func:`layout_mismatch` compares already."""
    want, have = (ref.get("reading") or {}), source_reading(store)
    if "decimal_comma" not in want or "decimal_comma" not in have:
        return None
    w, h = bool(want["decimal_comma"]), bool(have["decimal_comma"])
    marks = {True: "decimal commas (--decimal comma)", False: "commas as thousands separators (--decimal point)"}
    if w != h:
        return f"read its numbers with {marks[h]}, the training data with {marks[w]}"
    if w and "thousands_dot" in want and "thousands_dot" in have:
        wd, hd = bool(want["thousands_dot"]), bool(have["thousands_dot"])
        if wd != hd:
            dots = {True: "dots as thousands separators (1.234 is 1234)", False: "dots as decimal points"}
            return f"read its numbers with {dots[hd]}, the training data with {dots[wd]}"
    return None


def _generic_names(names: list[str]) -> bool:
    """Names spelled like the ones made up for unnamed columns (x0, x1, ... or f0, f1, ...):
    the guess :func:`names_made_up` falls back on for sources that record nothing about them."""
    return not names or names == [f"x{i}" for i in range(len(names))] or names == [f"f{i}" for i in range(len(names))]


# Sources whose columns have no names: the store's feature names were made up by the program.
_UNNAMED_SOURCES = frozenset({"synthetic", "npy", "npz", "idx"})
# Sources whose feature names are the columns' own (a CSV file's header, Parquet's schema).
_NAMED_SOURCES = frozenset({"csv", "parquet"})


def names_made_up(store: Any) -> bool:
    """Whether ``store``'s feature names were made up by the program rather than read from its
    source, decided from what the store records about its source (``attrs['source']['format']``:
    NumPy, IDX and synthetic data have no column names; CSV and Parquet columns have theirs, a
    headerless CSV file's generated ``c0, c1, ...`` included, which are compared as before), not
    from the names' spelling: a CSV header ``x0,x1,x2`` names real columns. Only a source that
    records nothing (an estimator's store, a store of an older version) is judged by spelling."""
    attrs = getattr(store, "attrs", None) or {}
    source = attrs.get("source")
    fmt = source.get("format") if isinstance(source, Mapping) else None
    if fmt in _UNNAMED_SOURCES:
        return True
    if fmt in _NAMED_SOURCES and attrs.get("feature_names"):
        return False
    return _generic_names(list(store.feature_names))


def _ref_names_made_up(ref: Mapping[str, Any], names: list[str]) -> bool:
    """:func:`names_made_up` for a reference layout: its recorded flag, else the names' spelling."""
    flag = ref.get("feature_names_generated")
    return _generic_names(names) if flag is None else bool(flag)


def _fill_mismatch(e: Mapping[str, Any], r: Mapping[str, Any], store: Any) -> str | None:
    """How column ``e`` of ``store`` was imputed differently from the reference encoding ``r``:
    its missing cells got another value (the store was ingested without ``--like``, with its
    own data's means or most frequent categories). None when the fills agree, when either side
    records none, or when the store imputed no cell of the column (per-column counts in
    ``attrs['source']['missing_imputed']``, which every table ingest records)."""
    if "fill" not in e or "fill" not in r or e.get("fill") is None or r.get("fill") is None:
        return None
    a, b = e.get("fill"), r.get("fill")
    if isinstance(a, int | float) and isinstance(b, int | float):
        same = float(a) == float(b) or abs(float(a) - float(b)) <= 1e-12 * max(abs(float(a)), abs(float(b)))
    else:
        same = str(a) == str(b)
    if same:
        return None
    attrs = getattr(store, "attrs", None) or {}
    source = attrs.get("source") if isinstance(attrs.get("source"), Mapping) else {}
    counts = source.get("missing_imputed")
    name = e.get("name")
    if not isinstance(counts, Mapping):  # not recorded: whether any cell was imputed is unknown
        return None
    n = int(counts.get(name) or 0)
    if not n:
        return None
    shown = (f"{a:.6g}", f"{b:.6g}") if isinstance(a, float) and isinstance(b, float) else (repr(a), repr(b))
    if shown[0] == shown[1]:
        shown = (repr(a), repr(b))
    return f"imputed {n:,} missing value(s) of column {name!r} with {shown[0]} instead of {shown[1]}"


def _short(items: list[Any], limit: int = 6) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def layout_mismatch(ref: Mapping[str, Any], store: Store, *, labels: bool) -> str | None:
    """How ``store``'s features (names, order, encodings) and, when ``labels``, its task and
    class list differ from ``ref`` (a model's or a training store's, as :func:`layout_of`
    gives it); None when they agree. Names the program made up (:func:`names_made_up`; a
    reference's ``feature_names_generated``) and absent encodings are not compared: they carry
    no meaning. A column whose missing cells the store imputed with another value than the
    reference's fill (:func:`_fill_mismatch`) differs too. Classes must be the same list in the same order (a store
    ingested with ``--like`` has the training store's whole list even when some classes have
    no rows), since labels are stored as indices into it."""
    if store.n_features != int(ref["n_features"]):
        return f"has {store.n_features} features, expected {ref['n_features']}"
    want, have = list(ref.get("feature_names") or []), list(store.feature_names)
    if not (_ref_names_made_up(ref, want) or names_made_up(store)) and want != have:
        if sorted(want) == sorted(have):
            j = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
            return f"has its features in another order (feature {j} is {have[j]!r}, expected {want[j]!r})"
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        return f"has features {_short(extra)} where {_short(missing)} are expected"
    ref_encs = {e.get("name"): e for e in ref.get("encodings") or [] if isinstance(e, Mapping)}
    for e in store.attrs.get("encodings") or []:
        r = ref_encs.get(e.get("name"))
        if r is None:
            continue
        if r.get("kind") != e.get("kind") or list(r.get("categories") or []) != list(e.get("categories") or []):
            what = f"{e.get('kind')} with categories {_short(list(e.get('categories') or []))}"
            expected = f"{r.get('kind')} with categories {_short(list(r.get('categories') or []))}"
            return f"encodes column {e.get('name')!r} as {what}, expected {expected}"
        fill = _fill_mismatch(e, r, store)
        if fill is not None:
            return fill
    reading = _reading_mismatch(ref, store)
    if reading is not None:
        return reading
    if labels:
        if store.task != ref.get("task"):
            return f"is a {store.task} store, expected {ref.get('task')}"
        want_c, have_c = ref.get("classes"), store.classes
        if want_c is not None and have_c is not None and list(want_c) != list(have_c):
            return f"has the classes [{_short(list(have_c))}], expected [{_short(list(want_c))}] in this order"
    return None


# --------------------------------------------------------------------------------------------
# What --force may replace, atomic replacement, stale temporaries
# --------------------------------------------------------------------------------------------

STORE_ENTRIES = frozenset({"zarr.json", "X", "y"})


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _group_attrs(path: Path) -> dict[str, Any] | None:
    """Attributes of the Zarr v3 group at ``path`` (None when it is not one)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return _attributes(meta)


def _attributes(meta: Any) -> dict[str, Any] | None:
    """The attributes in a Zarr v3 ``zarr.json`` document ``meta``, if it is a group's (else None)."""
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes")
    return attrs if isinstance(attrs, dict) else {}


def foreign_store_reason(dest: str | os.PathLike) -> str | None:
    """Why the existing ``dest`` is not a store this program wrote (None: it is one, or an
    empty directory, and ``force`` may replace it)."""
    spath = os.fspath(dest)
    if is_url(spath):
        import fsspec

        fs, root = fsspec.core.url_to_fs(spath)
        root = root.rstrip("/")
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)] if fs.isdir(root) else None
        if names is None:
            return "it is a file, not a store"
        if not names:
            return None
        extra = [n for n in names if n not in STORE_ENTRIES]
        if extra:
            return f"it holds {_listing(extra)}, which no store of this program holds"
        try:
            attrs = json.loads(fs.cat(f"{root}/zarr.json")).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            attrs = {}
        if "format_version" in attrs:
            return None
        if isinstance(attrs.get("writer"), Mapping):  # unfinished: its writer was killed, or still writes
            w = attrs["writer"]
            return (
                f"it is being written by process {w.get('pid')} on this host"
                if not _writer_gone(w) and (w.get("host") == socket.gethostname())
                else None
            )
        return "it is not a store written by this program"
    path = Path(_local(spath))
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is a file, not a store"
    names = os.listdir(path)
    if not names:
        return None
    extra = [n for n in names if n not in STORE_ENTRIES]
    if extra:
        return f"it holds {_listing(extra)}, which no store of this program holds"
    attrs = _group_attrs(path)
    if attrs is None or "format_version" not in attrs:
        return "it is not a store written by this program (no pipeline format_version in zarr.json)"
    return None


# What marks a directory as a Zarr store (v3, v2 group, v2 array).
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


def outermost_store(path: str | os.PathLike, *, itself: bool = True) -> Path | None:
    """The outermost Zarr store that the local ``path`` lies in (``itself``: or is), resolved;
    None when none (an array lies in its group: the group is the one named)."""
    real = Path(os.path.realpath(path))
    stores = [d for d in ((real,) if itself else ()) + tuple(real.parents) if store_marker(d)]
    return stores[-1] if stores else None


def store_marker(directory: Path) -> str | None:
    """The Zarr marker file ``directory`` holds (it is a store), or None."""
    return next((m for m in ZARR_MARKERS if os.path.lexists(directory / m)), None)


def for_workers(path: str | os.PathLike) -> str:
    """``path`` as the driver sends it to workers: a local path made absolute (a worker process
    resolves a relative one from its own working directory, another machine's or the one it
    started in, not the driver's); a URL as it is."""
    s = os.fspath(path)
    return s if is_url(s) else os.path.abspath(_local(s))


def store_identity(path: str) -> tuple:
    """What tells the store at ``path`` apart from another, or from an earlier store at the same
    path: a local store's absolute path, its directory's inode and its metadata's modification
    time (a store is committed by renaming a new directory into place, so re-creating one changes
    both); a URL is itself. A process that keeps stores open looks them up by this key."""
    if is_url(path):
        return (path,)
    local = os.path.abspath(_local(path))
    try:
        d = os.stat(local)
        marker = store_marker(Path(local))
        m = os.stat(os.path.join(local, marker)).st_mtime_ns if marker else 0
    except OSError:
        return (local,)
    return (local, d.st_dev, d.st_ino, m)


def unwritable_reason(dest: str | os.PathLike) -> tuple[Path, str | None]:
    """Where a local output ``dest`` would be created (its nearest existing ancestor directory)
    and why no entry can be made there, or None when one can: probed with a directory made and
    removed at once, so nothing is left behind and no missing parent is created."""
    import tempfile

    anc = Path(_local(dest)).absolute().parent
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return anc, os.strerror(errno.ENOTDIR)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{Path(dest).name}.probe-", dir=anc))
    except OSError as exc:
        return anc, exc.strerror or type(exc).__name__
    return anc, None


def empty_local_dir(dest: str | os.PathLike) -> bool:
    """Whether ``dest`` is an existing empty local directory, not a symbolic link, that is neither
    the working directory nor one of its parents (replacing it would leave the command's
    working directory deleted)."""
    spath = os.fspath(dest)
    if is_url(spath):
        return False
    local = Path(_local(spath))
    try:
        if local.is_symlink() or not local.is_dir() or any(local.iterdir()):
            return False
    except OSError:
        return False
    real, here = os.path.realpath(local), os.path.realpath(os.getcwd())
    return not (here == real or here.startswith(real.rstrip(os.sep) + os.sep))


def check_replaceable(dest: str | os.PathLike, force: bool, what: str = "store") -> None:
    """Refuse an existing ``dest`` unless ``force`` is given and it is a store this program wrote."""
    spath = os.fspath(dest)
    if is_url(spath):
        exists = _remote_exists(spath)
    else:
        local = Path(_local(spath))
        exists = local.exists() or local.is_symlink()
    if not exists:
        return
    reason = foreign_store_reason(spath)
    if reason is not None:
        raise StoreError(
            f"{spath!r} exists and {reason}; --force replaces only a {what} written by pipeline: "
            "choose another destination"
        )
    if not force:
        raise StoreError(f"{what} {spath!r} exists; pass --force to overwrite")


def check_not_inside(dest: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse a local ``dest`` that is, or contains, one of the ``inputs`` (label -> path):
    writing it would replace the input."""
    spath = os.fspath(dest)
    if is_url(spath):
        return
    d = os.path.realpath(_local(spath))
    for label, p in inputs.items():
        if p is None or is_url(os.fspath(p)):
            continue
        q = os.path.realpath(_local(os.fspath(p)))
        if q == d or q.startswith(d.rstrip(os.sep) + os.sep):
            where = "is" if q == d else "contains"
            raise StoreError(
                f"destination {spath!r} {where} the {label} {os.fspath(p)!r}; writing it would destroy "
                f"the {label}: choose another destination"
            )


def _host_digest() -> str:
    """Six hex digits naming this host in the name of a store set aside (a host name may hold dashes)."""
    import hashlib

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _aside_re(name: str) -> re.Pattern[str]:
    """The name :func:`replace_dir` gives ``name`` set aside: ``.NAME.old-TOKEN-HOST-PID-START``,
    TOKEN that of the ``NAME.tmp-TOKEN`` replacing it, HOST, PID and START those of the writer."""
    return re.compile(rf"\.{re.escape(name)}\.old-([0-9a-f]{{8}})-([0-9a-f]{{6}})-(\d+)-(\d*)")


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished directory ``tmp`` to ``dest``, replacing what is there: the old
    ``dest`` is renamed aside first and removed only once ``tmp`` is in place (put back if the
    move fails), so ``dest`` is at every moment either the old or the new one, never a mix. The
    name set aside records ``tmp`` and this process, so that if it is killed between the two
    renames or before the removal, the next writer to ``dest`` can finish the replacement
    (:func:`finish_interrupted_replace`)."""
    dest = Path(dest)
    aside = None
    if dest.exists() or dest.is_symlink():
        m = re.search(r"\.tmp-([0-9a-f]{8})$", Path(tmp).name)
        token = m.group(1) if m else uuid.uuid4().hex[:8]
        me = writer_marker()
        aside = dest.with_name(f".{dest.name}.old-{token}-{_host_digest()}-{me['pid']}-{me['started']}")
        os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if aside is not None:
            os.replace(aside, dest)
        raise
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or None when no
    such process runs; "" when running but the start time is unknown (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def writer_marker() -> dict[str, Any]:
    """Who writes a temporary store: host, process id and its start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid) or ""}


def _writer_gone(marker: Any) -> bool:
    if not isinstance(marker, dict) or marker.get("host") != socket.gethostname():
        return False  # another host's writer, or no record: not ours to judge
    try:
        pid = int(marker["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    now = _start_time(pid)
    return now is None or bool(now and marker.get("started") and now != marker["started"])


def clean_stale_temps(dest: str | os.PathLike) -> list[str]:
    """Remove ``DEST.tmp-*`` directories left by writers of this program that are no longer
    running (killed ingests); returns what was removed. A temporary without this program's
    writer record, or whose writer still runs or ran on another host, is left alone."""
    dest = Path(os.path.abspath(_local(os.fspath(dest))))
    removed = []
    try:
        siblings = list(dest.parent.glob(f"{glob.escape(dest.name)}.tmp-*"))
    except OSError:
        return removed
    for p in siblings:
        if p.is_symlink() or not p.is_dir():
            continue
        attrs = _group_attrs(p)
        if attrs is None or set(os.listdir(p)) - STORE_ENTRIES:
            continue
        if _writer_gone(attrs.get("writer")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def clean_stale_remote_temps(fs: Any, dest: str) -> list[str]:
    """Remove ``DEST.tmp-*`` prefixes of an object store (``fs``, ``dest`` its path there) left by
    writers of this program that are no longer running: a writer replacing a store writes its
    new one beside it, and a writer killed before it copied that over ``dest`` leaves it behind.
    As :func:`clean_stale_temps` on a local disk, only a temporary holding nothing but a store's
    entries, whose writer record names this host and a process that has ended, is removed."""
    removed = []
    try:
        fs.invalidate_cache()
        siblings = fs.glob(f"{glob.escape(dest.rstrip('/'))}.tmp-*")
    except Exception:  # noqa: BLE001 - best effort: an unlistable prefix is left as it is
        return removed
    for p in siblings:
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if not re.search(r"\.tmp-[0-9a-f]{8}$", name):
            continue
        try:
            entries = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)}
            meta = json.loads(fs.cat(f"{p.rstrip('/')}/zarr.json"))
        except Exception:  # noqa: BLE001 - not a store's group: not ours to judge
            continue
        attrs = _attributes(meta)
        if attrs is None or entries - STORE_ENTRIES:
            continue
        if _writer_gone(attrs.get("writer")):
            try:
                fs.rm(p, recursive=True)
            except Exception:  # noqa: BLE001 - best effort: the next writer tries again
                continue
            removed.append(p)
    return removed


def _our_store(path: Path) -> bool:
    """Whether ``path`` is a directory holding a store this program wrote, or nothing."""
    if path.is_symlink() or not path.is_dir():
        return False
    return foreign_store_reason(path) is None


def finish_interrupted_replace(dest: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """Finish replacing the local store ``dest`` where a writer killed in :func:`replace_dir` left
    it, as that writer would have: the old store set aside (``.DEST.old-*``) is removed when
    ``dest`` is in place; when ``dest`` is missing (killed between the two renames), the finished
    new store (``DEST.tmp-*``) is moved into place and the old one removed, or, with no finished
    new store, the old one is put back. Only stores this program wrote, set aside by a writer of
    this host that is no longer running, are touched. Returns what was done (one sentence each)
    and the other stores set aside (by an earlier version of this program, on another host, or
    left partly removed), which are left as they are."""
    local = Path(os.path.abspath(_local(os.fspath(dest))))
    done: list[str] = []
    left: list[Path] = []
    try:
        asides = sorted(local.parent.glob(f".{glob.escape(local.name)}.old-*"))
    except OSError:
        return done, left
    pattern = _aside_re(local.name)
    for aside in asides:
        m = pattern.fullmatch(aside.name)
        if m is None or not _our_store(aside) or m.group(2) != _host_digest():
            left.append(aside)
            continue
        token, _host, pid, started = m.groups()
        if not _writer_gone({"host": socket.gethostname(), "pid": pid, "started": started}):
            continue  # its writer is replacing the store right now
        if local.exists() or local.is_symlink():
            shutil.rmtree(aside)
            done.append(
                f"removed {str(aside)!r}, the old store left by a replacement of {str(local)!r} that was stopped "
                "after putting the new store in place"
            )
            continue
        new = local.with_name(f"{local.name}.tmp-{token}")
        attrs = _group_attrs(new) if _our_store(new) else None
        if attrs is not None and "format_version" in attrs and "writer" not in attrs:  # committed
            os.replace(new, local)
            shutil.rmtree(aside)
            done.append(
                f"moved the finished store {str(new)!r} to {str(local)!r} and removed the old one, completing "
                "a replacement that was stopped midway"
            )
        else:
            os.replace(aside, local)
            done.append(
                f"put the store {str(local)!r} back from {str(aside)!r}, where a replacement that was stopped left it"
            )
    return done, left


class StoreWriter:
    """Appends rows to a new store in chunk-aligned writes; see :func:`create_store`.

    Use as a context manager: a clean exit commits (attributes, rename into place); an exception
    or KeyboardInterrupt removes everything written.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        n_features: int,
        *,
        y_shape_tail: tuple[int, ...] = (),
        x_dtype: Any,
        y_dtype: Any,
        chunk_rows: int | None = None,
        codec: str | None = None,
        force: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.dest = os.fspath(dest)
        self.url = is_url(self.dest)
        codec = codec or DEFAULT_CODEC
        if codec not in CODECS:
            raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        self.codec = codec
        self.force = bool(force)
        x_dtype = np.dtype(x_dtype)
        y_dtype = np.dtype(y_dtype)
        self.n_features = int(n_features)
        self.chunk_rows = int(chunk_rows or default_chunk_rows(self.n_features * x_dtype.itemsize))
        if self.chunk_rows <= 0:
            raise StoreError(f"--chunk-rows must be positive, got {chunk_rows}")
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.n_rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._done = False
        self._swapping = False  # copying a finished store over the one at a URL dest
        if self.url:
            import fsspec

            self._fs, self._fs_path = fsspec.core.url_to_fs(self.dest)
            check_replaceable(self.dest, force)
            clean_stale_remote_temps(self._fs, self._fs_path)  # those of writers killed while replacing dest
            # Object stores have no rename. A new store is written in place: readers take it for
            # a store only once commit adds format_version. One replacing a store is written
            # beside it and copied over it at commit, so a writer that fails leaves the old one whole.
            replacing = _remote_exists(self.dest)
            self.tmp = f"{self.dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}" if replacing else self.dest
            self._tmp_path = self._fs_path.rstrip("/") + self.tmp[len(self.dest.rstrip("/")) :]
        else:
            local = Path(os.path.abspath(_local(self.dest)))
            if not local.name or local.parent == local:
                raise StoreError(f"{self.dest!r} cannot hold a store; name a directory such as data.zarr")
            finish_interrupted_replace(local)  # an earlier writer's replacement of dest, killed midway
            check_replaceable(self.dest, force)
            local.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(local)
            self.tmp = str(local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}"))
        try:
            # the writer's record lets a later writer remove this temporary if the process dies
            self.group = zarr.open_group(self.tmp, mode="w", attributes={"writer": writer_marker()})
            # write_empty_chunks: every chunk is stored, so an absent one means damage (see Store)
            self.X = self.group.create_array(
                "X",
                shape=(0, self.n_features),
                chunks=(self.chunk_rows, self.n_features),
                dtype=x_dtype,
                compressors=_compressors(codec, x_dtype.itemsize),
                fill_value=0,
                config={"write_empty_chunks": True},
            )
            self.y = self.group.create_array(
                "y",
                shape=(0, *y_shape_tail),
                chunks=(self.chunk_rows, *y_shape_tail),
                dtype=y_dtype,
                compressors=_compressors(codec, y_dtype.itemsize),
                fill_value=0,
                config={"write_empty_chunks": True},
            )
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit_result = self.commit()
        else:
            self.abort()

    def append(self, X: np.ndarray, y: np.ndarray) -> None:
        """Queue rows; whole chunks are written as soon as they are complete."""
        if len(X) != len(y):
            raise StoreError(f"internal: {len(X)} rows of X but {len(y)} of y")
        if len(X) == 0:
            return
        self._pending.append((X, y))
        self._pending_rows += len(X)
        if self._pending_rows >= self.chunk_rows:
            try:
                self._flush(final=False)
            except Exception as exc:
                if (err := self._remote_write_error(exc)) is exc:
                    raise
                raise err from exc

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        X = np.concatenate([p[0] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][0]
        y = np.concatenate([p[1] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][1]
        n = len(X) if final else (len(X) // self.chunk_rows) * self.chunk_rows
        if n:
            a, b = self.n_rows, self.n_rows + n
            self.X.resize((b, self.n_features))
            self.y.resize((b, *self.y.shape[1:]))
            self.X[a:b] = X[:n]
            self.y[a:b] = y[:n]
            self.n_rows = b
        rest = len(X) - n
        self._pending = [(X[n:], y[n:])] if rest else []
        self._pending_rows = rest

    def commit(self) -> Store:
        """Write the last partial chunk and the attributes, then move the store into place."""
        if self._done:
            raise StoreError("internal: store already committed")
        try:
            self._flush(final=True)
            attrs = {
                "format_version": FORMAT_VERSION,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "codec": self.codec,
                **self.attrs,
                "n_rows": self.n_rows,
                "chunk_rows": self.chunk_rows,
                "all_chunks_written": True,
            }
            # one write: a store written in place is unfinished (writer) or complete, never neither
            kept = {k: v for k, v in self.group.attrs.asdict().items() if k != "writer"}
            self.group.attrs.put({**kept, **_jsonable(attrs)})
            if self.url and self.tmp != self.dest:
                self._copy_over_dest()
            if not self.url:
                local = Path(os.path.abspath(_local(self.dest)))
                if local.exists() or local.is_symlink():
                    reason = foreign_store_reason(local)  # it may have changed while writing
                    if reason is not None:
                        raise StoreError(
                            f"{self.dest!r} changed while the store was written and {reason}; "
                            "it was left as it is: choose another destination"
                        )
                    if not self.force:
                        raise StoreError(f"store {self.dest!r} appeared while writing; pass --force to overwrite")
                replace_dir(self.tmp, local)
        except BaseException as exc:
            self.abort()
            if not isinstance(exc, Exception) or (err := self._remote_write_error(exc)) is exc:
                raise
            raise err from exc
        self._done = True
        return open_store(self.dest)

    def _remote_write_error(self, exc: Exception) -> Exception:
        """``exc`` as it is, or, for a store on an object store that failed to take a write (down,
        refusing, denying), a :class:`StoreError` saying so in one line and what is left."""
        if not self.url or isinstance(exc, (PipelineError, ValueError, TypeError, MemoryError)):
            return exc
        if self._swapping:
            left = f"it is unfinished now, and the new store is whole at {self.tmp!r}"
        elif self.tmp != self.dest:
            left = "the store there is as it was"
        else:
            left = "nothing was kept"
        return StoreError(
            f"writing the store {self.dest!r} failed ({_first_line(exc)}); {left}: check the endpoint "
            "(AWS_ENDPOINT_URL), the network and the credentials, then run the command again with --force"
        )

    def _copy_over_dest(self) -> None:
        """Replace the store at the URL ``dest`` by the finished one written beside it. The
        destination's group metadata is first made that of an unfinished store (a writer record,
        no format_version), so that while its arrays are swapped a reader refuses it as unfinished
        and ``--force`` may replace it; the finished metadata is copied last, the temporary removed."""
        fs, src, dst = self._fs, self._tmp_path, self._fs_path.rstrip("/")
        fs.invalidate_cache()
        reason = foreign_store_reason(self.dest) if fs.exists(dst) else None  # it may have changed meanwhile
        if reason is not None:
            raise StoreError(
                f"{self.dest!r} changed while the store was written and {reason}; it was left as it is: "
                "choose another destination"
            )
        meta = json.loads(fs.cat(f"{src}/zarr.json"))
        self._swapping = True  # from here on a failure leaves dest unfinished: the new store is kept
        fs.pipe(f"{dst}/zarr.json", json.dumps({**meta, "attributes": {"writer": writer_marker()}}).encode())
        for name in ("X", "y"):
            if fs.exists(f"{dst}/{name}"):
                fs.rm(f"{dst}/{name}", recursive=True)
        files = [f for f in fs.find(src) if f != f"{src}/zarr.json"]
        fs.copy(files, [dst + f[len(src) :] for f in files])
        fs.copy(f"{src}/zarr.json", f"{dst}/zarr.json")
        self._swapping = False
        fs.rm(src, recursive=True)
        fs.invalidate_cache()

    def abort(self) -> None:
        """Remove everything written so far."""
        self._done = True
        if self.url and self._swapping:
            return  # dest is unfinished: the finished new store stays where it was written
        if self.url:
            try:
                self._fs.invalidate_cache(self._tmp_path)
                if self._fs.exists(self._tmp_path):
                    self._fs.rm(self._tmp_path, recursive=True)
            except Exception:  # noqa: BLE001 - best effort on object stores
                pass
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def create_store(
    dest: str | os.PathLike,
    n_features: int,
    *,
    y_shape_tail: tuple[int, ...] = (),
    x_dtype: Any,
    y_dtype: Any,
    chunk_rows: int | None = None,
    codec: str | None = None,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> StoreWriter:
    """A :class:`StoreWriter` for a new store at ``dest``; refuses an existing one without force.

    ``codec``: "none", "lz4" (blosc) or "zstd" (level 1); None means :data:`DEFAULT_CODEC`.
    ``chunk_rows``: None means :func:`default_chunk_rows` of the row size.
    """
    return StoreWriter(
        dest,
        n_features,
        y_shape_tail=y_shape_tail,
        x_dtype=x_dtype,
        y_dtype=y_dtype,
        chunk_rows=chunk_rows,
        codec=codec,
        force=force,
        attrs=attrs,
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def verify_store(store: Store | str) -> list[str]:
    """Read every chunk of ``X`` and ``y``; one message per bad chunk (empty list: all good).
    A chunk is bad when it fails its checksum or cannot be decoded, or, in a store that records
    writing every chunk, when it is absent (Zarr would read it as zeros)."""
    st = store if isinstance(store, Store) else open_store(store)
    bad = []
    for i in range(st.n_chunks):
        sl = st.chunk_slice(i)
        for name in ("X", "y"):
            try:
                st._read(name, sl, i)
            except StoreError as exc:
                bad.append(str(exc))
    return bad


def bytes_on_disk(store: Store) -> int | None:
    """Total bytes of the store's files (local stores; None elsewhere)."""
    if is_url(store.path):
        return None
    total = 0
    for root, _dirs, files in os.walk(_local(store.path)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def describe(store: Store) -> dict[str, Any]:
    """What ``pipeline inspect`` shows: shape, dtype, chunks, codecs, size, classes, statistics."""
    a = store.attrs
    info: dict[str, Any] = {
        "path": store.path,
        "format_version": a.get("format_version"),
        "rows": store.n_rows,
        "features": store.n_features,
        "task": store.task,
        "X": {"shape": list(store.X.shape), "dtype": str(store.X.dtype), "chunks": list(store.X.chunks)},
        "y": {"shape": list(store.y.shape), "dtype": str(store.y.dtype), "chunks": list(store.y.chunks)},
        "n_chunks": store.n_chunks,
        "codec": a.get("codec"),
        "codecs": [type(c).__name__ for c in (*store.X.compressors,)],
        "bytes_on_disk": bytes_on_disk(store),
        "bytes_uncompressed": int(store.X.nbytes + store.y.nbytes),
        "created": a.get("created"),
        "source": a.get("source"),
    }
    target = a.get("target") or {}
    if store.task == "classification":
        counts = target.get("class_counts") or []
        info["classes"] = {str(c): int(n) for c, n in zip(store.classes or [], counts, strict=False)}
    else:
        info["target"] = {"name": target.get("name"), "mean": target.get("mean"), "std": target.get("std")}
    info["features_stats"] = [
        {"name": n, "mean": float(m), "std": float(s)}
        for n, m, s in zip(store.feature_names, store.mean, store.std, strict=False)
    ]
    info["encodings"] = [
        {k: v for k, v in e.items() if k != "categories"}
        | ({"categories": len(e["categories"])} if "categories" in e else {})
        for e in a.get("encodings") or []
    ]
    return info
