"""The model family against plain float64 NumPy written from the textbook definitions, and
against PyTorch (CPU) from the same weights: activations at extreme inputs, whole-network
gradients from 0 to 6 hidden layers of width 1, the local optimizers in float32 over several
steps, the server's learning-rate schedules step by step, full-batch gradient descent end to end
(in this process and on a two-worker cluster), and the settings and rows the model refuses."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from kernels import get_backend
from kernels.mlp import MLPSpec, MLPTrainer, init_params, views
from pipeline.config import MAX_PARAMS, TrainConfig
from pipeline.errors import ConfigError
from pipeline.model import Model
from pipeline.optim import Schedule
from tests.kernels.helpers import targets

ACTS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "step")
# |z| > 100, float32's overflow and underflow edges, signed zeros and denormals
EXTREME = np.array(
    [[-3.4e38, -1e4, -200, -100.5, -88.8, -20, -1e-30, -0.0, 0.0, 1e-30, 0.5, 20, 88.8, 100.5, 200, 1e4, 3.4e38]]
)


def _truth(activation: str, x: np.ndarray, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """f(x) and f'(x) in float64 from the definitions (step: the straight-through derivative 1)."""
    if activation == "identity":
        return x, np.ones_like(x)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):
            y = 1 / (1 + np.exp(-x))
        return y, np.exp(-np.logaddexp(0, x) - np.logaddexp(0, -x))  # sigma(x) sigma(-x), no overflow
    if activation == "tanh":
        e = np.exp(-2 * np.abs(x))
        return np.tanh(x), 4 * e / (1 + e) ** 2  # sech(x)^2, no overflow
    if activation == "relu":
        return np.maximum(x, 0), (x > 0).astype(float)
    if activation == "leaky_relu":
        return np.where(x > 0, x, slope * x), np.where(x > 0, 1.0, slope)
    return (x > 0).astype(float), np.ones_like(x)


@pytest.mark.parametrize("name", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3])
def test_activations_at_extreme_inputs_are_their_definitions(name, dtype, activation, slope):
    """Forward values and derivatives (through ``act_backward``, which sees only f(x)) within a
    few ulps of the float64 definitions, with no overflow warning, at every extreme input."""
    K = get_backend(name)
    x = EXTREME.astype(dtype)
    want, dwant = _truth(activation, x.astype(np.float64), slope)
    out = np.empty_like(x)
    K.act_forward(out, x.copy(), activation, slope)
    dx = np.empty_like(x)
    K.act_backward(dx, np.ones_like(x), out, activation, slope)
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    assert np.all(np.abs(out - want) <= 4 * eps * np.abs(want) + 4 * tiny), (out, want)
    # the derivative is computed from the rounded f(x) (as PyTorch's sigmoid and tanh are): exact
    # to a few ulps of 1 in absolute terms (sigmoid's y (1 - y) is 0 once y rounds to 1)
    assert np.all(np.abs(dx - dwant) <= 8 * eps * np.abs(dwant) + 2 * eps), (dx, dwant)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("name", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_cross_entropy_at_extreme_and_equal_logits(name, dtype):
    K = get_backend(name)
    logits = np.array([[1e4, -1e4, 0.0], [88.0, 89.0, 90.0], [7.0, 7.0, 7.0], [-1e30, -1e30, -1e30]], dtype)
    labels = np.array([1, 0, 2, 1])
    p = np.empty_like(logits)
    K.softmax(p, logits.copy())
    z = logits.astype(np.float64)
    shifted = z - z.max(1, keepdims=True)
    want_p = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    np.testing.assert_allclose(p, want_p, rtol=4 * np.finfo(dtype).eps, atol=1e-300)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=4 * np.finfo(dtype).eps)
    d = np.empty_like(logits)
    loss = K.softmax_cross_entropy(d, logits.copy(), labels)
    # -log softmax(z)[label] = log sum exp(z - max) - (z[label] - max): row 0 is 2e4, the others near 1
    want = float(np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(4), labels]))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(d, (want_p - onehot) / 4, rtol=1e-5, atol=1e-7)


# -- whole networks against PyTorch ----------------------------------------------------------


def _torch_loss(torch, spec: MLPSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray):
    v = views(spec, params)
    leaves = []
    a = torch.from_numpy(X)
    f = {
        "identity": lambda t: t,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, spec.leaky_slope),
    }[spec.activation]
    for layer in range(spec.n_layers):
        W = torch.from_numpy(v[f"W{layer}"].copy()).requires_grad_(True)
        b = torch.from_numpy(v[f"b{layer}"].copy()).requires_grad_(True)
        leaves += [W, b]
        a = a @ W + b
        if layer < spec.n_layers - 1:
            a = f(a)
    if spec.loss == "softmax_ce":
        loss = torch.nn.functional.cross_entropy(a, torch.from_numpy(y))
    elif spec.loss == "bce_logits":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a, torch.from_numpy(y))
    else:
        loss = torch.nn.functional.mse_loss(a, torch.from_numpy(y))
    loss.backward()
    return loss.item(), np.concatenate([t.grad.numpy().ravel() for t in leaves])


@pytest.mark.parametrize("depth", range(7))
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "tanh", "relu", "leaky_relu"])
def test_gradients_of_width_one_networks_are_pytorch_s(depth, activation):
    """0 to 6 hidden layers of width 1 (the narrowest path a gradient can take), every loss,
    biases away from zero: loss and gradient of the cpu backend equal PyTorch's autograd."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(depth)
    for loss in ("softmax_ce", "bce_logits", "mse"):
        spec = MLPSpec(4, (1,) * depth, 3 if loss == "softmax_ce" else 2, activation, loss)
        p = init_params(spec, seed=depth, dtype=np.float64) + 0.3 * rng.standard_normal(spec.n_params)
        X = rng.standard_normal((6, 4))
        y = targets(rng, loss, 6, spec.n_out)
        tr = MLPTrainer(spec, backend="cpu", optimizer="sgd", lr=1.0, params=p, dtype=np.float64, max_batch=8)
        got = tr._gradient(X, y)
        want, grad = _torch_loss(torch, spec, p, X, y)
        assert got == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(tr.K.to_host(tr._grad), grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "optimizer,kw",
    [
        ("sgd", {}),
        ("momentum", {"momentum": 0.8}),
        ("momentum", {"momentum": 0.8, "nesterov": True}),
        ("rmsprop", {"rho": 0.9}),
        ("adam", {"beta1": 0.8, "beta2": 0.99}),
        ("adamw", {"beta1": 0.8, "beta2": 0.99}),
    ],
)
def test_float32_training_follows_torch_optim_step_by_step(optimizer, kw):
    """Four minibatch steps of a 5-7-4-3 tanh network in float32, weight decay on, against
    torch.optim with the same hyper-parameters in float32: the weights stay within float32
    rounding of each other after every step."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    spec = MLPSpec(5, (7, 4), 3, "tanh", "softmax_ce")
    p0 = init_params(spec, 3, np.float32)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    lr, wd = 0.05, 0.1
    tr = MLPTrainer(spec, backend="cpu", optimizer=optimizer, lr=lr, weight_decay=wd, params=p0, max_batch=10, **kw)
    v = views(spec, p0)
    ps = [torch.nn.Parameter(torch.from_numpy(v[view.name].copy())) for view in spec.layout()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(ps, lr=lr, weight_decay=wd)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(ps, lr=lr, momentum=kw["momentum"], nesterov=kw.get("nesterov", False), weight_decay=wd)
    elif optimizer == "rmsprop":
        opt = torch.optim.RMSprop(ps, lr=lr, alpha=kw["rho"], eps=1e-8, weight_decay=wd)
    elif optimizer == "adam":
        opt = torch.optim.Adam(ps, lr=lr, betas=(kw["beta1"], kw["beta2"]), eps=1e-8, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(ps, lr=lr, betas=(kw["beta1"], kw["beta2"]), eps=1e-8, weight_decay=wd)
    for i in range(4):
        rows = slice(10 * i, 10 * i + 10)
        tr.step(X[rows], y[rows])
        opt.zero_grad()
        a = torch.tanh(torch.from_numpy(X[rows]) @ ps[0] + ps[1])
        a = torch.tanh(a @ ps[2] + ps[3])
        torch.nn.functional.cross_entropy(a @ ps[4] + ps[5], torch.from_numpy(y[rows])).backward()
        opt.step()
        want = np.concatenate([t.detach().numpy().ravel() for t in ps])
        np.testing.assert_allclose(tr.get_params(), want, rtol=0, atol=5e-7)


def test_initial_weights_have_the_documented_scales():
    """He normal (std sqrt(2 / fan_in)) for the relu family, Glorot uniform (limit
    sqrt(6 / (fan_in + fan_out))) otherwise and for scheme "glorot"; biases zero."""
    for activation in ACTS:
        for scheme in ("auto", "glorot"):
            spec = MLPSpec(400, (300,), 10, activation)
            v = views(spec, init_params(spec, seed=1, dtype=np.float64, scheme=scheme))
            W = v["W0"]
            assert not v["b0"].any() and not v["b1"].any()
            if scheme == "auto" and activation in ("relu", "leaky_relu"):
                assert W.std() == pytest.approx(math.sqrt(2 / 400), rel=0.01)
                assert np.abs(W).max() > math.sqrt(6 / 700)  # normal, not bounded by Glorot's limit
            else:
                lim = math.sqrt(6 / 700)
                assert np.abs(W).max() <= lim and np.abs(W).max() > 0.99 * lim
                assert W.std() == pytest.approx(lim / math.sqrt(3), rel=0.01)


# -- learning-rate schedules -------------------------------------------------------------------


def test_schedules_step_by_step():
    """Warm-up (step + 1) / warmup, then: constant 1; step gamma ** (t // step_size); cosine
    min + (1 - min) (1 + cos(pi t / (total - warmup))) / 2, held at min past the end."""
    warm = [1 / 3, 2 / 3, 1.0]
    assert [Schedule("constant", warmup=3).factor(s) for s in range(6)] == pytest.approx([*warm, 1, 1, 1])
    step = Schedule("step", warmup=3, step_size=2, gamma=0.5)
    assert [step.factor(s) for s in range(10)] == pytest.approx([*warm, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])
    cos = Schedule("cosine", warmup=3, total_steps=10, min_factor=0.1)
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, t / 7))) for t in range(9)]
    assert [cos.factor(s) for s in range(12)] == pytest.approx([*warm, *want])
    assert Schedule("step", step_size=1, gamma=0.1).factor(3) == pytest.approx(1e-3)


# -- full-batch gradient descent end to end ---------------------------------------------------


def _gradient_descent(store, spec: dict, cfg: dict, epochs: int) -> np.ndarray:
    """Full-batch gradient descent in float64 from the textbook: the training rows (the held-out
    ones left out), standardized with the store's statistics, from the run's initial weights."""
    from pipeline.loader import held_out_mask

    keep = ~held_out_mask(store, 0, store.n_rows, cfg["validation"], cfg["seed"])
    X = (np.asarray(store.X[:], np.float64)[keep] - store.mean) / store.std
    y = np.asarray(store.y[:])[keep]
    s = MLPSpec(**{**spec, "hidden": tuple(spec["hidden"])})
    p = init_params(s, cfg["seed"], np.float64)
    n = len(X)
    for _ in range(epochs):
        v, acts = views(s, p), [X]
        for layer in range(s.n_layers):
            z = acts[-1] @ v[f"W{layer}"] + v[f"b{layer}"]
            acts.append(np.tanh(z) if layer < s.n_layers - 1 else z)
        z = acts[-1]
        e = np.exp(z - z.max(1, keepdims=True))
        d = e / e.sum(1, keepdims=True)
        d[np.arange(n), y] -= 1
        d /= n
        g = np.zeros_like(p)
        gv = views(s, g)
        for layer in range(s.n_layers - 1, -1, -1):
            gv[f"W{layer}"][...] = acts[layer].T @ d
            gv[f"b{layer}"][...] = d.sum(0)
            if layer:
                d = (d @ v[f"W{layer}"].T) * (1 - acts[layer] ** 2)
        p = p - cfg["lr"] * (g + cfg["weight_decay"] * p)
    return p


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.synth import synth

    return synth(tmp_path_factory.mktemp("family") / "s.zarr", rows=1200, features=5, classes=3, seed=4).path


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    """A LocalCluster of two single-threaded worker processes, scheduler preloaded."""
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        yield c


FULL_BATCH = TrainConfig(
    hidden=[6],
    activation="tanh",
    batch_size=0,
    optimizer="sgd",
    lr=0.2,
    weight_decay=0.01,
    aggregate="mean",
    ema=0.0,
    epochs=3,
    patience=0,
)


@pytest.mark.parametrize("where", ["in-process", "cluster"])
def test_full_batch_runs_are_textbook_gradient_descent(small_store, where, request, tmp_path):
    """The README's full-batch recipe (batch_size 0, sgd, aggregate mean, ema 0): each epoch is
    one step of gradient descent over every training row, in this process and over two shares
    on a two-worker cluster alike; the saved weights are the float64 reference's to float32
    rounding."""
    from pipeline.model import load_model
    from pipeline.store import open_store
    from pipeline.train import train

    client = request.getfixturevalue("client") if where == "cluster" else None
    train(small_store, FULL_BATCH, tmp_path / "run", client=client)
    model = load_model(tmp_path / "run")
    want = _gradient_descent(open_store(small_store), model.spec, model.config, FULL_BATCH.epochs)
    start = init_params(MLPSpec(**{**model.spec, "hidden": tuple(model.spec["hidden"])}), 0, np.float64)
    assert np.abs(want - start).max() > 1e-2  # three steps moved the weights
    np.testing.assert_allclose(model.params, want, rtol=0, atol=2e-6)


# -- what the model refuses ------------------------------------------------------------------


def _model(normalize: bool = True) -> Model:
    spec = {"n_in": 3, "hidden": [4], "n_out": 3, "activation": "relu", "loss": "softmax_ce"}
    params = init_params(MLPSpec(3, (4,), 3), seed=0)
    return Model(
        spec=spec,
        params=params,
        task="classification",
        mean=np.array([0.0, 5.0, 0.0]),
        std=np.array([1.0, 2.0, 1.0]),
        normalize=normalize,
        classes=["a", "b", "c"],
        feature_names=["f0", "f1", "f2"],
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_rows_beyond_float32_are_refused_not_predicted_as_nan(normalize):
    """A finite value that standardization leaves beyond float32's range became infinity in the
    float32 features the network computes on: NaN probabilities and class 'a' for the row,
    silently. It is refused naming the row and feature; values inside the range predict rows
    of probabilities that sum to 1."""
    model = _model(normalize)
    X = np.random.default_rng(0).standard_normal((5, 3))
    X[2, 1] = 1e39
    with pytest.raises(ValueError, match=r"too large for float32 \(row 2, feature 1 \('f1'\): 1e\+39"):
        model.predict_proba(X)
    with pytest.raises(ValueError, match="too large for float32"):
        model.predict(X)
    X[2, 1] = 3e38 if not normalize else 6e38  # 3e38 in float32 after standardization
    P = model.predict_proba(X)
    assert np.isfinite(P).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-12)


def test_point_numbers_in_set_are_numbers():
    """``--set lr=.001`` (no digit before the point, which TOML refuses) is the number 0.001, not
    the text '.001' refused as "must be float"; text keys keep text, int keys still want ints."""
    cfg = TrainConfig().with_overrides(["lr=.001", "momentum=.9", "server_lr=1.", "beta2=9.99e-1"])
    assert (cfg.lr, cfg.momentum, cfg.server_lr, cfg.beta2) == (0.001, 0.9, 1.0, 0.999)
    assert TrainConfig().with_overrides(["validation_store=1."]).validation_store == "1."
    with pytest.raises(ConfigError, match=r"config key 'epochs' must be int, got 5.0"):
        TrainConfig().with_overrides(["epochs=5."])
    with pytest.raises(ConfigError, match=r"config key 'lr' must be float, got '0,001'"):
        TrainConfig().with_overrides(["lr=0,001"])


def test_hidden_layers_beyond_the_parameter_limit_are_refused_by_the_config():
    """Two 30,000-wide hidden layers hold 9e8 weights between them, past the limit a store's
    run refuses: the configuration refuses them before any path (an estimator's fit in this
    process too, which allocated them until memory ran out) builds a network."""
    with pytest.raises(ConfigError, match=r"'hidden' = \[30000, 30000\] is invalid: 900,030,000 parameters"):
        TrainConfig(hidden=[30000, 30000])
    with pytest.raises(ConfigError, match="use narrower layers"):
        TrainConfig().with_overrides(["hidden=[8, 20000, 20000]"])
    width = math.isqrt(MAX_PARAMS) - 1  # just inside the limit
    assert TrainConfig(hidden=[width, width]).hidden == [width, width]


@pytest.mark.parametrize("name", ["numpy", "cpu"])
@pytest.mark.parametrize("fused", [True, False])
def test_relu_of_nan_is_nan_as_np_maximum(name, fused):
    """A NaN pre-activation (a diverged weight) stays NaN through relu, as np.maximum(z, 0) keeps
    it, so the loss shows the divergence: made 0, it silenced the unit and hid the NaN weight."""
    K = get_backend(name)
    x = np.array([[np.nan, -1.0, 2.0, -0.0]], np.float32)
    out = np.empty_like(x)
    if fused:
        K.bias_act_forward(out, x.copy(), np.zeros(4, np.float32), "relu", 0.0)
    else:
        K.act_forward(out, x.copy(), "relu", 0.0)
    assert np.isnan(out[0, 0])
    np.testing.assert_array_equal(out[0, 1:], [0.0, 2.0, 0.0])
