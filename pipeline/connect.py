"""Getting a Dask client: an existing scheduler, the current client, or an embedded LocalCluster.

The embedded cluster preloads :mod:`pipeline.ps` into its scheduler exactly like
``dask scheduler --preload pipeline.ps`` does on a real deployment, so both run one code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def _security(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> Any:
    if not (tls_ca or tls_cert or tls_key):
        return None  # the Dask config (distributed.comm.tls.*) still applies
    from distributed.security import Security

    for label, path in (("--tls-ca-file", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and not os.path.isfile(path):
            raise PipelineError(f"{label} {path!r} does not exist")
    return Security(
        tls_ca_file=tls_ca, tls_client_cert=tls_cert, tls_client_key=tls_key, require_encryption=True
    )


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None,
    *,
    workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    dashboard_address: str | None = ":0",
    timeout: float = 10.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    processes: bool = True,
) -> Iterator[Any]:
    """Yield a :class:`distributed.Client`: connected to ``scheduler`` if given, else to a new
    LocalCluster of ``workers`` processes (its dashboard address is logged and available as
    ``client.dashboard_link``). Everything started here is closed on exit."""
    from distributed import Client, LocalCluster

    if scheduler:
        security = _security(tls_ca, tls_cert, tls_key)
        try:
            client = Client(scheduler, timeout=timeout, security=security, set_as_default=True)
        except (OSError, TimeoutError) as exc:
            raise PipelineError(
                f"cannot reach the Dask scheduler at {scheduler!r} within {timeout:.0f} s ({exc}); "
                "check the address and that `dask scheduler` is running"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1 or threads_per_worker < 1:
        raise PipelineError("--workers and --threads-per-worker must be at least 1")
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        memory_limit=memory_limit,
        dashboard_address=dashboard_address,
        scheduler_kwargs={"preload": ["pipeline.ps"]},
        host="127.0.0.1",
    )
    try:
        with Client(cluster, set_as_default=True) as client:
            yield client
    finally:
        cluster.close()
