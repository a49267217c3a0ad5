"""The user-facing handle on one parameter-server job: one method per route."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pipeline.errors import PSError
from pipeline.ps.extension import EXTENSION_NAME
from pipeline.ps.install import InstallParameterServer
from pipeline.ps.wire import TOPK_FRACTION, check_job_id, encode_opt_state, encode_vector

# The reply of a route (a dict with "status"), or from the ``soon`` view a
# concurrent.futures.Future of it
Reply = Any


def dask_endpoint(client: Any) -> tuple[Any, Any]:
    """``(client, via)``: ``via`` is what requests go through (its ``scheduler`` rpc, ``rpc``
    pool and ``loop``): ``client`` when given, else the worker this runs on, else the current
    client (then returned as ``client`` too, to be kept)."""
    if client is None:
        from distributed import get_worker

        try:
            return None, get_worker()
        except ValueError:
            from distributed import get_client

            client = get_client()
    return client, client


class ParameterServer:
    """Handle on one job of the parameter server, usable from the driver and inside tasks.

    On the driver it uses the given (or current) :class:`distributed.Client`; inside a task it
    talks to the scheduler through the worker's own connection, so tasks need no client.
    Each route ``ps_<name>`` has one method here; :attr:`soon` is the same handle whose
    methods return a :class:`concurrent.futures.Future` of the reply instead of waiting for it
    (a task overlaps a push with its next steps, or waits outside its worker's thread slot).
    :meth:`call` and :meth:`call_soon` reach a route by name, arguments passed through as
    given (to test the server's checks).
    """

    def __init__(self, job: str, client: Any = None) -> None:
        self.job = check_job_id(job)
        self._client = client
        self._deferred = False

    @property
    def soon(self) -> ParameterServer:
        """This handle with methods that return a future of the reply."""
        twin = copy.copy(self)
        twin._deferred = True
        return twin

    # connection: the driver's client, or the worker we run on
    def _endpoint(self) -> tuple[Any, Any]:
        self._client, via = dask_endpoint(self._client)
        return via.scheduler, via.loop

    def _send(self, route: str, post: Callable[[dict], Any] | None = None, **kwargs: Any) -> Any:
        """Call ``ps_<route>``: the reply (``post`` applied), or its future from :attr:`soon`."""
        rpc, loop = self._endpoint()

        async def request() -> Any:
            reply = await getattr(rpc, f"ps_{route}")(job=self.job, **kwargs)
            return reply if post is None else post(reply)

        if self._deferred:
            return asyncio.run_coroutine_threadsafe(request(), loop.asyncio_loop)
        from distributed.utils import sync

        return sync(loop, request)

    def call(self, route: str, **kwargs: Any) -> Any:
        """Call ``ps_<route>`` with ``kwargs`` as given and wait for the answer."""
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

    # -- routes, in the extension's order ----------------------------------------------------

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
        aggregator: str = "mean",
        trim_fraction: float = 0.1,
        krum_f: int = 1,
        buffer_size: int = 0,
        buffer: dict | None = None,
        compression: str = "none",
        topk_fraction: float = TOPK_FRACTION,
        privacy: dict | None = None,
        reply_codec: str = "none",
        reply_view: Any = None,
    ) -> Reply:
        """Create the job on the scheduler. ``optimizer_state`` (server) and ``local_states``
        (sync: slot -> the share's local optimizer state ``{"t", "lr", "buffers"}``) continue a
        checkpointed run. ``aggregator``, ``trim_fraction``, ``krum_f``: how a round's deltas
        combine (:func:`pipeline.fedagg.aggregate`); ``buffer_size`` > 0: buffered async rounds,
        ``buffer``: the deltas they had buffered (``state()["buffer"]`` of a checkpointed job).
        ``compression`` (with ``topk_fraction``): the codec every delta arrives in
        (:func:`pipeline.ps.wire.compress`); other encodings are refused. ``privacy``: differential
        privacy and secure aggregation of the updates (:func:`pipeline.privacy.check_privacy`).
        ``reply_codec`` (sync): push replies carry the change of the weights in that codec
        (:meth:`pipeline.ps.job.Job.reply`); ``reply_view``: a checkpoint's ``reply_view``."""
        params = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        opt_state = encode_opt_state(optimizer_state) if optimizer_state else None
        locals_ = {str(k): encode_opt_state(v) for k, v in local_states.items()} if local_states else None
        client_id = getattr(self._client, "id", None)
        return self._send(
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
            privacy=privacy,
            aggregator=aggregator,
            trim_fraction=float(trim_fraction),
            krum_f=int(krum_f),
            buffer_size=int(buffer_size),
            buffer=_encode_buffer(buffer),
            compression=compression,
            topk_fraction=float(topk_fraction),
            reply_codec=reply_codec,
            **({} if reply_view is None else {"reply_view": encode_vector(np.asarray(reply_view, dtype=np.float32))}),
        )

    def expect(
        self, names: list[str], keys: list[str | None], epoch: int | None = None, sampling_rate: float | None = None
    ) -> Reply:
        """Announce the participants (and their task keys) of ``epoch``; ``sampling_rate``: the
        share of the candidates the round sampled (central DP accounts the round at it)."""
        extra = {} if sampling_rate is None else {"sampling_rate": float(sampling_rate)}
        return self._send("expect", names=list(names), keys=list(keys), epoch=epoch, **extra)

    def join(
        self,
        name: str,
        key: str | None = None,
        worker: str | None = None,
        slot: str | None = None,
        shm: bool = False,
    ) -> Reply:
        """Join as participant ``name`` (task ``key`` on ``worker``; ``slot``: its sync share):
        the weights, their version, the batches to skip and (sync) the share's local state;
        ``shm``: with the shared-memory segments to use if this process shares the server's
        host (:mod:`pipeline.ps.shm`)."""
        extra = {"shm": True} if shm else {}
        return self._send("join", name=name, key=key, worker=worker, slot=slot, **extra)

    def push(
        self,
        name: str,
        version: int,
        delta: Any,
        samples: int,
        batches: int,
        loss: float,
        timings: Mapping[str, float] | None = None,
        timeout: float = 600.0,
        wait: bool = True,
        attempt: int | None = None,
        also: list[dict[str, Any]] | None = None,
    ) -> Reply:
        """Push ``delta`` (a float32 vector, or one already wrapped by ``encode_vector`` or
        encoded by :func:`pipeline.ps.wire.compress` in the job's codec) computed from the
        weights of ``version``; the reply carries the weights to go on from (float32).
        ``wait=False`` (sync): the delta is pooled for the round and the reply comes at once,
        without weights (a federated client pushes once and leaves). Secure aggregation:
        ``delta`` is the masked uint32 vector seen as float32, for the round's key-exchange
        ``attempt``. ``also``: the co-senders of a summed push (:meth:`pipeline.ps.job.Job.push`)."""
        wire = encode_vector(delta) if isinstance(delta, np.ndarray) else delta
        extra: dict[str, Any] = {} if attempt is None else {"attempt": int(attempt)}
        if also:
            extra["also"] = list(also)
        return self._send(
            "push",
            name=name,
            version=int(version),
            delta=wire,
            samples=int(samples),
            batches=int(batches),
            loss=float(loss),
            timings=dict(timings or {}),
            timeout=float(timeout),
            wait=bool(wait),
            **extra,
        )

    def exchange_keys(self, name: str, version: int, public_key: bytes, timeout: float = 600.0) -> Reply:
        """Secure aggregation: send this round's X25519 ``public_key``; the reply carries the
        roster (name -> public key) and the round's ``attempt`` once every participant has
        sent its key (or ``dropped`` with fresh weights, ``stop`` when the budget is spent)."""
        return self._send(
            "exchange_keys", name=name, version=int(version), public_key=bytes(public_key), timeout=float(timeout)
        )

    def pull(self, model: bool = False) -> tuple[np.ndarray, int]:
        """The weights to train from and their version; ``model``: the weights to validate
        (the average over rounds when the server keeps one, ``ema`` > 0)."""
        return self._send("pull", lambda r: (np.asarray(r["params"]), int(r["version"])), model=model)

    def leave(
        self,
        name: str,
        summary: dict | None = None,
        slot: str | None = None,
        local_state: Mapping[str, Any] | None = None,
    ) -> Reply:
        """Leave, optionally with the task's ``summary`` and (sync) the share's local optimizer
        state ``{"t", "lr", "buffers": {name: vector}}`` for the next epoch's task."""
        encoded = None if local_state is None else encode_opt_state(local_state)
        return self._send("leave", name=name, summary=summary, slot=slot, local_state=encoded)

    def epoch_end(self, timeout: float = 600.0) -> Reply:
        """Wait until every participant of the epoch has left: the epoch's model weights."""
        return self._send("epoch_end", timeout=float(timeout))

    def close_round(self, min_count: int, counts: dict[str, int] | None = None) -> Reply:
        """Close the open sync round: apply its pooled deltas if at least ``min_count`` arrived
        (a participant named in ``counts`` counting as that many), else discard them;
        ``{"status": "applied" | "discarded", "version", "arrived"}``."""
        if counts:
            return self._send(
                "close_round", min_count=int(min_count), counts={str(k): int(v) for k, v in counts.items()}
            )
        return self._send("close_round", min_count=int(min_count))

    def summaries(self, names: list[str]) -> dict[str, dict]:
        """The summaries left by participants ``names`` (taken: the server forgets them)."""
        return self._send("summaries", lambda r: r["summaries"], names=list(names))

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs, plus ``model``: the weights to validate and save."""
        return self._send("state", _arrays_of_state)

    def metrics(self, history: bool = False) -> dict[str, Any]:
        """The job's counters (``history``: with the round history)."""
        return self._send("metrics", history=history)

    def record(self, epoch: Mapping[str, Any] | None = None, checkpoint: bool = False) -> Reply:
        """Record an epoch's metrics (shown on the dashboard) or that a checkpoint was saved."""
        return self._send("record", epoch=None if epoch is None else dict(epoch), checkpoint=checkpoint)

    def close(self) -> None:
        """Drop the job from the server (its metrics stay visible for a while)."""
        self._send("close")

    def info(self) -> dict[str, Any]:
        """How the extension was installed and which jobs it holds."""
        return self._send("info")


def _arrays_of_state(r: dict[str, Any]) -> dict[str, Any]:
    r["params"] = np.asarray(r["params"])
    buffers = {k: np.asarray(v) for k, v in r["optimizer_state"]["buffers"].items()}
    r["optimizer_state"]["buffers"] = buffers
    for loc in r.get("local_states", {}).values():
        loc["buffers"] = {k: np.asarray(v) for k, v in loc["buffers"].items()}
    if r.get("buffer"):
        r["buffer"]["deltas"] = [np.asarray(d) for d in r["buffer"]["deltas"]]
    if r.get("reply_view") is not None:
        r["reply_view"] = np.asarray(r["reply_view"])
    averaged = r["optimizer"].get("ema") and r["optimizer_state"]["t"] and "average" in buffers
    r["model"] = buffers["average"] if averaged else r["params"]
    return r


def _encode_buffer(buffer: dict | None) -> dict | None:
    """``state()["buffer"]`` with its deltas wrapped for the wire (None when empty)."""
    if not buffer or not buffer.get("deltas"):
        return None
    deltas = [np.ascontiguousarray(d, dtype=np.float32).reshape(-1) for d in buffer["deltas"]]
    return {
        "deltas": [encode_vector(d) for d in deltas],
        "samples": [int(n) for n in buffer["samples"]],
        "losses": [float(x) for x in buffer["losses"]],
        "staleness": [int(n) for n in buffer["staleness"]],
    }
