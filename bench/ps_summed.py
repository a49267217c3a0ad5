"""Summed pushes (``combine_pushes``) on a real cluster: what one push per worker process and
sync round saves the scheduler, under :mod:`bench.protocol`.

    python -m bench.ps_summed            # 535,818 (MLP 784-512-256-10), 1e6, 1e7 params; 2 and 4 threads; 5 passes
    python -m bench.ps_summed --quick    # tiny smoke run (1 pass)

Each cell is one ``sync`` job (server SGD lr 1) on a LocalCluster of one worker process with
T threads (a host's worker started with ``--nthreads T``), T participants on it pushing
zero-compute float32 deltas over TCP for a fixed number of rounds, each push waiting for the
round's weights. ``separate``: every participant pushes its own delta, as without
``combine_pushes`` on another host than the scheduler's. ``summed``: the participants push
through :class:`pipeline.worker.PushGroup`, the code a training task uses with
``combine_pushes``: the last of each round sends the sample-weighted mean with the others as
co-senders. Both ways run side by side in every pass, the order rotated per pass. Figures per
cell: rounds per second (the slowest participant's), the scheduler's event-loop CPU per round
(its thread's CPU time over the cell; the scheduler runs in this process), messages the server
handled per round, and the worker process's CPU per round. Validation: after the rounds the
weights equal the start, the server's version equals the rounds, and the deltas summed are
``(T - 1) x rounds`` for ``summed`` (or one round fewer: a task may enter its group after
another pushed the first round alone), 0 for ``separate``. Raw figures:
``bench/results/ps_summed-*.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, write_out
from bench.ps_transport import rounds_for

SIZES = (535_818, 1_000_000, 10_000_000)
THREADS = (2, 4)
WAYS = ("separate", "summed")


def pusher(job: str, name: str, n: int, rounds: int, summed: bool) -> dict[str, float]:
    """Runs on a worker thread: join, push ``rounds`` zero deltas (through the process's push
    group when ``summed``), leave; wall seconds of the rounds and the thread's CPU seconds."""
    from distributed import get_worker

    from pipeline.allocator import restore_mmap_threshold
    from pipeline.ps import ParameterServer
    from pipeline.worker import push_group

    restore_mmap_threshold()
    ps = ParameterServer(job)
    w = get_worker()
    joined = ps.soon.join(name, key=w.get_current_task(), worker=w.address).result()
    version = int(joined["version"])
    group = push_group(job, 120.0) if summed else None
    if group is not None:
        group.enter(name, version)
    delta = np.zeros(n, np.float32)
    t, c = time.perf_counter(), time.thread_time()
    try:
        for _ in range(rounds):
            fields = {"samples": 1, "batches": 1, "loss": 0.0}
            if group is not None:
                fut = group.push(ps, name, version, delta, **fields, timings={})
            else:
                fut = ps.soon.push(name, version, delta, **fields, timeout=120.0)
            r = fut.result()
            weights = np.asarray(r["params"], dtype=np.float32)
            version = int(r["version"])
    finally:
        if group is not None:
            group.leave(name)
    out = {"wall": time.perf_counter() - t, "cpu": time.thread_time() - c, "sum": float(weights[:8].sum())}
    ps.soon.leave(name).result()
    return out


def _loop_cpu(dask_scheduler: Any) -> float:
    return time.thread_time()


def _forget(job: str) -> None:
    from pipeline.worker import forget_job

    forget_job(job)


def cell(client: Any, worker: str, threads: int, n: int, rounds: int, way: str) -> dict[str, Any]:
    from pipeline.ps import ParameterServer

    job = f"pssummed-{uuid.uuid4().hex[:8]}"
    ps = ParameterServer(job, client)
    p0 = np.ones(n, np.float32)
    ps.create(p0, mode="sync", optimizer={"name": "sgd", "lr": 1.0})
    names = [f"p{i}" for i in range(threads)]
    ps.expect(names, [None] * len(names))
    cpu0 = client.run_on_scheduler(_loop_cpu)
    futs = [client.submit(pusher, job, nm, n, rounds, way == "summed", workers=[worker], pure=False) for nm in names]
    res = client.gather(futs)
    cpu1 = client.run_on_scheduler(_loop_cpu)
    params, version = ps.pull()
    m = ps.metrics()
    ps.close()
    client.run(_forget, job)
    # summed: every round but the first (whose tasks may enter the group after another pushed alone)
    lo, hi = ((threads - 1) * (rounds - 1), (threads - 1) * rounds) if way == "summed" else (0, 0)
    if not np.array_equal(params, p0) or version != rounds or not lo <= m["summed"] <= hi:
        raise AssertionError(f"{way}: version {version} after {rounds} rounds, {m['summed']} summed, or weights moved")
    wall = max(r["wall"] for r in res)
    return {
        "rounds/s": rounds / wall,
        "sched ms/round": 1e3 * (cpu1 - cpu0) / rounds,
        "messages/round": (m["pushes"] - m["summed"]) / rounds,
        "worker ms/round": 1e3 * float(np.sum([r["cpu"] for r in res])) / rounds,
    }


def run(quick: bool = False, passes: int = 5) -> tuple[str, dict[str, Any]]:
    from pipeline.connect import cluster_client
    from pipeline.ps import ParameterServer

    sizes, n_threads = ((10_000,), (2,)) if quick else (SIZES, THREADS)
    passes = 1 if quick else passes
    m = protocol.meta()
    recs: list[dict[str, Any]] = []
    for nt in n_threads:
        with cluster_client(workers=1, threads_per_worker=nt, dashboard_address=None) as client:
            ParameterServer.ensure_installed(client)
            (worker,) = sorted(client.scheduler_info(n_workers=-1)["workers"])
            for way in WAYS:  # untimed: the worker imports and connects once
                cell(client, worker, nt, sizes[0], 3, way)
            fns: dict[str, Any] = {}
            for n in sizes:
                for way in WAYS:
                    fns[f"{nt}|{n}|{way}"] = lambda n=n, way=way, nt=nt, w=worker: cell(
                        client, w, nt, n, rounds_for(n, quick), way
                    )
            for p in protocol.run_passes(fns, passes, cores=2, log=lambda s: print(s, file=sys.stderr, flush=True)):
                recs.append({**p, "threads": nt})
    rows, summary = [], []
    for nt in n_threads:
        mine = [p for p in recs if p["threads"] == nt]
        for n in sizes:
            fig = {way: [p["results"][f"{nt}|{n}|{way}"] for p in mine] for way in WAYS}
            for way in WAYS:
                med = {k: float(np.median([f[k] for f in fig[way]])) for k in fig[way][0]}
                rows.append({"threads": nt, "params": n, "pushes": way, **med})
            cpu = protocol.ratio_summary(
                [f["sched ms/round"] for f in fig["separate"]], [f["sched ms/round"] for f in fig["summed"]]
            )
            speed = protocol.ratio_summary(
                [f["rounds/s"] for f in fig["summed"]], [f["rounds/s"] for f in fig["separate"]]
            )
            summary.append(
                {"threads": nt, "params": n, "sched CPU separate / summed": cpu, "rounds/s summed / separate": speed}
            )
    payload = {"benchmark": "ps_summed", "meta": m, "quick": quick, "passes": recs, "rows": rows, "summary": summary}
    path = protocol.save_json("ps_summed-quick" if quick else "ps_summed", payload, quick)
    fmt = {
        "params": ",",
        "rounds/s": ",.1f",
        "sched ms/round": ".2f",
        "messages/round": ".1f",
        "worker ms/round": ".2f",
    }
    lines = [
        f"## Summed pushes on a real cluster ({m['date']})",
        "",
        *protocol.provenance_lines(m),
        "",
        "Zero-compute participants, one per thread of one worker process, pushing float32 deltas over TCP for a "
        f"fixed number of rounds, each on its own or summed per process (`combine_pushes`); medians over {passes} "
        "interleaved pass(es).",
        "",
        md_table(rows, fmt),
        "",
        "| threads | params | scheduler CPU per round, separate / summed | rounds/s, summed / separate |",
        "| ---: | ---: | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['threads']} | {s['params']:,} | {protocol.fmt_ratio(s['sched CPU separate / summed'])} "
            f"| {protocol.fmt_ratio(s['rounds/s summed / separate'])} |"
        )
    lines += protocol.conditions_tail(
        recs, "threads", "first the 2-thread worker's passes, then the 4-thread one's", path
    )
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_summed", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 pass)")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)
    text, _ = run(args.quick, args.passes)
    write_out("ps_summed", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
