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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.protocol.serialize import Serialized

import pipeline.ps.shm as shmem
from pipeline import fedagg
from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot, coarse_history, rounds_after
from pipeline.optim import Schedule, ServerOptimizer
from pipeline.privacy import (
    AdaptiveClip,
    RdpAccountant,
    add_noise,
    check_privacy,
    clip_update,
    local_epsilon,
    noise_rng,
    split_noise,
)
from pipeline.ps.wire import (
    CODECS,
    REPLY_CODECS,
    TOPK_FRACTION,
    decode_delta,
    decode_opt_state,
    decode_vector,
    encode_opt_state,
    encode_vector,
    follow,
    warm_codec,
    warm_server_loops,
)
from pipeline.secagg import KEY_BYTES, dequantize, scale_for

logger = logging.getLogger("pipeline.ps")

MODES = ("sync", "async", "ssp")
SHM_DELTA = "shm"  # a push whose delta is in the participant's push segment (pipeline.ps.shm)
_MAX_SLOTS = 4096  # sync shares whose local optimizer states a job keeps
_HISTORY_LEN = 20_000
_FINISHED_HISTORY = 2_000  # rows a finished job keeps for the dashboard (coarse_history)
_LEFT_KEPT = 4096  # participants that left, remembered per job (Job.left)
_EPOCHS_KEPT = 2_000  # epoch records a job keeps for the dashboard (thinned beyond: Job.record)


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
    compression: str = "none"  # the codec every delta of the job arrives in (pipeline.ps.wire)
    topk_fraction: float = TOPK_FRACTION
    # sync: push replies as the change of the weights every participant holds (``held``) since
    # the version it pushed at, encoded in ``reply_codec``; "none" sends the weights themselves
    reply_codec: str = "none"
    held: np.ndarray | None = None  # replaced, never changed in place: replies reference it
    held_version: int = -1
    held_from: int = -1  # the version the last change (``held_wire``) starts from
    held_wire: Any = None
    version: int = 0
    snapshot: np.ndarray | None = None
    snapshot_version: int = -1
    model_snapshot: np.ndarray | None = None  # the same for the model weights (ema > 0)
    model_snapshot_version: int = -1
    participants: dict[str, Participant] = field(default_factory=dict)
    # participants that left, with why (the newest _LEFT_KEPT): a push still in flight from one
    # (its task was cancelled, or its worker removed, while it computed) gets a "left" reply
    left: dict[str, str] = field(default_factory=dict)
    expected: dict[str, str | None] = field(default_factory=dict)  # name -> task key
    expected_since: float = 0.0
    join_timeout: float = 120.0
    pending: dict[str, tuple[np.ndarray, int, float]] = field(default_factory=dict)
    # sync, pushes summed on a worker (``also``): a participant whose delta came inside another's
    # push -> that push's sender; and how many participants a pooled delta stands for (1 if absent)
    covered: dict[str, str] = field(default_factory=dict)
    pooled_count: dict[str, int] = field(default_factory=dict)
    round_counts: dict[str, int] = field(default_factory=dict)  # the same for the round being applied
    # the training samples a pooled delta stands for (its weight is 1 under DP: samples are data,
    # but the history and the dashboard count what was trained); the round being applied's total
    pooled_samples: dict[str, int] = field(default_factory=dict)
    round_samples: int = 0
    round_names: list[str] = field(default_factory=list)  # every participant of the round being applied
    grad: np.ndarray | None = None  # sync: the round's combined delta (reused every round)
    last_applied: list[str] = field(default_factory=list)  # sync: whose deltas the last round combined
    buffer: list = field(default_factory=list)  # FedBuff: (delta, samples, loss, staleness) since the last step
    progress: dict[str, int] = field(default_factory=dict)  # participant -> batches absorbed
    # sync: the batches of the deltas pooled in the open round (counted in ``progress``, which a
    # rerun task skips, but not yet in the weights: a checkpoint leaves them out, :meth:`state`)
    pooled_batches: dict[str, int] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)  # participant -> its task's result
    local_states: dict[str, dict] = field(default_factory=dict)  # sync: slot -> local optimizer state
    failed: str | None = None
    closed: bool = False
    combining: asyncio.Task | None = None  # sync: a round combined off the event loop (robust aggregators)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # shared with the extension
    # metrics (msgpack-able): everything the dashboard and /metrics show
    created: float = field(default_factory=time.time)
    pushes: int = 0
    summed: int = 0  # of the pushes, deltas that came summed into another participant's push
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
    # differential privacy (pipeline.privacy): the settings, the accountant of the rounds
    # applied, adaptive clipping's clip, and the round's count of updates that needed no clip
    privacy: dict[str, Any] = field(default_factory=lambda: check_privacy(None))
    accountant: RdpAccountant | None = None
    adaptive: AdaptiveClip | None = None
    dp_rng: np.random.Generator | None = None
    dp_unclipped: int = 0
    round_size: int = 0  # sync: participants announced for the current epoch or round
    # central DP: the sampling rate of the round announced (None: the job's sampling_rate) and
    # how many applied rounds were accounted at each rate other than the job's
    round_rate: float | None = None
    dp_rates: dict[float, int] = field(default_factory=dict)
    exhausted: bool = False  # the privacy budget allows no further round
    # secure aggregation (pipeline.secagg): the round's attempt, public keys, roster, the
    # running uint32 sum of the masked vectors (never one participant's vector on its own)
    sa_attempt: int = 0
    sa_keys: dict[str, bytes] = field(default_factory=dict)
    sa_roster: list[str] | None = None
    sa_sum: np.ndarray | None = None
    sa_pushed: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> samples, batches, loss
    sa_last_total: np.ndarray | None = None  # the last round's int32 sum of quantized deltas (inspection)
    # same-host transport (pipeline.ps.shm): the weights segment, each participant's push segment
    shm_weights: Any = None
    shm_push: dict[str, Any] = field(default_factory=dict)
    bytes_shm: int = 0  # of bytes_in and bytes_out, those that went through shared memory

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
        compression: str = "none",
        topk_fraction: float = TOPK_FRACTION,
        privacy: Mapping[str, Any] | None = None,
        reply_codec: str = "none",
        reply_view: Any = None,
    ) -> Job:
        """A job from the arguments of ``ps_create`` (wire-encoded vectors or arrays), every
        one checked; :class:`PSError` names the first that is wrong.

        ``aggregator`` (with ``trim_fraction``, ``krum_f``): how a sync round's deltas combine
        (:func:`pipeline.fedagg.aggregate`); ``aggregate = "sum"`` then scales the result by the
        number of deltas. ``buffer_size`` > 0 (async jobs): buffered asynchronous rounds (FedBuff,
        :meth:`push`); ``buffer``: the deltas a checkpointed job had buffered (``state()["buffer"]``).
        ``privacy``: the settings of :func:`pipeline.privacy.check_privacy` (differential
        privacy and secure aggregation of the updates; sync mode only). ``reply_codec`` (sync):
        push replies carry the change of the participants' weights (:meth:`reply`) in that codec;
        ``reply_view``: those weights as a checkpointed job left them (``state()["reply_view"]``)."""
        if not isinstance(n_params, int) or not 0 < n_params <= 2**31 - 1:
            raise PSError(f"n_params must be a positive int, got {n_params!r}")
        if mode not in MODES:
            raise PSError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if aggregate not in ("sum", "mean"):
            raise PSError(f"unknown aggregate {aggregate!r}; use 'sum' or 'mean'")
        if not isinstance(staleness, int) or staleness < 0:
            raise PSError(f"staleness must be an int >= 0, got {staleness!r}")
        dp = check_privacy(privacy)
        private = "secure_aggregation" if dp["secure_aggregation"] else f"dp = {dp['dp']!r}"
        if (dp["dp"] != "off" or dp["secure_aggregation"]) and mode != "sync":
            raise PSError(f"privacy: {private} needs mode 'sync' (rounds of deltas), not {mode!r}")
        if (dp["dp"] != "off" or dp["secure_aggregation"]) and aggregator != "mean":
            raise PSError(f"privacy: {private} needs aggregator 'mean' (a sum of clipped deltas), not {aggregator!r}")
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
        if compression not in CODECS:
            raise PSError(f"unknown compression {compression!r}; use one of {', '.join(CODECS)}")
        if not isinstance(topk_fraction, float | int) or not 0 < topk_fraction <= 1:
            raise PSError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
        if reply_codec not in REPLY_CODECS:
            raise PSError(f"reply_codec must be one of {', '.join(REPLY_CODECS)}, got {reply_codec!r}")
        if reply_codec != "none" and mode != "sync":
            raise PSError(f"reply_codec {reply_codec!r} needs mode 'sync' (every participant holds the same weights)")
        vec = decode_vector(params, n_params, "params").copy()
        held = None
        if reply_codec != "none":
            held = decode_vector(reply_view, n_params, "reply_view").copy() if reply_view is not None else vec.copy()
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
        warm_codec(compression)  # the first delta decoded does not wait for numba on the event loop
        warm_server_loops()  # nor the first round's mean and step
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
            compression=compression,
            topk_fraction=float(topk_fraction),
            reply_codec=reply_codec,
            held=held,
            held_version=int(version),
            version=int(version),
            join_timeout=float(join_timeout),
            progress={str(k): int(v) for k, v in (progress or {}).items()},
            epoch=int(epoch),
            local_states=locals_,
            keys=keys if keys is not None else {},
        )._start_privacy(dp)

    def _start_privacy(self, dp: dict[str, Any]) -> Job:
        """Set up the accountant, adaptive clipping and the noise generator of ``dp``."""
        self.privacy = dp
        if dp["dp"] == "off":
            return self
        central = dp["dp"] == "central"
        rates = dp["rates"] if central else []  # local DP is not amplified by sampling
        self.accountant = RdpAccountant(
            dp["noise_multiplier"],
            dp["sampling_rate"] if central else 1.0,
            dp["delta"],
            rounds=dp["rounds"] - sum(n for _, n in rates),
        )
        for q, n in rates:  # the rounds a resumed run accounted at their own rates
            self.accountant.step(n, q)
            self.dp_rates[q] = self.dp_rates.get(q, 0) + n
        if dp["dp"] == "central" and dp["clip_quantile"] > 0:
            self.adaptive = AdaptiveClip(dp["clip"] or dp["clip_norm"], dp["clip_quantile"])
        self.dp_rng = noise_rng(dp["seed"])
        self.exhausted = self._budget_spent()
        return self

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

    def held_weights(self) -> np.ndarray:
        """With a ``reply_codec``: the weights every participant is given at this version.
        The first request of a version encodes ``params - held`` and adds what it decodes to
        to them: the rounding of this change is part of the next one, so the participants'
        weights follow the server's within one reply's rounding and never drift from them."""
        if self.held_version != self.version:
            wire, self.held = follow(self.held, self.params, self.reply_codec)
            self.held_wire, self.held_from, self.held_version = wire, self.held_version, self.version
        return self.held

    def not_joined(self, name: Any) -> dict[str, Any]:
        """The reply to a push or key exchange from ``name``, not a participant: ``left`` (no
        error: the scheduler logs nothing) for one that left the job, whose task goes on until
        its next message (the driver cancelled it, or its worker was removed); :class:`PSError`
        for a name that never joined."""
        why = self.left.get(name) if isinstance(name, str) else None
        if why is None:
            raise PSError(f"participant {name!r} has not joined job {self.job!r}")
        logger.debug("job %s: a message from participant %s, which left (%s)", self.job, name, why)
        message = f"participant {name!r} left job {self.job!r} ({why})"
        return {"status": "left", "version": self.version, "message": message}

    def reply(self, status: str = "OK", model: bool = False, since: int | None = None, **extra: Any) -> dict[str, Any]:
        """A reply carrying the weights to train from, or (``model``) the weights to validate.
        With a ``reply_codec`` the weights to train from are the participants' common weights
        (:meth:`held_weights`), sent as their change since version ``since`` when ``since`` is
        where that change starts (a participant that pushed at the previous version), else whole."""
        out = {"status": status, "version": self.version, "message": self.failed}
        if self.reply_codec != "none" and not model:
            weights = self.held_weights()
            if since is not None and since == self.held_from:
                self.bytes_out += _wire_bytes(self.held_wire, weights)
                return {**out, "rdelta": self.held_wire, "since": since, **extra}
        else:
            weights = self.model_weights() if model else self.weights()
        self.bytes_out += weights.nbytes
        return {**out, "params": encode_vector(weights), **extra}

    def drop(self, name: str, why: str) -> None:
        """``name`` leaves (or is no longer expected): no round waits for it any more. A delta
        it already pushed in sync mode stays in the open round."""
        p = self.participants.pop(name, None)
        expected_key = self.expected.pop(name, None)
        if p is not None:
            self.left.pop(name, None)
            self.left[name] = why
            if len(self.left) > _LEFT_KEPT:
                del self.left[next(iter(self.left))]
        self.release_shm(name)  # a delta it pushed was copied into the round
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
        if self.mode == "sync" and self.privacy["secure_aggregation"] and not self.failed:
            self._secure_round()
            return
        if self.mode != "sync" or not self.pending or self.failed or self.combining is not None:
            return
        waiting_for = (set(self.participants) | set(self.expected)) - set(self.pending) - set(self.covered)
        if waiting_for:
            return
        self._apply_round(sorted(self.pending))

    def _clear_round(self) -> None:
        """Forget the open sync round's pooled deltas: their batches are not absorbed."""
        for name, batches in self.pooled_batches.items():
            if name in self.progress:
                self.progress[name] = max(0, self.progress[name] - batches)
        self.pooled_batches.clear()
        self.pending.clear()
        self.covered.clear()
        self.pooled_count.clear()
        self.pooled_samples.clear()

    def _apply_round(self, names: list[str]) -> None:
        """Combine the pooled deltas of ``names`` (the whole pool; :meth:`_combine`), take the
        server's step and start the next round.

        The weighted mean combines on the spot. A robust aggregator (median, trimmed mean,
        Krum: seconds for many clients or a large model) combines in a thread off the event
        loop (:meth:`_apply_off_loop`), so the scheduler goes on answering heartbeats and
        other routes meanwhile; until the round is applied :attr:`combining` is set and every
        request that would change the job waits for it (:meth:`settled`)."""
        names = sorted(names)  # fixed order: reproducible float sums
        pooled, self.pending = {n: self.pending[n] for n in names}, {}
        self.round_counts = {n: self.pooled_count.get(n, 1) for n in names}
        self.round_samples = sum(self.pooled_samples.get(n, pooled[n][1]) for n in names)
        self.round_names = sorted([*names, *(c for c, by in self.covered.items() if by in pooled)])
        self.covered, self.pooled_count, self.pooled_batches, self.pooled_samples = {}, {}, {}, {}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self.aggregator == "mean" or loop is None:
            self._step_round(pooled, self._combine(pooled))
            return
        self.combining = loop.create_task(self._apply_off_loop(pooled))

    async def _apply_off_loop(self, pooled: dict[str, tuple[np.ndarray, int, float]]) -> None:
        """The round of ``pooled`` combined in a worker thread, then stepped on the loop (or
        dropped if the job failed or closed meanwhile)."""
        try:
            grad = await asyncio.to_thread(self._combine, pooled)
        except (PSError, MemoryError, ValueError) as exc:  # the round cannot be applied: nor the job go on
            self.fail(f"combining round {self.version} with aggregator {self.aggregator!r} failed: {exc}")
            return
        finally:
            self.combining = None
        if self.failed or self.closed:
            self.notify()
            return
        self._step_round(pooled, grad)

    async def settled(self) -> None:
        """Return once no round is being combined off the event loop (at once when none is)."""
        while self.combining is not None:
            await asyncio.shield(self.combining)

    def _step_round(self, pooled: dict[str, tuple[np.ndarray, int, float]], grad: np.ndarray) -> None:
        """The server's step with the round's combined delta ``grad``: the next round starts."""
        names = list(pooled)
        self._privatize(grad, len(names))
        count = sum(self.round_counts.values())
        # the round's loss: the mean over its participants (a summed push brings its senders' mean)
        if count == len(pooled):
            loss = float(np.mean([v[2] for v in pooled.values()]))
        else:
            loss = sum(v[2] * self.round_counts[n] for n, v in pooled.items()) / count
        self.optimizer.step(self.params, grad, self.lr())
        self.version += 1
        self.last_applied = self.round_names
        self.after_update(loss, self.round_samples, count)

    # -- secure aggregation (pipeline.secagg) -------------------------------------------------

    async def exchange_keys(self, name: Any, version: Any, public_key: Any, timeout: float = 600.0) -> dict[str, Any]:
        """Secure aggregation: participant ``name`` (at weights ``version``) sends its round's
        X25519 public key and gets the roster (name -> public key of every participant of the
        round) and the round's attempt once every active participant has sent its key.
        A participant whose weights are behind gets ``dropped`` (the fresh weights) instead."""
        if not self.privacy["secure_aggregation"]:
            raise PSError(f"job {self.job!r} does not use secure aggregation")
        if not isinstance(name, str) or name not in self.participants:
            return self.not_joined(name)
        if not isinstance(version, int) or not 0 <= version <= self.version:
            raise PSError(f"exchange_keys for version {version!r}; the server is at version {self.version}")
        if not isinstance(public_key, bytes | bytearray) or len(public_key) != KEY_BYTES:
            raise PSError(f"public_key: expected {KEY_BYTES} raw bytes of an X25519 key")
        while True:
            if self.failed:
                return self.reply("failed")
            if name not in self.participants:  # the round closed (deadline) without it
                return self.reply(dropped=True, message=f"participant {name!r} is no longer in round {self.version}")
            if self.exhausted:
                return self.reply(stop=True, message=self.budget_message())
            if version < self.version:
                return self.reply(dropped=True)  # its delta belongs to a finished round
            attempt = self.sa_attempt
            if self.sa_roster is not None and name not in self.sa_roster:
                # the round's roster was fixed without it: it waits for the next round
                ok = await self.wait(lambda a=attempt: self.version > version or self.sa_attempt != a, timeout)
            else:
                self.sa_keys[name] = bytes(public_key)
                self.maybe_close_round()
                ok = await self.wait(
                    lambda a=attempt: self.sa_roster is not None or self.sa_attempt != a or self.version > version,
                    timeout,
                )
                if ok and self.sa_attempt == attempt and self.version == version and self.sa_roster is not None:
                    if self.sa_roster == [name]:
                        # alone in the round: nothing would mask its delta, so it sends none
                        self._secure_reset(self.sa_attempt + 1)
                        return self.reply(
                            dropped=True, message="secure aggregation needs at least 2 participants in a round"
                        )
                    if name in self.sa_roster:
                        roster = {n: self.sa_keys[n] for n in self.sa_roster}
                        return {"status": "OK", "roster": roster, "attempt": attempt, "version": self.version}
            if not ok:
                return self.reply("timeout", message=f"key exchange not finished within {timeout} s")

    async def _secure_push(
        self,
        name: str,
        version: int,
        vec: np.ndarray,
        samples: int,
        batches: int,
        loss: float,
        attempt: int | None,
        timeout: float,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Add ``name``'s masked vector to the round's running sum; reply once the round is
        applied, or with ``redo`` when it must be masked again for a new roster (``wait=False``:
        at once, as :meth:`push`)."""
        if self.exhausted:
            return self.reply(stop=True, message=self.budget_message())
        if version < self.version:
            return self.reply(dropped=True)
        roster = self.sa_roster
        if roster is None or name not in roster or attempt != self.sa_attempt:
            return self.reply(redo=True, attempt=self.sa_attempt)  # exchange keys again
        if name in self.sa_pushed:
            raise PSError(f"participant {name!r} already pushed in round {self.version}")
        masked = vec.view(np.uint32)
        if self.sa_sum is None:
            self.sa_sum = masked.copy()
        else:
            self.sa_sum += masked  # uint32: modulo 2**32
        self.sa_pushed[name] = (samples, int(batches), loss)
        self.maybe_close_round()
        if not wait:
            return {"status": "OK", "version": self.version, "pooled": True, "message": self.failed}
        ok = await self.wait(lambda: self.version > version or self.sa_attempt != attempt or self.exhausted, timeout)
        if not ok:
            return self.reply("timeout", message=f"barrier not released within {timeout} s")
        if self.failed:
            return self.reply("failed")
        if self.version > version:
            return self.reply(staleness=0)
        if self.exhausted:
            return self.reply(stop=True, message=self.budget_message())
        return self.reply(redo=True, attempt=self.sa_attempt)

    def _secure_round(self) -> None:
        """Fix the roster once every active participant has sent its key; redo the round
        without a roster member that left before pushing; apply the round once every roster
        member has pushed: the uint32 sum, dequantized, is the sum of the clipped deltas."""
        for n in [n for n in self.sa_keys if n not in self.participants]:
            if self.sa_roster is None:
                del self.sa_keys[n]  # left before the roster was fixed: not in it
        if self.sa_roster is None:
            waiting = (set(self.participants) | set(self.expected)) - set(self.sa_keys)
            if self.sa_keys and not waiting:
                self.sa_roster = sorted(self.sa_keys)
                self.notify()
            return
        roster = self.sa_roster
        gone = [n for n in roster if n not in self.sa_pushed and n not in self.participants]
        if gone:
            logger.warning(
                "job %s: %s left round %d before pushing; redoing the round with the %d others (attempt %d)",
                self.job,
                ", ".join(gone),
                self.version,
                len(roster) - len(gone),
                self.sa_attempt + 1,
            )
            self._secure_reset(self.sa_attempt + 1)
            self._secure_round()  # the survivors may all have sent keys already
            return
        if len(self.sa_pushed) < len(roster):
            return
        n = len(roster)
        assert self.sa_sum is not None
        self.sa_last_total = self.sa_sum.view(np.int32).copy()
        if self.grad is None:
            self.grad = np.empty_like(self.params)
        grad = self.grad
        grad[:] = dequantize(self.sa_sum, scale_for(n, self.privacy["clip_norm"]))  # the sum
        grad *= np.float32(1 / n)  # the equal-weight mean, as the pooled path forms it
        if self.aggregate == "sum":
            grad *= np.float32(n)
        self._privatize(grad, n)
        pushed = self.sa_pushed
        self.optimizer.step(self.params, grad, self.lr())
        self.version += 1
        for name, (_, batches, _) in pushed.items():
            self.progress[name] = self.progress.get(name, 0) + batches
        self.last_applied = list(roster)
        self._secure_reset(0)
        self.after_update(float(np.mean([v[2] for v in pushed.values()])), sum(v[0] for v in pushed.values()), n)

    def _secure_reset(self, attempt: int) -> None:
        """Forget the round's keys, roster and sum (a new round, or a redo of this one)."""
        self.sa_attempt = attempt
        self.sa_keys, self.sa_roster, self.sa_sum, self.sa_pushed = {}, None, None, {}
        self.notify()

    # -- differential privacy (pipeline.privacy) ---------------------------------------------

    def clip(self) -> float:
        """The clip of the updates now (adaptive clipping moves it every round)."""
        return self.adaptive.clip if self.adaptive is not None else float(self.privacy["clip_norm"])

    def _clip(self, vec: np.ndarray) -> np.ndarray:
        """Central DP: ``vec`` clipped to the clip (a writable copy if it was read-only),
        counting whether it needed no clipping (adaptive clipping's signal)."""
        if not vec.flags.writeable:
            vec = vec.copy()
        clip = self.clip()
        if clip_update(vec, clip) <= clip:
            self.dp_unclipped += 1
        return vec

    def _privatize(self, grad: np.ndarray, n_deltas: int) -> None:
        """Central DP on the round's combined delta ``grad`` (equal-weight mean, or sum with
        ``aggregate = "sum"``) of ``n_deltas`` clipped deltas: noise ``z x clip`` on the sum,
        a mean divided by the participants expected per round (a fixed denominator; see
        :mod:`pipeline.privacy`); then adaptive clipping's step and the accountant's round, at
        the round's own sampling rate when :meth:`expect` gave one. A no-op when DP is off;
        local DP only counts the round."""
        dp = self.privacy
        if dp["dp"] == "off" or self.accountant is None:
            return
        if dp["dp"] == "central":
            expected = float(dp["expected"] or self.round_size or n_deltas)
            z, count_std = dp["noise_multiplier"], 0.0
            if self.adaptive is not None:
                z, count_std = split_noise(z, expected)
            std = z * self.clip()
            if self.aggregate == "mean":
                grad *= np.float32(n_deltas / expected)  # the sum over the fixed denominator
                std /= expected
            add_noise(grad, std, self.dp_rng)
            if self.adaptive is not None:
                self.adaptive.update(self.dp_unclipped, expected, count_std, self.dp_rng)
            self.dp_unclipped = 0
        q = self.round_rate if dp["dp"] == "central" else None
        self.accountant.step(1, q)
        if q is not None and q != self.accountant.sampling_rate:
            self.dp_rates[q] = self.dp_rates.get(q, 0) + 1
        if self._budget_spent():
            self.exhausted = True
            logger.info("job %s: %s", self.job, self.budget_message())

    def epsilon(self) -> float:
        """The privacy spent so far: epsilon at the job's delta (0 without DP or rounds)."""
        acc = self.accountant
        if acc is None or not acc.rounds:
            return 0.0
        if self.privacy["dp"] == "local":
            return local_epsilon(acc.rounds, acc.noise_multiplier, acc.delta)
        return acc.epsilon()

    def _budget_spent(self) -> bool:
        """Whether one more round would take epsilon above ``target_epsilon``."""
        target = self.privacy["target_epsilon"]
        acc = self.accountant
        if acc is None or target <= 0:
            return False
        if self.privacy["dp"] == "local":
            return local_epsilon(acc.rounds + 1, acc.noise_multiplier, acc.delta) > target
        return acc.would_exceed(target)

    def budget_message(self) -> str:
        return (
            f"privacy budget reached: another round would take epsilon above target_epsilon = "
            f"{self.privacy['target_epsilon']:g} (epsilon = {self.epsilon():.4g} after "
            f"{self.accountant.rounds if self.accountant else 0} rounds at delta = {self.privacy['delta']:g})"
        )

    def privacy_metrics(self) -> dict[str, Any]:
        """What the dashboard, Prometheus and checkpoints see of the privacy spent."""
        dp = self.privacy
        return {
            "dp": dp["dp"],
            "epsilon": self.epsilon(),
            "delta": dp["delta"],
            "rounds": self.accountant.rounds if self.accountant else 0,
            "clip": self.clip(),
            "noise_multiplier": dp["noise_multiplier"],
            "sampling_rate": dp["sampling_rate"],
            # the applied rounds accounted at another rate (fewer candidates): [[q, rounds], ...]
            "rates": [[q, n] for q, n in sorted(self.dp_rates.items())],
            "target_epsilon": dp["target_epsilon"],
            "exhausted": self.exhausted,
            "secure_aggregation": dp["secure_aggregation"],
        }

    def _combine(self, pooled: Mapping[str, tuple[np.ndarray, int, float]]) -> np.ndarray:
        """The combined delta of the ``pooled`` deltas (in their order), by the job's aggregator,
        times their number when ``aggregate = "sum"``. Written into a vector kept between rounds
        (valid until the next round). Touches nothing else of the job: a robust aggregator runs
        it in a worker thread while the event loop goes on."""
        grad = self.grad
        if grad is None:  # kept: no fresh vectors a round
            grad = self.grad = np.empty_like(self.params)
        fedagg.aggregate(
            [v[0] for v in pooled.values()],
            [v[1] for v in pooled.values()],
            self.aggregator,
            trim_fraction=self.trim_fraction,
            krum_f=self.krum_f,
            out=grad,
            # no scratch vector: the weighted mean of float32 deltas (every decoded delta is)
            # takes compiled passes straight into ``grad``
        )
        if self.aggregate == "sum":  # times the participants (a summed push stands for several)
            grad *= np.float32(sum(self.round_counts.get(n, 1) for n in pooled))
        return grad

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
            # a deployed scheduler's log keeps it; the command's own local cluster leaves it to
            # the driver's error line (pipeline.cli's log filter)
            logger.error("job %s: %s", self.job, message, extra={"driver_reports": True})
        self._clear_round()
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
        sampling_rate: float | None = None,
    ) -> dict[str, Any]:
        """Announce the participants of an epoch (sync mode waits for them). ``sampling_rate``
        (central DP, sync): the share of the candidates this round sampled, accounted for it
        instead of the job's ``sampling_rate`` (a round sampled from fewer candidates costs
        more privacy); a round whose rate would take epsilon above ``target_epsilon`` marks
        the budget spent (``exhausted`` in the reply) and is not applied."""
        if sampling_rate is not None and (
            isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int | float) or not 0 < sampling_rate <= 1
        ):
            raise PSError(f"ps_expect: sampling_rate must be in (0, 1], got {sampling_rate!r}")
        names = list(names or [])
        keys = list(keys or [None] * len(names))
        if len(keys) != len(names):
            raise PSError("ps_expect: names and keys differ in length")
        if epoch is not None and int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.progress = {}  # positions within an epoch; a new epoch starts from zero
        self.expected = {}
        if self.mode == "sync":
            self.round_size = len(names)
            self.round_rate = None if sampling_rate is None else float(sampling_rate)
            if (
                self.privacy["dp"] == "central"
                and self.round_rate is not None
                and self.accountant is not None
                and not self.exhausted
                and self.accountant.would_exceed(self.privacy["target_epsilon"], self.round_rate)
            ):
                self.exhausted = True  # this round, at its rate, would overspend: nothing more is applied
                logger.info("job %s: %s", self.job, self.budget_message())
            if self.adaptive is not None and names and not self.privacy["expected"]:
                split_noise(self.privacy["noise_multiplier"], len(names))  # PSError if it cannot pay
            for n, k in zip(names, keys, strict=True):
                if n not in self.participants and not (self.exhausted and self.round_rate is not None):
                    self.expected[n] = k
                    if k is not None:
                        self.keys[k] = (self.job, n)
            self.expected_since = time.time()
        if self.privacy["dp"] != "off":
            return {"status": "OK", "version": self.version, "exhausted": self.exhausted}
        return {"status": "OK", "version": self.version}

    def join(
        self,
        name: Any,
        key: str | None = None,
        worker: str | None = None,
        slot: str | None = None,
        shm: bool = False,
    ) -> dict[str, Any]:
        """Participant ``name`` joins: the weights, their version and the batches to skip.
        ``shm``: it can use shared memory if it runs on this host (:mod:`pipeline.ps.shm`); the
        reply then describes the job's weights segment and the participant's push segment
        when the job's rounds can use them (sync mode, uncompressed, no secure aggregation)."""
        if not isinstance(name, str) or not name:
            raise PSError("ps_join needs a participant name")
        if self.failed:
            return self.reply("failed")
        extra: dict[str, Any] = {}
        if shm is True and self._shm_usable():
            old = self.shm_push.pop(name, None)
            if old is not None:
                old.close()
            if self.shm_weights is None:
                self.shm_weights = shmem.create(self.params.size)
            in_use = sum(g.shm.size for g in (self.shm_weights, *self.shm_push.values()) if g is not None)
            seg = shmem.create(self.params.size, in_use) if self.shm_weights is not None else None
            if seg is not None:
                self.shm_push[name] = seg
                extra["shm"] = {"weights": self.shm_weights.describe(), "push": seg.describe()}
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
        self.left.pop(name, None)
        self.expected.pop(name, None)
        if key is not None:
            self.keys[key] = (self.job, name)
        # the mode: a sharded handle lines a sync participant's slices up at one version
        return self.reply(skip_batches=self.progress.get(name, 0), mode=self.mode, **extra)

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
        attempt: int | None = None,
        also: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Apply (async, ssp) or pool (sync) ``name``'s delta; reply with the weights to go on
        from once the mode lets the participant continue. ``wait=False`` (sync; a federated
        client's one push of a round) pools the delta and replies at once, without weights: the
        participant does not wait for the round (which closes when every expected participant
        has pushed, or by :meth:`close_round`). With secure aggregation the delta is a masked
        uint32 vector (its bytes as float32) for the round's key-exchange ``attempt``.
        A push arriving while a round is being combined off the event loop waits for it: it
        then belongs to the next round (or, a delta of the round just applied, is stale).
        ``also`` (sync, ``combine_pushes``): the other participants whose deltas the worker
        summed into this push, each ``{"name", "samples", "batches", "loss", "timings"}``;
        ``delta`` is then the sample-weighted mean of them all with the sender's, ``samples``
        and the rest the sender's own, and the round weighs the mean by their samples together."""
        await self.settled()
        if self.failed:
            return self.reply("failed")
        p = self.participants.get(name) if isinstance(name, str) else None
        if p is None:
            return self.not_joined(name)
        if not isinstance(version, int) or not 0 <= version <= self.version:
            raise PSError(f"push for version {version!r}; the server is at version {self.version}")
        if not isinstance(samples, int) or samples < 0:
            raise PSError(f"samples must be an int >= 0, got {samples!r}")
        group = self._summed_with(name, also) if also else []
        if isinstance(delta, str) and delta == SHM_DELTA:
            seg = self.shm_push.get(name)
            if seg is None:
                raise PSError(f"participant {name!r} has no shared-memory segment; push the delta itself")
            vec = seg.data  # the participant writes it again only after this push's reply
            self.bytes_shm += vec.nbytes
            self.bytes_in += vec.nbytes
        else:
            vec = decode_delta(delta, self.params.size, self.compression, self.topk_fraction)
            self.bytes_in += _wire_bytes(delta, vec)
        loss = float(loss)
        secure = self.mode == "sync" and self.privacy["secure_aggregation"]
        bad_loss = next((x for x in (loss, *(g[3] for g in group)) if not np.isfinite(x)), None)
        if bad_loss is not None or (not secure and not np.isfinite(vec).all()):
            what = "loss" if bad_loss is not None else "update"
            self.fail(
                f"training diverged at round {self.version}: the {what} is not finite "
                f"(loss={loss if bad_loss is None else bad_loss}); lower the learning rate or add warm-up",
            )
            return self.reply("failed")
        staleness = self.version - version
        self._count_push(p, samples, loss, staleness, timings)
        for q, q_samples, _, q_loss, q_timings in group:
            self._count_push(q, q_samples, q_loss, staleness, q_timings)
        self.summed += len(group)

        if secure:
            return await self._secure_push(name, version, vec, samples, batches, loss, attempt, timeout, wait)
        if self.mode == "sync":
            if self.exhausted:
                # the privacy budget allows no further round: the participant stops
                return self.reply(stop=True, message=self.budget_message())
            if staleness:
                # joined just as a round closed: its delta belongs to a finished round
                return self.reply(dropped=True)
            # a delta off the wire is this message's own buffer (or, compressed, a fresh decoded
            # array); an in-process caller's array may change after the call, so that one is copied
            own = vec if isinstance(delta, Serialized) or self.compression != "none" else vec.copy()
            weight = samples
            if self.privacy["dp"] == "central":
                own, weight = self._clip(own), 1  # equal weights: sample counts are data
            elif self.privacy["dp"] == "local":
                weight = 1  # the sites noised their deltas; the mean stays unweighted
            self.pooled_samples[name] = samples + sum(g[1] for g in group)
            if group:  # one pooled delta for the sender and its co-senders: their weighted mean
                weight += sum(g[1] for g in group)
                loss = (loss + sum(g[3] for g in group)) / (1 + len(group))
                self.pooled_count[name] = 1 + len(group)
                for q, _, q_batches, _, _ in group:
                    self.covered[q.name] = name
                    self.progress[q.name] = self.progress.get(q.name, 0) + q_batches
                    self.pooled_batches[q.name] = q_batches
            self.pending[name] = (own, weight, loss)
            self.progress[name] = self.progress.get(name, 0) + int(batches)
            self.pooled_batches[name] = int(batches)
            self.maybe_close_round()
            if not wait:
                return {"status": "OK", "version": self.version, "pooled": True, "message": self.failed}
            ok = await self.wait(lambda: self.version > version or self.exhausted, timeout)
            if self.exhausted and self.version <= version:
                return self.reply(stop=True, message=self.budget_message())
        elif self.buffer_size:
            fresh = isinstance(delta, Serialized) or self.compression != "none"
            self.buffer.append((vec if fresh else vec.copy(), samples, loss, staleness))
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
        return self._push_reply(name, version, staleness=staleness)

    def _summed_with(self, name: str, also: Any) -> list[tuple[Participant, int, int, float, dict]]:
        """The co-senders of a summed push (``also``), checked: a sync job whose round is a
        sample-weighted mean of float32 deltas, each co-sender an active participant other than
        ``name`` that has not pushed in the open round."""
        if self.mode != "sync" or self.aggregator != "mean" or self.compression != "none":
            raise PSError(
                f"job {self.job!r}: summed pushes need mode 'sync', aggregator 'mean' and float32 deltas "
                f"(this job: {self.mode}, {self.aggregator}, {self.compression})"
            )
        if self.privacy["dp"] != "off" or self.privacy["secure_aggregation"]:
            raise PSError(
                f"job {self.job!r}: summed pushes cannot be used with differential privacy or secure aggregation"
            )
        if not isinstance(also, (list, tuple)):
            raise PSError(f"also must be a list of co-senders, got {type(also).__name__}")
        out: list[tuple[Participant, int, int, float, dict]] = []
        seen = {name}
        for entry in also:
            q_name = entry.get("name") if isinstance(entry, Mapping) else None
            q = self.participants.get(q_name) if isinstance(q_name, str) else None
            if q is None or q_name in seen:
                raise PSError(f"co-sender {q_name!r} is not another active participant of job {self.job!r}")
            if q_name in self.pending or q_name in self.covered:
                raise PSError(f"co-sender {q_name!r} already pushed in round {self.version}")
            q_samples, q_batches = entry.get("samples", 0), entry.get("batches", 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (q_samples, q_batches)):
                raise PSError(f"co-sender {q_name!r}: samples and batches must be ints >= 0")
            timings = entry.get("timings") or {}
            if not isinstance(timings, Mapping):
                raise PSError(f"co-sender {q_name!r}: timings must be a mapping")
            seen.add(q_name)
            out.append((q, q_samples, q_batches, float(entry.get("loss", float("nan"))), dict(timings)))
        return out

    def _shm_usable(self) -> bool:
        """Rounds whose vectors can go through shared memory: sync mode (the weights cannot
        change before every participant of the round has pushed again), uncompressed float32,
        no secure aggregation (masked vectors travel as they are)."""
        return (
            self.mode == "sync"
            and self.compression == "none"
            and self.reply_codec == "none"
            and not self.privacy["secure_aggregation"]
            and not self.closed
        )

    def _push_reply(self, name: str, since: int, **extra: Any) -> dict[str, Any]:
        """The reply to a push made at version ``since``: the weights (or their change since
        then, :meth:`reply`), or for a participant with a push segment their version in the
        job's weights segment (written once per version)."""
        seg = self.shm_weights
        if seg is None or name not in self.shm_push or self.failed:
            return self.reply(since=since, **extra)
        if seg.version != self.version:
            seg.write(self.params, self.version)
        self.bytes_out += self.params.nbytes
        self.bytes_shm += self.params.nbytes
        return {"status": "OK", "version": self.version, "message": self.failed, "shm": True, **extra}

    def release_shm(self, name: str | None = None) -> None:
        """Unlink ``name``'s push segment (every segment of the job when None)."""
        names = list(self.shm_push) if name is None else [name]
        for n in names:
            seg = self.shm_push.pop(n, None)
            if seg is not None:
                seg.close()
        if name is None and self.shm_weights is not None:
            self.shm_weights.close()
            self.shm_weights = None

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

    async def close_round(self, min_count: Any = 1, counts: Any = None) -> dict[str, Any]:
        """Close the open sync round now (a federated round at its deadline): apply the pooled
        deltas if at least ``min_count`` participants pushed one, else discard them; either way
        no participant of the round is expected or active any more (a late push is refused).
        ``arrived``: the participants whose deltas were pooled; ``last_applied``: those whose
        deltas the last applied round combined (this one's, or the round that applied itself
        when its last expected participant pushed). ``counts`` (``{name: n}``): a participant
        whose delta stands for ``n`` clients (a task's folded delta) counts ``n`` towards
        ``min_count``; the others count one. A round being combined off the event loop (one
        that applied itself at its last push, or this one) is waited for: the reply's version
        counts it."""
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise PSError(f"close_round: min_count must be an int >= 1, got {min_count!r}")
        if counts is not None and not isinstance(counts, dict):
            raise PSError("close_round: counts must map participant names to ints >= 1")
        counts = dict(counts or {})
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts.values()):
            raise PSError("close_round: counts must map participant names to ints >= 1")
        if self.mode != "sync":
            raise PSError(f"close_round is for sync jobs; job {self.job!r} is {self.mode}")
        await self.settled()
        arrived = sorted(self.pending)
        self._forget_participants()
        status = "discarded"
        if self.privacy["secure_aggregation"]:
            # a round that applied itself had every roster member's masked vector; a partial
            # sum still has uncancelled masks and cannot be unmasked: it is discarded
            arrived = sorted(self.sa_pushed)
            if arrived:
                logger.warning(
                    "job %s: secure round closed with %d masked deltas of a roster of %d; discarded",
                    self.job,
                    len(arrived),
                    len(self.sa_roster or arrived),
                )
            self._secure_reset(self.sa_attempt + 1)  # wakes the clients still exchanging keys
        elif self.failed:
            self._clear_round()
        elif arrived and sum(counts.get(n, 1) for n in arrived) >= min_count:
            self._apply_round(arrived)
            await self.settled()
            status = "applied"
        else:
            if arrived:
                logger.warning(
                    "job %s: round closed with %d of the %d deltas it needs; discarded",
                    self.job,
                    len(arrived),
                    min_count,
                )
            self._clear_round()
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
            # the batches in the weights: a delta pooled in the open round is not, and a run
            # resumed from this state trains those batches again rather than skip them
            "progress": {n: b - self.pooled_batches.get(n, 0) for n, b in self.progress.items()},
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
            # the rounds the accountant has counted and adaptive clipping's clip: a resumed
            # run goes on spending from there
            "privacy": self.privacy_metrics(),
            # reply_codec: the weights the participants hold (a resumed run sends them the same)
            **({"reply_view": encode_vector(self.held_weights())} if self.reply_codec != "none" else {}),
        }

    def record(self, epoch: Mapping[str, Any] | None = None, checkpoint: bool = False) -> dict[str, Any]:
        """The driver records an epoch's validation metrics or that it saved a checkpoint."""
        if epoch is not None:
            self.epochs.append(dict(epoch))
            if len(self.epochs) > _EPOCHS_KEPT:
                # every other record of the older half goes (the first stays, the newer half is
                # whole): the dashboard's curves still span the run, and every metrics reply
                # (each page refresh, scrape, and the driver's state at each epoch's end) stays
                # bounded on a run of many epochs; the driver keeps every epoch's record itself
                half = len(self.epochs) // 2
                self.epochs = [*self.epochs[:half:2], *self.epochs[half:]]
        if checkpoint:
            self.checkpoint_time = time.time()
        return {"status": "OK"}

    def _forget_participants(self) -> None:
        """No participant is active or expected any more (their task keys leave the index)."""
        for name in list(self.participants):
            p = self.participants.pop(name)
            if p.key is not None:
                self.keys.pop(p.key, None)
        for key in self.expected.values():
            if key is not None:
                self.keys.pop(key, None)
        self.expected.clear()

    def close(self) -> dict[str, Any]:
        """Close the job: every waiter wakes; returns its final metrics with recent history."""
        self.closed = True
        self._forget_participants()
        self.release_shm()
        self._clear_round()
        summary = self.metrics()
        summary["history"] = coarse_history(list(self.history), _FINISHED_HISTORY)
        self.notify()
        return summary

    # -- what the outside sees ---------------------------------------------------------------

    def metrics(self, history: bool = False, since: int | None = None) -> dict[str, Any]:
        """The job's counters (msgpack-able); ``history``: with every round kept (``since``: the
        rounds of later versions only)."""
        out = {
            "job": self.job,
            "mode": self.mode,
            "n_params": int(self.params.size),
            "version": self.version,
            "epoch": self.epoch,
            "pushes": self.pushes,
            "summed": self.summed,
            "samples": self.samples,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bytes_shm": self.bytes_shm,
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
            "combining": self.combining is not None,
            "epochs": list(self.epochs),
            "privacy": self.privacy_metrics(),
            **self._site_metrics(),
        }
        if history:
            out["history"] = rounds_after(self.history, since)
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

    def view(self, history: bool = False, since: int | None = None) -> JobSnapshot:
        """The job's public, read-only snapshot (for the dashboard and Prometheus)."""
        return JobSnapshot.from_metrics(self.metrics(history=history, since=since))


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


def _wire_bytes(delta: Any, vec: np.ndarray) -> int:
    """The payload bytes a pushed delta took on the wire (its frames; compressed: every frame)."""
    if isinstance(delta, Mapping):
        return sum(_wire_bytes(v, vec) for k, v in delta.items() if k not in ("codec", "n", "k"))
    if isinstance(delta, Serialized):
        return sum(len(memoryview(f).cast("B")) for f in delta.frames)
    data = getattr(delta, "data", delta)
    return int(data.nbytes) if isinstance(data, np.ndarray) else vec.nbytes
