"""Short training runs on scikit-learn's digits: each backend reaches MLPClassifier's accuracy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from kernels.mlp import MLPSpec, MLPTrainer

HIDDEN, EPOCHS, BATCH, LR = (32,), 30, 64, 1e-3


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def _train(backend, Xtr, ytr, hidden, epochs, batch, lr, seed=0, n_out=10):
    spec = MLPSpec(Xtr.shape[1], hidden, n_out)
    tr = MLPTrainer(spec, backend=backend, optimizer="adam", lr=lr, max_batch=batch, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(Xtr))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            tr.step(Xtr[idx], ytr[idx])
    return tr


def _accuracy(tr, X, y):
    return float(np.mean(tr.forward(X).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def sklearn_accuracy(digits):
    Xtr, Xte, ytr, yte = digits
    clf = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        solver="adam",
        learning_rate_init=LR,
        batch_size=BATCH,
        max_iter=EPOCHS,
        alpha=0.0,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Xtr, ytr)
    return clf.score(Xte, yte)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_digits_reaches_sklearn_accuracy(digits, sklearn_accuracy, backend):
    Xtr, Xte, ytr, yte = digits
    tr = _train(backend, Xtr, ytr, HIDDEN, EPOCHS, BATCH, LR)
    acc = _accuracy(tr, Xte, yte)
    assert sklearn_accuracy > 0.9
    assert acc >= sklearn_accuracy - 0.02, (acc, sklearn_accuracy)


@pytest.mark.cuda
def test_digits_cuda_matches_cpu_on_reduced_problem():
    """Simulator-sized run: digits 0-2 pooled to 4x4 pixels, 120 samples, hidden 8, 9 steps."""
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    X = (X[keep] / 16.0).astype(np.float32).reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    Xtr, Xte, ytr, yte = train_test_split(X.reshape(-1, 16), y[keep], test_size=0.25, random_state=0, stratify=y[keep])
    args = (Xtr[:120], ytr[:120], (8,), 3, 40, 0.05)
    acc_cpu = _accuracy(_train("cpu", *args, n_out=3), Xte[:90], yte[:90])
    acc_cuda = _accuracy(_train("cuda", *args, n_out=3), Xte[:90], yte[:90])
    assert acc_cpu > 0.8  # chance is 1/3
    assert abs(acc_cuda - acc_cpu) <= 0.02, (acc_cuda, acc_cpu)
