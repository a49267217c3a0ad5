"""PNG plots of a run, saved beside its history: curves per epoch and per round, throughput.

Drawn when asked (``pipeline train --plots``, or :func:`save_plots` on a run's history), after
the model and the history are saved: importing matplotlib and drawing take about a second, more than the
start-up of a small run. matplotlib is an optional dependency (``pip install .[plot]``, which
``make`` installs); without it :func:`save_plots` does nothing and says so. The data behind
every plot is in ``history.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PLOT_FILES = ("curves.png", "rounds.png", "throughput.png")


def save_plots(run_dir: str | Path, history: dict[str, Any]) -> list[Path]:
    """Write ``curves.png`` (per epoch), ``rounds.png`` (per round) and ``throughput.png``;
    return the files written (empty without matplotlib)."""
    try:
        # figures drawn straight on Agg, without pyplot: no backend or GUI toolkit is looked up
        # (nor a user's pyplot backend changed), and no figure manager keeps the figures
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    run_dir = Path(run_dir)
    written: list[Path] = []
    epochs = history.get("epochs") or []
    if epochs:
        x = [e["epoch"] + 1 for e in epochs]
        fig = Figure(figsize=(10, 3.8))
        ax = fig.subplots(1, 2)
        ax[0].plot(x, [e.get("train_loss") for e in epochs], "o-", label="train loss")
        if "val_loss" in epochs[0]:
            ax[0].plot(x, [e.get("val_loss") for e in epochs], "o-", label="validation loss")
        ax[0].set_xlabel("epoch")
        ax[0].set_ylabel("loss")
        ax[0].legend()
        metric = "val_accuracy" if "val_accuracy" in epochs[0] else "val_r2" if "val_r2" in epochs[0] else None
        if metric:
            ax[1].plot(x, [e.get(metric) for e in epochs], "o-", color="C2")
            ax[1].set_ylabel(metric.replace("val_", "validation "))
        ax[1].set_xlabel("epoch")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "curves.png"))
    rounds = history.get("rounds") or []
    if len(rounds) >= 2:
        r = np.asarray(rounds, dtype=np.float64)  # time, version, loss, samples, deltas
        fig = Figure(figsize=(6, 3.8))
        ax = fig.subplots()
        ax.plot(r[:, 1], r[:, 2], lw=1)
        ax.set_xlabel("server round")
        ax.set_ylabel("training loss (pushed)")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "rounds.png"))
        t = r[:, 0] - r[0, 0]
        window = max(1.0, t[-1] / 50)
        edges = np.arange(0, t[-1] + window, window)
        idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 1)
        rate = np.bincount(idx, weights=r[:, 3], minlength=len(edges)) / window
        fig = Figure(figsize=(6, 3.8))
        ax = fig.subplots()
        ax.step(edges, rate, where="post")
        ax.set_xlabel("seconds since the first push")
        ax.set_ylabel("samples/s")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "throughput.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path
