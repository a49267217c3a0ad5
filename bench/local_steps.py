"""How the push interval trades throughput for convergence, under :mod:`bench.protocol`.

    python -m bench.local_steps              # local_steps 1..32, MNIST-like 120k rows x 2 epochs, and letter; 5 passes
    python -m bench.local_steps --passes 3   # fewer interleaved passes
    python -m bench.local_steps --quick      # tiny smoke run (1 pass; ``--passes 2`` checks determinism)

For each ``local_steps`` the pipeline trains end to end from the Zarr store on a 2-worker
LocalCluster (1 thread each), default config otherwise (sync, server SGD lr 1 on the sum of
deltas, no overlap) with the MLP 784-512-256-10, batch 256, ``--epochs`` passes; the reference
is ``kernels.mlp.MLPTrainer`` in one process (2 BLAS threads, the cluster's workers idle beside
it) on the same rows for the same number of samples. The default run also sweeps ``letter`` (the
customary 16,000 / 4,000 split, MLP 16-256-128-26, batch 128, 8 epochs) to set beside the scratch
simulation in DESIGN.md section 5. ``--mode async`` repeats the sweep in async mode.

Passes: per dataset, every run (the in-memory reference and each ``local_steps``) trains once
per pass, ``--passes`` passes (default 5) with the order rotated per pass
(:func:`bench.protocol.run_passes`), the machine's load, steal, other processes' CPU and GEMM
peaks recorded per pass. A full run takes about 5-6 minutes on 2 cores (about 50 s a pass for
both datasets at the samples/s last recorded in bench/RESULTS.md, plus generating the
130,000-row store and two cluster starts), well under 12 minutes, hence 5 passes.

Reported per run: samples/s (sum of epoch seconds, validation pass included), the median over
the passes; the per-pass ratios against ``local_steps`` 8 (the default) and against the
in-memory reference, with their median and range; rounds; test accuracy on the held-out rows,
with the gap to the in-memory run. One seed (0) per cell, so the accuracy needs no repeated
passes: the table gives the first pass's and says whether every pass reproduced it exactly (sync
mode is deterministic given the seed: two passes of ``--quick --passes 2`` gave identical
accuracies); where passes differ (async mode) the cell adds their range. Differences under ~1
point between cells are noise of the seed. Raw figures (every pass's figures and conditions,
every epoch's validation accuracy and seconds) are written to
``bench/results/local_steps-<UTC time>.json`` (quick runs: ``bench/out/results/``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import (
    KernelPeer,
    arrays,
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
MEMORY = "kernels in memory"
TITLE = "Push interval: throughput vs convergence"


def key(mode: str, ls: int) -> str:
    """A pipeline run's name in the passes (and the conditions table's first-trainer column)."""
    return f"pipeline {mode}, local_steps {ls}"


def sweep(
    dataset: str,
    quick: bool,
    rows: int,
    epochs: int,
    steps: Sequence[int],
    modes: Sequence[str],
    passes: int,
) -> dict[str, Any]:
    """One dataset's interleaved passes: the in-memory reference and every (mode, local_steps)
    pipeline run, each once per pass on one 2-worker cluster. Returns the settings and the pass
    records of :func:`bench.protocol.run_passes` (each tagged with ``dataset``)."""
    batch, n_classes, test_rows = 256, 10, 10_000
    features, hidden = 784, (512, 256)
    if quick:
        rows, test_rows, features, hidden, epochs = 4_000, 1_000, 64, (32, 16), 1
    elif dataset == "letter":  # DESIGN.md section 5's scratch simulation: letter, batch 128, 8 epochs
        hidden, batch, epochs = (256, 128), 128, 8
    with tmpdir("bench-ls-") as tmp:
        if dataset == "letter" and not quick:
            from bench.time_to_accuracy import prepare

            train, test, _ = prepare("letter", tmp)
            features, n_classes = train.n_features, len(train.classes)
        else:
            train, test = mnist_like(tmp, rows, test_rows, features, n_classes)
        Xtr, ytr = arrays(train)
        Xte, yte = arrays(test, like=train)
        KernelPeer(Xtr, ytr, hidden, n_classes, batch=batch).tr.step(Xtr[:batch], ytr[:batch].astype("int32"))

        def memory() -> dict[str, Any]:
            kp = KernelPeer(Xtr, ytr, hidden, n_classes, batch=batch)
            dt = timed_epochs(kp, epochs)
            return {
                "samples/s": epochs * len(Xtr) / dt,
                "seconds": dt,
                "samples": epochs * len(Xtr),
                "acc": metric(kp.predict(Xte), yte, "classification"),
            }

        with local_cluster(2) as client:
            # min_share_gflop 0 (also the default): the sweep is about local steps between two
            # workers, whatever the store's size
            base = pipeline_settings(test, hidden, epochs, batch, min_share_gflop=0.0)
            run_pipeline(client, test, tmp / "warm", **{**base, "epochs": 1, "validation_store": ""})

            def pipeline(mode: str, ls: int) -> dict[str, Any]:
                r = run_pipeline(client, train, tmp / "run", **{**base, "local_steps": ls, "mode": mode})
                hist = r["history"]
                return {
                    "samples/s": r["samples"] / r["epoch_seconds"],
                    "samples": r["samples"],
                    "epoch_seconds": r["epoch_seconds"],
                    "wall": r["wall"],
                    "rounds": hist[-1]["rounds"],
                    "acc": float(hist[-1]["val_accuracy"]),
                    "val_accuracy per epoch": [float(h["val_accuracy"]) for h in hist],
                    "epoch seconds": [float(h["seconds"]) for h in hist],
                }

            trainers: dict[str, Any] = {MEMORY: memory}
            for mode in modes:
                for ls in steps:
                    trainers[key(mode, ls)] = lambda mode=mode, ls=ls: pipeline(mode, ls)
            log = lambda s: print(f"{dataset}: {s}", file=sys.stderr, flush=True)  # noqa: E731
            recs = [{**p, "dataset": dataset} for p in protocol.run_passes(trainers, passes, cores=2, log=log)]
    return {
        "dataset": dataset,
        "model": [features, *hidden, n_classes],
        "batch": batch,
        "epochs": epochs,
        "train_rows": len(Xtr),
        "test_rows": len(Xte),
        "passes": recs,
    }


def _acc(values: list[float]) -> tuple[float, str, bool]:
    """(the first pass's accuracy, its cell, whether every pass gave exactly the same)."""
    same = all(v == values[0] for v in values)
    if same:
        return values[0], f"{values[0]:.4f}", True
    return values[0], f"{values[0]:.4f} (passes {min(values):.4f}-{max(values):.4f})", False


def section(
    res: dict[str, Any], steps: Sequence[int], modes: Sequence[str], default_ls: int
) -> tuple[list[str], list[dict], list[dict]]:
    """One dataset's table lines, its rows (medians) and its per-pass ratio summaries."""
    recs = res["passes"]
    fig = lambda name, k: [p["results"][name][k] for p in recs]  # noqa: E731
    mem_sps = fig(MEMORY, "samples/s")
    mem_acc, mem_cell, mem_same = _acc(fig(MEMORY, "acc"))
    rows: list[dict] = []
    summary: list[dict] = []
    not_same: list[str] = [] if mem_same else [MEMORY]
    rows.append(
        {
            "run": MEMORY,
            "local_steps": "-",
            "samples/s": float(np.median(mem_sps)),
            "vs in-memory": "1.00x",
            "rounds": None,
            "test acc": mem_cell,
            "acc gap (points)": 0.0,
        }
    )
    for mode in modes:
        ref = key(mode, default_ls) if default_ls in steps else None
        for ls in steps:
            name = key(mode, ls)
            sps = fig(name, "samples/s")
            vs_mem = protocol.ratio_summary(sps, mem_sps)
            vs_def = protocol.ratio_summary(sps, fig(ref, "samples/s")) if ref else None
            acc, cell, same = _acc(fig(name, "acc"))
            if not same:
                not_same.append(name)
            rows.append(
                {
                    "run": f"pipeline {mode}",
                    "local_steps": str(ls),
                    "samples/s": float(np.median(sps)),
                    "vs in-memory": f"{vs_mem['median']:.2f}x",
                    "rounds": fig(name, "rounds")[0],
                    "test acc": cell,
                    "acc gap (points)": 100 * (mem_acc - acc),
                }
            )
            summary.append(
                {
                    "dataset": res["dataset"],
                    "mode": mode,
                    "local_steps": ls,
                    "samples/s per pass": sps,
                    f"vs local_steps {default_ls}": vs_def,
                    "vs in-memory": vs_mem,
                    "acc per pass": fig(name, "acc"),
                }
            )
    n = len(recs)
    head = (
        f"{res['dataset']}: MLP {'-'.join(map(str, res['model']))}, batch {res['batch']}, Adam lr 1e-3 (local), "
        f"{res['train_rows']:,} rows x {res['epochs']} epoch{'s' if res['epochs'] != 1 else ''} per run, "
        f"accuracy on {res['test_rows']:,} test rows; "
        f"samples/s and 'vs in-memory' are medians over {n} interleaved pass(es), accuracy the first pass's."
    )
    fmt = {"samples/s": ",.0f", "acc gap (points)": "+.2f", "rounds": "d"}
    lines = [head, "", md_table(rows, fmt), ""]
    lines += [
        f"| run | local_steps | samples/s vs local_steps {default_ls} (per pass) | samples/s vs in memory (per pass) |",
        "| --- | ---: | --- | --- |",
    ]
    for s in summary:
        vd = s[f"vs local_steps {default_ls}"]
        if s["local_steps"] == default_ls:
            cell = "the reference"
        else:
            cell = protocol.fmt_ratio(vd) if vd else f"n/a (local_steps {default_ls} not swept)"
        lines.append(
            f"| pipeline {s['mode']} | {s['local_steps']} | {cell} | {protocol.fmt_ratio(s['vs in-memory'])} |"
        )
    lines.append("")
    if n == 1:
        lines.append("Accuracy: one pass, so not checked for reproducibility here.")
    elif not_same:
        lines.append(
            f"Accuracy differed between passes (same seed) for: {', '.join(not_same)}; the others were identical "
            f"in all {n} passes."
        )
    else:
        lines.append(f"Accuracy: identical in all {n} passes for every run (same seed).")
    return lines, rows, summary


def run(
    quick: bool = False,
    rows: int = 120_000,
    epochs: int = 2,
    steps: Sequence[int] = STEPS,
    modes: Sequence[str] = ("sync",),
    datasets: Sequence[str] = ("synthetic", "letter"),
    passes: int = 5,
) -> tuple[str, dict[str, Any]]:
    """Every dataset's sweep under the protocol; the table text and the JSON payload."""
    from pipeline.config import TrainConfig

    default_ls = TrainConfig().local_steps
    if quick:
        datasets, steps = ("synthetic",), (1, 8)
    m = protocol.meta()
    results = [sweep(ds, quick, rows, epochs, steps, modes, passes) for ds in datasets]
    lines = protocol.table_head(TITLE, m)
    all_rows: list[dict] = []
    summaries: list[dict] = []
    for res in results:
        sec, rws, summ = section(res, steps, modes, default_ls)
        lines += [*sec, ""]
        all_rows += [{"dataset": res["dataset"], **r} for r in rws]
        summaries += summ
    recs = [p for res in results for p in res["passes"]]
    payload = {
        "benchmark": "local_steps",
        "meta": m,
        "quick": quick,
        "default_local_steps": default_ls,
        "settings": [{k: v for k, v in res.items() if k != "passes"} for res in results],
        "passes": recs,
        "rows": all_rows,
        "summary": summaries,
    }
    path = protocol.save_json("local_steps-quick" if quick else "local_steps", payload, quick)
    first, *rest = [res["dataset"] for res in results]
    what = f"{'first ' if rest else ''}the {first} sweep's passes" + "".join(f", then the {d} sweep's" for d in rest)
    lines += protocol.conditions_tail(recs, "dataset", what, path)[1:]
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.local_steps", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, 1 pass unless --passes is given)")
    ap.add_argument("--passes", type=int, default=None, help="interleaved passes (default 5; quick runs 1)")
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
    passes = args.passes if args.passes is not None else (1 if args.quick else 5)
    text, _ = run(
        quick=args.quick,
        rows=args.rows,
        epochs=args.epochs,
        steps=tuple(int(s) for s in args.steps.split(",")),
        modes=[s for s in args.mode.split(",") if s],
        datasets=[d for d in args.datasets.split(",") if d],
        passes=passes,
    )
    print(text)
    write_out("local_steps" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
