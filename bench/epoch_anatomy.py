"""Where a pipeline epoch's time goes on small stores, beside the same epoch in memory and Dask's
own task round trip on the same cluster.

    python -m bench.epoch_anatomy                          # letter, adult, shuttle
    python -m bench.epoch_anatomy --datasets adult --epochs 20
    python -m bench.epoch_anatomy --quick                  # letter, 3 epochs (smoke run)

Per dataset: the train / test split of ``bench.time_to_accuracy``, a fresh 2-worker LocalCluster
(1 thread each), ``TrainConfig()`` defaults with the test store as validation store and
``patience=0``; the first epoch (JIT compilation, worker caches) is left out and the medians of
the others are reported. Columns:

* **epoch**: the epoch's wall time in the driver;
* **training phase**: training tasks submitted until all finished (``train_s`` in history.json);
  in sync mode (the default) this includes the validation: the shares validate the epoch's
  final weights inside their tasks, each on a slice of the validation rows;
* **validation**: ``validate_s``: validated in the tasks, the slowest share's validation (part
  of the training phase); otherwise the separate validation pass, its own round of tasks;
* **per task: compute / read / wait at PS**: inside one training task, mean over the tasks: the
  kernels' minibatch steps, waiting for the loader, and waiting for the parameter server's
  replies (sync barriers included);
* **task overhead**: training phase minus the mean task's compute + read + wait (and minus the
  validation when it ran inside the tasks): submission, scheduling, the task's join/leave,
  gathering results;
* **no-op round trip**: submit one no-op task per worker thread and gather them, median of 30, on
  the same cluster: the floor Dask puts under any phase of an epoch;
* **in memory**: the same model and batch in one process over the same rows (this project's
  kernels, 2 BLAS threads), for the gap.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    KernelPeer,
    arrays,
    load,
    local_cluster,
    md_table,
    run_pipeline,
    tmpdir,
    write_out,
)

DATASETS = ("letter", "adult", "shuttle")


def _noop(x: int) -> int:
    return x


def round_trip(client: Any, n_tasks: int, repeats: int = 30) -> float:
    """Median seconds to submit ``n_tasks`` no-op tasks and gather their results."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        client.gather([client.submit(_noop, i, pure=False) for i in range(n_tasks)])
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def one_dataset(name: str, tmp: Path, epochs: int, quick: bool) -> dict[str, Any]:
    from bench.time_to_accuracy import prepare

    train, test, _ = prepare(name, tmp, quick)
    with local_cluster(2) as client:
        n_threads = sum(client.nthreads().values())
        rtt = round_trip(client, n_threads)
        r = run_pipeline(client, train, tmp / f"{name}-run", validation_store=str(test.path), epochs=epochs, patience=0)
    hist = r["history"][1:] or r["history"]
    med = lambda key: float(np.median([h[key] for h in hist]))  # noqa: E731
    per_task = {
        k: float(np.median([h[k] / max(1, len(h["tasks"])) for h in hist]))
        for k in ("compute_s", "read_s", "communicate_s")
    }
    # the slowest task bounds the phase from below; approximate it by the mean task (tasks are
    # equal shares of the rows in the default sync mode)
    in_tasks = all(h.get("validated_in_tasks") for h in hist)
    overhead = med("train_s") - sum(per_task.values()) - (med("validate_s") if in_tasks else 0.0)
    Xtr, ytr = arrays(train)
    task = train.task
    n_out = len(train.classes) if task == "classification" else ytr.shape[1]
    ym = float(train.y_mean[0]) if task != "classification" else 0.0
    ys = float(train.y_std[0]) if task != "classification" else 1.0
    kp = KernelPeer(Xtr, ytr, (256, 128), n_out, task=task, y_mean=ym, y_std=ys)
    kp.epoch()  # compile
    mem = []
    for _ in range(3 if quick else 5):
        t = time.perf_counter()
        kp.epoch()
        mem.append(time.perf_counter() - t)
    return {
        "name": name,
        "rows": (train.n_rows, test.n_rows),
        "epochs": len(hist),
        "epoch": med("seconds"),
        "train": med("train_s"),
        "validate": med("validate_s"),
        "per_task": per_task,
        "overhead": overhead,
        "rtt": rtt,
        "memory": float(np.median(mem)),
        "in_tasks": in_tasks,
        "tasks": len(hist[-1]["tasks"]),
        "rounds": (hist[-1]["rounds"] - hist[0]["rounds"]) / max(1, len(hist) - 1),
    }


def run(datasets: Sequence[str] = DATASETS, epochs: int = 15, quick: bool = False) -> tuple[str, list[dict]]:
    if quick:
        datasets, epochs = ("letter",), 3
    load0 = load()
    res = []
    with tmpdir("bench-anatomy-") as tmp:
        for name in datasets:
            res.append(one_dataset(name, tmp, epochs, quick))
    ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
    rows = []
    for r in res:
        pt = r["per_task"]
        rows.append(
            {
                "dataset": r["name"],
                "train / validation rows": f"{r['rows'][0]:,} / {r['rows'][1]:,}",
                "epochs (median of)": r["epochs"],
                "tasks / rounds per epoch": f"{r['tasks']} / {r['rounds']:.0f}",
                "epoch ms": ms(r["epoch"]),
                "training phase ms": ms(r["train"]),
                "validation ms": ms(r["validate"]) + (" (in tasks)" if r["in_tasks"] else " (own pass)"),
                "per task: compute / read / wait at PS ms": f"{ms(pt['compute_s'])} / {ms(pt['read_s'])} / "
                f"{ms(pt['communicate_s'])}",
                "task overhead ms": ms(r["overhead"]),
                "no-op round trip ms": ms(r["rtt"]),
                "in memory ms": ms(r["memory"]),
                "epoch / in memory": f"{r['epoch'] / r['memory']:.1f}x",
            }
        )
    head = (
        f"median epoch anatomy (first epoch left out), TrainConfig() defaults, 2-worker LocalCluster, "
        f"validation on the test store; load average before {load0:.2f}, after {load():.2f}"
    )
    return head + "\n\n" + md_table(rows), res


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.epoch_anatomy", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    text, _ = run([d for d in args.datasets.split(",") if d], args.epochs, args.quick)
    print(text)
    write_out("epoch_anatomy" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
