"""The training driver: epochs of tasks on the cluster, evaluation, checkpoints, the run directory.

The driver never touches rows. It plans row ranges of the store into tasks, submits them each
epoch (dynamic placement lets faster workers take more; sync mode runs one participant per
worker thread so every round has all of them; federated placement pins each worker's share
to it), evaluates on the workers at each epoch end,
checkpoints the parameter server's state atomically, stops early, and writes the history and
the final model to the run directory::

    RUN_DIR/config.toml      resolved configuration
    RUN_DIR/checkpoint.npz   server state (weights, optimizer state, round, epoch, position)
                             and, sync, each share's local optimizer state
    RUN_DIR/model.npz        the trained model (best validation epoch), see pipeline.model
    RUN_DIR/history.json     per-epoch and per-round metrics
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint import load_file, save_file
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, ConfigError, PipelineError, StoreError, TrainingError
from pipeline.metrics import array_metrics, finish_metrics, merge_metrics
from pipeline.model import Model
from pipeline.progress import Progress
from pipeline.ps import ParameterServer
from pipeline.store import Store, layout_mismatch, layout_of, open_store
from pipeline.worker import evaluate_task, train_task

logger = logging.getLogger(__name__)

Ranges = list[tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Planning: row ranges, tasks, validation split
# --------------------------------------------------------------------------------------------


def row_ranges(store: Store, max_rows: int) -> Ranges:
    """The store's row chunks, each cut into equal parts of at most ``max_rows`` rows."""
    out: Ranges = []
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        start, stop = sl.start, min(sl.stop, store.n_rows)
        parts = max(1, math.ceil((stop - start) / max_rows))
        edges = np.linspace(start, stop, parts + 1).round().astype(int)
        out.extend((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a)
    return out


def held_out_count(store: Store, fraction: float, seed: int, ranges: Ranges | None = None) -> int:
    """How many rows of ``ranges`` (default: the whole store) are held out for validation."""
    from pipeline.loader import held_out_mask, held_out_rows

    if fraction <= 0:
        return 0
    if ranges is None:
        return sum(len(held_out_rows(store, c, fraction, seed)) for c in range(store.n_chunks))
    return sum(int(held_out_mask(store, a, b, fraction, seed).sum()) for a, b in ranges)


def group_ranges(ranges: Ranges, rows_per_task: int) -> list[Ranges]:
    """Consecutive ranges grouped into tasks of about ``rows_per_task`` rows."""
    tasks: list[Ranges] = []
    cur: Ranges = []
    rows = 0
    for a, b in ranges:
        if cur and rows + (b - a) > rows_per_task:
            tasks.append(cur)
            cur, rows = [], 0
        cur.append((a, b))
        rows += b - a
    if cur:
        tasks.append(cur)
    return tasks


def split_rows(ranges: Ranges, parts: int) -> list[Ranges]:
    """``ranges`` cut into ``parts`` consecutive pieces of (nearly) equal row counts."""
    total = sum(b - a for a, b in ranges)
    bounds = [total * k // parts for k in range(parts + 1)]
    out: list[Ranges] = [[] for _ in range(parts)]
    offset = 0
    for a, b in ranges:
        for k in range(parts):
            lo, hi = max(a, a + bounds[k] - offset), min(b, a + bounds[k + 1] - offset)
            if hi > lo:
                out[k].append((lo, hi))
        offset += b - a
    return out


def default_rows_per_task(n_rows: int, n_threads: int, cfg: TrainConfig) -> int:
    """About four tasks per worker thread per epoch, never fewer rows than two pushes' worth,
    and at most 2**18 rows (a few seconds of work) so that a lost task loses little. Full batch
    (``batch_size = 0``): one task per worker thread, since every task is one gradient step."""
    if cfg.batch_size == 0:
        return max(1, math.ceil(n_rows / max(1, n_threads)))
    per_push = cfg.batch_size * cfg.local_steps
    want = math.ceil(n_rows / max(1, 4 * n_threads))
    return int(min(max(want, 2 * per_push), 1 << 18))


def train_flops_per_row(spec: dict) -> int:
    """Multiply-adds x 2 of one training step per row: forward, and backward for the inputs'
    and the weights' gradients (3 products per layer)."""
    sizes = [spec["n_in"], *spec["hidden"], spec["n_out"]]
    return 6 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def n_sync_shares(rows: int, spec: dict, n_slots: int, min_share_gflop: float) -> int:
    """How many sync shares train an epoch of ``rows``: one per worker thread (``n_slots``), but
    no more than leave each share ``min_share_gflop`` of training per epoch (at least one).
    Local SGD over more shares needs more epochs; on a small store that costs more than the
    shares save per epoch."""
    if min_share_gflop <= 0:
        return max(1, n_slots)
    gflop = rows * train_flops_per_row(spec) / 1e9
    return max(1, min(n_slots, int(gflop // min_share_gflop)))


def build_spec(store: Store, cfg: TrainConfig) -> tuple[dict, dict | None]:
    """The model spec for this store and config, and the regression target scaling (or None)."""
    if store.task == "classification":
        n_out = len(store.classes or [])
        if n_out < 2:
            raise StoreError(f"store {store.path!r} has fewer than 2 classes; nothing to learn")
        loss = "softmax_ce" if cfg.loss == "auto" else cfg.loss
        if loss == "mse":
            raise ConfigError("config key 'loss' = 'mse' does not fit a classification store")
        if loss == "bce_logits" and n_out != 2:
            raise ConfigError("config key 'loss' = 'bce_logits' needs a binary store")
        if loss == "bce_logits":
            raise ConfigError("config key 'loss' = 'bce_logits' is for multi-label targets; use softmax_ce")
        target = None
    else:
        n_out = 1 if store.y.ndim == 1 else int(store.y.shape[1])
        loss = "mse" if cfg.loss == "auto" else cfg.loss
        if loss != "mse":
            raise ConfigError(f"config key 'loss' = {loss!r} does not fit a regression store; use mse")
        mean = np.atleast_1d(np.asarray(store.y_mean, dtype=np.float64))
        std = np.atleast_1d(np.asarray(store.y_std, dtype=np.float64))
        target = {"mean": mean, "std": np.where(std > 0, std, 1.0)}
    widths = [store.n_features, *cfg.hidden, n_out]
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    from pipeline.config import MAX_PARAMS

    if n_params > MAX_PARAMS:
        raise ConfigError(
            f"config key 'hidden' = {cfg.hidden} gives {n_params:,} parameters (limit {MAX_PARAMS:,}); "
            "use narrower layers"
        )
    spec = {
        "n_in": store.n_features,
        "hidden": list(cfg.hidden),
        "n_out": n_out,
        "activation": cfg.activation,
        "loss": loss,
    }
    return spec, target


def task_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of the config that training tasks need (plain, msgpack-friendly).

    ``holdout`` is set when validation rows are held out of the training store: training
    tasks then skip those rows and evaluation tasks read only them (pipeline.loader)."""
    keys = (
        "optimizer lr momentum beta1 beta2 rho weight_decay batch_size local_steps overlap backend seed "
        "shuffle_chunks prefetch normalize barrier_timeout mmap_threshold_mb"
    ).split()
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    if cfg.validation > 0 and not cfg.validation_store:
        out["holdout"] = {"fraction": cfg.validation, "seed": cfg.seed}
    return out


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


LOCK_NAME = ".lock"

# Run directories this process holds, by resolved path: the open lock file and how many
# claims are nested (the command claims before it starts a cluster, the trainer again).
_HELD: dict[str, list] = {}


@dataclass
class RunDir:
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.npz"

    @property
    def model(self) -> Path:
        return self.path / "model.npz"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    def holds_run(self) -> bool:
        """Whether the directory holds anything but its lock file."""
        return self.path.is_dir() and any(p.name != LOCK_NAME for p in self.path.iterdir())

    def check(self, resume: bool, force: bool) -> None:
        """Raise if resuming without a checkpoint, or starting over an existing run without force."""
        if resume:
            if not self.checkpoint.is_file():
                if self.config.is_file():
                    raise CheckpointError(
                        f"nothing to resume: run directory {str(self.path)!r} holds the configuration of a "
                        "run that stopped before its first checkpoint; start it again with --force"
                    )
                raise CheckpointError(
                    f"nothing to resume: {str(self.checkpoint)!r} does not exist; train without --resume"
                )
        elif self.path.is_file():
            raise TrainingError(f"run directory {str(self.path)!r} is a file; choose another --out")
        elif self.holds_run() and not force:
            if not self.checkpoint.is_file() and self.config.is_file():
                raise TrainingError(
                    f"run directory {str(self.path)!r} holds a run that stopped before its first "
                    "checkpoint (nothing to resume); pass --force to start it again, or choose another --out"
                )
            if not self.checkpoint.is_file():
                raise TrainingError(
                    f"run directory {str(self.path)!r} is not empty and holds no run; choose another "
                    "--out, or pass --force to write the run beside its files"
                )
            raise TrainingError(
                f"run directory {str(self.path)!r} already holds a run; pass --resume to continue it, "
                "--force to overwrite it, or choose another --out"
            )

    def owner(self) -> str | None:
        """Who trains into this directory now ("pid N on HOST"), or None when nobody does.

        The claim is an exclusive ``flock`` on the lock file, which the kernel drops when its
        process ends however it ends: a lock file left by a killed run is not a claim."""
        import fcntl

        key = str(self.path.resolve())
        if key in _HELD:
            return f"pid {os.getpid()} on {_hostname()} (this process)"
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_owner(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def missing_model(self, store: str = "STORE") -> str | None:
        """Why a run directory without ``model.npz`` has none (training, interrupted, failed),
        and what to do; None when it is not a run directory without a model."""
        if not self.path.is_dir() or self.model.exists():
            return None
        where = repr(str(self.path))
        owner = self.owner()
        if owner is not None:
            return (
                f"run directory {where} is still training ({owner}); its model.npz is written when the "
                "run ends: wait for it, or stop it (Ctrl-C or SIGTERM writes a checkpoint) and resume it"
            )
        if self.checkpoint.is_file():
            try:
                _, meta = load_file(self.checkpoint, "checkpoint")
                epoch, store = int(meta["epoch"]), str(meta.get("store") or store)
            except (CheckpointError, KeyError, TypeError, ValueError):
                return None
            return (
                f"run directory {where} holds an interrupted run (checkpoint after {epoch} epoch(s), no "
                f"model.npz); continue it with `pipeline train {store} --out {self.path} --resume`, or write "
                f"the model of its best epoch so far with `... --resume --set epochs={max(epoch, 1)}`"
            )
        if self.config.is_file():
            return (
                f"run directory {where} holds a run that stopped before its first checkpoint (no "
                "model.npz); train it again with --force"
            )
        return None

    def claim(self, resume: bool, force: bool) -> _Claim:
        """Claim the directory for one training (a context manager); raise if another process
        trains into it, or if :meth:`check` refuses it. Nested claims in one process share it."""
        return _Claim(self, resume, force)

    def prepare(self, resume: bool, force: bool) -> None:
        self.check(resume, force)
        if resume:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for p in (self.checkpoint, self.model, self.history):
            p.unlink(missing_ok=True)

    def write_json(self, path: Path, data: Any) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=_json_default))
        os.replace(tmp, path)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"
    except OSError:
        return "another process"


class _Claim:
    """An exclusive, process-lifetime claim on a run directory (see :meth:`RunDir.claim`)."""

    def __init__(self, run: RunDir, resume: bool, force: bool) -> None:
        self.run, self.resume, self.force = run, resume, force
        self.key = ""
        self.created = False

    def __enter__(self) -> _Claim:
        import fcntl

        run = self.run
        run.check(self.resume, self.force)  # nothing is created for a refused directory
        self.key = str(run.path.resolve())
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return self
        self.created = not run.path.exists()
        if not self.resume:
            run.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # a file system without locks: train unclaimed rather than not at all
                    logger.warning("cannot lock %s (%s): concurrent runs into it are not detected", run.lock, exc)
                    break
                owner = _read_owner(fd)
                os.close(fd)
                raise TrainingError(
                    f"run directory {str(run.path)!r} is in use by another training ({owner}); "
                    "wait for it to finish or choose another --out (--force does not take over a live run)"
                ) from None
            try:  # the file may have been removed by its previous owner between open and flock
                same = os.fstat(fd).st_ino == os.stat(run.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_hostname()} {time.time():.0f}\n".encode(), 0)
        _HELD[self.key] = [fd, 1]
        try:
            run.check(self.resume, self.force)  # again, now that no one else can change it
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            with contextlib.suppress(OSError):
                self.run.lock.unlink()
            os.close(held[0])
            if self.created:  # a directory made for a run that wrote nothing goes again
                with contextlib.suppress(OSError):
                    self.run.path.rmdir()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    model: Model
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    installed_by: str = ""
    best_epoch: int = -1  # the epoch whose weights ``model`` holds (-1: none recorded)

    @property
    def final(self) -> dict:
        """The last epoch's record."""
        return self.history[-1] if self.history else {}

    @property
    def best(self) -> dict:
        """The record of the epoch the saved model comes from (the best validation epoch)."""
        return saved_epoch({"best_epoch": self.best_epoch, "epochs": self.history})


def saved_epoch(history: dict) -> dict:
    """The epoch record of a run's saved model in its ``history.json`` document: the best
    epoch (the last one when the history does not name it)."""
    epochs = history.get("epochs") or []
    best = history.get("best_epoch")
    for rec in epochs:
        if rec.get("epoch") == best:
            return rec
    return epochs[-1] if epochs else {}


def _total_threads(client: Any) -> dict[str, int]:
    return {w: int(info.get("nthreads", 1)) for w, info in client.scheduler_info(n_workers=-1)["workers"].items()}


def check_validation_store(store: Store, validation_store: str) -> None:
    """Refuse a validation store whose features (count, names, order, encodings), task or
    classes differ from the training store's."""
    problem = layout_mismatch(layout_of(store), open_store(validation_store), labels=True)
    if problem:
        raise StoreError(
            f"validation store {validation_store!r} does not match the training store {store.path!r}: "
            f"it {problem}; ingest it with --like {store.path}"
        )


def check_workers_can_open(client: Any, store_path: str) -> None:
    """Fail before training if some worker cannot open the store, naming those workers."""

    def _probe(path: str = store_path) -> str:
        try:
            from pipeline.store import open_store as _open

            _open(path)
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            return f"{type(exc).__name__}: {exc}"
        return ""

    results = client.run(_probe)
    bad = {w: msg for w, msg in results.items() if msg}
    if bad:
        names = ", ".join(sorted(bad))
        first = next(iter(bad.values()))
        raise StoreError(
            f"{len(bad)} of {len(results)} workers cannot open store {store_path!r} ({names}): {first}; "
            "put the store on a path or URL every worker can reach"
        )


def check_backend(backend: str, client: Any = None) -> None:
    """Fail before training when the kernel ``backend`` cannot run: on this machine (no
    ``client``: a local cluster's workers run here), or on some of ``client``'s workers."""
    if backend != "cuda":
        return

    def _probe(name: str = backend) -> str:
        try:
            from kernels import get_backend

            get_backend(name)
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            return str(exc)
        return ""

    results = {"this machine": _probe()} if client is None else client.run(_probe)
    bad = {w: msg for w, msg in results.items() if msg}
    if bad:
        where = "on this machine" if client is None else f"on {len(bad)} of {len(results)} workers ({', '.join(sorted(bad))})"
        raise ConfigError(
            f"config key 'backend' = 'cuda' cannot run {where}: {next(iter(bad.values()))}"
        )


class Trainer:
    """Runs one training job on a Dask cluster (see the module docstring)."""

    def __init__(
        self,
        store: str,
        cfg: TrainConfig,
        out: str | os.PathLike,
        client: Any,
        *,
        resume: bool = False,
        force: bool = False,
        log: Callable[[str], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.store_path = str(store)
        self.progress = progress
        self.store = open_store(self.store_path)
        for path, st in ((self.store_path, self.store), *(
            ((cfg.validation_store, open_store(cfg.validation_store)),) if cfg.validation_store else ()
        )):
            if st.attrs.get("labelled") is False:  # ingested with --unlabelled: y is all zeros
                raise StoreError(f"store {path!r} has no targets (ingested with --unlabelled); train on a labelled store")
        self.cfg = cfg
        self.client = client
        self.run = RunDir(Path(out))
        self.resume = resume
        self.force = force
        self.log = log or (lambda msg: logger.info(msg))
        self.warn = log or (lambda msg: logger.warning(msg))
        self.train_rows = self.store.n_rows
        self.on_epoch = on_epoch
        self.spec, self.target = build_spec(self.store, cfg)
        self.val_path = cfg.validation_store or self.store_path
        # a validation store is standardized like the training store (the model's statistics)
        self.val_norm = (
            {"mean": self.store.mean.tolist(), "std": self.store.std.tolist()} if cfg.validation_store else None
        )
        if cfg.validation_store:
            check_validation_store(self.store, cfg.validation_store)
        self.job = f"run-{uuid.uuid4().hex[:12]}"

    # -- planning ------------------------------------------------------------------------

    def plan(self, n_threads: int) -> tuple[list[Ranges], Ranges]:
        cfg = self.cfg
        rows_per_task = cfg.rows_per_task or default_rows_per_task(self.store.n_rows, n_threads, cfg)
        train = row_ranges(self.store, rows_per_task)
        held = 0
        if cfg.validation_store:
            vs = open_store(cfg.validation_store)
            val = row_ranges(vs, 1 << 16)
        elif cfg.validation > 0:
            # rows held out in every chunk (pipeline.loader.held_out_rows): the tasks read whole
            # ranges and keep the training rows; validation reads the same chunks for the others
            held = held_out_count(self.store, cfg.validation, cfg.seed)
            val = row_ranges(self.store, 1 << 16) if held else []
            if not held:
                self.warn(
                    f"warning: validation = {cfg.validation:g} of {self.store.n_rows:,} rows holds out no "
                    "row; early stopping and the saved model follow the training loss (set "
                    "validation_store, or validation = 0 to say so)"
                )
        else:
            val = []
        self.train_rows = self.store.n_rows - held
        if not train or self.train_rows <= 0:
            raise StoreError(f"store {self.store_path!r} has no rows to train on")
        return group_ranges(train, rows_per_task), val

    def _train_rows(self, ranges: Ranges) -> int:
        """About how many training rows ``ranges`` hold (validation rows held out in every chunk
        are skipped by the tasks, about the same share of every range)."""
        rows = sum(b - a for a, b in ranges)
        return round(rows * self.train_rows / self.store.n_rows) if self.store.n_rows else rows

    # -- main loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        # distributed.wait and friends use the *current* client: make it ours for the run
        from distributed.comm.core import CommClosedError

        with self.client.as_current(), self.run.claim(self.resume, self.force):
            try:
                return self._fit()
            except PipelineError:
                raise
            except Exception as exc:
                lost = isinstance(exc, CommClosedError) or "scheduler-connection-lost" in str(exc)
                if not lost and self.client.status == "running":
                    raise
                where = getattr(self.client.scheduler, "address", None) or "its address"
                raise TrainingError(
                    f"lost the Dask scheduler at {where} and the parameter server in it "
                    f"({type(exc).__name__}); the last checkpoint is in {str(self.run.path)!r}: start a "
                    f"scheduler and workers, then run `pipeline train {self.store_path} --out "
                    f"{self.run.path} --resume --scheduler ADDRESS`"
                ) from None

    # -- where the work runs (pipeline.local.LocalTrainer: in this process) -----------------

    def _connect(self) -> tuple[str, dict[str, int]]:
        """Install the parameter server and check the workers; who installed it, and the
        workers' thread counts."""
        cfg, client = self.cfg, self.client
        installed_by = ParameterServer.ensure_installed(client)
        check_workers_can_open(client, self.store_path)
        check_backend(cfg.backend, client)
        if cfg.validation_store:
            check_workers_can_open(client, cfg.validation_store)
        threads = _total_threads(client)
        if not threads:
            raise TrainingError("the cluster has no workers; start some with `dask worker ADDRESS`")
        return installed_by, threads

    def _server(self) -> Any:
        """The handle of this job's parameter server."""
        return ParameterServer(self.job, self.client)

    def _span(self, name: str) -> Any:
        """Dask's span around a phase (an epoch), for the dashboard and performance reports."""
        from distributed import span

        return span(name)

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self.run.prepare(self.resume, self.force)
        installed_by, threads = self._connect()
        n_threads = sum(threads.values())

        from kernels.mlp import MLPSpec, init_params

        state = self._load_checkpoint() if self.resume else None
        if state is not None:
            params, meta = state["params"], state["meta"]
            history, start_epoch = meta["history"], int(meta["epoch"])
            done_tasks = set(meta.get("done_tasks", []))
            best = (float(meta["best_loss"]), state.get("best_params", params), int(meta["best_epoch"]))
            self.job = meta["job"]
            n_threads = int(meta.get("n_threads", n_threads))
        else:
            params = init_params(MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}), seed=cfg.seed)
            history, start_epoch, done_tasks = [], 0, set()
            best = (math.inf, params.copy(), -1)
        self.n_threads = n_threads  # the plan's thread count, saved with checkpoints for --resume
        self.run.config.write_text(cfg.to_toml())
        tasks, val_ranges = self.plan(n_threads)
        ps = self._server()
        rounds_per_epoch = sum(  # full batch (batch_size 0): one round per task
            math.ceil(self._train_rows(t) / cfg.batch_size / cfg.local_steps) if cfg.batch_size else 1
            for t in tasks
        )
        ps.create(
            params,
            mode=cfg.mode,
            staleness=cfg.staleness,
            damping=cfg.damping,
            aggregate=cfg.aggregate,
            optimizer={"name": cfg.server_optimizer, "lr": cfg.server_lr, "momentum": cfg.server_momentum,
                       "beta1": cfg.server_beta1, "beta2": cfg.server_beta2, "ema": cfg.ema},  # fmt: skip
            schedule={
                "kind": cfg.schedule,
                "warmup": cfg.warmup,
                "step_size": cfg.step_size,
                "gamma": cfg.gamma,
                "total_steps": rounds_per_epoch * cfg.epochs,
            },
            version=int(state["meta"]["version"]) if state else 0,
            optimizer_state=state.get("optimizer_state") if state else None,
            local_states=state.get("local_states") if state else None,  # empty unless sync, same optimizer
            progress=state["meta"].get("progress") if state else None,
            epoch=start_epoch,
            join_timeout=cfg.join_timeout,
        )
        self.log(
            f"job {self.job}: {len(tasks)} tasks per epoch over {self.store.n_rows:,} rows, "
            f"{len(val_ranges)} validation ranges, parameter server installed by {installed_by}"
        )
        if cfg.mode == "sync" and cfg.placement != "federated":
            rows = self.train_rows
            n = n_sync_shares(rows, self.spec, n_threads, cfg.min_share_gflop)
            if n < n_threads:
                self.log(
                    f"{n} sync share(s) for {n_threads} worker threads: an epoch is "
                    f"{rows * train_flops_per_row(self.spec) / 1e9:.1f} GFLOP of training, under "
                    f"min_share_gflop = {cfg.min_share_gflop:g} per share (--set min_share_gflop=0 "
                    "uses every thread)"
                )
        stopped_early = False
        last_ckpt = time.monotonic()
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                with self._span(f"epoch-{epoch}"):
                    stats = self._run_epoch(
                        ps, epoch, tasks, threads, done_tasks, last_ckpt, history, best, val_ranges
                    )
                    t_val = time.perf_counter()
                    st = ps.state()  # the epoch's final model: for `best` and the checkpoint
                    # validated inside the training tasks (sync), if they all saw these weights
                    val = stats["val"] if stats["val_version"] == st["version"] else None
                    if val is None:
                        val = self._evaluate(epoch, val_ranges)
                t_end = time.perf_counter()
                seconds = t_end - t0
                record = {
                    "epoch": epoch,
                    "rounds": st["version"],
                    "samples": stats["samples"],
                    "train_loss": stats["loss"],
                    "seconds": seconds,
                    "samples_per_s": stats["samples"] / seconds if seconds else 0.0,
                    "read_s": stats["read"],
                    "compute_s": stats["compute"],
                    "communicate_s": stats["communicate"],
                    # the driver's view of the epoch: training tasks submitted -> all done, then
                    # the validation pass (``seconds`` is their sum plus bookkeeping); validated
                    # inside the training tasks, ``validate_s`` is the slowest task's share of
                    # ``train_s`` (and the pass itself only fetches the weights)
                    "train_s": t_val - t0,
                    "validate_s": stats["validate"] if val is stats["val"] else t_end - t_val,
                    "validated_in_tasks": val is stats["val"],
                    **{f"val_{k}": v for k, v in val.items() if k != "confusion"},
                    "tasks": stats["tasks"],
                }
                history.append(record)
                val_loss = val.get("loss", stats["loss"])
                improved = val_loss < best[0] - cfg.min_delta
                if improved or best[2] < 0:
                    best = (float(val_loss), st["model"], epoch)
                self._checkpoint(
                    ps,
                    epoch + 1,
                    history,
                    best,
                    set(),
                    state=st,
                    record={k: v for k, v in record.items() if isinstance(v, int | float)},
                )
                last_ckpt = time.monotonic()
                done_tasks = set()
                if self.on_epoch is not None:
                    self.on_epoch(record)
                seen = sum(h["samples"] for h in history)
                if cfg.patience and epoch - best[2] >= cfg.patience and seen >= cfg.min_samples:
                    stopped_early = True
                    self.log(f"early stop: no validation improvement for {cfg.patience} epochs")
                    break
        except KeyboardInterrupt:
            self.log("interrupted: writing a checkpoint before stopping")
            if history and history[-1]["epoch"] == epoch:  # between epochs: this one is recorded
                self._checkpoint(ps, epoch + 1, history, best, set())
            else:
                self._checkpoint(ps, epoch, history, best, done_tasks)
            raise
        finally:
            metrics = {}
            try:
                metrics = ps.metrics(history=True)
                ps.close()
            except Exception:  # noqa: BLE001 - closing is best effort (scheduler may be gone)
                logger.debug("could not close job %s", self.job, exc_info=True)
        model = Model.from_training(self.store, self.spec, self.target, best[1], cfg, history)
        model.save(self.run.model)
        history_doc = {
            "job": self.job,
            "installed_by": installed_by,
            "best_epoch": best[2],
            "stopped_early": stopped_early,
            "epochs": history,
            "rounds": metrics.get("history", []),
            "round_columns": ["time", "version", "loss", "samples", "deltas"],
        }
        self.run.write_json(self.run.history, history_doc)
        from pipeline.plots import save_plots

        save_plots(self.run.path, history_doc)
        return TrainResult(self.run.path, model, history, stopped_early, installed_by, best[2])

    # -- one epoch -------------------------------------------------------------------------

    def _run_epoch(
        self,
        ps: ParameterServer,
        epoch: int,
        tasks: list[Ranges],
        threads: dict[str, int],
        done_tasks: set[str],
        last_ckpt: float,
        history: list[dict],
        best: tuple,
        val_ranges: Ranges,
    ) -> dict[str, Any]:
        from distributed import wait

        cfg, client = self.cfg, self.client
        rng = np.random.default_rng([cfg.seed, epoch, 104729])
        order = [int(i) for i in rng.permutation(len(tasks))]
        spec, tcfg = self.spec, task_config(cfg)
        if cfg.mode == "sync" or cfg.placement == "federated":
            # one participant per worker thread (sync) / per worker (federated): each gets a
            # fixed share of the ranges, chosen by position so the split is reproducible
            slots = [w for w, n in sorted(threads.items()) for _ in range(n if cfg.mode == "sync" else 1)]
            if cfg.placement == "federated":
                shares = [[r for j, t in enumerate(tasks) if j % len(slots) == k for r in t] for k in range(len(slots))]
            else:
                # equal row counts, not whole tasks: the shares meet at every sync round, so an
                # epoch lasts as long as its largest share (tasks are whole chunks or equal
                # parts of one: 15 chunk tasks over 2 shares would make one 14% larger)
                n = n_sync_shares(self.train_rows, spec, len(slots), cfg.min_share_gflop)
                shares = split_rows([r for j in order for r in tasks[j]], n)
            # Only federated shares are pinned to their worker (the data stays there). Sync shares
            # are not: a share pinned, even loosely, to a worker that has died sits in Dask's
            # no-worker state and is not rescheduled when a new worker joins.
            pin = cfg.placement == "federated"
            work = [
                (f"e{epoch}-s{k}", share, [slots[k]] if pin else None) for k, share in enumerate(shares) if share
            ]
        else:
            work = [(f"e{epoch}-t{j}", tasks[j], None) for j in order]
        # Sync: the shares run together and the last to leave closes the epoch, so they can
        # validate its final weights themselves, each on a slice of the validation rows, instead
        # of a separate round of tasks (not after a resume mid-epoch: some shares are done).
        in_task_val = cfg.mode == "sync" and bool(val_ranges) and not done_tasks and bool(work)
        work = [w for w in work if w[0] not in done_tasks]
        val_slices = split_rows(val_ranges, len(work)) if in_task_val else [[] for _ in work]
        futures = {}
        for (name, ranges, workers), val_slice in zip(work, val_slices, strict=True):
            key = f"train-chunk-{name}-{self.job}"
            futures[key] = (
                name,
                client.submit(
                    train_task,
                    self.job,
                    name,
                    self.store_path,
                    ranges,
                    epoch,
                    spec,
                    tcfg,
                    self.target,
                    {"path": self.val_path, "ranges": val_slice, "norm": self.val_norm} if val_slice else None,
                    key=key,
                    workers=workers,
                    retries=2,
                    pure=False,
                ),
            )
        if cfg.mode == "sync":
            ps.expect(names=[n for n, _ in futures.values()], keys=list(futures), epoch=epoch)
        else:
            ps.expect(names=[], keys=[], epoch=epoch)
        pending = {f for _, f in futures.values()}
        results: list[dict] = []
        no_workers_since: float | None = None
        bar = Progress(
            f"epoch {epoch + 1}/{cfg.epochs}",
            total=sum(self._train_rows(ranges) for _, ranges, _ in work),
            enabled=self.progress,
            unit="samples",
        )
        samples0 = ps.metrics()["samples"] if self.progress else 0
        try:
            while pending:
                try:
                    wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass  # nothing finished this second: check workers and checkpoints below
                done = {f for f in pending if f.done()}
                pending -= done
                for f in done:
                    if f.status == "error":
                        exc = f.exception()
                        if isinstance(exc, TrainingError):
                            raise TrainingError(str(exc)) from None
                        raise TrainingError(
                            f"training task {f.key} failed: {type(exc).__name__}: {exc}"
                        ) from exc
                finished = [f for f in done if f.status == "finished"]
                if finished:
                    results.extend(self._task_results(ps, finished, futures))
                    done_tasks.update(futures[f.key][0] for f in finished)
                    for f in finished:
                        # released at once: if its worker dies later, Dask must not rerun
                        # a task whose updates the parameter server already holds
                        f.release()
                if pending:
                    no_workers_since = self._check_workers(no_workers_since)
                if self.progress:
                    m = ps.metrics()
                    bar.set(m["samples"] - samples0, f"loss {m['loss']:.4f}" if m["loss"] is not None else "")
                if time.monotonic() - last_ckpt > cfg.checkpoint_seconds:
                    self._checkpoint(ps, epoch, history, best, done_tasks)
                    last_ckpt = time.monotonic()
        except BaseException:
            client.cancel(list(pending))
            try:
                self._checkpoint(ps, epoch, history, best, done_tasks)
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.debug("checkpoint after failure did not succeed", exc_info=True)
            raise
        bar.clear()
        samples = sum(r["samples"] for r in results)
        loss = sum(r["loss"] * r["samples"] for r in results if r["samples"]) / max(samples, 1)
        val, val_version, validate = None, None, 0.0
        wanted = {name for (name, _, _), sl in zip(work, val_slices, strict=True) if sl}
        got = {r["name"]: r for r in results if "val" in r}
        versions = {got[n]["val_version"] for n in wanted if n in got}
        if in_task_val and set(got) >= wanted and len(versions) == 1:
            # merged in share order: the same sums whichever worker ran which share
            val = finish_metrics(merge_metrics([array_metrics(got[n]["val"]) for n in sorted(wanted)]), self.target)
            val_version, validate = versions.pop(), max(got[n]["validate"] for n in wanted)
        return {
            "val": val,
            "val_version": val_version,
            "validate": validate,
            "tasks": sorted(
                ({"name": r["name"], "worker": r["worker"], "samples": r["samples"]} for r in results),
                key=lambda t: t["name"],
            ),
            "samples": samples,
            "loss": loss,
            "read": sum(r["read"] for r in results),
            "compute": sum(r["compute"] for r in results),
            "communicate": sum(r["communicate"] for r in results),
        }

    def _task_results(self, ps: ParameterServer, finished: list, futures: dict) -> list[dict]:
        """The summaries of finished training tasks, as their participants left them with the
        parameter server; a task whose summary is missing is asked for its result."""
        names = [futures[f.key][0] for f in finished]
        got = ps.summaries(names)
        return [got[n] if n in got else f.result() for n, f in zip(names, finished, strict=True)]

    def _check_workers(self, since: float | None) -> float | None:
        """Track how long the cluster has had no workers; fail after ``no_worker_timeout``."""
        if self.client.scheduler_info(n_workers=-1)["workers"]:
            return None
        since = since or time.monotonic()
        if time.monotonic() - since > self.cfg.no_worker_timeout:
            raise TrainingError(
                f"no workers for {self.cfg.no_worker_timeout:.0f} s; start workers or "
                "raise no_worker_timeout (a checkpoint was written; use --resume)"
            )
        return since

    def _gather(self, futures: list) -> list:
        """``client.gather`` that gives up after ``no_worker_timeout`` without workers."""
        from distributed import wait

        since = None
        while True:
            try:
                wait(futures, timeout=1.0)
            except TimeoutError:
                since = self._check_workers(since)
                continue
            try:
                return [f.result(timeout=10) for f in futures]
            except TimeoutError:
                continue  # a worker left with a result: Dask recomputes it, wait again

    def _evaluate(self, epoch: int, val_ranges: Ranges) -> dict[str, Any]:
        if not val_ranges:
            return {}
        tcfg = task_config(self.cfg)
        groups = group_ranges(val_ranges, 1 << 16)
        futures = [
            self.client.submit(
                evaluate_task,
                self.val_path,
                g,
                None,
                self.job,
                self.spec,
                tcfg,
                self.target,
                self.val_norm,
                key=f"evaluate-e{epoch}-{i}-{self.job}",
                pure=False,
                retries=2,
            )
            for i, g in enumerate(groups)
        ]
        return finish_metrics(merge_metrics(self._gather(futures)), self.target)

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint(
        self,
        ps: ParameterServer,
        epoch: int,
        history: list,
        best: tuple,
        done_tasks: set[str],
        state: dict | None = None,
        record: dict | None = None,
    ) -> None:
        """Write the run's checkpoint from the server's ``state`` (fetched if not given); tell
        the server (and its dashboard) about it, with the epoch's ``record`` if one is given."""
        st = state if state is not None else ps.state()
        if st.get("failed"):
            # a diverged job's weights are not a state to resume from: keep the last good one
            logger.warning("not checkpointing job %s: %s", self.job, st["failed"])
            if record is not None:
                ps.record(epoch=record)
            return
        arrays = {"params": st["params"], "best_params": best[1]}
        for k, v in st["optimizer_state"]["buffers"].items():
            arrays[f"opt_{k}"] = v
        # sync shares' local optimizer states: slot -> t, lr and the names of its arrays
        local_meta: dict[str, dict] = {}
        for i, (slot, loc) in enumerate(sorted(st.get("local_states", {}).items())):
            names = {}
            for j, (k, v) in enumerate(sorted(loc["buffers"].items())):
                names[k] = f"local{i}_{j}"
                arrays[names[k]] = v
            local_meta[slot] = {"t": loc["t"], "lr": loc.get("lr"), "arrays": names}
        meta = {
            "job": self.job,
            "epoch": epoch,
            "version": st["version"],
            "optimizer_t": st["optimizer_state"]["t"],
            "local_states": local_meta,
            "progress": st.get("progress", {}),
            "done_tasks": sorted(done_tasks),
            "history": history,
            "best_loss": best[0] if math.isfinite(best[0]) else 1e300,
            "best_epoch": best[2],
            "config": self.cfg.to_dict(),
            "store": self.store_path,
            "spec": self.spec,
            "n_threads": self.n_threads,
            "in_process": self.client is None,  # `pipeline train --resume` continues where it trained
            "time": time.time(),
        }
        save_file(self.run.checkpoint, "checkpoint", arrays, json.loads(json.dumps(meta, default=_json_default)))
        ps.record(epoch=record, checkpoint=True)

    def _load_checkpoint(self) -> dict[str, Any]:
        arrays, meta = load_file(self.run.checkpoint, "checkpoint")
        if meta.get("spec") != self.spec:
            raise CheckpointError(
                f"checkpoint {str(self.run.checkpoint)!r} is for a different model or store; "
                "resume with the same store and model config"
            )
        buffers = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
        local_states = {}
        try:
            for slot, loc in (meta.get("local_states") or {}).items():
                local_states[slot] = {"t": int(loc["t"]), "lr": loc.get("lr"),
                                      "buffers": {k: arrays[a] for k, a in loc["arrays"].items()}}  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(
                f"checkpoint {str(self.run.checkpoint)!r} has a malformed local optimizer state; "
                "resume from an earlier checkpoint"
            ) from None
        saved = meta.get("config") or {}
        if local_states and any(saved.get(k) != getattr(self.cfg, k) for k in ("optimizer", "lr", "mode")):
            # a share's local state belongs to the local optimizer that made it
            self.log("local optimizer or mode changed since the checkpoint: shares start with a fresh local state")
            local_states = {}
        return {
            "params": arrays["params"],
            "best_params": arrays.get("best_params", arrays["params"]),
            "optimizer_state": {"t": int(meta.get("optimizer_t", 0)), "buffers": buffers},
            "local_states": local_states,
            "meta": meta,
        }


def resumed_config(out: str | os.PathLike) -> TrainConfig:
    """The configuration saved in the checkpoint of run directory ``out``."""
    _, meta = load_file(RunDir(Path(out)).checkpoint, "checkpoint")
    return TrainConfig.from_dict(meta["config"])


def train(
    store: str,
    cfg: TrainConfig | None = None,
    out: str | os.PathLike = "runs/latest",
    *,
    client: Any = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train on ``store`` with ``cfg`` on the cluster of ``client``; write the run to ``out``.
    ``client=None`` trains in this process (pipeline.local)."""
    if resume and cfg is None:
        RunDir(Path(out)).check(resume, force)  # say why there is nothing to resume
        cfg = resumed_config(out)
    if client is None:
        from pipeline.local import LocalTrainer

        cls: type[Trainer] = LocalTrainer
    else:
        cls = Trainer
    return cls(
        store,
        cfg or TrainConfig(),
        out,
        client,
        resume=resume,
        force=force,
        log=log,
        on_epoch=on_epoch,
        progress=progress,
    ).fit()
