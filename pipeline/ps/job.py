"""One training job of the parameter server: participants, rounds, replies, failure.

A :class:`Job` is plain state plus the rules of its mode; it needs no scheduler (the
extension in :mod:`pipeline.ps.extension` routes requests to it, and the unit tests drive it
directly inside an event loop). Its async methods wait on the job's own event: every change
(a push applied, a participant leaving, the job failing or closing) wakes the waiters, who
re-check their condition.

The job shares one index with the extension, ``keys`` (a task key -> ``(job, participant)``),
so the scheduler plugin can drop a participant whose task ended with one dict lookup; the
job keeps it up to date as participants join, are announced and leave.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.protocol.serialize import Serialized

from pipeline import fedagg
from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot
from pipeline.optim import Schedule, ServerOptimizer
from pipeline.ps.wire import decode_opt_state, decode_vector, encode_opt_state, encode_vector

logger = logging.getLogger("pipeline.ps")

MODES = ("sync", "async", "ssp")
_MAX_SLOTS = 4096  # sync shares whose local optimizer states a job keeps
_HISTORY_LEN = 20_000


@dataclass
class Participant:
    """A training task taking part in a job (``key``: its Dask task, ``worker``: where it runs)."""

    name: str
    key: str | None
    worker: str | None
    clock: int = 0
    pushes: int = 0
    samples: int = 0
    joined: float = field(default_factory=time.time)


@dataclass
class Job:
    """The weights, optimizer and participants of one job, and the rules of its mode."""

    job: str
    params: np.ndarray
    mode: str
    optimizer: ServerOptimizer
    schedule: Schedule
    staleness: int
    damping: bool
    aggregate: str
    owner: str | None
    aggregator: str = "mean"  # how a round's deltas combine (pipeline.fedagg); "sum" scales it
    trim_fraction: float = 0.1
    krum_f: int = 1
    buffer_size: int = 0
    version: int = 0
    snapshot: np.ndarray | None = None
    snapshot_version: int = -1
    model_snapshot: np.ndarray | None = None  # the same for the model weights (ema > 0)
    model_snapshot_version: int = -1
    participants: dict[str, Participant] = field(default_factory=dict)
    expected: dict[str, str | None] = field(default_factory=dict)  # name -> task key
    expected_since: float = 0.0
    join_timeout: float = 120.0
    pending: dict[str, tuple[np.ndarray, int, float]] = field(default_factory=dict)
    grad: np.ndarray | None = None  # sync: the round's combined delta (reused every round)
    last_applied: list[str] = field(default_factory=list)  # sync: whose deltas the last round combined
    buffer: list = field(default_factory=list)  # FedBuff: (delta, samples, loss, staleness) since the last step
    progress: dict[str, int] = field(default_factory=dict)  # participant -> batches absorbed
    summaries: dict[str, dict] = field(default_factory=dict)  # participant -> its task's result
    local_states: dict[str, dict] = field(default_factory=dict)  # sync: slot -> local optimizer state
    failed: str | None = None
    closed: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # shared with the extension
    # metrics (msgpack-able): everything the dashboard and /metrics show
    created: float = field(default_factory=time.time)
    pushes: int = 0
    samples: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    loss_ema: float | None = None
    last_push: float = 0.0
    checkpoint_time: float = 0.0
    staleness_hist: Counter = field(default_factory=Counter)
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)
    history: deque = field(default_factory=lambda: deque(maxlen=_HISTORY_LEN))
    epochs: list = field(default_factory=list)
    epoch: int = 0

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        job: str,
        params: Any = None,
        n_params: int = 0,
        mode: str = "sync",
        staleness: int = 2,
        damping: bool = False,
        aggregate: str = "sum",
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        version: int = 0,
        optimizer_state: Mapping[str, Any] | None = None,
        progress: Mapping[str, int] | None = None,
        epoch: int = 0,
        join_timeout: float = 120.0,
        owner: str | None = None,
        local_states: Mapping[str, Any] | None = None,
        keys: dict[str, tuple[str, str]] | None = None,
        aggregator: str = "mean",
        trim_fraction: float = 0.1,
        krum_f: int = 1,
        buffer_size: int = 0,
        buffer: Mapping[str, Any] | None = None,
    ) -> Job:
        """A job from the arguments of ``ps_create`` (wire-encoded vectors or arrays), every
        one checked; :class:`PSError` names the first that is wrong.

        ``aggregator`` (with ``trim_fraction``, ``krum_f``): how a sync round's deltas combine
        (:func:`pipeline.fedagg.aggregate`); ``aggregate = "sum"`` then scales the result by the
        number of deltas. ``buffer_size`` > 0 (async jobs): buffered asynchronous rounds (FedBuff,
        :meth:`push`); ``buffer``: the deltas a checkpointed job had buffered (``state()["buffer"]``)."""
        if not isinstance(n_params, int) or not 0 < n_params <= 2**31 - 1:
            raise PSError(f"n_params must be a positive int, got {n_params!r}")
        if mode not in MODES:
            raise PSError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if aggregate not in ("sum", "mean"):
            raise PSError(f"unknown aggregate {aggregate!r}; use 'sum' or 'mean'")
        if not isinstance(staleness, int) or staleness < 0:
            raise PSError(f"staleness must be an int >= 0, got {staleness!r}")
        fedagg.check(aggregator, trim_fraction, krum_f)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
            raise PSError(f"buffer_size must be an int >= 0, got {buffer_size!r}")
        if buffer_size and mode != "async":
            raise PSError(f"buffer_size (buffered asynchronous rounds) needs mode 'async', not {mode!r}")
        if buffer_size and aggregator != "mean":
            raise PSError(
                f"buffer_size (buffered asynchronous rounds) combines with aggregator 'mean', not {aggregator!r}"
            )
        if buffer_size and damping:
            raise PSError("damping and buffer_size both weight stale deltas; use one of them")
        buffered = _decode_buffer(buffer, n_params, buffer_size) if buffer else []
        vec = decode_vector(params, n_params, "params").copy()
        opt = ServerOptimizer(**(optimizer or {}), n=n_params)
        if optimizer_state:
            opt.load_state(decode_opt_state(optimizer_state, n_params, "optimizer state"), vec)
        try:
            sched = Schedule(**(schedule or {}))
        except (TypeError, ValueError) as exc:
            raise PSError(f"bad schedule: {exc}") from None
        locals_: dict[str, dict] = {}
        if local_states:
            # sync shares' local optimizer states from a checkpoint: a resumed run continues
            # each share's optimizer where it stopped
            if mode != "sync":
                raise PSError("local_states belong to sync jobs only")
            if not isinstance(local_states, Mapping) or len(local_states) > _MAX_SLOTS:
                raise PSError(f"local_states: expected at most {_MAX_SLOTS} {{slot: optimizer state}}")
            locals_ = {
                str(slot): decode_opt_state(v, n_params, f"local_state of {slot}") for slot, v in local_states.items()
            }
        return cls(
            job=job,
            params=vec,
            mode=mode,
            optimizer=opt,
            schedule=sched,
            staleness=staleness,
            damping=bool(damping),
            aggregate=aggregate,
            owner=owner,
            aggregator=aggregator,
            trim_fraction=float(trim_fraction),
            krum_f=int(krum_f),
            buffer_size=int(buffer_size),
            buffer=buffered,
            version=int(version),
            join_timeout=float(join_timeout),
            progress={str(k): int(v) for k, v in (progress or {}).items()},
            epoch=int(epoch),
            local_states=locals_,
            keys=keys if keys is not None else {},
        )

    # -- state helpers -----------------------------------------------------------------------

    def notify(self) -> None:
        """Wake every waiter (they re-check their condition) and arm a fresh event."""
        self.event.set()
        self.event = asyncio.Event()

    def lr(self) -> float:
        return self.optimizer.lr * self.schedule.factor(self.version)

    def weights(self) -> np.ndarray:
        """An immutable copy of the weights at the current version, shared by every reply of
        that version. Replies are written to sockets after the handler returns, zero-copy from
        the array they reference; a later in-place update must never show through them."""
        if self.snapshot_version != self.version or self.snapshot is None:
            self.snapshot = self.params.copy()
            self.snapshot_version = self.version
        return self.snapshot

    def model_weights(self) -> np.ndarray:
        """Like :meth:`weights`, for the model weights (the average when ``ema`` > 0)."""
        if not self.optimizer.ema:
            return self.weights()
        if self.model_snapshot_version != self.version or self.model_snapshot is None:
            self.model_snapshot = self.optimizer.model(self.params).copy()
            self.model_snapshot_version = self.version
        return self.model_snapshot

    def reply(self, status: str = "OK", model: bool = False, **extra: Any) -> dict[str, Any]:
        """A reply carrying the weights to train from, or (``model``) the weights to validate."""
        self.bytes_out += self.params.nbytes
        return {
            "status": status,
            "params": encode_vector(self.model_weights() if model else self.weights()),
            "version": self.version,
            "message": self.failed,
            **extra,
        }

    def drop(self, name: str, why: str) -> None:
        """``name`` leaves (or is no longer expected): no round waits for it any more. A delta
        it already pushed in sync mode stays in the open round."""
        p = self.participants.pop(name, None)
        expected_key = self.expected.pop(name, None)
        for key in (getattr(p, "key", None), expected_key):
            if key is not None:
                self.keys.pop(key, None)
        if p is not None or expected_key is not None:
            logger.debug("job %s: participant %s left (%s)", self.job, name, why)
        self.maybe_close_round()
        self.notify()

    def expire_expected(self) -> None:
        """Stop waiting for announced participants that did not join within ``join_timeout``."""
        if self.expected and time.time() - self.expected_since > self.join_timeout:
            late = sorted(n for n in self.expected if n not in self.participants)
            if late:
                logger.warning(
                    "job %s: participants %s did not join within %.0f s; continuing without them",
                    self.job,
                    late,
                    self.join_timeout,
                )
            for n in late:
                key = self.expected.pop(n)
                if key is not None:
                    self.keys.pop(key, None)
            self.maybe_close_round()
            self.notify()

    def maybe_close_round(self) -> None:
        """In sync mode: if every active and expected participant has pushed, apply the round."""
        if self.mode != "sync" or not self.pending or self.failed:
            return
        waiting_for = (set(self.participants) | set(self.expected)) - set(self.pending)
        if waiting_for:
            return
        self._apply_round(sorted(self.pending))

    def _apply_round(self, names: list[str]) -> None:
        """Combine the pooled deltas of ``names`` (:meth:`_combine`), take the server's step
        and start the next round."""
        names = sorted(names)  # fixed order: reproducible float sums
        total = sum(self.pending[n][1] for n in names)
        grad = self._combine(names)
        losses = [self.pending[n][2] for n in names]
        self.optimizer.step(self.params, grad, self.lr())
        self.version += 1
        self.pending.clear()
        self.last_applied = names
        self.after_update(float(np.mean(losses)), total, len(names))

    def _combine(self, names: list[str]) -> np.ndarray:
        """The combined delta of the pooled deltas of ``names`` (in that order), by the job's
        aggregator, times their number when ``aggregate = "sum"``. Written into a vector kept
        between rounds (valid until the next round)."""
        if self.grad is None:  # kept: no fresh vectors a round
            self.grad = np.empty_like(self.params)
        fedagg.aggregate(
            [self.pending[n][0] for n in names],
            [self.pending[n][1] for n in names],
            self.aggregator,
            trim_fraction=self.trim_fraction,
            krum_f=self.krum_f,
            out=self.grad,
            work=self.optimizer.work_vector(self.params),  # free until the optimizer's step
        )
        if self.aggregate == "sum":
            self.grad *= np.float32(len(names))
        return self.grad

    def _step_buffer(self) -> None:
        """FedBuff: one server step with the buffered deltas, then an empty buffer.

        Each delta ``d_i`` (``n_i`` samples, pushed ``s_i`` versions stale) is scaled by its
        staleness weight ``w_i = 1 / sqrt(1 + s_i)`` and the step's delta is the sample-weighted
        mean ``sum(n_i w_i d_i) / sum(n_i)`` (equal weights when no samples are counted): with
        equal samples FedBuff's ``(1/K) sum(w_i d_i)``; stale deltas count less without the
        fresh ones counting more. ``aggregate = "sum"`` scales it by the number of deltas."""
        entries, self.buffer = self.buffer, []
        total = sum(e[1] for e in entries)
        if self.grad is None:
            self.grad = np.empty_like(self.params)
        grad, tmp = self.grad, self.optimizer.work_vector(self.params)
        for i, (delta, samples, _, stale) in enumerate(entries):
            share = samples / total if total else 1 / len(entries)
            np.multiply(delta, np.float32(share / math.sqrt(1 + stale)), out=grad if i == 0 else tmp)
            if i:
                grad += tmp
        if self.aggregate == "sum":
            grad *= np.float32(len(entries))
        self.optimizer.step(self.params, grad, self.lr())
        self.version += 1
        self.after_update(float(np.mean([e[2] for e in entries])), total, len(entries))

    def after_update(self, loss: float, samples: int, n_deltas: int) -> None:
        """Record a round in the history; a non-finite weight fails the job."""
        self.history.append((time.time(), self.version, loss, samples, n_deltas))
        if not np.isfinite(self.params[:: max(1, self.params.size // 4096)]).all():
            self.fail(f"parameters became non-finite at round {self.version}")
        self.notify()

    def fail(self, message: str) -> None:
        """Fail the job (the first message stays): every waiter and later request gets it."""
        if self.failed is None:
            self.failed = message
            logger.error("job %s: %s", self.job, message)
        self.pending.clear()
        self.notify()

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, the job fails or closes; False on timeout."""
        deadline = time.monotonic() + timeout
        while not (predicate() or self.failed or self.closed):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ev = self.event
            try:
                await asyncio.wait_for(ev.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                self.expire_expected()
        return True

    # -- requests ----------------------------------------------------------------------------

    def expect(
        self,
        names: list[str] | None = None,
        keys: list[str | None] | None = None,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """Announce the participants of an epoch (sync mode waits for them)."""
        names = list(names or [])
        keys = list(keys or [None] * len(names))
        if len(keys) != len(names):
            raise PSError("ps_expect: names and keys differ in length")
        if epoch is not None and int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.progress = {}  # positions within an epoch; a new epoch starts from zero
        self.expected = {}
        if self.mode == "sync":
            for n, k in zip(names, keys, strict=True):
                if n not in self.participants:
                    self.expected[n] = k
                    if k is not None:
                        self.keys[k] = (self.job, n)
            self.expected_since = time.time()
        return {"status": "OK", "version": self.version}

    def join(
        self, name: Any, key: str | None = None, worker: str | None = None, slot: str | None = None
    ) -> dict[str, Any]:
        """Participant ``name`` joins: the weights, their version and the batches to skip."""
        if not isinstance(name, str) or not name:
            raise PSError("ps_join needs a participant name")
        if self.failed:
            return self.reply("failed")
        extra: dict[str, Any] = {}
        if self.mode == "sync" and slot is not None:
            # Sync runs are reproducible whichever worker runs a share: the share's local
            # optimizer state travels with it from one epoch's task to the next.
            extra["keep_state"] = True
            saved = self.local_states.get(str(slot))
            if saved is not None:
                extra["local_state"] = encode_opt_state(saved)
        clocks = [p.clock for p in self.participants.values()]
        start_clock = min(clocks) if clocks else 0
        self.participants[name] = Participant(name, key, worker, clock=start_clock)
        self.expected.pop(name, None)
        if key is not None:
            self.keys[key] = (self.job, name)
        return self.reply(skip_batches=self.progress.get(name, 0), **extra)

    async def push(
        self,
        name: Any,
        version: Any,
        delta: Any,
        samples: Any = 0,
        batches: int = 0,
        loss: float = float("nan"),
        timings: Mapping[str, float] | None = None,
        timeout: float = 600.0,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Apply (async, ssp) or pool (sync) ``name``'s delta; reply with the weights to go on
        from once the mode lets the participant continue. ``wait=False`` (sync; a federated
        client's one push of a round) pools the delta and replies at once, without weights: the
        participant does not wait for the round (which closes when every expected participant
        has pushed, or by :meth:`close_round`)."""
        if self.failed:
            return self.reply("failed")
        p = self.participants.get(name) if isinstance(name, str) else None
        if p is None:
            raise PSError(f"participant {name!r} has not joined job {self.job!r} (or has left it)")
        if not isinstance(version, int) or not 0 <= version <= self.version:
            raise PSError(f"push for version {version!r}; the server is at version {self.version}")
        if not isinstance(samples, int) or samples < 0:
            raise PSError(f"samples must be an int >= 0, got {samples!r}")
        vec = decode_vector(delta, self.params.size, "delta")
        loss = float(loss)
        self.bytes_in += vec.nbytes
        if not np.isfinite(loss) or not np.isfinite(vec).all():
            what = "loss" if not np.isfinite(loss) else "update"
            self.fail(
                f"training diverged at round {self.version}: the {what} is not finite "
                f"(loss={loss}); lower the learning rate or add warm-up",
            )
            return self.reply("failed")
        staleness = self.version - version
        self._count_push(p, samples, loss, staleness, timings)

        if self.mode == "sync":
            if staleness:
                # joined just as a round closed: its delta belongs to a finished round
                return self.reply(dropped=True)
            # a delta off the wire is this message's own buffer; an in-process caller's array
            # may change after the call, so that one is copied
            self.pending[name] = (
                vec if isinstance(delta, Serialized) else vec.copy(),
                samples,
                loss,
            )
            self.progress[name] = self.progress.get(name, 0) + int(batches)
            self.maybe_close_round()
            if not wait:
                return {"status": "OK", "version": self.version, "pooled": True, "message": self.failed}
            ok = await self.wait(lambda: self.version > version, timeout)
        elif self.buffer_size:
            self.buffer.append((vec if isinstance(delta, Serialized) else vec.copy(), samples, loss, staleness))
            self.progress[name] = self.progress.get(name, 0) + int(batches)
            p.clock += 1
            if len(self.buffer) >= self.buffer_size:
                self._step_buffer()
            ok = True
        else:
            lr = self.lr()
            if self.damping and staleness:
                lr /= 1.0 + staleness
            self.optimizer.step(self.params, vec, lr)
            self.progress[name] = self.progress.get(name, 0) + int(batches)
            self.version += 1
            p.clock += 1
            self.after_update(loss, samples, 1)
            ok = True
            if self.mode == "ssp":

                def caught_up() -> bool:
                    clocks = [q.clock for q in self.participants.values()]
                    return not clocks or p.clock - min(clocks) <= self.staleness or name not in self.participants

                ok = await self.wait(caught_up, timeout)
        if not ok:
            return self.reply("timeout", message=f"barrier not released within {timeout} s")
        if self.failed:
            return self.reply("failed")
        return self.reply(staleness=staleness)

    def _count_push(
        self,
        p: Participant,
        samples: int,
        loss: float,
        staleness: int,
        timings: Mapping[str, float] | None,
    ) -> None:
        self.pushes += 1
        self.samples += samples
        self.last_push = time.time()
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        self.staleness_hist[min(staleness, 64)] += 1
        p.pushes += 1
        p.samples += samples
        w = self.per_worker.setdefault(
            p.worker or "?",
            {"pushes": 0, "samples": 0, "read": 0.0, "compute": 0.0, "communicate": 0.0},
        )
        w["pushes"] += 1
        w["samples"] += samples
        for k in ("read", "compute", "communicate"):
            w[k] += float((timings or {}).get(k, 0.0))

    def leave(self, name: Any, summary: Any = None, slot: str | None = None, local_state: Any = None) -> dict[str, Any]:
        """``name`` leaves, optionally leaving its task's summary and (sync) its share's local
        optimizer state."""
        if local_state is not None and slot is not None and self.mode == "sync":
            self.local_states[str(slot)] = decode_opt_state(local_state, self.params.size, "local_state")
        if summary is not None:
            if not isinstance(summary, dict) or len(summary) > 64:
                raise PSError("summary: expected a small dict of task statistics")
            # Kept here, not only as the task's result: a worker that dies after its task
            # finished takes the result with it, and Dask would rerun the (already pushed) task.
            self.summaries[str(name)] = summary
        self.drop(str(name), "left")
        return {"status": "OK"}

    async def epoch_end(self, timeout: float = 600.0) -> dict[str, Any]:
        """Wait until no participant is active or expected, then reply with the model weights."""
        ok = await self.wait(lambda: not self.participants and not self.expected, float(timeout))
        if not ok:
            return self.reply("timeout", message=f"epoch not finished within {timeout} s")
        if self.failed:
            return self.reply("failed")
        return self.reply(model=True)

    def close_round(self, min_count: Any = 1) -> dict[str, Any]:
        """Close the open sync round now (a federated round at its deadline): apply the pooled
        deltas if at least ``min_count`` participants pushed one, else discard them; either way
        no participant of the round is expected or active any more (a late push is refused).
        ``arrived``: the participants whose deltas were pooled; ``last_applied``: those whose
        deltas the last applied round combined (this one's, or the round that applied itself
        when its last expected participant pushed)."""
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise PSError(f"close_round: min_count must be an int >= 1, got {min_count!r}")
        if self.mode != "sync":
            raise PSError(f"close_round is for sync jobs; job {self.job!r} is {self.mode}")
        arrived = sorted(self.pending)
        for name in list(self.participants):
            p = self.participants.pop(name)
            if p.key is not None:
                self.keys.pop(p.key, None)
        for key in self.expected.values():
            if key is not None:
                self.keys.pop(key, None)
        self.expected.clear()
        status = "discarded"
        if self.failed:
            self.pending.clear()
        elif arrived and len(arrived) >= min_count:
            self._apply_round(arrived)
            status = "applied"
        else:
            if arrived:
                logger.warning(
                    "job %s: round closed with %d of the %d deltas it needs; discarded",
                    self.job,
                    len(arrived),
                    min_count,
                )
            self.pending.clear()
        self.notify()
        return {
            "status": status,
            "version": self.version,
            "arrived": arrived,
            "last_applied": list(self.last_applied),
            "message": self.failed,
        }

    def take_summaries(self, names: list | None = None) -> dict[str, Any]:
        """Hand over (and forget) the summaries left by ``names``; missing ones are absent."""
        got = {str(n): self.summaries.pop(str(n)) for n in names or () if str(n) in self.summaries}
        return {"status": "OK", "summaries": got}

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs (weights, optimizer states, counters)."""
        return {
            "status": "OK",
            "params": encode_vector(self.weights()),
            "version": self.version,
            "optimizer": self.optimizer.config(),
            "optimizer_state": encode_opt_state(self.optimizer.state()),
            "progress": dict(self.progress),
            # sync: each share's local optimizer state as its last task left it (replaced, never
            # changed in place, when a task leaves: no copy needed)
            "local_states": {k: encode_opt_state(v) for k, v in self.local_states.items()},
            # FedBuff: the deltas received since the last step (copies: the job keeps adding)
            "buffer": {
                "deltas": [encode_vector(e[0].copy()) for e in self.buffer],
                "samples": [e[1] for e in self.buffer],
                "losses": [e[2] for e in self.buffer],
                "staleness": [e[3] for e in self.buffer],
            },
            "failed": self.failed,
            "metrics": self.metrics(),
        }

    def record(self, epoch: Mapping[str, Any] | None = None, checkpoint: bool = False) -> dict[str, Any]:
        """The driver records an epoch's validation metrics or that it saved a checkpoint."""
        if epoch is not None:
            self.epochs.append(dict(epoch))
        if checkpoint:
            self.checkpoint_time = time.time()
        return {"status": "OK"}

    def close(self) -> dict[str, Any]:
        """Close the job: every waiter wakes; returns its final metrics with recent history."""
        self.closed = True
        for name in list(self.participants):
            p = self.participants.pop(name)
            if p.key is not None:
                self.keys.pop(p.key, None)
        for key in self.expected.values():
            if key is not None:
                self.keys.pop(key, None)
        self.expected.clear()
        self.pending.clear()
        summary = self.metrics()
        summary["history"] = [list(h) for h in list(self.history)[-2000:]]
        self.notify()
        return summary

    # -- what the outside sees ---------------------------------------------------------------

    def metrics(self, history: bool = False) -> dict[str, Any]:
        """The job's counters (msgpack-able); ``history``: with every round kept."""
        out = {
            "job": self.job,
            "mode": self.mode,
            "n_params": int(self.params.size),
            "version": self.version,
            "epoch": self.epoch,
            "pushes": self.pushes,
            "samples": self.samples,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "loss": self.loss_ema,
            "lr": self.lr(),
            "participants": sorted(self.participants),
            "expected": sorted(self.expected),
            "staleness": {int(k): int(v) for k, v in sorted(self.staleness_hist.items())},
            "per_worker": {k: dict(v) for k, v in self.per_worker.items()},
            "created": self.created,
            "last_push": self.last_push,
            "checkpoint_time": self.checkpoint_time,
            "failed": self.failed,
            "closed": self.closed,
            "epochs": list(self.epochs),
            **self._site_metrics(),
        }
        if history:
            out["history"] = [list(h) for h in self.history]
        return out

    def _site_metrics(self) -> dict[str, Any]:
        """A federated job's last per-site evaluation (simulated clients: the spread alone), as
        the driver recorded it."""
        for rec in reversed(self.epochs):
            if rec.get("site_mean") is not None or isinstance(rec.get("sites"), Mapping):
                sites = rec.get("sites") if isinstance(rec.get("sites"), Mapping) else {}
                return {
                    "sites": {str(k): dict(v) for k, v in sites.items()},
                    "site_mean": rec.get("site_mean"),
                    "site_worst_decile": rec.get("site_worst_decile"),
                }
        return {}

    def view(self, history: bool = False) -> JobSnapshot:
        """The job's public, read-only snapshot (for the dashboard and Prometheus)."""
        return JobSnapshot.from_metrics(self.metrics(history=history))


def _decode_buffer(buffer: Mapping[str, Any], n_params: int, buffer_size: int) -> list:
    """The buffered deltas of ``state()["buffer"]``, checked; :class:`PSError` names what is wrong."""
    try:
        deltas = list(buffer["deltas"])
        rest = [list(buffer[k]) for k in ("samples", "losses", "staleness")]
    except (KeyError, TypeError):
        raise PSError("buffer: expected {deltas, samples, losses, staleness} lists") from None
    if any(len(r) != len(deltas) for r in rest) or len(deltas) >= max(1, buffer_size):
        raise PSError(f"buffer: lists of one length below buffer_size {buffer_size} expected")
    out = []
    for i, d in enumerate(deltas):
        vec = decode_vector(d, n_params, f"buffered delta {i}").copy()
        samples, loss, stale = rest[0][i], rest[1][i], rest[2][i]
        if not (isinstance(samples, int) and samples >= 0 and isinstance(stale, int) and stale >= 0):
            raise PSError(f"buffer: delta {i} needs int samples and staleness >= 0")
        out.append((vec, samples, float(loss), stale))
    return out
