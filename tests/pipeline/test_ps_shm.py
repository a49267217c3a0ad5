"""Same-host transport of the parameter server (pipeline.ps.shm): segments, their checks and
lifecycle, and training runs whose weights do not depend on the transport."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.ps import EXTENSION_NAME, ParameterServer, PSError
from pipeline.ps import shm as shmem
from pipeline.ps.job import SHM_DELTA, Job

SHM_DIR = Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")


def _segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob("pps-*")}


@needs_dev_shm
def test_a_segment_is_written_once_and_read_by_name_with_its_nonce():
    seg = shmem.Segment(1000)
    try:
        assert seg.name in _segments()
        peer = shmem.attach(seg.describe(), 1000)
        assert peer is not None
        vec = np.arange(1000, dtype=np.float32)
        seg.write(vec, version=7)
        got = peer.read(7)
        np.testing.assert_array_equal(got, vec)
        got[0] = -1.0  # a copy: the segment is unchanged
        assert peer.data[0] == 0.0
        assert peer.read(6) is None  # another version than the reply names: not these weights
        peer.data[:] = 3.0  # a participant's push segment: written on its side, read on the server's
        assert float(seg.data.sum()) == 3000.0
        peer.close()
        peer.close()  # twice is harmless
    finally:
        seg.close()
    assert seg.name not in _segments()  # the server's segment is unlinked with it


@needs_dev_shm
def test_only_the_servers_own_segment_of_the_right_length_attaches():
    seg = shmem.Segment(100)
    try:
        desc = seg.describe()
        assert shmem.attach({**desc, "nonce": desc["nonce"] ^ 1}, 100) is None  # not the server's
        assert shmem.attach(desc, 101) is None  # another model
        assert shmem.attach({"name": "pps-0000000000000000", "nonce": 1}, 100) is None  # another host
        assert shmem.attach({"name": "../etc/passwd", "nonce": 1}, 100) is None  # not a segment name
        assert shmem.attach(None, 100) is None
        assert shmem.attach(desc, 100) is not None
    finally:
        seg.close()


@needs_dev_shm
def test_a_read_overlapping_a_write_is_refused():
    seg = shmem.Segment(10)
    try:
        seg.write(np.ones(10, np.float32), version=1)
        peer = shmem.attach(seg.describe(), 10)
        seq = int(seg.head[2])
        seg.head[2] = seq + 1  # a writer in the middle of its copy
        assert peer.read(1) is None
        seg.head[2] = seq
        np.testing.assert_array_equal(peer.read(1), np.ones(10, np.float32))
        peer.close()
    finally:
        seg.close()


def _job(mode: str = "sync", compression: str = "none") -> Job:
    return Job.create("shm-test", np.zeros(8, np.float32), 8, mode=mode, compression=compression)


@needs_dev_shm
@pytest.mark.parametrize(("mode", "compression"), [("async", "none"), ("ssp", "none"), ("sync", "fp16")])
def test_rounds_that_cannot_use_shared_memory_get_no_segment(mode, compression):
    job = _job(mode, compression)
    r = job.join("a", shm=True)
    assert "shm" not in r and not job.shm_push and job.shm_weights is None


@needs_dev_shm
def test_participants_past_the_jobs_shared_memory_budget_use_tcp(monkeypatch):
    # room for the weights segment and one push segment of 8 floats (96 bytes each), not two
    monkeypatch.setattr(shmem, "budget", lambda: 2 * (shmem.HEADER + 32))
    job = _job()
    assert "shm" in job.join("a", shm=True)
    assert "shm" not in job.join("b", shm=True)
    assert sorted(job.shm_push) == ["a"]
    job.close()
    assert not job.shm_push and job.shm_weights is None


@needs_dev_shm
def test_a_push_from_shared_memory_needs_the_participants_segment():
    async def go() -> None:
        job = _job()
        job.join("a")  # no segment asked for
        with pytest.raises(PSError, match="no shared-memory segment"):
            await job.push("a", 0, SHM_DELTA, samples=1, batches=1, loss=0.1)
        job.close()

    import asyncio

    asyncio.run(go())


@needs_dev_shm
def test_a_sync_round_through_shared_memory_equals_the_round_over_the_wire():
    """Two participants, one with segments and one without: the weights after the round are
    the same whichever way each delta came, the shared-memory reply names the version that the
    weights segment holds, and leaving / closing unlinks every segment."""
    import asyncio

    async def go() -> None:
        job = _job()
        job.expect(["a", "b"], [None, None])
        ra = job.join("a", shm=True)
        job.join("b")
        assert set(ra["shm"]) == {"weights", "push"}
        seg_w = shmem.attach(ra["shm"]["weights"], 8)
        seg_p = shmem.attach(ra["shm"]["push"], 8)
        seg_p.data[:] = np.full(8, 0.5, np.float32)
        pa = asyncio.ensure_future(job.push("a", 0, SHM_DELTA, samples=1, batches=1, loss=0.1))
        rb = await job.push("b", 0, np.full(8, 1.5, np.float32), samples=3, batches=1, loss=0.2)
        rep = await pa
        assert rep["shm"] is True and "params" not in rep and rep["version"] == 1
        np.testing.assert_array_equal(seg_w.read(1), np.asarray(rb["params"].data))
        assert job.bytes_shm == 2 * 8 * 4  # one delta in, one set of weights out
        seg_w.close()
        seg_p.close()
        names = {ra["shm"]["weights"]["name"], ra["shm"]["push"]["name"]}
        job.leave("a")
        assert ra["shm"]["push"]["name"] not in _segments()
        job.close()
        assert not names & _segments()

    asyncio.run(go())


@needs_dev_shm
def test_a_job_created_again_over_one_with_segments_unlinks_them(client):
    """``ps_create(overwrite=True)`` replaces a job: the old job's segments are unlinked."""
    ps = ParameterServer("shm-overwrite", client)
    ps.create(np.zeros(16, np.float32), mode="sync")
    names = {seg["name"] for seg in ps.join("a", shm=True)["shm"].values()}
    assert names <= _segments()
    ps.create(np.zeros(16, np.float32), mode="sync", overwrite=True)
    assert not names & _segments()
    ps.close()


@pytest.fixture(scope="module")
def client():
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        yield c


def _finished_bytes_shm(client) -> int:
    def get(dask_scheduler) -> int:
        return int(dask_scheduler.extensions[EXTENSION_NAME].finished[-1]["bytes_shm"])

    return client.run_on_scheduler(get)


@needs_dev_shm
def test_training_weights_do_not_depend_on_the_transport(client, letter_stores, tmp_path, monkeypatch):
    """The same sync run with shared memory (the default) and over TCP only: the same weights,
    average and local optimizer states bit for bit; the default run moved its vectors through
    shared memory, the other none, and neither left a segment behind.

    The server (in this process: the LocalCluster's scheduler) names every segment it creates
    through ``shm._name``; the names are recorded as they are drawn, so the check is of this
    run's segments whatever other processes on the machine create in /dev/shm meanwhile."""
    from pipeline.checkpoint import load_file
    from pipeline.config import TrainConfig
    from pipeline.train import train

    created: dict[bool, list[str]] = {True: [], False: []}
    draw = shmem._name
    moved, arrays = {}, {}
    for flag in (True, False):
        monkeypatch.setattr(shmem, "_name", lambda flag=flag: created[flag].append(draw()) or created[flag][-1])
        cfg = TrainConfig(mode="sync", epochs=2, patience=0, hidden=[32], min_share_gflop=0, ps_shared_memory=flag)
        train(letter_stores[0], cfg, tmp_path / f"shm-{flag}", client=client)
        moved[flag] = _finished_bytes_shm(client)
        arrays[flag], _ = load_file(tmp_path / f"shm-{flag}" / "checkpoint.npz", "checkpoint")
    assert moved[True] > 0 and moved[False] == 0
    assert created[True] and not created[False]  # segments only where shared memory was asked for
    assert sorted(arrays[True]) == sorted(arrays[False])
    for name in arrays[True]:
        np.testing.assert_array_equal(arrays[True][name], arrays[False][name], err_msg=name)
    assert not set(created[True]) & _segments()  # every segment of the runs was unlinked


_SERVER_KILLED = """
import os, sys, time
from pipeline.ps import shm
seg = shm.create(1000)
print(seg.name, flush=True)
time.sleep(600)
"""


@needs_dev_shm
def test_segments_of_a_server_killed_with_its_resource_tracker_are_swept(monkeypatch):
    """A server SIGKILLed together with its resource tracker (its process group) leaves its
    segments in /dev/shm; the next server to create one on the host unlinks them, and never a
    segment of a live process or one named otherwise."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_KILLED],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        left = proc.stdout.readline().strip()
        assert shmem._OWNED.match(left), left
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert left in _segments()  # nothing ran to unlink it
    foreign = SHM_DIR / "pps-0-1-deadbeef"  # another PID namespace's: left alone
    foreign.write_bytes(b"")
    monkeypatch.setattr(shmem, "_SWEPT", True)  # (creating this process's own does not sweep yet)
    mine = shmem.create(10)  # this process is alive: its segment stays
    try:
        monkeypatch.setattr(shmem, "_SWEPT", False)
        assert shmem.sweep_stale() >= 1
        assert left not in _segments()
        assert mine.name in _segments() and foreign.exists()
        monkeypatch.setattr(shmem, "_SWEPT", False)
        assert shmem.sweep_stale() == 0  # nothing left to remove
    finally:
        mine.close()
        foreign.unlink()
