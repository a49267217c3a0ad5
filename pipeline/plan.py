"""Epoch planning: which rows each training task reads, which rows validate, how sync shares split.

A pure function of the store's layout, the configuration and the cluster's thread count
(:func:`plan_epochs`, returning an :class:`EpochPlan`), and of the plan, the epoch and the
workers (:func:`epoch_work`, the epoch's tasks in submission order). Nothing here needs a
cluster: ``tests/pipeline/test_plan.py`` checks the decisions directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.config import TrainConfig
from pipeline.store import Store

Ranges = list[tuple[int, int]]

VAL_RANGE_ROWS = 1 << 16  # rows per validation range (and per evaluation task)


def row_ranges(store: Store, max_rows: int) -> Ranges:
    """The store's row chunks, each cut into equal parts of at most ``max_rows`` rows."""
    out: Ranges = []
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        start, stop = sl.start, min(sl.stop, store.n_rows)
        parts = max(1, math.ceil((stop - start) / max_rows))
        edges = np.linspace(start, stop, parts + 1).round().astype(int)
        out.extend((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a)
    return out


def held_out_count(store: Store, fraction: float, seed: int, ranges: Ranges | None = None) -> int:
    """How many rows of ``ranges`` (default: the whole store) are held out for validation."""
    from pipeline.loader import held_out_mask, held_out_rows

    if fraction <= 0:
        return 0
    if ranges is None:
        return sum(len(held_out_rows(store, c, fraction, seed)) for c in range(store.n_chunks))
    return sum(int(held_out_mask(store, a, b, fraction, seed).sum()) for a, b in ranges)


def group_ranges(ranges: Ranges, rows_per_task: int) -> list[Ranges]:
    """Consecutive ranges grouped into tasks of about ``rows_per_task`` rows."""
    tasks: list[Ranges] = []
    cur: Ranges = []
    rows = 0
    for a, b in ranges:
        if cur and rows + (b - a) > rows_per_task:
            tasks.append(cur)
            cur, rows = [], 0
        cur.append((a, b))
        rows += b - a
    if cur:
        tasks.append(cur)
    return tasks


def split_rows(ranges: Ranges, parts: int) -> list[Ranges]:
    """``ranges`` cut into ``parts`` consecutive pieces of (nearly) equal row counts."""
    total = sum(b - a for a, b in ranges)
    bounds = [total * k // parts for k in range(parts + 1)]
    out: list[Ranges] = [[] for _ in range(parts)]
    offset = 0
    for a, b in ranges:
        for k in range(parts):
            lo, hi = max(a, a + bounds[k] - offset), min(b, a + bounds[k + 1] - offset)
            if hi > lo:
                out[k].append((lo, hi))
        offset += b - a
    return out


def default_rows_per_task(n_rows: int, n_threads: int, cfg: TrainConfig) -> int:
    """About four tasks per worker thread per epoch, never fewer rows than two pushes' worth,
    and at most 2**18 rows (a few seconds of work) so that a lost task loses little. Full batch
    (``batch_size = 0``): one task per worker thread, since every task is one gradient step."""
    if cfg.batch_size == 0:
        return max(1, math.ceil(n_rows / max(1, n_threads)))
    per_push = cfg.batch_size * cfg.local_steps
    want = math.ceil(n_rows / max(1, 4 * n_threads))
    return int(min(max(want, 2 * per_push), 1 << 18))


def train_flops_per_row(spec: dict) -> int:
    """Multiply-adds x 2 of one training step per row: forward, and backward for the inputs'
    and the weights' gradients (3 products per layer)."""
    sizes = [spec["n_in"], *spec["hidden"], spec["n_out"]]
    return 6 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def n_sync_shares(rows: int, spec: dict, n_slots: int, min_share_gflop: float) -> int:
    """How many sync shares train an epoch of ``rows``: one per worker thread (``n_slots``), but
    no more than leave each share ``min_share_gflop`` of training per epoch (at least one).
    Local SGD over more shares needs more epochs; on a small store that costs more than the
    shares save per epoch."""
    if min_share_gflop <= 0:
        return max(1, n_slots)
    gflop = rows * train_flops_per_row(spec) / 1e9
    return max(1, min(n_slots, int(gflop // min_share_gflop)))


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch of a run trains and validates on.

    ``tasks`` are groups of row ranges (one training task each, before sync shares regroup
    them), ``val_ranges`` the ranges evaluation reads (of the validation store,
    or of the training store whose held-out rows they select), ``train_rows`` the rows left
    to train on, ``sync_shares`` how many shares a sync epoch over ``n_threads`` threads splits
    into (0 unless sync), ``rounds_per_epoch`` the server's rounds an epoch takes (what a
    cosine schedule counts), ``warning`` a message for the user (or empty)."""

    tasks: list[Ranges]
    val_ranges: Ranges
    rows_per_task: int
    n_rows: int
    train_rows: int
    held_out: int
    n_threads: int
    sync_shares: int
    rounds_per_epoch: int
    warning: str = ""

    def task_rows(self, ranges: Ranges) -> int:
        """About how many training rows ``ranges`` hold (validation rows held out in every chunk
        are skipped by the tasks, about the same share of every range)."""
        rows = sum(b - a for a, b in ranges)
        return round(rows * self.train_rows / self.n_rows) if self.n_rows else rows


def plan_epochs(
    store: Store, cfg: TrainConfig, n_threads: int, spec: dict, val_store: Store | None = None
) -> EpochPlan:
    """The plan of a run of ``cfg`` on ``store`` over ``n_threads`` worker threads, for the model
    ``spec``; ``val_store`` is the opened ``cfg.validation_store`` (None: validation rows, if
    any, are held out of ``store``). Raises StoreError when no row is left to train on."""
    from pipeline.errors import StoreError

    rows_per_task = cfg.rows_per_task or default_rows_per_task(store.n_rows, n_threads, cfg)
    train = row_ranges(store, rows_per_task)
    held, warning = 0, ""
    if val_store is not None:
        val = row_ranges(val_store, VAL_RANGE_ROWS)
    elif cfg.validation > 0:
        # rows held out in every chunk (pipeline.loader.held_out_rows): the tasks read whole
        # ranges and keep the training rows; validation reads the same chunks for the others
        held = held_out_count(store, cfg.validation, cfg.seed)
        val = row_ranges(store, VAL_RANGE_ROWS) if held else []
        if not held:
            warning = (
                f"warning: validation = {cfg.validation:g} of {store.n_rows:,} rows holds out no "
                "row; early stopping and the saved model follow the training loss (set "
                "validation_store, or validation = 0 to say so)"
            )
    else:
        val = []
    train_rows = store.n_rows - held
    if not train or train_rows <= 0:
        raise StoreError(f"store {store.path!r} has no rows to train on")
    tasks = group_ranges(train, rows_per_task)
    shares = 0
    if cfg.mode == "sync":
        shares = n_sync_shares(train_rows, spec, n_threads, cfg.min_share_gflop)
    plan = EpochPlan(tasks, val, rows_per_task, store.n_rows, train_rows, held, n_threads, shares, 0, warning)
    # the server's rounds per epoch (a cosine schedule spans epochs x these): one per push of
    # every task (async, ssp), but in sync mode one per push of the largest share, since every
    # round combines one delta of each share; full batch (batch_size 0): one push per task
    groups = split_rows([r for t in tasks for r in t], shares) if shares else tasks
    pushes = [math.ceil(plan.task_rows(t) / cfg.batch_size / cfg.local_steps) if cfg.batch_size else 1 for t in groups]
    rounds = max(pushes, default=0) if shares else sum(pushes)
    return EpochPlan(
        tasks,
        val,
        rows_per_task,
        store.n_rows,
        train_rows,
        held,
        n_threads,
        shares,
        rounds,
        warning,
    )


class Work(NamedTuple):
    """One training task of an epoch: its name, its row ranges, the workers it must run on
    (None: any)."""

    name: str
    ranges: Ranges
    workers: list[str] | None


def task_order(n_tasks: int, seed: int, epoch: int) -> list[int]:
    """The order an epoch submits its tasks in (a permutation, reproducible per seed and epoch)."""
    rng = np.random.default_rng([seed, epoch, 104729])
    return [int(i) for i in rng.permutation(n_tasks)]


def epoch_work(
    plan: EpochPlan, cfg: TrainConfig, epoch: int, threads: dict[str, int], spec: dict, slots: int = 0
) -> list[Work]:
    """The training tasks of ``epoch`` of the model ``spec`` on workers with ``threads``
    threads each, in submission order: the plan's tasks (async, ssp), or one share per worker
    thread (sync; ``slots``, if given, is the thread count to split over instead: an epoch
    resumed after some of its rounds keeps the split it started with, whose positions the
    server holds by share). Empty shares are left out. No task is pinned to a worker: a task pinned,
    even loosely, to a worker that has died sits in Dask's no-worker state and is not
    rescheduled when a new worker joins (federated runs route by site resource instead,
    pipeline.federated)."""
    tasks = plan.tasks
    order = task_order(len(tasks), cfg.seed, epoch)
    if cfg.mode != "sync":
        return [Work(f"e{epoch}-t{j}", tasks[j], None) for j in order]
    # one participant per worker thread, each with a fixed share of the ranges: equal row
    # counts, not whole tasks: the shares meet at every sync round, so an epoch lasts as long
    # as its largest share (tasks are whole chunks or equal parts of one: 15 chunk tasks over
    # 2 shares would make one 14% larger)
    n = n_sync_shares(plan.train_rows, spec, slots or sum(threads.values()), cfg.min_share_gflop)
    shares = split_rows([r for j in order for r in tasks[j]], n)
    return [Work(f"e{epoch}-s{k}", share, None) for k, share in enumerate(shares) if share]
