"""Sync rounds over TCP against shared memory (``ps_shared_memory``, :mod:`pipeline.ps.shm`):
what the same-host transport saves the scheduler and the workers, under :mod:`bench.protocol`.

    python -m bench.ps_transport            # 535,818 (MLP 784-512-256-10), 1e6, 1e7 params x 2, 4 workers, 5 passes
    python -m bench.ps_transport --quick    # tiny smoke run (1 pass)

Each cell is one ``sync`` job (server SGD lr 1, the default ``ema``) on a LocalCluster of N
single-threaded worker processes, one participant per worker pushing zero-compute deltas for a
fixed number of rounds, each push waiting for the round's weights, exactly as
:class:`pipeline.worker._Pusher` does: over TCP the delta and the weights travel as float32
frames; with shared memory the delta is written into the participant's push segment and the
weights read from the job's weights segment, the messages carrying only metadata. The two
transports run side by side in every pass, the order rotated per pass. Figures per cell: rounds
per second (the slowest participant's), the scheduler's event-loop CPU per push (its thread's
CPU time over the cell; the scheduler runs in this process) and the participants' CPU per round.
Validation: after the rounds the weights equal the start (zero deltas) and the server's version
equals the number of rounds. Raw figures: ``bench/results/ps_transport-*.json``.

Shared memory applies to workers on the scheduler's host only; the projection for remote workers
(``bench/README.md``) is unchanged by it.
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
from bench.common import local_cluster, md_table, write_out

SIZES = (535_818, 1_000_000, 10_000_000)
WORKERS = (2, 4)
TRANSPORTS = ("tcp", "shm")


def rounds_for(n: int, quick: bool) -> int:
    """Rounds per cell: about 200 MB of deltas per participant, at least 20."""
    return 5 if quick else max(20, min(200, int(5e7 // n)))


def pusher(job: str, name: str, n: int, rounds: int, shm: bool) -> dict[str, float]:
    """Runs on a worker: join (asking for shared memory or not), push ``rounds`` zero deltas as
    a training task does, leave; wall and CPU seconds of the rounds."""
    from distributed import get_worker

    from pipeline.allocator import restore_mmap_threshold
    from pipeline.ps import ParameterServer
    from pipeline.ps import shm as shmem
    from pipeline.ps.job import SHM_DELTA

    restore_mmap_threshold()
    ps = ParameterServer(job)
    w = get_worker()
    extra = {"shm": True} if shm else {}
    joined = ps.soon.join(name, key=w.get_current_task(), worker=w.address, **extra).result()
    version = int(joined["version"])
    info = joined.get("shm") or {}
    seg_w, seg_p = shmem.attach(info.get("weights"), n), shmem.attach(info.get("push"), n)
    if shm and (seg_w is None or seg_p is None):
        raise RuntimeError("shared memory was asked for but not attached")
    delta = np.zeros(n, np.float32)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        if seg_p is not None:
            seg_p.data[:] = delta
            r = ps.soon.push(name, version, SHM_DELTA, samples=1, batches=1, loss=0.0, timeout=120.0).result()
            weights = seg_w.read(int(r["version"]))
            if weights is None:
                raise RuntimeError("the weights segment did not hold the reply's version")
        else:
            r = ps.soon.push(name, version, delta, samples=1, batches=1, loss=0.0, timeout=120.0).result()
            weights = np.asarray(r["params"], dtype=np.float32)
        version = int(r["version"])
    out = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "sum": float(weights[:8].sum())}
    for seg in (seg_w, seg_p):
        if seg is not None:
            seg.close()
    ps.soon.leave(name).result()
    return out


def _loop_cpu(dask_scheduler: Any) -> float:
    return time.thread_time()


def cell(client: Any, workers: list[str], n: int, rounds: int, transport: str) -> dict[str, Any]:
    from pipeline.ps import ParameterServer

    job = f"pstransport-{uuid.uuid4().hex[:8]}"
    ps = ParameterServer(job, client)
    p0 = np.ones(n, np.float32)
    ps.create(p0, mode="sync", optimizer={"name": "sgd", "lr": 1.0})
    names = [f"p{i}" for i in range(len(workers))]
    ps.expect(names, [None] * len(names))
    cpu0 = client.run_on_scheduler(_loop_cpu)
    futs = [
        client.submit(pusher, job, nm, n, rounds, transport == "shm", workers=[w], pure=False)
        for nm, w in zip(names, workers, strict=True)
    ]
    res = client.gather(futs)
    cpu1 = client.run_on_scheduler(_loop_cpu)
    params, version = ps.pull()
    m = ps.metrics()
    ps.close()
    if not np.array_equal(params, p0) or version != rounds:
        raise AssertionError(f"{transport}: version {version} after {rounds} rounds, or weights moved")
    if (m.get("bytes_shm", 0) > 0) != (transport == "shm"):
        raise AssertionError(f"{transport}: {m.get('bytes_shm')} bytes through shared memory")
    wall = max(r["wall"] for r in res)
    return {
        "rounds/s": rounds / wall,
        "sched ms/push": 1e3 * (cpu1 - cpu0) / (rounds * len(workers)),
        "worker ms/round": 1e3 * float(np.mean([r["cpu"] for r in res])) / rounds,
        "MB/s in": rounds * len(workers) * 4 * n / 1e6 / wall,
    }


def run(quick: bool = False, passes: int = 5) -> tuple[str, dict[str, Any]]:
    sizes, n_workers = ((10_000,), (2,)) if quick else (SIZES, WORKERS)
    passes = 1 if quick else passes
    m = protocol.meta()
    recs: list[dict[str, Any]] = []
    for nw in n_workers:
        with local_cluster(nw) as client:
            from pipeline.ps import ParameterServer

            ParameterServer.ensure_installed(client)
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            for tr in TRANSPORTS:  # untimed: the workers import and connect once
                cell(client, workers, sizes[0], 3, tr)
            fns: dict[str, Any] = {}
            for n in sizes:
                for tr in TRANSPORTS:
                    fns[f"{nw}|{n}|{tr}"] = lambda n=n, tr=tr, ws=workers: cell(client, ws, n, rounds_for(n, quick), tr)
            for p in protocol.run_passes(fns, passes, cores=2, log=lambda s: print(s, file=sys.stderr, flush=True)):
                recs.append({**p, "workers": nw})
    rows, summary = [], []
    for nw in n_workers:
        mine = [p for p in recs if p["workers"] == nw]
        for n in sizes:
            fig = {tr: [p["results"][f"{nw}|{n}|{tr}"] for p in mine] for tr in TRANSPORTS}
            for tr in TRANSPORTS:
                med = {k: float(np.median([f[k] for f in fig[tr]])) for k in fig[tr][0]}
                rows.append({"workers": nw, "params": n, "transport": tr, **med})
            speed = protocol.ratio_summary([f["rounds/s"] for f in fig["shm"]], [f["rounds/s"] for f in fig["tcp"]])
            cpu = protocol.ratio_summary(
                [f["sched ms/push"] for f in fig["tcp"]], [f["sched ms/push"] for f in fig["shm"]]
            )
            summary.append({"workers": nw, "params": n, "rounds/s shm / tcp": speed, "sched CPU tcp / shm": cpu})
    payload = {"benchmark": "ps_transport", "meta": m, "quick": quick, "passes": recs, "rows": rows, "summary": summary}
    path = protocol.save_json("ps_transport-quick" if quick else "ps_transport", payload, quick)
    fmt = {"params": ",", "rounds/s": ",.1f", "sched ms/push": ".2f", "worker ms/round": ".2f", "MB/s in": ",.0f"}
    lines = [
        f"## Sync rounds: TCP against shared memory ({m['date']})",
        "",
        *protocol.provenance_lines(m),
        "",
        "Zero-compute participants, one per single-threaded worker process, pushing for a fixed number of rounds; "
        f"medians over {passes} interleaved pass(es).",
        "",
        md_table(rows, fmt),
        "",
        "| workers | params | rounds/s, shared memory / TCP | scheduler CPU per push, TCP / shared memory |",
        "| ---: | ---: | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['workers']} | {s['params']:,} | {protocol.fmt_ratio(s['rounds/s shm / tcp'])} "
            f"| {protocol.fmt_ratio(s['sched CPU tcp / shm'])} |"
        )
    lines += protocol.conditions_tail(
        recs, "workers", "first the 2-worker cluster's passes, then the 4-worker one's", path
    )
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_transport", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 pass)")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)
    text, _ = run(args.quick, args.passes)
    write_out("ps_transport", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
