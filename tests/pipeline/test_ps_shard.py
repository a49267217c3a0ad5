"""The sharded parameter server on a real cluster: shards on workers started with the
``ps-shard`` resource (``dask worker SCHED --resources ps-shard=1``, as the README says)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

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


@contextlib.contextmanager
def shard_test_cluster() -> Iterator[Any]:
    """A LocalCluster of two training workers, made and used with a 5 s connect timeout:
    Distributed retries a refused connection until ``comm.timeouts.connect`` (30 s by default),
    which is how long a push to a killed shard's worker would wait before it fails."""
    import dask

    from pipeline.connect import cluster_client

    with dask.config.set({"distributed.comm.timeouts.connect": "5s"}):
        with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
            yield c


@contextlib.contextmanager
def running_shard_workers(client: Any, n: int = 2) -> Iterator[list[subprocess.Popen]]:
    """``n`` ps-shard worker processes joined to ``client``'s cluster, killed on exit."""
    procs = [_start_shard_worker(client.scheduler.address) for _ in range(n)]
    try:
        _wait_for_shard_workers(client, n)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    """The module's LocalCluster (two training workers)."""
    with shard_test_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def shard_procs(client) -> Iterator[list[subprocess.Popen]]:
    """Two ps-shard workers beside the module's two training workers."""
    with running_shard_workers(client) as procs:
        yield procs


def test_split_ranges_covers_the_vector_in_nearly_equal_consecutive_ranges():
    assert split_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(PSError):
        split_ranges(3, 4)


def test_a_left_reply_from_any_shard_is_the_handle_s_reply():
    """A participant a shard dropped (its task was cancelled) gets "left" from it: the handle
    answers "left" (the task ends) instead of joining weights that one shard did not send."""
    from pipeline.ps.shard import ShardedParameterServer

    handle = ShardedParameterServer("j")
    ok = {"status": "OK", "version": 3, "message": None, "params": np.zeros(2, np.float32)}
    left = {"status": "left", "version": 3, "message": "participant 'a' left job 'j' (task processing -> forgotten)"}
    assert handle._join_replies([ok, left]) == left
    joined = handle._join_replies([ok, ok])
    assert joined["status"] == "OK" and joined["params"].shape == (4,)


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


@pytest.mark.parametrize("mode, codec", [("async", "none"), ("ssp", "none"), ("async", "topk")])
def test_async_and_ssp_on_two_shards_learn(mode, codec, letter_stores, client, shard_procs, tmp_path):
    cfg = TrainConfig(mode=mode, epochs=3, patience=0, ps_shards=2, compression=codec)
    res = train(letter_stores[0], cfg, tmp_path / "a", client=client)
    assert all(np.isfinite(res.model.params))
    accs = [h["val_accuracy"] for h in res.history]
    assert accs[-1] > 0.6, accs


def test_more_shards_than_shard_workers_is_refused_in_one_line(letter_stores, client, shard_procs, tmp_path):
    with pytest.raises(TrainingError, match=r"ps_shards = 3 but the cluster has 2 worker\(s\)") as exc:
        train(letter_stores[0], TrainConfig(epochs=1, ps_shards=3), tmp_path / "x", client=client)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x" / "checkpoint.npz").exists()


def resumed_across_shard_counts(client: Any, store: str, cfg: dict, epochs: int, straight: Path, out: Path) -> None:
    """Train ``epochs`` epochs of ``cfg`` straight into ``straight``, and into ``out`` in three
    runs: on 2 shards, resumed on the scheduler's server for one more epoch, then on 2 shards
    to the end; the two runs end with the same rounds and weights, bit for bit."""
    whole = train(store, TrainConfig(**cfg, epochs=epochs), straight, client=client)
    train(store, TrainConfig(**cfg, epochs=epochs - 2, ps_shards=2), out, client=client)
    train(store, TrainConfig(**cfg, epochs=epochs - 1, ps_shards=0), out, client=client, resume=True)
    resumed = train(store, TrainConfig(**cfg, epochs=epochs, ps_shards=2), out, client=client, resume=True)
    assert [h["rounds"] for h in resumed.history] == [h["rounds"] for h in whole.history]
    np.testing.assert_array_equal(resumed.model.params, whole.model.params)


def test_a_checkpoint_resumes_on_any_shard_count(letter_stores, client, shard_procs, tmp_path):
    """The checkpoint holds the shards' states joined by range (the single server's layout): a
    run trained on 2 shards, resumed on the scheduler's server, then on 2 shards again ends
    with the weights of a run never stopped, bit for bit."""
    from pipeline.checkpoint import load_file

    cfg = {"mode": "sync", "patience": 0, "server_optimizer": "adam", "server_lr": 1e-3}
    out = tmp_path / "cut"
    resumed_across_shard_counts(client, letter_stores[0], cfg, 4, tmp_path / "straight", out)
    a, _ = load_file(out / "checkpoint.npz", "checkpoint")
    b, _ = load_file(tmp_path / "straight" / "checkpoint.npz", "checkpoint")
    for k in ("params", "opt_m", "opt_v", "opt_average", "local0_0", "local1_1"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("codec, replies", [("fp16", False), ("bf16", True)])
def test_elementwise_codecs_on_two_shards_give_the_single_server_s_weights(
    codec, replies, letter_stores, client, shard_procs, tmp_path
):
    """Each shard decodes its own slice of a compressed delta (and encodes its slice of a
    compressed reply): fp16 and bf16 round each entry alone, so two shards train the single
    server's run bit for bit."""
    base = {"mode": "sync", "epochs": 2, "patience": 0, "seed": 3, "compression": codec, "compress_replies": replies}
    one = train(letter_stores[0], TrainConfig(**base), tmp_path / "one", client=client)
    two = train(letter_stores[0], TrainConfig(**base, ps_shards=2), tmp_path / "two", client=client)
    assert [h["rounds"] for h in two.history] == [h["rounds"] for h in one.history]
    np.testing.assert_array_equal(two.model.params, one.model.params)
    plain = train(
        letter_stores[0],
        TrainConfig(**{**base, "compression": "none", "compress_replies": False}, ps_shards=2),
        tmp_path / "plain",
        client=client,
    )
    assert not np.array_equal(plain.model.params, two.model.params)  # the deltas did travel compressed


@pytest.mark.parametrize("codec", ["topk", "int8"])
def test_topk_and_int8_on_two_shards_learn_as_the_single_server_does(
    codec, letter_stores, client, shard_procs, tmp_path
):
    """Top-k keeps its share of each shard's range, int8 scales each range's own blocks: not
    the single server's bytes, but the same learning."""
    base = {"mode": "sync", "epochs": 3, "patience": 0, "seed": 3, "compression": codec}
    if codec == "int8":
        base["compress_replies"] = True
    one = train(letter_stores[0], TrainConfig(**base), tmp_path / "one", client=client)
    two = train(letter_stores[0], TrainConfig(**base, ps_shards=2), tmp_path / "two", client=client)
    assert all(np.isfinite(two.model.params))
    got, want = two.history[-1]["val_accuracy"], one.history[-1]["val_accuracy"]
    assert got > 0.6 and abs(got - want) < 0.02, (got, want)


def test_a_compressed_run_resumes_across_shard_counts(letter_stores, client, shard_procs, tmp_path):
    """The residuals of error feedback and the participants' weights of compressed replies are
    sliced to the shards and joined back in the checkpoint: 2 shards, then the scheduler's
    server, then 2 shards end as a run never stopped, bit for bit."""
    cfg = {"mode": "sync", "patience": 0, "seed": 5, "compression": "fp16", "compress_replies": True}
    resumed_across_shard_counts(client, letter_stores[0], cfg, 3, tmp_path / "straight", tmp_path / "cut")


def _sharded_page(dask_scheduler, rounds: int | None = None) -> dict | None:
    """On the scheduler: what the training page and /metrics show of the (one) sharded job, or
    None while its view (fetched from the shards in the background) is not there yet, or not
    at ``rounds``. Runs on the scheduler's event loop, as the page's callbacks do."""
    import prometheus_client
    from bokeh.document import Document

    from pipeline.dashboard import source_of, training_doc

    src = source_of(dask_scheduler)
    job = next(iter(src.sharded), None) or src.finished[-1]["job"]
    snap = src.snapshot(job)
    if snap is None or (rounds is not None and snap.version != rounds) or not snap.history:
        return None
    doc = Document()
    training_doc(dask_scheduler, {}, doc)
    text = prometheus_client.generate_latest().decode()
    return {
        "job": job,
        "names": src.job_names(),
        "running": [s.job for s in src.running()],
        "version": snap.version,
        "pushes": snap.pushes,
        "loss": snap.loss,
        "n_params": snap.n_params,
        "shards": [dict(r) for r in snap.shards],
        "closed": snap.closed,
        "summary": doc.select_one({"name": "pipeline-summary"}).text,
        "loss_rounds": list(doc.select_one({"name": "pipeline-loss"}).renderers[0].data_source.data["round"]),
        "metrics": [line for line in text.splitlines() if f'job="{job}"' in line],
    }


def _wait_for_page(client, rounds: int | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.run_on_scheduler(_sharded_page, rounds=rounds)
        if page is not None:
            return page
        time.sleep(0.2)
    raise AssertionError(f"the training page did not show the sharded job at round {rounds} within {timeout} s")


def test_the_training_page_and_prometheus_show_a_sharded_job(letter_stores, client, shard_procs, tmp_path):
    seen: dict = {}

    def on_epoch(rec: dict) -> None:
        if rec["epoch"] == 0:  # the job is running: between its epochs
            seen["during"] = _wait_for_page(client, rounds=rec["rounds"])

    cfg = TrainConfig(mode="sync", epochs=2, patience=0, ps_shards=2)
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client, on_epoch=on_epoch)
    during = seen["during"]
    job = during["job"]
    assert job in during["names"] and job in during["running"] and not during["closed"]
    assert during["version"] == res.history[0]["rounds"] > 0 and during["pushes"] >= during["version"]
    assert during["n_params"] == res.model.params.size and during["loss"] > 0
    assert [(r["lo"], r["hi"]) for r in during["shards"]] == split_ranges(res.model.params.size, 2)
    assert f"<b>{job}</b> (running)" in during["summary"] and "on 2 parameter-server shards" in during["summary"]
    assert len(during["loss_rounds"]) == during["version"]  # the loss per round, from the first shard
    prom = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in during["metrics"]}
    assert prom["pipeline_rounds_total"] == during["version"] and prom["pipeline_pushes_total"] == during["pushes"]
    # finished: still on the page with its final counters (fetched from the shards at close)
    after = _wait_for_page(client)
    assert after["job"] == job and job in after["names"] and job not in after["running"] and after["closed"]
    assert after["version"] == res.history[-1]["rounds"] == len(after["loss_rounds"])
    assert f"<b>{job}</b> (finished)" in after["summary"]


def _kill_a_shard_mid_epoch(client, procs, used: list[str], killed: list[str]) -> None:
    """SIGKILL the worker of the job's first shard once epoch 1's training tasks run."""
    pids = client.run(os.getpid, workers=used)
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(str(k).startswith("train-chunk-e1-") for keys in client.processing().values() for k in keys):
            by_pid[pids[used[0]]].kill()
            killed.append(used[0])
            return
        time.sleep(0.01)


class _ErredTasks(SchedulerPlugin):
    """Records the keys of the tasks that erred on the scheduler."""

    name = "test-erred-tasks"

    def __init__(self) -> None:
        self.keys: list[str] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "erred":
            self.keys.append(str(key))


def _erred_keys(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.plugins[_ErredTasks.name].keys)


def train_through_a_shard_kill(
    client: Any, shard_procs: list[subprocess.Popen], store: str, cfg: TrainConfig, out: Path
) -> tuple[Any, list[str], list[str], list[str]]:
    """Train ``cfg`` while the worker of the job's first shard is SIGKILLed mid-epoch, a spare
    ps-shard worker joined for it (enough spares for 3 live ones: an earlier kill took some):
    the run's result, the lines it logged, the keys of the tasks that erred and the workers
    killed."""
    import threading

    live = len(shard_workers(client.scheduler_info(n_workers=-1)))
    spares = [_start_shard_worker(client.scheduler.address) for _ in range(max(1, 3 - live))]
    procs = [*shard_procs, *spares]
    client.register_plugin(_ErredTasks())
    try:
        used = _wait_for_shard_workers(client, 3)[:2]  # ShardedParameterServer takes the first, sorted
        said: list[str] = []
        killed: list[str] = []
        killer = threading.Thread(target=_kill_a_shard_mid_epoch, args=(client, procs, used, killed), daemon=True)
        killer.start()
        res = train(store, cfg, out, client=client, log=said.append)
        killer.join()
        erred = client.run_on_scheduler(_erred_keys)
    finally:
        client.unregister_scheduler_plugin(_ErredTasks.name)
        for spare in spares:
            spare.kill()
            spare.wait()
    return res, said, erred, killed


def assert_survived(res: Any, said: list[str], erred: list[str], killed: list[str]) -> None:
    """A run through a shard's loss (:func:`train_through_a_shard_kill`): the shard was killed,
    the job restored from the last checkpoint, and the run ended with every epoch (3) and a
    finite model that learned. The training tasks cut off by the lost shard ended with it as
    their result: no task erred, so no worker logged a "Compute Failed" traceback for a loss
    the run recovers from."""
    assert killed, "no shard worker was killed: the test did not exercise shard loss"
    assert not [k for k in erred if str(k).startswith("train-chunk-")], erred
    assert any("restoring the parameter server from the last checkpoint" in m for m in said), said
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert np.isfinite(res.model.params).all()
    assert res.history[-1]["val_accuracy"] > 0.6, [h["val_accuracy"] for h in res.history]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_shard_worker_is_survived(mode, letter_stores, client, shard_procs, tmp_path):
    """A shard's worker SIGKILLed mid-epoch: the job is placed again on the ps-shard workers
    present (a spare joined for it) from the last checkpoint, the epoch is trained again and
    the run ends with every epoch, a finite model that learned."""
    cfg = TrainConfig(mode=mode, epochs=3, patience=0, ps_shards=2)
    assert_survived(*train_through_a_shard_kill(client, shard_procs, letter_stores[0], cfg, tmp_path / "run"))
