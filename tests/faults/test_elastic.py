"""A cluster that changes under a training run: workers that join mid-run, and a run resumed in
the middle of an epoch on more worker threads than it started with. Every cluster is `dask
scheduler --preload pipeline.ps` plus `dask worker --no-nanny` subprocesses; training runs as a
`pipeline train` subprocess.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pipeline.checkpoint import load_file
from tests.processes import Procs, wait_for

from .conftest import FAST, finish, history

# every worker thread holds a sync share even on this small store
SYNC = ("--set", "mode=sync", *FAST)


def _checkpoint_meta(run: Path) -> dict:
    try:
        return load_file(run / "checkpoint.npz", "checkpoint")[1]
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return {}


def _mid_epoch(meta: dict) -> bool:
    """The checkpoint holds rounds of the epoch it names (written in the middle of it)."""
    epoch = meta.get("epoch", -1)
    return any(k.startswith(f"e{epoch}-") and n > 0 for k, n in (meta.get("progress") or {}).items())


def _stop(proc, timeout: float = 60) -> str:
    """SIGTERM (a checkpoint is written) and wait for the command to end."""
    proc.popen.send_signal(signal.SIGTERM)
    return finish(proc, timeout)


def _finish(proc, timeout: float) -> str:
    out = finish(proc, timeout)
    assert proc.popen.returncode == 0, out[-3000:]
    return out


@pytest.mark.timeout(240)
def test_sync_worker_joining_mid_run_holds_a_share_from_the_next_epoch(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    _, addr = procs.scheduler()
    procs.worker(addr, "w0", nanny=False)
    run = tmp_path / "run"
    # aggregate = "mean": a run may grow its shares ("sum" keeps as many as it started with)
    train = procs.train(small_store, addr, run, "--set", "epochs=1000", "--set", "aggregate=mean", *SYNC)
    wait_for(lambda: _checkpoint_meta(run).get("epoch", 0) >= 1 or not train.alive(), 120, "the first epoch")
    assert train.alive(), train.text()[-3000:]
    procs.worker(addr, "w1", nanny=False)

    def two_shares() -> bool:
        return any(len(e["tasks"]) == 2 for e in _checkpoint_meta(run).get("history", [])) or not train.alive()

    wait_for(two_shares, 120, "an epoch trained in two sync shares")
    out = _stop(train)
    epochs = _checkpoint_meta(run)["history"]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs)))  # no epoch lost
    assert len(epochs[0]["tasks"]) == 1
    joined = next(i for i, e in enumerate(epochs) if len(e["tasks"]) == 2)
    assert all(e["samples"] == epochs[0]["samples"] for e in epochs), [e["samples"] for e in epochs]
    line = next((ln for ln in out.splitlines() if "worker(s) joined" in ln), "")
    assert line.startswith(f"epoch {joined + 1}: 2 worker thread(s) (was 1; 1 worker(s) joined: "), out[-3000:]
    assert line.endswith(", 2 sync share(s)"), line


@pytest.mark.timeout(240)
def test_sync_run_resumed_mid_epoch_on_more_threads_keeps_the_epochs_shares(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    _, addr = procs.scheduler()
    for name in ("w0", "w1"):  # slow steps: an epoch lasts long enough to be stopped inside it
        procs.worker(addr, name, "--preload", "slowpatch", nanny=False, FAULTS_SLOW_STEP="0.1")
    run = tmp_path / "run"
    train = procs.train(small_store, addr, run, "--set", "epochs=2", "--set", "checkpoint_seconds=0.3", *SYNC)
    wait_for(lambda: _mid_epoch(_checkpoint_meta(run)) or not train.alive(), 120, "a checkpoint inside an epoch")
    assert train.alive(), train.text()[-3000:]
    _stop(train)
    meta = _checkpoint_meta(run)
    assert _mid_epoch(meta), meta.get("progress")
    epoch = meta["epoch"]
    # the shares' positions the server holds: a resume must give them the same rows
    assert sorted(k for k in meta["progress"] if k.startswith(f"e{epoch}-")) == [f"e{epoch}-s0", f"e{epoch}-s1"]

    procs.worker(addr, "w2", nanny=False)
    resumed = procs.train(small_store, addr, run, "--resume")
    out = _finish(resumed, 180)
    epochs = history(run)["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    names = [t["name"] for t in epochs[epoch]["tasks"]]
    assert sorted(names) == [f"e{epoch}-s0", f"e{epoch}-s1"], names
    # the epoch counts the rows trained before the stop too: every training row, as the other epoch
    full = epochs[1 - epoch]["samples"]
    assert epochs[epoch]["samples"] == full == sum(t["samples"] for t in epochs[epoch]["tasks"]), epochs
    assert (
        f"epoch {epoch + 1}: 3 worker thread(s), 2 sync share(s): the split this epoch started with over 2 thread(s)"
        in out
    ), out[-3000:]
    if epoch == 0:  # the next epoch: aggregate = "sum", so no more shares than the run started with
        assert len(epochs[1]["tasks"]) == 2, epochs[1]["tasks"]
        assert "epoch 2: 3 worker thread(s), 2 sync share(s), as many as the run started with" in out, out[-3000:]


@pytest.mark.timeout(240)
def test_an_async_epoch_resumed_after_some_of_its_tasks_records_their_rows(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    """Stopped after some of an async epoch's tasks had finished: the resumed epoch runs only the
    others, and it recorded only their rows; the checkpoint now keeps what the finished tasks
    trained, so the epoch's samples are all its training rows, as the uninterrupted epoch's."""
    _, addr = procs.scheduler()
    for name in ("w0", "w1"):
        procs.worker(addr, name, "--preload", "slowpatch", nanny=False, FAULTS_SLOW_STEP="0.05")
    run = tmp_path / "run"
    args = ("--set", "epochs=2", "--set", "checkpoint_seconds=0.3", "--set", "mode=async", "--set", "patience=0")
    train = procs.train(small_store, addr, run, *args, "--set", "hidden=[32]", "--set", "batch_size=128")
    wait_for(lambda: bool(_checkpoint_meta(run).get("done_tasks")) or not train.alive(), 120, "a task finished")
    assert train.alive(), train.text()[-3000:]
    _stop(train)
    meta = _checkpoint_meta(run)
    epoch, done = meta["epoch"], meta["done_tasks"]
    assert done and sorted(meta["done_results"]) == sorted(done), meta.get("done_results")
    _finish(procs.train(small_store, addr, run, "--resume"), 180)
    epochs = history(run)["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    full = epochs[1 - epoch]["samples"]
    assert epochs[epoch]["samples"] == full == sum(t["samples"] for t in epochs[epoch]["tasks"]), epochs
    assert len(epochs[epoch]["tasks"]) == len(epochs[1 - epoch]["tasks"])
    assert epochs[epoch]["train_loss"] > 0
