"""scikit-learn compatible estimators over the distributed trainer.

``MLPClassifier`` / ``MLPRegressor`` (and ``LogisticRegression`` / ``LinearRegression``, the same
classes with ``hidden_layer_sizes=()``) follow scikit-learn's estimator API: constructor arguments
are stored unmodified, ``fit`` returns ``self``, fitted attributes end with ``_``, and they work in
``Pipeline``, ``GridSearchCV``, ``clone`` and ``pickle``.

Constructor parameters map onto :class:`pipeline.config.TrainConfig`::

    hidden_layer_sizes -> hidden        activation -> activation    optimizer -> optimizer
    learning_rate_init -> lr            momentum -> momentum        alpha -> weight_decay
    batch_size -> batch_size            local_steps -> local_steps  mode -> mode
    server_optimizer -> server_optimizer  server_lr -> server_lr    max_iter -> epochs
    n_iter_no_change -> patience        tol -> min_delta            validation_fraction -> validation
    backend -> backend                  random_state -> seed (None: a random seed per fit)
    options -> any other TrainConfig key, as a dict (e.g. {"staleness": 4, "aggregate": "mean"},
               {"rho": 0.9} for rmsprop, {"beta1": 0.8, "server_beta2": 0.99})

A key of ``options`` that a parameter above sets (``hidden``, ``epochs``, ``lr``, ``seed``,
``validation``, ``cluster_min_rows``, ``rounds``, ...) or that ``fit({site: store})`` sets
(``sites``) is refused by ``fit`` (ValueError naming the parameter), so ``get_params()`` always
describes the model trained. A fit in this process (and ``partial_fit``) refuses option keys only
a cluster acts on (parameter server, loader, federation: ``staleness``, ``compression``, ...), and
the exact linear solvers (``solver="auto"``) refuse the minibatch ones (``beta1``, ``rho``,
...), unless the value is TrainConfig's default: an option is used or refused, never ignored.

``optimizer`` is the minibatch optimizer: adam (default, as scikit-learn's ``solver="adam"``),
nesterov (scikit-learn's ``solver="sgd"``: SGD with Nesterov momentum ``momentum=0.9``), momentum
(heavy ball), sgd (plain SGD: ``momentum`` does not act), rmsprop or adamw. ``solver`` is not
scikit-learn's: it chooses between the exact linear solvers and minibatch steps (below); its
scikit-learn values are refused naming the ``optimizer`` that is theirs.

``activation`` is one of identity, sigmoid, tanh, relu, leaky_relu and step (the perceptron's
threshold, trained by the straight-through gradient: :mod:`kernels.reference`). ``batch_size=0``
is full-batch gradient descent: every epoch is one step with the mean gradient of all training
rows (accumulated over pieces of 4,096 rows, so memory does not grow with the data).

The defaults are scikit-learn's (``MLPClassifier``: one hidden layer of 100, Adam at lr 1e-3,
``max_iter=200`` epochs, ``tol=1e-4``, ``n_iter_no_change=10``; batches of 256 rows where
scikit-learn takes ``min(200, n)``), not the command's (sized for
out-of-core data), so an estimator swapped in for scikit-learn's learns what it learns. As in
scikit-learn, ``validation_fraction`` is held out only with ``early_stopping=True``; otherwise
every row trains and ``n_iter_no_change`` watches the training loss. In this process the stopping
rule is scikit-learn's (``_update_no_improvement_count``): an epoch whose training loss is not
``tol`` below the least so far (with ``early_stopping``: whose validation score, accuracy or R^2,
is not ``tol`` above the best so far) does not improve, and the fit stops once more than
``n_iter_no_change`` epochs in a row did not; the model kept is the last epoch's (with
``early_stopping``, the best validation score's). A fit on a cluster stops by the command's rule
(``patience`` epochs without a ``min_delta`` gain; the best epoch's model).

``LogisticRegression`` defaults to ``alpha=1e-3`` (L2 on the mean loss, about scikit-learn's
``C=1`` on a thousand rows), ``LinearRegression`` to none. In-process fits start
from Glorot-uniform weights, bound sqrt(6 / (fan_in + fan_out)), and zero biases: scikit-learn's
weights for tanh and relu layers (scikit-learn narrows sigmoid layers' bound to sqrt(2 / (fan_in +
fan_out)) and draws the biases from the same range); the cluster path from the command's.

Counts (``hidden_layer_sizes``' widths, ``batch_size``, ``max_iter``, ...) take integers, or floats
without a fraction; rates take numbers. Any other value (scikit-learn's ``batch_size="auto"``,
``max_iter=2.5``) is refused by ``fit`` and ``partial_fit`` naming the parameter, never truncated.
``X`` may be a scipy.sparse CSR or CSC matrix (``TfidfVectorizer``'s, ``OneHotEncoder``'s output)
in this process (``fit`` with ``client="local"`` or fewer than ``cluster_min_rows`` rows,
``partial_fit``, predictions): each minibatch (block of rows to validate or predict) is densified
on its own, never the whole matrix, and learns what its dense form does with
``options={"normalize": False}``: sparse features are not standardized unless ``options`` ask
(scikit-learn's users do not scale TF-IDF columns; scaled, a rare term's column swamps the rest,
4-7 points of accuracy below scikit-learn's MLP on real text, on a par without). A fit that would train
on a cluster (whose store holds dense rows) refuses it naming ``client="local"``, and the exact
linear solvers (``solver="auto"``) refuse it naming ``solver="minibatch"``. Classifiers take one
label per row (a multilabel ``y`` is refused naming ``sklearn.multioutput.MultiOutputClassifier``).

``solver="auto"`` (default) solves linear models (``hidden_layer_sizes=()``) on in-memory data
to convergence: least squares in closed form (ridge with ``alpha``) for ``LinearRegression``,
L-BFGS (at most ``max_iter`` iterations, gradient tolerance ``tol``) for ``LogisticRegression``.
Stores, the cluster path, MLPs, ``partial_fit`` and ``solver="minibatch"`` take minibatch steps.

Where training runs (the ``client`` and ``cluster_min_rows`` parameters):

- ``fit(path)`` with a store made by ``pipeline ingest`` (``y`` must be None) always trains on the
  cluster through :func:`pipeline.train.train`. ``classes_`` keep the label column's type: the
  numbers of a numeric label column (int64 when integral), else strings.
- ``fit({"site-a": path_a, "site-b": path_b})`` (``y`` must be None) trains federated
  (:mod:`pipeline.federated`, ``max_iter`` rounds): each site's store is read only by the
  workers declaring the site's Dask resource. With a client (``client=`` or the current one)
  every site needs such a worker there (else a ValueError names the missing ones); without one,
  a local cluster of one worker per site is started for the fit (paths made absolute here).
- ``fit(X, y)`` with arrays writes a temporary store (:func:`pipeline.store.create_store`; Dask
  arrays block by block, never computed whole) and trains on the cluster, unless the rule below
  sends it in-process. The temporary store and run directory are deleted after training. They
  are under this machine's temporary directory (``tempfile.gettempdir()``): on a cluster of
  other hosts set ``TMPDIR`` to a directory every worker can read, or fit on a store path.
- In-process rule: ``client="local"`` always trains in this process with the Numba kernels
  (:class:`kernels.mlp.MLPTrainer`, the same minibatch step the workers run, one participant, no
  parameter server), with the BLAS threads of the config's ``blas_threads`` (1, as in a worker,
  unless ``options`` sets it; a fit on a cluster refuses another value: its workers take their
  BLAS threads from the nanny's environment). With ``client=None`` (default) inputs of fewer
  than ``cluster_min_rows`` rows (default 10,000) train in-process too: scikit-learn's checks
  and small grid searches fit hundreds of tiny datasets, where a cluster round trip costs far
  more than the training. Set ``cluster_min_rows=0`` to send everything to the cluster. An
  in-process fit (and ``partial_fit``) refuses ``options`` asking for differential privacy or
  secure aggregation, which only the cluster's parameter server gives (a ValueError with the
  fix).
- The cluster: a ``distributed.Client`` passed as ``client``, or a scheduler address string
  (``"tcp://HOST:PORT"``, ``"HOST:PORT"``; a client of it is made once per process and closed by
  :func:`shutdown_local_cluster`, and made again once it closed: a scheduler restarted at the
  address is reached); any other string than ``"local"`` is refused, and so is a closed client
  object (a ValueError before anything is written; ``clone`` shares a client object, a pickled
  copy has ``client=None`` and the estimator pickled keeps its client); else the current client
  (``distributed.get_client()``); else one LocalCluster per process with ``n_workers``
  single-threaded worker processes (threads in a joblib worker of ``n_jobs > 1``, which cannot
  start processes) and :mod:`pipeline.ps` preloaded into its scheduler, started
  lazily on first use and closed at interpreter exit (``atexit``) or by
  :func:`shutdown_local_cluster`. It is never made the default client, so it does not capture
  the user's own Dask work (the estimators enter ``client.as_current()`` around their cluster
  calls). Its workers are processes: as with any Dask LocalCluster, a script that fits on it
  needs an ``if __name__ == "__main__":`` guard.

``warm_start=True`` (scikit-learn's) makes ``fit`` of a fitted estimator continue from its model
instead of starting over: the fitted weights, standardization and classes, a new optimizer state
(as scikit-learn's), ``max_iter`` more epochs in this process; ``loss_curve_``,
``validation_scores_`` and ``t_`` go on from the previous fits, and so do the stopping rule's best
and count, while ``n_iter_`` counts this fit's epochs. The exact logistic solver starts L-BFGS from
the fitted solution. What it cannot continue is refused (ValueError, naming the fix, the fitted
model kept): other hidden layers, features or targets, ``y`` whose classes are not
``classes_`` (scikit-learn's refusal), and a fit that would train on a cluster (a store, sites,
``cluster_min_rows`` rows or more), whose runs start from their own weights.

``partial_fit(X, y, classes=None)`` runs one pass (one epoch of shuffled minibatches) over the
given rows, in-process with :class:`kernels.mlp.MLPTrainer`, continuing from the current weights
(also after a cluster ``fit``) and from the local optimizer state of the previous ``partial_fit``.
The first call of an unfitted estimator fixes the feature (and regression target) standardization
from its rows and, for classifiers, needs ``classes`` (every label of all calls), as in
scikit-learn: ``classes_`` are those, and a batch with a label outside them is refused. Dask
arrays are computed and checked like NumPy input (NaN / inf refused). ``fit`` starts over
(unless ``warm_start=True``). As scikit-learn's, it refuses ``early_stopping=True`` (a pass holds
out no rows).

A ``fit`` that fails or is interrupted (Ctrl-C: ``KeyboardInterrupt``), and a first
``partial_fit`` that does, leaves the estimator unfitted (a ``warm_start`` fit: as it was before),
with none of the fitted attributes of a previous fit or of its own (``check_is_fitted`` and
``predict`` agree); its temporary store and run directory are removed and the cluster's job of it
ends, so the next ``fit`` starts clean.

``predict`` / ``score`` on a store path check the store (it exists, matches the model) before
any cluster is used or started.

Prediction on in-memory arrays runs in this process through :class:`pipeline.model.Model`, on a
Dask array one row block at a time (computed by the current Dask scheduler; the array is never
held whole); on a store path it runs chunk by chunk on the cluster (:mod:`pipeline.inference`).
Either way the predictions are a NumPy array (one value per row). ``score`` on a store path is the cluster's
accuracy / R^2 from :func:`pipeline.inference.evaluate_store`.

After ``fit(store)`` (and a federated fit), ``feature_names_in_`` are the store's column names: a
DataFrame (or any table with string ``.columns``) given to ``predict`` / ``score`` must have them
in that order, as after ``fit(DataFrame)``; NumPy rows are taken in the store's column order.

Fitted weights, as scikit-learn's on raw features (the standardization folded in):
``coefs_`` / ``intercepts_`` per layer (a binary classifier's last layer is one logistic unit),
and ``coef_`` / ``intercept_`` on ``LinearRegression`` / ``LogisticRegression`` (shapes as
scikit-learn's). An L-BFGS fit that stops before converging warns (``ConvergenceWarning``), and so
does a minibatch ``fit`` (in this process, on a cluster, federated) that trains ``max_iter``
epochs without ``n_iter_no_change`` stopping it, in scikit-learn's words ("Stochastic Optimizer:
Maximum iterations (N) reached and the optimization hasn't converged yet."); ``n_iter_no_change=0``
asks for exactly ``max_iter`` epochs and does not warn, nor does ``partial_fit``.

The training record, as scikit-learn's MLPs give it, is read from ``history_`` (a record per
epoch, the run's ``history.json`` epochs on a cluster), so it survives pickle and
:func:`load_estimator`: ``loss_curve_`` (each epoch's mean training loss: cross-entropy, or the
squared error of standardized targets; without the ``alpha`` penalty), ``loss_`` (its last value),
``best_loss_`` (its least; None with ``early_stopping=True``, where the validation score chooses
the weights kept), ``validation_scores_`` (accuracy / R^2 on the held-out rows after each epoch;
None without ``early_stopping``), ``best_validation_score_`` (their maximum), ``t_`` (training rows
seen), ``n_iter_`` (the epochs of the last ``fit``), and ``n_layers_`` / ``n_outputs_`` /
``out_activation_``. The exact solvers record one entry: the solution's loss (``n_iter_`` counts
the L-BFGS iterations). ``partial_fit`` appends its epoch's loss (and no validation score).
Classifiers have ``predict_log_proba`` (``log(predict_proba)``); ``LogisticRegression`` has ``decision_function``
(the logits ``X @ coef_.T + intercept_``; for two classes the (n,) log-odds of ``classes_[1]``).
``fit(..., sample_weight=...)`` and ``partial_fit(..., sample_weight=...)`` are refused (not
supported); ``score(X, y, sample_weight=w)`` weights the rows and ``score(store_path,
sample_weight=w)`` is refused.

``save(path)`` writes an ordinary model file: ``pipeline.load_model(path)`` (a
:class:`pipeline.model.Model`, the ``pipeline predict`` CLI) reads it and gives the same
probabilities / values, with class labels as strings; :func:`load_estimator` restores the
estimator itself with its original label dtype. It refuses an existing ``path`` unless
``overwrite=True``, and then replaces only a model file this program wrote.

scikit-learn's estimator checks (``parametrize_with_checks``) all pass for every estimator at its
defaults; ``bench.sklearn_parity`` compares the defaults with scikit-learn's on its bundled
datasets (within a point of accuracy / 0.02 R^2, or better). In-memory predictions
run in float64 (see :meth:`pipeline.model.Model._forward`), so a row's prediction does not
depend on the other rows of the batch, as ``check_methods_sample_order_invariance`` and
``check_methods_subset_invariance`` demand.
No check is skipped or expected to fail (:func:`expected_failed_checks` is empty).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import numbers
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from pipeline.config import TrainConfig
from pipeline.loop import (
    FULL_BATCH_ROWS,
    blas_limit,
    load_local_state,
    local_state,
    make_trainer,
    prepare_targets,
    run_batches,
)
from pipeline.model import Model, record_of
from pipeline.runstate import BestModel

__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "MLPClassifier",
    "MLPRegressor",
    "expected_failed_checks",
    "load_estimator",
    "shutdown_local_cluster",
]

# estimator parameter -> TrainConfig key
_CONFIG_KEYS = {
    "hidden_layer_sizes": "hidden",
    "activation": "activation",
    "optimizer": "optimizer",
    "learning_rate_init": "lr",
    "momentum": "momentum",
    "alpha": "weight_decay",
    "batch_size": "batch_size",
    "local_steps": "local_steps",
    "mode": "mode",
    "server_optimizer": "server_optimizer",
    "server_lr": "server_lr",
    "max_iter": "epochs",
    "n_iter_no_change": "patience",
    "tol": "min_delta",
    "validation_fraction": "validation",
    "backend": "backend",
}
# option keys a named parameter (or the way ``fit`` is called) already sets: refused in ``options``
_OWNED_KEYS = {
    **{key: param for param, key in _CONFIG_KEYS.items()},
    "seed": "random_state",
    "cluster_min_rows": "cluster_min_rows",
    "rounds": "max_iter",  # the rounds of a federated fit
}
# the TrainConfig keys a fit in this process (and partial_fit) uses; every other key only acts on
# a Dask cluster, so an in-process fit refuses it in ``options`` rather than ignoring it
_IN_PROCESS_KEYS = frozenset(
    {"loss", "optimizer", "momentum", "beta1", "beta2", "rho", "min_samples", "normalize", "blas_threads"}
)
# of those, what the exact solvers of linear models (solver="auto" on in-memory rows) use
_EXACT_SOLVER_KEYS = frozenset({"loss", "normalize", "blas_threads"})
# a scheduler address: SCHEME://HOST:PORT, or HOST:PORT (as `pipeline train --scheduler` takes it)
_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|inproc|ws|wss)://\S+|[A-Za-z0-9_.\-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5})")
SOLVERS = ("auto", "minibatch")  # auto: linear models on in-memory data solved exactly
WRITE_BLOCK_ROWS = 1 << 16  # rows per write when copying NumPy input into the temporary store


# --------------------------------------------------------------------------------------------
# In this process or on a cluster
# --------------------------------------------------------------------------------------------


def _blas_threads(cfg: TrainConfig) -> Any:
    """The BLAS threads of a fit in this process: ``cfg.blas_threads`` (1 unless ``options``
    says otherwise), as for `pipeline train` in its own process and as in a Dask worker."""
    return blas_limit(cfg.blas_threads)


def _check_on_cluster(cfg: TrainConfig) -> None:
    """A fit on a cluster refuses what only a fit in this process honours (ValueError, as the
    estimators' other refusals): see :meth:`pipeline.config.TrainConfig.check_on_cluster`."""
    from pipeline.errors import ConfigError

    try:
        cfg.check_on_cluster()
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The per-process cluster
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_local: dict[str, Any] = {}
_remote: dict[str, Any] = {}  # scheduler address -> this process's client of it


def _address_client(address: str) -> Any:
    """A client of the scheduler at ``address`` (one per address and process, closed with
    :func:`shutdown_local_cluster`); a ValueError of one line when it cannot be reached."""
    with _lock:
        remote = _remote
        if address in remote and _closed(remote[address]):
            # the scheduler went away and the client gave up reconnecting: connect afresh (to the
            # scheduler restarted there, or fail in one line below) instead of reusing a dead client
            remote.pop(address).close()
        if address not in remote:
            from distributed import Client

            try:
                remote[address] = Client(address, set_as_default=False, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise ValueError(
                    f"client={address!r}: cannot connect to a Dask scheduler there ({reason}); start one "
                    "(`dask scheduler --preload pipeline.ps`) or fix the address"
                ) from None
            atexit.register(shutdown_local_cluster)
        return remote[address]


def _cluster_client(n_workers: int) -> Any:
    """The current Dask client, else this process's lazily started LocalCluster's client."""
    try:
        from distributed import get_client

        return get_client()
    except ValueError:
        pass
    with _lock:
        if "client" in _local and _closed(_local["client"]):
            # its client was closed (``estimator._cluster().close()``): the cluster is started again
            _local.pop("client")
            _local.pop("cluster").close()
        if "client" not in _local:
            from distributed import Client, LocalCluster

            from pipeline.connect import own_cluster_config

            processes = _can_spawn_workers()
            with own_cluster_config():
                cluster = LocalCluster(
                    n_workers=max(1, int(n_workers)),
                    threads_per_worker=1,
                    processes=processes,
                    # no dashboard pages; the scheduler's HTTP server takes a free port, never
                    # another cluster's 8787 (two of these at once warned "Port 8787 is already in use")
                    dashboard_address="127.0.0.1:0",
                    scheduler_kwargs={"preload": ["pipeline.ps"], "dashboard": False},
                    host="127.0.0.1",
                    protocol="tcp",  # also for threads, whose default (inproc://) takes no host
                )
            _local["cluster"] = cluster
            _local["client"] = Client(cluster, set_as_default=False)
            if processes:
                from pipeline.connect import DriverTakesInterrupts, QuickExit, QuietSchedulerClose

                # as the command's clusters: worker processes that end at once when the cluster
                # closes (without them, each lingered until its nanny killed it after 4 s), and
                # no heartbeat traceback from a worker as the cluster's scheduler closes
                for plugin in (QuickExit(), DriverTakesInterrupts(), QuietSchedulerClose()):
                    _local["client"].register_plugin(plugin, name=plugin.name)
            atexit.register(shutdown_local_cluster)
        return _local["client"]


def _can_spawn_workers() -> bool:
    """Whether this process can start worker processes: not in a joblib worker (scikit-learn's
    ``n_jobs > 1``), whose start method ('loky') a spawned process cannot find (the nanny failed
    with "cannot find context for 'loky'"); there the LocalCluster's workers are threads of this
    process, the kernels releasing the GIL as they run."""
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True) in (None, "fork", "spawn", "forkserver")


def _closed(client: Any) -> bool:
    """Whether ``client`` was closed (by its owner, or after losing its scheduler for good):
    nothing can run through it again."""
    return getattr(client, "status", "running") in ("closing", "closed")


def shutdown_local_cluster() -> None:
    """Close the LocalCluster the estimators started in this process (if any), and their clients
    of schedulers given by address (``client="tcp://..."``)."""
    with _lock:
        client, cluster = _local.pop("client", None), _local.pop("cluster", None)
        remote = [_remote.pop(a) for a in list(_remote)]
    for other in remote:
        other.close()
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_float32_range(a: np.ndarray, name: str) -> None:
    """Refuse a finite value beyond float32's range: stores and the kernels hold float32, where it
    becomes infinity (a fit on the cluster then "diverged", a prediction gave NaN)."""
    if a.dtype != np.float64 or not a.size:
        return
    big = np.abs(a) > np.finfo(np.float32).max
    if big.any():
        where = np.argwhere(big.reshape(len(a), -1))[0]
        at = f"row {where[0]}" + (f", feature {where[1]}" if a.ndim == 2 else "")
        raise ValueError(
            f"Input {name} contains a value too large for float32 ({at}: {float(a[tuple(where[: a.ndim])]):g}); "
            "the model trains and predicts on float32 values: clip or rescale it"
        )


def _is_path(X: Any) -> bool:
    return isinstance(X, str | os.PathLike)


def _is_sparse(X: Any) -> bool:
    """Whether ``X`` is a scipy.sparse matrix or array (TF-IDF, one-hot encodings)."""
    return type(X).__module__.startswith("scipy.sparse") and hasattr(X, "tocsr")


def _moments(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and standard deviation; of a sparse matrix from its stored values only
    (never densified): E[x^2] - E[x]^2 in float64."""
    if not _is_sparse(X):
        return X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64)
    n = X.shape[0]
    mean = np.asarray(X.sum(axis=0), dtype=np.float64).ravel() / n
    sq = X.copy()
    sq.data = np.square(sq.data, dtype=np.float64)
    var = np.asarray(sq.sum(axis=0), dtype=np.float64).ravel() / n - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _sparse_block_rows(n_features: int) -> int:
    """Rows of a sparse matrix densified at once to validate or predict: about 32 MB of float64, in
    whole blocks of the rows :meth:`pipeline.model.Model._forward` computes at a time (it pads a
    shorter block to them)."""
    from pipeline.model import FORWARD_ROWS

    return FORWARD_ROWS * max(1, (1 << 22) // (max(1, n_features) * FORWARD_ROWS))


class _SparseRows:
    """The rows of a sparse matrix as the model's standardized float32 features, densified a
    minibatch at a time: ``rows[idx]`` (an index array or a slice) is dense, so a matrix whose
    dense form would not fit in memory trains as one that does. ``subset`` keeps rows sparse."""

    def __init__(self, X: Any, model: Model) -> None:
        self.X, self.model = X.tocsr(), model

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.model.transform_features(self.X[idx].toarray())

    def subset(self, idx: np.ndarray) -> _SparseRows:
        return _SparseRows(self.X[idx], self.model)

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """The rows in dense blocks of :func:`_sparse_block_rows` rows."""
        step = _sparse_block_rows(self.X.shape[1])
        for a in range(0, len(self), step):
            sl = slice(a, min(len(self), a + step))
            yield sl, self[sl]


def _is_dask(X: Any) -> bool:
    return type(X).__module__.startswith("dask.") and hasattr(X, "blocks")


def _computed(a: Any) -> Any:
    """``a`` computed if it is a Dask array, else ``a``."""
    return a.compute() if _is_dask(a) else a


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """scikit-learn's validation errors on one line (the NaN one, a paragraph, cut to its point;
    sparse input's with the fix that applies in a Pipeline)."""
    try:
        yield
    except ValueError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        if len(lines) <= 1:
            raise
        if "NaN" in lines[0]:
            msg = f"{lines[0]} Impute or drop missing values first (e.g. sklearn.impute.SimpleImputer in a Pipeline)."
        else:
            msg = " ".join(lines)
        raise ValueError(msg) from None
    except TypeError as exc:
        # scikit-learn's fix, X.toarray(), cannot be applied to what a Pipeline's step before
        # (a OneHotEncoder, a ColumnTransformer) hands on: name the settings that make it dense
        if not str(exc).startswith("Sparse data was passed"):
            raise
        raise TypeError(
            "Sparse data was passed for X, but dense data is required: pass X.toarray(), or make the Pipeline's "
            "step before dense (OneHotEncoder(sparse_output=False), ColumnTransformer(..., sparse_threshold=0))"
        ) from None


@contextlib.contextmanager
def _temporary_run(tmp: str) -> Iterator[None]:
    """Training in the temporary directory ``tmp`` (removed when the fit ends): an error telling
    to resume from its last checkpoint (the scheduler was lost) names a run directory that will
    not exist, so it says instead to fit again; workers that cannot open the fit's temporary
    store (on other hosts, which do not see this machine's temporary directory) are told what
    makes them able to."""
    from pipeline.errors import PipelineError

    try:
        yield
    except PipelineError as exc:
        msg = str(exc)
        if tmp not in msg:
            raise
        cut = msg.find("; the last checkpoint is in")
        if cut >= 0:
            raise type(exc)(
                f"{msg[:cut]}; the fit's temporary store and run directory are removed: fit again on a running "
                "cluster (with a new client if this one was closed)"
            ) from None
        cut = msg.find("; put the store on a path or URL every worker can reach")
        if cut >= 0 and "cannot open store" in msg:
            raise type(exc)(
                f"{msg[:cut]}; the fit's arrays are written to a temporary store under this machine's temporary "
                f"directory ({os.path.dirname(tmp)}): set TMPDIR to a directory every worker can read (e.g. a "
                "shared file system), or ingest the data to such a store and fit on its path"
            ) from None
        raise


def _store_classes(st: Any) -> np.ndarray:
    """A classification store's labels with their real dtype: the numbers a numeric label column
    held (int64 when all integral, else float64), else the strings."""
    target = st.attrs.get("target") or {}
    values = target.get("class_values")
    if target.get("kind") != "string" and values is not None and len(values) == len(st.classes):
        arr = np.asarray(values, dtype=np.float64)
        return arr.astype(np.int64) if np.all(arr == np.round(arr)) else arr
    return np.asarray(st.classes, dtype=object)


def _site_classes(names: list[str], paths: Any) -> np.ndarray:
    """``classes_`` of a federated fit, as :func:`_store_classes` gives them for ``fit(store)``
    (the label column's numbers when numeric): from a site's store when this process can open it
    and its class list is the model's, else the model's class names read as numbers when they all
    are. The order stays the model's (its output columns)."""
    from pipeline.store import open_store

    for path in paths:
        try:
            st = open_store(os.fspath(path))
        except Exception:  # noqa: BLE001 - a store only the site's workers can read
            continue
        if st.task == "classification" and list(st.classes or []) == list(names):
            return _store_classes(st)
    try:
        arr = np.asarray([float(n) for n in names], dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray(names, dtype=object)
    if not np.all(np.isfinite(arr)):
        return np.asarray(names, dtype=object)
    return arr.astype(np.int64) if np.all(arr == np.round(arr)) else arr


def _check_save_target(given: str, dest: str, overwrite: bool) -> None:
    """Refuse, in one line, a ``save`` destination that is a directory, whose directory does not
    exist or cannot be written, or that exists (without ``overwrite``, or is not a model file)."""
    from pipeline.checkpoint import read_meta

    where = f"save({given!r})"
    if os.path.isdir(dest):
        raise ValueError(f"{where}: it is a directory; give a file path, e.g. {os.path.join(given, 'model.npz')!r}")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise ValueError(f"{where}: the directory {parent!r} does not exist")
    from pipeline.store import unwritable_reason

    if unwritable_reason(dest)[1] is not None:  # probed: a file can be made there
        raise ValueError(f"{where}: the directory {parent!r} is not writable")
    if not os.path.lexists(dest):
        return
    if not overwrite:
        raise ValueError(f"{where}: the file exists; pass overwrite=True to replace a model file")
    meta = None if os.path.islink(dest) else read_meta(dest)
    if meta is None or meta.get("kind") != "model":
        raise ValueError(f"{where}: the file exists and is not a model file written by this program; not replaced")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


class _NoImprovement:
    """scikit-learn's stopping rule for its MLPs (``_update_no_improvement_count``): an epoch
    whose training loss is above ``best - tol`` (with ``early_stopping``, whose validation score
    is below ``best + tol``) does not improve; the best follows every gain, however small, and
    training stops once more than ``patience`` (``n_iter_no_change``; 0: never) epochs in a row
    did not improve, and ``min_samples`` rows trained (the command's floor, 0 unless ``options``
    sets it). ``improved`` says whether the last value set a new best."""

    def __init__(self, patience: int, tol: float, by_score: bool, min_samples: int = 0) -> None:
        self.patience, self.tol, self.by_score, self.min_samples = int(patience), float(tol), by_score, min_samples
        self.best = -np.inf if by_score else np.inf
        self.count = self.seen = 0
        self.improved = False

    def update(self, value: float, samples: int) -> bool:
        """Count one epoch's loss (score) over ``samples`` training rows; whether to stop (NaN
        counts as no improvement)."""
        value = float(value)
        self.seen += int(samples)
        if self.by_score:
            worse, self.improved = not value >= self.best + self.tol, value > self.best
        else:
            worse, self.improved = not value <= self.best - self.tol, value < self.best
        self.count = self.count + 1 if worse else 0
        if self.improved:
            self.best = value
        return bool(self.patience) and self.count > self.patience and self.seen >= self.min_samples


# --------------------------------------------------------------------------------------------
# The estimators
# --------------------------------------------------------------------------------------------


class _BaseMLP(BaseEstimator):
    """Shared implementation; use :class:`MLPClassifier` or :class:`MLPRegressor`."""

    _task = ""

    def __init__(
        self,
        hidden_layer_sizes: Any = (100,),
        activation: str = "relu",
        *,
        optimizer: str = "adam",
        learning_rate_init: float = 1e-3,
        momentum: float = 0.9,
        alpha: float = 0.0,
        batch_size: int = 256,
        local_steps: int = 8,
        mode: str = "sync",
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        max_iter: int = 200,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        warm_start: bool = False,
        backend: str = "cpu",
        random_state: Any = None,
        options: dict | None = None,
        client: Any = None,
        n_workers: int = 2,
        cluster_min_rows: int = 10_000,
        solver: str = "auto",
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate_init = learning_rate_init
        self.momentum = momentum
        self.alpha = alpha
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.mode = mode
        self.server_optimizer = server_optimizer
        self.server_lr = server_lr
        self.max_iter = max_iter
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.backend = backend
        self.random_state = random_state
        self.options = options
        self.client = client
        self.n_workers = n_workers
        self.cluster_min_rows = cluster_min_rows
        self.early_stopping = early_stopping
        self.warm_start = warm_start
        self.solver = solver

    # -- configuration ------------------------------------------------------------------------

    def _train_config(self) -> TrainConfig:
        """The TrainConfig these parameters describe (ConfigError, a ValueError, if invalid)."""
        values: dict[str, Any] = {}
        for param, key in _CONFIG_KEYS.items():
            values[key] = getattr(self, param)
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, int | np.integer) and not isinstance(hidden, bool):
            hidden = [hidden]
        if isinstance(hidden, str | bytes | Mapping) or not hasattr(hidden, "__iter__"):
            raise ValueError(
                f"{type(self).__name__}(hidden_layer_sizes={hidden!r}) is invalid: pass the width of each hidden "
                "layer, e.g. (100,) or (64, 32); () for none"
            )
        values["hidden"] = [self._integer("hidden_layer_sizes", h, hidden) for h in hidden]
        rs = self.random_state
        if isinstance(rs, int | np.integer):
            values["seed"] = int(rs)
        else:
            values["seed"] = int(check_random_state(rs).randint(0, 2**31 - 1))
        params = {key: param for param, key in _CONFIG_KEYS.items()}
        for k in ("lr", "momentum", "weight_decay", "server_lr", "min_delta", "validation"):
            v = values[k]
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{type(self).__name__}({params[k]}={v!r}) is invalid: must be a number")
            values[k] = float(v)
        for k in ("batch_size", "local_steps", "epochs", "patience"):
            values[k] = self._integer(params[k], values[k])
        # as scikit-learn: validation_fraction is held out only with early_stopping; without,
        # every row trains and n_iter_no_change watches the training loss
        if not self.early_stopping:
            values["validation"] = 0.0
        # n_iter_no_change counts from the first epoch, as in scikit-learn (``options`` may
        # set the command's min_samples floor instead)
        values["min_samples"] = 0
        options = self.options or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"options={options!r} is invalid: pass a dict of TrainConfig keys, e.g. {{'rho': 0.9}}")
        if "sites" in options:
            raise ValueError(
                f"options={{'sites': {options['sites']!r}}}: train federated with fit({{site: store_path, ...}}) "
                "instead (options is for the other TrainConfig keys)"
            )
        for key in options:
            if key in _OWNED_KEYS:
                raise ValueError(
                    f"options={{{key!r}: {options[key]!r}}} sets what the parameter {_OWNED_KEYS[key]} of "
                    f"{type(self).__name__} sets: use that parameter (options is for the other TrainConfig keys)"
                )
        values.update(options)
        from pipeline.errors import ConfigError

        if not isinstance(self.warm_start, bool | np.bool_):
            raise ValueError(f"{type(self).__name__}(warm_start={self.warm_start!r}) is invalid: must be True or False")
        if self.solver not in SOLVERS:
            # scikit-learn's solver names the optimizer; its 'sgd' has Nesterov momentum, which plain sgd has not
            same = {"sgd": "optimizer='nesterov' (momentum=0.9)", "adam": "optimizer='adam'"}.get(str(self.solver))
            hint = f"for scikit-learn's solver={self.solver!r} pass {same}" if same else "e.g. optimizer='adam'"
            raise ValueError(
                f"solver={self.solver!r} is invalid: use one of {', '.join(SOLVERS)} "
                f"(the minibatch optimizer is the optimizer parameter: {hint})"
            )
        try:
            return TrainConfig.from_dict(values)
        except ConfigError as exc:
            raise ValueError(self._param_error(str(exc))) from None

    def _integer(self, param: str, value: Any, given: Any = None) -> int:
        """``value`` of ``param`` as an int: integers, and floats without a fraction (``1e3``).
        Anything else is refused naming the parameter, never truncated (``batch_size=0.5`` would
        be full-batch training) nor failing in ``int()`` (scikit-learn's ``batch_size="auto"``)."""
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        shown = given if given is not None else value
        hint = ""
        if param == "batch_size":
            hint = " number of rows per minibatch (0: full batch; scikit-learn's 'auto' is min(200, n_samples))"
        raise ValueError(f"{type(self).__name__}({param}={shown!r}) is invalid: must be an integer{hint}")

    def _param_error(self, message: str) -> str:
        """A config error about a key this estimator's parameter sets, said of the parameter the
        user passed (``max_iter=0 is invalid: ...``, not ``config key 'epochs' = 0``); keys set
        through ``options`` keep the config's wording."""
        import re

        m = re.match(r"config key '(\w+)' = .+? is invalid: (.*)$", message, re.S)
        params = {key: param for param, key in _CONFIG_KEYS.items()}
        if m is None or m.group(1) not in params or m.group(1) in (self.options or {}):
            return message
        param = params[m.group(1)]
        return f"{type(self).__name__}({param}={getattr(self, param)!r}) is invalid: {m.group(2)}"

    # -- sklearn plumbing ---------------------------------------------------------------------

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        # sparse X trains by minibatches; the exact solvers of linear models refuse it
        hidden = self.hidden_layer_sizes
        exact = self.solver == "auto" and isinstance(hidden, tuple | list) and len(hidden) == 0
        tags.input_tags.sparse = not exact
        return tags

    def __sklearn_clone__(self) -> Any:
        """scikit-learn's clone, sharing a ``client`` object instead of deep-copying it: a
        ``distributed.Client`` is a connection to a cluster, not a parameter value, and it cannot
        be copied (``clone``, ``GridSearchCV`` and ``cross_val_score`` failed on it)."""
        client = self.client
        if client is None or isinstance(client, str):
            return super().__sklearn_clone__()
        twin = type(self).__new__(type(self))
        twin.__dict__.update(vars(self), client=None)
        new = twin.__sklearn_clone__()
        new.client = client
        return new

    def __getstate__(self) -> dict[str, Any]:
        # a copy: scikit-learn's is this estimator's own __dict__, which pickling must not change
        state = dict(super().__getstate__())  # model_ pickles without its kernels (Model.__getstate__)
        if not isinstance(state.get("client"), str | type(None)):
            state["client"] = None  # a live Client does not pickle either (the estimator keeps it)
        return state

    # -- input --------------------------------------------------------------------------------

    def _encode_y(self, y: np.ndarray, reset: bool) -> np.ndarray:
        raise NotImplementedError

    def _validate_arrays(
        self, X: Any, y: Any, reset: bool, reset_classes: bool | None = None
    ) -> tuple[Any, np.ndarray | Any]:
        """Validated float X and encoded y (NumPy), or the Dask arrays checked lazily.
        ``reset`` fixes the features; ``reset_classes`` (default: ``reset``) takes ``classes_``
        from ``y``, else every label of ``y`` must be one of ``classes_``."""
        if reset_classes is None:
            reset_classes = reset
        if y is None:
            raise ValueError(f"This {type(self).__name__} estimator requires y to be passed, but the target y is None")
        if _is_dask(X) or _is_dask(y):
            return self._validate_dask(X, y, reset, reset_classes)
        multi = self._task == "regression"
        # the shape without converting y (np.shape calls array functions some array-likes refuse)
        shape = tuple(getattr(y, "shape", ()))
        if not shape and isinstance(y, list | tuple) and y and isinstance(y[0], list | tuple):
            shape = (len(y), len(y[0]))
        if not multi and len(shape) == 2 and shape[1] > 1:
            # scikit-learn's MLPClassifier takes a multilabel indicator matrix; this one does not
            raise ValueError(
                f"y has shape {shape}: {type(self).__name__} takes one label per row (a 1-D y); for several "
                "labels per row wrap it in sklearn.multioutput.MultiOutputClassifier"
            )
        if not reset:
            self._check_columns(X)
        with _one_line_errors():
            X, y = self._validate(
                X,
                y,
                reset=reset,
                dtype=(np.float64, np.float32),
                multi_output=multi,
                y_numeric=multi,
                accept_sparse=("csr", "csc"),
            )
        if self._task == "regression" and y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if _is_sparse(X):  # its stored values (NaN / inf were refused above)
            X = X.tocsr()
            if X.dtype == np.float64 and X.nnz and np.abs(X.data).max() > np.finfo(np.float32).max:
                raise ValueError(
                    "Input X contains a value too large for float32; the model trains and predicts on float32 "
                    "values: clip or rescale it"
                )
        else:
            _check_float32_range(X, "X")
        if self._task == "regression":
            _check_float32_range(y, "y")
        return X, self._encode_y(y, reset_classes)

    def _check_columns(self, X: Any) -> None:
        """Column names of a table scikit-learn does not read (any object with string ``.columns``,
        e.g. a small wrapper) checked against ``feature_names_in_`` as scikit-learn checks a
        DataFrame's: the same names in the same order, or a ValueError."""
        names = getattr(self, "feature_names_in_", None)
        if names is None or not hasattr(X, "columns"):
            return
        from sklearn.utils.validation import _get_feature_names

        try:
            if _get_feature_names(X) is not None:
                return  # a DataFrame scikit-learn knows: validate_data checks it
            cols = list(X.columns)
        except TypeError:
            return
        if not cols or not all(isinstance(c, str) for c in cols) or cols == [str(n) for n in names]:
            return
        raise ValueError(
            f"The feature names should match those that were passed during fit: X has columns {cols}, "
            f"the model was fitted on {[str(n) for n in names]} (in this order); select X's columns in that order"
        )

    def _validate(self, X: Any, y: Any = None, reset: bool = False, **check_params: Any) -> Any:
        """scikit-learn's ``validate_data``, except that after a fit on a store NumPy rows are the
        store's columns in order (as ``pipeline predict`` and ``load_model`` take them): they are
        checked as ``validate_data`` checks them but for its warning that X has no feature names
        (a DataFrame's names are still checked). No warning filter is changed: filters are the
        process's, and predictions served from several threads would install or drop them under
        each other."""
        from sklearn.utils.validation import _check_n_features, _get_feature_names, check_array, check_X_y

        if reset or not getattr(self, "_names_from_store", False) or _get_feature_names(X) is not None:
            return validate_data(self, X, **({} if y is None else {"y": y}), reset=reset, **check_params)
        if y is None:
            out = X = check_array(X, input_name="X", estimator=self, **check_params)
        else:
            X, y = out = check_X_y(X, y, estimator=self, **check_params)
        _check_n_features(self, X, reset=False)
        return out

    def _validate_dask(self, X: Any, y: Any, reset: bool, reset_classes: bool) -> tuple[Any, Any]:
        import dask.array as da

        X, y = da.asarray(X), da.asarray(y)
        if any(np.isnan(c) for c in X.chunks[0]) or any(np.isnan(c) for c in y.chunks[0]):
            raise ValueError("Dask arrays with unknown chunk sizes: call X.compute_chunk_sizes() first")
        if X.ndim != 2:
            raise ValueError(f"Expected a 2D array for X, got shape {X.shape}")
        if y.ndim not in (1, 2) or len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has shape {y.shape}; expected ({len(X)},)")
        if len(X) < 1:
            raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required.")
        if X.dtype.kind not in "biuf" or (self._task == "regression" and y.dtype.kind not in "biuf"):
            raise ValueError(f"Dask input must be numeric, got X {X.dtype} and y {y.dtype}")
        if reset:
            self.n_features_in_ = int(X.shape[1])
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        if self._task == "classification":
            labels = np.unique(y.compute() if y.nbytes < 2**27 else da.unique(y).compute())
            check_classification_targets(labels)
            self._set_classes(labels, reset_classes)
        return X.rechunk({1: -1}), y

    def _set_classes(self, labels: np.ndarray, reset: bool) -> None:
        raise NotImplementedError

    # -- fit ----------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """Train from scratch on arrays (NumPy, pandas, Dask), a store path (``y=None``), or
        ``{site: store_path}`` (``y=None``): federated over the sites (docs/federated.md).
        ``sample_weight`` is not supported (a ValueError says so; scikit-learn's checks read the
        signature, so it is not a named parameter)."""
        self._refuse_fit_params("fit", fit_params)
        self._check_client()
        cfg = self._train_config()
        # warm_start (scikit-learn's): a fitted estimator continues from its weights
        warm = bool(self.warm_start) and hasattr(self, "model_")
        before = dict(vars(self)) if warm else None
        if warm:
            self.__dict__.pop("_opt_state", None)  # a fit starts its optimizer afresh, as scikit-learn's
        else:
            self._forget_fit()
        try:
            stopped = self._fit_from(X, y, cfg, warm)
        except BaseException:  # refused, failed or interrupted (Ctrl-C): unfitted, as constructed
            self._forget_fit()
            if before is not None:  # a warm start refused or failed keeps the model it would continue
                self.__dict__.update(before)
            raise
        if stopped is False and cfg.patience and self.n_iter_ >= cfg.epochs:
            # scikit-learn's words and category: the epochs ran out before n_iter_no_change epochs
            # without a tol improvement stopped the fit (n_iter_no_change=0 asks for max_iter epochs)
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization "
                "hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _forget_fit(self) -> None:
        """Drop everything a fit set (the attributes ending in ``_`` and the private state beside
        them): a fit starts over, and one that fails or is interrupted leaves no mix of the
        previous fit's attributes (``n_iter_``, ``ps_installed_by_``, ...) and its own
        (``classes_``) that ``check_is_fitted`` would take for a fitted estimator."""
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("__")]:
            delattr(self, attr)
        for attr in ("_opt_state", "_n_outputs"):
            self.__dict__.pop(attr, None)
        self._trained_on_arrays = self._names_from_store = False

    def _fit_from(self, X: Any, y: Any, cfg: TrainConfig, warm: bool = False) -> bool | None:
        """Train from scratch, or with ``warm`` from the fitted model (see :meth:`fit`): whether
        the stopping rule ended a minibatch training before ``max_iter`` epochs (None for the
        exact solvers of linear models)."""
        if warm and (_is_path(X) or (isinstance(X, Mapping) and not hasattr(X, "tocsr"))):
            raise self._warm_on_cluster("a store" if _is_path(X) else "sites' stores")
        if warm:
            return self._fit_warm(X, y, cfg)
        if isinstance(X, Mapping) and not hasattr(X, "tocsr"):  # scipy's DOK sparse arrays are dicts
            if y is not None:
                raise ValueError("fit({site: store_path}, y): each site's store holds its own targets; pass y=None")
            return self._fit_sites(dict(X), cfg)
        if _is_path(X):
            if y is not None:
                raise ValueError("fit(store_path, y): a store holds its own targets; pass y=None")
            return self._fit_store(os.fspath(X), cfg)
        X, y = self._validate_arrays(X, y, reset=True)
        n = X.shape[0]
        local = self._trains_here(n)
        if _is_sparse(X) and not local:
            raise self._sparse_on_cluster(n)
        if local:
            return self._fit_here(X, y, cfg, warm=False)
        _check_on_cluster(cfg)  # before the store is written
        with tempfile.TemporaryDirectory(prefix="pipeline-estimator-") as tmp:
            store = self._write_store(X, y, os.path.join(tmp, "data.zarr"))
            stopped = self._train_on_cluster(store, cfg, os.path.join(tmp, "run"))
        self._trained_on_arrays = True
        return stopped

    def _sparse_on_cluster(self, n: int) -> ValueError:
        """The refusal of sparse rows that would train on a cluster: its store holds dense rows, and
        a sparse matrix's dense copy (TF-IDF: rows x vocabulary) is what the sparse form avoids."""
        where = "a client" if self.client is not None else f"{n} rows, cluster_min_rows={self.cluster_min_rows}"
        return ValueError(
            f"X is a sparse matrix, which trains only in this process (a minibatch densified at a time), and this "
            f"fit would train on a Dask cluster ({where}): pass client='local'"
        )

    def _warm_on_cluster(self, what: str) -> ValueError:
        """The refusal of a warm start that would train on a cluster: a cluster run starts from
        its own initialization (or a run directory's checkpoint), not from this model's weights."""
        return ValueError(
            f"warm_start=True continues the fitted model in this process, and a fit on {what} trains on a Dask "
            "cluster from new weights: fit in-memory rows with client='local' to continue, or pass "
            "warm_start=False to train from scratch"
        )

    def _fit_warm(self, X: Any, y: Any, cfg: TrainConfig) -> bool | None:
        """``fit`` with ``warm_start=True`` on a fitted estimator (scikit-learn's semantics): the same
        features, classes and hidden layers, training in this process from the fitted weights and
        standardization; ``loss_curve_`` / ``validation_scores_`` / ``t_`` grow and the stopping
        rule's count and best go on from the previous fits, ``n_iter_`` counts this fit's epochs."""
        if self._task == "classification" and y is not None and not _is_dask(y):
            try:
                labels = np.unique(np.asarray(y).ravel())
            except (TypeError, ValueError):
                labels = None
            if labels is not None and set(labels.tolist()) != set(self.classes_.tolist()):
                raise ValueError(
                    f"warm_start=True needs y with the classes of the fitted model, {self.classes_.tolist()}; y has "
                    f"{labels.tolist()[:10]}: pass warm_start=False to train from scratch on these classes (or "
                    "partial_fit for a batch with some of them)"
                )
        try:
            X, y = self._validate_arrays(X, y, reset=False)
        except ValueError as exc:
            if "features, but" not in str(exc) and "feature names" not in str(exc):
                raise
            raise ValueError(
                f"{exc} warm_start=True continues the fitted model: pass its features, or warm_start=False to "
                "train from scratch"
            ) from None
        n = X.shape[0]
        if not self._trains_here(n):
            many = f"{n} rows, cluster_min_rows={self.cluster_min_rows},"
            raise self._warm_on_cluster("rows with a client" if self.client is not None else many)
        return self._fit_here(X, y, cfg, warm=True)

    def _trains_here(self, n: int) -> bool:
        """Whether a fit of ``n`` in-memory rows trains in this process (``client="local"``, or no
        client and fewer than ``cluster_min_rows`` rows) rather than on a Dask cluster."""
        return self.client == "local" or (self.client is None and n < int(self.cluster_min_rows))

    def _fit_here(self, X: Any, y: Any, cfg: TrainConfig, warm: bool) -> bool | None:
        """Train validated in-memory rows in this process (:meth:`_fit_local`; with ``warm`` from the
        fitted model): whether the stopping rule ended it."""
        if _is_dask(X):  # in memory now: the same checks as NumPy input (NaN / inf refused)
            X, y = self._validate_arrays(np.asarray(X.compute()), np.asarray(_computed(y)), reset=not warm)
        with _blas_threads(cfg):
            stopped = self._fit_local(X if _is_sparse(X) else np.asarray(X), y, cfg, warm=warm)
        self.fitted_on_ = "local"
        self._trained_on_arrays = True
        return stopped

    def _check_client(self) -> None:
        """``client`` is None, "local", a scheduler address or a client object that is not closed
        (else ValueError)."""
        c = self.client
        if c is not None and not isinstance(c, str) and _closed(c):
            # refused before a store is written: training through it would fail with the lost
            # scheduler's resume hint, naming a temporary run directory that is then removed
            raise ValueError(
                f"client={c!r} is closed: pass a running distributed.Client (e.g. Client(LocalCluster())), "
                "or client=None (the current client, else a LocalCluster of n_workers)"
            )
        if c is None or not isinstance(c, str) or c == "local" or _ADDRESS.fullmatch(c):
            return
        raise ValueError(
            f"client={c!r} is invalid: use 'local' (train in this process), a scheduler address "
            "('tcp://HOST:PORT' or 'HOST:PORT'), a distributed.Client, or None (the current client, else a "
            "LocalCluster of n_workers)"
        )

    def _cluster(self) -> Any:
        self._check_client()
        if self.client is not None and not isinstance(self.client, str):
            return self.client
        if isinstance(self.client, str) and self.client != "local":
            return _address_client(self.client)
        return _cluster_client(self.n_workers)

    def _fit_store(self, path: str, cfg: TrainConfig) -> bool:
        from pipeline.store import open_store

        _check_on_cluster(cfg)
        st = open_store(path)
        if st.task != self._task:
            raise ValueError(f"store {path!r} is a {st.task} store; {type(self).__name__} does {self._task}")
        self.n_features_in_ = st.n_features
        # the store's column names: a DataFrame given to predict / score must have them, in order
        # (scikit-learn's check, as after fit(DataFrame)); NumPy rows are taken in the store's order
        self.feature_names_in_ = np.asarray([str(n) for n in st.feature_names], dtype=object)
        self._names_from_store = True
        if self._task == "classification":
            self.classes_ = _store_classes(st)
        with tempfile.TemporaryDirectory(prefix="pipeline-estimator-") as tmp:
            return self._train_on_cluster(path, cfg, os.path.join(tmp, "run"))

    def _fit_sites(self, stores: dict[Any, Any], cfg: TrainConfig) -> bool:
        """Federated ``fit({site: store_path, ...})`` (pipeline.federated): each site's store is
        read only by the workers that declare the site's resource. With a client of its own
        (``client=`` or the current one) every site needs such a worker there; else a local
        cluster of one worker per site is started for this fit."""
        from pipeline.connect import cluster_client
        from pipeline.errors import ConfigError
        from pipeline.sites import SITE_NAME, read_sites, site_resources
        from pipeline.train import train

        if not stores:
            raise ValueError("fit({}): name at least one site and its store path, e.g. {'site-a': 'a.zarr'}")
        _check_on_cluster(cfg)
        for name, path in stores.items():
            if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
                raise ValueError(
                    f"fit({{site: store}}): site name {name!r} is invalid: use letters, digits, '_', '.' and '-' "
                    "(the Dask resource its workers declare)"
                )
            if not _is_path(path):
                raise ValueError(
                    f"fit({{site: store}}): the store of site {name!r} must be a path, got {type(path).__name__}"
                )
        user = self.client if self.client is not None and not isinstance(self.client, str) else None
        if isinstance(self.client, str) and self.client != "local":  # a scheduler address
            user = _address_client(self.client)
        if user is None and self.client is None:
            try:
                from distributed import get_client

                user = get_client()
            except ValueError:
                user = None
        with tempfile.TemporaryDirectory(prefix="pipeline-estimator-") as tmp:
            sites_file = os.path.join(tmp, "sites.toml")
            with open(sites_file, "w") as fh:
                for name, path in sorted(stores.items()):
                    where = os.fspath(path) if user is not None else os.path.abspath(os.fspath(path))
                    fh.write(f"[sites.{json.dumps(name)}]\nstore = {json.dumps(where)}\n")
            read_sites(sites_file)
            fcfg = replace(cfg, sites=sites_file, rounds=cfg.epochs, mode="sync")
            try:
                fcfg.validate()
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            if user is not None:
                have = site_resources(user.scheduler_info(n_workers=-1))
                missing = sorted(n for n in stores if not have.get(n))
                if missing:
                    raise ValueError(
                        f"the client's cluster has no worker declaring resource(s) {', '.join(missing)}; start one per "
                        f"site with `dask worker SCHEDULER --resources {missing[0]}=1`, or fit without a client (the "
                        "estimator then starts one local worker per site)"
                    )
                clients: Any = contextlib.nullcontext(user)
            else:
                clients = cluster_client(workers=1, dashboard_address=None, sites=sorted(stores))
            with _temporary_run(tmp), clients as client, client.as_current():
                res = train(None, fcfg, os.path.join(tmp, "run"), client=client, force=True)
        self.model_ = res.model
        self.history_ = list(res.history)
        self.loss_curve_ = [float(h["train_loss"]) for h in res.history]
        self.n_iter_ = len(res.history)
        self.n_features_in_ = res.model.n_features
        self.feature_names_in_ = np.asarray([str(n) for n in res.model.feature_names], dtype=object)
        self._names_from_store = True
        if self._task == "classification":
            self.classes_ = _site_classes(res.model.classes, stores.values())
        self.fitted_on_ = "sites"
        self.ps_installed_by_ = res.installed_by
        return bool(res.stopped_early)

    def _train_on_cluster(self, store: str, cfg: TrainConfig, out: str) -> bool:
        """Train on the cluster; whether the run stopped before its last epoch (early stopping,
        or a spent privacy budget)."""
        from pipeline.train import train

        client = self._cluster()
        with _temporary_run(os.path.dirname(out)), client.as_current():  # the driver's wait() needs it current
            res = train(store, cfg, out, client=client, force=True)
        self.model_ = res.model
        self.history_ = list(res.history)
        self.loss_curve_ = [float(h["train_loss"]) for h in res.history]
        self.n_iter_ = len(res.history)
        self.fitted_on_ = "cluster"
        self.ps_installed_by_ = res.installed_by
        return bool(res.stopped_early)

    def _store_attrs(self) -> dict[str, Any]:
        names = getattr(self, "feature_names_in_", None)
        attrs: dict[str, Any] = {
            "task": self._task,
            "classes": [str(c) for c in self.classes_] if self._task == "classification" else None,
            "feature_names": [str(n) for n in names]
            if names is not None
            else [f"x{i}" for i in range(self.n_features_in_)],
            "encodings": [],
            "source": {"format": "estimator", "estimator": type(self).__name__},
        }
        return attrs

    def _write_store(self, X: Any, y: Any, dest: str) -> str:
        """Copy validated arrays into a new store (Dask: one row block at a time)."""
        from pipeline.store import RunningStats, create_store

        n_features = int(X.shape[1])
        cls = self._task == "classification"
        y_tail = () if cls or y.ndim == 1 else (int(y.shape[1]),)
        xs, ys = RunningStats(n_features), RunningStats(int(np.prod(y_tail)) if y_tail else 1)
        counts = np.zeros(len(self.classes_) if cls else 0, np.int64)
        with create_store(
            dest,
            n_features,
            y_shape_tail=y_tail,
            x_dtype=np.float32,
            y_dtype=np.int32 if cls else np.float64,  # regression targets unrounded, as ingest keeps them
            attrs=self._store_attrs(),
        ) as w:
            for Xb, yb in self._blocks(X, y):
                Xb = np.ascontiguousarray(Xb, dtype=np.float32)
                if cls:
                    yb = yb.astype(np.int32)
                    counts += np.bincount(yb, minlength=len(counts))
                else:
                    yb = np.ascontiguousarray(yb, dtype=np.float64)
                    ys.update(yb.reshape(len(yb), -1))
                xs.update(Xb)
                w.append(Xb, yb)
            w.attrs["mean"] = xs.mean.tolist()
            w.attrs["std"] = xs.std.tolist()
            w.attrs["target"] = (
                {"name": "y", "kind": "numeric", "class_counts": counts.tolist()}
                if cls
                else {"name": "y", "kind": "numeric", "mean": ys.mean.tolist(), "std": ys.std.tolist()}
            )
        return dest

    def _blocks(self, X: Any, y: Any) -> Any:
        if not _is_dask(X):
            for a in range(0, len(X), WRITE_BLOCK_ROWS):
                yield X[a : a + WRITE_BLOCK_ROWS], y[a : a + WRITE_BLOCK_ROWS]
            return
        import dask
        import dask.array as da

        y = da.asarray(y).rechunk((X.chunks[0], *y.chunks[1:]) if y.ndim == 2 else (X.chunks[0],))
        if y.ndim == 2:
            y = y.rechunk({1: -1})
        for i in range(X.numblocks[0]):
            Xb, yb = dask.compute(X.blocks[i], y.blocks[i])
            Xb, yb = np.asarray(Xb), np.asarray(yb)
            if Xb.dtype.kind == "f" and not np.isfinite(Xb).all():
                raise ValueError(f"Input X contains NaN or infinity (row block {i})")
            if yb.dtype.kind == "f" and not np.isfinite(yb).all():
                raise ValueError(f"Input y contains NaN or infinity (row block {i})")
            if self._task == "classification":
                yb = self._encode_y(yb, reset=False)
            elif yb.ndim == 2 and yb.shape[1] == 1:
                yb = yb[:, 0]
            yield Xb, yb

    # -- in-process training ------------------------------------------------------------------

    def _spec(self, cfg: TrainConfig, n_in: int, n_out: int) -> dict[str, Any]:
        loss = "softmax_ce" if self._task == "classification" else "mse"
        if cfg.loss not in ("auto", loss):
            raise ValueError(f"loss {cfg.loss!r} does not fit {type(self).__name__}; use {loss!r}")
        return {"n_in": n_in, "hidden": list(cfg.hidden), "n_out": n_out, "activation": cfg.activation, "loss": loss}

    def _n_out(self, y: np.ndarray) -> int:
        if self._task == "classification":
            return len(self.classes_)
        return 1 if y.ndim == 1 else int(y.shape[1])

    def _new_trainer(self, cfg: TrainConfig, spec: dict, params: np.ndarray | None) -> Any:
        """An in-process trainer from ``params``, else from Glorot-uniform weights and zero biases
        (module docstring; for every activation: on few inputs He's larger first-layer weights generalize
        worse, e.g. iris's MLP at 0.84-0.95 test accuracy over five seeds against 0.97)."""
        from kernels.mlp import MLPSpec, init_params

        if params is None:
            params = init_params(MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])}), cfg.seed, scheme="glorot")
        backend = cfg.backend if cfg.backend != "auto" else "cpu"
        return make_trainer(spec, {**cfg.to_dict(), "backend": backend}, params)

    @staticmethod
    def _epoch(trainer: Any, Xn: np.ndarray, t: np.ndarray, batch: int, rng: np.random.Generator) -> float:
        """One epoch in memory by the in-process loop of `pipeline train` (pipeline.local): the
        mean loss over the rows."""
        if batch == 0:  # full batch: one step with the mean gradient of every row
            pieces = (slice(a, a + FULL_BATCH_ROWS) for a in range(0, len(Xn), FULL_BATCH_ROWS))
            return run_batches(trainer, ((Xn[p], t[p]) for p in pieces), full_batch=True)["row_loss"]
        order = rng.permutation(len(Xn))
        batches = ((Xn[idx], t[idx]) for idx in (order[a : a + batch] for a in range(0, len(order), batch)))
        return run_batches(trainer, batches)["row_loss"]

    def _refuse_fit_params(self, method: str, fit_params: dict[str, Any]) -> None:
        """``sample_weight`` is refused with the way to weight rows (a ValueError), any other
        keyword as Python refuses an unknown one (a TypeError)."""
        if "sample_weight" in fit_params:
            raise ValueError(
                f"{type(self).__name__}.{method} does not support sample_weight: every row weighs the same; "
                "repeat or subsample rows to weight them"
            )
        if fit_params:
            name = next(iter(fit_params))
            raise TypeError(f"{type(self).__name__}.{method}() got an unexpected keyword argument {name!r}")

    def _refuse_private_in_process(self, cfg: TrainConfig, why: str) -> None:
        """A fit in this process has no parameter server: it cannot clip, noise or account
        rounds (``dp``) nor mask them (``secure_aggregation``). Asked for, they are refused,
        never left out in silence."""
        asked = cfg.server_privacy()
        if asked:
            raise ValueError(
                f"options {asked!r} need the parameter server of a Dask cluster (it clips, noises, accounts or "
                f"masks the rounds), and {why} trains in this process: fit on a cluster (pass a client, or "
                "cluster_min_rows=0)"
            )

    def _refuse_unused_options(
        self, cfg: TrainConfig, why: str, exact: bool = False, used: frozenset[str] = _IN_PROCESS_KEYS
    ) -> None:
        """``options`` a fit in this process would not use (they act on a cluster's parameter
        server, loader or federation; with ``exact``, on minibatch training the exact solver does
        not do) are refused, never ignored. A key at its TrainConfig default changes nothing."""
        default = TrainConfig()
        used = _EXACT_SOLVER_KEYS if exact else used
        unused = {
            k: v
            for k, v in (self.options or {}).items()
            if k not in used and getattr(cfg, k, None) != getattr(default, k, None)
        }
        if not unused:
            return
        if exact:
            raise ValueError(
                f"options {unused!r} set minibatch training, and {type(self).__name__} with solver='auto' solves "
                "in-memory rows exactly: pass solver='minibatch' to train by minibatch steps, or drop them"
            )
        if why == "partial_fit":
            raise ValueError(
                f"options {unused!r} do not act in partial_fit (one pass in this process: no parameter server, "
                "loader, federation or early stopping): drop them"
            )
        raise ValueError(
            f"options {unused!r} act only on a Dask cluster (its parameter server, loader or federation), and "
            f"{why} trains in this process: fit on a cluster (pass a client, or cluster_min_rows=0), or drop them"
        )

    def _fit_local(self, X: np.ndarray, y: np.ndarray, cfg: TrainConfig, warm: bool = False) -> bool | None:
        """The driver's loop in one process: epochs of shuffled minibatches, validation split,
        scikit-learn's stopping rule (:class:`_NoImprovement`), the best epoch's weights. With
        ``warm``, from the fitted model's weights and standardization, its record continued.
        Whether the stopping rule ended it (None: a linear model solved exactly)."""
        why = (
            "client='local'"
            if self.client == "local"
            else f"a fit of fewer than cluster_min_rows = {self.cluster_min_rows} rows"
        )
        self._refuse_private_in_process(cfg, why)
        self._refuse_unused_options(cfg, why)
        if not cfg.hidden and self.solver == "auto":
            self._refuse_unused_options(cfg, why, exact=True)
            if _is_sparse(X):
                raise ValueError(
                    f"X is a sparse matrix, and {type(self).__name__} with solver='auto' solves in-memory rows exactly "
                    "on their dense form: pass solver='minibatch' to train by minibatches (densified one at a time)"
                )
        sparse = _is_sparse(X)
        prev: Model | None = self.model_ if warm else None
        normalize = prev.normalize if prev is not None else self._normalize(cfg, X)
        spec = self._spec(cfg, X.shape[1], self._n_out(y))
        target = None
        if prev is not None:
            self._check_warm_spec(prev, spec)
            mean, std = np.asarray(prev.mean, np.float64), np.asarray(prev.std, np.float64)
            if prev.target is not None:
                target = {k: np.asarray(v, np.float64) for k, v in prev.target.items()}
        else:
            mean, std = _moments(X)
            std = np.where(std > 0, std, 1.0)
            if self._task == "regression":
                yy = y.reshape(len(y), -1).astype(np.float64)
                ystd = yy.std(axis=0)
                target = {"mean": yy.mean(axis=0), "std": np.where(ystd > 0, ystd, 1.0)}
        model = Model(
            spec=spec,
            params=np.zeros(0, np.float32),
            task=self._task,
            mean=mean,
            std=std,
            normalize=normalize,
            classes=self._model_classes(),
            feature_names=self._feature_names(),
            target=None if target is None else {k: v.tolist() for k, v in target.items()},
            encodings=[],
            config={**cfg.to_dict(), "normalize": normalize},
        )
        if not cfg.hidden and self.solver == "auto":
            self._fit_linear(model, X, y, target, cfg, None if prev is None else prev.params)
            return None
        Xn: Any = _SparseRows(X, model) if sparse else model.transform_features(X)
        t = prepare_targets(y, target)
        earlier: list[dict] = list(self.history_) if prev is not None else []
        rng = np.random.default_rng([cfg.seed, 1, len(earlier)] if earlier else [cfg.seed, 1])
        n_val = int(X.shape[0] * cfg.validation) if cfg.patience else 0
        if n_val and X.shape[0] - n_val >= 1:
            perm = rng.permutation(X.shape[0])
            tr, va = perm[n_val:], perm[:n_val]
        else:
            tr, va = np.arange(X.shape[0]), np.arange(0)
        trainer = self._new_trainer(cfg, spec, None if prev is None else prev.params)
        # scikit-learn's stopping rule, counted from the first epoch (of the first fit, with warm_start)
        score_key = ("val_accuracy" if self._task == "classification" else "val_r2") if len(va) else None
        stopping = _NoImprovement(cfg.patience, cfg.min_delta, score_key is not None, cfg.min_samples)
        for h in earlier:  # the earlier fits' epochs that recorded what the rule watches now
            if (score_key or "train_loss") in h:
                stopping.update(h[score_key or "train_loss"], h.get("samples", 0))
        best = BestModel(params=trainer.get_params() if prev is None else np.asarray(prev.params, np.float32))
        history: list[dict] = []
        stopped = False
        if sparse:  # the training and held-out rows stay sparse: densified a minibatch at a time
            Xtr, Xva = Xn.subset(tr), Xn.subset(va)
        for i in range(cfg.epochs):
            epoch = len(earlier) + i
            rows = Xtr if sparse else Xn[tr]
            loss = self._epoch(trainer, rows, t[tr], cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
            if not np.isfinite(loss):
                raise ValueError(f"training diverged (loss {loss}) in epoch {epoch}; lower learning_rate_init")
            record: dict[str, Any] = {"epoch": epoch, "samples": len(tr), "train_loss": float(loss)}
            if len(va) and sparse:
                record.update(self._val_sparse(trainer, Xva, t[va], t[va] if target is None else y[va], target))
            elif len(va):
                record["val_loss"] = float(trainer.loss(Xn[va], t[va]))
                record.update(self._val_scores(trainer.forward(Xn[va]), t[va] if target is None else y[va], target))
            history.append(record)
            stop = stopping.update(record[score_key or "train_loss"], len(tr))
            # as scikit-learn: the best validation score's weights with early_stopping, else the last's
            if score_key is None or stopping.improved or (best.epoch < 0 and prev is None):
                best = BestModel(float(loss), trainer.get_params(), epoch)
            if stop:
                stopped = True
                break
        history = earlier + history
        model.params = np.asarray(best.params, np.float32).copy()
        model.metrics = record_of(history, best.epoch) if best.epoch >= 0 else dict(prev.metrics or {})
        self.model_ = model
        self.history_ = history
        self.loss_curve_ = [h["train_loss"] for h in history]
        self.n_iter_ = len(history) - len(earlier)
        return stopped

    def _normalize(self, cfg: TrainConfig, X: Any) -> bool:
        """Whether the model standardizes its features: ``cfg.normalize`` (True unless ``options``
        say), but not sparse features unless ``options`` ask for it. As scikit-learn's
        ``StandardScaler`` does not center sparse input, nor its users scale TF-IDF columns: a rare
        term's column scaled by its small deviation swamps the rest (4-7 points of accuracy below
        scikit-learn's MLP on TF-IDF of real text, equal to it without)."""
        return cfg.normalize if not _is_sparse(X) or "normalize" in (self.options or {}) else False

    def _check_warm_spec(self, prev: Model, spec: dict[str, Any]) -> None:
        """A warm start continues the fitted network: its hidden layers and outputs must be the ones
        these parameters and ``y`` ask for (a ValueError naming the fix)."""
        if list(prev.spec["hidden"]) != list(spec["hidden"]):
            raise ValueError(
                f"warm_start=True continues the fitted network, whose hidden layers are {tuple(prev.spec['hidden'])}, "
                f"and hidden_layer_sizes={self.hidden_layer_sizes!r} asks for others: set "
                "hidden_layer_sizes back, or pass warm_start=False to train a new network"
            )
        if int(prev.spec["n_out"]) != int(spec["n_out"]):
            raise ValueError(
                f"warm_start=True continues the fitted network of {prev.spec['n_out']} outputs, and y has "
                f"{spec['n_out']} targets: pass y of the fitted shape, or warm_start=False to train from scratch"
            )

    @staticmethod
    def _val_sparse(trainer: Any, Xv: _SparseRows, tv: np.ndarray, yv: np.ndarray, target: dict | None) -> dict:
        """``val_loss`` and :meth:`_val_scores` of sparse held-out rows, a dense block at a time."""
        total, outs = 0.0, []
        for sl, rows in Xv.blocks():
            total += float(trainer.loss(rows, tv[sl])) * (sl.stop - sl.start)
            outs.append(trainer.forward(rows))
        return {"val_loss": total / len(Xv), **_BaseMLP._val_scores(np.concatenate(outs), yv, target)}

    @staticmethod
    def _val_scores(out: np.ndarray, yv: np.ndarray, target: dict | None) -> dict[str, Any]:
        """An epoch's metrics on the held-out rows, from the network's outputs ``out`` there, as a
        cluster run records them (``val_accuracy`` or ``val_r2``, ...; pipeline.metrics), besides
        the ``val_loss``. ``yv``: class indices, or the raw regression targets."""
        from pipeline.metrics import evaluate_arrays, finish_metrics

        metrics = finish_metrics(evaluate_arrays(out, yv, target, out.shape[1]), target)
        return {f"val_{k}": v for k, v in metrics.items() if k not in ("loss", "confusion")}

    def _fit_linear(
        self,
        model: Model,
        X: np.ndarray,
        y: np.ndarray,
        target: dict | None,
        cfg: TrainConfig,
        start: np.ndarray | None = None,
    ) -> None:
        """A linear model on in-memory rows, solved to convergence instead of by minibatch steps:
        least squares in closed form (ridge with ``alpha``) for regression, L-BFGS on the mean
        softmax cross-entropy for classification (at most ``max_iter`` iterations, gradient
        tolerance ``tol``; from the flat parameters ``start`` with ``warm_start``, else zeros).
        ``alpha`` is the minibatch path's coupled L2 weight decay, so both minimize the same
        objective: mean loss + alpha / 2 * |params|^2 (biases included)."""
        Xn = np.asarray(X, dtype=np.float64)
        if model.normalize:
            Xn = (Xn - model.mean) / model.std
        n, n_in = Xn.shape
        A = np.hstack([Xn, np.ones((n, 1))])  # the bias is the last row of theta
        wd = float(cfg.weight_decay)
        if self._task == "regression":
            T = prepare_targets(y, target).astype(np.float64)
            k = T.shape[1]
            if wd == 0:
                theta = np.linalg.lstsq(A, T, rcond=None)[0]
            else:  # d/dtheta of mean((A theta - T)^2) + wd/2 |theta|^2 = 0
                theta = np.linalg.solve(A.T @ A + (n * k * wd / 2) * np.eye(n_in + 1), A.T @ T)
            loss = float(np.mean((A @ theta - T) ** 2))
            record = {"solver": "lstsq", "iterations": 1}
        else:
            from scipy.optimize import minimize

            k = len(self.classes_)
            labels = np.asarray(y, dtype=np.int64)

            def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
                th = flat.reshape(n_in + 1, k)
                z = A @ th
                z -= z.max(axis=1, keepdims=True)
                p = np.exp(z)
                p /= p.sum(axis=1, keepdims=True)
                value = -np.mean(np.log(np.maximum(p[np.arange(n), labels], 1e-300)))
                p[np.arange(n), labels] -= 1.0
                grad = A.T @ p / n
                return value + wd / 2 * float(flat @ flat), (grad.ravel() + wd * flat)

            x0 = np.zeros((n_in + 1) * k)
            if start is not None and np.size(start) == x0.size:  # W0 (n_in, k) then b0 (k,): theta's rows
                x0 = np.asarray(start, np.float64).copy()
            res = minimize(
                objective,
                x0,
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": int(cfg.epochs), "gtol": float(cfg.min_delta)},
            )
            theta = res.x.reshape(n_in + 1, k)
            loss = float(objective(res.x)[0] - wd / 2 * float(res.x @ res.x))
            record = {"solver": "lbfgs", "iterations": int(res.nit), "converged": bool(res.success)}
            if not res.success:
                warnings.warn(
                    f"{type(self).__name__}: L-BFGS did not converge in {int(res.nit)} iterations (max_iter="
                    f"{self.max_iter}, tol={self.tol}): {' '.join(str(res.message).split())}; raise max_iter",
                    ConvergenceWarning,
                    stacklevel=4,
                )
        # the flat layout of a network without hidden layers: W0 (n_in, k) then b0 (k,)
        params = np.concatenate([theta[:n_in].ravel(), theta[n_in]]).astype(np.float32)
        model.params = params
        history = [{"epoch": 0, "samples": n, "train_loss": loss, **record}]
        model.metrics = dict(history[-1])
        self.model_ = model
        self.history_ = history
        self.loss_curve_ = [loss]
        self.n_iter_ = int(record["iterations"])

    def _model_classes(self) -> list[str] | None:
        return [str(c) for c in self.classes_] if self._task == "classification" else None

    def _feature_names(self) -> list[str]:
        names = getattr(self, "feature_names_in_", None)
        return [str(n) for n in names] if names is not None else [f"x{i}" for i in range(self.n_features_in_)]

    # -- weights ------------------------------------------------------------------------------

    def _model_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The network's (W, b) per layer in float64 as the model holds them: acting on the
        standardized features the model computes (:meth:`pipeline.model.Model.transform_features`)."""
        check_is_fitted(self, "model_")
        from kernels.mlp import MLPSpec

        model = self.model_
        spec = MLPSpec(**{**model.spec, "hidden": tuple(model.spec["hidden"])})
        params = np.asarray(model.params, dtype=np.float64)
        views = {v.name: params[v.offset : v.offset + v.size].reshape(v.shape) for v in spec.layout()}
        return [(views[f"W{i}"].copy(), views[f"b{i}"].copy()) for i in range(spec.n_layers)]

    def _raw_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The network's (W, b) per layer in float64, acting on raw features and giving raw
        outputs: the input standardization folded into the first layer and, for regression, the
        target's into the last (``X @ W0 + b0`` ... as in scikit-learn's ``coefs_``)."""
        layers = self._model_layers()
        model = self.model_
        if model.normalize:
            mean, std = np.asarray(model.mean, np.float64), np.asarray(model.std, np.float64)
            W, b = layers[0]
            layers[0] = (W / std[:, None], b - (mean / std) @ W)
        if self._task == "regression" and model.target is not None:
            tmean, tstd = np.asarray(model.target["mean"], np.float64), np.asarray(model.target["std"], np.float64)
            W, b = layers[-1]
            layers[-1] = (W * tstd[None, :], b * tstd + tmean)
        return layers

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Weight matrices per layer, ``coefs_[i]`` of shape (units of layer i, units of layer
        i + 1), acting on raw features as scikit-learn's. A binary classifier's softmax over two
        outputs is given as scikit-learn's one logistic output (its logit ``z1 - z0``), so the last
        matrix has one column; regression outputs are in the target's units."""
        return [W for W, _ in self._binary_last(self._raw_layers())]

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Bias vectors per layer, ``intercepts_[i]`` of shape (units of layer i + 1,)."""
        return [b for _, b in self._binary_last(self._raw_layers())]

    def _binary_last(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._task == "classification" and layers[-1][0].shape[1] == 2:
            W, b = layers[-1]
            layers[-1] = ((W[:, 1] - W[:, 0])[:, None], np.asarray([b[1] - b[0]]))
        return layers

    def _linear_layer(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "model_")
        if self.model_.spec["hidden"]:
            raise AttributeError(f"{what} is defined for models without hidden layers; use coefs_ / intercepts_")
        return self._binary_last(self._raw_layers())[0]

    @property
    def n_layers_(self) -> int:
        """Layers of the network, input and output included (scikit-learn's count)."""
        check_is_fitted(self, "model_")
        return len(self.model_.spec["hidden"]) + 2

    @property
    def n_outputs_(self) -> int:
        """Output units as scikit-learn counts them: 1 for two classes (one logistic unit), else
        the number of classes or of regression targets."""
        check_is_fitted(self, "model_")
        n_out = int(self.model_.spec["n_out"])
        return 1 if self._task == "classification" and n_out == 2 else n_out

    @property
    def out_activation_(self) -> str:
        """The output activation: ``"logistic"`` (two classes), ``"softmax"`` or ``"identity"``."""
        check_is_fitted(self, "model_")
        if self._task != "classification":
            return "identity"
        return "logistic" if self.model_.spec["n_out"] == 2 else "softmax"

    # -- the training record ------------------------------------------------------------------
    # All read from ``history_`` (the records of the epochs trained, as a run's history.json
    # keeps them), so they hold after fit, partial_fit, pickle and load_estimator alike.

    @property
    def loss_(self) -> float:
        """The training loss of the last epoch (``loss_curve_[-1]``): the mean loss over the
        epoch's minibatches (cross-entropy, or the squared error of standardized targets), without
        the ``alpha`` penalty. The weights kept are the best epoch's, not always the last's."""
        check_is_fitted(self, "model_")
        return float(self.loss_curve_[-1])

    @property
    def best_loss_(self) -> float | None:
        """The least training loss of ``loss_curve_``; None when the fit held out validation rows
        (``early_stopping=True``), whose score chose the model kept: see ``validation_scores_``."""
        check_is_fitted(self, "model_")
        if any("val_loss" in h for h in self.history_):
            return None
        finite = [float(v) for v in self.loss_curve_ if np.isfinite(v)]  # a federated round may have none
        return min(finite) if finite else float("nan")

    @property
    def validation_scores_(self) -> list[float] | None:
        """The score on the held-out rows after each validated epoch: accuracy (classifiers) or
        R^2 (regressors), as ``score`` would give; None without validation (``early_stopping``
        False). A fit validates every epoch (a federated one every ``eval_every`` rounds);
        ``partial_fit`` adds none."""
        check_is_fitted(self, "model_")
        key = "val_accuracy" if self._task == "classification" else "val_r2"
        scores = [float(h[key]) for h in self.history_ if key in h]
        return scores or None

    @property
    def best_validation_score_(self) -> float | None:
        """``max(validation_scores_)``, or None without validation."""
        scores = self.validation_scores_
        return max(scores) if scores else None

    @property
    def t_(self) -> int:
        """Training samples seen over all epochs (held-out validation rows not counted)."""
        check_is_fitted(self, "model_")
        return sum(int(h.get("samples", 0)) for h in self.history_)

    # -- partial_fit --------------------------------------------------------------------------

    def _partial_fit(self, X: Any, y: Any, classes: Any = None) -> Any:
        first = not hasattr(self, "model_")
        try:
            return self._partial_pass(X, y, classes)
        except BaseException:
            if first:  # a refused, failed or interrupted first call leaves the estimator unfitted
                self._forget_fit()
            raise

    def _partial_pass(self, X: Any, y: Any, classes: Any = None) -> Any:
        """:meth:`partial_fit`'s pass; on the first call its model is set before training, so
        :meth:`_partial_fit` forgets it again if the pass does not end."""
        if _is_path(X):
            raise ValueError("partial_fit takes arrays; to train on a store use fit(store_path)")
        cfg = self._train_config()
        if self.early_stopping:  # scikit-learn's refusal: a pass holds out no rows, nothing would stop it
            raise ValueError(
                "partial_fit does not support early_stopping=True (one pass over the rows given: none are held out "
                "to validate); pass early_stopping=False, or fit to stop on held-out rows"
            )
        self._refuse_private_in_process(cfg, "partial_fit")
        # one pass, no early stopping: min_samples (the stopping rule's floor) does not act either
        self._refuse_unused_options(cfg, "partial_fit", used=_IN_PROCESS_KEYS - {"min_samples"})
        first = not hasattr(self, "model_")
        if self._task == "classification":
            if first:
                if classes is None:
                    raise ValueError("classes must be passed on the first call to partial_fit")
                labels = np.unique(np.asarray(classes))
                check_classification_targets(labels)
                self._set_classes(labels, reset=True)
            elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
                given = np.asarray(classes).tolist()
                raise ValueError(f"classes={given!r} differ from the fitted classes_ {self.classes_.tolist()!r}")
        if _is_dask(X) or _is_dask(y):  # partial_fit trains in memory: checked as NumPy input
            X, y = np.asarray(_computed(X)), np.asarray(_computed(y))
        # classifiers: classes_ come from ``classes`` (above); y's labels must be among them
        X, y = self._validate_arrays(X, y, reset=first, reset_classes=first and self._task == "regression")
        sparse = _is_sparse(X)
        if not sparse:
            X = np.asarray(X)
        if first:
            mean, std = _moments(X)
            target = None
            if self._task == "regression":
                yy = y.reshape(len(y), -1).astype(np.float64)
                ystd = yy.std(axis=0)
                target = {"mean": yy.mean(axis=0).tolist(), "std": np.where(ystd > 0, ystd, 1.0).tolist()}
            spec = self._spec(cfg, X.shape[1], self._n_out(y))
            normalize = self._normalize(cfg, X)
            self.model_ = Model(
                spec=spec,
                params=np.zeros(0, np.float32),
                task=self._task,
                mean=mean,
                std=np.where(std > 0, std, 1.0),
                normalize=normalize,
                classes=self._model_classes(),
                feature_names=self._feature_names(),
                target=target,
                encodings=[],
                config={**cfg.to_dict(), "normalize": normalize},
            )
            self.history_, self.loss_curve_, self.n_iter_ = [], [], 0
            self.fitted_on_ = "local"
            self._trained_on_arrays, self._names_from_store = True, False
        model = self.model_
        if self._task == "regression" and model.spec["n_out"] != self._n_out(y):
            raise ValueError(f"y has {self._n_out(y)} targets; the model was fitted with {model.spec['n_out']}")
        trainer = self._new_trainer(cfg, model.spec, None if first else model.params)
        state = getattr(self, "_opt_state", None)
        if state is not None and state.get("optimizer") == cfg.optimizer:
            load_local_state(trainer, state["state"])
        target = None
        if model.target is not None:
            target = {k: np.asarray(v, np.float64) for k, v in model.target.items()}
        epoch = self.n_iter_ if first else len(self.history_)
        with _blas_threads(cfg):
            loss = self._epoch(
                trainer,
                _SparseRows(X, model) if sparse else model.transform_features(X),
                prepare_targets(y, target),
                cfg.batch_size,
                np.random.default_rng([cfg.seed, epoch]),
            )
        self.model_ = replace(model, params=trainer.get_params().astype(np.float32))
        self._opt_state = {"optimizer": cfg.optimizer, "state": local_state(trainer)}
        self.history_ = [*self.history_, {"epoch": epoch, "samples": X.shape[0], "train_loss": float(loss)}]
        self.loss_curve_ = [*self.loss_curve_, float(loss)]
        self.n_iter_ = self.n_iter_ + 1
        return self

    # -- prediction ---------------------------------------------------------------------------

    def _predict_rows(self, X: Any) -> np.ndarray:
        """In-memory rows to predict, checked as scikit-learn checks them (features, names)."""
        check_is_fitted(self, "model_")
        if _is_dask(X):
            X = X.compute()
        self._check_columns(X)
        with _one_line_errors():
            return self._validate(X, reset=False, dtype=(np.float64, np.float32), accept_sparse=("csr", "csc"))

    def _by_rows(self, X: Any, f: Any) -> np.ndarray:
        """``f`` of the checked rows of ``X``. A Dask array is computed one row block at a time
        and the results joined (a NumPy array), so predicting on an array larger than memory
        holds one block and the predictions, as ``fit`` writes it block by block. The model's
        outputs are the whole array's to the bit (:meth:`pipeline.model.Model._forward` computes
        every product on the same number of rows); a plain product of ``f`` (the linear models'
        ``decision_function``) may round otherwise. Callers check that the estimator is fitted first."""
        if _is_sparse(X):  # densified a block of rows at a time, never whole
            rows = self._predict_rows(X).tocsr()
            step = _sparse_block_rows(rows.shape[1])
            parts = [f(rows[a : a + step].toarray()) for a in range(0, rows.shape[0], step)]
            return np.concatenate(parts) if parts else f(np.zeros((0, rows.shape[1])))
        if not _is_dask(X) or X.ndim != 2 or X.numblocks[0] < 2:
            return f(self._predict_rows(X))
        X = X.rechunk({1: -1})
        return np.concatenate([f(self._predict_rows(np.asarray(X.blocks[i].compute()))) for i in range(X.numblocks[0])])

    def _decision(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")  # NotFittedError first
        return self._by_rows(X, self.model_.decision)

    def _predict_store(self, path: str, proba: bool) -> np.ndarray:
        import zarr

        from pipeline.inference import check_inputs, predict_store

        check_is_fitted(self, "model_")
        # a missing store, or one whose features differ, fails before any cluster; its labels, if
        # any, are not used, so (as for `pipeline predict`) neither are its task and classes checked
        with self._store_hint():
            check_inputs(self.model_, path, predicting=True)
        with tempfile.TemporaryDirectory(prefix="pipeline-estimator-") as tmp:
            out = os.path.join(tmp, "pred.zarr")
            client = self._cluster()
            with client.as_current():
                predict_store(self.model_, path, out, client, proba=proba)
            group = zarr.open_group(out, mode="r")
            pred = np.asarray(group["proba" if proba else "prediction"][:])
        if proba or self._task != "classification" or pred.dtype.kind in "iu":
            return pred
        # the output holds the class names (as `pipeline predict` writes them): back to positions
        # in classes_, which keep the label dtype
        names, inverse = np.unique(pred, return_inverse=True)
        pos = {str(c): i for i, c in enumerate(self.model_.classes or [])}
        return np.asarray([pos[str(n)] for n in names], dtype=np.int64)[inverse.ravel()]

    @contextlib.contextmanager
    def _store_hint(self) -> Iterator[None]:
        """A store that does not match a model trained on in-memory arrays: the hint to ingest it
        ``--like TRAIN_STORE`` names a store there never was, so the error says what to do instead."""
        from pipeline.errors import StoreError

        try:
            yield
        except StoreError as exc:
            msg = str(exc)
            hint = "; ingest it with --like TRAIN_STORE"
            if not getattr(self, "_trained_on_arrays", False) or hint not in msg:
                raise
            head = msg[: msg.index(hint)]
            raise StoreError(
                f"{head}; the model was trained on in-memory arrays, not a store: write the store with the "
                f"{self.n_features_in_} feature columns of those arrays, in their order (e.g. `pipeline ingest` "
                "of a .npy file of them)"
            ) from None

    def _score_store(self, path: str | os.PathLike, y: Any, sample_weight: Any = None) -> float:
        """Accuracy (classifier) or R^2 (regressor) on every row of a store, on the cluster."""
        if y is not None:
            raise ValueError("score(store_path, y): a store holds its own targets; pass y=None")
        if sample_weight is not None:
            raise ValueError(
                "score(store_path, sample_weight=...): a store's rows cannot be weighted; score arrays "
                "(score(X, y, sample_weight=w)) to weight them"
            )
        from pipeline.inference import check_inputs, evaluate_store

        check_is_fitted(self, "model_")
        with self._store_hint():  # a missing or mismatched store fails before any cluster
            check_inputs(self.model_, os.fspath(path))
        client = self._cluster()
        with client.as_current():
            metrics = evaluate_store(self.model_, os.fspath(path), client)
        return float(metrics["accuracy" if self._task == "classification" else "r2"])

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a model file (see the module docstring); ``pipeline.load_model`` reads it.

        The file is written whole or not at all (a temporary file beside it, then a rename). An
        existing ``path`` is refused (ValueError) unless ``overwrite=True``, and even then only a
        model file this program wrote is replaced, never another file; a directory or a place
        that cannot be written is refused in one line too."""
        check_is_fitted(self, "model_")
        dest = os.path.abspath(os.fspath(path))
        _check_save_target(os.fspath(path), dest, overwrite)
        params = {k: v for k, v in self.get_params(deep=False).items() if k != "client"}
        meta: dict[str, Any] = {
            "class": type(self).__name__,
            "params": _jsonable(params),
            "n_features_in": int(self.n_features_in_),
            "history": _jsonable(getattr(self, "history_", [])),
            "n_iter": int(self.n_iter_),  # a warm start's epochs, not its history's
        }
        if hasattr(self, "feature_names_in_"):
            meta["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        if self._task == "classification":
            meta["classes"] = _jsonable(self.classes_.tolist())
            meta["classes_dtype"] = self.classes_.dtype.str if self.classes_.dtype != object else "object"
        if getattr(self, "_trained_on_arrays", False):
            meta["trained_on"] = "arrays"
        if getattr(self, "_names_from_store", False):
            meta["feature_names_from"] = "store"
        for attr in ("fitted_on_", "ps_installed_by_"):  # where it trained, as a pickle keeps it
            if hasattr(self, attr):
                meta[attr.rstrip("_")] = getattr(self, attr)
        model = replace(self.model_, config={**self.model_.config, "estimator": meta})
        parent = os.path.dirname(dest)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".saving", dir=parent)
        except OSError as exc:
            raise ValueError(f"save({os.fspath(path)!r}): cannot write in {parent!r} ({exc.strerror})") from None
        os.close(fd)
        try:
            model.save(tmp)
            if overwrite:
                os.replace(tmp, dest)
            else:
                try:  # refuses, atomically, a file that appeared since the check
                    os.link(tmp, dest)
                except FileExistsError:
                    raise ValueError(
                        f"save({os.fspath(path)!r}): the file exists; pass overwrite=True to replace a model file"
                    ) from None
                except OSError:  # a file system without hard links
                    if os.path.lexists(dest):
                        raise ValueError(
                            f"save({os.fspath(path)!r}): the file exists; pass overwrite=True to replace a model file"
                        ) from None
                    os.replace(tmp, dest)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ValueError(f"save({os.fspath(path)!r}): cannot write the model file ({reason})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained on a Dask cluster (see the module docstring)."""

    _task = "classification"

    def _set_classes(self, labels: np.ndarray, reset: bool) -> None:
        if reset or not hasattr(self, "classes_"):
            if len(labels) < 2:
                raise ValueError(f"y has 1 class ({labels[0]!s}); a classifier needs at least 2 classes")
            self.classes_ = labels
        else:
            unknown = np.setdiff1d(labels, self.classes_)
            if len(unknown):
                raise ValueError(
                    f"y has labels {unknown[:5].tolist()} that are not in classes_ {self.classes_.tolist()}"
                )

    def _encode_y(self, y: np.ndarray, reset: bool) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D class labels, got shape {y.shape}")
        check_classification_targets(y)
        if reset:
            labels, idx = np.unique(y, return_inverse=True)
            self._set_classes(labels, reset=True)
            return idx.astype(np.int64)
        self._set_classes(np.unique(y), reset=False)
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Mean accuracy on ``X, y``, or on every row of a store path (``y=None``, on the cluster)."""
        if _is_path(X):
            return self._score_store(X, y, sample_weight)
        return float(ClassifierMixin.score(self, X, y, sample_weight=sample_weight))

    def partial_fit(self, X: Any, y: Any, classes: Any = None, **fit_params: Any) -> MLPClassifier:
        """One pass over ``X, y`` continuing from the current weights (module docstring);
        ``sample_weight`` is refused as by :meth:`fit`."""
        self._refuse_fit_params("partial_fit", fit_params)
        return self._partial_fit(X, y, classes)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        if _is_path(X):
            return self._predict_store(os.fspath(X), proba=True).astype(np.float64)
        return self._decision(X).astype(np.float64)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log(predict_proba(X))`` (a probability of 0 gives -inf), columns in the order of
        ``classes_``; a store path predicts on the cluster, as ``predict_proba``."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba)

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (values of ``classes_``)."""
        if _is_path(X):
            idx = self._predict_store(os.fspath(X), proba=False)
        else:
            idx = self._decision(X).argmax(axis=1)
        return self.classes_[idx]


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained on a Dask cluster (see the module docstring)."""

    _task = "regression"

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _set_classes(self, labels: np.ndarray, reset: bool) -> None:  # pragma: no cover - no classes
        pass

    def _encode_y(self, y: np.ndarray, reset: bool) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if reset:
            self._n_outputs = 1 if y.ndim == 1 else int(y.shape[1])
        return y

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """R^2 on ``X, y``, or on every row of a store path (``y=None``, on the cluster)."""
        if _is_path(X):
            return self._score_store(X, y, sample_weight)
        return float(RegressorMixin.score(self, X, y, sample_weight=sample_weight))

    def partial_fit(self, X: Any, y: Any, **fit_params: Any) -> MLPRegressor:
        """One pass over ``X, y`` continuing from the current weights (module docstring);
        ``sample_weight`` is refused as by :meth:`fit`."""
        self._refuse_fit_params("partial_fit", fit_params)
        return self._partial_fit(X, y)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted values: (n,) for one target, (n, k) for k."""
        if _is_path(X):
            return self._predict_store(os.fspath(X), proba=False)
        out = self._decision(X)
        return out[:, 0] if out.shape[1] == 1 else out


class LogisticRegression(MLPClassifier):
    """Multinomial logistic regression: :class:`MLPClassifier` without hidden layers.

    ``coef_`` (n_classes, n_features) and ``intercept_`` (n_classes,) give the logits
    ``X @ coef_.T + intercept_`` whose softmax is ``predict_proba``; with two classes, as in
    scikit-learn, ``coef_`` is (1, n_features) and ``intercept_`` (1,): the log-odds of
    ``classes_[1]``."""

    @property
    def coef_(self) -> np.ndarray:
        """Coefficients on the raw features, (n_classes, n_features) or (1, n_features) for two."""
        return self._linear_layer("coef_")[0].T.copy()

    @property
    def intercept_(self) -> np.ndarray:
        """Intercepts, (n_classes,) or (1,) for two classes."""
        return self._linear_layer("intercept_")[1].copy()

    def decision_function(self, X: Any) -> np.ndarray:
        """The logits ``X @ coef_.T + intercept_``: (n, n_classes), or for two classes (n,), the
        log-odds of ``classes_[1]`` (positive: ``predict`` gives ``classes_[1]``). Computed as
        ``predict_proba`` computes them (on the model's standardized features), so their argmax
        (sign) is ``predict``'s class. In-memory rows only: a store path is refused."""
        if _is_path(X):
            raise ValueError(
                "decision_function takes in-memory rows; for a store use predict_proba(store_path) "
                "(its log-odds are log(p[:, 1]) - log(p[:, 0]) for two classes)"
            )
        check_is_fitted(self, "model_")
        if self.model_.spec["hidden"]:
            raise AttributeError("decision_function is defined for models without hidden layers; use predict_proba")
        (W, b) = self._model_layers()[0]
        z = self._by_rows(X, lambda rows: self.model_.transform_features(rows).astype(np.float64) @ W + b)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def __init__(
        self,
        hidden_layer_sizes: Any = (),
        activation: str = "relu",
        *,
        optimizer: str = "adam",
        learning_rate_init: float = 1e-3,
        momentum: float = 0.9,
        alpha: float = 1e-3,
        batch_size: int = 256,
        local_steps: int = 8,
        mode: str = "sync",
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        max_iter: int = 200,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        warm_start: bool = False,
        backend: str = "cpu",
        random_state: Any = None,
        options: dict | None = None,
        client: Any = None,
        n_workers: int = 2,
        cluster_min_rows: int = 10_000,
        solver: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


class LinearRegression(MLPRegressor):
    """Least-squares linear regression: :class:`MLPRegressor` without hidden layers.

    ``predict(X) == X @ coef_.T + intercept_``: ``coef_`` is (n_features,) and ``intercept_`` a
    float for one target, (n_targets, n_features) and (n_targets,) for several, as in
    scikit-learn."""

    @property
    def coef_(self) -> np.ndarray:
        """Coefficients on the raw features: (n_features,) or (n_targets, n_features)."""
        W = self._linear_layer("coef_")[0].T
        return W[0].copy() if W.shape[0] == 1 else W.copy()

    @property
    def intercept_(self) -> Any:
        """The intercept: a float for one target, else (n_targets,)."""
        b = self._linear_layer("intercept_")[1]
        return float(b[0]) if len(b) == 1 else b.copy()

    def __init__(
        self,
        hidden_layer_sizes: Any = (),
        activation: str = "relu",
        *,
        optimizer: str = "adam",
        learning_rate_init: float = 1e-3,
        momentum: float = 0.9,
        alpha: float = 0.0,
        batch_size: int = 256,
        local_steps: int = 8,
        mode: str = "sync",
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        max_iter: int = 200,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        warm_start: bool = False,
        backend: str = "cpu",
        random_state: Any = None,
        options: dict | None = None,
        client: Any = None,
        n_workers: int = 2,
        cluster_min_rows: int = 10_000,
        solver: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


_CLASSES = {c.__name__: c for c in (MLPClassifier, MLPRegressor, LogisticRegression, LinearRegression)}


def load_estimator(path: str | os.PathLike) -> _BaseMLP:
    """The estimator :meth:`save` wrote to ``path`` (labels keep their dtype), without a cluster."""
    from pipeline.errors import CheckpointError

    model = Model.load(path)
    meta = model.config.get("estimator")
    if not isinstance(meta, dict) or meta.get("class") not in _CLASSES:
        raise CheckpointError(
            f"model file {os.fspath(path)!r} was not written by an estimator's save(); load it with pipeline.load_model"
        )
    est = _CLASSES[meta["class"]]()
    params = dict(meta["params"])
    if isinstance(params.get("hidden_layer_sizes"), list):
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    est.set_params(**{k: v for k, v in params.items() if k in est.get_params(deep=False)})
    config = {k: v for k, v in model.config.items() if k != "estimator"}
    est.model_ = replace(model, config=config)
    est.n_features_in_ = int(meta["n_features_in"])
    if "feature_names_in" in meta:
        est.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
    if "classes" in meta:
        est.classes_ = np.asarray(meta["classes"], dtype=meta.get("classes_dtype", "object"))
    est._trained_on_arrays = meta.get("trained_on") == "arrays"
    est._names_from_store = meta.get("feature_names_from") == "store"
    for attr in ("fitted_on_", "ps_installed_by_"):  # not in files of earlier versions
        if attr.rstrip("_") in meta:
            setattr(est, attr, meta[attr.rstrip("_")])
    est.history_ = list(meta.get("history", []))
    est.loss_curve_ = [float(h["train_loss"]) for h in est.history_]
    first = est.history_[0] if est.history_ else {}
    # an exact solver's one record counts its iterations (L-BFGS), as fit's n_iter_ does
    est.n_iter_ = int(first["iterations"]) if len(est.history_) == 1 and "iterations" in first else len(est.history_)
    if isinstance(meta.get("n_iter"), int):  # files of earlier versions: the count above
        est.n_iter_ = meta["n_iter"]
    return est


def expected_failed_checks(estimator: BaseEstimator) -> dict[str, str]:
    """scikit-learn estimator checks these estimators are known to fail, with the reason
    (pass as ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``).
    None today."""
    return {}
