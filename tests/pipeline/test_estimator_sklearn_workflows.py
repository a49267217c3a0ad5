"""The estimators in scikit-learn workflows: Pipelines over pandas frames of mixed dtypes, model
selection, ensembles, inspection, persistence, and parameter values scikit-learn users pass
(refused naming the parameter, never truncated). Small data: every fit trains in this process."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.estimator import LogisticRegression, MLPClassifier, MLPRegressor

FAST = {"hidden_layer_sizes": (8,), "max_iter": 5, "n_iter_no_change": 0, "random_state": 0}


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Parameter values: integers must be integers, numbers numbers (named, never truncated)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"batch_size": "auto"}, "batch_size='auto'"),  # scikit-learn's default, not an int()
        ({"batch_size": 0.5}, "batch_size=0.5"),  # was int(0.5) == 0: full-batch training
        ({"max_iter": 2.5}, "max_iter=2.5"),  # was 2 epochs
        ({"max_iter": True}, "max_iter=True"),
        ({"n_iter_no_change": 1.5}, "n_iter_no_change=1.5"),
        ({"hidden_layer_sizes": (5.5,)}, "hidden_layer_sizes=(5.5,)"),  # was a layer of 5
        ({"hidden_layer_sizes": "10"}, "hidden_layer_sizes='10'"),  # was layers of 1 and 0
        ({"hidden_layer_sizes": None}, "hidden_layer_sizes=None"),
        ({"learning_rate_init": None}, "learning_rate_init=None"),
        ({"alpha": "0.01"}, "alpha='0.01'"),  # was float('0.01')
    ],
)
def test_parameter_values_refused_naming_the_parameter(params, named):
    X, y = _data()
    est = MLPClassifier(**{**FAST, **params})
    with pytest.raises(ValueError, match="is invalid") as err:
        est.fit(X, y)
    msg = str(err.value)
    assert f"MLPClassifier({named})" in msg and "\n" not in msg
    assert not hasattr(est, "model_")


def test_batch_size_auto_in_a_grid_search_names_the_parameter():
    X, y = _data()
    grid = GridSearchCV(MLPClassifier(**FAST), {"batch_size": ["auto", 32]}, cv=2, error_score="raise")
    with pytest.raises(ValueError, match=r"batch_size='auto'\) is invalid: must be an integer number of rows"):
        grid.fit(X, y)


def test_integral_values_of_other_types_are_taken():
    X, y = _data()
    est = MLPClassifier(
        hidden_layer_sizes=np.array([4, 3]), max_iter=np.int64(3), batch_size=32.0, alpha=np.float32(0.5)
    )
    est.set_params(n_iter_no_change=0, random_state=0).fit(X, y)
    assert est.n_iter_ == 3 and [w.shape for w in est.coefs_] == [(3, 4), (4, 3), (3, 1)]
    ref = MLPClassifier(hidden_layer_sizes=(4, 3), max_iter=3, batch_size=32, alpha=0.5, n_iter_no_change=0)
    ref.set_params(random_state=0).fit(X, y)
    np.testing.assert_array_equal(est.predict_proba(X), ref.predict_proba(X))


# --------------------------------------------------------------------------------------------
# Sparse input: the fix named is one that applies inside a Pipeline
# --------------------------------------------------------------------------------------------


def test_sparse_step_output_trains_as_its_dense_form():
    """A OneHotEncoder's sparse output (scikit-learn's default) in a Pipeline trains as its dense form
    does unstandardized (sparse features are standardized only when options ask), and a model
    fitted on dense rows predicts sparse ones of the same columns."""
    pd = pytest.importorskip("pandas")
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"num": rng.normal(size=n), "city": [f"c{i}" for i in rng.integers(0, 60, n)]})
    y = (df["num"] > 0).to_numpy()
    ct = ColumnTransformer([("num", StandardScaler(), ["num"]), ("cat", OneHotEncoder(), ["city"])])
    assert hasattr(ct.fit_transform(df), "tocsr")  # sparse: under ColumnTransformer's sparse_threshold
    sparse = make_pipeline(ct, MLPClassifier(**FAST)).fit(df, y)
    dense = ColumnTransformer(
        [("num", StandardScaler(), ["num"]), ("cat", OneHotEncoder(sparse_output=False), ["city"])]
    )
    fitted = make_pipeline(dense, MLPClassifier(**FAST, options={"normalize": False})).fit(df, y)
    np.testing.assert_allclose(sparse.predict_proba(df), fitted.predict_proba(df), atol=1e-6)
    np.testing.assert_allclose(fitted[-1].predict_proba(ct.fit_transform(df)), fitted.predict_proba(df), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Workflows that agree with scikit-learn's MLPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [np.array(["no", "yes"]), np.array([False, True]), np.array([-1, 5]), np.array([0.0, 2.0])],
    ids=["str", "bool", "int", "float"],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_classes_and_probability_columns_as_scikit_learns(labels):
    X, yi = _data()
    y = labels[yi]
    ours = MLPClassifier(**FAST).fit(X, y)
    theirs = SkMLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(X, y)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    assert ours.classes_.dtype == theirs.classes_.dtype
    proba = ours.predict_proba(X)
    assert proba.shape == theirs.predict_proba(X).shape == (len(X), 2)
    pred = ours.predict(X)
    assert pred.dtype == theirs.predict(X).dtype
    np.testing.assert_array_equal(pred, ours.classes_[proba.argmax(axis=1)])
    assert ours.score(X, y) == pytest.approx(np.mean(pred == y))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_errors_as_scikit_learns():
    X, y = _data()
    with pytest.raises(NotFittedError):
        MLPClassifier().predict(X)
    with pytest.raises(NotFittedError):
        MLPRegressor().predict(X)
    msg = "X has 2 features, but MLPClassifier is expecting 3 features as input."
    for est in (MLPClassifier(**FAST), SkMLPClassifier(max_iter=300, random_state=0)):
        est.fit(X, y)
        with pytest.raises(ValueError, match=msg):
            est.predict(X[:, :2])


def test_mixed_frame_pipeline_search_and_persistence(tmp_path):
    pd = pytest.importorskip("pandas")
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.model_selection import cross_validate
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(1)
    n = 150
    df = pd.DataFrame(
        {
            "num": rng.normal(size=n),
            "count": rng.integers(0, 5, n),
            "flag": rng.random(n) > 0.5,
            "kind": pd.Categorical(rng.choice(["x", "y", "z"], n)),
        }
    )
    y = pd.Series(np.where(df["num"] + (df["kind"] == "x") > 0.3, "yes", "no"), name="target")
    ct = ColumnTransformer(
        [
            ("num", StandardScaler(), ["num", "count"]),
            ("cat", OneHotEncoder(sparse_output=False), ["flag", "kind"]),
        ]
    ).set_output(transform="pandas")
    pipe = make_pipeline(ct, MLPClassifier(**FAST))
    res = cross_validate(pipe, df, y, cv=3, scoring=["accuracy", "neg_log_loss", "roc_auc"])
    assert np.isfinite(res["test_neg_log_loss"]).all() and (res["test_roc_auc"] > 0).all()
    grid = GridSearchCV(pipe, {"mlpclassifier__alpha": [0.0, 1e-3]}, cv=2).fit(df, y)
    best = grid.best_estimator_
    assert best[-1].feature_names_in_.tolist() == list(ct.fit(df).get_feature_names_out())
    assert best.feature_names_in_.tolist() == list(df.columns)
    twin = clone(best).set_params(mlpclassifier__max_iter=2)
    assert twin[-1].max_iter == 2 and best[-1].max_iter == 5 and not hasattr(twin[-1], "model_")
    joblib.dump(best, tmp_path / "pipe.joblib")
    back = joblib.load(tmp_path / "pipe.joblib")
    np.testing.assert_array_equal(back.predict_proba(df), best.predict_proba(df))
    assert back.classes_.tolist() == ["no", "yes"]


def test_ensembles_calibration_and_inspection():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import StackingClassifier, VotingClassifier
    from sklearn.inspection import partial_dependence, permutation_importance

    X, yi = _data()
    y = np.array(["a", "b"])[yi]
    cal = CalibratedClassifierCV(MLPClassifier(**FAST), cv=3).fit(X, y)
    assert cal.predict_proba(X).shape == (len(X), 2)
    vote = VotingClassifier([("mlp", MLPClassifier(**FAST)), ("lr", LogisticRegression())], voting="soft").fit(X, y)
    assert set(vote.predict(X)) <= {"a", "b"}
    stack = StackingClassifier(
        [("mlp", MLPClassifier(**FAST)), ("lr", LogisticRegression())], final_estimator=LogisticRegression(), cv=3
    ).fit(X, y)
    assert stack.score(X, y) > 0.8
    lr = LogisticRegression().fit(X, y)
    imp = permutation_importance(lr, X, y, n_repeats=3, random_state=0)
    assert imp.importances_mean[2] < imp.importances_mean[0]  # the third column does not decide y
    pd_res = partial_dependence(lr, X, [0], grid_resolution=5)
    assert pd_res["average"].shape == (1, 5) and np.all(np.diff(pd_res["average"][0]) > 0)


# --------------------------------------------------------------------------------------------
# Several labels per row: refused naming the wrapper that takes them
# --------------------------------------------------------------------------------------------


def test_multilabel_targets_name_multioutput_classifier():
    from sklearn.multioutput import MultiOutputClassifier

    X, y = _data()
    Y = np.c_[y, (X[:, 2] > 0).astype(np.int64)]
    for fit in (lambda e: e.fit(X, Y), lambda e: e.partial_fit(X, Y, classes=[0, 1])):
        est = MLPClassifier(**FAST)
        with pytest.raises(ValueError, match=r"y has shape \(120, 2\).*MultiOutputClassifier") as err:
            fit(est)
        assert "\n" not in str(err.value) and not hasattr(est, "model_")
    wrapped = MultiOutputClassifier(MLPClassifier(**FAST)).fit(X, Y)
    assert wrapped.predict(X).shape == Y.shape
    from sklearn.exceptions import DataConversionWarning

    with pytest.warns(DataConversionWarning, match="column-vector y"):  # one label per row, as scikit-learn's
        column = MLPClassifier(**FAST).fit(X, y[:, None])
    np.testing.assert_array_equal(column.classes_, [0, 1])
