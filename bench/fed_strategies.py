"""Robust aggregation against a Byzantine client on a non-IID split, in one process, under
:mod:`bench.protocol`.

    python -m bench.fed_strategies            # 20 clients, Dirichlet(0.3), 30 rounds
    python -m bench.fed_strategies --quick    # tiny smoke run

A synthetic 10-class store (``pipeline.synth``, 64 features) is split among ``--clients``
simulated clients by ``pipeline.partition`` (Dirichlet(``--alpha``) over labels). Every round
each client starts from the global weights, trains one local epoch (``pipeline.loop``'s trainer,
SGD lr 0.05, batch 32, MLP 64-64-10) over its own rows and hands back its delta; client 0 is
Byzantine and sends its delta sign-flipped and times 10. The server combines the deltas with
each aggregator of ``pipeline.fedagg`` and takes a plain step (server SGD lr 1). Reported: test
accuracy after the last round, and FedAvg without the attacker as the reference. One seed per
row (the partition, the initial weights and the shuffling are seeded, so a run repeats exactly):
differences under ~1 point are seed noise.

Accuracy only: the rows run once, one after the other, in a single measured pass (the machine's
conditions around it are recorded: load, steal, other processes' CPU, GEMM peaks); the seconds
per row are that one run's wall time, for orientation, after an untimed warm-up of the kernels.
Raw figures: ``bench/results/fed_strategies-*.json`` (quick runs:
``bench/out/results/fed_strategies-quick-*.json``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, mnist_like, tmpdir, write_out

TITLE = "Robust aggregation against a Byzantine client"
AGGREGATORS = (
    ("mean, no attacker", "mean", {}, False),
    ("mean (FedAvg)", "mean", {}, True),
    ("median", "median", {}, True),
    ("trimmed_mean 0.1", "trimmed_mean", {"trim_fraction": 0.1}, True),
    ("krum f=1", "krum", {"krum_f": 1}, True),
    ("multi-krum f=1 m=5", "krum", {"krum_f": 1, "krum_m": 5}, True),
)


def _standardized(store: Any, X: np.ndarray) -> np.ndarray:
    return ((X.astype(np.float32) - store.mean.astype(np.float32)) / store.std.astype(np.float32)).astype(np.float32)


def run(
    quick: bool = False, clients: int = 20, alpha: float = 0.3, rounds: int = 30, rows: int = 20_000
) -> tuple[str, dict[str, Any]]:
    """Every aggregator's rounds from the same start, in one measured pass; the table text and
    the raw figures."""
    from pipeline import fedagg
    from pipeline.config import TrainConfig
    from pipeline.loop import load_local_state, make_trainer, run_batches
    from pipeline.optim import ServerOptimizer
    from pipeline.partition import make_partition
    from pipeline.store import read_rows_at
    from pipeline.train import task_config

    if quick:
        clients, rounds, rows = 6, 2, 3_000
    features, n_classes, batch = 64, 10, 32
    m = protocol.meta()
    out: list[dict] = []
    with tmpdir("bench-fed-") as tmp:
        train, test = mnist_like(tmp, rows, rows // 4, features, n_classes)
        part = make_partition(train, clients, "dirichlet", alpha=alpha, seed=0, out=tmp / "partition")
        data = []
        for k in range(clients):
            X, y = read_rows_at(train, part.rows(k))
            data.append((_standardized(train, X), y.astype(np.int32)))
        Xte, yte = test.read_rows(0, test.n_rows)
        Xte = _standardized(train, Xte)
        spec = {"n_in": features, "hidden": [64], "n_out": n_classes, "activation": "relu"}
        cfg = task_config(TrainConfig(optimizer="sgd", lr=0.05, batch_size=batch))
        tr = make_trainer(spec, cfg)
        start = tr.get_params()
        # warm-up (kernel compilation): one local epoch of client 0, not timed; every client below
        # starts from set_params and a reset optimizer, so it leaves nothing behind
        X0, y0 = data[0]
        run_batches(tr, ((X0[a : a + batch], y0[a : a + batch]) for a in range(0, len(X0), batch)))
        with protocol.measure_pass(cores=2) as cond:
            for label, method, kw, attacked in AGGREGATORS:
                params = start.copy()
                server = ServerOptimizer("sgd", lr=1.0, n=params.size)
                rng = np.random.default_rng(1)
                t0 = time.perf_counter()
                for _ in range(rounds):
                    deltas, samples = [], []
                    for k, (X, y) in enumerate(data):
                        tr.set_params(params)
                        load_local_state(tr, None)
                        order = rng.permutation(len(X))
                        run_batches(
                            tr, ((X[order[a : a + batch]], y[order[a : a + batch]]) for a in range(0, len(X), batch))
                        )
                        delta = params - tr.get_params()
                        deltas.append(-10 * delta if attacked and k == 0 else delta)
                        samples.append(len(X))
                    grad = fedagg.aggregate(deltas, samples, method, **kw)
                    server.step(params, grad, 1.0)
                tr.set_params(params)
                acc = float(np.mean(tr.forward(Xte).argmax(axis=1) == yte))
                out.append(
                    {
                        "aggregator": label,
                        "Byzantine client": "yes" if attacked else "no",
                        "test acc": acc,
                        "seconds": time.perf_counter() - t0,
                    }
                )
        sizes = part.sizes()
    rec = {
        "pass": 1,
        "order": [a[0] for a in AGGREGATORS],
        "conditions": cond,
        "results": {r["aggregator"]: r for r in out},
    }
    payload = {
        "benchmark": "fed_strategies",
        "meta": m,
        "quick": quick,
        "args": {"clients": clients, "alpha": alpha, "rounds": rounds, "rows": rows},
        "client sizes": [int(x) for x in sizes],
        "passes": [rec],
        "rows": out,
    }
    path = protocol.save_json("fed_strategies-quick" if quick else "fed_strategies", payload, quick)
    lines = [
        *protocol.table_head(TITLE, m),
        f"Synthetic {features} features, {n_classes} classes, {rows:,} training rows split among {clients} clients "
        f"by Dirichlet({alpha}) (client sizes {sizes.min()}-{sizes.max()}), {rounds} rounds of 1 local epoch each, "
        "every client every round; client 0 sends -10 x its delta. Accuracy after the last round (seeded: "
        "a row repeats exactly); seconds: wall time of the row's rounds in this one run, for orientation.",
        "",
        md_table(out, {"test acc": ".4f", "seconds": ".2f"}),
        *protocol.table_tail([rec], path, "Conditions of the run", name=lambda p: "the run"),
    ]
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.fed_strategies", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args(argv)
    text, _ = run(args.quick, args.clients, args.alpha, args.rounds, args.rows)
    print(text)
    write_out("fed_strategies" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
