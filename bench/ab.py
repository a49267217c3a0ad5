"""What a code change is worth on its own: the pipeline's throughput row against another checkout's.

    git worktree add /tmp/base COMMIT               # the code to compare with
    python -m bench.ab --baseline /tmp/base         # 5 interleaved passes
    python -m bench.ab --baseline /tmp/base --quick # tiny sizes, one pass (smoke run)

Figures of two full ``bench.throughput`` runs hours apart mix the code with the host (its GEMM
peaks moved by 20% between runs here). This runs ``bench.throughput``'s default pipeline row (the
same 120,000 x 784 synthetic store and 10,000 test rows, MLP 784-512-256-10, batch 256, 2 epochs,
validated after each) for this checkout and for the one in ``--baseline`` side by side: each run a
process of its own with its checkout first on ``PYTHONPATH`` (the driver, the scheduler's
parameter server and the 2 workers of a fresh LocalCluster all run that code), an untimed
one-epoch job on the test rows first, the two sides' order alternated by pass (bench/protocol.py:
conditions per pass, raw figures in ``bench/results/ab-*.json``). Samples/s are the throughput
row's: the rows trained over the epochs' seconds, validation included. The per-pass ratio this
checkout / baseline is the change's own speed-up; the test accuracy says whether the two trained
the same model. Nothing here is a target. Not part of ``python -m bench`` (it needs a baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, child_env, md_table, mnist_like, tmpdir, write_out
from bench.protocol import (
    conditions_table,
    fmt_ratio,
    meta,
    provenance_lines,
    ratio_summary,
    run_passes,
    save_json,
)

OWN = "this checkout"
BASE = "baseline"

# One timed run, in a process of its own: only the project's public API (present in the
# baseline's checkout too), with the throughput row's cluster and settings.
RUNNER = """
import json, logging, sys
from pathlib import Path

if __name__ == "__main__":
    from pipeline.config import TrainConfig
    from pipeline.connect import cluster_client
    from pipeline.store import open_store
    from pipeline.train import train

    for name in ("distributed", "distributed.worker.memory", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.ERROR)
    train_path, test_path, out, settings = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    base = {**settings, "validation_store": test_path}
    with cluster_client(workers=2, threads_per_worker=1, memory_limit="auto", dashboard_address=None) as client:
        warm = TrainConfig.from_dict({**base, "epochs": 1, "validation_store": ""})
        train(test_path, warm, out / "warm", client=client, force=True)
        res = train(train_path, TrainConfig.from_dict(base), out / "run", client=client, force=True)
    hist = res.history
    print(json.dumps({
        "samples": sum(h["samples"] for h in hist),
        "seconds": sum(h["seconds"] for h in hist),
        "acc": float(hist[-1]["val_accuracy"]),
    }))
"""


def _side(code: Path, script: Path, train: Any, test: Any, out: Path, settings: dict) -> dict[str, Any]:
    """One timed run of ``code``'s pipeline: its figures, or the error that stopped it."""
    proc = subprocess.run(
        [sys.executable, str(script), str(train.path), str(test.path), str(out), json.dumps(settings)],
        cwd=code,
        env=child_env(code),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not last:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the pipeline of {code} failed (exit {proc.returncode}): {tail}")
    r = json.loads(last[0])
    return {"seconds": r["seconds"], "samples": r["samples"], "acc": r["acc"], "samples/s": r["samples"] / r["seconds"]}


def run(baseline: Path, quick: bool = False, passes: int = 5) -> tuple[str, dict[str, Any]]:
    if quick:
        rows, test_rows, features, hidden, epochs, passes, peak_n = 4_000, 1_000, 64, [32, 16], 1, 1, 256
    else:
        rows, test_rows, features, hidden, epochs, peak_n = 120_000, 10_000, 784, [512, 256], 2, 1024
    settings = {"hidden": hidden, "epochs": epochs, "patience": 0, "batch_size": 256}
    m = meta()
    base_commit = _commit(baseline)
    with tmpdir("bench-ab-") as tmp:
        train, test = mnist_like(tmp, rows, test_rows, features, 10)
        script = tmp / "run_pipeline.py"
        script.write_text(RUNNER)

        def side(code: Path, out: Path) -> Any:
            return lambda: _side(code, script, train, test, out, settings)

        fns = {OWN: side(ROOT, tmp / "own"), BASE: side(baseline, tmp / "baseline")}
        recs = run_passes(fns, passes, cores=2, peak_n=peak_n, log=lambda s: print(s, file=sys.stderr, flush=True))
    sps = {n: [p["results"][n]["samples/s"] for p in recs] for n in (OWN, BASE)}
    accs = {n: [p["results"][n]["acc"] for p in recs] for n in (OWN, BASE)}
    ratio = ratio_summary(sps[OWN], sps[BASE])
    table = [
        {
            "side": f"{n} ({m['commit'][:7] if n == OWN else base_commit[:7]})",
            "samples/s (median)": float(np.median(sps[n])),
            "samples/s per pass": " / ".join(f"{v / 1e3:.1f}k" for v in sps[n]),
            "test acc per pass": " / ".join(f"{a:.4f}" for a in accs[n]),
        }
        for n in (OWN, BASE)
    ]
    payload = {
        "benchmark": "ab",
        "meta": m,
        "quick": quick,
        "baseline": {"path": str(baseline), "commit": base_commit},
        "rows": rows,
        "test_rows": test_rows,
        "features": features,
        "settings": settings,
        "passes": recs,
        "ratio": ratio,
    }
    m["json"] = str(save_json("ab" + ("-quick" if quick else ""), payload, quick))
    text = "\n".join(
        [
            f"The pipeline's throughput row (bench.throughput's data and settings: {rows:,} x {features} rows, "
            f"MLP {features}-{'-'.join(map(str, hidden))}-10, batch 256, {epochs} epoch(s), validated after each) "
            f"for this checkout against {baseline} ({base_commit[:12]}), each run a process of its own on a fresh "
            f"2-worker LocalCluster; {passes} interleaved pass(es), order alternated.",
            "",
            *provenance_lines(m),
            "",
            "Conditions per pass:",
            "",
            conditions_table(recs),
            "",
            md_table(table, {"samples/s (median)": ",.0f"}),
            "",
            f"This checkout / baseline, samples/s: {fmt_ratio(ratio)}.",
            f"Same test accuracy in every pass: {'yes' if accs[OWN] == accs[BASE] else 'no'}.",
        ]
    )
    return text, payload


def _commit(code: Path) -> str:
    """The commit checked out in ``code`` (its files may differ: the JSON keeps the path)."""
    proc = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path, help="another checkout of this project to compare with")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes of both sides")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one pass (smoke run)")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be >= 1")
    if not (args.baseline / "pipeline" / "train.py").is_file():
        ap.error(f"--baseline {args.baseline} is not a checkout of this project (no pipeline/train.py in it)")
    text, _ = run(args.baseline.resolve(), quick=args.quick, passes=args.passes)
    print(text)
    write_out("ab" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
