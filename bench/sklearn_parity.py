"""The estimators at their defaults against scikit-learn's at its defaults, on scikit-learn's
bundled datasets (no download), side by side.

    python -m bench.sklearn_parity                          # every estimator, every dataset
    python -m bench.sklearn_parity --datasets iris,diabetes
    python -m bench.sklearn_parity --seeds 0,1,2,3,4        # MLPs: mean over these random_states
    python -m bench.sklearn_parity --passes 3               # fit times from 3 interleaved passes (default 5)
    python -m bench.sklearn_parity --quick                  # iris and diabetes, seed 0, 1 pass

Pairs (ours -> scikit-learn's, each at its defaults):

* ``LogisticRegression`` -> ``make_pipeline(StandardScaler(), LogisticRegression())``;
* ``MLPClassifier`` -> ``make_pipeline(StandardScaler(), MLPClassifier())``;
* ``LinearRegression`` -> ``LinearRegression()`` (standardizing changes nothing for least squares);
* ``MLPRegressor`` -> ``TransformedTargetRegressor(make_pipeline(StandardScaler(), MLPRegressor()),
  transformer=StandardScaler())``.

The scalers do for scikit-learn what ours do inside: standardize the features (and regression
targets) with the training rows' mean and std. Without the target scaler scikit-learn's
``MLPRegressor`` ends at R^2 -1.41 on diabetes (targets of about 150 after 200 epochs of Adam at
lr 1e-3).

Classifiers run on iris, wine, breast_cancer and digits, regressors on diabetes, each split by
``train_test_split(X, y, random_state=0)`` (75% / 25%). Test accuracy or R^2. The linear models
are deterministic (ours: L-BFGS / closed form on in-memory rows); an MLP's result depends on its
initialization and shuffling, so both sides are averaged over the same ``random_state`` values
(``--seeds``; 0 to 4 by default), and the range over them is printed. "diff" is ours minus
scikit-learn's; the estimators are meant to be at most 1 point of accuracy (0.02 R^2) below.

Fit times, under :mod:`bench.protocol`: every (estimator, dataset, side) fits all its seeds once
per pass, ``--passes`` interleaved passes (default 5: a full run takes about 2 minutes on 2
cores), the order rotated by one per pass, after an untimed warm-up fit of each estimator on
each side (kernel compilation, imports). "s/fit" is the median over the passes of a pass's mean
seconds per fit; the second table gives the per-pass ratio ours / scikit-learn (median, range,
every pass). Each fit is seeded, so every pass gives the same scores: the score columns are the
first pass's, and the table says whether every pass agreed. The machine's conditions per pass
(load, steal, other processes' CPU, GEMM peaks) and the versions are recorded. Raw figures:
``bench/results/sklearn_parity-*.json`` (quick runs: ``bench/out/results/sklearn_parity-quick-*.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, write_out

TITLE = "Estimator defaults vs scikit-learn on its bundled datasets"
SIDES = ("ours", "sklearn")
CLASSIFICATION = ("iris", "wine", "breast_cancer", "digits")
REGRESSION = ("diabetes",)
DATASETS = CLASSIFICATION + REGRESSION
ESTIMATORS = ("LogisticRegression", "MLPClassifier", "LinearRegression", "MLPRegressor")
LINEAR = ("LogisticRegression", "LinearRegression")
MARGIN = {"accuracy": 0.01, "r2": 0.02}  # how far below scikit-learn the estimators may be


def split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``X_train, X_test, y_train, y_test`` of a bundled dataset, ``random_state=0``."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0)
    return Xtr, Xte, ytr, yte


def ours(name: str, seed: int) -> Any:
    """The project's estimator ``name`` at its defaults (``random_state`` = ``seed``)."""
    from pipeline import estimator

    return getattr(estimator, name)(random_state=seed)


def theirs(name: str, seed: int) -> Any:
    """scikit-learn's equivalent at its defaults, with the standardization ours does inside."""
    from sklearn import linear_model, neural_network
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "LogisticRegression":
        return make_pipeline(StandardScaler(), linear_model.LogisticRegression())
    if name == "MLPClassifier":
        return make_pipeline(StandardScaler(), neural_network.MLPClassifier(random_state=seed))
    if name == "LinearRegression":
        return linear_model.LinearRegression()
    return TransformedTargetRegressor(
        make_pipeline(StandardScaler(), neural_network.MLPRegressor(random_state=seed)),
        transformer=StandardScaler(),
    )


def pairs(datasets: Sequence[str], estimators: Sequence[str] = ESTIMATORS) -> list[tuple[str, str]]:
    """(estimator, dataset) pairs: classifiers on the classification sets, regressors on the rest."""
    out = []
    for est in estimators:
        regression = est in ("LinearRegression", "MLPRegressor")
        out += [(est, d) for d in datasets if (d in REGRESSION) == regression]
    return out


def fit_side(
    estimator: str,
    side: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """Fit one side (``"ours"`` or ``"sklearn"``) once per seed on the training rows: its test
    scores per seed and the mean seconds per fit (the fit alone, not the scoring)."""
    Xtr, Xte, ytr, yte = data
    make = ours if side == "ours" else theirs
    scores, seconds = [], 0.0
    for seed in seeds:
        est = make(estimator, seed)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning at max_iter
            est.fit(Xtr, ytr)
        seconds += time.perf_counter() - t
        scores.append(float(est.score(Xte, yte)))
    return {"scores": scores, "s/fit": seconds / len(seeds)}


def seeds_for(estimator: str, seeds: Sequence[int]) -> list[int]:
    """The linear models are deterministic: one fit; the MLPs: every seed."""
    return list(seeds)[:1] if estimator in LINEAR else list(seeds)


def row(estimator: str, dataset: str, n_train: int, n_test: int, fig: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A table row from both sides' figures (:func:`fit_side`)."""
    metric = "r2" if dataset in REGRESSION else "accuracy"
    so, ss = fig["ours"]["scores"], fig["sklearn"]["scores"]
    a, b = float(np.mean(so)), float(np.mean(ss))
    return {
        "estimator": estimator,
        "dataset": dataset,
        "train / test": f"{n_train} / {n_test}",
        "metric": metric,
        "seeds": len(so),
        "ours": a,
        "sklearn": b,
        "diff": a - b,
        "ours range": f"{min(so):.3f}-{max(so):.3f}",
        "sklearn range": f"{min(ss):.3f}-{max(ss):.3f}",
        "ours s/fit": fig["ours"]["s/fit"],
        "sklearn s/fit": fig["sklearn"]["s/fit"],
        "within": "yes" if a >= b - MARGIN[metric] else "NO",
    }


def compare(estimator: str, dataset: str, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    """One row: both sides fitted on the training rows and scored on the test rows (mean over
    ``seeds`` for the MLPs, one fit for the deterministic linear models), timed once."""
    data = split(dataset)
    s = seeds_for(estimator, seeds)
    fig = {side: fit_side(estimator, side, data, s) for side in SIDES}
    return row(estimator, dataset, len(data[0]), len(data[1]), fig)


def run(
    datasets: Sequence[str], estimators: Sequence[str], seeds: Sequence[int], passes: int = 5, quick: bool = False
) -> tuple[str, dict[str, Any]]:
    """Every (estimator, dataset, side) once per pass, ``passes`` interleaved passes; the table
    text and the raw figures."""
    m = protocol.meta()
    chosen = pairs(datasets, estimators)
    data = {d: split(d) for d in dict.fromkeys(d for _, d in chosen)}
    warmed: set[str] = set()
    for est, d in chosen:  # warm-up: each estimator once per side on its first dataset, not timed
        if est not in warmed:
            warmed.add(est)
            for side in SIDES:
                fit_side(est, side, data[d], seeds_for(est, seeds)[:1])
    trainers = {
        f"{est}/{d}/{side}": (lambda est=est, d=d, side=side: fit_side(est, side, data[d], seeds_for(est, seeds)))
        for est, d in chosen
        for side in SIDES
    }
    recs = protocol.run_passes(trainers, passes, cores=2, log=lambda s: print(s, file=sys.stderr, flush=True))
    rows, ratios = [], []
    same = True
    for est, d in chosen:
        per = {side: [p["results"][f"{est}/{d}/{side}"] for p in recs] for side in SIDES}
        same &= all(f["scores"] == per[side][0]["scores"] for side in SIDES for f in per[side])
        fig = {
            side: {"scores": per[side][0]["scores"], "s/fit": float(np.median([f["s/fit"] for f in per[side]]))}
            for side in SIDES
        }
        rows.append(row(est, d, len(data[d][0]), len(data[d][1]), fig))
        ratios.append(
            {
                "estimator": est,
                "dataset": d,
                "fit time ours / sklearn": protocol.ratio_summary(
                    [f["s/fit"] for f in per["ours"]], [f["s/fit"] for f in per["sklearn"]]
                ),
            }
        )
    payload = {
        "benchmark": "sklearn_parity",
        "meta": m,
        "quick": quick,
        "args": {"datasets": list(datasets), "estimators": list(estimators), "seeds": list(seeds), "passes": passes},
        "passes": recs,
        "rows": rows,
        "ratios": ratios,
        "scores identical in every pass": same,
    }
    path = protocol.save_json("sklearn_parity-quick" if quick else "sklearn_parity", payload, quick)
    if passes == 1:
        note = "scores from the one pass"
    elif same:
        note = f"scores identical in all {passes} passes"
    else:
        note = f"scores NOT identical across the {passes} passes: the columns give the first pass's"
    fmt = {"ours": ".4f", "sklearn": ".4f", "diff": "+.4f", "ours s/fit": ".3f", "sklearn s/fit": ".3f"}
    lines = [
        *protocol.table_head(TITLE, m),
        "Estimators at their defaults vs scikit-learn at its defaults. Test accuracy / R^2, "
        f"train_test_split(random_state=0); MLPs averaged over random_state {', '.join(map(str, seeds))}; {note}. "
        f"Within: at most {MARGIN['accuracy'] * 100:.0f} point ({MARGIN['r2']} R^2) below scikit-learn. "
        f"s/fit: median over {passes} interleaved pass(es) of the mean seconds per fit.",
        "",
        md_table(rows, fmt),
        "",
        "| estimator | dataset | fit time, ours / scikit-learn (per pass; below 1.00x ours is faster) |",
        "| --- | --- | --- |",
        *(
            f"| {r['estimator']} | {r['dataset']} | {protocol.fmt_ratio(r['fit time ours / sklearn'])} |"
            for r in ratios
        ),
        *protocol.table_tail(recs, path),
    ]
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.sklearn_parity", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="iris and diabetes, seed 0, 1 pass unless --passes is given")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--passes", type=int, default=None, help="interleaved passes (default 5; --quick: 1)")
    args = ap.parse_args(argv)
    datasets = ["iris", "diabetes"] if args.quick else [d for d in args.datasets.split(",") if d]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s]
    passes = args.passes if args.passes is not None else (1 if args.quick else 5)
    text, _ = run(datasets, [e for e in args.estimators.split(",") if e], seeds, passes, args.quick)
    print(text)
    write_out("sklearn_parity" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
