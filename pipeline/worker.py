"""The tasks that run on Dask workers: train on a few row ranges, evaluate, predict.

A training task joins its job on the parameter server, reads its rows straight from the store
with the loader (data never passes through the client or the scheduler), takes
``local_steps`` minibatch steps with the kernels (by :func:`pipeline.loop.run_batches`, the loop
in-process training and the estimators use too), pushes ``delta = w_pulled - w_local`` and
continues (:class:`_Pusher`). With ``overlap`` the push travels while the next local steps run; the reply is
folded in after ``overlap_steps`` of them (``w = w_server + local progress since the push``),
waiting for it there if it is late, which keeps every step's inputs deterministic. Time is split
into read / compute / communicate and reported through Dask's fine performance metrics and in the task's result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from distributed import get_worker, rejoin, secede
from distributed.metrics import context_meter

from pipeline.allocator import MAX_MMAP_THRESHOLD_MB, release_freed_memory, restore_mmap_threshold
from pipeline.errors import JobFailedError, ShardLostError, StoreError, TrainingError, as_task_failure
from pipeline.loader import ChunkLoader, RowCache, buffer_bytes, row_bytes
from pipeline.loop import (
    FULL_BATCH_ROWS,
    VAL_CACHE_MB,
    Lookahead,
    holdout_selection,
    load_local_state,
    local_state,
    lookahead_batches,
    make_trainer,
    prepare_targets,
    row_cache_bytes,
    run_batches,
    training_loader,
    validation_loader,
)
from pipeline.metrics import evaluate_arrays, merge_metrics, plain_metrics
from pipeline.privacy import clip_update, noise_rng, privatize_local
from pipeline.ps import ParameterServer
from pipeline.ps import shm as shmem
from pipeline.ps.job import SHM_DELTA
from pipeline.ps.shard import ShardedParameterServer
from pipeline.ps.wire import TOPK_FRACTION, DeltaCompressor, decode_delta, decode_vector
from pipeline.secagg import mask, new_keypair, quantize, roster_share, round_info, scale_for
from pipeline.store import open_store, store_identity

logger = logging.getLogger(__name__)

_CACHE_SIZE = 8
_trainers: OrderedDict[tuple, Any] = OrderedDict()
# async/ssp: a worker thread's error-feedback residual per job, kept from one task to the next as
# the thread's local optimizer state is (sync shares carry theirs with their local state)
_residuals: OrderedDict[tuple, np.ndarray] = OrderedDict()
_stores: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()
# A training job's validation rows as evaluation batches, read once per worker process and kept
# between its epochs (the rows held out of a store are spread over all its chunks: reading them
# is reading the whole store, ~0.2 s an epoch for a 60,000 x 784 store's share); at most
# VAL_CACHE_MB (pipeline.loop) per process and an eighth of the worker's memory limit, the least
# recently used job's batches dropped first.
_val_batches: OrderedDict[tuple, list[tuple[np.ndarray, np.ndarray]]] = OrderedDict()
# A training job's store chunks, kept between its epochs when the whole store fits (row_cache_mb,
# and a quarter of the worker's memory limit): a sync epoch cuts its shares differently every
# epoch, so a worker keeps the chunks it has read, whichever share needs them next.
_row_cache = RowCache(0)


def _store(path: str) -> Any:
    """Open stores once per worker process (metadata reads are not free on object stores), looked
    up by what the path names now: a relative path from another directory, or a store re-created
    at the same path since, is opened afresh (a worker outlives the jobs that send it paths)."""
    key = store_identity(path)
    with _lock:
        st = _stores.get(key)
        if st is None:
            st = _stores[key] = open_store(path)
            while len(_stores) > _CACHE_SIZE:
                _stores.popitem(last=False)
        return st


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


def _server(job: str, cfg: dict) -> Any:
    """The handle of ``job``'s parameter server: its shards when the run has ``ps_shards``."""
    return ShardedParameterServer(job) if cfg.get("ps_shards") else ParameterServer(job)


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
            raise JobFailedError(reply.get("message") or "the parameter server failed the job")
        if status == "timeout":
            raise TrainingError(
                f"participant {self.name}: {reply.get('message')}; raise barrier_timeout or "
                "check that every worker is alive"
            )
        if status == "left":
            # the task is no longer part of the job (cancelled by the driver, or its worker was
            # removed from the scheduler): it ends here, and Dask reruns it if it is still wanted
            raise TrainingError(reply.get("message") or f"participant {self.name} left the job")
        return reply


class PushGroup:
    """The sync rounds of one job's training tasks in this worker process, pushed as one.

    ``combine_pushes``: a task enters after joining the parameter server (at the version it was
    given) and leaves before leaving it. A task's push for version ``v`` waits until every task
    in the group has pushed for ``v``: the last to arrive sends one push for all of them, the
    sample-weighted mean of their deltas, summed in the order of their names as the server sums
    a round, with the others as co-senders (``also``: their samples, minibatches, losses and
    timings). The server pools it as their deltas (:meth:`pipeline.ps.job.Job.push`); every task
    of the group waits on that push's reply. A task that has already pushed for ``v`` (alone, as
    it was the only one in the group then) is not waited for, nor is one that left (its share is
    done, or it failed): if the others had all pushed, the leaving task's thread sends their push
    and goes on without waiting for the reply (the server's round waits for the leaving task
    until it leaves the server).

    On a worker started with one thread per core (``--nthreads N``, one worker per host)
    the server then receives one message per host and round instead of N.

    The sum is shared: with a vector of at least ``min_slice`` floats per task, the round's
    tasks, all waiting for it, each sum one contiguous slice of it (the compiled sum releases
    the GIL, so the slices run on as many cores) and the one that finishes last sends the push.
    Each element is the same float operations in the same order whatever the slicing: the same
    bits as one task summing it all."""

    min_slice = 1 << 17  # floats per task below which one task sums the whole vector (waking the others costs more)

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.cond = threading.Condition()
        self.done: dict[str, int] = {}  # member -> the last version it pushed for (joined at: one less)
        self.entries: dict[str, dict[str, Any]] = {}  # member -> its push not sent yet
        self.sent: dict[str, Any] = {}  # member -> the future of the push that carried its delta
        self.pushes = 0  # pushes sent for the group
        self.deltas = 0  # the tasks' deltas they carried
        self.shared = 0  # summed pushes whose sum the round's tasks shared, slice by slice
        self.sliced: dict[str, int] = {}  # member -> slices of shared sums it summed
        self._sum: np.ndarray | None = None  # the summed push's vector
        self._jobs: list[_SumJob] = []  # summed pushes whose slices are being summed

    def enter(self, name: str, version: int) -> None:
        with self.cond:
            self.done[name] = int(version) - 1

    def leave(self, name: str) -> None:
        with self.cond:
            self.done.pop(name, None)
            self.entries.pop(name, None)
            self.sent.pop(name, None)
            self._send_complete()

    def push(self, ps: Any, name: str, version: int, delta: np.ndarray, **fields: Any) -> Any:
        """Add ``name``'s delta for ``version``; the future of the push that carries it (once
        every member has pushed for that version, through ``ps``: the last one's handle)."""
        with self.cond:
            if name not in self.done:
                raise TrainingError(f"participant {name} pushed without entering its push group")
            self.entries[name] = {"ps": ps, "version": int(version), "delta": delta, **fields}
            self._send_complete()
            deadline = time.monotonic() + self.timeout
            while name not in self.sent:
                job = next((j for j in self._jobs if j.unclaimed()), None)
                if job is not None:  # a summed push is being summed: take a slice of it
                    self._sum_slice(job, name)
                    continue
                left = deadline - time.monotonic()
                if any(name in j.members for j in self._jobs):
                    left = max(left, 0.1)  # its slices are claimed: it is sent when they are summed
                if left <= 0:
                    self.entries.pop(name, None)
                    waiting = sorted(
                        m for m, v in self.done.items() if v < version and m not in self.entries and m != name
                    )
                    raise TrainingError(
                        f"participant {name}: the other training tasks of this worker ({', '.join(waiting)}) did "
                        f"not push within barrier_timeout = {self.timeout:g} s; raise it or set combine_pushes = false"
                    )
                self.cond.wait(left)
            sent = self.sent.pop(name)
            if isinstance(sent, BaseException):
                raise sent
            return sent

    def _sum_slice(self, job: _SumJob, name: str) -> None:
        # under self.cond, released while summing: task ``name`` sums the next slice of ``job``;
        # the one that finishes the last slice sends the push
        i = job.claim()
        self.cond.release()
        try:
            job.sum(i)
        except Exception as exc:  # noqa: BLE001 - reported to every task of the round
            job.error = job.error or exc
        finally:
            self.cond.acquire()
        self.sliced[name] = self.sliced.get(name, 0) + 1
        job.left -= 1
        if job.left == 0:
            self._jobs.remove(job)
            if job.error is not None:
                err = TrainingError(f"summing the pushes of {', '.join(job.members)} failed: {job.error!r}")
                sent = dict.fromkeys(job.members, err)
            else:
                sent = self._send_summed(job.version, job.group, job.out)
            for n, fut in sent.items():
                self.sent[n] = fut
                self.done[n] = job.version
            # a task that entered and pushed while the slices were summed waited for these
            # members to be done with the version: its push may be complete now
            self._send_complete()
            self.cond.notify_all()

    def _send_complete(self) -> None:
        # under self.cond: send each version whose every member has pushed for it (or before)
        for v in sorted({e["version"] for e in self.entries.values()}):
            names = sorted(n for n, e in self.entries.items() if e["version"] == v)
            if any(m not in names and done < v for m, done in self.done.items()):
                continue  # a member still has to push for v
            group = [(n, self.entries.pop(n)) for n in names]
            job = self._split(v, group)
            if job is not None:  # the waiting tasks sum it, slice by slice (push's loop)
                self._jobs.append(job)
                self.shared += 1
                self.cond.notify_all()
                continue
            for n, fut in self._send(v, group).items():
                self.sent[n] = fut
                self.done[n] = v
            self.cond.notify_all()

    def _split(self, version: int, group: list[tuple[str, dict[str, Any]]]) -> _SumJob | None:
        """The round's sum as slices for its tasks to share, or None to send it at once (one
        task, no samples, or a vector too short to be worth dividing)."""
        total = sum(e["samples"] for _, e in group)
        size = group[0][1]["delta"].size
        parts = min(len(group), size // self.min_slice)
        if len(group) == 1 or total == 0 or parts < 2:
            return None
        return _SumJob(version, group, shares_of([e["samples"] for _, e in group]), self._vector(size), parts)

    def _vector(self, size: int) -> np.ndarray:
        # the sum's vector is kept from round to round (a fresh one faults its pages in every
        # round under the nanny's trim threshold): a sync push's frames have left by its reply,
        # which every task of the group waits for before its next push
        if self._sum is None or self._sum.size != size:
            self._sum = np.empty(size, np.float32)
        return self._sum

    def _send(self, version: int, group: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Send one round's pushes of ``group`` (same version): one push for all of them; each
        on its own when only one pushed or none counted samples (no weights to sum by)."""
        total = sum(e["samples"] for _, e in group)
        fields = ("samples", "batches", "loss", "timings")
        if len(group) == 1 or total == 0:
            out = {}
            for n, e in group:
                kw = {k: e[k] for k in fields}
                out[n] = e["ps"].soon.push(name=n, version=version, delta=e["delta"], **kw, timeout=self.timeout)
                self.pushes += 1
                self.deltas += 1
            return out
        deltas, samples = [e["delta"] for _, e in group], [e["samples"] for _, e in group]
        acc = weighted_mean(deltas, samples, self._vector(total_size(group)))
        return self._send_summed(version, group, acc)

    def _send_summed(self, version: int, group: list[tuple[str, dict[str, Any]]], acc: np.ndarray) -> dict[str, Any]:
        """One push of the summed ``acc`` for ``group``: the first names the others as co-senders."""
        fields = ("samples", "batches", "loss", "timings")
        first, e0 = group[0]
        also = [{"name": n, **{k: e[k] for k in fields}} for n, e in group[1:]]
        fut = e0["ps"].soon.push(
            name=first, version=version, delta=acc, **{k: e0[k] for k in fields}, timeout=self.timeout, also=also
        )
        self.pushes += 1
        self.deltas += len(group)
        return {n: fut for n, _ in group}


def weighted_mean(deltas: list[np.ndarray], samples: list[int], out: np.ndarray | None = None) -> np.ndarray:
    """``sum(n_i d_i) / sum(n_i)`` in float32, in the given order, with the float operations of
    the server's weighted mean (:func:`pipeline.fedagg.aggregate`): each delta times its float32
    share, summed one by one (one compiled pass over the deltas, :func:`kernels.codec.weighted_sum`);
    into ``out`` (a new vector when None). ``samples`` must not all be 0."""
    from kernels.codec import weighted_sum

    return weighted_sum(deltas, shares_of(samples), out)


def shares_of(samples: list[int]) -> np.ndarray:
    """Each delta's float32 share of a weighted mean: its samples over their total."""
    total = sum(samples)
    return np.array([n / total for n in samples], dtype=np.float32)


def total_size(group: list[tuple[str, dict[str, Any]]]) -> int:
    """The length of a round's deltas (one length for all)."""
    return int(group[0][1]["delta"].size)


class _SumJob:
    """A summed push being summed by the tasks of its round, one contiguous slice each:
    ``parts`` slices of ``out`` (bounds fixed up front), claimed in order."""

    def __init__(
        self, version: int, group: list[tuple[str, dict[str, Any]]], shares: np.ndarray, out: np.ndarray, parts: int
    ) -> None:
        self.version, self.group, self.shares, self.out = version, group, shares, out
        self.members = [n for n, _ in group]
        self.deltas = [np.ascontiguousarray(e["delta"], dtype=np.float32).reshape(-1) for _, e in group]
        n = out.size
        self.bounds = [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
        self.next = 0  # the next slice to claim
        self.left = parts  # slices not summed yet
        self.error: BaseException | None = None

    def unclaimed(self) -> bool:
        return self.next < len(self.bounds)

    def claim(self) -> int:
        self.next += 1
        return self.next - 1

    def sum(self, i: int) -> None:
        from kernels.codec import weighted_sum

        a, b = self.bounds[i]
        weighted_sum([d[a:b] for d in self.deltas], self.shares, self.out[a:b])


_groups: dict[str, PushGroup] = {}  # job -> its push group in this process (combine_pushes)


def push_group(job: str, timeout: float) -> PushGroup:
    """This process's push group of ``job`` (created on first use, kept until the job is forgotten)."""
    with _lock:
        group = _groups.get(job)
        if group is None:
            group = _groups[job] = PushGroup(timeout)
        return group


class BudgetSpent(Exception):
    """The parameter server applies no further round: the privacy budget is spent."""


def masked_for_round(
    comm: _Comm, name: str, version: int, delta: np.ndarray, clip: float, weights: dict[str, int] | None = None
) -> tuple[Any, int] | dict:
    """Secure aggregation (pipeline.secagg): exchange this round's keys through the server
    and return ``delta`` (already clipped to ``clip``) quantized and masked for the round's
    roster, as the float32 view the wire carries, with the round's attempt; or the server's
    reply when the participant is not in a round any more (``dropped``, ``stop``).

    ``weights`` (a federated round without DP: each participant's sample count): the delta is
    first scaled by its share of the roster's (:func:`pipeline.secagg.roster_share`), so that the
    server's mean of the masked sum over the roster's size is the sample-weighted mean a plain
    FedAvg round makes, also for a smaller roster after a redo. Without them the mean is unweighted."""
    private, public = new_keypair()
    r = comm.wait(comm.ps.soon.exchange_keys(name, version, public, timeout=comm.timeout))
    if r.get("stop"):
        raise BudgetSpent(r.get("message") or "the privacy budget is spent")
    if "roster" not in r:
        return r
    roster, attempt = r["roster"], int(r["attempt"])
    if weights:
        delta = delta.astype(np.float64) * roster_share(name, roster, weights)
    q = quantize(delta, scale_for(len(roster), clip))
    masked = mask(q, name, private, roster, round_info(comm.ps.job, version, attempt, sorted(roster)))
    return masked.view(np.float32), attempt


class _Pusher:
    """The push side of a training task: the weights last received from the parameter server
    (``anchor``, at ``version``), the push still in flight with ``overlap``, and the time
    already reported. :meth:`push` is :func:`pipeline.loop.run_batches`'s ``sync`` callback.

    A push sends ``delta = anchor - w_local``. Without ``overlap`` the reply replaces the local
    weights; with it the reply is folded in ``overlap_steps`` local steps later (by
    :meth:`finish`; at the next push boundary when that is sooner), keeping the progress made
    while it travelled: ``w_local = w_server + (w_local - w_at_push)``. The next push's delta
    then carries those steps exactly once.

    With ``compression`` the delta travels encoded (``compressor``); with error feedback what the
    encoding dropped stays in ``compressor.residual`` and goes out with the next push. The
    reply's weights are float32 either way.

    When the join reply describes shared-memory segments that this process can attach (it runs
    on the scheduler's host, :mod:`pipeline.ps.shm`), the delta is written into the push
    segment and the reply's weights are read from the job's weights segment: the same floats
    without the TCP copies."""

    def __init__(
        self,
        comm: _Comm,
        trainer: Any,
        loader: ChunkLoader,
        name: str,
        joined: dict,
        cfg: dict,
        compressor: DeltaCompressor | None = None,
        group: PushGroup | None = None,
    ) -> None:
        self.comm, self.trainer, self.loader, self.name = comm, trainer, loader, name
        self.group = group  # combine_pushes: this process's tasks of the job push as one
        self.compressor = compressor or DeltaCompressor()
        self.overlap: bool = cfg["overlap"]
        self.timeout: float = cfg["barrier_timeout"]
        self.anchor = np.array(joined["params"], dtype=np.float32)
        self.held = self.anchor  # the weights the server last sent (compressed replies change them)
        self.version = int(joined["version"])
        # a sharded server's: the version of each shard's slice of ``held``
        self.shard_versions = [int(v) for v in joined.get("shard_versions") or ()]
        self.pending: Any = None  # the push in flight (overlap)
        # the task's minibatches, and how many of them to make while a round closes (sync wait)
        self.ahead: Lookahead | None = None
        self.ahead_n = 0
        self.timing: dict[str, float] = {"compute": 0.0}  # run_batches adds the kernels' seconds
        self.reported = {"read": 0.0, "compute": 0.0, "communicate": 0.0}
        # local DP: each delta is clipped and noised here, before it leaves the site
        self.local_dp = cfg.get("dp") == "local"
        self.clip, self.noise = float(cfg.get("clip_norm", 1.0)), float(cfg.get("noise_multiplier", 0.0))
        self.rng = noise_rng() if self.local_dp else None
        # secure aggregation: deltas leave clipped, quantized and masked, one round at a time
        self.secure = bool(cfg.get("secure_aggregation"))
        # what was pushed (a task stopped by the privacy budget reports it): rows, minibatches, loss sum
        self.pushed = {"samples": 0, "batches": 0, "loss": 0.0}
        self.shm_weights: Any = None
        self.shm_push: Any = None
        info = joined.get("shm")
        if isinstance(info, dict) and self.compressor.codec == "none" and not self.secure and group is None:
            n = self.anchor.size
            self.shm_weights = shmem.attach(info.get("weights"), n)
            self.shm_push = shmem.attach(info.get("push"), n) if self.shm_weights is not None else None
            if self.shm_push is None:
                self.detach()
        trainer.set_params(self.anchor)

    def detach(self) -> None:
        """Unmap the shared-memory segments (the server unlinks them when the task leaves)."""
        for seg in (self.shm_weights, self.shm_push):
            if seg is not None:
                seg.close()
        self.shm_weights = self.shm_push = None

    def _fold(self, fut: Any) -> None:
        r = self.comm.wait(fut)
        if r.get("stop"):
            raise BudgetSpent(r.get("message") or "the privacy budget is spent")
        if self.group is not None and isinstance(self.comm.ps, ShardedParameterServer):
            self.comm.ps.adopt_versions(r)  # the push may have gone through another task's handle
        fresh = self._weights(r)
        if self.overlap:
            self.trainer.set_params(fresh + (self.trainer.get_params() - self.anchor))
        else:
            self.trainer.set_params(fresh)
        self.anchor = self.held = fresh
        self.version = int(r["version"])
        self.shard_versions = [int(v) for v in r.get("shard_versions") or ()]

    def _weights(self, r: dict) -> np.ndarray:
        """The weights a push reply carries: in it, as their change since the weights this
        task holds (``compress_replies``: the server adds the same decoded change to its copy
        of them, so both stay equal bit for bit), or in the weights segment at its version
        (pulled over TCP should a write ever overlap the read: the sequence lock says so)."""
        if "rdelta" in r:
            if not isinstance(r["rdelta"], list):
                if r.get("since") != self.version:
                    since = r.get("since")
                    raise TrainingError(
                        f"a reply changes the weights of version {since}; this task holds {self.version}"
                    )
                change = decode_delta(r["rdelta"], self.held.size, self.compressor.codec, what="reply")
                return self.held + change
            # a sharded server's: each shard's change of its slice since the version of it this
            # task holds, or the slice whole
            fresh = np.empty_like(self.held)
            parts = zip(r["ranges"], r["rdelta"], r["since"], self.shard_versions, strict=True)
            for (lo, hi), (kind, part), since, held in parts:
                if kind == "rdelta":
                    if since != held:
                        raise TrainingError(
                            f"a reply changes the slice [{lo}, {hi}) of version {since}; this task holds {held}"
                        )
                    fresh[lo:hi] = self.held[lo:hi] + decode_delta(part, hi - lo, self.compressor.codec, what="reply")
                else:
                    fresh[lo:hi] = decode_vector(part, hi - lo, "reply")
            return fresh
        if not r.get("shm"):
            return np.asarray(r["params"], dtype=np.float32)
        version = int(r["version"])
        fresh = self.shm_weights.read(version) if self.shm_weights is not None else None
        if fresh is None:
            params, r["version"] = self.comm.ps.pull()
            fresh = np.asarray(params, dtype=np.float32)
        return fresh

    def push(self, samples: int, batches: int, loss: float) -> None:
        """Send the progress since the last push (``samples`` rows in ``batches`` minibatches,
        mean ``loss``) with the time spent since then."""
        self.finish()
        current = self.trainer.get_params()
        now = {"read": self.loader.read_seconds, "compute": self.timing["compute"], "communicate": self.comm.seconds}
        timings = {k: v - self.reported[k] for k, v in now.items()}
        self.reported.update(now)
        # with a push segment the delta is computed straight into it: the server reads it there
        seg = self.shm_push
        delta = self.anchor - current if seg is None else np.subtract(self.anchor, current, out=seg.data)
        if self.local_dp:
            privatize_local(delta, self.clip, self.noise, self.rng)
        self.pushed["samples"] += samples
        self.pushed["batches"] += batches
        self.pushed["loss"] += loss * batches
        if self.secure:
            self.anchor = current
            self._secure_push(delta, samples, batches, loss, timings)
            return
        # a sharded server decodes each shard's slice on its own: a compressed delta is encoded slice by slice
        ranges = self.comm.ps.ranges if isinstance(self.comm.ps, ShardedParameterServer) else None
        wire, _ = (SHM_DELTA, None) if seg is not None else self.compressor(delta, ranges)
        if self.group is not None:
            fut = self.group.push(
                self.comm.ps,
                self.name,
                self.version,
                wire,
                samples=samples,
                batches=batches,
                loss=loss,
                timings=timings,
            )
        else:
            fut = self.comm.ps.soon.push(
                name=self.name,
                version=self.version,
                delta=wire,
                samples=samples,
                batches=batches,
                loss=loss,
                timings=timings,
                timeout=self.timeout,
            )
        self.anchor = current
        if self.overlap:
            self.pending = fut
        else:
            if self.ahead is not None and self.ahead_n:  # the next steps' minibatches, made while the round closes
                self.ahead.fill(self.ahead_n)
            self._fold(fut)

    def _secure_push(self, delta: np.ndarray, samples: int, batches: int, loss: float, timings: dict) -> None:
        """Secure aggregation (pipeline.secagg): clip ``delta``, exchange this round's keys
        through the server, push it quantized and masked for the roster; again with fresh
        keys when the server redoes the round without a participant that disappeared."""
        clip_update(delta, self.clip)
        ps = self.comm.ps
        while True:
            got = masked_for_round(self.comm, self.name, self.version, delta, self.clip)
            if isinstance(got, dict):
                r = got
                break  # the round finished without it: go on from the fresh weights
            masked, attempt = got
            r = self.comm.wait(
                ps.soon.push(
                    name=self.name,
                    version=self.version,
                    delta=masked,
                    samples=samples,
                    batches=batches,
                    loss=loss,
                    timings=timings,
                    timeout=self.timeout,
                    attempt=attempt,
                )
            )
            if not r.get("redo"):
                break
        if r.get("stop"):
            raise BudgetSpent(r.get("message") or "the privacy budget is spent")
        fresh = np.asarray(r["params"], dtype=np.float32)
        self.trainer.set_params(fresh)
        self.anchor, self.version = fresh, int(r["version"])

    def finish(self) -> None:
        """Fold in the push still in flight, if any."""
        if self.pending is not None:
            fut, self.pending = self.pending, None
            self._fold(fut)


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


def _quiet_ends(task: Any) -> Any:
    """``task`` (a training task), ending with a value instead of an error where the run goes
    on or the driver reports it: a parameter-server shard lost under it (the driver restores
    the server from the last checkpoint and runs the epoch again) gives ``{"name",
    "shard_lost"}``, a data error (a corrupted or missing chunk: :class:`StoreError`) gives
    ``{"name", "failure"}`` (:class:`pipeline.errors.TaskFailure`), which the driver raises, and
    so does a job the parameter server failed (a diverged run: :class:`JobFailedError`). Raised,
    each would be logged by the worker with its traceback, and the data error retried by Dask on
    the same bytes."""

    @functools.wraps(task)
    def run(job: str, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return task(job, name, *args, **kwargs)
        except ShardLostError as exc:
            logger.info("participant %s of job %s: %s", name, job, exc)
            return {"name": name, "shard_lost": str(exc)}
        except (StoreError, JobFailedError) as exc:
            return {"name": name, "failure": as_task_failure(exc)}

    return run


@_quiet_ends
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

    ``val`` (sync mode: ``{"path": store, "ranges": [...], "norm": {"mean", "std"} or None}``) asks the task to
    validate its share
    of the validation rows with the epoch's final weights once every participant has left: the
    epoch then needs no separate validation round of tasks. Its partial sums travel in the
    summary (``val``, plain lists) with the version they were computed at (``val_version``)."""
    t_start = time.perf_counter()
    restore_mmap_threshold(cfg.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))  # see pipeline/allocator.py
    _allow_profile_sizing()
    store = _store(store_path)
    worker = get_worker()
    comm = _Comm(_server(job, cfg), name, cfg["barrier_timeout"])
    slot = name.split("-", 1)[-1]  # "e3-s1" -> "s1": the share, whatever the epoch
    group = push_group(job, cfg["barrier_timeout"]) if cfg.get("combine_pushes") else None
    shm_ok = cfg.get("ps_shared_memory", True) and isinstance(comm.ps, ParameterServer) and group is None
    same_host = {"shm": True} if shm_ok else {}
    reply = comm.wait(
        comm.ps.soon.join(name, key=worker.get_current_task(), worker=worker.address, slot=slot, **same_host)
    )
    trainer = cached_trainer(job, "train", spec, cfg)
    keep_state = bool(reply.get("keep_state"))
    saved = reply.get("local_state") if keep_state else None
    residual = None
    if saved:
        saved = {**saved, "buffers": dict(saved.get("buffers") or {})}
        residual = saved["buffers"].pop(DeltaCompressor.RESIDUAL, None)
    if keep_state:
        # sync: the share's own local optimizer state (fresh in its first epoch), not this
        # thread's, so the run does not depend on which worker runs which share
        load_local_state(trainer, saved)
    ef_key = (job, threading.get_ident())
    if not keep_state:
        with _lock:
            residual = _residuals.get(ef_key)
    compressor = DeltaCompressor(
        cfg.get("compression", "none"),
        cfg.get("topk_fraction", TOPK_FRACTION),
        cfg.get("error_feedback", True),
        None if residual is None else np.asarray(residual, dtype=np.float32),
    )
    skip = int(reply.get("skip_batches", 0))
    full_batch = cfg["batch_size"] == 0  # one step with the mean gradient of every row
    if full_batch:
        trainer.discard_accumulated()  # a failed task on this thread may have left some behind
    # refused when the worker's memory limit cannot hold the loader's buffers besides the
    # trainer (the nanny would restart the worker again and again under the task)
    need = _training_buffer_bytes(store, ranges, cfg)
    check_task_memory(
        _training_buffer_bytes(store, ranges, cfg, certain=True),
        f"a training task's loader (shuffle_chunks = {cfg['shuffle_chunks']}, prefetch = {cfg['prefetch']}, "
        f"row chunks of {_mib(store.chunk_rows * row_bytes(store))})",
        "or lower shuffle_chunks / prefetch (--set), or ingest the store with a smaller --chunk-rows",
        TrainingError,
    )
    _row_cache.resize(_row_cache_bytes(cfg, need))
    loader = training_loader(store, cfg, ranges=ranges, cache=_row_cache, cache_scope=job)
    pusher = _Pusher(comm, trainer, loader, name, reply, cfg, compressor, group)
    batches = Lookahead((X, prepare_targets(y, target)) for X, y in loader.epoch(epoch))
    pusher.ahead = batches
    pusher.ahead_n = _ahead_batches(store, cfg)
    stopped = ""
    if group is not None:
        group.enter(name, pusher.version)
    try:
        try:
            # weights that overflow make the kernels' products inf or NaN: the server names the
            # diverged round and the fix in one line, where NumPy would warn from every worker
            with np.errstate(over="ignore", invalid="ignore"):
                r = run_batches(
                    trainer,
                    batches,
                    full_batch=full_batch,
                    local_steps=cfg["local_steps"],
                    sync=pusher.push,
                    skip=skip,
                    timing=pusher.timing,
                    fold=pusher.finish if cfg["overlap"] else None,
                    fold_after=int(cfg.get("overlap_steps", 1)),
                )
                pusher.finish()
        except BudgetSpent as exc:
            # the server applies no further round: the task ends with what it took
            stopped = str(exc)
            done = pusher.pushed
            loss = done["loss"] / done["batches"] if done["batches"] else float("nan")
            r = {"samples": done["samples"], "steps": done["batches"], "loss": loss}
    finally:
        if group is not None:
            group.leave(name)  # before leaving the server: the others' round goes on without it
        # a task stopped early (privacy budget, error) lets go of the minibatches made ahead and
        # of the loader's generator, which holds its shuffle buffer
        batches.close()
        read_seconds = loader.read_seconds
        loader.close()
        pusher.detach()
        del loader
        fit_kept_memory()  # the loader's buffers and kept rows: not holding the worker paused
    compute, version = pusher.timing["compute"], pusher.version
    summary = {
        "name": name,
        "worker": worker.address,
        "samples": r["samples"],
        "steps": r["steps"],
        "skipped": skip,
        "skipped_samples": r.get("skipped_samples", 0),  # trained by an earlier attempt of this task
        "loss": r["loss"],
        "read": read_seconds,
        "compute": compute,
        "communicate": comm.seconds,
        "total": time.perf_counter() - t_start,
        "version": version,
        **({"stopped": stopped} if stopped else {}),
    }
    for label, secs in (("read", read_seconds), ("compute", compute), ("communicate", comm.seconds)):
        context_meter.digest_metric(label, secs, "seconds")
    # Leave the summary with the parameter server: the driver reads it there, so a worker
    # dying between the end of this task and the driver's gather loses nothing.
    extra: dict[str, Any] = {}
    if keep_state:
        state = local_state(trainer)
        if compressor.residual is not None:  # travels (and is checkpointed) with the share's state
            state["buffers"] = {**state["buffers"], DeltaCompressor.RESIDUAL: compressor.residual}
        extra = {"slot": slot, "local_state": state}
    elif compressor.residual is not None:
        with _lock:
            _residuals[ef_key] = compressor.residual
            while len(_residuals) > _CACHE_SIZE:
                _residuals.popitem(last=False)
    try:
        comm.ps.soon.leave(name, summary=summary, **extra).result(timeout=30)
    except Exception:
        logger.debug("participant %s could not leave its summary", name, exc_info=True)
    if val and val.get("ranges"):
        try:
            final = comm.wait(comm.ps.soon.epoch_end(timeout=cfg["barrier_timeout"]))
            t_val = time.perf_counter()
            params = np.asarray(final["params"], dtype=np.float32)
            partial = evaluate_ranges(
                _store(val["path"]), val["ranges"], params, job, spec, cfg, target, val.get("norm")
            )
        except Exception:
            # without ``val`` in the summary the driver validates on its own (and reports errors)
            logger.debug("participant %s could not validate", name, exc_info=True)
            return summary
        validate = time.perf_counter() - t_val
        context_meter.digest_metric("validate", validate, "seconds")
        fit_kept_memory()
        summary = {**summary, "val": plain_metrics(partial), "val_version": int(final["version"]), "validate": validate}
        try:  # the same route again: only the summary changes (the participant left already)
            comm.ps.soon.leave(name, summary=summary).result(timeout=30)
        except Exception:
            logger.debug("participant %s could not leave its validation", name, exc_info=True)
    return summary


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
        params = _server(str(job), cfg).pull(model=True)[0]
    return evaluate_ranges(_store(store_path), ranges, params, job, spec, cfg, target, norm)


def validate_task(*args: Any) -> Any:
    """:func:`evaluate_task` for a training run's validation: a data error is returned as a
    :class:`pipeline.errors.TaskFailure` (not retried, no worker traceback), which the
    driver raises."""
    try:
        return evaluate_task(*args)
    except StoreError as exc:
        return as_task_failure(exc)


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
    (standardized with ``norm``'s mean/std when given, else the store's). With a ``job`` the
    batches are kept for its next epochs on this worker (:func:`_kept_validation`); without one
    (``pipeline evaluate``) they are read every time."""
    trainer = cached_trainer(job or "model", "eval", spec, cfg)
    trainer.set_params(np.asarray(params, dtype=np.float32))
    batches = _kept_validation(job, store, ranges, cfg, norm)
    if batches is not None:
        return merge_metrics([evaluate_arrays(trainer.forward(X), y, target, spec["n_out"]) for X, y in batches])
    loader = validation_loader(store, cfg, ranges, norm)
    parts = []
    try:
        for X, y in loader.epoch(0):
            parts.append(evaluate_arrays(trainer.forward(X), y, target, spec["n_out"]))
    finally:
        loader.close()
    del loader
    release_freed_memory()
    return merge_metrics(parts)


def forget_job(job: str) -> None:
    """Drop what this worker process keeps for ``job`` between its tasks: its trainers, error
    feedback residuals, validation batches and store chunks (the driver calls it when the run
    ends; a job that ends otherwise gives them up to newer jobs, least recently used first)."""
    with _lock:
        for kept in (_trainers, _residuals, _val_batches):
            for key in [k for k in kept if k[0] == job]:
                del kept[key]
        _groups.pop(job, None)
    _row_cache.forget(job)


async def stop_job_tasks(job: str, timeout: float, dask_worker: Any = None) -> int:
    """Wait (``timeout`` s at most) until no task of ``job`` runs in this worker, and return how
    many still do. The driver calls it when a run stops early (Ctrl-C, a failure), after it
    cancelled the job's tasks: a task still computing ends at its next message to the parameter
    server (the "left" reply), and a cluster closed under it would log each one's cancellation."""
    deadline = time.monotonic() + timeout
    while True:
        running = [ts for ts in (*dask_worker.state.executing, *dask_worker.state.long_running) if job in str(ts.key)]
        if not running or time.monotonic() >= deadline:
            return len(running)
        await asyncio.sleep(0.02)


def _memory_limit() -> int | None:
    """This Dask worker's memory limit (None: none, or not on a worker)."""
    try:
        limit = get_worker().memory_manager.memory_limit
    except (ValueError, AttributeError):  # not on a worker (in-process evaluation)
        return None
    return int(limit) if limit else None


def _row_cache_bytes(cfg: dict, need: int = 0) -> int:
    """The training rows' cache bound here: ``row_cache_mb``, a quarter of the memory limit, and
    what the worker can keep besides what it holds now (the kept rows aside) and the loader's
    buffers (``need`` bytes) without reaching the fraction of its limit at which Dask pauses it.
    Kept rows stay between tasks: over that fraction the worker would stay paused and start no
    further task of the run (each epoch then waits for ``join_timeout`` and goes on without it)."""
    limit = _memory_limit()
    bound = row_cache_bytes(cfg.get("row_cache_mb", 0), limit)
    if limit:
        pause, _ = memory_fractions()
        held = max(0, process_memory() - _row_cache.nbytes)
        bound = min(bound, int(pause * limit) - held - int(need))
    return max(0, bound)


def _target_width(store: Any) -> int:
    """Target values per row (1 for class labels and a single regression target)."""
    return int(np.prod(store.y.shape[1:], dtype=np.int64)) if len(store.y.shape) > 1 else 1


def _ahead_batches(store: Any, cfg: dict) -> int:
    """The minibatches a training task's pushes make while a round closes: a round's worth
    (:func:`pipeline.loop.lookahead_batches`) for pushes that wait for their reply; none for
    full-batch steps, ``overlap`` (the steps go on instead) and secure aggregation."""
    if cfg["batch_size"] == 0 or cfg["overlap"] or cfg.get("secure_aggregation"):
        return 0
    return lookahead_batches(cfg["batch_size"], store.n_features + _target_width(store), cfg["local_steps"])


def _training_buffer_bytes(store: Any, ranges: list[tuple[int, int]], cfg: dict, certain: bool = False) -> int:
    """:func:`pipeline.loader.buffer_bytes` of a training task's loader over ``ranges``, and (not
    ``certain``) the minibatches its pushes make ahead (:func:`pipeline.loop.lookahead_batches`)."""
    full_batch = cfg["batch_size"] == 0
    ahead = 0
    if not certain and ranges:
        ahead = _ahead_batches(store, cfg) * cfg["batch_size"] * (store.n_features + _target_width(store)) * 4
    return ahead + buffer_bytes(
        store,
        ranges,
        batch_size=cfg["batch_size"] or FULL_BATCH_ROWS,
        buffer_chunks=cfg["shuffle_chunks"],
        prefetch=cfg["prefetch"],
        shuffle=not full_batch,
        certain=certain,
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def memory_fractions() -> tuple[float, float]:
    """The fractions of a worker's memory limit at which Dask pauses it and at which its nanny
    restarts it (``distributed.worker.memory.pause`` / ``.terminate``; 1.0 where switched off)."""
    import dask

    def fraction(key: str, default: float) -> float:
        value = dask.config.get(f"distributed.worker.memory.{key}", default)
        return float(value) if value else 1.0

    terminate = fraction("terminate", 0.95)
    return min(fraction("pause", 0.8), terminate), terminate


def process_memory() -> int:
    """This process's resident memory (what Dask compares with a worker's memory limit)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def check_task_memory(need: int, what: str, fix: str, error: type[Exception]) -> None:
    """Raise ``error`` (one line naming the fix) when this worker's memory limit cannot hold
    ``need`` more bytes (``what`` holds them) on top of what the worker holds now: below the
    fraction at which its nanny restarts it. Nothing off a worker or without a limit."""
    limit = _memory_limit()
    if not limit or need <= 0:
        return
    pause, terminate = memory_fractions()
    held = process_memory()
    if held + need <= terminate * limit:
        return
    want = (held + need) / pause
    raise error(
        f"the worker's memory limit ({_mib(limit)}) is too small: {what} holds at least {_mib(need)} on top of "
        f"the {_mib(held)} the worker uses, over the {terminate:.0%} of the limit at which Dask restarts it; "
        f"raise --memory-limit (to about {_mib(want)} or more), {fix}"
    )


def fit_kept_memory() -> None:
    """After a task: return freed memory to the OS and, while the worker is still over the
    fraction of its memory limit at which Dask pauses it, drop kept store chunks, then kept
    validation batches (least recently used first). What a worker keeps between tasks must not
    keep it paused: a paused worker starts none of the tasks the run waits for."""
    release_freed_memory()
    limit = _memory_limit()
    if not limit:
        return
    pause, _ = memory_fractions()
    over = process_memory() - int(0.95 * pause * limit)
    if over <= 0:
        return
    if _row_cache.nbytes:
        _row_cache.resize(max(0, min(_row_cache.max_bytes, _row_cache.nbytes - over)))
        release_freed_memory()
        over = process_memory() - int(0.95 * pause * limit)
    with _lock:
        while over > 0 and _val_batches:
            _, dropped = _val_batches.popitem(last=False)
            over -= sum(X.nbytes + y.nbytes for X, y in dropped)
    release_freed_memory()


def _val_cache_bytes() -> int:
    """The validation cache's bound here: :data:`VAL_CACHE_MB`, and at most an eighth of the
    Dask worker's memory limit when this runs on a worker that has one."""
    bound = int(VAL_CACHE_MB * 2**20)
    limit = _memory_limit()
    return min(bound, limit // 8) if limit else bound


def _kept_validation(
    job: str | None, store: Any, ranges: list[tuple[int, int]], cfg: dict, norm: dict | None
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The evaluation batches of ``ranges`` for ``job``, from this worker's cache or read into
    it; None (stream them) without a job or when they could exceed the cache's bound
    (:func:`_val_cache_bytes`). The batches are shared by the job's evaluations here: read only."""
    bound = _val_cache_bytes()
    rows = sum(b - a for a, b in ranges)
    if job is None or rows * (store.n_features + 1) * 4 > bound:
        return None
    key = (
        job,
        str(store.path),
        tuple((int(a), int(b)) for a, b in ranges),
        max(cfg["batch_size"], 1024),
        bool(cfg["normalize"]),
        repr(holdout_selection(cfg, "validation")),
        None if norm is None else (tuple(norm["mean"]), tuple(norm["std"])),
    )
    with _lock:
        batches = _val_batches.get(key)
        if batches is not None:
            _val_batches.move_to_end(key)
            return batches
    loader = validation_loader(store, cfg, ranges, norm)
    try:
        batches = list(loader.epoch(0))
    finally:
        loader.close()
    del loader
    release_freed_memory()
    with _lock:
        _val_batches[key] = batches
        total = sum(X.nbytes + y.nbytes for b in _val_batches.values() for X, y in b)
        while total > bound and len(_val_batches) > 1:
            _, dropped = _val_batches.popitem(last=False)
            total -= sum(X.nbytes + y.nbytes for X, y in dropped)
    return batches
