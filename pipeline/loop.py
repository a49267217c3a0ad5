"""The one way a model is trained in a process: the trainer factory and the minibatch loop.

Three callers share them: the training task on a Dask worker (pipeline.worker), training a
small store in the driver's process (pipeline.local) and the scikit-learn estimators' in-memory
``fit`` and ``partial_fit`` (pipeline.estimator). :func:`make_trainer` builds a
:class:`kernels.mlp.MLPTrainer` with the local optimizer of a config, :func:`run_batches` takes
the minibatch steps (or accumulates one full-batch step) and calls back every ``local_steps``
minibatches, where a worker pushes to the parameter server. :func:`local_state` and
:func:`load_local_state` are the one format of a local optimizer's state outside the trainer:
what a sync share hands the parameter server to keep, and what the checkpoint saves.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from pipeline.loader import ChunkLoader, RowCache
from pipeline.optim import EF_RESIDUAL

# batch_size = 0 (full batch): rows per piece over which a task accumulates its gradient, so
# that memory stays that of one minibatch whatever the number of rows
FULL_BATCH_ROWS = 4096
# the most bytes of minibatches a Lookahead takes ahead of time (features and targets, 4 bytes each)
LOOKAHEAD_BYTES = 16 * 2**20


class Lookahead:
    """An iterator over ``items`` whose next items can be taken ahead of time.

    A sync worker waits at every push for the round to close: for the slowest participant's
    steps, then the server's step and its reply (4 ms or more per round on two cores, against
    the 35 ms of 8 steps). :meth:`fill` makes the next minibatches in that wait (the shuffle
    buffer's gathers, a read chunk copied into the buffer, waiting for the reader), work the
    steps after it would otherwise wait for. The items and their order are the same either
    way: a loader's minibatches do not depend on the weights.

    An exception raised while filling is raised where the item it stands for is asked for, after
    the items taken before it (an interrupt, ``KeyboardInterrupt``, goes out of :meth:`fill` at
    once). :meth:`close` lets go of the items taken ahead and closes ``items`` (a generator's
    loader with it), for a consumer that stops before the end."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._it: Iterator[Any] | None = iter(items)
        self._ahead: deque[Any] = deque()
        self._error: BaseException | None = None

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        if self._ahead:
            return self._ahead.popleft()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def __len__(self) -> int:
        """The items taken ahead and not yet asked for."""
        return len(self._ahead)

    def close(self) -> None:
        """Drop the items taken ahead and close ``items`` if it can be closed; then exhausted."""
        self._ahead.clear()
        self._error = None
        it, self._it = self._it, None
        closer = getattr(it, "close", None)
        if closer is not None:
            closer()

    def fill(self, n: int) -> None:
        """Take items until ``n`` are ahead (fewer at the end of ``items`` or at an error)."""
        while len(self._ahead) < n and self._it is not None and self._error is None:
            try:
                self._ahead.append(next(self._it))
            except StopIteration:
                self._it = None
            except Exception as exc:  # noqa: BLE001 - raised again where its item is asked for
                self._error = exc


def lookahead_batches(batch_rows: int, row_values: int, local_steps: int) -> int:
    """The minibatches a worker makes while it waits for a round: the round's ``local_steps``,
    at most :data:`LOOKAHEAD_BYTES` of rows of ``row_values`` 4-byte values (at least one)."""
    per_batch = max(1, batch_rows * row_values * 4)
    return max(1, min(int(local_steps), LOOKAHEAD_BYTES // per_batch))


_controller: list[Any] = [None, -1]  # threadpoolctl's controller, and len(sys.modules) when it was made


def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries in this process, made again only when modules
    were imported since (a BLAS library is loaded with an extension module: SciPy's own OpenBLAS,
    say, loaded after NumPy's)."""
    import sys

    from threadpoolctl import ThreadpoolController

    if "scipy.linalg" not in sys.modules:
        # SciPy's own BLAS, which Numba's CPU target loads (it imports scipy.linalg) when the
        # first kernel loads, inside the block: loaded now, so that the limit covers it too
        try:
            import scipy.linalg  # noqa: F401
        except ImportError:
            pass
    if _controller[0] is None or _controller[1] != len(sys.modules):
        _controller[:] = [ThreadpoolController(), len(sys.modules)]
    return _controller[0]


def blas_limit(threads: int) -> Any:
    """A context manager that runs its block with this process's BLAS at ``threads`` threads and
    restores them on exit: the in-process training of `pipeline train` and of the estimators.

    threadpoolctl finds the BLAS libraries by reading the process's memory map (~4 ms, which was
    most of a small linear fit); that is done again only after new imports
    (:func:`_blas_controller`)."""
    return _blas_controller().limit(limits=int(threads), user_api="blas")


def make_trainer(spec: Mapping[str, Any], cfg: Mapping[str, Any], params: np.ndarray | None = None) -> Any:
    """A fresh :class:`kernels.mlp.MLPTrainer` for ``spec`` with the local optimizer of ``cfg``
    (the training tasks' config, :func:`pipeline.train.task_config`), from ``params`` if given.

    ``optimizer = "nesterov"`` is momentum with Nesterov's look-ahead: the kernels know it as
    the momentum optimizer with ``nesterov=True``. ``proximal_mu`` > 0 (FedProx) adds
    ``mu (w - w_start)`` to every gradient, ``w_start`` being the weights last set with
    ``set_params`` (or ``params``): the round's global weights."""
    from kernels.mlp import MLPSpec, MLPTrainer

    optimizer = cfg["optimizer"]
    return MLPTrainer(
        MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])}),
        backend=cfg["backend"],
        optimizer="momentum" if optimizer == "nesterov" else optimizer,
        nesterov=optimizer == "nesterov",
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        beta1=cfg.get("beta1", 0.9),
        beta2=cfg.get("beta2", 0.999),
        rho=cfg.get("rho", 0.99),
        weight_decay=cfg["weight_decay"],
        max_batch=cfg["batch_size"] or FULL_BATCH_ROWS,
        params=params,
        seed=cfg["seed"],
        proximal_mu=float(cfg.get("proximal_mu", 0.0)),
    )


def holdout_selection(cfg: Mapping[str, Any], keep: str) -> dict | None:
    """The loader's row selection when validation rows are held out of the training store
    (``cfg["holdout"]``): training reads the other rows (``keep="train"``), evaluation those."""
    held = cfg.get("holdout")
    return {**held, "keep": keep} if held else None


def training_loader(
    store: Any,
    cfg: Mapping[str, Any],
    *,
    ranges: Any = None,
    rows: Any = None,
    norm: Mapping[str, Any] | None = None,
    cache: RowCache | None = None,
    cache_scope: Any = None,
) -> ChunkLoader:
    """The minibatch stream a training task reads (the worker task, in-process training and a
    federated client alike): ``ranges`` of ``store`` without their held-out rows, or a simulated
    client's ``rows`` (its training rows already); full batch (``batch_size`` 0) in pieces of
    ``FULL_BATCH_ROWS``, unshuffled; standardized with ``norm``'s mean/std when given. ``cache``
    keeps the store's chunks between epochs when the whole store fits its bound
    (:class:`pipeline.loader.RowCache`, ``row_cache_mb``)."""
    full_batch = cfg["batch_size"] == 0
    return ChunkLoader(
        store,
        ranges=ranges,
        rows=rows,
        batch_size=cfg["batch_size"] or FULL_BATCH_ROWS,
        shuffle=not full_batch,
        seed=cfg["seed"],
        buffer_chunks=cfg["shuffle_chunks"],
        prefetch=cfg["prefetch"],
        normalize=cfg["normalize"],
        mean=None if norm is None else norm["mean"],
        std=None if norm is None else norm["std"],
        holdout=holdout_selection(cfg, "train") if rows is None else None,
        cache=cache,
        cache_scope=cache_scope,
    )


def row_cache_bytes(row_cache_mb: float, memory_limit: float | None = None) -> int:
    """The bound of a process's :class:`RowCache`: ``row_cache_mb`` MiB, and at most a quarter of
    ``memory_limit`` (a Dask worker's) or, without one, of this machine's memory."""
    if memory_limit is None:
        import psutil

        memory_limit = psutil.virtual_memory().total
    return int(min(row_cache_mb * 2**20, memory_limit // 4))


# Validation batches kept in memory between epochs, at most this much per process: by in-process
# training (pipeline.local) and by each worker for its jobs (pipeline.worker, also at most an
# eighth of the worker's memory limit)
VAL_CACHE_MB = 512


def validation_loader(
    store: Any, cfg: Mapping[str, Any], ranges: Any, norm: Mapping[str, Any] | None = None
) -> ChunkLoader:
    """The evaluation batches of ``ranges`` of ``store`` (their held-out rows when the run holds
    some out), in order, in batches of at least 1024 rows, standardized with ``norm``'s
    mean/std when given: what a worker validates and what in-process training validates."""
    return ChunkLoader(
        store,
        ranges=ranges,
        batch_size=max(cfg["batch_size"], 1024),
        shuffle=False,
        normalize=cfg["normalize"],
        prefetch=cfg["prefetch"],
        mean=None if norm is None else norm["mean"],
        std=None if norm is None else norm["std"],
        holdout=holdout_selection(cfg, "validation"),
    )


def prepare_targets(y: np.ndarray, target: dict | None) -> np.ndarray:
    """Classification labels as int32; regression targets standardized as float32 2-D."""
    if target is None:
        return np.ascontiguousarray(y, dtype=np.int32)
    yy = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.ascontiguousarray((yy - target["mean"]) / target["std"], dtype=np.float32)


def local_state(trainer: Any) -> dict[str, Any]:
    """The local optimizer's state as ``{"t", "lr", "buffers": {name: array}}``: what a sync
    share leaves with the parameter server and a checkpoint saves (undone by
    :func:`load_local_state`)."""
    opt = trainer.optimizer.state_dict()
    buffers = {k.removeprefix("opt."): v for k, v in opt.items() if k.startswith("opt.")}
    return {"t": opt["t"], "lr": opt["lr"], "buffers": buffers}


def load_local_state(trainer: Any, state: Mapping[str, Any] | None) -> None:
    """Reset ``trainer``'s local optimizer, then restore ``state`` (:func:`local_state`'s
    format) into it when there is one. An error-feedback residual kept beside the optimizer's
    buffers (:class:`pipeline.ps.wire.DeltaCompressor`) is not the optimizer's and is skipped."""
    trainer.reset_optimizer()
    if state:
        lr = {} if state.get("lr") is None else {"lr": state["lr"]}  # none saved: the config's
        buffers = {k: v for k, v in state["buffers"].items() if k != EF_RESIDUAL}
        trainer.optimizer.load_state_dict({"t": state["t"], **lr, **{f"opt.{k}": v for k, v in buffers.items()}})


def run_batches(
    trainer: Any,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    full_batch: bool = False,
    local_steps: int = 0,
    sync: Callable[[int, int, float], None] | None = None,
    skip: int = 0,
    timing: dict[str, float] | None = None,
    fold: Callable[[], None] | None = None,
    fold_after: int = 0,
) -> dict[str, Any]:
    """Train ``trainer`` (a :class:`kernels.mlp.MLPTrainer`) on ``batches``: a step per
    minibatch, or with ``full_batch`` one step with the mean gradient of them all.

    Every ``local_steps`` minibatches (and after the last) ``sync(samples, batches, loss)`` is
    called with the rows, minibatches and mean loss since the previous call, as a worker
    pushes to the parameter server; ``fold()``, when given, is called after the ``fold_after``-th
    minibatch following each call (``0 < fold_after < local_steps``), where an overlapped push's
    reply is folded in: always at the same step, so the run does not depend on timing. The first
    ``skip`` batches are passed over (already trained before an interruption).
    ``timing["compute"]``, when given, grows by the seconds spent in the kernels as they run (a
    ``sync`` callback may read it). Returns ``samples``,
    ``batches``, ``steps`` (optimizer steps taken), ``loss`` (the mean of the minibatch
    losses; full batch: over the rows), ``row_loss`` (the mean over rows) and
    ``skipped_samples`` (the rows of the batches passed over: the epoch trained them before)."""
    samples = n_since = b_since = n_batches = steps = skipped = 0
    weighted = 0.0
    losses: list[float] = []
    since: list[float] = []
    clock = timing if timing is not None else {}
    clock.setdefault("compute", 0.0)
    for i, (X, y) in enumerate(batches):
        if i < skip:
            skipped += len(X)
            continue
        b = len(X)
        t = time.perf_counter()
        loss = trainer.accumulate(X, y) if full_batch else trainer.step(X, y)
        clock["compute"] += time.perf_counter() - t
        samples += b
        n_since += b
        b_since += 1
        n_batches += 1
        steps += 0 if full_batch else 1
        weighted += loss * b
        losses.append(loss)
        since.append(loss * b if full_batch else loss)
        if sync is not None and not full_batch and b_since == local_steps:
            sync(n_since, b_since, float(np.mean(since)))
            n_since = b_since = 0
            since = []
        elif fold is not None and b_since == fold_after:
            fold()
    if full_batch:
        t = time.perf_counter()
        steps += 1 if trainer.apply() else 0
        clock["compute"] += time.perf_counter() - t
        if samples:
            losses = since = [weighted / samples]
    if sync is not None and b_since:
        sync(n_since, b_since, float(np.mean(since)))
    return {
        "samples": samples,
        "batches": n_batches,
        "steps": steps,
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "row_loss": weighted / max(1, samples),
        "skipped_samples": skipped,
    }
