"""Resuming federated runs only on the data they were trained on (simulated clients and
``--sites``), partitions that are never used for other rows, and Ctrl-C while the local
cluster starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.checkpoint import load_file, save_file
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.loader import held_out_mask
from pipeline.partition import make_partition, open_partition
from pipeline.store import open_store, read_rows_at
from pipeline.synth import synth
from pipeline.train import train
from tests.pipeline.helpers import CLI, cli_env, error_line, invoke, snapshot
from tests.processes import group_members, wait_for

SMALL = {"hidden": [8], "patience": 0, "batch_size": 64}


def as_an_earlier_version_wrote_it(checkpoint: Path, drop: Callable[[dict], object]) -> None:
    """Rewrite ``checkpoint`` with ``drop(meta)`` applied to its record (what a checkpoint of an
    earlier version lacks)."""
    arrays, meta = load_file(checkpoint, "checkpoint")
    drop(meta)
    for key in ("kind", "format_version", "sha256"):
        meta.pop(key)
    save_file(checkpoint, "checkpoint", arrays, meta)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from pipeline.connect import cluster_client

    with cluster_client(workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


# --------------------------------------------------------------------------------------------
# Simulated clients: --resume on the store ingested again
# --------------------------------------------------------------------------------------------


def test_simulated_resume_on_the_store_made_again_is_refused(tmp_path: Path, client: Any, monkeypatch) -> None:
    """The store at the run's path written again with as many, but other, rows: refused before a
    cluster starts (the command) and by the trainer (the API), nothing written; a checkpoint of
    an earlier version, which records no statistics, still resumes (checked on the model)."""
    monkeypatch.chdir(tmp_path)
    store = str(tmp_path / "s.zarr")  # as the workers see it
    synth(store, rows=600, features=4, classes=3, seed=0)
    cfg = TrainConfig.from_dict({**SMALL, "clients": 3, "rounds": 1})
    train(store, cfg, tmp_path / "run", client=client)
    synth(store, rows=600, features=4, classes=3, seed=1, force=True)  # other rows, as many
    before = snapshot(tmp_path / "run")
    line = error_line(invoke("train", store, "--out", "run", "--resume", "--set", "rounds=2", "--workers", "1"))
    assert line.startswith("error: checkpoint 'run/checkpoint.npz' was trained on other data: the feature means"), line
    assert f"of {store!r} differ; it was ingested again, or is another store; resume with the data it" in line
    with pytest.raises(CheckpointError, match="was trained on other data"):
        train(store, cfg.with_overrides(["rounds=2"]), tmp_path / "run", client=client, resume=True)
    assert snapshot(tmp_path / "run") == before
    # an earlier version's checkpoint: resumed on the model's fit alone, its stale partition made again
    as_an_earlier_version_wrote_it(tmp_path / "run" / "checkpoint.npz", lambda meta: meta.pop("store_stats"))
    lines: list[str] = []
    res = train(store, cfg.with_overrides(["rounds=2"]), tmp_path / "run", client=client, resume=True, log=lines.append)
    assert [e["round"] for e in res.history] == [0, 1]
    assert any("partition' was made for other rows of" in ln for ln in lines), lines
    _, meta = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")
    assert meta["store_stats"]["n_rows"] == 600  # recorded again from now on


# --------------------------------------------------------------------------------------------
# Ctrl-C while the local cluster starts
# --------------------------------------------------------------------------------------------


def _spawning_workers(pgid: int) -> bool:
    """Whether a worker process of the command's local cluster has been spawned."""
    for pid in group_members(pgid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile
            continue
    return False


@pytest.mark.parametrize(("to_group", "delay"), [(True, 0.0), (True, 0.25), (False, 0.25)])
def test_ctrl_c_while_the_local_cluster_starts_is_one_line(tmp_path: Path, to_group: bool, delay: float) -> None:
    """Interrupted while its worker processes start (a terminal's Ctrl-C reaches the whole
    process group, the workers still importing included): exit status 130, one line, no
    run directory left and no process of the command's group left running."""
    store = synth(tmp_path / "s.zarr", rows=400, features=4, classes=3, seed=0).path
    out = tmp_path / "run"
    args = ["train", store, "--out", str(out), "--workers", "2", "--set", "epochs=50", "--set", "hidden=[8]", "-q"]
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # a test run started in the background of a non-interactive shell has SIGINT ignored,
        # and children inherit that: give the command the disposition a terminal user has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: _spawning_workers(proc.pid), 60, "the local cluster's worker processes", interval=0.02)
        time.sleep(delay)
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip() == "interrupted (before training started; nothing was written)", err[-3000:]
    assert not out.exists()
    wait_for(lambda: not group_members(proc.pid), 10, "the command's processes to end")


# --------------------------------------------------------------------------------------------
# Simulated clients: a partition is never used for rows it was not made for
# --------------------------------------------------------------------------------------------


def test_a_partition_of_the_store_before_it_was_written_again_is_not_its_partition(tmp_path: Path) -> None:
    """The same path, as many rows, other rows: the partition says it is stale; the same store,
    opened again, keeps its partition."""
    st = synth(tmp_path / "s.zarr", rows=500, features=4, classes=3, seed=0)
    part = make_partition(st, 4, "dirichlet", seed=3, out=tmp_path / "part")
    assert part.mismatch(open_store(st.path), 4, "dirichlet", seed=3) is None
    again = synth(tmp_path / "s.zarr", rows=500, features=4, classes=3, seed=1, force=True)
    problem = open_partition(tmp_path / "part").mismatch(again, 4, "dirichlet", seed=3)
    assert problem is not None and "was made for other rows of" in problem, problem
    from pipeline.partition import store_key

    assert open_partition(tmp_path / "part").meta["store_key"] != store_key(again)


def test_a_resumed_run_partitions_the_store_again_when_its_rows_changed(tmp_path: Path, client: Any) -> None:
    """The store written again with the same rows and statistics but other row chunks: the
    checkpoint resumes (the same data), but the validation rows held out of each chunk are
    others, so the partition made before holds rows that are now validation rows: it is made
    again, and no client trains on a validation row."""
    path = str(tmp_path / "s.zarr")
    synth(path, rows=1200, features=4, classes=3, seed=0, chunk_rows=100)
    cfg = TrainConfig.from_dict({**SMALL, "clients": 4, "rounds": 1, "partition": "iid", "validation": 0.2})
    run = tmp_path / "run"
    train(path, cfg, run, client=client)
    synth(path, rows=1200, features=4, classes=3, seed=0, chunk_rows=300, force=True)
    lines: list[str] = []
    train(path, cfg.with_overrides(["rounds=2"]), run, client=client, resume=True, log=lines.append)
    assert any("was made for other rows of" in ln and "partitioning the store again" in ln for ln in lines), lines
    st = open_store(path)
    part = open_partition(run / "partition")
    held = np.flatnonzero(held_out_mask(st, 0, st.n_rows, 0.2, cfg.seed))
    assigned = np.concatenate([part.rows(k) for k in range(part.n_clients)])
    assert len(np.intersect1d(assigned, held)) == 0
    assert len(assigned) + len(held) == st.n_rows
    from pipeline.partition import store_key

    assert part.meta["store_key"] == store_key(st)


# --------------------------------------------------------------------------------------------
# --sites: --resume when a site's store holds other data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sites_client() -> Iterator[Any]:
    """A LocalCluster of one worker per site (a and b), each declaring its site's resource."""
    from pipeline.connect import cluster_client

    with cluster_client(sites=["a", "b"], dashboard_address=None) as c:
        yield c


def test_a_sites_resume_on_other_data_is_refused(tmp_path: Path, sites_client: Any, monkeypatch) -> None:
    """Site b's store ingested again with other rows: the pooled statistics the model was trained
    with are no longer those of the sites' data, so --resume is refused in one line naming the
    site and what changed, before a round runs and with nothing written; a checkpoint of an
    earlier version, which records no report of the sites' data, still resumes."""
    monkeypatch.chdir(tmp_path)
    synth(tmp_path / "a.zarr", rows=400, features=4, classes=3, seed=0)
    synth(tmp_path / "b.zarr", rows=400, features=4, classes=3, seed=1)
    (tmp_path / "sites.toml").write_text(
        f'[sites.a]\nstore = "{tmp_path / "a.zarr"}"\n[sites.b]\nstore = "{tmp_path / "b.zarr"}"\n'
    )
    cfg = TrainConfig.from_dict({**SMALL, "sites": str(tmp_path / "sites.toml"), "rounds": 1})
    train(None, cfg, "run", client=sites_client)
    synth(tmp_path / "b.zarr", rows=500, features=4, classes=3, seed=2, force=True)
    before = snapshot(tmp_path / "run")
    address = sites_client.scheduler.address
    line = error_line(invoke("train", "--out", "run", "--resume", "--set", "rounds=2", "--scheduler", address, "-q"))
    assert line.startswith(
        "error: checkpoint 'run/checkpoint.npz' was trained on other data: site 'b' reports other data than when "
        "it was admitted, which the run's pooled statistics were made from (its training rows, held-out rows, class "
        "counts and feature sums differ (360 training rows, now 450)); its store "
    ), line
    assert "resume with the data it started with (restore the store of site 'b'), or start a new run" in line
    assert snapshot(tmp_path / "run") == before
    _, meta = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")
    assert meta["federated"]["admitted"]["b"]["data"]["rows"] == 360  # what b's report said
    # a's store alone changed in place: named the same way
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    synth(tmp_path / "b.zarr", rows=400, features=4, classes=3, seed=1, force=True)  # b as it was
    synth(tmp_path / "a.zarr", rows=400, features=4, classes=3, seed=5, force=True)
    with pytest.raises(CheckpointError, match="site 'a' reports other data than when it was admitted"):
        train(None, cfg.with_overrides(["rounds=2"]), "run2", client=sites_client, resume=True)
    # an earlier version's checkpoint (no report of the sites' data): resumed, checked on the model
    as_an_earlier_version_wrote_it(
        tmp_path / "run" / "checkpoint.npz",
        lambda meta: [e.pop("data") for e in meta["federated"]["admitted"].values()],
    )
    res = train(None, cfg.with_overrides(["rounds=2"]), "run", client=sites_client, resume=True)
    assert [e["round"] for e in res.history] == [0, 1]
    _, meta = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")
    assert json.dumps(meta["federated"]["admitted"]["a"]["data"])  # recorded from now on


def test_a_workers_kept_chunks_are_of_the_store_at_the_path_now(tmp_path: Path) -> None:
    """Simulated clients' chunks are kept by a worker between rounds under the job's name, which
    a resumed run keeps: a store re-created at the same path since is read afresh, not served
    from the chunks of the store that was there."""
    from pipeline.fedclient import read_client_rows

    synth(tmp_path / "s.zarr", rows=400, features=4, classes=3, seed=0)
    rows = np.arange(0, 400, 7)
    before = read_client_rows(open_store(tmp_path / "s.zarr"), rows, "fed-resumed")
    shutil.rmtree(tmp_path / "s.zarr")
    synth(tmp_path / "s.zarr", rows=400, features=4, classes=3, seed=1)
    now = open_store(tmp_path / "s.zarr")
    got = read_client_rows(now, rows, "fed-resumed")
    want = read_rows_at(now, rows)
    assert not np.array_equal(before[0], want[0])  # the two stores differ in these rows
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("federated", [False, True], ids=["epochs", "clients"])
def test_relative_paths_from_the_python_api_reach_workers_started_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, federated: bool
) -> None:
    """Worker processes resolve a relative path from the directory they started in: the driver
    sends the store's, the validation store's and the partition's paths made absolute."""
    from distributed import Client, LocalCluster

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    synth(tmp_path / "here" / "s.zarr", rows=600, features=4, classes=3, seed=0)
    synth(tmp_path / "here" / "v.zarr", rows=200, features=4, classes=3, seed=1)
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the worker processes start
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as c:
        monkeypatch.chdir(tmp_path / "here")
        extra = ["clients=2", "rounds=1"] if federated else ["epochs=1", "validation_store=v.zarr"]
        cfg = TrainConfig().with_overrides(["hidden=[4]", "patience=0", *extra])
        res = train("s.zarr", cfg, "run", client=c)
    history = json.loads((tmp_path / "here" / "run" / "history.json").read_text())
    assert res.history and history["epochs"], history
    assert "val_loss" in history["epochs"][-1], history["epochs"][-1]


def test_evaluate_and_predict_from_the_python_api_send_workers_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate_store`` / ``predict_store`` with relative paths, on workers started in another
    directory: the store and the output's temporary reach them as absolute paths."""
    from distributed import Client, LocalCluster

    from pipeline.inference import evaluate_store, predict_store
    from pipeline.model import load_model

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    synth(tmp_path / "here" / "s.zarr", rows=600, features=4, classes=3, seed=0)
    cfg = TrainConfig().with_overrides(["hidden=[4]", "patience=0", "epochs=1"])
    train(str(tmp_path / "here" / "s.zarr"), cfg, tmp_path / "here" / "run", client=None)
    model = load_model(tmp_path / "here" / "run")
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the worker processes start
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc) as c:
        monkeypatch.chdir(tmp_path / "here")
        metrics = evaluate_store(model, "s.zarr", c)
        predict_store(model, "s.zarr", "p.parquet", c)
    assert 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "here" / "p.parquet").is_dir() and not list((tmp_path / "elsewhere").iterdir())
