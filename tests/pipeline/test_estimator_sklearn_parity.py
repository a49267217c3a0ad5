"""What scikit-learn's MLP users carry over: ``warm_start`` (a fit continuing the fitted model),
scikit-learn's stopping rule (``n_iter_no_change``, ``tol``, ``best_loss_``,
``validation_scores_``), sparse input (TF-IDF) trained a densified minibatch at a time, and the
optimizer that is scikit-learn's ``solver="sgd"``. Small data: every fit trains in this process."""

from __future__ import annotations

import inspect
import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.pipeline import make_pipeline

from pipeline.estimator import LinearRegression, LogisticRegression, MLPClassifier, MLPRegressor, load_estimator


def _blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y], y


# --------------------------------------------------------------------------------------------
# warm_start
# --------------------------------------------------------------------------------------------

SGD = {"hidden_layer_sizes": (8,), "optimizer": "sgd", "learning_rate_init": 0.05, "n_iter_no_change": 0}


def test_warm_start_fit_continues_from_the_fitted_weights():
    """Plain SGD keeps no optimizer state, and an epoch's shuffle is seeded by its index: three epochs
    and three more with warm_start are six epochs, to the bit. The record grows as scikit-learn's:
    ``loss_curve_`` and ``t_`` over both fits, ``n_iter_`` this fit's epochs."""
    X, y = _blobs()
    warm = MLPClassifier(max_iter=3, warm_start=True, random_state=0, **SGD).fit(X, y)
    first = warm.predict_proba(X)
    warm.fit(X, y)
    cold = MLPClassifier(max_iter=6, random_state=0, **SGD).fit(X, y)
    assert warm.loss_curve_ == cold.loss_curve_ and len(cold.loss_curve_) == 6
    np.testing.assert_array_equal(warm.model_.params, cold.model_.params)
    assert warm.n_iter_ == 3 and warm.t_ == cold.t_ == 6 * len(X)
    assert not np.array_equal(warm.predict_proba(X), first)
    # without warm_start a fit starts over
    warm.set_params(warm_start=False).fit(X, y)
    assert len(warm.loss_curve_) == warm.n_iter_ == 3


def test_warm_start_is_a_parameter_as_in_scikit_learn():
    for cls in (MLPClassifier, MLPRegressor, LogisticRegression, LinearRegression):
        assert inspect.signature(cls).parameters["warm_start"].default is False
        assert cls().get_params()["warm_start"] is False
    X, y = _blobs()
    est = MLPClassifier(max_iter=2, warm_start=True, random_state=0, **{**SGD, "n_iter_no_change": 0}).fit(X, y)
    twin = clone(est)
    assert twin.get_params()["warm_start"] is True and not hasattr(twin, "model_")
    assert len(twin.fit(X, y).loss_curve_) == 2  # an unfitted estimator starts from scratch
    with pytest.raises(ValueError, match=r"MLPClassifier\(warm_start='yes'\) is invalid: must be True or False"):
        MLPClassifier(warm_start="yes").fit(X, y)


def test_warm_start_after_partial_fit_and_through_save(tmp_path):
    X, y = _blobs()
    est = MLPClassifier(max_iter=2, warm_start=True, random_state=0, **SGD)
    est.partial_fit(X, y, classes=[0, 1, 2])
    est.fit(X, y)
    assert len(est.loss_curve_) == 3 and est.n_iter_ == 2
    est.save(tmp_path / "m.npz")
    back = load_estimator(tmp_path / "m.npz")
    assert back.n_iter_ == 2 and back.warm_start is True and back.loss_curve_ == est.loss_curve_
    back.fit(X, y)
    assert len(back.loss_curve_) == 5


def test_partial_fit_refuses_early_stopping_as_scikit_learn():
    """A pass holds out no rows: early_stopping=True would be ignored, so it is refused (scikit-learn's
    ValueError), before anything trains; a fitted model is kept."""
    X, y = _blobs()
    est = MLPClassifier(early_stopping=True, **SGD)
    with pytest.raises(ValueError, match=r"partial_fit does not support early_stopping=True.*early_stopping=False"):
        est.partial_fit(X, y, classes=[0, 1, 2])
    assert not hasattr(est, "model_")
    est.set_params(early_stopping=False).partial_fit(X, y, classes=[0, 1, 2])
    before = est.predict_proba(X)
    with pytest.raises(ValueError, match="early_stopping=True"):
        est.set_params(early_stopping=True).partial_fit(X, y)
    np.testing.assert_array_equal(est.predict_proba(X), before)
    assert len(est.loss_curve_) == 1


@pytest.mark.parametrize(
    ("change", "fit_on", "message"),
    [
        ({"hidden_layer_sizes": (5,)}, "all", r"whose hidden layers are \(8,\).*set hidden_layer_sizes back"),
        ({}, "two classes", r"needs y with the classes of the fitted model, \[0, 1, 2\]; y has \[0, 1\]"),
        ({}, "three features", r"X has 3 features.*warm_start=True continues the fitted model"),
        ({"cluster_min_rows": 0}, "all", r"trains on a Dask cluster from new weights: .*client='local'"),
        ({}, "store", r"a fit on a store trains on a Dask cluster from new weights"),
    ],
)
def test_warm_start_refusals_keep_the_fitted_model(change, fit_on, message):
    """What a warm start cannot continue is refused in one line naming the fix, before anything
    trains (no cluster is started), and the model fitted before is kept."""
    X, y = _blobs()
    est = MLPClassifier(max_iter=2, warm_start=True, random_state=0, **SGD).fit(X, y)
    before, curve = est.predict_proba(X), list(est.loss_curve_)
    args = {
        "all": (X, y),
        "two classes": (X[y < 2], y[y < 2]),
        "three features": (X[:, :3], y),
        "store": ("no-such-store.zarr", None),
    }[fit_on]
    with pytest.raises(ValueError, match=message) as err:
        est.set_params(**change).fit(*args)
    assert "\n" not in str(err.value) and "warm_start=False" in str(err.value)
    assert est.loss_curve_ == curve
    np.testing.assert_array_equal(est.predict_proba(X), before)


def test_warm_start_of_the_exact_logistic_solver_starts_from_its_solution():
    X, y = _blobs()
    est = LogisticRegression(warm_start=True).fit(X, y)
    first, coef = est.n_iter_, est.coef_
    est.fit(X, y)
    assert first > 3 and est.n_iter_ <= 1  # already at the solution
    np.testing.assert_allclose(est.coef_, coef, atol=1e-4)


# --------------------------------------------------------------------------------------------
# scikit-learn's stopping rule
# --------------------------------------------------------------------------------------------


def _sklearn_stops(values: list[float], patience: int, tol: float, scores: bool) -> list[int]:
    """The epochs (1-based) after which scikit-learn's own rule (``_update_no_improvement_count``)
    says to stop on these losses (validation scores), its count going on as across warm starts."""
    sk = SkMLPClassifier(n_iter_no_change=patience, tol=tol)
    sk.loss_curve_, sk._no_improvement_count, sk.coefs_, sk.intercepts_ = [], 0, [], []
    sk.best_loss_, sk.best_validation_score_, sk.validation_scores_ = np.inf, -np.inf, []
    feed = iter(values)
    sk._score = lambda X, y, sample_weight=None: next(feed)
    stops = []
    for i, v in enumerate(values):
        sk.loss_curve_.append(v)
        sk._update_no_improvement_count(scores, None, None, None)
        if sk._no_improvement_count > patience:
            stops.append(i + 1)
    return stops


def test_the_stopping_rule_is_scikit_learns_without_early_stopping():
    """Training loss: the fit stops at the epoch scikit-learn's rule would stop at on the same
    losses (more than n_iter_no_change epochs not tol below the least loss so far)."""
    X, y = _blobs(600)
    est = MLPClassifier(hidden_layer_sizes=(8,), learning_rate_init=0.01, n_iter_no_change=3, tol=2e-3)
    est.set_params(max_iter=200, random_state=0).fit(X, y)
    assert est.n_iter_ < 200
    assert _sklearn_stops(est.loss_curve_, 3, 2e-3, scores=False) == [est.n_iter_] == [len(est.loss_curve_)]
    assert est.best_loss_ == min(est.loss_curve_) and est.validation_scores_ is None


def test_the_stopping_rule_is_scikit_learns_with_early_stopping():
    """Validation score (accuracy): the fit stops where scikit-learn's rule stops on the same scores,
    and keeps the weights of the best score's epoch (they score it on the held-out rows)."""
    X, y = _blobs(600)
    est = MLPClassifier(hidden_layer_sizes=(8,), learning_rate_init=0.01, n_iter_no_change=3, tol=1e-3)
    est.set_params(max_iter=200, random_state=0, early_stopping=True).fit(X, y)
    scores = est.validation_scores_
    assert est.n_iter_ < 200 and len(scores) == est.n_iter_
    assert _sklearn_stops(scores, 3, 1e-3, scores=True) == [est.n_iter_]
    assert est.best_validation_score_ == max(scores) and est.best_loss_ is None
    held_out = np.random.default_rng([0, 1]).permutation(len(X))[: int(0.1 * len(X))]
    assert np.mean(est.predict(X[held_out]) == y[held_out]) == pytest.approx(est.best_validation_score_)


def test_warm_start_carries_the_stopping_count_as_scikit_learn():
    """A fit stopped by the rule and fitted again with warm_start stops at once when its first epoch
    does not improve either (scikit-learn keeps the count across fits)."""
    X, y = _blobs(600)
    est = MLPClassifier(hidden_layer_sizes=(8,), learning_rate_init=0.01, n_iter_no_change=3, tol=2e-3)
    est.set_params(max_iter=200, random_state=0, warm_start=True).fit(X, y)
    n = est.n_iter_
    est.fit(X, y)
    assert _sklearn_stops(est.loss_curve_, 3, 2e-3, scores=False) == [n, n + 1] and est.n_iter_ == 1


# --------------------------------------------------------------------------------------------
# Sparse input
# --------------------------------------------------------------------------------------------


def _texts() -> tuple[list[str], np.ndarray]:
    """Real text: the docstrings of scikit-learn's public functions and classes, labelled by
    their subpackage."""
    import sklearn.cluster
    import sklearn.linear_model
    import sklearn.metrics

    docs, labels = [], []
    for label, mod in enumerate((sklearn.cluster, sklearn.linear_model, sklearn.metrics)):
        for name in mod.__all__:
            doc = inspect.getdoc(getattr(mod, name))
            if doc:
                docs.append(doc)
                labels.append(label)
    return docs, np.asarray(labels)


def test_sparse_tfidf_trains_as_its_dense_form():
    """A TF-IDF matrix trains, validates and predicts as its dense form does, unstandardized (as
    scikit-learn's users give it) unless ``options`` ask for the standardization."""
    docs, y = _texts()
    X = TfidfVectorizer(min_df=2).fit_transform(docs)
    assert sp.issparse(X)
    kw = {"hidden_layer_sizes": (16,), "max_iter": 5, "random_state": 0, "n_iter_no_change": 0}
    raw = {**kw, "options": {"normalize": False}}
    sparse = MLPClassifier(**kw).fit(X, y)
    dense = MLPClassifier(**raw).fit(X.toarray(), y)
    assert sparse.model_.normalize is False
    np.testing.assert_allclose(sparse.loss_curve_, dense.loss_curve_, rtol=1e-6)
    np.testing.assert_allclose(sparse.predict_proba(X.tocsc()), dense.predict_proba(X.toarray()), atol=1e-6)
    scaled = MLPClassifier(**{**kw, "options": {"normalize": True}}).fit(X, y)
    scaled_dense = MLPClassifier(**kw).fit(X.toarray(), y)
    assert scaled.model_.normalize is True
    np.testing.assert_allclose(scaled.predict_proba(X), scaled_dense.predict_proba(X.toarray()), atol=1e-5)
    pipe = make_pipeline(TfidfVectorizer(min_df=2), MLPClassifier(**kw)).fit(docs, y)
    np.testing.assert_array_equal(pipe.predict(docs), sparse.predict(X))
    with pytest.warns(ConvergenceWarning):  # 5 epochs without 10 that do not improve
        es = MLPClassifier(**{**kw, "early_stopping": True, "n_iter_no_change": 10}).fit(X, y)
    with pytest.warns(ConvergenceWarning):
        es_dense = MLPClassifier(**{**raw, "early_stopping": True, "n_iter_no_change": 10}).fit(X.toarray(), y)
    assert len(es.validation_scores_) == 5
    np.testing.assert_allclose(es.validation_scores_, es_dense.validation_scores_)
    part = MLPClassifier(**kw).partial_fit(X, y, classes=[0, 1, 2])
    part_dense = MLPClassifier(**raw).partial_fit(X.toarray(), y, classes=[0, 1, 2])
    np.testing.assert_allclose(part.predict_proba(X), part_dense.predict_proba(X.toarray()), atol=1e-6)


def test_sparse_is_never_densified_whole():
    """A matrix whose dense form is 960 MB (float64) trains, validates and predicts holding a few
    minibatches: the peak of NumPy's allocations stays far below it."""
    rng = np.random.default_rng(0)
    n, d = 6000, 20_000
    X = sp.random(n, d, density=2e-4, format="csr", random_state=rng, dtype=np.float64)
    y = (np.asarray(X[:, : d // 2].sum(axis=1)).ravel() > 0).astype(np.int64)
    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=2, early_stopping=True)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        est.predict_proba(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert est.n_iter_ == 1 and peak < n * d * 8 / 3, peak


def test_sparse_refusals_name_the_fix():
    docs, y = _texts()
    X = TfidfVectorizer(min_df=2).fit_transform(docs)
    with pytest.raises(ValueError, match=r"X is a sparse matrix, .* would train on a Dask cluster .*client='local'"):
        MLPClassifier(cluster_min_rows=0).fit(X, y)
    with pytest.raises(ValueError, match=r"X is a sparse matrix, .*pass solver='minibatch'"):
        LogisticRegression().fit(X, y)
    # seeded, and 10 epochs: 2 epochs of an unseeded fit scored 0.42-0.71 on these rows (3 classes)
    minibatch = LogisticRegression(solver="minibatch", max_iter=10, n_iter_no_change=0, random_state=0)
    assert minibatch.fit(X, y).score(X, y) > 0.5


# --------------------------------------------------------------------------------------------
# scikit-learn's solver names
# --------------------------------------------------------------------------------------------


def test_scikit_learns_solver_sgd_is_named_as_nesterov():
    """scikit-learn's ``solver='sgd'`` is SGD with Nesterov momentum 0.9: the refusal of that
    value names ``optimizer='nesterov'``, not plain ``optimizer='sgd'``."""
    X, y = _blobs()
    with pytest.raises(ValueError, match=r"solver='sgd'.*pass optimizer='nesterov' \(momentum=0.9\)"):
        MLPClassifier(solver="sgd").fit(X, y)
    est = MLPClassifier(optimizer="nesterov", max_iter=3, n_iter_no_change=0, random_state=0).fit(X, y)
    assert est.model_.config["optimizer"] == "nesterov" and est.model_.config["momentum"] == 0.9
