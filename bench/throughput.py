"""Training throughput against peers under the protocol of :mod:`bench.protocol`.

    python -m bench.throughput              # 120k-row MNIST-like uint8 store, 2 epochs, 5 passes
    python -m bench.throughput --quick      # tiny smoke run (1 pass)
    python -m bench.throughput --passes 3 --rows 60000
    python -m bench.throughput --accuracy-only --seeds 0,1,2   # the accuracy rows alone, 3 seeds

Data: ``pipeline.synth`` store of 784 uint8 features, 10 classes (``--rows`` training rows plus
10,000 held-out test rows in a separate store). Model: MLP 784-512-256-10, batch 256, Adam lr
1e-3, float32, ``--epochs`` passes over the training rows for every trainer.

Every trainer runs once per pass, ``--passes`` (5) passes, the order rotated per pass; each
comparison is a per-pass ratio (median, range, and a target met only in >= 4 of 5 passes); each
pass records load, steal, other processes' CPU and both GEMM peaks, and is flagged when taken
under load (:mod:`bench.protocol`). Raw figures go to ``bench/results/throughput-*.json``.

**Two timings.** *Steady state* excludes every one-time cost for every trainer alike: process
and cluster start, imports, reading and standardizing the data, and one untimed warm-up epoch
over the test rows (a throw-away model; the timed run starts from the initial weights). It
*includes* one validation pass over the 10,000 test rows per epoch for every trainer (the
pipeline's ``validation_store``; the peers predict the test rows after each epoch): validation
is counted for all. *Cold* is a fresh process from the same Zarr training store to a saved
model, for every trainer, timed from outside (start to exit) right after the row's steady run
in the same pass: imports, cluster start where the trainer uses one, reading and standardizing
the training and test stores, compiling where the tool compiles (Numba, ``torch.compile``), the
same epochs with the same validation as the steady row, trained by the row's own code (one
constructor or function per row serves both runs), and saving the model as is natural for the
tool. No throw-away warm-up epoch: it only moves one-time costs out of a steady timer. On-disk
compile caches are as a user's second run finds them. The processes (:func:`cold_runs`):

* pipeline rows: ``pipeline train STORE --config C --set KEY=VALUE --workers 2 -q`` (``C``: the
  steady settings; ``--set``: the row's, ``PIPELINE_ROWS``); it writes ``model.npz``. A store of
  the full run's size gets the 2-worker cluster by default; ``--workers 2`` gives the quick
  run's small store the same, where ``pipeline train`` would train in process.
* PyTorch in process (tutorial, best practice, + ``torch.compile``, + the weight averaging):
  ``python -m bench.torch_peers cold-peer KIND``, the row's peer
  (:func:`bench.torch_peers.make_peer`), ``torch.save`` of the state dict it predicts with.
* PyTorch 2-process local SGD: ``python -m bench.torch_peers ddp-store``: both processes read
  and standardize the store themselves; rank 0 saves the averaged model. (Its steady run starts
  from an ``.npz`` of the arrays; that process's time, warm-up included, is kept per pass as
  ``npz process s``.)
* kernels in memory, scikit-learn: ``python -m bench.throughput cold memory|sklearn``
  (:func:`cold_main`): ``np.savez`` of the parameters, the estimator pickled.
* dask-ml: ``python -m bench.throughput cold dask-ml-tuned|dask-ml-users`` on distributed's own
  ``LocalCluster`` (tuned: one worker, both cores to its BLAS and the allocator setting, no
  dashboard; as users run it: Dask's defaults here, two 1-thread workers and the dashboard),
  the fitted estimator pickled.

The peers' processes also import their bench module (a few tens of milliseconds beyond NumPy
here), which counts against them. A cold process that fails or saves no model leaves its cold
figure n/a and the reason under the table (the benchmark goes on). The JSON keeps each row's
command (``cold_commands``), the rows without a figure (``cold_missing``) and per pass each
row's ``cold`` seconds, ``cold model`` and ``cold acc`` (the test accuracy the process
reported).

Rows:

* **pipeline default**: ``pipeline.train.train`` on a fresh 2-worker LocalCluster (1 thread
  each), default config except the architecture, ``validation_store`` = the test store and
  ``patience=0``. **pipeline ema=0**: the same without weight averaging (accuracy parity with
  the peers that do not average). **pipeline over TCP only**: ``ps_shared_memory=false``.
  **pipeline overlap**: ``overlap=true, overlap_steps=1`` (each push travels while the next
  step runs; its reply is folded in after that step).
* **pytorch best practice + the same weight averaging**: the best-practice loop plus the
  pipeline's ``ema`` average (decay 0.999, warm-up ``min(ema, (1 + t) / (10 + t))``), updated
  every 16 optimizer steps of 256 rows (the samples of one sync round of the pipeline: 2 workers
  x ``local_steps`` 8 minibatches) and at each epoch's end, and evaluated on the average; the
  update runs inside the timed loop (:class:`bench.torch_peers.TorchBestAveraged`). Its accuracy
  is the parity target for the pipeline with ``ema`` on.
* **pytorch best practice** (the target row), **pytorch tutorial (DataLoader)**, **pytorch
  best practice + torch.compile** (or a row saying why it cannot run), **pytorch 2-process local
  SGD** (gloo, 1 thread each, averaging every 8 steps): :mod:`bench.torch_peers`. Same initial
  weights as the pipeline; Adam fused or foreach as measured faster here.
* **kernels in memory**: ``kernels.mlp.MLPTrainer`` (cpu backend, 2 BLAS threads), one process.
* **scikit-learn** ``MLPClassifier.partial_fit`` epochs (alpha 0).
* **dask-ml tuned**: ``Incremental(MLPClassifier)`` on one worker whose BLAS uses both cores,
  the pipeline's allocator setting applied in the worker (``restore_mmap_threshold``), an
  untimed warm-up ``partial_fit`` on the test rows with a throw-away estimator. **dask-ml as
  users run it**: two 1-thread workers as Dask starts them, no warm-up. The headline ratio is
  against the tuned row.

**OpenMP wait policy.** PyTorch's CPU kernels run on OpenMP threads that spin while they wait
for each other; on a shared machine whose other processes hold the cores, two spinning threads
made a step 10-50x slower here (measured 2026-12-01 under load average ~10: an epoch of 5,000
rows of 784-256-128-10 took 2.6-7.4 s with 2 threads against 0.09-0.49 s with
``OMP_WAIT_POLICY=PASSIVE``, and 0.45 s with 1 thread). The benchmark sets
``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before anything loads OpenMP, for every trainer
alike, and records it in the header: the PyTorch rows then measure PyTorch, not the spinning.

The GEMM-implied limit is the pass's NumPy GEMM peak over the training FLOPs of one sample
(2.41 MFLOP for this MLP).

**Accuracy only** (``--accuracy-only``, with ``--seeds``): accuracy after the same samples is
deterministic (sync rounds; PyTorch on CPU with a seeded generator), so this mode trains only
the accuracy-parity systems once per seed, with no warm-up, timing or cold runs: the pipeline
with ``ema`` on and with ``ema = 0`` (2-worker LocalCluster, as in the timed rows), PyTorch best
practice, PyTorch best practice with the same averaging and, as a sensitivity check, the same
averaging updated every ``local_steps`` (8) steps. The seed is the pipeline's ``seed`` and the
PyTorch peers' (initial weights, the same for both, and shuffling); the data are the same store
for every seed. Each seed is one pass of :mod:`bench.protocol` (conditions recorded, seconds
kept for orientation only). Raw figures go to ``bench/results/throughput-accuracy-*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import figures
from bench.common import (
    KernelPeer,
    Peer,
    SklearnPeer,
    arrays,
    child_env,
    local_cluster,
    md_table,
    metric,
    mnist_like,
    pipeline_settings,
    run_pipeline,
    tmpdir,
    write_out,
)
from bench.protocol import (
    conditions_table,
    fmt_ratio,
    meta,
    provenance_lines,
    ratio_summary,
    run_passes,
    save_json,
)
from pipeline.config import TrainConfig

DEFAULT = "pipeline default (sync, local_steps 8)"
EMA0 = "pipeline ema=0 (accuracy parity)"
TCP = "pipeline over TCP only (ps_shared_memory=false)"
OVERLAP = "pipeline overlap (reply folded in after 1 step)"
BEST = "pytorch best practice (target)"
BEST_EMA = "pytorch best practice + the same weight averaging"
BEST_EMA_LOCAL = "pytorch best practice + the same weight averaging, every 8 steps (sensitivity)"
TUTORIAL = "pytorch tutorial (DataLoader)"
COMPILED = "pytorch best practice + torch.compile"
DDP = "pytorch 2-process local SGD (gloo, every 8 steps)"
MEMORY = "kernels in memory (1 process, 2 BLAS threads)"
SKLEARN = "scikit-learn MLPClassifier partial_fit"
DML_TUNED = "dask-ml Incremental, tuned (1 worker, 2 BLAS threads)"
DML_USER = "dask-ml Incremental, as users run it (2 workers)"

WORKERS = 2  # the pipeline's LocalCluster
EMA = TrainConfig().ema  # the pipeline's default weight averaging, given to the averaging peer
ROUND_STEPS = WORKERS * TrainConfig().local_steps  # minibatches of 256 in one sync round

# each pipeline row's settings over the default, in the steady run and as the cold command's --set
PIPELINE_ROWS: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    EMA0: {"ema": 0.0},
    TCP: {"ps_shared_memory": False},
    OVERLAP: {"overlap": True, "overlap_steps": 1},
}
# the rows of bench.torch_peers.make_peer, by its kind
TORCH_ROWS = {BEST: "best", BEST_EMA: "averaged", TUTORIAL: "tutorial", COMPILED: "compiled"}
# the rows whose cold run is this module's `cold` command, by its kind
OWN_ROWS = {MEMORY: "memory", SKLEARN: "sklearn", DML_TUNED: "dask-ml-tuned", DML_USER: "dask-ml-users"}


def _check_samples(name: str, got: int, want: int) -> None:
    if got != want:
        raise AssertionError(f"{name}: trained {got} samples, expected {want}")


def _flops(sizes: Sequence[int]) -> int:
    w = [sizes[i] * sizes[i + 1] for i in range(len(sizes) - 1)]
    return 2 * (3 * sum(w) - w[0])


def steady(make: Callable[[np.ndarray, np.ndarray], Peer], data: dict, epochs: int) -> dict[str, Any]:
    """Warm-up epoch on the test rows with a throw-away peer, then ``epochs`` timed epochs of a
    fresh peer, each followed by a prediction of the test rows (validation counted)."""
    warm = make(data["Xte"], data["yte"])
    warm.epoch()
    peer = make(data["Xtr"], data["ytr"])
    t = time.perf_counter()
    for _ in range(epochs):
        peer.epoch()
        pred = peer.predict(data["Xte"])
    dt = time.perf_counter() - t
    return {"seconds": dt, "acc": metric(pred, data["yte"], "classification")}


def dask_ml_run(
    client: Any,
    train: Any,
    test_X: np.ndarray,
    test_y: np.ndarray,
    hidden: Sequence[int],
    batch: int,
    epochs: int,
    n_classes: int,
    warm: bool,
    save: str | Path | None = None,
) -> dict:
    """dask-ml's ``Incremental(MLPClassifier)`` over the store's blocks (standardized lazily, as a
    dask-ml user writes it), ``epochs`` timed ``partial_fit`` passes each followed by a prediction
    of the test rows; ``warm``: an untimed throw-away fit first; ``save``: pickle the fitted
    estimator there afterwards (the cold run's model)."""
    import dask.array as da
    from dask_ml.wrappers import Incremental
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X = da.from_zarr(train.X)
    y = da.from_zarr(train.y)
    mean = train.mean.astype(np.float32)
    inv = (1.0 / train.std).astype(np.float32)
    Xf = (X.astype(np.float32) - mean) * inv

    def est() -> Any:
        return MLPClassifier(
            hidden_layer_sizes=tuple(hidden),
            solver="adam",
            batch_size=batch,
            learning_rate_init=1e-3,
            alpha=0.0,
            random_state=0,
        )

    classes = np.arange(n_classes)
    with client.as_current(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if warm:  # untimed: a throw-away estimator over one block of the test rows
            n = min(len(test_X), train.chunk_rows)
            Incremental(est(), random_state=0).partial_fit(
                da.from_array(test_X[:n], chunks=n), da.from_array(test_y[:n], chunks=n), classes=classes
            )
        inc = Incremental(est(), shuffle_blocks=True, random_state=0)
        t = time.perf_counter()
        for _ in range(epochs):
            inc.partial_fit(Xf, y, classes=classes)
            pred = inc.estimator_.predict_proba(test_X)
        dt = time.perf_counter() - t
    if save is not None:
        with open(save, "wb") as f:
            pickle.dump(inc.estimator_, f)
    return {"seconds": dt, "acc": metric(pred, test_y, "classification")}


def _tune_worker() -> str:
    """In a dask-ml worker: both cores to its BLAS and the pipeline's allocator setting."""
    from threadpoolctl import threadpool_limits

    from pipeline.allocator import restore_mmap_threshold

    threadpool_limits(limits=2)  # not a context: stays for the worker's life
    return f"mmap threshold restored: {restore_mmap_threshold()}"


def own_peer(kind: str, X: np.ndarray, y: np.ndarray, hidden: Sequence[int], n_classes: int, batch: int) -> Peer:
    """The in-process peer of ``kind`` ("memory": the kernels, "sklearn": ``partial_fit``): one
    constructor for its steady and cold runs."""
    if kind == "memory":
        return KernelPeer(X, y, hidden, n_classes, batch=batch)
    if kind == "sklearn":
        return SklearnPeer(X, y, hidden, n_classes, batch=batch)
    raise ValueError(f"unknown in-process peer {kind!r}")


@dataclass(frozen=True)
class ColdRun:
    """One trainer's cold run: its fresh process's command and environment, the model file the
    process saves, and what to remove first (an earlier pass's output)."""

    command: list[str]
    env: dict[str, str]
    model: Path
    clear: Path


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def cold_runs(
    train: Any, test: Any, tmp: Path, sizes: Sequence[int], batch: int, epochs: int, info: dict
) -> dict[str, ColdRun]:
    """Trainer name -> its cold run, for every row :func:`trainers` builds with the same ``info``:
    the pipeline rows as ``pipeline train`` with the row's ``--set`` on a ``WORKERS``-worker local
    cluster; the in-process PyTorch rows as ``python -m bench.torch_peers cold-peer``; the
    two-process peer as ``python -m bench.torch_peers ddp-store``; the others as ``python -m
    bench.throughput cold`` (:func:`cold_main`). Every process reads the same stores."""
    hidden = list(sizes[1:-1])
    shape = ",".join(map(str, sizes))
    env = child_env()
    py, tr, te = sys.executable, str(train.path), str(test.path)
    where = tmp / "cold"
    where.mkdir(exist_ok=True)
    cfg = where / "pipeline.toml"
    cfg.write_text(
        f"hidden = {hidden}\nepochs = {epochs}\nbatch_size = {batch}\npatience = 0\n"
        f"validation_store = {json.dumps(te)}\n"
    )
    out: dict[str, ColdRun] = {}
    for name, over in PIPELINE_ROWS.items():
        run = where / _slug(name)
        sets = [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        command = [py, "-m", "pipeline.cli", "train", tr, "--config", str(cfg), *sets, "--workers", str(WORKERS)]
        out[name] = ColdRun([*command, "--out", str(run), "--force", "-q"], env, run / "model.npz", run)
    if info.get("torch"):
        adam = info["adam"]["kind"]
        for name, kind in TORCH_ROWS.items():
            if name == COMPILED and info.get("compile") is not None:
                continue  # no row: the table's header says why
            model = where / f"torch-{kind}.pt"
            command = [py, "-m", "bench.torch_peers", "cold-peer", kind, tr, te, str(model), str(epochs), adam]
            out[name] = ColdRun([*command, shape, str(batch), str(EMA), str(ROUND_STEPS)], env, model, model)
        report = where / "ddp.json"
        command = [py, "-m", "bench.torch_peers", "ddp-store", tr, te, str(report), shape, str(batch), str(epochs)]
        ddp_env = {**env, "OMP_NUM_THREADS": "1"}  # as the steady run's processes
        out[DDP] = ColdRun([*command, "8", adam], ddp_env, Path(f"{report}.pt"), Path(f"{report}.pt"))
    for name, kind in OWN_ROWS.items():
        if kind.startswith("dask-ml") and not info.get("dask_ml"):
            continue
        model = where / (f"{kind}.npz" if kind == "memory" else f"{kind}.pkl")
        command = [py, "-m", "bench.throughput", "cold", kind, tr, te, str(model), str(epochs), shape, str(batch)]
        out[name] = ColdRun(command, env, model, model)
    return out


def run_cold(run: ColdRun) -> dict[str, Any]:
    """Time ``run``'s process from outside, from its start to its exit: ``cold`` seconds, the
    ``cold model`` it saved and the test accuracy it printed (``cold acc``). A process that fails
    or saves no model gives ``cold`` None and the reason (``cold error``): the row says why
    instead of ending the benchmark."""
    if run.clear.is_dir():
        shutil.rmtree(run.clear)
    else:
        run.clear.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.run(run.command, env=run.env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        tail = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        return {"cold": None, "cold error": f"exit {proc.returncode}: {tail[-1][:200] if tail else 'no message'}"}
    if not run.model.is_file():
        return {"cold": None, "cold error": f"the process saved no model ({run.model.name})"}
    acc = None
    for line in reversed(proc.stdout.splitlines()):
        try:
            said = json.loads(line)
        except ValueError:
            continue
        if isinstance(said, dict):
            acc = said.get("acc", said.get("val_accuracy"))
            break
    return {"cold": dt, "cold model": str(run.model), "cold acc": acc}


def with_cold(fn: Callable[[], dict], run: ColdRun) -> Callable[[], dict]:
    """``fn`` (a row's steady run) followed by the row's cold run in the same pass; the cold run
    is kept as the function's ``cold`` attribute."""

    def both() -> dict:
        return {**fn(), **run_cold(run)}

    both.cold = run  # type: ignore[attr-defined]
    return both


def cold_main(argv: Sequence[str]) -> None:
    """``python -m bench.throughput cold KIND TRAIN.zarr TEST.zarr OUT EPOCHS SIZES BATCH``: the cold
    run of the row ``KIND`` (``OWN_ROWS``) as a whole process: read and standardize both stores,
    for dask-ml start its cluster (:func:`dask_ml_run`'s rows: ``dask-ml-tuned`` one worker with
    both cores to its BLAS, dashboard off; ``dask-ml-users`` Dask's defaults for this machine, two
    1-thread workers and the dashboard), train ``EPOCHS`` epochs predicting the test rows after
    each, save the model (``np.savez`` of the kernels' parameters; the scikit-learn estimator
    pickled) to ``OUT``; prints the test accuracy as a JSON line."""
    kind, train_p, test_p, out, epochs_s, sizes_s, batch_s = argv[:7]
    from pipeline.store import open_store

    epochs, batch = int(epochs_s), int(batch_s)
    sizes = [int(v) for v in sizes_s.split(",")]
    hidden, n_classes = sizes[1:-1], sizes[-1]
    tr, te = open_store(train_p), open_store(test_p)
    Xte, yte = arrays(te, like=tr)
    if kind in ("dask-ml-tuned", "dask-ml-users"):
        from distributed import Client, LocalCluster

        tuned = kind == "dask-ml-tuned"
        kw: dict[str, Any] = {"n_workers": 1, "dashboard_address": None} if tuned else {"n_workers": WORKERS}
        with LocalCluster(threads_per_worker=1, **kw) as cluster, Client(cluster) as client:
            if tuned:
                client.run(_tune_worker)
            acc = dask_ml_run(client, tr, Xte, yte, hidden, batch, epochs, n_classes, False, save=out)["acc"]
    else:
        X, y = arrays(tr)
        peer = own_peer(kind, X, y, hidden, n_classes, batch)
        for _ in range(epochs):
            peer.epoch()
            pred = peer.predict(Xte)
        acc = metric(pred, yte, "classification")
        if isinstance(peer, KernelPeer):
            np.savez(out, params=peer.tr.get_params(), sizes=np.asarray(sizes))
        else:
            with open(out, "wb") as f:
                pickle.dump(peer.est, f)
    print(json.dumps({"acc": acc}), flush=True)


def trainers(
    train: Any,
    test: Any,
    tmp: Path,
    data: dict,
    hidden: Sequence[int],
    batch: int,
    epochs: int,
    n_classes: int,
    cold: bool,
    info: dict,
) -> dict[str, Callable[[], dict]]:
    """Name -> a function training that row once and returning its figures: its steady run, then
    with ``cold`` its cold run (:func:`cold_runs`, :func:`with_cold`) in the same pass."""
    sizes = (data["Xtr"].shape[1], *hidden, n_classes)
    n_samples = epochs * len(data["Xtr"])
    base = pipeline_settings(test, hidden, epochs, batch)
    out: dict[str, Callable[[], dict]] = {}

    def pipeline(over: dict, name: str) -> Callable[[], dict]:
        def fn() -> dict:
            with local_cluster(WORKERS) as client:
                run_pipeline(client, test, tmp / "warm", **{**base, **over, "epochs": 1, "validation_store": ""})
                r = run_pipeline(client, train, tmp / "run", **{**base, **over})
            _check_samples(name, r["samples"], n_samples)
            return {
                "seconds": r["epoch_seconds"],
                "acc": float(r["history"][-1]["val_accuracy"]),
                "driver wall": r["wall"],
                "rounds": int(r["history"][-1]["rounds"]),
            }

        return fn

    for name, over in PIPELINE_ROWS.items():
        out[name] = pipeline(over, name)

    if info.get("torch"):
        from bench.torch_peers import make_peer, run_ddp

        kind = info["adam"]["kind"]

        def torch_row(peer: str) -> Callable[[], dict]:
            def fn() -> dict:
                return steady(
                    lambda X, y: make_peer(peer, X, y, sizes, batch, kind, ema=EMA, every=ROUND_STEPS), data, epochs
                )

            return fn

        for name, peer in TORCH_ROWS.items():
            if name != COMPILED or info.get("compile") is None:
                out[name] = torch_row(peer)

        def ddp() -> dict:
            r = run_ddp(tmp / "arrays.npz", tmp / "ddp.json", sizes, batch, epochs, 8, kind)
            # its whole process from the .npz, with the untimed warm-up: not a cold run
            r["npz process s"] = r.pop("cold")
            return r

        out[DDP] = ddp

    for name, peer in OWN_ROWS.items():
        if not peer.startswith("dask-ml"):
            out[name] = lambda peer=peer: steady(
                lambda X, y: own_peer(peer, X, y, hidden, n_classes, batch), data, epochs
            )

    if info.get("dask_ml"):

        def tuned() -> dict:
            with local_cluster(1) as client:
                client.run(_tune_worker)
                return dask_ml_run(client, train, data["Xte"], data["yte"], hidden, batch, epochs, n_classes, True)

        def as_users() -> dict:
            with local_cluster(WORKERS) as client:
                return dask_ml_run(client, train, data["Xte"], data["yte"], hidden, batch, epochs, n_classes, False)

        out[DML_TUNED] = tuned
        out[DML_USER] = as_users
    if not cold:
        return out
    runs = cold_runs(train, test, tmp, sizes, batch, epochs, info)
    return {name: with_cold(fn, runs[name]) for name, fn in out.items()}


def summarize(passes: list[dict], n_samples: int, flops: int) -> tuple[list[dict], list[dict]]:
    """Table rows (one per trainer: medians and per-pass figures) and the targets."""
    names = list(passes[0]["results"])
    known = (DEFAULT, EMA0, TCP, OVERLAP, BEST, BEST_EMA, TUTORIAL, COMPILED, DDP, MEMORY, SKLEARN, DML_TUNED, DML_USER)
    order = [n for n in known if n in names]

    def per(name: str, key: str) -> list[float | None]:
        return [p["results"][name].get(key) for p in passes]

    sps = {n: [n_samples / s if s else None for s in per(n, "seconds")] for n in order}
    peaks = [p["conditions"]["gemm_numpy_gflops"] for p in passes]
    limit = [g * 1e9 / flops for g in peaks]
    rows = []
    for n in order:
        vals = [v for v in sps[n] if v is not None]
        colds = [c for c in per(n, "cold") if c is not None]
        r = ratio_summary(sps[n], sps[DEFAULT])
        rows.append(
            {
                "trainer": n,
                "samples/s (median)": float(np.median(vals)) if vals else None,
                "samples/s per pass": " / ".join("n/a" if v is None else f"{v / 1e3:.1f}k" for v in sps[n]),
                "vs pipeline (per-pass median)": f"{r['median']:.2f}x" if r["median"] else "n/a",
                "% of GEMM limit": (
                    f"{100 * float(np.median([v / lim for v, lim in zip(sps[n], limit, strict=True) if v])):.0f}%"
                ),
                "test acc (median)": float(np.median([a for a in per(n, "acc") if a is not None])),
                "cold s (median)": float(np.median(colds)) if colds else None,
            }
        )
    targets = []

    def add(label: str, num: str, den: str, want: float, key: str = "sps") -> None:
        if num not in sps or den not in sps:
            return
        if key == "cold":  # cold: time ratio den / num (higher = the pipeline faster)
            s = ratio_summary(per(den, "cold"), per(num, "cold"), want)
        else:
            s = ratio_summary(sps[num], sps[den], want)
        targets.append({**s, "target": label, "want": want})

    add("steady: pipeline >= 1.3x PyTorch best practice", DEFAULT, BEST, 1.3)
    add("steady: pipeline >= 1.0x PyTorch 2-process local SGD", DEFAULT, DDP, 1.0)
    add("steady: pipeline >= 4x dask-ml tuned", DEFAULT, DML_TUNED, 4.0)
    add("cold: pipeline train process >= 1.0x PyTorch's process (time ratio)", DEFAULT, BEST, 1.0, "cold")
    lim = ratio_summary(sps[DEFAULT], limit, 0.75)
    targets.append({**lim, "target": "steady: pipeline >= 75% of the GEMM-implied limit", "want": 0.75})
    targets += accuracy_targets(passes)
    return rows, targets


def cold_missing(passes: list[dict], cold: bool = True) -> dict[str, str]:
    """Trainer -> why it has no cold figure in some pass (the failed process's message, or the
    cold runs not asked for); trainers with a cold figure in every pass are left out."""
    out = {}
    for name in passes[0]["results"]:
        why = [
            f"pass {p['pass']}: {p['results'][name].get('cold error', 'no cold run')}"
            for p in passes
            if p["results"][name].get("cold") is None
        ]
        if why:
            out[name] = "not run (--no-cold)" if not cold else "; ".join(why)
    return out


def cold_lines(missing: dict[str, str], cold: bool = True) -> list[str]:
    """The lines under the table saying which rows lack a cold figure and why (none if all have one)."""
    if not cold:
        return ["Cold runs not taken (--no-cold): the cold column is n/a for every trainer.", ""]
    if not missing:
        return []
    return ["No cold figure:", "", *(f"* {name}: {why}" for name, why in missing.items()), ""]


def points_target(label: str, gaps: list[float]) -> dict:
    """A target on accuracy gaps in points (one per pass): met where the pipeline is not below
    the peer by more than 1 point, in at least ``needed`` passes."""
    hits = sum(1 for x in gaps if x >= -1.0)
    need = ratio_summary(gaps, gaps, 0)["needed"]
    return {
        "target": label,
        "per_pass": gaps,
        "median": float(np.median(gaps)),
        "min": min(gaps),
        "max": max(gaps),
        "points": True,
        "hits": hits,
        "passes": len(gaps),
        "needed": need,
        "met": hits >= need,
    }


def accuracy_targets(passes: list[dict]) -> list[dict]:
    """The accuracy-parity targets, pipeline minus peer in points per pass: ema on and ema=0
    against PyTorch best practice, and ema on against PyTorch with the same averaging (each
    when both rows ran)."""
    names = set(passes[0]["results"])
    out = []
    for label, num, den in (
        ("accuracy within 1 point of PyTorch best practice (ema on)", DEFAULT, BEST),
        ("accuracy within 1 point of PyTorch best practice (ema=0)", EMA0, BEST),
        ("accuracy within 1 point of PyTorch best practice + the same weight averaging (ema on)", DEFAULT, BEST_EMA),
    ):
        if num in names and den in names:
            gaps = [100 * (p["results"][num]["acc"] - p["results"][den]["acc"]) for p in passes]
            out.append(points_target(label, gaps))
    return out


def target_lines(targets: list[dict], flagged: list[int]) -> list[str]:
    lines = ["| target | median (range; per pass) | passes meeting it | met? |", "| --- | --- | --- | --- |"]
    note = f" (passes {', '.join(map(str, flagged))} flagged under load)" if flagged else ""
    for t in targets:
        if t.get("points"):
            per = " / ".join(f"{x:+.2f}" for x in t["per_pass"])
            med = f"{t['median']:+.2f} points ({t['min']:+.2f} to {t['max']:+.2f}; per pass {per})"
        else:
            med = fmt_ratio(t)
        verdict = "yes" if t["met"] else "**NO**"
        lines.append(f"| {t['target']} | {med} | {t['hits']} of {t['passes']} (need {t['needed']}){note} | {verdict} |")
    return lines


def run(
    quick: bool = False, rows: int = 120_000, epochs: int = 2, passes: int = 5, cold: bool = True
) -> tuple[str, dict]:
    if quick:
        rows, test_rows, features, hidden, epochs, peak_n, passes = 4_000, 1_000, 64, (32, 16), 1, 256, 1
    else:
        test_rows, features, hidden, peak_n = 10_000, 784, (512, 256), 1024
    batch, n_classes = 256, 10
    sizes = (features, *hidden, n_classes)
    flops = _flops(sizes)
    m = meta()  # the commit and versions as the run starts
    info: dict[str, Any] = {}
    try:
        import torch  # noqa: F401

        from bench.torch_peers import compile_works, pick_adam

        info["torch"] = True
        info["adam"] = pick_adam(sizes, batch)
        info["compile"] = compile_works(sizes)
    except ImportError:
        info["torch"] = False
    try:
        import dask_ml  # noqa: F401

        info["dask_ml"] = True
    except ImportError:
        info["dask_ml"] = False
    with tmpdir("bench-tp-") as tmp:
        train, test = mnist_like(tmp, rows, test_rows, features, n_classes)
        Xtr, ytr = arrays(train)
        Xte, yte = arrays(test, like=train)
        data = {"Xtr": Xtr, "ytr": ytr, "Xte": Xte, "yte": yte}
        np.savez(tmp / "arrays.npz", X=Xtr, y=ytr, Xte=Xte, yte=yte)
        n_samples = epochs * len(Xtr)
        fns = trainers(train, test, tmp, data, hidden, batch, epochs, n_classes, cold, info)
        commands = {
            n: " ".join(Path(a).name if a.startswith(str(tmp)) else a for a in f.cold.command[1:])
            for n, f in fns.items()
            if hasattr(f, "cold")
        }
        recs = run_passes(fns, passes, cores=2, peak_n=peak_n, log=lambda m: print(m, file=sys.stderr, flush=True))
    # validate: every trainer learned (clearly above chance after the run)
    if not quick:
        for p in recs:
            for name, r in p["results"].items():
                if r["acc"] < 2.0 / n_classes:
                    raise AssertionError(f"{name} did not learn in pass {p['pass']}: accuracy {r['acc']:.3f}")
    rows_out, targets = summarize(recs, n_samples, flops)
    flagged = [p["pass"] for p in recs if p["conditions"]["flags"]]
    no_cold = cold_missing(recs, cold)
    payload = {
        "benchmark": "throughput",
        "meta": m,
        "quick": quick,
        "rows": len(Xtr),
        "test_rows": len(Xte),
        "epochs": epochs,
        "sizes": sizes,
        "batch": batch,
        "flops_per_sample": flops,
        "info": info,
        "passes": recs,
        "table": rows_out,
        "targets": targets,
        "cold_commands": commands,
        "cold_missing": no_cold,
    }
    m["json"] = str(save_json("throughput" + ("-quick" if quick else ""), payload, quick))
    arch = "-".join(map(str, sizes))
    adam = info.get("adam", {})
    head = [
        f"MLP {arch}, batch {batch}, Adam lr 1e-3, float32, {len(Xtr):,} training rows x {epochs} epochs = "
        f"{n_samples:,} samples per trainer, accuracy on {len(Xte):,} test rows; {passes} interleaved "
        f"pass{'es' if passes > 1 else ''}, order rotated; steady state excludes one-time costs for every "
        f"trainer and includes one validation pass per epoch for every trainer; cold = a fresh process from the "
        f"store to a saved model.",
        "",
        *provenance_lines(m),
    ]
    if info.get("torch"):
        head.append(
            f"PyTorch Adam: {adam.get('kind')} chosen (ms per step here: fused "
            f"{_ms(adam.get('fused'))}, foreach {_ms(adam.get('foreach'))}); torch.compile: "
            f"{'works' if info.get('compile') is None else 'not run: ' + info['compile']}."
        )
    fmt = {"samples/s (median)": ",.0f", "test acc (median)": ".4f", "cold s (median)": ".2f"}
    text = "\n".join(
        [
            *head,
            "",
            "Conditions per pass:",
            "",
            conditions_table(recs),
            "",
            md_table(rows_out, fmt),
            "",
            *cold_lines(no_cold, cold),
            "Targets (per-pass ratios; met = in at least 4 of 5 passes):",
            "",
            *target_lines(targets, flagged),
        ]
    )
    numbers = {
        "rows": rows_out,
        "limit": float(np.median([p["conditions"]["gemm_numpy_gflops"] for p in recs])) * 1e9 / flops,
        "passes": {r["trainer"]: [n_samples / p["results"][r["trainer"]]["seconds"] for p in recs] for r in rows_out},
        "json": m["json"],
    }
    return text, numbers


def accuracy_trainers(
    train: Any, test: Any, tmp: Path, data: dict, hidden: Sequence[int], batch: int, epochs: int, seed: int, info: dict
) -> dict[str, Callable[[], dict]]:
    """Name -> a function training that accuracy-parity row once with ``seed`` (no warm-up, no
    cold run) and returning its test accuracy after ``epochs`` epochs and its seconds."""
    n_classes = int(max(data["ytr"].max(), data["yte"].max())) + 1
    sizes = (data["Xtr"].shape[1], *hidden, n_classes)
    n_samples = epochs * len(data["Xtr"])
    base = pipeline_settings(test, hidden, epochs, batch, seed=seed)
    out: dict[str, Callable[[], dict]] = {}

    def pipeline(over: dict, name: str) -> Callable[[], dict]:
        def fn() -> dict:
            with local_cluster(WORKERS) as client:
                r = run_pipeline(client, train, tmp / "run", **{**base, **over})
            _check_samples(name, r["samples"], n_samples)
            return {
                "seconds": r["epoch_seconds"],
                "acc": float(r["history"][-1]["val_accuracy"]),
                "rounds": int(r["history"][-1]["rounds"]),
            }

        return fn

    out[DEFAULT] = pipeline({}, DEFAULT)
    out[EMA0] = pipeline({"ema": 0.0}, EMA0)
    if info.get("torch"):
        from bench.torch_peers import TorchBest, TorchBestAveraged

        kind = info["adam"]["kind"]

        def torch_row(make: Callable[[], Any]) -> Callable[[], dict]:
            def fn() -> dict:
                t = time.perf_counter()
                peer = make()
                for _ in range(epochs):
                    peer.epoch()
                pred = peer.predict(data["Xte"])
                res = {"seconds": time.perf_counter() - t, "acc": metric(pred, data["yte"], "classification")}
                if hasattr(peer, "t"):
                    res["updates"] = peer.t
                return res

            return fn

        X, y = data["Xtr"], data["ytr"]
        out[BEST] = torch_row(lambda: TorchBest(X, y, sizes, batch, seed=seed, adam_kind=kind))
        for name, every in ((BEST_EMA, ROUND_STEPS), (BEST_EMA_LOCAL, TrainConfig().local_steps)):
            out[name] = torch_row(
                lambda every=every: TorchBestAveraged(
                    X, y, sizes, batch, seed=seed, adam_kind=kind, ema=EMA, every=every
                )
            )
    return out


def run_accuracy(
    quick: bool = False, rows: int = 120_000, epochs: int = 2, seeds: Sequence[int] = (0,)
) -> tuple[str, dict]:
    """The accuracy-parity rows once per seed (module docstring, "Accuracy only"): a table of test
    accuracies after the same samples and the accuracy targets, one pass per seed."""
    if quick:
        rows, test_rows, features, hidden, epochs, peak_n = 4_000, 1_000, 64, (32, 16), 1, 256
    else:
        test_rows, features, hidden, peak_n = 10_000, 784, (512, 256), 1024
    batch, n_classes = 256, 10
    sizes = (features, *hidden, n_classes)
    m = meta()
    info: dict[str, Any] = {}
    try:
        import torch  # noqa: F401

        from bench.torch_peers import adam, build_model

        info["torch"] = True
        try:  # the kind every timed run so far chose here; rounding may differ between the two
            adam(build_model(sizes).parameters(), 1e-3, "fused")
            info["adam"] = {"kind": "fused"}
        except (RuntimeError, TypeError, ValueError) as exc:
            info["adam"] = {"kind": "foreach", "fused": f"unavailable: {exc}"}
    except ImportError:
        info["torch"] = False
    recs = []
    with tmpdir("bench-acc-") as tmp:
        train, test = mnist_like(tmp, rows, test_rows, features, n_classes)
        Xtr, ytr = arrays(train)
        Xte, yte = arrays(test, like=train)
        data = {"Xtr": Xtr, "ytr": ytr, "Xte": Xte, "yte": yte}
        for i, seed in enumerate(seeds):
            fns = accuracy_trainers(train, test, tmp, data, hidden, batch, epochs, seed, info)
            rec = run_passes(
                fns, 1, cores=2, peak_n=peak_n, log=lambda s, seed=seed: print(f"seed {seed}: {s}", file=sys.stderr)
            )
            recs.append({**rec[0], "pass": i + 1, "seed": seed})
    names = list(recs[0]["results"])
    table = []
    for n in names:
        accs = [p["results"][n]["acc"] for p in recs]
        extra = [p["results"][n].get("rounds", p["results"][n].get("updates")) for p in recs]
        table.append(
            {
                "trainer": n,
                "test acc per seed": " / ".join(f"{a:.4f}" for a in accs),
                "median": float(np.median(accs)),
                "averaging updates (pipeline: rounds)": " / ".join("n/a" if e is None else str(e) for e in extra),
            }
        )
    targets = accuracy_targets(recs)
    n_samples = epochs * len(Xtr)
    payload = {
        "benchmark": "throughput-accuracy",
        "meta": m,
        "quick": quick,
        "rows": len(Xtr),
        "test_rows": len(Xte),
        "epochs": epochs,
        "sizes": sizes,
        "batch": batch,
        "seeds": list(seeds),
        "ema": EMA,
        "round_steps": ROUND_STEPS,
        "info": info,
        "passes": recs,
        "table": table,
        "targets": targets,
    }
    m["json"] = str(save_json("throughput-accuracy" + ("-quick" if quick else ""), payload, quick))
    arch = "-".join(map(str, sizes))
    text = "\n".join(
        [
            f"Accuracy only: MLP {arch}, batch {batch}, Adam lr 1e-3, float32, {len(Xtr):,} training rows x {epochs} "
            f"epochs = {n_samples:,} samples per trainer, accuracy on {len(Xte):,} test rows; seeds "
            f"{', '.join(map(str, seeds))} (one pass each; no warm-up, no timing claims). PyTorch Adam: "
            f"{info.get('adam', {}).get('kind', 'n/a')}. Averaging: ema {EMA:g}, d = min(ema, (1 + t) / (10 + t)), "
            f"the pipeline per sync round, PyTorch every {ROUND_STEPS} steps and at each epoch's end.",
            "",
            *provenance_lines(m),
            "",
            "Conditions per seed (pass = seed in the order given):",
            "",
            conditions_table(recs),
            "",
            md_table(table, {"median": ".4f"}),
            "",
            "Targets (pipeline minus peer in points, per seed; met = in at least "
            f"{targets[0]['needed'] if targets else '?'} of {len(recs)} seeds):",
            "",
            *target_lines(targets, []),
        ]
    )
    return text, {"table": table, "targets": targets, "json": m["json"]}


def _ms(v: Any) -> str:
    return f"{1e3 * v:.2f}" if isinstance(v, float) else str(v)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one pass (smoke run)")
    ap.add_argument("--rows", type=int, default=120_000, help="training rows (plus 10,000 test rows)")
    ap.add_argument("--epochs", type=int, default=2, help="passes over the training rows, every trainer")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes of every trainer")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (whole-process) timings")
    ap.add_argument(
        "--accuracy-only",
        action="store_true",
        help="only the accuracy-parity rows (pipeline ema on / ema=0, PyTorch with and without the same averaging), "
        "once per seed, no timing",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for --accuracy-only (default 0)")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be >= 1")
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        ap.error(f"--seeds must be distinct integers >= 0, got {args.seeds!r}")
    if args.seeds != "0" and not args.accuracy_only:
        ap.error("--seeds applies to --accuracy-only (the timed rows use seed 0)")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch or any OpenMP runtime loads
    if args.accuracy_only:
        text, _ = run_accuracy(quick=args.quick, rows=args.rows, epochs=args.epochs, seeds=seeds)
        print(text)
        # the 120,000-row run keeps the plain name; another size its own (`python -m bench --collect`
        # reads throughput-accuracy-60000 beside it)
        size = f"-{args.rows}" if args.rows != 120_000 and not args.quick else ""
        write_out("throughput-accuracy" + size + ("-quick" if args.quick else ""), text)
        return text
    text, numbers = run(quick=args.quick, rows=args.rows, epochs=args.epochs, passes=args.passes, cold=not args.no_cold)
    print(text)
    stem = "throughput" + ("-quick" if args.quick else "")
    write_out(stem, text)
    rows = [{"trainer": r["trainer"], "samples/s": r["samples/s (median)"]} for r in numbers["rows"]]
    torch_sps = next((r["samples/s"] for r in rows if r["trainer"] == BEST), None)
    figures.throughput(rows, numbers["limit"], torch_sps, stem, numbers["passes"])
    return text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "cold":
        cold_main(sys.argv[2:])
    else:
        main()
