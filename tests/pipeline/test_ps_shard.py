"""The sharded parameter server on a real cluster: shards on workers started with the
``ps-shard`` resource (``dask worker SCHED --resources ps-shard=1``, as the README says)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.errors import PSError, TrainingError
from pipeline.ps.shard import SHARD_RESOURCE, shard_workers, split_ranges
from pipeline.train import train


def _start_shard_worker(address: str) -> subprocess.Popen:
    """A `dask worker` process carrying the ps-shard resource (no nanny: killing it kills it)."""
    cmd = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        address,
        "--nthreads",
        "1",
        "--no-nanny",
        "--no-dashboard",
        "--host",
        "127.0.0.1",
        "--resources",
        f"{SHARD_RESOURCE}=1",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_shard_workers(client: object, n: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = shard_workers(client.scheduler_info(n_workers=-1))
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} ps-shard workers joined within {timeout} s")


@pytest.fixture(scope="module")
def shard_procs(client) -> Iterator[list[subprocess.Popen]]:
    """Two ps-shard workers beside the module's two training workers."""
    procs = [_start_shard_worker(client.scheduler.address) for _ in range(2)]
    try:
        _wait_for_shard_workers(client, 2)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_split_ranges_covers_the_vector_in_nearly_equal_consecutive_ranges():
    assert split_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(PSError):
        split_ranges(3, 4)


def test_sync_on_two_shards_gives_the_single_server_s_weights_bit_for_bit(letter_stores, client, shard_procs, tmp_path):
    base = {"mode": "sync", "epochs": 2, "patience": 0, "seed": 3, "server_optimizer": "adam", "server_lr": 1e-3}
    one = train(letter_stores[0], TrainConfig(**base), tmp_path / "one", client=client)
    two = train(letter_stores[0], TrainConfig(**base, ps_shards=2), tmp_path / "two", client=client)
    # the shards did hold the job: no training task ran on a ps-shard worker
    reserved = set(shard_workers(client.scheduler_info(n_workers=-1)))
    assert not {t["worker"] for h in two.history for t in h["tasks"]} & reserved
    assert [h["rounds"] for h in two.history] == [h["rounds"] for h in one.history]
    np.testing.assert_array_equal(two.model.params, one.model.params)
    assert [h["val_loss"] for h in two.history] == [h["val_loss"] for h in one.history]


def test_async_on_two_shards_learns(letter_stores, client, shard_procs, tmp_path):
    cfg = TrainConfig(mode="async", epochs=3, patience=0, ps_shards=2)
    res = train(letter_stores[0], cfg, tmp_path / "a", client=client)
    assert all(np.isfinite(res.model.params))
    accs = [h["val_accuracy"] for h in res.history]
    assert accs[-1] > 0.6, accs


def test_more_shards_than_shard_workers_is_refused_in_one_line(letter_stores, client, shard_procs, tmp_path):
    with pytest.raises(TrainingError, match=r"ps_shards = 3 but the cluster has 2 worker\(s\)") as exc:
        train(letter_stores[0], TrainConfig(epochs=1, ps_shards=3), tmp_path / "x", client=client)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x" / "checkpoint.npz").exists()
