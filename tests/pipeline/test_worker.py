"""The worker task's push loop on a real cluster: pushes in flight while the next local steps run."""

from __future__ import annotations

import json

import numpy as np

from pipeline.config import TrainConfig
from pipeline.model import load_model
from pipeline.store import open_store
from pipeline.train import train


def test_overlapped_pushes_fold_in_and_train(letter_stores, client, tmp_path):
    """With ``overlap`` each reply is folded in at the next push boundary: the run pushes as
    often as without it, learns, and its weights differ (the progress made in flight is kept
    on top of the server's weights instead of being replaced by them)."""
    runs = {}
    for overlap in (False, True):
        cfg = TrainConfig(mode="sync", epochs=2, patience=0, hidden=[32], local_steps=4, overlap=overlap)
        runs[overlap] = train(letter_stores[0], cfg, tmp_path / str(overlap), client=client)
    plain, ahead = runs[False].history, runs[True].history
    assert [h["rounds"] for h in ahead] == [h["rounds"] for h in plain]
    assert [h["samples"] for h in ahead] == [h["samples"] for h in plain]
    assert ahead[1]["val_loss"] < ahead[0]["val_loss"]
    assert ahead[1]["val_loss"] < 1.5 * plain[1]["val_loss"]
    a, b = load_model(tmp_path / "True"), load_model(tmp_path / "False")
    assert np.isfinite(a.params).all() and not np.array_equal(a.params, b.params)


def test_a_reply_folded_in_after_one_step_is_reproducible(letter_stores, client, tmp_path):
    """``overlap_steps = 1`` folds each reply in one local step after its push, waiting there if
    it is late: the same run twice gives the same weights whatever the timing, it pushes as often
    as the run without overlap, and it differs from folding at the next push boundary
    (``overlap_steps = local_steps``), whose steps run on weights one round older."""
    base = {"mode": "sync", "epochs": 2, "patience": 0, "hidden": [32], "local_steps": 4, "overlap": True}
    runs = {}
    for key, steps in (("one", 1), ("again", 1), ("round", 4)):
        runs[key] = train(letter_stores[0], TrainConfig(**base, overlap_steps=steps), tmp_path / key, client=client)
    plain = train(letter_stores[0], TrainConfig(**{**base, "overlap": False}), tmp_path / "plain", client=client)
    assert [h["rounds"] for h in runs["one"].history] == [h["rounds"] for h in plain.history]
    one, again, late = (load_model(tmp_path / k).params for k in ("one", "again", "round"))
    assert np.array_equal(one, again)
    assert not np.array_equal(one, late)
    assert runs["one"].history[1]["val_loss"] < runs["one"].history[0]["val_loss"]


def test_a_jobs_validation_rows_are_read_once_per_worker(letter_stores, monkeypatch):
    """A training job's validation batches are read from the store once and kept for its next
    epochs (the held-out rows are spread over every chunk: reading them is reading the store):
    the same metrics from the kept batches as from a fresh read, one read per job, none kept
    without a job or past the cache's bound."""
    from kernels.mlp import MLPSpec, init_params
    from pipeline import worker
    from pipeline.metrics import plain_metrics
    from pipeline.train import build_spec, task_config

    store = open_store(letter_stores[0])
    cfg = TrainConfig(hidden=[16], validation=0.2)
    spec, target = build_spec(store, cfg)
    tcfg = task_config(cfg)
    params = init_params(MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])}), seed=0)
    ranges = [(0, store.n_rows // 2), (store.n_rows // 2, store.n_rows)]
    reads = []

    from pipeline import loop

    class Counting(loop.ChunkLoader):
        def epoch(self, epoch=0):
            reads.append(self)
            return super().epoch(epoch)

    monkeypatch.setattr(loop, "ChunkLoader", Counting)
    monkeypatch.setattr(worker, "_val_batches", type(worker._val_batches)())

    def metrics(*args):
        return plain_metrics(worker.evaluate_ranges(store, *args, spec, tcfg, target))

    streamed = metrics(ranges, params, None)
    assert len(reads) == 1 and not worker._val_batches  # no job: read, not kept
    first = metrics(ranges, params, "job-a")
    again = metrics(ranges, params + np.float32(0.01), "job-a")
    assert len(reads) == 2  # job-a's rows read once
    assert first == streamed  # the kept batches are the streamed ones
    assert again != first  # evaluated with the new weights, not a kept result
    metrics(ranges[:1], params, "job-a")
    assert len(reads) == 3  # other ranges: another entry
    monkeypatch.setattr(worker, "VAL_CACHE_MB", 1)  # a share that could exceed the bound streams
    metrics(ranges, params, "job-b")
    metrics(ranges, params, "job-b")
    assert len(reads) == 5 and len(worker._val_batches) == 2


def test_the_validation_cache_is_bounded_by_the_workers_memory_limit():
    """On a worker the cache keeps at most an eighth of the worker's memory limit (and at most
    VAL_CACHE_MB); outside a worker, VAL_CACHE_MB."""
    from pipeline import worker
    from pipeline.connect import cluster_client

    assert worker._val_cache_bytes() == worker.VAL_CACHE_MB * 2**20
    with cluster_client(workers=1, memory_limit="1GiB", dashboard_address=None) as small:
        got = small.submit(worker._val_cache_bytes, pure=False).result()  # as inside a training task
    assert got == 2**30 // 8


def _row_cache_counts() -> dict:
    from pipeline import worker

    cache = worker._row_cache
    return {"reads": cache.reads, "hits": cache.hits, "bytes": cache.nbytes, "bound": cache.max_bytes}


def test_workers_keep_a_jobs_training_chunks_and_train_the_same(letter_stores, client, tmp_path):
    """With the store under ``row_cache_mb`` each worker decodes a chunk once and serves later
    epochs from memory (the shares' row ranges change every epoch); the run's weights and
    history are those of the run that streams every epoch (``row_cache_mb = 0``)."""
    base = {"mode": "sync", "epochs": 3, "patience": 0, "hidden": [32], "local_steps": 4}
    before = client.run(_row_cache_counts)
    kept = train(letter_stores[0], TrainConfig(**base), tmp_path / "kept", client=client)
    after = client.run(_row_cache_counts)
    streamed = train(letter_stores[0], TrainConfig(**base, row_cache_mb=0), tmp_path / "streamed", client=client)
    last = client.run(_row_cache_counts)
    assert np.array_equal(load_model(tmp_path / "kept").params, load_model(tmp_path / "streamed").params)
    assert [h["val_loss"] for h in kept.history] == [h["val_loss"] for h in streamed.history]
    n_chunks = open_store(letter_stores[0]).n_chunks
    for w in after:
        new_reads = after[w]["reads"] - before[w]["reads"]
        assert 0 < new_reads <= n_chunks  # each chunk at most once per worker over 3 epochs
        assert after[w]["hits"] > before[w]["hits"]
        assert 0 < after[w]["bound"] <= 1024 * 2**20
        assert last[w]["reads"] == after[w]["reads"] and last[w]["bound"] == 0  # streamed: none kept


def test_a_finished_job_leaves_nothing_kept_on_the_workers(letter_stores, client, tmp_path):
    """When a run ends the driver has the workers drop what they kept for its job between its
    tasks (store chunks, validation batches, trainers), and only that job's."""
    from pipeline import worker

    def kept(job):
        return {
            "chunks": sum(1 for k in worker._row_cache._entries if k[0] == job),
            "val": sum(1 for k in worker._val_batches if k[0] == job),
            "trainers": sum(1 for k in worker._trainers if k[0] == job),
        }

    def job_entries():  # what the workers keep of this module's earlier jobs (none are running)
        return {k[0] for kept in (worker._val_batches, worker._trainers) for k in kept}

    cfg = TrainConfig(mode="sync", epochs=2, patience=0, hidden=[16])
    train(letter_stores[0], cfg, tmp_path / "r", client=client)
    job = json.loads((tmp_path / "r" / "history.json").read_text())["job"]
    assert job and all(v == {"chunks": 0, "val": 0, "trainers": 0} for v in client.run(kept, job).values())
    assert all(job not in v for v in client.run(job_entries).values())

    def fill_and_forget():
        worker._val_batches[("other-job", "p")] = []
        worker._val_batches[("this-job", "p")] = []
        worker.forget_job("this-job")
        left = sorted(k[0] for k in worker._val_batches if k[0] in ("other-job", "this-job"))
        del worker._val_batches[("other-job", "p")]
        return left

    assert all(v == ["other-job"] for v in client.run(fill_and_forget).values())


def test_a_worker_opens_the_store_a_path_names_now(tmp_path, monkeypatch):
    """Workers keep stores open between tasks, but a relative path sent from another directory,
    or a store re-created at the same path, is the store that is there now, not the one kept."""
    from pipeline import worker

    from .helpers import make_store

    for d, n in (("a", 400), ("b", 2000)):
        (tmp_path / d).mkdir()
        make_store(tmp_path / d / "s.zarr", n=n, chunk_rows=100)
    monkeypatch.chdir(tmp_path / "a")
    assert worker._store("s.zarr").n_rows == 400
    monkeypatch.chdir(tmp_path / "b")
    assert worker._store("s.zarr").n_rows == 2000
    assert worker._store(str(tmp_path / "b" / "s.zarr")) is worker._store("s.zarr")  # kept, not reopened

    make_store(tmp_path / "c.zarr", n=300, chunk_rows=100)
    assert worker._store(str(tmp_path / "c.zarr")).n_rows == 300
    import shutil

    shutil.rmtree(tmp_path / "c.zarr")
    make_store(tmp_path / "c.zarr", n=700, chunk_rows=100)
    assert worker._store(str(tmp_path / "c.zarr")).n_rows == 700


def test_a_threaded_worker_trains_each_job_on_its_own_store(tmp_path, monkeypatch):
    """A worker in the driver's process (processes=False) outlives two runs given the same
    relative store path from two directories: each trains on its own rows."""
    from distributed import Client, LocalCluster

    from .helpers import make_store

    for d, n in (("a", 400), ("b", 2000)):
        (tmp_path / d).mkdir()
        make_store(tmp_path / d / "s.zarr", n=n, chunk_rows=100)
    cfg = TrainConfig(hidden=[4], epochs=1, patience=0)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc:
        with Client(lc) as c:
            for d, n in (("a", 400), ("b", 2000)):
                monkeypatch.chdir(tmp_path / d)
                train("s.zarr", cfg, tmp_path / d / "run", client=c)
                history = json.loads((tmp_path / d / "run" / "history.json").read_text())
                assert history["epochs"][0]["samples"] == round(n * (1 - cfg.validation)), history["epochs"][0]


def test_a_training_task_s_memory_counts_the_minibatches_its_pushes_make_ahead(tmp_path):
    from pipeline.loader import buffer_bytes
    from pipeline.synth import synth
    from pipeline.train import task_config
    from pipeline.worker import _training_buffer_bytes

    store = synth(str(tmp_path / "s.zarr"), rows=3000, features=40, classes=3, seed=0)
    ranges = [(0, 3000)]
    cfg = task_config(TrainConfig(batch_size=64, local_steps=8))
    loader_only = buffer_bytes(
        store, ranges, batch_size=64, buffer_chunks=cfg["shuffle_chunks"], prefetch=cfg["prefetch"]
    )
    # a sync round's 8 minibatches of 64 rows x (40 float32 features + a label), made while it closes
    assert _training_buffer_bytes(store, ranges, cfg) == loader_only + 8 * 64 * 41 * 4
    # what is refused is judged on what every epoch surely holds: the loader's own fill
    assert _training_buffer_bytes(store, ranges, cfg, certain=True) < loader_only
    # pushes that do not wait for their reply make nothing ahead
    for other in (TrainConfig(batch_size=64, overlap=True), TrainConfig(batch_size=64, secure_aggregation=True)):
        assert _training_buffer_bytes(store, ranges, task_config(other)) == loader_only
