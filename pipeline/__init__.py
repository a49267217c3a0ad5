"""Out-of-core neural-network training on Dask.

Datasets live as chunked Zarr stores (:mod:`pipeline.store`), Dask workers stream their chunks
(:mod:`pipeline.loader`) and compute minibatch updates with Numba kernels (:mod:`kernels`), and a
parameter server inside the Dask scheduler (:mod:`pipeline.ps`) combines them.

The scikit-learn compatible estimators (:mod:`pipeline.estimator`) and :func:`load_model` are
imported on first attribute access, so ``import pipeline`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError

__version__ = "0.1.0"
__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "MLPClassifier",
    "MLPRegressor",
    "PipelineError",
    "__version__",
    "load_estimator",
    "load_model",
]

_LAZY = {
    "MLPClassifier": "pipeline.estimator",
    "MLPRegressor": "pipeline.estimator",
    "LogisticRegression": "pipeline.estimator",
    "LinearRegression": "pipeline.estimator",
    "load_estimator": "pipeline.estimator",
    "load_model": "pipeline.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
