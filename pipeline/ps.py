"""A parameter server that lives inside the Dask scheduler.

One formulation covers every mode (FedOpt's): a participant (a training task on a worker)
pulls weights ``w_v``, runs ``local_steps`` minibatch steps with its local optimizer and pushes
``delta = w_v - w_local`` with the number of samples it saw. The server treats the delta as a
gradient for its own optimizer (server SGD with lr 1 on the sum of deltas adds every
participant's progress; with ``aggregate="mean"`` it is plain model averaging).

Modes
-----
``sync``
    Rounds (BSP). The server waits for one delta from every active participant, combines them
    weighted by samples in a fixed order (sorted participant names, so runs reproduce) and
    releases the next round. Participants the driver announced for an epoch are waited for
    until they join or their task ends.
``async``
    Each delta is applied as it arrives, optionally damped by its staleness.
``ssp``
    Stale-synchronous: async, but a participant more than ``staleness`` pushes ahead of the
    slowest active participant waits.

A participant that leaves (its task ended, erred or was cancelled, or its worker died) leaves
the round at once: no barrier ever waits for the dead.

The module holds, in this order: the scheduler extension (routes ``ps_*``), the user-facing
:class:`ParameterServer` handle usable from the driver and from inside tasks, the plugin that
installs the extension on a scheduler that was not preloaded, and :func:`dask_setup` so that
``dask scheduler --preload pipeline.ps`` installs it on a real cluster.

Vectors travel as flat little-endian float32 buffers wrapped in
:func:`distributed.protocol.to_serialize` (zero-copy frames). The scheduler never deserializes
them: :func:`decode_vector` checks the header (serializer, type, dtype, shape) and builds the
array with ``np.frombuffer``; anything else is refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import to_serialize
from distributed.protocol.compression import compressions
from distributed.protocol.serialize import Serialized

from pipeline.allocator import restore_mmap_threshold
from pipeline.optim import Schedule

logger = logging.getLogger(__name__)

EXTENSION_NAME = "pipeline_ps"
MODES = ("sync", "async", "ssp")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_MAX_SLOTS = 4096  # sync shares whose local optimizer states a job keeps
_HISTORY_LEN = 20_000
_FINISHED_KEPT = 8
_TASK_ALIVE = frozenset({"waiting", "queued", "no-worker", "processing"})


class PSError(ValueError):
    """A request the parameter server refuses (unknown job, wrong length or dtype, ...)."""


# --------------------------------------------------------------------------------------------
# Vector encoding: zero-copy frames, decoded without unpickling anything
# --------------------------------------------------------------------------------------------


def encode_vector(vec: np.ndarray) -> Any:
    """Wrap a flat float32 vector for the wire (zero-copy frames)."""
    vec = np.ascontiguousarray(vec, dtype="<f4").reshape(-1)
    return to_serialize(vec)


def decode_vector(obj: Any, n: int, what: str = "vector") -> np.ndarray:
    """Return the float32 array of length ``n`` carried by ``obj``, or raise :class:`PSError`.

    ``obj`` is what a handler receives: a :class:`Serialized` (header + frames) from a remote
    caller, or the array itself from an in-process one. Only a NumPy float32 vector of length
    ``n`` is accepted; the type named in the header is never unpickled.
    """
    if isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "data") and isinstance(obj.data, np.ndarray):  # Serialize, in-process
        arr = obj.data
    elif isinstance(obj, Serialized):
        header = obj.header
        if not isinstance(header, Mapping):
            raise PSError(f"{what}: malformed header")
        if header.get("serializer") != "dask" or header.get("type") != "numpy.ndarray":
            raise PSError(f"{what}: expected a NumPy array, got {header.get('type')!r}")
        sub = header.get("sub-header") or {}
        dtype = sub.get("dtype")
        if not (isinstance(dtype, list | tuple) and len(dtype) == 2 and dtype[1] == "<f4"):
            raise PSError(f"{what}: dtype must be float32, got {dtype!r}")
        shape = tuple(sub.get("shape") or ())
        if shape != (n,):
            raise PSError(f"{what}: expected shape ({n},), got {shape}")
        names = tuple(header.get("compression") or (None,) * len(obj.frames))
        if len(names) != len(obj.frames) or any(c not in compressions for c in names):
            raise PSError(f"{what}: unsupported frame compression {names!r}")
        frames = [compressions[c].decompress(f) for c, f in zip(names, obj.frames, strict=True)]
        buf = frames[0] if len(frames) == 1 else b"".join(bytes(f) for f in frames)
        if len(memoryview(buf).cast("B")) != 4 * n:
            raise PSError(f"{what}: payload of {len(memoryview(buf).cast('B'))} bytes, expected {4 * n}")
        arr = np.frombuffer(buf, dtype="<f4")
    else:
        raise PSError(f"{what}: expected a float32 array, got {type(obj).__name__}")
    if arr.dtype != np.float32 or arr.ndim != 1 or arr.size != n:
        raise PSError(f"{what}: expected float32 of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr


def encode_opt_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state ``{"t", ["lr"], "buffers": {name: vector}}`` for the wire: the
    buffers as zero-copy float32 frames (pass copies of buffers that will change)."""
    out: dict[str, Any] = {
        "t": int(state.get("t", 0)),
        "buffers": {str(k): encode_vector(v) for k, v in (state.get("buffers") or {}).items()},
    }
    if state.get("lr") is not None:
        out["lr"] = float(state["lr"])
    return out


def decode_opt_state(obj: Any, n: int, what: str) -> dict[str, Any]:
    """The optimizer state :func:`encode_opt_state` sent, each buffer checked to be a float32
    vector of length ``n`` (owned copies); :class:`PSError` otherwise."""
    buffers = (obj.get("buffers") or {}) if isinstance(obj, Mapping) else None
    if not isinstance(buffers, Mapping) or len(buffers) > 4:
        raise PSError(f"{what}: expected {{'t', 'buffers': {{name: float32 vector}}}}")
    return {
        "t": int(obj.get("t", 0)),
        "lr": None if obj.get("lr") is None else float(obj["lr"]),
        "buffers": {str(k): decode_vector(v, n, f"{what} buffer {k}").copy() for k, v in buffers.items()},
    }


def _check_job_id(job: Any) -> str:
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise PSError(
            f"invalid job id {job!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return job


# --------------------------------------------------------------------------------------------
# Server-side state
# --------------------------------------------------------------------------------------------


class ServerOptimizer:
    """The server's optimizer over the flat parameter vector; the combined delta is its gradient.

    Plain NumPy in place (a few vector passes per round): cheap enough for the event loop at
    the sizes this project trains, and free of JIT compilation inside the scheduler.

    ``ema`` > 0 also keeps an exponential moving average of the weights (Polyak averaging), the
    buffer ``average``: after update ``t`` (1-based) ``average += (1 - d) * (params - average)``
    with ``d = min(ema, (1 + t) / (10 + t))``, so it starts as the weights themselves and its
    horizon grows with training up to ``1 / (1 - ema)`` updates. The average is the *model*
    (what is validated, kept as best and saved); training continues from the raw weights.
    """

    def __init__(
        self,
        name: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        ema: float = 0.0,
        n: int = 0,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise PSError(f"unknown server optimizer {name!r}; use one of {SERVER_OPTIMIZERS}")
        if not lr > 0:
            raise PSError(f"server learning rate must be > 0, got {lr}")
        if not 0 <= ema < 1:
            raise PSError(f"ema must be in [0, 1), got {ema}")
        for key, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise PSError(f"server optimizer {key} must be in [0, 1), got {value}")
        self.name, self.lr, self.momentum = name, float(lr), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.ema = float(ema)
        self.t = 0
        self.buffers: dict[str, np.ndarray] = {}
        self._work: np.ndarray | None = None
        self._work2: np.ndarray | None = None  # adam's second work vector
        if name == "momentum":
            self.buffers["velocity"] = np.zeros(n, np.float32)
        elif name == "adam":
            self.buffers["m"] = np.zeros(n, np.float32)
            self.buffers["v"] = np.zeros(n, np.float32)
        if self.ema:
            self.buffers["average"] = np.zeros(n, np.float32)  # meaningful once t >= 1

    def work_vector(self, like: np.ndarray) -> np.ndarray:
        """A work vector shaped like ``like``, kept between rounds (not state: never saved).
        :meth:`step` overwrites it; free for the caller's use before that."""
        if self._work is None or self._work.shape != like.shape:
            self._work = np.empty_like(like)
        return self._work

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Apply one update in place; ``grad`` is read only. Element-wise results equal the
        plain expressions (``params -= lr * grad`` ...): the products go through scratch
        vectors kept between rounds (one; two for adam) instead of fresh temporaries per round."""
        self.t += 1
        tmp = self.work_vector(params)
        if self.name == "sgd":
            np.multiply(grad, np.float32(lr), out=tmp)
            params -= tmp
        elif self.name == "momentum":
            vel = self.buffers["velocity"]
            vel *= np.float32(self.momentum)
            vel += grad
            np.multiply(vel, np.float32(lr), out=tmp)
            params -= tmp
        else:
            # params -= lr/c1 * m / (sqrt(v / c2) + eps), operation by operation as written,
            # through the work vector and a second one kept for adam alone
            m, v = self.buffers["m"], self.buffers["v"]
            m *= np.float32(self.beta1)
            np.multiply(grad, np.float32(1 - self.beta1), out=tmp)
            m += tmp
            v *= np.float32(self.beta2)
            np.square(grad, out=tmp)
            tmp *= np.float32(1 - self.beta2)
            v += tmp
            c1 = 1 - self.beta1**self.t
            c2 = 1 - self.beta2**self.t
            if self._work2 is None or self._work2.shape != params.shape:
                self._work2 = np.empty_like(params)
            num = self._work2
            np.multiply(m, np.float32(lr / c1), out=num)
            np.divide(v, np.float32(c2), out=tmp)
            np.sqrt(tmp, out=tmp)
            tmp += np.float32(self.eps)
            num /= tmp
            params -= num
        if self.ema:
            avg = self.buffers["average"]
            d = min(self.ema, (1 + self.t) / (10 + self.t))
            np.subtract(params, avg, out=tmp)
            if self.t > 1:
                tmp *= np.float32(1 - d)
            avg += tmp

    def model(self, params: np.ndarray) -> np.ndarray:
        """The weights to validate and save: the average (``ema`` > 0, after an update) or
        ``params`` themselves. The array may change in place with the next update."""
        return self.buffers["average"] if self.ema and self.t else params

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "ema": self.ema,
        }


@dataclass
class _Participant:
    name: str
    key: str | None
    worker: str | None
    clock: int = 0
    pushes: int = 0
    samples: int = 0
    joined: float = field(default_factory=time.time)


@dataclass
class _Job:
    job: str
    params: np.ndarray
    mode: str
    optimizer: ServerOptimizer
    schedule: Schedule
    staleness: int
    damping: bool
    aggregate: str
    owner: str | None
    version: int = 0
    snapshot: np.ndarray | None = None
    snapshot_version: int = -1
    model_snapshot: np.ndarray | None = None  # the same for the model weights (ema > 0)
    model_snapshot_version: int = -1
    participants: dict[str, _Participant] = field(default_factory=dict)
    expected: dict[str, str | None] = field(default_factory=dict)  # name -> task key
    expected_since: float = 0.0
    join_timeout: float = 120.0
    pending: dict[str, tuple[np.ndarray, int, float]] = field(default_factory=dict)
    grad: np.ndarray | None = None  # sync: the round's combined delta (reused every round)
    progress: dict[str, int] = field(default_factory=dict)  # participant -> batches absorbed
    summaries: dict[str, dict] = field(default_factory=dict)  # participant -> its task's result
    local_states: dict[str, dict] = field(default_factory=dict)  # sync: slot -> local optimizer state
    failed: str | None = None
    closed: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)
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

    def notify(self) -> None:
        """Wake every waiter (they re-check their condition) and arm a fresh event."""
        self.event.set()
        self.event = asyncio.Event()

    def lr(self) -> float:
        return self.optimizer.lr * self.schedule.factor(self.version)


class ParameterServerExtension(SchedulerPlugin):
    """Scheduler extension holding the parameters of every training job on the cluster.

    Routes (all ``ps_*``):

    * ``ps_create``   -- create a job from initial parameters (or a checkpointed state)
    * ``ps_expect``   -- announce the participants of an epoch (sync mode waits for them)
    * ``ps_join``     -- a participant joins: returns weights, version, batches to skip
    * ``ps_push``     -- push a delta with its sample count; returns the new weights
    * ``ps_pull``     -- current weights and version
    * ``ps_leave``    -- a participant leaves (also done automatically when its task ends),
      optionally leaving its task's summary for the driver and (sync) its share's local
      optimizer state for the next epoch's task
    * ``ps_epoch_end``-- (sync) a participant that has left waits until every participant of
      the epoch has left, and gets the epoch's final weights (it validates them in its task)
    * ``ps_summaries``-- the driver takes the summaries of finished participants
    * ``ps_state``    -- full state for a checkpoint (weights, optimizer state, counters)
    * ``ps_metrics``  -- counters of one job or all jobs (msgpack-able, for dashboards)
    * ``ps_record``   -- the driver records an epoch's validation metrics or a checkpoint
    * ``ps_close``    -- drop a job (its metrics stay visible for a while)
    * ``ps_info``     -- how the extension was installed and which jobs exist

    As a scheduler plugin it learns when a participant's task leaves the ``processing`` state
    or its worker is removed, and drops the participant from its job's round.
    """

    name = "pipeline-ps"

    def __init__(self, scheduler: Any, installed_by: str = "preload") -> None:
        restore_mmap_threshold()  # a scheduler started with a malloc tunable set: pipeline/allocator.py
        self.scheduler = scheduler
        self.installed_by = installed_by
        self.jobs: dict[str, _Job] = {}
        self.finished: deque[dict[str, Any]] = deque(maxlen=_FINISHED_KEPT)
        self.key_to_participant: dict[str, tuple[str, str]] = {}
        handlers = {
            "ps_create": self.create,
            "ps_expect": self.expect,
            "ps_join": self.join,
            "ps_push": self.push,
            "ps_pull": self.pull,
            "ps_leave": self.leave,
            "ps_epoch_end": self.epoch_end,
            "ps_summaries": self.take_summaries,
            "ps_state": self.state,
            "ps_metrics": self.metrics,
            "ps_record": self.record,
            "ps_close": self.close_job,
            "ps_info": self.info,
        }
        scheduler.handlers.update(handlers)
        scheduler.extensions[EXTENSION_NAME] = self
        scheduler.add_plugin(self, name=self.name, idempotent=True)
        from pipeline.dashboard import register_prometheus

        register_prometheus(self)

    # -- helpers ---------------------------------------------------------------------------

    def _job(self, job: Any) -> _Job:
        _check_job_id(job)
        try:
            state = self.jobs[job]
        except KeyError:
            raise PSError(f"unknown job {job!r}: create it with ps_create first") from None
        if state.closed:
            raise PSError(f"job {job!r} is closed")
        return state

    def _snapshot(self, st: _Job) -> np.ndarray:
        """An immutable copy of the weights at the current version, shared by every reply of
        that version. Replies are written to sockets after the handler returns, zero-copy from
        the array they reference; a later in-place update must never show through them."""
        if st.snapshot_version != st.version or st.snapshot is None:
            st.snapshot = st.params.copy()
            st.snapshot_version = st.version
        return st.snapshot

    def _model_snapshot(self, st: _Job) -> np.ndarray:
        """Like :meth:`_snapshot`, for the model weights (the average when ``ema`` > 0)."""
        if not st.optimizer.ema:
            return self._snapshot(st)
        if st.model_snapshot_version != st.version or st.model_snapshot is None:
            st.model_snapshot = st.optimizer.model(st.params).copy()
            st.model_snapshot_version = st.version
        return st.model_snapshot

    def _reply(self, st: _Job, status: str = "OK", model: bool = False, **extra: Any) -> dict[str, Any]:
        """A reply carrying the weights to train from, or (``model``) the weights to validate."""
        st.bytes_out += st.params.nbytes
        return {
            "status": status,
            "params": encode_vector(self._model_snapshot(st) if model else self._snapshot(st)),
            "version": st.version,
            "message": st.failed,
            **extra,
        }

    def _active_names(self, st: _Job) -> set[str]:
        return set(st.participants)

    def _drop_participant(self, st: _Job, name: str, why: str) -> None:
        # A delta it already pushed in sync mode stays in the open round.
        p = st.participants.pop(name, None)
        expected_key = st.expected.pop(name, None)
        for key in (getattr(p, "key", None), expected_key):
            if key is not None:
                self.key_to_participant.pop(key, None)
        if p is not None or expected_key is not None:
            logger.debug("job %s: participant %s left (%s)", st.job, name, why)
        self._maybe_close_round(st)
        st.notify()

    def _expire_expected(self, st: _Job) -> None:
        if st.expected and time.time() - st.expected_since > st.join_timeout:
            late = sorted(n for n in st.expected if n not in st.participants)
            if late:
                logger.warning(
                    "job %s: participants %s did not join within %.0f s; continuing without them",
                    st.job,
                    late,
                    st.join_timeout,
                )
            for n in late:
                key = st.expected.pop(n)
                if key is not None:
                    self.key_to_participant.pop(key, None)
            self._maybe_close_round(st)
            st.notify()

    def _maybe_close_round(self, st: _Job) -> None:
        """In sync mode: if every active and expected participant has pushed, apply the round."""
        if st.mode != "sync" or not st.pending or st.failed:
            return
        waiting_for = (self._active_names(st) | set(st.expected)) - set(st.pending)
        if waiting_for:
            return
        names = sorted(st.pending)  # fixed order: reproducible float sums
        total = sum(st.pending[n][1] for n in names)
        if st.grad is None:  # kept: no fresh vectors a round
            st.grad = np.empty_like(st.params)
        grad = st.grad
        tmp = st.optimizer.work_vector(st.params)  # free until the step below
        for i, n in enumerate(names):
            delta, samples, _ = st.pending[n]
            weight = np.float32(samples / total if total else 1 / len(names))
            np.multiply(delta, weight, out=grad if i == 0 else tmp)
            if i:
                grad += tmp
        if st.aggregate == "sum":
            grad *= np.float32(len(names))
        losses = [st.pending[n][2] for n in names]
        st.optimizer.step(st.params, grad, st.lr())
        st.version += 1
        st.pending.clear()
        self._after_update(st, float(np.mean(losses)), total, len(names))

    def _after_update(self, st: _Job, loss: float, samples: int, n_deltas: int) -> None:
        st.history.append((time.time(), st.version, loss, samples, n_deltas))
        if not np.isfinite(st.params[:: max(1, st.params.size // 4096)]).all():
            self._fail(st, f"parameters became non-finite at round {st.version}")
        st.notify()

    def _fail(self, st: _Job, message: str) -> None:
        if st.failed is None:
            st.failed = message
            logger.error("job %s: %s", st.job, message)
        st.pending.clear()
        st.notify()

    async def _wait(self, st: _Job, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` holds, the job fails or closes; False on timeout."""
        deadline = time.monotonic() + timeout
        while not (predicate() or st.failed or st.closed):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ev = st.event
            try:
                await asyncio.wait_for(ev.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                self._expire_expected(st)
        return True

    # -- routes ----------------------------------------------------------------------------

    def create(
        self,
        job: str | None = None,
        params: Any = None,
        n_params: int = 0,
        mode: str = "sync",
        staleness: int = 2,
        damping: bool = False,
        aggregate: str = "sum",
        optimizer: dict | None = None,
        schedule: dict | None = None,
        version: int = 0,
        optimizer_state: dict | None = None,
        progress: dict | None = None,
        epoch: int = 0,
        join_timeout: float = 120.0,
        overwrite: bool = False,
        client: str | None = None,
        local_states: dict | None = None,
    ) -> dict[str, Any]:
        _check_job_id(job)
        if job in self.jobs and not overwrite and not self.jobs[job].closed:
            raise PSError(f"job {job!r} already exists on this scheduler; pick another job id")
        if not isinstance(n_params, int) or not 0 < n_params <= 2**31 - 1:
            raise PSError(f"n_params must be a positive int, got {n_params!r}")
        if mode not in MODES:
            raise PSError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if aggregate not in ("sum", "mean"):
            raise PSError(f"unknown aggregate {aggregate!r}; use 'sum' or 'mean'")
        if not isinstance(staleness, int) or staleness < 0:
            raise PSError(f"staleness must be an int >= 0, got {staleness!r}")
        vec = decode_vector(params, n_params, "params").copy()
        opt = ServerOptimizer(**(optimizer or {}), n=n_params)
        if optimizer_state:
            restored = decode_opt_state(optimizer_state, n_params, "optimizer state")
            if not opt.ema:  # resumed with ema = 0: the average is derived state, drop it
                restored["buffers"].pop("average", None)
            unknown = sorted(set(restored["buffers"]) - set(opt.buffers))
            if unknown:
                raise PSError(f"optimizer state has unknown buffer {unknown[0]!r}")
            opt.t = restored["t"]
            opt.buffers.update(restored["buffers"])
            if opt.ema and "average" not in restored["buffers"]:
                # a state saved without averaging: the average starts from the weights
                opt.buffers["average"] = vec.copy()
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
                str(slot): decode_opt_state(v, n_params, f"local_state of {slot}")
                for slot, v in local_states.items()
            }
        self.jobs[job] = _Job(
            job=job,
            params=vec,
            mode=mode,
            optimizer=opt,
            schedule=sched,
            staleness=staleness,
            damping=bool(damping),
            aggregate=aggregate,
            owner=client,
            version=int(version),
            join_timeout=float(join_timeout),
            progress={str(k): int(v) for k, v in (progress or {}).items()},
            epoch=int(epoch),
            local_states=locals_,
        )
        logger.info("job %s created: %d parameters, mode %s", job, n_params, mode)
        return {"status": "OK", "installed_by": self.installed_by, "version": int(version)}

    def expect(
        self,
        job: str | None = None,
        names: list[str] | None = None,
        keys: list[str] | None = None,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        st = self._job(job)
        names = list(names or [])
        keys = list(keys or [None] * len(names))
        if len(keys) != len(names):
            raise PSError("ps_expect: names and keys differ in length")
        if epoch is not None and int(epoch) != st.epoch:
            st.epoch = int(epoch)
            st.progress = {}  # positions within an epoch; a new epoch starts from zero
        st.expected = {}
        if st.mode == "sync":
            for n, k in zip(names, keys, strict=True):
                if n not in st.participants:
                    st.expected[n] = k
                    if k is not None:
                        self.key_to_participant[k] = (st.job, n)
            st.expected_since = time.time()
        return {"status": "OK", "version": st.version}

    def join(
        self,
        job: str | None = None,
        name: str | None = None,
        key: str | None = None,
        worker: str | None = None,
        slot: str | None = None,
    ) -> dict[str, Any]:
        st = self._job(job)
        if not isinstance(name, str) or not name:
            raise PSError("ps_join needs a participant name")
        if st.failed:
            return self._reply(st, "failed")
        extra: dict[str, Any] = {}
        if st.mode == "sync" and slot is not None:
            # Sync runs are reproducible whichever worker runs a share: the share's local
            # optimizer state travels with it from one epoch's task to the next.
            extra["keep_state"] = True
            saved = st.local_states.get(str(slot))
            if saved is not None:
                extra["local_state"] = encode_opt_state(saved)
        clocks = [p.clock for p in st.participants.values()]
        start_clock = min(clocks) if clocks else 0
        st.participants[name] = _Participant(name, key, worker, clock=start_clock)
        st.expected.pop(name, None)
        if key is not None:
            self.key_to_participant[key] = (st.job, name)
        return self._reply(st, skip_batches=st.progress.get(name, 0), **extra)

    async def push(
        self,
        job: str | None = None,
        name: str | None = None,
        version: int | None = None,
        delta: Any = None,
        samples: int = 0,
        batches: int = 0,
        loss: float = float("nan"),
        timings: dict | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        st = self._job(job)
        if st.failed:
            return self._reply(st, "failed")
        p = st.participants.get(name) if isinstance(name, str) else None
        if p is None:
            raise PSError(f"participant {name!r} has not joined job {job!r} (or has left it)")
        if not isinstance(version, int) or not 0 <= version <= st.version:
            raise PSError(f"push for version {version!r}; the server is at version {st.version}")
        if not isinstance(samples, int) or samples < 0:
            raise PSError(f"samples must be an int >= 0, got {samples!r}")
        vec = decode_vector(delta, st.params.size, "delta")
        loss = float(loss)
        st.bytes_in += vec.nbytes
        if not np.isfinite(loss) or not np.isfinite(vec).all():
            what = "loss" if not np.isfinite(loss) else "update"
            self._fail(
                st,
                f"training diverged at round {st.version}: the {what} is not finite "
                f"(loss={loss}); lower the learning rate or add warm-up",
            )
            return self._reply(st, "failed")
        staleness = st.version - version
        st.pushes += 1
        st.samples += samples
        st.last_push = time.time()
        st.loss_ema = loss if st.loss_ema is None else 0.9 * st.loss_ema + 0.1 * loss
        st.staleness_hist[min(staleness, 64)] += 1
        p.pushes += 1
        p.samples += samples
        w = st.per_worker.setdefault(
            p.worker or "?",
            {"pushes": 0, "samples": 0, "read": 0.0, "compute": 0.0, "communicate": 0.0},
        )
        w["pushes"] += 1
        w["samples"] += samples
        for k in ("read", "compute", "communicate"):
            w[k] += float((timings or {}).get(k, 0.0))

        if st.mode == "sync":
            if staleness:
                # joined just as a round closed: its delta belongs to a finished round
                return self._reply(st, dropped=True)
            # a delta off the wire is this message's own buffer; an in-process caller's array
            # may change after the call, so that one is copied
            st.pending[name] = (vec if isinstance(delta, Serialized) else vec.copy(), samples, loss)
            st.progress[name] = st.progress.get(name, 0) + int(batches)
            self._maybe_close_round(st)
            ok = await self._wait(st, lambda: st.version > version, timeout)
        else:
            lr = st.lr()
            if st.damping and staleness:
                lr /= 1.0 + staleness
            st.optimizer.step(st.params, vec, lr)
            st.progress[name] = st.progress.get(name, 0) + int(batches)
            st.version += 1
            p.clock += 1
            self._after_update(st, loss, samples, 1)
            ok = True
            if st.mode == "ssp":

                def caught_up() -> bool:
                    clocks = [q.clock for q in st.participants.values()]
                    return not clocks or p.clock - min(clocks) <= st.staleness or name not in st.participants

                ok = await self._wait(st, caught_up, timeout)
        if not ok:
            return self._reply(st, "timeout", message=f"barrier not released within {timeout} s")
        if st.failed:
            return self._reply(st, "failed")
        return self._reply(st, staleness=staleness)

    def pull(self, job: str | None = None, model: bool = False) -> dict[str, Any]:
        return self._reply(self._job(job), model=bool(model))

    def leave(
        self,
        job: str | None = None,
        name: str | None = None,
        summary: dict | None = None,
        slot: str | None = None,
        local_state: dict | None = None,
    ) -> dict[str, Any]:
        st = self._job(job)
        if local_state is not None and slot is not None and st.mode == "sync":
            st.local_states[str(slot)] = decode_opt_state(local_state, st.params.size, "local_state")
        if summary is not None:
            if not isinstance(summary, dict) or len(summary) > 64:
                raise PSError("summary: expected a small dict of task statistics")
            # Kept here, not only as the task's result: a worker that dies after its task
            # finished takes the result with it, and Dask would rerun the (already pushed) task.
            st.summaries[str(name)] = summary
        self._drop_participant(st, str(name), "left")
        return {"status": "OK"}

    async def epoch_end(self, job: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
        """Wait until no participant is active or expected (every task of the epoch has left or
        been dropped), then reply with the model weights (the average if ``ema`` > 0): in sync
        mode, the epoch's final model.

        A participant whose task is rerun after a lost worker joins again after this may have
        replied; the reply's version lets the driver notice (it then validates on its own)."""
        st = self._job(job)
        ok = await self._wait(st, lambda: not st.participants and not st.expected, float(timeout))
        if not ok:
            return self._reply(st, "timeout", message=f"epoch not finished within {timeout} s")
        if st.failed:
            return self._reply(st, "failed")
        return self._reply(st, model=True)

    def take_summaries(self, job: str | None = None, names: list | None = None) -> dict[str, Any]:
        """Hand over (and forget) the summaries left by ``names``; missing ones are absent."""
        st = self._job(job)
        got = {str(n): st.summaries.pop(str(n)) for n in names or () if str(n) in st.summaries}
        return {"status": "OK", "summaries": got}

    def state(self, job: str | None = None) -> dict[str, Any]:
        st = self._job(job)
        return {
            "status": "OK",
            "params": encode_vector(self._snapshot(st)),
            "version": st.version,
            "optimizer": st.optimizer.config(),
            "optimizer_state": encode_opt_state(
                {"t": st.optimizer.t, "buffers": {k: v.copy() for k, v in st.optimizer.buffers.items()}}
            ),
            "progress": dict(st.progress),
            # sync: each share's local optimizer state as its last task left it (replaced, never
            # changed in place, when a task leaves: no copy needed)
            "local_states": {k: encode_opt_state(v) for k, v in st.local_states.items()},
            "failed": st.failed,
            "metrics": self._metrics(st),
        }

    def _metrics(self, st: _Job) -> dict[str, Any]:
        return {
            "job": st.job,
            "mode": st.mode,
            "n_params": int(st.params.size),
            "version": st.version,
            "epoch": st.epoch,
            "pushes": st.pushes,
            "samples": st.samples,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "loss": st.loss_ema,
            "lr": st.lr(),
            "participants": sorted(st.participants),
            "expected": sorted(st.expected),
            "staleness": {int(k): int(v) for k, v in sorted(st.staleness_hist.items())},
            "per_worker": {k: dict(v) for k, v in st.per_worker.items()},
            "created": st.created,
            "last_push": st.last_push,
            "checkpoint_time": st.checkpoint_time,
            "failed": st.failed,
            "closed": st.closed,
            "epochs": list(st.epochs),
        }

    def metrics(self, job: str | None = None, history: bool = False) -> dict[str, Any]:
        if job is not None:
            st = self._job(job)
            out = self._metrics(st)
            if history:
                out["history"] = [list(h) for h in st.history]
            return out
        return {
            "jobs": {name: self._metrics(st) for name, st in self.jobs.items()},
            "finished": list(self.finished),
        }

    def record(
        self, job: str | None = None, epoch: dict | None = None, checkpoint: bool = False
    ) -> dict[str, Any]:
        st = self._job(job)
        if epoch is not None:
            st.epochs.append(dict(epoch))
        if checkpoint:
            st.checkpoint_time = time.time()
        return {"status": "OK"}

    def close_job(self, job: str | None = None) -> dict[str, Any]:
        _check_job_id(job)
        st = self.jobs.pop(job, None)
        if st is None:
            return {"status": "OK", "existed": False}
        st.closed = True
        for name in list(st.participants):
            p = st.participants.pop(name)
            if p.key is not None:
                self.key_to_participant.pop(p.key, None)
        for key in st.expected.values():
            if key is not None:
                self.key_to_participant.pop(key, None)
        st.expected.clear()
        st.pending.clear()
        summary = self._metrics(st)
        summary["history"] = [list(h) for h in list(st.history)[-2000:]]
        self.finished.append(summary)
        st.notify()
        return {"status": "OK", "existed": True}

    def info(self) -> dict[str, Any]:
        return {
            "installed_by": self.installed_by,
            "jobs": sorted(self.jobs),
            "finished": [f["job"] for f in self.finished],
        }

    # -- scheduler plugin hooks: participants leave with their task or worker -------------------

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # Runs for every task transition on the scheduler: one dict lookup in the common case.
        if finish in _TASK_ALIVE:
            return
        entry = self.key_to_participant.pop(key, None)
        if entry is not None:
            st = self.jobs.get(entry[0])
            if st is not None:
                self._drop_participant(st, entry[1], f"task {start} -> {finish}")

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for st in self.jobs.values():
            for name, p in list(st.participants.items()):
                if p.worker == worker:
                    self._drop_participant(st, name, "worker removed")

    def remove_client(self, scheduler: Any, client: str) -> None:
        for job, st in list(self.jobs.items()):
            if st.owner is not None and st.owner == client:
                logger.info("job %s: its driver %s disconnected; closing it", job, client)
                self.close_job(job)


# --------------------------------------------------------------------------------------------
# User-facing handle
# --------------------------------------------------------------------------------------------


class ParameterServer:
    """Handle on one job of the parameter server, usable from the driver and inside tasks.

    On the driver it uses the given (or current) :class:`distributed.Client`; inside a task it
    talks to the scheduler through the worker's own connection, so tasks need no client.
    Every method has an ``async`` twin prefixed ``_``.
    """

    def __init__(self, job: str, client: Any = None) -> None:
        self.job = _check_job_id(job)
        self._client = client

    # connection: the driver's client, or the worker we run on
    def _endpoint(self) -> tuple[Any, Any]:
        if self._client is None:
            from distributed import get_worker

            try:
                w = get_worker()
            except ValueError:
                from distributed import get_client

                self._client = get_client()
            else:
                return w.scheduler, w.loop
        return self._client.scheduler, self._client.loop

    def call(self, route: str, **kwargs: Any) -> Any:
        """Call ``ps_<route>`` and wait for the answer."""
        from distributed.utils import sync

        rpc, loop = self._endpoint()
        return sync(loop, getattr(rpc, f"ps_{route}"), job=self.job, **kwargs)

    def call_soon(self, route: str, **kwargs: Any) -> Any:
        """Start ``ps_<route>`` on the event loop; returns a :class:`concurrent.futures.Future`."""
        rpc, loop = self._endpoint()
        coro = getattr(rpc, f"ps_{route}")(job=self.job, **kwargs)
        return asyncio.run_coroutine_threadsafe(coro, loop.asyncio_loop)

    @staticmethod
    def ensure_installed(client: Any) -> str:
        """Install the extension on the client's scheduler if no preload did; return who did."""

        def _installed(dask_scheduler: Any) -> str | None:
            ext = dask_scheduler.extensions.get(EXTENSION_NAME)
            return None if ext is None else ext.installed_by

        found = client.run_on_scheduler(_installed)
        if found is None:
            client.register_plugin(InstallParameterServer(), name="pipeline-ps-installer")
            found = client.run_on_scheduler(_installed)
        if found is None:  # pragma: no cover - defensive
            raise PSError("could not install the parameter server on the scheduler")
        return found

    def create(
        self,
        params: np.ndarray,
        *,
        mode: str = "sync",
        staleness: int = 2,
        damping: bool = False,
        aggregate: str = "sum",
        optimizer: dict | None = None,
        schedule: dict | None = None,
        version: int = 0,
        optimizer_state: dict | None = None,
        progress: dict | None = None,
        epoch: int = 0,
        join_timeout: float = 120.0,
        overwrite: bool = False,
        local_states: dict | None = None,
    ) -> dict[str, Any]:
        """Create the job on the scheduler. ``optimizer_state`` (server) and ``local_states``
        (sync: slot -> the share's local optimizer state ``{"t", "lr", "buffers"}``) continue a
        checkpointed run."""
        params = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        opt_state = encode_opt_state(optimizer_state) if optimizer_state else None
        locals_ = {str(k): encode_opt_state(v) for k, v in local_states.items()} if local_states else None
        client_id = getattr(self._client, "id", None)
        return self.call(
            "create",
            params=encode_vector(params),
            n_params=int(params.size),
            mode=mode,
            staleness=int(staleness),
            damping=bool(damping),
            aggregate=aggregate,
            optimizer=optimizer,
            schedule=schedule,
            version=int(version),
            optimizer_state=opt_state,
            progress=progress,
            epoch=int(epoch),
            local_states=locals_,
            join_timeout=float(join_timeout),
            overwrite=overwrite,
            client=client_id,
        )

    def pull(self, model: bool = False) -> tuple[np.ndarray, int]:
        """The weights to train from and their version; ``model``: the weights to validate
        (the average over rounds when the server keeps one, ``ema`` > 0)."""
        r = self.call("pull", model=model)
        return np.asarray(r["params"]), int(r["version"])

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs, plus ``model``: the weights to validate and save."""
        r = self.call("state")
        r["params"] = np.asarray(r["params"])
        buffers = {k: np.asarray(v) for k, v in r["optimizer_state"]["buffers"].items()}
        r["optimizer_state"]["buffers"] = buffers
        for loc in r.get("local_states", {}).values():
            loc["buffers"] = {k: np.asarray(v) for k, v in loc["buffers"].items()}
        averaged = r["optimizer"].get("ema") and r["optimizer_state"]["t"] and "average" in buffers
        r["model"] = buffers["average"] if averaged else r["params"]
        return r

    def metrics(self, history: bool = False) -> dict[str, Any]:
        return self.call("metrics", history=history)

    def close(self) -> None:
        self.call("close")


# --------------------------------------------------------------------------------------------
# Installation: plugin for clusters that were not preloaded, and the preload entry point
# --------------------------------------------------------------------------------------------


class InstallParameterServer(SchedulerPlugin):
    """Installs the extension on a running scheduler (``client.register_plugin``)."""

    name = "pipeline-ps-installer"

    async def start(self, scheduler: Any) -> None:
        if EXTENSION_NAME not in scheduler.extensions:
            ParameterServerExtension(scheduler, installed_by="plugin")


def _register_dashboard_page() -> bool:
    """Put /pipeline in the scheduler dashboard's table of pages; False where it is skipped."""
    # The scheduler reads its table of dashboard pages when it starts its HTTP server, after
    # importing its preloads: registering on import is what puts /pipeline on the dashboard.
    # A worker process never serves that dashboard: it skips the import of Bokeh and the
    # dashboard (~0.5 s of every fresh worker's first training task).
    from distributed.worker import Worker

    if Worker._instances:
        return False
    from pipeline.dashboard import register

    return register()


_register_dashboard_page()


def dask_setup(scheduler: Any) -> None:
    """Preload hook: ``dask scheduler --preload pipeline.ps`` installs the parameter server."""
    if EXTENSION_NAME not in scheduler.extensions:
        ParameterServerExtension(scheduler, installed_by="preload")
