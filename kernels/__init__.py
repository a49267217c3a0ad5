"""Numba kernels for dense neural networks: a NumPy reference, CPU (@njit) and CUDA backends.

``get_backend(name)`` returns a module exposing the same kernel names and signatures:

- ``"numpy"``: :mod:`kernels.reference`, the plain-NumPy specification;
- ``"cpu"``: :mod:`kernels.cpu`, BLAS + fused ``@njit(nogil=True)`` element-wise kernels;
- ``"cuda"``: :mod:`kernels.cuda`, ``numba.cuda`` kernels (real GPU or the CUDA simulator);
- ``"auto"``: ``cuda`` when a real GPU is present (never the simulator), else ``cpu``.

Importing this package is cheap: the numba-backed modules load on first use.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = ("numpy", "cpu", "cuda", "auto")
_MODULES = {"numpy": "kernels.reference", "cpu": "kernels.cpu", "cuda": "kernels.cuda"}

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "get_backend"]


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run on this machine (the message names the fix)."""


def _simulator_requested() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _real_gpu() -> bool:
    """True when a CUDA GPU (not the simulator) is usable."""
    if _simulator_requested():
        return False
    try:
        from numba import config, cuda

        return not config.ENABLE_CUDASIM and bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - any driver/toolkit failure means "no GPU"
        return False


def get_backend(name: str = "cpu") -> ModuleType:
    """The kernel module for ``name`` (numpy | cpu | cuda | auto)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cuda" if _real_gpu() else "cpu"
    module = importlib.import_module(_MODULES[name])
    if name == "cuda":
        module.require()  # raises BackendUnavailable with the fix when unusable
    return module


def available_backends() -> list[str]:
    """Backends that work on this machine (``cuda`` also when the simulator is enabled)."""
    names = ["numpy"]
    try:
        importlib.import_module("kernels.cpu")
        names.append("cpu")
    except Exception:  # noqa: BLE001 - numba missing or broken
        pass
    try:
        get_backend("cuda")
        names.append("cuda")
    except (BackendUnavailable, ImportError):
        pass
    return names
