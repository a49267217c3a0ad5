"""Training in this process, with the same kernels and the driver's own loop.

A small store trains faster in one process than on a cluster: starting workers, compiling the
kernels in each and the task and parameter-server round trips cost seconds that a few epochs
of a small store never win back (bench/findings.md, "Where a step and a cold run go").
:class:`LocalTrainer` is :class:`pipeline.train.Trainer` with its one cluster-bound part
replaced: each epoch's work (in sync mode one share of the training rows, in async and ssp
mode its tasks one after the other) is trained here by the worker task's own loop
(:func:`pipeline.loop.run_batches`), and :class:`LocalServer` stands in for the parameter server (the same
server optimizer, schedule and weight average, applied every ``local_steps`` minibatches). The
run directory, checkpoints, ``--resume`` and the Ctrl-C / SIGTERM checkpoint are the driver's.
Such a run equals a one-worker, one-thread sync run on a cluster: same rows, same order, same
weights, compressed deltas and replies included, and with ``overlap`` the reply folded in
``overlap_steps`` steps after its push as a worker folds it (here nothing travels meanwhile: it
is the same arithmetic, not a speed-up).

:func:`pipeline.loop.run_batches` is the one in-process minibatch loop: the worker task, this
module and the scikit-learn estimators' in-memory training (pipeline.estimator) all use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, TrainingError
from pipeline.loader import RowCache
from pipeline.loop import (
    VAL_CACHE_MB,
    blas_limit,
    load_local_state,
    local_state,
    make_trainer,
    prepare_targets,
    row_cache_bytes,
    run_batches,
    training_loader,
)
from pipeline.plan import epoch_work
from pipeline.runstate import RunState
from pipeline.train import Ranges, Trainer, interrupts_between_polls, task_config

SLOT = "s0"  # the one share's slot, as a cluster's first sync share is named
SLOT_WORKER = "this process"  # the one "worker" the epoch is planned for


# BLAS threads while training in this process: the config's ``blas_threads``, by default one, as
# in a Dask worker (its nanny sets OMP/OpenBLAS/MKL threads to 1). The same thread count gives the
# same GEMM results, so a run here equals a one-worker cluster run bit for bit (with two threads
# OpenBLAS sums some products in another order). And a multi-threaded GEMM waits for all its
# threads at every call: on a loaded 2-core machine a step of MLP 784-512-256-10 took 4-5x longer
# with 2 BLAS threads than with one, and a 60k-row store's 5 epochs 310 s against 29 s
# (bench/findings.md, "Where a step and a cold run go"); on 2 idle cores 2 threads made the whole
# command 1.3-1.6x faster ("BLAS threads in process").

# Threads of the validation pass, each forwarding every EVAL_THREADS-th batch with a trainer of
# its own; their metric sums are merged in batch order (the same figures as one thread). Training
# here holds one BLAS thread and the loader's core is idle between epochs: the pass runs on both.
# With ``blas_threads`` > 1 the BLAS calls use the cores: EVAL_THREADS // blas_threads threads
# (at least one).
EVAL_THREADS = 2


class LocalServer:
    """The parameter server's part of a one-share job, in this process: the handle
    :class:`pipeline.train.Trainer` talks to (``create``, ``state``, ``metrics``, ``record``,
    ``expect``, ``close``), as :class:`pipeline.ps.ParameterServer` does on a cluster."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.history: list[tuple] = []
        self.samples = 0
        self.loss: float | None = None
        self.failed: str | None = None

    def create(
        self,
        params: np.ndarray,
        *,
        mode: str,
        optimizer: dict,
        schedule: dict,
        version: int = 0,
        optimizer_state: dict | None = None,
        local_states: dict | None = None,
        progress: dict | None = None,
        reply_codec: str = "none",
        reply_view: Any = None,
        **_: Any,
    ) -> None:
        from pipeline.optim import Schedule, ServerOptimizer

        self.params = np.array(params, dtype=np.float32)
        # compress_replies: the weights the share is given, the server's own followed through
        # the codec with the rounding carried on (pipeline.ps.wire.follow, as on a cluster)
        self.reply_codec = reply_codec
        if reply_codec != "none":
            self.held = np.array(reply_view if reply_view is not None else self.params, dtype=np.float32)
        self.mode = mode
        self.optimizer = ServerOptimizer(**optimizer, n=self.params.size)
        if optimizer_state:
            buffers = {k: np.array(v, dtype=np.float32) for k, v in optimizer_state["buffers"].items()}
            self.optimizer.load_state({**optimizer_state, "buffers": buffers}, self.params)
        self.schedule = Schedule(**schedule)
        self.version = int(version)
        self.local_states = dict(local_states or {}) if mode == "sync" else {}
        self.progress = {str(k): int(v) for k, v in (progress or {}).items()}

    def push(self, name: str, delta: np.ndarray, samples: int, batches: int, loss: float) -> np.ndarray:
        """Apply one participant's ``delta`` as the server does (a round of one); the new weights.
        A non-finite loss or delta fails the job before it is applied, in the server's words
        (:meth:`pipeline.ps.job.Job.push`): the weights stay those of the last good round."""
        bad = not np.isfinite(loss)
        if bad or not np.isfinite(delta).all():
            self.failed = (
                f"training diverged at round {self.version}: the {'loss' if bad else 'update'} is not finite "
                f"(loss={float(loss)}); lower the learning rate or add warm-up"
            )
            raise TrainingError(self.failed)
        lr = self.optimizer.lr * self.schedule.factor(self.version)
        self.optimizer.step(self.params, delta, lr)
        self.version += 1
        self.progress[name] = self.progress.get(name, 0) + int(batches)
        self.samples += samples
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        self.history.append((time.time(), self.version, loss, samples, 1))
        if not np.isfinite(self.params[:: max(1, self.params.size // 4096)]).all():
            self.failed = f"parameters became non-finite at round {self.version}"
            raise TrainingError(self.failed)
        if self.reply_codec != "none":
            from pipeline.ps.wire import follow

            self.held = follow(self.held, self.params, self.reply_codec)[1]
        return self.train_weights()

    def train_weights(self) -> np.ndarray:
        """The weights the share trains from: the server's, or with compressed replies the
        common weights a cluster's workers would hold (as :meth:`pipeline.ps.job.Job.reply`)."""
        return self.held if self.reply_codec != "none" else self.params

    def state(self) -> dict[str, Any]:
        opt_state = self.optimizer.state()
        buffers = opt_state["buffers"]
        params = self.params.copy()
        averaged = self.optimizer.ema and self.optimizer.t and "average" in buffers
        return {
            "params": params,
            "model": buffers["average"] if averaged else params,
            "version": self.version,
            "optimizer": self.optimizer.config(),
            "optimizer_state": opt_state,
            "progress": dict(self.progress),
            "local_states": dict(self.local_states),
            "failed": self.failed,
            **({"reply_view": self.held.copy()} if self.reply_codec != "none" else {}),
            # the rounds so far, kept with the checkpoint: a resumed run's history.json holds them all
            "rounds": list(self.history),
        }

    def metrics(self, history: bool = False) -> dict[str, Any]:
        # every round is one push here, those before a resume included (the version counts them)
        out: dict[str, Any] = {"samples": self.samples, "loss": self.loss, "pushes": self.version, "summed": 0}
        if history:
            out["history"] = [list(h) for h in self.history]
        return out

    def record(self, **_: Any) -> None:
        """The dashboard's epoch record: no dashboard here."""

    def expect(self, *_: Any, **__: Any) -> None:
        """The sync barrier's roster: a round of one needs none."""

    def close(self) -> None:
        pass


class LocalTrainer(Trainer):
    """:class:`pipeline.train.Trainer` in this process (module docstring); ``client`` is None."""

    installed_by = "this process (no cluster)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        asked = self.cfg.server_privacy()
        if asked:
            key = next(iter(asked))
            raise ConfigError(
                f"config key '{key}' = {getattr(self.cfg, key)!r} needs the parameter server of a Dask cluster "
                "(it clips, noises and accounts the rounds); train with a client (--workers N)"
            )
        self._trainer: Any = None
        self._residual: np.ndarray | None = None  # async/ssp: the error-feedback residual between tasks
        self._eval_trainers: list | None = None
        self._val_batches: list | None = None
        self._val_future: Any = None  # the validation rows being read during the first epoch
        self._check_interrupt: Any = lambda: None  # raises a Ctrl-C deferred to the next minibatch
        # the store's training rows kept between epochs when it fits (row_cache_mb, and at most
        # a quarter of this machine's memory)
        self._rows = RowCache(row_cache_bytes(self.cfg.row_cache_mb))

    def fit(self) -> Any:
        with self.run.claim(self.resume, self.force), blas_limit(self.cfg.blas_threads):
            return self._fit()

    # the cluster-bound hooks of Trainer._fit
    def _connect(self) -> tuple[str, dict[str, int]]:
        if self.cfg.ps_shards:
            raise TrainingError(
                f"ps_shards = {self.cfg.ps_shards} needs a Dask cluster with ps-shard workers and this run "
                "trains in this process; pass --scheduler ADDRESS or set ps_shards = 0"
            )
        return self.installed_by, {"this process": 1}

    def _server(self) -> LocalServer:
        self._ps = LocalServer(self.job)
        return self._ps

    def _create_job(self, ps: Any, params: np.ndarray, run: RunState, ckpt: Any) -> None:
        super()._create_job(ps, params, run, ckpt)
        if ckpt is not None and ckpt.rounds is not None:  # the rounds before the run was stopped
            ps.history = [(float(t), int(v), float(loss), int(n), int(d)) for t, v, loss, n, d in ckpt.rounds]
        self._rounds_before, self._counts_before = [], {}  # this server holds them: its metrics give them all

    def _forget_job(self) -> None:
        self._rows.clear()  # the store's chunks kept between epochs (up to row_cache_mb)

    def _span(self, name: str) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def _run_epoch(self, ps: LocalServer, run: RunState, threads: dict[str, int]) -> dict[str, Any]:
        """The epoch's work as a one-thread cluster would run it, in this process: one share of
        every range (sync), else the tasks one after the other."""
        epoch, done_tasks = run.epoch, run.done_tasks
        self._prefetch_validation()
        # the plan's own work for a cluster of one single-threaded worker
        work = [(w.name, w.ranges) for w in epoch_work(self.epoch_plan, self.cfg, epoch, {SLOT_WORKER: 1}, self.spec)]
        stats = {
            "val": None,
            "val_version": None,
            "validate": 0.0,
            "tasks": [],
            "samples": 0,
            "loss": 0.0,
            "read": 0.0,
            "compute": 0.0,
            "communicate": 0.0,
        }
        ran: list[str] = []  # the tasks run in this attempt
        # Ctrl-C and SIGTERM stop the epoch between two minibatches, never inside a round: the
        # server's weights, optimizer state and progress are then one round's, as a checkpoint needs
        with interrupts_between_polls() as self._check_interrupt:
            for name, ranges in work:
                if not ranges:
                    continue
                if name in done_tasks:  # finished before the run was stopped: its rows are the epoch's
                    if name in run.done_results:
                        stats["tasks"].append(
                            {"name": name, "worker": "this process", "samples": run.done_results[name]["samples"]}
                        )
                    continue
                r = self._run_task(ps, run, name, ranges)
                ran.append(name)
                run.done_results[name] = {k: r[k] for k in ("samples", "trained", "loss")}
                done_tasks.add(name)
                stats["tasks"].append({"name": name, "worker": "this process", "samples": r["samples"]})
                for k in ("read", "compute"):
                    stats[k] += r[k]
            self._check_interrupt()  # one that came during the last round
        # the rows of the batches an earlier attempt trained count too (as on a cluster: the
        # server absorbed them); the loss is over the rows trained in each task's last attempt
        stats["samples"], stats["trained"], stats["loss"] = run.epoch_totals(ran)
        stats["tasks"].sort(key=lambda t: t["name"])
        return stats

    def _run_task(self, ps: LocalServer, run: RunState, name: str, ranges: Ranges) -> dict[str, Any]:
        """What :func:`pipeline.worker.train_task` does with ``ranges``, here."""
        cfg, tcfg, epoch = self.cfg, task_config(self.cfg), run.epoch
        if self._trainer is None:
            self._trainer = make_trainer(self.spec, tcfg)
        trainer = self._trainer
        if cfg.mode == "sync":  # the share's own local optimizer state, as a cluster's task loads it
            load_local_state(trainer, ps.local_states.get(SLOT))
        trainer.set_params(ps.train_weights())
        anchor = trainer.get_params()
        # compressed deltas as a cluster's push sends them, error feedback included (the residual
        # stays with the share's local state, as on a cluster): the same weights as a one-worker run
        saved = ps.local_states.get(SLOT) if cfg.mode == "sync" else None
        compressor: Any = None
        if cfg.compression != "none":  # the codecs live beside the wire (which imports distributed)
            from pipeline.ps.wire import DeltaCompressor

            compressor = DeltaCompressor(
                cfg.compression,
                cfg.topk_fraction,
                cfg.error_feedback,
                (saved or {}).get("buffers", {}).get(DeltaCompressor.RESIDUAL)
                if cfg.mode == "sync"
                else self._residual,
            )
        full_batch = cfg.batch_size == 0
        if full_batch:
            trainer.discard_accumulated()
        loader = training_loader(self.store, tcfg, ranges=ranges, cache=self._rows)

        # overlap: a push's reply is folded in ``overlap_steps`` steps later, keeping the steps
        # taken meanwhile, exactly as a cluster's worker does (pipeline.worker._Pusher)
        pending: list[np.ndarray] = []

        def fold() -> None:
            nonlocal anchor
            if pending:
                fresh = pending.pop()
                trainer.set_params(fresh + (trainer.get_params() - anchor))
                anchor = fresh

        def sync(samples: int, batches: int, loss: float) -> None:
            nonlocal anchor
            fold()
            current = trainer.get_params()
            delta = anchor - current
            sent = delta if compressor is None else compressor(delta)[1]
            fresh = ps.push(name, sent, samples, batches, loss)
            if cfg.overlap:
                anchor = current
                pending.append(fresh.copy())
            else:
                trainer.set_params(fresh)
                anchor = trainer.get_params()
            if time.monotonic() - run.last_checkpoint > cfg.checkpoint_seconds:
                self._checkpoint(ps, run)

        t0 = time.perf_counter()
        target = self.target

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for X, y in loader.epoch(epoch):
                self._check_interrupt()  # a Ctrl-C stops the task here, between two minibatches
                yield X, prepare_targets(y, target)

        try:
            # weights that overflow make the kernels' products inf or NaN: the server's check
            # names the diverged round and the fix in one line, where NumPy's warnings would add
            # two lines per kind of overflow
            with np.errstate(over="ignore", invalid="ignore"):
                r = run_batches(
                    trainer,
                    batches(),
                    full_batch=full_batch,
                    local_steps=cfg.local_steps,
                    sync=sync,
                    skip=ps.progress.get(name, 0),
                    fold=fold if cfg.overlap else None,
                    fold_after=cfg.overlap_steps,
                )
                fold()
        except BaseException:
            try:
                self._checkpoint(ps, run)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        finally:
            read = loader.read_seconds
            loader.close()
        if cfg.mode == "sync":
            ps.local_states[SLOT] = local_state(trainer)
            if compressor is not None and compressor.residual is not None:
                ps.local_states[SLOT]["buffers"][compressor.RESIDUAL] = compressor.residual
        else:
            self._residual = None if compressor is None else compressor.residual
        total = time.perf_counter() - t0
        return {
            # the task's rows, those an earlier attempt trained (skipped here) included
            "samples": r["samples"] + r["skipped_samples"],
            "trained": r["samples"],
            "loss": r["loss"] if r["samples"] else 0.0,
            "read": read,
            "compute": max(0.0, total - read),
        }

    def _read_validation(self, val_ranges: Ranges) -> list:
        """The validation rows as the batches of :func:`pipeline.worker.evaluate_ranges`."""
        from pipeline.loop import validation_loader
        from pipeline.store import open_store

        store = self.store if self.val_path == self.store_path else open_store(self.val_path)
        loader = validation_loader(store, task_config(self.cfg), val_ranges, self.val_norm)
        try:
            return list(loader.epoch(0))
        finally:
            loader.close()

    def _prefetch_validation(self) -> None:
        """Start reading the validation rows on a thread of their own while the first epoch
        trains: training here uses one BLAS thread, so on a machine with a second core the
        read (a pass over every chunk: the held-out rows are spread over all of them) is done
        by the time the epoch ends. The batches are the ones :meth:`_evaluate` would read."""
        if self._val_batches is not None or self._val_future is not None or not self.epoch_plan.val_ranges:
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="pipeline-validation-read")
        self._val_future = pool.submit(self._read_validation, self.epoch_plan.val_ranges)
        pool.shutdown(wait=False)

    def _evaluate(self, epoch: int, val_ranges: Ranges) -> dict[str, Any]:
        """The model's metrics on the validation rows: the batches of
        :func:`pipeline.worker.evaluate_ranges`, read once (the first time on a thread during
        the first epoch, :meth:`_prefetch_validation`) and kept in memory for the next epochs
        when they take at most ``VAL_CACHE_MB`` (the rows held out of a store are spread over
        all its chunks: reading them is reading the whole store), forwarded on
        ``EVAL_THREADS`` threads and merged in batch order."""
        from pipeline.metrics import evaluate_arrays, finish_metrics, merge_metrics

        if not val_ranges:
            return {}
        tcfg = task_config(self.cfg)
        batches = self._val_batches
        if batches is None:
            future, self._val_future = self._val_future, None
            if future is not None and val_ranges is self.epoch_plan.val_ranges:
                batches = future.result()
            else:
                batches = self._read_validation(val_ranges)
            if sum(X.nbytes + y.nbytes for X, y in batches) <= VAL_CACHE_MB * 2**20:
                self._val_batches = batches
        if self._eval_trainers is None:  # for the run (a cluster's workers keep theirs per job)
            n = max(1, EVAL_THREADS // self.cfg.blas_threads)
            self._eval_trainers = [make_trainer(self.spec, tcfg) for _ in range(n)]
        model = np.asarray(self._ps.state()["model"], dtype=np.float32)
        for trainer in self._eval_trainers:
            trainer.set_params(model)

        def forward(k: int, step: int) -> list[tuple[int, dict]]:
            # every step-th batch from the k-th, with the k-th trainer (buffers of its own)
            trainer = self._eval_trainers[k]
            return [
                (i, evaluate_arrays(trainer.forward(X), y, self.target, self.spec["n_out"]))
                for i, (X, y) in enumerate(batches)
                if i % step == k
            ]

        threads = min(len(self._eval_trainers), len(batches))
        if threads <= 1:
            done = forward(0, 1)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads - 1, thread_name_prefix="pipeline-validation") as pool:
                others = [pool.submit(forward, k, threads) for k in range(1, threads)]
                done = forward(0, threads) + [x for f in others for x in f.result()]
        parts = [p for _, p in sorted(done, key=lambda ip: ip[0])]  # batch order: the same sums as one thread
        return finish_metrics(merge_metrics(parts), self.target)
