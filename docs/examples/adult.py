"""Logistic regression on the UCI Adult census data (data/adult): does income exceed $50K?

adult.data (32,561 people) is ingested into a training store: the text columns (workclass,
education, occupation, ...) are one-hot encoded and missing values (`?`) imputed. adult.test
(16,281 people) is ingested with `like=` the training store, so that it gets the same
encodings, the same classes and the training statistics. A multinomial logistic regression
(a network without hidden layers, softmax output) is fitted on the training rows and scored
on the test rows, next to scikit-learn's LogisticRegression on the same features.

    python docs/examples/adult.py [--out DIR]

Writes only under DIR (default: the environment variable PIPELINE_EXAMPLES_OUT, else a new
temporary directory).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import LogisticRegression
from pipeline.ingest import ingest

DATA = Path(__file__).resolve().parents[2] / "data" / "adult"


def output_dir() -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("PIPELINE_EXAMPLES_OUT"), help="directory for outputs")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="pipeline-example-")
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


def main() -> None:
    out = output_dir()
    train = ingest(DATA / "adult.data", out / "adult-train.zarr")
    test = ingest(DATA / "adult.test", out / "adult-test.zarr", like=train.path)
    print(
        f"train {train.n_rows} rows, test {test.n_rows} rows, {train.n_features} encoded features, "
        f"classes {train.classes}"
    )
    X_tr, y_tr = train.X[:], train.y[:]  # y: class indices into train.classes
    X_te, y_te = test.X[:], test.y[:]

    # the exact solver (L-BFGS on the full batch) until it converges, as scikit-learn's
    clf = LogisticRegression(max_iter=100, client="local", random_state=0)
    clf.fit(X_tr, y_tr)
    acc = clf.score(X_te, y_te)
    print(f"pipeline LogisticRegression: test accuracy {acc:.4f} after {clf.n_iter_} iterations")
    sk = make_pipeline(StandardScaler(), SkLogisticRegression(max_iter=1000)).fit(X_tr, y_tr)
    print(f"scikit-learn LogisticRegression: test accuracy {sk.score(X_te, y_te):.4f}")
    majority = np.bincount(y_tr).argmax()
    print(f"always predicting {train.classes[majority]!r}: test accuracy {np.mean(y_te == majority):.4f}")


if __name__ == "__main__":
    main()
