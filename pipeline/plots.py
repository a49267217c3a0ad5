"""PNG plots of a run, saved beside its history: curves per epoch and per round, throughput.

Drawn when asked (``pipeline train --plots``, or :func:`save_plots` on a run's history), after
the model and the history are saved: importing matplotlib and drawing take about a second, more than the
start-up of a small run. matplotlib is an optional dependency (``pip install .[plot]``, which
``make`` installs); without it :func:`save_plots` does nothing and says so. The data behind
every plot is in ``history.json``.

Each PNG carries the job of the run it was drawn for in a ``tEXt`` chunk (:data:`PLOT_KEY`):
that is how a plot of the run is told apart from a user's image of the same name, which is
never written over (:func:`plot_job`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import new_file_mode, remove_stale_temporaries, writer_tag

logger = logging.getLogger(__name__)

PLOT_FILES = ("curves.png", "rounds.png", "throughput.png")
PLOT_KEY = "pipeline-run"  # the PNG text chunk naming the job a plot was drawn for
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_LIMIT = 1 << 20  # a text chunk longer than this is not one a plot of a run carries


def plot_job(path: str | os.PathLike) -> str | None:
    """The job a plot of a run was drawn for (its :data:`PLOT_KEY` text chunk, read before the
    image data); None when ``path`` is no such plot: not a PNG, a PNG without that chunk (a
    user's image, matplotlib's included), a symbolic link."""
    key = PLOT_KEY.encode() + b"\x00"
    try:
        if os.path.islink(path):
            return None
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return None
            while True:  # the chunks before the image data
                head = fh.read(8)
                if len(head) < 8:
                    return None
                size, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or size > _CHUNK_LIMIT:
                    return None
                body = fh.read(size + 4)[:size]  # the data and its CRC
                if kind == b"tEXt" and body.startswith(key):
                    return body[len(key) :].decode("latin-1") or None
    except OSError:
        return None


def save_plots(run_dir: str | Path, history: dict[str, Any]) -> list[Path]:
    """Write ``curves.png`` (per epoch), ``rounds.png`` (per round) and ``throughput.png``;
    return the files written (empty without matplotlib). A file at one of those names that is
    not a plot of this run (``history["job"]``) is left as it is, with a warning."""
    try:
        # figures drawn straight on Agg, without pyplot: no backend or GUI toolkit is looked up
        # (nor a user's pyplot backend changed), and no figure manager keeps the figures
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    run_dir = Path(run_dir)
    job = str(history.get("job") or "")
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
        written += _save(fig, run_dir / "curves.png", job)
    rounds = history.get("rounds") or []
    if len(rounds) >= 2:
        r = np.asarray(rounds, dtype=np.float64)  # time, version, loss, samples, deltas
        fig = Figure(figsize=(6, 3.8))
        ax = fig.subplots()
        ax.plot(r[:, 1], r[:, 2], lw=1)
        ax.set_xlabel("server round")
        ax.set_ylabel("training loss (pushed)")
        fig.tight_layout()
        written += _save(fig, run_dir / "rounds.png", job)
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
        written += _save(fig, run_dir / "throughput.png", job)
    return written


def _save(fig: Any, path: Path, job: str) -> list[Path]:
    """Save ``fig`` as ``path`` (marked as a plot of ``job``) through a temporary file renamed
    into place, so an interrupted save leaves no partial PNG; ``[path]``, or ``[]`` when a file
    there is not a plot of ``job`` (kept)."""
    if os.path.lexists(path) and (not job or plot_job(path) != job):
        logger.warning(
            "%s is not a plot this program drew for the run: it is kept, and that plot is not drawn "
            "(move the file out of %s to have it drawn)",
            path,
            path.parent,
        )
        return []
    remove_stale_temporaries(path)  # a drawing killed mid-save (SIGKILL) left its temporary
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=90, metadata={PLOT_KEY: job} if job else None)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return [path]
