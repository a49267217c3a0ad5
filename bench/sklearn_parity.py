"""The estimators at their defaults against scikit-learn's at its defaults, on scikit-learn's
bundled datasets (no download), side by side.

    python -m bench.sklearn_parity                          # every estimator, every dataset
    python -m bench.sklearn_parity --datasets iris,diabetes
    python -m bench.sklearn_parity --seeds 0,1,2,3,4        # MLPs: mean over these random_states
    python -m bench.sklearn_parity --quick                  # iris and diabetes, seed 0

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
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import load, machine, md_table, write_out

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


def compare(estimator: str, dataset: str, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    """One row: both sides fitted on the training rows and scored on the test rows (mean over
    ``seeds`` for the MLPs, one fit for the deterministic linear models)."""
    Xtr, Xte, ytr, yte = split(dataset)
    seeds = list(seeds)[:1] if estimator in LINEAR else list(seeds)
    scores: dict[str, list[float]] = {"ours": [], "sklearn": []}
    seconds: dict[str, float] = {"ours": 0.0, "sklearn": 0.0}
    for seed in seeds:
        for side, make in (("ours", ours), ("sklearn", theirs)):
            est = make(estimator, seed)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning at max_iter
                est.fit(Xtr, ytr)
            seconds[side] += time.perf_counter() - t
            scores[side].append(float(est.score(Xte, yte)))
    metric = "r2" if dataset in REGRESSION else "accuracy"
    a, b = float(np.mean(scores["ours"])), float(np.mean(scores["sklearn"]))
    return {
        "estimator": estimator,
        "dataset": dataset,
        "train / test": f"{len(Xtr)} / {len(Xte)}",
        "metric": metric,
        "seeds": len(seeds),
        "ours": a,
        "sklearn": b,
        "diff": a - b,
        "ours range": f"{min(scores['ours']):.3f}-{max(scores['ours']):.3f}",
        "sklearn range": f"{min(scores['sklearn']):.3f}-{max(scores['sklearn']):.3f}",
        "ours s/fit": seconds["ours"] / len(seeds),
        "sklearn s/fit": seconds["sklearn"] / len(seeds),
        "within": "yes" if a >= b - MARGIN[metric] else "NO",
    }


def run(datasets: Sequence[str], estimators: Sequence[str], seeds: Sequence[int]) -> tuple[str, list[dict]]:
    m = machine()
    rows = [compare(e, d, seeds) for e, d in pairs(datasets, estimators)]
    fmt = {"ours": ".4f", "sklearn": ".4f", "diff": "+.4f", "ours s/fit": ".2f", "sklearn s/fit": ".2f"}
    head = (
        f"Estimators at their defaults vs scikit-learn at its defaults; {m['cpu']}, {m['cores']} cores, "
        f"load {load():.2f}, {m['date']}. Test accuracy / R^2, train_test_split(random_state=0); "
        f"MLPs averaged over random_state {', '.join(map(str, seeds))}. "
        f"Within: at most {MARGIN['accuracy'] * 100:.0f} point ({MARGIN['r2']} R^2) below scikit-learn."
    )
    return head + "\n\n" + md_table(rows, fmt), rows


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.sklearn_parity", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="iris and diabetes, seed 0")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args(argv)
    datasets = ["iris", "diabetes"] if args.quick else [d for d in args.datasets.split(",") if d]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s]
    text, _ = run(datasets, [e for e in args.estimators.split(",") if e], seeds)
    print(text)
    write_out("sklearn_parity" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
