"""What the scheduler's parameter server absorbs: pushes/s and MB/s against parameter count and
the number of pushing worker processes.

    python -m bench.ps_limits            # 1e4..1e7 parameters x 1, 2, 4, 8 worker processes
    python -m bench.ps_limits --quick    # tiny smoke run
    python -m bench.ps_limits --optimizer adam --sizes 1e6,1e7 --workers 1   # server Adam's cost

For each number of workers a LocalCluster of that many single-threaded worker processes is
started with ``pipeline.ps`` preloaded into its scheduler; for each parameter count an
``async`` job (server SGD lr 1, or ``--optimizer momentum|adam``) is created and one task per worker joins it
and pushes zero-compute
deltas back to back through ``worker.scheduler.ps_push`` (``ParameterServer.soon.push``, exactly
what ``pipeline.worker.train_task`` does, after restoring glibc's mmap threshold as it does),
each push waiting for its reply (the new weights).
Pushes that complete inside a common measurement window of ``--seconds`` are counted.

MB/s in = delta bytes received by the scheduler; the reply carries the same number of bytes back,
so the loopback moves twice the figure. Validation first: the server's version after the run
equals the number of pushes it reports, and the weights are unchanged (zero deltas).
Everything runs on one 2-core machine: with more processes than cores, the workers, the
scheduler and the kernel share the cores, so the large-N rows understate a real cluster's
server ceiling less than they overstate it; see bench/README.md for the projection.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import figures
from bench.common import load, local_cluster, md_table, write_out

SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
WORKERS = (1, 2, 4, 8)


def push_loop(
    job: str, name: str, n: int, start: float, seconds: float, compression: str = "none", topk_fraction: float = 0.01
) -> dict[str, Any]:
    """Runs on a worker: join, push zero deltas (encoded once with ``compression``) until the
    window closes, leave."""
    from distributed import get_worker

    from pipeline.allocator import restore_mmap_threshold
    from pipeline.ps import ParameterServer
    from pipeline.ps.wire import compress

    restore_mmap_threshold()  # as every training task does first (pipeline/allocator.py)
    ps = ParameterServer(job)
    w = get_worker()
    reply = ps.soon.join(name, key=w.get_current_task(), worker=w.address).result()
    version = int(reply["version"])
    delta = np.zeros(n, np.float32)
    enc = compress(delta, compression, topk_fraction)[0]
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    done, lat = 0, []
    while True:
        t = time.perf_counter()
        r = ps.soon.push(name, version, enc, samples=1, batches=1, loss=0.0, timeout=60.0).result()
        version = int(r["version"])
        if time.time() > end:
            break
        done += 1
        lat.append(time.perf_counter() - t)
    ps.soon.leave(name).result()
    return {"pushes": done, "latency_ms": 1e3 * float(np.median(lat)) if lat else float("nan")}


def _scheduler_cpu(dask_scheduler: Any) -> tuple[float, float]:
    """CPU seconds of the scheduler's event-loop thread and of its whole process."""
    return time.thread_time(), time.process_time()


def measure(
    client: Any,
    n_workers: int,
    n: int,
    seconds: float,
    optimizer: str = "sgd",
    compression: str = "none",
    topk_fraction: float = 0.01,
) -> dict[str, Any]:
    """One cell: ``n_workers`` pushers of ``n``-parameter zero deltas in ``compression``; with
    the scheduler's CPU per push (event-loop thread, and whole process: the process also holds
    the idle driver and Dask's offload thread, which deserializes messages over 10 MiB)."""
    import uuid

    from pipeline.ps import ParameterServer

    job = f"psbench-{uuid.uuid4().hex[:8]}"
    ps = ParameterServer(job, client)
    p0 = np.ones(n, np.float32)
    ps.create(
        p0, mode="async", optimizer={"name": optimizer, "lr": 1.0}, compression=compression, topk_fraction=topk_fraction
    )
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    start = time.time() + 1.0 + n * 4e-8 * n_workers  # time to ship the job's weights to everyone
    futs = [
        client.submit(
            push_loop,
            job,
            f"w{i}",
            n,
            start,
            seconds,
            compression,
            topk_fraction,
            workers=[w],
            pure=False,
            key=f"ps-push-{job}-{i}",
        )
        for i, w in enumerate(workers[:n_workers])
    ]
    cpu0 = client.run_on_scheduler(_scheduler_cpu)
    m0 = ps.metrics()
    res = client.gather(futs)
    cpu1 = client.run_on_scheduler(_scheduler_cpu)
    params, version = ps.pull()
    m = ps.metrics()
    ps.close()
    pushes = sum(r["pushes"] for r in res)
    all_pushes = m["pushes"] - m0["pushes"]  # every push between the two CPU readings
    wire = (m["bytes_in"] - m0["bytes_in"]) / max(all_pushes, 1)
    if not np.array_equal(params, p0):  # zero deltas move no optimizer's weights
        raise AssertionError("zero deltas changed the weights")
    if version != m["pushes"] or version < pushes:
        raise AssertionError(f"server version {version} vs {m['pushes']} pushes reported, {pushes} counted")
    out = {
        "params": n,
        "workers": n_workers,
        "MB/push": 4 * n / 1e6,
        "pushes/s": pushes / seconds,
        "MB/s in": pushes * 4 * n / 1e6 / seconds,
        "median push ms": float(np.median([r["latency_ms"] for r in res])),
    }
    if compression != "none":
        out = {"codec": compression, **out, "MB/push": wire / 1e6, "MB/s in": pushes * wire / 1e6 / seconds}
    out["sched ms/push (loop)"] = 1e3 * (cpu1[0] - cpu0[0]) / max(all_pushes, 1)
    out["sched ms/push (process)"] = 1e3 * (cpu1[1] - cpu0[1]) / max(all_pushes, 1)
    return out


def run(
    quick: bool = False,
    sizes: Sequence[int] = SIZES,
    workers: Sequence[int] = WORKERS,
    seconds: float = 3.0,
    optimizer: str = "sgd",
) -> tuple[str, list[dict]]:
    if quick:
        sizes, workers, seconds = (10_000, 100_000), (1, 2), 0.5
    load0 = load()
    rows: list[dict] = []
    for nw in workers:
        with local_cluster(nw) as client:
            for n in sizes:
                rows.append(measure(client, nw, n, seconds, optimizer))
    head = (
        f"async mode, server {optimizer}, zero-compute deltas, {seconds:g} s window per cell, LocalCluster of N "
        f"single-threaded worker processes on this machine (loopback TCP); load average before {load0:.2f}, "
        f"after {load():.2f}"
    )
    fmt = {
        "params": ".0e",
        "MB/push": ".2f",
        "pushes/s": ",.0f",
        "MB/s in": ",.0f",
        "median push ms": ".2f",
        "sched ms/push (loop)": ".2f",
        "sched ms/push (process)": ".2f",
    }
    return head + "\n\n" + md_table(rows, fmt), rows


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_limits", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per cell")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--workers", default=",".join(map(str, WORKERS)))
    ap.add_argument(
        "--optimizer",
        default="sgd",
        choices=("sgd", "momentum", "adam"),
        help="the server's optimizer (its per-round cost on the scheduler)",
    )
    args = ap.parse_args(argv)
    text, rows = run(
        args.quick,
        [int(float(s)) for s in args.sizes.split(",")],
        [int(s) for s in args.workers.split(",")],
        args.seconds,
        args.optimizer,
    )
    print(text)
    stem = "ps_limits" + ("-quick" if args.quick else "") + ("" if args.optimizer == "sgd" else f"-{args.optimizer}")
    write_out(stem, text)
    figures.ps_limits(rows, stem)
    return text


if __name__ == "__main__":
    main()
