"""Summed pushes (``combine_pushes``) on a real cluster: one worker process with two threads,
whose two training tasks of each sync round reach the parameter server as one push; and the
same through a sharded server (a ``dask worker --resources ps-shard=1`` process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.ps.job import Job
from pipeline.ps.wire import decode_vector
from pipeline.train import train
from pipeline.worker import PushGroup
from tests.pipeline.test_ps_shard import _start_shard_worker, _wait_for_shard_workers

BASE = {"mode": "sync", "epochs": 2, "patience": 0, "seed": 5, "hidden": [32], "batch_size": 128}


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    """One training worker process with two threads (a host's worker with --nthreads 2)."""
    from pipeline.connect import cluster_client

    with cluster_client(workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


def _pushes(run: Path) -> tuple[int, int]:
    doc = json.loads((run / "history.json").read_text())
    return doc["pushes"], doc["summed"]


def test_summed_pushes_give_the_same_weights_with_half_the_messages(letter_stores, client, tmp_path):
    apart = train(letter_stores[0], TrainConfig(**BASE), tmp_path / "apart", client=client)
    summed = train(letter_stores[0], TrainConfig(**BASE, combine_pushes=True), tmp_path / "summed", client=client)
    # two tasks a round in one process: one message each round (but where a share ran alone)
    assert all(len(h["tasks"]) == 2 for h in summed.history)
    assert len({t["worker"] for h in summed.history for t in h["tasks"]}) == 1
    pushes, n_summed = _pushes(summed.run_dir)
    assert _pushes(apart.run_dir) == (pushes, 0)
    assert pushes >= 2 * summed.history[-1]["rounds"] - 4 and n_summed >= pushes // 2 - 2
    # the worker sums as the server does (sample-weighted, in name order): the same floats
    assert [h["rounds"] for h in summed.history] == [h["rounds"] for h in apart.history]
    np.testing.assert_array_equal(summed.model.params, apart.model.params)
    assert [h["val_loss"] for h in summed.history] == [h["val_loss"] for h in apart.history]
    # the two tasks share each round's sum, a slice each (letter's 1,402 parameters are below the
    # default slice, so the worker's threshold is lowered for this run): the same bits again
    client.run(setattr, PushGroup, "min_slice", 64)
    try:
        cfg = TrainConfig(**BASE, combine_pushes=True)
        shared = train(letter_stores[0], cfg, tmp_path / "shared", client=client)
    finally:
        client.run(setattr, PushGroup, "min_slice", PushGroup.min_slice)
    np.testing.assert_array_equal(shared.model.params, apart.model.params)
    assert _pushes(shared.run_dir)[0] == pushes and _pushes(shared.run_dir)[1] > 0


def test_summed_pushes_through_a_sharded_server(letter_stores, client, tmp_path):
    proc = _start_shard_worker(client.scheduler.address)
    try:
        _wait_for_shard_workers(client, 1)
        apart = train(letter_stores[0], TrainConfig(**BASE, ps_shards=1), tmp_path / "apart", client=client)
        cfg = TrainConfig(**BASE, ps_shards=1, combine_pushes=True)
        summed = train(letter_stores[0], cfg, tmp_path / "summed", client=client)
    finally:
        proc.kill()
        proc.wait()
    # each task's handle follows the shard's version even when the other task's handle sent the
    # push: no delta is dropped as stale, and the run is the one without summing
    assert _pushes(summed.run_dir)[1] > 0
    assert [h["rounds"] for h in summed.history] == [h["rounds"] for h in apart.history]
    np.testing.assert_array_equal(summed.model.params, apart.model.params)


class _JobHandle:
    """A task's handle on a real :class:`Job` running on an event loop in another thread (as
    the scheduler's is): ``soon.push`` returns a concurrent future of the reply."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job, self.loop = job, loop

    @property
    def soon(self) -> _JobHandle:
        return self

    def push(self, **kw: Any) -> Any:
        name, version, delta = kw.pop("name"), kw.pop("version"), kw.pop("delta")
        return asyncio.run_coroutine_threadsafe(self.job.push(name, version, delta, **kw), self.loop)

    def call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)


@contextlib.contextmanager
def _running_job(n: int) -> Iterator[_JobHandle]:
    """A sync :class:`Job` of ``n`` parameters on an event loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    job = asyncio.run_coroutine_threadsafe(_create(n), loop).result(5)
    try:
        yield _JobHandle(job, loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture
def handle() -> Iterator[_JobHandle]:
    with _running_job(4) as h:
        yield h


async def _create(n: int) -> Job:
    return Job.create("j", np.zeros(n, np.float32), n, mode="sync", optimizer={"name": "sgd", "lr": 1.0})


def test_a_group_never_waits_for_a_task_that_already_pushed_alone_nor_for_one_that_left(handle):
    job, group, pool = handle.job, PushGroup(timeout=10), ThreadPoolExecutor(2)
    d = {"a": np.full(4, 1, np.float32), "b": np.full(4, 3, np.float32)}

    def push(name: str, version: int) -> Any:
        fut = group.push(handle, name, version, d[name], samples=10, batches=1, loss=1.0, timings={})
        return fut.result(10)

    # both joined the server, but "a" is alone in the group when it pushes round 0: its push
    # goes at once and waits for the round, which needs "b" (entering the group only now):
    # "b" must not wait for "a"
    handle.call(job.join, "a")
    handle.call(job.join, "b")
    group.enter("a", 0)
    first = pool.submit(push, "a", 0)
    group.enter("b", 0)
    assert push("b", 0)["version"] == first.result(10)["version"] == 1
    assert (job.pushes, job.summed, group.pushes, job.history[-1][-1]) == (2, 0, 2, 2)
    # round 1: both push; one message carries both deltas
    both = [pool.submit(push, n, 1) for n in ("b", "a")]
    assert [f.result(10)["version"] for f in both] == [2, 2]
    assert (job.pushes, job.summed, group.pushes, group.deltas) == (4, 1, 3, 4)
    np.testing.assert_array_equal(decode_vector(job.reply()["params"], 4), np.full(4, -8, np.float32))
    # "b" leaves the group (its share is done) before round 2: "a" pushes alone
    group.leave("b")
    last = pool.submit(push, "a", 2)
    handle.call(job.leave, "b")
    assert last.result(10)["version"] == 3 and (job.summed, group.pushes) == (1, 4)
    pool.shutdown()


def _push(group: PushGroup, handle: _JobHandle, name: str, version: int, delta: np.ndarray, samples: int) -> Any:
    fut = group.push(handle, name, version, delta, samples=samples, batches=1, loss=1.0, timings={})
    return fut.result(10)


def test_the_waiting_tasks_share_the_sum_slice_by_slice_with_the_same_bits():
    """With a vector of ``min_slice`` floats or more per task, the round's three waiting tasks
    each sum a slice of the summed push and the last one done sends it: the server gets the
    same floats as from one task summing it all, round after round."""
    n, names, samples = 1001, ("a", "b", "c"), {"a": 10, "b": 7, "c": 13}
    rng = np.random.default_rng(3)
    rounds = [{m: rng.standard_normal(n).astype(np.float32) for m in names} for _ in range(3)]
    params, groups = [], []
    for min_slice in (10**9, 100):  # one task sums it all, then 3 slices a round
        group, pool = PushGroup(timeout=10), ThreadPoolExecutor(3)
        group.min_slice = min_slice
        with _running_job(n) as handle:
            for m in names:
                handle.call(handle.job.join, m)
                group.enter(m, 0)

            for v, deltas in enumerate(rounds):
                replies = [
                    f.result(10)
                    for f in [pool.submit(_push, group, handle, m, v, deltas[m], samples[m]) for m in names]
                ]
                assert [r["version"] for r in replies] == [v + 1] * 3
            params.append(decode_vector(handle.job.reply()["params"], n))
            assert (handle.job.pushes, handle.job.summed) == (9, 6)
        pool.shutdown()
        groups.append(group)
    whole, sliced = groups
    assert (whole.shared, whole.sliced) == (0, {})
    assert sliced.shared == 3 and sum(sliced.sliced.values()) == 9 and set(sliced.sliced) <= set(names)
    assert (sliced.pushes, sliced.deltas) == (whole.pushes, whole.deltas) == (3, 9)
    np.testing.assert_array_equal(params[1], params[0])
    assert np.abs(params[0]).max() > 0


def test_a_task_that_pushes_while_the_others_sum_is_sent_when_they_are_done(monkeypatch):
    """ "a" and "b" push round 0 and share its sum; "c" (a participant of the round on the
    server) enters the group and pushes round 0 while they sum. Its push waits for them to be
    done with round 0, then goes: without it the server's round, and so their replies, never
    complete."""
    from pipeline import worker

    gate, real_sum = threading.Event(), worker._SumJob.sum

    def held_sum(self: Any, i: int) -> None:
        gate.wait(10)
        real_sum(self, i)

    monkeypatch.setattr(worker._SumJob, "sum", held_sum)
    group, pool = PushGroup(timeout=5), ThreadPoolExecutor(3)
    group.min_slice = 4
    d = {m: np.full(16, k + 1, np.float32) for k, m in enumerate("abc")}
    with _running_job(16) as handle:
        for m in "abc":
            handle.call(handle.job.join, m)
        group.enter("a", 0)
        group.enter("b", 0)
        first = [pool.submit(_push, group, handle, m, 0, d[m], 10) for m in "ab"]
        _until(lambda: bool(group._jobs))  # their sum is being summed (held)
        group.enter("c", 0)
        late = pool.submit(_push, group, handle, "c", 0, d["c"], 10)
        _until(lambda: "c" in group.entries)
        gate.set()
        assert [f.result(10)["version"] for f in (*first, late)] == [1, 1, 1]
        assert (handle.job.pushes, handle.job.summed, group.shared) == (3, 1, 1)
    pool.shutdown()


def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
