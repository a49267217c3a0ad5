"""The fitted attributes and methods a scikit-learn user expects of the estimators, read from
the real training history: ``loss_``, ``best_loss_``, ``loss_curve_``, ``validation_scores_``,
``best_validation_score_``, ``t_``, ``n_layers_`` / ``n_outputs_`` / ``out_activation_``,
``predict_log_proba``, ``LogisticRegression.decision_function`` and the ConvergenceWarning of a
minibatch fit that runs out of epochs; in this process, on a cluster, through save / load."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import log_loss, r2_score

from pipeline import estimator as est_mod
from pipeline.estimator import (
    LinearRegression,
    LogisticRegression,
    MLPClassifier,
    MLPRegressor,
    load_estimator,
)

MAX_ITER = r"Stochastic Optimizer: Maximum iterations \(%d\) reached and the optimization hasn't converged yet\."
RECORD = (
    "loss_",
    "best_loss_",
    "loss_curve_",
    "validation_scores_",
    "best_validation_score_",
    "t_",
    "n_iter_",
    "fitted_on_",
)


@pytest.fixture(autouse=True, scope="module")
def _no_stray_cluster() -> Iterator[None]:
    yield
    est_mod.shutdown_local_cluster()


def _blobs(n: int = 400, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian blobs in 4 features (not separable: the losses stay away from 0)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(n, 4)) + 1.2 * np.eye(4)[y % 4] * (1 + y // 4)[:, None]
    return X * [1.0, 3.0, 0.5, 2.0] + [0.0, 5.0, -1.0, 2.0], y


def _regression(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, X @ [1.0, -2.0, 0.5, 0.0] + np.sin(2 * X[:, 0]) + 0.3 * rng.normal(size=n) + 10


def _held_out_rows(n: int, seed: int, fraction: float = 0.1) -> np.ndarray:
    """The rows an in-process fit with ``early_stopping=True`` holds out (its split's seed)."""
    return np.random.default_rng([seed, 1]).permutation(n)[: int(n * fraction)]


def _record(est: Any) -> dict[str, Any]:
    return {name: getattr(est, name) for name in RECORD}


# --------------------------------------------------------------------------------------------
# the training record, in this process
# --------------------------------------------------------------------------------------------


def test_loss_and_loss_curve_are_the_epochs_training_losses():
    """``loss_curve_[k]`` is epoch k's mean training loss: with full-batch steps, the log loss of
    the weights after k steps, which a fit of k epochs keeps (the loss falls every epoch)."""
    X, y = _blobs()
    kw = dict(hidden_layer_sizes=(8,), batch_size=0, learning_rate_init=0.05, n_iter_no_change=0, random_state=0)
    three = MLPClassifier(max_iter=3, **kw).fit(X, y)
    assert three.n_iter_ == 3 and len(three.loss_curve_) == 3
    assert three.loss_ == three.loss_curve_[-1] == three.history_[-1]["train_loss"]
    assert three.best_loss_ == min(three.loss_curve_) == three.loss_curve_[-1]
    assert three.validation_scores_ is None and three.best_validation_score_ is None
    assert three.t_ == 3 * len(X)
    for k in (1, 2):
        fewer = MLPClassifier(max_iter=k, **kw).fit(X, y)
        assert fewer.loss_curve_ == pytest.approx(three.loss_curve_[:k], rel=1e-6)
        assert three.loss_curve_[k] == pytest.approx(log_loss(y, fewer.predict_proba(X)), rel=1e-4)


def test_best_loss_is_the_least_training_loss_when_the_curve_rises():
    """A learning rate too large: the loss rises after its minimum, so the least loss
    (``best_loss_``, whose epoch's weights the fit keeps) is not the last one (``loss_``)."""
    X, y = _blobs(seed=1)
    clf = MLPClassifier(
        hidden_layer_sizes=(16,), optimizer="sgd", learning_rate_init=3.0, batch_size=16, max_iter=12, random_state=0
    )
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 12):
        clf.fit(X, y)
    curve = clf.loss_curve_
    assert clf.best_loss_ == min(curve) and clf.loss_ == curve[-1]
    assert clf.best_loss_ < clf.loss_  # the curve did rise again
    reg = MLPRegressor(hidden_layer_sizes=(6,), max_iter=4, n_iter_no_change=0, random_state=0).fit(*_regression())
    assert reg.loss_ == reg.loss_curve_[-1] and reg.best_loss_ == min(reg.loss_curve_)
    assert all(isinstance(v, float) for v in (reg.loss_, reg.best_loss_))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_validation_scores_are_the_held_out_rows_scores(task):
    """With early stopping, ``validation_scores_`` are the accuracy / R^2 of every epoch's model on
    the held-out rows; the kept model (the best score's, as scikit-learn's) scores it there."""
    if task == "classification":
        X, y = _blobs(600)
        est: Any = MLPClassifier(hidden_layer_sizes=(8,), max_iter=25, early_stopping=True, random_state=3)
        key = "val_accuracy"
    else:
        X, y = _regression(600)
        est = MLPRegressor(hidden_layer_sizes=(8,), max_iter=25, early_stopping=True, random_state=3)
        key = "val_r2"
    est.set_params(n_iter_no_change=3, tol=1e-3, learning_rate_init=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # whether it stops before 25 epochs: not the point
        est.fit(X, y)
    scores = est.validation_scores_
    assert isinstance(scores, list) and len(scores) == est.n_iter_ == len(est.loss_curve_)
    assert scores == [h[key] for h in est.history_]
    assert est.best_validation_score_ == max(scores)
    assert est.best_loss_ is None  # the validation loss chose the model, as in scikit-learn
    assert est.t_ == est.n_iter_ * (len(X) - int(0.1 * len(X)))
    va = _held_out_rows(len(X), 3)
    best = int(np.argmax(scores))
    if task == "classification":
        assert abs(np.mean(est.predict(X[va]) == y[va]) - scores[best]) <= 1 / len(va)
        assert 0.5 < scores[best] <= 1
    else:
        assert r2_score(y[va], est.predict(X[va])) == pytest.approx(scores[best], rel=1e-3)
        assert 0.3 < scores[best] <= 1


def test_exact_linear_solvers_record_their_one_solution():
    X, y = _blobs()
    logit = LogisticRegression().fit(X, y)  # L-BFGS to convergence: no warning
    assert logit.loss_curve_ == [logit.loss_] and logit.best_loss_ == logit.loss_
    assert logit.loss_ == pytest.approx(log_loss(y, logit.predict_proba(X)), rel=1e-4)
    assert logit.n_iter_ == logit.history_[0]["iterations"] > 1 and logit.validation_scores_ is None
    Xr, t = _regression()
    lin = LinearRegression().fit(Xr, t)
    resid = (t - lin.predict(Xr)) / t.std()  # the loss is the squared error of standardized targets
    assert lin.loss_ == pytest.approx(np.mean(resid**2), rel=1e-6) and lin.n_iter_ == 1


def test_sklearn_shape_attributes():
    from sklearn.neural_network import MLPClassifier as SkMLPClassifier
    from sklearn.neural_network import MLPRegressor as SkMLPRegressor

    X, y = _blobs(120)
    Xr, t = _regression(120)
    kw = dict(hidden_layer_sizes=(5, 4), max_iter=2)
    cases = [
        (MLPClassifier(n_iter_no_change=0, **kw), SkMLPClassifier(**kw), X, y),
        (MLPClassifier(n_iter_no_change=0, **kw), SkMLPClassifier(**kw), X, y % 2),
        (MLPRegressor(n_iter_no_change=0, **kw), SkMLPRegressor(**kw), Xr, np.c_[t, -t]),
    ]
    for ours, theirs, Xc, yc in cases:
        ours.fit(Xc, yc)
        with pytest.warns(ConvergenceWarning):
            theirs.fit(Xc, yc)
        for name in ("n_layers_", "n_outputs_", "out_activation_", "t_", "n_iter_"):
            assert getattr(ours, name) == getattr(theirs, name), name
        assert [c.shape for c in ours.coefs_] == [c.shape for c in theirs.coefs_]
    for name in (*RECORD, "n_layers_", "n_outputs_", "out_activation_"):
        assert not hasattr(MLPClassifier(), name), name  # unfitted: not there, as in scikit-learn


# --------------------------------------------------------------------------------------------
# ConvergenceWarning
# --------------------------------------------------------------------------------------------


def test_a_minibatch_fit_that_runs_out_of_epochs_warns_as_scikit_learn():
    X, y = _blobs(200)
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 3) as caught:
        clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0).fit(X, y)
    assert clf.n_iter_ == 3 and len(caught) == 1
    assert caught[0].filename == __file__  # said of the caller's line, as scikit-learn's
    Xr, t = _regression(200)
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 2):
        MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, early_stopping=True, random_state=0).fit(Xr, t)
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 2):
        LogisticRegression(solver="minibatch", max_iter=2, random_state=0).fit(X, y)


def test_no_warning_when_early_stopping_ends_the_fit_or_is_off():
    """Warnings are errors in these tests: each fit below must not warn."""
    X, y = _blobs(200)
    # tol so large that no epoch after the first improves: stopped after n_iter_no_change + 2 (scikit-learn's
    # rule: more than n_iter_no_change epochs in a row without a gain)
    stopped = MLPClassifier(hidden_layer_sizes=(4,), n_iter_no_change=2, tol=1e9, max_iter=50, random_state=0)
    stopped.fit(X, y)
    assert stopped.n_iter_ == 4 and stopped.loss_ == stopped.loss_curve_[3]
    # stopped by the rule on the very last epoch: it did stop, no warning
    last = MLPClassifier(hidden_layer_sizes=(4,), n_iter_no_change=2, tol=1e9, max_iter=4, random_state=0).fit(X, y)
    assert last.n_iter_ == 4 and last.loss_curve_ == stopped.loss_curve_
    # n_iter_no_change=0: exactly max_iter epochs were asked for
    fixed = MLPClassifier(hidden_layer_sizes=(4,), n_iter_no_change=0, max_iter=3, random_state=0).fit(X, y)
    assert fixed.n_iter_ == 3 and fixed.best_loss_ == min(fixed.loss_curve_)
    # partial_fit is one epoch by definition
    part = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, random_state=0)
    for _ in range(3):
        part.partial_fit(X, y, classes=np.unique(y))
    assert part.n_iter_ == 3 and part.loss_ == part.loss_curve_[-1]


# --------------------------------------------------------------------------------------------
# predict_log_proba and decision_function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3])
def test_predict_log_proba_is_the_log_of_predict_proba(classes):
    X, y = _blobs(300, classes=classes)
    for clf in (
        MLPClassifier(hidden_layer_sizes=(6,), max_iter=3, n_iter_no_change=0, random_state=0).fit(X, y),
        LogisticRegression().fit(X, y),
    ):
        log_proba = clf.predict_log_proba(X)
        assert log_proba.shape == (len(X), classes) and log_proba.dtype == np.float64
        np.testing.assert_array_equal(log_proba, np.log(clf.predict_proba(X)))
        np.testing.assert_array_equal(clf.classes_[log_proba.argmax(axis=1)], clf.predict(X))
    with pytest.raises(NotFittedError):
        MLPClassifier().predict_log_proba(X)


def test_logistic_regression_decision_function_is_its_logits():
    X, y = _blobs(300, classes=3)
    labels = np.array(["ant", "bee", "cat"])[y]
    for clf in (
        LogisticRegression().fit(X, labels),
        LogisticRegression(solver="minibatch", max_iter=4, n_iter_no_change=0, random_state=0).fit(X, labels),
    ):
        scores = clf.decision_function(X)
        assert scores.shape == (len(X), 3)
        np.testing.assert_allclose(scores, X @ clf.coef_.T + clf.intercept_, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(clf.classes_[scores.argmax(axis=1)], clf.predict(X))
        z = scores - scores.max(axis=1, keepdims=True)
        np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), clf.predict_proba(X), atol=1e-9)
    binary = LogisticRegression().fit(X, labels == "bee")
    odds = binary.decision_function(X)
    assert odds.shape == (len(X),)  # as scikit-learn's: the log-odds of classes_[1]
    np.testing.assert_allclose(odds, X @ binary.coef_[0] + binary.intercept_[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(binary.classes_[(odds > 0).astype(int)], binary.predict(X))
    p = binary.predict_proba(X)
    np.testing.assert_allclose(odds, np.log(p[:, 1]) - np.log(p[:, 0]), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="decision_function takes in-memory rows"):
        binary.decision_function("some.zarr")
    hidden = LogisticRegression(hidden_layer_sizes=(3,), solver="minibatch", max_iter=1, n_iter_no_change=0)
    with pytest.raises(AttributeError, match="without hidden layers"):
        hidden.fit(X, y).decision_function(X)
    with pytest.raises(NotFittedError):
        LogisticRegression().decision_function(X)
    assert not hasattr(MLPClassifier, "decision_function")  # as scikit-learn's MLPClassifier


# --------------------------------------------------------------------------------------------
# persistence and partial_fit
# --------------------------------------------------------------------------------------------


def test_save_load_and_pickle_keep_the_training_record(tmp_path):
    X, y = _blobs(300)
    Xr, t = _regression(300)
    fitted = [
        MLPClassifier(hidden_layer_sizes=(6,), max_iter=12, n_iter_no_change=2, early_stopping=True, random_state=0),
        MLPRegressor(hidden_layer_sizes=(6,), max_iter=3, n_iter_no_change=0, random_state=0),
        LogisticRegression(),
        LinearRegression(),
    ]
    for i, est in enumerate(fitted):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(*((Xr, t) if isinstance(est, MLPRegressor) else (X, y)))
        before = _record(est)
        est.save(tmp_path / f"m{i}.npz")
        for back in (load_estimator(tmp_path / f"m{i}.npz"), pickle.loads(pickle.dumps(est))):
            assert _record(back) == before, type(est).__name__
    assert fitted[0].validation_scores_ and fitted[2].n_iter_ > 1  # the record is not trivially empty
    back = load_estimator(tmp_path / "m2.npz")
    np.testing.assert_array_equal(back.predict_log_proba(X), fitted[2].predict_log_proba(X))
    np.testing.assert_array_equal(back.decision_function(X), fitted[2].decision_function(X))


def test_partial_fit_continues_the_loss_curve():
    X, y = _blobs(300)
    clf = MLPClassifier(hidden_layer_sizes=(6,), max_iter=3, n_iter_no_change=0, random_state=0).fit(X, y)
    curve = list(clf.loss_curve_)
    clf.partial_fit(X, y)
    clf.partial_fit(X, y)
    assert clf.loss_curve_[:3] == curve and len(clf.loss_curve_) == clf.n_iter_ == 5
    assert clf.loss_ == clf.loss_curve_[-1] == clf.history_[-1]["train_loss"]
    assert clf.best_loss_ == min(clf.loss_curve_) and clf.t_ == 5 * len(X)
    held = MLPClassifier(hidden_layer_sizes=(6,), max_iter=4, early_stopping=True, random_state=0)
    with pytest.warns(ConvergenceWarning):  # 4 epochs: n_iter_no_change=10 cannot stop it
        held.fit(X, y)
    scores = list(held.validation_scores_)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        held.partial_fit(X, y)  # as scikit-learn's: a pass holds out no rows
    held.set_params(early_stopping=False).partial_fit(X, y)  # trains on every row given: no validation
    assert held.validation_scores_ == scores and held.n_iter_ == 5 and len(held.loss_curve_) == 5
    assert held.best_loss_ is None and held.loss_ == held.loss_curve_[-1]


# --------------------------------------------------------------------------------------------
# on a cluster
# --------------------------------------------------------------------------------------------


def test_cluster_fit_of_arrays_records_validation_and_warns(client):
    X, y = _blobs(3000)
    clf = MLPClassifier(
        hidden_layer_sizes=(8,), max_iter=3, early_stopping=True, random_state=0, cluster_min_rows=0, client=client
    )
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 3) as caught:
        clf.fit(X, y)
    assert clf.fitted_on_ == "cluster"
    assert [w.filename for w in caught if issubclass(w.category, ConvergenceWarning)] == [__file__]
    assert clf.n_iter_ == 3 and clf.loss_ == clf.loss_curve_[-1] == clf.history_[-1]["train_loss"]
    scores = clf.validation_scores_
    assert scores == [h["val_accuracy"] for h in clf.history_] and len(scores) == 3
    assert clf.best_validation_score_ == max(scores) > 0.5 and clf.best_loss_ is None
    assert clf.t_ == sum(h["samples"] for h in clf.history_) > 0
    np.testing.assert_array_equal(clf.predict_log_proba(X), np.log(clf.predict_proba(X)))
    reg = MLPRegressor(
        hidden_layer_sizes=(8,), max_iter=4, early_stopping=True, n_iter_no_change=1, tol=1e9, random_state=0
    )
    Xr, t = _regression(3000)
    reg.set_params(cluster_min_rows=0, client=client).fit(Xr, t)  # stopped by the rule: no warning
    assert reg.fitted_on_ == "cluster" and reg.n_iter_ == 2
    assert reg.validation_scores_ == [h["val_r2"] for h in reg.history_] and len(reg.validation_scores_) == 2
    assert np.isfinite(reg.best_validation_score_) and reg.best_validation_score_ <= 1


def test_cluster_fit_of_a_store_records_its_losses(tmp_path, client):
    from pipeline.synth import synth

    path = str(tmp_path / "s.zarr")
    synth(path, rows=800, features=4, classes=3, seed=0)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, n_iter_no_change=0, random_state=0, client=client)
    clf.fit(path)  # n_iter_no_change=0: the 3 epochs asked for, no warning
    assert clf.fitted_on_ == "cluster" and clf.n_iter_ == 3
    assert clf.loss_ == clf.loss_curve_[-1] and clf.best_loss_ == min(clf.loss_curve_)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None
    assert clf.n_outputs_ == 3 and clf.out_activation_ == "softmax"
    np.testing.assert_array_equal(clf.predict_log_proba(path), np.log(clf.predict_proba(path)))
    with pytest.warns(ConvergenceWarning, match=MAX_ITER % 2):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0, client=client).fit(path)
    clf.save(tmp_path / "m.npz")
    back = load_estimator(tmp_path / "m.npz")
    assert _record(back) == _record(clf)
    assert back.ps_installed_by_ == clf.ps_installed_by_ and clf.ps_installed_by_  # who installed the server
