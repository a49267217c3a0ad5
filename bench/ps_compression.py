"""Compressed deltas: what each codec costs in accuracy, what it saves the parameter server, and
where a single in-scheduler server saturates.

    python -m bench.ps_compression            # accuracy (letter + 784-wide synthetic, 3 seeds),
                                              # server cost at 1e6 and 1e7 parameters, projection
    python -m bench.ps_compression --quick    # tiny smoke run
    python -m bench.ps_compression --parts server,projection   # skip the accuracy runs
    python -m bench.ps_compression --parts accuracy --datasets synthetic-784 --synthetic-rows 120000 --runs topk
                                              # a variant: its raw figures kept as ps_compression_variant-*

**Accuracy.** For each dataset and seed the pipeline trains end to end from the Zarr store on a
2-worker LocalCluster (1 thread each, sync mode, default settings otherwise: 8 local steps,
server SGD lr 1 on the sum of deltas, local Adam lr 1e-3) once per codec (``none`` = float32,
``fp16``, ``bf16``, ``topk`` at ``topk_fraction = 0.01`` and at 0.1 (the default), ``int8``; error feedback on), the
same epochs and so the same samples, and the test accuracy is compared with float32's *in the
same seed*; ``fp16 + replies``, ``bf16 + replies`` and ``int8 + replies`` also compress the
server's replies in that codec (``compress_replies``: the change of the weights every worker
holds, with the rounding of one reply sent in the next), held to the codec's own target. A
seed is one pass of the protocol (bench/protocol.py): every codec once, the order rotated by
one codec per seed, the machine's state recorded around it. Targets: within 0.5 points of
float32 for fp16/bf16, within 1 point for topk and int8, met only when the per-seed gap meets
it in at least ``ceil(0.8 x seeds)`` seeds (3 of 3). Datasets: ``letter`` (16,000 / 4,000,
MLP 16-256-128-26, batch 128, 4 epochs) and the 784-wide synthetic set (``pipeline.synth``,
uint8 like MNIST, 30,000 / 5,000 rows, MLP 784-256-128-10, batch 256, 2 epochs).

**Server cost.** ``bench.ps_limits``' zero-compute pushers (async, server SGD), one job per
codec and size (1e4 for the per-message cost, 1e6, 1e7 parameters), 1 and 2 pusher processes:
pushes/s, MB/s of wire bytes absorbed, median push latency, and the scheduler's CPU time per
push (its event-loop thread, and its whole process). Validation as in ``bench.ps_limits``: the
server's version equals its pushes and zero deltas leave the weights unchanged (every codec
decodes zeros to zeros).

**Projection.** From those per-push costs: the worker count at which one in-scheduler server
saturates (its CPU, or its NIC in either direction: the pushers' replies here are float32, as
without ``compress_replies``), for
a 1M- and a 100M-parameter MLP at local_steps 8, batch 256, on 10 GbE and 100 GbE, for CPU
workers (a single-threaded training step measured here) and GPU workers (an assumed A100 at
50% of its 19.5 TFLOP/s fp32). See the printed table's notes for every assumption; its shard
column is an estimate from these single-server costs, not a measurement of ``ps_shards``
(``bench.ps_shards`` measures that).
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import load, local_cluster, md_table, mnist_like, run_pipeline, tmpdir, write_out

CODECS = ("none", "fp16", "bf16", "topk", "int8")
# the share of the entries top-k keeps in the cost measurements (server, handler, encoding) and the
# projection; the configuration's default, ``TrainConfig.topk_fraction``, is 10 times that
COST_TOPK_FRACTION = 0.01
# accuracy runs: each codec, top-k at 1% ("topk") and at 10% (the default share), and the dense
# codecs with the replies compressed too (``compress_replies``)
DENSE = ("fp16", "bf16", "int8")
RUNS = (
    {c: {"compression": c} | ({"topk_fraction": 0.01} if c == "topk" else {}) for c in CODECS}
    | {"topk 10%": {"compression": "topk", "topk_fraction": 0.1}}
    | {f"{c} + replies": {"compression": c, "compress_replies": True} for c in DENSE}
)
TARGET_POINTS = {"fp16": 0.5, "bf16": 0.5, "topk": 1.0, "topk 10%": 1.0, "int8": 1.0} | {
    f"{c} + replies": {"fp16": 0.5, "bf16": 0.5, "int8": 1.0}[c] for c in DENSE
}
SIZES = (10_000, 1_000_000, 10_000_000)
PUSHERS = (1, 2)
GPU_FLOPS = 19.5e12 * 0.5  # A100 fp32 peak (non-tensor-core) at an assumed 50% utilisation
LINKS = {"10 GbE": 10e9 / 8, "100 GbE": 100e9 / 8}  # line rate, bytes/s each way
LOCAL_STEPS, BATCH = 8, 256
MODELS = {"1M": (784, (1024, 256), 10), "100M": (784, (8192, 8192, 3072), 10)}
# a GPU host's usable memory bandwidth for the shared host sum (assumed: a 2-socket server with 8
# DDR4-3200 channels a socket peaks at ~400 GB/s; a quarter of it, the rest left to the NICs and
# the GPUs' copies)
HOST_MEM_BW = 100e9
HOST_THREADS = 8  # a GPU host's worker process: one thread per GPU, the 8 threads sharing the sum


# -------------------------------------------------------------------------------------------
# accuracy
# -------------------------------------------------------------------------------------------


def _datasets(
    tmp: Any, quick: bool, names: Sequence[str] | None = None, synthetic_rows: int = 30_000
) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """The accuracy runs' datasets: letter and the 784-wide synthetic set (``synthetic_rows``
    training rows); ``names``: only those."""
    out = []
    if not quick:
        from bench.time_to_accuracy import prepare

        if names is None or "letter" in names:
            tr, te, _ = prepare("letter", tmp)
            out.append(("letter", tr, te, {"hidden": [256, 128], "batch_size": 128, "epochs": 4}))
        if names is None or "synthetic-784" in names:
            tr, te = mnist_like(tmp / "synth", synthetic_rows, 5_000, 784, 10)
            out.append(("synthetic-784", tr, te, {"hidden": [256, 128], "batch_size": 256, "epochs": 2}))
    else:
        tr, te = mnist_like(tmp / "synth", 3_000, 1_000, 64, 10)
        out.append(("synthetic-64", tr, te, {"hidden": [32, 16], "batch_size": 128, "epochs": 1}))
    return out


def accuracy(
    client: Any,
    seeds: Sequence[int],
    quick: bool,
    log: Any = print,
    datasets: Sequence[str] | None = None,
    synthetic_rows: int = 30_000,
    runs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Test accuracy per dataset, seed and codec, with the per-seed gap to float32 (``runs``:
    only those rows of :data:`RUNS`, float32 always among them)."""
    chosen = [r for r in RUNS if runs is None or r in runs or r == "none"]
    results: dict[str, Any] = {}
    with tmpdir("bench-compress-") as tmp:
        for name, train, test, settings in _datasets(tmp, quick, datasets, synthetic_rows):
            base = {**settings, "patience": 0, "validation_store": str(test.path), "min_share_gflop": 0.0}
            run_pipeline(client, test, tmp / "warm", **{**base, "epochs": 1, "validation_store": ""})
            passes = []
            for k, seed in enumerate(seeds):
                order = protocol.rotated(chosen, k)
                accs: dict[str, float] = {}
                with protocol.measure_pass() as cond:
                    for codec in order:
                        log(f"{name} seed {seed}: {codec}")
                        r = run_pipeline(client, train, tmp / "run", **base, seed=seed, **RUNS[codec])
                        accs[codec] = float(r["history"][-1]["val_accuracy"])  # the test store
                passes.append({"seed": seed, "order": order, "conditions": cond, "accuracy": accs})
            results[name] = {"settings": settings, "rows": [train.n_rows, test.n_rows], "passes": passes}
    return results


def accuracy_table(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results.items():
        passes = res["passes"]
        need = protocol.needed(len(passes))
        rows = []
        for codec in [r for r in RUNS if r in passes[0]["accuracy"]]:  # a variant runs some of them
            accs = [p["accuracy"][codec] for p in passes]
            gaps = [100 * (p["accuracy"]["none"] - p["accuracy"][codec]) for p in passes]
            row: dict[str, Any] = {"codec": codec}
            for p, a in zip(passes, accs, strict=True):
                row[f"seed {p['seed']} acc"] = a
            row["median acc"] = float(np.median(accs))
            if codec == "none":
                row["gap per seed (points)"] = "-"
                row["median gap"] = "-"
                row["target"] = "-"
            else:
                limit = TARGET_POINTS[codec]
                hits = sum(g <= limit for g in gaps)
                row["gap per seed (points)"] = " / ".join(f"{g:+.2f}" for g in gaps)
                row["median gap"] = f"{np.median(gaps):+.2f}"
                row["target"] = f"within {limit:g}: {'met' if hits >= need else 'NOT met'} ({hits} of {len(gaps)})"
            rows.append(row)
        s = res["settings"]
        fmt = {k: ".4f" for r in rows for k in r if k.endswith("acc")}
        lines.append(
            f"**{name}** ({res['rows'][0]:,} / {res['rows'][1]:,} rows, hidden {s['hidden']}, batch "
            f"{s['batch_size']}, {s['epochs']} epochs, sync, 2 workers; a positive gap = below float32)\n\n"
            + md_table(rows, fmt)
            + "\n\nConditions per seed (pass):\n\n"
            + protocol.conditions_table(
                [{"pass": p["seed"], "order": p["order"], "conditions": p["conditions"]} for p in passes]
            )
        )
    return "\n\n".join(lines)


# -------------------------------------------------------------------------------------------
# server cost
# -------------------------------------------------------------------------------------------


def server_cost(sizes: Sequence[int], pushers: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    from bench.ps_limits import measure

    rows = []
    for nw in pushers:
        with local_cluster(nw) as client:
            for n in sizes:
                for codec in CODECS:
                    r = measure(client, nw, n, seconds, compression=codec, topk_fraction=COST_TOPK_FRACTION)
                    rows.append({"codec": codec, **{k: v for k, v in r.items() if k != "codec"}})
    return rows


# -------------------------------------------------------------------------------------------
# projection
# -------------------------------------------------------------------------------------------


def n_params(model: tuple[int, tuple[int, ...], int]) -> int:
    widths = [model[0], *model[1], model[2]]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def cpu_step_flops(quick: bool) -> dict[str, float]:
    """FLOP/s one single-threaded worker reaches on the 1M-parameter MLP (batch 256, Adam),
    counted as 6 FLOP per parameter per sample."""
    from threadpoolctl import threadpool_limits

    from kernels.mlp import MLPSpec, MLPTrainer

    f, hidden, out = MODELS["1M"] if not quick else (64, (64,), 10)
    spec = MLPSpec(f, hidden, out, loss="softmax_ce")
    tr = MLPTrainer(spec, backend="cpu", lr=1e-3, max_batch=BATCH, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, f), dtype=np.float32)
    y = rng.integers(0, out, BATCH).astype(np.int32)
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1):
            for _ in range(3):
                tr.step(X, y)
            reps, t, c = (5 if quick else 30), time.perf_counter(), time.process_time()
            for _ in range(reps):
                tr.step(X, y)
            wall, step = (time.perf_counter() - t) / reps, (time.process_time() - c) / reps
    finally:
        numba.set_num_threads(threads)
    p = n_params((f, hidden, out))
    return {"params": p, "step_s": step, "step_wall_s": wall, "flops": 6 * p * BATCH / step}


def _fit(rows: list[dict[str, Any]], codec: str, key: str, params: int) -> tuple[float, float]:
    """A per-push cost as ``a + b * params``: ``a`` (the per-message part) is ``codec``'s figure
    at the smallest size measured, ``b`` the per-parameter rest at the measured size nearest to
    ``params`` (nearest on a log scale; the costs are not linear over 1e4..1e7 on a machine whose
    caches and memory bandwidth are shared). Per size the smaller of the pusher counts' figures
    is taken (the least disturbed)."""
    sizes = sorted({r["params"] for r in rows if r["codec"] == codec})

    def at(n: int) -> float:
        return min(r[key] for r in rows if r["codec"] == codec and r["params"] == n)

    a = at(sizes[0]) if len(sizes) > 1 else 0.0
    near = min(sizes[1:] or sizes, key=lambda n: abs(math.log(n / params)))
    return a, max(0.0, (at(near) - a) / near)


def handler_cost(n: int, reps: int = 20) -> list[dict[str, Any]]:
    """The push handler's own CPU per codec, in this process, no sockets: a :class:`Job` (async,
    server SGD) given a delta as the scheduler receives it (a ``Serialized`` per frame). Split
    into decoding (header checks included) and the rest of the handler (finite check, the step,
    the reply's copy of the weights). Thread CPU time, the best of ``reps``."""
    import asyncio

    from distributed.protocol.serialize import Serialize, Serialized, serialize

    from pipeline.ps.job import Job
    from pipeline.ps.wire import compress, decode_delta

    def remote(wire: Any) -> Any:
        def one(v: Any) -> Any:
            return Serialized(*serialize(v.data, serializers=["dask"])) if isinstance(v, Serialize) else v

        return {k: one(v) for k, v in wire.items()} if isinstance(wire, dict) else one(wire)

    delta = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    out = []
    for codec in CODECS:
        wire = remote(compress(delta, codec, COST_TOPK_FRACTION)[0])

        async def go(wire: Any = wire, codec: str = codec) -> tuple[float, float]:
            job = Job.create(
                "cost", np.zeros(n, np.float32), n, mode="async", compression=codec, topk_fraction=COST_TOPK_FRACTION
            )
            job.join("p")
            dec, tot = [], []
            for _ in range(reps):
                t = time.thread_time()
                decode_delta(wire, n, codec, COST_TOPK_FRACTION)
                dec.append(time.thread_time() - t)
                t = time.thread_time()
                await job.push("p", job.version, wire, samples=1, loss=0.0)
                tot.append(time.thread_time() - t)
            return min(dec), min(tot)

        dec, tot = asyncio.run(go())
        out.append({"codec": codec, "params": n, "decode ms": 1e3 * dec, "whole handler ms": 1e3 * tot})
    return out


def encode_note() -> str:
    """The header of the encoding-cost table: what is timed, and at which top-k share."""
    from pipeline.config import TrainConfig

    share = f"top-k at {COST_TOPK_FRACTION:.0%} of the entries"
    if COST_TOPK_FRACTION == TrainConfig().topk_fraction:
        share += ", the default"
    return (
        "Per codec: the whole compressor a training task runs per push (residual added, delta encoded, "
        "decoded copy, new residual), and the encoder alone beside the NumPy expression it replaced "
        "(`kernels.codec`'s references; fp16: NumPy's `astype`), timed alternately; thread CPU time, best "
        f"of the repetitions ({share})."
    )


def encode_cost(n: int, reps: int = 10) -> list[dict[str, Any]]:
    """What a push's encoding costs the worker that sends it, per codec: the whole compressor
    (:class:`pipeline.ps.wire.DeltaCompressor`: the residual added, the delta encoded, the
    decoded copy and the new residual: what a training task runs per push), and the encoder alone
    beside the NumPy expression it replaced (``kernels.codec``'s references; fp16: NumPy's
    ``astype``), the two timed alternately in the same loop. Thread CPU time, best of ``reps``."""
    from kernels.codec import bf16_encode, bf16_encode_reference, topk, topk_reference
    from kernels.half import to_half
    from pipeline.ps.wire import DeltaCompressor, topk_count

    delta = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    k = topk_count(n, COST_TOPK_FRACTION)
    pairs = {
        "fp16": (lambda: to_half(delta), lambda: delta.astype(np.float16)),
        "bf16": (lambda: bf16_encode(delta), lambda: bf16_encode_reference(delta)),
        "topk": (lambda: topk(delta, k), lambda: topk_reference(delta, k)),
    }

    def timed(fn: Any) -> float:
        t = time.thread_time()
        fn()
        return time.thread_time() - t

    out = []
    for codec in CODECS[1:]:
        comp = DeltaCompressor(codec, COST_TOPK_FRACTION)
        comp(delta)  # loads the compiled loops; starts the residual
        whole, enc, ref = [], [], []
        for _ in range(reps):
            whole.append(timed(lambda c=comp: c(delta)))
            if codec in pairs:
                enc.append(timed(pairs[codec][0]))
                ref.append(timed(pairs[codec][1]))
        row: dict[str, Any] = {"codec": codec, "params": n, "worker ms/push (compressor)": 1e3 * min(whole)}
        row["encoder ms"] = 1e3 * min(enc) if enc else math.nan
        row["NumPy encoder ms"] = 1e3 * min(ref) if ref else math.nan
        out.append(row)
    return out


def reply_cost(n: int, reps: int = 20) -> list[dict[str, Any]]:
    """What ``compress_replies`` costs the server once per round and saves per reply: a sync
    :class:`Job` with each dense ``reply_codec`` whose weights moved since its last reply; the
    encoding of the change (:meth:`pipeline.ps.job.Job.held_weights`, once per version whatever
    the number of workers) in thread CPU time, best of ``reps``, and a reply's payload bytes
    against float32 weights."""
    from pipeline.ps.job import Job, _wire_bytes

    rng = np.random.default_rng(0)
    out = []
    for codec in ("fp16", "bf16", "int8"):
        job = Job.create("reply", rng.standard_normal(n).astype(np.float32), n, mode="sync", reply_codec=codec)
        times = []
        for _ in range(reps):
            job.params += (rng.standard_normal(n) * 1e-3).astype(np.float32)
            job.version += 1
            t = time.thread_time()
            held = job.held_weights()
            times.append(time.thread_time() - t)
        wire = _wire_bytes(job.held_wire, held)
        out.append(
            {
                "codec": codec,
                "params": n,
                "encode ms per round": 1e3 * min(times),
                "reply MB": wire / 1e6,
                "float32 reply MB": 4 * n / 1e6,
            }
        )
    return out


def summed_cost(n: int, k: int = 8, reps: int = 10) -> dict[str, Any]:
    """What summing ``k`` tasks' deltas into one push (``combine_pushes``) costs and saves, at
    ``n`` parameters, in this process (no sockets): the server's CPU for a sync round of ``k``
    pushes, of one push carrying ``k - 1`` co-senders, and of a one-participant round's single
    push (each delta as the scheduler receives it, a ``Serialized`` frame; the round applied in
    each), so a co-sender's own bookkeeping is ``(summed - one) / (k - 1)``; and the worker's CPU
    to sum the ``k`` deltas (:func:`pipeline.worker.weighted_mean`). Thread CPU time, best of
    ``reps``."""
    import asyncio

    from distributed.protocol.serialize import Serialized, serialize

    from pipeline.ps.job import Job
    from pipeline.worker import weighted_mean

    rng = np.random.default_rng(0)
    deltas = [(rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(k)]
    wires = [Serialized(*serialize(d, serializers=["dask"])) for d in deltas]
    names = [f"p{i}" for i in range(k)]

    async def round_cost(pushes: int, summed: bool) -> float:
        job = Job.create("cost", np.zeros(n, np.float32), n, mode="sync")
        for name in names[:pushes]:
            job.join(name)
        best = math.inf
        for _ in range(reps):
            t = time.thread_time()
            if summed:
                also = [{"name": m, "samples": 256, "batches": 1, "loss": 1.0, "timings": {}} for m in names[1:pushes]]
                await job.push(names[0], job.version, wires[0], samples=256, batches=1, loss=1.0, wait=False, also=also)
            else:
                for name, wire in zip(names[:pushes], wires, strict=False):
                    await job.push(name, job.version, wire, samples=256, batches=1, loss=1.0, wait=False)
            best = min(best, time.thread_time() - t)
        return best

    sep = asyncio.run(round_cost(k, False))
    summed = asyncio.run(round_cost(k, True))
    one = asyncio.run(round_cost(1, False))
    host = math.inf
    out = np.empty(n, np.float32)
    for _ in range(reps):
        t = time.thread_time()
        weighted_mean(deltas, [256] * k, out)
        host = min(host, time.thread_time() - t)
    return {
        "params": n,
        "tasks": k,
        f"{k} pushes ms": 1e3 * sep,
        "1 summed push ms": 1e3 * summed,
        "1-task round ms": 1e3 * one,
        "co-sender ms": 1e3 * max(0.0, summed - one) / (k - 1),
        "host sum ms": 1e3 * host,
        "host sum, 2 threads sharing ms": 1e3 * shared_sum_seconds(deltas, out, 2, reps),
    }


def shared_sum_seconds(deltas: list[np.ndarray], out: np.ndarray, threads: int, reps: int) -> float:
    """Wall seconds of the sum of ``deltas`` shared by ``threads`` threads, each summing one slice
    as the tasks of a push group do (:class:`pipeline.worker.PushGroup`, its slices and compiled
    sum), from their common start to the last slice's end; best of ``reps``."""
    from pipeline.worker import _SumJob, shares_of

    group = [(f"p{i}", {"delta": d}) for i, d in enumerate(deltas)]
    shares = shares_of([256] * len(deltas))
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps + 1):  # the first: the threads start and the kernel loads
            job = _SumJob(0, group, shares, out, threads)
            start = threading.Barrier(threads + 1)

            def part(i: int, job: _SumJob = job, start: threading.Barrier = start) -> tuple[float, float]:
                start.wait()
                t = time.perf_counter()
                job.sum(i)
                return t, time.perf_counter()

            futs = [pool.submit(part, i) for i in range(threads)]
            start.wait()
            spans = [f.result() for f in futs]
            best = min(best, max(b for _, b in spans) - min(a for a, _ in spans))
    return best


def _summed_seconds(summed: list[dict[str, Any]] | None, params: int) -> tuple[float, float, float | None]:
    """(a co-sender's server seconds, one thread's seconds to sum 8 deltas, the same sum shared by
    a GPU host's 8 threads) at ``params``: the co-sender's cost at the smallest measured size (its
    bookkeeping does not touch the vector; at larger sizes the difference of two rounds' times is
    mostly their vector work's noise), the sum scaled linearly from the nearest measured size;
    shared, one thread's time over 8, but no faster than the 8 deltas read and the sum written
    at the host's assumed memory bandwidth (``HOST_MEM_BW``). Zeros without figures (an older
    run); no shared figure from a run before the sum was shared."""
    if not summed:
        return 0.0, 0.0, None
    small = min(summed, key=lambda r: r["params"])
    near = min(summed, key=lambda r: abs(math.log(r["params"] / params)))
    one = near["host sum ms"] / 1e3 * params / near["params"]
    shared = max(one / HOST_THREADS, 4.0 * params * (HOST_THREADS + 1) / HOST_MEM_BW)
    return small["co-sender ms"] / 1e3, one, shared if "host sum, 2 threads sharing ms" in near else None


def _encode_seconds(encode: list[dict[str, Any]] | None, codec: str, params: int) -> float:
    """The worker's seconds per push to encode ``params`` parameters in ``codec``: the compressor's
    measured time at the size nearest ``params`` (log scale), scaled linearly to ``params`` (every
    encoder is a fixed number of passes over the vector). 0 for float32, or without figures (a
    kept run from before they were measured)."""
    got = [r for r in encode or () if r["codec"] == codec]
    if codec == "none" or not got:
        return 0.0
    near = min(got, key=lambda r: abs(math.log(r["params"] / params)))
    return near["worker ms/push (compressor)"] / 1e3 * params / near["params"]


def _reply_seconds(replies: list[dict[str, Any]] | None, codec: str, params: int) -> float | None:
    """The server's seconds to encode one round's compressed reply of ``params`` parameters in
    ``codec`` (:func:`reply_cost`'s figures, scaled linearly from the nearest measured size), or
    None where none was measured (a codec replies cannot use, or a run from before)."""
    got = [r for r in replies or () if r["codec"] == codec]
    if not got:
        return None
    near = min(got, key=lambda r: abs(math.log(r["params"] / params)))
    return near["encode ms per round"] / 1e3 * params / near["params"]


def _reply_bytes(codec: str, params: int) -> float:
    """A compressed reply's payload: fp16 and bf16 2 bytes a parameter, int8 1 plus a float32
    scale per block (:func:`pipeline.ps.wire.compress`)."""
    from pipeline.ps.wire import INT8_BLOCK

    return float(params + 4 * -(-params // INT8_BLOCK)) if codec == "int8" else 2.0 * params


def projection(
    rows: list[dict[str, Any]],
    cpu: dict[str, float],
    encode: list[dict[str, Any]] | None = None,
    summed: list[dict[str, Any]] | None = None,
    replies: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Workers at which one in-scheduler server saturates, per model, worker kind, codec and link.

    A worker (overlap off, the default) pushes every ``compute + encode + latency`` seconds:
    its steps, the encoding of the delta on its CPU (``encode``: :func:`encode_cost`'s figures;
    a GPU worker's delta is encoded on its host's CPU too), and the push's own cost: its bytes in
    over the link, the scheduler's CPU for it, the float32 reply back over the link (queueing
    excluded: it only starts at saturation). The server's CPU saturates at ``period /
    cpu_per_push`` workers, its link at ``period x bandwidth / max(bytes in, bytes out)``; the
    smaller binds. With ``compress_replies`` (sync, the dense codecs; ``replies``:
    :func:`reply_cost`'s figures) the reply carries the change of the weights in the codec: fewer
    bytes out, and the server encodes it once a round, ``e`` seconds shared by the round's ``N``
    pushes, so its CPU saturates at ``(period - e) / cpu_per_push`` workers."""
    out = []
    for mname, model in MODELS.items():
        p = n_params(model)
        for kind, flops in (("CPU", cpu["flops"]), ("GPU", GPU_FLOPS)):
            steps = LOCAL_STEPS * 6 * p * BATCH / flops  # seconds of steps between two pushes
            for codec in CODECS:
                enc = _encode_seconds(encode, codec, p)
                compute = steps + enc
                ca, cb = _fit(rows, codec, "sched ms/push (process)", p)
                ba, bb = _fit(rows, codec, "MB/push", p)
                cpu_push = (ca + cb * p) / 1e3  # scheduler seconds per push
                bytes_in = (ba + bb * p) * 1e6
                bytes_out = 4.0 * p  # the reply: float32 weights
                row: dict[str, Any] = {
                    "model": mname,
                    "workers": kind,
                    "codec": codec,
                    "compute ms/push": 1e3 * steps,
                    "encode ms/push": 1e3 * enc,
                    "MB in/out per push": f"{bytes_in / 1e6:.2f} / {bytes_out / 1e6:.1f}",
                    "sched ms/push": 1e3 * cpu_push,
                }
                for link, bw in LINKS.items():
                    period = compute + cpu_push + (bytes_in + bytes_out) / bw
                    n_cpu = period / cpu_push
                    n_nic = period * bw / max(bytes_in, bytes_out)
                    row[f"N {link}"] = min(n_cpu, n_nic)
                    row[f"binds {link}"] = "CPU" if n_cpu <= n_nic else "link"
                e = _reply_seconds(replies, codec, p) if codec in DENSE else None
                for link, bw in LINKS.items():
                    key = f"N {link}, replies compressed"
                    if e is None:
                        row[key] = "n/a" if codec in ("none", "topk") else "not measured"
                        continue
                    out_c = _reply_bytes(codec, p)
                    period = compute + cpu_push + (bytes_in + out_c) / bw
                    n_cpu = max(0.0, period - e) / cpu_push
                    n_nic = period * bw / max(bytes_in, out_c)
                    row[key] = min(n_cpu, n_nic)
                # sharded (estimate): S shards, each with its own CPU and link; a push costs every
                # shard the per-message part ``ca`` and 1/S of the per-byte parts (CPU and link)
                bw = LINKS["100 GbE"]
                period = compute + cpu_push + (bytes_in + bytes_out) / bw
                budget = period / 64 - ca / 1e3  # one shard's seconds per push left for its bytes at 64 workers
                per_byte = max(cb * p / 1e3, max(bytes_in, bytes_out) / bw)
                need = per_byte / budget if budget > 0 else math.inf
                row["shards for 64, 100 GbE (estimate)"] = (
                    "never (per-message cost)" if need == math.inf else math.ceil(need)
                )
                # what 64 workers allow one server per push (100 GbE period): the whole budget, and
                # with the 8 workers of each host summed before they push (8 pushes a round, not 64);
                # against the measured per-message part ``ca`` no data path on Python messages meets it
                row["budget ms/push at 64"] = 1e3 * period / 64
                row["budget ms/push, 8 per host summed"] = 1e3 * period / 8
                row["per-message ms"] = ca  # already ms
                # combine_pushes: each host's 8 workers (one worker process, 8 threads) push once;
                # the push carries 7 co-senders (their bookkeeping measured); the 8 deltas are summed
                # on the host before the push: at GPU speed (not built: free here) or on its CPU
                # (measured: it lengthens every worker's push period)
                co, host_sum, shared = _summed_seconds(summed, p)
                row["co-senders ms/push"] = 7e3 * co
                row["host sum ms/push (CPU)"] = 1e3 * host_sum
                if shared is not None:  # the host's threads share the sum (runs since it is built)
                    row["host sum ms/push, 8 threads sharing (estimate)"] = 1e3 * shared
                    # the host memory bandwidth the shared sum needs to take no longer than the steps
                    row["host GB/s for the sum within the steps"] = 4.0 * p * (HOST_THREADS + 1) / steps / 1e9
                    host_sum = shared
                for label, extra in (("", 0.0), (", host sum on CPU", host_sum)):
                    budget8 = (period + extra) / 8 - ca / 1e3 - 7 * co
                    need8 = per_byte / budget8 if budget8 > 0 else math.inf
                    key = f"shards for 64, 8 per host summed{label} (estimate)"
                    if codec != "none":  # combine_pushes sums float32 deltas only
                        row[key] = "n/a (float32 only)"
                    else:
                        row[key] = "never (per-message cost)" if need8 == math.inf else math.ceil(need8)
                out.append(row)
    return out


def projection_text(proj: list[dict[str, Any]], cpu: dict[str, float]) -> str:
    fmt = {
        "compute ms/push": ".2f",
        "encode ms/push": ".2f",
        "sched ms/push": ".2f",
        "budget ms/push at 64": ".3f",
        "budget ms/push, 8 per host summed": ".3f",
        "per-message ms": ".2f",
        "co-senders ms/push": ".3f",
        "host sum ms/push (CPU)": ".2f",
        "host sum ms/push, 8 threads sharing (estimate)": ".2f",
        "host GB/s for the sum within the steps": ".1f",
    }
    fmt.update({f"N {link}": ",.1f" for link in LINKS})
    fmt.update({f"N {link}, replies compressed": ",.1f" for link in LINKS})
    gpu1m = {r["codec"]: r for r in proj if r["model"] == "1M" and r["workers"] == "GPU"}
    verdict = []
    for codec in ("none", *[c for c in CODECS if c != "none"]):
        n = gpu1m[codec]["N 100 GbE"]
        verdict.append(f"{codec}: {'met' if n >= 64 else 'NOT met'} (saturates at ~{n:,.1f} GPU workers)")
    return (
        f"Assumptions: local_steps {LOCAL_STEPS}, batch {BATCH}, 6 FLOP per parameter per sample; CPU worker = "
        f"one single-threaded process at {cpu['flops'] / 1e9:.1f} GFLOP/s (measured here: a "
        f"{cpu['params']:,}-parameter MLP step took {1e3 * cpu['step_s']:.2f} ms of CPU, "
        f"{1e3 * cpu['step_wall_s']:.2f} ms wall on this shared machine; the kernels alone, no loader: a real "
        f"worker pushes less often); GPU worker = an assumed A100 at 50% of 19.5 TFLOP/s fp32 = "
        f"{GPU_FLOPS / 1e12:.2f} TFLOP/s. Models: 1M = MLP {MODELS['1M']} ({n_params(MODELS['1M']):,} "
        f"parameters), 100M = MLP {MODELS['100M']} ({n_params(MODELS['100M']):,}). A worker (overlap off, the "
        "default) pushes every compute + encode + latency: its steps, the encoding of its delta on its CPU "
        "(measured here per codec, the whole compressor with error feedback, scaled linearly from the nearest "
        "measured size; a GPU worker's delta is encoded on its host's CPU too, so a slow encoder makes the "
        "worker, not the server, the bottleneck), and the push's own cost: its bytes in over "
        "the link, the scheduler's CPU for it, the float32 reply back (queueing excluded). Scheduler CPU per "
        "push (whole process) and wire bytes per push as a + b x params: a = the 1e4 cell (the per-message "
        "part), b = the per-parameter rest at the nearest measured size (1e6 for 1M, 1e7 for 100M: an "
        "extrapolation), per size the smaller of the 1- and 2-pusher figures. "
        "N = workers at which the server saturates, "
        "the smaller of its CPU (period / CPU per push) and its link (period x line rate / the larger of bytes "
        "in and out); 'binds' says which. Replies are float32 by default whatever the codec; 'N ..., replies "
        "compressed' is the same with `compress_replies` (sync, fp16, bf16 or int8: the reply is the change of "
        "the weights in the codec, encoded by the server once a round, that time shared by the round's pushes; "
        "n/a for top-k and float32, 'not measured' for a run that kept no reply costs). The CPU figures come "
        "from a shared 2-core machine under load (see the load average above): a dedicated core does better, "
        "so read N as a lower bound within a factor of ~2. "
        "Sharding (`ps_shards`) cannot add cores on a 2-core machine: 'shards for 64' keeps the per-message CPU "
        "part whole on every shard and divides the per-byte parts (CPU and link) by the shard count; it is an "
        "estimate, not a measurement.\n\n"
        + md_table(proj, fmt)
        + "\n\nTarget 'the server is not the bottleneck up to 64 GPU workers for the 1M-parameter model at "
        "local_steps 8' (single in-scheduler server, 100 GbE): " + "; ".join(verdict) + ". "
        "'budget ms/push at 64' is the server time one push may take for 64 workers to keep it busy at "
        "most all the time (the push period over 64); ', 8 per host summed' is the same if each host's 8 "
        "workers summed their deltas before one push (8 pushes a round); 'per-message ms' is the measured "
        "cost of a message of any size (the 1e4-parameter cell); 'shards for 64, 8 per host summed' is the "
        "shard estimate above with 8 pushes a round instead of 64 (`combine_pushes`, one worker process of 8 "
        "threads per host; float32 deltas only), each push also paying its 7 co-senders' bookkeeping "
        "('co-senders ms/push', measured) and the host's 8 deltas summed at GPU speed (not built: counted as "
        "free); ', host sum on CPU' is the same with the sum on the host's CPU as built, which lengthens every "
        "worker's push period (where it is longer than the steps the host's CPU, not the server, sets the "
        "pace): 'host sum ms/push (CPU)' is one thread's sum (measured, scaled linearly), '8 threads sharing' "
        "the same sum divided among the host's 8 threads as the push group does (each thread a slice; one "
        "thread's time over 8, but no faster than reading the 8 deltas and writing the sum at an assumed "
        f"{HOST_MEM_BW / 1e9:.0f} GB/s of host memory bandwidth; the table of summed pushes above gives the "
        "2-thread sharing measured here; 'host GB/s for the sum within the steps' is the bandwidth below which "
        "the shared sum would pace the workers). A GPU host runs one worker process with a thread per GPU "
        "(`kernels.cuda.bind_thread`): a slower GPU step than the one assumed (the CUDA backend's launches "
        "from Python, shared by the host's threads) only lengthens the period and lightens the server. "
        "Where the budget is below the per-message "
        "cost, no sharding or compression of this design meets the target: the vectors would have to travel "
        "outside Python messages (a collective such as an allreduce between the workers). " + summed_verdict(proj)
    )


def summed_verdict(proj: list[dict[str, Any]]) -> str:
    """The 64-GPU target for the 1M model with each host's 8 workers summed and the server sharded."""
    row = next(r for r in proj if r["model"] == "1M" and r["workers"] == "GPU" and r["codec"] == "none")
    free = row["shards for 64, 8 per host summed (estimate)"]
    cpu = row["shards for 64, 8 per host summed, host sum on CPU (estimate)"]
    big = next(r for r in proj if r["model"] == "100M" and r["workers"] == "GPU" and r["codec"] == "none")
    big_free = big["shards for 64, 8 per host summed (estimate)"]
    shared = row.get("host sum ms/push, 8 threads sharing (estimate)")
    host = row["host sum ms/push (CPU)"] if shared is None else shared
    paced = host > row["compute ms/push"]
    met = isinstance(cpu, int) and not paced and shared is not None
    cpu1m = next(r for r in proj if r["model"] == "1M" and r["workers"] == "CPU" and r["codec"] == "none")
    how = "one thread's sum" if shared is None else "the sum shared by the host's 8 threads"
    return (
        "With `combine_pushes` (8 per host) and shards, 64 GPU workers on the 1M model need "
        f"{free} shards with each host's sum at GPU speed or {cpu} with {how} on its CPU "
        f"({host:.2f} ms a push against {row['compute ms/push']:.2f} ms of steps"
        + (", so the sum paces the workers instead of the server)" if paced else ")")
        + (
            "; a GPU host runs one worker process with a thread per GPU, each thread on its own device: "
            + ("met (an estimate)" if met else "NOT met")
            if shared is not None
            else "; as built neither applies to GPUs (the CUDA backend drove one device per process): NOT met"
        )
        + ". 64 CPU workers on the 1M model, "
        f"summed 8 per host as built, need {cpu1m['shards for 64, 8 per host summed, host sum on CPU (estimate)']} "
        f"shard(s) (one server saturates at {cpu1m['N 100 GbE']:.1f} without summing). The 100M model on GPUs: "
        f"{big_free} or {big['shards for 64, 8 per host summed, host sum on CPU (estimate)']} shards "
        "(estimates: this machine has 2 cores and cannot run that many shards)."
    )


def reproject(path: str | os.PathLike) -> str:
    """The projection recomputed from a kept JSON's measured server rows and CPU step (no new
    measurement): for a table whose columns changed after the run."""
    import json

    d = json.loads(Path(path).read_text())
    if "server" not in d or "cpu_step" not in d:
        raise SystemExit(f"{path}: no server rows and CPU step kept (run with --parts server,projection)")
    proj = projection(d["server"], d["cpu_step"], d.get("encode"), d.get("summed"), d.get("replies"))
    return projection_text(proj, d["cpu_step"])


# -------------------------------------------------------------------------------------------


def results_name(
    datasets: Sequence[str] | None = None, synthetic_rows: int = 30_000, runs: Sequence[str] | None = None
) -> str:
    """``ps_compression`` for a default run (the one the targets table judges),
    ``ps_compression_variant`` for a run of other datasets, rows or codecs."""
    variant = datasets is not None or synthetic_rows != 30_000 or runs is not None
    return "ps_compression_variant" if variant else "ps_compression"


def run(
    quick: bool = False,
    parts: Sequence[str] = ("accuracy", "server", "projection"),
    seeds: Sequence[int] = (0, 1, 2),
    seconds: float = 3.0,
    datasets: Sequence[str] | None = None,
    synthetic_rows: int = 30_000,
    runs: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    sizes, pushers = SIZES, PUSHERS
    if quick:
        seeds, sizes, pushers, seconds = tuple(seeds)[:2], (10_000, 100_000), (1,), 0.5
    meta = protocol.meta()
    payload: dict[str, Any] = {"meta": meta, "quick": quick}
    load0 = load()
    texts = []
    if "accuracy" in parts:
        with local_cluster(2) as client:
            payload["accuracy"] = accuracy(client, seeds, quick, print, datasets, synthetic_rows, runs)
    rows: list[dict[str, Any]] = []
    if "server" in parts or "projection" in parts:
        rows = server_cost(sizes, pushers, seconds)
        payload["server"] = rows
    if "server" in parts:
        payload["handler"] = [r for n in sizes for r in handler_cost(n, 5 if quick else 20)]
        payload["replies"] = [r for n in sizes for r in reply_cost(n, 5 if quick else 20)]
    if "server" in parts or "projection" in parts:
        payload["encode"] = [r for n in sizes[1:] for r in encode_cost(n, 3 if quick else 10)]
        payload["summed"] = [summed_cost(n, 8, 3 if quick else 10) for n in sizes]
    if "projection" in parts:
        cpu = cpu_step_flops(quick)
        payload["cpu_step"] = cpu
        payload["projection"] = projection(rows, cpu, payload["encode"], payload["summed"], payload.get("replies"))
    name = results_name(datasets, synthetic_rows, runs)
    path = protocol.save_json(name + ("-quick" if quick else ""), payload, quick=quick)
    meta["json"] = str(path)
    head = "\n".join(protocol.provenance_lines(meta)) + f"\nLoad average before {load0:.2f}, after {load():.2f}."
    if "accuracy" in parts:
        texts.append("### Accuracy after the same samples, per codec\n\n" + accuracy_table(payload["accuracy"]))
    if rows:
        fmt = {
            "params": ".0e",
            "MB/push": ".3f",
            "pushes/s": ",.0f",
            "MB/s in": ",.0f",
            "median push ms": ".2f",
            "sched ms/push (loop)": ".2f",
            "sched ms/push (process)": ".2f",
        }
        texts.append(
            f"### What the scheduler absorbs per codec\n\nasync, server SGD, zero-compute pushers, {seconds:g} s "
            "window per cell; MB/push = wire bytes of one delta; sched ms/push = the scheduler's CPU time per "
            "push (event-loop thread; whole process, which also holds the idle driver and the thread that "
            "deserializes messages over 10 MiB)\n\n" + md_table(rows, fmt)
        )
    if payload.get("handler"):
        texts.append(
            "### The push handler's own CPU per codec (in this process, no sockets)\n\n"
            "A `Job` (async, server SGD) handed each codec's delta as the scheduler receives it; thread CPU "
            "time, best of the repetitions. The rest of the handler (finite check, server step, the reply's "
            "copy of the weights) works on float32 vectors of the full length whatever the codec.\n\n"
            + md_table(payload["handler"], {"params": ".0e", "decode ms": ".2f", "whole handler ms": ".2f"})
        )
    if payload.get("encode"):
        texts.append(
            "### What encoding a push costs the worker\n\n"
            + encode_note()
            + "\n\n"
            + md_table(
                payload["encode"],
                {"params": ".0e", "worker ms/push (compressor)": ".2f", "encoder ms": ".2f", "NumPy encoder ms": ".2f"},
            )
        )
    if payload.get("summed"):
        texts.append(
            "### Summed pushes (`combine_pushes`): what one push for 8 tasks costs and saves\n\n"
            "A sync `Job` in this process (no sockets), each delta as the scheduler receives it: the server's CPU "
            "for a round of 8 pushes, for the same round as one push naming 7 co-senders, and for a one-task "
            "round's single push (each round applied); a co-sender's own bookkeeping = (summed - one task) / 7. "
            "'host sum ms' is the worker's CPU to sum the 8 deltas before the push "
            "(`pipeline.worker.weighted_mean`, one thread), '2 threads sharing' the wall time of the same sum "
            "divided between two threads as a push group divides it (`pipeline.worker.PushGroup`: a slice each). "
            "Thread CPU time, best of the repetitions. On a "
            "cluster each push is also a message: the per-message cost of the table above (~0.5 ms) is paid "
            "once per summed push instead of 8 times.\n\n"
            + md_table(
                payload["summed"],
                {
                    "params": ".0e",
                    "8 pushes ms": ".3f",
                    "1 summed push ms": ".3f",
                    "1-task round ms": ".3f",
                    "co-sender ms": ".4f",
                    "host sum ms": ".2f",
                    "host sum, 2 threads sharing ms": ".2f",
                },
            )
        )
    if payload.get("replies"):
        texts.append(
            "### Compressed replies (`compress_replies`): the server's cost per round and the bytes per reply\n\n"
            "A sync `Job` with each `reply_codec` whose weights moved since the last reply: encoding the change "
            "of the workers' common weights (once per version, whatever the number of workers; thread CPU time, "
            "best of the repetitions) and the payload of one reply against float32 weights.\n\n"
            + md_table(
                payload["replies"],
                {"params": ".0e", "encode ms per round": ".2f", "reply MB": ".3f", "float32 reply MB": ".3f"},
            )
        )
    if "projection" in parts:
        texts.append("### Where one in-scheduler server saturates\n\n" + projection_text(payload["projection"], cpu))
    return head + "\n\n" + "\n\n".join(texts), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_compression", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--parts", default="accuracy,server,projection")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per server cell")
    ap.add_argument("--reproject", metavar="JSON", help="print the projection recomputed from a kept run's figures")
    ap.add_argument("--datasets", default="", help="accuracy: comma-separated letter, synthetic-784 (default both)")
    ap.add_argument("--synthetic-rows", type=int, default=30_000, help="accuracy: the synthetic set's training rows")
    names = ", ".join(RUNS).replace("%", "%%")  # argparse formats help with %
    ap.add_argument("--runs", default="", help=f"accuracy: comma-separated rows of {names} (default all)")
    args = ap.parse_args(argv)
    if args.reproject:
        text = reproject(args.reproject)
        print(text)
        return text
    datasets = [d for d in args.datasets.split(",") if d] or None
    runs = [r for r in args.runs.split(",") if r] or None
    if runs and (bad := [r for r in runs if r not in RUNS]):
        raise SystemExit(f"unknown --runs {bad}; choose from {', '.join(RUNS)}")
    text, _ = run(
        args.quick,
        args.parts.split(","),
        tuple(int(s) for s in args.seeds.split(",")),
        args.seconds,
        datasets,
        args.synthetic_rows,
        runs,
    )
    print(text)
    write_out(results_name(datasets, args.synthetic_rows, runs) + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
