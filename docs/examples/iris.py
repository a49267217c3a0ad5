"""Classify scikit-learn's bundled iris flowers (150 rows, 4 features, 3 species).

A small multi-layer perceptron trained in this process (no cluster for small arrays), scored
on a held-out quarter of the rows next to the same network with the perceptron's step units
and scikit-learn's own MLPClassifier.

    python docs/examples/iris.py
"""

from __future__ import annotations

import warnings

from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import MLPClassifier


def main() -> None:
    iris = load_iris()
    X, y = iris.data, iris.target_names[iris.target]  # labels as species names
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)

    # 150 rows: small batches and enough epochs; features are standardized by the estimator
    clf = MLPClassifier(
        hidden_layer_sizes=(16,),
        batch_size=16,
        learning_rate_init=1e-2,
        max_iter=100,
        n_iter_no_change=0,
        random_state=0,
    )
    clf.fit(X_tr, y_tr)
    print(f"pipeline MLPClassifier: test accuracy {clf.score(X_te, y_te):.3f} after {clf.n_iter_} epochs")

    # the perceptron's threshold units (1 if x > 0 else 0) in the hidden layer: their derivative
    # is 0 almost everywhere, so they learn through the straight-through gradient
    step = MLPClassifier(
        hidden_layer_sizes=(16,),
        activation="step",
        batch_size=16,
        learning_rate_init=1e-2,
        max_iter=100,
        n_iter_no_change=0,
        random_state=0,
    ).fit(X_tr, y_tr)
    print(f"with step (threshold) hidden units: test accuracy {step.score(X_te, y_te):.3f}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = make_pipeline(StandardScaler(), SkMLP((16,), max_iter=2000, random_state=0)).fit(X_tr, y_tr)
    print(f"scikit-learn MLPClassifier: test accuracy {sk.score(X_te, y_te):.3f}")
    print("first test flowers:", ", ".join(clf.predict(X_te[:4])), "| true:", ", ".join(y_te[:4]))


if __name__ == "__main__":
    main()
