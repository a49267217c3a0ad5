"""Secure aggregation: pairwise masks cancel exactly in the sum, the parameter server never
holds one participant's unmasked delta, and a participant that disappears mid-round makes
the round redo itself with the others instead of hanging or corrupting it."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from scipy import stats

from pipeline.errors import PSError
from pipeline.privacy import clip_update
from pipeline.ps.job import Job
from pipeline.secagg import dequantize, mask, new_keypair, prg, quantize, round_info, scale_for

N = 4096
CLIP = 1.0


def _job(**privacy: object) -> Job:
    return Job.create(
        "sa",
        np.zeros(N, np.float32),
        N,
        mode="sync",
        aggregate="sum",
        optimizer={"name": "sgd", "lr": 1.0},
        privacy={"secure_aggregation": True, "clip_norm": CLIP, **privacy},
    )


def _keypair(label: str) -> tuple[X25519PrivateKey, bytes]:
    """A fixed X25519 key pair for ``label`` (what :func:`new_keypair` makes at random): the masks,
    and so the uniformity tests' statistics, are the same in every run (a chi-square test at
    p > 1e-4 of fresh random masks fails once in ten thousand runs)."""
    private = X25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _deltas(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        d = rng.standard_normal(N).astype(np.float32)
        clip_update(d, CLIP * rng.uniform(0.2, 1.0))
        out[n] = d
    return out


async def _participant(job: Job, name: str, delta: np.ndarray, seen: list, before_push: asyncio.Event | None = None):
    """What a worker does with secure aggregation: key exchange, mask, push; again on redo."""
    version = job.version
    tries = 0
    while True:
        private, public = _keypair(f"{job.job}/{name}/{version}/{tries}")
        tries += 1
        r = await job.exchange_keys(name, version, public, timeout=5)
        assert r["status"] == "OK", r
        roster, attempt = r["roster"], r["attempt"]
        q = quantize(delta, scale_for(len(roster), CLIP))
        masked = mask(q, name, private, roster, round_info(job.job, version, attempt, sorted(roster)))
        if before_push is not None:
            await before_push.wait()
        reply = await job.push(name, version, masked.view(np.float32), samples=1, batches=1, loss=1.0, attempt=attempt)
        seen.append(None if job.sa_sum is None else job.sa_sum.copy())  # what the server pooled now
        if not reply.get("redo"):
            return reply, roster


def _uniform(v: np.ndarray) -> bool:
    """Chi-square test of the top byte of a uint32 vector against the uniform distribution."""
    counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
    return stats.chisquare(counts).pvalue > 1e-4


def test_masks_cancel_exactly_and_the_server_never_holds_an_unmasked_delta() -> None:
    names = ["site-a", "site-b", "site-c", "site-d"]
    deltas = _deltas(names)
    scale = scale_for(len(names), CLIP)
    quantized = {n: quantize(d, scale) for n, d in deltas.items()}

    async def main() -> tuple[Job, list]:
        job = _job()
        for n in names:
            job.join(n)
        seen: list = []
        pools: list = []

        async def watch() -> None:  # the server's pooled state after every event
            while job.version == 0:
                if job.sa_sum is not None:
                    pools.append(job.sa_sum.copy())
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        replies = await asyncio.gather(*(_participant(job, n, deltas[n], seen) for n in names))
        await watcher
        assert all(r["version"] == 1 for r, _ in replies)
        return job, pools

    job, pools = asyncio.run(main())
    plain = sum(q.view(np.int32).astype(np.int64) for q in quantized.values())
    # the aggregate is the plain sum of the quantized deltas, exactly
    np.testing.assert_array_equal(job.sa_last_total.astype(np.int64), plain)
    np.testing.assert_array_equal(-job.params, dequantize(plain.astype(np.int32).view(np.uint32), scale))
    np.testing.assert_allclose(-job.params, sum(deltas.values()), atol=len(names) / scale)
    # every partial sum the server held before the last push is uniform noise to it, and is
    # none of the quantized deltas nor their plain partial sums
    partials = pools[:-1] if np.array_equal(pools[-1], job.sa_last_total.view(np.uint32)) else pools
    assert partials
    plain_partials = []
    acc = np.zeros(N, np.uint32)
    for n in names:
        acc = acc + quantized[n]
        plain_partials.append(acc.copy())
    for pool in partials:
        assert _uniform(pool)
        for q in [*quantized.values(), *plain_partials[:-1]]:
            assert np.mean(pool == q) < 0.01
    # nothing in the job's state is one participant's delta (float or quantized)
    for value in vars(job).values():
        for arr in value.values() if isinstance(value, dict) else [value]:
            if isinstance(arr, np.ndarray) and arr.size == N:
                for n in names:
                    assert not np.array_equal(arr.view(np.uint32), quantized[n])
                    assert not np.allclose(arr.astype(np.float32, copy=False), deltas[n])


def test_a_single_masked_vector_is_uniform_and_the_pair_masks_agree() -> None:
    a_priv, a_pub = _keypair("a")
    b_priv, b_pub = _keypair("b")
    roster = {"a": a_pub, "b": b_pub}
    info = round_info("j", 3, 0, ["a", "b"])
    q = quantize(np.zeros(N, np.float32), scale_for(2, 1.0))
    ma, mb = mask(q, "a", a_priv, roster, info), mask(q, "b", b_priv, roster, info)
    assert _uniform(ma) and _uniform(mb)
    np.testing.assert_array_equal(ma + mb, q + q)  # +PRG and -PRG of one shared seed
    # another round (or attempt) gives other masks
    assert not np.array_equal(mask(q, "a", a_priv, roster, round_info("j", 3, 1, ["a", "b"])), ma)
    assert prg(b"\x01" * 32, 8).dtype == np.uint32


def test_the_scale_keeps_the_sum_of_n_clipped_deltas_inside_32_bits() -> None:
    for n in (1, 2, 10, 1000):
        scale = scale_for(n, 2.5)
        worst = quantize(np.full(4, 2.5, np.float32), scale).view(np.int32).astype(np.int64) * n
        assert worst.max() <= 2**31 - 1
        total = np.zeros(4, np.uint32)
        for _ in range(n):
            total += quantize(np.full(4, -2.5, np.float32), scale)
        np.testing.assert_allclose(dequantize(total, scale), np.full(4, -2.5 * n), rtol=1e-6)


def test_a_participant_that_disappears_mid_round_makes_the_others_redo_it() -> None:
    names = ["a", "b", "c"]
    deltas = _deltas(names, seed=1)

    async def main() -> tuple[Job, list]:
        job = _job()
        for n in names:
            job.join(n, key=f"task-{n}")
        seen: list = []
        go_c = asyncio.Event()  # "c" exchanges keys, then its task dies before it pushes
        tasks = [asyncio.ensure_future(_participant(job, n, deltas[n], seen)) for n in ("a", "b")]
        c = asyncio.ensure_future(_participant(job, "c", deltas["c"], seen, before_push=go_c))
        while len(job.sa_pushed) < 2:
            await asyncio.sleep(0.01)
        assert job.sa_roster == names and job.version == 0  # a and b wait for c's masked vector
        c.cancel()
        job.drop("c", "task erred")  # what the scheduler plugin does when c's task ends
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)  # no hang: redone without c
        assert all(roster.keys() == {"a", "b"} for _, roster in results)
        return job, seen

    job, _ = asyncio.run(main())
    assert job.version == 1 and job.sa_attempt == 0
    scale = scale_for(2, CLIP)
    plain = quantize(deltas["a"], scale).view(np.int32).astype(np.int64) + quantize(deltas["b"], scale).view(
        np.int32
    ).astype(np.int64)
    np.testing.assert_array_equal(job.sa_last_total.astype(np.int64), plain)  # not corrupted by c
    np.testing.assert_allclose(-job.params, deltas["a"] + deltas["b"], atol=2 / scale)


def test_secure_aggregation_with_central_noise_adds_it_to_the_dequantized_sum() -> None:
    async def main() -> Job:
        job = _job(dp="central", noise_multiplier=2.0, seed=0)
        zero = np.zeros(N, np.float32)
        for n in ("a", "b"):
            job.join(n)
        await asyncio.gather(*(_participant(job, n, zero, []) for n in ("a", "b")))
        return job

    job = asyncio.run(main())
    assert float(np.std(job.params)) == pytest.approx(2.0 * CLIP, rel=0.05)  # z x clip on the sum
    assert job.epsilon() > 0


def test_key_exchange_checks_its_arguments() -> None:
    async def main() -> None:
        job = _job()
        job.join("a")
        with pytest.raises(PSError, match="32 raw bytes"):
            await job.exchange_keys("a", 0, b"short")
        with pytest.raises(PSError, match="has not joined"):
            await job.exchange_keys("nobody", 0, b"\0" * 32)
        plain = Job.create("p", np.zeros(N, np.float32), N, mode="sync")
        plain.join("a")
        with pytest.raises(PSError, match="does not use secure aggregation"):
            await plain.exchange_keys("a", 0, b"\0" * 32)

    asyncio.run(main())


def test_a_participant_alone_in_a_round_sends_nothing() -> None:
    """Alone, a participant's "masked" vector would be its quantized delta in the clear: the
    job tells it to skip the round instead, and never receives it."""

    async def main() -> Job:
        job = _job()
        job.join("a")
        r = await job.exchange_keys("a", 0, new_keypair()[1], timeout=5)
        assert r["dropped"] and "at least 2 participants" in r["message"]
        assert job.sa_sum is None and job.version == 0
        return job

    asyncio.run(main())
