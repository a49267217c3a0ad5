"""Where one training step and one whole ``pipeline train`` process spend their time.

    python -m bench.step_anatomy            # MLP 784-512-256-10, batch 256, Adam, float32; 60k x 784, 5 epochs
    python -m bench.step_anatomy --quick    # tiny sizes (smoke run)

Part 1, one step in this process (the kernels' cpu backend with 1 BLAS thread, as in a worker
and in-process training, and again with BLAS's default threads), medians over many repeats of:
the step's eight GEMMs alone (forward, weight gradient and input gradient of each layer, the
first layer having no input gradient, on the trainer's own buffers), forward + loss + backward
(``_gradient``), the local optimizer's update, the whole step (cycling over 32 distinct random
batches: hundreds of steps on one batch overfit it until the gradients hold subnormal floats,
which x86 CPUs handle in microcode, and a step then took 21 ms instead of 4; training on real data
showed none); element-wise work is the gradient pass minus its GEMMs. The
loader: one batch from a ChunkLoader over an on-disk store (read, shuffle, standardize; the
second pass over it). Push /
pull: one pull of the whole parameter vector from the parameter server in the scheduler of a
1-worker LocalCluster, per step at ``local_steps = 8`` (one push and one pull per 8 steps). The
scheduler's share: the driver process's CPU seconds (the LocalCluster's scheduler and the
parameter server run there) over a 2-worker training run's wall time, beside the workers'.

The step's GEMMs one by one (1 BLAS thread): each layer's forward, weight-gradient and
input-gradient product, GFLOP/s against an n x n x n GEMM with 1 thread and with BLAS's
default threads (the peak the throughput benchmark's GEMM-implied limit divides by, measured as
``bench.protocol.gemm_peak_numpy`` does).

Where a worker's training thread goes, in the same 2-worker run (no validation): Dask's own
statistical profiler, sampling every 20 ms for this run (``distributed.worker.profile.interval``;
100 ms otherwise) in 500 ms cycles, over the epochs after the first (to within a cycle; the
whole run if it is shorter than that). Each sample is charged to the first of
these frames on its stack, from the task down: ``_Pusher.push`` / ``finish`` (**push and wait for
the parameter server**: the delta, the sync barrier, the reply), ``ChunkLoader.epoch`` (**loader**:
shuffle, gather, standardize, waiting for reads), ``adam_update`` (**optimizer**), ``_gradient``
(**forward + backward kernels**), ``evaluate_ranges`` (validation); anything else is **other**
(the minibatch loop itself, weight averaging, bookkeeping). With the run's steady samples/s that
gives the share of the GEMM-implied limit the run reached and what stands between.

Part 2, a cold ``pipeline train`` process on a synthetic store (``pipeline synth``) with
``hidden=[512,256]``, ``patience=0``, in process (the default below ``cluster_min_rows``) and
with ``--workers 2``: imports (a fresh interpreter importing the command's
modules), cluster start (a LocalCluster of 2 workers, --workers 2 only), worker warm-up (first epoch minus the
median of the others), per-epoch training and validation (history.json), checkpoint and model
save (timed again on the run's own files), and the whole process's wall time from outside.

Each measurement above (the step with 1 BLAS thread and with the default threads, the loader,
the pull, the 2-worker run, the GEMMs one by one, each cold process) is one pass of
:mod:`bench.protocol` (``measure_pass``: load average, steal, other processes' CPU, GEMM peaks,
flagged when under load): the table's header gives the commit, versions and every pass's
conditions, the JSON keeps them (``passes``), so that a phase timed while the machine was busy is
known as such.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import child_env, local_cluster, machine, md_table, tmpdir, write_out
from bench.throughput import _flops

ROOT = Path(__file__).resolve().parents[1]
SIZES = (784, 512, 256, 10)
# training FLOPs of one sample, as the throughput benchmark's GEMM-implied limit counts them:
# forward and weight gradient of every layer, input gradient of all but the first (2.41 MFLOP)
FLOPS_PER_SAMPLE = _flops(SIZES)
# the shares run's sampling: every 20 ms, kept in 500 ms cycles (what client.profile(start=...)
# selects by)
PROFILE_CONFIG = {"distributed.worker.profile.interval": "20ms", "distributed.worker.profile.cycle": "500ms"}
PROFILE_INTERVAL = PROFILE_CONFIG["distributed.worker.profile.interval"]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_parts(batch: int, repeats: int) -> dict[str, float]:
    """Seconds per step of the GEMMs, the gradient pass, the optimizer and the whole step."""
    from kernels.mlp import MLPSpec, MLPTrainer

    spec = MLPSpec(n_in=SIZES[0], hidden=SIZES[1:-1], n_out=SIZES[-1], activation="relu", loss="softmax_ce")
    tr = MLPTrainer(spec, backend="cpu", optimizer="adam", lr=1e-3, max_batch=batch, seed=0)
    rng = np.random.default_rng(0)
    # distinct batches for the whole step, so that its repeats train a model, not overfit one batch
    # into subnormal gradients (see the module's docstring)
    n_batches = 32
    Xs = rng.standard_normal((n_batches, batch, SIZES[0])).astype(np.float32)
    ys = rng.integers(0, SIZES[-1], (n_batches, batch)).astype(np.int32)
    X, y = Xs[0], ys[0]
    tr.step(X, y)  # buffers, JIT
    K = tr.K
    steps = itertools.count(1)

    def step() -> None:
        i = next(steps) % n_batches
        tr.step(Xs[i], ys[i])

    def gemms() -> None:
        a = X
        for layer in range(spec.n_layers):
            K.gemm(tr._acts[layer][:batch], a, tr._W[layer])
            a = tr._acts[layer][:batch]
        for layer in range(spec.n_layers - 1, -1, -1):
            a_in = X if layer == 0 else tr._acts[layer - 1][:batch]
            K.gemm(tr._dW[layer], a_in, tr._deltas[layer][:batch], trans_a=True)
            if layer:
                K.gemm(tr._deltas[layer - 1][:batch], tr._deltas[layer][:batch], tr._W[layer], trans_b=True)

    out = {
        "gemm": _median_time(gemms, repeats),
        "gradient": _median_time(lambda: tr._gradient(X, y), repeats),
        # the whole step before the optimizer alone: the latter's repeats of one gradient take
        # the weights far from where training would
        "step": _median_time(step, repeats),
        "optimizer": _median_time(lambda: tr.optimizer.step(tr._flat, tr._grad), repeats),
    }
    out["elementwise"] = max(0.0, out["gradient"] - out["gemm"])
    # the 8 GEMMs timed above (the first layer has no input gradient): the training FLOPs
    out["gemm_gflops"] = FLOPS_PER_SAMPLE * batch / out["gemm"] / 1e9
    out["n_params"] = int(tr.get_params().size)
    return out


def loader_per_batch(store: Any, batch: int) -> float:
    from pipeline.loader import ChunkLoader

    with ChunkLoader(store, batch_size=batch, seed=0) as ld:
        for _batch in ld.epoch(1):  # compiled row kernels, the store in the page cache
            pass
        n = 0
        t = time.perf_counter()
        for _batch in ld.epoch(0):
            n += 1
        return (time.perf_counter() - t) / max(1, n)


def push_pull(client: Any, n_params: int, repeats: int) -> float:
    """Seconds of one pull of the whole vector from the parameter server (a push costs the same
    bytes the other way)."""
    import uuid

    from pipeline.ps import ParameterServer

    ParameterServer.ensure_installed(client)
    ps = ParameterServer(f"anatomy-{uuid.uuid4().hex[:8]}", client)
    ps.create(np.zeros(n_params, np.float32))
    try:
        return _median_time(lambda: ps.pull(), repeats)
    finally:
        ps.close()


def gemm_shapes(batch: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s of each of the step's GEMMs with 1 BLAS thread, and the n x n x n peaks with 1
    thread and with BLAS's default threads."""
    from threadpoolctl import threadpool_limits

    from bench import protocol

    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1, user_api="blas"):
        for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
            x = rng.standard_normal((batch, fan_in)).astype(np.float32)
            w = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
            dy = rng.standard_normal((batch, fan_out)).astype(np.float32)
            y, dw, dx = np.empty_like(dy), np.empty_like(w), np.empty_like(x)
            flops = 2 * batch * fan_in * fan_out
            for part, fn in (
                ("forward", lambda x=x, w=w, y=y: np.matmul(x, w, out=y)),
                ("weight gradient", lambda x=x, dy=dy, dw=dw: np.matmul(x.T, dy, out=dw)),
                ("input gradient", lambda dy=dy, w=w, dx=dx: np.matmul(dy, w.T, out=dx)),
            ):
                seconds = _median_time(fn, repeats)
                rows.append({"layer": f"{fan_in}x{fan_out}", "part": part, "gflops": flops / seconds / 1e9})
        peak_1 = protocol.gemm_peak_numpy()
    return {"gemms": rows, "peak_1_thread": peak_1, "peak_default": protocol.gemm_peak_numpy()}


# the categories of a worker's training-thread samples: the first matching frame from the task
# down decides (module file, function name)
THREAD_PARTS = (
    ("push and wait for the parameter server", {("worker.py", "push"), ("worker.py", "finish")}),
    ("loader", {("loader.py", "epoch")}),
    ("validation", {("worker.py", "evaluate_ranges")}),
    ("optimizer", {("cpu.py", "adam_update")}),
    ("forward + backward kernels", {("mlp.py", "_gradient")}),
)


def thread_split(profile: dict) -> dict[str, float]:
    """Samples of a Dask profile tree (``client.profile()``) per :data:`THREAD_PARTS` category
    (and ``other``), as shares of all samples; ``samples`` the count."""
    counts: dict[str, int] = {name: 0 for name, _ in THREAD_PARTS} | {"other": 0}

    def walk(node: dict, part: str | None) -> None:
        d = node.get("description", {})
        frame = (Path(str(d.get("filename", ""))).name, d.get("name"))
        if part is None:
            part = next((name for name, frames in THREAD_PARTS if frame in frames), None)
        children = node.get("children", {}).values()
        counts[part or "other"] += node["count"] - sum(c["count"] for c in children)
        for child in children:
            walk(child, part)

    walk(profile, None)
    total = sum(counts.values())
    return {k: v / total if total else float("nan") for k, v in counts.items()} | {"samples": float(total)}


def cluster_shares(client: Any, store: Any, out: Path, epochs: int) -> dict[str, Any]:
    """Driver (scheduler + parameter server) and worker CPU seconds over a training run's wall;
    the workers' training threads by part (:func:`thread_split`, the epochs after the first)
    and the run's steady samples/s (median of those epochs)."""
    import psutil

    from pipeline.config import TrainConfig
    from pipeline.train import train

    me = psutil.Process()
    kids = me.children(recursive=True)

    def cpu(p: Any) -> float:
        try:
            c = p.cpu_times()
            return c.user + c.system
        except psutil.Error:
            return 0.0

    d0, w0 = cpu(me), sum(cpu(k) for k in kids)
    t = time.perf_counter()
    cfg = TrainConfig(hidden=list(SIZES[1:-1]), epochs=epochs, patience=0, validation=0.0)
    res = train(str(store.path), cfg, out, client=client, force=True)
    wall = time.perf_counter() - t
    shares = {"wall": wall, "driver_cpu": cpu(me) - d0, "workers_cpu": sum(cpu(k) for k in kids) - w0}
    hist = res.history
    first_end = time.time() - wall + hist[0]["seconds"] if len(hist) > 1 else None  # the first epoch's end, about
    steady = hist[1:] or hist
    shares["samples_per_s"] = float(np.median([h["samples"] / h["seconds"] for h in steady]))
    shares["thread"] = thread_split(client.profile(start=first_end))
    shares["thread_scope"] = "the epochs after the first"
    if not shares["thread"]["samples"]:  # a run shorter than a profile cycle after its first epoch
        shares["thread"] = thread_split(client.profile())
        shares["thread_scope"] = "the whole run"
    return shares


def cold_run(store_path: str, out: Path, epochs: int, extra: Sequence[str] = ()) -> dict[str, float]:
    """The phases of one cold ``pipeline train`` process (see the module docstring); ``extra``
    arguments (``--workers 2``: on a cluster)."""
    from pipeline.checkpoint import load_file, save_file
    from pipeline.model import Model

    env = child_env()
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import pipeline.cli, pipeline.train, pipeline.worker, distributed"], env=env, check=True
    )
    imports = time.perf_counter() - t
    probe = (
        "import time\nfrom pipeline.connect import cluster_client\nt = time.perf_counter()\n"
        "with cluster_client(None, workers=2, dashboard_address=None) as c:\n"
        "    print(time.perf_counter() - t)"
    )
    got = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    cluster = float(got.stdout.split()[-1])
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        store_path,
        "--out",
        str(out),
        "--force",
        "-q",
        "--set",
        f"hidden={list(SIZES[1:-1])}",
        "--set",
        f"epochs={epochs}",
        "--set",
        "patience=0",
        *extra,
    ]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    total = time.perf_counter() - t
    hist = json.loads((out / "history.json").read_text())["epochs"]
    secs = [h["seconds"] for h in hist]
    steady = float(np.median(secs[1:])) if len(secs) > 1 else secs[0]
    arrays, meta = load_file(out / "checkpoint.npz", "checkpoint")
    t = time.perf_counter()
    save_file(out / "checkpoint-again.npz", "checkpoint", arrays, meta)
    checkpoint = time.perf_counter() - t
    model = Model.load(out / "model.npz")
    t = time.perf_counter()
    model.save(out / "model-again.npz")
    save = time.perf_counter() - t
    on_cluster = bool(extra)
    return {
        "process": total,
        "imports": imports,
        "cluster start": cluster if on_cluster else 0.0,
        "warm-up (epoch 1 - steady)": secs[0] - steady,
        "training (sum of train_s)": float(sum(h["train_s"] for h in hist)),
        "validation (sum of validate_s)": float(sum(h["validate_s"] for h in hist)),
        "checkpoint (one, x epochs)": checkpoint * len(hist),
        "model save": save,
        "epochs": float(len(hist)),
        "steady epoch": steady,
    }


@contextlib.contextmanager
def phase(passes: list[dict[str, Any]], label: str, peak_n: int = 1024) -> Iterator[None]:
    """Run one measurement as a protocol pass: its conditions are appended to ``passes`` as a pass
    record whose ``order`` names the measurement (the conditions table's first column)."""
    with protocol.measure_pass(cores=2, peak_n=peak_n) as cond:
        yield
    passes.append({"pass": len(passes) + 1, "order": [label], "conditions": cond})


def conditions_lines(passes: list[dict[str, Any]]) -> list[str]:
    """The conditions table of the run's passes and the flagged ones, for the table's header."""
    flagged = [f"{p['order'][0]} ({', '.join(p['conditions']['flags'])})" for p in passes if p["conditions"]["flags"]]
    lines = [
        "Conditions per pass (one pass per measurement, in the order run; the first trainer column names it):",
        "",
        protocol.conditions_table(passes),
    ]
    return lines + (["", f"Flagged under load: {'; '.join(flagged)}."] if flagged else [])


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    rows, epochs, repeats = (4_000, 2, 20) if args.quick else (args.rows, args.epochs, 300)
    # the passes' torch.mm peak loads OpenMP: its threads must not spin beside the timed phases
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    batch = 256
    peak_n = 256 if args.quick else 1024
    mach = machine()
    m = protocol.meta()  # the commit and versions as the run starts
    passes: list[dict[str, Any]] = []
    from pipeline.synth import synth

    with tmpdir("step-anatomy") as tmp:
        store = synth(str(tmp / "s.zarr"), rows=rows, features=SIZES[0], classes=SIZES[-1], seed=0)
        from threadpoolctl import threadpool_limits

        with phase(passes, "step, 1 BLAS thread", peak_n), threadpool_limits(1, user_api="blas"):
            parts = step_parts(batch, repeats)  # as in a worker and in-process training
        with phase(passes, "step, default BLAS threads", peak_n):
            parts2 = step_parts(batch, repeats)  # BLAS's default threads (the cores)
        with phase(passes, "loader batch", peak_n):
            ld = loader_per_batch(store, batch)
        with phase(passes, "pull (1-worker cluster)", peak_n), local_cluster(1) as client:
            pp = push_pull(client, parts["n_params"], max(5, repeats // 10))
        import dask

        with phase(passes, "2-worker run", peak_n), dask.config.set(PROFILE_CONFIG), local_cluster(2) as client:
            shares = cluster_shares(client, store, tmp / "run-shares", epochs)
        with phase(passes, "GEMMs one by one", peak_n):
            shapes = gemm_shapes(batch, repeats)
        with phase(passes, "cold, in process", peak_n):
            cold = cold_run(str(store.path), tmp / "run-cold", epochs)
        with phase(passes, "cold, 2 workers", peak_n):
            cold_cluster = cold_run(
                str(store.path), tmp / "run-cold-cluster", epochs, ("--workers", "2", "--dashboard-address", "none")
            )
    step = parts["step"]
    per_step = [
        {"part": "GEMMs (8 per step)", "ms": parts["gemm"] * 1e3, "ms, default BLAS threads": parts2["gemm"] * 1e3},
        {
            "part": "element-wise (bias, activations, loss)",
            "ms": parts["elementwise"] * 1e3,
            "ms, default BLAS threads": parts2["elementwise"] * 1e3,
        },
        {
            "part": "optimizer (Adam)",
            "ms": parts["optimizer"] * 1e3,
            "ms, default BLAS threads": parts2["optimizer"] * 1e3,
        },
        {"part": "whole step", "ms": step * 1e3, "ms, default BLAS threads": parts2["step"] * 1e3},
        {"part": "loader, one batch", "ms": ld * 1e3},
        {"part": "push + pull per step (1/8 of 2 pulls)", "ms": 2 * pp / 8 * 1e3},
    ]
    for r in per_step:
        r["% of step"] = 100 * r["ms"] / (step * 1e3)
        r.setdefault("ms, default BLAS threads", float("nan"))
    share_rows = [
        {
            "process": "driver (scheduler + PS)",
            "CPU s": shares["driver_cpu"],
            "% of wall x 2 cores": 100 * shares["driver_cpu"] / (2 * shares["wall"]),
        },
        {
            "process": "2 workers",
            "CPU s": shares["workers_cpu"],
            "% of wall x 2 cores": 100 * shares["workers_cpu"] / (2 * shares["wall"]),
        },
    ]
    cold_rows = [
        {"phase": k, "in process (default) s": v, "--workers 2 s": cold_cluster[k]}
        for k, v in cold.items()
        if k != "epochs"
    ]
    gemm_rows = [
        {
            **r,
            "% of 1-thread peak": 100 * r["gflops"] / shapes["peak_1_thread"],
            "% of default-threads peak x 1/2": 100 * r["gflops"] / (shapes["peak_default"] / 2),
        }
        for r in shapes["gemms"]
    ]
    limit = shapes["peak_default"] * 1e9 / FLOPS_PER_SAMPLE
    thread = shares["thread"]
    thread_rows = [{"part": k, "% of samples": 100 * v} for k, v in thread.items() if k != "samples"]
    payload = {
        "benchmark": "step_anatomy",
        "meta": m,
        "quick": args.quick,
        "machine": mach,
        "rows": rows,
        "epochs": epochs,
        "batch": batch,
        "sizes": list(SIZES),
        "flops_per_sample": FLOPS_PER_SAMPLE,
        "step_1_thread": parts,
        "step_default_threads": parts2,
        "loader_per_batch": ld,
        "pull": pp,
        "cluster_run": shares,
        "gemm_shapes": shapes,
        "limit_samples_per_s": limit,
        "cold_in_process": cold,
        "cold_2_workers": cold_cluster,
        "passes": passes,
    }
    m["json"] = str(protocol.save_json("step_anatomy" + ("-quick" if args.quick else ""), payload, quick=args.quick))
    text = (
        f"Machine: {mach['cpu']}, {mach['cores']} cores (shared, loaded: load {mach['load']}), {mach['date']}; "
        f"MLP {'-'.join(map(str, SIZES))}, batch {batch}, Adam, float32; GEMM rate in the step "
        f"{parts['gemm_gflops']:.1f} GFLOP/s with 1 BLAS thread, {parts2['gemm_gflops']:.1f} with the default\n\n"
        + "\n".join([*protocol.provenance_lines(m), "", *conditions_lines(passes)])
        + "\n\n"
        + md_table(per_step, {"ms": ".3f", "% of step": ".0f", "ms, default BLAS threads": ".3f"})
        + f"\n\nCPU over a 2-worker training run ({rows:,} rows, {epochs} epochs, {shares['wall']:.1f} s wall):\n\n"
        + md_table(share_rows, {"CPU s": ".2f", "% of wall x 2 cores": ".0f"})
        + f"\n\nThe step's GEMMs with 1 BLAS thread (n x n x n peaks: {shapes['peak_1_thread']:.1f} GFLOP/s with 1 "
        f"thread, {shapes['peak_default']:.1f} with the default threads):\n\n"
        + md_table(gemm_rows, {"gflops": ".1f", "% of 1-thread peak": ".0f", "% of default-threads peak x 1/2": ".0f"})
        + f"\n\nA worker's training thread in the same run (Dask's profiler every {PROFILE_INTERVAL}, "
        f"{int(thread['samples'])} samples over {shares['thread_scope']}; no validation in this run):\n\n"
        + md_table(thread_rows, {"% of samples": ".1f"})
        + f"\n\nThat run's steady state: {shares['samples_per_s']:,.0f} samples/s, "
        f"{100 * shares['samples_per_s'] / limit:.0f}% of the GEMM-implied limit ({limit:,.0f} samples/s: the "
        f"default-threads peak over {FLOPS_PER_SAMPLE / 1e6:.2f} MFLOP a sample, the throughput benchmark's "
        "definition).\n" + f"\nCold `pipeline train` ({rows:,} x {SIZES[0]}, {int(cold['epochs'])} epochs), in process "
        "(the default below cluster_min_rows) and on a 2-worker cluster:\n\n"
        + md_table(cold_rows, {"in process (default) s": ".2f", "--workers 2 s": ".2f"})
        + "\n"
    )
    print(text)
    write_out("step_anatomy-quick" if args.quick else "step_anatomy", text)
    return text


if __name__ == "__main__":
    main()
