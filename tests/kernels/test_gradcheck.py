"""The reference's gradients against central finite differences, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import reference as R
from kernels.mlp import MLPSpec, MLPTrainer, init_params
from tests.kernels.helpers import ALL_BACKENDS, backend, get, put, targets

EPS = 1e-6
RTOL, ATOL = 1e-6, 1e-8


def _fd(f, x: np.ndarray) -> np.ndarray:
    """Central differences of scalar f at x (x modified in place and restored)."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + EPS
        fp = f(x)
        x[i] = old - EPS
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


@pytest.mark.parametrize("activation", [a for a in R.ACTIVATIONS if a != "step"])
def test_activation_gradients(activation):
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (4, 5))
    x[np.abs(x) < 0.05] = 0.5  # keep away from the relu kinks
    c = rng.standard_normal(x.shape)  # the incoming gradient

    def f(z):
        y = np.empty_like(z)
        R.act_forward(y, z, activation, 0.1)
        return float(np.sum(c * y))

    y = np.empty_like(x)
    R.act_forward(y, x, activation, 0.1)
    dx = np.empty_like(x)
    R.act_backward(dx, c, y, activation, 0.1)
    np.testing.assert_allclose(dx, _fd(f, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", ["softmax_ce", "bce", "mse"])
def test_loss_gradients(loss):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 4)) * 3
    if loss == "softmax_ce":
        target = rng.integers(0, 4, 6)
        fn = R.softmax_cross_entropy
    elif loss == "bce":
        target = rng.integers(0, 2, (6, 4)).astype(np.float64)
        fn = R.bce_with_logits
    else:
        target = rng.standard_normal((6, 4))
        fn = R.mse_loss
    grad = np.empty_like(logits)
    fn(grad, logits, target)
    num = _fd(lambda z: fn(np.empty_like(z), z, target), logits)
    np.testing.assert_allclose(grad, num, rtol=RTOL, atol=ATOL)


def test_l2_decay_gradient():
    rng = np.random.default_rng(2)
    p = rng.standard_normal(7)
    g = np.zeros(7)
    R.l2_decay(g, p, 0.3)
    num = _fd(lambda q: 0.5 * 0.3 * float(q @ q), p)
    np.testing.assert_allclose(g, num, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "loss,activation",
    [
        ("softmax_ce", "relu"),
        ("softmax_ce", "tanh"),
        ("bce_logits", "sigmoid"),
        ("mse", "leaky_relu"),
        ("mse", "identity"),
    ],
)
def test_three_layer_mlp_gradient(loss, activation):
    """Whole-network backward: one SGD step with lr=1 exposes the gradient as old - new."""
    spec = MLPSpec(5, (4, 3), 3, activation=activation, loss=loss, leaky_slope=0.1)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((7, 5)).astype(np.float64)
    y = targets(rng, loss, 7, spec.n_out)
    p0 = init_params(spec, seed=4, dtype=np.float64)
    p0 += 0.1 * rng.standard_normal(p0.shape)  # non-zero biases too
    tr = MLPTrainer(spec, backend="numpy", optimizer="sgd", lr=1.0, dtype=np.float64, params=p0)
    tr.step(X, y)
    grad = p0 - tr.get_params()

    ev = MLPTrainer(spec, backend="numpy", dtype=np.float64, params=p0)

    def f(p):
        ev.set_params(p)
        return ev.loss(X, y)

    np.testing.assert_allclose(grad, _fd(f, p0.copy()), rtol=1e-5, atol=1e-8)


def test_step_is_the_threshold_with_a_straight_through_backward():
    """step's true derivative is 0 away from 0 (finite differences see it); its backward is the
    straight-through estimator, the identity's derivative."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-3, 3, (4, 5))
    x[np.abs(x) < 0.05] = 0.5
    y = np.empty_like(x)
    R.act_forward(y, x, "step")
    np.testing.assert_array_equal(y, np.where(x > 0, 1.0, 0.0))
    c = rng.standard_normal(x.shape)

    def f(z):
        out = np.empty_like(z)
        R.act_forward(out, z, "step")
        return float(np.sum(c * out))

    np.testing.assert_array_equal(_fd(f, x.copy()), 0.0)
    dx = np.empty_like(x)
    R.act_backward(dx, c, y, "step")
    np.testing.assert_array_equal(dx, c)


def _rosenblatt(X: np.ndarray, t: np.ndarray, w: np.ndarray, b: float, eta: float, epochs: int):
    """The classic perceptron rule in plain NumPy, one row at a time: w += eta (t - H(w.x + b)) x."""
    w = w.copy()
    for _ in range(epochs):
        for x, target in zip(X, t, strict=True):
            err = target - (1.0 if x @ w + b > 0 else 0.0)
            w += eta * err * x
            b += eta * err
    return w, b


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_straight_through_step_unit_is_the_perceptron_rule(name):
    """One threshold unit trained with the kernels (step forward, squared error, straight-through
    backward, sgd on one row at a time) follows Rosenblatt's rule weight for weight: lr = eta/2."""
    K = backend(name)
    rng = np.random.default_rng(6)
    X = rng.standard_normal((40, 3))
    t = (X @ np.array([1.0, -2.0, 0.5]) + 0.3 > 0).astype(np.float64)  # linearly separable
    w0, eta, epochs = 0.1 * rng.standard_normal(3), 0.5, 6
    if name == "cuda":  # the simulator launches slowly: a few rows show the same arithmetic
        X, t, epochs = X[:8], t[:8], 1
    want_w, want_b = _rosenblatt(X, t, w0, 0.0, eta, epochs)

    params = put(K, np.concatenate([w0, [0.0]]))  # W (3, 1) then b (1,)
    grad = put(K, np.zeros(4))
    W, bias, dW, db = params[:3].reshape(3, 1), params[3:], grad[:3].reshape(3, 1), grad[3:]
    z, dz = put(K, np.zeros((1, 1))), put(K, np.zeros((1, 1)))
    for _ in range(epochs):
        for i in range(len(X)):
            x, target = put(K, X[i : i + 1]), put(K, t[i : i + 1].reshape(1, 1))
            K.gemm(z, x, W)
            K.bias_act_forward(z, z, bias, "step")
            K.mse_loss(dz, z, target)  # dz = 2 (H - t)
            K.act_backward(dz, dz, z, "step")  # straight through
            K.dense_backward(None, dW, db, dz, x, W)
            K.sgd_update(params, grad, eta / 2)
    got = get(K, params)
    np.testing.assert_allclose(got[:3], want_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[3], want_b, rtol=1e-12, atol=1e-12)
    if epochs > 1:
        assert np.all((X @ got[:3] + got[3] > 0) == (t > 0))  # separable data: no mistakes left


def test_step_hidden_layer_learns_with_the_straight_through_gradient():
    """A network with a hidden layer of threshold units learns a task a linear model cannot
    (XOR-like quadrants) when trained by the straight-through gradient."""
    rng = np.random.default_rng(7)
    X = rng.uniform(-1, 1, (400, 2))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(np.int64)
    tr = MLPTrainer(MLPSpec(2, (32,), 2, activation="step"), backend="numpy", lr=1e-2, dtype=np.float64, seed=1)
    for epoch in range(60):
        order = np.random.default_rng(epoch).permutation(len(X))
        for a in range(0, len(X), 20):
            tr.step(X[order[a : a + 20]], y[order[a : a + 20]])
    assert (tr.forward(X).argmax(axis=1) == y).mean() > 0.9
