"""The scikit-learn compatible estimators: sklearn's checks, real data, the cluster path, persistence."""

from __future__ import annotations

import csv
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import pipeline
from pipeline import estimator as est_mod
from pipeline.config import LOCAL_OPTIMIZERS
from pipeline.estimator import (
    LinearRegression,
    LogisticRegression,
    MLPClassifier,
    MLPRegressor,
    expected_failed_checks,
    load_estimator,
)
from tests.pipeline.helpers import DATA

# Every estimator at its defaults (no instance sized for the checks' tiny datasets).
CHECKED = [MLPClassifier(), MLPRegressor(), LogisticRegression(), LinearRegression()]


# The checks fit tiny random datasets that max_iter=200 epochs may not fit to tol: the
# ConvergenceWarning saying so (as scikit-learn's MLPs give it there) is not what they check.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def letter() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """letter-recognition as arrays (string labels), conventional 16,000 / 4,000 split."""
    with open(DATA / "letter" / "letter-recognition.data", newline="") as fh:
        rows = list(csv.reader(fh))
    y = np.array([r[0] for r in rows])
    X = np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.float64)
    return X[:16000], y[:16000], X[16000:], y[16000:]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    return Xtr, ytr, Xte, yte


@pytest.fixture(scope="module")
def housing() -> tuple[np.ndarray, np.ndarray]:
    """California housing's numeric columns (rows with a missing value dropped), target in $100k."""
    with open(DATA / "california_housing" / "housing.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        ti = header.index("median_house_value")
        cols = [i for i, h in enumerate(header) if h not in ("median_house_value", "ocean_proximity")]
        rows = [r for r in reader if all(r[i] for i in [*cols, ti])]
    X = np.array([[float(r[i]) for i in cols] for r in rows])
    y = np.array([float(r[ti]) for r in rows]) / 1e5
    return X, y


@pytest.fixture(scope="module")
def cluster_clf(letter, client) -> MLPClassifier:
    """A classifier trained on the cluster (16,000 rows > cluster_min_rows) with an explicit client."""
    Xtr, ytr, _, _ = letter
    clf = MLPClassifier(max_iter=6, n_iter_no_change=0, random_state=0, client=client)
    return clf.fit(Xtr, ytr)


@pytest.fixture(autouse=True, scope="module")
def _no_stray_cluster() -> Iterator[None]:
    """Every cluster test here uses the module's client; no estimator LocalCluster may outlive us."""
    yield
    est_mod.shutdown_local_cluster()


# --------------------------------------------------------------------------------------------
# the cluster path
# --------------------------------------------------------------------------------------------


def test_fit_on_cluster_uses_parameter_server(cluster_clf, letter, client):
    _, _, Xte, yte = letter
    assert cluster_clf.fitted_on_ == "cluster"
    assert cluster_clf.ps_installed_by_  # the scheduler's parameter-server extension ran the job
    assert cluster_clf.history_ and all(h["rounds"] > 0 for h in cluster_clf.history_)
    assert [h["rounds"] for h in cluster_clf.history_] == sorted(h["rounds"] for h in cluster_clf.history_)
    assert len(cluster_clf.loss_curve_) == 6 and cluster_clf.loss_curve_[-1] < cluster_clf.loss_curve_[0]
    assert list(cluster_clf.classes_) == sorted(set(yte))
    assert cluster_clf.score(Xte, yte) > 0.7  # chance is 1/26
    assert isinstance(cluster_clf.model_, pipeline.model.Model)
    assert not est_mod._local  # the given client was used, no LocalCluster was started


def test_dask_arrays_train_on_current_client(housing, client):
    da = pytest.importorskip("dask.array")
    X, y = housing
    Xd, yd = da.from_array(X[:16000], chunks=(3000, 4)), da.from_array(y[:16000], chunks=5000)
    reg = MLPRegressor(hidden_layer_sizes=(64,), max_iter=5, n_iter_no_change=0, random_state=0, cluster_min_rows=0)
    reg.fit(Xd, yd)  # client=None: the current (default) client of the module's cluster
    assert reg.fitted_on_ == "cluster" and not est_mod._local
    assert reg.n_features_in_ == X.shape[1]
    assert reg.score(X[16000:], y[16000:]) > 0.5
    np.testing.assert_array_equal(reg.predict(da.from_array(X[16000:17000])), reg.predict(X[16000:17000]))


def test_store_path_fit_predict_score(letter_stores, client):
    train_path, test_path = letter_stores
    clf = MLPClassifier(max_iter=3, n_iter_no_change=0, random_state=0, client=client).fit(train_path)
    assert clf.fitted_on_ == "cluster" and clf.n_features_in_ == 16 and len(clf.classes_) == 26
    acc = clf.score(test_path)
    assert acc > 0.5
    from pipeline.store import open_store

    st = open_store(test_path)
    pred_store = clf.predict(test_path)
    labels = np.asarray(st.classes, dtype=object)[st.y[:]]
    assert len(pred_store) == st.n_rows
    assert abs(np.mean(pred_store == labels) - acc) < 1e-9
    np.testing.assert_array_equal(pred_store, clf.predict(st.X[:]))  # in-process on the same rows: one answer
    proba = clf.predict_proba(test_path)
    assert proba.shape == (st.n_rows, 26)
    np.testing.assert_array_equal(proba, clf.predict_proba(st.X[:]))


def test_store_predictions_need_no_labels(letter_stores, client, tmp_path):
    """predict(store) uses only the store's features, as `pipeline predict` does: an unlabelled
    store (ingested --like the training store) is predicted, not refused as unevaluable."""
    from pipeline.ingest import ingest
    from pipeline.store import open_store

    train_path, test_path = letter_stores
    st = open_store(test_path)
    X = st.X[:40]
    src = tmp_path / "new.csv"
    src.write_text(",".join(st.feature_names) + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in X) + "\n")
    new = ingest(src, tmp_path / "new.zarr", like=train_path, unlabelled=True)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2, n_iter_no_change=0, random_state=0, client=client)
    clf.fit(train_path)
    np.testing.assert_array_equal(clf.predict(new.path), clf.predict(open_store(new.path).X[:]))
    from pipeline.errors import StoreError

    with pytest.raises(StoreError, match="no targets"):
        clf.score(new.path)  # evaluation still needs labels


def test_pickle_and_model_file_round_trips_on_cluster_model(cluster_clf, letter, tmp_path):
    _, _, Xte, _ = letter
    pred, proba = cluster_clf.predict(Xte), cluster_clf.predict_proba(Xte)
    clone = pickle.loads(pickle.dumps(cluster_clf))
    assert clone.client is None  # a live Client is not pickled
    np.testing.assert_array_equal(clone.predict(Xte), pred)
    np.testing.assert_array_equal(clone.predict_proba(Xte), proba)
    cluster_clf.save(tmp_path / "model.npz")
    model = pipeline.load_model(tmp_path / "model.npz")
    np.testing.assert_array_equal(model.predict(Xte), pred)  # letter's labels are strings already
    np.testing.assert_array_equal(model.predict_proba(Xte), proba)
    back = load_estimator(tmp_path / "model.npz")
    assert type(back) is MLPClassifier and back.get_params()["max_iter"] == 6
    np.testing.assert_array_equal(back.predict(Xte), pred)
    np.testing.assert_array_equal(back.predict_proba(Xte), proba)


# --------------------------------------------------------------------------------------------
# in-process (small data)
# --------------------------------------------------------------------------------------------


def test_digits_accuracy_in_process(digits):
    Xtr, ytr, Xte, yte = digits
    clf = MLPClassifier(random_state=0).fit(Xtr, ytr)  # stopped by scikit-learn's rule: no warning
    assert clf.fitted_on_ == "local" and 100 < clf.n_iter_ < 200
    assert clf.score(Xte, yte) > 0.9  # chance is 0.1
    assert clf.predict_proba(Xte).shape == (len(Xte), 10)
    logit = LogisticRegression(learning_rate_init=1e-2, random_state=0).fit(Xtr, ytr)
    assert logit.model_.spec["hidden"] == [] and logit.score(Xte, yte) > 0.9


def test_regression_r2(housing):
    X, y = housing
    Xtr, Xte, ytr, yte = train_test_split(X[:8000], y[:8000], random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(64, 32), max_iter=30, n_iter_no_change=0, random_state=0).fit(Xtr, ytr)
    assert reg.score(Xte, yte) > 0.65
    lin = LinearRegression(learning_rate_init=1e-2, max_iter=30, random_state=0).fit(Xtr, ytr)
    assert 0.5 < lin.score(Xte, yte) < reg.score(Xte, yte)
    two = MLPRegressor(hidden_layer_sizes=(32,), max_iter=10, n_iter_no_change=0, random_state=0)
    two.fit(Xtr, np.c_[ytr, 2 * ytr])
    assert two.predict(Xte).shape == (len(Xte), 2)


PARITY = [
    *[(e, d) for e in ("LogisticRegression", "MLPClassifier") for d in ("iris", "wine", "breast_cancer")],
    ("LinearRegression", "diabetes"),
    ("MLPRegressor", "diabetes"),
]


@pytest.mark.parametrize(("estimator", "dataset"), PARITY)
def test_defaults_match_scikit_learn_on_its_bundled_datasets(estimator, dataset):
    """At their defaults, at most 1 point of accuracy (0.02 R^2) below scikit-learn's equivalent
    at its defaults (bench.sklearn_parity: same split, same standardization, MLPs averaged over
    the same five random_states)."""
    from bench.sklearn_parity import MARGIN, compare

    row = compare(estimator, dataset, seeds=range(5))
    assert row["ours"] >= row["sklearn"] - MARGIN[row["metric"]], row


def test_linear_models_in_memory_are_solved_and_minibatch_remains_available():
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression as SkLinear

    X, y = load_diabetes(return_X_y=True)
    lin = LinearRegression().fit(X, y)
    assert lin.history_[0]["solver"] == "lstsq" and lin.n_iter_ == 1
    np.testing.assert_allclose(lin.predict(X), SkLinear().fit(X, y).predict(X), rtol=1e-4, atol=1e-3)
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(3\) reached"):
        steps = LinearRegression(solver="minibatch", max_iter=3, random_state=0).fit(X, y)
    assert [h["epoch"] for h in steps.history_] == [0, 1, 2] and "solver" not in steps.history_[0]
    Xd, yd = load_digits(return_X_y=True)
    logit = LogisticRegression().fit(Xd, yd)
    assert logit.history_[0]["solver"] == "lbfgs" and logit.history_[0]["converged"]
    assert logit.score(Xd, yd) > 0.99


def test_early_stopping_holds_out_validation_only_when_asked(digits):
    Xtr, ytr, _, _ = digits
    plain = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, n_iter_no_change=0, random_state=0).fit(Xtr, ytr)
    assert plain.history_[0]["samples"] == len(Xtr) and "val_loss" not in plain.history_[0]
    with pytest.warns(ConvergenceWarning):  # 3 epochs: early stopping (patience 10) cannot act
        held = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, early_stopping=True, random_state=0).fit(Xtr, ytr)
    assert held.history_[0]["samples"] == len(Xtr) - int(0.1 * len(Xtr)) and "val_loss" in held.history_[0]


def test_pipeline_and_grid_search(digits):
    Xtr, ytr, Xte, yte = digits
    pipe = make_pipeline(
        StandardScaler(), MLPClassifier(batch_size=32, max_iter=10, n_iter_no_change=0, random_state=0)
    )
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(16,), (64,)]}, cv=2)
    grid.fit(Xtr, ytr)
    assert grid.best_params_["mlpclassifier__hidden_layer_sizes"] in [(16,), (64,)]
    assert grid.score(Xte, yte) > 0.85


def test_pickle_and_model_file_in_process_with_integer_labels(digits, tmp_path):
    Xtr, ytr, Xte, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=5, n_iter_no_change=0, random_state=0).fit(Xtr, ytr)
    pred, proba = clf.predict(Xte), clf.predict_proba(Xte)
    clone = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(clone.predict(Xte), pred)
    np.testing.assert_array_equal(clone.predict_proba(Xte), proba)
    clf.save(tmp_path / "m.npz")
    model = pipeline.load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(model.predict(Xte), pred.astype(str))  # model files name classes
    back = load_estimator(tmp_path / "m.npz")
    assert back.classes_.dtype == clf.classes_.dtype
    np.testing.assert_array_equal(back.predict(Xte), pred)
    np.testing.assert_array_equal(back.predict_proba(Xte), proba)


def test_partial_fit_improves_and_continues(digits):
    Xtr, ytr, Xte, yte = digits
    clf = MLPClassifier(hidden_layer_sizes=(64,), batch_size=64, random_state=0)
    clf.partial_fit(Xtr, ytr, classes=np.arange(10))
    first = clf.score(Xte, yte)
    for _ in range(6):
        clf.partial_fit(Xtr, ytr)
    assert clf.n_iter_ == 7 and len(clf.loss_curve_) == 7
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.score(Xte, yte) > first + 0.05
    # a partial pass on rows lacking some classes keeps classes_; it continues a full fit too
    clf.partial_fit(Xtr[ytr < 5], ytr[ytr < 5])
    assert list(clf.classes_) == list(range(10))
    full = MLPClassifier(hidden_layer_sizes=(64,), max_iter=3, n_iter_no_change=0, random_state=0).fit(Xtr, ytr)
    before = full.model_.params.copy()
    full.partial_fit(Xtr, ytr)
    assert not np.array_equal(before, full.model_.params) and full.n_iter_ == 4


@pytest.mark.parametrize("optimizer", LOCAL_OPTIMIZERS)
def test_every_local_optimizer_fits_in_process(optimizer):
    """Every local optimizer the config accepts trains in memory, by fit and by partial_fit,
    through the one trainer factory the workers use: the loss falls and the model learns two
    separable blobs. ``nesterov`` is momentum with the look-ahead, not a name the kernels reject."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(-1.0, 1.0, (150, 4)), rng.normal(1.0, 1.0, (150, 4))])
    y = np.repeat([0, 1], 150)
    lr = 0.05 if optimizer in ("sgd", "momentum", "nesterov") else 0.01
    kw = dict(hidden_layer_sizes=(8,), optimizer=optimizer, learning_rate_init=lr, batch_size=32, random_state=0)
    clf = MLPClassifier(max_iter=8, n_iter_no_change=0, **kw).fit(X, y)
    assert clf.fitted_on_ == "local" and clf.n_iter_ == 8
    assert clf.loss_curve_[-1] < 0.8 * clf.loss_curve_[0]
    assert clf.score(X, y) > 0.9
    part = MLPClassifier(**kw)
    for _ in range(4):
        part.partial_fit(X, y, classes=[0, 1])
    assert part.loss_curve_[-1] < part.loss_curve_[0]
    assert part._opt_state["state"]["t"] == 4 * 10  # the local optimizer's steps carry over
    if optimizer == "nesterov":  # the look-ahead is applied: not the plain momentum run
        plain = MLPClassifier(max_iter=8, n_iter_no_change=0, **{**kw, "optimizer": "momentum"}).fit(X, y)
        assert not np.array_equal(plain.model_.params, clf.model_.params)


def test_partial_fit_honours_classes_with_class_sorted_batches():
    """Rows sorted by class: each batch holds one class; ``classes`` fixes all of them up front."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    order = np.argsort(y, kind="stable")
    X, y = X[order], y[order]
    clf = MLPClassifier(hidden_layer_sizes=(16,), random_state=0)
    for a in range(0, len(X), 50):  # the second batch's class 1 is not "unseen": it is in classes
        clf.partial_fit(X[a : a + 50], y[a : a + 50], classes=[0, 1, 2])
    assert clf.n_iter_ == 3
    assert clf.classes_.tolist() == [0, 1, 2] and clf.classes_.dtype.kind == "i"
    assert clf.predict_proba(X).shape == (len(X), 3)
    assert set(clf.predict(X)) <= {0, 1, 2}
    fresh = MLPClassifier(hidden_layer_sizes=(16,), random_state=0)
    with pytest.raises(ValueError, match=r"y has labels \[2\] that are not in classes_ \[0, 1\]"):
        fresh.partial_fit(X, y, classes=[0, 1])
    assert not hasattr(fresh, "classes_") and not hasattr(fresh, "model_")  # the refused call left nothing


def test_dask_arrays_with_nan_are_refused_in_process():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(0)
    X, y = rng.random((60, 3)), np.arange(60) % 2
    Xn = X.copy()
    Xn[7, 1] = np.nan
    Xi = X.copy()
    Xi[8, 0] = np.inf
    cases = [
        (MLPClassifier(max_iter=1), da.from_array(Xn, chunks=20), da.from_array(y, chunks=20), "Input X contains NaN"),
        (
            MLPClassifier(max_iter=1),
            da.from_array(Xi, chunks=20),
            da.from_array(y, chunks=20),
            "Input X contains infinity",
        ),
        (
            MLPRegressor(max_iter=1),
            da.from_array(X, chunks=20),
            da.from_array(np.where(y, np.nan, 1.0), chunks=20),
            "Input y contains NaN",
        ),
    ]
    for est, Xd, yd, fragment in cases:
        extra = {"classes": [0, 1]} if isinstance(est, MLPClassifier) else {}
        with pytest.raises(ValueError, match=fragment):
            est.fit(Xd, yd)
        with pytest.raises(ValueError, match=fragment):
            est.partial_fit(Xd, yd, **extra)
        assert not hasattr(est, "model_")


def test_store_fit_keeps_numeric_labels_dtype(tmp_path, client):
    """A store of numeric labels gives numeric classes_: score and partial_fit on arrays work."""
    from pipeline.store import open_store
    from pipeline.synth import synth

    path = str(tmp_path / "s.zarr")
    synth(path, rows=600, features=4, classes=3, seed=0)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2, n_iter_no_change=0, random_state=0, client=client)
    clf.fit(path)
    assert clf.classes_.dtype.kind == "i" and clf.classes_.tolist() == [0, 1, 2]
    st = open_store(path)
    X, y = st.X[:].astype(np.float64), st.y[:].astype(np.int64)
    assert set(clf.predict(X)) <= {0, 1, 2}
    assert abs(clf.score(X, y) - clf.score(path)) < 1e-3
    clf.partial_fit(X, y)  # the labels of the arrays are the store's classes
    assert clf.n_iter_ == 3


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_iter": 0}, "MLPClassifier(max_iter=0) is invalid: must be >= 1"),
        ({"hidden_layer_sizes": (0,)}, "MLPClassifier(hidden_layer_sizes=(0,)) is invalid: must be widths between"),
        ({"learning_rate_init": -1}, "MLPClassifier(learning_rate_init=-1) is invalid: must be > 0"),
        ({"alpha": -1.0}, "MLPClassifier(alpha=-1.0) is invalid: must be >= 0"),
        ({"options": {"rho": 2}}, "config key 'rho' = 2.0 is invalid"),  # set as a config key: said as one
    ],
)
def test_a_bad_parameter_is_named_as_the_user_passed_it(params, message):
    X, y = np.random.default_rng(0).random((40, 3)), np.arange(40) % 2
    with pytest.raises(ValueError) as err:
        MLPClassifier(**params).fit(X, y)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_errors_are_clear_one_liners(digits, tmp_path):
    Xtr, ytr, _, _ = digits
    clf = MLPClassifier(max_iter=1, n_iter_no_change=0, random_state=0)
    cases = [
        (lambda: clf.fit(Xtr, None), "requires y"),
        (lambda: clf.fit(Xtr, ytr[:-1]), "inconsistent numbers of samples"),
        (lambda: clf.fit(Xtr[:, :, None], ytr), "dim 3"),
        (lambda: clf.fit(np.where(Xtr == 0, np.nan, Xtr), ytr), "NaN"),
        (lambda: clf.fit(Xtr, np.zeros(len(Xtr))), "1 class"),
        (lambda: clf.fit(Xtr, ytr + 0.5), "Unknown label type"),
        (lambda: clf.fit(str(tmp_path), ytr), "pass y=None"),
        (lambda: MLPClassifier().partial_fit(Xtr, ytr), "classes must be passed"),
        (lambda: MLPClassifier(activation="swish").fit(Xtr, ytr), "activation"),
        (lambda: LogisticRegression(solver="lbfgs").fit(Xtr, ytr), "solver='lbfgs' is invalid"),
        (lambda: clf.fit(Xtr, ytr).predict(Xtr[:, :5]), "features"),
        (lambda: clf.partial_fit(Xtr, ytr, classes=[0, 1]), "differ from the fitted classes_"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
    from pipeline.errors import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        MLPClassifier().fit(str(tmp_path / "missing.zarr"))


LAZY_SCRIPT = """
import numpy as np
from sklearn.datasets import load_digits
from pipeline import MLPClassifier
from pipeline import estimator

if __name__ == "__main__":
    X, y = load_digits(return_X_y=True)
    small = MLPClassifier(hidden_layer_sizes=(8,), max_iter=1, n_iter_no_change=0, random_state=0).fit(X, y)
    for call in (small.predict, small.predict_proba, small.score):
        try:
            call("mistyped.zarr")
        except Exception as exc:
            assert "does not exist" in str(exc), exc
        assert not estimator._local, "a mistyped store path started a cluster"
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=2, n_iter_no_change=0, cluster_min_rows=0, random_state=0)
    clf.fit(X, y)
    assert clf.fitted_on_ == "cluster" and "client" in estimator._local, clf.fitted_on_
    print("OK", clf.ps_installed_by_, round(clf.score(X, y), 3))
"""


def test_without_a_client_the_estimator_starts_and_closes_its_own_cluster(tmp_path):
    """In a fresh process (this one has the module's default client): lazy LocalCluster, atexit close."""
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(LAZY_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK "), proc.stdout
    assert "Traceback" not in proc.stderr and "ConvergenceWarning" not in proc.stderr, proc.stderr[-2000:]


def test_full_batch_rmsprop_with_its_own_rho_in_process():
    """batch_size=0 trains in process by full-batch steps, and options={"rho": ...} is the
    RMSprop decay used: the weights equal full-batch RMSprop written in plain NumPy."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((5000, 3)) * [1.0, 2.0, 0.5] + 1.0
    y = X @ [0.5, -1.0, 2.0] + 0.1 * rng.standard_normal(5000)
    est = MLPRegressor(
        hidden_layer_sizes=(),
        batch_size=0,
        optimizer="rmsprop",
        learning_rate_init=0.05,
        max_iter=4,
        n_iter_no_change=0,
        validation_fraction=0.0,
        client="local",
        random_state=0,
        options={"rho": 0.5},
        solver="minibatch",
    )
    est.fit(X, y)
    assert est.n_iter_ == 4
    from kernels.mlp import MLPSpec, init_params

    Xn = (X - X.mean(axis=0)) / X.std(axis=0)
    t = ((y - y.mean()) / y.std()).reshape(-1, 1)
    p = init_params(MLPSpec(3, (), 1, loss="mse"), seed=0, scheme="glorot").astype(np.float64)
    s = np.zeros_like(p)
    for _ in range(4):
        r = Xn @ p[:3].reshape(3, 1) + p[3] - t
        g = np.concatenate([(2 * Xn.T @ r / len(X)).ravel(), [2 * r.mean()]])
        s = 0.5 * s + 0.5 * g * g
        p = p - 0.05 * g / (np.sqrt(s) + 1e-8)
    # the bias's gradient is 0 on standardized data: RMSprop would scale float32 rounding noise
    # up to a full step, so the weights are compared
    np.testing.assert_allclose(est.model_.params[:3], p[:3], rtol=1e-4, atol=1e-5)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def test_fits_in_this_process_train_with_the_configs_blas_threads(monkeypatch):
    """A fit or partial_fit in this process trains with ``blas_threads`` BLAS threads (1 unless
    ``options`` says otherwise, as `pipeline train` in its own process and a Dask worker), and
    the process's own setting is back afterwards."""
    seen: list[int] = []
    epoch = MLPClassifier._epoch

    def watched(*args: Any) -> float:
        seen.append(_blas_threads())
        return epoch(*args)

    monkeypatch.setattr(MLPClassifier, "_epoch", staticmethod(watched))
    rng = np.random.default_rng(10)
    X, y = rng.standard_normal((300, 4)), rng.integers(0, 2, 300)
    available = _blas_threads()
    for options, n in (({}, 1), ({"blas_threads": 2}, 2)):
        seen.clear()
        clf = MLPClassifier(hidden_layer_sizes=(6,), max_iter=2, n_iter_no_change=0, client="local", options=options)
        clf.fit(X, y)
        clf.partial_fit(X, y)
        assert seen == [min(n, available)] * 3
        assert _blas_threads() == available


def test_step_activation_trains_and_predicts_the_same_from_its_model_file(tmp_path):
    """activation="step" (threshold hidden units, straight-through gradient) learns XOR-like
    quadrants that a linear model cannot, and the saved model predicts the same labels."""
    rng = np.random.default_rng(9)
    X = rng.uniform(-1, 1, (600, 2))
    y = np.where((X[:, 0] > 0) ^ (X[:, 1] > 0), "odd", "even")
    clf = MLPClassifier(
        hidden_layer_sizes=(32,),
        activation="step",
        batch_size=20,
        learning_rate_init=1e-2,
        max_iter=60,
        n_iter_no_change=0,
        random_state=1,
    )
    clf.fit(X[:400], y[:400])
    assert clf.score(X[400:], y[400:]) > 0.9
    assert clf.model_.spec["activation"] == "step"
    clf.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(pipeline.load_model(tmp_path / "m.npz").predict(X[400:]), clf.predict(X[400:]))


def test_options_min_samples_is_a_floor_under_in_process_early_stopping():
    """``options={"min_samples": N}`` holds early stopping off until N rows were trained, as in
    the command; by default (0) n_iter_no_change counts from the first epoch."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    # tol so large that no epoch after the first counts as an improvement
    quick = MLPClassifier(n_iter_no_change=1, tol=1e9, random_state=0).fit(X, y)
    floored = MLPClassifier(n_iter_no_change=1, tol=1e9, random_state=0, options={"min_samples": 150 * 6}).fit(X, y)
    assert quick.n_iter_ == 3  # scikit-learn's rule: more than n_iter_no_change epochs without a gain
    assert floored.n_iter_ == 6  # 150 rows an epoch: the floor is reached after the sixth
