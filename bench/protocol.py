"""The measurement protocol every comparison table follows.

* **Interleaved passes**: every trainer runs once per pass, ``passes`` (default 5) passes, the
  order rotated by one trainer per pass (pass k starts with trainer k), so a slow stretch of a
  shared machine falls on different trainers in different passes.
* **Per-pass ratios**: a comparison is the ratio of two trainers *within* one pass; the table
  gives its median and range over the passes. A target counts as met only when the per-pass ratio
  meets it in at least 4 of 5 passes (``ceil(0.8 * passes)`` in general).
* **Conditions per pass**: the 1-minute load average before and after, ``/proc/stat`` steal
  before and after (its share of the pass's CPU time), the CPU time other processes used during
  the pass (all busy CPU time in ``/proc/stat`` minus this process tree's own), and both GEMM
  peaks (NumPy's BLAS and ``torch.mm`` when torch is installed) at the start of the pass. A pass
  is **flagged as under load** when steal exceeds 2% of the CPU time, or other processes used more
  than ``BUSY_CORES`` cores on average, or the load average before the pass exceeded the cores the
  benchmark uses.
* **Provenance**: versions (python, numpy, BLAS and its threads via threadpoolctl, torch,
  scikit-learn, dask, distributed, dask-ml, numba, zarr), the OpenBLAS environment overrides, and
  the git commit go in each table's header; every run's raw figures are written as JSON under
  ``bench/results/`` (quick smoke runs under ``bench/out/results/``, not kept), and the table
  names that file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata as _md
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK_RESULTS = HERE / "out" / "results"

STEAL_LIMIT = 0.02  # share of the pass's CPU time stolen by the hypervisor
BUSY_CORES = 0.25  # other processes' average CPU use during the pass, in cores
MET_SHARE = 0.8  # a target is met in at least this share of the passes (4 of 5)

PACKAGES = ("numpy", "torch", "scikit-learn", "dask", "distributed", "dask-ml", "numba", "zarr", "threadpoolctl")


# -------------------------------------------------------------------------------------------
# provenance
# -------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    """Versions of Python and the packages the tables depend on (None = not installed), the BLAS
    libraries threadpoolctl sees with their threads and kernel, and the OpenBLAS overrides."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = None
    with contextlib.suppress(Exception):
        import numpy  # noqa: F401  - loads its BLAS so threadpoolctl sees it
        from threadpoolctl import threadpool_info

        out["blas"] = [
            {k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "threading_layer")}
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ]
    out["env"] = {
        k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
    }
    return out


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance_lines(meta: dict[str, Any]) -> list[str]:
    """Header lines of a table: commit, versions, BLAS, and the JSON the figures come from."""
    v = meta["versions"]
    pk = ", ".join(f"{k} {v[k]}" for k in ("python", *PACKAGES) if k in v and v[k])
    missing = [k for k in PACKAGES if k in v and not v[k]]
    blas = "; ".join(
        f"{b['internal_api']} {b['version']} {b['num_threads']} threads ({b['architecture']})"
        for b in v.get("blas", [])
    )
    env = ", ".join(f"{k}={x}" for k, x in v.get("env", {}).items() if x) or "no OpenBLAS/OMP overrides"
    lines = [
        f"Commit {meta['commit']}; {pk}" + (f"; not installed: {', '.join(missing)}" if missing else "") + ".",
        f"BLAS: {blas or '?'}; {env}.",
    ]
    if meta.get("json"):
        lines.append(f"Raw figures: `{meta['json']}`.")
    return lines


# -------------------------------------------------------------------------------------------
# machine state per pass
# -------------------------------------------------------------------------------------------


def proc_stat() -> dict[str, float]:
    """Aggregate CPU jiffies from /proc/stat: ``total``, ``busy`` (not idle/iowait) and ``steal``."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:  # pragma: no cover - not Linux
        return {"total": 0.0, "busy": 0.0, "steal": 0.0}
    vals = [float(x) for x in first[1:]]
    vals += [0.0] * (8 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return {"total": total, "busy": user + nice + system + irq + softirq, "steal": steal}


def own_cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children and its live descendants."""
    t = os.times()
    s = t.user + t.system + t.children_user + t.children_system
    with contextlib.suppress(Exception):
        import psutil

        for c in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = c.cpu_times()
                s += ct.user + ct.system
    return s


def gemm_peak_numpy(n: int = 1024, repeat: int = 3) -> float:
    """Best fp32 GFLOP/s of an n x n x n NumPy matmul (its BLAS, its default threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def gemm_peak_torch(n: int = 1024, repeat: int = 3, threads: int = 2) -> float | None:
    """Best fp32 GFLOP/s of ``torch.mm`` with ``threads`` threads; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)


def under_load(cond: dict[str, Any], cores: int) -> list[str]:
    """The reasons a pass counts as taken under load (empty: a clean pass)."""
    why = []
    if cond["steal_share"] > STEAL_LIMIT:
        why.append(f"steal {100 * cond['steal_share']:.1f}%")
    if cond["other_cores"] > BUSY_CORES:
        why.append(f"other processes {cond['other_cores']:.2f} cores")
    if cond["load_before"] > cores:
        why.append(f"load {cond['load_before']:.2f} > {cores} cores")
    return why


# what measure_pass records of each pass
CONDITION_KEYS = frozenset(
    {
        "load_before",
        "load_after",
        "steal_before",
        "steal_after",
        "steal_share",
        "other_cores",
        "gemm_numpy_gflops",
        "gemm_torch_gflops",
        "wall",
        "flags",
    }
)


@contextlib.contextmanager
def measure_pass(cores: int = 2, peak_n: int = 1024) -> Iterator[dict[str, Any]]:
    """Record the machine's state around one pass into the yielded dict (filled on exit)."""
    cond: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    cond["gemm_numpy_gflops"] = gemm_peak_numpy(peak_n)
    cond["gemm_torch_gflops"] = gemm_peak_torch(peak_n, threads=cores)
    s0, own0, t0 = proc_stat(), own_cpu_seconds(), time.perf_counter()
    try:
        yield cond
    finally:
        s1, own1, wall = proc_stat(), own_cpu_seconds(), time.perf_counter() - t0
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        dtot = max(s1["total"] - s0["total"], 1.0)
        busy_s = (s1["busy"] - s0["busy"]) / hz
        cond.update(
            load_after=os.getloadavg()[0],
            steal_before=s0["steal"],
            steal_after=s1["steal"],
            steal_share=(s1["steal"] - s0["steal"]) / dtot,
            wall=wall,
            other_cores=max(busy_s - (own1 - own0), 0.0) / max(wall, 1e-9),
        )
        cond["flags"] = under_load(cond, cores)


# -------------------------------------------------------------------------------------------
# passes, ratios, targets
# -------------------------------------------------------------------------------------------


def rotated(names: Sequence[str], k: int) -> list[str]:
    """The run order of pass ``k``: ``names`` rotated left by ``k``."""
    names = list(names)
    if not names:
        return names
    k %= len(names)
    return names[k:] + names[:k]


def run_passes(
    trainers: dict[str, Callable[[], dict[str, Any]]],
    passes: int = 5,
    cores: int = 2,
    peak_n: int = 1024,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every trainer once per pass, the order rotated per pass; each trainer returns a dict of
    its figures (e.g. ``samples/s``). Returns one record per pass: ``order``, ``conditions``
    and ``results`` (trainer -> figures)."""
    out = []
    for k in range(passes):
        order = rotated(list(trainers), k)
        results: dict[str, dict[str, Any]] = {}
        with measure_pass(cores, peak_n) as cond:
            for name in order:
                if log:
                    log(f"pass {k + 1}/{passes}: {name}")
                results[name] = trainers[name]()
        out.append({"pass": k + 1, "order": order, "conditions": cond, "results": results})
    return out


def needed(passes: int) -> int:
    """Passes a target must be met in: 4 of 5 (``ceil(0.8 * passes)``)."""
    return max(1, math.ceil(MET_SHARE * passes - 1e-9))


def ratio_summary(num: Sequence[float | None], den: Sequence[float | None], target: float | None = None) -> dict:
    """Per-pass ratios ``num[i] / den[i]`` with their median and range and, given a ``target``,
    in how many passes the ratio meets it and whether that is enough (``needed``). A pass where
    either figure is missing counts as not meeting the target."""
    ratios = [(a / b) if (a is not None and b not in (None, 0)) else None for a, b in zip(num, den, strict=True)]
    good = [r for r in ratios if r is not None]
    out: dict[str, Any] = {
        "per_pass": ratios,
        "median": float(np.median(good)) if good else None,
        "min": min(good) if good else None,
        "max": max(good) if good else None,
    }
    if target is not None:
        hits = sum(1 for r in ratios if r is not None and r >= target)
        out.update(
            target=target, hits=hits, passes=len(ratios), needed=needed(len(ratios)), met=hits >= needed(len(ratios))
        )
    return out


def fmt_ratio(s: dict) -> str:
    """``1.23x (1.10-1.31; 1.20 / 1.31 / ...)``; flagged passes are not marked here."""
    if s["median"] is None:
        return "n/a"
    per = " / ".join("n/a" if r is None else f"{r:.2f}" for r in s["per_pass"])
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}; per pass {per})"


def conditions_tail(passes: list[dict[str, Any]], layout: str, what: str, path: Any) -> list[str]:
    """The end of a table run on several clusters one after the other: the conditions of every
    pass (``what`` says their order), the flagged ones named by their ``layout`` key (each pass
    record carries it, e.g. ``workers``), and the raw figures' file."""
    flagged = [f"{p[layout]} {layout} pass {p['pass']}" for p in passes if p["conditions"]["flags"]]
    lines = ["", f"Conditions per pass ({what}):", "", conditions_table(passes)]
    if flagged:
        lines += ["", f"Flagged under load: {', '.join(flagged)}."]
    return [*lines, "", f"Raw figures: `{path}`."]


def table_head(title: str, meta: dict[str, Any]) -> list[str]:
    """The start of a table: ``## title (date)``, then its provenance (:func:`provenance_lines`)."""
    return [f"## {title} ({meta['date']})", "", *provenance_lines(meta), ""]


def table_tail(
    passes: list[dict[str, Any]],
    path: Any,
    heading: str = "Conditions per pass",
    name: Callable[[dict[str, Any]], str] | None = None,
) -> list[str]:
    """The end of a table: the conditions of every pass under ``heading``, the flagged passes
    (each named by ``name(pass)``, default "pass N") with the reasons, and the raw figures' file."""
    label = name or (lambda p: f"pass {p['pass']}")
    flagged = [f"{label(p)} ({', '.join(p['conditions']['flags'])})" for p in passes if p["conditions"]["flags"]]
    lines = ["", f"{heading}:", "", conditions_table(passes)]
    if flagged:
        lines += ["", f"Flagged under load: {'; '.join(flagged)}."]
    return [*lines, "", f"Raw figures: `{path}`."]


def conditions_table(passes: list[dict[str, Any]]) -> str:
    """One markdown row per pass: order, load, steal, other processes, GEMM peaks, flag."""
    lines = [
        "| pass | first trainer | load before / after | steal | other processes (cores) "
        "| GEMM numpy / torch GFLOP/s | under load? |",
        "| ---: | --- | --- | ---: | ---: | --- | --- |",
    ]
    for p in passes:
        c = p["conditions"]
        tg = c.get("gemm_torch_gflops")
        lines.append(
            f"| {p['pass']} | {p['order'][0] if p['order'] else ''} | {c['load_before']:.2f} / {c['load_after']:.2f} "
            f"| {100 * c['steal_share']:.1f}% | {c['other_cores']:.2f} | {c['gemm_numpy_gflops']:.0f} / "
            f"{'n/a' if tg is None else f'{tg:.0f}'} | {'FLAGGED: ' + ', '.join(c['flags']) if c['flags'] else 'no'} |"
        )
    return "\n".join(lines)


def meta() -> dict[str, Any]:
    """Provenance recorded with every run."""
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "versions": versions(),
        "host": {"cores": os.cpu_count(), "machine": platform.machine(), "cpu": cpu_model()},
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string: runs on
    different CPUs compare only through their side-by-side ratios."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def save_json(name: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """Write a run's raw figures to ``bench/results/<name>-<UTC time>.json`` (quick runs to
    ``bench/out/results/``); returns the path relative to the repository when possible."""
    dest_dir = QUICK_RESULTS if quick else RESULTS
    dest_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = dest_dir / f"{name}-{stamp}.json"
    dest.write_text(json.dumps(payload, indent=1, default=_default) + "\n")
    with contextlib.suppress(ValueError):
        return dest.relative_to(HERE.parent)
    return dest
