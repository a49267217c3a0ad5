"""Federated simulation side by side with Flower: FedAvg over many simulated clients.

    python -m bench.federated                        # 100, 1,000 and 10,000 clients, 5 passes
    python -m bench.federated --clients 100,1000 --rounds 20 --passes 5
    python -m bench.federated --systems flower       # the Flower side alone
    python -m bench.federated --render bench/results/federated-X.json   # a saved run's table again
    python -m bench.federated --quick                # 10 clients, 3 rounds, 1 pass (smoke run)
    python -m bench.federated --flower-python PATH   # Flower's interpreter (default: .venv-flwr)

The task: ``pipeline.synth``'s 784-wide uint8 classification set (10 classes), 60,000 training
and 10,000 test rows, standardized with the training store's statistics. The model: MLP
784-128-10 (ReLU, float32, cross-entropy), both systems starting from the same initial weights
(``kernels.mlp.init_params`` with the seed). Each round samples ``fraction_fit`` = 10% of the
clients; each sampled client makes ``local_epochs`` passes of plain SGD (learning rate ``lr``,
batches of ``batch`` rows in a shuffled order) over its rows and returns its model with its row
count; the server replaces the model by the sample-weighted mean (FedAvg). The split: Dirichlet
(alpha 0.3) over labels, the same rows per client for both systems (see :func:`partition`).

* **Flower** (``bench.flower_peer``): Flower's simulation engine (``run_simulation`` with its
  Ray backend, 2 CPUs, 1 CPU per client: two clients train at once), FedAvg from
  ``flwr.serverapp.strategy``, PyTorch clients with one thread each. It runs in its own virtual
  environment (``flwr[simulation]`` pins versions this project does not share; its versions are
  recorded beside the project's).
* **pipeline**: ``pipeline.train.train`` with ``clients = N``, ``partition = "dirichlet"``,
  ``partition_alpha = 0.3``, ``fraction_fit = 0.1``, ``strategy = "fedavg"``, on a LocalCluster
  of 2 single-thread workers; skipped (its columns say why) where this checkout's ``TrainConfig``
  has no ``clients`` key.

Each system runs in a fresh process per measurement; the harness samples the resident memory of
that process and all its descendants (Ray's GCS, raylet and actors; Dask's nannies and workers)
every 0.2 s with psutil: peak RSS summed over the tree (shared pages count once per process)
and, every 1 s, peak PSS (shared pages divided among the processes sharing them). Figures per run:

* **rounds/s** (steady): rounds 2..R-1 over the time from the end of round 1 to the end of round
  R-1 (start-up, the first round's warm-up and the last round, in which the pipeline evaluates
  every client on its rows, excluded for both alike); the pipeline's rounds include writing its
  checkpoint (Flower writes none);
* **cold**: the whole process, from its start to its exit (imports, Ray/Dask start, all rounds,
  evaluation, shutdown);
* **accuracy** of the final global model on the 10,000 common test rows after R rounds.

R is ``--rounds`` (10) up to 1,000 clients and ``--rounds-large`` (4) above: a Flower round of
1,000 sampled clients takes tens of seconds on 2 cores, and at 10,000 clients only speed and
memory are compared.

Targets (per pass, met in at least 4 of 5 passes, :mod:`bench.protocol`): accuracy within 1
point of Flower's at 100 and 1,000 clients; at least 3x Flower's rounds/s at 100 and 1,000
clients; the pipeline's peak memory at the largest client count within 10% of its peak at 100.
Raw figures: ``bench/results/federated-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import md_table, tmpdir, write_out
from bench.protocol import (
    conditions_table,
    fmt_ratio,
    meta,
    needed,
    provenance_lines,
    ratio_summary,
    run_passes,
    save_json,
)

T0 = time.perf_counter()  # the process's start, for the pipeline peer's timestamps
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLOWER_PYTHON = ROOT / ".venv-flwr" / "bin" / "python"
HIDDEN = (128,)
ALPHA = 0.3
FRACTION = 0.1
TARGET_SPEED = 3.0
TARGET_ACC_POINTS = 1.0
TARGET_MEMORY = 1.10


# -------------------------------------------------------------------------------------------
# data, partition, initial weights
# -------------------------------------------------------------------------------------------


def prepare(dest: Path, rows: int, test_rows: int, features: int = 784, seed: int = 0) -> dict[str, Any]:
    """Write the train/test stores and, for the Flower side, the same rows as .npy files (training
    rows standardized with the training store's statistics, as the pipeline's loader does), the
    initial parameters and the layer sizes."""
    from bench.common import arrays, mnist_like
    from kernels.mlp import MLPSpec, init_params

    train, test = mnist_like(dest, rows, test_rows, features, 10)
    X, y = arrays(train)
    Xte, yte = arrays(test, like=train)
    np.save(dest / "X.npy", X)
    np.save(dest / "y.npy", y)
    np.save(dest / "Xte.npy", Xte)
    np.save(dest / "yte.npy", yte)
    sizes = [features, *HIDDEN, len(train.classes)]
    np.save(dest / "init.npy", init_params(MLPSpec(features, HIDDEN, sizes[-1]), seed=seed))
    (dest / "sizes.json").write_text(json.dumps(sizes))
    return {"train": train, "test": test, "sizes": sizes, "y": y}


def dirichlet_partition(y: np.ndarray, n_clients: int, alpha: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet-by-label split: for every class c (in order) a share vector over the clients is
    drawn from Dirichlet(alpha), the class's rows are shuffled and cut at the cumulative shares;
    a client left without rows then takes one row from the client holding the most (so every
    client trains on at least one row). Returns (offsets: n_clients + 1 int64, rows: int64, sorted
    within each client). Same seed, same partition."""
    rng = np.random.default_rng([seed, 0xD1A])
    owner = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        share = rng.dirichlet(np.full(n_clients, alpha))
        cut = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        for k, part in enumerate(np.split(idx, cut)):
            owner[part] = k
    sizes = np.bincount(owner, minlength=n_clients)
    for k in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        row = np.flatnonzero(owner == donor)[0]
        owner[row] = k
        sizes[donor] -= 1
        sizes[k] += 1
    order = np.lexsort((np.arange(len(y)), owner))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return offsets, order.astype(np.int64)


def partition(data: Path, store: Any, y: np.ndarray, n_clients: int, seed: int = 0) -> dict[str, Any]:
    """Client k's rows for both systems, written to ``data/partition-N/{offsets,rows}.npy``.
    ``pipeline.partition.make_partition`` (kind dirichlet, alpha 0.3) when this checkout has it
    (the pipeline then computes the same partition from the same seed), else
    :func:`dirichlet_partition`."""
    out = data / f"partition-{n_clients}"
    out.mkdir(parents=True, exist_ok=True)
    refused = None
    try:
        from pipeline.partition import make_partition
    except ImportError:
        offsets, rows = dirichlet_partition(y, n_clients, ALPHA, seed)
        source = "bench.federated.dirichlet_partition"
    else:
        from pipeline.errors import ConfigError

        try:
            p = make_partition(store, n_clients, "dirichlet", alpha=ALPHA, seed=seed, out=data / f"pp-{n_clients}")
        except ConfigError as exc:  # every client >= 1 row is impossible here: Flower gets empty clients
            refused = str(exc)
            p = make_partition(
                store, n_clients, "dirichlet", alpha=ALPHA, seed=seed, out=data / f"pp-{n_clients}", min_rows=0
            )
        offsets = np.asarray(p.offsets, np.int64)
        rows = np.concatenate([np.asarray(p.rows(k), np.int64) for k in range(n_clients)])
        source = "pipeline.partition.make_partition" + (" (min_rows 0)" if refused else "")
    np.save(out / "offsets.npy", offsets)
    np.save(out / "rows.npy", rows)
    sizes = np.diff(offsets)
    return {
        "source": source,
        "refused": refused,
        "clients": n_clients,
        "rows_min": int(sizes.min()),
        "rows_median": float(np.median(sizes)),
        "rows_max": int(sizes.max()),
        "empty_clients": int((sizes == 0).sum()),
    }


# -------------------------------------------------------------------------------------------
# memory of a process tree
# -------------------------------------------------------------------------------------------


class TreeMemory:
    """Samples the summed RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) of a
    process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5) -> None:
        self.pid, self.interval, self.pss_every, self._n = pid, interval, pss_every, 0
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        full = self._n % self.pss_every == 0  # PSS reads /proc/PID/smaps: every 5th sample only
        self._n += 1
        rss = pss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if full:
                    m = p.memory_full_info()
                    pss += getattr(m, "pss", m.rss)
                else:
                    m = p.memory_info()
                rss += m.rss
        self.peak_rss = max(self.peak_rss, rss)
        if full:
            self.peak_pss = max(self.peak_pss, pss)
        self.max_procs = max(self.max_procs, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[float, TreeMemory]:
    """Run ``cmd`` to completion, sampling its process tree's memory; returns (wall seconds, sampler)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -9
    wall = time.perf_counter() - t
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} ... exited with {rc}; last lines of {log_path}:\n" + "\n".join(tail))
    return wall, mem


def rounds_for(n: int, args: dict[str, Any]) -> int:
    """Rounds run at ``n`` clients: ``rounds``, or ``rounds_large`` above 1,000 clients (where only
    speed and memory are compared, and a Flower round of 1,000 sampled clients takes tens of seconds)."""
    return int(args["rounds"] if n <= 1000 else args["rounds_large"])


def steady_rounds_per_s(round_end: Sequence[float]) -> float | None:
    """Rounds 2..R-1 over the time from the end of round 1 to the end of round R-1: the first round
    (warm-up: Ray actors or Dask workers importing and compiling) and the last (the pipeline's
    per-client evaluation runs in it) are left out for both systems alike."""
    if len(round_end) < 3:
        return None
    return (len(round_end) - 2) / max(round_end[-2] - round_end[0], 1e-9)


# -------------------------------------------------------------------------------------------
# the two systems
# -------------------------------------------------------------------------------------------


def flower_versions(python: Path) -> dict[str, Any]:
    code = "import json; from bench.flower_peer import versions; print(json.dumps(versions()))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def run_flower(python: Path, data: Path, n: int, args: argparse.Namespace, k: int) -> dict[str, Any]:
    out = data / f"flower-{n}-{k}.json"
    cmd = [str(python), "-m", "bench.flower_peer", str(data), str(out), "--clients", str(n)]
    cmd += [
        "--rounds",
        str(rounds_for(n, vars(args))),
        "--local-epochs",
        str(args.local_epochs),
        "--batch",
        str(args.batch),
    ]
    cmd += ["--lr", str(args.lr), "--fraction", str(FRACTION), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("VIRTUAL_ENV", None)
    wall, mem = run_measured(cmd, env, data / f"flower-{n}-{k}.log", args.timeout)
    res = json.loads(out.read_text())
    return {
        "rounds_per_s": steady_rounds_per_s(res["round_end"]),
        "cold": wall,
        "accuracy": res["accuracy"],
        "peak_rss": mem.peak_rss,
        "peak_pss": mem.peak_pss,
        "processes": mem.max_procs,
        "round_end": res["round_end"],
        "setup": res["setup"],
    }


def guarded(fn: Any) -> Any:
    """A run that fails (a refused configuration, a crash) is recorded as ``{"error": ...}``: its
    cells say so and the other runs go on."""

    def run() -> dict[str, Any]:
        try:
            return fn()
        except RuntimeError as exc:
            return {"error": str(exc)}

    return run


def pipeline_available() -> str | None:
    """None when this checkout trains simulated clients, else why not."""
    from pipeline.config import TrainConfig

    missing = [
        k for k in ("clients", "partition", "fraction_fit", "rounds", "strategy") if not hasattr(TrainConfig(), k)
    ]
    if missing:
        return f"this checkout's TrainConfig has no {', '.join(missing)} (simulated clients not built in)"
    return None


def pipeline_config(n: int, args: argparse.Namespace, kind: str = "dirichlet") -> dict[str, Any]:
    """The pipeline settings matching the Flower side."""
    return {
        "clients": n,
        "partition": kind,
        "partition_alpha": ALPHA,
        "fraction_fit": FRACTION,
        "strategy": "fedavg",
        "rounds": rounds_for(n, vars(args)),
        "local_epochs": args.local_epochs,
        "hidden": list(HIDDEN),
        "optimizer": "sgd",
        "lr": args.lr,
        "batch_size": args.batch,
        "seed": args.seed,
        "min_clients": 1,
        "validation": 0.0,  # every client trains on all its rows, as Flower's do
        "eval_every": rounds_for(n, vars(args)),  # per-client evaluation after the last round only
        "patience": 0,
    }


def pipeline_peer_main(argv: Sequence[str]) -> None:
    """``python -m bench.federated pipeline-peer TRAIN.zarr TEST.zarr RUN OUT.json CONFIG_JSON DATA``: one
    pipeline run on a fresh 2-worker LocalCluster; writes the end time of every round (seconds since
    the process started, taken when the round's record is out, its checkpoint written), the test
    accuracy and whether the run's partition is the one given to Flower (``DATA/partition-N``)."""
    from bench.common import local_cluster
    from pipeline.config import TrainConfig
    from pipeline.store import open_store
    from pipeline.train import train

    train_p, test_p, run_dir, out, cfg_s, data = argv[:6]
    cfg = TrainConfig.from_dict(json.loads(cfg_s))
    ends: list[float] = []
    with local_cluster(2) as client:
        setup = time.perf_counter() - T0
        res = train(
            train_p, cfg, run_dir, client=client, force=True, on_epoch=lambda r: ends.append(time.perf_counter() - T0)
        )
    test = open_store(test_p)
    Xraw, yte = test.read_rows(0, test.n_rows)
    acc = float(np.mean(res.model.decision(Xraw).argmax(axis=1) == np.asarray(yte)))
    mine, theirs = Path(data) / f"partition-{cfg.clients}", Path(run_dir) / "partition"
    same = None
    if (theirs / "rows.npy").is_file():
        same = all(np.array_equal(np.load(mine / f), np.load(theirs / f)) for f in ("offsets.npy", "rows.npy"))
    Path(out).write_text(
        json.dumps(
            {"round_end": ends, "accuracy": acc, "setup": setup, "rounds": len(res.history), "same_partition": same}
        )
    )


def run_pipeline_side(
    data: Path, prep: dict[str, Any], n: int, args: argparse.Namespace, k: int, kind: str = "dirichlet"
) -> dict[str, Any]:
    out = data / f"pipeline-{n}-{k}.json"
    cmd = [sys.executable, "-m", "bench.federated", "pipeline-peer", str(prep["train"].path), str(prep["test"].path)]
    cmd += [str(data / f"run-{n}-{k}"), str(out), json.dumps(pipeline_config(n, args, kind)), str(data)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wall, mem = run_measured(cmd, env, data / f"pipeline-{n}-{k}.log", args.timeout)
    res = json.loads(out.read_text())
    return {
        "rounds_per_s": steady_rounds_per_s(res["round_end"]),
        "cold": wall,
        "accuracy": res["accuracy"],
        "peak_rss": mem.peak_rss,
        "peak_pss": mem.peak_pss,
        "processes": mem.max_procs,
        "round_end": res["round_end"],
        "setup": res["setup"],
        "same_partition": res["same_partition"],
        "partition": kind,
    }


# -------------------------------------------------------------------------------------------
# the table
# -------------------------------------------------------------------------------------------


def _series(passes: list[dict], name: str, key: str) -> list[float | None]:
    return [(p["results"].get(name) or {}).get(key) for p in passes]


def _med(vals: Sequence[float | None], fmt: str = ".3g") -> str:
    """``median (min-max)`` over the passes; a single pass is shown alone."""
    got = [v for v in vals if v is not None]
    if not got:
        return "n/a"
    if len(got) == 1:
        return format(got[0], fmt)
    return f"{format(float(np.median(got)), fmt)} ({format(min(got), fmt)}-{format(max(got), fmt)})"


def summarize(passes: list[dict], clients: Sequence[int], pipeline_missing: str | None) -> dict[str, Any]:
    """Per-pass ratios and the targets."""
    tg: dict[str, Any] = {}
    for n in clients:
        f, p = f"flower N={n}", f"pipeline N={n}"
        if pipeline_missing:
            continue
        tg[f"speed N={n}"] = ratio_summary(
            _series(passes, p, "rounds_per_s"), _series(passes, f, "rounds_per_s"), TARGET_SPEED
        )
        # accuracy: per-pass difference in points, turned into a ratio-like hit count
        fa, pa = _series(passes, f, "accuracy"), _series(passes, p, "accuracy")
        diffs = [None if a is None or b is None else 100 * (b - a) for a, b in zip(fa, pa, strict=True)]
        hits = sum(1 for d in diffs if d is not None and d >= -TARGET_ACC_POINTS)
        tg[f"accuracy N={n}"] = {
            "per_pass": diffs,
            "hits": hits,
            "needed": needed(len(diffs)),
            "met": hits >= needed(len(diffs)),
        }
    if not pipeline_missing and len(clients) > 1:
        lo, hi = f"pipeline N={min(clients)}", f"pipeline N={max(clients)}"
        growth = ratio_summary(_series(passes, hi, "peak_rss"), _series(passes, lo, "peak_rss"))
        hits = sum(1 for r in growth["per_pass"] if r is not None and r <= TARGET_MEMORY)
        growth.update(target=TARGET_MEMORY, hits=hits, needed=needed(len(passes)))
        growth["met"] = hits >= growth["needed"]
        tg["memory"] = growth
    return tg


def sampled(n: int) -> int:
    """Clients per round at ``n`` clients: 10%, at least one (both systems)."""
    return max(1, int(n * FRACTION + 1e-9))


def failures(passes: list[dict]) -> list[str]:
    """One line per failed run (its cells read n/a): the last line of its error."""
    out = []
    for p in passes:
        for name, r in p["results"].items():
            if r.get("error"):
                last = [ln for ln in r["error"].splitlines() if ln.strip()][-1]
                out.append(f"* {name}, pass {p['pass']}: failed: {last.strip()[:300]}")
    return [*out, ""] if out else []


def render(res: dict[str, Any]) -> str:
    passes, clients = res["passes"], res["clients"]
    miss = res["pipeline_missing"]
    rows = []
    for n in clients:
        for system in ("flower", "pipeline"):
            name = f"{system} N={n}"
            if system == "pipeline" and miss:
                rows.append(dict.fromkeys(rows[-1], "not run") | {"clients": f"{n:,}", "system": "pipeline"})
                continue
            mb = [None if v is None else v / 2**20 for v in _series(passes, name, "peak_rss")]
            mbp = [None if v is None else v / 2**20 for v in _series(passes, name, "peak_pss")]
            acc = [None if v is None else 100 * v for v in _series(passes, name, "accuracy")]
            kinds = {(r.get("partition") or "dirichlet") for r in (p["results"].get(name) or {} for p in passes)}
            rows.append(
                {
                    "clients": f"{n:,}",
                    "system": system + ("" if kinds <= {"dirichlet"} else " (iid split)"),
                    "rounds/s (steady)": _med(_series(passes, name, "rounds_per_s")),
                    "ms per sampled client": _med(
                        [None if r is None else 1000 / r / sampled(n) for r in _series(passes, name, "rounds_per_s")],
                        ".0f",
                    ),
                    "rounds": str(rounds_for(n, res["args"])),
                    "cold s": _med(_series(passes, name, "cold"), ".1f"),
                    "test acc %": _med(acc, ".1f"),
                    "peak RSS MiB (tree)": _med(mb, ".0f"),
                    "peak PSS MiB (tree)": _med(mbp, ".0f"),
                    "processes": _med(_series(passes, name, "processes"), ".0f"),
                }
            )
    fv = res["flower_versions"]
    lines = [
        f"# Federated simulation vs Flower ({res['meta']['date']})",
        "",
        *provenance_lines(res["meta"]),
        f"Flower side: its own venv (`{fv.get('executable')}`): flwr {fv.get('flwr')}, ray {fv.get('ray')}, "
        f"torch {fv.get('torch')}, numpy {fv.get('numpy')}, protobuf {fv.get('protobuf')}, grpcio {fv.get('grpcio')}.",
        "",
        f"Task: synthetic 784-wide uint8, 10 classes, {res['args']['rows']:,} training / "
        f"{res['args']['test_rows']:,} test rows; MLP {'-'.join(map(str, res['sizes']))}; Dirichlet({ALPHA}) over "
        f"labels ({res['partition_source']}); FedAvg, {int(100 * FRACTION)}% of clients per round, "
        f"{res['args']['local_epochs']} local epoch(s) of SGD lr {res['args']['lr']}, batch {res['args']['batch']}; "
        f"{len(passes)} interleaved pass(es) (median (min-max) over passes). Accuracy: the final global model on "
        "the common test rows after the row's rounds.",
        "",
        md_table(rows),
        "",
        "Partitions: "
        + "; ".join(
            f"N={p['clients']:,}: rows per client {p['rows_min']}-{p['rows_max']} (median {p['rows_median']:g})"
            + (
                f", {p['empty_clients']:,} clients without rows (the default min_rows 1 is refused: {p['refused']})"
                if p.get("refused")
                else ""
            )
            for p in res["partitions"]
        )
        + ".",
        "",
        *failures(passes),
        "## Targets (per pass; met in at least 4 of 5 passes)",
        "",
    ]
    if miss:
        lines.append(f"NOT MEASURED: the pipeline side did not run ({miss}); every target is open.")
    else:
        for n in clients:
            if f"speed N={n}" in res["targets"] and n > 1000:
                lines.append(
                    f"* (no target) rounds/s vs Flower's at N={n:,}: {fmt_ratio(res['targets'][f'speed N={n}'])}."
                )
            elif f"speed N={n}" in res["targets"]:
                s = res["targets"][f"speed N={n}"]
                lines.append(
                    f"* rounds/s >= {TARGET_SPEED:g}x Flower's at N={n:,}: {fmt_ratio(s)}; "
                    f"{'MET' if s['met'] else 'NOT MET'} ({s['hits']} of {s['passes']} passes)."
                )
                a = res["targets"][f"accuracy N={n}"]
                per = " / ".join("n/a" if d is None else f"{d:+.2f}" for d in a["per_pass"])
                lines.append(
                    f"* accuracy within {TARGET_ACC_POINTS:g} point of Flower's at N={n:,}: pipeline - Flower per "
                    f"pass {per} points; {'MET' if a['met'] else 'NOT MET'} "
                    f"({a['hits']} of {len(a['per_pass'])} passes)."
                )
        if "memory" in res["targets"]:
            m = res["targets"]["memory"]
            lines.append(
                f"* pipeline peak RSS at N={max(clients):,} within {100 * (TARGET_MEMORY - 1):.0f}% "
                f"of N={min(clients):,}: "
                f"{fmt_ratio(m)}; {'MET' if m['met'] else 'NOT MET'} ({m['hits']} of {len(m['per_pass'])} passes)."
            )
    lines += ["", "Conditions per pass:", "", conditions_table(passes), ""]
    if res.get("json"):
        lines.append(f"Raw figures: `{res['json']}`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.federated", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 clients, 3 rounds, 1 pass, a tiny set")
    ap.add_argument("--clients", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=10, help="rounds at up to 1,000 clients")
    ap.add_argument("--rounds-large", type=int, default=4, help="rounds above 1,000 clients (at least 3)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--test-rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    ap.add_argument("--flower-python", default=str(FLOWER_PYTHON))
    ap.add_argument("--systems", default="flower,pipeline")
    ap.add_argument("--render", default="", help="print the table of a saved JSON (bench/results/federated-*.json)")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        saved["json"] = args.render
        text = render(saved)
        print(text)
        return text
    if args.quick:
        args.clients, args.rounds, args.passes, args.rows, args.test_rows = "10", 3, 1, 2_000, 500
        args.rounds_large = 3
    clients = [int(c) for c in args.clients.split(",")]
    python = Path(args.flower_python)
    if not python.exists():  # `python -m bench` goes on with the other tables
        text = (
            f"Not run: no Flower interpreter at {python}; create it with `python -m venv .venv-flwr && "
            '.venv-flwr/bin/pip install "flwr[simulation]" torch numpy psutil` (bench/README.md), or pass '
            "--flower-python."
        )
        print(text)
        return text
    systems = args.systems.split(",")
    miss = pipeline_available() if "pipeline" in systems else "not requested (--systems)"
    with tmpdir("federated") as tmp:
        prep = prepare(tmp, args.rows, args.test_rows, seed=args.seed)
        parts = [partition(tmp, prep["train"], prep["y"], n, args.seed) for n in clients]
        counter = {"k": 0}
        trainers: dict[str, Any] = {}
        for n, part in zip(clients, parts, strict=True):
            trainers[f"flower N={n}"] = guarded(lambda n=n: run_flower(python, tmp, n, args, counter["k"]))
            # where the pipeline's partitioner refuses Dirichlet(alpha) (a client would get no rows), the
            # pipeline runs an iid split of as many clients: memory and speed stay comparable, accuracy is not
            kind = "iid" if part.get("refused") else "dirichlet"
            if not miss:
                trainers[f"pipeline N={n}"] = guarded(
                    lambda n=n, kind=kind: run_pipeline_side(tmp, prep, n, args, counter["k"], kind)
                )

        def log(msg: str) -> None:
            counter["k"] += 1
            print(msg, flush=True)

        passes = run_passes(trainers, passes=args.passes, log=log)
        res = {
            "meta": meta(),
            "flower_versions": flower_versions(python),
            "args": vars(args),
            "clients": clients,
            "sizes": prep["sizes"],
            "partitions": parts,
            "partition_source": parts[0]["source"],
            "pipeline_missing": miss,
            "passes": passes,
        }
    res["targets"] = summarize(passes, clients, miss)
    res["json"] = str(save_json("federated", res, quick=args.quick))
    text = render(res)
    write_out("federated" + ("-quick" if args.quick else ""), text)
    print(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pipeline-peer":
        pipeline_peer_main(sys.argv[2:])
    else:
        main()
