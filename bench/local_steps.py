"""How the push interval trades throughput for convergence, one run, same samples.

    python -m bench.local_steps            # local_steps 1..32, MNIST-like 120k rows, 2 epochs
    python -m bench.local_steps --quick    # tiny smoke run

For each ``local_steps`` the pipeline trains end to end from the Zarr store on a 2-worker
LocalCluster (1 thread each), default config otherwise (sync, server SGD lr 1 on the sum of
deltas, no overlap) with the MLP 784-512-256-10, batch 256, ``--epochs`` passes; the reference
is ``kernels.mlp.MLPTrainer`` in one process (2 BLAS threads) on the same rows for the same
number of samples. Reported: samples/s (sum of epoch seconds, validation pass included),
rounds, and test accuracy on 10,000 held-out rows, with the gap to the in-memory run.
``--mode async`` repeats the sweep in async mode. The default run also sweeps ``letter`` (the
customary 16,000 / 4,000 split, MLP 16-256-128-26, batch 128, 8 epochs) to set beside the scratch
simulation in DESIGN.md section 5; one seed per cell, so differences under ~1 point are noise.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bench.common import (
    KernelPeer,
    arrays,
    load,
    local_cluster,
    md_table,
    metric,
    mnist_like,
    pipeline_settings,
    run_pipeline,
    timed_epochs,
    tmpdir,
    write_out,
)

STEPS = (1, 2, 4, 8, 16, 32)


def run(
    quick: bool = False,
    rows: int = 120_000,
    epochs: int = 2,
    steps: Sequence[int] = STEPS,
    modes: Sequence[str] = ("sync",),
    dataset: str = "synthetic",
) -> tuple[str, dict]:
    batch, n_classes = 256, 10
    if quick:
        rows, test_rows, features, hidden, epochs, steps = 4_000, 1_000, 64, (32, 16), 1, (1, 8)
    elif dataset == "letter":  # DESIGN.md section 5's scratch simulation: letter, batch 128, 8 epochs
        hidden, batch, epochs = (256, 128), 128, 8
    else:
        test_rows, features, hidden = 10_000, 784, (512, 256)
    load0 = load()
    out: list[dict] = []
    numbers: dict[str, Any] = {}
    with tmpdir("bench-ls-") as tmp:
        if dataset == "letter" and not quick:
            from bench.time_to_accuracy import prepare

            train, test, _ = prepare("letter", tmp)
            features, n_classes = train.n_features, len(train.classes)
        else:
            train, test = mnist_like(tmp, rows, test_rows, features, n_classes)
        Xtr, ytr = arrays(train)
        Xte, yte = arrays(test, like=train)
        kp = KernelPeer(Xtr, ytr, hidden, n_classes, batch=batch)
        kp.tr.step(Xtr[:batch], ytr[:batch].astype("int32"))
        kp = KernelPeer(Xtr, ytr, hidden, n_classes, batch=batch)
        dt = timed_epochs(kp, epochs)
        acc_mem = metric(kp.predict(Xte), yte, "classification")
        mem_sps = epochs * len(Xtr) / dt
        out.append(
            {
                "run": "kernels in memory",
                "local_steps": "-",
                "samples/s": mem_sps,
                "vs in-memory": "1.00x",
                "rounds": None,
                "test acc": acc_mem,
                "acc gap (points)": 0.0,
            }
        )
        with local_cluster(2) as client:
            # min_share_gflop 0 (also the default): the sweep is about local steps between two
            # workers, whatever the store's size
            base = pipeline_settings(test, hidden, epochs, batch, min_share_gflop=0.0)
            run_pipeline(client, test, tmp / "warm", **{**base, "epochs": 1, "validation_store": ""})
            for mode in modes:
                for ls in steps:
                    r = run_pipeline(client, train, tmp / "run", **{**base, "local_steps": ls, "mode": mode})
                    sps = r["samples"] / r["epoch_seconds"]
                    acc = float(r["history"][-1]["val_accuracy"])
                    out.append(
                        {
                            "run": f"pipeline {mode}",
                            "local_steps": str(ls),
                            "samples/s": sps,
                            "vs in-memory": f"{sps / mem_sps:.2f}x",
                            "rounds": r["history"][-1]["rounds"],
                            "test acc": acc,
                            "acc gap (points)": 100 * (acc_mem - acc),
                        }
                    )
                    numbers[f"{mode}-{ls}"] = {"sps": sps, "acc": acc}
    numbers["memory"] = {"sps": mem_sps, "acc": acc_mem}
    head = (
        f"{dataset if not quick else 'synthetic'}: MLP {'-'.join(map(str, (features, *hidden, n_classes)))}, "
        f"batch {batch}, Adam lr 1e-3 (local), "
        f"{len(Xtr):,} rows x {epochs} epochs per run, accuracy on {len(Xte):,} test rows; "
        f"load average before {load0:.2f}, after {load():.2f}"
    )
    fmt = {"samples/s": ",.0f", "test acc": ".4f", "acc gap (points)": "+.2f", "rounds": "d"}
    text = head + "\n\n" + md_table(out, fmt)
    return text, numbers


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.local_steps", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated local_steps values")
    ap.add_argument("--mode", default="sync", help="comma-separated modes (sync, async, ssp)")
    ap.add_argument(
        "--datasets",
        default="synthetic,letter",
        help="synthetic (MNIST-like, --rows/--epochs) and/or letter (16-256-128-26, batch 128, 8 epochs)",
    )
    args = ap.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    parts = []
    for ds in ["synthetic"] if args.quick else args.datasets.split(","):
        t, _ = run(
            quick=args.quick, rows=args.rows, epochs=args.epochs, steps=steps, modes=args.mode.split(","), dataset=ds
        )
        parts.append(t)
    text = "\n\n".join(parts)
    print(text)
    write_out("local_steps" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
