"""Helpers shared by the end-to-end benchmarks: machine facts, stores, in-memory peers, tables.

Every benchmark module measures its rows side by side in one run and prints a markdown table
whose header names the machine load, like :mod:`bench.kernels`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]  # the checkout


def child_env(root: Path = ROOT) -> dict[str, str]:
    """The environment of a benchmark's child Python process: ``root``'s packages first on the
    path (this checkout, or an earlier commit's files to compare with), warnings off."""
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}


# -------------------------------------------------------------------------------------------
# machine and tables
# -------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU model, cores, memory, date, load: what RESULTS.md records beside the figures."""
    model = platform.processor() or "?"
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:  # pragma: no cover
        mem = "?"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": f"{os.getloadavg()[0]:.2f}",
    }


def load() -> float:
    return os.getloadavg()[0]


def md_table(rows: list[dict], fmt: dict[str, str] | None = None) -> str:
    """Markdown table of ``rows`` (dicts sharing their keys); ``fmt`` maps a key to a format spec."""
    if not rows:
        return "(no rows)"
    fmt = fmt or {}
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        cells = []
        for k in head:
            v = r.get(k, "")
            if v is None:
                cells.append("n/a")
            elif isinstance(v, str):
                cells.append(v)
            else:
                cells.append(format(v, fmt.get(k, "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_out(name: str, text: str) -> None:
    """Also keep the table under bench/out/ (git-ignored)."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(text + "\n")


@contextlib.contextmanager
def tmpdir(prefix: str) -> Iterator[Path]:
    """A scratch directory under bench/out/ (same disk as the project, not tmpfs)."""
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=OUT) as d:
        yield Path(d)


# -------------------------------------------------------------------------------------------
# stores
# -------------------------------------------------------------------------------------------


def split_store(src: Any, train_dest: Path, test_dest: Path, n_test: int) -> tuple[Any, Any]:
    """Copy a store into a train store (first rows) and a test store (last ``n_test`` rows) with
    the same attributes (so the same normalization). Stores are tiny here (<= a few 100 MB)."""
    from pipeline.store import create_store, open_store

    st = open_store(src) if not hasattr(src, "X") else src
    out = []
    for dest, (a, b) in ((train_dest, (0, st.n_rows - n_test)), (test_dest, (st.n_rows - n_test, st.n_rows))):
        attrs = {k: v for k, v in st.attrs.items() if k not in ("n_rows", "format_version")}
        with create_store(
            dest,
            st.n_features,
            y_shape_tail=tuple(st.y.shape[1:]),
            x_dtype=st.X.dtype,
            y_dtype=st.y.dtype,
            chunk_rows=st.chunk_rows,
            force=True,
            attrs=attrs,
        ) as w:
            step = st.chunk_rows
            for i in range(a, b, step):
                X, y = st.read_rows(i, min(i + step, b))
                w.append(X, y)
        out.append(w.commit_result)
    return out[0], out[1]


def arrays(store: Any, normalize: bool = True, like: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole store in memory as float32 X (standardized like the loader does, with the
    statistics of ``like`` if given) and y."""
    X, y = store.read_rows(0, store.n_rows)
    Xf = X.astype(np.float32)
    stats = like if like is not None else store
    if normalize:
        Xf -= stats.mean.astype(np.float32)
        Xf *= (1.0 / stats.std).astype(np.float32)
    if store.task == "classification":
        return Xf, np.asarray(y, dtype=np.int64)
    return Xf, np.asarray(y, dtype=np.float64).reshape(len(y), -1)


def mnist_like(tmp: Path, rows: int, test_rows: int, features: int = 784, classes: int = 10) -> tuple[Any, Any]:
    """A synthetic MNIST-shaped uint8 store split into train and test stores."""
    from pipeline.synth import synth

    full = synth(
        tmp / "full.zarr", rows=rows + test_rows, features=features, classes=classes, dtype="uint8", force=True
    )
    return split_store(full, tmp / "train.zarr", tmp / "test.zarr", test_rows)


def metric(pred: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy (classification: ``pred`` are scores or labels) or R^2 (regression)."""
    if task == "classification":
        lab = pred.argmax(axis=1) if pred.ndim == 2 else pred
        return float(np.mean(lab == y))
    y = y.reshape(len(y), -1)
    pred = pred.reshape(len(y), -1)
    sst = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1 - ((y - pred) ** 2).sum(axis=0) / np.where(sst > 0, sst, 1.0)))


# -------------------------------------------------------------------------------------------
# peers: one epoch function + a predictor each, on in-memory arrays
# -------------------------------------------------------------------------------------------


class Peer:
    """``epoch()`` trains one pass; ``predict(X)`` returns scores (classification) or values."""

    name = "?"

    def epoch(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class KernelPeer(Peer):
    """This project's kernels in one process (MLPTrainer, cpu backend, BLAS threads as given)."""

    def __init__(
        self,
        X,
        y,
        hidden,
        n_out,
        batch=256,
        lr=1e-3,
        seed=0,
        task="classification",
        threads=2,
        y_mean=0.0,
        y_std=1.0,
        shuffle=True,
    ):
        from kernels.mlp import MLPSpec, MLPTrainer

        self.name = "kernels in memory"
        loss = "softmax_ce" if task == "classification" else "mse"
        self.spec = MLPSpec(X.shape[1], tuple(hidden), n_out, loss=loss)
        self.tr = MLPTrainer(self.spec, backend="cpu", lr=lr, max_batch=batch, seed=seed)
        self.X, self.batch, self.threads, self.task = X, batch, threads, task
        self.y = y.astype(np.int32) if task == "classification" else ((y - y_mean) / y_std).astype(np.float32)
        self.y_mean, self.y_std, self.shuffle = y_mean, y_std, shuffle
        self.rng = np.random.default_rng(seed)

    def epoch(self) -> None:
        from threadpoolctl import threadpool_limits

        X, y, b = self.X, self.y, self.batch
        if self.shuffle:
            order = self.rng.permutation(len(X))
            X, y = X[order], y[order]
        with threadpool_limits(self.threads):
            for i in range(0, len(X), b):
                self.tr.step(X[i : i + b], y[i : i + b])

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self.tr.forward(X)
        return out if self.task == "classification" else out * self.y_std + self.y_mean


class TorchPeer(Peer):
    """PyTorch CPU (2 threads), the typical loop: DataLoader(TensorDataset, shuffle=True)."""

    def __init__(
        self,
        X,
        y,
        hidden,
        n_out,
        batch=256,
        lr=1e-3,
        seed=0,
        task="classification",
        threads=2,
        y_mean=0.0,
        y_std=1.0,
        loader=True,
    ):
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        sizes = [X.shape[1], *hidden, n_out]
        layers: list = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        self.torch, self.task = torch, task
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.loss = torch.nn.CrossEntropyLoss() if task == "classification" else torch.nn.MSELoss()
        tx = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        if task == "classification":
            ty = torch.from_numpy(y.astype(np.int64))
        else:
            ty = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))
        self.y_mean, self.y_std = y_mean, y_std
        self.name = "pytorch cpu (DataLoader)" if loader else "pytorch cpu (tensor slices)"
        if loader:
            ds = torch.utils.data.TensorDataset(tx, ty)
            g = torch.Generator().manual_seed(seed)
            self.loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g)
        else:
            self.loader = [(tx[i : i + batch], ty[i : i + batch]) for i in range(0, len(tx), batch)]

    def epoch(self) -> None:
        self.model.train()
        for xb, yb in self.loader:
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(xb), yb).backward()
            self.opt.step()

    def predict(self, X: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()
        return out if self.task == "classification" else out * self.y_std + self.y_mean


class SklearnPeer(Peer):
    """scikit-learn MLPClassifier/MLPRegressor: ``partial_fit`` epochs (``defaults=False``) or its
    default settings one ``fit`` epoch at a time (``warm_start``, ``max_iter=1``, shuffled)."""

    def __init__(
        self,
        X,
        y,
        hidden=(100,),
        n_out=0,
        batch=256,
        lr=1e-3,
        seed=0,
        task="classification",
        defaults=False,
        y_mean=0.0,
        y_std=1.0,
    ):
        from sklearn.neural_network import MLPClassifier, MLPRegressor

        self.task, self.X, self.defaults = task, X, defaults
        self.y_mean, self.y_std = y_mean, y_std  # regression: fit standardized y, predict in y's units
        self.y = y if task == "classification" else ((y.ravel() - y_mean) / y_std)
        cls = MLPClassifier if task == "classification" else MLPRegressor
        if defaults:  # scikit-learn's defaults, driven one shuffled epoch per partial_fit
            self.est = cls(random_state=seed)
        else:
            self.est = cls(
                hidden_layer_sizes=tuple(hidden),
                solver="adam",
                batch_size=batch,
                learning_rate_init=lr,
                alpha=0.0,
                shuffle=True,
                random_state=seed,
            )
        self.name = "scikit-learn MLP"
        self.classes = np.unique(self.y) if task == "classification" else None
        self.losses: list[float] = []

    def epoch(self) -> None:
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.task == "classification":
                self.est.partial_fit(self.X, self.y, classes=self.classes)
            else:
                self.est.partial_fit(self.X, self.y)
        self.losses.append(float(self.est.loss_))

    def converged(self, tol: float = 1e-4, n_iter_no_change: int = 10) -> bool:
        """scikit-learn's own stopping rule on the training loss (its default ``early_stopping=False``)."""
        best, count = np.inf, 0
        for loss in self.losses:
            if loss > best - tol:
                count += 1
            else:
                count = 0
            best = min(best, loss)
        return count > n_iter_no_change

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return self.est.predict_proba(X)
        return self.est.predict(X).reshape(len(X), -1) * self.y_std + self.y_mean


def timed_epochs(peer: Peer, epochs: int) -> float:
    t = time.perf_counter()
    for _ in range(epochs):
        peer.epoch()
    return time.perf_counter() - t


# -------------------------------------------------------------------------------------------
# the pipeline end to end
# -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(workers: int = 2, memory_limit: str | float | None = "auto") -> Iterator[Any]:
    """The 2-worker, 1-thread LocalCluster of :func:`pipeline.connect.cluster_client` (no dashboard)."""
    import logging

    from pipeline.connect import cluster_client

    for name in ("distributed", "distributed.worker.memory", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with cluster_client(
        workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=None
    ) as client:
        yield client


def pipeline_settings(test: Any, hidden: Sequence[int], epochs: int, batch: int, **extra: Any) -> dict[str, Any]:
    """The pipeline's settings for a timed or accuracy row: the model, ``epochs`` without early
    stopping, validated on the ``test`` store after every epoch (plus ``extra``)."""
    return {
        "hidden": list(hidden),
        "epochs": epochs,
        "patience": 0,
        "validation_store": str(test.path),
        "batch_size": batch,
        **extra,
    }


def run_pipeline(client: Any, store: Any, out: Path, **cfg: Any) -> dict[str, Any]:
    """``pipeline.train.train`` with ``cfg`` overrides; returns wall time, epochs and metrics."""
    from pipeline.config import TrainConfig
    from pipeline.train import train

    config = TrainConfig.from_dict(cfg)
    t = time.perf_counter()
    res = train(str(store.path), config, out, client=client, force=True)
    wall = time.perf_counter() - t
    hist = res.history
    samples = sum(h["samples"] for h in hist)
    seconds = sum(h["seconds"] for h in hist)
    return {
        "wall": wall,
        "samples": samples,
        "epoch_seconds": seconds,
        "history": hist,
        "stopped_early": res.stopped_early,
        "model": res.model,
    }


def val_metric(record: dict, task: str) -> float:
    return float(record.get("val_accuracy" if task == "classification" else "val_r2", float("nan")))


def time_it(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r
