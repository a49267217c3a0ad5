"""The worker task's push loop on a real cluster: pushes in flight while the next local steps run."""

from __future__ import annotations

import numpy as np

from pipeline.config import TrainConfig
from pipeline.model import load_model
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
    from pipeline.store import open_store
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
