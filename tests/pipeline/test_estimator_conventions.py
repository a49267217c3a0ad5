"""The estimators' scikit-learn conventions and refusals found by the new-user audit: feature names
after a store fit, ``save`` safety, ``options`` and ``client`` checks, federated ``classes_``, the
fitted weights (``coef_`` / ``coefs_``), convergence warnings, sample weights and messages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score

from pipeline import estimator as est_mod
from pipeline.errors import StoreError
from pipeline.estimator import (
    LinearRegression,
    LogisticRegression,
    MLPClassifier,
    MLPRegressor,
    load_estimator,
)


class Columns:
    """A minimal table: named columns and ``__array__`` (no pandas in CI)."""

    def __init__(self, data: np.ndarray, columns: list[str]) -> None:
        self._data, self.columns = np.asarray(data), list(columns)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._data if dtype is None else self._data.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    def __len__(self) -> int:
        return len(self._data)


@pytest.fixture(autouse=True, scope="module")
def _no_stray_cluster() -> Iterator[None]:
    yield
    est_mod.shutdown_local_cluster()


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = np.where(X[:, 0] + X[:, 1] > 0, 1, 10)
    y[X[:, 2] > 1] = 2
    return X, y


# --------------------------------------------------------------------------------------------
# Finding 5: fit(store) sets feature_names_in_; a reordered table is refused
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_fit(tmp_path_factory: pytest.TempPathFactory, client: Any) -> tuple[MLPClassifier, str]:
    from pipeline.synth import synth

    path = str(tmp_path_factory.mktemp("names") / "s.zarr")
    synth(path, rows=600, features=4, classes=3, seed=0)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, n_iter_no_change=0, random_state=0, client=client)
    return clf.fit(path), path


def test_fit_store_sets_feature_names_and_refuses_reordered_columns(store_fit, tmp_path):
    import pyarrow as pa

    from pipeline.store import open_store

    clf, path = store_fit
    st = open_store(path)
    names = [str(n) for n in st.feature_names]
    assert clf.feature_names_in_.tolist() == names and clf.feature_names_in_.dtype == object
    X = np.asarray(st.X[:50], dtype=np.float64)
    expected = clf.predict(X)  # NumPy rows are the store's columns in order: no warning (errors here)
    order = names[::-1]
    rev = X[:, ::-1]
    with pytest.raises(ValueError, match="feature names should match"):
        clf.predict(Columns(rev, order))
    with pytest.raises(ValueError, match="feature names should match"):
        clf.predict(pa.table({n: rev[:, i] for i, n in enumerate(order)}))
    with pytest.raises(ValueError, match="feature names should match"):
        clf.predict_proba(Columns(rev, order))
    np.testing.assert_array_equal(clf.predict(Columns(X, names)), expected)
    np.testing.assert_array_equal(clf.predict(pa.table({n: X[:, i] for i, n in enumerate(names)})), expected)
    clf.save(tmp_path / "m.npz")
    back = load_estimator(tmp_path / "m.npz")
    assert back.feature_names_in_.tolist() == names
    np.testing.assert_array_equal(back.predict(X), expected)
    with pytest.raises(ValueError, match="feature names should match"):
        back.predict(Columns(rev, order))


# --------------------------------------------------------------------------------------------
# save: no clobbering, one-line errors
# --------------------------------------------------------------------------------------------


def test_save_refuses_what_it_did_not_write(tmp_path):
    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0, random_state=0).fit(X, y)
    notes = tmp_path / "notes.csv"
    notes.write_text("my,data\n1,2\n")
    with pytest.raises(ValueError, match="the file exists; pass overwrite=True"):
        clf.save(notes)
    with pytest.raises(ValueError, match="is not a model file written by this program; not replaced"):
        clf.save(notes, overwrite=True)
    assert notes.read_text() == "my,data\n1,2\n"
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"it is a directory; give a file path") as err:
        clf.save(tmp_path / "runs")
    assert ".tmp" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        clf.save(tmp_path / "missing" / "m.npz")
    model = tmp_path / "m.npz"
    clf.save(model)
    with pytest.raises(ValueError, match="the file exists"):
        clf.save(model)
    other = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, n_iter_no_change=0, random_state=1).fit(X, y)
    other.save(model, overwrite=True)  # a model file of this program may be replaced when asked
    np.testing.assert_array_equal(load_estimator(model).predict_proba(X), other.predict_proba(X))
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "notes.csv", "runs"]  # no temporary left
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            clf.save(locked / "m.npz")


# --------------------------------------------------------------------------------------------
# options and client
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, param",
    [
        ({"hidden": [5]}, "hidden_layer_sizes"),
        ({"epochs": 2}, "max_iter"),
        ({"lr": 0.1}, "learning_rate_init"),
        ({"seed": 3}, "random_state"),
        ({"validation": 0.2}, "validation_fraction"),
        ({"cluster_min_rows": 0}, "cluster_min_rows"),
        ({"rounds": 3}, "max_iter"),
    ],
)
def test_options_duplicating_a_parameter_are_refused(options, param):
    X, y = _data(40)
    clf = MLPClassifier(max_iter=1, options=options)
    with pytest.raises(ValueError) as err:
        clf.fit(X, y)
    msg = str(err.value)
    key = next(iter(options))
    assert f"options={{{key!r}" in msg and f"parameter {param}" in msg and "\n" not in msg
    assert not hasattr(clf, "model_")


def test_options_a_fit_in_this_process_would_ignore_are_refused():
    X, y = _data(60)
    with pytest.raises(ValueError, match=r"options \{'staleness': 4\} act only on a Dask cluster"):
        MLPClassifier(max_iter=1, options={"staleness": 4}).fit(X, y)
    with pytest.raises(ValueError, match=r"options \{'compression': 'int8'\} do not act in partial_fit"):
        MLPClassifier(max_iter=1, options={"compression": "int8"}).partial_fit(X, y, classes=[1, 2, 10])
    with pytest.raises(ValueError, match=r"options \{'beta1': 0.5\} set minibatch training.*solver='minibatch'"):
        LogisticRegression(options={"beta1": 0.5}).fit(X, y)
    with pytest.raises(ValueError, match=r"options=\{'sites': 's.toml'\}: train federated with fit\(\{site"):
        MLPClassifier(max_iter=1, options={"sites": "s.toml"}).fit(X, y)
    with pytest.raises(ValueError, match=r"options \{'min_samples': 100\} do not act in partial_fit"):
        MLPClassifier(max_iter=1, options={"min_samples": 100}).partial_fit(X, y, classes=[1, 2, 10])
    # options that act in this process, or that restate a default, are accepted
    LogisticRegression(solver="minibatch", max_iter=2, n_iter_no_change=0, options={"beta1": 0.5}).fit(X, y)
    MLPClassifier(max_iter=1, n_iter_no_change=0, optimizer="rmsprop", options={"staleness": 2, "rho": 0.5}).fit(X, y)


def test_a_client_string_is_local_or_a_scheduler_address(client):
    X, y = _data(200)
    with pytest.raises(ValueError, match=r"client='lcoal' is invalid: use 'local'.*'tcp://HOST:PORT' or 'HOST:PORT'"):
        MLPClassifier(max_iter=1, client="lcoal").fit(X, y)
    assert not est_mod._local and not est_mod._remote
    address = client.scheduler.address
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0, client=address)
    clf.fit(X, y)
    assert clf.fitted_on_ == "cluster" and clf.ps_installed_by_
    assert not est_mod._local and list(est_mod._remote) == [address]  # connected, no LocalCluster started
    host_port = address.split("://", 1)[1]
    clf2 = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0, client=host_port)
    assert clf2.fit(X, y).fitted_on_ == "cluster" and not est_mod._local
    est_mod.shutdown_local_cluster()
    assert not est_mod._remote


def test_an_unreachable_scheduler_address_is_one_line():
    import socket

    X, y = _data(50)
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ValueError, match="cannot connect to a Dask scheduler there") as err:
            MLPClassifier(max_iter=1, client=address).fit(X, y)
    assert "\n" not in str(err.value)
    assert not est_mod._local and not est_mod._remote


# --------------------------------------------------------------------------------------------
# Finding 8: federated classes_ as fit(store)'s
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_federated_classes_are_those_of_a_store_fit(tmp_path):
    from pipeline.connect import cluster_client
    from pipeline.ingest import ingest

    X, y = _data(800, seed=1)
    X = X.astype(np.float32)
    for name, rows in (("a", slice(0, 400)), ("b", slice(400, 800))):
        np.save(tmp_path / f"x{name}.npy", X[rows])
        np.save(tmp_path / f"y{name}.npy", y[rows])
    a = ingest(tmp_path / "xa.npy", tmp_path / "a.zarr", labels=tmp_path / "ya.npy").path
    b = ingest(tmp_path / "xb.npy", tmp_path / "b.zarr", labels=tmp_path / "yb.npy", like=a).path
    kw = dict(hidden_layer_sizes=(8,), max_iter=2, n_iter_no_change=0, learning_rate_init=0.01, random_state=0)
    # a real LocalCluster with one worker per site, each declaring its site's resource
    with cluster_client(workers=1, dashboard_address=None, sites=["site-a", "site-b"]) as c:
        one = MLPClassifier(**kw, client=c).fit(a)
        fed = MLPClassifier(**kw, client=c).fit({"site-a": a, "site-b": b})
    assert one.classes_.tolist() == [1, 2, 10] and one.classes_.dtype.kind == "i"
    assert fed.fitted_on_ == "sites"
    assert fed.classes_.dtype == one.classes_.dtype and fed.classes_.tolist() == [1, 2, 10]
    assert set(fed.predict(X[:20].astype(np.float64))) <= {1, 2, 10}
    assert 0 <= fed.score(X, y) <= 1  # was: "Mix of label input types (string and number)"


def test_site_classes_without_a_readable_store_read_numeric_names():
    assert est_mod._site_classes(["1", "2", "10"], ["/nonexistent/a.zarr"]).tolist() == [1, 2, 10]
    assert est_mod._site_classes(["0.5", "1.5"], []).dtype == np.float64
    out = est_mod._site_classes(["cat", "dog"], [])
    assert out.dtype == object and out.tolist() == ["cat", "dog"]


# --------------------------------------------------------------------------------------------
# Finding 11 (partial): coef_, coefs_, ConvergenceWarning, sample_weight
# --------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_linear_regression_coef_reproduces_predictions():
    X, _ = _data(200)
    t = X @ np.array([1.0, -2.0, 3.0]) + 5 + np.random.default_rng(1).normal(scale=0.1, size=200)
    reg = LinearRegression().fit(X, t)
    assert reg.coef_.shape == (3,) and isinstance(reg.intercept_, float)
    np.testing.assert_allclose(X @ reg.coef_.T + reg.intercept_, reg.predict(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reg.coef_, [1.0, -2.0, 3.0], atol=0.05)
    T = np.c_[t, 2 * t]
    reg2 = LinearRegression().fit(X, T)
    assert reg2.coef_.shape == (2, 3) and reg2.intercept_.shape == (2,)
    np.testing.assert_allclose(X @ reg2.coef_.T + reg2.intercept_, reg2.predict(X), rtol=1e-6, atol=1e-6)


def test_logistic_regression_coef_reproduces_decision_values():
    X, y = _data(300)
    clf = LogisticRegression().fit(X, y)  # three classes
    assert clf.coef_.shape == (3, 3) and clf.intercept_.shape == (3,)
    np.testing.assert_allclose(_softmax(X @ clf.coef_.T + clf.intercept_), clf.predict_proba(X), atol=1e-6)
    yb = (y == 1).astype(np.int64)
    binary = LogisticRegression().fit(X, yb)
    assert binary.coef_.shape == (1, 3) and binary.intercept_.shape == (1,)
    p = binary.predict_proba(X)
    log_odds = np.log(p[:, 1]) - np.log(p[:, 0])
    np.testing.assert_allclose((X @ binary.coef_.T + binary.intercept_)[:, 0], log_odds, rtol=1e-5, atol=1e-5)
    minibatch = LogisticRegression(solver="minibatch", max_iter=3, n_iter_no_change=0, random_state=0).fit(X, y)
    np.testing.assert_allclose(
        _softmax(X @ minibatch.coef_.T + minibatch.intercept_), minibatch.predict_proba(X), atol=1e-6
    )
    hidden = LogisticRegression(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, solver="minibatch").fit(X, y)
    with pytest.raises(AttributeError, match="without hidden layers"):
        _ = hidden.coef_
    assert not hasattr(LogisticRegression(), "coef_")  # unfitted: no attribute, as scikit-learn


def test_mlp_coefs_reproduce_predictions():
    X, y = _data(300)
    kw = dict(max_iter=3, n_iter_no_change=0, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(5, 4), activation="tanh", **kw).fit(X, y)
    assert [c.shape for c in clf.coefs_] == [(3, 5), (5, 4), (4, 3)]
    assert [b.shape for b in clf.intercepts_] == [(5,), (4,), (3,)]
    h = X
    for W, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1], strict=True):
        h = np.tanh(h @ W + b)
    np.testing.assert_allclose(_softmax(h @ clf.coefs_[-1] + clf.intercepts_[-1]), clf.predict_proba(X), atol=1e-6)
    yb = (y == 1).astype(np.int64)
    binary = MLPClassifier(hidden_layer_sizes=(5,), **kw).fit(X, yb)
    assert [c.shape for c in binary.coefs_] == [(3, 5), (5, 1)]  # scikit-learn's one logistic output
    z = np.maximum(X @ binary.coefs_[0] + binary.intercepts_[0], 0) @ binary.coefs_[1] + binary.intercepts_[1]
    np.testing.assert_allclose(1 / (1 + np.exp(-z[:, 0])), binary.predict_proba(X)[:, 1], atol=1e-6)
    t = X @ np.array([1.0, 2.0, 3.0]) * 10 + 100
    reg = MLPRegressor(hidden_layer_sizes=(6,), **kw).fit(X, t)
    out = np.maximum(X @ reg.coefs_[0] + reg.intercepts_[0], 0) @ reg.coefs_[1] + reg.intercepts_[1]
    np.testing.assert_allclose(out[:, 0], reg.predict(X), rtol=1e-6, atol=1e-5)


def test_lbfgs_that_does_not_converge_warns():
    X, y = _data(300)
    with pytest.warns(ConvergenceWarning, match="L-BFGS did not converge in 2 iterations"):
        clf = LogisticRegression(max_iter=2).fit(X, y)
    assert clf.history_[-1]["converged"] is False
    LogisticRegression().fit(X, y)  # converges: no warning (warnings are errors here)


def test_sample_weight_is_refused_or_used(store_fit):
    X, y = _data(120)
    for est in (LinearRegression(), LogisticRegression(), MLPClassifier(max_iter=1)):
        target = X[:, 0] if isinstance(est, LinearRegression) else y
        with pytest.raises(ValueError, match=r"\.fit does not support sample_weight") as err:
            est.fit(X, target, sample_weight=np.ones(len(X)))
        assert "\n" not in str(err.value) and not hasattr(est, "model_")
        # partial_fit refuses it the same way, not with Python's unexpected-keyword TypeError
        with pytest.raises(ValueError, match=r"\.partial_fit does not support sample_weight"):
            est.partial_fit(X, target, sample_weight=np.ones(len(X)))
        assert not hasattr(est, "model_")
        with pytest.raises(TypeError, match=r"partial_fit\(\) got an unexpected keyword argument 'weights'"):
            est.partial_fit(X, target, weights=np.ones(len(X)))
    clf, path = store_fit
    with pytest.raises(ValueError, match=r"score\(store_path, sample_weight=...\): a store's rows cannot be weighted"):
        clf.score(path, sample_weight=np.ones(600))
    small = LogisticRegression().fit(X, y)
    w = (np.arange(len(X)) < 60).astype(float)
    assert small.score(X, y, sample_weight=w) == pytest.approx(accuracy_score(y, small.predict(X), sample_weight=w))


# --------------------------------------------------------------------------------------------
# Finding 15: messages
# --------------------------------------------------------------------------------------------


def test_partial_fit_classes_message_shows_plain_labels():
    X, y = _data(60)
    y = (y == 1).astype(np.int64)
    clf = MLPClassifier(max_iter=1).partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError) as err:
        clf.partial_fit(X, y, classes=[0, 1, 2])
    assert str(err.value) == "classes=[0, 1, 2] differ from the fitted classes_ [0, 1]"


def test_store_mismatch_hint_fits_how_the_model_was_trained(store_fit, tmp_path):
    from pipeline.synth import synth

    other = str(tmp_path / "five.zarr")
    synth(other, rows=100, features=5, classes=3, seed=0)
    X = np.random.default_rng(0).random((60, 4))
    arrays = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0)
    arrays.fit(X, np.arange(60) % 3)
    for call in (arrays.score, arrays.predict):
        with pytest.raises(StoreError) as err:
            call(other)
        msg = str(err.value)
        assert "has 5 features but the model expects 4" in msg and "TRAIN_STORE" not in msg
        assert "trained on in-memory arrays" in msg and "\n" not in msg
    arrays.save(tmp_path / "m.npz")
    with pytest.raises(StoreError, match="trained on in-memory arrays"):
        load_estimator(tmp_path / "m.npz").score(other)
    clf, _ = store_fit  # trained on a store: the --like hint stays
    with pytest.raises(StoreError, match="ingest it with --like TRAIN_STORE"):
        clf.score(other)


def test_fit_refuses_an_unknown_keyword_like_python():
    X, y = _data(40)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epochs'"):
        MLPClassifier().fit(X, y, epochs=3)


@pytest.mark.parametrize("cluster_min_rows", [0, 10_000])
def test_values_beyond_float32_are_refused_before_training(cluster_min_rows):
    """A finite value too large for float32 becomes infinity in the store and the kernels: the
    cluster fit then "diverged" naming the learning rate. Refused at once, naming the cell, on both
    paths, and nothing is fitted."""
    X, y = _data(120)
    X[5, 1] = 1e39
    started = "cluster" in est_mod._local
    clf = MLPClassifier(max_iter=1, cluster_min_rows=cluster_min_rows)
    with pytest.raises(
        ValueError, match=r"Input X contains a value too large for float32 \(row 5, feature 1: 1e\+39\)"
    ):
        clf.fit(X, y)
    assert not hasattr(clf, "model_")
    X[5, 1] = 0.5
    target = X[:, 0].copy()
    target[3] = -2e39
    reg = MLPRegressor(max_iter=1, cluster_min_rows=cluster_min_rows)
    with pytest.raises(ValueError, match=r"Input y contains a value too large for float32 \(row 3: -2e\+39\)"):
        reg.fit(X, target)
    assert not hasattr(reg, "model_")
    assert ("cluster" in est_mod._local) == started  # refused before a cluster was started for it


def test_predicting_store_order_rows_installs_no_warning_filter(store_fit, monkeypatch):
    """After a fit on a store, NumPy rows predict without scikit-learn's "no feature names"
    warning, and without installing a filter that ignores it: filters are the process's, and
    with predictions served from several threads such a filter, installed and dropped by each
    call under the others' feet, could stay behind and silence that warning for every estimator."""
    import threading
    import warnings

    clf, _ = store_fit
    X = np.random.default_rng(0).standard_normal((64, 4))
    here, installed = threading.get_ident(), []
    real = warnings.filterwarnings

    def recording(action: str, message: str = "", *args: object, **kw: object) -> None:
        if threading.get_ident() == here:
            installed.append((action, message))
        real(action, message, *args, **kw)

    monkeypatch.setattr(warnings, "filterwarnings", recording)
    want = clf.predict(X)
    for _ in range(5):
        assert np.array_equal(clf.predict(X), want)
    assert not [f for f in installed if "feature names" in f[1]], installed
