"""Trained models: weights, architecture, preprocessing and training config in one file.

A model file (``model.npz``, written atomically and checksummed by :mod:`pipeline.checkpoint`)
loads without a cluster: ``pipeline.load_model(path).predict(X)``. ``X`` holds rows encoded
like the training store (what ``pipeline ingest --like`` produces); the model applies the
store's normalization itself. One loaded model serves predictions from many threads at once
(each borrows kernels of its own) and pickles whether or not it has predicted.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.checkpoint import load_file, save_file
from pipeline.errors import CheckpointError

MODEL_FORMAT = 1
# Rows of every product of the in-memory forward pass (Model._forward): one shape, one BLAS kernel.
FORWARD_ROWS = 256
# The fix for a model file whose metadata was edited or damaged (Model.load).
_EDITED = "it was edited or damaged: use the file as training wrote it, or train the model again"
# Sources whose target has no column name of its own: the program names it ("labels" or "x3" of
# NumPy and IDX files, "y" of synthetic data and of the estimators' stores of in-memory arrays).
_UNNAMED_TARGET_SOURCES = frozenset({"synthetic", "npy", "npz", "idx", "estimator"})


def target_name_of(store: Any) -> str | None:
    """The name of ``store``'s target column as its source gave it, or None when the program made
    it up (:data:`_UNNAMED_TARGET_SOURCES`) or did not record one: a made-up name says nothing about
    which column the targets are, so a model trained on in-memory arrays, NumPy or synthetic data
    is not refused on a store whose target is named (as its made-up feature names are not)."""
    attrs = getattr(store, "attrs", None) or {}
    name = (attrs.get("target") or {}).get("name")
    source = attrs.get("source")
    fmt = source.get("format") if isinstance(source, Mapping) else None
    return None if name is None or fmt in _UNNAMED_TARGET_SOURCES else str(name)


def record_of(history: list[dict], epoch: int | None) -> dict:
    """The record of ``epoch`` in ``history`` (its ``epoch`` or ``round`` field), else the last one."""
    if epoch is not None and epoch >= 0:
        for h in history:
            if h.get("epoch", h.get("round")) == epoch:
                return dict(h)
    return dict(history[-1]) if history else {}


class _KernelPool:
    """A model's forward-pass kernels, lent to one prediction at a time: as many are made as
    predictions ever ran at once (a server's thread pool), and each is used again afterwards,
    whichever thread asks (a server may start a thread per request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Any] = []

    @contextlib.contextmanager
    def borrow(self, make: Callable[[], Any]) -> Iterator[Any]:
        with self._lock:
            kernels = self._free.pop() if self._free else None
        if kernels is None:
            kernels = make()
        try:
            yield kernels
        finally:
            with self._lock:
                self._free.append(kernels)


@dataclass
class Model:
    """A trained multi-layer perceptron with the preprocessing it was trained with."""

    spec: dict
    params: np.ndarray
    task: str
    mean: np.ndarray
    std: np.ndarray
    normalize: bool = True
    classes: list[str] | None = None
    feature_names: list[str] = field(default_factory=list)
    target: dict | None = None  # regression: {"mean": [...], "std": [...]}
    encodings: Any = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    # Whether the program made up ``feature_names`` (the training store's source had none: NumPy,
    # IDX, synth); None: not recorded (older model files, in-memory estimator fits), and
    # pipeline.store.layout_mismatch then judges by the names' spelling.
    feature_names_generated: bool | None = None
    # The training store's target column (None: not recorded, e.g. an older model file, or made up
    # for a source without column names: :func:`target_name_of`; the target name is then not
    # compared by `pipeline evaluate`).
    target_name: str | None = None
    # how the training data's text was read (pipeline.store.source_reading): the decimal mark and
    # the missing-value tokens, where ingest recorded them; None: not recorded
    reading: dict | None = None
    # Forward-pass kernels, each lent to one prediction at a time (:class:`_KernelPool`): their
    # buffers hold the rows being predicted, so requests served at once from several threads
    # cannot share one. Never copied: a copy (dataclasses.replace, pickle) makes its own, for its
    # own weights.
    _kernels: _KernelPool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._kernels = _KernelPool()

    def __getstate__(self) -> dict[str, Any]:
        """The model without its kernels (they hold modules, which do not pickle): a model that has
        predicted can go to Dask workers, joblib or another process."""
        return {k: v for k, v in self.__dict__.items() if k != "_kernels"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._kernels = _KernelPool()

    @classmethod
    def from_training(
        cls,
        store: Any,
        spec: dict,
        target: dict | None,
        params: np.ndarray,
        cfg: Any,
        history: list[dict],
        best_epoch: int | None = None,
    ) -> Model:
        """The model of ``params``; its ``metrics`` are the record of the epoch (or round) those
        weights are from, ``best_epoch`` (an ``epoch``/``round`` field of ``history``), else the
        last record: the figures `pipeline runs` and the run's final line show for it."""
        from pipeline.store import names_made_up, source_reading

        return cls(
            spec=dict(spec),
            params=np.asarray(params, dtype=np.float32).copy(),
            task=store.task,
            mean=np.asarray(store.mean, dtype=np.float64),
            std=np.asarray(store.std, dtype=np.float64),
            normalize=bool(cfg.normalize),
            classes=list(store.classes) if store.classes is not None else None,
            feature_names=list(store.feature_names),
            target=None if target is None else {k: np.asarray(v).tolist() for k, v in target.items()},
            encodings=store.attrs.get("encodings"),
            config=cfg.to_dict(),
            metrics=record_of(history, best_epoch),
            feature_names_generated=names_made_up(store),
            target_name=target_name_of(store),
            reading=source_reading(store) or None,
        )

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        # Keys added since format 1 (feature_names_generated, target_name, reading) are optional: older
        # readers ignore them and this reader takes their absence as "not recorded", so the
        # format number stays 1 and files move both ways between versions.
        meta = {
            "model_format": MODEL_FORMAT,
            "spec": self.spec,
            "task": self.task,
            "normalize": self.normalize,
            "classes": self.classes,
            "feature_names": self.feature_names,
            "target": self.target,
            "encodings": self.encodings,
            "config": self.config,
            "metrics": self.metrics,
        }
        if self.feature_names_generated is not None:
            meta["feature_names_generated"] = bool(self.feature_names_generated)
        if self.target_name is not None:
            meta["target_name"] = self.target_name
        if self.reading:
            meta["reading"] = self.reading
        save_file(path, "model", {"params": self.params, "mean": self.mean, "std": self.std}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        p = os.fspath(path)
        if os.path.isdir(p):
            run, p = p, os.path.join(p, "model.npz")
            if not os.path.exists(p) and os.path.isfile(os.path.join(run, "checkpoint.npz")):
                # `pipeline evaluate`/`predict` say which (pipeline.train.RunDir.missing_model)
                raise CheckpointError(
                    f"run directory {run!r} has no model.npz yet: its run is still training or was interrupted "
                    f"(it holds a checkpoint); wait for it to end, or continue it with `pipeline train STORE --out "
                    f"{run} --resume`"
                )
        arrays, meta = load_file(p, "model")
        fmt = meta.get("model_format", 0)
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise CheckpointError(f"model file {p!r} has the model format {fmt!r}, not a number; " + _EDITED)
        if fmt > MODEL_FORMAT:
            raise CheckpointError(
                f"model file {p!r} has model format {meta.get('model_format')}; this version reads up "
                f"to {MODEL_FORMAT}: upgrade the project to load it"
            )
        try:
            model = cls(
                spec=meta["spec"],
                params=arrays["params"],
                task=meta["task"],
                mean=arrays["mean"],
                std=arrays["std"],
                normalize=meta.get("normalize", True),
                classes=meta.get("classes"),
                feature_names=meta.get("feature_names", []),
                target=meta.get("target"),
                encodings=meta.get("encodings"),
                config=meta.get("config", {}),
                metrics=meta.get("metrics", {}),
                feature_names_generated=meta.get("feature_names_generated"),
                target_name=meta.get("target_name"),
                reading=meta.get("reading"),
            )
        except KeyError as exc:
            raise CheckpointError(f"model file {p!r} lacks {exc}; it is not a complete model") from None
        problem = model._inconsistency()
        if problem:
            raise CheckpointError(f"model file {p!r} is not a consistent model: {problem}; " + _EDITED)
        return model

    def _inconsistency(self) -> str | None:
        """What in a loaded model's record contradicts the rest (None: nothing). The checksum covers the
        weights and statistics, not the metadata: an edited architecture, task or class list gave
        a traceback at the first prediction, or wrong answers (a classifier's probabilities as
        regression values, labels from another class list)."""
        spec = self.spec
        if not isinstance(spec, dict):
            return f"its spec is {type(spec).__name__}, not a table"
        keys = ("n_in", "hidden", "n_out", "activation", "loss")
        missing = [k for k in keys if k not in spec]
        if missing:
            return f"its spec lacks {', '.join(missing)}"
        widths = [spec["n_in"], spec["n_out"], *(spec["hidden"] if isinstance(spec["hidden"], list) else [None])]
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            shown = f"n_in={spec['n_in']!r}, hidden={spec['hidden']!r}, n_out={spec['n_out']!r}"
            return f"its spec has the layer widths {shown}"
        from kernels.mlp import MLPSpec

        try:
            mlp = MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])})
        except (TypeError, ValueError) as exc:
            return f"its spec is not a network ({exc})"
        params, mean, std = (np.asarray(a) for a in (self.params, self.mean, self.std))
        if params.shape != (mlp.n_params,):
            return f"its spec {mlp.sizes} needs {mlp.n_params:,} weights, the file holds {params.size:,}"
        if mean.shape != (mlp.n_in,) or std.shape != (mlp.n_in,):
            return f"its spec has {mlp.n_in} features, its feature statistics {mean.size}"
        if self.feature_names and len(self.feature_names) != mlp.n_in:
            return f"its spec has {mlp.n_in} features, its feature names {len(self.feature_names)}"
        if not isinstance(self.normalize, bool):
            return f"normalize is {self.normalize!r}, not true or false"
        if self.task == "classification":
            if mlp.loss == "mse":
                return "it is a classifier with the regression loss mse"
            if self.classes is not None and not isinstance(self.classes, list):
                return f"its class list is {self.classes!r}, not a list of {mlp.n_out} names"
            if self.classes is not None and len(self.classes) != mlp.n_out:
                return f"it has {len(self.classes)} class name(s) for {mlp.n_out} outputs"
        elif self.task == "regression":
            if mlp.loss != "mse":
                return f"it is a regression model with the classification loss {mlp.loss}"
            t = self.target
            scaling = [t.get(k) for k in ("mean", "std")] if isinstance(t, dict) else [None]
            fits = all(v is not None and np.ndim(v) <= 1 and np.size(v) == mlp.n_out for v in scaling)
            if t is not None and not fits:
                return f"its target scaling {t!r} does not have {mlp.n_out} means and standard deviations"
        else:
            return f"its task is {self.task!r}, not classification or regression"
        return None

    # -- inference -------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return int(self.spec["n_in"])

    @property
    def n_targets(self) -> int:
        """Target columns the model predicts: one class label, or ``n_out`` regression values."""
        return 1 if self.task == "classification" else int(self.spec["n_out"])

    def _forward(self, X: np.ndarray) -> np.ndarray:
        """In-memory predictions, in float64 through the NumPy reference kernels (backend
        ``numpy``): a row's output does not depend on the other rows of the batch (float32 SIMD
        GEMM blocking changes a row's last bits with its position), as scikit-learn's checks
        demand. Stores are predicted and evaluated the same way, chunk by chunk on the workers
        (pipeline.inference): one model gives one answer on every path.

        Every product has the same shape, :data:`FORWARD_ROWS` rows (the last block padded with
        zeros): BLAS picks its kernel by the matrices' sizes (OpenBLAS has a small-matrix kernel,
        and a 1-row product is a matrix-vector one) and those kernels sum in other orders, so a
        row's last bits would otherwise depend on how many rows came with it (a store's chunk, a
        Dask block, one row)."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        out = np.empty((n, int(self.spec["n_out"])), dtype=np.float64)
        with self._kernels.borrow(self._new_kernels) as trainer:
            for a in range(0, n, FORWARD_ROWS):
                b = min(n, a + FORWARD_ROWS)
                block = X[a:b]
                if b - a < FORWARD_ROWS:
                    block = np.zeros((FORWARD_ROWS, X.shape[1]), dtype=np.float64)
                    block[: b - a] = X[a:b]
                out[a:b] = trainer.forward(block)[: b - a]
        return out

    def _new_kernels(self) -> Any:
        """The float64 NumPy reference kernels of this model's weights, for :meth:`_forward`."""
        from kernels.mlp import MLPSpec, MLPTrainer

        return MLPTrainer(
            MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}),
            backend="numpy",
            params=np.asarray(self.params, dtype=np.float64),
            max_batch=FORWARD_ROWS,
            dtype=np.float64,
        )

    def _features_hint(self) -> str:
        """The model's encoded features, and how to get rows encoded that way."""
        names = list(self.feature_names or [])
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        encoded = any(isinstance(e, dict) and e.get("kind") not in (None, "numeric") for e in self.encodings or [])
        what = f"the model's encoded features ({shown})" if names else "the model's features"
        how = (
            "ingest the raw rows with `pipeline ingest SRC NEW.zarr --like TRAIN_STORE --unlabelled` and predict "
            "that store, or encode them the same way"
        )
        return f"{what}{' (categorical columns are one-hot encoded)' if encoded else ''}; {how}"

    def _check_column_names(self, X: Any) -> None:
        """Rows given as a table with string column names (a DataFrame's ``columns``, a pyarrow
        Table's ``column_names``) must name the model's features in the model's order: the same
        names reordered, or other names, are refused (the values would be read as other
        features). Names the model made up (``x0``, ... of NumPy sources) are not compared."""
        names = getattr(X, "column_names", None)
        if names is None and hasattr(X, "columns") and not isinstance(X, np.ndarray):
            names = list(X.columns)
        if not names or not self.feature_names or self.feature_names_generated:
            return
        if not all(isinstance(n, str) for n in names):
            return  # positional column labels: nothing to compare
        names, ours = list(names), list(self.feature_names)
        if names == ours:
            return

        def short(items: list[str]) -> str:
            return ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")

        if sorted(names) == sorted(ours):
            raise ValueError(
                f"the columns of X are the model's features in another order ({short(names)}); select them in the "
                f"model's order ({short(ours)}), e.g. X[model.feature_names]"
            )
        extra = [n for n in names if n not in set(ours)]
        if not set(ours) - set(names) and len(names) == len(set(names)):
            # every feature is there, beside others (an id, the target, a timestamp of the request)
            raise ValueError(
                f"X has columns that are not the model's features ({short(extra)}); select the model's features, "
                "in its order: X[model.feature_names]"
            )
        raise ValueError(
            f"the columns of X ({short(names)}) are not the model's features ({short(ours)}); give the model's "
            "encoded features, or ingest the raw rows with `pipeline ingest SRC NEW.zarr --like TRAIN_STORE "
            "--unlabelled` and predict that store"
        )

    def transform_features(self, X: Any) -> np.ndarray:
        self._check_column_names(X)
        if isinstance(X, Mapping) or (isinstance(X, list | tuple) and X and isinstance(X[0], Mapping)):
            # np.asarray makes no rows of them (shape () or (n,)): say how to make some
            raise ValueError(
                f"X is {'a dict' if isinstance(X, Mapping) else 'a list of dicts'}; give rows as a 2-D array or a "
                "DataFrame with the model's features in its order, e.g. pandas.DataFrame(X)[model.feature_names]"
            )
        if isinstance(X, str | os.PathLike):
            raise ValueError(
                f"X is a path ({os.fspath(X)!r}), not rows; predict a store's rows with `pipeline predict MODEL STORE "
                "OUT.parquet`, or give them as an array: pipeline.store.open_store(path).X[:]"
            )
        X = np.asarray(X)
        if X.ndim == 1 and X.shape[0] == self.n_features:
            raise ValueError(
                f"expected rows of {self.n_features} features, got one row as a 1-D array of shape {X.shape}; "
                "give it as a 2-D array of one row: X.reshape(1, -1) (a DataFrame: X.to_frame().T)"
            )
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"expected rows of {self.n_features} features, got shape {X.shape}: rows must hold "
                + self._features_hint()
            )
        try:
            Xf = X.astype(np.float64)
        except (TypeError, ValueError):
            Xf = self._object_rows(X)
        bad = ~np.isfinite(Xf)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            what = "NaN" if np.isnan(Xf[row, col]) else "infinity"
            name = f" ({self.feature_names[col]!r})" if col < len(self.feature_names or []) else ""
            raise ValueError(
                f"Input X contains {what} (row {row}, feature {col}{name}); impute the missing values, or ingest "
                "the rows with `pipeline ingest SRC NEW.zarr --like TRAIN_STORE --unlabelled` (which fills them "
                "with the model's values) and predict that store"
            )
        if self.normalize:
            Xf = (Xf - self.mean) / self.std
        with np.errstate(over="ignore"):
            X32 = np.ascontiguousarray(Xf, dtype=np.float32)  # what the Numba kernels take
        # The network computes on float32 features, as training did: a finite value beyond float32's
        # range became infinity there, and the outputs NaN (class 0, NaN probabilities): refused
        if not np.isfinite(X32).all():
            row, col = (int(v) for v in np.argwhere(~np.isfinite(X32))[0])
            name = f" ({self.feature_names[col]!r})" if col < len(self.feature_names or []) else ""
            scaled = f", {float(Xf[row, col]):g} after standardization" if self.normalize else ""
            raise ValueError(
                f"Input X contains a value too large for float32 (row {row}, feature {col}{name}: "
                f"{float(X[row, col]):g}{scaled}); the model computes on float32 features, as it was trained: clip "
                "or rescale that feature to the range of the training data"
            )
        return X32

    def _object_rows(self, X: np.ndarray) -> np.ndarray:
        """Rows whose cells are not all numbers (a DataFrame of object or nullable columns) as
        float64, missing cells (None, pandas.NA, NaT) as NaN, which :meth:`transform_features`
        then refuses naming the cell; a cell that is text or another object is refused here,
        named (they were "rows of dtype object are not numbers", a missing value among them too).
        Reading stops at the first missing cell: the rows are refused at it, or at a NaN before it."""
        Xf = np.full(X.shape, np.nan)
        for (row, col), v in np.ndenumerate(X):
            try:
                Xf[row, col] = float(v)
            except (TypeError, ValueError):
                if v is None or type(v).__name__ in ("NAType", "NaTType"):
                    return Xf
                name = f" ({self.feature_names[col]!r})" if col < len(self.feature_names or []) else ""
                raise ValueError(
                    f"Input X holds {v!r} at row {row}, feature {col}{name}, which is not a number: rows must hold "
                    + self._features_hint()
                ) from None
        return Xf

    def outputs(self, X: Any) -> np.ndarray:
        """The network's float64 outputs for rows ``X`` (encoded like the training store): class
        probabilities, or standardized regression values. Every path that predicts or evaluates
        (arrays, the estimators, `pipeline predict` and `pipeline evaluate` on stores) computes
        them here, so one model gives one answer on all of them."""
        return self._forward(self.transform_features(X))

    def decision(self, X: Any) -> np.ndarray:
        """Class probabilities (classification) or de-standardized predictions (regression)."""
        out = self.outputs(X)
        if self.task == "classification":
            return out
        t = self.target or {"mean": [0.0], "std": [1.0]}
        # (rows, outputs) whatever the rows: no rows give (0, outputs), not a reshape error
        return out.reshape(out.shape[0], int(self.spec["n_out"])) * np.asarray(t["std"]) + np.asarray(t["mean"])

    def predict_proba(self, X: Any) -> np.ndarray:
        if self.task != "classification":
            raise ValueError("predict_proba is for classification models")
        return self.decision(X)

    def predict_index(self, X: Any) -> np.ndarray:
        """Class indices (classification) or values (regression, 1-D when one target)."""
        out = self.decision(X)
        if self.task == "classification":
            return out.argmax(axis=1)
        return out[:, 0] if out.shape[1] == 1 else out

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (names from the store) or predicted values."""
        idx = self.predict_index(X)
        if self.task == "classification" and self.classes is not None:
            return np.asarray(self.classes, dtype=object)[idx]
        return idx


def load_model(path: str | os.PathLike) -> Model:
    """Load a model file (or a run directory holding ``model.npz``) without a cluster."""
    return Model.load(path)
