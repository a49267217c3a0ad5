"""The tasks that run on Dask workers: train on a few row ranges, evaluate, predict.

A training task joins its job on the parameter server, reads its rows straight from the store
with the loader (data never passes through the client or the scheduler), takes
``local_steps`` minibatch steps with the kernels, pushes ``delta = w_pulled - w_local`` and
continues. With ``overlap`` the push travels while the next local steps run; the reply is
folded in at the next push boundary (``w = w_server + local progress since the push``), which
keeps every step's inputs deterministic. Time is split into read / compute / communicate and
reported through Dask's fine performance metrics and in the task's result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from distributed import get_worker, rejoin, secede
from distributed.metrics import context_meter

from pipeline.allocator import MAX_MMAP_THRESHOLD_MB, restore_mmap_threshold
from pipeline.errors import TrainingError
from pipeline.loader import ChunkLoader
from pipeline.ps import ParameterServer
from pipeline.store import open_store

logger = logging.getLogger(__name__)

_CACHE_SIZE = 8
# batch_size = 0 (full batch): rows per piece over which a task accumulates its gradient, so
# that memory stays that of one minibatch whatever the number of rows
FULL_BATCH_ROWS = 4096
_trainers: OrderedDict[tuple, Any] = OrderedDict()
_stores: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()


def _store(path: str) -> Any:
    """Open stores once per worker process (metadata reads are not free on object stores)."""
    with _lock:
        st = _stores.get(path)
        if st is None:
            st = _stores[path] = open_store(path)
            while len(_stores) > _CACHE_SIZE:
                _stores.popitem(last=False)
        return st


def make_trainer(spec: dict, cfg: dict) -> Any:
    """A fresh :class:`kernels.mlp.MLPTrainer` for ``spec`` with the local optimizer of ``cfg``."""
    from kernels.mlp import MLPSpec, MLPTrainer

    optimizer = cfg["optimizer"]
    return MLPTrainer(
        MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])}),
        backend=cfg["backend"],
        optimizer="momentum" if optimizer == "nesterov" else optimizer,
        nesterov=optimizer == "nesterov",
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        beta1=cfg.get("beta1", 0.9),
        beta2=cfg.get("beta2", 0.999),
        rho=cfg.get("rho", 0.99),
        weight_decay=cfg["weight_decay"],
        max_batch=cfg["batch_size"] or FULL_BATCH_ROWS,
        seed=cfg["seed"],
    )


def cached_trainer(job: str, purpose: str, spec: dict, cfg: dict) -> Any:
    """One trainer per (job, purpose, thread) on this worker, so that the local optimizer's
    state and compiled buffers survive from one task of the job to the next."""
    key = (job, purpose, threading.get_ident(), repr(sorted(spec.items())), repr(sorted(cfg.items())))
    with _lock:
        tr = _trainers.get(key)
        if tr is not None:
            _trainers.move_to_end(key)
            return tr
    tr = make_trainer(spec, cfg)
    with _lock:
        _trainers[key] = tr
        while len(_trainers) > _CACHE_SIZE:
            _trainers.popitem(last=False)
    return tr


def prepare_targets(y: np.ndarray, target: dict | None) -> np.ndarray:
    """Classification labels as int32; regression targets standardized as float32 2-D."""
    if target is None:
        return np.ascontiguousarray(y, dtype=np.int32)
    yy = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.ascontiguousarray((yy - target["mean"]) / target["std"], dtype=np.float32)


class _Comm:
    """Push/pull bookkeeping of one participant, timing only the time spent waiting.

    A reply held at a barrier (sync round, ssp bound) may take long. While it waits the task
    leaves the worker's thread pool, so the thread can run another job's task: otherwise two
    sync jobs sharing single-threaded workers can each hold a thread while waiting for a task
    of theirs queued behind the other's (a cross-job deadlock broken only by join_timeout).
    """

    _LONG_WAIT = 0.2  # seconds before leaving the thread pool

    def __init__(self, ps: ParameterServer, name: str, timeout: float) -> None:
        self.ps, self.name, self.timeout = ps, name, timeout
        self.seconds = 0.0
        self._seceded_once = False

    def _result_yielding_thread(self, fut: Any) -> dict:
        try:
            return fut.result(timeout=self._LONG_WAIT)
        except concurrent.futures.TimeoutError:
            pass
        if not self._seceded_once:
            secede()  # tells the worker the task is long-running and frees its slot
            self._seceded_once = True
        else:
            from distributed.threadpoolexecutor import secede as pool_secede

            pool_secede(adjust=True)
        try:
            return fut.result()
        finally:
            rejoin()  # blocks until the pool has a free slot again

    def wait(self, fut: Any) -> dict:
        t = time.perf_counter()
        try:
            reply = self._result_yielding_thread(fut)
        finally:
            self.seconds += time.perf_counter() - t
        status = reply.get("status")
        if status == "failed":
            raise TrainingError(reply.get("message") or "the parameter server failed the job")
        if status == "timeout":
            raise TrainingError(
                f"participant {self.name}: {reply.get('message')}; raise barrier_timeout or "
                "check that every worker is alive"
            )
        return reply


# Dask samples the stacks of running tasks into a per-worker profile, a tree up to 100 levels
# deep (the first task here imports and compiles the kernels: stacks that deep). Every message
# a worker sends is sized with Dask's recursive sizeof, about 8 Python frames per level of that
# tree: under Python's default limit of 1,000 frames the profile a performance report (or the
# dashboard's profile page) asks for could not be sized, and Dask logged a "Sizeof calculation
# ... failed" warning. This limit sizes the deepest profile Dask records.
_MIN_RECURSION_LIMIT = 2500


def _allow_profile_sizing() -> None:
    if sys.getrecursionlimit() < _MIN_RECURSION_LIMIT:
        sys.setrecursionlimit(_MIN_RECURSION_LIMIT)


def _holdout(cfg: dict, keep: str) -> dict | None:
    """The loader's row selection when validation rows are held out of the training store
    (``cfg["holdout"]``): training tasks read the other rows, evaluation reads those."""
    held = cfg.get("holdout")
    return {**held, "keep": keep} if held else None


def train_task(
    job: str,
    name: str,
    store_path: str,
    ranges: list[tuple[int, int]],
    epoch: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
    val: dict | None = None,
) -> dict[str, Any]:
    """Train on ``ranges`` of the store as participant ``name`` of ``job``; return statistics.

    ``val`` (sync mode: ``{"path": store, "ranges": [...], "norm": {"mean", "std"} or None}``) asks the task to validate its share
    of the validation rows with the epoch's final weights once every participant has left: the
    epoch then needs no separate validation round of tasks. Its partial sums travel in the
    summary (``val``, plain lists) with the version they were computed at (``val_version``)."""
    t_start = time.perf_counter()
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))  # see pipeline/allocator.py
    _allow_profile_sizing()
    worker = get_worker()
    comm = _Comm(ParameterServer(job), name, cfg["barrier_timeout"])
    slot = name.split("-", 1)[-1]  # "e3-s1" -> "s1": the share, whatever the epoch
    reply = comm.wait(comm.ps.soon.join(name, key=worker.get_current_task(), worker=worker.address, slot=slot))
    trainer = cached_trainer(job, "train", spec, cfg)
    keep_state = bool(reply.get("keep_state"))
    if keep_state:
        # sync: the share's own local optimizer state (fresh in its first epoch), not this
        # thread's, so the run does not depend on which worker runs which share
        trainer.reset_optimizer()
        saved = reply.get("local_state")
        if saved:
            trainer.optimizer.load_state_dict(
                {"t": saved["t"], "lr": saved["lr"], **{f"opt.{k}": v for k, v in saved["buffers"].items()}}
            )
    anchor = np.array(reply["params"], dtype=np.float32)
    version = int(reply["version"])
    skip = int(reply.get("skip_batches", 0))
    trainer.set_params(anchor)

    local_steps, overlap = cfg["local_steps"], cfg["overlap"]
    pending = None
    steps = samples = batches_done = 0
    n_since = b_since = 0
    loss_since: list[float] = []
    losses: list[float] = []
    compute = 0.0
    reported = {"read": 0.0, "compute": 0.0, "communicate": 0.0}

    def fold(fut: Any) -> None:
        # w_local = w_server + (w_local - w_at_push): keep the progress made while in flight
        nonlocal anchor, version
        r = comm.wait(fut)
        fresh = np.asarray(r["params"], dtype=np.float32)
        if overlap:
            trainer.set_params(fresh + (trainer.get_params() - anchor))
        else:
            trainer.set_params(fresh)
        anchor, version = fresh, int(r["version"])

    def push() -> None:
        nonlocal pending, anchor, n_since, b_since, loss_since
        if pending is not None:
            fold(pending)
            pending = None
        current = trainer.get_params()
        delta = anchor - current
        now = {"read": loader.read_seconds, "compute": compute, "communicate": comm.seconds}
        timings = {k: v - reported[k] for k, v in now.items()}  # since the last push
        reported.update(now)
        fut = comm.ps.soon.push(
            name=name,
            version=version,
            delta=delta,
            samples=n_since,
            batches=b_since,
            loss=float(np.mean(loss_since)) if loss_since else 0.0,
            timings=timings,
            timeout=cfg["barrier_timeout"],
        )
        anchor = current
        n_since = b_since = 0
        loss_since = []
        if overlap:
            pending = fut
        else:
            fold(fut)

    full_batch = cfg["batch_size"] == 0  # one step with the mean gradient of every row
    if full_batch:
        trainer.discard_accumulated()  # a failed task on this thread may have left some behind
    loader = ChunkLoader(
        _store(store_path),
        ranges=ranges,
        batch_size=cfg["batch_size"] or FULL_BATCH_ROWS,
        shuffle=not full_batch,
        seed=cfg["seed"],
        buffer_chunks=cfg["shuffle_chunks"],
        prefetch=cfg["prefetch"],
        normalize=cfg["normalize"],
        holdout=_holdout(cfg, "train"),
    )
    try:
        for i, (X, y) in enumerate(loader.epoch(epoch)):
            if i < skip:  # a rerun after a lost worker: these batches were already absorbed
                continue
            t = time.perf_counter()
            if full_batch:
                loss = trainer.accumulate(X, prepare_targets(y, target))
            else:
                loss = trainer.step(X, prepare_targets(y, target))
                steps += 1
            compute += time.perf_counter() - t
            samples += len(X)
            n_since += len(X)
            b_since += 1
            batches_done += 1
            loss_since.append(loss * len(X) if full_batch else loss)  # full batch: summed below
            losses.append(loss)
            if b_since == local_steps and not full_batch:
                push()
        if full_batch and b_since:
            t = time.perf_counter()
            trainer.apply()
            compute += time.perf_counter() - t
            steps += 1
            loss_since = [float(np.sum(loss_since)) / n_since]  # the mean loss over every row
            losses = list(loss_since)
        if b_since:
            push()
        if pending is not None:
            fold(pending)
            pending = None
    finally:
        read_seconds = loader.read_seconds
        loader.close()
    summary = {
        "name": name,
        "worker": worker.address,
        "samples": samples,
        "steps": steps,
        "skipped": skip,
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "read": read_seconds,
        "compute": compute,
        "communicate": comm.seconds,
        "total": time.perf_counter() - t_start,
        "version": version,
    }
    for label, secs in (("read", read_seconds), ("compute", compute), ("communicate", comm.seconds)):
        context_meter.digest_metric(label, secs, "seconds")
    # Leave the summary with the parameter server: the driver reads it there, so a worker
    # dying between the end of this task and the driver's gather loses nothing.
    extra: dict[str, Any] = {}
    if keep_state:
        opt = trainer.optimizer.state_dict()
        buffers = {k.removeprefix("opt."): v for k, v in opt.items() if k.startswith("opt.")}
        extra = {"slot": slot, "local_state": {"t": opt["t"], "lr": opt["lr"], "buffers": buffers}}
    try:
        comm.ps.soon.leave(name, summary=summary, **extra).result(timeout=30)
    except Exception:  # noqa: BLE001 - the driver falls back to this task's result
        logger.debug("participant %s could not leave its summary", name, exc_info=True)
    if val and val.get("ranges"):
        try:
            final = comm.wait(comm.ps.soon.epoch_end(timeout=cfg["barrier_timeout"]))
            t_val = time.perf_counter()
            params = np.asarray(final["params"], dtype=np.float32)
            partial = evaluate_ranges(_store(val["path"]), val["ranges"], params, job, spec, cfg, target, val.get("norm"))
        except Exception:  # noqa: BLE001 - the training part is done and must not be rerun:
            # without ``val`` in the summary the driver validates on its own (and reports errors)
            logger.debug("participant %s could not validate", name, exc_info=True)
            return summary
        validate = time.perf_counter() - t_val
        context_meter.digest_metric("validate", validate, "seconds")
        summary = {**summary, "val": plain_metrics(partial), "val_version": int(final["version"]), "validate": validate}
        try:  # the same route again: only the summary changes (the participant left already)
            comm.ps.soon.leave(name, summary=summary).result(timeout=30)
        except Exception:  # noqa: BLE001 - the driver falls back to this task's result
            logger.debug("participant %s could not leave its validation", name, exc_info=True)
    return summary


def evaluate_arrays(probs_or_pred: np.ndarray, y: np.ndarray, target: dict | None, n_classes: int) -> dict:
    """Partial sums for metrics over one batch (merged with :func:`merge_metrics`)."""
    if target is None:
        yi = np.asarray(y, dtype=np.int64)
        p = np.clip(probs_or_pred[np.arange(len(yi)), yi], 1e-15, 1.0)
        pred = probs_or_pred.argmax(axis=1)
        conf = np.zeros((n_classes, n_classes), np.int64)
        np.add.at(conf, (yi, pred), 1)
        return {"n": len(yi), "loss_sum": float(-np.log(p).sum()), "confusion": conf}
    yy = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    pred = np.asarray(probs_or_pred, dtype=np.float64).reshape(len(y), -1) * target["std"] + target["mean"]
    err = pred - yy
    zerr = err / target["std"]
    return {
        "n": len(yy),
        "loss_sum": float(np.mean(zerr**2, axis=1).sum()),
        "sse": (err**2).sum(axis=0),
        "sae": np.abs(err).sum(axis=0),
        "sum_y": yy.sum(axis=0),
        "sum_y2": (yy**2).sum(axis=0),
        "min_y": yy.min(axis=0),  # merged by minimum / maximum: tell a constant target exactly
        "max_y": yy.max(axis=0),
    }


def plain_metrics(sums: dict) -> dict[str, Any]:
    """Partial sums as msgpack-friendly numbers and lists (undone by :func:`array_metrics`)."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sums.items()}


def array_metrics(sums: dict) -> dict[str, Any]:
    """Inverse of :func:`plain_metrics`: lists back to arrays, so partial sums add up (Dask's
    messages decode lists as tuples, which ``+`` would concatenate)."""
    return {k: np.asarray(v) if isinstance(v, list | tuple) else v for k, v in sums.items()}


_MERGE = {"min_y": np.minimum, "max_y": np.maximum}


def merge_metrics(parts: list[dict]) -> dict:
    """Partial sums added up (``min_y`` / ``max_y`` by minimum / maximum)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = v
            else:
                out[k] = _MERGE[k](out[k], v) if k in _MERGE else out[k] + v
    return out


def finish_metrics(sums: dict, target: dict | None) -> dict[str, Any]:
    """Final metrics from merged partial sums: accuracy, log loss, confusion matrix; or R^2,
    RMSE, MAE (averaged over output columns)."""
    n = int(sums.get("n", 0))
    if n == 0:
        return {"n": 0}
    if target is None:
        conf = np.asarray(sums["confusion"])
        return {
            "n": n,
            "loss": sums["loss_sum"] / n,
            "log_loss": sums["loss_sum"] / n,
            "accuracy": float(np.trace(conf) / n),
            "confusion": conf.tolist(),
        }
    sst = sums["sum_y2"] - sums["sum_y"] ** 2 / n
    r2 = 1 - sums["sse"] / np.where(sst > 0, sst, 1.0)
    if "min_y" in sums:
        # A constant target has no variance to explain: R^2 is 1 for exact predictions and 0
        # otherwise, as scikit-learn's r2_score (force_finite=True) defines it, instead of the
        # huge negative number that rounding noise in sst would give.
        constant = np.asarray(sums["min_y"]) == np.asarray(sums["max_y"])
        r2 = np.where(constant, np.where(np.asarray(sums["sse"]) == 0, 1.0, 0.0), r2)
    return {
        "n": n,
        "loss": sums["loss_sum"] / n,
        "r2": float(np.mean(r2)),
        "rmse": float(np.mean(np.sqrt(sums["sse"] / n))),
        "mae": float(np.mean(sums["sae"] / n)),
    }


def evaluate_task(
    store_path: str,
    ranges: list[tuple[int, int]],
    params: np.ndarray | None,
    job: str | None,
    spec: dict,
    cfg: dict,
    target: dict | None,
    norm: dict | None = None,
) -> dict:
    """Metric partial sums of the model (``params``, or the job's current weights) on ``ranges``.
    ``norm`` (``{"mean": [...], "std": [...]}``): the model's feature statistics, which
    standardize the rows instead of the store's own."""
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))
    _allow_profile_sizing()
    if params is None:
        params = ParameterServer(str(job)).pull(model=True)[0]
    return evaluate_ranges(_store(store_path), ranges, params, job, spec, cfg, target, norm)


def evaluate_ranges(
    store: Any,
    ranges: list[tuple[int, int]],
    params: np.ndarray,
    job: str | None,
    spec: dict,
    cfg: dict,
    target: dict | None,
    norm: dict | None = None,
) -> dict:
    """Metric partial sums of the model ``params`` on ``ranges`` of an open ``store``
    (standardized with ``norm``'s mean/std when given, else the store's)."""
    trainer = cached_trainer(job or "model", "eval", spec, cfg)
    trainer.set_params(np.asarray(params, dtype=np.float32))
    loader = ChunkLoader(
        store,
        ranges=ranges,
        batch_size=max(cfg["batch_size"], 1024),
        shuffle=False,
        normalize=cfg["normalize"],
        prefetch=cfg["prefetch"],
        mean=None if norm is None else norm["mean"],
        std=None if norm is None else norm["std"],
        holdout=_holdout(cfg, "validation"),
    )
    parts = []
    try:
        for X, y in loader.epoch(0):
            parts.append(evaluate_arrays(trainer.forward(X), y, target, spec["n_out"]))
    finally:
        loader.close()
    return merge_metrics(parts)
