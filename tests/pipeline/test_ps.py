"""The parameter-server extension: handlers and state on a real scheduler (gen_cluster)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from distributed import Event, get_worker
from distributed.protocol import to_serialize
from distributed.protocol.serialize import Serialized, serialize
from distributed.utils_test import gen_cluster

from pipeline.ps import (
    EXTENSION_NAME,
    ParameterServer,
    ParameterServerExtension,
    PSError,
    ServerOptimizer,
    decode_vector,
    encode_vector,
)

N = 10


def _plain_step(
    name: str,
    p: np.ndarray,
    g: np.ndarray,
    lr: float,
    t: int,
    bufs: dict,
    mu: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.999,
) -> np.ndarray:
    """The server optimizers as plain float32 expressions, a fresh temporary per operation."""
    f = np.float32
    if name == "sgd":
        return p - f(lr) * g
    if name == "momentum":
        bufs["velocity"] = bufs["velocity"] * f(mu) + g
        return p - bufs["velocity"] * f(lr)
    bufs["m"] = bufs["m"] * f(b1) + f(1 - b1) * g
    bufs["v"] = bufs["v"] * f(b2) + f(1 - b2) * np.square(g)
    c1, c2 = 1 - b1**t, 1 - b2**t
    return p - f(lr / c1) * bufs["m"] / (np.sqrt(bufs["v"] / f(c2)) + f(1e-8))


@pytest.mark.parametrize("hyper", [{}, {"mu": 0.5, "b1": 0.7, "b2": 0.95}])
@pytest.mark.parametrize("ema", [0.0, 0.9])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_server_optimizer_equals_the_plain_expressions_bit_for_bit(name, ema, hyper):
    """Each step goes through work vectors kept between rounds, with the plain expressions'
    float32 results exactly (a refactor that reorders an operation changes a bit and fails);
    the server's momentum and betas are its own (``server_momentum``, ``server_beta1/2``)."""
    n = 1000
    rng = np.random.default_rng(3)
    names = {"mu": "momentum", "b1": "beta1", "b2": "beta2"}
    opt = ServerOptimizer(name, lr=0.01, ema=ema, n=n, **{names[k]: v for k, v in hyper.items()})
    params = rng.standard_normal(n).astype(np.float32)
    ref = params.copy()
    bufs = {k: np.zeros(n, np.float32) for k in ("velocity", "m", "v")}
    avg = None
    for t in range(1, 6):
        g = rng.standard_normal(n).astype(np.float32)
        opt.step(params, g, 0.01)
        ref = _plain_step(name, ref, g, 0.01, t, bufs, **hyper)
        np.testing.assert_array_equal(params, ref)
        if ema:
            d = min(ema, (1 + t) / (10 + t))
            avg = ref.copy() if avg is None else avg + (ref - avg) * np.float32(1 - d)
            np.testing.assert_array_equal(opt.model(params), avg)
        if t == 1:
            kept = (opt._work, opt._work2)
        assert opt._work is kept[0] and opt._work2 is kept[1]  # no fresh work vectors per round
    assert (opt._work2 is not None) == (name == "adam")


def test_server_optimizer_refuses_momentum_or_betas_outside_0_1():
    for key in ("momentum", "beta1", "beta2"):
        with pytest.raises(PSError, match=f"server optimizer {key} must be in"):
            ServerOptimizer("adam", n=3, **{key: 1.0})


def _serialized(arr: np.ndarray) -> Serialized:
    header, frames = serialize(arr, serializers=["dask", "pickle"])
    return Serialized(header, frames)


def test_decode_vector_accepts_float32_frames():
    vec = np.arange(N, dtype=np.float32)
    out = decode_vector(_serialized(vec), N)
    np.testing.assert_array_equal(out, vec)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.arange(N, dtype=np.float64), "float32"),
        (np.arange(N + 1, dtype=np.float32), "shape"),
        (np.arange(N, dtype=np.int32), "float32"),
    ],
)
def test_decode_vector_refuses_wrong_dtype_or_length(bad, fragment):
    with pytest.raises(PSError, match=fragment):
        decode_vector(_serialized(bad), N)


def test_decode_vector_refuses_pickled_objects():
    header, frames = serialize({"evil": 1}, serializers=["pickle"])
    with pytest.raises(PSError, match="expected a NumPy array"):
        decode_vector(Serialized(header, frames), N)
    with pytest.raises(PSError, match="expected a float32 array"):
        decode_vector(b"\x00" * 40, N)


def test_decode_vector_refuses_unknown_compression():
    header, frames = serialize(np.zeros(N, np.float32), serializers=["dask"])
    header = dict(header, compression=("zip-bomb",))
    with pytest.raises(PSError, match="compression"):
        decode_vector(Serialized(header, frames), N)


async def _create(c, job, params, **kw):
    return await c.scheduler.ps_create(job=job, params=to_serialize(params), n_params=int(params.size), **kw)


@gen_cluster(client=True)
async def test_sync_round_weighted_sum_and_release(c, s, a, b):
    ParameterServerExtension(s)
    w0 = np.zeros(N, np.float32)
    await _create(c, "j1", w0, mode="sync", aggregate="mean", optimizer={"name": "sgd", "lr": 1.0})
    r1 = await c.scheduler.ps_join(job="j1", name="p1")
    await c.scheduler.ps_join(job="j1", name="p2")
    assert r1["version"] == 0 and r1["skip_batches"] == 0
    d1 = np.full(N, -1.0, np.float32)  # delta = w_v - w_local: -1 means "moved to +1"
    d2 = np.full(N, -4.0, np.float32)
    push1 = asyncio.ensure_future(
        c.scheduler.ps_push(job="j1", name="p1", version=0, delta=to_serialize(d1), samples=30, batches=3, loss=1.0)
    )
    await asyncio.sleep(0.2)
    assert not push1.done()  # waits for p2: the round is not complete
    r2 = await c.scheduler.ps_push(
        job="j1", name="p2", version=0, delta=to_serialize(d2), samples=10, batches=1, loss=3.0
    )
    r1 = await push1
    expected = -(0.75 * d1 + 0.25 * d2)  # weighted by samples, server SGD lr 1
    for r in (r1, r2):
        assert r["status"] == "OK" and r["version"] == 1
        np.testing.assert_allclose(np.asarray(r["params"]), expected, rtol=1e-6)
    ext = s.extensions[EXTENSION_NAME]
    assert ext.jobs["j1"].progress == {"p1": 3, "p2": 1}
    await c.scheduler.ps_close(job="j1")
    assert not ext.jobs and not ext.key_to_participant


def _params(reply: dict) -> np.ndarray:
    p = reply["params"]  # an in-process reply holds the Serialize wrapper itself
    return np.asarray(getattr(p, "data", p))


@gen_cluster(client=True)
async def test_sync_round_uses_an_in_process_delta_as_it_was_pushed(c, s, a, b):
    """A delta off the wire is kept as received; one pushed in process (the caller's own array)
    is copied, so changing that array while the round is open changes nothing."""
    ext = ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync", aggregate="mean")
    for name in ("p1", "p2"):
        await c.scheduler.ps_join(job="j", name=name)
    d1 = np.full(N, -2.0, np.float32)
    push1 = asyncio.ensure_future(ext.push(job="j", name="p1", version=0, delta=d1, samples=1, batches=1, loss=1.0))
    await asyncio.sleep(0.1)
    d1[:] = 1e6  # the caller reuses its buffer before the round closes
    r2 = await c.scheduler.ps_push(
        job="j", name="p2", version=0, delta=to_serialize(np.full(N, -4.0, np.float32)), samples=1, loss=1.0
    )
    r1 = await push1
    for r in (r1, r2):
        np.testing.assert_array_equal(_params(r), np.full(N, 3.0, np.float32))  # -(-2 - 4) / 2
    # the next round reuses the server's work vectors and still adds up
    both = [
        ext.push(job="j", name=n, version=1, delta=np.full(N, v, np.float32), samples=1, loss=1.0)
        for n, v in (("p1", 1.0), ("p2", 3.0))
    ]
    for r in await asyncio.gather(*both):
        np.testing.assert_array_equal(_params(r), np.full(N, 1.0, np.float32))


@gen_cluster(client=True)
async def test_sum_aggregate_scales_by_participants(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync", aggregate="sum")
    for name in ("a", "b"):
        await c.scheduler.ps_join(job="j", name=name)
    delta = to_serialize(np.full(N, -1.0, np.float32))
    rs = await asyncio.gather(
        *(
            c.scheduler.ps_push(job="j", name=n, version=0, delta=delta, samples=5, batches=1, loss=0.5)
            for n in ("a", "b")
        )
    )
    np.testing.assert_allclose(np.asarray(rs[0]["params"]), 2.0)


@gen_cluster(client=True)
async def test_barrier_never_waits_for_a_participant_that_left(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync")
    await c.scheduler.ps_join(job="j", name="alive")
    await c.scheduler.ps_join(job="j", name="dead")
    push = asyncio.ensure_future(
        c.scheduler.ps_push(
            job="j", name="alive", version=0, delta=to_serialize(np.ones(N, np.float32)), samples=1, batches=1, loss=0.1
        )
    )
    await asyncio.sleep(0.1)
    assert not push.done()
    await c.scheduler.ps_leave(job="j", name="dead")
    r = await asyncio.wait_for(push, 5)
    assert r["version"] == 1


@gen_cluster(client=True)
async def test_expected_participant_blocks_round_until_its_task_ends(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync")
    ev = Event("go")
    fut = c.submit(lambda: Event("go").wait(10), key="never-joins", pure=False)
    await c.scheduler.ps_expect(job="j", names=["early", "late"], keys=[None, fut.key], epoch=0)
    await c.scheduler.ps_join(job="j", name="early")
    push = asyncio.ensure_future(
        c.scheduler.ps_push(
            job="j", name="early", version=0, delta=to_serialize(np.ones(N, np.float32)), samples=1, batches=1, loss=0.1
        )
    )
    await asyncio.sleep(0.3)
    assert not push.done()  # "late" was announced: the round waits for it
    await ev.set()
    await fut  # its task ended without joining: the round goes on without it
    r = await asyncio.wait_for(push, 5)
    assert r["version"] == 1
    assert not s.extensions[EXTENSION_NAME].key_to_participant


def _join_and_hold(job: str) -> str:
    ps = ParameterServer(job)
    w = get_worker()
    ps.join("task-p", key=w.get_current_task(), worker=w.address)
    Event("release").wait(10)
    return w.address


@gen_cluster(client=True)
async def test_participant_dropped_when_its_task_ends(c, s, a, b):
    ext = ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async")
    fut = c.submit(_join_and_hold, "j", pure=False)
    while "task-p" not in ext.jobs["j"].participants:
        await asyncio.sleep(0.02)
    await Event("release").set()
    await fut
    assert "task-p" not in ext.jobs["j"].participants
    assert not ext.key_to_participant


@gen_cluster(client=True)
async def test_async_applies_each_push_and_records_staleness(c, s, a, b):
    ext = ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async", optimizer={"name": "sgd", "lr": 0.5})
    await c.scheduler.ps_join(job="j", name="x")
    await c.scheduler.ps_join(job="j", name="y")
    delta = to_serialize(np.full(N, -2.0, np.float32))
    r = await c.scheduler.ps_push(job="j", name="x", version=0, delta=delta, samples=4, batches=1, loss=1.0)
    assert r["version"] == 1
    np.testing.assert_allclose(np.asarray(r["params"]), 1.0)
    r = await c.scheduler.ps_push(job="j", name="y", version=0, delta=delta, samples=4, batches=1, loss=1.0)
    assert r["version"] == 2 and r["staleness"] == 1
    np.testing.assert_allclose(np.asarray(r["params"]), 2.0)
    m = await c.scheduler.ps_metrics(job="j")
    assert m["pushes"] == 2 and m["samples"] == 8 and m["staleness"] == {0: 1, 1: 1}
    assert ext.jobs["j"].version == 2


@gen_cluster(client=True)
async def test_ssp_runner_ahead_waits_for_slowest(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="ssp", staleness=1)
    await c.scheduler.ps_join(job="j", name="fast")
    await c.scheduler.ps_join(job="j", name="slow")
    delta = to_serialize(np.zeros(N, np.float32))

    def push(name, version):
        return c.scheduler.ps_push(job="j", name=name, version=version, delta=delta, samples=1, batches=1, loss=0.0)

    r = await push("fast", 0)  # clock 1 vs 0: within the bound
    assert r["status"] == "OK"
    second = asyncio.ensure_future(push("fast", r["version"]))  # clock 2 vs 0: must wait
    await asyncio.sleep(0.3)
    assert not second.done()
    await push("slow", 0)
    r = await asyncio.wait_for(second, 5)
    assert r["status"] == "OK"


@gen_cluster(client=True)
async def test_refuses_unknown_job_wrong_length_and_unjoined(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async")
    with pytest.raises(PSError, match="unknown job"):
        await c.scheduler.ps_pull(job="nope")
    await c.scheduler.ps_join(job="j", name="p")
    with pytest.raises(PSError, match="shape"):
        await c.scheduler.ps_push(
            job="j",
            name="p",
            version=0,
            delta=to_serialize(np.zeros(N + 1, np.float32)),
            samples=1,
            batches=1,
            loss=0.0,
        )
    with pytest.raises(PSError, match="float32"):
        await c.scheduler.ps_push(
            job="j", name="p", version=0, delta=to_serialize(np.zeros(N, np.float64)), samples=1, batches=1, loss=0.0
        )
    with pytest.raises(PSError, match="has not joined"):
        await c.scheduler.ps_push(
            job="j",
            name="stranger",
            version=0,
            delta=to_serialize(np.zeros(N, np.float32)),
            samples=1,
            batches=1,
            loss=0.0,
        )
    with pytest.raises(PSError, match="invalid job id"):
        await c.scheduler.ps_pull(job="../../etc/passwd")
    with pytest.raises(PSError, match="already exists"):
        await _create(c, "j", np.zeros(N, np.float32))


@gen_cluster(client=True)
async def test_two_jobs_do_not_mix(c, s, a, b):
    ext = ParameterServerExtension(s)
    await _create(c, "A", np.zeros(N, np.float32), mode="async")
    await _create(c, "B", np.zeros(2 * N, np.float32), mode="async")
    await c.scheduler.ps_join(job="A", name="p")
    await c.scheduler.ps_join(job="B", name="p")
    await c.scheduler.ps_push(
        job="A", name="p", version=0, delta=to_serialize(np.full(N, -1.0, np.float32)), samples=1, batches=1, loss=0.0
    )
    rb = await c.scheduler.ps_pull(job="B")
    np.testing.assert_array_equal(np.asarray(rb["params"]), np.zeros(2 * N, np.float32))
    ra = await c.scheduler.ps_pull(job="A")
    np.testing.assert_array_equal(np.asarray(ra["params"]), np.ones(N, np.float32))
    await c.scheduler.ps_close(job="A")
    await c.scheduler.ps_close(job="B")
    assert not ext.jobs and not ext.key_to_participant
    assert [f["job"] for f in ext.finished] == ["A", "B"]


@gen_cluster(client=True)
async def test_divergence_fails_job_with_round_and_fix(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async")
    await c.scheduler.ps_join(job="j", name="p")
    r = await c.scheduler.ps_push(
        job="j", name="p", version=0, delta=to_serialize(np.full(N, np.nan, np.float32)), samples=1, batches=1, loss=1.0
    )
    assert r["status"] == "failed"
    assert "round 0" in r["message"] and "lower the learning rate" in r["message"]
    np.testing.assert_array_equal(np.asarray(r["params"]), 0.0)  # the bad update was not applied


@gen_cluster(client=True)
async def test_state_round_trips_through_create(c, s, a, b):
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async", optimizer={"name": "adam", "lr": 0.1})
    await c.scheduler.ps_join(job="j", name="p")
    await c.scheduler.ps_push(
        job="j", name="p", version=0, delta=to_serialize(np.ones(N, np.float32)), samples=1, batches=2, loss=1.0
    )
    st = await c.scheduler.ps_state(job="j")
    assert st["version"] == 1 and st["optimizer_state"]["t"] == 1 and st["progress"] == {"p": 2}
    buffers = {k: encode_vector(np.asarray(v)) for k, v in st["optimizer_state"]["buffers"].items()}
    await _create(
        c,
        "j2",
        np.asarray(st["params"]),
        mode="async",
        optimizer={"name": "adam", "lr": 0.1},
        version=st["version"],
        optimizer_state={"t": 1, "buffers": buffers},
        progress=st["progress"],
    )
    st2 = await c.scheduler.ps_state(job="j2")
    assert st2["version"] == 1
    np.testing.assert_array_equal(np.asarray(st2["params"]), np.asarray(st["params"]))
    np.testing.assert_array_equal(
        np.asarray(st2["optimizer_state"]["buffers"]["m"]), np.asarray(st["optimizer_state"]["buffers"]["m"])
    )
    r = await c.scheduler.ps_join(job="j2", name="p")
    assert r["skip_batches"] == 2


@gen_cluster(client=True)
async def test_ema_average_matches_a_numpy_reference_and_survives_a_checkpoint(c, s, a, b):
    """``ema``: the server keeps a moving average of the weights (NumPy float64 reference,
    decay min(ema, (1 + t) / (10 + t)) after update t); pulls with ``model`` and the epoch's end
    reply carry the average, training pulls carry the raw weights; the average is an optimizer
    buffer, so a job created from a checkpointed state continues it."""
    ParameterServerExtension(s)
    rng = np.random.default_rng(0)
    opt = {"name": "momentum", "lr": 0.5, "momentum": 0.9, "ema": 0.8}
    await _create(c, "j", np.zeros(N, np.float32), mode="async", optimizer=opt)
    await c.scheduler.ps_join(job="j", name="p")
    params, vel, avg = np.zeros(N), np.zeros(N), None
    pulled = await c.scheduler.ps_pull(job="j", model=True)
    np.testing.assert_array_equal(np.asarray(pulled["params"]), 0.0)  # no update yet: the weights
    for t in range(1, 8):
        delta = rng.standard_normal(N).astype(np.float32)
        r = await c.scheduler.ps_push(
            job="j", name="p", version=t - 1, delta=to_serialize(delta), samples=1, batches=1, loss=1.0
        )
        vel = 0.9 * vel + delta
        params = params - 0.5 * vel
        d = min(0.8, (1 + t) / (10 + t))
        avg = params.copy() if avg is None else d * avg + (1 - d) * params
        np.testing.assert_allclose(np.asarray(r["params"]), params, rtol=1e-5, atol=1e-6)
    model = np.asarray((await c.scheduler.ps_pull(job="j", model=True))["params"])
    np.testing.assert_allclose(model, avg, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model, params, atol=1e-3)
    raw = np.asarray((await c.scheduler.ps_pull(job="j"))["params"])
    np.testing.assert_allclose(raw, params, rtol=1e-5, atol=1e-6)
    await c.scheduler.ps_leave(job="j", name="p")
    np.testing.assert_array_equal(np.asarray((await c.scheduler.ps_epoch_end(job="j"))["params"]), model)
    st = await c.scheduler.ps_state(job="j")
    buffers = {k: encode_vector(np.asarray(v)) for k, v in st["optimizer_state"]["buffers"].items()}
    await _create(
        c,
        "j2",
        np.asarray(st["params"]),
        mode="async",
        optimizer=opt,
        version=st["version"],
        optimizer_state={"t": st["optimizer_state"]["t"], "buffers": buffers},
    )
    np.testing.assert_array_equal(np.asarray((await c.scheduler.ps_pull(job="j2", model=True))["params"]), model)
    # a state saved without averaging, resumed with it: the average starts from the weights
    no_avg = {k: v for k, v in buffers.items() if k != "average"}
    await _create(
        c,
        "j4",
        np.asarray(st["params"]),
        mode="async",
        optimizer=opt,
        version=st["version"],
        optimizer_state={"t": st["optimizer_state"]["t"], "buffers": no_avg},
    )
    np.testing.assert_array_equal(np.asarray((await c.scheduler.ps_pull(job="j4", model=True))["params"]), raw)
    # a state saved with averaging, resumed without: the average is dropped
    await _create(
        c,
        "j5",
        np.asarray(st["params"]),
        mode="async",
        optimizer={**opt, "ema": 0.0},
        version=st["version"],
        optimizer_state={"t": st["optimizer_state"]["t"], "buffers": buffers},
    )
    np.testing.assert_array_equal(np.asarray((await c.scheduler.ps_pull(job="j5", model=True))["params"]), raw)
    with pytest.raises(PSError, match="ema"):
        await _create(c, "j3", np.zeros(N, np.float32), optimizer={"name": "sgd", "ema": 1.0})


@gen_cluster(client=True, scheduler_kwargs={"preload": ["pipeline.ps"]})
async def test_preload_installs_extension(c, s, a, b):
    assert s.extensions[EXTENSION_NAME].installed_by == "preload"
    info = await c.scheduler.ps_info()
    assert info["installed_by"] == "preload"


@gen_cluster(client=True)
async def test_leave_keeps_the_summary_until_the_driver_takes_it(c, s, a, b):
    """A task's summary survives its worker: the driver reads it from the server, once."""
    ext = ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="async")
    await c.scheduler.ps_join(job="j", name="p")
    summary = {"name": "p", "samples": 128, "loss": 0.5, "worker": "tcp://w"}
    await c.scheduler.ps_leave(job="j", name="p", summary=summary)
    assert "p" not in ext.jobs["j"].participants
    got = await c.scheduler.ps_summaries(job="j", names=["p", "never-ran"])
    assert got["summaries"] == {"p": summary}
    assert (await c.scheduler.ps_summaries(job="j", names=["p"]))["summaries"] == {}
    with pytest.raises(PSError, match="small dict"):
        await c.scheduler.ps_leave(job="j", name="q", summary=[1, 2])


@gen_cluster(client=True)
async def test_epoch_end_waits_for_every_share_and_returns_the_final_weights(c, s, a, b):
    """A share that has left waits at ps_epoch_end until the epoch's last round is applied and
    every share (joined or still expected) has left; then all get the same final weights."""
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync", aggregate="mean", optimizer={"name": "sgd", "lr": 1.0})
    await c.scheduler.ps_expect(job="j", names=["short", "long", "late"], keys=[None, None, None], epoch=0)
    for name in ("short", "long", "late"):
        await c.scheduler.ps_join(job="j", name=name)
    minus = to_serialize(np.full(N, -1.0, np.float32))
    await asyncio.gather(
        *(
            c.scheduler.ps_push(job="j", name=n, version=0, delta=minus, samples=1, batches=1, loss=0.1)
            for n in ("short", "long", "late")
        )
    )
    await c.scheduler.ps_leave(job="j", name="short")
    first = asyncio.ensure_future(c.scheduler.ps_epoch_end(job="j", timeout=10))
    # "long" has one more round on its own (its sibling "late" is still there, not pushing)
    await c.scheduler.ps_leave(job="j", name="late")
    r = await c.scheduler.ps_push(job="j", name="long", version=1, delta=minus, samples=1, batches=1, loss=0.1)
    assert r["version"] == 2
    await asyncio.sleep(0.2)
    assert not first.done()  # "long" has not left yet
    await c.scheduler.ps_leave(job="j", name="long")
    got = [await asyncio.wait_for(first, 5), await c.scheduler.ps_epoch_end(job="j", timeout=10)]
    for reply in got:
        assert reply["status"] == "OK" and reply["version"] == 2
        np.testing.assert_array_equal(np.asarray(reply["params"]), np.full(N, 2.0, np.float32))
    # an expected share that never joins holds the epoch open until the timeout
    await c.scheduler.ps_expect(job="j", names=["never"], keys=[None], epoch=1)
    r = await c.scheduler.ps_epoch_end(job="j", timeout=0.3)
    assert r["status"] == "timeout" and "epoch not finished" in r["message"]


@gen_cluster(client=True)
async def test_sync_share_keeps_its_local_optimizer_state_across_tasks(c, s, a, b):
    """The local optimizer state of a sync share travels with the share, not the worker."""
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync")
    first = await c.scheduler.ps_join(job="j", name="e0-s1", slot="s1")
    assert first["keep_state"] is True and "local_state" not in first  # first epoch: fresh
    m = np.arange(N, dtype=np.float32)
    state = {"t": 7, "lr": 1e-3, "buffers": {"m": to_serialize(m), "v": to_serialize(m * 2)}}
    await c.scheduler.ps_leave(job="j", name="e0-s1", slot="s1", local_state=state)
    again = await c.scheduler.ps_join(job="j", name="e1-s1", slot="s1")
    assert again["local_state"]["t"] == 7
    np.testing.assert_array_equal(again["local_state"]["buffers"]["v"], m * 2)
    other = await c.scheduler.ps_join(job="j", name="e1-s0", slot="s0")
    assert "local_state" not in other  # shares do not mix
    with pytest.raises(PSError, match="shape"):
        bad = {"t": 1, "lr": 1e-3, "buffers": {"m": to_serialize(np.zeros(N + 1, np.float32))}}
        await c.scheduler.ps_leave(job="j", name="e1-s0", slot="s0", local_state=bad)


@gen_cluster(client=True)
async def test_local_states_round_trip_through_state_and_create(c, s, a, b):
    """A sync job's shares' local optimizer states are part of its state, and a job created
    from that state (a resumed run) hands each share its own state back."""
    ParameterServerExtension(s)
    await _create(c, "j", np.zeros(N, np.float32), mode="sync")
    await c.scheduler.ps_join(job="j", name="e0-s1", slot="s1")
    m = np.arange(N, dtype=np.float32)
    state = {"t": 5, "lr": 1e-3, "buffers": {"m": to_serialize(m), "v": to_serialize(m + 1)}}
    await c.scheduler.ps_leave(job="j", name="e0-s1", slot="s1", local_state=state)
    st = await c.scheduler.ps_state(job="j")
    assert set(st["local_states"]) == {"s1"} and st["local_states"]["s1"]["t"] == 5
    saved = {
        slot: {"t": v["t"], "lr": v["lr"], "buffers": {k: to_serialize(np.asarray(b)) for k, b in v["buffers"].items()}}
        for slot, v in st["local_states"].items()
    }
    await _create(c, "k", np.zeros(N, np.float32), mode="sync", local_states=saved)
    back = await c.scheduler.ps_join(job="k", name="e1-s1", slot="s1")
    assert back["local_state"]["t"] == 5 and back["local_state"]["lr"] == 1e-3
    np.testing.assert_array_equal(back["local_state"]["buffers"]["v"], m + 1)
    assert "local_state" not in await c.scheduler.ps_join(job="k", name="e1-s0", slot="s0")
    with pytest.raises(PSError, match="sync jobs only"):
        await _create(c, "a", np.zeros(N, np.float32), mode="async", local_states=saved)
    short = {"s0": {"t": 1, "buffers": {"m": to_serialize(np.zeros(N - 1, np.float32))}}}
    with pytest.raises(PSError, match="local_state of s0"):
        await _create(c, "b", np.zeros(N, np.float32), mode="sync", local_states=short)
    assert "b" not in s.extensions[EXTENSION_NAME].jobs  # a refused create leaves no job


@pytest.mark.parametrize("ema", [0.0, 0.999])
def test_server_sgd_takes_the_compiled_pass_with_the_numpy_step_s_bits(ema):
    # the default server optimizer (sgd, lr 1, ema 0.999) steps contiguous float32 vectors in
    # one compiled pass; a strided view takes NumPy's passes: the same weights and average
    rng = np.random.default_rng(7)
    n = 4099
    fused = ServerOptimizer("sgd", lr=1.0, ema=ema, n=n)
    numpy_ = ServerOptimizer("sgd", lr=1.0, ema=ema, n=n)
    start = rng.standard_normal(n).astype(np.float32)
    p1 = start.copy()
    wide = np.zeros(2 * n, np.float32)
    p2 = wide[::2]  # not contiguous: NumPy's path
    p2[:] = start
    for _ in range(12):
        g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        fused.step(p1, g, 1.0)
        numpy_.step(p2, g, 1.0)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(fused.model(p1), numpy_.model(p2))
    assert fused._work is None and numpy_._work is not None  # only NumPy's path needed a scratch vector
    assert not np.array_equal(p1, start)


def test_the_server_s_compiled_loops_are_loaded_for_deltas_off_the_wire_before_the_first_round():
    # a read-only delta (joined from a message's several frames, or an in-process caller's) is
    # a type numba compiles apart: the warm-up at job creation loads the mean and the step for it
    # too, or the first round would compile them on the event loop. In a fresh process, so that
    # no other test has loaded them.
    import subprocess
    import sys

    code = (
        "from pipeline.ps.wire import warm_server_loops\n"
        "warm_server_loops().join(timeout=300)\n"
        "from kernels import codec\n"
        "print(sorted({sig[1].mutable for sig in codec._scaled_add.signatures}))\n"
        "print(sorted({sig[1].mutable for sig in codec._sgd_step.signatures}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.splitlines() == ["[False, True]", "[False, True]"], out.stdout + out.stderr
