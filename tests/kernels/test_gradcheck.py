"""The reference's gradients against central finite differences, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import reference as R
from kernels.mlp import MLPSpec, MLPTrainer, init_params

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


@pytest.mark.parametrize("activation", R.ACTIVATIONS)
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
    [("softmax_ce", "relu"), ("softmax_ce", "tanh"), ("bce_logits", "sigmoid"),
     ("mse", "leaky_relu"), ("mse", "identity")],
)  # fmt: skip
def test_three_layer_mlp_gradient(loss, activation):
    """Whole-network backward: one SGD step with lr=1 exposes the gradient as old - new."""
    spec = MLPSpec(5, (4, 3), 3, activation=activation, loss=loss, leaky_slope=0.1)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((7, 5)).astype(np.float64)
    if loss == "softmax_ce":
        y = rng.integers(0, 3, 7)
    elif loss == "bce_logits":
        y = rng.integers(0, 2, (7, 3)).astype(np.float64)
    else:
        y = rng.standard_normal((7, 3))
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
