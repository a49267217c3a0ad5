"""Overlap: does sending a round's delta while the next round computes keep the accuracy?

    python -m bench.overlap            # letter + 784-wide synthetic, 3 seeds
    python -m bench.overlap --quick    # tiny smoke run
    python -m bench.overlap --datasets synthetic-784 --synthetic-rows 120000   # 4x the rounds

``overlap = true`` sends the delta of round t and keeps stepping; the reply is folded in
``overlap_steps`` local steps later (waiting for it there if it is late) with the correction
``w = w_server + (w_local - w_at_push)`` (pipeline/worker.py, ``_Pusher``), so the steps taken
while the push travelled are kept and their delta goes out with the next push: no lost work,
``overlap_steps`` steps of staleness. Two overlapped rows: folded after 1 step (the default,
``overlap_steps = 1``) and at the next push boundary (``overlap_steps = local_steps``: a whole
round of staleness). The same
datasets, models, epochs (so the same samples) and seeds as ``bench.ps_compression``'s accuracy
part, sync mode on a 2-worker LocalCluster; each seed is one protocol pass (both settings, the
order rotated). Target: overlap within 0.5 points of the non-overlapped run in at least
``ceil(0.8 x seeds)`` seeds. Epoch seconds are given for orientation only (one shared machine;
bench.throughput is the place for throughput).

A variant (``--datasets``, ``--synthetic-rows``: the synthetic set with more rows, so more
rounds of the same samples per round) keeps its raw figures as ``overlap_variant-*.json``: the
targets table stays judged on the default run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import load, local_cluster, md_table, run_pipeline, tmpdir, write_out
from bench.ps_compression import _datasets

SETTINGS = ("overlap off", "overlap on", "overlap on, folded at the next push")
OVERLAPPED = SETTINGS[1:]


def _overrides(setting: str, local_steps: int) -> dict[str, Any]:
    """The config keys of one row."""
    if setting == "overlap off":
        return {"overlap": False}
    return {"overlap": True, "overlap_steps": 1 if setting == "overlap on" else local_steps}


TARGET_POINTS = 0.5
SYNTHETIC_ROWS = 30_000  # the synthetic set's training rows (bench.ps_compression's accuracy runs)


def results_name(datasets: Sequence[str] | None = None, synthetic_rows: int = SYNTHETIC_ROWS) -> str:
    """The raw figures' and table's name: ``overlap`` for the default run (the one the targets
    table judges), ``overlap_variant`` for a run of other datasets or rows."""
    return "overlap_variant" if datasets is not None or synthetic_rows != SYNTHETIC_ROWS else "overlap"


def run(
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    datasets: Sequence[str] | None = None,
    synthetic_rows: int = SYNTHETIC_ROWS,
) -> tuple[str, dict[str, Any]]:
    if quick:
        seeds = tuple(seeds)[:2]
    meta = protocol.meta()
    load0 = load()
    results: dict[str, Any] = {}
    with tmpdir("bench-overlap-") as tmp, local_cluster(2) as client:
        for name, train, test, settings in _datasets(tmp, quick, datasets, synthetic_rows):
            base = {**settings, "patience": 0, "validation_store": str(test.path), "min_share_gflop": 0.0}
            run_pipeline(client, test, tmp / "warm", **{**base, "epochs": 1, "validation_store": ""})
            passes = []
            for k, seed in enumerate(seeds):
                order = protocol.rotated(SETTINGS, k)
                got: dict[str, dict[str, float]] = {}
                with protocol.measure_pass() as cond:
                    for setting in order:
                        keys = _overrides(setting, int(base.get("local_steps", 8)))
                        r = run_pipeline(client, train, tmp / "run", **base, seed=seed, **keys)
                        got[setting] = {"acc": float(r["history"][-1]["val_accuracy"]), "seconds": r["epoch_seconds"]}
                passes.append({"seed": seed, "order": order, "conditions": cond, "results": got})
            results[name] = {"settings": settings, "rows": [train.n_rows, test.n_rows], "passes": passes}
    stem = results_name(datasets, synthetic_rows)
    payload = {"meta": meta, "results": results, "synthetic_rows": synthetic_rows}
    path = protocol.save_json(stem + ("-quick" if quick else ""), payload, quick)
    meta["json"] = str(path)
    parts = ["\n".join(protocol.provenance_lines(meta)) + f"\nLoad average before {load0:.2f}, after {load():.2f}."]
    for name, res in results.items():
        passes = res["passes"]
        need = protocol.needed(len(passes))
        rows = []
        for setting in SETTINGS:
            row: dict[str, Any] = {"setting": setting}
            for p in passes:
                row[f"seed {p['seed']} acc"] = p["results"][setting]["acc"]
            row["median acc"] = float(np.median([p["results"][setting]["acc"] for p in passes]))
            row["median epoch s (sum)"] = float(np.median([p["results"][setting]["seconds"] for p in passes]))
            if setting in OVERLAPPED:
                gaps = [100 * (p["results"]["overlap off"]["acc"] - p["results"][setting]["acc"]) for p in passes]
                hits = sum(g <= TARGET_POINTS for g in gaps)
                row["gap per seed (points)"] = " / ".join(f"{g:+.2f}" for g in gaps)
                row["target"] = (
                    f"within {TARGET_POINTS:g}: {'met' if hits >= need else 'NOT met'} ({hits} of {len(gaps)})"
                )
            else:
                row["gap per seed (points)"] = "-"
                row["target"] = "-"
            rows.append(row)
        s = res["settings"]
        fmt = {k: ".4f" for r in rows for k in r if k.endswith("acc")}
        fmt["median epoch s (sum)"] = ".1f"
        parts.append(
            f"**{name}** ({res['rows'][0]:,} / {res['rows'][1]:,} rows, hidden {s['hidden']}, batch "
            f"{s['batch_size']}, {s['epochs']} epochs, sync, 2 workers; a positive gap = overlap below)\n\n"
            + md_table(rows, fmt)
            + "\n\nConditions per seed (pass):\n\n"
            + protocol.conditions_table(
                [{"pass": p["seed"], "order": p["order"], "conditions": p["conditions"]} for p in passes]
            )
        )
    return "\n\n".join(parts), results


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="", help="comma-separated: letter, synthetic-784 (default both)")
    ap.add_argument("--synthetic-rows", type=int, default=SYNTHETIC_ROWS, help="the synthetic set's training rows")
    args = ap.parse_args(argv)
    names = [d for d in args.datasets.split(",") if d] or None
    text, _ = run(args.quick, tuple(int(s) for s in args.seeds.split(",")), names, args.synthetic_rows)
    print(text)
    write_out(results_name(names, args.synthetic_rows) + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
