"""The parameter server's scheduler extension: one route per request, state in :class:`Job`.

For a sharded job (:mod:`pipeline.ps.shard`) the scheduler keeps coordination only
(:class:`ShardMap`): where the shards are, which task is which participant, and it forwards the
drop of a participant whose task ended to every shard. A shard serves this class's routes over
jobs on its worker (:class:`pipeline.ps.shard.ShardExtension`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from pipeline.allocator import restore_mmap_threshold
from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot, rounds_after
from pipeline.ps.job import Job
from pipeline.ps.wire import check_job_id

logger = logging.getLogger("pipeline.ps")

EXTENSION_NAME = "pipeline_ps"
_FINISHED_KEPT = 8
_VIEW_REFRESH = 0.5  # seconds: how stale a sharded job's view may get before it is fetched again
_VIEW_TIMEOUT = 5.0  # seconds a shard has to answer for the view
_TASK_ALIVE = frozenset({"waiting", "queued", "no-worker", "processing"})

# scheduler route -> handler method of the extension
ROUTES: dict[str, str] = {
    "ps_create": "create",
    "ps_expect": "expect",
    "ps_join": "join",
    "ps_push": "push",
    "ps_exchange_keys": "exchange_keys",
    "ps_pull": "pull",
    "ps_leave": "leave",
    "ps_epoch_end": "epoch_end",
    "ps_close_round": "close_round",
    "ps_summaries": "take_summaries",
    "ps_state": "state",
    "ps_metrics": "metrics",
    "ps_record": "record",
    "ps_close": "finish",
    "ps_info": "info",
    "ps_place": "place",
    "ps_shards": "shards",
}


@dataclass
class ShardMap:
    """The scheduler's record of a sharded job: ``shards`` (address, lo, hi) cover the flat
    vector by range; ``tickets`` (participant -> the last ticket issued to it at join) let a
    forwarded drop spare a participant that joined again since (a retried task)."""

    job: str
    shards: list[tuple[str, int, int]]
    n_params: int
    owner: str | None
    workers: dict[str, str | None] = field(default_factory=dict)  # participant -> worker
    tickets: dict[str, int] = field(default_factory=dict)
    # the dashboard's view: the shards' metrics merged (merge_shard_metrics), as last fetched
    view: dict[str, Any] | None = None
    view_time: float = -1e9  # time.monotonic() of that fetch
    fetching: bool = False


def merge_shard_metrics(shards: Sequence[tuple[str, int, int]], ms: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One job's metrics from its shards' (``ps_metrics`` replies, in range order): the first
    shard's counters (every push reaches every shard, with the same loss), the whole vector's
    length, the lowest version, bytes summed, and a row per shard (``shards``)."""
    out = dict(ms[0])
    out["n_params"] = sum(int(m["n_params"]) for m in ms)
    out["version"] = min(int(m["version"]) for m in ms)
    out["bytes_in"] = sum(int(m["bytes_in"]) for m in ms)
    out["bytes_out"] = sum(int(m["bytes_out"]) for m in ms)
    out["failed"] = next((m["failed"] for m in ms if m.get("failed")), None)
    out["shards"] = [
        {"address": a, "lo": lo, "hi": hi, **{k: m[k] for k in ("version", "pushes", "bytes_in")}}
        for (a, lo, hi), m in zip(shards, ms, strict=True)
    ]
    return out


class ParameterServerExtension(SchedulerPlugin):
    """Scheduler extension holding the parameters of every training job on the cluster.

    Routes (all ``ps_*``):

    * ``ps_create``   -- create a job from initial parameters (or a checkpointed state)
    * ``ps_expect``   -- announce the participants of an epoch (sync mode waits for them)
    * ``ps_join``     -- a participant joins: returns weights, version, batches to skip
    * ``ps_push``     -- push a delta with its sample count; returns the new weights
    * ``ps_exchange_keys`` -- (secure aggregation) send the round's public key, get every
      participant's (the roster) once all have sent theirs: the server only relays them
    * ``ps_pull``     -- current weights and version
    * ``ps_leave``    -- a participant leaves (also done automatically when its task ends),
      optionally leaving its task's summary for the driver and (sync) its share's local
      optimizer state for the next epoch's task
    * ``ps_epoch_end``-- (sync) a participant that has left waits until every participant of
      the epoch has left, and gets the epoch's final weights (it validates them in its task)
    * ``ps_close_round``-- (sync; a federated round at its deadline) apply the pooled deltas
      if at least ``min_count`` arrived, else discard them; the round's participants are done
    * ``ps_summaries``-- the driver takes the summaries of finished participants
    * ``ps_state``    -- full state for a checkpoint (weights, optimizer state, counters)
    * ``ps_metrics``  -- counters of one job or all jobs (msgpack-able, for dashboards)
    * ``ps_record``   -- the driver records an epoch's validation metrics or a checkpoint
    * ``ps_close``    -- drop a job (its metrics stay visible for a while; a sharded job's
      are fetched from its shards first)
    * ``ps_info``     -- how the extension was installed and which jobs exist
    * ``ps_place``    -- (sharded job) the driver records where the job's shards are
    * ``ps_shards``   -- (sharded job) a participant (or the driver announcing an epoch) asks
      where the shards are and registers its task key, for the drop forwarded when it ends

    As a scheduler plugin it learns when a participant's task leaves the ``processing`` state
    or its worker is removed, and drops the participant from its job's round. It is also the
    dashboard's :class:`pipeline.jobview.JobSource` (:meth:`job_names`, :meth:`snapshot`,
    :meth:`running`), sharded jobs included: their view is fetched from the shards in the
    background (at most every ``_VIEW_REFRESH`` seconds while it is read) and shown as last
    fetched.
    """

    name = "pipeline-ps"

    def __init__(self, scheduler: Any, installed_by: str = "preload") -> None:
        # a scheduler started with a malloc tunable set: see pipeline/allocator.py
        restore_mmap_threshold()
        self.scheduler = scheduler
        self.installed_by = installed_by
        self.jobs: dict[str, Job] = {}
        self.finished: deque[dict[str, Any]] = deque(maxlen=_FINISHED_KEPT)
        self.key_to_participant: dict[str, tuple[str, str]] = {}  # task key -> (job, participant)
        self.sharded: dict[str, ShardMap] = {}  # job -> its shards (the job's state lives there)
        self._ticket = 0
        self._forwards: set[asyncio.Task] = set()
        scheduler.handlers.update({route: getattr(self, method) for route, method in ROUTES.items()})
        scheduler.extensions[EXTENSION_NAME] = self
        scheduler.add_plugin(self, name=self.name, idempotent=True)

    def _job(self, job: Any) -> Job:
        check_job_id(job)
        try:
            state = self.jobs[job]
        except KeyError:
            raise PSError(f"unknown job {job!r}: create it with ps_create first") from None
        if state.closed:
            raise PSError(f"job {job!r} is closed")
        return state

    # -- routes ------------------------------------------------------------------------------

    def create(
        self, job: str | None = None, overwrite: bool = False, client: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        check_job_id(job)
        if job in self.jobs and not overwrite and not self.jobs[job].closed:
            raise PSError(f"job {job!r} already exists on this scheduler; pick another job id")
        st = Job.create(job, owner=client, keys=self.key_to_participant, **kw)
        replaced = self.jobs.get(st.job)
        if replaced is not None:
            replaced.release_shm()  # its shared-memory segments go with it
        self.jobs[st.job] = st
        logger.info("job %s created: %d parameters, mode %s", job, st.params.size, st.mode)
        return {"status": "OK", "installed_by": self.installed_by, "version": st.version}

    # A route that changes a job first waits for a round it is combining off the event loop
    # (Job.settled): the job's state never changes under a running aggregation.

    async def expect(self, job: str | None = None, **kw: Any) -> dict[str, Any]:
        st = self._job(job)
        await st.settled()
        return st.expect(**kw)

    async def join(self, job: str | None = None, name: str | None = None, **kw: Any) -> dict[str, Any]:
        closed = self._closed(job)
        if closed is not None:
            return closed
        st = self._job(job)
        await st.settled()
        return st.join(name, **kw)

    async def push(
        self,
        job: str | None = None,
        name: str | None = None,
        version: int | None = None,
        delta: Any = None,
        **kw: Any,
    ) -> dict[str, Any]:
        closed = self._closed(job)
        return closed if closed is not None else await self._job(job).push(name, version, delta, **kw)

    async def exchange_keys(
        self, job: str | None = None, name: str | None = None, version: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        closed = self._closed(job)
        return closed if closed is not None else await self._job(job).exchange_keys(name, version, **kw)

    def _closed(self, job: Any) -> dict[str, Any] | None:
        """A task's message (join, push, key exchange, leave, epoch end) for a job its driver has
        closed: the "left" reply a task still running gets (it ends there; the scheduler logs no
        error), else None."""
        if job in self.jobs or not any(f.get("job") == job for f in self.finished):
            return None
        return {"status": "left", "version": -1, "message": f"job {job!r} is closed"}

    def pull(self, job: str | None = None, model: bool = False) -> dict[str, Any]:
        return self._job(job).reply(model=bool(model))

    async def leave(self, job: str | None = None, name: str | None = None, **kw: Any) -> dict[str, Any]:
        closed = self._closed(job)
        if closed is not None:
            return closed
        st = self._job(job)
        await st.settled()
        return st.leave(name, **kw)

    async def epoch_end(self, job: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
        """A participant that has left waits for the epoch's last round (the reply's version
        lets the driver notice a rerun task that joined again after it)."""
        closed = self._closed(job)
        return closed if closed is not None else await self._job(job).epoch_end(timeout)

    async def close_round(self, job: str | None = None, min_count: Any = 1, counts: Any = None) -> dict[str, Any]:
        return await self._job(job).close_round(min_count, counts)

    def take_summaries(self, job: str | None = None, names: list | None = None) -> dict[str, Any]:
        return self._job(job).take_summaries(names)

    async def state(self, job: str | None = None) -> dict[str, Any]:
        st = self._job(job)
        await st.settled()  # a checkpoint holds whole rounds
        return st.state()

    def metrics(self, job: str | None = None, history: bool = False) -> dict[str, Any]:
        if job is not None:
            return self._job(job).metrics(history=history)
        jobs = {name: st.metrics() for name, st in self.jobs.items()}
        return {"jobs": jobs, "finished": list(self.finished)}

    def record(self, job: str | None = None, epoch: dict | None = None, checkpoint: bool = False) -> dict[str, Any]:
        return self._job(job).record(epoch, checkpoint)

    async def finish(self, job: str | None = None) -> dict[str, Any]:
        """``ps_close``: :meth:`close_job`; a sharded job's final view is fetched from its shards (still open: the
        driver closes them after the scheduler) for the finished jobs the dashboard shows."""
        check_job_id(job)
        sm = self.sharded.get(job)
        if sm is not None:
            await self._fetch_view(sm, history=True)
        return self.close_job(job)

    def close_job(self, job: str | None = None) -> dict[str, Any]:
        check_job_id(job)
        sm = self.sharded.pop(job, None)
        if sm is not None:
            for key in [k for k, v in self.key_to_participant.items() if v[0] == job]:
                self.key_to_participant.pop(key, None)
            if sm.view is not None:
                self.finished.append({**sm.view, "closed": True, "participants": [], "expected": []})
        st = self.jobs.pop(job, None)
        if st is None:
            return {"status": "OK", "existed": False}
        self.finished.append(st.close())
        return {"status": "OK", "existed": True}

    def info(self, job: str | None = None) -> dict[str, Any]:
        finished = [f["job"] for f in self.finished]
        return {
            "installed_by": self.installed_by,
            "jobs": sorted(self.jobs),
            "finished": finished,
            "sharded": sorted(self.sharded),
        }

    # -- sharded jobs: coordination only -----------------------------------------------------

    def place(
        self,
        job: str | None = None,
        shards: list | None = None,
        n_params: int = 0,
        client: str | None = None,
    ) -> dict[str, Any]:
        """Record (or replace) where the shards of ``job`` are: ``[(address, lo, hi), ...]``
        covering ``[0, n_params)`` in order."""
        check_job_id(job)
        if job in self.jobs:
            raise PSError(f"job {job!r} already exists on this scheduler unsharded; pick another job id")
        cuts = [(str(a), int(lo), int(hi)) for a, lo, hi in shards or ()]
        ends = [0] + [hi for _, _, hi in cuts]
        if not cuts or any(lo != ends[i] or hi <= lo for i, (_, lo, hi) in enumerate(cuts)) or ends[-1] != n_params:
            raise PSError(f"shards of job {job!r} must cover [0, {n_params}) by consecutive ranges, got {cuts}")
        old = self.sharded.get(job)
        self.sharded[job] = ShardMap(job, cuts, int(n_params), client)
        if old is not None:  # the view of the shards it replaces stays until the new ones answer
            self.sharded[job].view = old.view
        if old is not None:  # replaced (shards restored): the old participants are gone
            for key in [k for k, v in self.key_to_participant.items() if v[0] == job]:
                self.key_to_participant.pop(key, None)
        logger.info("job %s placed on %d shards: %s", job, len(cuts), [a for a, _, _ in cuts])
        return {"status": "OK"}

    def shards(
        self,
        job: str | None = None,
        names: list | None = None,
        keys: list | None = None,
        worker: str | None = None,
    ) -> dict[str, Any]:
        """Where the shards of ``job`` are; registers ``names``' task ``keys`` (a participant
        joining, or the driver announcing an epoch) and issues the ticket its joins carry."""
        check_job_id(job)
        sm = self.sharded.get(job)
        if sm is None:
            raise PSError(f"job {job!r} is not a sharded job on this scheduler")
        names = [str(n) for n in names or ()]
        keys = list(keys or [None] * len(names))
        if len(keys) != len(names):
            raise PSError("ps_shards: names and keys differ in length")
        self._ticket += 1
        self._sharded_view(sm, history=False)  # keeps the dashboard's view fresh while the job trains
        for n, k in zip(names, keys, strict=True):
            if k is not None:
                self.key_to_participant[k] = (job, n)
            if worker is not None:
                sm.workers[n] = worker
                sm.tickets[n] = self._ticket
        return {"status": "OK", "shards": [list(c) for c in sm.shards], "n_params": sm.n_params, "ticket": self._ticket}

    def _forward(self, sm: ShardMap, route: str, **kw: Any) -> None:
        """Send ``route`` to every shard of ``sm`` in the background (errors only logged: a
        lost shard is the driver's to notice and restore)."""

        async def send(addr: str) -> None:
            try:
                await getattr(self.scheduler.rpc(addr), route)(job=sm.job, **kw)
            except Exception:
                logger.debug("job %s: %s to shard %s failed", sm.job, route, addr, exc_info=True)

        for addr, _, _ in sm.shards:
            task = asyncio.ensure_future(send(addr))
            self._forwards.add(task)
            task.add_done_callback(self._forwards.discard)

    def _drop_sharded(self, sm: ShardMap, name: str, why: str) -> None:
        sm.workers.pop(name, None)
        logger.debug("job %s: participant %s left (%s); forwarding to its shards", sm.job, name, why)
        self._forward(sm, "ps_drop", name=name, ticket=sm.tickets.get(name, 0), why=why)

    # -- scheduler plugin hooks: participants leave with their task or worker ----------------

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # Runs for every task transition on the scheduler: one dict lookup in the common case.
        if finish in _TASK_ALIVE:
            return
        entry = self.key_to_participant.pop(key, None)
        if entry is not None:
            st = self.jobs.get(entry[0])
            if st is not None:
                st.drop(entry[1], f"task {start} -> {finish}")
            elif entry[0] in self.sharded:
                self._drop_sharded(self.sharded[entry[0]], entry[1], f"task {start} -> {finish}")

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for st in self.jobs.values():
            for name, p in list(st.participants.items()):
                if p.worker == worker:
                    st.drop(name, "worker removed")
        for sm in self.sharded.values():
            for name in [n for n, w in sm.workers.items() if w == worker]:
                self._drop_sharded(sm, name, "worker removed")
            if any(addr == worker for addr, _, _ in sm.shards):
                logger.warning("job %s: the worker of its shard %s was removed", sm.job, worker)

    def remove_client(self, scheduler: Any, client: str) -> None:
        for job, st in list(self.jobs.items()):
            if st.owner is not None and st.owner == client:
                logger.info("job %s: its driver %s disconnected; closing it", job, client)
                self.close_job(job)
        for job, sm in list(self.sharded.items()):
            if sm.owner is not None and sm.owner == client:
                logger.info("job %s: its driver %s disconnected; closing its shards", job, client)
                self._forward(sm, "ps_close")
                self.close_job(job)

    # -- the dashboard's read-only view (pipeline.jobview.JobSource) -------------------------

    def job_names(self) -> list[str]:
        running = list(self.jobs) + list(self.sharded)
        return [f["job"] for f in self.finished if f["job"] not in running] + running

    def snapshot(self, job: str | None = None, since: int | None = None) -> JobSnapshot | None:
        if job is None:
            running = list(self.jobs) + list(self.sharded)
            if running:
                job = running[-1]
            elif self.finished:
                job = self.finished[-1]["job"]
            else:
                return None
        if job in self.jobs:
            return self.jobs[job].view(history=True, since=since)
        if job in self.sharded:
            snap = self._sharded_view(self.sharded[job], history=True)
            if snap is None or since is None:
                return snap
            return replace(snap, history=tuple(tuple(r) for r in rounds_after(snap.history, since)))
        for f in reversed(self.finished):
            if f["job"] == job:
                return JobSnapshot.from_metrics({**f, "history": rounds_after(f.get("history", ()), since)})
        return None

    def finished_jobs(self) -> list[JobSnapshot]:
        running = set(self.jobs) | set(self.sharded)
        last = {
            f["job"]: f for f in list(self.finished) if f["job"] not in running
        }  # a job resumed and finished again: its last run
        return [JobSnapshot.from_metrics({k: v for k, v in f.items() if k != "history"}) for f in last.values()]

    def running(self) -> list[JobSnapshot]:
        snaps = [st.view() for st in list(self.jobs.values())]
        for sm in list(self.sharded.values()):
            snap = self._sharded_view(sm, history=False)
            if snap is not None:
                snaps.append(snap)
        return snaps

    def _sharded_view(self, sm: ShardMap, history: bool) -> JobSnapshot | None:
        """A sharded job's view as last fetched (None before the first answer); a fetch starts
        in the background when it is older than ``_VIEW_REFRESH`` seconds or lacks the history
        asked for."""
        stale = time.monotonic() - sm.view_time > _VIEW_REFRESH
        if not sm.fetching and (stale or (history and sm.view is not None and "history" not in sm.view)):
            sm.fetching = True
            self._spawn(self._fetch_view(sm, history))
        if sm.view is None:
            return None
        view = sm.view if history else {k: v for k, v in sm.view.items() if k != "history"}
        return JobSnapshot.from_metrics(view)

    async def _fetch_view(self, sm: ShardMap, history: bool) -> None:
        """Fetch the shards' metrics (``history``: the first shard's round history too) into
        ``sm.view``; a shard that does not answer leaves the last view in place."""
        sm.fetching = True
        try:
            ms = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        self.scheduler.rpc(addr).ps_metrics(job=sm.job, history=history and i == 0)
                        for i, (addr, _, _) in enumerate(sm.shards)
                    )
                ),
                _VIEW_TIMEOUT,
            )
        except (OSError, TimeoutError, PSError):
            logger.debug("job %s: no view from its shards", sm.job, exc_info=True)
        else:
            view = merge_shard_metrics(sm.shards, ms)
            if not history and sm.view is not None and "history" in sm.view:
                view["history"] = sm.view["history"]  # kept until the next fetch with history
            sm.view, sm.view_time = view, time.monotonic()
        finally:
            sm.fetching = False

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background on the scheduler's event loop (from any thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.scheduler.loop.add_callback(self._spawn, coro)
            return
        task = loop.create_task(coro)
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)
