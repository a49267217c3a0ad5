"""MLPSpec layout, the trainer on every backend against the numpy backend, FlatOptimizer."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from kernels.mlp import FlatOptimizer, MLPSpec, MLPTrainer, init_params, views
from tests.kernels.helpers import BACKENDS

OPTIMIZERS = [
    ("sgd", {}),
    ("momentum", {}),
    ("momentum", {"nesterov": True}),
    ("rmsprop", {"beta2": 0.9}),
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
    [({"activation": "gelu"}, "activation"), ({"loss": "hinge"}, "loss"),
     ({"hidden": (0,)}, "widths")],
)  # fmt: skip
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
    common = {"optimizer": optimizer, "lr": 0.01, "weight_decay": 0.01, "max_batch": max_batch,
              "dtype": dtype, "params": p0, **kw, **extra}  # fmt: skip
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
    [("bce_logits", "tanh", 1), ("bce_logits", "sigmoid", 2), ("mse", "leaky_relu", 1),
     ("mse", "identity", 2)],
)  # fmt: skip
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
        topt = torch.optim.SGD([tp], lr=0.01, momentum=0.9, nesterov=kw.get("nesterov", False),
                               weight_decay=wd)  # fmt: skip
    elif optimizer == "rmsprop":
        topt = torch.optim.RMSprop([tp], lr=0.01, alpha=kw["beta2"], eps=1e-8, weight_decay=wd)
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
