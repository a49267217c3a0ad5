"""How a round's deltas combine (pipeline.fedagg), the adaptive server optimizers, and the job
that uses both: NumPy references, robustness to an outlier, and one real LocalCluster."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline import fedagg
from pipeline.errors import PSError
from pipeline.optim import ServerOptimizer
from pipeline.ps import ParameterServer
from pipeline.ps.job import Job
from pipeline.ps.wire import decode_vector

N = 6


def _deltas(n: int = 7, size: int = 1000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(1 + 0.1 * rng.standard_normal(size)).astype(np.float32) for _ in range(n)]


def _old_mean(deltas: list[np.ndarray], samples: list[int]) -> np.ndarray:
    """The parameter server's weighted mean before the aggregators existed, as it was written."""
    total = sum(samples)
    grad = np.empty_like(deltas[0])
    tmp = np.empty_like(deltas[0])
    for i, (delta, s) in enumerate(zip(deltas, samples, strict=True)):
        weight = np.float32(s / total if total else 1 / len(deltas))
        np.multiply(delta, weight, out=grad if i == 0 else tmp)
        if i:
            grad += tmp
    return grad


def _krum_reference(deltas: list[np.ndarray], f: int) -> int:
    """Krum by its definition, one pair at a time in float64."""
    n = len(deltas)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((deltas[i].astype(np.float64) - deltas[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - f - 2)]))
    return int(np.argmin(scores))


# -- the aggregators --------------------------------------------------------------------------------


def test_each_aggregator_equals_its_numpy_reference() -> None:
    deltas = _deltas(size=fedagg.BLOCK + 123)  # more than one block of coordinates
    samples = [5, 1, 9, 3, 3, 7, 2]
    stack = np.stack(deltas)
    mean = fedagg.aggregate(deltas, samples, "mean")
    np.testing.assert_array_equal(mean, _old_mean(deltas, samples))  # bit for bit
    np.testing.assert_allclose(mean, np.average(stack, axis=0, weights=samples), rtol=1e-6)
    np.testing.assert_array_equal(fedagg.aggregate(deltas, samples, "median"), np.median(stack, axis=0))
    k = 2  # floor(0.3 * 7) cut at each end
    trimmed = np.sort(stack, axis=0)[k : 7 - k].mean(axis=0)
    got = fedagg.aggregate(deltas, samples, "trimmed_mean", trim_fraction=0.3)
    np.testing.assert_allclose(got, trimmed, rtol=1e-6)
    for f in (0, 1, 2, 5):
        best = _krum_reference(deltas, f)
        np.testing.assert_array_equal(fedagg.aggregate(deltas, samples, "krum", krum_f=f), deltas[best])
    chosen = fedagg.krum_select(deltas, 1, 3)
    assert len(chosen) == 3 and chosen[0] == _krum_reference(deltas, 1)
    multi = fedagg.aggregate(deltas, samples, "krum", krum_f=1, krum_m=3)
    np.testing.assert_array_equal(multi, _old_mean([deltas[i] for i in chosen], [samples[i] for i in chosen]))
    out = np.empty_like(deltas[0])
    assert fedagg.aggregate(deltas, samples, "median", out=out) is out


def test_one_huge_outlier_moves_the_mean_but_not_the_robust_aggregators() -> None:
    deltas = _deltas(n=7)
    deltas[3] = np.full_like(deltas[3], 1e6)  # a Byzantine client
    samples = [10] * 7
    assert fedagg.aggregate(deltas, samples, "mean").min() > 1e5
    for method, kw in (("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}), ("krum", {"krum_f": 1})):
        got = fedagg.aggregate(deltas, samples, method, **kw)
        assert np.abs(got - 1).max() < 0.5, method
    assert 3 not in fedagg.krum_select(deltas, 1, 5)


def test_a_lone_delta_and_zero_weights() -> None:
    d = _deltas(n=1)
    for method in fedagg.AGGREGATORS:
        np.testing.assert_array_equal(fedagg.aggregate(d, [0], method), d[0])
    two = _deltas(n=2)
    np.testing.assert_array_equal(fedagg.aggregate(two, [0, 0], "mean"), _old_mean(two, [0, 0]))


@pytest.mark.parametrize(
    ("args", "kw", "message"),
    [
        (("mode",), {}, "unknown aggregator 'mode'"),
        (("trimmed_mean",), {"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
        (("krum",), {"krum_f": -1}, "krum_f must be an int >= 0"),
        (("krum",), {"krum_m": 0}, "krum_m must be an int >= 1"),
    ],
)
def test_check_names_the_wrong_argument(args, kw, message) -> None:
    with pytest.raises(PSError, match=message):
        fedagg.aggregate(_deltas(n=2), [1, 1], *args, **kw)


def test_aggregate_refuses_mismatched_inputs() -> None:
    with pytest.raises(PSError, match="at least one delta"):
        fedagg.aggregate([], [], "mean")
    with pytest.raises(PSError, match="2 finite weights >= 0"):
        fedagg.aggregate(_deltas(n=2), [1], "mean")
    with pytest.raises(PSError, match="differ in length"):
        fedagg.aggregate([np.zeros(3, np.float32), np.zeros(4, np.float32)], [1, 1], "median")


# -- the adaptive server optimizers -----------------------------------------------------------------


def _fedopt_reference(name: str, steps: list[np.ndarray], lr: float, b1: float, b2: float, tau: float) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, in float64 with the delta as the gradient (x -= ...)."""
    x = np.zeros(len(steps[0]))
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for d in steps:
        d = d.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        if name == "adagrad":
            v = v + d**2
        elif name == "yogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        x = x - lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["adagrad", "yogi", "fedadam"])
def test_adaptive_server_optimizers_follow_the_paper(name: str) -> None:
    rng = np.random.default_rng(1)
    steps = [rng.standard_normal(500).astype(np.float32) for _ in range(6)]
    opt = ServerOptimizer(name, lr=0.1, beta1=0.8, beta2=0.95, tau=1e-2, n=500)
    params = np.zeros(500, np.float32)
    for d in steps:
        opt.step(params, d, 0.1)
    np.testing.assert_allclose(params, _fedopt_reference(name, steps, 0.1, 0.8, 0.95, 1e-2), rtol=2e-5, atol=1e-6)
    assert opt.t == 6 and set(opt.buffers) == {"m", "v"}
    # adam without bias correction is the same update, eps in tau's place
    twin = ServerOptimizer("adam", lr=0.1, beta1=0.8, beta2=0.95, eps=1e-2, bias_correction=False, n=500)
    p2 = np.zeros(500, np.float32)
    for d in steps:
        twin.step(p2, d, 0.1)
    if name == "fedadam":
        np.testing.assert_array_equal(p2, params)


@pytest.mark.parametrize("name", ["adagrad", "yogi", "fedadam"])
def test_adaptive_optimizer_state_resumes_exactly(name: str) -> None:
    rng = np.random.default_rng(2)
    steps = [rng.standard_normal(50).astype(np.float32) for _ in range(5)]
    a = ServerOptimizer(name, lr=0.05, tau=1e-3, n=50)
    pa = np.zeros(50, np.float32)
    for d in steps[:3]:
        a.step(pa, d, 0.05)
    b = ServerOptimizer(**a.config(), n=50)
    pb = pa.copy()
    b.load_state(a.state(), pb)
    for d in steps[3:]:
        a.step(pa, d, 0.05)
        b.step(pb, d, 0.05)
    np.testing.assert_array_equal(pa, pb)
    assert b.config()["tau"] == 1e-3 and b.t == 5
    with pytest.raises(PSError, match="unknown buffer 'velocity'"):
        b.load_state({"t": 1, "buffers": {"velocity": np.zeros(50, np.float32)}}, pb)
    with pytest.raises(PSError, match="tau must be > 0"):
        ServerOptimizer(name, tau=0.0, n=50)


# -- the job ------------------------------------------------------------------------------------------


def _job(**kw: object) -> Job:
    kw.setdefault("optimizer", {"name": "sgd", "lr": 1.0})
    kw.setdefault("mode", "sync")
    return Job.create("j", np.zeros(N, np.float32), N, **kw)


async def _round(job: Job, deltas: list[np.ndarray], samples: list[int]) -> np.ndarray:
    for i in range(len(deltas)):
        job.join(f"p{i}")
    replies = await asyncio.gather(
        *(
            job.push(f"p{i}", job.version, d, samples=s, batches=1, loss=0.0)
            for i, (d, s) in enumerate(zip(deltas, samples, strict=True))
        )
    )
    return decode_vector(replies[0]["params"], N).copy()


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_job_sum_and_mean_rounds_are_the_old_arithmetic_bit_for_bit(aggregate: str) -> None:
    deltas = [d[:N] for d in _deltas(n=3, seed=4)]
    samples = [7, 2, 5]
    expected = _old_mean(deltas, samples)
    if aggregate == "sum":
        expected *= np.float32(3)
    got = asyncio.run(_round(_job(aggregate=aggregate), deltas, samples))
    np.testing.assert_array_equal(got, -expected)


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum"])
def test_job_rounds_combine_with_the_robust_aggregators(aggregator: str) -> None:
    deltas = [d[:N] for d in _deltas(n=5, seed=5)]
    deltas[1] = np.full(N, 1e6, np.float32)
    samples = [1, 100, 1, 1, 1]
    kw = {"trim_fraction": 0.2, "krum_f": 1}
    got = asyncio.run(_round(_job(aggregate="mean", aggregator=aggregator, **kw), deltas, samples))
    names = sorted(f"p{i}" for i in range(5))  # the job combines in name order
    order = [int(n[1:]) for n in names]
    ref = fedagg.aggregate([deltas[i] for i in order], [samples[i] for i in order], aggregator, **kw)
    np.testing.assert_array_equal(got, -ref)
    assert np.abs(got + 1).max() < 0.5  # the outlier did not move it


def test_job_create_checks_the_aggregation_arguments() -> None:
    with pytest.raises(PSError, match="unknown aggregator 'avg'"):
        _job(aggregator="avg")
    with pytest.raises(PSError, match="trim_fraction"):
        _job(aggregator="trimmed_mean", trim_fraction=0.7)
    with pytest.raises(PSError, match="krum_f must be an int >= 0"):
        _job(aggregator="krum", krum_f=-2)
    with pytest.raises(PSError, match="buffer_size must be an int >= 0"):
        _job(mode="async", buffer_size=-1)
    with pytest.raises(PSError, match="needs mode 'async', not 'sync'"):
        _job(buffer_size=4)


def test_a_real_parameter_server_takes_the_aggregator_from_create(client) -> None:
    ps = ParameterServer("fedagg-median", client)
    ps.ensure_installed(client)
    ps.create(np.zeros(N, np.float32), mode="sync", aggregate="mean", aggregator="median")
    try:
        deltas = [np.full(N, v, np.float32) for v in (1.0, 2.0, 1e6)]
        for i in range(3):
            ps.join(f"p{i}")
        futures = [ps.soon.push(f"p{i}", 0, d, samples=1, batches=1, loss=0.0) for i, d in enumerate(deltas)]
        replies = [f.result(timeout=60) for f in futures]
        for r in replies:
            assert r["status"] == "OK" and r["version"] == 1
            np.testing.assert_array_equal(np.asarray(r["params"]), np.full(N, -2.0, np.float32))
    finally:
        ps.close()
    with pytest.raises(PSError, match="unknown aggregator 'avg'"):
        ParameterServer("fedagg-bad", client).create(np.zeros(N, np.float32), aggregator="avg")


# -- robust rounds off the event loop ---------------------------------------------------------------


def test_requests_arriving_while_a_robust_round_combines_wait_for_it() -> None:
    size, n = 1 << 18, 5

    async def main() -> None:
        job = Job.create("big", np.zeros(size, np.float32), size, mode="sync", aggregate="mean", aggregator="krum")
        deltas = _deltas(n=n, size=size, seed=9)
        for i in range(n):
            job.join(f"p{i}")
        for i, d in enumerate(deltas):
            r = await job.push(f"p{i}", 0, d, samples=1, batches=1, loss=0.5, wait=False)
        # the last push pooled its delta and replied before the round was applied
        assert r["pooled"] and r["version"] == 0 and job.combining is not None and not job.pending
        assert job.metrics()["combining"] is True
        again = await job.push("p0", 0, deltas[0], samples=1, batches=1, loss=0.5, wait=False)
        assert again["dropped"] and again["version"] == 1  # waited: its round is over, it is stale
        closed = await job.close_round(1)
        assert closed["status"] == "discarded" and closed["arrived"] == [] and closed["version"] == 1
        assert closed["last_applied"] == [f"p{i}" for i in range(n)] and job.combining is None
        np.testing.assert_array_equal(job.params, -fedagg.aggregate(deltas, [1] * n, "krum", krum_f=1))

        # a job closed while its round combines keeps its weights: the result is dropped
        twin = Job.create("twin", np.zeros(size, np.float32), size, mode="sync", aggregate="mean", aggregator="median")
        for i in range(n):
            twin.join(f"p{i}")
        for i, d in enumerate(deltas):
            await twin.push(f"p{i}", 0, d, samples=1, batches=1, loss=0.5, wait=False)
        assert twin.combining is not None
        twin.close()
        await twin.settled()
        assert twin.version == 0 and not twin.params.any()

    asyncio.run(main())


def test_a_robust_round_on_the_scheduler_leaves_it_answering_and_gives_the_same_weights(client) -> None:
    """A median over 16 deltas of 1M parameters takes a good fraction of a second: the
    scheduler answers ps_metrics while it runs (the round not applied yet), and the weights
    are those of the aggregator called directly."""
    n, size = 16, 1 << 20
    rng = np.random.default_rng(11)
    deltas = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    ps = ParameterServer("fedagg-off-loop", client)
    ps.ensure_installed(client)
    ps.create(
        np.zeros(size, np.float32),
        mode="sync",
        aggregate="mean",
        aggregator="median",
        optimizer={"name": "sgd", "lr": 1.0},
    )
    try:
        names = [f"p{i:02d}" for i in range(n)]
        for name in names:
            ps.join(name)
        for name, d in zip(names, deltas, strict=True):
            r = ps.push(name, 0, d, samples=1 + len(name), batches=1, loss=0.25, wait=False)
        assert r["status"] == "OK" and r["version"] == 0
        seen = []
        while not seen or seen[-1][1] == 0:
            m = ps.metrics()
            seen.append((m["combining"], m["version"]))
            assert len(seen) < 100_000
        # answered while the round combined (before it was applied), then the round applied
        assert (True, 0) in seen and seen[-1] == (False, 1)
        st = ps.state()
        assert st["version"] == 1
        np.testing.assert_array_equal(np.asarray(st["params"]), -fedagg.aggregate(deltas, [1] * n, "median"))
    finally:
        ps.close()


# -- FedBuff: buffered asynchronous rounds ----------------------------------------------------------


def test_fedbuff_steps_once_per_k_deltas_with_staleness_weights() -> None:
    async def main() -> None:
        job = _job(mode="async", aggregate="mean", buffer_size=3)
        for name in ("a", "b", "c", "d"):
            job.join(name)
        one = np.ones(N, np.float32)
        r = await job.push("a", 0, one * 2, samples=10, batches=1, loss=1.0)
        assert r["version"] == 0 and len(job.buffer) == 1  # buffered, no step yet
        await job.push("b", 0, one * 4, samples=30, batches=2, loss=2.0)
        assert job.version == 0 and not job.history
        r = await job.push("c", 0, one * 8, samples=10, batches=1, loss=3.0)  # the third: one step
        assert r["version"] == job.version == 1 and not job.buffer
        # all fresh: the sample-weighted mean (10*2 + 30*4 + 10*8) / 50
        np.testing.assert_allclose(job.params, -one * 4.4, rtol=1e-6)
        assert job.history[-1][1:] == (1, 2.0, 50, 3) and job.progress == {"a": 1, "b": 2, "c": 1}
        # next buffer: "d" pushes from version 0 (1 stale), "a" twice from version 1 (fresh)
        await job.push("d", 0, one * 3, samples=20, batches=1, loss=0.0)
        await job.push("a", 1, one, samples=10, batches=1, loss=0.0)
        assert job.version == 1
        await job.push("a", 1, one, samples=10, batches=1, loss=0.0)
        assert job.version == 2 and job.staleness_hist == {0: 5, 1: 1}
        step = (20 * 3 / np.sqrt(2) + 10 * 1 + 10 * 1) / 40
        np.testing.assert_allclose(job.params, -one * (4.4 + step), rtol=1e-6)

    asyncio.run(main())


def test_fedbuff_buffer_is_in_the_state_and_a_job_resumes_from_it() -> None:
    async def main() -> None:
        job = _job(mode="async", aggregate="mean", buffer_size=2, optimizer={"name": "fedadam", "lr": 0.1})
        job.join("a")
        job.join("b")
        await job.push("a", 0, np.full(N, 1, np.float32), samples=4, batches=1, loss=1.0)
        await job.push("b", 0, np.full(N, 3, np.float32), samples=4, batches=1, loss=1.0)  # a step
        await job.push("a", 0, np.full(N, 5, np.float32), samples=2, batches=1, loss=1.0)  # 1 stale, buffered
        st = job.state()
        assert st["buffer"]["samples"] == [2] and st["buffer"]["staleness"] == [1]
        twin = Job.create(
            "j2",
            st["params"],
            N,
            mode="async",
            aggregate="mean",
            buffer_size=2,
            optimizer=st["optimizer"],
            optimizer_state=st["optimizer_state"],
            version=st["version"],
            buffer=st["buffer"],
        )
        for j in (job, twin):
            j.join("b")
            await j.push("b", 1, np.full(N, 2, np.float32), samples=6, batches=1, loss=1.0)
        assert job.version == twin.version == 2
        np.testing.assert_array_equal(job.params, twin.params)
        with pytest.raises(PSError, match="below buffer_size 2"):
            Job.create("j3", st["params"], N, mode="async", buffer_size=2, buffer={**st["buffer"], "samples": []})

    asyncio.run(main())


def test_fedbuff_refuses_what_it_cannot_combine() -> None:
    with pytest.raises(PSError, match="combines with aggregator 'mean', not 'median'"):
        _job(mode="async", buffer_size=2, aggregator="median")
    with pytest.raises(PSError, match="damping and buffer_size"):
        _job(mode="async", buffer_size=2, damping=True)


def test_a_real_parameter_server_checkpoints_and_restores_the_fedbuff_buffer(client) -> None:
    ps = ParameterServer("fedbuff-state", client)
    ps.ensure_installed(client)
    ps.create(np.zeros(N, np.float32), mode="async", aggregate="mean", buffer_size=3)
    twin = ParameterServer("fedbuff-resumed", client)
    try:
        ps.join("a")
        ps.push("a", 0, np.full(N, 2, np.float32), samples=5, batches=1, loss=0.5)
        st = ps.state()
        assert st["version"] == 0 and list(st["buffer"]["samples"]) == [5]
        np.testing.assert_array_equal(st["buffer"]["deltas"][0], np.full(N, 2, np.float32))
        twin.create(st["params"], mode="async", aggregate="mean", buffer_size=3, buffer=st["buffer"])
        twin.join("b")
        for _ in range(2):
            r = twin.push("b", 0, np.full(N, 2, np.float32), samples=5, batches=1, loss=0.5)
        assert r["version"] == 1  # the restored delta counted towards the three
        np.testing.assert_allclose(np.asarray(r["params"]), np.full(N, -2, np.float32))
    finally:
        ps.close()
        twin.close()


def test_the_best_round_is_chosen_among_rounds_validated_on_the_same_sites() -> None:
    """A site joining (or leaving) changes what the pooled validation loss covers: the best
    round is then chosen again among rounds validated on the new sites, so the model kept never
    predates a site it did not train on because an easier pool scored lower."""
    from types import SimpleNamespace

    from pipeline.federated import FederatedTrainer
    from pipeline.runstate import BestModel, EarlyStopping, RunState

    lines: list[str] = []
    trainer = SimpleNamespace(log=lines.append)
    run = RunState("j")
    stopping = EarlyStopping(patience=5)

    def round_(rnd: int, loss: float, sites: tuple[str, ...]) -> None:
        record = {"round": rnd, "val_loss": loss, "sites": {s: {"loss": loss} for s in sites}}
        run.history.append(record)
        FederatedTrainer._compare_over_the_same_sites(trainer, stopping, run, record)
        stopping.epoch = rnd
        stopping.update(loss, 1)
        if stopping.improved:
            run.best = BestModel(stopping.best_loss, None, rnd)

    round_(0, 1.0, ("a", "b"))
    round_(1, 0.5, ("a", "b"))
    assert run.best.epoch == 1 and not lines
    round_(2, 0.9, ("a", "b", "c"))  # c joined: its loss is higher, the pool's too
    assert run.best.epoch == 2 and len(lines) == 1
    assert "validated on sites a, b, c (the best round so far, 2, on a, b)" in lines[0]
    round_(3, 0.95, ("a", "b", "c"))
    assert run.best.epoch == 2  # compared among a, b, c rounds
    round_(4, 0.2, ("a", "b"))  # c left: an easier pool
    assert run.best.epoch == 4 and len(lines) == 2
    round_(5, 0.1, ("a", "b"))
    assert run.best.epoch == 5 and len(lines) == 2


def test_the_compiled_mean_and_numpy_s_mean_agree_bit_for_bit() -> None:
    # contiguous float32 vectors take the compiled pass, a strided output NumPy's passes
    deltas = _deltas(n=4, seed=9)
    samples = [3, 1, 4, 1]
    fused = fedagg.aggregate(deltas, samples, "mean")
    wide = np.zeros(2 * deltas[0].size, np.float32)
    strided = fedagg.aggregate(deltas, samples, "mean", out=wide[::2])
    np.testing.assert_array_equal(fused, strided)
    np.testing.assert_array_equal(fused, _old_mean(deltas, samples))
