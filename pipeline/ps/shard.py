"""A sharded parameter server: the flat vector split by range over shards on reserved workers.

Layout
------
With ``ps_shards = k > 0`` a job's flat parameter vector ``[0, n)`` is cut into ``k``
consecutive ranges of (nearly) equal length (:func:`split_ranges`). Each range lives on a
*shard*: a :class:`pipeline.ps.job.Job` over that slice, held by :class:`ShardExtension` on a
Dask worker started with the ``ps-shard`` resource (``dask worker SCHED --resources
ps-shard=1``). A shard is the same ``Job`` on a shorter vector, so the rules of the sync,
async and ssp modes, the server optimizer (elementwise: each shard steps its own slice of
its state) and failure on non-finite values hold per shard unchanged.

Who does what
-------------
* The **driver** (:class:`ShardedParameterServer` on the client) picks ``k`` ``ps-shard``
  workers, creates the job's slice on each (``ps_create``), and records the shard map on the
  scheduler (``ps_place``). It announces epochs to every shard, and reads a checkpoint as
  each shard's state concatenated by range, all of one round (a shard a round's pushes have
  not all reached yet is asked again): the checkpoint format is the single server's, so
  a run resumes on any shard count, 0 (the in-scheduler server) included.
* The **scheduler** keeps coordination only (:class:`pipeline.ps.extension.ShardMap`): the
  shard map, and which task key is which participant. When a participant's task ends or its
  worker is removed it forwards ``ps_drop`` to every shard, so no barrier waits for the dead.
  For the dashboard and ``/metrics`` it fetches the shards' counters in the background (and
  once more when the job closes). No vector passes through it.
* A **participant** (a training task) asks the scheduler once for the map (``ps_shards``, at
  join), then joins, pushes and pulls its slices to every shard in parallel
  (``asyncio.gather`` over the worker's connection pool), each slice a zero-copy float32
  frame, or with ``compression`` a delta encoded for that slice alone
  (:func:`pipeline.ps.wire.compress_ranges`: each shard's job decodes a vector of its range's
  length); the weights it trains from are the shards' replies concatenated (with
  ``compress_replies``, each slice's change added to the slice it holds). Each shard keeps
  its own version; the participant pushes each slice with the version that shard last sent.
* A ``ps-shard`` worker never runs training or evaluation tasks of a job (they are restricted
  to the other workers), whether or not the job is sharded.

Failure
-------
A shard whose worker dies loses the rounds it held since the last checkpoint. The driver
notices (the address leaves the scheduler's worker list, or a request fails with
:class:`pipeline.errors.ShardLostError`), closes the job on the surviving shards, places a
new job on the ``ps-shard`` workers then present (waiting up to ``no_worker_timeout`` for
enough of them) from the last checkpoint (every shard from its slice of it: the surviving
shards are rolled back too, so that all slices are of one state) and trains again from there:
what is lost is the training since the last checkpoint (``checkpoint_seconds``, and every epoch
end), never the run.

On a worker, Dask's comm deserializes a request's frames before the handler sees them (a
worker runs the tasks the scheduler sends it anyway); :func:`pipeline.ps.wire.decode_vector`
then checks dtype and length as on the scheduler.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import Serialize

from pipeline.errors import PSError, ShardLostError, TrainingError
from pipeline.ps.client import dask_endpoint
from pipeline.ps.extension import ParameterServerExtension, merge_shard_metrics
from pipeline.ps.wire import check_job_id, encode_opt_state, encode_vector

logger = logging.getLogger("pipeline.ps")

SHARD_RESOURCE = "ps-shard"
SHARD_EXTENSION = "pipeline_ps_shard"
_FINISHED_KEPT = 8
_TORN_RETRY = 0.01  # seconds between fetches of the shards' states while they are at different rounds
# seconds a sync participant that joined between two shards' rounds waits for the shards behind to
# close theirs (their last pushes are in flight: milliseconds), before it trains from them as they are
_ALIGN_WAIT = 2.0

# worker route -> handler method of the shard extension (the scheduler's routes over jobs,
# plus ps_drop: a participant's task ended, forwarded by the scheduler)
SHARD_ROUTES: dict[str, str] = {
    "ps_create": "create",
    "ps_expect": "expect",
    "ps_join": "join",
    "ps_push": "push",
    "ps_pull": "pull",
    "ps_leave": "leave",
    "ps_drop": "drop",
    "ps_epoch_end": "epoch_end",
    "ps_summaries": "take_summaries",
    "ps_state": "state",
    "ps_metrics": "metrics",
    "ps_record": "record",
    "ps_close": "close_job",
    "ps_info": "info",
}


def split_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``k`` consecutive ranges whose lengths differ by at most one."""
    if not 0 < k <= n:
        raise PSError(f"cannot split {n} parameters over {k} shards")
    cuts = [n * i // k for i in range(k + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


def shard_workers(info: Mapping[str, Any]) -> list[str]:
    """The addresses (sorted) of the workers in ``scheduler_info()`` that carry ``ps-shard``."""
    workers = info.get("workers") or {}
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(SHARD_RESOURCE, 0) > 0)


class ShardExtension(ParameterServerExtension):
    """The shards one ``ps-shard`` worker holds: one :class:`Job` per job over its slice,
    served on the worker's own routes (listed in :data:`SHARD_ROUTES`) by the scheduler
    extension's handlers over jobs. The scheduler's plugin hooks are never called here: the
    scheduler forwards ``ps_drop`` instead."""

    def __init__(self, worker: Any) -> None:  # no scheduler: not the parent's __init__
        self.worker = worker
        self.installed_by = "shard"
        self.jobs = {}
        self.finished = deque(maxlen=_FINISHED_KEPT)
        self.key_to_participant = {}  # unused on a shard: the scheduler sees the tasks
        self.sharded = {}
        self.tickets: dict[tuple[str, str], int] = {}  # (job, participant) -> ticket of its join
        worker.handlers.update({route: getattr(self, method) for route, method in SHARD_ROUTES.items()})
        worker.extensions[SHARD_EXTENSION] = self

    async def join(self, job: str | None = None, name: str | None = None, ticket: int = 0, **kw: Any) -> dict[str, Any]:
        closed = self._closed(job)
        if closed is not None:
            return closed
        st = self._job(job)
        await st.settled()
        reply = st.join(name, **kw)
        self.tickets[(str(job), str(name))] = int(ticket)
        return reply

    def drop(self, job: str | None = None, name: str | None = None, ticket: int = 0, why: str = "") -> dict:
        """The scheduler forwards that ``name``'s task ended: drop it unless it joined again
        since (a retried task carries a later ticket)."""
        st = self.jobs.get(str(job))
        if st is None or st.closed:
            return {"status": "OK"}
        if self.tickets.get((str(job), str(name)), 0) <= int(ticket):
            st.drop(str(name), why or "task ended")
        return {"status": "OK"}

    def info(self, job: str | None = None) -> dict[str, Any]:
        return {"installed_by": self.installed_by, "jobs": sorted(self.jobs), "worker": self.worker.address}

    def close_job(self, job: str | None = None) -> dict[str, Any]:
        self.tickets = {k: v for k, v in self.tickets.items() if k[0] != job}
        return super().close_job(job)


def install_shard(worker: Any) -> ShardExtension:
    """The worker's shard extension, created if it has none yet."""
    ext = worker.extensions.get(SHARD_EXTENSION)
    if ext is None:
        ext = ShardExtension(worker)
    return ext


class InstallShard(WorkerPlugin):
    """Installs :class:`ShardExtension` on every worker carrying the ``ps-shard`` resource
    (``client.register_plugin``; workers that join later get it too). Registering it again
    keeps the shards a worker holds: teardown leaves them in place."""

    name = "pipeline-ps-shard"

    def setup(self, worker: Any) -> None:
        if worker.state.total_resources.get(SHARD_RESOURCE, 0) > 0:
            install_shard(worker)

    def teardown(self, worker: Any) -> None:
        pass


# --------------------------------------------------------------------------------------------
# the handle: one job over its shards
# --------------------------------------------------------------------------------------------


def _slice_state(state: Mapping[str, Any] | None, lo: int, hi: int) -> dict[str, Any] | None:
    """An optimizer state ``{"t", ["lr"], "buffers"}`` restricted to ``[lo, hi)``, for the wire."""
    if not state:
        return None
    buffers = {k: np.asarray(v, dtype=np.float32)[lo:hi] for k, v in (state.get("buffers") or {}).items()}
    return encode_opt_state({**state, "buffers": buffers})


def _cat_state(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Optimizer states of consecutive slices as one (``t`` and ``lr`` from the first)."""
    first = parts[0]
    names = list(first.get("buffers") or {})
    out = {k: v for k, v in first.items() if k != "buffers"}
    out["buffers"] = {k: np.concatenate([np.asarray(p["buffers"][k], dtype=np.float32) for p in parts]) for k in names}
    return out


def _torn(states: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the shards' ``ps_state`` replies are of different moments of the job: another
    round, other batches pushed, or another step of a share's local state on some shard."""

    def moment(r: Mapping[str, Any]) -> tuple:
        steps = {s: int(v.get("t", 0)) for s, v in (r.get("local_states") or {}).items()}
        return int(r["version"]), dict(r.get("progress") or {}), steps

    first = moment(states[0])
    return any(moment(r) != first for r in states[1:])


def _status(replies: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first reply that is not OK, a failed one first."""
    for want in ("failed", "timeout", "left"):
        for r in replies:
            if r.get("status") == want:
                return r
    return None


class ShardedParameterServer:
    """Handle on one sharded job: the methods of :class:`pipeline.ps.ParameterServer`, each
    request sent to every shard in parallel and the replies joined by range.

    ``n_shards`` is used by :meth:`create` (the driver); a handle inside a task learns the
    shard map from the scheduler when it joins (or at its first request)."""

    def __init__(self, job: str, client: Any = None, n_shards: int = 0) -> None:
        self.job = check_job_id(job)
        self.n_shards = int(n_shards)
        self._client = client
        self._deferred = False
        # shared with :attr:`soon`'s twin (mutated in place): the map and each shard's version
        self._map: list[tuple[str, int, int]] = []
        self._versions: list[int] = []

    @property
    def soon(self) -> ShardedParameterServer:
        """This handle with methods that return a future of the reply."""
        twin = copy.copy(self)
        twin._deferred = True
        return twin

    @property
    def shards(self) -> list[tuple[str, int, int]]:
        """The shard map ``[(address, lo, hi), ...]`` (empty until created or joined)."""
        return list(self._map)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Each shard's range ``[(lo, hi), ...]`` of the flat vector, in shard order: what a
        compressed push encodes one by one (:func:`pipeline.ps.wire.compress_ranges`)."""
        return [(lo, hi) for _, lo, hi in self._map]

    # -- plumbing ----------------------------------------------------------------------------

    def _endpoint(self) -> tuple[Any, Any, Any]:
        """(scheduler rpc, connection pool, loop) of the worker we run on, or of the client."""
        self._client, via = dask_endpoint(self._client)
        return via.scheduler, via.rpc, via.loop

    def _run(self, coro_fn: Any, *args: Any, **kwargs: Any) -> Any:
        sched, pool, loop = self._endpoint()
        coro = coro_fn(sched, pool, *args, **kwargs)
        if self._deferred:
            return asyncio.run_coroutine_threadsafe(coro, loop.asyncio_loop)
        from distributed.utils import sync

        async def run() -> Any:
            return await coro

        return sync(loop, run)

    async def _locate(self, sched: Any, **register: Any) -> int:
        """Fetch the shard map from the scheduler (registering ``names``/``keys``); the ticket."""
        r = await sched.ps_shards(job=self.job, **register)
        shards = [(str(a), int(lo), int(hi)) for a, lo, hi in r["shards"]]
        if shards != self._map:
            self._map[:] = shards
            self._versions[:] = [0] * len(shards)
        return int(r["ticket"])

    async def _call(self, pool: Any, addr: str, route: str, **kw: Any) -> dict:
        """``ps_<route>`` on the shard at ``addr``; :class:`ShardLostError` if it is unreachable."""
        try:
            return await getattr(pool(addr), f"ps_{route}")(job=self.job, **kw)
        except OSError as exc:
            raise ShardLostError(
                f"parameter-server shard {addr} of job {self.job} is unreachable ({type(exc).__name__}: {exc})"
            ) from None

    async def _fan(self, pool: Any, route: str, kws: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
        """``ps_<route>`` on every shard at once (``kws``: each shard's own arguments)."""
        kws = kws if kws is not None else [{}] * len(self._map)
        calls = (self._call(pool, a, route, **kw) for (a, _, _), kw in zip(self._map, kws, strict=True))
        return list(await asyncio.gather(*calls))

    def _join_replies(self, replies: Sequence[Mapping[str, Any]], model: bool = False) -> dict[str, Any]:
        """One reply from the shards' replies: the weights concatenated, the lowest version
        (each shard's own kept for the next push)."""
        bad = _status(replies)
        if bad is not None and bad["status"] == "left":
            return dict(bad)  # the participant left (a shard dropped it): no weights, the task ends
        if not model:
            self._versions[:] = [int(r["version"]) for r in replies]
        out = dict(replies[0])
        if bad is not None:
            out.update(status=bad["status"], message=bad.get("message"))
        if not model and any("rdelta" in r for r in replies):
            # compressed replies (``compress_replies``): each shard's change of its slice of the
            # participants' weights since the version of that slice the participant holds, or that
            # slice whole (a shard the participant did not push to at the previous version). The
            # shards take a round each at its own moment: a participant that joined between two
            # shards' rounds holds their slices at different versions (``since``, one per shard)
            out.pop("params", None)
            out["since"] = [int(r["since"]) if "rdelta" in r else None for r in replies]
            out["rdelta"] = [("rdelta", r["rdelta"]) if "rdelta" in r else ("params", r["params"]) for r in replies]
            out["ranges"] = self.ranges
        else:
            out["params"] = np.concatenate([np.asarray(r["params"], dtype=np.float32) for r in replies])
        out["version"] = min(int(r["version"]) for r in replies)
        out["shard_versions"] = [int(r["version"]) for r in replies]
        if all(r.get("local_state") for r in replies):
            out["local_state"] = _cat_state([r["local_state"] for r in replies])
        return out

    def adopt_versions(self, reply: Mapping[str, Any]) -> None:
        """Take each shard's version from a push reply that another handle received (a push
        summed for several tasks, :class:`pipeline.worker.PushGroup`): this handle's next push
        is then for the round the shards are in."""
        versions = reply.get("shard_versions")
        if versions is not None and len(versions) == len(self._versions):
            self._versions[:] = [int(v) for v in versions]

    # -- routes ------------------------------------------------------------------------------

    def create(self, params: np.ndarray, **kw: Any) -> dict[str, Any]:
        """Create the job's slice on ``n_shards`` ``ps-shard`` workers and record the map on
        the scheduler. Arguments as :meth:`pipeline.ps.ParameterServer.create`."""
        params = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        if self.n_shards > params.size:  # a shard holds a range of at least one parameter
            raise TrainingError(
                f"ps_shards = {self.n_shards} is more than the model's {params.size} parameters; set ps_shards "
                f"to at most {params.size} (0 = the parameter server in the scheduler)"
            )
        client = self._client
        client.register_plugin(InstallShard(), name=InstallShard.name)
        workers = shard_workers(client.scheduler_info(n_workers=-1))
        if len(workers) < self.n_shards:
            raise PSError(
                f"ps_shards = {self.n_shards} but the cluster has {len(workers)} worker(s) with the "
                f"'{SHARD_RESOURCE}' resource; start more with `dask worker SCHEDULER --resources {SHARD_RESOURCE}=1`"
            )
        ranges = split_ranges(int(params.size), self.n_shards)
        self._map[:] = [(a, lo, hi) for a, (lo, hi) in zip(workers[: self.n_shards], ranges, strict=True)]
        self._versions[:] = [int(kw.get("version", 0))] * self.n_shards
        opt_state = kw.pop("optimizer_state", None)
        local_states = kw.pop("local_states", None) or {}
        overwrite = kw.pop("overwrite", False)
        view = kw.pop("reply_view", None)  # compressed replies: the participants' weights, sliced too
        view = None if view is None else np.ascontiguousarray(view, dtype=np.float32).reshape(-1)
        kws = []
        for _, lo, hi in self._map:
            locals_ = {str(s): _slice_state(v, lo, hi) for s, v in local_states.items()} or None
            kws.append(
                {
                    **kw,
                    **({} if view is None else {"reply_view": encode_vector(view[lo:hi])}),
                    "params": encode_vector(params[lo:hi]),
                    "n_params": hi - lo,
                    "optimizer_state": _slice_state(opt_state, lo, hi),
                    "local_states": locals_,
                    "overwrite": bool(overwrite),
                    "client": client.id,
                }
            )

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            await self._fan(pool, "create", kws)
            return await sched.ps_place(job=self.job, shards=self._map, n_params=int(params.size), client=client.id)

        return self._run(request)

    def expect(
        self, names: list[str], keys: list[str | None], epoch: int | None = None, sampling_rate: float | None = None
    ) -> dict[str, Any]:
        """Register the epoch's task keys on the scheduler and announce them to every shard."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            await self._locate(sched, names=list(names), keys=list(keys))
            kw = {"names": list(names), "keys": list(keys), "epoch": epoch}
            if sampling_rate is not None:
                kw["sampling_rate"] = float(sampling_rate)
            rs = await self._fan(pool, "expect", [kw] * len(self._map))
            return rs[0]

        return self._run(request)

    def join(self, name: str, key: str | None = None, worker: str | None = None, slot: str | None = None) -> Any:
        """Ask the scheduler for the map (registering ``key``), then join every shard; in sync
        mode at one version on every shard (:meth:`_align`)."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            ticket = await self._locate(sched, names=[name], keys=[key], worker=worker)
            kw = {"name": name, "key": key, "worker": worker, "slot": slot, "ticket": ticket}
            replies = await self._fan(pool, "join", [kw] * len(self._map))
            return self._join_replies(await self._align(pool, kw, replies))

        return self._run(request)

    async def _align(self, pool: Any, kw: Mapping[str, Any], replies: list[dict]) -> list[dict]:
        """Sync rounds close on each shard when the round's last push reaches it, so a
        participant that joins between two shards' closings (a task run again after its worker
        died, or one that joined late) would hold their slices at different versions: its
        pushes would then land in different rounds on different shards for as long as it
        trains, the shards' versions would stay apart, and no checkpoint could join their
        states. The shards behind are left again, so that their open round closes without this
        participant, and joined once they are at the others' version (at most
        :data:`_ALIGN_WAIT` seconds; after that it is joined there as it is)."""
        if any(r.get("status") != "OK" or r.get("mode") != "sync" for r in replies):
            return replies
        top = max(int(r["version"]) for r in replies)
        behind = [i for i, r in enumerate(replies) if int(r["version"]) < top]
        if not behind:
            return replies
        name = kw["name"]

        def one(i: int, route: str, **args: Any) -> Any:
            return self._call(pool, self._map[i][0], route, **args)

        await asyncio.gather(*(one(i, "leave", name=name) for i in behind))
        deadline = time.monotonic() + _ALIGN_WAIT

        async def caught_up(i: int) -> None:
            while time.monotonic() < deadline and int((await one(i, "metrics"))["version"]) < top:
                await asyncio.sleep(_TORN_RETRY)

        await asyncio.gather(*(caught_up(i) for i in behind))
        again = await asyncio.gather(*(one(i, "join", **kw) for i in behind))
        replies = list(replies)
        for i, r in zip(behind, again, strict=True):
            replies[i] = r
        return replies

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
        also: Sequence[Mapping[str, Any]] | None = None,
    ) -> Any:
        """Push ``delta``'s slices, each with the version its shard last sent (``version``,
        the lowest of those, is what the caller saw). ``delta``: the float32 vector, or a list
        of one compressed delta per shard in shard order (:func:`pipeline.ps.wire.compress_ranges`
        over :attr:`ranges`). ``also``: the co-senders of a summed push, sent to every shard
        (their timings to the first only, as the sender's)."""
        if isinstance(delta, Serialize):  # the worker's pusher wraps a float32 delta for the wire
            delta = delta.data
        if not isinstance(delta, list):
            delta = np.ascontiguousarray(delta, dtype=np.float32).reshape(-1)
        base = {"samples": int(samples), "batches": int(batches), "loss": float(loss), "timeout": float(timeout)}

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            if not self._map:
                await self._locate(sched)
            if isinstance(delta, list) and len(delta) != len(self._map):
                raise PSError(
                    f"a push of {len(delta)} compressed slices to job {self.job}, which has {len(self._map)} shards"
                )
            kws = [
                {
                    **base,
                    "name": name,
                    "version": v,
                    "delta": delta[i] if isinstance(delta, list) else encode_vector(delta[lo:hi]),
                    "timings": dict(timings or {}) if i == 0 else {},
                    **(
                        {"also": [{**a, "timings": a.get("timings", {}) if i == 0 else {}} for a in also]}
                        if also
                        else {}
                    ),
                }
                for i, ((_, lo, hi), v) in enumerate(zip(self._map, self._versions, strict=True))
            ]
            return self._join_replies(await self._fan(pool, "push", kws))

        return self._run(request)

    def pull(self, model: bool = False) -> Any:
        """The weights (``model``: the weights to validate) and their (lowest) version."""

        async def request(sched: Any, pool: Any) -> Any:
            if not self._map:
                await self._locate(sched)
            r = self._join_replies(await self._fan(pool, "pull", [{"model": model}] * len(self._map)), model=True)
            return r["params"], int(r["version"])

        return self._run(request)

    def leave(
        self,
        name: str,
        summary: dict | None = None,
        slot: str | None = None,
        local_state: Mapping[str, Any] | None = None,
    ) -> Any:
        """Leave every shard; the summary stays with the first, the local state is sliced."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            if not self._map:
                await self._locate(sched)
            kws = [
                {
                    "name": name,
                    "summary": summary if i == 0 else None,
                    "slot": slot,
                    "local_state": None if local_state is None else _slice_state(local_state, lo, hi),
                }
                for i, (_, lo, hi) in enumerate(self._map)
            ]
            return (await self._fan(pool, "leave", kws))[0]

        return self._run(request)

    def epoch_end(self, timeout: float = 600.0) -> Any:
        """Wait until every participant of the epoch has left every shard: the model weights."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            if not self._map:
                await self._locate(sched)
            rs = await self._fan(pool, "epoch_end", [{"timeout": float(timeout)}] * len(self._map))
            return self._join_replies(rs, model=True)

        return self._run(request)

    def summaries(self, names: list[str]) -> dict[str, dict]:
        """The summaries left by participants ``names`` (with the first shard; taken)."""

        async def request(sched: Any, pool: Any) -> dict[str, dict]:
            r = await self._fan(pool, "summaries", [{"names": list(names)}] + [{"names": []}] * (len(self._map) - 1))
            return r[0]["summaries"]

        return self._run(request)

    def state(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every shard's state joined by range: the single server's checkpoint layout.

        The shards take a round's pushes (and a participant's leave) each at its own moment, so
        one fetch can find a round applied on some shards and not yet on the others: joined,
        those would be weights of no round, and a resume would skip batches whose update part
        of the vector never got. The states are fetched again until every shard is at the same
        round with the same progress (a failed job as it is). Shards that still disagree after
        ``timeout`` seconds never will (a participant died with its push delivered to some of
        them only): :class:`ShardLostError`, so that the driver restores the job from its last
        checkpoint."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            rs = await self._fan(pool, "state")
            while _torn(rs) and not any(r.get("failed") for r in rs):
                if time.monotonic() > deadline:
                    raise ShardLostError(
                        f"the shards of job {self.job} disagree on the rounds applied after {timeout:.0f} s "
                        f"(versions {[int(r['version']) for r in rs]}): a push reached only some of them"
                    )
                await asyncio.sleep(_TORN_RETRY)
                rs = await self._fan(pool, "state")
            out = dict(rs[0])
            out["params"] = np.concatenate([np.asarray(r["params"], dtype=np.float32) for r in rs])
            out["version"] = min(int(r["version"]) for r in rs)
            out["optimizer_state"] = _cat_state([r["optimizer_state"] for r in rs])
            slots = set.intersection(*(set(r.get("local_states") or {}) for r in rs))
            out["local_states"] = {s: _cat_state([r["local_states"][s] for r in rs]) for s in sorted(slots)}
            out["failed"] = next((r["failed"] for r in rs if r.get("failed")), None)
            out.pop("reply_view", None)  # the first shard's slice: the whole, or none
            if all(r.get("reply_view") is not None for r in rs):
                out["reply_view"] = np.concatenate([np.asarray(r["reply_view"], dtype=np.float32) for r in rs])
            out["metrics"] = self._merge_metrics([r["metrics"] for r in rs])
            buffers = out["optimizer_state"]["buffers"]
            averaged = out["optimizer"].get("ema") and out["optimizer_state"]["t"] and "average" in buffers
            out["model"] = buffers["average"] if averaged else out["params"]
            return out

        return self._run(request)

    def _merge_metrics(self, ms: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The shards' metrics as one job's (:func:`pipeline.ps.extension.merge_shard_metrics`)."""
        return merge_shard_metrics(self._map, ms)

    def metrics(self, history: bool = False) -> dict[str, Any]:
        """The job's counters (``history``: with the round history of the first shard)."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            ms = await self._fan(pool, "metrics", [{"history": history}] + [{}] * (len(self._map) - 1))
            return self._merge_metrics(ms)

        return self._run(request)

    def record(self, epoch: Mapping[str, Any] | None = None, checkpoint: bool = False) -> Any:
        """Record an epoch's metrics or a checkpoint (with the first shard; a record is for
        display only, so an unreachable shard is not an error here)."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            kw = {"epoch": None if epoch is None else dict(epoch), "checkpoint": checkpoint}
            try:
                return await pool(self._map[0][0]).ps_record(job=self.job, **kw)
            except OSError:
                logger.debug("job %s: record not delivered to shard %s", self.job, self._map[0][0])
                return {"status": "OK"}

        return self._run(request)

    def close(self) -> None:
        """Drop the job's map from the scheduler (which first fetches the job's final metrics
        from the shards, for the dashboard's finished jobs), then the job from every reachable
        shard."""

        async def request(sched: Any, pool: Any) -> None:
            async def one(addr: str) -> None:
                try:
                    await asyncio.wait_for(pool(addr).ps_close(job=self.job), 10)
                except (OSError, TimeoutError):
                    logger.debug("job %s: shard %s unreachable at close", self.job, addr)

            try:
                await sched.ps_close(job=self.job)
            finally:
                await asyncio.gather(*(one(a) for a, _, _ in self._map))

        self._run(request)

    def ping(self, timeout: float = 5.0) -> None:
        """Raise :class:`ShardLostError` if a shard does not answer within ``timeout``."""

        async def request(sched: Any, pool: Any) -> None:
            async def one(addr: str) -> None:
                try:
                    await asyncio.wait_for(pool(addr).ps_info(job=self.job), timeout)
                except (OSError, TimeoutError):
                    raise ShardLostError(f"parameter-server shard {addr} of job {self.job} does not answer") from None

            await asyncio.gather(*(one(a) for a, _, _ in self._map))

        self._run(request)

    def info(self) -> dict[str, Any]:
        """How the scheduler's extension was installed and which jobs it coordinates."""

        async def request(sched: Any, pool: Any) -> dict[str, Any]:
            return await sched.ps_info(job=self.job)

        return self._run(request)
