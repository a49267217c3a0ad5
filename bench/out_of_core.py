"""Out-of-core: one epoch over synthetic stores of growing size with a small per-worker memory
limit; peak RSS per worker (should stay flat), throughput (flat) and disk read MB/s.

    python -m bench.out_of_core                 # 1, 4 and 16 GB stores (X bytes, uint8)
    python -m bench.out_of_core --sizes 1,4     # choose sizes (GB)
    python -m bench.out_of_core --huge          # adds one store larger than memory (26 GB)
    python -m bench.out_of_core --quick         # tiny smoke run

Each store (784 uint8 features, 10 classes, ``pipeline.synth`` default chunking and codec) is
generated under bench/out/, trained on for one epoch (default config: MLP 784-256-128-10, sync,
local_steps 8; ``validation=0`` so the epoch is training only) on a 2-worker LocalCluster (1
thread each, ``memory_limit`` 2 GiB per worker), then deleted before the next size.
During training the driver samples every worker process's RSS (psutil, every 0.2 s) and their
``read_bytes`` I/O counters (bytes that really came from the block device, page-cache hits
excluded). Before each epoch it tries ``sync; echo 3 > /proc/sys/vm/drop_caches`` and says
whether the kernel accepted it (a one-epoch warm-up on a 20,000-row store precedes it, so
imports and Numba's cache load stay out of the timed epoch; "RSS before" is before the warm-up);
"disk MB/s" is what the counters saw, "store MB/s" is the
compressed store bytes over the epoch time (what was read, from disk or cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import figures
from bench.common import OUT, load, local_cluster, md_table, run_pipeline, write_out

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


def one_size(gb: float, tmp: Path, memory_limit: str, rows: int | None = None, hidden=(256, 128)) -> dict[str, Any]:
    from pipeline.synth import synth

    rows = rows or int(gb * 1e9 / FEATURES)
    path = tmp / f"ooc-{gb:g}GB.zarr"
    t = time.perf_counter()
    st = synth(path, rows=rows, features=FEATURES, classes=10, dtype="uint8", force=True)
    gen = time.perf_counter() - t
    disk = _dir_bytes(path)
    try:
        with local_cluster(2, memory_limit=memory_limit) as client:
            pids = client.run(os.getpid)
            import psutil

            base = {w: psutil.Process(p).memory_info().rss for w, p in pids.items()}
            # warm-up on a small store: imports and Numba's cache load stay out of the timed epoch
            warm = synth(tmp / "warm.zarr", rows=20_000, features=FEATURES, classes=10, dtype="uint8", force=True)
            run_pipeline(client, warm, tmp / "warm-run", hidden=list(hidden), epochs=1, patience=0, validation=0.0)
            cache = drop_caches()
            with Sampler(pids) as s:
                r = run_pipeline(client, st, tmp / "run", hidden=list(hidden), epochs=1, patience=0, validation=0.0)
            secs = r["epoch_seconds"]
            if r["samples"] != rows:
                raise AssertionError(f"trained {r['samples']} samples, expected {rows}")
            restarts = sum(1 for w in pids if w not in client.scheduler_info(n_workers=-1)["workers"])
    finally:
        shutil.rmtree(path, ignore_errors=True)
    read = sum(s.read1[w] - s.read0[w] for w in pids)
    peaks = sorted(s.peak.values())
    return {"store GB (X)": rows * FEATURES / 1e9, "GB on disk": disk / 1e9, "rows": rows, "generate s": gen,
            "page cache": cache, "epoch s": secs, "samples/s": rows / secs,
            "worker RSS before MB": max(base.values()) / 2**20, "peak RSS MB (max worker)": peaks[-1] / 2**20,
            "peak RSS MB (min worker)": peaks[0] / 2**20, "disk read MB/s": read / 1e6 / secs,
            "store MB/s": disk / 1e6 / secs, "workers lost": restarts, "_series": s.series}  # fmt: skip


def run(quick: bool = False, sizes: Sequence[float] = (1, 4, 16), huge: bool = False,
        memory_limit: str = "2GiB") -> tuple[str, list[dict]]:  # fmt: skip
    import shutil as sh

    load0 = load()
    free = sh.disk_usage(OUT.parent.parent).free / 1e9
    rows_out = []
    OUT.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[float, int | None]] = [(s, None) for s in sizes]
    if quick:
        plan = [(0.004, 5_000), (0.016, 20_000)]
    if huge:
        plan.append((26.0, None))
    notes = []
    import tempfile

    for gb, rows in plan:
        if gb * 1.1 > free - 5:
            notes.append(f"skipped {gb:g} GB: only {free:.0f} GB free on the disk")
            continue
        with tempfile.TemporaryDirectory(prefix="bench-ooc-", dir=OUT) as d:
            rows_out.append(one_size(gb, Path(d), memory_limit, rows))
    if rows_out:
        p = [r["peak RSS MB (max worker)"] for r in rows_out]
        sp = [r["samples/s"] for r in rows_out]
        notes.append(f"peak RSS spread across sizes: {100 * (max(p) / min(p) - 1):.1f}% (target <= 10%); "
                     f"throughput spread: {100 * (max(sp) / min(sp) - 1):.1f}%")  # fmt: skip
    head = (f"one epoch, MLP {FEATURES}-256-128-10 (default config), 2 workers x 1 thread, memory_limit "
            f"{memory_limit} per worker, {free:.0f} GB free disk at start; load average before {load0:.2f}, "
            f"after {load():.2f}")  # fmt: skip
    fmt = {"store GB (X)": ".3f", "GB on disk": ".3f", "rows": ",d", "generate s": ".1f", "epoch s": ".1f",
           "samples/s": ",.0f", "worker RSS before MB": ".0f", "peak RSS MB (max worker)": ".0f",
           "peak RSS MB (min worker)": ".0f", "disk read MB/s": ".1f", "store MB/s": ".1f", "workers lost": "d"}  # fmt: skip
    shown = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows_out]
    text = head + "\n\n" + md_table(shown, fmt) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text, rows_out


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.out_of_core", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1,4,16", help="comma-separated store sizes in GB of X")
    ap.add_argument("--huge", action="store_true", help="also a 26 GB store (larger than this machine's RAM)")
    ap.add_argument("--memory-limit", default="2GiB", help="per-worker memory limit")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    text, rows = run(args.quick, sizes, args.huge, args.memory_limit)
    print(text)
    stem = "out_of_core" + ("-quick" if args.quick else "")
    write_out(stem, text)
    if rows:
        from dask.utils import parse_bytes

        figures.out_of_core(rows, [r["_series"] for r in rows], parse_bytes(args.memory_limit) / 2**20, stem)
    return text


if __name__ == "__main__":
    main()
