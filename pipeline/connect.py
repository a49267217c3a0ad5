"""Getting a Dask client: an existing scheduler, the current client, or an embedded LocalCluster.

The embedded cluster preloads :mod:`pipeline.ps` into its scheduler exactly like
``dask scheduler --preload pipeline.ps`` does on a real deployment, so both run one code path.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def _tls_from_config() -> bool:
    """Whether the Dask config (``distributed.comm.tls.*``) gives the client a CA and a certificate."""
    import dask

    return bool(
        dask.config.get("distributed.comm.tls.ca-file", None)
        and dask.config.get("distributed.comm.tls.client.cert", None)
    )


def _security(scheduler: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> tuple[str, Any]:
    """The address to connect to and the :class:`~distributed.security.Security` to use (None:
    the Dask config applies). Refuses, as a :class:`PipelineError`, the combinations that would
    otherwise end in a traceback deep inside distributed or in a connection that hangs."""
    given = {"--tls-ca-file": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    scheme = scheduler.split("://", 1)[0].lower() if "://" in scheduler else ""
    if not any(given.values()):
        if scheme == "tls" and not _tls_from_config():
            raise PipelineError(
                f"the scheduler {scheduler!r} uses TLS but no certificates were given: pass "
                "--tls-ca-file, --tls-cert and --tls-key (or set distributed.comm.tls.ca-file and "
                "distributed.comm.tls.client.cert/key in the Dask config)"
            )
        return scheduler, None  # the Dask config (distributed.comm.tls.*) still applies
    for label, path in given.items():
        if path and not os.path.isfile(path):
            raise PipelineError(f"{label} {path!r} does not exist")
    if not (tls_ca and tls_cert):
        missing = " and ".join(k for k in ("--tls-ca-file", "--tls-cert") if not given[k])
        raise PipelineError(f"TLS needs {missing} as well (the key may be in the --tls-cert file or in --tls-key)")
    if not scheme:
        scheduler = f"tls://{scheduler}"
    elif scheme != "tls":
        raise PipelineError(
            f"--tls-* options were given but the scheduler address {scheduler!r} is not tls://; use tls://HOST:PORT"
        )
    from distributed.security import Security

    try:
        security = Security(
            tls_ca_file=tls_ca,
            tls_client_cert=tls_cert,
            tls_client_key=tls_key,
            require_encryption=True,
        )
        security.get_connection_args("client")  # loads the files: bad PEM fails here
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the TLS certificates ({exc})") from None
    return scheduler, security


class QuickExit(WorkerPlugin):
    """A worker plugin for the LocalClusters started here: when its worker closes, every object
    of the process moves to the garbage collector's permanent generation (``gc.freeze()``).

    The worker process then ends without the full collections of interpreter shutdown walking
    the ~170,000 objects its imports (distributed, NumPy, Zarr, Numba and its compiled kernels)
    left: 0.5-0.6 s of every 2-worker cluster's stop here, against 0.06-0.08 s with them frozen,
    which the command that started the cluster waited for. Nothing is left uncollected that
    would have been freed: the process is ending."""

    name = "pipeline-quick-exit"

    def teardown(self, worker: Any) -> None:
        gc.freeze()


class DriverTakesInterrupts(WorkerPlugin):
    """A worker plugin for the LocalClusters started here with worker processes: the worker
    process ignores SIGINT. A terminal's Ctrl-C goes to the command's whole process group, the
    cluster's worker processes included; the command itself checkpoints and then stops the
    cluster, while each worker process stopped on its own with a KeyboardInterrupt traceback of
    its event loop. (A ``dask worker`` started by hand is not touched.)"""

    name = "pipeline-driver-takes-interrupts"

    def setup(self, worker: Any) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # where a signal handler can be set
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class _HeartbeatLost(logging.Filter):
    """Drops a worker's "Failed to communicate with scheduler during heartbeat" error record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and record.msg == _HEARTBEAT_FAILED)


_HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


class QuietSchedulerClose(WorkerPlugin):
    """A worker plugin for the LocalClusters started here with worker processes: the worker does
    not log a heartbeat that the closing scheduler cut off.

    A worker's heartbeat in flight as its scheduler closes fails with a ``CommClosedError``, and
    distributed's worker logs it as an error with a 20-line traceback (dask/distributed#7105),
    printed on the command's terminal after its own error line or summary, in some runs of
    every cluster. These clusters' scheduler lives in the process that started them, which
    reports any failure of its own; a worker process ends with it."""

    name = "pipeline-quiet-scheduler-close"

    def setup(self, worker: Any) -> None:
        log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _HeartbeatLost) for f in log.filters):
            log.addFilter(_HeartbeatLost())


# Dask's workers sample the stacks of their running tasks every 10 ms (distributed's default
# ``distributed.worker.profile.interval``) on their event loop, the loop that also carries the
# parameter server's replies to the training thread. The clusters this project starts sample
# every 100 ms, ten samples a second per worker thread for the dashboard's Profile page and a
# ``--report``: a 2-worker run's steady epochs were 5-15% slower at 10 ms on a 2-core machine
# (bench/findings.md, "Dask's profiler"). An interval set in the Dask config other than the
# default is kept.
PROFILE_INTERVAL = "100ms"
_PROFILE_KEY = "distributed.worker.profile.interval"


def own_cluster_config() -> contextlib.AbstractContextManager:
    """The Dask config a LocalCluster this project starts is made under (its workers read it
    as they start): :data:`PROFILE_INTERVAL` unless the interval was configured."""
    import dask
    from dask.utils import parse_timedelta

    if parse_timedelta(dask.config.get(_PROFILE_KEY, "10ms"), default="ms") != 0.01:
        return contextlib.nullcontext()
    return dask.config.set({_PROFILE_KEY: PROFILE_INTERVAL})


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@contextlib.contextmanager
def _interrupts_held(processes: bool) -> Iterator[list[tuple[int, Any]]]:
    """While a LocalCluster starts: Ctrl-C (SIGINT), and SIGTERM when a Python handler takes it,
    are noted (the list yielded: each signal and the handler it would have run) instead of
    interrupting the start, which would leave workers half started for distributed to close at
    exit with an ``AssertionError`` traceback. The caller acts on them once the cluster is up
    and can be closed; a second signal of the same kind acts at once.

    ``processes``: SIGINT is also blocked in the threads started meanwhile (the event loop's,
    and those that spawn the worker processes), so that the worker processes start with it
    blocked: a terminal's Ctrl-C, sent to the whole process group, reaches the command alone
    and not a worker still importing (which would die with a traceback of its own). The
    multiprocessing resource tracker is started first: starting it unblocks SIGINT in the
    thread that does. Nothing is held off the main thread, where no handler can be set."""
    import signal
    import threading

    held: list[tuple[int, Any]] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous: dict[int, Any] = {}
    starting = [True]  # False while the handlers are put back: noted, never run there

    def _note(signum: int, frame: Any) -> None:
        handler = previous[signum]
        if starting[0] and any(s == signum for s, _ in held):
            handler(signum, frame)  # asked again: now
        held.append((signum, handler))

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = handler
            signal.signal(sig, _note)
    mask = None
    try:
        if processes:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield held
    finally:
        starting[0] = False
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGINT held pending arrives: noted
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _act_on(held: list[tuple[int, Any]]) -> None:
    """Run the handler of the first signal :func:`_interrupts_held` noted (Ctrl-C's raises
    KeyboardInterrupt), if any."""
    if held:
        signum, handler = held[0]
        handler(signum, None)


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
    sites: list[str] | None = None,
) -> Iterator[Any]:
    """Yield a :class:`distributed.Client`: connected to ``scheduler`` if given, else to a new
    LocalCluster of ``workers`` processes (its dashboard address is logged and available as
    ``client.dashboard_link``). ``sites`` (federated): the LocalCluster has one worker per
    site instead, each declaring its site's resource (``SITE=1``), as a site's own workers
    would. Everything started here is closed on exit."""
    from distributed import Client, LocalCluster

    if scheduler:
        scheduler, security = _security(scheduler, tls_ca, tls_cert, tls_key)
        try:
            client = Client(scheduler, timeout=timeout, security=security, set_as_default=True)
        except (OSError, TimeoutError) as exc:
            hint = "check the address and that `dask scheduler` is running"
            if scheduler.startswith("tls://"):
                hint += "; if it is, check that the certificates are signed by the cluster's CA"
            elif "reset" in str(exc).lower():
                hint += "; a scheduler started with TLS needs a tls:// address and --tls-* options"
            when = f" within {timeout:.0f} s" if "timed out" in str(exc).lower() else ""
            raise PipelineError(
                f"cannot reach the Dask scheduler at {scheduler!r}{when} ({_one_line(exc)}); {hint}"
            ) from None
        except ValueError as exc:
            raise PipelineError(
                f"{scheduler!r} is not a scheduler address ({_one_line(exc)}); use tcp://HOST:PORT or tls://HOST:PORT"
            ) from None
        except (RuntimeError, TypeError) as exc:
            if "encryption" not in str(exc) and "TLS" not in str(exc):
                raise
            raise PipelineError(
                f"cannot connect to {scheduler!r}: {_one_line(exc)}; check the address scheme "
                "(tcp:// or tls://) against the --tls-* options and distributed.comm.tls.* config"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1 or threads_per_worker < 1:
        raise PipelineError("--workers and --threads-per-worker must be at least 1")
    import dask

    scheduler_kwargs: dict[str, Any] = {"preload": ["pipeline.ps"]}
    if dashboard_address is None:
        # No dashboard pages; the scheduler's HTTP server (/metrics, /health) still needs a
        # port, and a free one never collides with another cluster's 8787. Nor the training
        # page: the preload then skips importing Bokeh and the dashboard.
        dashboard_address = "127.0.0.1:0"
        scheduler_kwargs["dashboard"] = False
        page = dask.config.set({"pipeline.dashboard-page": False})
    else:
        from pipeline.ps.install import register_dashboard_page

        register_dashboard_page()  # if pipeline.ps was first imported for a cluster without one
        page = contextlib.nullcontext()
    # an interrupt while the cluster starts is acted on once it is up (_interrupts_held): the
    # cluster is then closed here, every worker process ended, before it propagates
    with _interrupts_held(processes) as held:
        with page, own_cluster_config():
            cluster = LocalCluster(
                n_workers=0 if sites else workers,
                threads_per_worker=threads_per_worker,
                processes=processes,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address,
                scheduler_kwargs=scheduler_kwargs,
                host="127.0.0.1",
                protocol="tcp",  # also for processes=False, whose default (inproc://) takes no host
            )
        client = None
        try:
            if sites:
                template = cluster.new_spec
                for name in sites:
                    options = {**template["options"], "resources": {name: 1}}
                    cluster.worker_spec[f"site-{name}"] = {"cls": template["cls"], "options": options}
                cluster.sync(cluster._correct_state)
            client = Client(cluster, set_as_default=True)
            if processes:
                client.register_plugin(QuickExit(), name=QuickExit.name)
                client.register_plugin(DriverTakesInterrupts(), name=DriverTakesInterrupts.name)
                client.register_plugin(QuietSchedulerClose(), name=QuietSchedulerClose.name)
            if sites:
                client.wait_for_workers(len(sites), timeout=120)
        except BaseException:
            _close(client, cluster)
            raise
    try:
        _act_on(held)
        yield client
    finally:
        _close(client, cluster)


def _close(client: Any, cluster: Any) -> None:
    """Close ``client`` (if any), then ``cluster`` and its worker processes."""
    try:
        if client is not None:
            client.close()
    finally:
        cluster.close()
