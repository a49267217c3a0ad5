"""The backend registry, the no-GPU error, GIL release and cheap imports."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numba
import pytest

import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="numpy, cpu, cuda, auto"):
        kernels.get_backend("opencl")


def test_named_backends():
    assert kernels.get_backend("numpy").__name__ == "kernels.reference"
    assert kernels.get_backend("cpu").__name__ == "kernels.cpu"


def test_auto_is_cpu_without_a_real_gpu():
    # the test session runs on the simulator (or a real GPU when NUMBA_ENABLE_CUDASIM=0)
    want = "kernels.cuda" if kernels._real_gpu() else "kernels.cpu"
    assert kernels.get_backend("auto").__name__ == want


@pytest.mark.cuda
def test_cuda_backend_on_simulator_or_gpu():
    assert kernels.get_backend("cuda").__name__ == "kernels.cuda"
    assert set(kernels.available_backends()) == {"numpy", "cpu", "cuda"}


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cuda_without_gpu_or_simulator_is_unavailable():
    code = (
        "import kernels, kernels.cuda\n"  # importing must not fail without CUDA
        "try:\n"
        "    kernels.get_backend('cuda')\n"
        "except kernels.BackendUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
        "else:\n"
        "    print('AVAILABLE')\n"
        "print(kernels.available_backends(), kernels.get_backend('auto').__name__)\n"
    )
    res = _run(code, NUMBA_ENABLE_CUDASIM="0")
    assert res.returncode == 0, res.stderr
    if "AVAILABLE\n" in res.stdout and "UNAVAILABLE" not in res.stdout:
        pytest.skip("a real CUDA GPU is present")
    line = res.stdout.splitlines()[0]
    assert "NUMBA_ENABLE_CUDASIM=1" in line and "'cpu'" in line and "driver" in line
    assert "['numpy', 'cpu'] kernels.cpu" in res.stdout


def test_import_kernels_is_cheap():
    res = _run("import sys, kernels, kernels.mlp; print('numba' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_cpu_kernels_release_the_gil():
    from kernels import cpu

    jitted = [(name, obj) for name, obj in vars(cpu).items() if isinstance(obj, numba.core.registry.CPUDispatcher)]
    # every @njit in the file is a module-level dispatcher checked here
    assert len(jitted) == inspect.getsource(cpu).count("\n@njit(") > 10
    for name, fn in jitted:
        assert fn.targetoptions.get("nogil") is True, name
        assert fn.targetoptions.get("fastmath") is False, name


def test_cpu_specializations_bounded():
    """Training and gradient checks compile at most float32 + float64 versions of each core."""
    import numpy as np

    from kernels import cpu

    for dtype in (np.float32, np.float64):
        for _ in range(2):
            p = np.zeros(5, dtype)
            cpu.adam_update(p, p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
            x = np.zeros((2, 3), dtype)
            cpu.bias_act_forward(x, x, np.zeros(3, dtype), "relu")
            cpu.softmax_cross_entropy(x.copy(), x, np.array([0, 1], dtype=np.int32))
            cpu.softmax_cross_entropy(x.copy(), x, np.array([0, 1], dtype=np.int64))
    for fn in (cpu._adam, cpu._bias_act, cpu._softmax_ce):
        assert len(fn.signatures) <= 2, fn
