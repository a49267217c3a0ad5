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

Protocol (:mod:`bench.protocol`): each dataset's cluster run, round trips and in-memory epochs
are one pass wrapped in :func:`bench.protocol.measure_pass`, which records the load average
before and after, steal, other processes' CPU and the GEMM peaks; one pass per dataset, as the
figures are medians over the epochs of that pass rather than comparisons between alternatives
(the conditions table, one row per dataset, says whether each pass ran under load). The table
starts with the commit and versions and ends with those conditions. Raw figures: every epoch's
record of the pipeline's history (including the first, left out of the medians), the 30 round
trips, the in-memory epoch times and the medians of the table, written to
``bench/results/epoch_anatomy-<UTC time>.json`` (quick runs: ``bench/out/results/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import (
    KernelPeer,
    arrays,
    local_cluster,
    md_table,
    run_pipeline,
    tmpdir,
    write_out,
)

DATASETS = ("letter", "adult", "shuttle")
TITLE = "Where an epoch goes on small stores"


def _noop(x: int) -> int:
    return x


def round_trips(client: Any, n_tasks: int, repeats: int = 30) -> list[float]:
    """Seconds to submit ``n_tasks`` no-op tasks and gather their results, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        client.gather([client.submit(_noop, i, pure=False) for i in range(n_tasks)])
        times.append(time.perf_counter() - t)
    return times


def one_dataset(name: str, tmp: Path, epochs: int, quick: bool) -> dict[str, Any]:
    """One dataset's pass: the pipeline on a fresh cluster, the no-op round trips and the epochs
    in memory inside :func:`bench.protocol.measure_pass`. Returns a pass record (``pass``,
    ``order``, ``conditions``, ``results``) tagged with ``dataset``; its results keep the raw
    figures (``history``: every epoch's record) beside the medians of the table."""
    from bench.time_to_accuracy import prepare

    train, test, split = prepare(name, tmp, quick)
    Xtr, ytr = arrays(train)
    task = train.task
    n_out = len(train.classes) if task == "classification" else ytr.shape[1]
    ym = float(train.y_mean[0]) if task != "classification" else 0.0
    ys = float(train.y_std[0]) if task != "classification" else 1.0
    with protocol.measure_pass(cores=2) as cond:
        with local_cluster(2) as client:
            n_threads = sum(client.nthreads().values())
            rtts = round_trips(client, n_threads)
            r = run_pipeline(
                client, train, tmp / f"{name}-run", validation_store=str(test.path), epochs=epochs, patience=0
            )
        kp = KernelPeer(Xtr, ytr, (256, 128), n_out, task=task, y_mean=ym, y_std=ys)
        kp.epoch()  # compile
        mem = []
        for _ in range(3 if quick else 5):
            t = time.perf_counter()
            kp.epoch()
            mem.append(time.perf_counter() - t)
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
    figures = {
        "split": split,
        "rows": (train.n_rows, test.n_rows),
        "epochs_run": len(r["history"]),
        "epochs": len(hist),
        "epoch": med("seconds"),
        "train": med("train_s"),
        "validate": med("validate_s"),
        "per_task": per_task,
        "overhead": overhead,
        "rtt": float(np.median(rtts)),
        "memory": float(np.median(mem)),
        "in_tasks": in_tasks,
        "tasks": len(hist[-1]["tasks"]),
        "rounds": (hist[-1]["rounds"] - hist[0]["rounds"]) / max(1, len(hist) - 1),
        "raw": {"history": r["history"], "round_trips_s": rtts, "memory_epochs_s": mem, "wall": r["wall"]},
    }
    return {"pass": 1, "order": [name], "conditions": cond, "results": {name: figures}, "dataset": name}


def run(datasets: Sequence[str] = DATASETS, epochs: int = 15, quick: bool = False) -> tuple[str, dict[str, Any]]:
    """Each dataset's pass in turn; the table text and the JSON payload."""
    if quick:
        datasets, epochs = ("letter",), 3
    m = protocol.meta()
    recs = []
    with tmpdir("bench-anatomy-") as tmp:
        for name in datasets:
            print(f"epoch anatomy: {name}", file=sys.stderr, flush=True)
            recs.append(one_dataset(name, tmp, epochs, quick))
    ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
    rows = []
    for p in recs:
        r = p["results"][p["dataset"]]
        pt = r["per_task"]
        rows.append(
            {
                "dataset": p["dataset"],
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
    payload = {"benchmark": "epoch_anatomy", "meta": m, "quick": quick, "epochs": epochs, "passes": recs, "rows": rows}
    path = protocol.save_json("epoch_anatomy-quick" if quick else "epoch_anatomy", payload, quick)
    lines = [
        *protocol.table_head(TITLE, m),
        f"Median epoch anatomy over {epochs} epochs (the first left out), TrainConfig() defaults, 2-worker "
        "LocalCluster, validation on the test store; one pass per dataset, each on a fresh cluster.",
        "",
        md_table(rows),
        *protocol.table_tail(
            recs,
            path,
            "Conditions per pass (one pass per dataset, in the order of the table; the first trainer column "
            "names the dataset)",
            name=lambda p: p["dataset"],
        ),
    ]
    return "\n".join(lines), payload


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
