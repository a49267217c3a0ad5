"""Out-of-core runs on workers with small memory limits: a limit too small for a task's chunks
is one clear error naming the fix (not workers restarted until Dask gives up), and the rows a
worker keeps between tasks (the row cache) never hold it over the fraction at which Dask pauses
it (a paused worker starts no further task: each epoch would wait for it for join_timeout)."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, TrainingError
from pipeline.train import train
from tests.pipeline.helpers import make_store


def _cluster(memory_limit: str, workers: int = 1):
    from pipeline.connect import cluster_client

    return cluster_client(workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=None)


@pytest.fixture(scope="module")
def one_big_chunk(tmp_path_factory: pytest.TempPathFactory) -> str:
    """60,000 rows of 500 float32 features in one 120 MB row chunk."""
    path = tmp_path_factory.mktemp("big-chunk") / "store.zarr"
    return make_store(path, n=60_000, f=500, chunk_rows=60_000).path


def test_a_limit_below_one_chunk_is_one_clear_error(one_big_chunk, tmp_path):
    """Training on workers whose limit cannot hold one decoded chunk fails at once
    with an error naming --memory-limit and --chunk-rows, instead of the nanny restarting the
    workers under the task until Dask reports a KilledWorker."""
    cfg = TrainConfig(mode="sync", epochs=1, patience=0, hidden=[8], validation=0.1)
    with _cluster("300MB") as client:
        with pytest.raises(TrainingError) as err:
            train(one_big_chunk, cfg, tmp_path / "run", client=client)
        assert "--memory-limit" in str(err.value) and "--chunk-rows" in str(err.value)
        assert "KilledWorker" not in str(err.value)


def test_prediction_refuses_a_chunk_over_the_limit(one_big_chunk, tmp_path):
    """``predict_store`` on workers too small for one decoded chunk: a PipelineError naming
    --memory-limit and --chunk-rows."""
    from pipeline.inference import predict_store
    from pipeline.model import load_model

    small = make_store(tmp_path / "small.zarr", n=3000, f=500, chunk_rows=1000)
    train(small.path, TrainConfig(epochs=1, patience=0, hidden=[8]), tmp_path / "run", client=None)
    model = load_model(tmp_path / "run")
    with _cluster("300MB") as client:
        with pytest.raises(PipelineError) as err:
            predict_store(model, one_big_chunk, str(tmp_path / "out.parquet"), client)
    assert "--memory-limit" in str(err.value) and "--chunk-rows" in str(err.value)
    assert not (tmp_path / "out.parquet").exists()


def _row_cache_on_a_busy_worker(store_path: str, fraction: float) -> dict:
    """On a worker: hold memory elsewhere until the process uses ``fraction`` of its limit, bound
    the row cache as a training task does, and tell whether a training loader of the store keeps
    its rows (the loader's own buffers add some 60-80 MB: the fraction leaves room for them below
    Dask's terminate fraction, 95%)."""
    import numpy as np
    import psutil
    from distributed import get_worker

    from pipeline import worker
    from pipeline.config import TrainConfig
    from pipeline.loop import training_loader
    from pipeline.train import task_config

    limit = get_worker().memory_manager.memory_limit
    rss = psutil.Process().memory_info().rss
    ballast = np.ones(max(0, int(fraction * limit) - rss) // 8)  # touched: resident
    cfg = task_config(TrainConfig(row_cache_mb=1024))
    store = worker._store(store_path)
    worker._row_cache.resize(worker._row_cache_bytes(cfg))
    loader = training_loader(store, cfg, ranges=[(0, 2000)], cache=worker._row_cache, cache_scope="probe")
    kept = loader._cache is not None
    loader.close()
    del ballast
    return {"kept": kept, "bound": worker._row_cache.max_bytes, "store": worker.RowCache.store_bytes(store)}


def test_kept_rows_leave_room_below_the_pause_fraction(tmp_path):
    """A store within a quarter of the worker's memory limit, on a worker whose other memory
    leaves no room for it below Dask's pause fraction, is streamed, not kept: kept rows stay
    between tasks, and a worker held over that fraction by them stays paused and starts none of
    the run's next tasks (each epoch then waits join_timeout for its share and goes on without)."""
    store = make_store(tmp_path / "s.zarr", n=50_000, f=500, chunk_rows=2_000)  # 100 MB of rows
    with _cluster("1GB") as client:
        # 75% in use: 5% (50 MB) left below the pause fraction, half the store's rows
        got = client.submit(_row_cache_on_a_busy_worker, store.path, 0.75, pure=False).result()
    assert not got["kept"] and got["bound"] < got["store"], got


@pytest.mark.timeout(120)
def test_a_small_worker_is_not_left_paused_between_epochs(tmp_path):
    """One worker whose limit leaves little room over its own memory, a store within a quarter
    of it: after each task the worker gives back what it freed and never stays over Dask's pause
    fraction with kept rows, so every epoch runs every share (a worker left paused starts none
    of the next epoch's tasks: the epoch waits join_timeout and goes on without them)."""
    store = make_store(tmp_path / "s.zarr", n=40_000, f=500, chunk_rows=2_000)  # 80 MB of rows
    cfg = TrainConfig(mode="sync", epochs=3, patience=0, hidden=[8], join_timeout=15.0, validation=0.1)
    with _cluster("420MB") as client:
        result = train(store.path, cfg, tmp_path / "run", client=client)
    rows = store.n_rows - round(0.1 * store.n_rows)
    assert [h["samples"] for h in result.history] == [rows] * 3, result.history


def test_a_task_whose_workers_die_under_it_names_the_memory_fix(tmp_path):
    """When the worker processes running a training task die under it (the nanny restarts a
    worker over its memory limit), Dask gives up on the task (KilledWorker): the run ends with
    one line naming --memory-limit and what a task holds, not Dask's own words."""
    import os
    import signal
    import threading
    import time

    import dask

    store = make_store(tmp_path / "s.zarr", n=100_000, f=50, chunk_rows=5_000)
    cfg = TrainConfig(mode="sync", epochs=200, patience=0, hidden=[64], validation=0.1)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), _cluster("2GB") as client:
        (pid,) = client.run(os.getpid).values()

        def kill_under_a_task() -> None:
            deadline = time.time() + 60
            while time.time() < deadline and not any(client.processing().values()):
                time.sleep(0.05)
            time.sleep(0.3)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill_under_a_task, daemon=True).start()
        with pytest.raises(TrainingError) as err:
            train(store.path, cfg, tmp_path / "run", client=client)
    message = str(err.value)
    assert "died under it" in message and "--memory-limit" in message, message
    assert "Attempted to run task" not in message
