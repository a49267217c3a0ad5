"""MLPSpec layout, the trainer on every backend against the numpy backend, FlatOptimizer."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from kernels.mlp import FlatOptimizer, MLPSpec, MLPTrainer, init_params, views
from tests.kernels.helpers import ALL_BACKENDS, BACKENDS

OPTIMIZERS = [
    ("sgd", {}),
    ("momentum", {}),
    ("momentum", {"nesterov": True}),
    ("rmsprop", {"rho": 0.9}),
    ("adam", {}),
    ("adamw", {}),
]
STEP_TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _data(spec: MLPSpec, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, spec.n_in)).astype(np.float32)
    if spec.loss == "softmax_ce":
        y = rng.integers(0, spec.n_out, n).astype(np.int32)
    elif spec.loss == "bce_logits":
        y = rng.integers(0, 2, (n, spec.n_out)).astype(np.float32)
    else:
        y = rng.standard_normal((n, spec.n_out)).astype(np.float32)
    if spec.n_out == 1:
        y = y.reshape(n)
    return X, y


# -- spec ----------------------------------------------------------------------------------


def test_layout_and_views():
    spec = MLPSpec(3, (4,), 2)
    lay = spec.layout()
    assert [v.name for v in lay] == ["W0", "b0", "W1", "b1"]
    assert [v.shape for v in lay] == [(3, 4), (4,), (4, 2), (2,)]
    assert [v.offset for v in lay] == [0, 12, 16, 24]
    assert spec.n_params == 26 == lay[-1].offset + lay[-1].size
    flat = np.zeros(spec.n_params, np.float32)
    v = views(spec, flat)
    v["W1"][1, 1] = 5.0
    assert flat[16 + 1 * 2 + 1] == 5.0  # a view, not a copy
    assert MLPSpec(4, (), 1).n_params == 5  # logistic regression


def test_init_params_deterministic_and_scaled():
    spec = MLPSpec(400, (300,), 10)
    a, b = init_params(spec, seed=3), init_params(spec, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and not np.array_equal(a, init_params(spec, seed=4))
    v = views(spec, a)
    assert np.all(v["b0"] == 0) and np.all(v["b1"] == 0)
    assert abs(v["W0"].std() - np.sqrt(2 / 400)) < 0.01 * np.sqrt(2 / 400) * 5  # He
    g = views(spec, init_params(MLPSpec(400, (300,), 10, activation="tanh")))
    assert abs(g["W0"].std() - np.sqrt(2 / 700)) < 0.05 * np.sqrt(2 / 700)  # Glorot uniform
    r = views(spec, init_params(spec, seed=3, scheme="glorot"))  # relu, scikit-learn's scheme
    lim = np.sqrt(6 / 700)
    assert np.abs(r["W0"]).max() <= lim * (1 + 1e-6) and abs(r["W0"].std() - lim / np.sqrt(3)) < 0.05 * lim
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        init_params(spec, scheme="xavier")


@pytest.mark.parametrize(
    "kwargs,match",
    [({"activation": "gelu"}, "activation"), ({"loss": "hinge"}, "loss"), ({"hidden": (0,)}, "widths")],
)
def test_spec_validation(kwargs, match):
    base = {"n_in": 3, "hidden": (2,), "n_out": 2}
    with pytest.raises(ValueError, match=match):
        MLPSpec(**{**base, **kwargs})


def test_trainer_validation():
    spec = MLPSpec(3, (2,), 2)
    with pytest.raises(ValueError, match="optimizer"):
        MLPTrainer(spec, optimizer="lbfgs")
    tr = MLPTrainer(spec)
    with pytest.raises(ValueError, match="shape"):
        tr.step(np.zeros((2, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        tr.step(np.zeros((2, 3), np.float32), np.array([0, 2]))


# -- trainer against the numpy backend ------------------------------------------------------


def _compare(name, spec, dtype, optimizer, kw, batches, max_batch=8, **extra):
    X, y = _data(spec, sum(batches))
    p0 = init_params(spec, seed=1, dtype=dtype)
    common = {
        "optimizer": optimizer,
        "lr": 0.01,
        "weight_decay": 0.01,
        "max_batch": max_batch,
        "dtype": dtype,
        "params": p0,
        **kw,
        **extra,
    }
    ref = MLPTrainer(spec, backend="numpy", **common)
    fast = MLPTrainer(spec, backend=name, **common)
    tol = STEP_TOL[np.dtype(dtype).type]
    start = 0
    for b in batches:
        sl = slice(start, start + b)
        start += b
        np.testing.assert_allclose(fast.step(X[sl], y[sl]), ref.step(X[sl], y[sl]), **tol)
    np.testing.assert_allclose(fast.get_params(), ref.get_params(), **tol)
    np.testing.assert_allclose(fast.forward(X), ref.forward(X), **tol)
    np.testing.assert_allclose(fast.loss(X, y), ref.loss(X, y), **tol)
    return fast, ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimizer,kw", OPTIMIZERS)
def test_cpu_trainer_matches_numpy(dtype, optimizer, kw):
    spec = MLPSpec(10, (7, 5), 3)
    # full batch, a short last batch, a batch larger than max_batch (buffers grow)
    _compare("cpu", spec, dtype, optimizer, kw, [8, 3, 8, 13])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,optimizer,kw",
    [(np.float32, o, k) for o, k in OPTIMIZERS] + [(np.float64, "adam", {})],
)
def test_cuda_trainer_matches_numpy(dtype, optimizer, kw):
    spec = MLPSpec(6, (5,), 3)
    _compare("cuda", spec, dtype, optimizer, kw, [4, 3, 5], max_batch=4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "loss,activation,n_out",
    [("bce_logits", "tanh", 1), ("bce_logits", "sigmoid", 2), ("mse", "leaky_relu", 1), ("mse", "identity", 2)],
)
def test_trainer_losses_match_numpy(name, loss, activation, n_out):
    spec = MLPSpec(5, (3,), n_out, activation=activation, loss=loss)
    fast, _ = _compare(name, spec, np.float32, "adam", {}, [4, 2], max_batch=4)
    X, _ = _data(spec, 3)
    out = fast.forward(X)
    assert out.shape == (3, n_out)
    if loss == "bce_logits":
        assert np.all((out > 0) & (out < 1))


@pytest.mark.parametrize("name", BACKENDS)
def test_linear_model_and_forward_probabilities(name):
    spec = MLPSpec(4, (), 3)  # multinomial logistic regression
    fast, _ = _compare(name, spec, np.float32, "sgd", {}, [4, 1], max_batch=4)
    X, _ = _data(spec, 9)  # more rows than max_batch: forward chunks
    p = fast.forward(X)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("name", ["numpy", "cpu"])
def test_step_returns_loss_before_update(name):
    spec = MLPSpec(6, (4,), 3)
    X, y = _data(spec, 8)
    tr = MLPTrainer(spec, backend=name, lr=0.05)
    before = tr.loss(X, y)
    assert tr.step(X, y) == pytest.approx(before, rel=1e-6)
    assert tr.loss(X, y) < before


@pytest.mark.parametrize("name", BACKENDS)
def test_state_dict_round_trip(name):
    spec = MLPSpec(5, (4,), 2)
    X, y = _data(spec, 12)
    a = MLPTrainer(spec, backend=name, max_batch=4)
    a.step(X[:4], y[:4])
    state = a.state_dict()
    assert state["t"] == 1 and set(state) >= {"params", "opt.m", "opt.v", "t"}
    b = MLPTrainer(spec, backend=name, max_batch=4, seed=9)
    b.load_state_dict(state)
    la, lb = a.step(X[4:8], y[4:8]), b.step(X[4:8], y[4:8])
    assert la == pytest.approx(lb, rel=1e-6)
    np.testing.assert_allclose(a.get_params(), b.get_params(), rtol=1e-6)
    a.reset_optimizer()
    assert a.state_dict()["t"] == 0


def test_cpu_step_does_not_allocate():
    spec = MLPSpec(200, (100, 50), 10)
    X, y = _data(spec, 64)
    y = y.astype(np.int64)
    tr = MLPTrainer(spec, backend="cpu", max_batch=64)
    tr.step(X, y)
    tr.step(X[:40], y[:40])
    tracemalloc.start()
    tr.step(X, y)
    tr.step(X[:40], y[:40])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8_000, peak  # the activation buffers alone are 25 KB


# -- FlatOptimizer against PyTorch's optimizers ----------------------------------------------


@pytest.mark.parametrize("optimizer,kw", OPTIMIZERS)
@pytest.mark.parametrize("name", ["numpy", "cpu"])
def test_flat_optimizer_matches_torch(optimizer, kw, name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(11)
    grads = [rng.standard_normal(11) for _ in range(4)]
    wd = 0.05
    opt = FlatOptimizer(optimizer, 11, lr=0.01, weight_decay=wd, backend=name, **kw)
    p = p0.copy()
    for g in grads:
        opt.step(p, g)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    if optimizer == "sgd":
        topt = torch.optim.SGD([tp], lr=0.01, weight_decay=wd)
    elif optimizer == "momentum":
        topt = torch.optim.SGD([tp], lr=0.01, momentum=0.9, nesterov=kw.get("nesterov", False), weight_decay=wd)
    elif optimizer == "rmsprop":
        topt = torch.optim.RMSprop([tp], lr=0.01, alpha=kw["rho"], eps=1e-8, weight_decay=wd)
    elif optimizer == "adam":
        topt = torch.optim.Adam([tp], lr=0.01, weight_decay=wd)
    else:
        topt = torch.optim.AdamW([tp], lr=0.01, weight_decay=wd)
    for g in grads:
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)
    state = opt.state_dict()
    other = FlatOptimizer(optimizer, 11, lr=0.01, weight_decay=wd, backend=name, **kw)
    other.load_state_dict(state)
    q = p.copy()
    opt.step(p, grads[0])
    other.step(q, grads[0])
    np.testing.assert_array_equal(p, q)


def test_flat_optimizer_lr_override_and_validation():
    opt = FlatOptimizer("sgd", 3, lr=0.1)
    p = np.ones(3, np.float32)
    opt.step(p, np.ones(3, np.float32), lr=0.5)
    np.testing.assert_allclose(p, 0.5)
    with pytest.raises(ValueError, match="shape"):
        opt.step(p, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="unknown optimizer"):
        FlatOptimizer("lamb", 3)


# -- RMSprop's decay rho ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("rho", [None, 0.9, 0.5])
def test_rmsprop_decay_is_rho(name, rho):
    """RMSprop against its plain-NumPy definition (PyTorch's, rho = its alpha, default 0.99);
    Adam's beta2 plays no part in it."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(9)
    grads = [rng.standard_normal(9) for _ in range(5)]
    kw = {} if rho is None else {"rho": rho}
    opt = FlatOptimizer("rmsprop", 9, lr=0.01, beta2=0.123, weight_decay=0.05, backend=name, **kw)
    p = opt.K.to_device(p0.copy())
    for g in grads:
        opt.step(p, opt.K.to_device(g))
    r = 0.99 if rho is None else rho
    want, s = p0.copy(), np.zeros(9)
    for g in grads:
        g = g + 0.05 * want
        s = r * s + (1 - r) * g * g
        want = want - 0.01 * g / (np.sqrt(s) + 1e-8)
    np.testing.assert_allclose(opt.K.to_host(p), want, rtol=1e-10, atol=1e-12)


def test_rho_is_validated():
    with pytest.raises(ValueError, match="rho"):
        FlatOptimizer("rmsprop", 3, rho=1.0)


# -- full batch: accumulate, then apply --------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_full_batch_accumulated_over_pieces_is_plain_gradient_descent(name):
    """Linear least squares: accumulating the gradient over uneven pieces then one step equals
    one step of full-batch gradient descent written in plain NumPy, epoch after epoch."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((23, 4))
    y = X @ rng.standard_normal((4, 1)) + 0.1 * rng.standard_normal((23, 1))
    spec = MLPSpec(4, (), 1, loss="mse")
    p0 = 0.1 * rng.standard_normal(spec.n_params)
    tr = MLPTrainer(spec, backend=name, optimizer="sgd", lr=0.1, dtype=np.float64, params=p0, max_batch=8)
    W, b = p0[:4].reshape(4, 1).copy(), p0[4:].copy()
    for _ in range(3):
        for a, z in ((0, 8), (8, 16), (16, 23)):
            tr.accumulate(X[a:z], y[a:z])
        assert tr.accumulated_rows == 23
        assert tr.apply() == 23
        r = X @ W + b - y  # gradient of mean((XW + b - y)^2)
        W, b = W - 0.1 * 2 * X.T @ r / len(X), b - 0.1 * 2 * r.mean(axis=0)
    np.testing.assert_allclose(tr.get_params(), np.concatenate([W.ravel(), b]), rtol=1e-10, atol=1e-12)
    assert tr.accumulated_rows == 0 and tr.apply() == 0  # nothing accumulated: no step
    before = tr.get_params()
    tr.accumulate(X[:5], y[:5])
    tr.discard_accumulated()
    assert tr.apply() == 0
    np.testing.assert_array_equal(tr.get_params(), before)


def test_full_batch_equals_one_step_on_every_row():
    """On a hidden-layer network with Adam: pieces accumulated then applied give the same weights
    as one step over all rows at once (the reference backend, float64)."""
    spec = MLPSpec(5, (6,), 3, activation="tanh")
    X, y = _data(spec, 30, seed=5)
    p0 = init_params(spec, seed=2, dtype=np.float64)
    one = MLPTrainer(spec, backend="numpy", dtype=np.float64, params=p0, max_batch=30)
    acc = MLPTrainer(spec, backend="numpy", dtype=np.float64, params=p0, max_batch=7)
    for _ in range(2):
        one.step(X, y)
        for a in range(0, 30, 7):
            acc.accumulate(X[a : a + 7], y[a : a + 7])
        acc.apply()
    np.testing.assert_allclose(acc.get_params(), one.get_params(), rtol=1e-10, atol=1e-12)
