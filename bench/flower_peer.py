"""The Flower side of ``bench.federated``: FedAvg in Flower's simulation engine (Ray backend).

    python -m bench.flower_peer DATA_DIR OUT.json --clients N --rounds R [--local-epochs E]
        [--batch B] [--lr LR] [--fraction F] [--seed S] [--plan PLAN.json]

Runs in its own virtual environment (``flwr[simulation]`` pins versions the project's environment
does not share), so it imports only NumPy, PyTorch and Flower, never ``pipeline`` or ``kernels``.
``DATA_DIR`` is what ``bench.federated`` writes: ``X.npy`` (training rows, standardized float32),
``y.npy``, ``Xte.npy``/``yte.npy`` (the common test set), ``init-sS.npy`` (the initial flat
parameters of seed ``S`` in the ``kernels.mlp`` layout: ``W0`` (in x out), ``b0``, ``W1``, ``b1``,
...), ``sizes.json`` and ``partition-N-sS/offsets.npy`` + ``rows.npy`` (the partition of seed
``S``: client k's rows are ``rows[offsets[k]:offsets[k + 1]]``).

Flower 1.42's message API: a ``ServerApp`` whose ``main`` runs ``flwr.serverapp.strategy.FedAvg``
(``fraction_train``, no client-side evaluation: ``fraction_evaluate = 0``), a ``ClientApp`` whose
``train`` handler trains the received model on its partition with plain SGD (``local_epochs``
passes, batches of ``batch`` rows in a shuffled order, one PyTorch thread) and replies with the
new arrays and ``num-examples``; ``flwr.simulation.run_simulation`` with ``num_supernodes = N``
and the Ray backend limited to 2 CPUs, 1 CPU per client (two clients train at once, as the
pipeline's two single-thread workers do). Each Ray actor memory-maps the arrays once and reads
only its client's rows per call.

Sampling: FedAvg draws the round's nodes with ``random.sample`` over the node ids, which the
simulation draws anew in every run, so its sampled clients differ from run to run even with the
``random`` module seeded. With ``--plan`` (a JSON ``{"rounds": [[partition ids of round 1], ...]}``,
what the pipeline samples with the same seed) the comparison is like for like: before round 1
the server sends every node a query message, which the ``ClientApp`` answers with its
``context.node_config["partition-id"]``, and ``configure_train`` then sends round ``r``'s
message to exactly the nodes holding the plan's partitions for ``r``. Either way the partition
ids that trained each round (from the replies) are recorded (``trained``); without a plan
FedAvg samples as it does by default.

Timing: the start of every round (``configure_train``) and the end of its aggregation are
recorded in the server process; the test accuracy of the final global model is computed after
the last round (not timed). The JSON written to ``OUT.json``: ``round_start``/``round_end``
(seconds since the process started), ``accuracy``, ``setup`` (process start to round 1, the
query for the node-to-partition map included), ``map_seconds`` (that query), ``trained``,
``planned`` (whether ``--plan`` chose the nodes), ``versions``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

T0 = time.perf_counter()
_CACHE: dict[str, Any] = {}


def layout(sizes: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """``kernels.mlp``'s flat layout: ``W0`` (in x out), ``b0``, ``W1``, ``b1``, ..."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(len(sizes) - 1):
        out += [(f"W{i}", (sizes[i], sizes[i + 1])), (f"b{i}", (sizes[i + 1],))]
    return out


def flat_to_arrays(flat: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """The flat vector as PyTorch-ordered arrays: ``weight`` (out x in), ``bias`` per layer."""
    arrs, off = [], 0
    for name, shape in layout(sizes):
        n = int(np.prod(shape))
        a = flat[off : off + n].reshape(shape)
        arrs.append(np.ascontiguousarray(a.T if name.startswith("W") else a, dtype=np.float32))
        off += n
    return arrs


def _data(data_dir: str, clients: int, seed: int) -> dict[str, Any]:
    """The memory-mapped arrays, opened once per process."""
    key = f"{data_dir}:{clients}:{seed}"
    if key not in _CACHE:
        d = Path(data_dir)
        part = d / f"partition-{clients}-s{seed}"
        _CACHE[key] = {
            "X": np.load(d / "X.npy", mmap_mode="r"),
            "y": np.load(d / "y.npy", mmap_mode="r"),
            "offsets": np.load(part / "offsets.npy"),
            "rows": np.load(part / "rows.npy", mmap_mode="r"),
            "sizes": json.loads((d / "sizes.json").read_text()),
        }
    return _CACHE[key]


def _model(sizes: Sequence[int]) -> Any:
    import torch

    layers: list[Any] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _set(model: Any, arrays: Sequence[np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for p, a in zip(model.parameters(), arrays, strict=True):
            p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))


def local_train(arrays: list[np.ndarray], X: np.ndarray, y: np.ndarray, cfg: dict[str, Any], seed: int) -> list:
    """``local_epochs`` passes of plain SGD over (X, y); returns the new arrays."""
    import torch

    torch.set_num_threads(1)
    model = _model(cfg["sizes"])
    _set(model, arrays)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    tx = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    ty = torch.from_numpy(np.asarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg["local_epochs"]):
        perm = torch.randperm(len(tx), generator=gen)
        for i in range(0, len(perm), cfg["batch"]):
            idx = perm[i : i + cfg["batch"]]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(tx.index_select(0, idx)), ty.index_select(0, idx)).backward()
            opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def accuracy(arrays: Sequence[np.ndarray], sizes: Sequence[int], Xte: np.ndarray, yte: np.ndarray) -> float:
    import torch

    model = _model(sizes)
    _set(model, arrays)
    with torch.no_grad():
        pred = model(torch.from_numpy(np.ascontiguousarray(Xte, dtype=np.float32))).argmax(1).numpy()
    return float(np.mean(pred == yte))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    data_dir, n = str(Path(args.data).resolve()), args.clients
    sizes = json.loads((Path(data_dir) / "sizes.json").read_text())
    cfg = {"sizes": sizes, "lr": args.lr, "local_epochs": args.local_epochs, "batch": args.batch}
    times: dict[str, list[float]] = {"start": [], "end": []}
    out: dict[str, Any] = {}
    plan: list[list[int]] | None = None
    if args.plan:
        plan = [sorted(int(k) for k in r) for r in json.loads(Path(args.plan).read_text())["rounds"]]
        if len(plan) != args.rounds:
            raise SystemExit(f"--plan {args.plan} has {len(plan)} rounds, not --rounds {args.rounds}")
    trained: list[list[int]] = []
    node_of: dict[int, int] = {}  # partition id -> node id (with a plan)

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        d = _data(data_dir, n, args.seed)
        rows = np.asarray(d["rows"][d["offsets"][k] : d["offsets"][k + 1]])
        X, y = d["X"][rows], d["y"][rows]
        rnd = int(msg.content["config"]["server-round"])
        new = local_train(
            msg.content["arrays"].to_numpy_ndarrays(), X, y, cfg, seed=args.seed * 1_000_003 + rnd * n + k
        )
        # who trained, beside FedAvg's records (a ConfigRecord: not averaged into the round's metrics)
        about = ConfigRecord({"partition-id": k})
        content = RecordDict(
            {"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": len(rows)}), "about": about}
        )
        return Message(content=content, reply_to=msg)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """This node's partition id (the server maps the plan's partitions to nodes with it)."""
        k = int(context.node_config["partition-id"])
        return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": k})}), reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            times["start"].append(time.perf_counter() - T0)
            if plan is None:
                return super().configure_train(server_round, arrays, config, grid)
            # the plan's partitions for this round, on the nodes that hold them (FedAvg's own
            # configure_train, with its node sampling replaced)
            config["server-round"] = server_round
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            nodes = [node_of[k] for k in plan[server_round - 1]]
            return self._construct_messages(record, nodes, MessageType.TRAIN)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            trained.append(sorted(int(m.content["about"]["partition-id"]) for m in replies if not m.has_error()))
            res = super().aggregate_train(server_round, replies)
            times["end"].append(time.perf_counter() - T0)
            return res

    def map_nodes(grid: Any) -> float:
        """Ask every node its partition id (one query message each, once all ``n`` are connected);
        fills ``node_of``."""
        t = time.perf_counter()
        while len(ids := list(grid.get_node_ids())) < n:  # as FedAvg's sampling waits for min_available_nodes
            time.sleep(0.05)
        msgs = [Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=i) for i in ids]
        for reply in grid.send_and_receive(msgs):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the partition query: {reply.error}")
            node_of[int(reply.content["metrics"]["partition-id"])] = int(reply.metadata.src_node_id)
        missing = sorted({k for r in plan or [] for k in r} - set(node_of))
        if missing:
            raise RuntimeError(f"no node answered for partition ids {missing[:10]} ({len(ids)} nodes asked)")
        return time.perf_counter() - t

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(args.seed)  # Flower samples the round's nodes with the random module
        if plan is not None:
            out["map_seconds"] = map_nodes(grid)
        strategy = TimedFedAvg(
            fraction_train=args.fraction, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=n
        )
        init = np.load(Path(data_dir) / f"init-s{args.seed}.npy")
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(flat_to_arrays(init, sizes)),
            num_rounds=args.rounds,
            train_config=ConfigRecord({}),
        )
        out["arrays"] = result.arrays.to_numpy_ndarrays()

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    if "arrays" not in out:
        raise RuntimeError("the Flower simulation ended without a final model (see its log above)")
    Xte = np.load(Path(data_dir) / "Xte.npy")
    yte = np.load(Path(data_dir) / "yte.npy")
    return {
        "system": "flower",
        "clients": n,
        "rounds": args.rounds,
        "round_start": times["start"],
        "round_end": times["end"],
        "setup": times["start"][0] if times["start"] else None,
        "map_seconds": out.get("map_seconds"),
        "planned": plan is not None,
        "trained": trained,
        "accuracy": accuracy(out["arrays"], sizes, Xte, yte),
        "versions": versions(),
    }


def versions() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    v: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for pkg in ("flwr", "ray", "torch", "numpy", "protobuf", "grpcio"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.flower_peer", description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", default="", help='JSON {"rounds": [[partition ids], ...]}: the nodes of each round')
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
