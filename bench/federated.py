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

Like for like: pass ``i`` runs both systems with seed ``--seed + i`` (the partition, the initial
weights, the clients sampled per round and the local shuffles change from pass to pass, so the
medians are over different samplings), and both train the same clients in every round: the
harness computes the pipeline's sampling for the seed (:func:`sampling_plan`, the pipeline's own
functions) and gives it to Flower, whose server maps partition ids to its nodes before round 1 and
sends each round to exactly those nodes; both sides record which clients trained each round and
a run that differs from the plan is refused (:func:`check_trained`). Where the two partitions
differ (10,000 clients: the pipeline runs an iid split) Flower samples as FedAvg does.

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
* **accuracy** of the final global model on the 10,000 common test rows after R rounds;
* **where a pipeline round goes** (:class:`RoundClock`, :func:`round_breakdown`): per steady
  round, the driver's steps (sample + open the round + submit, close + fetch, state + checkpoint),
  the scheduler's latency to the first task and the slowest task's read / compute / join + push,
  from the driver's timestamps, Dask's task stream and the tasks' own timings.

R is ``--rounds`` (10) up to 1,000 clients and ``--rounds-large`` (3) above: a Flower round of
1,000 sampled clients takes tens of seconds on 2 cores, and at 10,000 clients only speed and
memory are compared. The default run (3 client counts, 5 passes) takes about 15 minutes on a
quiet 2-core machine.

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
    rows standardized with the training store's statistics, as the pipeline's loader does) and the
    layer sizes (the data do not change with the pass's seed; partitions and weights do)."""
    from bench.common import arrays, mnist_like

    train, test = mnist_like(dest, rows, test_rows, features, 10)
    X, y = arrays(train)
    Xte, yte = arrays(test, like=train)
    np.save(dest / "X.npy", X)
    np.save(dest / "y.npy", y)
    np.save(dest / "Xte.npy", Xte)
    np.save(dest / "yte.npy", yte)
    sizes = [features, *HIDDEN, len(train.classes)]
    (dest / "sizes.json").write_text(json.dumps(sizes))
    return {"train": train, "test": test, "sizes": sizes, "y": y}


def initial_weights(dest: Path, sizes: Sequence[int], seed: int) -> None:
    """``init-s<seed>.npy``: the pipeline's initial parameters for ``seed`` (``kernels.mlp.init_params``)."""
    from kernels.mlp import MLPSpec, init_params

    np.save(dest / f"init-s{seed}.npy", init_params(MLPSpec(sizes[0], HIDDEN, sizes[-1]), seed=seed))


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
    """Client k's rows for both systems, written to ``data/partition-N-s<seed>/{offsets,rows}.npy``.
    ``pipeline.partition.make_partition`` (kind dirichlet, alpha 0.3) when this checkout has it
    (the pipeline then computes the same partition from the same seed), else
    :func:`dirichlet_partition`. ``pipeline_sizes``: the rows per client of the partition the
    pipeline trains (an iid split where Dirichlet is refused), from which its sampling draws."""
    out = data / f"partition-{n_clients}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    refused = None
    pipeline_sizes = None
    try:
        from pipeline.partition import make_partition
    except ImportError:
        offsets, rows = dirichlet_partition(y, n_clients, ALPHA, seed)
        source = "bench.federated.dirichlet_partition"
    else:
        from pipeline.errors import ConfigError

        try:
            pp = data / f"pp-{n_clients}"
            p = make_partition(store, n_clients, "dirichlet", alpha=ALPHA, seed=seed, out=pp, force=True)
        except ConfigError as exc:  # every client >= 1 row is impossible here: Flower gets empty clients
            refused = str(exc)
            p = make_partition(store, n_clients, "dirichlet", alpha=ALPHA, seed=seed, out=pp, min_rows=0, force=True)
        offsets = np.asarray(p.offsets, np.int64)
        rows = np.concatenate([np.asarray(p.rows(k), np.int64) for k in range(n_clients)])
        source = "pipeline.partition.make_partition" + (" (min_rows 0)" if refused else "")
        pipeline_sizes = np.diff(offsets)
        if refused:
            iid = make_partition(store, n_clients, "iid", seed=seed, out=data / f"pp-{n_clients}-iid", force=True)
            pipeline_sizes = np.asarray(iid.sizes(), np.int64)
    np.save(out / "offsets.npy", offsets)
    np.save(out / "rows.npy", rows)
    sizes = np.diff(offsets)
    return {
        "source": source,
        "refused": refused,
        "seed": seed,
        "pipeline_sizes": pipeline_sizes,
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


def sampling_plan(sizes: np.ndarray, rounds: int, seed: int, min_clients: int = 1) -> list[list[int]]:
    """The clients the pipeline samples in each round with ``seed`` (its own rule,
    ``pipeline.federated.SimulatedTrainer._sample``: ``clients_per_round`` of the clients with
    rows, drawn by ``sample_indices`` seeded by (seed, round)); given to Flower so that both
    systems train the same clients in every round."""
    from pipeline.federated import sample_indices
    from pipeline.sites import clients_per_round

    live = np.flatnonzero(np.asarray(sizes) > 0)
    n = clients_per_round(len(live), FRACTION, min_clients)
    return [[int(k) for k in live[sample_indices(len(live), n, seed, r)]] for r in range(rounds)]


def write_plan(data: Path, part: dict[str, Any], rounds: int) -> Path | None:
    """``plan-N-s<seed>.json`` where both systems train the same partition (else None: at 10,000
    clients the pipeline trains an iid split, so its clients are not Flower's and Flower samples
    as FedAvg does)."""
    if part.get("refused") or part.get("pipeline_sizes") is None:
        return None
    path = data / f"plan-{part['clients']}-s{part['seed']}.json"
    path.write_text(json.dumps({"rounds": sampling_plan(part["pipeline_sizes"], rounds, part["seed"])}))
    return path


def check_trained(who: str, got: list[list[int]] | None, plan: Path | None) -> bool | None:
    """Whether ``who`` trained exactly the plan's clients in every round (None without a plan);
    a run that did not is refused (its figures would not be like for like)."""
    if plan is None:
        return None
    want = json.loads(plan.read_text())["rounds"]
    if got != want:
        pairs = zip(got or [], want, strict=False)
        first = next((r for r, (a, b) in enumerate(pairs) if a != b), min(len(got or []), len(want)))
        raise RuntimeError(
            f"{who} did not train the planned clients ({plan.name}): round {first + 1} differs "
            f"({len(got or [])} rounds recorded, {len(want)} planned)"
        )
    return True


def shown(path: str | Path) -> str:
    """``path`` as the tables and JSON give it: relative to the checkout when inside it (a
    machine's own directories are nobody else's business), else as given."""
    p = Path(path)
    try:
        return p.absolute().relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def flower_versions(python: Path) -> dict[str, Any]:
    code = "import json; from bench.flower_peer import versions; print(json.dumps(versions()))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    v = json.loads(out.stdout)
    if v.get("executable"):
        v["executable"] = shown(v["executable"])
    return v


def run_flower(
    python: Path, data: Path, n: int, args: argparse.Namespace, k: int, seed: int, plan: Path | None
) -> dict[str, Any]:
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
    cmd += ["--lr", str(args.lr), "--fraction", str(FRACTION), "--seed", str(seed)]
    cmd += ["--plan", str(plan)] if plan is not None else []
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
        "map_seconds": res.get("map_seconds"),
        "seed": seed,
        "trained": res.get("trained"),
        "same_clients": check_trained("Flower", res.get("trained"), plan),
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


def pipeline_config(n: int, args: argparse.Namespace, kind: str = "dirichlet", seed: int = 0) -> dict[str, Any]:
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
        "seed": seed,
        "min_clients": 1,
        "validation": 0.0,  # every client trains on all its rows, as Flower's do
        "eval_every": rounds_for(n, vars(args)),  # per-client evaluation after the last round only
        "patience": 0,
    }


class RoundClock:
    """Wall-clock timestamps (``time.time``, as Dask's task stream) of a pipeline run's rounds, taken
    by wrapping the simulated trainer's steps in the peer process (nothing else changes): round
    start (``_sample``), tasks submitted (``_submit_round``), round closed on the driver
    (``_round`` returns: results fetched), checkpoint written (``_checkpoint``), record out
    (``on_epoch``); and each task's own timings (its per-client summaries: read, compute,
    communicate)."""

    STEPS = ("start", "submitted", "closed", "checkpoint0", "checkpoint1", "end")

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []
        self.task_times: list[list[dict[str, float]]] = []  # per round, per task
        self.sampled: list[list[int]] = []

    def mark(self, step: str) -> None:
        if self.marks:
            self.marks[-1].setdefault(step, time.time())

    @contextlib.contextmanager
    def installed(self) -> Any:
        import pipeline.federated as fed

        cls = fed.SimulatedTrainer
        saved = {n: getattr(cls, n) for n in ("_sample", "_submit_round", "_round", "_checkpoint")}
        saved_fetched = fed.fetched

        def sample(trainer: Any, ps: Any, run: Any, rnd: int) -> list[str]:
            self.marks.append({"start": time.time()})
            self.task_times.append([])
            got = saved["_sample"](trainer, ps, run, rnd)
            self.sampled.append(sorted(int(c[1:]) for c in got))
            return got

        def submit(trainer: Any, *a: Any, **kw: Any) -> Any:
            got = saved["_submit_round"](trainer, *a, **kw)
            self.mark("submitted")
            return got

        def round_(trainer: Any, *a: Any, **kw: Any) -> Any:
            got = saved["_round"](trainer, *a, **kw)
            self.mark("closed")
            return got

        def checkpoint(trainer: Any, *a: Any, **kw: Any) -> Any:
            self.mark("checkpoint0")
            got = saved["_checkpoint"](trainer, *a, **kw)
            self.mark("checkpoint1")
            return got

        def fetched(future: Any, *a: Any, **kw: Any) -> Any:
            got = saved_fetched(future, *a, **kw)
            if self.task_times and isinstance(got, dict) and "clients" in got:
                per = list(got["clients"].values())
                self.task_times[-1].append(
                    {k: float(sum(v.get(k, 0.0) for v in per)) for k in ("read", "compute", "communicate")}
                )
            return got

        for name, fn in (
            ("_sample", sample),
            ("_submit_round", submit),
            ("_round", round_),
            ("_checkpoint", checkpoint),
        ):
            setattr(cls, name, fn)
        fed.fetched = fetched
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(cls, name, fn)
            fed.fetched = saved_fetched


BREAKDOWN = [
    ("sample + expect + submit", "driver: sample the round's clients, open the round on the server, submit its tasks"),
    ("to first task start", "the scheduler routes the tasks, a worker starts the first"),
    ("tasks: read rows", "the slowest task's read of its clients' rows"),
    ("tasks: compute", "the slowest task's training steps (numba kernels)"),
    ("tasks: join + push", "the slowest task's join (pull of the weights), push and leave"),
    ("tasks: other", "the rest of the slowest task (setup, standardizing, folding) and the other task's lag"),
    ("close + fetch", "from the last task's end to the round closed on the driver (close_round, summaries, results)"),
    ("state + checkpoint", "the round's server state, the checkpoint written (fsync) and the record"),
]


def round_breakdown(clock: RoundClock, tasks: list[dict[str, Any]]) -> list[dict[str, float]] | None:
    """Milliseconds of each :data:`BREAKDOWN` step per round (``total`` = the round from its start to
    its record; the loop's gap to the next round's start is in ``state + checkpoint``). A round's
    tasks are found in the task stream by their key (``fit-JOB-r<round>-...``)."""
    out = []
    for r, (m, times) in enumerate(zip(clock.marks, clock.task_times, strict=False)):
        mine = [t for t in tasks if f"-r{r}-" in t["key"]]
        if not mine or not {"submitted", "closed", "end"} <= set(m) or not times:
            continue
        first, last = min(t["start"] for t in mine), max(t["stop"] for t in mine)
        slow = max(mine, key=lambda t: t["stop"] - t["start"])
        # the slowest task's own timings: tasks and summaries are matched by duration rank
        own = max(times, key=lambda v: v["read"] + v["compute"] + v["communicate"])
        span = (last - first) * 1000
        parts = {
            "sample + expect + submit": (m["submitted"] - m["start"]) * 1000,
            "to first task start": (first - m["submitted"]) * 1000,
            "tasks: read rows": own["read"] * 1000,
            "tasks: compute": own["compute"] * 1000,
            "tasks: join + push": own["communicate"] * 1000,
            "close + fetch": (m["closed"] - last) * 1000,
            "state + checkpoint": (m["end"] - m["closed"]) * 1000,
        }
        parts["tasks: other"] = span - parts["tasks: read rows"] - parts["tasks: compute"] - parts["tasks: join + push"]
        parts["total"] = (m["end"] - m["start"]) * 1000
        parts["checkpoint"] = (m.get("checkpoint1", m["end"]) - m.get("checkpoint0", m["end"])) * 1000
        parts["slowest task"] = (slow["stop"] - slow["start"]) * 1000
        out.append(parts)
    return out


def steady_breakdown(rounds: list[dict[str, float]] | None) -> dict[str, float] | None:
    """The median of every step over the steady rounds (2..R-1, as rounds/s counts them)."""
    steady = (rounds or [])[1:-1]
    if not steady:
        return None
    return {k: float(np.median([r[k] for r in steady])) for k in steady[0]}


def breakdown_table(res: dict[str, Any]) -> list[str]:
    """Where a steady pipeline round goes, per client count: milliseconds, median over passes of
    each run's median over its steady rounds."""
    cols = {}
    for n in res["clients"]:
        runs = [b for b in _series(res["passes"], f"pipeline N={n}", "breakdown") if b]
        if runs:
            cols[n] = {k: float(np.median([b[k] for b in runs])) for k in runs[0]}
    if not cols:
        return []
    rows = []
    for step, what in [*BREAKDOWN, ("total", "the round, start to record (sum of the above)")]:
        rows.append({"step": step, **{f"N={n:,} ms": f"{c[step]:.1f}" for n, c in cols.items()}, "what": what})
    extra = [("slowest task", "wall time of the round's slowest task"), ("checkpoint", "of which the checkpoint")]
    for step, what in extra:
        rows.append({"step": step, **{f"N={n:,} ms": f"{c[step]:.1f}" for n, c in cols.items()}, "what": what})
    return [
        "Where a steady pipeline round goes (ms; the median over passes of each run's median over rounds "
        "2..R-1; timestamps from the driver and Dask's task stream, the tasks' own read / compute / "
        "communicate timings; 2 tasks per round run side by side on the 2 workers):",
        "",
        md_table(rows),
        "",
    ]


def pipeline_peer_main(argv: Sequence[str]) -> None:
    """``python -m bench.federated pipeline-peer TRAIN.zarr TEST.zarr RUN OUT.json CONFIG_JSON DATA``: one
    pipeline run on a fresh 2-worker LocalCluster; writes the end time of every round (seconds since
    the process started, taken when the round's record is out, its checkpoint written), the test
    accuracy, whether the run's partition is the one given to Flower (``DATA/partition-N-s<seed>``)
    and the clients sampled in each round (recorded from ``SimulatedTrainer._sample``'s result), and
    the timestamps of :func:`round_breakdown`."""
    from distributed import get_task_stream

    from bench.common import local_cluster
    from pipeline.config import TrainConfig
    from pipeline.store import open_store
    from pipeline.train import train

    train_p, test_p, run_dir, out, cfg_s, data = argv[:6]
    cfg = TrainConfig.from_dict(json.loads(cfg_s))
    ends: list[float] = []
    clock = RoundClock()
    with local_cluster(2) as client, clock.installed():
        setup = time.perf_counter() - T0
        with get_task_stream(client=client) as stream:
            res = train(
                train_p,
                cfg,
                run_dir,
                client=client,
                force=True,
                on_epoch=lambda r: (ends.append(time.perf_counter() - T0), clock.mark("end")),
            )
    tasks = [
        {"key": t["key"], "start": ss["start"], "stop": ss["stop"]}
        for t in stream.data
        if str(t["key"]).startswith("fit-")
        for ss in t["startstops"]
        if ss["action"] == "compute"
    ]
    test = open_store(test_p)
    Xraw, yte = test.read_rows(0, test.n_rows)
    acc = float(np.mean(res.model.decision(Xraw).argmax(axis=1) == np.asarray(yte)))
    mine, theirs = Path(data) / f"partition-{cfg.clients}-s{cfg.seed}", Path(run_dir) / "partition"
    same = None
    if (theirs / "rows.npy").is_file():
        same = all(np.array_equal(np.load(mine / f), np.load(theirs / f)) for f in ("offsets.npy", "rows.npy"))
    Path(out).write_text(
        json.dumps(
            {
                "round_end": ends,
                "accuracy": acc,
                "setup": setup,
                "rounds": len(res.history),
                "same_partition": same,
                "sampled": clock.sampled,
                "breakdown": round_breakdown(clock, tasks),
            }
        )
    )


def run_pipeline_side(
    data: Path,
    prep: dict[str, Any],
    n: int,
    args: argparse.Namespace,
    k: int,
    kind: str = "dirichlet",
    seed: int = 0,
    plan: Path | None = None,
) -> dict[str, Any]:
    out = data / f"pipeline-{n}-{k}.json"
    cmd = [sys.executable, "-m", "bench.federated", "pipeline-peer", str(prep["train"].path), str(prep["test"].path)]
    cmd += [str(data / f"run-{n}-{k}"), str(out), json.dumps(pipeline_config(n, args, kind, seed)), str(data)]
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
        "breakdown": steady_breakdown(res.get("breakdown")),
        "seed": seed,
        "same_clients": check_trained("the pipeline", res.get("sampled"), plan),
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


def same_clients_lines(res: dict[str, Any]) -> list[str]:
    """Whether both systems trained the same clients in every round, per client count."""
    out = []
    for n in res["clients"]:
        if not any(p["results"].get(f"flower N={n}") for p in res["passes"]):
            continue  # Flower not run
        fl = _series(res["passes"], f"flower N={n}", "same_clients")
        pl = _series(res["passes"], f"pipeline N={n}", "same_clients")
        if any(v is True for v in fl) and all(a is True and b is True for a, b in zip(fl, pl, strict=True)):
            out.append(f"N={n:,}: both trained the same clients in every round of every pass (checked)")
        elif all(v is None for v in fl):
            out.append(f"N={n:,}: Flower sampled its own clients (FedAvg's sampling; the partitions differ)")
        else:
            per = " / ".join(str(a is True and b is True) for a, b in zip(fl, pl, strict=True))
            out.append(f"N={n:,}: same clients per pass {per}")
    if "seeds" not in res:
        return []
    if not out:
        return [f"Seeds per pass: {', '.join(map(str, res['seeds']))}.", ""]
    return [
        f"Seeds per pass: {', '.join(map(str, res['seeds']))} (both systems the same in a pass: partition, initial "
        "weights, sampled clients, local shuffles). Clients per round: the pipeline's sampling, sent to Flower "
        "node by node; " + "; ".join(out) + ".",
        "",
    ]


def partition_line(parts: list[dict[str, Any]], n: int) -> str:
    """Rows per client at ``n`` clients over the passes' partitions (one per seed)."""
    mine = [p for p in parts if p["clients"] == n]
    lo, hi = min(p["rows_min"] for p in mine), max(p["rows_max"] for p in mine)
    med = sorted(p["rows_median"] for p in mine)
    text = f"N={n:,}: rows per client {lo}-{hi} (median {med[0]:g}" + (f"-{med[-1]:g})" if len(med) > 1 else ")")
    refused = [p for p in mine if p.get("refused")]
    if refused:
        empty = sorted(p["empty_clients"] for p in refused)
        text += (
            f", {empty[0]:,}" + (f"-{empty[-1]:,}" if len(empty) > 1 else "") + " clients without rows (the default "
            f"min_rows 1 is refused: {refused[0]['refused']})"
        )
    return text


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
        (
            f"Flower side: its own venv (`{fv.get('executable')}`): flwr {fv.get('flwr')}, ray {fv.get('ray')}, "
            f"torch {fv.get('torch')}, numpy {fv.get('numpy')}, protobuf {fv.get('protobuf')}, "
            f"grpcio {fv.get('grpcio')}."
            if fv
            else "Flower side: not run (--systems)."
        ),
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
        "Partitions: " + "; ".join(partition_line(res["partitions"], n) for n in clients) + ".",
        "",
        *same_clients_lines(res),
        *breakdown_table(res),
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
    ap.add_argument("--rounds-large", type=int, default=3, help="rounds above 1,000 clients (at least 3)")
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
    systems = args.systems.split(",")
    if "flower" in systems and not python.exists():  # `python -m bench` goes on with the other tables
        text = (
            f"Not run: no Flower interpreter at {python}; create it with `python -m venv .venv-flwr && "
            '.venv-flwr/bin/pip install "flwr[simulation]" torch numpy psutil` (bench/README.md), or pass '
            "--flower-python."
        )
        print(text)
        return text
    miss = pipeline_available() if "pipeline" in systems else "not requested (--systems)"
    # one seed per pass, the same for both systems in a pass: the partition, the initial weights,
    # the clients sampled per round and the local shuffles change from pass to pass
    seeds = [args.seed + i for i in range(args.passes)]
    with tmpdir("federated") as tmp:
        prep = prepare(tmp, args.rows, args.test_rows, seed=args.seed)
        parts: dict[tuple[int, int], dict[str, Any]] = {}
        plans: dict[tuple[int, int], Path | None] = {}
        for seed in seeds:
            initial_weights(tmp, prep["sizes"], seed)
            for n in clients:
                parts[n, seed] = partition(tmp, prep["train"], prep["y"], n, seed)
                plans[n, seed] = None if miss else write_plan(tmp, parts[n, seed], rounds_for(n, vars(args)))
        counter = {"k": 0}
        trainers: dict[str, Any] = {}

        def seed_now() -> int:  # the pass of the run about to start (log counts the runs)
            return seeds[(counter["k"] - 1) // len(trainers)]

        for n in clients:
            if "flower" in systems:
                trainers[f"flower N={n}"] = guarded(
                    lambda n=n: run_flower(python, tmp, n, args, counter["k"], seed_now(), plans[n, seed_now()])
                )
            if not miss:
                trainers[f"pipeline N={n}"] = guarded(
                    lambda n=n: run_pipeline_side(
                        tmp,
                        prep,
                        n,
                        args,
                        counter["k"],
                        # where the pipeline's partitioner refuses Dirichlet(alpha) (a client would get no
                        # rows), it runs an iid split of as many clients: memory and speed stay comparable,
                        # accuracy is not
                        "iid" if parts[n, seed_now()].get("refused") else "dirichlet",
                        seed_now(),
                        plans[n, seed_now()],
                    )
                )

        def log(msg: str) -> None:
            counter["k"] += 1
            print(msg, flush=True)

        passes = run_passes(trainers, passes=args.passes, log=log)
        part_list = [{k: v for k, v in p.items() if k != "pipeline_sizes"} for p in parts.values()]
        res = {
            "meta": meta(),
            "flower_versions": flower_versions(python) if "flower" in systems else {},
            "args": {**vars(args), "flower_python": shown(args.flower_python)},
            "clients": clients,
            "seeds": seeds,
            "sizes": prep["sizes"],
            "partitions": part_list,
            "partition_source": part_list[0]["source"],
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
