"""PyTorch peers on in-memory arrays: best practice (the target row), the tutorial DataLoader
loop, ``torch.compile``, and two-process data-parallel local SGD (``torch.distributed``, gloo).

Every peer starts from the pipeline's initial weights (``kernels.mlp.init_params`` with the
pipeline's seed, He normal, zero biases) and gets the same warm-up as the pipeline (one epoch
over the test rows with a throw-away copy, then the timed run starts from the initial weights).

Best practice (``TorchBest``): ``torch.set_num_threads(2)``, the standardized float32 tensors in
memory once, a ``randperm`` per epoch and ``index_select`` per batch, ``zero_grad(set_to_none=
True)``, and Adam with ``fused=True`` or ``foreach=True``, whichever :func:`pick_adam` measures
faster on this machine (recorded in the table).

Best practice + the same weight averaging (``TorchBestAveraged``): the best-practice loop
unchanged, plus the pipeline's ``ema`` average of the weights (:class:`pipeline.optim.
ServerOptimizer`): after averaging update ``t`` (1-based) ``average += (1 - d) * (weights -
average)`` with ``d = min(ema, (1 + t) / (10 + t))``, so update 1 copies the weights. The
pipeline updates its average once per sync round, after the server's step; a round combines one
push from each of its 2 workers, each after ``local_steps`` (8) minibatches of 256, so a round
is 2 x 8 x 256 = 4,096 samples of progress, and each worker's last push of the epoch (its share's
leftover minibatches) closes a shorter round. The PyTorch loop takes one minibatch per step, so
it updates its average every ``every`` = 2 x 8 = 16 optimizer steps (the same samples between
updates) and after an epoch's last step when steps are left over. At the throughput
benchmark's size (120,000 rows, 2 epochs) both take 60 updates: a worker's 60,000-row share is
235 minibatches an epoch, 29 rounds of 8 and one of 3; PyTorch's 469 steps an epoch are 29
updates of 16 and one of 5. It predicts with the average (the pipeline validates and saves the
average) and trains on from the raw weights. The update is one in-place ``torch._foreach_lerp_``
over the parameters, called from the epoch's loop (the best-practice loop with the update added),
so its cost is in the row's timing.

Two-process data parallel (``python -m bench.torch_peers ddp ...``): two processes on 127.0.0.1
with the gloo backend, one thread each, each training on its half of a shuffled permutation
(shared seed) with ``PostLocalSGDOptimizer`` averaging the parameters every ``period`` (8) steps
(``PeriodicModelAverager``, from the first step): the structural twin of two Dask workers
pushing every 8 local steps.

Cold runs (a fresh process from the Zarr store to a saved model; ``bench.throughput`` times them
from outside): ``python -m bench.torch_peers cold-peer KIND ...`` for the in-process peers
(:func:`cold_peer`: ``KIND`` is one of :data:`PEER_KINDS`, built by :func:`make_peer` exactly as
the steady rows build it) and ``python -m bench.torch_peers ddp-store ...`` for the two-process
peer (:func:`ddp_store_main`: each process reads and standardizes the store itself). Each reads
the training and test stores, trains the given epochs predicting the test rows after each, and
writes the model it predicts with by ``torch.save(state_dict)``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Peer


def build_model(sizes: Sequence[int], seed: int = 0) -> Any:
    """``Sequential(Linear, ReLU, ..., Linear)`` holding ``init_params(spec, seed)``'s weights."""
    import torch

    from kernels.mlp import MLPSpec, init_params, views

    spec = MLPSpec(sizes[0], tuple(sizes[1:-1]), sizes[-1])
    pv = views(spec, init_params(spec, seed=seed))
    layers: list = []
    for i in range(len(sizes) - 1):
        lin = torch.nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(pv[f"W{i}"].T)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(pv[f"b{i}"])))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def adam(params: Any, lr: float, kind: str) -> Any:
    import torch

    return torch.optim.Adam(params, lr=lr, **({"fused": True} if kind == "fused" else {"foreach": True}))


def pick_adam(sizes: Sequence[int], batch: int = 256, steps: int = 30, threads: int = 2) -> dict[str, Any]:
    """Seconds per step of fused and foreach Adam on this model (best of two timings each, the
    pair interleaved); returns ``{"kind": faster, "fused": s, "foreach": s}``."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(batch, sizes[0], generator=g)
    yb = torch.randint(0, sizes[-1], (batch,), generator=g)
    res: dict[str, Any] = {}
    setups = {}
    for kind in ("fused", "foreach"):
        m = build_model(sizes)
        try:
            setups[kind] = (m, adam(m.parameters(), 1e-3, kind))
        except (RuntimeError, TypeError, ValueError) as exc:  # fused Adam missing on this build
            res[kind] = f"unavailable: {exc}"
    loss_fn = torch.nn.CrossEntropyLoss()
    best = dict.fromkeys(setups, float("inf"))
    for _ in range(2):
        for kind, (m, opt) in setups.items():
            t = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(m(xb), yb).backward()
                opt.step()
            best[kind] = min(best[kind], (time.perf_counter() - t) / steps)
    res.update(best)
    res["kind"] = min(best, key=best.get)
    return res


class TorchBest(Peer):
    """PyTorch at its best practice on in-memory tensors (see the module docstring)."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sizes: Sequence[int],
        batch: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        threads: int = 2,
        adam_kind: str = "fused",
        compile: bool = False,
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch, self.batch = torch, batch
        self.model = build_model(sizes, seed)
        self.opt = adam(self.model.parameters(), lr, adam_kind)
        self.loss = torch.nn.CrossEntropyLoss()
        self.fwd = torch.compile(self.model) if compile else self.model
        self.tx = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.ty = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.gen = torch.Generator().manual_seed(seed)
        self.name = "pytorch best practice" + (" + torch.compile" if compile else "")

    def epoch(self) -> None:
        torch, b = self.torch, self.batch
        perm = torch.randperm(len(self.tx), generator=self.gen)
        self.model.train()
        for i in range(0, len(perm), b):
            idx = perm[i : i + b]
            xb, yb = self.tx.index_select(0, idx), self.ty.index_select(0, idx)
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.fwd(xb), yb).backward()
            self.opt.step()
            self.stepped()
        self.epoch_done()

    def stepped(self) -> None:
        """After each optimizer step (nothing here; a subclass's hook)."""

    def epoch_done(self) -> None:
        """After an epoch's last step (nothing here; a subclass's hook)."""

    def scored(self) -> Any:
        """The module :meth:`predict` evaluates."""
        return self.model

    def predict(self, X: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.scored()(self.torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


class TorchBestAveraged(TorchBest):
    """:class:`TorchBest` plus the pipeline's weight average (``ema``; see the module
    docstring): updated every ``every`` optimizer steps and after an epoch's last step, with
    ``d = min(ema, (1 + t) / (10 + t))`` at update ``t``; :meth:`predict` uses the average."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sizes: Sequence[int],
        batch: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        threads: int = 2,
        adam_kind: str = "fused",
        ema: float = 0.999,
        every: int = 16,
    ) -> None:
        import copy

        if not 0 < ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {ema}")
        if every < 1:
            raise ValueError(f"every must be >= 1 optimizer steps, got {every}")
        super().__init__(X, y, sizes, batch, lr, seed, threads, adam_kind)
        self.ema, self.every = float(ema), int(every)
        self.t = 0  # averaging updates so far
        self.since = 0  # optimizer steps since the last update
        self.weights = [p for p in self.model.parameters()]
        self.averaged = copy.deepcopy(self.model).requires_grad_(False)  # the average's tensors
        self.average = list(self.averaged.parameters())
        self.name = f"pytorch best practice + the same weight averaging (ema {ema:g}, every {every} steps)"

    def update_average(self) -> None:
        """One averaging update, in place: ``average += (1 - d) * (weights - average)``."""
        self.t += 1
        self.since = 0
        with self.torch.no_grad():
            if self.t == 1:  # the pipeline's average starts at zero and takes the whole difference
                self.torch._foreach_copy_(self.average, self.weights)
            else:
                d = min(self.ema, (1 + self.t) / (10 + self.t))
                self.torch._foreach_lerp_(self.average, self.weights, 1.0 - d)

    def stepped(self) -> None:
        self.since += 1
        if self.since == self.every:
            self.update_average()

    def epoch_done(self) -> None:
        if self.since:
            self.update_average()

    def scored(self) -> Any:
        return self.averaged if self.t else self.model


class TorchTutorial(TorchBest):
    """The tutorial loop: ``DataLoader(TensorDataset, batch_size, shuffle=True)``, plain Adam."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sizes: Sequence[int],
        batch: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        threads: int = 2,
    ) -> None:
        import torch

        super().__init__(X, y, sizes, batch, lr, seed, threads)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        ds = torch.utils.data.TensorDataset(self.tx, self.ty)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=self.gen)
        self.name = "pytorch tutorial (DataLoader)"

    def epoch(self) -> None:
        self.model.train()
        for xb, yb in self.loader:
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(xb), yb).backward()
            self.opt.step()


PEER_KINDS = ("best", "averaged", "tutorial", "compiled")  # the in-process peers :func:`make_peer` builds


def make_peer(
    kind: str,
    X: np.ndarray,
    y: np.ndarray,
    sizes: Sequence[int],
    batch: int = 256,
    adam_kind: str = "fused",
    ema: float = 0.999,
    every: int = 16,
) -> TorchBest:
    """The in-process peer ``kind`` (:data:`PEER_KINDS`) on ``X, y``: best practice, best practice
    + the weight average (``ema``, every ``every`` steps), the tutorial loop, or best practice +
    ``torch.compile``. One constructor for a row's steady and cold runs, so both train the same."""
    if kind == "best":
        return TorchBest(X, y, sizes, batch, adam_kind=adam_kind)
    if kind == "averaged":
        return TorchBestAveraged(X, y, sizes, batch, adam_kind=adam_kind, ema=ema, every=every)
    if kind == "tutorial":
        return TorchTutorial(X, y, sizes, batch)
    if kind == "compiled":
        return TorchBest(X, y, sizes, batch, adam_kind=adam_kind, compile=True)
    raise ValueError(f"unknown peer {kind!r}: one of {', '.join(PEER_KINDS)}")


def compile_works(sizes: Sequence[int]) -> str | None:
    """None if ``torch.compile`` trains a step here, else the reason (first line of the error)."""
    try:
        import torch

        m = build_model(sizes)
        f = torch.compile(m)
        x = torch.zeros(4, sizes[0])
        f(x).sum().backward()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure (no compiler, inductor error) means "no"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]


# -------------------------------------------------------------------------------------------
# two-process data-parallel local SGD
# -------------------------------------------------------------------------------------------


def _ddp_worker(
    rank: int,
    world: int,
    port: int,
    data: str,
    sizes: list[int],
    batch: int,
    epochs: int,
    warm: bool,
    period: int,
    adam_kind: str,
    out: str,
    test_store: str = "",
) -> None:
    """One process of the two-process peer: ``data`` is the ``.npz`` of standardized arrays, or
    with ``test_store`` the training store, which the process reads and standardizes itself."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if test_store:  # from the stores on disk, as a user's script would start
        from bench.common import arrays
        from pipeline.store import open_store

        tr = open_store(data)
        X, Y = arrays(tr)
        Xte, Yte = arrays(open_store(test_store), like=tr)
        d: Any = {"X": X, "y": Y, "Xte": Xte, "yte": Yte}
    else:
        d = np.load(data)
    tx, ty = torch.from_numpy(d["X"]), torch.from_numpy(d["y"].astype(np.int64))
    te_x, te_y = torch.from_numpy(d["Xte"]), torch.from_numpy(d["yte"].astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(X: Any, Y: Any, n_epochs: int, validate: bool = True) -> Any:
        model = build_model(sizes, 0)
        opt = PostLocalSGDOptimizer(
            adam(model.parameters(), 1e-3, adam_kind), PeriodicModelAverager(period=period, warmup_steps=0)
        )
        gen = torch.Generator().manual_seed(0)  # the same permutation in both processes
        for _ in range(n_epochs):
            perm = torch.randperm(len(X), generator=gen)
            mine = perm[rank::world]
            for i in range(0, len(mine), batch):
                idx = mine[i : i + batch]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(X.index_select(0, idx)), Y.index_select(0, idx)).backward()
                opt.step()
            if validate and rank == 0:  # validation counted, as for every trainer
                with torch.no_grad():
                    model(te_x).argmax(1)
        with torch.no_grad():  # the final model: the average of both
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data /= world
        return model

    if warm:
        run(te_x, te_y, 1, False)
    dist.barrier()
    t = time.perf_counter()
    model = run(tx, ty, epochs)
    dist.barrier()
    dt = time.perf_counter() - t
    if rank == 0:
        with torch.no_grad():
            acc = float((model(te_x).argmax(1) == te_y).float().mean())
        torch.save(model.state_dict(), out + ".pt")
        Path(out).write_text(json.dumps({"seconds": dt, "acc": acc}))
    dist.destroy_process_group()


def ddp_main(argv: Sequence[str]) -> None:
    """``python -m bench.torch_peers ddp DATA.npz OUT.json SIZES BATCH EPOCHS PERIOD ADAM [nowarm]``."""
    import socket

    import torch.multiprocessing as mp

    data, out, sizes, batch, epochs, period, kind = argv[:7]
    warm = "nowarm" not in argv[7:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _ddp_worker,
        args=(2, port, data, [int(x) for x in sizes.split(",")], int(batch), int(epochs), warm, int(period), kind, out),
        nprocs=2,
        join=True,
    )


def run_ddp(
    data: Path, out: Path, sizes: Sequence[int], batch: int, epochs: int, period: int = 8, adam_kind: str = "foreach"
) -> dict[str, Any]:
    """Run the two-process peer in a fresh process; returns steady ``seconds`` (both processes
    training, after the warm-up), ``acc`` and ``cold`` (the whole process, to a saved model)."""
    import subprocess

    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.torch_peers",
            "ddp",
            str(data),
            str(out),
            ",".join(map(str, sizes)),
            str(batch),
            str(epochs),
            str(period),
            adam_kind,
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    cold = time.perf_counter() - t
    res = json.loads(out.read_text())
    res["cold"] = cold
    return res


def ddp_store_main(argv: Sequence[str]) -> None:
    """``python -m bench.torch_peers ddp-store TRAIN.zarr TEST.zarr OUT.json SIZES BATCH EPOCHS PERIOD ADAM``:
    the two-process peer as a cold run: both processes read and standardize the stores, no
    warm-up; rank 0 writes ``OUT.json`` (``seconds``, ``acc``; also printed) and the averaged model
    to ``OUT.json.pt`` (``torch.save(state_dict)``)."""
    import socket

    import torch.multiprocessing as mp

    train, test, out, sizes, batch, epochs, period, kind = argv[:8]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shape = [int(x) for x in sizes.split(",")]
    mp.spawn(
        _ddp_worker,
        args=(2, port, train, shape, int(batch), int(epochs), False, int(period), kind, out, test),
        nprocs=2,
        join=True,
    )
    print(Path(out).read_text(), flush=True)  # rank 0's report, for the caller


def cold_peer(
    kind: str,
    train: str,
    test: str,
    out: str,
    epochs: int,
    sizes: Sequence[int],
    batch: int = 256,
    adam_kind: str = "fused",
    ema: float = 0.999,
    every: int = 16,
) -> dict[str, Any]:
    """The in-process peer ``kind`` (:func:`make_peer`) from the stores on disk to a saved model:
    read and standardize both stores, train ``epochs`` epochs predicting the test rows after each
    (validation counted, as in the steady rows), ``torch.save`` the state dict of the module it
    predicts with (the average for ``averaged``) to ``out``. Returns the test accuracy."""
    import torch

    from bench.common import arrays
    from pipeline.store import open_store

    tr, te = open_store(train), open_store(test)
    X, y = arrays(tr)
    Xte, yte = arrays(te, like=tr)
    peer = make_peer(kind, X, y, sizes, batch, adam_kind, ema, every)
    pred = None
    for _ in range(epochs):
        peer.epoch()
        pred = peer.predict(Xte)
    torch.save(peer.scored().state_dict(), out)
    return {"acc": None if pred is None else float(np.mean(pred.argmax(axis=1) == yte))}


def cold_peer_main(argv: Sequence[str]) -> None:
    """``python -m bench.torch_peers cold-peer KIND TRAIN.zarr TEST.zarr OUT.pt EPOCHS ADAM SIZES BATCH [EMA EVERY]``:
    :func:`cold_peer` as a whole process; prints its result as one JSON line."""
    kind, train, test, out, epochs, kind_adam, sizes_s, batch = argv[:8]
    extra = {"ema": float(argv[8]), "every": int(argv[9])} if len(argv) >= 10 else {}
    sizes = [int(v) for v in sizes_s.split(",")]
    res = cold_peer(kind, train, test, out, int(epochs), sizes, int(batch), kind_adam, **extra)
    print(json.dumps(res), flush=True)


# -------------------------------------------------------------------------------------------
# streaming the Zarr store (out of core)
# -------------------------------------------------------------------------------------------


def stream_dataset(path: str, batch: int = 256, buffer_chunks: int = 4, seed: int = 0, prefetch: int = 2) -> Any:
    """An ``IterableDataset`` mirroring the pipeline's loader: whole chunks read in a shuffled
    order, rows shuffled within a buffer of ``buffer_chunks`` chunks, standardized to float32
    with the store's statistics, and read ahead by a prefetch thread (``prefetch`` chunks)."""
    import queue
    import threading

    import torch

    from pipeline.store import open_store

    class ZarrStream(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.st = open_store(path)
            self.mean = self.st.mean.astype(np.float32)
            self.inv = (1.0 / self.st.std).astype(np.float32)
            self.epoch = 0

        def __iter__(self):
            rng = np.random.default_rng(seed + self.epoch)
            self.epoch += 1
            order = rng.permutation(self.st.n_chunks)
            q: queue.Queue = queue.Queue(maxsize=prefetch)

            def reader() -> None:
                for i in order:
                    X, y = self.st.read_chunk(int(i))
                    q.put(((X.astype(np.float32) - self.mean) * self.inv, np.asarray(y, dtype=np.int64)))
                q.put(None)

            threading.Thread(target=reader, daemon=True).start()
            bx: list = []
            by: list = []
            while True:
                item = q.get()
                if item is not None:
                    bx.append(item[0])
                    by.append(item[1])
                if item is None or len(bx) >= buffer_chunks:
                    if not bx:
                        break
                    X, y = np.concatenate(bx), np.concatenate(by)
                    bx, by = [], []
                    perm = rng.permutation(len(X))
                    for j in range(0, len(X), batch):
                        idx = perm[j : j + batch]
                        yield torch.from_numpy(X[idx]), torch.from_numpy(y[idx])
                if item is None:
                    break

    return ZarrStream()


def stream_main(argv: Sequence[str]) -> None:
    """``python -m bench.torch_peers stream STORE EPOCHS SIZES ADAM``: train from the store with
    :func:`stream_dataset`; prints one JSON line per epoch (``epoch``, ``seconds``,
    ``samples``) as the epoch ends, so the caller can sample memory and reads per epoch."""
    import torch

    path, epochs, sizes_s, kind = argv[:4]
    sizes = [int(v) for v in sizes_s.split(",")]
    torch.set_num_threads(2)
    ds = stream_dataset(path)
    model = build_model(sizes, 0)
    opt = adam(model.parameters(), 1e-3, kind)
    loss_fn = torch.nn.CrossEntropyLoss()
    print(json.dumps({"ready": True}), flush=True)
    for e in range(int(epochs)):
        t, n = time.perf_counter(), 0
        for xb, yb in ds:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            n += len(xb)
        print(json.dumps({"epoch": e, "seconds": time.perf_counter() - t, "samples": n}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ddp":
        ddp_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "cold-peer":
        cold_peer_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "ddp-store":
        ddp_store_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "stream":
        stream_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.torch_peers ddp DATA.npz OUT.json SIZES BATCH EPOCHS PERIOD ADAM")
