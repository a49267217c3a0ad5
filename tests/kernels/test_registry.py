"""The backend registry, the no-GPU error, GIL release and cheap imports."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading

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


class _FakeDevices:
    """Stands in for numba.cuda's device list and ``select_device`` on a host of ``n`` GPUs
    (this machine has none; the simulator has one): records which thread selected which."""

    def __init__(self, n: int) -> None:
        self.gpus = list(range(n))
        self.selected: list[tuple[str, int]] = []

    def select_device(self, dev: int) -> None:
        self.selected.append((threading.current_thread().name, dev))


def test_threads_of_one_process_take_the_visible_gpus_in_turn(monkeypatch):
    import itertools

    import kernels.cuda as kc

    fake = _FakeDevices(3)
    monkeypatch.setattr(numba.cuda, "gpus", fake.gpus)
    monkeypatch.setattr(numba.cuda, "select_device", fake.select_device)
    monkeypatch.setattr(kc, "_slots", itertools.count())
    monkeypatch.setattr(kc, "_bound", threading.local())
    got: dict[str, list[int]] = {}

    def task(name: str) -> None:
        got[name] = [kc.bind_thread(), kc.bind_thread()]  # bound once, kept

    for i in range(4):  # one after the other: the order of first calls is the order of the threads
        t = threading.Thread(target=task, args=(f"t{i}",), name=f"t{i}")
        t.start()
        t.join()
    assert got == {"t0": [0, 0], "t1": [1, 1], "t2": [2, 2], "t3": [0, 0]}
    assert fake.selected == [("t0", 0), ("t1", 1), ("t2", 2), ("t3", 0)]


@pytest.mark.cuda
def test_a_cuda_trainer_binds_its_thread_to_a_device_before_it_allocates():
    from kernels.mlp import MLPSpec, MLPTrainer

    out: list[int | None] = []

    def build() -> None:
        out.append(MLPTrainer(MLPSpec(n_in=3, hidden=(4,), n_out=2), backend="cuda", max_batch=4).device)

    for _ in range(2):  # one after the other: the simulator runs a kernel with this module's globals swapped
        t = threading.Thread(target=build)
        t.start()
        t.join()
    # one visible device (the simulator, or one GPU): every thread computes on device 0
    assert out == [0, 0]
    assert MLPTrainer(MLPSpec(n_in=3, hidden=(4,), n_out=2), backend="cpu", max_batch=4).device is None
