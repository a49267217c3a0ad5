"""Simulated clients: a partition of one store's training rows into row-index views.

Kinds (``PARTITIONS``):

- ``iid``: the training rows in a random order cut into ``n_clients`` near-equal parts (sizes
  differ by at most one row);
- ``dirichlet``: for each class ``c`` the clients' shares ``p_c ~ Dirichlet(alpha, ..., alpha)``
  are drawn, and client ``k`` gets ``round(n_c * p_c[k])`` of the class's rows (largest-remainder
  rounding, so the counts add up to ``n_c``); smaller ``alpha`` = more skew. A draw that leaves a
  client with fewer than ``min_rows`` rows is drawn again (up to 100 times);
- ``classes``: each client holds ``classes`` distinct labels, chosen so that every label with
  rows is held by as equal a number of clients as possible; a label's rows are split in
  near-equal parts among the clients holding it (rows of a label no client holds, when
  ``n_clients * classes`` is below the number of labels, are left out: ``meta["unassigned"]``);
- ``column``: one client per distinct value of a feature column (a numeric or ordinal column,
  or a one-hot encoded column named as it was ingested), clients in the order of the sorted
  values (``meta["values"]``). The values must be integers (ids, codes): a column with
  fractional values is refused, since every distinct float would become a client.

Which rows of a class (or of the whole store, ``iid``) go to which client is drawn uniformly at
random among the assignments with those counts, by ``seed``: the same store and seed give the
same partition, byte for byte.

Out of core: two passes over ``y`` (or the column), one chunk at a time. The first counts the
rows of each class (value); the counts per class and client, hence each client's size, follow
from them, so the second pass writes each client's rows straight to their place in
``rows.npy`` (a memory-mapped file), in increasing order. Memory beyond one chunk: the
``(n_groups, n_clients)`` count matrices and one cursor per client (``n_groups`` = classes,
column values, or 1). The partition is written beside ``out`` and renamed into place when
complete, so an interrupted run leaves no half-written partition.

Layout of ``out``::

    meta.json     kind, n_clients, seed, alpha, classes, column, exclude_held_out, min_rows,
                  store (path), store_rows and store_key (:func:`store_key`: the rows it was
                  made for), rows (assigned), unassigned, values (column)
    offsets.npy   (n_clients + 1,) int64: client k's rows are rows[offsets[k]:offsets[k + 1]]
    rows.npy      (n_assigned,) int64 row ids of the store, sorted within each client
    counts.npy    (n_groups, n_clients) int64: rows of each class (value; 1 group for iid) per client
    shares.npy    dirichlet only: (n_classes, n_clients) float64, the drawn proportions
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StoreError
from pipeline.loader import held_out_mask
from pipeline.store import Store, open_store, read_rows_at, replace_dir

PARTITIONS = ("iid", "dirichlet", "classes", "column")
PARTITION_FILES = frozenset({"meta.json", "offsets.npy", "rows.npy", "counts.npy", "shares.npy"})
_DIRICHLET_TRIES = 100


class Partition:
    """An opened partition directory (see the module docstring): ``rows(k)``, ``sizes()``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        where = Path(self.path)
        try:
            self.meta: dict[str, Any] = json.loads((where / "meta.json").read_text())
            self.offsets = np.load(where / "offsets.npy")
            self._rows = np.load(where / "rows.npy", mmap_mode="r") if self.offsets[-1] else np.empty(0, np.int64)
            self.counts = np.load(where / "counts.npy")
        except (OSError, ValueError, IndexError) as exc:
            raise StoreError(
                f"{self.path!r} is not a readable partition ({type(exc).__name__}); remove it so that it is recomputed"
            ) from None
        self.kind: str = str(self.meta.get("kind"))
        self.n_clients: int = int(self.meta.get("n_clients", -1))
        if (
            self.kind not in PARTITIONS
            or self.offsets.shape != (self.n_clients + 1,)
            or self.offsets[0] != 0
            or np.any(np.diff(self.offsets) < 0)
            or len(self._rows) != self.offsets[-1]
        ):
            raise StoreError(
                f"partition {self.path!r} is damaged (its files disagree); remove it so that it is recomputed"
            )

    def __repr__(self) -> str:
        return f"Partition({self.path!r}, kind={self.kind}, clients={self.n_clients}, rows={int(self.offsets[-1])})"

    def rows(self, k: int) -> np.ndarray:
        """Client ``k``'s row ids (sorted int64, a copy)."""
        if not 0 <= k < self.n_clients:
            raise IndexError(f"client {k} does not exist; the partition has {self.n_clients} clients")
        return np.array(self._rows[self.offsets[k] : self.offsets[k + 1]], dtype=np.int64)

    def sizes(self) -> np.ndarray:
        """Rows per client, ``(n_clients,)`` int64."""
        return np.diff(self.offsets)

    def class_counts(self, store: Store) -> np.ndarray:
        """``(n_clients, n_classes)`` rows of each class per client, counted from ``store``'s
        labels (read chunk by chunk). Holds one int32 owner per store row while counting."""
        if store.task != "classification":
            raise StoreError(f"store {store.path!r} is a {store.task} store: it has no classes to count")
        n_classes = len(store.classes or []) or int(self.meta.get("n_classes", 0))
        owner = np.full(store.n_rows, -1, np.int32)
        for k in range(self.n_clients):
            owner[self._rows[self.offsets[k] : self.offsets[k + 1]]] = k
        out = np.zeros((self.n_clients, n_classes), np.int64)
        for c in range(store.n_chunks):
            sl = store.chunk_slice(c)
            own = owner[sl]
            mine = own >= 0
            if mine.any():
                y = store._read("y", sl, c)[mine].astype(np.int64)
                np.add.at(out, (own[mine], y), 1)
        return out

    def read(self, store: Store, k: int, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``X`` and ``y`` of client ``k``'s rows (:func:`pipeline.store.read_rows_at`)."""
        return read_rows_at(store, self.rows(k), labels)

    def mismatch(
        self,
        store: Store,
        n_clients: int,
        kind: str,
        *,
        alpha: float = 0.5,
        classes: int = 2,
        column: str = "",
        seed: int = 0,
        exclude_held_out: tuple[float, int] | None = None,
    ) -> str | None:
        """How this partition differs from the one these arguments would make (None: the same):
        its settings, e.g. to refuse resuming a run with another partition, then the rows it was
        made for (:meth:`stale_for`)."""
        want = _meta_args(store, n_clients, kind, alpha, classes, column, seed, exclude_held_out)
        for key, value in want.items():
            if key in _STORE_KEYS:
                continue
            if key == "n_clients" and not value and kind == "column":
                continue  # 0: as many clients as the column has values
            if self.meta.get(key) != value:
                return f"its {key} is {self.meta.get(key)!r}, not {value!r}"
        return self.stale_for(store)

    def stale_for(self, store: Store) -> str | None:
        """Why this partition is not one of ``store``'s rows as they are now (None: it is): made
        for another store, or for the store at that path before it was written again (its
        :func:`store_key` differs, even with as many rows), or by an earlier version that did
        not record the key. Such a partition is never used: it is made again."""
        path = _store_path(store)
        if self.meta.get("store") != path:
            return f"was made for the store {self.meta.get('store')!r}, not {path!r}"
        rows = self.meta.get("store_rows")
        if rows != store.n_rows:
            return f"was made for {rows!r} rows of {path!r}, which now has {store.n_rows:,}"
        key = self.meta.get("store_key")
        if key is None:
            return f"does not record which rows of {path!r} it was made for (an earlier version made it)"
        if key != store_key(store):
            return f"was made for other rows of {path!r} (the store was written again since)"
        return None


def _store_path(store: Store) -> str:
    """The store's path as a partition records it (a local one absolute)."""
    return store.path if "://" in store.path else os.path.abspath(store.path)


# the keys of a partition's meta.json that say which store (and which rows of it) it was made for
_STORE_KEYS = ("store", "store_rows", "store_key")


def store_key(store: Store) -> str:
    """A fingerprint of ``store``'s rows as written: a digest of its attributes, which say when
    and from what it was written (``created``, ``source``: a file's MD5, a synthetic store's
    seed), its row count, chunking, statistics and classes. A store written again at the same
    path, even with as many rows, has another; the same store, opened again, the same."""
    text = json.dumps(store.attrs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_partition(path: str | os.PathLike) -> Partition:
    """Open the partition written by :func:`make_partition` at ``path``."""
    if not Path(path, "meta.json").is_file():
        raise StoreError(f"{os.fspath(path)!r} holds no partition (no meta.json); compute one with make_partition")
    return Partition(path)


def _meta_args(
    store: Store,
    n_clients: int,
    kind: str,
    alpha: float,
    classes: int,
    column: str,
    seed: int,
    exclude_held_out: tuple[float, int] | None,
) -> dict[str, Any]:
    """What a partition records of its arguments (what a resume compares)."""
    path = _store_path(store)
    held = None if exclude_held_out is None else [float(exclude_held_out[0]), int(exclude_held_out[1])]
    return {
        "kind": kind,
        "n_clients": int(n_clients),
        "seed": int(seed),
        "alpha": float(alpha) if kind == "dirichlet" else None,
        "classes": int(classes) if kind == "classes" else None,
        "column": column if kind == "column" else None,
        "exclude_held_out": held,
        "store": path,
        "store_rows": int(store.n_rows),
    }


# ----------------------------------------------------------------------------------------------
# groups: what a row's class (or column value) is, one chunk at a time


class _Column:
    """Reads a feature column (or a one-hot group of columns) of a chunk as integer values."""

    def __init__(self, store: Store, column: str) -> None:
        self.name = column
        self.categories: list[Any] | None = None
        names = store.feature_names
        encodings = {e.get("name"): e for e in store.attrs.get("encodings") or [] if isinstance(e, Mapping)}
        enc = encodings.get(column)
        if enc is not None and enc.get("kind") == "onehot":
            self.cols = slice(int(enc["offset"]), int(enc["offset"]) + len(enc["categories"]))
            self.categories = list(enc["categories"])
            self.onehot = True
        elif column in names:
            j = names.index(column)
            self.cols = slice(j, j + 1)
            self.onehot = False
            if enc is not None and enc.get("kind") == "ordinal":
                self.categories = list(enc["categories"])
        else:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ConfigError(
                f"partition_column {column!r} is not a column of store {store.path!r}; its columns: {shown}"
            )

    def values(self, X: np.ndarray) -> np.ndarray:
        part = X[:, self.cols]
        if self.onehot:
            return np.argmax(part, axis=1).astype(np.int64)
        v = part[:, 0]
        if v.dtype.kind == "f":
            bad = ~np.isfinite(v) | (v != np.round(v))
            if bad.any():
                raise ConfigError(
                    f"partition_column {self.name!r} holds non-integer values (e.g. {v[bad][0]!r}); "
                    "partition by a categorical or integer id column"
                )
        return v.astype(np.int64)

    def label(self, value: int) -> Any:
        if self.categories is not None and 0 <= value < len(self.categories):
            return self.categories[value]
        return int(value)


def _chunks(
    store: Store, exclude_held_out: tuple[float, int] | None, column: _Column | None, labels: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per chunk: the absolute ids of its training rows and their group values (class labels,
    column values; zeros without ``labels``, when nothing is read)."""
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        if column is None and not labels:
            vals = np.zeros(sl.stop - sl.start, np.int64)
        elif column is None:
            vals = store._read("y", sl, c).astype(np.int64)
        else:
            vals = column.values(store._read("X", sl, c))
        ids = np.arange(sl.start, sl.stop, dtype=np.int64)
        if exclude_held_out is not None and exclude_held_out[0] > 0:
            keep = ~held_out_mask(store, sl.start, sl.stop, float(exclude_held_out[0]), int(exclude_held_out[1]))
            ids, vals = ids[keep], vals[keep]
        yield ids, vals


# ----------------------------------------------------------------------------------------------
# counts per group and client


def near_equal(n: int, parts: int) -> np.ndarray:
    """``n`` split into ``parts`` counts differing by at most one (the larger ones first)."""
    base = np.full(parts, n // parts, np.int64)
    base[: n % parts] += 1
    return base


def round_shares(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * shares`` (largest-remainder rounding):
    each count is within one row of ``n * shares[k]``."""
    exact = n * np.asarray(shares, np.float64) / max(float(np.sum(shares)), 1e-300)
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _dirichlet_counts(
    group_rows: np.ndarray, n_clients: int, alpha: float, seed: int, min_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(seed), 1])
    for _ in range(_DIRICHLET_TRIES):
        shares = rng.dirichlet(np.full(n_clients, alpha), size=len(group_rows))
        counts = np.stack([round_shares(int(n), s) for n, s in zip(group_rows, shares, strict=True)])
        if counts.sum(0).min() >= min_rows:
            return counts, shares
    raise ConfigError(
        f"partition_alpha = {alpha} leaves some of the {n_clients} clients with fewer than {min_rows} rows in "
        f"{_DIRICHLET_TRIES} draws; raise partition_alpha or lower clients"
    )


def _classes_counts(group_rows: np.ndarray, n_clients: int, classes: int, seed: int) -> np.ndarray:
    """Each client ``classes`` distinct labels, the least-held ones first (ties at random);
    each label's rows in near-equal parts among its holders."""
    rng = np.random.default_rng([int(seed), 2])
    present = np.flatnonzero(group_rows > 0)
    holders = np.zeros(len(group_rows), np.int64)
    held = np.zeros((len(group_rows), n_clients), bool)
    for k in range(n_clients):
        tie = rng.random(len(present))
        pick = present[np.lexsort((tie, holders[present]))[:classes]]
        held[pick, k] = True
        holders[pick] += 1
    counts = np.zeros((len(group_rows), n_clients), np.int64)
    for c in present:
        who = np.flatnonzero(held[c])
        if len(who):
            counts[c, rng.permutation(who)] = near_equal(int(group_rows[c]), len(who))
    return counts


# ----------------------------------------------------------------------------------------------
# the partition


def make_partition(
    store: Store | str,
    n_clients: int,
    kind: str,
    *,
    alpha: float = 0.5,
    classes: int = 2,
    column: str = "",
    seed: int = 0,
    exclude_held_out: tuple[float, int] | None = None,
    out: str | os.PathLike,
    min_rows: int = 1,
    force: bool = False,
) -> Partition:
    """Partition ``store``'s training rows among ``n_clients`` clients (module docstring) into
    the directory ``out`` and open it. ``exclude_held_out = (fraction, seed)``: the rows the
    loader holds out for validation (:func:`pipeline.loader.held_out_mask`) are never assigned.
    ``column``: ``n_clients = 0`` takes the number of clients from the column's values.
    An existing ``out`` is refused unless ``force`` (and it is a partition)."""
    st = store if isinstance(store, Store) else open_store(store)
    if kind not in PARTITIONS:
        raise ConfigError(f"unknown partition {kind!r}; use one of {', '.join(PARTITIONS)}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 0:
        raise ConfigError(f"clients must be an int >= 1, got {n_clients!r}")
    if n_clients == 0 and kind != "column":
        raise ConfigError("clients must be >= 1 (0 = one client per value applies only to partition = 'column')")
    if kind == "dirichlet" and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"partition_alpha must be a number > 0, got {alpha!r}")
    if kind == "classes" and (isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1):
        raise ConfigError(f"partition_classes must be an int >= 1, got {classes!r}")
    if kind == "column" and not column:
        raise ConfigError("partition = 'column' needs partition_column, the column whose value names the client")
    if kind in ("dirichlet", "classes") and st.task != "classification":
        raise ConfigError(f"partition = {kind!r} splits by class; store {st.path!r} is a {st.task} store: use iid")
    if exclude_held_out is not None and not 0 <= float(exclude_held_out[0]) < 1:
        raise ConfigError(f"the held-out fraction must be in [0, 1), got {exclude_held_out[0]!r}")
    n_classes = len(st.classes or [])
    if kind == "classes" and classes > n_classes:
        raise ConfigError(f"partition_classes = {classes} is more than the store's {n_classes} classes; lower it")
    dest = Path(os.path.abspath(os.fspath(out)))
    _check_out(dest, force)
    col = _Column(st, column) if kind == "column" else None

    # pass 1: rows per group (class, column value)
    if col is None:
        n_groups = max(1, n_classes)
        group_rows = np.zeros(n_groups, np.int64)
        for _ids, vals in _chunks(st, exclude_held_out, None, labels=kind != "iid"):
            if kind != "iid":
                group_rows += np.bincount(vals, minlength=n_groups)[:n_groups]
            else:
                group_rows[0] += len(vals)
        values: np.ndarray | None = None
    else:
        seen: dict[int, int] = {}
        for _ids, vals in _chunks(st, exclude_held_out, col):
            u, cnt = np.unique(vals, return_counts=True)
            for v, n in zip(u.tolist(), cnt.tolist(), strict=True):
                seen[v] = seen.get(v, 0) + n
        values = np.array(sorted(seen), np.int64)
        group_rows = np.array([seen[v] for v in values.tolist()], np.int64)
        if n_clients and n_clients != len(values):
            raise ConfigError(
                f"partition_column {column!r} has {len(values)} distinct values in the training rows but clients = "
                f"{n_clients}; set clients = {len(values)} or 0"
            )
        n_clients = len(values)
    n_train = int(group_rows.sum())
    if n_clients > n_train:
        raise ConfigError(f"clients = {n_clients} is more than the store's {n_train} training rows; lower clients")

    shares = None
    if kind == "iid":
        counts = near_equal(n_train, n_clients)[None, :]
    elif kind == "dirichlet":
        counts, shares = _dirichlet_counts(group_rows, n_clients, float(alpha), seed, int(min_rows))
    elif kind == "classes":
        counts = _classes_counts(group_rows, n_clients, int(classes), seed)
    else:
        counts = np.diag(group_rows)

    meta = _meta_args(st, n_clients, kind, alpha, classes, column, seed, exclude_held_out)
    meta |= {"min_rows": int(min_rows), "n_classes": n_classes, "rows": int(counts.sum()), "store_key": store_key(st)}
    meta["unassigned"] = n_train - meta["rows"]
    if col is not None and values is not None:
        meta["values"] = [col.label(int(v)) for v in values.tolist()]

    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write(st, tmp, counts, values, exclude_held_out, col, seed)
        np.save(tmp / "counts.npy", counts)
        if shares is not None:
            np.save(tmp / "shares.npy", shares)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, dest)  # an old partition (force) is set aside until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Partition(dest)


def _check_out(dest: Path, force: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        return
    if dest.is_symlink() or not dest.is_dir() or set(os.listdir(dest)) - PARTITION_FILES:
        raise StoreError(f"{str(dest)!r} exists and is not a partition; choose another directory")
    if not force:
        raise StoreError(f"partition {str(dest)!r} exists; pass force=True to recompute it")


def _write(
    st: Store,
    tmp: Path,
    counts: np.ndarray,
    values: np.ndarray | None,
    exclude_held_out: tuple[float, int] | None,
    col: _Column | None,
    seed: int,
) -> None:
    """Pass 2: deal each chunk's rows out to the clients and write them to ``rows.npy``."""
    n_groups, n_clients = counts.shape
    sizes = counts.sum(0)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    np.save(tmp / "offsets.npy", offsets)
    total = int(offsets[-1])
    if not total:
        np.save(tmp / "rows.npy", np.empty(0, np.int64))
        return
    rows = np.lib.format.open_memmap(tmp / "rows.npy", mode="w+", dtype=np.int64, shape=(total,))
    cursor = offsets[:-1].copy()
    remaining = counts.copy()
    rng = np.random.default_rng([int(seed), 3])
    single = n_groups == 1 and col is None  # iid: every row is of the one group
    for ids, vals in _chunks(st, exclude_held_out, col, labels=not single):
        if not len(ids):
            continue
        groups = np.zeros(len(ids), np.int64) if single else vals
        if values is not None:
            groups = np.searchsorted(values, vals)
        owner = np.full(len(ids), -1, np.int64)
        for g in np.unique(groups).tolist():
            at = np.flatnonzero(groups == g)
            left = remaining[g]
            n_left = int(left.sum())
            if n_left == 0:
                continue  # a label no client holds (partition "classes")
            m = len(at)
            if m > n_left:
                raise StoreError(f"store {st.path!r} changed while it was partitioned; partition it again")
            draw = left.copy() if m == n_left else rng.multivariate_hypergeometric(left, m, method="marginals")
            who = np.repeat(np.arange(n_clients, dtype=np.int64), draw)
            rng.shuffle(who)
            owner[at] = who
            left -= draw
        mine = owner >= 0
        owner, ids = owner[mine], ids[mine]
        order = np.argsort(owner, kind="stable")  # ids ascend within each client
        owner, ids = owner[order], ids[order]
        starts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
        run = np.diff(np.concatenate([starts, [len(owner)]]))
        first = np.repeat(starts, run)
        pos = cursor[owner] + (np.arange(len(owner)) - first)
        rows[pos] = ids
        cursor[owner[starts]] += run
    if not np.array_equal(cursor, offsets[1:]):
        raise StoreError(f"store {st.path!r} changed while it was partitioned; partition it again")
    rows.flush()
    del rows
