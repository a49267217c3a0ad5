"""The parameter server's scheduler extension: one route per request, state in :class:`Job`."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from pipeline.allocator import restore_mmap_threshold
from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot
from pipeline.ps.job import Job
from pipeline.ps.wire import check_job_id

logger = logging.getLogger("pipeline.ps")

EXTENSION_NAME = "pipeline_ps"
_FINISHED_KEPT = 8
_TASK_ALIVE = frozenset({"waiting", "queued", "no-worker", "processing"})

# scheduler route -> handler method of the extension
ROUTES: dict[str, str] = {
    "ps_create": "create",
    "ps_expect": "expect",
    "ps_join": "join",
    "ps_push": "push",
    "ps_pull": "pull",
    "ps_leave": "leave",
    "ps_epoch_end": "epoch_end",
    "ps_close_round": "close_round",
    "ps_summaries": "take_summaries",
    "ps_state": "state",
    "ps_metrics": "metrics",
    "ps_record": "record",
    "ps_close": "close_job",
    "ps_info": "info",
}


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
    * ``ps_close_round``-- (sync; a federated round at its deadline) apply the pooled deltas
      if at least ``min_count`` arrived, else discard them; the round's participants are done
    * ``ps_summaries``-- the driver takes the summaries of finished participants
    * ``ps_state``    -- full state for a checkpoint (weights, optimizer state, counters)
    * ``ps_metrics``  -- counters of one job or all jobs (msgpack-able, for dashboards)
    * ``ps_record``   -- the driver records an epoch's validation metrics or a checkpoint
    * ``ps_close``    -- drop a job (its metrics stay visible for a while)
    * ``ps_info``     -- how the extension was installed and which jobs exist

    As a scheduler plugin it learns when a participant's task leaves the ``processing`` state
    or its worker is removed, and drops the participant from its job's round. It is also the
    dashboard's :class:`pipeline.jobview.JobSource` (:meth:`job_names`, :meth:`snapshot`,
    :meth:`running`).
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
        self.jobs[st.job] = st
        logger.info("job %s created: %d parameters, mode %s", job, st.params.size, st.mode)
        return {"status": "OK", "installed_by": self.installed_by, "version": st.version}

    def expect(self, job: str | None = None, **kw: Any) -> dict[str, Any]:
        return self._job(job).expect(**kw)

    def join(self, job: str | None = None, name: str | None = None, **kw: Any) -> dict[str, Any]:
        return self._job(job).join(name, **kw)

    async def push(
        self,
        job: str | None = None,
        name: str | None = None,
        version: int | None = None,
        delta: Any = None,
        **kw: Any,
    ) -> dict[str, Any]:
        return await self._job(job).push(name, version, delta, **kw)

    def pull(self, job: str | None = None, model: bool = False) -> dict[str, Any]:
        return self._job(job).reply(model=bool(model))

    def leave(self, job: str | None = None, name: str | None = None, **kw: Any) -> dict[str, Any]:
        return self._job(job).leave(name, **kw)

    async def epoch_end(self, job: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
        """A participant that has left waits for the epoch's last round (the reply's version
        lets the driver notice a rerun task that joined again after it)."""
        return await self._job(job).epoch_end(timeout)

    def close_round(self, job: str | None = None, min_count: Any = 1) -> dict[str, Any]:
        return self._job(job).close_round(min_count)

    def take_summaries(self, job: str | None = None, names: list | None = None) -> dict[str, Any]:
        return self._job(job).take_summaries(names)

    def state(self, job: str | None = None) -> dict[str, Any]:
        return self._job(job).state()

    def metrics(self, job: str | None = None, history: bool = False) -> dict[str, Any]:
        if job is not None:
            return self._job(job).metrics(history=history)
        jobs = {name: st.metrics() for name, st in self.jobs.items()}
        return {"jobs": jobs, "finished": list(self.finished)}

    def record(self, job: str | None = None, epoch: dict | None = None, checkpoint: bool = False) -> dict[str, Any]:
        return self._job(job).record(epoch, checkpoint)

    def close_job(self, job: str | None = None) -> dict[str, Any]:
        check_job_id(job)
        st = self.jobs.pop(job, None)
        if st is None:
            return {"status": "OK", "existed": False}
        self.finished.append(st.close())
        return {"status": "OK", "existed": True}

    def info(self, job: str | None = None) -> dict[str, Any]:
        finished = [f["job"] for f in self.finished]
        return {"installed_by": self.installed_by, "jobs": sorted(self.jobs), "finished": finished}

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

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for st in self.jobs.values():
            for name, p in list(st.participants.items()):
                if p.worker == worker:
                    st.drop(name, "worker removed")

    def remove_client(self, scheduler: Any, client: str) -> None:
        for job, st in list(self.jobs.items()):
            if st.owner is not None and st.owner == client:
                logger.info("job %s: its driver %s disconnected; closing it", job, client)
                self.close_job(job)

    # -- the dashboard's read-only view (pipeline.jobview.JobSource) -------------------------

    def job_names(self) -> list[str]:
        return [f["job"] for f in self.finished if f["job"] not in self.jobs] + list(self.jobs)

    def snapshot(self, job: str | None = None) -> JobSnapshot | None:
        if job is None:
            if self.jobs:
                job = list(self.jobs)[-1]
            elif self.finished:
                job = self.finished[-1]["job"]
            else:
                return None
        if job in self.jobs:
            return self.jobs[job].view(history=True)
        for f in reversed(self.finished):
            if f["job"] == job:
                return JobSnapshot.from_metrics(f)
        return None

    def running(self) -> list[JobSnapshot]:
        return [st.view() for st in list(self.jobs.values())]
