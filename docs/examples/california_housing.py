"""Linear regression of California house values (data/california_housing/housing.csv).

The CSV (20,640 districts of the 1990 census, 9 columns and the target `median_house_value`)
is ingested into a Zarr store: the text column `ocean_proximity` is one-hot encoded and the
missing `total_bedrooms` values are imputed. A linear model is then fitted by full-batch
gradient descent (`batch_size=0`: every epoch is one step with the mean gradient of all the
training rows) and compared with the exact least-squares solution.

    python docs/examples/california_housing.py [--out DIR]

Writes only under DIR (default: the environment variable PIPELINE_EXAMPLES_OUT, else a new
temporary directory).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split

from pipeline import LinearRegression
from pipeline.ingest import ingest

DATA = Path(__file__).resolve().parents[2] / "data" / "california_housing" / "housing.csv"


def output_dir() -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("PIPELINE_EXAMPLES_OUT"), help="directory for outputs")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="pipeline-example-")
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


def main() -> None:
    out = output_dir()
    store = ingest(DATA, out / "housing.zarr", target="median_house_value")
    X, y = store.X[:], store.y[:]
    print(f"ingested {store.n_rows} rows, {store.n_features} features into {store.path}")
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0)

    gd = LinearRegression(
        solver="minibatch",  # gradient steps ("auto" solves a linear least-squares fit exactly)
        batch_size=0,
        optimizer="sgd",
        learning_rate_init=0.1,
        max_iter=500,
        n_iter_no_change=0,
        validation_fraction=0.0,
        client="local",
        random_state=0,
    )
    gd.fit(X_tr, y_tr)
    print(
        f"full-batch gradient descent, {gd.n_iter_} steps: test R^2 {gd.score(X_te, y_te):.4f}, "
        f"training loss {gd.loss_curve_[0]:.3f} -> {gd.loss_curve_[-1]:.3f} (standardized MSE)"
    )

    # the exact least-squares fit on the same standardized features, for comparison
    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
    std[std == 0] = 1.0
    A = np.column_stack([(X_tr - mean) / std, np.ones(len(X_tr))])
    coef, *_ = np.linalg.lstsq(A, y_tr, rcond=None)
    exact = np.column_stack([(X_te - mean) / std, np.ones(len(X_te))]) @ coef
    print(f"least squares (closed form): test R^2 {r2_score(y_te, exact):.4f}")
    top = np.argsort(-np.abs(coef[:-1]))[:3]
    names = ", ".join(f"{store.feature_names[i]} ({coef[i]:+,.0f} $ per std)" for i in top)
    print(f"largest effects: {names}")


if __name__ == "__main__":
    main()
