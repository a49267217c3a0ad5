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
