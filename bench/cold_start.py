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


def _median(xs: Sequence[float]) -> float:
    import numpy as np

    return float(np.median(xs)) if xs else float("nan")


def run(
    rows: int, epochs: int, passes: int, quick: bool, baseline: Path | None = None, extra: bool = False
) -> tuple[str, dict[str, Any]]:
    """The table and the raw figures; with ``baseline`` (another checkout holding this module
    as ``bench/cold_start.py``) each way runs from both checkouts in the same passes; with
    ``extra`` the :data:`EXTRA_WAYS` too."""
    from bench.common import machine, md_table, tmpdir
    from bench.protocol import meta, provenance_lines, rotated, save_json
    from pipeline.synth import synth

    mach = machine()
    ways = {w: (args, ROOT) for w, args in (WAYS | (EXTRA_WAYS if extra else {})).items()}
    if baseline is not None:
        ways.update({f"{w} (baseline)": (args, baseline) for w, args in WAYS.items()})
    results: dict[str, dict[str, list]] = {
        w: {"plain": [], "plain_cpu": [], "plain_epochs": [], "plain_overhead": [], "timed": []} for w in ways
    }
    with tmpdir("cold-start-") as tmp:
        store = synth(str(tmp / "s.zarr"), rows=rows, features=784, classes=10, seed=0)
        for root in {r for _, r in ways.values()}:  # page cache and Numba's cache, as a user's second run
            plain_run(str(store.path), tmp / "warm", 1, (), root)
        for k in range(passes):
            load0 = os.getloadavg()[0]
            for way in rotated(list(ways), k):
                extra, root = ways[way]
                tag = way.replace(" ", "-").replace("(", "").replace(")", "")
                plain_out = tmp / f"plain-{tag}-{k}"
                wall, cpu = plain_run(str(store.path), plain_out, epochs, extra, root)
                results[way]["plain"].append(wall)
                results[way]["plain_cpu"].append(cpu)
                hist = plain_epochs(plain_out)
                results[way]["plain_epochs"].append(hist)
                results[way]["plain_overhead"].append(steady_overhead(wall, hist))
                timed = timed_run(str(store.path), tmp / f"timed-{tag}-{k}", epochs, extra, root)
                timed["load_before"] = load0
                results[way]["timed"].append(timed)
    payload = {
        "meta": meta(),
        "rows": rows,
        "features": 784,
        "hidden": list(HIDDEN),
        "epochs": epochs,
        "passes": passes,
        "results": results,
        "baseline": str(baseline) if baseline else None,
    }
    info = dict(payload["meta"])
    info["json"] = str(save_json("cold_start" + ("-quick" if quick else ""), payload, quick))
    rows_out = []
    first_imports = [f"of imports: {m}" for m in (*WATCHED, "pipeline", "kernels")]
    first_imports.append("of imports: (other packages)")
    extra_rows = ("of training: reads (read_s)", "workers' JIT / cache load (sum)", *first_imports)
    for phase in (*PHASES, *extra_rows):
        row: dict[str, Any] = {"phase": phase}
        for way in ways:
            timed = results[way]["timed"]
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
        rows_out.append(row)
    for label, key in (("whole process, timed", "wall_s"), ("overhead (process - training)", "overhead_s")):
        rows_out.append({"phase": label, **{f"{w} s": _median([t[key] for t in results[w]["timed"]]) for w in ways}})
    rows_out.append({"phase": "whole process, plain command", **{f"{w} s": _median(results[w]["plain"]) for w in ways}})
    if epochs >= 2:
        rows_out.append(
            {
                "phase": "overhead of the plain command (process - epochs 2..n - one steady epoch)",
                **{f"{w} s": _median(results[w]["plain_overhead"]) for w in ways},
            }
        )
    rows_out.append(
        {
            "phase": "CPU s of the plain command (+ workers)",
            **{f"{w} s": _median(results[w]["plain_cpu"]) for w in ways},
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
    text = (
        f"Cold `pipeline train` by phase: {rows:,} x 784 synthetic store, MLP 784-{'-'.join(map(str, HIDDEN))}-10, "
        f"{epochs} epoch(s), defaults otherwise; medians of {passes} interleaved pass(es). Machine: {mach['cpu']}, "
        f"{mach['cores']} cores (shared), load {mach['load']}, {mach['date']}.\n"
        + "\n".join(provenance_lines(info))
        + "\n\n"
        + md_table(rows_out, {f"{w} s": ".3f" for w in ways})
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
    return text, payload


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
    main()
