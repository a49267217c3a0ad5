"""The CUDA backend as a GPU user drives it: a thread per GPU in one process, batches over the
grid's row limit, and pre-activations at the ends of the float range."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from kernels import reference as R
from tests.kernels.helpers import backend, get, put, tol

pytestmark = pytest.mark.cuda


def _in_threads(work: Any, n: int) -> list[Any]:
    """``work(i)`` in ``n`` threads started together; their results (an exception is raised here)."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_threads_of_one_process_train_at_once_as_each_alone():
    # a worker with a thread per GPU runs a training task per thread: each trainer must see only
    # its own kernels and losses, as if it trained alone
    from kernels.mlp import MLPSpec, MLPTrainer

    spec = MLPSpec(n_in=5, hidden=(7,), n_out=3)
    data = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        data.append((rng.standard_normal((12, 5)).astype(np.float32), rng.integers(0, 3, 12)))

    def train(i: int) -> tuple[list[float], np.ndarray]:
        X, y = data[i]
        tr = MLPTrainer(spec, backend="cuda", max_batch=6, seed=i)
        losses = [tr.step(X[k : k + 6], y[k : k + 6]) for k in (0, 6, 0)]
        return losses, tr.get_params()

    alone = [train(i) for i in range(2)]
    together = _in_threads(train, 2)
    for (losses, params), (want_losses, want_params) in zip(together, alone, strict=True):
        assert losses == want_losses
        np.testing.assert_array_equal(params, want_params)
    assert alone[0][0] != alone[1][0]  # the two threads' data differ: a mix-up would show


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "bce_with_logits", "mse_loss"])
def test_losses_computed_in_several_threads_are_each_their_own(loss):
    K = backend("cuda")
    cases = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        logits = (3 * rng.standard_normal((4 + seed, 3))).astype(np.float32)
        if loss == "softmax_cross_entropy":
            target = rng.integers(0, 3, 4 + seed).astype(np.int64)
        else:
            target = rng.random((4 + seed, 3)).astype(np.float32)
        want = getattr(R, loss)(np.empty_like(logits), logits, target)
        cases.append((logits, target, want))

    def compute(i: int) -> list[float]:
        logits, target, _ = cases[i]
        d_logits, d_target = put(K, logits), put(K, target)
        return [getattr(K, loss)(put(K, np.zeros_like(logits)), d_logits, d_target) for _ in range(3)]

    for got, (_, _, want) in zip(_in_threads(compute, len(cases)), cases, strict=True):
        np.testing.assert_allclose(got, [want] * 3, **tol(np.float32))


class _GridRecorder:
    """A GEMM kernel that records the grid of every launch and runs it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, config: Any) -> Any:
        self.grids.append(tuple(config[0]))
        return self.kernel[config]


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_over_more_rows_than_a_grid_holds(monkeypatch, trans_a, trans_b):
    # CUDA grids hold at most 65535 blocks along y, the GEMM's row blocks: a batch of 2**20 rows
    # (batch_size's maximum) needs 65536 blocks of 16 rows. Here the limit is lowered to 2 blocks.
    import kernels.cuda as kc

    K = backend("cuda")
    if kc._cupy is not None:
        pytest.skip("cuBLAS (through CuPy) computes the products here, not the tiled GEMM")
    dtype = np.dtype(np.float32)
    recorder = _GridRecorder(kc._GEMM[dtype])
    monkeypatch.setitem(kc._GEMM, dtype, recorder)
    monkeypatch.setattr(kc, "MAX_GRID_Y", 2, raising=False)
    m, k, n = 5 * kc.TILE + 3, 3, 2  # 6 row blocks: three strips of at most two
    rng = np.random.default_rng(7)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    want = np.empty((m, n), dtype)
    R.gemm(want, a, b, trans_a, trans_b)
    out = put(K, np.full((m, n), np.nan, dtype))
    K.gemm(out, put(K, a), put(K, b), trans_a, trans_b)
    np.testing.assert_allclose(get(K, out), want, **tol(dtype))
    assert recorder.grids and all(gy <= 2 for _, gy in recorder.grids), recorder.grids
    assert sum(gy for _, gy in recorder.grids) == 6


def test_relu_at_the_ends_of_the_float_range_is_the_reference():
    # a pre-activation of -inf (an overflowed product) is 0 after relu, as on the CPU, and its
    # gradient is 0 whatever flows back (an infinite one included), not NaN
    K = backend("cuda")
    x = np.array([[-np.inf, np.inf, -0.0, 0.0, -1e-45, 1e-45, -100.0, 2.5]], np.float32)
    dy = np.array([[np.inf, 1.0, -np.inf, 1.0, 2.0, 3.0, np.inf, -np.inf]], np.float32)
    want = np.empty_like(x)
    R.act_forward(want, x, "relu")
    d_out = put(K, np.full_like(x, np.nan))
    K.act_forward(d_out, put(K, x), "relu")
    got = get(K, d_out)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # +0, never -0

    d_bias = put(K, np.zeros(x.shape[1], np.float32))
    d_fused = put(K, x)
    K.bias_act_forward(d_fused, d_fused, d_bias, "relu")
    np.testing.assert_array_equal(get(K, d_fused), want)

    want_dx = np.empty_like(x)
    with np.errstate(invalid="ignore"):
        R.act_backward(want_dx, dy, want, "relu")
    d_dx = put(K, np.full_like(x, np.nan))
    K.act_backward(d_dx, put(K, dy), put(K, want), "relu")
    np.testing.assert_array_equal(get(K, d_dx), want_dx)
    assert np.isfinite(want_dx[0, [0, 2, 6]]).all()  # the cases that were NaN
