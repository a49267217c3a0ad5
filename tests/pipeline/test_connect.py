"""pipeline.connect's embedded LocalCluster: its worker processes end quickly when it closes."""

import gc

from pipeline.connect import QuickExit, cluster_client


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


def test_a_threaded_local_cluster_leaves_this_process_alone():
    before = gc.get_freeze_count()
    with cluster_client(workers=1, threads_per_worker=1, dashboard_address=None, processes=False) as c:
        assert QuickExit.name not in next(iter(c.run(_plugins).values()))
    assert gc.get_freeze_count() == before
