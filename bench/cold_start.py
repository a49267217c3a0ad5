"""Where a cold ``pipeline train`` process spends its time, phase by phase.

    python -m bench.cold_start                       # 60,000 x 784 store, 1 epoch, 3 passes
    python -m bench.cold_start --epochs 5 --passes 5
    python -m bench.cold_start --quick               # 4,000 x 784, 2 epochs, 1 pass, every way (smoke run)
    python -m bench.cold_start --baseline DIR        # an earlier commit's files in DIR, run in the same passes
    python -m bench.cold_start --extra               # also in process with --set blas_threads=2

(DIR from ``git archive COMMIT | tar -x -C DIR && cp bench/cold_start.py DIR/bench/``.)

One synthetic store (``pipeline synth``, 10 classes), MLP 784-512-256-10 (``hidden=[512,256]``,
the other settings at their defaults: batch 256, Adam, validation on 10% held-out rows), two
ways: **in process** (the default below ``cluster_min_rows``) and on a **2-worker LocalCluster**
(``--workers 2 --dashboard-address none``). Each pass runs, in rotated order, per way:

* the plain command (``python -m pipeline.cli train ...``): its wall time from outside is the
  **whole process** figure;
* the same command under a phase timer (``python -c "from bench.cold_start import child; ..."``):
  timers wrapped around the command's own functions once their modules are imported. Each timer
  counts its time *exclusive* of the timers nested in it, so the phases add up to the process:

  * **interpreter start**: launch to the timer's first line (Python, site, this module);
  * **imports**: every ``import`` statement of the main thread, wherever it runs (the command's
    modules, distributed, zarr, numba on first use, matplotlib for the plots);
  * **cluster start** / **cluster stop**: entering / leaving ``pipeline.connect.cluster_client``;
  * **connect**: installing the parameter server, probing the workers (``Trainer._connect``);
  * **planning**: ``Trainer.plan`` (row ranges, held-out rows);
  * **JIT / cache load**: Numba dispatchers compiling or loading their cached machine code on
    first call (``Dispatcher._compile_for_args``), in this process; on a cluster the workers'
    own (summed over workers) are given beside it, as part of the workers' training;
  * **training**: the epochs' training (``_run_epoch``: minibatch loop and loader), the rest;
    **of which reads** is the loader's wait for rows (``read_s`` in history.json);
  * **validation**: the validation passes (``_evaluate``; in sync mode on a cluster the shares
    validate inside their tasks: then it is part of training, ``validate_s``);
  * **checkpoints**, **model save**, **history**, **plots**: ``Trainer._checkpoint``,
    ``Model.save``, ``RunDir.write_json``, ``pipeline.plots.save_plots``;
  * **other**: what is left (argument parsing, store opens, run-directory claims, logging);
  * **exit**: the command's return to the end of the process (atexit handlers, teardown).

  **overhead** = whole process minus training: everything a user waits for that is not the
  minibatch loop (the "start-up, warm-up, validation and checkpointing" of a cold run).

* **overhead of the plain command** (the figure the 2 s target is judged on, with 2 epochs or
  more): the plain command's wall time minus the training seconds of its epochs 2 to n and,
  for its first epoch, one steady-state epoch (the median of epochs 2 to n), from its own
  ``history.json`` (validated inside the training tasks, their validation share taken out of
  an epoch's training). It counts what the timed overhead cannot see on a cluster: the first
  epoch's own warm-up, the workers' kernel loads among it (inside "training" above); and not
  the timers' own cost (their ``client.run`` on the workers, "timer overhead" above, ~0.2 s).

**Against PyTorch** (when torch is installed): in the same rotated passes, once per pass, PyTorch
at its best practice as a whole process from the same store to a saved model (:func:`peer_child`,
``python -m bench.cold_start torch ...``): :class:`bench.torch_peers.TorchBest`, the throughput
benchmark's target row and cold peer, with the same model, batch 256, Adam (fused or foreach,
whichever :func:`bench.torch_peers.pick_adam` measures faster here), float32 and initial weights;
its imports, the store read whole into memory and standardized with the store's statistics, the
rows the pipeline holds out for validation (the same rows, given as a file) split off, the same
epochs each followed by a validation pass over those rows, and ``torch.save``, its wall time
taken from outside as the plain command's is. Per pass, PyTorch's seconds over the plain
command's is the whole-process ratio (the target: at least 1.0x in 4 of 5 passes, for the command's
own ways); the peer's own phases stand in its column. Before any figure is reported the peer is
checked to have trained the rows the pipeline trained in every epoch. Both sides run with
``OMP_WAIT_POLICY=PASSIVE`` unless it is set (as in ``bench.throughput``: PyTorch's spinning
OpenMP threads otherwise slow it on a shared machine).

Every pass follows :mod:`bench.protocol` (:func:`bench.protocol.measure_pass`): load average,
steal before and after, other processes' CPU and both GEMM peaks are kept per pass in the JSON
(``passes``) and shown under the header, with the passes flagged as taken under load.

The timers cost a few ms (the plain command's wall time is given beside the timed one). Whether
distributed, bokeh, matplotlib and numba were imported at all is recorded per way. Raw figures
go to ``bench/results/cold_start-<UTC time>.json`` (``bench.protocol``).
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = (512, 256)
LAUNCH_ENV = "BENCH_COLD_START_LAUNCH"  # the parent's time.time() at launch
OUT_ENV = "BENCH_COLD_START_OUT"  # where the child writes its phases
WATCHED = ("distributed", "bokeh", "matplotlib", "numba", "zarr", "dask")
WAYS = {"in process": (), "2 workers": ("--workers", "2", "--dashboard-address", "none")}
PEER = "pytorch best practice"  # the whole-process peer (peer_child), run in the same passes
PEER_TARGET = 1.0  # the pipeline's whole process at least as fast as the peer's
PEER_PHASES = ("store read into memory", "model and optimizer set-up")  # the peer's phases the command has not
# labelled extra ways (``--extra``), run in the same passes; the targets judge WAYS alone
EXTRA_WAYS = {"in process, blas_threads=2": ("--set", "blas_threads=2")}
PHASES = (
    "interpreter start",
    "imports",
    "cluster start",
    "connect",
    "planning",
    "JIT / cache load",
    "training",
    "validation",
    "checkpoints",
    "model save",
    "history",
    "plots",
    "cluster stop",
    "timer overhead",
    "other",
    "exit",
)


# -------------------------------------------------------------------------------------------
# the timed child process (stdlib only until the command imports its own modules)
# -------------------------------------------------------------------------------------------


class PhaseClock:
    """Exclusive phase timers of the main thread: time inside a nested timer is not counted
    in the enclosing one. Other threads' timers are summed apart (``background``)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # the main thread's CPU seconds, exclusive likewise
        self.counts: dict[str, int] = {}
        self.background: dict[str, float] = {}
        self.main = threading.main_thread()
        self.stack: list[list] = []  # [name, start, nested seconds, CPU start, nested CPU seconds]

    def enter(self, name: str) -> None:
        if threading.current_thread() is self.main:
            self.stack.append([name, time.perf_counter(), 0.0, time.thread_time(), 0.0])

    def exit(self, name: str, t0: float) -> None:
        now = time.perf_counter()
        if threading.current_thread() is not self.main:
            self.background[name] = self.background.get(name, 0.0) + now - t0
            return
        cpu_now = time.thread_time()
        name, start, nested, cpu_start, cpu_nested = self.stack.pop()
        self.totals[name] = self.totals.get(name, 0.0) + (now - start - nested)
        self.cpu[name] = self.cpu.get(name, 0.0) + (cpu_now - cpu_start - cpu_nested)
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.stack:
            self.stack[-1][2] += now - start
            self.stack[-1][4] += cpu_now - cpu_start

    def wrap(self, name: str, fn: Callable) -> Callable:
        clock = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            clock.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                clock.exit(name, t0)

        timed.__bench_timed__ = True  # type: ignore[attr-defined]
        return timed

    def wrap_cm(self, enter_name: str, exit_name: str, fn: Callable, on_enter: Callable | None = None) -> Callable:
        """``fn`` returns a context manager: time its ``__enter__`` and ``__exit__`` apart."""
        clock = self

        class _Timed:
            def __init__(self, cm: Any) -> None:
                self.cm = cm

            def __enter__(self) -> Any:
                t0 = time.perf_counter()
                clock.enter(enter_name)
                try:
                    self.value = self.cm.__enter__()
                finally:
                    clock.exit(enter_name, t0)
                if on_enter is not None:
                    on_enter(self.value, "enter")
                return self.value

            def __exit__(self, *exc: Any) -> Any:
                if on_enter is not None:
                    on_enter(self.value, "exit")
                t0 = time.perf_counter()
                clock.enter(exit_name)
                try:
                    return self.cm.__exit__(*exc)
                finally:
                    clock.exit(exit_name, t0)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return _Timed(fn(*args, **kwargs))

        timed.__bench_timed__ = True  # type: ignore[attr-defined]
        return timed


# module -> [(attribute path, phase)]: wrapped when the module has been imported
_TARGETS: dict[str, list[tuple[str, str]]] = {
    "pipeline.train": [
        ("Trainer._connect", "connect"),
        ("Trainer.plan", "planning"),
        ("Trainer._run_epoch", "training"),
        ("Trainer._evaluate", "validation"),
        ("Trainer._checkpoint", "checkpoints"),
        ("RunDir.write_json", "history"),
    ],
    "pipeline.local": [("LocalTrainer._run_epoch", "training"), ("LocalTrainer._evaluate", "validation")],
    "pipeline.model": [("Model.save", "model save")],
    "pipeline.plots": [("save_plots", "plots")],
    "numba.core.dispatcher": [("_DispatcherBase._compile_for_args", "JIT / cache load")],
}


def _install_numba_timer(clock: PhaseClock, dispatchers: set) -> None:
    from numba.core import dispatcher

    base = dispatcher._DispatcherBase
    original = base._compile_for_args
    if getattr(original, "__bench_timed__", False):
        return
    timed = clock.wrap("JIT / cache load", original)

    def compile_for_args(self: Any, *args: Any, **kwargs: Any) -> Any:
        dispatchers.add(self)
        return timed(self, *args, **kwargs)

    compile_for_args.__bench_timed__ = True  # type: ignore[attr-defined]
    base._compile_for_args = compile_for_args


def _cache_counts(dispatchers: set) -> dict[str, int]:
    hits = sum(sum(d._cache_hits.values()) for d in dispatchers)
    misses = sum(sum(d._cache_misses.values()) for d in dispatchers)
    return {"dispatchers": len(dispatchers), "cache_hits": hits, "cache_misses": misses}


# a worker's own Numba timer (installed and read with client.run)
_WORKER: dict[str, Any] = {}


def worker_install() -> float:
    """Time the worker's Numba dispatchers from now on; the seconds importing numba took."""
    t0 = time.perf_counter()
    clock = PhaseClock()
    dispatchers: set = set()
    _install_numba_timer(clock, dispatchers)
    _WORKER.update(clock=clock, dispatchers=dispatchers)
    return time.perf_counter() - t0


def worker_collect() -> dict[str, Any]:
    """The worker's Numba seconds (any thread) and cache counts since :func:`worker_install`."""
    clock: PhaseClock = _WORKER["clock"]
    jit = clock.totals.get("JIT / cache load", 0.0) + clock.background.get("JIT / cache load", 0.0)
    return {"jit_s": jit, **_cache_counts(_WORKER["dispatchers"])}


def child(argv: Sequence[str] | None = None) -> int:
    """Run ``pipeline.cli`` with ``argv`` under the phase timers; write the phases as JSON to
    the file named by ``BENCH_COLD_START_OUT``."""
    t_start = time.perf_counter()
    launched = float(os.environ.get(LAUNCH_ENV, time.time()))
    interpreter = max(0.0, time.time() - launched)
    clock = PhaseClock()
    dispatchers: set = set()
    pending = {m: list(t) for m, t in _TARGETS.items()}
    workers: dict[str, Any] = {}
    by_package: dict[str, float] = {}  # seconds of import statements by the package they name
    stack: list[list] = []  # the main thread's import statements in progress: [package, start, nested]
    real_import = builtins.__import__

    def patch_loaded() -> None:
        for mod_name in [m for m in pending if m in sys.modules]:
            targets = pending.pop(mod_name)
            if mod_name == "numba.core.dispatcher":
                _install_numba_timer(clock, dispatchers)
                continue
            module = sys.modules[mod_name]
            for path, phase in targets:
                *owner_path, attr = path.split(".")
                owner = module
                for part in owner_path:
                    owner = getattr(owner, part)
                setattr(owner, attr, clock.wrap(phase, getattr(owner, attr)))
        if "pipeline.connect" in sys.modules:
            connect = sys.modules["pipeline.connect"]
            if not getattr(connect.cluster_client, "__bench_timed__", False):
                connect.cluster_client = clock.wrap_cm(
                    "cluster start", "cluster stop", connect.cluster_client, on_cluster
                )

    def on_cluster(client: Any, when: str) -> None:
        t0 = time.perf_counter()
        clock.enter("timer overhead")
        try:
            if when == "enter":
                workers["numba_import_s"] = client.run(worker_install)
            else:
                workers["numba"] = client.run(worker_collect)
        finally:
            clock.exit("timer overhead", t0)

    def timed_import(name: str, *args: Any, **kwargs: Any) -> Any:
        # main thread: the outermost import is the phase; every import's own time (its nested
        # imports left out) is charged to the package it names (a relative import: the package
        # of the module that runs it)
        if threading.current_thread() is not clock.main:
            return real_import(name, *args, **kwargs)
        level = args[3] if len(args) > 3 else kwargs.get("level", 0)
        scope = args[0] if args and level else None
        root = ((scope or {}).get("__package__") or "" if level else name).partition(".")[0]
        outer = not stack
        t0 = time.perf_counter()
        if outer:
            clock.enter("imports")
        stack.append([root, t0, 0.0])
        try:
            return real_import(name, *args, **kwargs)
        finally:
            _, start, nested = stack.pop()
            dt = time.perf_counter() - start
            by_package[root] = by_package.get(root, 0.0) + dt - nested
            if stack:
                stack[-1][2] += dt
            else:
                clock.exit("imports", t0)
                patch_loaded()

    builtins.__import__ = timed_import
    code = 1
    try:
        from pipeline.cli import main

        if argv is not None:
            sys.argv = ["pipeline", *argv]
        code = main()  # as the console script calls it: the process's own command line
    finally:
        builtins.__import__ = real_import
        total = time.perf_counter() - t_start
        phases = dict(clock.totals)
        phases["interpreter start"] = interpreter
        phases["other"] = total - sum(clock.totals.values())
        out = {
            "phases": phases,
            "counts": clock.counts,
            "cpu_phases": {**clock.cpu, "other": time.thread_time() - sum(clock.cpu.values())},
            "process_cpu_s": time.process_time(),  # every thread of the process, up to here
            "background": clock.background,
            "process_in_timer_s": total + interpreter,
            "numba": _cache_counts(dispatchers),
            "workers": workers,
            "imported": {m: m in sys.modules for m in WATCHED},
            "import_s_by_package": by_package,
            "exit_code": code,
        }
        Path(os.environ[OUT_ENV]).write_text(json.dumps(out, indent=1))
    return code


# -------------------------------------------------------------------------------------------
# the PyTorch peer's process
# -------------------------------------------------------------------------------------------


def peer_child(argv: Sequence[str]) -> int:
    """``python -m bench.cold_start torch STORE HELD.npy OUT.pt EPOCHS ADAM SIZES PHASES.json``: PyTorch
    at its best practice as a whole process, from the Zarr store to a saved model, the peer the
    pipeline's whole process is judged against.

    The peer is :class:`bench.torch_peers.TorchBest` (the throughput benchmark's target row and
    cold peer, ``python -m bench.torch_peers cold-peer best``) started as that cold peer starts: the store
    read whole into memory and standardized with its own statistics (:func:`bench.common.arrays`);
    then the rows in ``HELD.npy`` (the rows the pipeline holds out for validation; an empty
    array: none) split off, ``EPOCHS`` epochs each followed by a validation pass over the held-out
    rows (loss and accuracy, as the pipeline's), and the model saved with ``torch.save``. Its
    phases, a few ``perf_counter`` calls, go to ``PHASES.json``; its wall time is taken from
    outside, as the plain command's is."""
    t_start = time.perf_counter()
    launched = float(os.environ.get(LAUNCH_ENV, time.time()))
    interpreter = max(0.0, time.time() - launched)
    store_path, held_path, out, n_epochs, kind, sizes_s, dest = argv[:7]
    phases: dict[str, float] = {}
    t = time.perf_counter()
    import numpy as np
    import torch

    from bench.common import arrays
    from bench.torch_peers import TorchBest
    from pipeline.store import open_store

    phases["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    X, y = arrays(open_store(store_path))
    held = np.zeros(len(X), bool)
    held[np.load(held_path)] = True
    Xva, yva = X[held], y[held]
    if held.any():
        X, y = X[~held], y[~held]
    phases["store read into memory"] = time.perf_counter() - t
    t = time.perf_counter()
    peer = TorchBest(X, y, [int(v) for v in sizes_s.split(",")], adam_kind=kind)
    phases["model and optimizer set-up"] = time.perf_counter() - t  # torch.optim loads torch._dynamo here
    epochs: list[dict[str, Any]] = []
    train_s = validate_s = 0.0
    for _ in range(int(n_epochs)):
        t = time.perf_counter()
        peer.epoch()
        dt = time.perf_counter() - t
        train_s += dt
        epoch: dict[str, Any] = {"train_s": dt, "samples": len(X)}
        if len(Xva):
            t = time.perf_counter()
            scores = torch.from_numpy(peer.predict(Xva))
            epoch["val_loss"] = float(torch.nn.functional.cross_entropy(scores, torch.from_numpy(yva)))
            epoch["val_accuracy"] = float((scores.argmax(1).numpy() == yva).mean())
            epoch["validate_s"] = time.perf_counter() - t
            validate_s += epoch["validate_s"]
        epochs.append(epoch)
    phases["training"], phases["validation"] = train_s, validate_s
    t = time.perf_counter()
    torch.save(peer.model.state_dict(), out)
    phases["model save"] = time.perf_counter() - t
    total = time.perf_counter() - t_start
    phases["other"] = total - sum(phases.values())
    phases["interpreter start"] = interpreter
    got = {
        "phases": phases,
        "epochs": epochs,
        "train_rows": len(X),
        "held_out_rows": len(Xva),
        "process_in_timer_s": total + interpreter,
    }
    Path(dest).write_text(json.dumps(got, indent=1))
    return 0


# -------------------------------------------------------------------------------------------
# the benchmark (the parent process)
# -------------------------------------------------------------------------------------------


def _command(store: str, out: Path, epochs: int, extra: Sequence[str]) -> list[str]:
    return [
        "train",
        store,
        "--out",
        str(out),
        "--force",
        "-q",
        "--set",
        f"hidden={list(HIDDEN)}",
        "--set",
        f"epochs={epochs}",
        *extra,
    ]


def plain_run(store: str, out: Path, epochs: int, extra: Sequence[str], root: Path = ROOT) -> tuple[float, float]:
    """Wall seconds of the plain command, from outside, and the CPU seconds of it and of every
    process it started (a cluster's workers)."""
    import resource
    import subprocess

    from bench.common import child_env

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *_command(store, out, epochs, extra)],
        env=child_env(root),
        cwd=root,  # the current directory comes first on sys.path: the checkout's own modules
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)


def plain_epochs(out: Path) -> list[dict[str, Any]]:
    """The plain command's epochs as its ``history.json`` gives them: the driver's seconds of
    training (``train_s``; validated inside the training tasks, their validation share taken
    out), of validation and of reads."""
    epochs = json.loads((out / "history.json").read_text())["epochs"]
    return [
        {
            "train_s": h["train_s"] - (h["validate_s"] if h.get("validated_in_tasks") else 0.0),
            "validate_s": h["validate_s"],
            "read_s": h["read_s"],
            "seconds": h["seconds"],
            "samples": h["samples"],
            "val_accuracy": h.get("val_accuracy"),
        }
        for h in epochs
    ]


def steady_overhead(wall: float, epochs: Sequence[Mapping[str, Any]]) -> float | None:
    """What the plain command's process took beyond steady-state training: its wall time minus
    the training seconds of epochs 2 to n and, for the first epoch, one steady-state epoch (the
    median of epochs 2 to n). The first epoch's excess over a steady one (its warm-up, the
    workers' kernel loads among it) counts as overhead, like start-up, validation, checkpoints
    and the exit. ``None`` with fewer than 2 epochs."""
    if len(epochs) < 2:
        return None
    steady = [e["train_s"] for e in epochs[1:]]
    return wall - sum(steady) - _median(steady)


def timed_run(store: str, out: Path, epochs: int, extra: Sequence[str], root: Path = ROOT) -> dict[str, Any]:
    """The phases of one cold process under the timers, with its wall time from outside and
    the run's history figures."""
    import subprocess

    from bench.common import child_env

    dest = out.parent / f"{out.name}-phases.json"
    env = {**child_env(root), OUT_ENV: str(dest), LAUNCH_ENV: repr(time.time())}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import sys; from bench.cold_start import child; sys.exit(child())"]
        + _command(store, out, epochs, extra),
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t
    got = json.loads(dest.read_text())
    hist = json.loads((out / "history.json").read_text())["epochs"]
    got["wall_s"] = wall
    got["history"] = {
        "epochs": len(hist),
        "read_s": sum(h["read_s"] for h in hist),
        "train_s": sum(h["train_s"] for h in hist),
        "validate_s": sum(h["validate_s"] for h in hist),
        "validated_in_tasks": any(h.get("validated_in_tasks") for h in hist),
        "samples": sum(h["samples"] for h in hist),
    }
    p = got["phases"]
    # after the timer's last line: the interpreter's teardown (atexit handlers, threads, modules)
    p["exit"] = max(0.0, wall - got["process_in_timer_s"])
    got["overhead_s"] = wall - p.get("training", 0.0)
    by = got["import_s_by_package"]
    by["(other packages)"] = sum(v for k, v in by.items() if k not in (*WATCHED, "pipeline", "kernels"))
    return got


def held_out_file(store: Any, dest: Path) -> int:
    """Write the rows the pipeline holds out of ``store`` for validation at its defaults
    (``validation`` share, ``seed``; :func:`pipeline.loader.held_out_rows`) to ``dest`` (.npy),
    for the PyTorch peer to validate on the same rows; returns how many."""
    import numpy as np

    from pipeline.config import TrainConfig
    from pipeline.loader import held_out_rows

    cfg = TrainConfig()
    rows = [held_out_rows(store, c, cfg.validation, cfg.seed) for c in range(store.n_chunks)]
    held = np.concatenate(rows) if cfg.validation > 0 and rows else np.empty(0, np.int64)
    np.save(dest, held.astype(np.int64))
    return len(held)


def peer_run(store: str, held: Path, out: Path, epochs: int, adam_kind: str) -> dict[str, Any]:
    """One cold process of the PyTorch peer (:func:`peer_child`): its wall seconds from outside
    (``wall_s``), the CPU seconds of the process, its phases and epochs, and its overhead over
    its steady-state epochs reckoned as the plain command's (:func:`steady_overhead`)."""
    import resource
    import subprocess

    from bench.common import child_env

    dest = out.parent / f"{out.name}-phases.json"
    sizes = ",".join(map(str, (784, *HIDDEN, 10)))
    env = {**child_env(ROOT), LAUNCH_ENV: repr(time.time())}
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.cold_start", "torch", store, str(held), str(out), str(epochs), adam_kind, sizes]
        + [str(dest)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = json.loads(dest.read_text())
    got["wall_s"] = wall
    got["cpu_s"] = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
    got["phases"]["exit"] = max(0.0, wall - got["process_in_timer_s"])
    got["overhead_s"] = wall - got["phases"]["training"]
    got["steady_overhead_s"] = steady_overhead(wall, got["epochs"])
    return got


def _median(xs: Sequence[float]) -> float:
    import numpy as np

    return float(np.median(xs)) if xs else float("nan")


def peer_ratio(d: Mapping[str, Any], way: str) -> dict[str, Any]:
    """Per pass, the PyTorch peer's whole process seconds over the plain command's of ``way``
    (above 1: the pipeline's process is the faster), judged against :data:`PEER_TARGET` by the
    protocol's rule (:func:`bench.protocol.ratio_summary`: in at least 4 of 5 passes)."""
    from bench.protocol import ratio_summary

    return ratio_summary([r["wall_s"] for r in d["peer"]["runs"]], d["results"][way]["plain"], PEER_TARGET)


def run(
    rows: int, epochs: int, passes: int, quick: bool, baseline: Path | None = None, extra: bool = False
) -> tuple[str, dict[str, Any]]:
    """The table and the raw figures; with ``baseline`` (another checkout holding this module
    as ``bench/cold_start.py``) each way runs from both checkouts in the same passes; with
    ``extra`` the :data:`EXTRA_WAYS` too. The PyTorch peer (:func:`peer_child`, when torch is
    installed) runs once per pass among the ways, and every pass is measured by
    :func:`bench.protocol.measure_pass`."""
    from bench.common import machine, tmpdir
    from bench.protocol import measure_pass, meta, rotated, save_json
    from pipeline.synth import synth

    # PyTorch's OpenMP threads otherwise spin on a shared machine (bench.throughput's docstring);
    # set before anything loads OpenMP, for every process alike, and recorded in the header
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mach = machine()
    m = meta()  # the commit and versions as the run starts
    ways = {w: (args, ROOT) for w, args in (WAYS | (EXTRA_WAYS if extra else {})).items()}
    if baseline is not None:
        ways.update({f"{w} (baseline)": (args, baseline) for w, args in WAYS.items()})
    results: dict[str, dict[str, list]] = {
        w: {"plain": [], "plain_cpu": [], "plain_epochs": [], "plain_overhead": [], "timed": []} for w in ways
    }
    peer: dict[str, Any] | None = None
    try:
        import torch  # noqa: F401

        from bench.torch_peers import pick_adam

        peer = {"name": PEER, "adam": pick_adam((784, *HIDDEN, 10)), "runs": []}
    except ImportError:  # the peer is optional (the bench extra): its column and ratio say so
        pass
    records: list[dict[str, Any]] = []
    with tmpdir("cold-start-") as tmp:
        store = synth(str(tmp / "s.zarr"), rows=rows, features=784, classes=10, seed=0)
        held = tmp / "held-out.npy"
        held_rows = held_out_file(store, held)
        for root in {r for _, r in ways.values()}:  # page cache and Numba's cache, as a user's second run
            plain_run(str(store.path), tmp / "warm", 1, (), root)
        if peer is not None:  # likewise torch's libraries in the page cache
            peer_run(str(store.path), held, tmp / "warm.pt", 1, peer["adam"]["kind"])
            peer["held_out_rows"] = held_rows
        names = [*ways, *([PEER] if peer is not None else [])]
        for k in range(passes):
            order = rotated(names, k)
            with measure_pass(cores=2, peak_n=256 if quick else 1024) as cond:
                for way in order:
                    if peer is not None and way == PEER:
                        peer["runs"].append(
                            peer_run(str(store.path), held, tmp / f"peer-{k}.pt", epochs, peer["adam"]["kind"])
                        )
                        continue
                    args, root = ways[way]
                    tag = way.replace(" ", "-").replace("(", "").replace(")", "")
                    plain_out = tmp / f"plain-{tag}-{k}"
                    wall, cpu = plain_run(str(store.path), plain_out, epochs, args, root)
                    results[way]["plain"].append(wall)
                    results[way]["plain_cpu"].append(cpu)
                    hist = plain_epochs(plain_out)
                    results[way]["plain_epochs"].append(hist)
                    results[way]["plain_overhead"].append(steady_overhead(wall, hist))
                    timed = timed_run(str(store.path), tmp / f"timed-{tag}-{k}", epochs, args, root)
                    timed["load_before"] = cond["load_before"]
                    results[way]["timed"].append(timed)
            records.append({"pass": k + 1, "order": order, "conditions": cond})
    if peer is not None:
        check_peer(peer, results["in process"]["plain_epochs"], quick)
    payload = {
        "meta": m,
        "quick": quick,
        "rows": rows,
        "features": 784,
        "hidden": list(HIDDEN),
        "epochs": epochs,
        "passes": records,
        "results": results,
        "peer": peer,
        "baseline": str(baseline) if baseline else None,
    }
    m["json"] = str(save_json("cold_start" + ("-quick" if quick else ""), payload, quick))
    return render(payload, mach), payload


def check_peer(peer: Mapping[str, Any], plain: Sequence[Sequence[Mapping[str, Any]]], quick: bool) -> None:
    """Like for like before any figure is reported: the peer trained the rows the pipeline
    trained in every epoch (the same store less the same held-out rows) and, in a full run,
    learned (validation accuracy after its last epoch above twice chance)."""
    want = [e["samples"] for run in plain for e in run]
    got = [e["samples"] for run in peer["runs"] for e in run["epochs"]]
    if set(got) != set(want):
        raise AssertionError(
            f"the PyTorch peer trained {sorted(set(got))} rows an epoch, the pipeline {sorted(set(want))}"
        )
    for run in peer["runs"]:
        acc = run["epochs"][-1].get("val_accuracy")
        if not quick and acc is not None and acc < 0.2:
            raise AssertionError(f"the PyTorch peer did not learn: validation accuracy {acc:.3f}")


def render(d: Mapping[str, Any], mach: Mapping[str, str]) -> str:
    """The tables of a run's raw figures ``d``: the phases by way (the PyTorch peer's beside
    them), the main thread's CPU by phase, the whole processes against the peer per pass, and
    the conditions of every pass."""
    from bench.common import md_table
    from bench.protocol import conditions_table, provenance_lines

    results, peer, epochs, rows = d["results"], d.get("peer"), d["epochs"], d["rows"]
    ways = list(results)
    runs = peer["runs"] if peer else []
    col = f"{PEER} s"
    rows_out = []
    first_imports = [f"of imports: {m}" for m in (*WATCHED, "pipeline", "kernels")]
    first_imports.append("of imports: (other packages)")
    extra_rows = ("of training: reads (read_s)", "workers' JIT / cache load (sum)", *first_imports)
    for phase in (*PHASES[:5], *PEER_PHASES, *PHASES[5:], *extra_rows):
        row: dict[str, Any] = {"phase": phase}
        for way in ways:
            timed = results[way]["timed"]
            if phase in PEER_PHASES:
                row[f"{way} s"] = ""  # the command reads inside training (the reads row), sets up in others
                continue
            if phase.startswith("of training: reads"):
                vals = [t["history"]["read_s"] for t in timed]
            elif phase.startswith("of imports: "):
                pkg = phase[len("of imports: ") :]
                vals = [t["import_s_by_package"].get(pkg, 0.0) for t in timed]
            elif phase.startswith("workers'"):
                vals = [sum(w["jit_s"] for w in t["workers"].get("numba", {}).values()) for t in timed]
            else:
                vals = [t["phases"].get(phase, 0.0) for t in timed]
            row[f"{way} s"] = _median(vals)
        if runs:
            row[col] = _median([r["phases"][phase] for r in runs]) if phase in runs[0]["phases"] else ""
        rows_out.append(row)
    # the peer's one run per pass is both its timed and its plain process (its timers are a few perf_counter calls)
    for label, key in (("whole process, timed", "wall_s"), ("overhead (process - training)", "overhead_s")):
        rows_out.append(
            {
                "phase": label,
                **{f"{w} s": _median([t[key] for t in results[w]["timed"]]) for w in ways},
                **({col: _median([r[key] for r in runs])} if runs else {}),
            }
        )
    rows_out.append(
        {
            "phase": "whole process, plain command",
            **{f"{w} s": _median(results[w]["plain"]) for w in ways},
            **({col: _median([r["wall_s"] for r in runs])} if runs else {}),
        }
    )
    if epochs >= 2:
        rows_out.append(
            {
                "phase": "overhead of the plain command (process - epochs 2..n - one steady epoch)",
                **{f"{w} s": _median(results[w]["plain_overhead"]) for w in ways},
                **({col: _median([r["steady_overhead_s"] for r in runs])} if runs else {}),
            }
        )
    rows_out.append(
        {
            "phase": "CPU s of the plain command (+ workers)",
            **{f"{w} s": _median(results[w]["plain_cpu"]) for w in ways},
            **({col: _median([r["cpu_s"] for r in runs])} if runs else {}),
        }
    )
    # the main thread's CPU seconds by phase: what a machine's load does not stretch
    cpu_rows = []
    for phase in (p for p in PHASES if p not in ("interpreter start", "exit")):
        cpu_rows.append(
            {
                "phase": phase,
                **{f"{w} s": _median([t["cpu_phases"].get(phase, 0.0) for t in results[w]["timed"]]) for w in ways},
            }
        )
    cpu_rows.append(
        {
            "phase": "overhead (all but training)",
            **{
                f"{w} s": _median(
                    [sum(v for k, v in t["cpu_phases"].items() if k != "training") for t in results[w]["timed"]]
                )
                for w in ways
            },
        }
    )
    imported = {
        way: ", ".join(m for m in WATCHED if results[way]["timed"][-1]["imported"][m]) or "none" for way in ways
    }
    numba = {way: results[way]["timed"][-1]["numba"] for way in ways}
    passes = d["passes"]
    fmt = {f"{w} s": ".3f" for w in ways} | {col: ".3f"}
    text = (
        f"Cold `pipeline train` by phase: {rows:,} x 784 synthetic store, MLP 784-{'-'.join(map(str, HIDDEN))}-10, "
        f"{epochs} epoch(s), defaults otherwise; medians of {len(passes)} interleaved pass(es), the order rotated "
        f"per pass. Machine: {mach['cpu']}, {mach['cores']} cores (shared), load {mach['load']}, {mach['date']}.\n"
        + "\n".join(provenance_lines(d["meta"]))
        + "\n\nConditions per pass:\n\n"
        + conditions_table(passes)
        + "\n\n"
        + md_table(rows_out, fmt)
        + "\n\n"
        + peer_text(d)
        + "\n\nThe main thread's CPU seconds by phase (time.thread_time(), exclusive like the wall times; "
        "a loaded machine stretches the wall times, much less these; on a cluster the driver's main thread mostly "
        "waits, its event loop and the workers do the work: see the CPU row above):\n\n"
        + md_table(cpu_rows, {f"{w} s": ".3f" for w in ways})
        + "\n\nImported: "
        + "; ".join(f"{w}: {imported[w]}" for w in ways)
        + ". Numba in the driver: "
        + "; ".join(
            f"{w}: {n['dispatchers']} kernels, {n['cache_hits']} cache loads, {n['cache_misses']} compiles"
            for w, n in numba.items()
        )
        + ".\n"
    )
    flagged = [f"pass {p['pass']} ({', '.join(p['conditions']['flags'])})" for p in passes if p["conditions"]["flags"]]
    if flagged:
        text += f"\nFlagged under load: {'; '.join(flagged)}.\n"
    return text


def peer_text(d: Mapping[str, Any]) -> str:
    """The whole processes against the PyTorch peer, per pass, for every way (the command's own
    ways judged against :data:`PEER_TARGET`), and what the peer is."""
    from bench.common import md_table
    from bench.protocol import fmt_ratio

    peer = d.get("peer")
    if not peer:
        return f"{PEER}: not run (torch is not installed; `pip install torch`, the bench extra)."
    runs = peer["runs"]
    rows = []
    for way, res in d["results"].items():
        s = peer_ratio(d, way)
        judged = way in WAYS
        rows.append(
            {
                "way": way,
                "pipeline command s per pass": " / ".join(f"{x:.2f}" for x in res["plain"]),
                f"{PEER} s per pass": " / ".join(f"{r['wall_s']:.2f}" for r in runs),
                "PyTorch / pipeline (time ratio)": fmt_ratio(s),
                f">= {PEER_TARGET:.1f}x": (
                    f"{s['hits']} of {s['passes']} passes (need {s['needed']}): {'met' if s['met'] else 'NOT met'}"
                    if judged
                    else "not judged"
                ),
            }
        )

    def last_acc(epochs: Sequence[Mapping[str, Any]]) -> float | None:
        return epochs[-1].get("val_accuracy") if epochs else None

    accs = {w: [last_acc(e) for e in res["plain_epochs"]] for w, res in d["results"].items()}
    accs[PEER] = [last_acc(r["epochs"]) for r in runs]
    shown = "; ".join(
        f"{w} {_median([a for a in xs if a is not None]):.4f}"
        for w, xs in accs.items()
        if any(a is not None for a in xs)
    )
    adam = peer["adam"]
    return (
        f"Whole process against {PEER} (`python -m bench.cold_start torch`: the throughput benchmark's peer, "
        f"`bench.torch_peers.TorchBest`, 2 threads, Adam {adam['kind']} as measured faster here): a fresh process "
        f"from the same store to a saved model, timed from outside like the plain command: imports, the store read "
        f"whole into memory and standardized, the same {peer.get('held_out_rows', 0):,} held-out rows split off, "
        f"{d['epochs']} epochs of batch 256 each followed by a validation pass over them, `torch.save`. Per pass "
        "ratio = its seconds / the plain command's (above 1: the pipeline's process faster); met in at least "
        "ceil(0.8 n) of n passes (4 of 5):\n\n"
        + md_table(rows)
        + f"\n\nValidation accuracy after the last epoch (median over passes): {shown or 'n/a'} (the pipeline "
        "validates its weight average, `ema`; the peer its weights)."
    )


def main(argv: Sequence[str] | None = None) -> str:
    from bench.common import write_out

    ap = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4,000 rows, 2 epochs, 1 pass (smoke run)")
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (with this file as bench/cold_start.py) to run beside this one in the same passes",
    )
    ap.add_argument(
        "--extra",
        action="store_true",
        help="also the labelled extra ways: in process with --set blas_threads=2 (not judged as targets)",
    )
    args = ap.parse_args(argv)
    rows, passes = (4_000, 1) if args.quick else (args.rows, args.passes)
    epochs = max(2, args.epochs) if args.quick else args.epochs  # 2: the plain command's steady epoch
    text, _ = run(rows, epochs, passes, args.quick, args.baseline, args.extra or args.quick)  # a smoke run: all ways
    print(text)
    write_out("cold_start" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    if sys.argv[1:2] == ["torch"]:
        sys.exit(peer_child(sys.argv[2:]))
    main()
