"""Where the scheduler's parameter server saturates: many light pushers at a fixed rate, the
measured saturation point against the one predicted from the measured cost of a push.

    python -m bench.ps_saturation            # 1e5 parameters, 2..32 pushers on 8 worker processes
    python -m bench.ps_saturation --quick    # tiny smoke run

1. **Calibrate** (one pusher, back to back, ``--seconds``): the scheduler's CPU time per push
   ``c_s`` (this process's CPU over the window: the scheduler runs here and the client is idle)
   and the pusher's own CPU time per push ``c_p`` (its worker process).
2. **Predict** the pushes/s the server can absorb: its event loop is one thread, so at most
   ``C = 1 / c_s`` (the projection's model: the scheduler's CPU per push is the limit). With
   every pusher offering ``r`` pushes/s the predicted saturation point is ``P* = C / r``
   pushers; ``r`` is chosen as ``C / 12`` (rounded), so the knee should fall in the middle of
   the sweep. A second, machine-bound prediction is printed beside it: this machine's cores
   are shared by the scheduler and the pushers, so at most ``free / (c_s + c_p)`` with
   ``free`` = the cores other processes left idle during calibration (bench/protocol.py's
   conditions).
3. **Measure**: for each P, P pushers (tasks spread over ``--workers`` worker processes with
   enough threads for the largest P, each pusher a thread that sleeps between pushes) push zero
   deltas at ``r`` pushes/s each for ``--seconds`` (a push that falls behind is sent at once:
   offered load ``P r``, served as fast as the server replies). Achieved pushes/s follow the
   offered load until the server saturates, then flatten; the measured saturation point is the
   first P whose achieved rate is below 90% of the offered one (and the measured capacity the
   highest achieved rate).

The shape is what this checks on one 2-core machine: linear, then flat at about ``C``, with the
knee near ``P*``. The absolute figures depend on the machine's load (conditions below).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, write_out

N_PARAMS = 100_000
PUSHERS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32)  # finer around the predicted knee (~12)
WORKERS = 8
KNEE = 12  # the rate is chosen so that the predicted saturation point is this many pushers


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def _warm_up() -> None:
    import pipeline.allocator
    import pipeline.ps  # noqa: F401


def paced_pusher(job: str, name: str, n: int, rate: float, start: float, seconds: float) -> dict[str, Any]:
    """Runs on a worker: join, push zero deltas at ``rate`` per second (0: back to back) in the
    window, leave; pushes done in the window, their median latency and this process's CPU."""
    from distributed import get_worker

    from pipeline.allocator import restore_mmap_threshold
    from pipeline.ps import ParameterServer, encode_vector

    restore_mmap_threshold()
    ps = ParameterServer(job)
    w = get_worker()
    version = int(ps.soon.join(name, key=w.get_current_task(), worker=w.address).result()["version"])
    enc = encode_vector(np.zeros(n, np.float32))
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    cpu0 = _cpu_seconds()
    done, lat, k = 0, [], 0
    while True:
        if rate:
            due = start + k / rate
            if due >= end:  # rate x seconds pushes in the window
                break
            time.sleep(max(0.0, due - time.time()))
        t = time.perf_counter()
        r = ps.soon.push(name, version, enc, samples=1, batches=1, loss=0.0, timeout=120.0).result()
        version = int(r["version"])
        k += 1
        if time.time() > end:
            break
        done += 1
        lat.append(time.perf_counter() - t)
    cpu = _cpu_seconds() - cpu0
    ps.soon.leave(name).result()
    return {"pushes": done, "lat": lat, "cpu": cpu}


def sweep_point(client: Any, workers: list[str], p: int, n: int, rate: float, seconds: float) -> dict[str, Any]:
    """``p`` pushers at ``rate`` each (0: back to back): achieved pushes/s, latency, CPU."""
    from pipeline.ps import ParameterServer

    job = f"pssat-{uuid.uuid4().hex[:8]}"
    ps = ParameterServer(job, client)
    ps.create(np.zeros(n, np.float32), mode="async", optimizer={"name": "sgd", "lr": 1.0})
    start = time.time() + 1.5 + 0.05 * p
    futs = [
        client.submit(
            paced_pusher, job, f"p{i}", n, rate, start, seconds, workers=[workers[i % len(workers)]], pure=False
        )
        for i in range(p)
    ]
    time.sleep(max(0.0, start - time.time()))
    s0, t0 = _cpu_seconds(), time.perf_counter()
    time.sleep(max(0.0, start + seconds - time.time()))
    s1, wall = _cpu_seconds(), time.perf_counter() - t0
    res = client.gather(futs)
    m = ps.metrics()
    ps.close()
    pushes = sum(r["pushes"] for r in res)
    if m["version"] != m["pushes"] or m["pushes"] < pushes:  # validation: every push applied once
        raise AssertionError(f"server version {m['version']} vs {m['pushes']} pushes, {pushes} counted")
    lat = [x for r in res for x in r["lat"]]
    return {
        "pushes": pushes,
        "pushes/s": pushes / seconds,
        "median ms": 1e3 * float(np.median(lat)) if lat else None,
        "sched ms/push": 1e3 * (s1 - s0) / max(pushes, 1),
        "sched cores": (s1 - s0) / wall,
        # a pusher reads its whole process's CPU: a per-push figure only when it is alone there
        "pusher ms/push": 1e3 * res[0]["cpu"] / max(len(res[0]["lat"]), 1) if p == 1 else None,
    }


def run(
    quick: bool = False,
    n: int = N_PARAMS,
    pushers: Sequence[int] = PUSHERS,
    workers: int = WORKERS,
    seconds: float = 3.0,
) -> tuple[str, dict[str, Any]]:
    import math
    import os

    from pipeline.connect import cluster_client

    if quick:
        n, pushers, workers, seconds = 10_000, (1, 2, 4), 2, 0.5
    threads = math.ceil(max(pushers) / workers)
    with cluster_client(workers=workers, threads_per_worker=threads, dashboard_address=None) as client:
        ws = sorted(client.scheduler_info(n_workers=-1)["workers"])
        client.run(_warm_up)  # imports done before any window: a cold worker starts late
        with protocol.measure_pass(peak_n=512) as cond:
            calib = sweep_point(client, ws[:1], 1, n, 0.0, seconds)
        cores = os.cpu_count() or 1
        free = max(cores - cond["other_cores"], 0.1)
        c_s, c_p = calib["sched ms/push"] / 1e3, calib["pusher ms/push"] / 1e3
        cap_loop, cap_machine = 1 / c_s, free / (c_s + c_p)
        capacity = cap_loop
        rate = max(1.0, round(capacity / KNEE))
        predicted = capacity / rate
        rows = []
        with protocol.measure_pass(peak_n=512) as cond2:
            for p in pushers:
                r = sweep_point(client, ws, p, n, rate, seconds)
                offered = p * rate
                rows.append(
                    {"pushers": p, "offered pushes/s": offered, **r, "achieved / offered": r["pushes/s"] / offered}
                )
    measured = next((r["pushers"] for r in rows if r["achieved / offered"] < 0.9), None)
    cap_meas = max(r["pushes/s"] for r in rows)
    summary = {
        "params": n,
        "c_sched_ms": 1e3 * c_s,
        "c_pusher_ms": 1e3 * c_p,
        "free_cores": free,
        "capacity_event_loop": cap_loop,
        "capacity_machine": cap_machine,
        "capacity_predicted": capacity,
        "capacity_measured": cap_meas,
        "rate_per_pusher": rate,
        "saturation_predicted": predicted,
        "saturation_measured": measured,
    }
    fmt = {
        "offered pushes/s": ",.0f",
        "pushes/s": ",.0f",
        "median ms": ".1f",
        "sched ms/push": ".2f",
        "sched cores": ".2f",
        "pusher ms/push": ".2f",
        "achieved / offered": ".2f",
    }
    table = md_table([{k: v for k, v in r.items() if k != "pushes"} for r in rows], fmt)
    knee = (
        "not reached in this sweep (the capacity above is a lower bound)" if measured is None else f"{measured} pushers"
    )
    lines = [
        f"in-scheduler server, async, server SGD, zero deltas of {n:,} float32 ({4 * n / 1e6:.2f} MB), "
        f"{seconds:g} s per point, pushers as threads of {workers} worker processes on {cores} cores.",
        "",
        f"Calibration (1 pusher, back to back): scheduler {1e3 * c_s:.2f} ms CPU/push, pusher {1e3 * c_p:.2f} ms "
        f"CPU/push, {free:.2f} of {cores} cores left by other processes.",
        f"Predicted capacity 1/c_s = {capacity:,.0f} pushes/s (the event loop); at {rate:g} pushes/s per pusher "
        f"the predicted saturation point is {predicted:.1f} pushers. Machine-bound alternative: free/(c_s+c_p) = "
        f"{cap_machine:,.0f} pushes/s, {cap_machine / rate:.1f} pushers.",
        f"Measured: capacity {cap_meas:,.0f} pushes/s ({cap_meas / capacity:.2f}x predicted); saturation "
        f"(achieved < 90% of offered): {knee}"
        + ("" if measured is None else f" ({measured / predicted:.2f}x predicted)")
        + ".",
        "",
        table,
        "",
        "Conditions:",
        "",
        protocol.conditions_table(
            [
                {"pass": "calibration", "order": ["-"], "conditions": cond},
                {"pass": "sweep", "order": ["-"], "conditions": cond2},
            ]
        ),
    ]
    if not math.isfinite(predicted):
        lines.append("(prediction undefined: no CPU time was measured)")
    return "\n".join(lines), {"summary": summary, "calibration": calib, "rows": rows, "conditions": [cond, cond2]}


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.ps_saturation", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0, help="window per point")
    ap.add_argument("--params", type=float, default=N_PARAMS)
    ap.add_argument("--pushers", default=",".join(map(str, PUSHERS)))
    ap.add_argument("--workers", type=int, default=WORKERS, help="worker processes the pushers run in")
    args = ap.parse_args(argv)
    text, raw = run(args.quick, int(args.params), [int(s) for s in args.pushers.split(",")], args.workers, args.seconds)
    stem = "ps_saturation" + ("-quick" if args.quick else "")
    path = protocol.save_json(stem, {"meta": protocol.meta(), "args": vars(args), **raw}, quick=args.quick)
    text = "\n".join(protocol.provenance_lines(protocol.meta())) + "\n\n" + text + f"\n\nRaw figures: `{path}`"
    print(text)
    write_out(stem, text)
    return text


if __name__ == "__main__":
    main()
