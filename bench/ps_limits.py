"""What the scheduler's parameter server absorbs: pushes/s and MB/s against parameter count and
the number of pushing worker processes, under the measurement protocol of :mod:`bench.protocol`.

    python -m bench.ps_limits            # 1e4..1e7 parameters x 1, 2, 4, 8 worker processes, 5 passes
    python -m bench.ps_limits --quick    # tiny smoke run (1 pass)
    python -m bench.ps_limits --optimizer adam --sizes 1e6,1e7 --workers 1   # server Adam's cost

For each number of workers a LocalCluster of that many single-threaded worker processes is
started with ``pipeline.ps`` preloaded into its scheduler; for each parameter count an
``async`` job (server SGD lr 1, or ``--optimizer momentum|adam``) is created and one task per worker joins it
and pushes zero-compute
deltas back to back through ``worker.scheduler.ps_push`` (``ParameterServer.soon.push``, exactly
what ``pipeline.worker.train_task`` does, after restoring glibc's mmap threshold as it does),
each push waiting for its reply (the new weights).
Pushes that complete inside a common measurement window of ``--seconds`` are counted.

On each cluster an untimed short cell first lets the workers import and connect; then
``--passes`` passes (default 5: a full run takes about 8 minutes on 2 cores) each run every
parameter count's cell once, the order rotated by one per pass, and record the machine's
conditions (``protocol.measure_pass``: load, steal, other processes' CPU, GEMM peaks). The
table gives each cell's median over the passes (and the range of pushes/s); the conditions of
every pass follow it. Every run's raw figures go to ``bench/results/ps_limits[-<optimizer>]-*.json``
(quick runs to ``bench/out/results/ps_limits-quick-*.json``).

MB/s in = delta bytes received by the scheduler; the reply carries the same number of bytes back,
so the loopback moves twice the figure. Validation in every cell: the server's version after the
run equals the number of pushes it reports, and the weights are unchanged (zero deltas).
Everything runs on one 2-core machine: with more processes than cores, the workers, the
scheduler and the kernel share the cores, so the large-N rows understate a real cluster's
server ceiling less than they overstate it; see bench/README.md for the projection.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import figures, protocol
from bench.common import local_cluster, md_table, write_out

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


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def stem_for(quick: bool, optimizer: str) -> str:
    """The name of the run's table, figure and raw figures: ``ps_limits[-quick][-<optimizer>]``."""
    return "ps_limits" + ("-quick" if quick else "") + ("" if optimizer == "sgd" else f"-{optimizer}")


def _clusters_in_order(workers: Sequence[int]) -> str:
    """Which cluster's passes come first in the conditions table, e.g. the 1-worker cluster's
    first, then the 2-worker and 4-worker clusters'."""
    names = [f"{w}-worker" for w in workers]
    if len(names) == 1:
        return f"the {names[0]} cluster's passes"
    rest = names[1:]
    later = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
    whose = "cluster's" if len(rest) == 1 else "clusters'"
    return f"the {names[0]} cluster's passes first, then the {later} {whose}"


def run(
    quick: bool = False,
    sizes: Sequence[int] = SIZES,
    workers: Sequence[int] = WORKERS,
    seconds: float = 3.0,
    optimizer: str = "sgd",
    passes: int = 5,
) -> tuple[str, list[dict]]:
    """Every cell ``passes`` times per cluster, the parameter counts' order rotated per pass;
    returns the table's text and its rows (medians per cell). The raw figures are saved."""
    if quick:
        sizes, workers, seconds, passes = (10_000, 100_000), (1, 2), 0.5, 1
    m = protocol.meta()
    recs: list[dict[str, Any]] = []
    for nw in workers:
        with local_cluster(nw) as client:
            measure(client, nw, sizes[0], 0.2, optimizer)  # untimed: the workers import and connect once
            fns = {str(n): (lambda n=n, c=client, w=nw: measure(c, w, n, seconds, optimizer)) for n in sizes}
            for p in protocol.run_passes(fns, passes, cores=2, log=lambda s, w=nw: _log(f"{w} workers, {s} params")):
                recs.append({**p, "workers": nw})
    rows: list[dict] = []
    for nw in workers:
        mine = [p for p in recs if p["workers"] == nw]
        for n in sizes:
            cells = [p["results"][str(n)] for p in mine]
            row = {
                k: v if k in ("params", "workers") or isinstance(v, str) else float(np.median([c[k] for c in cells]))
                for k, v in cells[0].items()
            }
            if passes > 1:
                per = [c["pushes/s"] for c in cells]
                row["pushes/s min-max"] = f"{min(per):,.0f}-{max(per):,.0f}"
            rows.append(row)
    stem = stem_for(quick, optimizer)
    payload = {
        "benchmark": "ps_limits",
        "meta": m,
        "quick": quick,
        "settings": {
            "sizes": list(sizes),
            "workers": list(workers),
            "seconds": seconds,
            "optimizer": optimizer,
            "passes": passes,
        },
        "passes": recs,
        "rows": rows,
    }
    path = protocol.save_json(stem, payload, quick)
    fmt = {
        "params": ".0e",
        "MB/push": ".2f",
        "pushes/s": ",.0f",
        "MB/s in": ",.0f",
        "median push ms": ".2f",
        "sched ms/push (loop)": ".2f",
        "sched ms/push (process)": ".2f",
    }
    lines = [
        *protocol.table_head("Parameter-server limits", m),
        f"async mode, server {optimizer}, zero-compute deltas, {seconds:g} s window per cell, LocalCluster of N "
        "single-threaded worker processes on this machine (loopback TCP); medians over "
        f"{passes} pass(es) per cluster, the parameter counts' order rotated by one per pass.",
        "",
        md_table(rows, fmt),
    ]
    lines += protocol.conditions_tail(recs, "workers", _clusters_in_order(workers), path)
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_limits", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 pass)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per cell")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--workers", default=",".join(map(str, WORKERS)))
    ap.add_argument("--passes", type=int, default=5, help="passes per cluster, the sizes' order rotated (default 5)")
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
        args.passes,
    )
    print(text)
    stem = stem_for(args.quick, args.optimizer)
    write_out(stem, text)
    figures.ps_limits(rows, stem)
    return text


if __name__ == "__main__":
    main()
