"""Shared helpers: backend parametrization and host<->backend copies."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest

import kernels

# the fast backends checked against the reference
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
ALL_BACKENDS = [pytest.param("numpy", id="numpy"), *BACKENDS]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 2e-5, "atol": 2e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-13}}


def tol(dtype: Any) -> dict[str, float]:
    """Comparison tolerances against the reference for one dtype."""
    return TOL[np.dtype(dtype).type]


def backend(name: str) -> ModuleType:
    return kernels.get_backend(name)


def put(K: ModuleType, arr: np.ndarray) -> Any:
    """A copy of ``arr`` in the backend's memory (host copy for numpy/cpu)."""
    return K.to_device(np.ascontiguousarray(arr))


def get(K: ModuleType, arr: Any) -> np.ndarray:
    return K.to_host(arr)


def targets(rng: np.random.Generator, loss: str, n: int, k: int) -> np.ndarray:
    """Random float64 targets of ``n`` rows for a network of ``k`` outputs and ``loss``: class
    indices (softmax_ce), 0/1 per output (bce_logits) or normal values (mse)."""
    if loss == "softmax_ce":
        return rng.integers(0, k, n)
    if loss == "bce_logits":
        return rng.integers(0, 2, (n, k)).astype(np.float64)
    return rng.standard_normal((n, k))
