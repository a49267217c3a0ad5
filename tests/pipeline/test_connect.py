"""pipeline.connect's embedded LocalCluster: its worker processes end quickly when it closes, leave
Ctrl-C to the command, and its scheduler imports no dashboard it will not serve."""

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.connect import DriverTakesInterrupts, QuickExit, QuietSchedulerClose, cluster_client


def _freeze_count(dask_worker) -> int:
    return gc.get_freeze_count()


def _plugins(dask_worker) -> list[str]:
    return sorted(dask_worker.plugins)


def test_local_workers_freeze_their_objects_when_they_close():
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        assert all(QuickExit.name in p for p in c.run(_plugins).values())
        assert set(c.run(_freeze_count).values()) == {0}
        # the plugin's teardown is what a closing worker runs: removing it runs it now
        c.unregister_worker_plugin(QuickExit.name)
        counts = c.run(_freeze_count).values()
        assert all(n > 10_000 for n in counts), counts  # distributed, NumPy, Zarr...: all frozen


def _sigint_ignored(dask_worker) -> bool:
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_local_worker_processes_leave_ctrl_c_to_the_command():
    """A terminal's Ctrl-C reaches the whole process group: the worker processes ignore it (the
    command checkpoints and stops the cluster), so they neither die nor print tracebacks."""
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        assert all(DriverTakesInterrupts.name in p for p in c.run(_plugins).values())
        assert set(c.run(_sigint_ignored).values()) == {True}
        pids = c.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert c.run(os.getpid) == pids  # the same processes, still answering
        assert c.submit(sum, [1, 2], pure=False).result(timeout=30) == 3


def _worker_logs(dask_worker) -> list[str]:
    """What distributed's worker logger passes on: the error its heartbeat logs when the
    scheduler's comm closes under it (distributed.worker.Worker.heartbeat), then another error."""
    import logging

    from distributed.comm.core import CommClosedError

    log = logging.getLogger("distributed.worker")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        try:
            raise CommClosedError("in <TCP (closed) ConnectionPool.heartbeat_worker>: Stream is closed")
        except OSError:
            log.exception("Failed to communicate with scheduler during heartbeat.")
        try:
            raise CommClosedError("Stream is closed")
        except OSError:
            log.exception("Worker stream died during communication")
    finally:
        log.removeHandler(handler)
    return seen


def test_local_workers_log_no_heartbeat_cut_off_by_the_closing_scheduler():
    """A heartbeat in flight as the cluster's scheduler closes: its traceback was printed after
    the command's own one-line error. The worker processes drop that one record, no other."""
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        assert all(QuietSchedulerClose.name in p for p in c.run(_plugins).values())
        assert list(c.run(_worker_logs).values()) == [["Worker stream died during communication"]] * 2


def test_a_threaded_local_cluster_leaves_this_process_alone():
    before = gc.get_freeze_count()
    handler = signal.getsignal(signal.SIGINT)
    with cluster_client(workers=1, threads_per_worker=1, dashboard_address=None, processes=False) as c:
        plugins = next(iter(c.run(_plugins).values()))
        assert not {QuickExit.name, DriverTakesInterrupts.name, QuietSchedulerClose.name} & set(plugins)
    assert gc.get_freeze_count() == before
    assert signal.getsignal(signal.SIGINT) is handler


_DASHBOARD_OR_NOT = """
import sys
import urllib.request

from pipeline.connect import cluster_client

if __name__ == "__main__":
    with cluster_client(workers=1, dashboard_address=None):
        print("without a dashboard, bokeh imported:", "bokeh" in sys.modules)
    with cluster_client(workers=1, dashboard_address="127.0.0.1:0") as c:
        page = c.dashboard_link.replace("/status", "/pipeline")
        print("then with one, the training page:", urllib.request.urlopen(page, timeout=60).status)
"""


def test_a_cluster_without_a_dashboard_skips_bokeh_and_a_later_one_has_the_training_page(tmp_path):
    """The embedded cluster's scheduler imports the parameter server as its preload; without a
    dashboard that no longer imports Bokeh and the dashboard (~0.4 s of the start), and a later
    cluster of the same process with a dashboard still serves the training page."""
    script = tmp_path / "dash.py"
    script.write_text(_DASHBOARD_OR_NOT)
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "without a dashboard, bokeh imported: False" in r.stdout, r.stdout
    assert "then with one, the training page: 200" in r.stdout, r.stdout


def _profile_interval_ms(dask_worker) -> float:
    return dask_worker.periodic_callbacks["profile"].callback_time


def _busy(seconds: float) -> int:
    import time

    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def test_own_clusters_sample_the_profile_every_100ms_unless_configured():
    """The workers of a cluster this project starts sample their tasks' stacks every 100 ms
    (Dask's default is 10 ms) and still fill the profile; an interval set in the Dask config is
    kept."""
    import dask

    from pipeline.connect import PROFILE_INTERVAL

    assert PROFILE_INTERVAL == "100ms"
    with cluster_client(workers=1, dashboard_address=None) as client:
        assert list(client.run(_profile_interval_ms).values()) == [100]
        client.submit(_busy, 1.0, pure=False).result()
        assert client.profile()["count"] > 0  # samples were taken while the task ran
    assert dask.config.get("distributed.worker.profile.interval") == "10ms"  # only for that cluster
    with dask.config.set({"distributed.worker.profile.interval": "30ms"}):
        with cluster_client(workers=1, dashboard_address=None) as client:
            assert list(client.run(_profile_interval_ms).values()) == [30]
