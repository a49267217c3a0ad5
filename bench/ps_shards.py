"""The sharded parameter server against the scheduler's own: pushes/s, MB/s absorbed and the
scheduler's CPU time per push, for 0 (in the scheduler), 1, 2 and 4 shards.

    python -m bench.ps_shards            # 1e6, 1e7 parameters x 1, 2, 4, 8, 16 pushing processes
    python -m bench.ps_shards --quick    # tiny smoke run
    python -m bench.ps_shards --pushers 1,4 --sizes 1e6 --passes 3

For each number of pushers P a LocalCluster of P single-threaded worker processes is started
(scheduler preloaded with ``pipeline.ps``, running in this process) with 4 more ``dask worker
--resources ps-shard=1`` processes beside it. In each pass, for each parameter count, an
``async`` job (server SGD lr 1) is created on each shard count in turn (the order rotated by one
per pass: bench/protocol.py) and one task per pusher joins it and pushes zero-compute deltas back
to back, each push waiting for its reply (the new weights), exactly as ``bench.ps_limits`` does
for the in-scheduler server; pushes completing inside a common window of ``--seconds`` count
(longer for larger vectors, :func:`window`: 4x at 1e7 parameters). 5 passes by default.

Columns: ``MB/s in`` = delta bytes absorbed (the replies carry as many back); ``sched CPU
ms/push`` = this process's CPU time during the window (the scheduler's event loop and its
offload thread; the idle client waits in ``gather``) over the window's pushes; ``sched cores``
= the same CPU time over the window's wall time; ``shard CPU ms/push`` = the ps-shard worker
processes' CPU time from before the tasks start to after they end, over the pushes the shards
applied. Validation first: every shard's version equals the pushes it reports (at least the
pushes counted) and the weights are unchanged (zero deltas).

This machine has 2 cores: shards cannot add cores here, only move the work off the scheduler's
event loop into other processes that share the same 2 cores with the pushers. What the table
shows is that move (the scheduler's CPU per push falling to the coordination it keeps), not the
throughput a cluster with a core per shard would reach.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, write_out

SIZES = (1_000_000, 10_000_000)
PUSHERS = (1, 2, 4, 8, 16)
SHARDS = (0, 1, 2, 4)
SHARD_WORKERS = 4
# the window grows with the vector beyond this size (a 1e7-parameter push moves 40 MB each way:
# a 2 s window at 16 pushers completed none on a loaded machine)
WINDOW_PARAMS = 2_500_000


def window(n: int, seconds: float) -> float:
    """The measurement window of a cell of ``n`` parameters: ``seconds``, scaled up in proportion
    to ``n`` above :data:`WINDOW_PARAMS` so that each pusher completes several pushes."""
    return seconds * max(1.0, n / WINDOW_PARAMS)


def push_loop(job: str, name: str, n: int, shards: int, start: float, seconds: float) -> dict[str, Any]:
    """Runs on a worker: join, push zero deltas until the window closes, leave."""
    from distributed import get_worker

    from pipeline.allocator import restore_mmap_threshold
    from pipeline.ps import ParameterServer, ShardedParameterServer, encode_vector

    restore_mmap_threshold()  # as every training task does first (pipeline/allocator.py)
    ps = ShardedParameterServer(job) if shards else ParameterServer(job)
    w = get_worker()
    reply = ps.soon.join(name, key=w.get_current_task(), worker=w.address).result()
    version = int(reply["version"])
    delta = np.zeros(n, np.float32)
    wire = delta if shards else encode_vector(delta)  # the sharded handle slices the array
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    done, lat = 0, []
    while True:
        t = time.perf_counter()
        r = ps.soon.push(name, version, wire, samples=1, batches=1, loss=0.0, timeout=120.0).result()
        version = int(r["version"])
        if time.time() > end:
            break
        done += 1
        lat.append(time.perf_counter() - t)
    ps.soon.leave(name).result()
    return {"pushes": done, "latency_ms": 1e3 * float(np.median(lat)) if lat else float("nan")}


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def _start_shard_worker(address: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny"]
    cmd += ["--no-dashboard", "--host", "127.0.0.1", "--resources", "ps-shard=1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(client: Any, pushers: list[str], n: int, shards: int, seconds: float) -> dict[str, Any]:
    """One cell: ``len(pushers)`` processes pushing zero deltas of ``n`` floats to ``shards``
    for ``seconds`` (the cell's window)."""
    from pipeline.ps import ParameterServer, ShardedParameterServer
    from pipeline.ps.shard import shard_workers

    job = f"psshard-{uuid.uuid4().hex[:8]}"
    ps = ShardedParameterServer(job, client, shards) if shards else ParameterServer(job, client)
    p0 = np.ones(n, np.float32)
    ps.create(p0, mode="async", optimizer={"name": "sgd", "lr": 1.0})
    on = [a for a, _, _ in ps.shards] if shards else []
    reserved = shard_workers(client.scheduler_info(n_workers=-1))
    cpu0 = client.run(_cpu_seconds, workers=reserved) if on else {}
    start = time.time() + 1.5 + n * 4e-8 * len(pushers)  # time to ship the weights to everyone
    futs = [
        client.submit(push_loop, job, f"w{i}", n, shards, start, seconds, workers=[w], pure=False, key=f"{job}-{i}")
        for i, w in enumerate(pushers)
    ]
    time.sleep(max(0.0, start - time.time()))
    sched0, t0 = _cpu_seconds(), time.perf_counter()
    time.sleep(max(0.0, start + seconds - time.time()))
    sched1, wall = _cpu_seconds(), time.perf_counter() - t0
    try:
        res = client.gather(futs)
    except (OSError, TimeoutError) as exc:  # a cell the loaded machine could not serve: recorded, not fatal
        client.cancel(futs)
        with contextlib.suppress(Exception):
            ps.close()
        failed = {k: None for k in ("pushes/s", "MB/s in", "median push ms", "sched CPU ms/push", "sched cores")}
        why = f"{type(exc).__name__}: {str(exc)[:160]}"
        return {
            "pushers": len(pushers),
            "params": n,
            "shards": shards,
            "window s": seconds,
            **failed,
            "shard CPU ms/push": None,
            "error": why,
        }
    cpu1 = client.run(_cpu_seconds, workers=reserved) if on else {}
    params, _ = ps.pull()
    m = ps.metrics()
    ps.close()
    pushes = sum(r["pushes"] for r in res)
    if not np.array_equal(params, p0):  # zero deltas move no optimizer's weights
        raise AssertionError("zero deltas changed the weights")
    versions = [s["version"] for s in m.get("shards", [])] or [m["version"]]
    if any(v != m["pushes"] for v in versions) or m["pushes"] < pushes:
        raise AssertionError(f"server versions {versions} vs {m['pushes']} pushes reported, {pushes} counted")
    shard_cpu = sum(cpu1[a] - cpu0[a] for a in on)
    return {
        "pushers": len(pushers),
        "params": n,
        "shards": shards,
        "window s": seconds,
        "pushes/s": pushes / seconds,
        "MB/s in": pushes * 4 * n / 1e6 / seconds,
        "median push ms": float(np.median(lat)) if (lat := [r["latency_ms"] for r in res if r["pushes"]]) else None,
        "sched CPU ms/push": 1e3 * (sched1 - sched0) / max(pushes, 1),
        "sched cores": (sched1 - sched0) / wall,
        "shard CPU ms/push": 1e3 * shard_cpu / max(m["pushes"], 1) if on else None,
        "error": None,
    }


def run(
    quick: bool = False,
    sizes: Sequence[int] = SIZES,
    pushers: Sequence[int] = PUSHERS,
    shards: Sequence[int] = SHARDS,
    seconds: float = 2.0,
    passes: int = 5,
) -> tuple[str, dict[str, Any]]:
    from pipeline.connect import cluster_client
    from pipeline.ps.shard import shard_workers

    if quick:
        sizes, pushers, shards, seconds, passes = (10_000, 100_000), (1, 2), (0, 1, 2), 0.5, 1
    records: list[dict[str, Any]] = []
    for p in pushers:
        with cluster_client(workers=p, threads_per_worker=1, dashboard_address=None) as client:
            procs = [_start_shard_worker(client.scheduler.address) for _ in range(min(SHARD_WORKERS, max(shards)))]
            try:
                deadline = time.monotonic() + 120
                while len(shard_workers(client.scheduler_info(n_workers=-1))) < len(procs):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the ps-shard workers did not join within 120 s")
                    time.sleep(0.2)
                info = client.scheduler_info(n_workers=-1)
                mine = sorted(set(info["workers"]) - set(shard_workers(info)))
                for k in range(passes):
                    with protocol.measure_pass(peak_n=512) as cond:
                        rows = [
                            measure(client, mine, n, s, window(n, seconds))
                            for n in sizes
                            for s in protocol.rotated(list(shards), k)
                        ]
                    records.append({"pushers": p, "pass": k + 1, "conditions": cond, "rows": rows})
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    return render(records, seconds), {"records": records, "seconds": seconds}


def render(records: list[dict[str, Any]], seconds: float) -> str:
    """The median over passes of each cell, then sharded / in-scheduler per-pass ratios."""
    cells: dict[tuple, list[dict]] = {}
    for rec in records:
        for r in rec["rows"]:
            cells.setdefault((r["pushers"], r["params"], r["shards"]), []).append(r)
    keys = ("pushes/s", "MB/s in", "median push ms", "sched CPU ms/push", "sched cores", "shard CPU ms/push")
    rows = []
    for (p, n, s), rs in sorted(cells.items()):
        row: dict[str, Any] = {"pushers": p, "params": n, "shards": s}
        for key in keys:
            # a pass with no push completed in its window has no per-push figure
            vals = [r[key] for r in rs if r[key] is not None and (r["pushes/s"] or key in ("pushes/s", "MB/s in"))]
            row[key] = float(np.median(vals)) if vals else None
        base = cells.get((p, n, 0))
        if s and base:
            ratio = protocol.ratio_summary([r["pushes/s"] for r in rs], [r["pushes/s"] for r in base])
            row["pushes/s vs 0 shards"] = protocol.fmt_ratio(ratio)
        else:
            row["pushes/s vs 0 shards"] = "1 (reference)" if not s else "n/a"
        errors = [r["error"] for r in rs if r.get("error")]
        row["failed passes"] = f"{len(errors)}: {errors[0]}" if errors else ""
        rows.append(row)
    fmt = {
        "params": ".0e",
        "pushes/s": ",.1f",
        "MB/s in": ",.0f",
        "median push ms": ".1f",
        "sched CPU ms/push": ".2f",
        "sched cores": ".2f",
        "shard CPU ms/push": ".2f",
    }
    passes = max((rec["pass"] for rec in records), default=0)
    head = (
        f"async mode, server SGD, zero-compute deltas, {seconds:g} s window per cell (x params / "
        f"{WINDOW_PARAMS:.1e} above {WINDOW_PARAMS:.1e} parameters), median of {passes} "
        "pass(es) (shard counts interleaved, order rotated per pass); LocalCluster of N single-threaded pushing "
        "processes + ps-shard worker processes, all on this machine's "
        f"{os.cpu_count()} cores (shards cannot add cores here: see the module docstring)"
    )
    labelled = [
        {"pass": f"P={rec['pushers']} #{rec['pass']}", "order": ["-"], "conditions": rec["conditions"]}
        for rec in records
    ]
    cond = protocol.conditions_table(labelled)
    return head + "\n\n" + md_table(rows, fmt) + "\n\nConditions per pass:\n\n" + cond


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_shards", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=2.0, help="measurement window per cell")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--pushers", default=",".join(map(str, PUSHERS)))
    ap.add_argument("--shards", default=",".join(map(str, SHARDS)))
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--render", metavar="JSON", help="print the table of an earlier run's raw figures, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        import json

        raw = json.loads(Path(args.render).read_text())
        text = render(raw["records"], raw["seconds"]) + f"\n\nRaw figures: `{args.render}`"
        print(text)
        return text
    text, raw = run(
        args.quick,
        [int(float(s)) for s in args.sizes.split(",")],
        [int(s) for s in args.pushers.split(",")],
        [int(s) for s in args.shards.split(",")],
        args.seconds,
        args.passes,
    )
    stem = "ps_shards" + ("-quick" if args.quick else "")
    path = protocol.save_json(stem, {"meta": protocol.meta(), "args": vars(args), **raw}, quick=args.quick)
    text = "\n".join(protocol.provenance_lines(protocol.meta())) + "\n\n" + text + f"\n\nRaw figures: `{path}`"
    print(text)
    write_out(stem, text)
    return text


if __name__ == "__main__":
    main()
