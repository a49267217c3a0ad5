"""A federated site's tasks: what runs on the site's own Dask workers, next to its rows.

The driver submits each of them with ``resources={site: 1}``, so only a worker that declares
the site's resource runs it, and a restarted worker (new port) picks it up. None of them sends
a row anywhere: :func:`site_info` returns the site's schema and sums over its training rows,
:func:`fit_client` pushes one model delta with its sample count to the parameter server,
:func:`evaluate_client` returns metric partial sums over the site's own held-out rows.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from distributed import get_worker
from distributed.metrics import context_meter

from pipeline.allocator import MAX_MMAP_THRESHOLD_MB, restore_mmap_threshold
from pipeline.errors import PSError
from pipeline.loader import held_out_mask
from pipeline.loop import (
    FULL_BATCH_ROWS,
    load_local_state,
    prepare_targets,
    run_batches,
    training_loader,
)
from pipeline.metrics import plain_metrics
from pipeline.partition import open_partition
from pipeline.privacy import clip_update, noise_rng, privatize_local
from pipeline.ps import ParameterServer
from pipeline.ps.wire import TOPK_FRACTION, DeltaCompressor
from pipeline.store import RunningStats, read_rows_at, store_identity
from pipeline.worker import (
    BudgetSpent,
    _allow_profile_sizing,
    _Comm,
    _store,
    cached_trainer,
    evaluate_ranges,
    masked_for_round,
)

# Error feedback of a real site's compressed deltas, kept by the site's worker process between
# rounds: (job, store path) -> what compression has not sent yet. A restarted worker starts from
# zero (what it held is lost, as a few rounds of a top-k residual). Simulated clients keep none:
# thousands of residuals would make memory grow with the clients.
_RESIDUALS: dict[tuple[str, str], np.ndarray] = {}
_MAX_RESIDUALS = 16

# Simulated clients: the decoded row-chunks of the run's store, kept by a worker process between
# rounds: (job, the store's identity, pipeline.store.store_identity) -> {chunk: (X, y)}. A round's
# clients' rows are scattered over every chunk of the store, so without them each task read (and
# checked) the whole store every round. Only a store whose X and y fit in CHUNK_CACHE_SHARE of the
# worker's memory limit (at most CHUNK_CACHE_MAX_BYTES) is kept; a larger one is read as before.
# One job's chunks at a time: a new run drops the last one's. A resumed run keeps its job's name:
# a store re-created at its path since is another identity, whose chunks are read afresh.
CHUNK_CACHE_SHARE = 0.25
CHUNK_CACHE_MAX_BYTES = 1 << 30
_chunks: dict[tuple[str, tuple], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
_chunks_lock = threading.Lock()

logger = logging.getLogger(__name__)


def _cache_budget() -> int:
    """Bytes of decoded chunks a worker process keeps (:data:`CHUNK_CACHE_SHARE` of its memory
    limit, at most :data:`CHUNK_CACHE_MAX_BYTES`; a quarter of that without a limit)."""
    try:
        limit = get_worker().memory_manager.memory_limit
    except (ValueError, AttributeError):  # outside a worker (tests)
        limit = None
    if not limit:
        return CHUNK_CACHE_MAX_BYTES // 4
    return int(min(CHUNK_CACHE_MAX_BYTES, CHUNK_CACHE_SHARE * limit))


def read_client_rows(store: Any, rows: np.ndarray, job: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pipeline.store.read_rows_at` for simulated clients of ``job``: the same arrays (in
    the order of ``rows``), served from the chunks this worker already decoded for the job when
    the store fits the cache budget (:func:`_cache_budget`); each chunk is read (and checked) from
    the store once per worker process and run."""
    rows = np.asarray(rows)
    nbytes = store.n_rows * (
        store.n_features * store.X.dtype.itemsize + int(np.prod(store.y.shape[1:])) * store.y.dtype.itemsize
    )
    if nbytes > _cache_budget() or not len(rows) or rows.dtype.kind not in "iu":
        return read_rows_at(store, rows)
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= store.n_rows:
        return read_rows_at(store, rows)  # its error names the row
    key = (job, store_identity(str(store.path)))  # a resumed job keeps its name; a re-created store is another
    with _chunks_lock:
        for other in [k for k in _chunks if k[0] != job]:
            del _chunks[other]
        have = _chunks.setdefault(key, {})
    X = np.empty((len(rows), store.n_features), store.X.dtype)
    y = np.zeros((len(rows), *store.y.shape[1:]), store.y.dtype)
    chunk_of = rows.astype(np.int64) // store.chunk_rows
    for c in np.unique(chunk_of).tolist():
        got = have.get(c)
        if got is None:
            got = store.read_chunk(c)
            with _chunks_lock:
                have[c] = got
        at = np.flatnonzero(chunk_of == c)
        local = rows[at] - c * store.chunk_rows
        X[at] = got[0][local]
        y[at] = got[1][local]
    return X, y


def _worker_address() -> str:
    try:
        return str(get_worker().address)
    except ValueError:  # called outside a worker (tests)
        return "this process"


def _chunk_ranges(store: Any) -> list[tuple[int, int]]:
    return [(s.start, s.stop) for s in (store.chunk_slice(i) for i in range(store.n_chunks))]


def site_info(store_path: str, holdout: dict | None = None) -> dict[str, Any]:
    """What the driver needs to plan from one site, computed on the site: its rows, schema
    (features, encodings, task, classes, dtype) and, over its *training* rows (``holdout``,
    ``{"fraction", "seed"}``: the rows held out for validation are left out), per-feature
    count, sum and sum of squares, and the class counts (regression: the target's sums)."""
    store = _store(store_path)
    n_f = store.n_features
    width = 1 if store.y.ndim == 1 else int(store.y.shape[1])
    s, ss = np.zeros(n_f, np.float64), np.zeros(n_f, np.float64)
    ys, yss = np.zeros(width, np.float64), np.zeros(width, np.float64)
    n_classes = len(store.classes or [])
    counts = np.zeros(n_classes, np.int64)
    count = held = 0
    # the sums of squared deviations about this site's mean, which the driver pools exactly (raw
    # sums of squares cancel when a column's mean is large against its spread); the raw sums stay
    # in the report, which a resumed run compares
    xstats, ystats = RunningStats(n_f), RunningStats(width)
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        X, y = store.read_chunk(i)
        if holdout and holdout.get("fraction", 0) > 0:
            mask = held_out_mask(store, sl.start, sl.stop, holdout["fraction"], holdout["seed"])
            held += int(mask.sum())
            X, y = X[~mask], y[~mask]
        x = np.asarray(X, dtype=np.float64)
        count += len(x)
        s += x.sum(axis=0)
        ss += np.square(x).sum(axis=0)
        xstats.update(x)
        if store.task == "classification":
            counts += np.bincount(np.asarray(y, np.int64).reshape(-1), minlength=n_classes)[:n_classes]
        else:
            yy = np.asarray(y, np.float64).reshape(len(y), -1)
            ys += yy.sum(axis=0)
            yss += np.square(yy).sum(axis=0)
            ystats.update(yy)
    return {
        "worker": _worker_address(),
        "n_rows": store.n_rows,
        "n_features": n_f,
        "feature_names": list(store.feature_names),
        "encodings": store.attrs.get("encodings") or [],
        "task": store.task,
        "classes": None if store.classes is None else list(store.classes),
        "dtype": str(store.X.dtype),
        "y_width": width,
        "labelled": store.attrs.get("labelled") is not False,
        "n_held_out": held,
        "count": count,
        "sum": s.tolist(),
        "sumsq": ss.tolist(),
        "class_counts": counts.tolist(),
        "y_sum": ys.tolist(),
        "y_sumsq": yss.tolist(),
        "m2": xstats.m2.tolist(),
        "y_m2": ystats.m2.tolist(),
    }


def fit_client(
    job: str,
    name: str,
    store_path: str,
    round_: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
    norm: dict | None,
    client: dict | None = None,
    weights: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One federated client's round: join ``job`` as participant ``name``, train
    ``cfg["local_epochs"]`` passes over the site's training rows from the round's weights
    (standardized with the federation's pooled ``norm``), push ONE delta with its sample
    count without waiting for the round, leave. The summary says what was pushed; a push
    refused because the round closed meanwhile is ``"late": True`` (nothing applied).

    ``client`` (simulated clients: ``{"partition": path, "k": k}``): the rows are client
    ``k``'s of the run's partition of the one store (its training rows already).

    ``weights`` (secure aggregation without DP: participant -> training rows of the round's
    sampled clients): the delta is scaled before masking so that the masked sum makes the
    same sample-weighted mean as a plain round (:func:`pipeline.secagg.roster_share`)."""
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))
    _allow_profile_sizing()
    worker = get_worker()
    task = worker.get_current_task()
    return _fit_one(job, name, store_path, round_, spec, cfg, target, norm, client, worker, task, weights)


def fit_clients(
    job: str,
    names: list[str],
    ks: list[int],
    store_path: str,
    partition_path: str,
    round_: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
    group: str | None = None,
) -> dict[str, Any]:
    """Simulated clients ``ks`` (participants ``names``) of one round, one after the other in
    this task, each as :func:`fit_client` trains one: ``{"clients": {name: summary}}``.

    With ``group`` (a participant name; runs whose server takes the plain weighted mean of
    the deltas: no privacy, no robust aggregator) the task is ONE participant: it reads the
    rows of all its clients in one pass over the chunks holding them, trains each client from
    the round's weights on its own rows and pushes the clients' sample-weighted mean delta
    once, weighted by their rows together (see :func:`_fit_group`)."""
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))
    _allow_profile_sizing()
    worker = get_worker()
    if group is not None:
        return {"clients": _fit_group(job, group, names, ks, store_path, partition_path, round_, spec, cfg, target)}
    out = {}
    for name, k in zip(names, ks, strict=True):
        part = {"partition": partition_path, "k": int(k)}
        out[name] = _fit_one(job, name, store_path, round_, spec, cfg, target, None, part, worker, None)
        if out[name]["late"]:
            break  # the round is over: the task's other clients are not trained for nothing
    return {"clients": out}


def _fit_group(
    job: str,
    group: str,
    names: list[str],
    ks: list[int],
    store_path: str,
    partition_path: str,
    round_: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
) -> dict[str, dict[str, Any]]:
    """Clients ``ks`` trained as participant ``group``: their rows read once (the union, by
    chunk), each client trained from the round's weights on its own rows, the deltas folded
    into their mean weighted by each client's rows (summed in the clients' order, in float64)
    and pushed once with the rows together. The weighted mean of these group means, weighted
    by the groups' rows, is the weighted mean over the clients (up to float rounding), so the
    server holds one delta per task instead of one per client.

    A client's minibatches are its rows in an order drawn from ``(seed, epoch, k)`` (a
    loader's shuffle pool is not needed: the rows are in memory). Returns a summary per
    client (``late`` for all of them when the round closed before the push)."""
    t_start = time.perf_counter()
    worker = get_worker()
    store = _store(store_path)
    part = open_partition(partition_path)
    comm = _Comm(ParameterServer(job), group, cfg["barrier_timeout"])
    reply = comm.wait(comm.ps.soon.join(group, worker=worker.address))
    anchor = np.array(reply["params"], dtype=np.float32)
    version = int(reply["version"])
    t_read = time.perf_counter()
    rows = [part.rows(int(k)) for k in ks]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    X_all, y_all = read_client_rows(store, np.concatenate(rows) if rows else np.empty(0, np.int64), job)
    read_seconds = time.perf_counter() - t_read
    from kernels.rows import take_rows

    n_f = store.n_features
    if cfg["normalize"]:
        s = np.asarray(store.std, dtype=np.float64).reshape(-1)
        mean = np.ascontiguousarray(np.asarray(store.mean, dtype=np.float64).reshape(-1), dtype=np.float32)
        inv_std = np.ascontiguousarray(1.0 / np.where(s > 0, s, 1.0), dtype=np.float32)
    else:
        mean, inv_std = np.zeros(n_f, np.float32), np.ones(n_f, np.float32)
    y_dtype = np.int32 if store.task == "classification" else np.float64  # as the loader's
    trainer = cached_trainer(job, "fit", spec, cfg)
    full_batch = cfg["batch_size"] == 0
    size = cfg["batch_size"] or FULL_BATCH_ROWS
    epochs = cfg["local_epochs"]
    folded = np.zeros(anchor.size, np.float64)
    total = 0
    summaries: dict[str, dict[str, Any]] = {}
    timing: dict[str, float] = {"compute": 0.0}
    for name, k, a, b in zip(names, ks, offsets[:-1], offsets[1:], strict=True):
        t0 = time.perf_counter()
        load_local_state(trainer, None)  # every client starts the local optimizer afresh
        trainer.set_params(anchor)
        if full_batch:
            trainer.discard_accumulated()
        mine = np.arange(a, b, dtype=np.int64)
        samples = batches = 0
        losses: list[float] = []
        compute0 = timing["compute"]
        for e in range(epochs):
            order = (
                mine
                if full_batch
                else mine[np.random.default_rng([cfg["seed"], round_ * epochs + e, int(k)]).permutation(len(mine))]
            )
            r = run_batches(
                trainer,
                (
                    (X, prepare_targets(y, target))
                    for X, y in (
                        take_rows(X_all, y_all, order[i : i + size], mean, inv_std, y_dtype)
                        for i in range(0, len(order), size)
                    )
                ),
                full_batch=full_batch,
                timing=timing,
            )
            samples += r["samples"]
            batches += r["batches"]
            if r["samples"]:
                losses.append(r["row_loss"])
        n = samples // max(1, epochs)
        delta = anchor - trainer.get_params()
        folded += np.float64(n) * delta  # in the clients' order: the same sum whichever worker runs it
        total += n
        summaries[name] = {
            "name": name,
            "worker": worker.address,
            "samples": n,
            "batches": batches,
            "loss": float(np.mean(losses)) if losses else 0.0,
            "version": version,
            "late": False,
            "read": read_seconds * (b - a) / max(1, len(X_all)),  # the shared read, shared out by rows
            "compute": timing["compute"] - compute0,
            "communicate": 0.0,
            "total": time.perf_counter() - t0,
        }
    del X_all, y_all
    delta = (folded / max(total, 1)).astype(np.float32)
    loss = sum(v["loss"] * v["samples"] for v in summaries.values()) / max(total, 1)
    compressor = DeltaCompressor(
        cfg.get("compression", "none"), cfg.get("topk_fraction", TOPK_FRACTION), error_feedback=False
    )
    t_push = time.perf_counter()
    late = False
    try:
        wire, _ = compressor(delta)
        r = comm.wait(
            comm.ps.soon.push(
                name=group,
                version=version,
                delta=wire,
                samples=total,
                batches=sum(v["batches"] for v in summaries.values()),
                loss=loss,
                timings={"read": read_seconds, "compute": timing["compute"]},
                timeout=cfg["barrier_timeout"],
                wait=False,
            )
        )
        late = bool(r.get("dropped"))
    except PSError as exc:  # the round closed (deadline) before this delta arrived
        late = True
        logger.info("federated clients %s: folded delta not taken (%s)", group, exc)
    communicate = comm.seconds + time.perf_counter() - t_push
    for label, secs in (("read", read_seconds), ("compute", timing["compute"])):
        context_meter.digest_metric(label, secs, "seconds")
    try:  # no summary left with the server: the task's result carries one per client
        comm.ps.soon.leave(group).result(timeout=30)
    except Exception:
        logger.debug("federated clients %s could not leave", group, exc_info=True)
    share = communicate / max(1, len(summaries))
    for v in summaries.values():
        v["late"] = late
        v["communicate"] = share
    logger.debug("federated clients %s: %d clients in %.3f s", group, len(summaries), time.perf_counter() - t_start)
    return summaries


def _fit_one(
    job: str,
    name: str,
    store_path: str,
    round_: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
    norm: dict | None,
    client: dict | None,
    worker: Any,
    key: str | None,
    weights: dict[str, int] | None = None,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    comm = _Comm(ParameterServer(job), name, cfg["barrier_timeout"])
    reply = comm.wait(comm.ps.soon.join(name, key=key, worker=worker.address))
    anchor = np.array(reply["params"], dtype=np.float32)
    version = int(reply["version"])
    trainer = cached_trainer(job, "fit", spec, cfg)
    load_local_state(trainer, None)  # every round starts the local optimizer afresh
    trainer.set_params(anchor)
    full_batch = cfg["batch_size"] == 0
    if full_batch:
        trainer.discard_accumulated()
    rows = None if client is None else open_partition(client["partition"]).rows(int(client["k"]))
    loader = training_loader(_store(store_path), cfg, rows=rows, norm=norm)
    timing: dict[str, float] = {"compute": 0.0}
    samples = batches = 0
    losses: list[float] = []
    try:
        for e in range(cfg["local_epochs"]):
            r = run_batches(
                trainer,
                ((X, prepare_targets(y, target)) for X, y in loader.epoch(round_ * cfg["local_epochs"] + e)),
                full_batch=full_batch,
                timing=timing,
            )
            samples += r["samples"]
            batches += r["batches"]
            if r["samples"]:
                losses.append(r["row_loss"])
    finally:
        read_seconds = loader.read_seconds
        loader.close()
    loss = float(np.mean(losses)) if losses else 0.0
    rows = samples // max(1, cfg["local_epochs"])  # the weight of this site's delta: its rows
    late = False
    t_push = time.perf_counter()
    delta = anchor - trainer.get_params()
    clip = float(cfg.get("clip_norm", 1.0))
    if cfg.get("dp") == "local":  # the delta leaves the site clipped and noised
        privatize_local(delta, clip, float(cfg.get("noise_multiplier", 0.0)), noise_rng())
    feedback = client is None and bool(cfg.get("error_feedback", True))
    compressor = DeltaCompressor(  # secure aggregation is refused with compression (config)
        cfg.get("compression", "none"),
        cfg.get("topk_fraction", TOPK_FRACTION),
        error_feedback=feedback,
        residual=_RESIDUALS.get((job, store_path)) if feedback else None,
    )
    try:
        if cfg.get("secure_aggregation"):
            clip_update(delta, clip)  # the fixed-point sum is sized for deltas inside the clip
        while True:
            wire, attempt = delta, None
            if cfg.get("secure_aggregation"):
                shares = weights if cfg.get("dp", "off") == "off" else None  # DP: equal weights
                got = masked_for_round(comm, name, version, delta, clip, shares)
                if isinstance(got, dict):  # the round closed before the roster was fixed
                    raise PSError(got.get("message") or "the round closed before its keys were exchanged")
                wire, attempt = got
            else:
                wire, _ = compressor(delta)
            r = comm.wait(
                comm.ps.soon.push(
                    name=name,
                    version=version,
                    delta=wire,
                    samples=rows,
                    batches=batches,
                    loss=loss,
                    timings={"read": read_seconds, "compute": timing["compute"]},
                    timeout=cfg["barrier_timeout"],
                    wait=False,
                    attempt=attempt,
                )
            )
            if not r.get("redo"):  # redo: a roster member left; mask again for the others
                break
        if r.get("stop"):
            raise BudgetSpent(r.get("message") or "the privacy budget is spent")
        if r.get("dropped"):  # joined after its round had closed: a delta of a finished round
            late = True
            comm.ps.soon.leave(name).result(timeout=30)
        elif compressor.residual is not None:
            # taken: what compression left out goes with the site's next round
            if len(_RESIDUALS) >= _MAX_RESIDUALS:
                _RESIDUALS.pop(next(iter(_RESIDUALS)))
            _RESIDUALS[(job, store_path)] = compressor.residual
    except (PSError, BudgetSpent) as exc:  # the round closed (deadline) before this delta arrived
        late = True
        logger.info("federated client %s: delta not taken (%s)", name, exc)
    communicate = comm.seconds + time.perf_counter() - t_push
    summary = {
        "name": name,
        "worker": worker.address,
        "samples": rows,
        "batches": batches,
        "loss": loss,
        "version": version,
        "late": late,
        "read": read_seconds,
        "compute": timing["compute"],
        "communicate": communicate,
        "total": time.perf_counter() - t_start,
    }
    for label, secs in (("read", read_seconds), ("compute", timing["compute"])):
        context_meter.digest_metric(label, secs, "seconds")
    if not late:
        try:
            comm.ps.soon.leave(name, summary=summary).result(timeout=30)
        except Exception:
            logger.debug("federated client %s could not leave its summary", name, exc_info=True)
    return summary


def evaluate_client(
    job: str,
    store_path: str,
    spec: dict,
    cfg: dict,
    target: dict | None,
    norm: dict | None,
) -> dict[str, Any]:
    """Metric partial sums (plain lists) of the job's current model on the site's own
    held-out rows (all its rows when the run holds none out), standardized with the
    federation's pooled ``norm``."""
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))
    _allow_profile_sizing()
    params, version = ParameterServer(job).pull(model=True)
    store = _store(store_path)
    sums = evaluate_ranges(store, _chunk_ranges(store), params, job, spec, cfg, target, norm)
    return {"worker": _worker_address(), "version": int(version), "sums": plain_metrics(sums)}


def evaluate_clients(
    job: str,
    store_path: str,
    partition_path: str,
    first: int,
    stop: int,
    spec: dict,
    cfg: dict,
    target: dict | None,
) -> dict[str, Any]:
    """Simulated clients ``first`` to ``stop - 1``: the job's current model on each client's
    own rows, read in one pass (the rows of a group of clients, about 64k). Returns per-client
    arrays ``n``, ``loss`` and ``metric`` (accuracy, or R^2 of the client's targets; NaN for a
    client without rows or, regression, with a constant target)."""
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))
    _allow_profile_sizing()
    params, version = ParameterServer(job).pull(model=True)
    store = _store(store_path)
    part = open_partition(partition_path)
    sizes = part.sizes()[first:stop]
    rows = np.concatenate([part.rows(k) for k in range(first, stop)]) if stop > first else np.empty(0, np.int64)
    owner = np.repeat(np.arange(stop - first), sizes)
    trainer = cached_trainer(job, "eval", spec, cfg)
    trainer.set_params(np.asarray(params, dtype=np.float32))
    k = stop - first
    n = np.bincount(owner, minlength=k).astype(np.int64)
    loss_sum = np.zeros(k)
    hit = np.zeros(k)
    # regression: per client and target column, the errors' and the targets' sums of squares, the
    # targets taken about the training mean (raw sums of y and y^2 cancel when the mean is large
    # against the spread, as in pipeline.metrics.evaluate_arrays)
    width = int(np.prod(store.y.shape[1:], dtype=np.int64))
    sse, sy, syy = np.zeros((k, width)), np.zeros((k, width)), np.zeros((k, width))
    step = 1 << 14
    for a in range(0, len(rows), step):
        X, y = read_rows_at(store, rows[a : a + step])
        own = owner[a : a + step]
        x = np.asarray(X, np.float32)
        if cfg["normalize"]:
            x = ((x - store.mean.astype(np.float32)) / store.std.astype(np.float32)).astype(np.float32)
        out = trainer.forward(np.ascontiguousarray(x))
        if target is None:
            yi = np.asarray(y, np.int64).reshape(-1)
            p = np.clip(out[np.arange(len(yi)), yi], 1e-15, 1.0)
            loss_sum += np.bincount(own, weights=-np.log(p), minlength=k)
            hit += np.bincount(own, weights=(out.argmax(axis=1) == yi).astype(np.float64), minlength=k)
        else:
            yy = np.asarray(y, np.float64).reshape(len(y), -1)
            pred = np.asarray(out, np.float64).reshape(len(y), -1) * target["std"] + target["mean"]
            z = ((pred - yy) / target["std"]) ** 2
            loss_sum += np.bincount(own, weights=z.mean(axis=1), minlength=k)
            dy = yy - np.asarray(target["mean"], np.float64)
            for c in range(width):
                sse[:, c] += np.bincount(own, weights=(pred[:, c] - yy[:, c]) ** 2, minlength=k)
                sy[:, c] += np.bincount(own, weights=dy[:, c], minlength=k)
                syy[:, c] += np.bincount(own, weights=dy[:, c] ** 2, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(n > 0, loss_sum / np.maximum(n, 1), np.nan)
        if target is None:
            metric = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
        else:
            sst = syy - sy**2 / np.maximum(n, 1)[:, None]
            r2 = np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1.0), np.nan)
            metric = np.where(n > 0, r2.mean(axis=1), np.nan)  # per column, averaged as scikit-learn's
    return {"version": int(version), "n": n.tolist(), "loss": loss.tolist(), "metric": metric.tolist()}
