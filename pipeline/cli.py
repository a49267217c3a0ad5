"""The ``pipeline`` command.

Every command reports a failure the user can fix as one line on stderr and exits non-zero
(1 for a :class:`~pipeline.errors.PipelineError`, 2 for a usage error); ``--verbose`` adds the
traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import PipelineError


class _Group(click.Group):
    """Turns :class:`PipelineError` into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            click.echo(f"interrupted ({exc})" if str(exc) else "interrupted", err=True)
            ctx.exit(143 if str(exc) == "SIGTERM" else 130)  # 128 + the signal, as a shell reports it


@click.group(name="pipeline", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Out-of-core neural-network training on Dask.

    \b
    Typical session:
      pipeline ingest data/letter/letter-recognition.data letter.zarr --target 0
      pipeline inspect letter.zarr
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    if not verbose:
        # Dask logs every worker start and stop at INFO; keep the terminal for training.
        # The environment variable reaches the worker processes a local cluster spawns.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _OneLineDaskErrors.reports_lost_scheduler = False  # until a command that reports it says so
    if not verbose:
        quiet = _OneLineDaskErrors()
        for name in ("", *_OneLineDaskErrors._SOURCES):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(quiet)


class _OneLineDaskErrors(logging.Filter):
    """Keeps Dask's own error logs to one line each when ``--verbose`` is off.

    When a scheduler goes away, distributed's client logs the tracebacks of its reconnect and
    close coroutines (``CancelledError`` while shutting down) before the pipeline reports the
    loss as one line. Shutdown cancellations are dropped; any other traceback logged by Dask or
    the event loop under it (distributed, tornado, asyncio) is folded into its message's first
    line. A job failure the in-process parameter server logs is dropped: the driver reports it,
    and so is the client's "Failed to reconnect to scheduler" during `pipeline train`, whose
    error line names the lost scheduler and the command that resumes the run.
    ``--verbose`` shows them all.
    """

    _SOURCES = ("distributed", "tornado", "asyncio")
    reports_lost_scheduler = False  # set by a command whose error line reports a lost scheduler

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "driver_reports", False):
            # the parameter server of the command's own local cluster (its scheduler runs in
            # this process) failing a job: the driver's error line says the same
            return False
        if (
            self.reports_lost_scheduler
            and record.name == "distributed.client"
            and record.getMessage().startswith("Failed to reconnect to scheduler")
        ):
            return False
        if not record.exc_info or record.name.split(".", 1)[0] not in self._SOURCES:
            return True
        exc = record.exc_info[1]
        if exc is None:
            return True
        import asyncio

        if isinstance(exc, asyncio.CancelledError):
            return False
        message = (record.getMessage().strip().splitlines() or [""])[0]
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        record.msg = f"{message} ({detail})" if message else detail
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


# --------------------------------------------------------------------------------------------
# Training, evaluation, prediction
# --------------------------------------------------------------------------------------------

_cluster_options = [
    click.option(
        "--scheduler",
        metavar="ADDRESS",
        help="Connect to a running Dask scheduler (tcp://host:8786, tls://...). Default: start a local cluster.",
    ),
    click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        help="Seconds to wait for --scheduler to answer.",
    ),
    click.option(
        "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local cluster: worker processes."
    ),
    click.option(
        "--threads-per-worker",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Local cluster: threads per worker.",
    ),
    click.option(
        "--memory-limit", default="auto", show_default=True, help="Local cluster: memory limit per worker (e.g. 2GiB)."
    ),
    click.option(
        "--dashboard-address",
        default=":0",
        show_default=True,
        help="Local cluster: dashboard address (':0' = free port, 'none' = off).",
    ),
    click.option("--tls-ca-file", type=click.Path(), help="CA certificate for a tls:// scheduler."),
    click.option("--tls-cert", type=click.Path(), help="Client certificate for a tls:// scheduler."),
    click.option("--tls-key", type=click.Path(), help="Client private key for a tls:// scheduler."),
]


def cluster_options(f):
    for opt in reversed(_cluster_options):
        f = opt(f)
    return f


def _client(kw: dict, sites: list[str] | None = None):
    from pipeline.connect import cluster_client

    dash = kw.pop("dashboard_address")
    return cluster_client(
        kw.pop("scheduler"),
        sites=sites,
        workers=kw.pop("workers"),
        threads_per_worker=kw.pop("threads_per_worker"),
        memory_limit=kw.pop("memory_limit"),
        dashboard_address=None if dash in ("none", "") else dash,
        tls_ca=kw.pop("tls_ca_file"),
        tls_cert=kw.pop("tls_cert"),
        tls_key=kw.pop("tls_key"),
        timeout=kw.pop("connect_timeout"),
    )


def _echo(msg: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(msg, err=True)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (how Slurm, Kubernetes and ``kill`` stop a job) takes Ctrl-C's path while the
    block runs: the trainer writes a checkpoint and the command exits with status 143 (128 + SIGTERM)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _cluster_for_training(clients: contextlib.AbstractContextManager) -> Iterator[Any]:
    """Enter ``clients`` (a cluster being started or connected to, for ``pipeline train``): a
    Ctrl-C while that happens ends the command after the cluster is closed, with one line saying
    that training had not started (the run directory is written only once it has: a new one is
    removed again, an existing one is left as it was)."""
    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(clients)
        except KeyboardInterrupt as exc:
            if str(exc):  # SIGTERM: its own line and exit status
                raise
            raise KeyboardInterrupt("before training started; nothing was written") from None
        yield client


# What distributed's performance_report writes: bokeh's page titled so (distributed.scheduler).
_REPORT_TITLE = b"<title>Dask Performance Report</title>"


def _is_performance_report(path: str) -> bool:
    """Whether the file at ``path`` (local or a URL) is a Dask performance report: its HTML title,
    read through the compression its name implies (``.gz``: distributed writes it gzipped)."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as fh:
            head = fh.read(1 << 14)
    except Exception:  # noqa: BLE001 - unreadable or not what its name says: not a report
        return False
    return _REPORT_TITLE in head


def _run_files() -> frozenset[str]:
    """The names a run writes in its directory (temporary files start with a dot)."""
    from pipeline.train import LOCK_NAME, RunDir

    return frozenset({*RunDir.run_files(), "partition", LOCK_NAME})


def _check_report(report: str, out: str, force: bool) -> str:
    """Refuse a --report file the run could not write, or must not replace, before it starts.

    Returns where the report goes (a local path made absolute). An existing file is replaced
    only with ``force`` and only when it is an earlier Dask performance report; a directory, the
    run directory or a file the run writes in it are refused; a local destination is probed:
    its missing parent directories are created, a file is created in it and everything so made
    is removed again."""
    from pipeline.errors import ConfigError
    from pipeline.store import for_workers, is_url, unwritable_reason

    shown = repr(report)
    replace_hint = "choose another --report path, or pass --force to replace it (only an earlier report is replaced)"
    if is_url(report):
        import fsspec

        try:
            fs, where = fsspec.core.url_to_fs(report)
            exists, is_dir = fs.exists(where), fs.isdir(where)
        except Exception as exc:  # noqa: BLE001 - a missing filesystem package, bad credentials, ...
            raise ConfigError(f"cannot write --report {shown}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if is_dir:
            raise ConfigError(f"--report {shown} is a directory; name a file, such as report.html")
        if exists and not force:
            raise ConfigError(f"--report {shown} exists; {replace_hint}")
        if exists and not _is_performance_report(report):
            raise ConfigError(
                f"--report {shown} exists and is not a Dask performance report; --force replaces only an earlier "
                "report: choose another --report path"
            )
        return report
    path = Path(for_workers(report))
    run = Path(os.path.realpath(for_workers(out)))
    real = Path(os.path.realpath(path))
    if real == run:
        raise ConfigError(f"--report {shown} is the run directory (--out); name a file such as {out}/report.html")
    if run in real.parents:
        first = real.relative_to(run).parts[0]
        if first in _run_files() or first.startswith("."):
            raise ConfigError(
                f"--report {shown} is {first!r} of the run directory {out!r}, which the run writes; name another "
                f"file such as {out}/report.html"
            )
    if path.is_dir():
        raise ConfigError(f"--report {shown} is a directory; name a file, such as report.html")
    if path.is_symlink():
        raise ConfigError(f"--report {shown} is a symbolic link; name the file itself, or another path")
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"--report {shown} exists and is not a regular file; choose another --report path")
        if not force:
            raise ConfigError(f"--report {shown} exists; {replace_hint}")
        if not _is_performance_report(str(path)):
            raise ConfigError(
                f"--report {shown} exists and is not a Dask performance report; --force replaces only an earlier "
                "report: choose another --report path"
            )
    where, why = unwritable_reason(path)
    if why is not None:
        raise ConfigError(
            f"cannot write --report {shown}: {why} (creating a file in {str(where)!r}); choose a writable location"
        )
    return str(path)


@contextlib.contextmanager
def _performance_report(report: str | None, out: str) -> Iterator[None]:
    """Dask's performance report of the block, written to ``report`` (checked by
    :func:`_check_report`) when it ends, also when it fails. A local report is written beside its
    destination under a temporary name and renamed into place, after checking again that what is
    there (if anything) is an earlier report. Failing to write it is one line (a
    :class:`TrainingError` naming the run's kept outputs), or, when the block failed, only a log
    line under the block's own error."""
    if not report:
        yield
        return
    import uuid

    from distributed import performance_report

    from pipeline.errors import TrainingError
    from pipeline.store import is_url

    local = not is_url(report)
    target = Path(report)
    # the temporary keeps the name's suffix: distributed compresses by it (.gz)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}") if local else None
    existed = local and (target.exists() or target.is_symlink())
    if local:
        target.parent.mkdir(parents=True, exist_ok=True)
    ctx = performance_report(filename=str(tmp) if tmp is not None else report)
    ctx.__enter__()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        try:
            ctx.__exit__(None, None, None)
            if tmp is not None:
                if target.exists() or target.is_symlink():
                    if not existed:
                        raise OSError(f"{report!r} appeared during the run; it was left as it is")
                    if target.is_symlink() or not _is_performance_report(report):
                        raise OSError(f"{report!r} changed during the run and is no longer a Dask performance report")
                os.replace(tmp, target)
        except Exception as exc:  # noqa: BLE001 - reported as one line; the run's outputs stay
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            detail = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
            if not failed:
                raise TrainingError(
                    f"the run finished and its outputs are in {out!r}, but the performance report could not be "
                    f"written to {report!r} ({detail})"
                ) from None
            logging.getLogger(__name__).warning("performance report not written to %r (%s)", report, detail)


def _run_training(
    store: str | None,
    cfg: Any,
    out: str,
    client: Any,
    resume: bool,
    force: bool,
    quiet: bool,
    report: str | None,
    on_epoch: Callable[[dict], None],
    progress: bool = False,
) -> Any:
    """:func:`pipeline.train.train` as the command runs it: its log on stderr unless ``quiet``,
    under Dask's performance report when ``report`` names one."""
    from pipeline.train import train as run_training

    with _performance_report(report, out):
        return run_training(
            store,
            cfg,
            out,
            client=client,
            resume=resume,
            force=force,
            log=lambda m: _echo(m, quiet),
            on_epoch=on_epoch,
            progress=progress,
        )


def _check_resume_trains(out: str, cfg: Any, quiet: bool) -> None:
    """--resume of a run that already has ``cfg.epochs`` epochs (a federated run: ``cfg.rounds``
    rounds) trains nothing: refused when its model and history are those of its checkpoint
    (resuming would only rewrite them), told (one line) when the run was interrupted and resuming
    writes the model of its best epoch so far."""
    import json

    from pipeline.checkpoint import read_meta
    from pipeline.errors import CheckpointError
    from pipeline.train import RunDir

    run = RunDir(Path(out))
    meta = read_meta(run.checkpoint)  # its record only: the run reads (and checks) the whole file
    if meta is None or meta.get("kind") != "checkpoint":
        return  # not a checkpoint: resuming says what it is
    federated = bool(cfg.clients or cfg.sites)
    if federated != bool(meta.get("federated")):
        return  # another kind of run: resuming refuses it with its own reason
    key, unit, asked = ("rounds", "round", cfg.rounds) if federated else ("epochs", "epoch", cfg.epochs)
    done = int(meta.get("epoch") or 0)  # a federated run counts its rounds there
    if asked > done:
        return
    more = f"to train more, resume with --set {key}=N, N > {done}"
    recorded = -1
    if run.model.is_file():
        try:
            recorded = len(json.loads(run.history.read_text()).get("epochs") or [])
        except (OSError, ValueError, AttributeError):
            recorded = -1
    if recorded == done:
        raise CheckpointError(
            f"run directory {out!r} already has {done} {unit}(s) and their model, so {key} = {asked} trains "
            f"nothing; {more}"
        )
    _echo(
        f"run directory {out!r} already has {done} {unit}(s) and {key} = {asked}: nothing is trained, the "
        f"model of its best {unit} so far is written; {more}",
        quiet,
    )


def _check_resume_matches(store: str, out: str, cfg: Any) -> None:
    """Refuse, before a cluster starts, to resume the epoch run in ``out`` (or, ``cfg.clients``
    set, its run of simulated clients) with another model config, on other data or with other
    validation rows than its checkpoint's (the trainer checks again when it reads it)."""
    from pipeline.checkpoint import read_meta
    from pipeline.errors import CheckpointError
    from pipeline.store import open_store
    from pipeline.train import RunDir, build_spec, epoch_plan_mismatch, holdout_mismatch, resume_mismatch, store_stats

    path = RunDir(Path(out)).checkpoint
    meta = read_meta(path)  # its record only: the run reads (and checks) the whole file
    fed = meta.get("federated") if meta is not None else None
    simulated = isinstance(fed, dict) and fed.get("clients") is not None
    if meta is None or meta.get("kind") != "checkpoint" or (bool(fed) or bool(cfg.clients)) != simulated:
        return  # not a checkpoint, or another kind of run: resuming says what it is
    opened = open_store(store)
    problem = resume_mismatch(meta, build_spec(opened, cfg)[0], store_stats(opened), path, store)
    problem = problem or holdout_mismatch(meta.get("config") or {}, cfg, path)
    problem = problem or epoch_plan_mismatch(meta, cfg, path)
    if problem is not None:
        raise CheckpointError(problem)


def _check_budget(cfg: Any, clients: int) -> None:
    """Refuse, before a cluster starts, a privacy budget that the first round spends: a run of
    ``clients`` federated clients or sites samples some of them per round (0: not federated,
    every share takes part in every round)."""
    from pipeline.sites import clients_per_round
    from pipeline.train import check_budget_allows_a_round

    rate = clients_per_round(clients, cfg.fraction_fit, cfg.min_clients) / clients if clients else 1.0
    check_budget_allows_a_round(cfg, rate)


def _cluster_asked(cluster_kw: dict) -> bool:
    """Whether the command line asks for a Dask cluster: --scheduler, or --workers or
    --threads-per-worker given (even at their defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return bool(cluster_kw["scheduler"]) or any(
        ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None) for k in ("workers", "threads_per_worker")
    )


def _trains_in_process(store: str, out: str, cfg: Any, resume: bool, report: bool, cluster_kw: dict) -> str:
    """Why ``pipeline train`` runs in this process (its log line), or "" for a Dask cluster:
    a store of fewer than ``cluster_min_rows`` rows, when neither --scheduler, --workers nor
    --threads-per-worker (nor --report, Dask's report) asks for a cluster; --resume continues
    where the run trained."""
    # simulated clients are tasks on a cluster; privacy lives in the parameter server
    if report or _cluster_asked(cluster_kw) or cfg.clients or cfg.dp != "off" or cfg.secure_aggregation:
        return ""
    if resume:
        from pipeline.checkpoint import load_file
        from pipeline.train import RunDir

        _, meta = load_file(RunDir(Path(out)).checkpoint, "checkpoint")
        return (
            "training in this process, as the run being resumed did (--workers N trains on a Dask cluster)"
            if meta.get("in_process")
            else ""
        )
    from pipeline.store import open_store

    rows = open_store(store).n_rows
    if not rows < cfg.cluster_min_rows:
        return ""
    return (
        f"training in this process: {rows:,} rows, under cluster_min_rows = {cfg.cluster_min_rows:,} "
        f"(--workers N or --scheduler ADDRESS trains on a Dask cluster), blas_threads = {cfg.blas_threads}"
    )


def _scores_in_process(store: str, cluster_kw: dict, doing: str) -> str:
    """Why ``evaluate``/``predict`` run in this process (their log line), or "" for a Dask
    cluster: as ``train`` (:func:`_trains_in_process`), a store of fewer than the default
    ``cluster_min_rows`` rows, unless --scheduler, --workers or --threads-per-worker asks for a
    cluster (which would take longer to start than the store takes to score)."""
    from pipeline.config import TrainConfig
    from pipeline.store import open_store

    if _cluster_asked(cluster_kw):
        return ""
    rows, limit = open_store(store).n_rows, TrainConfig().cluster_min_rows
    if not rows < limit:
        return ""
    return (
        f"{doing} in this process: {rows:,} rows, under cluster_min_rows = {limit:,} "
        f"(--workers N or --scheduler ADDRESS uses a Dask cluster)"
    )


def _preloaded(dask_scheduler: Any) -> bool:
    """On the scheduler: whether ``--preload pipeline.ps`` installed the parameter server (and
    with it the dashboard's /pipeline page, which only a preload can add)."""
    from pipeline.ps.extension import EXTENSION_NAME

    ext = dask_scheduler.extensions.get(EXTENSION_NAME)
    return ext is not None and ext.installed_by == "preload"


def _dashboard_line(client: Any) -> str:
    """The dashboard's address, and whether it has the training page."""
    try:
        page = bool(client.run_on_scheduler(_preloaded))
    except Exception:  # noqa: BLE001 - a scheduler that cannot run it has no page either
        page = False
    if page:
        return f"dask dashboard: {client.dashboard_link}  (training page: /pipeline)"
    return (
        f"dask dashboard: {client.dashboard_link}  (no training page: the scheduler was started without "
        "--preload pipeline.ps)"
    )


def _round_line(r: dict) -> str:
    """The line printed after a federated round: losses, the pooled metric, each site's."""
    metric = r.get("val_accuracy", r.get("val_r2"))
    name = "val_acc" if "val_accuracy" in r else "val_r2"
    per_site = "  ".join(f"{s} {v['metric']:.4f}" for s, v in sorted((r.get("sites") or {}).items()))
    spread = ""
    if not per_site and r.get("site_mean") is not None:
        spread = f"clients: mean {r['site_mean']:.4f}  worst decile {r['site_worst_decile']:.4f}"
    return (
        f"round {r['round'] + 1:>3}  train_loss {r['train_loss']:.4f}  "
        + (f"val_loss {r['val_loss']:.4f}  {name} {metric:.4f}  " if metric is not None else "")
        + (f"sites: {per_site}" if per_site else spread)
        + (f"  epsilon {r['epsilon']:.3g}" if "epsilon" in r else "")
    )


def _privacy_spent(privacy: dict) -> dict:
    """The final line's privacy figures: what the whole run spent (its last round), not only
    the saved model's round."""
    if privacy.get("dp", "off") == "off":
        return {}
    return {"epsilon": privacy["epsilon"], "dp_delta": privacy["delta"]}


def _train_federated(
    sites_file: str | None,
    config_file: str | None,
    overrides: tuple[str, ...],
    out: str,
    resume: bool,
    force: bool,
    quiet: bool,
    report: str | None,
    **cluster_kw: Any,
) -> None:
    """`pipeline train --sites FILE`: a federated run on the scheduler's site workers, or on a
    local cluster of one worker per site (each declaring its site's resource)."""
    import json

    from pipeline.config import TrainConfig
    from pipeline.federated import check_epochs_unset, check_federated_config
    from pipeline.sites import read_sites
    from pipeline.train import RunDir, check_backend, resumed_config

    if sites_file:
        read_sites(sites_file)  # fail before starting a cluster, naming the file as given
    base = resumed_config(out) if resume else TrainConfig()
    cfg = TrainConfig.from_toml(config_file, base) if config_file else base
    if sites_file:
        overrides = (*overrides, f"sites={json.dumps(os.path.abspath(sites_file))}")
    cfg = cfg.with_overrides(list(overrides))
    sites = read_sites(cfg.sites)
    check_federated_config(cfg, sites)
    check_epochs_unset(cfg, base.epochs)  # base: the defaults, or the resumed run's saved settings
    if resume:
        _check_resume_trains(out, cfg, quiet)
    _check_budget(cfg, len(sites))
    cfg.check_on_cluster()
    if not cluster_kw["scheduler"]:
        check_backend(cfg.backend)
    _echo("configuration:\n" + "\n".join(f"  {k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()), quiet)
    if not cluster_kw["scheduler"]:
        _echo(f"starting a local cluster of one worker per site ({', '.join(s.name for s in sites)})", quiet)
    clients = _client(cluster_kw, sites=None if cluster_kw["scheduler"] else [s.name for s in sites])
    with RunDir(Path(out)).claim(resume, force), _sigterm_interrupts(), _cluster_for_training(clients) as client:
        _echo(_dashboard_line(client), quiet)

        def on_round(r: dict) -> None:
            _echo(_round_line(r), quiet)

        result = _run_training(None, cfg, out, client, resume, force, quiet, report, on_round)
    saved = result.best
    click.echo(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "rounds": len(result.history),
                "stopped_early": result.stopped_early,
                "best_round": saved.get("round"),
                **{k: v for k, v in saved.items() if k.startswith("val_") or k.startswith("site_")},
                **({"val_sites": sorted(saved["sites"])} if saved.get("sites") else {}),  # what val_* pools
                **_privacy_spent(result.privacy),
            }
        )
    )


@cli.command()
@click.argument("store", required=False)
@click.option(
    "--sites",
    "sites_file",
    type=click.Path(),
    help="Federated: a TOML file of [sites.NAME] store = PATH (as that site's workers see it); no STORE then.",
)
@click.option("--config", "config_file", type=click.Path(), help="TOML file of training settings.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one setting (repeatable).")
@click.option("--out", default="runs/latest", show_default=True, help="Run directory (model, checkpoint, history).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory (and an earlier --report of Dask's).")
@click.option(
    "--report",
    type=click.Path(),
    help="Write Dask's performance report (HTML) for the run; an existing file is refused (--force: replaced "
    "if it is such a report).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the final metrics.")
@click.option(
    "--plots", is_flag=True, help="Also draw curves.png, rounds.png and throughput.png into --out (matplotlib)."
)
@cluster_options
def train(
    store: str | None,
    sites_file: str | None,
    config_file: str | None,
    overrides: tuple[str, ...],
    out: str,
    resume: bool,
    force: bool,
    report: str | None,
    quiet: bool,
    plots: bool,
    **cluster_kw,
) -> None:
    """Train a neural network on STORE (a store made by `pipeline ingest` or `pipeline synth`).

    \b
    Examples:
      pipeline train data/stores/letter-train.zarr --out runs/letter
      pipeline train big.zarr --config train.toml --set epochs=5 --set mode=sync
      pipeline train big.zarr --scheduler tcp://10.0.0.1:8786 --out runs/big
      pipeline train big.zarr --out runs/big --resume
      pipeline train small.zarr --workers 2     # a Dask cluster even below cluster_min_rows rows
      pipeline train --sites sites.toml --scheduler tcp://10.0.0.1:8786 --out runs/fed   # federated
      pipeline train small.zarr --plots         # also draw the run's curves as PNG
    """
    import json
    from pathlib import Path

    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError
    from pipeline.store import open_store
    from pipeline.train import RunDir, check_backend, check_local_out, resumed_config

    if store and sites_file:
        raise ConfigError(
            f"pass either STORE ({store!r}) or --sites ({sites_file!r}), not both: a federated run reads each "
            "site's store from the sites file"
        )
    check_local_out(out)
    RunDir(Path(out)).check(resume, force)  # fail before starting a cluster
    _OneLineDaskErrors.reports_lost_scheduler = True  # its error line says so, with the resume command
    report_to = _check_report(report, out, force) if report else None
    federated = bool(sites_file)
    if not store and not sites_file:  # the config may name the sites file (key 'sites')
        peek = resumed_config(out) if resume else TrainConfig()
        peek = (TrainConfig.from_toml(config_file, peek) if config_file else peek).with_overrides(list(overrides))
        federated = bool(peek.sites)
    if federated:
        _train_federated(sites_file, config_file, overrides, out, resume, force, quiet, report_to, **cluster_kw)
        return
    if not store:
        raise ConfigError("nothing to train on: pass a STORE, or --sites FILE for a federated run")
    if open_store(store).attrs.get("labelled") is False:
        from pipeline.errors import StoreError

        raise StoreError(f"store {store!r} has no targets (ingested with --unlabelled); train on a labelled store")
    base = resumed_config(out) if resume else TrainConfig()  # --resume: the run's own settings
    cfg = TrainConfig.from_toml(config_file, base) if config_file else base
    cfg = cfg.with_overrides(list(overrides))
    if cfg.clients:  # simulated clients train rounds
        from pipeline.federated import check_epochs_unset

        check_epochs_unset(cfg, base.epochs)
    if resume:
        _check_resume_trains(out, cfg, quiet)
        _check_resume_matches(store, out, cfg)
    _check_budget(cfg, cfg.clients)  # fail before starting a cluster
    if cfg.validation_store:  # fail before starting a cluster
        from pipeline.train import check_validation_store

        check_validation_store(open_store(store), cfg.validation_store)
    if not cluster_kw["scheduler"]:
        check_backend(cfg.backend)  # a local cluster's workers run here: fail before starting it
    _echo("configuration:\n" + "\n".join(f"  {k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()), quiet)
    in_process = _trains_in_process(store, out, cfg, resume, bool(report), cluster_kw)
    if in_process:
        _echo(in_process, quiet)
    else:
        cfg.check_on_cluster()  # fail before starting a cluster
    # claimed before the cluster starts, for the whole run: a second training into the same
    # --out (even with --force) is refused until this one ends
    clients = contextlib.nullcontext() if in_process else _client(cluster_kw)
    with RunDir(Path(out)).claim(resume, force), _sigterm_interrupts(), _cluster_for_training(clients) as client:
        if client is not None:
            _echo(_dashboard_line(client), quiet)

        def on_epoch(r: dict) -> None:
            if "round" in r:  # simulated federated clients (clients = N)
                _echo(_round_line(r), quiet)
                return
            metric = r.get("val_accuracy", r.get("val_r2"))
            name = "val_acc" if "val_accuracy" in r else "val_r2"
            _echo(
                f"epoch {r['epoch'] + 1:>3}  train_loss {r['train_loss']:.4f}  "
                + (f"val_loss {r['val_loss']:.4f}  {name} {metric:.4f}  " if metric is not None else "")
                + f"{r['samples_per_s']:,.0f} samples/s  rounds {r['rounds']}"
                + (f"  epsilon {r['epsilon']:.3g}" if "epsilon" in r else ""),
                quiet,
            )

        result = _run_training(
            store,
            cfg,
            out,
            client,
            resume,
            force,
            quiet,
            report_to,
            on_epoch,
            progress=not quiet and sys.stderr.isatty(),
        )
    if plots:  # once the model, the history and the cluster are done with
        from pipeline.plots import save_plots

        drawn = save_plots(result.run_dir, json.loads(RunDir(result.run_dir).history.read_text()))
        _echo("plots: " + (", ".join(str(p) for p in drawn) or "none"), quiet)
    saved = result.best  # the metrics of the model written, not of the last epoch
    unit = "round" if cfg.clients else "epoch"  # simulated clients train rounds, as a --sites run does
    click.echo(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                f"{unit}s": len(result.history),
                "stopped_early": result.stopped_early,
                f"best_{unit}": saved.get(unit),
                **{k: v for k, v in saved.items() if k.startswith("val_") or (cfg.clients and k.startswith("site_"))},
                **_privacy_spent(result.privacy),
            }
        )
    )


def _rows_text(rows: Any) -> str:
    """The source rows a store holds, as --rows spells them ("all" for a whole CSV or Parquet source)."""
    if not isinstance(rows, list | tuple) or len(rows) != 2:
        return "?"
    start, stop = rows
    return "all" if start == 0 and stop is None else f"{start}:{'' if stop is None else stop}"


def _rows_hold(n: int) -> str:
    return "1 row holds" if n == 1 else f"{n:,} rows hold"


def _reading_line(reading: dict[str, Any]) -> str:
    """How ingest read the source's text (:func:`pipeline.store.source_reading`), as `inspect`
    shows it: what ``--like`` ingests follow and models compare; empty when nothing was recorded."""
    parts = []
    if "decimal_comma" in reading:
        if reading["decimal_comma"]:
            dots = "dots grouping thousands" if reading.get("thousands_dot") else "dots as decimal points"
            parts.append(f"decimal commas, 1,5 is 1.5 ({dots}; --decimal comma)")
        else:
            parts.append("commas as thousands separators, 1,234 is 1234 (--decimal point)")
    if "missing_values" in reading:
        tokens = ", ".join(repr(t) for t in reading["missing_values"]) or "none"
        parts.append(f"missing values {tokens} (--missing-values)")
    return "; ".join(parts)


def _one_line(text: Any) -> str:
    """``text`` as `inspect` prints a name: a line break, tab or other control character (from a
    quoted CSV header or value) escaped as Python writes it (``\\n``), so a name stays on its row."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _figure(v: float) -> str:
    """A metric as `evaluate` prints it: 4 decimals, or 4 significant digits for a small one (the
    errors of a target measured in millionths would all print as 0.0000)."""
    return f"{v:.4g}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def _load_run_model(run_dir: str):
    """The model of ``run_dir`` (a run directory or a model file); a run directory without
    one is explained: still training, interrupted (how to finish it), or failed."""
    from pathlib import Path

    from pipeline.errors import CheckpointError
    from pipeline.model import load_model
    from pipeline.train import RunDir

    why = RunDir(Path(run_dir)).missing_model()
    if why:
        raise CheckpointError(why)
    if Path(run_dir, "zarr.json").is_file() and not Path(run_dir, "model.npz").exists():
        # the arguments in the other order: RUN_DIR comes first, then STORE
        raise CheckpointError(
            f"{run_dir!r} is a store, not a run directory or model file; give the run (or its model.npz) "
            "first, then the store"
        )
    return load_model(run_dir)


@cli.command()
@click.argument("run_dir")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--site",
    default=None,
    metavar="NAME",
    help="STORE is this federation site's, as its workers see it: run every task on the workers that declare "
    "the site's Dask resource (--resources NAME=1), which alone read its rows.",
)
@cluster_options
def evaluate(run_dir: str, store: str, as_json: bool, site: str | None, **cluster_kw) -> None:
    """Evaluate the model of RUN_DIR (or a model file) on every row of STORE, out of core.

    A store of fewer than 100,000 rows (cluster_min_rows) is evaluated in this process unless
    --workers, --threads-per-worker or --scheduler asks for a Dask cluster.

    \b
    Examples:
      pipeline evaluate runs/letter data/stores/letter-test.zarr
      pipeline evaluate runs/fed /data/a/test.zarr --site hospital-a --scheduler tcp://coordinator:8786
    """
    import json

    from pipeline.inference import check_inputs, evaluate_store
    from pipeline.sites import SITE_NAME
    from pipeline.store import for_workers

    model = _load_run_model(run_dir)
    if site is None:
        check_inputs(model, store)  # fail before starting a cluster
        store = for_workers(store)
    elif not SITE_NAME.fullmatch(site):
        raise PipelineError(f"--site {site!r} is not a site name: use letters, digits, '_', '.' and '-'")
    in_process = "" if site else _scores_in_process(store, cluster_kw, "evaluating")
    _echo(in_process, not in_process)
    # without --scheduler, a local cluster of one worker declaring the site (its store is local)
    clients = (
        contextlib.nullcontext()
        if in_process
        else _client(cluster_kw, sites=[site] if site and not cluster_kw.get("scheduler") else None)
    )
    with clients as client:
        metrics = evaluate_store(model, store, client, site=site)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for k, v in metrics.items():
        if k in ("confusion", "classes"):
            continue
        click.echo(f"{k:>10}: {_figure(v)}" if isinstance(v, float) else f"{k:>10}: {v}")
    if "confusion" in metrics:
        classes = metrics.get("classes") or [str(i) for i in range(len(metrics["confusion"]))]
        click.echo("confusion matrix (rows: true, columns: predicted):")
        # as wide as the longest class name or count: 6-digit counts must not run together
        cells = [str(c) for c in classes] + [str(v) for line in metrics["confusion"] for v in line]
        width = max(5, *(len(c) for c in cells)) + 1
        click.echo(" " * width + "".join(f"{str(c):>{width}}" for c in classes))
        for c, line in zip(classes, metrics["confusion"], strict=True):
            click.echo(f"{str(c):>{width}}" + "".join(f"{v:>{width}}" for v in line))


@cli.command()
@click.argument("run_dir")
@click.argument("store")
@click.argument("out")
@click.option("--proba", is_flag=True, help="Also write class probabilities.")
@click.option("--force", is_flag=True, help="Replace OUT if it holds earlier predictions (never other files).")
@cluster_options
def predict(run_dir: str, store: str, out: str, proba: bool, force: bool, **cluster_kw) -> None:
    """Predict every row of STORE with the model of RUN_DIR into OUT (*.zarr or *.parquet).

    Rows are processed chunk by chunk on the workers and written in place; OUT appears only
    when every chunk succeeded. OUT's `prediction` holds the class labels (as text, the same
    in Zarr and Parquet and as load_model(RUN_DIR).predict) or the predicted values. Ctrl-C or
    SIGTERM removes the partial output. A store of fewer than 100,000 rows (cluster_min_rows) is
    predicted in this process unless --workers, --threads-per-worker or --scheduler asks for a
    Dask cluster.

    \b
    Example:
      pipeline predict runs/letter data/stores/letter-test.zarr predictions.parquet --proba
    """
    import json

    from pipeline.inference import check_inputs, predict_store
    from pipeline.store import for_workers

    model = _load_run_model(run_dir)
    check_inputs(model, store, out, proba=proba, force=force)  # fail before starting a cluster
    in_process = _scores_in_process(store, cluster_kw, "predicting")
    _echo(in_process, not in_process)
    # SIGTERM (Slurm, Kubernetes, kill) takes Ctrl-C's path: the temporary output is removed
    with _sigterm_interrupts(), contextlib.nullcontext() if in_process else _client(cluster_kw) as client:
        result = predict_store(model, for_workers(store), for_workers(out), client, proba=proba, force=force)
    result["out"] = out  # as the user named it
    click.echo(json.dumps(result))


def _run_dirs(where: Path) -> Iterator[Path]:
    """The directories at or under ``where`` that hold a run (a history.json, checkpoint or
    config.toml this program wrote), in path order; Zarr stores and hidden directories are not
    looked into."""
    from pipeline.store import store_marker
    from pipeline.train import RunDir

    for top, dirs, _ in os.walk(where):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not store_marker(here / d))
        run = RunDir(here)
        if any(run.written_here(n) for n in ("history.json", "checkpoint.npz", "config.toml")):
            yield here


def _run_row(run_dir: Path) -> tuple[dict | None, str | None]:
    """The row `pipeline runs` lists for a run directory, or why it lists none (a note)."""
    import json

    from pipeline.train import RunDir, saved_epoch

    run = RunDir(run_dir)
    where = repr(str(run_dir))
    if not run.written_here("history.json"):
        if os.path.lexists(run.history):
            model = (
                f" (its model.npz is intact: `pipeline evaluate {run_dir} STORE` uses it)"
                if run.written_here("model.npz")
                else ""
            )
            return None, (
                f"run directory {where} is not listed: its history.json is damaged or not one this program wrote{model}"
            )
        why = run.missing_model()
        return None, why or f"run directory {where} has no history.json: no finished run to list"
    data = json.loads(run.history.read_text())
    epochs = data.get("epochs") or []
    saved = saved_epoch(data)  # the saved model's epoch (its best), not the last one
    # a federated run's records are its rounds (each names its round, as the final line of train does)
    federated = isinstance(data.get("federated"), dict) or any("round" in e for e in epochs)
    unit = "round" if federated else "epoch"
    return {
        "run": str(run_dir),
        f"{unit}s": len(epochs),
        f"best_{unit}": saved.get(unit, saved.get("epoch")),
        "val_loss": saved.get("val_loss"),
        "val_metric": saved.get("val_accuracy", saved.get("val_r2")),
        "samples_per_s": epochs[-1].get("samples_per_s") if epochs else None,
    }, _resumed_note(run, len(epochs), unit)


def _resumed_note(run: Any, listed: int, unit: str) -> str | None:
    """What `pipeline runs` says of a listed run (its model.npz and history.json, of ``listed``
    epochs or rounds) that a resume is training now, or that a resume of an epoch run stopped
    before writing its own (its checkpoint is further on): the row is the model of the run
    before that resume."""
    from pipeline.checkpoint import read_meta

    where, owner = repr(str(run.path)), run.owner()
    if owner is not None:
        return (
            f"run directory {where} is training again ({owner}): listed is the model it saved after {listed} "
            f"{unit}(s); its new model.npz is written when the run ends"
        )
    meta = read_meta(run.checkpoint) if run.written_here("checkpoint.npz") else None
    # an epoch run's checkpoint counts the epochs its history records (a federated run's, its
    # rounds, of which its history may record only those it evaluated: not compared)
    done = meta.get("epoch") if meta is not None and not meta.get("federated") else None
    if not isinstance(done, int) or done <= listed:
        return None
    from pipeline.train import resume_command

    store = str(meta.get("store") or "STORE")
    return (
        f"run directory {where} holds an interrupted resume: its checkpoint is after {done} {unit}(s), its listed "
        f"model.npz and history.json after {listed}; continue it with "
        f"`{resume_command(store, run.path, meta.get('cluster'))}`, or write the model of its best {unit} so far "
        f"with `... --resume --set {unit}s={done}`"
    )


@cli.command()
@click.argument("directory", default="runs")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def runs(directory: str, as_json: bool) -> None:
    """List the runs in DIRECTORY (and in its subdirectories) with the validation metrics of their
    saved models (the best epoch, which early stopping or a later worse epoch leaves behind the
    last; a federated run's best round). DIRECTORY may also be one run directory: that run is
    listed. Runs with no model to list (interrupted, damaged) are named after the table (with
    --json, on stderr).

    \b
    Examples:
      pipeline runs                 # the runs in ./runs
      pipeline runs runs/letter     # one run
    """
    import json
    from pathlib import Path

    where = Path(directory)
    if not where.exists():
        raise PipelineError(f"directory {directory!r} does not exist; name the directory that holds your runs")
    if not where.is_dir():
        raise PipelineError(f"{directory!r} is a file, not a directory; name the directory that holds your runs")
    rows, notes = [], []
    for run_dir in _run_dirs(where):
        row, note = _run_row(run_dir)
        if row is not None:
            rows.append(row)
        if note is not None:
            notes.append(note)
    if as_json:
        click.echo(json.dumps(rows))
        for note in notes:
            click.echo(note, err=True)
        return
    if not rows and not notes:
        click.echo(f"no runs in {directory!r}")
        return
    if rows:
        kinds = {"epochs" if "epochs" in r else "rounds" for r in rows}
        head = kinds.pop() if len(kinds) == 1 else "trained"  # a mix: each count names its unit
        width = max(30, *(len(r["run"]) for r in rows))
        click.echo(f"{'run':<{width}} {head:>10} {'best':>5} {'val_loss':>9} {'val_metric':>10} {'samples/s':>10}")
        for r in rows:
            unit = "epoch" if "epochs" in r else "round"
            count = r[f"{unit}s"] if head != "trained" else f"{r[f'{unit}s']} {unit}s"
            best = r[f"best_{unit}"]
            best = str(best + 1) if isinstance(best, int) else "-"  # 1-based, as printed while training
            vl = f"{r['val_loss']:.4f}" if isinstance(r["val_loss"], float) else "-"
            vm = f"{r['val_metric']:.4f}" if isinstance(r["val_metric"], float) else "-"
            sps = f"{r['samples_per_s']:,.0f}" if isinstance(r["samples_per_s"], float) else "-"
            click.echo(f"{r['run']:<{width}} {count:>10} {best:>5} {vl:>9} {vm:>10} {sps:>10}")
    for note in notes:
        click.echo(note)


# --------------------------------------------------------------------------------------------
# Data: ingest, synth, inspect
# --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("src", type=click.Path())
@click.argument("dest")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet", "npy", "npz", "idx"]),
    help="Source format (default: from the file name; an unknown suffix such as .json is refused).",
)
@click.option(
    "--target",
    metavar="COL",
    help="Target column: name or 0-based index (negative from the end). Default: the last column not dropped.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False),
    help="Labels file (IDX images, or a .npy of labels for a .npy of features; not for CSV, Parquet or .npz).",
)
@click.option("--drop", multiple=True, metavar="COL", help="Column to leave out (name or index; repeatable).")
@click.option("--task", type=click.Choice(["classification", "regression"]), help="Override the inferred task.")
@click.option(
    "--delimiter",
    metavar="D",
    help="CSV field separator: one character or comma, semicolon, pipe, tab, space (default: detected). "
    "With one other than ',', 1,5 is 1.5; with ',', \"3,655\" is 3655.",
)
@click.option(
    "--header/--no-header", default=None, help="Whether the CSV's first line names the columns (default: detected)."
)
@click.option(
    "--comment",
    default="|",
    show_default=True,
    help="Skip CSV lines starting with this ('#' lines before the header are skipped too; "
    "with the delimiter '|', the default '|' is not a comment).",
)
@click.option("--rows", metavar="START:STOP", help="Only data rows START:STOP (0-based, either side may be empty).")
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Rows per chunk (default: ~16 MB chunks).")
@click.option(
    "--codec",
    type=click.Choice(["lz4", "zstd", "none"]),
    help="Chunk compression (default: none, the fastest to read; lz4 for compressible data on slow storage).",
)
@click.option(
    "--missing",
    type=click.Choice(["impute", "reject", "drop"]),
    default="impute",
    show_default=True,
    help="Missing values: impute (mean / most frequent), reject (error) or drop the row.",
)
@click.option(
    "--encoding",
    type=click.Choice(["auto", "onehot", "ordinal"]),
    default="auto",
    show_default=True,
    help="String features: one-hot (auto: <= 16 categories) or ordinal codes.",
)
@click.option(
    "--text-encoding",
    default="utf-8",
    show_default=True,
    metavar="CODEC",
    help="Character encoding of a CSV source (e.g. latin-1, cp1252; UTF-16 with a byte order mark is detected).",
)
@click.option(
    "--decimal",
    type=click.Choice(["auto", "comma", "point"]),
    default="auto",
    show_default=True,
    help="What a comma in a number is: comma (1,5 is 1.5), point (1,234 is 1234), or auto: as the file's other "
    "numbers say (a comma file: thousands); 1,234 alone in a ';' or tab file is refused. --like: the store's.",
)
@click.option(
    "--missing-values",
    metavar="TOKENS",
    help="Comma-separated text that is a missing value, replacing ?,NA,N/A,NaN,nan,NAN,null,NULL,None,none "
    "(e.g. '?,NaN' keeps NA as a category; '' for only the empty field, always missing; a NaN spelling is "
    "never a number). --like: the store's list.",
)
@click.option(
    "--like", metavar="TRAIN_STORE", help="Reuse the training store's columns, encodings, classes and mean/std."
)
@click.option("--unlabelled", is_flag=True, help="With --like: the source has no target column (a store to predict).")
@click.option("--force", is_flag=True, help="Replace DEST if it is a store written by pipeline (never other files).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary.")
def ingest(
    src: str,
    dest: str,
    fmt: str | None,
    target: str | None,
    labels: str | None,
    drop: tuple[str, ...],
    task: str | None,
    delimiter: str | None,
    header: bool | None,
    comment: str,
    rows: str | None,
    chunk_rows: int | None,
    codec: str | None,
    missing: str,
    encoding: str,
    text_encoding: str,
    decimal: str,
    missing_values: str | None,
    like: str | None,
    unlabelled: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Stream a CSV, Parquet (a file or a directory of them), .npy/.npz or IDX file into a Zarr store DEST.

    Warnings (categories unseen in the --like store) are printed as `warning: ...` lines.

    \b
    Examples:
      pipeline ingest data/letter/letter-recognition.data letter.zarr --target 0 --rows 0:16000
      pipeline ingest data/letter/letter-recognition.data letter-test.zarr --rows 16000: --like letter.zarr
      pipeline ingest data/adult/adult.data adult.zarr
      pipeline ingest data/adult/adult.test adult-test.zarr --like adult.zarr
      pipeline ingest data/california_housing/housing.csv housing.zarr --target median_house_value
      pipeline ingest train-images-idx3-ubyte.gz mnist.zarr --labels train-labels-idx1-ubyte.gz
      pipeline ingest new.csv new.zarr --like adult.zarr --unlabelled      # then: pipeline predict
    """
    import warnings

    from pipeline.ingest import ingest as run_ingest

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        store = run_ingest(
            src,
            dest,
            format=fmt,
            target=target,
            labels=labels,
            drop=drop,
            task=task,
            delimiter=delimiter,
            header=header,
            comment=comment,
            rows=rows,
            chunk_rows=chunk_rows,
            codec=codec,
            missing=missing,
            encoding=encoding,
            like=like,
            force=force,
            progress=not quiet and sys.stderr.isatty(),
            unlabelled=unlabelled,
            text_encoding=text_encoding,
            decimal=decimal,
            missing_values=missing_values,
        )
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    src_attrs = store.attrs.get("source") or {}
    fills = {e["name"]: e.get("fill") for e in store.attrs.get("encodings") or []}
    imputed = src_attrs.get("missing_imputed") or {}
    if imputed:  # a category named NA or None is a missing token too: say what was filled in
        shown = "; ".join(
            f"column {c!r}: {n:,} -> {fills.get(c):.6g}"
            if isinstance(fills.get(c), float)
            else f"column {c!r}: {n:,} -> {fills.get(c)!r}"
            for c, n in imputed.items()
        )
        tokens = src_attrs.get("missing_values")
        listed = (
            "empty, ?, NA, N/A, NaN, null, None, inf"
            if tokens is None
            else ", ".join(dict.fromkeys(["empty", *(t for t in tokens if t), "NaN", "inf"]))
        )
        click.echo(
            f"warning: missing values ({listed}) imputed, cells per column: {shown} "
            "(--missing reject refuses them; --missing-values TOKENS sets which text is missing)",
            err=True,
        )
    elif src_attrs.get("rows_with_missing") and store.attrs.get("missing") == "impute":  # a NumPy or IDX source
        click.echo(
            f"warning: {_rows_hold(src_attrs['rows_with_missing'])} missing or infinite values (NaN, inf), "
            "imputed with the training mean (--missing reject refuses them; --missing drop leaves the rows out)",
            err=True,
        )
    rounded = src_attrs.get("rounded_integers") or {}
    if rounded:
        click.echo(
            "warning: integers beyond 2^24 are stored rounded (features are float32): "
            + "; ".join(f"column {c!r} up to {v:.0f}" for c, v in rounded.items())
            + "; leave identifiers out with --drop",
            err=True,
        )
    if not quiet:
        what = f"{len(store.classes or [])} classes" if store.task == "classification" else "regression"
        if store.attrs.get("labelled") is False:
            what += " (unlabelled: for predict only)"
        click.echo(
            f"{store.path}: {store.n_rows:,} rows x {store.n_features} features ({store.X.dtype}), {what}, "
            f"{store.n_chunks} chunks of {store.chunk_rows:,} rows, in {time.perf_counter() - t0:.1f}s"
        )


@cli.command()
@click.argument("dest")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--features", type=click.IntRange(min=1), required=True, help="Number of features.")
@click.option("--classes", type=click.IntRange(min=2), help="Number of classes (default 10).")
@click.option("--regression", is_flag=True, help="A regression target instead of classes.")
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True, help="Teacher network width.")
@click.option(
    "--noise",
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help="Label noise (fraction of the logit scale).",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "uint8"]), default="float32", show_default=True, help="Feature dtype."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (the data depend on it only).")
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Rows per chunk (default: ~16 MB chunks).")
@click.option(
    "--codec",
    type=click.Choice(["lz4", "zstd", "none"]),
    help="Chunk compression (default: none, the fastest to read; lz4 for compressible data on slow storage).",
)
@click.option("--force", is_flag=True, help="Replace DEST if it is a store written by pipeline (never other files).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary.")
def synth(
    dest: str,
    rows: int,
    features: int,
    classes: int | None,
    regression: bool,
    hidden: int,
    noise: float,
    dtype: str,
    seed: int,
    chunk_rows: int | None,
    codec: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Generate a learnable synthetic store (a random teacher network labels Gaussian inputs).

    \b
    Examples:
      pipeline synth synth.zarr --rows 1000000 --features 784 --classes 10
      pipeline synth big.zarr --rows 4000000 --features 784 --dtype uint8      # ~3 GB, streamed
      pipeline synth reg.zarr --rows 100000 --features 20 --regression
    """
    from pipeline.errors import StoreError
    from pipeline.synth import synth as run_synth

    if regression and classes:
        raise StoreError("--classes and --regression exclude each other; pass one")
    t0 = time.perf_counter()
    store = run_synth(
        dest,
        rows=rows,
        features=features,
        classes=None if regression else (classes or 10),
        hidden=hidden,
        noise=noise,
        seed=seed,
        chunk_rows=chunk_rows,
        codec=codec,
        dtype=dtype,
        force=force,
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        click.echo(
            f"{store.path}: {store.n_rows:,} rows x {store.n_features} features, {store.task}, "
            f"{store.n_chunks} chunks, in {time.perf_counter() - t0:.1f}s"
        )


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--verify", is_flag=True, help="Read every chunk and report corrupted or missing ones (exit 1 if any).")
def inspect(store: str, as_json: bool, verify: bool) -> None:
    """Describe a store: shape, dtype, chunks, codecs, size, class balance, feature statistics.

    \b
    Examples:
      pipeline inspect data/stores/letter-train.zarr
      pipeline inspect data/stores/letter-train.zarr --json --verify
    """
    import json

    from pipeline.errors import StoreError
    from pipeline.store import describe, open_store, source_reading, verify_store

    st = open_store(store)
    info = describe(st)
    bad = verify_store(st) if verify else []
    if verify:
        info["verify"] = {"chunks": st.n_chunks, "bad": bad}
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        disk = info["bytes_on_disk"]
        ratio = f" ({info['bytes_uncompressed'] / disk:.1f}x)" if disk else ""
        click.echo(f"store    {info['path']}  (format {info['format_version']}, created {info['created']})")
        click.echo(f"task     {info['task']}")
        click.echo(
            f"X        {tuple(info['X']['shape'])} {info['X']['dtype']}, "
            f"chunks of {st.chunk_rows:,} rows x {st.n_chunks}"
        )
        click.echo(f"y        {tuple(info['y']['shape'])} {info['y']['dtype']}")
        click.echo(f"codec    {info['codec']} ({' + '.join(info['codecs'])})")
        click.echo(
            f"size     {disk if disk is not None else '?':,} bytes on disk{ratio}" if disk else "size     ? (remote)"
        )
        src = info.get("source") or {}
        click.echo(f"source   {_one_line(src.get('path', src.get('format', '?')))}  rows {_rows_text(src.get('rows'))}")
        reading = _reading_line(source_reading(st))
        if reading:
            click.echo(f"read     {reading}")
        if st.attrs.get("labelled") is False:
            click.echo(
                "labels   none (ingested with --unlabelled, for predict only); classes "
                + ", ".join(map(_one_line, st.classes or []))
                if st.task == "classification"
                else "labels   none (ingested with --unlabelled, for predict only)"
            )
        elif "classes" in info:
            total = max(1, sum(info["classes"].values()))
            parts = [f"{_one_line(c)}: {n} ({100 * n / total:.1f}%)" for c, n in info["classes"].items()]
            click.echo(f"classes  {len(parts)}: " + ", ".join(parts[:12]) + (" ..." if len(parts) > 12 else ""))
        else:
            t = info["target"]
            own_t = src.get("target_stats") if src.get("like") else None
            if own_t:
                click.echo(
                    f"target   {_one_line(t['name'])}: mean {own_t['mean']}, std {own_t['std']} "
                    f"(normalised with the training store's mean {t['mean']}, std {t['std']})"
                )
            else:
                click.echo(f"target   {_one_line(t['name'])}: mean {t['mean']}, std {t['std']}")
        feats = info["features_stats"]
        own = (src.get("feature_stats") or {}) if src.get("like") else {}
        if src.get("like"):
            # a --like store is normalised with the training store's statistics, not its own
            click.echo(
                f"features (name, mean, std of this store; mean, std of the training store {src['like']!r}, "
                "which normalise it):"
            )
        else:
            click.echo("features (name, mean, std):")
        for i, f in enumerate(feats[:20]):
            name = _one_line(f["name"])
            if own.get("mean") and i < len(own["mean"]):
                click.echo(
                    f"  {name[:32]:32s} {own['mean'][i]:12.4g} {own['std'][i]:12.4g}   "
                    f"{f['mean']:12.4g} {f['std']:12.4g}"
                )
            elif src.get("like"):
                click.echo(f"  {name[:32]:32s} {'?':>12s} {'?':>12s}   {f['mean']:12.4g} {f['std']:12.4g}")
            else:
                click.echo(f"  {name[:32]:32s} {f['mean']:12.4g} {f['std']:12.4g}")
        if len(feats) > 20:
            click.echo(f"  ... {len(feats) - 20} more (--json for all)")
        if verify:
            click.echo(f"verify   {st.n_chunks} chunks read, {len(bad)} bad")
            for msg in bad:
                click.echo(f"  {msg}")
    if bad:
        raise StoreError(f"{len(bad)} damaged chunk(s) in {store!r}: {bad[0]}")


def _not_an_interrupted_sync(record: logging.LogRecord) -> bool:
    """A logging filter: False for the event loop's report of distributed's ``sync()`` cancel
    callback failing with a NameError, which it does when Ctrl-C interrupts a call into Dask
    before that call's coroutine has started (its ``future`` is not assigned yet). The
    interrupt itself is handled (a checkpoint, then exit status 130); the report is noise."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, NameError) and "sync.<locals>.cancel" in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script; returns the exit status."""
    logging.getLogger("tornado.application").addFilter(_not_an_interrupted_sync)
    code = 0
    try:
        cli.main(args=argv, prog_name="pipeline", standalone_mode=True)
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    if argv is None:
        # The command line of this process (the console script, ``python -m pipeline.cli``):
        # the process ends next. Its last garbage collections at exit need not walk the objects
        # of every module the command imported: frozen, they are left to the end of the process
        # (0.1-0.3 s of a quiet exit, over 1 s on a loaded machine).
        import gc

        gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
