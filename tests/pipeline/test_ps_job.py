"""The parameter server's job without a scheduler: rounds, leaving, staleness, async updates."""

from __future__ import annotations

import asyncio
import operator
import time

import numpy as np
import pytest

from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot
from pipeline.ps.job import Job
from pipeline.ps.wire import decode_vector

N = 4


def _job(mode: str, **kw: object) -> Job:
    kw.setdefault("optimizer", {"name": "sgd", "lr": 1.0})
    return Job.create("j", np.zeros(N, np.float32), N, mode=mode, **kw)


def _weights(reply: dict) -> np.ndarray:
    return decode_vector(reply["params"], N).copy()


async def _pending(task: asyncio.Task) -> bool:
    """True if ``task`` is still waiting after the event loop had time to run it."""
    await asyncio.sleep(0.05)
    return not task.done()


def test_sync_round_waits_for_every_participant_and_weights_by_samples() -> None:
    async def main() -> None:
        job = _job("sync", aggregate="mean")
        job.join("a", key="task-a")
        job.join("b", key="task-b")
        assert job.keys == {"task-a": ("j", "a"), "task-b": ("j", "b")}
        first = asyncio.ensure_future(job.push("a", 0, np.full(N, 1, np.float32), samples=30, batches=3, loss=1.0))
        assert await _pending(first)  # the barrier holds until "b" has pushed
        assert job.version == 0
        second = await job.push("b", 0, np.full(N, 3, np.float32), samples=10, batches=1, loss=3.0)
        r1 = await asyncio.wait_for(first, 1)
        assert r1["version"] == second["version"] == job.version == 1
        # server SGD lr 1 on the sample-weighted mean delta (30 * 1 + 10 * 3) / 40 = 1.5
        np.testing.assert_allclose(_weights(r1), np.full(N, -1.5))
        np.testing.assert_array_equal(_weights(r1), _weights(second))
        assert job.progress == {"a": 3, "b": 1}
        assert job.history[-1][1:] == (1, 2.0, 40, 2)

    asyncio.run(main())


def test_a_participant_leaving_releases_the_round_without_it() -> None:
    async def main() -> None:
        job = _job("sync")
        job.join("stays", key="k1")
        job.join("goes", key="k2")
        push = asyncio.ensure_future(job.push("stays", 0, np.ones(N, np.float32), samples=5, batches=1, loss=0.5))
        assert await _pending(push)
        job.leave("goes", summary={"rows": 7})
        r = await asyncio.wait_for(push, 1)
        assert r["status"] == "OK" and r["version"] == 1
        np.testing.assert_array_equal(_weights(r), -np.ones(N, np.float32))  # only its delta
        assert "goes" not in job.participants and "k2" not in job.keys
        assert job.take_summaries(["goes", "never"]) == {
            "status": "OK",
            "summaries": {"goes": {"rows": 7}},
        }
        assert job.take_summaries(["goes"])["summaries"] == {}  # handed over once
        # a push still in flight from it is answered "left" (the worker's task ends; the
        # scheduler logs no error), and changes nothing; a name that never joined is an error
        r = await job.push("goes", 1, np.ones(N, np.float32), samples=1)
        assert r["status"] == "left" and "left job" in r["message"] and "(left)" in r["message"]
        assert job.version == 1 and "goes" not in job.participants and not job.pending
        with pytest.raises(PSError, match="has not joined"):
            await job.push("never", 1, np.ones(N, np.float32), samples=1)
        job.join("goes", key="k3")  # a rerun of the task joins again: it is a participant
        assert "goes" not in job.left

    asyncio.run(main())


def test_a_push_without_wait_pools_the_delta_and_the_round_applies_when_all_pushed() -> None:
    async def main() -> None:
        job = _job("sync", aggregate="mean")
        job.expect(["r0-a", "r0-b"], ["ka", "kb"], epoch=0)
        job.join("r0-a", key="ka")
        r = await asyncio.wait_for(job.push("r0-a", 0, np.full(N, 2, np.float32), samples=10, loss=1.0, wait=False), 1)
        assert r["status"] == "OK" and r["pooled"] and "params" not in r and job.version == 0
        job.leave("r0-a")
        assert job.version == 0  # "r0-b" is still expected
        job.join("r0-b", key="kb")
        await asyncio.wait_for(job.push("r0-b", 0, np.full(N, 4, np.float32), samples=30, loss=1.0, wait=False), 1)
        assert job.version == 1  # every expected participant pushed: the round applied itself
        np.testing.assert_allclose(job.params, np.full(N, -3.5))  # (10 * 2 + 30 * 4) / 40

    asyncio.run(main())


def test_close_round_applies_what_arrived_or_discards_it_below_min_count() -> None:
    async def main() -> None:
        job = _job("sync", aggregate="mean")
        job.expect(["r0-a", "r0-b", "r0-c"], ["ka", "kb", "kc"], epoch=0)
        job.join("r0-a", key="ka")
        job.join("r0-b", key="kb")
        await job.push("r0-a", 0, np.full(N, 1, np.float32), samples=5, loss=1.0, wait=False)
        r = await job.close_round(2)  # one of the two needed: discarded
        assert r == {"status": "discarded", "version": 0, "arrived": ["r0-a"], "last_applied": [], "message": None}
        assert not job.pending and not job.participants and not job.expected and not job.keys
        np.testing.assert_array_equal(job.params, np.zeros(N))
        with pytest.raises(PSError, match="has not joined"):  # a late push of the closed round
            await job.push("r0-b", 0, np.ones(N, np.float32), samples=1, loss=1.0, wait=False)
        job.expect(["r1-a", "r1-b", "r1-c"], ["ka1", "kb1", "kc1"], epoch=1)
        for n in ("r1-a", "r1-b"):
            job.join(n)
            await job.push(n, 0, np.full(N, 2, np.float32), samples=5, loss=1.0, wait=False)
        r = await job.close_round(2)  # "r1-c" never came: the round applies with the two
        assert r["status"] == "applied" and r["version"] == 1 and r["arrived"] == r["last_applied"] == ["r1-a", "r1-b"]
        np.testing.assert_allclose(job.params, np.full(N, -2.0))
        r = await job.close_round(1)  # nothing pooled: nothing applied; the last round's names stay
        assert r["status"] == "discarded" and r["last_applied"] == ["r1-a", "r1-b"]
        with pytest.raises(PSError, match="min_count must be an int >= 1"):
            await job.close_round(0)
        with pytest.raises(PSError, match="for sync jobs"):
            await _job("async").close_round(1)

    asyncio.run(main())


def test_an_announced_participant_is_waited_for_until_it_joins_or_times_out() -> None:
    async def main() -> None:
        job = _job("sync", join_timeout=0.0)
        job.expect(names=["early", "late"], keys=[None, "task-late"], epoch=0)
        assert job.keys == {"task-late": ("j", "late")}
        job.join("early")
        push = asyncio.ensure_future(job.push("early", 0, np.ones(N, np.float32), samples=1, batches=1, loss=0.1))
        assert await _pending(push)  # "late" was announced: the round waits for it
        job.expire_expected()  # what the waiters do when their wait times out
        r = await asyncio.wait_for(push, 1)
        assert r["version"] == 1 and not job.expected and not job.keys

    asyncio.run(main())


def test_ssp_lets_a_participant_run_at_most_staleness_pushes_ahead() -> None:
    async def main() -> None:
        job = _job("ssp", staleness=1)
        job.join("fast")
        job.join("slow")
        one = np.ones(N, np.float32)
        r = await asyncio.wait_for(job.push("fast", 0, one, samples=1, batches=1, loss=0.0), 1)
        assert r["version"] == 1  # one ahead of "slow": allowed
        ahead = asyncio.ensure_future(job.push("fast", 1, one, samples=1, batches=1, loss=0.0))
        assert await _pending(ahead)  # two ahead: waits, its update already applied
        assert job.version == 2 and job.participants["fast"].clock == 2
        r_slow = await asyncio.wait_for(job.push("slow", 0, one, samples=1, batches=1, loss=0.0), 1)
        assert r_slow["staleness"] == 2
        r = await asyncio.wait_for(ahead, 1)
        assert r["status"] == "OK" and r["version"] == 3
        assert job.staleness_hist == {0: 2, 2: 1}

    asyncio.run(main())


def test_async_applies_each_delta_at_once_damped_by_its_staleness() -> None:
    async def main() -> None:
        job = _job("async", damping=True)
        job.join("a", worker="w1")
        job.join("b", worker="w2")
        timings = {"read": 0.5, "compute": 1.0}
        r = await job.push("a", 0, np.full(N, 2, np.float32), samples=3, batches=1, loss=1.0, timings=timings)
        assert r["version"] == 1 and r["staleness"] == 0
        np.testing.assert_array_equal(_weights(r), np.full(N, -2, np.float32))
        # "b" pushes from version 0, one round stale: its step is halved (lr / (1 + 1))
        r = await job.push("b", 0, np.full(N, 2, np.float32), samples=4, batches=1, loss=3.0)
        assert r["version"] == 2 and r["staleness"] == 1
        np.testing.assert_array_equal(_weights(r), np.full(N, -3, np.float32))
        assert (job.pushes, job.samples) == (2, 7)
        assert job.per_worker["w1"]["read"] == 0.5 and job.per_worker["w2"]["pushes"] == 1

    asyncio.run(main())


def test_a_non_finite_push_fails_the_job_and_wakes_every_waiter() -> None:
    async def main() -> None:
        job = _job("sync")
        job.join("a")
        job.join("b")
        waiting = asyncio.ensure_future(job.push("a", 0, np.ones(N, np.float32), samples=1, batches=1, loss=0.1))
        assert await _pending(waiting)
        bad = np.full(N, np.nan, np.float32)
        r = await job.push("b", 0, bad, samples=1, batches=1, loss=0.1)
        assert r["status"] == "failed" and "not finite" in r["message"]
        assert (await asyncio.wait_for(waiting, 1))["status"] == "failed"
        assert job.join("c")["status"] == "failed"
        np.testing.assert_array_equal(job.params, np.zeros(N, np.float32))  # nothing applied

    asyncio.run(main())


def test_close_round_counts_a_folded_delta_as_the_clients_it_stands_for() -> None:
    async def main() -> None:
        job = _job("sync", aggregate="mean")
        for rnd, (min_count, status) in enumerate(((4, "applied"), (5, "discarded"))):
            job.expect([f"r{rnd}-g0", f"r{rnd}-g1"], [None, None], epoch=rnd)
            job.join(f"r{rnd}-g0")
            await job.push(f"r{rnd}-g0", job.version, np.full(N, 1, np.float32), samples=9, loss=1.0, wait=False)
            # one task's delta for 4 clients: 4 responses, not 1
            r = await job.close_round(min_count, {f"r{rnd}-g0": 4, f"r{rnd}-g1": 3})
            assert r["status"] == status and r["arrived"] == [f"r{rnd}-g0"]
        np.testing.assert_allclose(job.params, np.full(N, -1.0))
        with pytest.raises(PSError, match="counts must map participant names to ints >= 1"):
            await job.close_round(1, {"r2-g0": 0})
        with pytest.raises(PSError, match="counts must map participant names to ints >= 1"):
            await job.close_round(1, ["r2-g0"])

    asyncio.run(main())


def test_epoch_end_waits_for_the_last_participant_and_close_releases_everyone() -> None:
    async def main() -> None:
        job = _job("sync")
        job.join("a", key="ka")
        job.join("b", key="kb")
        end = asyncio.ensure_future(job.epoch_end(timeout=5))
        job.leave("a")
        assert await _pending(end)
        job.leave("b")
        assert (await asyncio.wait_for(end, 1))["status"] == "OK"
        job.join("c", key="kc")
        blocked = asyncio.ensure_future(job.epoch_end(timeout=5))
        assert await _pending(blocked)
        final = job.close()
        await asyncio.wait_for(blocked, 1)
        assert final["closed"] and final["participants"] == [] and not job.keys

    asyncio.run(main())


def test_view_is_a_read_only_snapshot() -> None:
    async def main() -> None:
        job = _job("async")
        job.join("a", worker="w")
        await job.push("a", 0, np.ones(N, np.float32), samples=2, batches=1, loss=0.5)
        job.record(epoch={"epoch": 0, "val_loss": 0.25}, checkpoint=True)
        snap = job.view(history=True)
        assert isinstance(snap, JobSnapshot)
        assert (snap.version, snap.samples, snap.participants, snap.loss) == (1, 2, ("a",), 0.5)
        assert snap.epochs[0]["val_loss"] == 0.25 and len(snap.history) == 1
        assert snap.checkpoint_time <= time.time() and snap.mean_staleness() == 0.0
        with pytest.raises(AttributeError):
            setattr(snap, "version", 5)  # noqa: B010 - a frozen dataclass refuses it
        with pytest.raises(TypeError):
            operator.setitem(snap.per_worker["w"], "pushes", 9)
        await job.push("a", 1, np.ones(N, np.float32), samples=2, batches=1, loss=0.5)
        assert snap.version == 1  # a copy: later rounds do not show through

    asyncio.run(main())


def test_create_refuses_what_it_cannot_mean() -> None:
    with pytest.raises(PSError, match="unknown mode"):
        _job("bsp")
    with pytest.raises(PSError, match="staleness"):
        _job("ssp", staleness=-1)
    with pytest.raises(PSError, match=r"expected float32 of shape \(4,\)"):
        Job.create("j", np.zeros(N + 1, np.float32), N)
    with pytest.raises(PSError, match="sync jobs only"):
        _job("async", local_states={"s0": {"t": 1, "buffers": {}}})


def test_per_site_evaluation_reaches_the_snapshot_and_prometheus() -> None:
    pytest.importorskip("prometheus_client")
    from pipeline import dashboard

    async def main() -> None:
        job = _job("sync", aggregate="mean")
        assert job.view().sites == {} and job.view().site_mean is None
        sites = {"a": {"loss": 0.5, "metric": 0.8, "n": 10}, "b": {"loss": 0.7, "metric": 0.6, "n": 30}}
        job.record(epoch={"epoch": 0, "val_loss": 0.65, "sites": sites, "site_mean": 0.65, "site_worst_decile": 0.6})
        job.record(epoch={"epoch": 1, "train_loss": 0.6})  # a round without evaluation keeps the last one
        snap = job.view()
        assert dict(snap.sites["b"]) == sites["b"] and snap.site_mean == 0.65 and snap.site_worst_decile == 0.6
        assert "sites (accuracy / R^2): a 0.8000" in dashboard._summary_html(snap)

        class Source:
            def running(self) -> list:
                return [snap]

            def finished_jobs(self) -> list:
                return []

        holder, source = type("Scheduler", (), {})(), Source()
        dashboard.watch(holder, source)
        try:
            fams = {f.name: f for f in dashboard.TrainingCollector().collect()}
        finally:
            dashboard._sources[:] = [(s, j) for s, j in dashboard._sources if s() is not holder]
        # this job's series (schedulers of other tests in this process export their jobs too)
        got = {s.labels["site"]: s.value for s in fams["pipeline_site_loss"].samples if s.labels["job"] == snap.job}
        assert got == {"a": 0.5, "b": 0.7}
        worst = [s.value for s in fams["pipeline_site_metric_worst_decile"].samples if s.labels["job"] == snap.job]
        assert worst == [0.6]

    asyncio.run(main())


def _summed(deltas: dict[str, tuple[np.ndarray, int, float]], names: list[str]) -> np.ndarray:
    """What a worker's push group sends for ``names``: their sample-weighted mean, in name order."""
    total = sum(deltas[n][1] for n in names)
    acc = np.zeros(N, np.float32)
    for n in names:
        acc += deltas[n][0] * np.float32(deltas[n][1] / total)
    return acc


def test_a_summed_push_pools_its_co_senders_as_if_each_had_pushed() -> None:
    deltas = {
        "a": (np.full(N, 1, np.float32), 30, 1.0),
        "b": (np.full(N, 3, np.float32), 10, 3.0),
        "c": (np.arange(N, dtype=np.float32), 20, 2.5),
    }

    async def main() -> None:
        solo = _job("sync")  # aggregate = "sum": the weighted mean times the participants
        for n in deltas:
            solo.join(n, key=f"k{n}")
        alone = await asyncio.gather(
            *(solo.push(n, 0, d, samples=s, batches=2, loss=x) for n, (d, s, x) in deltas.items())
        )

        job = _job("sync")
        for n in deltas:
            job.join(n, key=f"k{n}")
        co_b = {"name": "b", "samples": 10, "batches": 2, "loss": 3.0, "timings": {"compute": 0.5}}
        first = asyncio.ensure_future(
            job.push("a", 0, _summed(deltas, ["a", "b"]), samples=30, batches=2, loss=1.0, also=[co_b])
        )
        assert await _pending(first)  # "c" has not pushed; "b" has (inside "a"'s push)
        assert job.covered == {"b": "a"}
        c = await job.push("c", 0, deltas["c"][0], samples=20, batches=2, loss=2.5)
        r = await asyncio.wait_for(first, 1)
        assert r["version"] == c["version"] == 1
        # the same round as three pushes, up to the order of the float sums
        np.testing.assert_allclose(_weights(r), _weights(alone[0]), rtol=1e-6)
        assert not np.array_equal(_weights(r), np.zeros(N))
        assert job.history[-1][1:] == solo.history[-1][1:] == (1, 2.1666666666666665, 60, 3)
        assert job.progress == solo.progress == {"a": 2, "b": 2, "c": 2}
        assert (job.pushes, job.summed, solo.summed) == (3, 1, 0)
        assert job.last_applied == ["a", "b", "c"]
        assert job.per_worker["?"]["compute"] == 0.5
        assert not job.covered and not job.pending

    asyncio.run(main())


def test_a_summed_push_is_refused_whole_when_a_co_sender_cannot_be_in_the_round() -> None:
    async def main() -> None:
        job = _job("sync")
        for n in "abc":
            job.join(n, key=f"k{n}")
        d = np.ones(N, np.float32)
        pushed_c = asyncio.ensure_future(job.push("c", 0, d, samples=1, loss=1.0))
        await asyncio.sleep(0.01)
        for also, why in (
            ([{"name": "z", "samples": 1}], "co-sender 'z' is not another active participant"),
            ([{"name": "a", "samples": 1}], "co-sender 'a' is not another active participant"),
            ([{"name": "b", "samples": 1}, {"name": "b", "samples": 1}], "co-sender 'b' is not another"),
            ([{"name": "c", "samples": 1}], "co-sender 'c' already pushed in round 0"),
            ([{"name": "b", "samples": -1}], "samples and batches must be ints >= 0"),
        ):
            with pytest.raises(PSError, match=why):
                await job.push("a", 0, d, samples=1, loss=1.0, also=also)
        assert (job.version, sorted(job.pending), job.covered, job.pushes) == (0, ["c"], {}, 1)
        job.close()
        await asyncio.wait_for(pushed_c, 1)

        for mode, kw in (("async", {}), ("sync", {"aggregator": "median"})):
            other = _job(mode, **kw)
            other.join("a")
            other.join("b")
            with pytest.raises(PSError, match="summed pushes need mode 'sync', aggregator 'mean'"):
                await other.push("a", 0, d, samples=1, loss=1.0, also=[{"name": "b", "samples": 1, "loss": 1.0}])
            assert other.version == 0 and other.pushes == 0

        # a co-sender's diverged loss fails the job as the sender's own would
        nan = _job("sync")
        nan.join("a")
        nan.join("b")
        r = await nan.push("a", 0, d, samples=1, loss=1.0, also=[{"name": "b", "samples": 1, "loss": float("nan")}])
        assert r["status"] == "failed" and "the loss is not finite (loss=nan)" in nan.failed

    asyncio.run(main())
