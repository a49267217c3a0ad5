"""Epoch planning and early stopping, checked directly: no cluster, no training."""

from __future__ import annotations

import math

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import StoreError
from pipeline.plan import epoch_work, plan_epochs, task_order
from pipeline.runstate import EarlyStopping
from pipeline.store import Store
from pipeline.train import build_spec


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    from pipeline.synth import synth

    return synth(
        tmp_path_factory.mktemp("plan") / "s.zarr",
        rows=2000,
        features=5,
        classes=3,
        chunk_rows=300,
        seed=0,
    )


def _rows(ranges) -> list[int]:
    return [i for a, b in ranges for i in range(a, b)]


def _plan(store: Store, n_threads: int = 4, val_store: Store | None = None, **kw):
    cfg = TrainConfig(**kw)
    spec, _ = build_spec(store, cfg)
    return plan_epochs(store, cfg, n_threads, spec, val_store), cfg, spec


def test_tasks_cover_every_row_once_in_groups_of_rows_per_task(store):
    plan, cfg, _ = _plan(store, mode="async", rows_per_task=250, validation=0.1, batch_size=16, local_steps=2)
    assert _rows([r for t in plan.tasks for r in t]) == list(range(store.n_rows))
    # a chunk of 300 rows is cut into equal parts of at most 250 rows, then grouped
    assert all(b - a <= 250 for t in plan.tasks for a, b in t)
    assert all(sum(b - a for a, b in t) <= 250 for t in plan.tasks)
    assert plan.rows_per_task == 250 and plan.n_rows == store.n_rows
    # the validation rows are held out of every chunk: evaluation reads the whole store
    assert 0 < plan.held_out < store.n_rows and plan.train_rows == store.n_rows - plan.held_out
    assert _rows(plan.val_ranges) == list(range(store.n_rows))
    assert plan.rounds_per_epoch == sum(math.ceil(plan.task_rows(t) / 16 / 2) for t in plan.tasks)
    assert plan.sync_shares == 0 and not plan.warning  # async: no shares


def test_default_rows_per_task_gives_about_four_tasks_per_thread(store):
    plan, _, _ = _plan(store, n_threads=2, batch_size=8, local_steps=1, validation=0)
    assert plan.rows_per_task == math.ceil(store.n_rows / 8)
    assert plan.held_out == 0 and plan.val_ranges == [] and plan.train_rows == store.n_rows
    full, _, _ = _plan(store, n_threads=2, batch_size=0, validation=0)
    # full batch: a thread's share of the rows per task (whole chunks); a sync round combines one
    # push of every share: one round an epoch
    assert full.rows_per_task == 1000 and full.rounds_per_epoch == 1 and len(full.tasks) == 3
    assert [sum(b - a for a, b in t) for t in full.tasks] == [900, 900, 200]


def test_a_validation_store_is_read_whole_and_nothing_is_held_out(store, tmp_path):
    from pipeline.synth import synth

    vs = synth(tmp_path / "v.zarr", rows=500, features=5, classes=3, seed=1)
    plan, _, _ = _plan(store, val_store=vs, validation=0.1)
    assert plan.held_out == 0 and plan.train_rows == store.n_rows
    assert _rows(plan.val_ranges) == list(range(500))


def test_a_store_too_small_to_hold_out_a_row_says_so_and_one_with_no_rows_is_refused(tmp_path):
    from pipeline.synth import synth

    tiny = synth(tmp_path / "t.zarr", rows=4, features=2, classes=2, seed=0)
    plan, _, _ = _plan(tiny, validation=0.1)
    assert plan.val_ranges == [] and plan.train_rows == 4 and "holds out no row" in plan.warning
    with pytest.raises(StoreError, match="no rows to train on"):
        _plan(tiny, validation=0.99)


def test_sync_shares_follow_the_threads_and_min_share_gflop(store):
    every, _, _ = _plan(store, n_threads=4, mode="sync", min_share_gflop=0)
    assert every.sync_shares == 4
    few, _, _ = _plan(store, n_threads=4, mode="sync", min_share_gflop=1e9)
    assert few.sync_shares == 1  # too little work per share: one share


def test_async_work_is_every_task_in_a_seeded_order(store):
    plan, cfg, spec = _plan(store, mode="async", rows_per_task=200)
    work = epoch_work(plan, cfg, 3, {"a": 2, "b": 2}, spec)
    assert [w.name for w in work] == [f"e3-t{j}" for j in task_order(len(plan.tasks), cfg.seed, 3)]
    assert sorted(w.ranges for w in work) == sorted(plan.tasks) and all(w.workers is None for w in work)
    assert [w.name for w in epoch_work(plan, cfg, 3, {"a": 2, "b": 2}, spec)] == [w.name for w in work]
    assert task_order(len(plan.tasks), cfg.seed, 4) != task_order(len(plan.tasks), cfg.seed, 3)


def test_sync_work_is_one_unpinned_share_of_equal_rows_per_thread(store):
    plan, cfg, spec = _plan(store, mode="sync", min_share_gflop=0, validation=0)
    work = epoch_work(plan, cfg, 0, {"a": 2, "b": 1}, spec)
    assert [w.name for w in work] == ["e0-s0", "e0-s1", "e0-s2"]
    sizes = [sum(b - a for a, b in w.ranges) for w in work]
    assert max(sizes) - min(sizes) <= 1 and all(w.workers is None for w in work)
    assert sorted(_rows([r for w in work for r in w.ranges])) == list(range(store.n_rows))


# -- early stopping ------------------------------------------------------------------------------


def test_early_stopping_waits_patience_epochs_without_improvement():
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert [es.update(loss, 10) for loss in (1.0, 0.95, 0.8, 0.85, 0.75)] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert es.best_epoch == 0 + 2 and es.best_loss == 0.8 and es.seen == 50 and es.epoch == 5
    assert not es.improved  # 0.75 is within min_delta of 0.8


def test_the_first_epoch_is_always_the_best_so_far_and_patience_0_never_stops():
    es = EarlyStopping(patience=0)
    assert not es.update(math.nan, 1) and es.improved and es.best_epoch == 0
    assert not any(es.update(5.0, 1) for _ in range(10))


def test_min_samples_defers_the_stop_until_enough_samples_were_seen():
    es = EarlyStopping(patience=1, min_samples=100)
    assert [es.update(1.0, 40) for _ in range(3)] == [
        False,
        False,
        True,
    ]  # 120 samples at the third
    eager = EarlyStopping(patience=1)
    assert [eager.update(1.0, 40) for _ in range(3)] == [False, True, True]


def test_a_resumed_counter_stops_where_the_uninterrupted_one_does():
    losses, samples = [1.0, 0.9, 0.95, 0.97, 0.99, 0.98], 7
    straight = EarlyStopping(patience=3, min_delta=0.01)
    stops = [straight.update(v, samples) for v in losses]
    first = EarlyStopping(patience=3, min_delta=0.01)
    for v in losses[:2]:
        first.update(v, samples)
    resumed = EarlyStopping(3, 0.01, 0, first.best_loss, first.best_epoch, epoch=2, seen=2 * samples)
    assert [resumed.update(v, samples) for v in losses[2:]] == stops[2:] == [False, False, True, True]


def test_a_run_state_moves_to_the_next_epoch_with_no_task_done():
    from pipeline.runstate import RunState

    run = RunState("run-x", epoch=3, done_tasks={"e3-t0"})
    assert run.best.epoch == -1 and run.best.loss == math.inf and run.samples == 0
    run.history.append({"epoch": 3, "samples": 40})
    run.finish_epoch()
    assert run.epoch == 4 and run.done_tasks == set() and run.samples == 40
    run.finish_epoch()  # an interrupted run finishes an epoch once, whatever calls it again
    assert run.epoch == 4
