"""Out-of-core: ``--epochs`` passes (2 by default) over synthetic stores of growing size with a
small per-worker memory limit; peak RSS per worker and epoch (should stay flat), throughput
(flat) and disk read MB/s.

    python -m bench.out_of_core                 # 1, 4 and 16 GB stores (X bytes, uint8)
    python -m bench.out_of_core --sizes 1,4     # choose sizes (GB)
    python -m bench.out_of_core --huge          # adds one store larger than memory (26 GB)
    python -m bench.out_of_core --quick         # tiny smoke run
    python -m bench.out_of_core --sizes 3.5 --memory-cap 1.5GiB   # memory that binds (a cgroup)

Each store (784 uint8 features, 10 classes, ``pipeline.synth`` default chunking and codec) is
generated under bench/out/, trained on for ``--epochs`` epochs (default config: MLP 784-256-128-10,
sync, local_steps 8; ``validation=0`` so each epoch is training only) on a 2-worker LocalCluster (1
thread each, ``memory_limit`` 2 GiB per worker), then deleted before the next size.
During training the driver samples every worker process's RSS (psutil, every 0.2 s) and their
``read_bytes`` I/O counters (bytes that really came from the block device, page-cache hits
excluded). Before each store's run it tries ``sync; echo 3 > /proc/sys/vm/drop_caches`` and says
whether the kernel accepted it (a one-epoch warm-up on a 20,000-row store precedes it, so
imports and Numba's cache load stay out of the timed epoch; "RSS before" is before the warm-up);
"disk MB/s" is what the counters saw, "store MB/s" is the
compressed store bytes over the epoch time (what was read, from disk or cache).

Each store is one pass of :mod:`bench.protocol` (``measure_pass``: load average, steal, other
processes' CPU, GEMM peaks, flagged when under load) around both trainers' epochs on it; the
table's header gives the commit and versions and every pass's conditions, the JSON keeps them
(``passes``). With ``--memory-cap`` the PyTorch peer runs once, in a cgroup of its own capped like
the workers'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import figures
from bench.common import OUT, load, local_cluster, md_table, run_pipeline, write_out
from bench.protocol import conditions_table, measure_pass, meta, provenance_lines, save_json

FEATURES = 784


def drop_caches() -> str:
    """Try to empty the page cache; returns what happened."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as exc:
        return f"not possible ({type(exc).__name__}: {exc.strerror or exc})"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Sampler:
    """Samples RSS and read_bytes of the given pids in a background thread."""

    def __init__(self, pids: dict[str, int], every: float = 0.2) -> None:
        import psutil

        self.procs = {w: psutil.Process(p) for w, p in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.series: list[tuple[float, float]] = []  # (seconds since __enter__, MB of the largest worker)
        self.read0 = {w: self._read(p) for w, p in self.procs.items()}
        self.read1 = dict(self.read0)
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read(p: Any) -> int:
        try:
            return int(p.io_counters().read_bytes)
        except Exception:  # noqa: BLE001 - io counters unavailable in some sandboxes
            return 0

    def _sample(self) -> None:
        top = 0  # (called from __enter__ on: _t0 is set there)
        for w, p in self.procs.items():
            try:
                rss = p.memory_info().rss
                self.peak[w] = max(self.peak[w], rss)
                top = max(top, rss)
                self.read1[w] = self._read(p)
            except Exception:  # noqa: BLE001 - the worker may restart; keep sampling the rest
                pass
        self.series.append((time.perf_counter() - self._t0, top / 2**20))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> Sampler:
        self._t0 = time.perf_counter()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def meminfo_mb(key: str = "Cached") -> float:
    """A /proc/meminfo figure in MB (``Cached``: the page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return float("nan")


def ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def own_memory_cgroup() -> tuple[Path | None, str]:
    """This process's memory cgroup directory (v1 ``memory`` controller or v2 unified) and the
    file that holds its limit, or None with the reason."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        return None, f"no /proc/self/cgroup ({exc.strerror})"
    for line in lines:
        _, ctrl, rel = line.split(":", 2)
        if "memory" in ctrl.split(","):
            return Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "memory.limit_in_bytes"
    for line in lines:
        if line.startswith("0::"):
            base = Path("/sys/fs/cgroup")
            if not (base / "cgroup.controllers").exists() and (base / "unified").is_dir():
                base = base / "unified"
            return base / line[3:].lstrip("/"), "memory.max"
    return None, "no memory cgroup listed in /proc/self/cgroup"


def cap_support() -> tuple[bool, str]:
    """Whether a memory cap can be put around the workers here (a child cgroup of this process's
    own memory cgroup), and why not."""
    d, limit_file = own_memory_cgroup()
    if d is None:
        return False, limit_file
    if not d.is_dir():
        return False, f"{d} does not exist"
    if limit_file == "memory.max" and "memory" not in (d / "cgroup.subtree_control").read_text(errors="ignore"):
        return False, f"the memory controller is not enabled for children of {d}"
    if not os.access(d, os.W_OK):
        return False, f"{d} is not writable"
    return True, f"child of {d}"


class MemoryCap:
    """A child memory cgroup of this process's own, capped at ``limit`` bytes; ``add(pid)`` moves a
    process into it (page cache it reads is charged to it too). Removed on exit."""

    def __init__(self, limit: int) -> None:
        d, self.limit_file = own_memory_cgroup()
        if d is None:
            raise OSError(self.limit_file)
        self.dir = d / f"bench-ooc-{os.getpid()}"
        self.limit = limit

    def __enter__(self) -> MemoryCap:
        self.dir.mkdir()
        (self.dir / self.limit_file).write_text(str(self.limit))
        return self

    def add(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc: Any) -> None:
        for _ in range(50):  # the workers are gone once their cluster closed
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def binds(store_bytes: int, cap: int | None, ram: int) -> str:
    """Why memory binds on this run, or that it does not (store < 2x RAM and no cap)."""
    if cap is not None and store_bytes > 2 * cap:
        return f"yes: cap {cap / 2**30:.1f} GiB around the workers, store {store_bytes / 2**30:.1f} GiB"
    if store_bytes >= 2 * ram:
        return f"yes: store {store_bytes / 2**30:.1f} GiB >= 2x RAM ({ram / 2**30:.1f} GiB)"
    why = "no cap" if cap is None else f"cap {cap / 2**30:.1f} GiB not below half the store"
    return f"NO: store {store_bytes / 2**30:.2f} GiB < 2x RAM ({ram / 2**30:.1f} GiB), {why}"


def _torch_stream(path: Path, epochs: int, sizes: Sequence[int], cap: MemoryCap | None) -> list[dict]:
    """The PyTorch IterableDataset peer on the same store in a fresh process: per epoch its
    seconds, read bytes and peak RSS, the page cache at the epoch's end."""
    import json
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.torch_peers",
            "stream",
            str(path),
            str(epochs),
            ",".join(map(str, sizes)),
            "foreach",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    out = []
    try:
        if cap is not None:
            cap.add(proc.pid)
        assert proc.stdout is not None
        proc.stdout.readline()  # {"ready": true}: imports done
        drop_caches()
        with Sampler({"torch": proc.pid}) as s:
            for line in proc.stdout:
                rec = json.loads(line)
                rec.update(
                    read_mb=(s.read1["torch"] - s.read0["torch"]) / 1e6,
                    page_cache_mb=meminfo_mb(),
                    peak_rss_mb=s.peak["torch"] / 2**20,
                )
                s.read0 = dict(s.read1)
                out.append(rec)
    finally:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"the PyTorch streaming peer failed (exit {proc.returncode})")
    return out


def one_size(
    gb: float,
    tmp: Path,
    memory_limit: str,
    rows: int | None = None,
    hidden=(256, 128),
    epochs: int = 2,
    cap: int | None = None,
    torch_peer: bool | None = None,
) -> list[dict[str, Any]]:
    """The rows of one store size. ``torch_peer``: also stream the store through the PyTorch
    peer (default: when torch is installed; a missing peer drops its row, never fails the run)."""
    import importlib.util

    from pipeline.config import TrainConfig
    from pipeline.synth import synth
    from pipeline.train import train

    if torch_peer is None:
        torch_peer = importlib.util.find_spec("torch") is not None
    rows = rows or int(gb * 1e9 / FEATURES)
    path = tmp / f"ooc-{gb:g}GB.zarr"
    t = time.perf_counter()
    st = synth(path, rows=rows, features=FEATURES, classes=10, dtype="uint8", force=True)
    gen = time.perf_counter() - t
    disk = _dir_bytes(path)
    verdict = binds(rows * FEATURES, cap, ram_bytes())
    per_epoch: list[dict[str, Any]] = []
    mcap = MemoryCap(cap) if cap is not None else contextlib.nullcontext()
    try:
        with mcap as capped, local_cluster(2, memory_limit=memory_limit) as client:
            pids = client.run(os.getpid)
            if capped is not None:
                for pid in pids.values():
                    capped.add(pid)
            import psutil

            base = {w: psutil.Process(p).memory_info().rss for w, p in pids.items()}
            # warm-up on a small store: imports and Numba's cache load stay out of the timed epoch
            warm = synth(tmp / "warm.zarr", rows=20_000, features=FEATURES, classes=10, dtype="uint8", force=True)
            run_pipeline(client, warm, tmp / "warm-run", hidden=list(hidden), epochs=1, patience=0, validation=0.0)
            cache = drop_caches()
            with Sampler(pids) as s:

                def on_epoch(rec: dict) -> None:  # per epoch: bytes read from disk, page cache, peak RSS
                    s._sample()
                    per_epoch.append(
                        {
                            "epoch": rec["epoch"],
                            "seconds": rec["seconds"],
                            "samples": rec["samples"],
                            "read_mb": sum(s.read1[w] - s.read0[w] for w in pids) / 1e6,
                            "page_cache_mb": meminfo_mb(),
                            "peak_rss_mb": max(s.peak.values()) / 2**20,
                        }
                    )
                    s.read0 = dict(s.read1)

                cfg = TrainConfig.from_dict(
                    {"hidden": list(hidden), "epochs": epochs, "patience": 0, "validation": 0.0}
                )
                res = train(str(st.path), cfg, tmp / "run", client=client, force=True, on_epoch=on_epoch)
            samples = sum(h["samples"] for h in res.history)
            if samples != rows * epochs:
                raise AssertionError(f"trained {samples} samples, expected {rows * epochs}")
            restarts = sum(1 for w in pids if w not in client.scheduler_info(n_workers=-1)["workers"])
        tstream: list[dict] = []
        if torch_peer:  # under the same cap as the workers when there is one (its own cgroup)
            with MemoryCap(cap) if cap is not None else contextlib.nullcontext() as c2:
                tstream = _torch_stream(path, epochs, (FEATURES, *hidden, 10), c2)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    common = {"store GB (X)": rows * FEATURES / 1e9, "GB on disk": disk / 1e9, "memory binds?": verdict}

    def epoch_row(trainer: str, e: dict, **extra: Any) -> dict[str, Any]:
        return {
            "trainer": trainer,
            **common,
            "epoch": e["epoch"] + 1,
            "epoch s": e["seconds"],
            "samples/s": e["samples"] / e["seconds"],
            "read from disk MB": e["read_mb"],
            "page cache MB (epoch end)": e["page_cache_mb"],
            "peak RSS MB (max process)": e["peak_rss_mb"],
            **extra,
        }

    out = [
        epoch_row(
            "pipeline",
            e,
            **{
                "worker RSS before MB": max(base.values()) / 2**20,
                "generate s": gen,
                "cache before": cache,
                "workers lost": restarts,
            },
        )
        for e in per_epoch
    ]
    out += [
        epoch_row(
            "pytorch IterableDataset",
            e,
            **{"worker RSS before MB": None, "generate s": None, "cache before": "dropped?", "workers lost": 0},
        )
        for e in tstream
    ]
    if out:
        out[0]["_series"] = s.series
    return out


def run(
    quick: bool = False,
    sizes: Sequence[float] = (1, 4, 16),
    huge: bool = False,
    memory_limit: str = "2GiB",
    epochs: int = 2,
    cap: str | None = None,
) -> tuple[str, list[dict]]:
    import shutil as sh

    from dask.utils import parse_bytes

    load0 = load()
    m = meta()  # the commit and versions as the run starts
    free = sh.disk_usage(OUT.parent.parent).free / 1e9
    rows_out: list[dict] = []
    OUT.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[float, int | None]] = [(s, None) for s in sizes]
    if quick:
        plan = [(0.004, 5_000), (0.016, 20_000)]
    if huge:
        plan.append((2.2 * ram_bytes() / 1e9, None))
    ok, why = cap_support()
    cap_bytes = parse_bytes(cap) if cap else None
    notes = [
        f"memory cap: {'requested ' + cap + ' (' + why + ')' if cap else 'none'}; "
        f"a cap is {'possible' if ok else 'not possible'} here ({why})"
    ]
    if cap and not ok:
        raise SystemExit(f"--memory-cap {cap}: no memory cgroup can be created here ({why}); run without it")
    import importlib.util
    import tempfile

    order = ["pipeline"] + (["pytorch IterableDataset"] if importlib.util.find_spec("torch") is not None else [])
    passes: list[dict[str, Any]] = []
    for gb, rows in plan:
        if gb * 1.1 > free - 5:
            notes.append(f"skipped {gb:g} GB: only {free:.0f} GB free on the disk")
            continue
        # one protocol pass per store: the machine's state around both trainers' epochs on it
        with (
            tempfile.TemporaryDirectory(prefix="bench-ooc-", dir=OUT) as d,
            measure_pass(cores=2, peak_n=256 if quick else 1024) as cond,
        ):
            got = one_size(gb, Path(d), memory_limit, rows, epochs=epochs, cap=cap_bytes)
        rows_out.extend(got)
        passes.append(
            {
                "pass": len(passes) + 1,
                "order": order,
                "store GB (X)": got[0]["store GB (X)"] if got else gb,
                "conditions": cond,
            }
        )
    pipe = [r for r in rows_out if r["trainer"] == "pipeline"]
    if pipe:
        p = [r["peak RSS MB (max process)"] for r in pipe]
        sp = [r["samples/s"] for r in pipe]
        notes.append(
            f"pipeline peak RSS spread across sizes and epochs: {100 * (max(p) / min(p) - 1):.1f}% "
            f"(target <= 10%); throughput spread: {100 * (max(sp) / min(sp) - 1):.1f}%"
        )
    if not any(r["memory binds?"].startswith("yes") for r in rows_out):
        notes.append(
            "memory did not bind on any size of this run: the figures show streaming, not a store "
            "larger than the memory available to the workers"
        )
    m["json"] = str(
        save_json(
            "out_of_core" + ("-quick" if quick else ""),
            {
                "benchmark": "out_of_core",
                "meta": m,
                "quick": quick,
                "epochs": epochs,
                "cap": cap,
                "cap_support": why,
                "notes": notes,
                "passes": passes,
                "rows": [{k: v for k, v in r.items() if k != "_series"} for r in rows_out],
            },
            quick,
        )
    )
    head = (
        f"{epochs} epochs, MLP {FEATURES}-256-128-10 (default config), 2 workers x 1 thread, memory_limit "
        f"{memory_limit} per worker, {free:.0f} GB free disk at start; per epoch: bytes the processes read from "
        f"the block device, the page cache at the epoch's end, peak RSS; load average before {load0:.2f}, "
        f"after {load():.2f}"
    )
    fmt = {
        "store GB (X)": ".3f",
        "GB on disk": ".3f",
        "generate s": ".1f",
        "samples/s": ",.0f",
        "worker RSS before MB": ".0f",
        "peak RSS MB (max process)": ".0f",
        "read from disk MB": ".1f",
        "page cache MB (epoch end)": ".0f",
        "workers lost": "d",
        "epoch": "d",
        "epoch s": ".2f",
    }
    shown = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows_out]
    text = "\n".join(
        [
            head,
            "",
            *provenance_lines(m),
            "",
            *conditions_lines(passes),
            "",
            md_table(shown, fmt),
            "",
            *(f"- {n}" for n in notes),
        ]
    )
    return text, rows_out


def conditions_lines(passes: list[dict[str, Any]]) -> list[str]:
    """The conditions of every store's pass (:mod:`bench.protocol`) and the flagged ones: the
    header of the table, so that a figure is read with the load it was taken under."""
    lines = [
        "Conditions per pass (one pass per store, in the order of the table: the pipeline's epochs, then the "
        "PyTorch peer's):",
        "",
        conditions_table(passes),
    ]
    flagged = [
        f"pass {p['pass']} ({p['store GB (X)']:.3f} GB store: {', '.join(p['conditions']['flags'])})"
        for p in passes
        if p["conditions"]["flags"]
    ]
    if flagged:
        lines += ["", f"Flagged under load: {'; '.join(flagged)}."]
    return lines


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.out_of_core", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1,4,16", help="comma-separated store sizes in GB of X")
    ap.add_argument("--huge", action="store_true", help="also a 26 GB store (larger than this machine's RAM)")
    ap.add_argument("--memory-limit", default="2GiB", help="per-worker memory limit")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per store (at least 2 to see the page cache act)")
    ap.add_argument(
        "--memory-cap",
        default=None,
        metavar="SIZE",
        help="put the workers (and the PyTorch peer) in a memory cgroup capped at SIZE, e.g. 3GiB: "
        "memory binds once the store is more than twice the cap",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.throughput: PyTorch threads do not spin
    sizes = [float(s) for s in args.sizes.split(",") if s]
    text, rows = run(args.quick, sizes, args.huge, args.memory_limit, args.epochs, args.memory_cap)
    print(text)
    stem = "out_of_core" + ("-quick" if args.quick else "")
    write_out(stem, text)
    series = [r for r in rows if "_series" in r]
    if series:
        from dask.utils import parse_bytes

        figs = [
            {
                "store GB (X)": r["store GB (X)"],
                "peak RSS MB (max worker)": r["peak RSS MB (max process)"],
                "samples/s": r["samples/s"],
                "disk read MB/s": r["read from disk MB"] / r["epoch s"],
            }
            for r in series
        ]
        figures.out_of_core(figs, [r["_series"] for r in series], parse_bytes(args.memory_limit) / 2**20, stem)
    return text


if __name__ == "__main__":
    main()
