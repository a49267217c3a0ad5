"""The sharded parameter server as a cluster operator runs it: `dask scheduler --preload
pipeline.ps` and `dask worker ... --resources ps-shard=1` processes on 127.0.0.1 (README, "Shard
the parameter server"), driven through the handle the driver uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ShardLostError
from pipeline.ps.shard import ShardedParameterServer, shard_workers
from pipeline.ps.wire import encode_vector
from tests.cluster.conftest import run_cli
from tests.processes import Procs, running, wait_for

N_PARAMS = 1000


@pytest.fixture(scope="module")
def shard_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    """A preloaded scheduler, three single-threaded `ps-shard` workers and a training worker."""
    with running(tmp_path_factory.mktemp("shard-cluster")) as procs:
        _, address = procs.scheduler(dashboard=False)
        for name in ("shard0", "shard1", "shard2"):
            procs.worker(address, name, "--resources", "ps-shard=1")
        procs.worker(address, "train0")
        yield procs


@pytest.fixture
def client(shard_cluster: Procs) -> Iterator[Any]:
    from distributed import Client

    with Client(shard_cluster.address, timeout=30) as c:
        wait_for(lambda: len(shard_workers(c.scheduler_info(n_workers=-1))) >= 3, 60, "three ps-shard workers")
        yield c


def _push_to_one_shard(ps: ShardedParameterServer, i: int, name: str, delta: np.ndarray) -> Any:
    """A participant's push that has reached shard ``i`` only (its other slices still on the
    way): a future of that shard's reply, which comes once the shard's round is complete."""
    addr, lo, hi = ps.shards[i]

    async def request(sched: Any, pool: Any) -> dict:
        return await pool(addr).ps_push(
            job=ps.job,
            name=name,
            version=0,
            delta=encode_vector(delta[lo:hi]),
            samples=10,
            batches=1,
            loss=1.0,
            timeout=60.0,
        )

    return ps.soon._run(request)


def test_a_state_is_never_joined_from_shards_at_different_rounds(client: Any) -> None:
    """A sync round that one shard has applied and the other not yet (a push still on its way to
    it) is no state to checkpoint: joined by range, the weights would be of no round, and the
    progress of the first shard would make a resume skip batches the second shard never got."""
    rng = np.random.default_rng(0)
    params = rng.standard_normal(N_PARAMS).astype(np.float32)
    da, db = (rng.standard_normal(N_PARAMS).astype(np.float32) * np.float32(0.01) for _ in range(2))
    ps = ShardedParameterServer("torn-state", client, n_shards=2)
    ps.create(params, mode="sync")
    try:
        ps.expect(names=["a", "b"], keys=[None, None], epoch=0)
        ps.join("a")
        ps.join("b")
        pushed_a = ps.soon.push("a", 0, da, samples=10, batches=1, loss=1.0, timeout=60.0)
        _push_to_one_shard(ps, 0, "b", db).result(timeout=60)  # shard 0 has applied round 1
        with pytest.raises(ShardLostError, match="disagree on the rounds applied"):
            ps.state(timeout=1.0)  # shard 1 still waits for b's slice: no state of one round yet
        _push_to_one_shard(ps, 1, "b", db).result(timeout=60)
        pushed_a.result(timeout=60)
        st = ps.state()
        weights, version = ps.pull()
        assert st["version"] == version == 1
        np.testing.assert_array_equal(st["params"], weights)
        assert not np.array_equal(weights, params)
        assert st["progress"] == {"a": 1, "b": 1}
    finally:
        ps.close()


def test_more_shards_than_parameters_is_a_one_line_error(shard_cluster: Procs, tmp_path: Path) -> None:
    """A linear model of one feature has two parameters: three shards (as many as the cluster
    has `ps-shard` workers) cannot each hold a range of them."""
    from pipeline.synth import synth

    store = tmp_path / "one-feature.zarr"
    synth(store, rows=500, features=1, classes=None, seed=0)
    args = ["--set", "hidden=[]", "--set", "ps_shards=3", "--set", "epochs=1", "--quiet"]
    r = run_cli(
        ["train", str(store), "--scheduler", shard_cluster.address, "--out", str(tmp_path / "run"), *args],
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "error: ps_shards = 3 is more than the model's 2 parameters; set ps_shards to at most 2 "
        "(0 = the parameter server in the scheduler)"
    ], r.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_cluster_of_only_shard_workers_is_refused_naming_the_reservation(tmp_path: Path) -> None:
    """Workers started with the ps-shard resource never train: a cluster of them only is refused
    saying so, not that it has no workers."""
    from pipeline.synth import synth

    store = tmp_path / "s.zarr"
    synth(store, rows=500, features=3, classes=2, seed=0)
    with running(tmp_path / "procs") as procs:
        _, address = procs.scheduler(dashboard=False)
        procs.worker(address, "shard0", "--resources", "ps-shard=1")
        r = run_cli(
            [
                "train",
                str(store),
                "--scheduler",
                address,
                "--out",
                str(tmp_path / "run"),
                "--set",
                "epochs=1",
                "--quiet",
            ],
            cwd=tmp_path,
        )
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip().splitlines() == [
        "error: the cluster's 1 worker(s) are all started with `--resources ps-shard=1`, reserved for "
        "parameter-server shards; start a worker to train with `dask worker ADDRESS` (without that resource)"
    ], r.stderr
    assert not (tmp_path / "run").exists()
