"""A run whose workers are all paused by Dask's memory pause waits for them, says why once, and
finishes when they run again."""

from __future__ import annotations

import threading
import time

import dask
import pytest

import pipeline.train as train_module
from pipeline.config import TrainConfig
from pipeline.synth import synth
from pipeline.train import train


@pytest.fixture
def paused_client():
    """A real one-worker cluster that is paused from its start: a pause fraction of 1% of a 2 GB
    limit, which any Python process's memory is above."""
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.worker.memory.pause": 0.01, "distributed.worker.memory.spill": False}),
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, memory_limit="2GB", dashboard_address=":0"
        ) as lc,
        Client(lc, set_as_default=False) as c,
    ):
        deadline = time.monotonic() + 30
        while any(w["status"] != "paused" for w in c.scheduler_info()["workers"].values()):
            assert time.monotonic() < deadline, "the worker never paused"
            time.sleep(0.1)
        yield c


def _resume_workers(client) -> None:
    def unpause(dask_worker) -> None:
        dask_worker.memory_manager.memory_pause_fraction = False
        from distributed.core import Status

        dask_worker.status = Status.running

    client.run(unpause)


def test_a_run_on_paused_workers_says_why_it_waits_and_finishes(paused_client, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "PAUSED_WARNING", 1.0)
    store = tmp_path / "s.zarr"
    synth(str(store), rows=600, features=4, classes=2, seed=0)
    cfg = TrainConfig().with_overrides(["epochs=1", "validation=0", "hidden=[4]"])
    said: list[str] = []
    warned = threading.Event()

    def log(msg: str) -> None:
        said.append(msg)
        if "paused" in msg:
            warned.set()

    out: dict = {}
    t = threading.Thread(
        target=lambda: out.setdefault("result", train(str(store), cfg, tmp_path / "run", client=paused_client, log=log))
    )
    t.start()
    try:
        assert warned.wait(120), f"no word of the paused workers; said: {said}"
    finally:
        _resume_workers(paused_client)
        t.join(180)
    assert not t.is_alive()
    assert "result" in out, said
    paused = [m for m in said if "paused" in m]
    assert len(paused) == 1, said  # once per episode, not at every poll
    assert "distributed.worker.memory.pause" in paused[0] and "--memory-limit" in paused[0]
    assert len(out["result"].history) == 1
