"""Statistical efficiency: epochs to a fixed test accuracy on 2 workers against one process.

    python -m bench.statistical_efficiency                 # synthetic 60k x 784 and letter, 3 seeds
    python -m bench.statistical_efficiency --quick         # tiny smoke run
    python -m bench.statistical_efficiency --datasets letter --variant local_steps=4 --variant aggregate=mean

The target: epochs to a fixed validation accuracy on 2 workers at most ``TARGET`` (1.25x) the
epochs of the same model trained in one process, median of 3 seeds. Per dataset, per seed, the
same store, model and settings are trained

* **1 process**: ``pipeline.train.train(client=None)``, the in-process path (``pipeline.local``:
  the same kernels, loader and server optimizer, one share, one BLAS thread), what ``pipeline
  train`` does on stores below ``cluster_min_rows``;
* **2 workers**: ``pipeline.train.train`` on a 2-worker, 1-thread LocalCluster (``--workers 2``):
  sync rounds, each worker trains its share for ``local_steps`` minibatches with its own local
  Adam, the parameter server applies the round's combined delta with its server optimizer.

Both validate on the same held-out test store after every epoch (``validation_store``; with
``ema`` on, the averaged weights, which is what the pipeline validates and saves), with early
stopping off (``patience = 0``) for a fixed epoch budget (``BUDGET``). Reported: the first epoch
(1-based) whose test accuracy reaches the threshold, per seed and the median with its range; the
ratio 2-worker / 1-process epochs per seed (both of the same seed) and of the medians; whether the
target holds per seed, for the median, and under the protocol (in at least ``ceil(0.8 x seeds)``
seeds). A run that never reaches the threshold has no epoch (its ratio is a miss). Also given for
orientation: a fractional epoch count interpolated linearly between the two epochs around the
threshold (finer than whole epochs; the target is read on whole epochs), the best and last
accuracy within the budget, seconds per epoch (validation included) and seconds of epochs to the
threshold, so the trade-off in throughput is visible beside the epochs.

**Variants.** ``default`` and ``ema=0`` run unless ``--no-ema0`` (each against the one-process run
with the same ``ema``). ``--variant KEY=VALUE[,KEY=VALUE]`` adds a 2-worker run with settings changed, e.g.
``local_steps=4`` or ``server_lr=1.5``; its one-process reference keeps the defaults except the keys
that also mean something in one process (``REFERENCE_KEYS``: ``ema``, the model and the local
optimizer), so a round-structure change (``local_steps``, ``aggregate``, ``server_*``, ...) is
compared with the same one-process run as the default.

**Thresholds (``THRESHOLDS``), fixed in code before the reported runs.** The epoch budget must hold
the level for both systems and the level must sit on the rising part of the one-process curve, a
few epochs in (a threshold reached in epoch 1 by both cannot tell 1x from 2x):

* ``letter`` (``bench.time_to_accuracy``'s split, rows 0:16000 / 16000:, the default model
  16-256-128-26, batch 256): 0.94, the value ``bench.time_to_accuracy`` has fixed since 2026-12-01
  (then 99% of the lowest best-epoch metric of its trainers); the one-process curve rises through
  it around epoch 15, well inside the 40-epoch budget for both systems.
* ``synthetic`` (``pipeline.synth``, 784 uint8 features, 10 classes, 60,000 training rows and a
  separate 10,000-row test store; MLP 784-512-256-10, batch 256, Adam lr 1e-3 as in the issue's
  throughput targets): 0.595. The issue's 97.5% is an MNIST figure; this set's test accuracy
  saturates near 0.61 (a noisy teacher) and then falls as the model memorizes the 60,000 rows. A
  pilot of both systems with seed 100 (not a reported seed;
  ``bench/results/statistical_efficiency-20261201T195414Z.json``) gave, with ``ema`` on, one process
  0.5905 / 0.6063 / 0.6001 after epochs 1-3 (training loss 1.53 / 0.82 / 0.53) and 2 workers
  0.5145 / 0.6067 / 0.6154 (1.94 / 1.14 / 0.81): 0.595 is the highest level below the one-process
  peak that the one-process run does not reach in epoch 1, and it reaches it in epoch 2. **The
  resolution is coarse**: at 2 epochs a whole-epoch ratio can only be 1, 1.5 or 2, so the
  interpolated ratio and the training loss per epoch (in the JSON) say more than the verdict.
  Budget: 8 epochs (the test accuracy falls after epoch 3 as the model memorizes the rows; without
  ``ema`` the one-process pilot reached 0.595 at epoch 8 and the 2-worker one not in 10).
Sync runs are deterministic: the epochs and accuracies do not depend on the machine's load; the
seconds do (each seed is one protocol pass, the trainers' order rotated, the conditions recorded).
Raw figures: ``bench/results/statistical_efficiency-*.json`` (:mod:`bench.protocol`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import OUT, load, local_cluster, md_table, run_pipeline, tmpdir, write_out

DATASETS = ("synthetic", "letter")
# fixed before the reported runs (module docstring); --quick: QUICK_THRESHOLD
THRESHOLDS = {"synthetic": 0.595, "letter": 0.94}
BUDGET = {"synthetic": 8, "letter": 40}  # epochs per run
SETTINGS: dict[str, dict[str, Any]] = {
    "synthetic": {"hidden": [512, 256], "batch_size": 256},  # the MLP 784-512-256-10
    "letter": {},  # the pipeline's defaults (16-256-128-26, batch 256)
}
QUICK_THRESHOLD, QUICK_BUDGET = 0.75, 4  # --quick: letter, 2 seeds
TARGET = 1.25  # 2-worker epochs / 1-process epochs, at most
# settings a one-process reference shares with the 2-worker variant it is compared with; every other
# key (local_steps, aggregate, server_*, warmup, schedule, mode, overlap, ...) shapes the rounds
REFERENCE_KEYS = {
    "ema",
    "hidden",
    "activation",
    "loss",
    "optimizer",
    "lr",
    "momentum",
    "beta1",
    "beta2",
    "rho",
    "weight_decay",
    "batch_size",
}
BASE_VARIANTS = {"default": {}, "ema=0": {"ema": 0.0}}


def parse_variant(text: str) -> dict[str, Any]:
    """``"local_steps=4,server_lr=1.5"`` -> settings, checked like ``pipeline train --set``."""
    from pipeline.config import TrainConfig

    items = [s.strip() for s in text.split(",") if s.strip()]
    cfg = TrainConfig().with_overrides(items)
    return {k: getattr(cfg, k) for k in (s.partition("=")[0].strip() for s in items)}


def prepare(name: str, tmp: Path, quick: bool) -> tuple[Any, Any, str]:
    """(train store, test store, description)."""
    from bench.common import mnist_like

    if name == "synthetic":
        a, b = mnist_like(tmp / "synth", 60_000, 10_000, 784, 10)
        return a, b, "synth 784 uint8, 10 classes, 60,000 / 10,000"
    if name == "letter":
        from bench.time_to_accuracy import prepare as tta_prepare

        return tta_prepare("letter", tmp)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def first_epoch(curve: Sequence[float], thr: float) -> int | None:
    """The first epoch (1-based) whose accuracy reaches ``thr``; None if none does."""
    return next((i + 1 for i, a in enumerate(curve) if a >= thr), None)


def interpolated_epoch(curve: Sequence[float], thr: float) -> float | None:
    """Fractional epochs to ``thr``: linear between the epoch before and the first one reaching
    it (accuracy 1/classes-ish is not assumed before epoch 1: epoch 1 counts as 1.0)."""
    e = first_epoch(curve, thr)
    if e is None or e == 1:
        return None if e is None else 1.0
    a, b = curve[e - 2], curve[e - 1]
    return e - 1 + (thr - a) / (b - a) if b > a else float(e)


def reference_of(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k in REFERENCE_KEYS}


def _key(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(settings.items())) or (
        "default"
    )


def one_run(client: Any, train: Any, test: Any, tmp: Path, cfg: dict[str, Any], thr: float) -> dict[str, Any]:
    if client is not None:
        # a nanny restarting a worker that missed its heartbeats on a loaded machine leaves the
        # cluster short for a moment; the job needs both workers (the epochs depend on the shares)
        client.wait_for_workers(2, timeout=300)
    r = run_pipeline(client, train, tmp / "run", **cfg)
    hist = r["history"]
    curve = [float(h["val_accuracy"]) for h in hist]
    e = first_epoch(curve, thr)
    return {
        "curve": curve,
        "train_loss": [float(h["train_loss"]) for h in hist],
        "rounds": [int(h["rounds"]) for h in hist],
        "epoch_seconds": [float(h["seconds"]) for h in hist],
        "epochs_to_threshold": e,
        "interpolated": interpolated_epoch(curve, thr),
        "seconds_to_threshold": None if e is None else float(sum(h["seconds"] for h in hist[:e])),
        "best": max(curve),
        "last": curve[-1],
        "samples": r["samples"],
    }


def run(
    quick: bool = False,
    datasets: Sequence[str] = DATASETS,
    seeds: Sequence[int] = (0, 1, 2),
    variants: dict[str, dict[str, Any]] | None = None,
    budget: dict[str, int] | None = None,
    ema0: bool = True,
    log: Any = print,
) -> tuple[str, dict[str, Any]]:
    base_variants = {k: v for k, v in BASE_VARIANTS.items() if ema0 or k != "ema=0"}
    variants = {**base_variants, **(variants or {})}
    if quick:
        datasets, seeds = ("letter",), tuple(seeds)[:2]
    m = protocol.meta()
    load0 = load()
    results: dict[str, Any] = {}
    with tmpdir("bench-stateff-") as tmp, local_cluster(2) as client:
        for name in datasets:
            train, test, split = prepare(name, tmp, quick)
            thr = QUICK_THRESHOLD if quick else THRESHOLDS[name]
            epochs = QUICK_BUDGET if quick else (budget or BUDGET)[name]
            settings = SETTINGS[name]
            base = {**settings, "epochs": epochs, "patience": 0, "validation_store": str(test.path)}
            # trainers: one-process references (deduplicated) and 2-worker variants
            trainers: dict[str, tuple[str, dict[str, Any]]] = {}
            refs: dict[str, str] = {}
            for vname, vset in variants.items():
                ref = reference_of(vset)
                rname = f"1 process [{_key(ref)}]"
                trainers.setdefault(rname, ("1 process", ref))
                trainers[f"2 workers [{vname}]"] = ("2 workers", vset)
                refs[vname] = rname
            # warm the workers (imports, compiled kernels); times only, the epochs do not depend on it
            for warm in (client, None):  # and this process (its kernels' compiled code)
                run_pipeline(warm, test, tmp / "warm", **{**base, "epochs": 1, "validation_store": ""})
            passes = []
            for k, seed in enumerate(seeds):
                order = protocol.rotated(list(trainers), k)
                got: dict[str, Any] = {}
                with protocol.measure_pass() as cond:
                    for tname in order:
                        system, vset = trainers[tname]
                        log(f"{name} seed {seed}: {tname}")
                        got[tname] = one_run(
                            client if system == "2 workers" else None,
                            train,
                            test,
                            tmp,
                            {**base, **vset, "seed": seed},
                            thr,
                        )
                passes.append({"seed": seed, "order": order, "conditions": cond, "results": got})
            results[name] = partial = {
                "split": split,
                "rows": [train.n_rows, test.n_rows],
                "settings": settings,
                "threshold": thr,
                "budget": epochs,
                "variants": variants,
                "references": refs,
                "passes": passes,
            }
            # what is done so far, should a later dataset fail (git-ignored; the full JSON is below)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / f"statistical_efficiency-partial-{name}.json").write_text(json.dumps(partial, default=str))
    payload = {"benchmark": "statistical_efficiency", "meta": m, "quick": quick, "target": TARGET, "results": results}
    m["json"] = str(protocol.save_json("statistical_efficiency" + ("-quick" if quick else ""), payload, quick))
    return render(results, m, load0, seeds), results


def _fmt_epochs(vals: Sequence[int | None]) -> str:
    got = [v for v in vals if v is not None]
    per = " / ".join("-" if v is None else str(v) for v in vals)
    if len(got) * 2 <= len(vals):
        return f"not reached in most seeds ({per})"
    med = float(np.median(got)) if len(got) == len(vals) else None
    if med is None:  # a miss counts as later than any epoch: the median of the seeds with misses last
        s = sorted(vals, key=lambda v: np.inf if v is None else v)
        mid = s[len(s) // 2]
        return f"{mid} ({per}; {len(got)} of {len(vals)})"
    return f"{med:g} ({min(got)}-{max(got)}; {per})"


def _median_epochs(vals: Sequence[int | None]) -> float | None:
    if any(v is None for v in vals):
        s = sorted(vals, key=lambda v: np.inf if v is None else v)
        mid = s[len(s) // 2] if len(s) % 2 else None
        return None if mid is None else float(mid)
    return float(np.median(vals))


def render(results: dict[str, Any], m: dict[str, Any], load0: float, seeds: Sequence[int]) -> str:
    parts = [
        "\n".join(protocol.provenance_lines(m))
        + f"\nLoad average before {load0:.2f}, after {load():.2f}. Target: 2-worker epochs <= {TARGET:g}x the "
        "one-process epochs to the same test accuracy (per seed; median of the seeds; protocol: in at least "
        f"{protocol.needed(len(seeds))} of {len(seeds)} seeds). Epochs are deterministic (sync); seconds are not."
    ]
    for name, res in results.items():
        passes = res["passes"]
        need = protocol.needed(len(passes))
        per = {t: [p["results"][t] for p in passes] for t in passes[0]["results"]}
        rows = []
        for tname, runs in per.items():
            e = [r["epochs_to_threshold"] for r in runs]
            interp = [r["interpolated"] for r in runs]
            st = [r["seconds_to_threshold"] for r in runs]
            spe = [float(np.median(r["epoch_seconds"])) for r in runs]
            ig = [v for v in interp if v is not None]
            sg = [v for v in st if v is not None]
            rows.append(
                {
                    "trainer": tname,
                    "epochs to threshold: median (range; per seed)": _fmt_epochs(e),
                    "interpolated epochs (median)": f"{np.median(ig):.2f}" if ig else "n/a",
                    "best acc (median)": float(np.median([r["best"] for r in runs])),
                    "last acc (median)": float(np.median([r["last"] for r in runs])),
                    "rounds/epoch": f"{runs[0]['rounds'][-1] / len(runs[0]['rounds']):.0f}",
                    "s/epoch (median)": float(np.median(spe)),
                    "s to threshold (median)": f"{np.median(sg):.1f}" if sg else "n/a",
                }
            )
        ratio_rows = []
        for vname, rname in res["references"].items():
            two, one = per[f"2 workers [{vname}]"], per[rname]
            ratios = [
                (a["epochs_to_threshold"] / b["epochs_to_threshold"])
                if a["epochs_to_threshold"] and b["epochs_to_threshold"]
                else None
                for a, b in zip(two, one, strict=True)
            ]
            ok = [r is not None and r <= TARGET + 1e-9 for r in ratios]
            m2 = _median_epochs([a["epochs_to_threshold"] for a in two])
            m1 = _median_epochs([b["epochs_to_threshold"] for b in one])
            med = None if m1 is None or m2 is None else m2 / m1
            ir = [
                a["interpolated"] / b["interpolated"]
                for a, b in zip(two, one, strict=True)
                if a["interpolated"] and b["interpolated"]
            ]
            tput = [
                float(np.median(b["epoch_seconds"]) / np.median(a["epoch_seconds"]))
                for a, b in zip(two, one, strict=True)
            ]
            tt = [
                a["seconds_to_threshold"] / b["seconds_to_threshold"]
                for a, b in zip(two, one, strict=True)
                if a["seconds_to_threshold"] and b["seconds_to_threshold"]
            ]
            hits = sum(ok)
            ratio_rows.append(
                {
                    "2 workers [variant]": vname,
                    "vs": rname,
                    "epoch ratio per seed": " / ".join("miss" if r is None else f"{r:.2f}" for r in ratios),
                    f"<= {TARGET:g}x per seed": " / ".join("yes" if o else "NO" for o in ok),
                    "ratio of medians": "n/a" if med is None else f"{med:.2f}x",
                    "median met?": "n/a" if med is None else ("yes" if med <= TARGET + 1e-9 else "NO"),
                    "protocol": f"{'met' if hits >= need else 'NOT met'} ({hits} of {len(ratios)})",
                    "interpolated ratio (median)": f"{np.median(ir):.2f}x" if ir else "n/a",
                    "epoch speed 2w/1p (median)": f"{np.median(tput):.2f}x",
                    "time-to-threshold ratio (median)": f"{np.median(tt):.2f}x" if tt else "n/a",
                }
            )
        s = res["settings"]
        fmt = {"best acc (median)": ".4f", "last acc (median)": ".4f", "s/epoch (median)": ".2f"}
        parts.append(
            f"**{name}** ({res['split']}; hidden {s.get('hidden', [256, 128])}, batch {s.get('batch_size', 256)}, "
            f"test accuracy >= {res['threshold']:g} fixed in code, budget {res['budget']} epochs, patience 0)\n\n"
            + md_table(rows, fmt)
            + "\n\n"
            + md_table(ratio_rows)
            + "\n\nConditions per seed (pass):\n\n"
            + protocol.conditions_table(
                [{"pass": p["seed"], "order": p["order"], "conditions": p["conditions"]} for p in passes]
            )
        )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.statistical_efficiency", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", default="", help="epochs per dataset, e.g. synthetic=8,letter=40")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="a 2-worker run with settings changed (repeatable); default and ema=0 always run",
    )
    ap.add_argument("--no-ema0", action="store_true", help="skip the ema=0 pair")
    args = ap.parse_args(argv)
    from pipeline.errors import ConfigError

    try:
        variants = {v: parse_variant(v) for v in args.variant}
    except ConfigError as exc:
        ap.error(str(exc))
    budget = dict(BUDGET)
    for item in filter(None, args.budget.split(",")):
        k, _, v = item.partition("=")
        if k not in BUDGET or not v.isdigit() or int(v) < 1:
            ap.error(f"--budget {item!r}: expected NAME=EPOCHS with NAME in {', '.join(BUDGET)}")
        budget[k] = int(v)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        ap.error(f"--datasets: unknown {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    text, _ = run(args.quick, datasets, seeds, variants, budget, ema0=not args.no_ema0)
    print(text)
    stem = "statistical_efficiency" + ("-quick" if args.quick else "")
    write_out(stem, text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
