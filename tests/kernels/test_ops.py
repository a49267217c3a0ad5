"""Every cpu and cuda kernel against the NumPy reference, on awkward shapes, in both dtypes."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from kernels import reference as R
from tests.kernels.helpers import BACKENDS, DTYPES, backend, get, put, tol

# (M, K, N): batch of 1, width 1, sizes not multiples of the CUDA tile (8 or 16)
GEMM_SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 9), (13, 9, 17), (3, 20, 1)]
ACT_SHAPES = [(1, 1), (5, 3), (7, 19)]


def _rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("mkn", GEMM_SHAPES)
def test_gemm(name, dtype, trans_a, trans_b, mkn):
    K = backend(name)
    m, k, n = mkn
    rng = np.random.default_rng(0)
    a = _rand(rng, (k, m) if trans_a else (m, k), dtype)
    b = _rand(rng, (n, k) if trans_b else (k, n), dtype)
    want = np.empty((m, n), dtype)
    R.gemm(want, a, b, trans_a, trans_b)
    out = put(K, np.full((m, n), np.nan, dtype))
    K.gemm(out, put(K, a), put(K, b), trans_a, trans_b)
    np.testing.assert_allclose(get(K, out), want, **tol(dtype))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bio", [(1, 3, 1), (6, 10, 9), (4, 1, 5)])
@pytest.mark.parametrize("first", [False, True])
def test_dense_forward_backward(name, dtype, bio, first):
    K = backend(name)
    b, i, o = bio
    rng = np.random.default_rng(1)
    inp, w, bias, dout = (_rand(rng, s, dtype) for s in [(b, i), (i, o), (o,), (b, o)])
    out = np.empty((b, o), dtype)
    R.dense_forward(out, inp, w, bias)
    dinp, dw, db = np.empty((b, i), dtype), np.empty((i, o), dtype), np.empty(o, dtype)
    R.dense_backward(None if first else dinp, dw, db, dout, inp, w)

    d_inp, d_w, d_b, d_dout = (put(K, a) for a in (inp, w, bias, dout))
    d_out = put(K, np.zeros((b, o), dtype))
    K.dense_forward(d_out, d_inp, d_w, d_b)
    np.testing.assert_allclose(get(K, d_out), out, **tol(dtype))
    g_inp, g_w, g_b = (put(K, np.zeros(s, dtype)) for s in [(b, i), (i, o), (o,)])
    K.dense_backward(None if first else g_inp, g_w, g_b, d_dout, d_inp, d_w)
    np.testing.assert_allclose(get(K, g_w), dw, **tol(dtype))
    np.testing.assert_allclose(get(K, g_b), db, **tol(dtype))
    if not first:
        np.testing.assert_allclose(get(K, g_inp), dinp, **tol(dtype))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", R.ACTIVATIONS)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_activations(name, dtype, activation, shape):
    K = backend(name)
    rng = np.random.default_rng(2)
    x, dy = _rand(rng, shape, dtype, 3.0), _rand(rng, shape, dtype)
    bias = _rand(rng, shape[1:], dtype)
    slope = 0.07
    want = np.empty(shape, dtype)
    R.bias_act_forward(want, x, bias, activation, slope)
    d_x = put(K, x)
    K.bias_act_forward(d_x, d_x, put(K, bias), activation, slope)  # in place
    np.testing.assert_allclose(get(K, d_x), want, **tol(dtype))

    plain = np.empty(shape, dtype)
    R.act_forward(plain, x, activation, slope)
    d_plain = put(K, np.zeros(shape, dtype))
    K.act_forward(d_plain, put(K, x), activation, slope)
    np.testing.assert_allclose(get(K, d_plain), plain, **tol(dtype))

    dx = np.empty(shape, dtype)
    R.act_backward(dx, dy, want, activation, slope)
    d_y, d_dy, d_dx = put(K, want), put(K, dy), put(K, np.zeros(shape, dtype))
    K.act_backward(d_dx, d_dy, d_y, activation, slope)
    np.testing.assert_allclose(get(K, d_dx), dx, **tol(dtype))
    K.act_backward(d_dy, d_dy, d_y, activation, slope)  # in place
    np.testing.assert_allclose(get(K, d_dy), dx, **tol(dtype))


@pytest.mark.parametrize("name", BACKENDS)
def test_unknown_activation(name):
    K = backend(name)
    x = put(K, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="unknown activation"):
        K.act_forward(x, x, "gelu")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (6, 3), (9, 11)])
def test_softmax_and_cross_entropy(name, dtype, shape):
    K = backend(name)
    rng = np.random.default_rng(3)
    logits = _rand(rng, shape, dtype, 5.0)
    logits[0, 0] = 80.0  # exp overflows float32 without the max shift
    labels = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    sm = np.empty(shape, dtype)
    R.softmax(sm, logits)
    d_sm = put(K, np.zeros(shape, dtype))
    K.softmax(d_sm, put(K, logits))
    np.testing.assert_allclose(get(K, d_sm), sm, **tol(dtype))

    dl = np.empty(shape, dtype)
    loss = R.softmax_cross_entropy(dl, logits, labels)
    assert np.isfinite(loss)
    d_dl = put(K, np.zeros(shape, dtype))
    got = K.softmax_cross_entropy(d_dl, put(K, logits), put(K, labels))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, loss, **tol(dtype))
    np.testing.assert_allclose(get(K, d_dl), dl, **tol(dtype))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (4, 7)])
@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_bce_mse(name, dtype, shape, loss):
    K = backend(name)
    rng = np.random.default_rng(4)
    logits = _rand(rng, shape, dtype, 4.0)
    logits.flat[0] = -60.0  # stable for large |logit|
    target = rng.integers(0, 2, shape).astype(dtype) if loss == "bce" else _rand(rng, shape, dtype)
    ref = R.bce_with_logits if loss == "bce" else R.mse_loss
    fast = K.bce_with_logits if loss == "bce" else K.mse_loss
    grad = np.empty(shape, dtype)
    want = ref(grad, logits, target)
    assert np.isfinite(want)
    d_grad = put(K, np.zeros(shape, dtype))
    got = fast(d_grad, put(K, logits), put(K, target))
    np.testing.assert_allclose(got, want, **tol(dtype))
    np.testing.assert_allclose(get(K, d_grad), grad, **tol(dtype))


N_FLAT = 37  # not a multiple of any block size


def _opt_call(mod, opt, arrays, t):
    p, s1, s2, g = arrays
    if opt == "l2":
        mod.l2_decay(g, p, 0.03)
    elif opt == "sgd":
        mod.sgd_update(p, g, 0.1, 0.01)
    elif opt in ("momentum", "nesterov"):
        mod.momentum_update(p, s1, g, 0.1, 0.9, opt == "nesterov", 0.01)
    elif opt == "rmsprop":
        mod.rmsprop_update(p, s1, g, 0.01, 0.99, 1e-8, 0.01)
    elif opt == "adam":
        mod.adam_update(p, s1, s2, g, 0.01, 0.9, 0.999, 1e-8, 0.01, t)
    else:
        mod.adamw_update(p, s1, s2, g, 0.01, 0.9, 0.999, 1e-8, 0.1, t)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["l2", "sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"])
def test_flat_updates(name, dtype, opt):
    K = backend(name)
    rng = np.random.default_rng(5)
    host = [_rand(rng, N_FLAT, dtype), np.zeros(N_FLAT, dtype), np.zeros(N_FLAT, dtype)]
    dev = [put(K, a) for a in host]
    for t in (1, 2, 3):
        g = _rand(rng, N_FLAT, dtype)
        hg = g.copy()
        _opt_call(R, opt, [*host, hg], t)
        dg = put(K, g)
        _opt_call(K, opt, [*dev, dg], t)
        if opt == "l2":
            np.testing.assert_allclose(get(K, dg), hg, **tol(dtype))
    for h, d in zip(host, dev, strict=True):
        np.testing.assert_allclose(get(K, d), h, **tol(dtype))


def test_adam_rejects_step_zero():
    K = backend("cpu")
    z = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="1-based"):
        K.adam_update(z, z.copy(), z.copy(), z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, 0)


def test_cpu_label_out_of_range():
    K = backend("cpu")
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        K.softmax_cross_entropy(logits.copy(), logits, np.array([0, 3]))


@pytest.mark.cuda
def test_simulator_shared_arrays_are_one_per_block():
    # Every thread of a simulated block must get the same cuda.shared.array; the simulator's
    # own allocation is an unlocked check-then-set, which kernels.cuda makes atomic.
    from numba import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("a simulator property")
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    import kernels.cuda  # noqa: F401  (installs the thread-safe allocation)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(50):
            shared, n = FakeCUDAShared(0), 16
            barrier, got = threading.Barrier(n), []

            def thread(shared=shared, barrier=barrier, got=got):
                barrier.wait()
                got.append(shared.array((8, 8), np.float32))

            ts = [threading.Thread(target=thread) for _ in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert len({id(a) for a in got}) == 1
    finally:
        sys.setswitchinterval(old)
