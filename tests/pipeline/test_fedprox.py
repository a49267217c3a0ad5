"""FedProx's proximal term in the local step (``proximal_mu``): a hand computation on the NumPy
reference, every local optimizer on the fast backends against it, and mu = 0 as before."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.mlp import MLPSpec, MLPTrainer, init_params
from pipeline.config import LOCAL_OPTIMIZERS, TrainConfig
from pipeline.loop import make_trainer, prepare_targets, run_batches
from pipeline.train import task_config

SPEC = {"n_in": 5, "hidden": [7], "n_out": 3, "activation": "relu"}


def _batches(n: int, rows: int = 16, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(rows, 5)).astype(np.float32), prepare_targets(rng.integers(0, 3, rows), None))
        for _ in range(n)
    ]


def _cfg(optimizer: str, **extra: object) -> dict:
    return {**task_config(TrainConfig(optimizer=optimizer, lr=0.01, batch_size=16, weight_decay=0.01)), **extra}


def _linear_mse_grad(w: np.ndarray, X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The gradient of mean((X W + b - t)^2) over the flat buffer (W then b), by hand."""
    W, b = w[:-1], w[-1]
    dpred = 2 * (X @ W + b - t) / len(X)
    return np.concatenate([X.T @ dpred, [dpred.sum()]])


def test_one_step_with_mu_is_the_hand_computed_proximal_gradient_step() -> None:
    rng = np.random.default_rng(0)
    X1, X2 = rng.standard_normal((2, 8, 4))
    t1, t2 = rng.standard_normal((2, 8))
    w0 = rng.standard_normal(5)
    lr, mu = 0.1, 0.5
    tr = MLPTrainer(
        MLPSpec(4, (), 1, loss="mse"), backend="numpy", optimizer="sgd", lr=lr, dtype=np.float64, proximal_mu=mu
    )
    tr.set_params(w0)  # the round's global weights: the anchor
    tr.step(X1, t1)  # at the anchor the proximal term is zero
    w1 = w0 - lr * _linear_mse_grad(w0, X1, t1)
    np.testing.assert_allclose(tr.get_params(), w1, rtol=1e-12)
    tr.step(X2, t2)
    w2 = w1 - lr * (_linear_mse_grad(w1, X2, t2) + mu * (w1 - w0))
    np.testing.assert_allclose(tr.get_params(), w2, rtol=1e-12)
    # full batch: the mean gradient of the pieces plus the proximal term, once
    tr.accumulate(X1, t1)
    tr.accumulate(X2, t2)
    tr.apply()
    g = (_linear_mse_grad(w2, X1, t1) * 8 + _linear_mse_grad(w2, X2, t2) * 8) / 16
    np.testing.assert_allclose(tr.get_params(), w2 - lr * (g + mu * (w2 - w0)), rtol=1e-12)
    # a new round: set_params moves the anchor, so its first step has no proximal pull again
    tr.set_params(w1)
    tr.step(X2, t2)
    np.testing.assert_allclose(tr.get_params(), w1 - lr * _linear_mse_grad(w1, X2, t2), rtol=1e-12)


@pytest.mark.parametrize("optimizer", LOCAL_OPTIMIZERS)
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_local_optimizer_takes_the_proximal_term_like_the_reference(optimizer: str, backend: str) -> None:
    batches = _batches(4)
    ref = make_trainer(SPEC, {**_cfg(optimizer, proximal_mu=0.3), "backend": "numpy"})
    fast = make_trainer(SPEC, {**_cfg(optimizer, proximal_mu=0.3), "backend": backend})
    plain = make_trainer(SPEC, {**_cfg(optimizer), "backend": "numpy"})
    for tr in (ref, fast, plain):
        run_batches(tr, batches)
    np.testing.assert_allclose(fast.get_params(), ref.get_params(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(ref.get_params(), plain.get_params(), rtol=1e-6, atol=1e-7)  # the term acts


@pytest.mark.parametrize("optimizer", LOCAL_OPTIMIZERS)
def test_mu_zero_is_todays_trainer_bit_for_bit(optimizer: str) -> None:
    batches = _batches(3)
    before = make_trainer(SPEC, _cfg(optimizer))  # a config without the key
    zero = make_trainer(SPEC, _cfg(optimizer, proximal_mu=0.0))
    assert zero._anchor is None and zero.proximal_mu == 0.0
    for tr in (before, zero):
        run_batches(tr, batches)
    np.testing.assert_array_equal(before.get_params(), zero.get_params())


def test_a_larger_mu_keeps_the_local_weights_closer_to_the_round_start() -> None:
    batches = _batches(30)
    start = init_params(MLPSpec(5, (7,), 3), seed=0)
    drift = []
    for mu in (0.0, 1.0, 10.0):
        tr = make_trainer(SPEC, {**_cfg("sgd", proximal_mu=mu), "lr": 0.05}, params=start)
        run_batches(tr, batches)
        drift.append(float(np.linalg.norm(tr.get_params() - start)))
    assert drift[0] > drift[1] > drift[2], drift


def test_negative_mu_is_refused() -> None:
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        MLPTrainer(MLPSpec(3, (), 2), proximal_mu=-0.1)
