"""PNG figures drawn from the benchmarks' own results, for the tables people would rather see.

A benchmark's ``main`` draws its figure beside its table: ``bench/out/<stem>.png`` next to
``bench/out/<stem>.md`` (git-ignored, the last run's). ``python -m bench`` (and ``--collect``)
publishes the figure of every table it puts in ``RESULTS.md`` to ``bench/figures/<name>.png``,
kept in git with it, and links it under the table. matplotlib comes with the ``bench`` and
``plot`` extras; without it no figure is drawn (the functions return None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import OUT

FIGURES = Path(__file__).resolve().parent / "figures"
TITLES = {
    "time_to_accuracy": "time to accuracy: test metric vs training seconds, threshold dashed",
    "throughput": "end-to-end throughput, samples/s",
    "out_of_core": "out of core: largest worker RSS over each one-epoch run, and samples/s, per store size",
    "ps_limits": "parameter server: MB/s in and pushes/s vs parameters",
    "privacy": "accuracy after R rounds against the epsilon spent (central DP), with no privacy and secure aggregation",
}
# one colour per trainer, the same in every figure
COLOURS = {
    "pipeline": "C0",
    "pipeline (warm cluster)": "C9",
    "pytorch": "C1",
    "scikit-learn": "C2",
    "kernels in memory": "C7",
    "dask-ml": "C3",
}


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, stem: str) -> Path:
    path = OUT / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def time_to_accuracy(results: Sequence[dict], stem: str) -> Path | None:
    """Test metric against cumulative training seconds (log scale), one panel per dataset, the
    threshold dashed: the first curve to cross the line is the first trainer there."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results, strict=False):
        thr = r["thr"]
        lo = thr
        for label, curve in r["curves"].items():
            if not curve:
                continue
            t, m = zip(*curve, strict=True)
            ax.plot(t, m, ".-", lw=1.2, ms=3, label=label, color=COLOURS.get(label))
            lo = min(lo, *m)
        ax.axhline(thr, ls="--", color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(max(lo, thr - 4 * (1.0 - thr) - 0.02), min(1.0, thr + 0.6 * (1.0 - thr) + 0.01))
        ax.set_title(f"{r['name']} (threshold {thr:.3f})", fontsize=9)
        ax.set_xlabel("training seconds (log)", fontsize=8)
        ax.set_ylabel("accuracy" if r["task"] == "classification" else "R^2", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, stem)


def throughput(
    rows: Sequence[dict], limit: float, torch_sps: float | None, stem: str, passes: dict[str, list[float]] | None = None
) -> Path | None:
    """samples/s per trainer as bars (the median; whiskers span the passes), with the
    GEMM-implied limit and 1.3x PyTorch marked."""
    import textwrap

    plt = _pyplot()
    if plt is None:
        return None
    names = [r["trainer"] for r in rows]
    sps = [r["samples/s"] for r in rows]
    err = None
    if passes and all(len(passes.get(n, ())) > 1 for n in names):
        err = [
            [v - min(passes[n]) for n, v in zip(names, sps, strict=True)],
            [max(passes[n]) - v for n, v in zip(names, sps, strict=True)],
        ]
    colours = [next((c for k, c in COLOURS.items() if name.startswith(k.split(" (")[0])), "C4") for name in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    ax.barh(range(len(rows)), sps, color=colours, xerr=err, error_kw={"lw": 0.8, "capsize": 2})
    ax.set_yticks(range(len(rows)), [textwrap.fill(n, 32) for n in names], fontsize=8)
    ax.invert_yaxis()
    if limit <= 3 * max(sps):  # (tiny quick-mode models have a limit far off the chart)
        ax.axvline(limit, ls="--", color="k", lw=0.8, label=f"GEMM-peak limit {limit:,.0f}")
    if torch_sps:
        ax.axvline(1.3 * torch_sps, ls=":", color="C1", lw=1.2, label="target: 1.3x PyTorch (DataLoader)")
    ax.set_xlabel("samples/s", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, stem)


def out_of_core(
    rows: Sequence[dict], series: Sequence[list[tuple[float, float]]], limit_mb: float, stem: str
) -> Path | None:
    """Largest worker RSS over each run of one epoch (one line per store size, time scaled to the
    run's length, the memory limit dashed) and samples/s per store size."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    labels = [f"{r['store GB (X)']:.3g} GB" for r in rows]
    for lab, s in zip(labels, series, strict=True):
        if s:
            t, mb = zip(*s, strict=True)
            a.plot([x / max(t[-1], 1e-9) for x in t], mb, lw=1, label=lab)
    a.axhline(limit_mb, ls="--", color="k", lw=0.8, label=f"memory limit {limit_mb:,.0f} MB")
    a.set_ylim(0, limit_mb * 1.1)
    a.set_xlabel("fraction of the run (the job's start to its end)", fontsize=8)
    a.set_ylabel("RSS of the largest worker, MB", fontsize=8)
    a.legend(fontsize=7)
    b.bar(labels, [r["samples/s"] for r in rows], color="C0")
    for i, r in enumerate(rows):
        b.annotate(
            f"{r['disk read MB/s']:.0f} MB/s\nfrom disk", (i, r["samples/s"]), ha="center", va="bottom", fontsize=7
        )
    b.set_ylabel("samples/s", fontsize=8)
    b.set_ylim(0, max(r["samples/s"] for r in rows) * 1.25 if rows else 1)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(plt, fig, stem)


def ps_limits(rows: Sequence[dict], stem: str) -> Path | None:
    """MB/s in and pushes/s the parameter server absorbs against the parameter count, one line
    per number of pushing worker processes."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for nw in sorted({r["workers"] for r in rows}):
        rs = sorted((r for r in rows if r["workers"] == nw), key=lambda r: r["params"])
        x = [r["params"] for r in rs]
        a.plot(x, [r["MB/s in"] for r in rs], "o-", ms=3, label=f"{nw} worker process{'es' if nw > 1 else ''}")
        b.plot(x, [r["pushes/s"] for r in rs], "o-", ms=3)
    for ax, lab in ((a, "MB/s of deltas in (as much goes back out)"), (b, "pushes/s (log)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log)", fontsize=8)
        ax.set_ylabel(lab, fontsize=8)
        ax.tick_params(labelsize=7)
    b.set_yscale("log")
    a.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, stem)
