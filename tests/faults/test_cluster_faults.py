"""Faults on a real deployment: workers and the scheduler killed, divergence, a corrupted chunk,
a slow worker. Every cluster is `dask scheduler --preload pipeline.ps` plus `dask worker --no-nanny`
subprocesses (a killed worker stays dead), training runs as a `pipeline train` subprocess.

(A worker SIGKILLed mid-task in each mode is covered by tests/pipeline/test_train.py.)
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import load_file
from tests.processes import PIPELINE, Procs, wait_for

from .conftest import FAST, error_line, fault_procs, finish, history, wait_workers


def _checkpoint_epoch(run: Path) -> int:
    try:
        return int(load_file(run / "checkpoint.npz", "checkpoint")[1]["epoch"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return -1


@pytest.mark.timeout(240)
def test_all_workers_killed_then_a_new_worker_joins(procs: Procs, small_store: Path, tmp_path: Path) -> None:
    _, addr, workers = procs.cluster("w0", "w1", nanny=False)
    run = tmp_path / "run"
    train = procs.train(
        small_store, addr, run, "--set", "epochs=6", "--set", "mode=sync", "--set", "no_worker_timeout=90", *FAST
    )
    wait_for(lambda: _checkpoint_epoch(run) >= 1 or not train.alive(), 120, "the first epoch")
    assert train.alive(), train.text()
    for w in workers:
        w.kill()
    time.sleep(4)  # capacity is gone for a while: the driver must wait, not fail or hang
    assert train.alive(), train.text()
    procs.worker(addr, "w-new", nanny=False)
    out = finish(train, 150)
    assert train.popen.returncode == 0, out[-3000:]
    h = history(run)
    assert [e["epoch"] for e in h["epochs"]] == list(range(6))


@pytest.mark.timeout(120)
def test_no_worker_returns_fails_with_one_line_after_no_worker_timeout(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    _, addr, workers = procs.cluster("w0", "w1", nanny=False)
    run = tmp_path / "run"
    train = procs.train(
        small_store, addr, run, "--set", "epochs=50", "--set", "mode=async", "--set", "no_worker_timeout=4", *FAST
    )
    wait_for(lambda: _checkpoint_epoch(run) >= 1 or not train.alive(), 90, "the first epoch")
    for w in workers:
        w.kill()
    t0 = time.monotonic()
    out = finish(train, 60)
    elapsed = time.monotonic() - t0
    assert train.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert line.startswith("error: no workers for 4 s"), line
    assert "--resume" in line
    assert 4 <= elapsed < 40, elapsed
    arrays, meta = load_file(run / "checkpoint.npz", "checkpoint")  # intact, resumable
    assert np.isfinite(arrays["params"]).all() and meta["epoch"] >= 1


@pytest.mark.timeout(240)
def test_scheduler_killed_then_resume_on_a_new_scheduler(procs: Procs, small_store: Path, tmp_path: Path) -> None:
    sched, addr, workers = procs.cluster("a0", "a1", nanny=False)
    run = tmp_path / "run"
    epochs = 8
    train = procs.train(
        small_store,
        addr,
        run,
        "--set",
        f"epochs={epochs}",
        "--set",
        "mode=async",
        "--set",
        "checkpoint_seconds=0.5",
        *FAST,
    )
    wait_for(lambda: _checkpoint_epoch(run) >= 2 or not train.alive(), 150, "two epochs")
    assert train.alive(), train.text()
    sched.kill()
    out = finish(train, 90)  # the driver must notice and stop, not hang
    assert train.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert "scheduler" in line and "--resume" in line, line
    for w in workers:
        w.kill()
    arrays, meta = load_file(run / "checkpoint.npz", "checkpoint")
    done = int(meta["epoch"])
    assert done >= 2 and [e["epoch"] for e in meta["history"]] == list(range(done))

    _, addr2, _ = procs.cluster("b0", "b1", nanny=False)
    resumed = procs.start(
        "resume", [PIPELINE, "train", str(small_store), "--resume", "--out", str(run), "--scheduler", addr2]
    )
    out = finish(resumed, 150)
    assert resumed.popen.returncode == 0, out[-3000:]
    h = history(run)
    assert [e["epoch"] for e in h["epochs"]] == list(range(epochs))  # nothing lost, nothing twice
    assert h["epochs"][:done] == meta["history"]


# ---------------------------------------------------------------------------------------------
# One cluster for the tests that do not kill it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    p = fault_procs(tmp_path_factory.mktemp("cluster"))
    try:
        _, addr = p.scheduler()
        p.worker(addr, "fast", nanny=False)
        p.worker(addr, "slow", "--preload", "slowpatch", nanny=False, FAULTS_SLOW_STEP="0.03")
        wait_workers(addr, 2)
        yield p, addr
    finally:
        p.close()


@pytest.mark.timeout(120)
def test_divergence_stops_with_the_round_and_keeps_the_last_good_checkpoint(
    cluster, small_store: Path, tmp_path: Path
) -> None:
    procs, addr = cluster
    run = tmp_path / "run"
    # a sane first epoch, so there is a good checkpoint to keep ...
    first = procs.train(small_store, addr, run, "--set", "epochs=1", "--set", "mode=async", *FAST)
    assert finish(first, 90) and first.popen.returncode == 0, first.text()[-3000:]
    good, _ = load_file(run / "checkpoint.npz", "checkpoint")
    # ... then resume it with a server step that overflows float32
    bad = procs.start(
        "diverge",
        [
            PIPELINE,
            "train",
            str(small_store),
            "--resume",
            "--out",
            str(run),
            "--scheduler",
            addr,
            "--set",
            "epochs=3",
            "--set",
            "server_lr=1e30",
        ],
    )
    out = finish(bad, 90)
    assert bad.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert "diverged at round" in line and "lower the learning rate" in line, line
    arrays, meta = load_file(run / "checkpoint.npz", "checkpoint")
    assert np.isfinite(arrays["params"]).all()
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(arrays["params"], good["params"])


@pytest.mark.timeout(120)
def test_corrupted_chunk_is_named_by_train_and_inspect(cluster, small_store: Path, tmp_path: Path) -> None:
    procs, addr = cluster
    store = tmp_path / "bad.zarr"
    shutil.copytree(small_store, store)
    chunk = store / "X" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    for i in range(0, len(data), 97):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data[: len(data) - 5]))  # flipped and truncated
    train = procs.train(store, addr, tmp_path / "run", "--set", "epochs=2", "--set", "validation=0", *FAST)
    out = finish(train, 90)
    assert train.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert "chunk 3" in line and str(store) in line, line
    insp = procs.start("inspect", [PIPELINE, "inspect", str(store), "--verify"])
    out = finish(insp, 60)
    assert insp.popen.returncode == 1
    line = error_line(out)
    assert "chunk 3" in line and str(store) in line, line


def _clocks(addr: str, stop: threading.Event, samples: list) -> None:
    """Sample every live participant's clock (pushes counted by the ssp barrier) and worker."""
    from distributed import Client

    def read(dask_scheduler) -> list:
        ext = dask_scheduler.extensions["pipeline_ps"]
        return [{n: (p.clock, p.worker) for n, p in st.participants.items()} for st in ext.jobs.values()]

    with Client(addr, timeout=10) as c:
        while not stop.is_set():
            samples.extend(c.run_on_scheduler(read))
            time.sleep(0.05)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["async", "ssp", "sync"])
def test_slow_worker_does_not_hold_back_the_fast_one(cluster, small_store: Path, tmp_path: Path, mode: str) -> None:
    procs, addr = cluster
    run = tmp_path / "run"
    staleness = 2
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_clocks, args=(addr, stop, samples), daemon=True)
    sampler.start()
    try:
        train = procs.train(
            small_store,
            addr,
            run,
            "--set",
            "epochs=2",
            "--set",
            f"mode={mode}",
            "--set",
            f"staleness={staleness}",
            "--set",
            "validation=0",
            *FAST,
        )
        out = finish(train, 120)
    finally:
        stop.set()
        sampler.join(30)
    assert train.popen.returncode == 0, out[-3000:]
    h = history(run)
    assert [e["epoch"] for e in h["epochs"]] == [0, 1]
    assert h["epochs"][-1]["rounds"] > 0
    per_worker: dict[str, int] = {}
    for e in h["epochs"]:
        for t in e["tasks"]:
            per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + t["samples"]
    by_name = _worker_names(addr)
    fast, slow = per_worker.get(by_name["fast"], 0), per_worker.get(by_name["slow"], 0)
    if mode == "async":
        # dynamic placement and no barrier: the fast worker takes most of the rows
        assert fast > 2 * slow > 0, per_worker
    if mode == "ssp":
        # the fast worker runs ahead, but never more than the staleness bound
        assert fast > slow > 0, per_worker
        both = [s for s in samples if len({w for _, w in s.values()}) == 2]
        assert both, "never saw both workers training at once"
        leads = [max(c for c, _ in s.values()) - min(c for c, _ in s.values()) for s in both]
        assert max(leads) <= staleness + 1, max(leads)
    if mode == "sync":
        # every round had both participants: both workers trained in each epoch
        for e in h["epochs"]:
            assert len({t["worker"] for t in e["tasks"]}) == 2, e["tasks"]


def _worker_names(addr: str) -> dict[str, str]:
    from distributed import Client

    with Client(addr, timeout=10) as c:
        return {w["name"]: a for a, w in c.scheduler_info(n_workers=-1)["workers"].items()}


def test_slowpatch_is_test_only() -> None:
    """The slow-worker preload lives with the tests and nothing in production imports it."""
    root = Path(__file__).resolve().parents[2]
    sources = [f for sub in ("pipeline", "kernels") for f in (root / sub).rglob("*.py")]
    assert root / "pipeline" / "__init__.py" in sources and root / "kernels" / "__init__.py" in sources
    for f in sources:
        assert "slowpatch" not in f.read_text(), f
    assert os.path.isfile(Path(__file__).with_name("slowpatch.py"))
