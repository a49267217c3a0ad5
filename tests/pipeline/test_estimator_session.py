"""The estimators in one long-lived Python process (a notebook): clients closed or lost between
fits, Ctrl-C during ``fit`` and ``partial_fit``, fits that fail, and predicting on Dask arrays
larger than one block. Each leaves the estimator either fitted or unfitted (never a mix), the
cluster usable, and no temporary files behind."""

from __future__ import annotations

import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from pipeline import estimator as est_mod
from pipeline.errors import TrainingError
from pipeline.estimator import LogisticRegression, MLPClassifier, MLPRegressor


@pytest.fixture(autouse=True, scope="module")
def _no_stray_cluster() -> Iterator[None]:
    yield
    est_mod.shutdown_local_cluster()


@pytest.fixture
def tmpdir_of_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory the estimators' temporary stores and run directories go to."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = np.where(X[:, 0] - X[:, 1] > 0, "yes", "no")
    return X, y


def _fitted_attributes(est: Any) -> list[str]:
    return sorted(a for a in vars(est) if a.endswith("_") and not a.startswith("__"))


def _on_call(module: str, function: str, nth: int, act: Callable[[], None]) -> Callable:
    """A trace function running ``act`` when ``module``'s ``function`` is called the ``nth``
    time in this thread: Ctrl-C (or a client closed) at a known point of a real fit."""
    calls = [0]

    def tracer(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == function and code.co_filename.endswith(module):
            calls[0] += 1
            if calls[0] == nth:
                act()

    return tracer


def _interrupt() -> None:
    raise KeyboardInterrupt


def _jobs(client: Any) -> list[str]:
    return client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.extensions["pipeline_ps"].jobs))


# --------------------------------------------------------------------------------------------
# A client closed, or lost, between fits
# --------------------------------------------------------------------------------------------


def test_a_closed_client_is_refused_before_a_store_is_written(client, tmpdir_of_fits):
    X, y = _data()
    closed = Client(client.scheduler.address, set_as_default=False)
    closed.close()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, client=closed)
    with pytest.raises(ValueError, match=r"client=.* is closed: pass a running distributed.Client"):
        clf.fit(X, y)
    assert _fitted_attributes(clf) == []
    assert list(tmpdir_of_fits.iterdir()) == []  # no temporary store was written
    assert not est_mod._local  # nor a LocalCluster started instead


def test_a_scheduler_address_is_connected_again_after_its_client_closed(client):
    """A scheduler restarted at the same address: the client the estimators kept of it gave up
    reconnecting (closed); the next fit connects afresh instead of failing on it forever."""
    X, y = _data()
    address = client.scheduler.address
    gone = Client(address, set_as_default=False)
    gone.close()
    est_mod._remote[address] = gone  # what a client of a scheduler that went away becomes
    try:
        clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0, client=address)
        assert clf.fit(X, y).fitted_on_ == "cluster"
        assert est_mod._remote[address] is not gone and est_mod._remote[address].status == "running"
    finally:
        est_mod.shutdown_local_cluster()


def test_a_client_closed_during_a_fit_says_to_fit_again(client, tmpdir_of_fits):
    """The lost-scheduler error of `pipeline train` says to resume from the run directory; a
    fit's run directory is temporary and removed, so the estimator says to fit again instead."""
    X, y = _data()
    mine = Client(client.scheduler.address, set_as_default=False)
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, n_iter_no_change=0, random_state=0, client=mine)
    sys.settrace(_on_call("pipeline/train.py", "_run_epoch", 2, mine.close))
    try:
        with pytest.raises(TrainingError, match="lost the Dask scheduler") as err:
            clf.fit(X, y)
    finally:
        sys.settrace(None)
    message = str(err.value)
    assert "fit again" in message and "--resume" not in message and str(tmpdir_of_fits) not in message
    assert list(tmpdir_of_fits.iterdir()) == []
    assert _fitted_attributes(clf) == []
    assert _jobs(client) == []  # the scheduler dropped the closed client's job


# --------------------------------------------------------------------------------------------
# Ctrl-C and failures during fit / partial_fit
# --------------------------------------------------------------------------------------------


def test_a_failed_refit_leaves_the_estimator_unfitted_not_half_of_the_old_fit():
    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0, random_state=0).fit(X, y)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clf.fit(bad, y)
    assert _fitted_attributes(clf) == []
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)  # as predict says
    # a fit that fails after its classes were taken (it diverges) leaves none of them either
    reg = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0, random_state=0).fit(X, X[:, 0])
    reg.set_params(learning_rate_init=1e30, optimizer="sgd")
    with pytest.raises(ValueError, match="training diverged"), np.errstate(over="ignore", invalid="ignore"):
        reg.fit(X, X[:, 0] * 1e30)
    assert _fitted_attributes(reg) == []
    assert reg.set_params(learning_rate_init=1e-3, optimizer="adam").fit(X, X[:, 0]).n_iter_ == 2


def test_ctrl_c_during_a_cluster_fit_leaves_it_unfitted_and_the_cluster_usable(client, tmpdir_of_fits):
    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=4, n_iter_no_change=0, random_state=0, client=client)
    clf.fit(X, y)
    assert clf.ps_installed_by_ and clf.n_iter_ == 4
    sys.settrace(_on_call("pipeline/train.py", "_run_epoch", 2, _interrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            clf.fit(X[:300], y[:300])
    finally:
        sys.settrace(None)
    assert _fitted_attributes(clf) == []  # neither the old fit's n_iter_ nor the new one's classes_
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)
    assert list(tmpdir_of_fits.iterdir()) == []
    assert _jobs(client) == []
    assert clf.set_params(max_iter=1).fit(X, y).n_iter_ == 1


def test_ctrl_c_in_a_first_partial_fit_leaves_it_unfitted():
    """The first partial_fit sets up its model before its pass: interrupted there, it used to
    keep that empty model, and every later partial_fit and predict failed on its weights."""
    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), random_state=0)
    sys.settrace(_on_call("pipeline/loop.py", "run_batches", 1, _interrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            clf.partial_fit(X, y, classes=["no", "yes"])
    finally:
        sys.settrace(None)
    assert _fitted_attributes(clf) == []
    with pytest.raises(NotFittedError):
        clf.predict(X)
    clf.partial_fit(X, y, classes=["no", "yes"])
    assert clf.n_iter_ == 1 and set(clf.predict(X)) <= {"no", "yes"}


# --------------------------------------------------------------------------------------------
# Predicting on Dask arrays
# --------------------------------------------------------------------------------------------


def test_predict_on_a_dask_array_holds_one_block_at_a_time():
    """fit streams a Dask array block by block; predict, predict_proba, decision_function and
    score do too, and give what they give on the same rows in NumPy."""
    import dask
    import dask.array as da

    with dask.config.set(scheduler="synchronous"):  # as without a client, whatever ran before here
        _predict_on_dask_blocks(da)


def _predict_on_dask_blocks(da: Any) -> None:

    rng = np.random.default_rng(1)
    X, w = rng.normal(size=(2000, 40)), rng.normal(size=40)
    clf = LogisticRegression().fit(X, X @ w > 0)
    clf.predict_proba(da.random.default_rng(3).normal(size=(100, 40), chunks=(50, 40)))  # imports done
    big = da.random.default_rng(2).normal(size=(100_000, 40), chunks=(4_000, 40))  # 32 MB, made as read
    tracemalloc.start()
    try:
        proba = clf.predict_proba(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(proba, np.ndarray) and proba.shape == (100_000, 2)
    # the rows' float64 block, its standardized copy and the predictions: a fraction of the array
    assert peak < big.nbytes / 3, f"predict_proba held {peak / 2**20:.0f} MB of a {big.nbytes / 2**20:.0f} MB array"
    rows = big[:30_000].compute()
    small = big[:30_000]
    # the same up to the last bits BLAS gives a matrix product of another number of rows
    np.testing.assert_allclose(clf.predict_proba(small), clf.predict_proba(rows), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(clf.predict(small), clf.predict(rows))
    np.testing.assert_allclose(clf.decision_function(small), clf.decision_function(rows), rtol=1e-12, atol=1e-12)
    labels = rows @ w > 0
    assert clf.score(small, da.from_array(labels, chunks=7_000)) == clf.score(rows, labels)
    np.testing.assert_allclose(proba[:30_000], clf.predict_proba(rows), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# An estimator given a client: clone, pickle, cross-validation
# --------------------------------------------------------------------------------------------


def test_an_estimator_given_a_client_clones_and_cross_validates_on_it(client):
    from sklearn.base import clone
    from sklearn.model_selection import cross_validate

    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0, client=client)
    twin = clone(clf)  # a Client cannot be deep-copied: it is shared
    assert twin.client is client and twin.get_params()["max_iter"] == 1 and twin is not clf
    out = cross_validate(clf, X, y, cv=2, return_estimator=True)
    assert [e.fitted_on_ for e in out["estimator"]] == ["cluster", "cluster"]
    assert all(e.client is client for e in out["estimator"])


def test_pickling_leaves_the_estimators_client_alone(client):
    """A live Client does not pickle: the copy has client=None, and the estimator pickled keeps
    its own (pickling used to set it to None, so its next fit left the user's cluster)."""
    import pickle

    X, y = _data()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, n_iter_no_change=0, random_state=0, client=client)
    copy = pickle.loads(pickle.dumps(clf))
    assert copy.client is None
    assert clf.client is client
    assert clf.fit(X, y).fitted_on_ == "cluster" and not est_mod._local


def test_a_grid_search_of_n_jobs_2_fits_on_a_cluster_in_each_joblib_worker() -> None:
    """Without a client, each joblib worker (``n_jobs=2``) starts its own LocalCluster: its
    start method ('loky') cannot spawn worker processes (every fit failed with "Nanny failed to
    start"), so there the workers are threads; the scores are those of ``n_jobs=1``."""
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 4))
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)
    base = MLPClassifier(
        cluster_min_rows=0,
        max_iter=8,
        n_iter_no_change=0,
        hidden_layer_sizes=(8,),
        batch_size=16,
        learning_rate_init=0.01,
        random_state=0,
    )
    scores = {
        n_jobs: GridSearchCV(base, {"alpha": [1e-4, 1e-1]}, cv=2, n_jobs=n_jobs, error_score="raise")
        .fit(X, y)
        .cv_results_["mean_test_score"]
        for n_jobs in (1, 2)
    }
    est_mod.shutdown_local_cluster()
    assert (scores[2] > 0.8).all(), scores
    np.testing.assert_array_equal(scores[1], scores[2])


def test_the_estimators_own_cluster_has_the_commands_worker_plugins() -> None:
    """The LocalCluster the estimators start ends its worker processes as the command's does
    (pipeline.connect.QuickExit, DriverTakesInterrupts): without them each lingered after a
    cluster fit until its nanny killed it, about 4 s, at every shutdown_local_cluster()."""
    from pipeline.connect import DriverTakesInterrupts, QuickExit

    est_mod.shutdown_local_cluster()
    client = est_mod._cluster_client(1)
    try:
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        assert plugins and all({QuickExit.name, DriverTakesInterrupts.name} <= set(p) for p in plugins.values())
    finally:
        est_mod.shutdown_local_cluster()
