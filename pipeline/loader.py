"""Chunk-aware shuffled minibatch stream over a store, with bounded prefetch.

One epoch:

1. the units (row chunks, or row ranges given by the caller) are put in a new random order seeded
   by ``(seed, epoch)``;
2. a background thread reads them in that order, at most ``prefetch`` units ahead, through a
   bounded queue (``queue.Queue(maxsize=prefetch)``): memory never holds "everything ready";
3. rows go into a shuffle pool of about ``buffer_chunks`` units (the WebDataset / tf.data shuffle
   buffer); each batch takes ``batch_size`` rows at random from the pool, the holes are filled from
   the pool's tail, and a new unit is added when the pool drops below its size. Every row is
   emitted exactly once per epoch and the stream is reproducible from ``(seed, epoch, units)``;
4. each batch is converted from the store's compact dtype to float32 (and standardized with the
   store's mean/std, or the ``mean``/``std`` given, a model's for evaluation) only then,
   so uint8 pixels are read and buffered as uint8; gathering,
   converting, standardizing and refilling the pool's holes is one ``nogil`` Numba pass per
   batch (:mod:`kernels.rows`, checked bit for bit against the NumPy expressions).

With ``shuffle=False`` units come in order and rows in order (evaluation, prediction).

Validation rows held out of a training store (:func:`held_out_rows`) are dropped from each unit
as it is read (``holdout``, training) or kept alone (evaluation): both read whole row ranges.
A loader over given row ids (``rows``: a simulated client's rows, :mod:`pipeline.partition`) reads
the chunks holding them and keeps only those rows of each, the same way.

A training loader given a :class:`RowCache` whose bound admits the whole store keeps each chunk's
rows (decoded, compact dtype, without the held-out rows) after their first read and serves its
units from them in later epochs: the same rows in the same order, so the same batches, without
reading and decompressing the store again, and without a reader thread once every unit of the
epoch is kept (nothing to read ahead). A store over the bound streams every epoch.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.store import Store, open_store

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def held_out_rows(store: Store, chunk: int, fraction: float, seed: int) -> np.ndarray:
    """The rows of row chunk ``chunk`` held out for validation (sorted, absolute indices).

    Every chunk holds out its share of ``fraction`` (rounded so that the store as a whole holds
    out ``round(fraction * n_rows)`` rows), one row drawn at random, by ``seed``, from each of
    that many equal strata of the chunk: the validation rows are spread over the whole store
    and over every part of each chunk, whatever order the rows are in (class-sorted rows give
    every class), and training and validation read the same whole chunks."""
    sl = store.chunk_slice(chunk)
    start, stop = sl.start, min(sl.stop, store.n_rows)
    n = stop - start
    k = int(math.floor(fraction * stop + 0.5) - math.floor(fraction * start + 0.5))
    if n <= 0 or k <= 0:
        return np.empty(0, np.int64)
    k = min(k, n)
    j = np.arange(k + 1, dtype=np.int64)
    edges = j * n // k
    rng = np.random.default_rng([int(seed), 7919, int(chunk)])
    return start + rng.integers(edges[:-1], edges[1:])


def held_out_mask(store: Store, start: int, stop: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of rows ``start:stop``: True where the row is held out for validation."""
    mask = np.zeros(max(0, stop - start), bool)
    if stop <= start or fraction <= 0:
        return mask
    for c in range(start // store.chunk_rows, (stop - 1) // store.chunk_rows + 1):
        rows = held_out_rows(store, c, fraction, seed)
        rows = rows[(rows >= start) & (rows < stop)]
        mask[rows - start] = True
    return mask


def _select(store: Store, a: int, b: int, holdout: dict | None, rows: np.ndarray | None = None) -> np.ndarray | None:
    """The rows of ``a:b`` a loader with ``holdout`` (and ``rows``, sorted ids) keeps (a
    boolean mask), or None for all."""
    keep = None
    if rows is not None:
        keep = np.zeros(b - a, bool)
        keep[rows[np.searchsorted(rows, a) : np.searchsorted(rows, b)] - a] = True
    if not holdout:
        return keep
    mask = held_out_mask(store, a, b, holdout["fraction"], holdout["seed"])
    mask = mask if holdout.get("keep") == "validation" else ~mask
    return mask if keep is None else mask & keep


def unit_read_bytes(store: Store, a: int, b: int) -> int:
    """Bytes reading rows ``a:b`` takes at its peak: the whole chunks they span, decoded (a
    store decodes whole chunks), and the rows copied out of them."""
    if b <= a:
        return 0
    row = row_bytes(store)
    c0, c1 = a // store.chunk_rows, (b - 1) // store.chunk_rows
    span = min(store.n_rows, (c1 + 1) * store.chunk_rows) - c0 * store.chunk_rows
    return (span + (b - a)) * row


def row_bytes(store: Store) -> int:
    """Bytes of one row as the loader holds it (features and targets in the store's dtypes)."""
    y_row = int(np.prod(store.y.shape[1:], dtype=np.int64)) * store.y.dtype.itemsize
    return store.n_features * store.X.dtype.itemsize + y_row


def buffer_bytes(
    store: Store,
    units: Sequence[tuple[int, int]],
    *,
    batch_size: int,
    buffer_chunks: int,
    prefetch: int,
    shuffle: bool = True,
    certain: bool = False,
) -> int:
    """The most bytes an epoch of a loader over ``units`` holds in its buffers at once (reading
    from the store, not from a :class:`RowCache`): the shuffle pool (``buffer_chunks`` of its
    largest units and one more; without ``shuffle`` a unit carried over), the units read ahead
    (``prefetch``), the one being read (:func:`unit_read_bytes`) and the one being put into the
    pool. ``certain``: only what every epoch over them surely holds at once (the rows the pool
    fills up to, and the largest unit's read), a lower bound of its peak."""
    units = [(int(a), int(b)) for a, b in units if b > a]
    if not units:
        return 0
    row = row_bytes(store)
    max_unit = max(b - a for a, b in units)
    rows = sum(b - a for a, b in units)
    read = max(unit_read_bytes(store, a, b) for a, b in units)
    fill = max(buffer_chunks * max_unit, batch_size) if shuffle else max_unit
    if certain:
        return min(rows, fill) * row + read
    return (fill + max_unit) * row + read + (prefetch + 1) * max_unit * row


class RowCache:
    """Row chunks of stores kept in memory after their first read: decoded, in the store's
    compact dtype, without the rows a loader's ``holdout`` skips. A training run whose store
    fits reads and decompresses each chunk once instead of every epoch.

    Entries are whole chunks (Zarr decodes whole chunks anyway, and a sync epoch cuts its
    shares' row ranges differently every epoch), keyed by ``scope`` (a worker's job), the
    store's path, the chunk and the held-out selection; past ``max_bytes`` the least recently
    used are dropped. A loader uses the cache only when the whole store would fit
    (:meth:`admits`): a store larger than the bound streams every epoch rather than evicting
    chunks it is about to need again. Thread-safe; two threads missing the same chunk at once
    both read it. The kept arrays are never written: the loader copies units into its pool."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reads = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes kept now."""
        return self._bytes

    @staticmethod
    def store_bytes(store: Store) -> int:
        """What keeping all of ``store``'s rows takes (features, targets and each row's id)."""
        return store.n_rows * (row_bytes(store) + 8)

    def admits(self, store: Store) -> bool:
        """Whether the whole of ``store`` fits under the bound."""
        return 0 < self.store_bytes(store) <= self.max_bytes

    def resize(self, max_bytes: int) -> None:
        """A new bound; entries over it are dropped, least recently used first."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def forget(self, scope: Any) -> None:
        """Drop the entries of ``scope`` (a finished job's)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == scope]:
                self._bytes -= sum(a.nbytes for a in self._entries.pop(key))

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, (X, y, ids) = self._entries.popitem(last=False)
            self._bytes -= X.nbytes + y.nbytes + ids.nbytes

    @staticmethod
    def _key(scope: Any, store: Store, c: int, holdout: dict | None) -> tuple:
        return (scope, str(store.path), int(c), None if holdout is None else tuple(sorted(holdout.items())))

    def holds(self, scope: Any, store: Store, units: Sequence[tuple[int, int]], holdout: dict | None) -> bool:
        """Whether every chunk of ``units`` is kept now (an epoch over them reads nothing)."""
        with self._lock:
            return all(
                self._key(scope, store, c, holdout) in self._entries
                for a, b in units
                if b > a
                for c in range(a // store.chunk_rows, (b - 1) // store.chunk_rows + 1)
            )

    def _chunk(self, scope: Any, store: Store, c: int, holdout: dict | None) -> tuple[np.ndarray, ...]:
        key = self._key(scope, store, c, holdout)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        sl = store.chunk_slice(int(c))
        X, y = store.read_rows(sl.start, sl.stop)
        ids = np.arange(sl.start, sl.stop, dtype=np.int64)
        keep = _select(store, sl.start, sl.stop, holdout)
        if keep is not None:
            X, y, ids = X[keep], y[keep], ids[keep]
        entry = (X, y, ids)
        with self._lock:
            self.reads += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= sum(a.nbytes for a in old)
            self._entries[key] = entry
            self._bytes += X.nbytes + y.nbytes + ids.nbytes
            self._evict()
        return entry

    def unit(self, scope: Any, store: Store, a: int, b: int, holdout: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows of ``a:b`` (features, targets), in order, as a loader reading them
        would have them: views of the kept chunk when ``a:b`` lies in one chunk."""
        parts = []
        for c in range(a // store.chunk_rows, (b - 1) // store.chunk_rows + 1):
            X, y, ids = self._chunk(scope, store, c, holdout)
            lo, hi = np.searchsorted(ids, a), np.searchsorted(ids, b)
            parts.append((X[lo:hi], y[lo:hi]))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _reader(
    store: Store,
    units: list[tuple[int, int]],
    q: queue.Queue,
    stop: threading.Event,
    holdout: dict | None = None,
    labels: bool = True,
    rows: np.ndarray | None = None,
    cache: tuple[RowCache, Any] | None = None,
) -> None:
    """Read ``units`` in order into ``q``; stops when ``stop`` is set. Runs in its own thread."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for a, b in units:
            if stop.is_set():
                return
            if cache is not None:
                X, y = cache[0].unit(cache[1], store, a, b, holdout)
                if not len(X):
                    continue
            else:
                X, y = store.read_rows(a, b, labels)
                keep = _select(store, a, b, holdout, rows)
                if keep is not None:
                    if not keep.any():
                        continue
                    X, y = X[keep], y[keep]
            if not put((X, y)):
                return
        put(_END)
    except BaseException as exc:  # noqa: BLE001 - propagated to the consumer, which re-raises it
        put(_Failure(exc))


class ChunkLoader:
    """Shuffled minibatches ``(X float32 (b, n_features), y)`` of a store's rows."""

    def __init__(
        self,
        store: Store | str,
        chunks: Sequence[int] | None = None,
        *,
        ranges: Sequence[tuple[int, int]] | None = None,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        prefetch: int = 2,
        normalize: bool = True,
        drop_last: bool = False,
        mean: Any = None,
        std: Any = None,
        holdout: dict | None = None,
        labels: bool = True,
        rows: Any = None,
        cache: RowCache | None = None,
        cache_scope: Any = None,
    ) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        if sum(x is not None for x in (chunks, ranges, rows)) > 1:
            raise ValueError("pass one of chunks, ranges and rows")
        # ``rows``: sorted row ids (a simulated client's); each unit is a chunk holding some
        self.rows: np.ndarray | None = None
        if rows is not None:
            ids = np.unique(np.asarray(rows, dtype=np.int64))
            if len(ids) and not 0 <= ids[0] <= ids[-1] < self.store.n_rows:
                raise ValueError(f"row ids outside the store's {self.store.n_rows} rows")
            self.rows = ids
            chunks = np.unique(ids // self.store.chunk_rows).tolist()
        if ranges is not None:
            units = [(int(a), int(b)) for a, b in ranges]
            for a, b in units:
                if not 0 <= a <= b <= self.store.n_rows:
                    raise ValueError(f"row range {a}:{b} outside the store's {self.store.n_rows} rows")
        else:
            ids = range(self.store.n_chunks) if chunks is None else chunks
            units = []
            for i in ids:
                sl = self.store.chunk_slice(int(i))
                units.append((sl.start, sl.stop))
        self.units = [u for u in units if u[1] > u[0]]
        if batch_size <= 0 or prefetch <= 0 or buffer_chunks <= 0:
            raise ValueError("batch_size, prefetch and buffer_chunks must be positive")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.buffer_chunks = int(buffer_chunks)
        self.prefetch = int(prefetch)
        self.normalize = bool(normalize)
        self.drop_last = bool(drop_last)
        self.labels = bool(labels)  # False: y is never read (prediction); zeros stand in for it
        # ``holdout`` ({"fraction", "seed", "keep": "train" | "validation"}): of each unit, only
        # the rows held out for validation (see held_out_rows), or only the others
        self.holdout = dict(holdout) if holdout else None
        if self.holdout:
            self.n_rows = sum(int(_select(self.store, a, b, self.holdout, self.rows).sum()) for a, b in self.units)
        elif self.rows is not None:
            self.n_rows = len(self.rows)
        else:
            self.n_rows = sum(b - a for a, b in self.units)
        self.read_seconds = 0.0
        # ``cache``: the store's chunks kept between epochs (RowCache) when the whole store fits;
        # ``cache_scope`` parts the entries of different runs (a worker's jobs)
        self._cache: tuple[RowCache, Any] | None = None
        if cache is not None and self.rows is None and self.labels and cache.admits(self.store):
            self._cache = (cache, cache_scope)
        from kernels import rows  # numba: loaded with the first loader, not with this module

        self._take_rows, self._draw_rows = rows.take_rows, rows.draw_rows
        n_features = self.store.n_features
        if self.normalize:
            # a model's own statistics when given (evaluation, prediction), else the store's
            m = np.asarray(self.store.mean if mean is None else mean, dtype=np.float64).reshape(-1)
            s = np.asarray(self.store.std if std is None else std, dtype=np.float64).reshape(-1)
            if len(m) != n_features or len(s) != n_features:
                raise ValueError(f"mean/std of {len(m)}/{len(s)} features for a store of {n_features}")
            s = np.where(s > 0, s, 1.0)
            self._mean = np.ascontiguousarray(m, dtype=np.float32)
            self._inv_std = np.ascontiguousarray(1.0 / s, dtype=np.float32)
        else:  # (x - 0) * 1 is x exactly: one code path
            self._mean = np.zeros(n_features, np.float32)
            self._inv_std = np.ones(n_features, np.float32)
        # regression targets as stored (float64 since ingest keeps them so): standardized later
        # in float64 (pipeline.loop.prepare_targets), not rounded to float32 before
        self._y_dtype = np.int32 if self.store.task == "classification" else np.float64
        self._threads: list[tuple[threading.Thread, threading.Event, queue.Queue]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every prefetch thread this loader started."""
        for thread, stop, q in self._threads:
            stop.set()
            while True:  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=10)
        self._threads = []

    def __enter__(self) -> ChunkLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing can be reported from a finalizer
            pass

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n_rows // self.batch_size
        return -(-self.n_rows // self.batch_size)

    # -- the stream -------------------------------------------------------------------------------

    def _take(self, X: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (standardized) copy of rows ``rows`` of ``X`` and their targets: one nogil pass."""
        return self._take_rows(X, y, rows, self._mean, self._inv_std, self._y_dtype)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of one epoch; every row of the unit subset exactly once."""
        order = list(self.units)
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.shuffle:
            order = [order[i] for i in rng.permutation(len(order))]
        if self._cache is not None and self._cache[0].holds(self._cache[1], self.store, order, self.holdout):
            # every unit is kept decoded: nothing to read ahead, so no reader thread to hand
            # the units over (on a busy core each hand-over waits for a thread to be scheduled)
            kept = (self._cache[0].unit(self._cache[1], self.store, a, b, self.holdout) for a, b in order)
            yield from self._batches(((X, y) for X, y in kept if len(X)), rng)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=_reader,
            args=(self.store, order, q, stop, self.holdout, self.labels, self.rows, self._cache),
            name="chunk-loader-prefetch",
            daemon=True,
        )
        entry = (thread, stop, q)
        self._threads.append(entry)
        thread.start()

        def units() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.read_seconds += time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
                # not kept while waiting for the next unit: the pool holds a copy of its rows
                item = None

        try:
            yield from self._batches(units(), rng)
        finally:
            stop.set()
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=10)
            if entry in self._threads:
                self._threads.remove(entry)

    def _batches(self, units: Iterator[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> Iterator:
        """The minibatches cut from a stream of units: through the shuffle buffer, or in order."""
        return self._shuffled(units, rng) if self.shuffle else self._sequential(units)

    def _sequential(self, units: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator:
        bs = self.batch_size
        carry_X: np.ndarray | None = None
        carry_y: np.ndarray | None = None
        for X, y in units:
            if carry_X is not None:
                X = np.concatenate([carry_X, X])
                y = np.concatenate([carry_y, y])
                carry_X = carry_y = None
            n_full = (len(X) // bs) * bs
            for a in range(0, n_full, bs):
                yield self._take(X, y, np.arange(a, a + bs))
            if n_full < len(X):
                carry_X, carry_y = X[n_full:], y[n_full:]
        if carry_X is not None and len(carry_X) and not self.drop_last:
            yield self._take(carry_X, carry_y, np.arange(len(carry_X)))

    def _shuffled(self, units: Iterator[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> Iterator:
        bs = self.batch_size
        max_unit = max((b - a for a, b in self.units), default=0)
        fill = max(self.buffer_chunks * max_unit, bs)
        pool_X: np.ndarray | None = None
        pool_y: np.ndarray | None = None
        n = 0
        it = iter(units)
        exhausted = False
        while True:
            while not exhausted and n < fill:
                try:
                    X, y = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if pool_X is None:
                    pool_X = np.empty((fill + max_unit, *X.shape[1:]), X.dtype)
                    pool_y = np.empty((fill + max_unit, *y.shape[1:]), y.dtype)
                m = len(X)
                pool_X[n : n + m] = X
                pool_y[n : n + m] = y
                n += m
                X = y = None  # copied into the pool: not kept while the next unit is read
            if exhausted:
                break
            # steady state: pool holds >= fill rows; take one random batch, refill holes from the tail
            sel = np.sort(rng.choice(n, size=bs, replace=False))
            batch = self._draw_rows(pool_X, pool_y, n, sel, self._mean, self._inv_std, self._y_dtype)
            n -= bs
            yield batch
        if n:
            perm = rng.permutation(n)
            stop = (n // bs) * bs if self.drop_last else n
            for a in range(0, stop, bs):
                idx = perm[a : a + bs]
                yield self._take(pool_X, pool_y, idx)
