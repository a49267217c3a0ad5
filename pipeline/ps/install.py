"""Installing the parameter server on a scheduler, and wiring it to the dashboard.

Two ways in: the scheduler preload (``dask scheduler --preload pipeline.ps`` calls
:func:`pipeline.ps.dask_setup`), and :class:`InstallParameterServer`, the plugin a driver
registers on a scheduler that was not preloaded. Both go through :func:`install`, which also
hands the extension to the dashboard's Prometheus collector and training page as their
:class:`pipeline.jobview.JobSource`: this module is the only place the two meet.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from pipeline.ps.extension import EXTENSION_NAME, ParameterServerExtension


def install(scheduler: Any, installed_by: str) -> ParameterServerExtension:
    """The scheduler's extension, created (and shown to the dashboard) if it has none yet."""
    ext = scheduler.extensions.get(EXTENSION_NAME)
    if ext is None:
        ext = ParameterServerExtension(scheduler, installed_by=installed_by)
        from pipeline.dashboard import watch

        watch(scheduler, ext)
    return ext


class InstallParameterServer(SchedulerPlugin):
    """Installs the extension on a running scheduler (``client.register_plugin``)."""

    name = "pipeline-ps-installer"

    async def start(self, scheduler: Any) -> None:
        install(scheduler, "plugin")


def register_dashboard_page() -> bool:
    """Put /pipeline in the scheduler dashboard's table of pages; False where it is skipped."""
    # The scheduler reads its table of dashboard pages when it starts its HTTP server, after
    # importing its preloads: registering on import is what puts /pipeline on the dashboard.
    # A worker process never serves that dashboard: it skips the import of Bokeh and the
    # dashboard (~0.5 s of every fresh worker's first training task).
    # Nor does a scheduler started without a dashboard: the LocalCluster of
    # pipeline.connect.cluster_client(dashboard_address=None) says so in the Dask config while
    # its scheduler imports this preload (Bokeh and the dashboard: ~0.4 s of every such start).
    import dask
    from distributed.worker import Worker

    if Worker._instances or not dask.config.get("pipeline.dashboard-page", True):
        return False
    from pipeline.dashboard import register

    return register()


def dask_setup(scheduler: Any) -> None:
    """Preload hook: ``dask scheduler --preload pipeline.ps`` installs the parameter server."""
    install(scheduler, "preload")
