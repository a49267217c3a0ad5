"""The parameter server's job with differential privacy, without a scheduler: clipping on
arrival, noise on the combined delta, adaptive clipping, accounting and the budget."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.errors import PSError
from pipeline.jobview import JobSnapshot
from pipeline.privacy import RdpAccountant, l2_norm
from pipeline.ps.job import Job
from pipeline.ps.wire import decode_vector

N = 64


def _job(privacy: dict, n: int = N, **kw: object) -> Job:
    kw.setdefault("optimizer", {"name": "sgd", "lr": 1.0})
    return Job.create("j", np.zeros(n, np.float32), n, mode="sync", privacy={"seed": 0, **privacy}, **kw)


async def _round(job: Job, deltas: dict[str, np.ndarray]) -> list[dict]:
    """One round: every name joins (if not in), pushes its delta; the replies."""
    for name in deltas:
        if name not in job.participants:
            job.join(name)
    v = job.version
    return list(
        await asyncio.gather(
            *(job.push(n, v, d, samples=10 * (i + 1), batches=1, loss=1.0) for i, (n, d) in enumerate(deltas.items()))
        )
    )


def test_no_update_is_absorbed_with_a_norm_above_the_clip() -> None:
    """Without noise, each round moves the weights by the sum of the clipped deltas: one huge
    delta moves them by at most the clip, whatever its size."""

    async def main() -> None:
        job = _job({"dp": "central", "clip_norm": 0.5}, aggregate="sum")
        rng = np.random.default_rng(0)
        for scale in (1e-3, 1.0, 1e3, 1e6):
            before = job.params.copy()
            await _round(job, {"a": (rng.standard_normal(N) * scale).astype(np.float32)})
            moved = l2_norm(job.params - before)
            assert moved <= 0.5 * (1 + 1e-5)
            if scale > 1:
                assert moved == pytest.approx(0.5, rel=1e-4)
        # two participants: each clipped on its own, summed with equal weights (samples ignored)
        before = job.params.copy()
        big = np.zeros(N, np.float32)
        big[0] = 100.0
        small = np.zeros(N, np.float32)
        small[1] = 0.1
        await _round(job, {"a": big, "b": small})
        np.testing.assert_allclose(before - job.params, np.eye(N, dtype=np.float32)[0] * 0.5 + small, atol=1e-5)

    asyncio.run(main())


def test_central_noise_has_std_noise_multiplier_times_clip_over_the_fixed_denominator() -> None:
    """Zero deltas: every weight change is noise. Over 300 rounds of 64 weights the pooled
    variance passes a chi-square test at 99.9% for sigma = z x clip / expected (mean)."""

    async def main() -> None:
        z, clip, expected = 1.7, 0.3, 4
        job = _job({"dp": "central", "clip_norm": clip, "noise_multiplier": z, "expected": expected}, aggregate="mean")
        moves = []
        for _ in range(300):
            before = job.params.copy()
            await _round(job, {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)})
            moves.append((job.params - before).astype(np.float64))
        x = np.concatenate(moves)
        sigma = z * clip / expected
        dof = x.size - 1
        stat = dof * x.var(ddof=1) / sigma**2
        assert stats.chi2.ppf(0.0005, dof) < stat < stats.chi2.ppf(0.9995, dof)
        assert job.accountant is not None and job.accountant.rounds == 300

    asyncio.run(main())


def test_sum_aggregate_noise_is_on_the_sum() -> None:
    async def main() -> None:
        job = _job({"dp": "central", "clip_norm": 2.0, "noise_multiplier": 0.5}, n=20_000, aggregate="sum")
        before = job.params.copy()
        await _round(job, {"a": np.zeros(20_000, np.float32)})
        assert float(np.std(job.params - before)) == pytest.approx(1.0, rel=0.03)

    asyncio.run(main())


def test_epsilon_is_the_accountants_and_the_budget_stops_before_the_round_that_exceeds_it() -> None:
    async def main() -> None:
        z, q, delta, target = 2.0, 0.2, 1e-5, 2.0
        privacy = {"dp": "central", "noise_multiplier": z, "sampling_rate": q, "delta": delta, "target_epsilon": target}
        job = _job(privacy, aggregate="mean")
        allowed = RdpAccountant(z, q, delta).rounds_within(target)
        assert 1 < allowed < 50
        for r in range(allowed):
            replies = await _round(job, {"a": np.zeros(N, np.float32)})
            assert not replies[0].get("stop")
            assert job.metrics()["privacy"]["epsilon"] == pytest.approx(
                RdpAccountant(z, q, delta).epsilon(rounds=r + 1)
            )
        assert job.exhausted and job.version == allowed
        replies = await _round(job, {"a": np.ones(N, np.float32)})
        assert replies[0]["stop"] and "privacy budget reached" in replies[0]["message"]
        assert job.version == allowed and not job.pending  # nothing more applied
        m = job.metrics()["privacy"]
        assert m["epsilon"] <= target < RdpAccountant(z, q, delta).epsilon(rounds=allowed + 1)
        snap = JobSnapshot.from_metrics(job.metrics())
        assert snap.epsilon == pytest.approx(m["epsilon"]) and snap.privacy["exhausted"]
        # a job resumed with the rounds spent is out of budget at once
        again = _job({**privacy, "rounds": job.state()["privacy"]["rounds"]})
        assert again.exhausted and again.epsilon() == pytest.approx(m["epsilon"])

    asyncio.run(main())


def test_pushes_after_the_last_round_within_the_budget_return_at_once() -> None:
    """Two participants, the budget's last round: both are released by it, and a push after
    it is told to stop at once instead of waiting at a barrier that will never open."""

    async def main() -> None:
        allowed = RdpAccountant(1.5, 1.0, 1e-5).rounds_within(5.0)
        assert allowed >= 1
        job = _job({"dp": "central", "noise_multiplier": 1.5, "target_epsilon": 5.0})
        for _ in range(allowed):
            replies = await _round(job, {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)})
            assert not any(r.get("stop") for r in replies)
        r = await asyncio.wait_for(job.push("a", job.version, np.zeros(N, np.float32), samples=1, loss=1.0), 1)
        assert r["stop"] and r["status"] == "OK" and job.version == allowed and not job.failed


def test_adaptive_clipping_follows_the_quantile_of_the_update_norms() -> None:
    async def main() -> None:
        job = _job({"dp": "central", "clip_norm": 0.01, "clip_quantile": 0.5}, aggregate="mean")
        rng = np.random.default_rng(1)
        for _ in range(120):
            deltas = {}
            for i in range(10):
                d = rng.standard_normal(N).astype(np.float32)
                d *= np.float32(rng.uniform(0, 4) / l2_norm(d))  # norms uniform on [0, 4]
                deltas[f"p{i}"] = d
            await _round(job, deltas)
        assert job.clip() == pytest.approx(2.0, rel=0.25)
        assert job.state()["privacy"]["clip"] == job.clip()

    asyncio.run(main())


def test_local_dp_leaves_the_deltas_to_the_sites_and_accounts_each_push() -> None:
    async def main() -> None:
        job = _job({"dp": "local", "clip_norm": 1.0, "noise_multiplier": 2.0}, aggregate="mean")
        d = np.full(N, 5.0, np.float32)  # not clipped by the server: the site did its part
        await _round(job, {"a": d, "b": d})
        np.testing.assert_allclose(job.params, -d)
        assert job.epsilon() == pytest.approx(RdpAccountant(1.0, 1.0, 1e-5).epsilon(rounds=1))

    asyncio.run(main())


def test_privacy_off_changes_nothing() -> None:
    async def main() -> None:
        job = _job({}, aggregate="mean")
        await _round(job, {"a": np.full(N, 1, np.float32), "b": np.full(N, 3, np.float32)})
        np.testing.assert_allclose(job.params, np.full(N, -(10 * 1 + 20 * 3) / 30))  # weighted by samples
        assert job.metrics()["privacy"]["dp"] == "off" and job.epsilon() == 0.0
        assert JobSnapshot.from_metrics(job.metrics()).epsilon is None

    asyncio.run(main())


def test_privacy_settings_are_checked_at_creation() -> None:
    with pytest.raises(PSError, match="needs mode 'sync'"):
        Job.create("j", np.zeros(N, np.float32), N, mode="async", privacy={"dp": "central"})
    with pytest.raises(PSError, match="secure_aggregation needs mode 'sync'"):
        Job.create("j", np.zeros(N, np.float32), N, mode="ssp", privacy={"secure_aggregation": True})
    with pytest.raises(PSError, match="needs aggregator 'mean'"):
        Job.create("j", np.zeros(N, np.float32), N, mode="sync", aggregator="median", privacy={"dp": "central"})
    with pytest.raises(PSError, match="unknown dp"):
        _job({"dp": "maybe"})
    assert math.isfinite(_job({"dp": "central", "noise_multiplier": 1.0}).epsilon())


def test_push_off_the_wire_is_clipped_in_a_copy() -> None:
    """A delta from a remote caller arrives in a read-only message buffer: clipping copies it."""

    async def main() -> None:
        from distributed.protocol.serialize import Serialized, serialize

        job = _job({"dp": "central", "clip_norm": 1.0}, aggregate="sum")
        job.join("a")
        buf = np.full(N, 10.0, np.float32)
        header, frames = serialize(buf, serializers=("dask",))
        wire = Serialized(header, [bytes(f) for f in frames])  # bytes: read-only
        await job.push("a", 0, wire, samples=1, loss=1.0)
        assert l2_norm(job.params) == pytest.approx(1.0, rel=1e-4)
        assert decode_vector(wire, N).max() == 10.0  # the message itself untouched

    asyncio.run(main())


def test_the_dashboard_and_prometheus_show_the_privacy_spent() -> None:
    import gc

    from pipeline import dashboard

    async def main() -> Job:
        job = _job({"dp": "central", "noise_multiplier": 2.0, "target_epsilon": 50.0}, aggregate="mean")
        job.job = "dp-job"
        for _ in range(3):
            await _round(job, {"a": np.zeros(N, np.float32)})
        return job

    job = asyncio.run(main())

    class Owner:
        pass

    class Source:
        def job_names(self) -> list[str]:
            return [job.job]

        def snapshot(self, name: str | None = None) -> JobSnapshot | None:
            return job.view(history=True)

        def running(self) -> list[JobSnapshot]:
            return [job.view()]

        def finished_jobs(self) -> list[JobSnapshot]:
            return []

    owner, source = Owner(), Source()
    dashboard.watch(owner, source)
    eps = job.epsilon()
    assert eps == pytest.approx(RdpAccountant(2.0, 1.0, 1e-5).epsilon(rounds=3))
    html = dashboard._summary_html(job.view())
    assert f"epsilon {eps:.3g} at delta 1e-05 after 3 rounds" in html and "budget 50" in html
    fams = {f.name: f for f in dashboard.TrainingCollector().collect()}
    got = {s.labels["job"]: s.value for s in fams["pipeline_privacy_epsilon"].samples}
    assert got["dp-job"] == pytest.approx(eps)
    del source
    gc.collect()


def test_each_round_is_accounted_at_the_sampling_rate_its_expect_announced() -> None:
    """Rounds announced with their own sampling rate (fewer candidates than the job's
    population) are accounted at it: epsilon is the Rényi divergences of those rates summed
    (Mironov et al.'s formula) and converted; rounds announced without one, or at the job's
    rate, cost what they always did. A job resumed from the state's rounds and rates goes on
    from the same epsilon, and a round whose rate would overspend the budget is refused at
    its announcement."""
    from pipeline.privacy import DEFAULT_ORDERS, epsilon_from_rdp, rdp_sampled_gaussian

    async def main() -> None:
        z, q0, delta = 1.5, 0.25, 1e-5
        privacy = {"dp": "central", "noise_multiplier": z, "sampling_rate": q0, "delta": delta}
        job = _job(privacy, aggregate="mean")
        rates = [0.5, None, q0, 1.0, 0.5]  # None: no rate announced (the job's)
        for q in rates:
            reply = job.expect(["a"], [None], sampling_rate=q)
            assert reply["exhausted"] is False
            await _round(job, {"a": np.zeros(N, np.float32)})
        applied = [q0 if q is None else q for q in rates]
        rdp = sum(rdp_sampled_gaussian(q, z, DEFAULT_ORDERS) for q in applied)
        want = epsilon_from_rdp(DEFAULT_ORDERS, rdp, delta)[0]
        m = job.metrics()["privacy"]
        assert m["rounds"] == 5 and m["epsilon"] == pytest.approx(want, rel=1e-12)
        assert m["rates"] == [[0.5, 2], [1.0, 1]]  # the rounds at another rate than the job's
        uniform = RdpAccountant(z, q0, delta).epsilon(rounds=5)
        assert m["epsilon"] > uniform  # fewer candidates, less amplification: more privacy spent
        # a resumed job takes the rounds and their rates from the state
        spent = job.state()["privacy"]
        again = _job({**privacy, "rounds": spent["rounds"], "rates": spent["rates"]})
        assert again.epsilon() == pytest.approx(m["epsilon"], rel=1e-12)
        assert again.metrics()["privacy"]["rates"] == m["rates"]
        # the budget: a target between one more round at the job's rate and one at rate 1
        acc = again.accountant
        assert acc is not None
        after = [epsilon_from_rdp(DEFAULT_ORDERS, acc.rdp + acc.round_rdp(q), delta)[0] for q in (q0, 1.0)]
        assert after[0] < after[1]
        target = (after[0] + after[1]) / 2
        tight = _job({**privacy, "rounds": spent["rounds"], "rates": spent["rates"], "target_epsilon": target})
        assert not tight.exhausted  # one more round at the job's rate fits
        reply = tight.expect(["a"], [None], sampling_rate=1.0)
        assert reply["exhausted"] is True and not tight.expected
        replies = await _round(tight, {"a": np.ones(N, np.float32)})
        assert replies[0]["stop"] and tight.version == 0 and tight.epsilon() == pytest.approx(m["epsilon"])
        with pytest.raises(PSError, match="sampling_rate must be in"):
            job.expect(["a"], [None], sampling_rate=0.0)
        with pytest.raises(PSError, match="rates must be"):
            _job({**privacy, "rounds": 1, "rates": [[0.5, 2]]})

    asyncio.run(main())


@pytest.mark.parametrize("dp", ["central", "local"])
def test_a_private_rounds_history_counts_the_samples_trained_not_the_participants(dp: str) -> None:
    """Under DP each delta weighs 1 in the mean (sample counts are data), but the round's
    history row (and the dashboard's samples/s, the run's history.json) counts the samples
    the participants trained: 10 + 20 here, not 2."""

    async def main() -> None:
        job = _job({"dp": dp, "clip_norm": 1.0, "noise_multiplier": 0.0})
        await _round(job, {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)})
        assert job.history[-1][3] == 30
        assert job.history[-1][4] == 2
        assert job.metrics()["samples"] == 30

    asyncio.run(main())
