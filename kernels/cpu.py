"""CPU backend: BLAS for matrix products, Numba ``@njit(nogil=True)`` for the fused element-wise work.

Dimension legend:
    B  batch size
    I  input features of a layer (n_in)
    O  output features of a layer (n_out)
    N  elements of a flat buffer (parameters, gradients, optimizer state)

Same names and signatures as :mod:`kernels.reference` (the specification). Each public function
validates/coerces in Python, then calls a private jitted core (``_name``), stumpy-style. The cores
are compiled for float32 (training) and float64 (gradient checks) only: scalars are cast to the
array dtype and labels to int64 before the call, so there is no per-call recompilation.
Matrix products go to NumPy's ``matmul(out=...)`` (OpenBLAS, releases the GIL); every core is
``nogil`` so a Dask worker keeps its heartbeats while a kernel runs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.reference import (  # noqa: F401  (re-exported memory helpers)
    ACTIVATIONS,
    empty,
    to_device,
    to_host,
    zeros,
)

# error_model="numpy": float division without a zero check, so the loops vectorize
_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}
_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, STEP = range(6)


def act_code(activation: str) -> int:
    """Integer code of an activation name (the form the jitted cores take)."""
    try:
        return _CODES[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------
# jitted cores


@njit(**_JIT)
def _sigmoid(x):
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


@njit(**_JIT)
def _bias_act(out, x, bias, code, slope):  # out, x: (B, O); bias: (O,)
    b, o = x.shape
    zero = x.dtype.type(0)
    for i in range(b):
        if code == IDENTITY:
            for j in range(o):
                out[i, j] = x[i, j] + bias[j]
        elif code == RELU:
            for j in range(o):
                z = x[i, j] + bias[j]
                out[i, j] = zero if z <= zero else z  # NaN stays NaN, as np.maximum(z, 0)
        elif code == LEAKY_RELU:
            for j in range(o):
                z = x[i, j] + bias[j]
                out[i, j] = z if z > zero else z * slope
        elif code == TANH:
            for j in range(o):
                out[i, j] = np.tanh(x[i, j] + bias[j])
        elif code == STEP:
            one = x.dtype.type(1)
            for j in range(o):
                out[i, j] = one if x[i, j] + bias[j] > zero else zero
        else:
            for j in range(o):
                out[i, j] = _sigmoid(x[i, j] + bias[j])


@njit(**_JIT)
def _act_bwd(dx, dy, y, code, slope):  # dx, dy, y: (B, O)
    b, o = y.shape
    zero = y.dtype.type(0)
    one = y.dtype.type(1)
    for i in range(b):
        if code == IDENTITY or code == STEP:  # step: straight-through (reference.py)
            for j in range(o):
                dx[i, j] = dy[i, j]
        elif code == RELU:
            for j in range(o):
                dx[i, j] = dy[i, j] if y[i, j] > zero else zero
        elif code == LEAKY_RELU:
            for j in range(o):
                dx[i, j] = dy[i, j] if y[i, j] > zero else dy[i, j] * slope
        elif code == TANH:
            for j in range(o):
                dx[i, j] = dy[i, j] * (one - y[i, j] * y[i, j])
        else:
            for j in range(o):
                dx[i, j] = dy[i, j] * y[i, j] * (one - y[i, j])


@njit(**_JIT)
def _act_bwd_inplace(d, y, code, slope):  # d, y: (B, O); d = d * f'(x)
    # a separate in-place version: with dx aliasing dy LLVM's runtime alias check fails and the
    # three-array loop above runs scalar, ~40x slower; identity and step leave d as it is
    b, o = y.shape
    zero = y.dtype.type(0)
    one = y.dtype.type(1)
    for i in range(b):
        if code == RELU:
            for j in range(o):
                d[i, j] = d[i, j] if y[i, j] > zero else zero
        elif code == LEAKY_RELU:
            for j in range(o):
                d[i, j] = d[i, j] if y[i, j] > zero else d[i, j] * slope
        elif code == TANH:
            for j in range(o):
                d[i, j] *= one - y[i, j] * y[i, j]
        elif code == SIGMOID:
            for j in range(o):
                d[i, j] *= y[i, j] * (one - y[i, j])


@njit(**_JIT)
def _colsum(dbias, dout):  # dbias: (O,); dout: (B, O)
    b, o = dout.shape
    for j in range(o):
        dbias[j] = 0
    for i in range(b):
        for j in range(o):
            dbias[j] += dout[i, j]


@njit(**_JIT)
def _softmax(out, logits):  # out, logits: (B, O)
    b, o = logits.shape
    for i in range(b):
        m = logits[i, 0]
        for j in range(1, o):
            m = max(m, logits[i, j])
        s = logits.dtype.type(0)
        for j in range(o):
            e = np.exp(logits[i, j] - m)
            out[i, j] = e
            s += e
        inv = 1 / s
        for j in range(o):
            out[i, j] *= inv


@njit(**_JIT)
def _softmax_ce(dlogits, logits, labels):  # dlogits, logits: (B, O); labels: (B,) int64
    b, o = logits.shape
    total = 0.0
    inv_b = logits.dtype.type(1.0 / b)
    for i in range(b):
        lab = labels[i]
        if lab < 0 or lab >= o:
            raise ValueError("softmax_cross_entropy: label out of range [0, n_out)")
        m = logits[i, 0]
        for j in range(1, o):
            m = max(m, logits[i, j])
        z_lab = logits[i, lab] - m
        s = logits.dtype.type(0)
        for j in range(o):
            e = np.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        total += math.log(s) - z_lab
        scale = inv_b / s
        for j in range(o):
            dlogits[i, j] *= scale
        dlogits[i, lab] -= inv_b
    return total / b


@njit(**_JIT)
def _bce(dlogits, logits, targets):  # dlogits, logits, targets: (B, O)
    b, o = logits.shape
    n = b * o
    inv_n = logits.dtype.type(1.0 / n)
    total = 0.0
    for i in range(b):
        for j in range(o):
            x = logits[i, j]
            t = targets[i, j]
            e = math.exp(-abs(x))
            total += max(x, 0) - x * t + math.log1p(e)
            sig = 1 / (1 + e) if x >= 0 else e / (1 + e)
            dlogits[i, j] = (sig - t) * inv_n
    return total / n


@njit(**_JIT)
def _mse(dpred, pred, target):  # dpred, pred, target: (B, O)
    b, o = pred.shape
    n = b * o
    scale = pred.dtype.type(2.0 / n)
    total = 0.0
    for i in range(b):
        for j in range(o):
            d = pred[i, j] - target[i, j]
            total += d * d
            dpred[i, j] = d * scale
    return total / n


@njit(**_JIT)
def _l2(dparams, params, wd):  # dparams, params: (N,)
    for k in range(params.size):
        dparams[k] += wd * params[k]


@njit(**_JIT)
def _sgd(params, grad, lr, wd):  # params, grad: (N,)
    for k in range(params.size):
        params[k] -= lr * (grad[k] + wd * params[k])


@njit(**_JIT)
def _momentum(params, velocity, grad, lr, mu, nesterov, wd):  # all (N,)
    if nesterov:
        for k in range(params.size):
            g = grad[k] + wd * params[k]
            v = mu * velocity[k] + g
            velocity[k] = v
            params[k] -= lr * (g + mu * v)
    else:
        for k in range(params.size):
            g = grad[k] + wd * params[k]
            v = mu * velocity[k] + g
            velocity[k] = v
            params[k] -= lr * v


@njit(**_JIT)
def _rmsprop(params, sq_avg, grad, lr, rho, one_m_rho, eps, wd):  # all (N,)
    for k in range(params.size):
        g = grad[k] + wd * params[k]
        s = rho * sq_avg[k] + one_m_rho * g * g
        sq_avg[k] = s
        params[k] -= lr * g / (np.sqrt(s) + eps)


@njit(**_JIT)
def _adam(params, m, v, grad, b1, one_m_b1, b2, one_m_b2, step_size, bc2_sqrt, eps, wd, decay):
    # params, m, v, grad: (N,); wd = coupled L2 factor, decay = decoupled factor (1 - lr*wd)
    for k in range(params.size):
        p = params[k] * decay
        g = grad[k] + wd * params[k]
        mk = b1 * m[k] + one_m_b1 * g
        vk = b2 * v[k] + one_m_b2 * g * g
        m[k] = mk
        v[k] = vk
        params[k] = p - step_size * mk / (np.sqrt(vk) / bc2_sqrt + eps)


# ----------------------------------------------------------------------------------------------
# public wrappers (same signatures as kernels.reference)


def gemm(
    out: np.ndarray,  # (M, N)
    a: np.ndarray,  # (M, K), or (K, M) when trans_a
    b: np.ndarray,  # (K, N), or (N, K) when trans_b
    trans_a: bool = False,
    trans_b: bool = False,
) -> None:
    """out = op(a) @ op(b) through BLAS."""
    np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


def dense_forward(
    out: np.ndarray,  # (B, O)
    inp: np.ndarray,  # (B, I)
    weight: np.ndarray,  # (I, O)
    bias: np.ndarray,  # (O,)
) -> None:
    """out = inp @ weight + bias."""
    np.matmul(inp, weight, out=out)
    _bias_act(out, out, bias, IDENTITY, out.dtype.type(0))


def dense_backward(
    dinp: np.ndarray | None,  # (B, I); None for the first layer
    dweight: np.ndarray,  # (I, O)
    dbias: np.ndarray,  # (O,)
    dout: np.ndarray,  # (B, O)
    inp: np.ndarray,  # (B, I)
    weight: np.ndarray,  # (I, O)
) -> None:
    """Gradients of ``out = inp @ weight + bias`` given dout."""
    if dinp is not None:
        np.matmul(dout, weight.T, out=dinp)
    np.matmul(inp.T, dout, out=dweight)
    _colsum(dbias, dout)


def bias_backward(
    dbias: np.ndarray,  # (O,)
    dout: np.ndarray,  # (B, O)
) -> None:
    """dbias = column sums of dout."""
    _colsum(dbias, dout)


def bias_act_forward(
    out: np.ndarray,  # (B, O); may alias x
    x: np.ndarray,  # (B, O)
    bias: np.ndarray,  # (O,)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x + bias), fused in one pass."""
    _bias_act(out, x, bias, act_code(activation), x.dtype.type(slope))


def act_forward(
    out: np.ndarray,  # (B, O); may alias x
    x: np.ndarray,  # (B, O)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x)."""
    bias = np.zeros(x.shape[1], dtype=x.dtype)
    _bias_act(out, x, bias, act_code(activation), x.dtype.type(slope))


def act_backward(
    dx: np.ndarray,  # (B, O); may alias dy
    dy: np.ndarray,  # (B, O)
    y: np.ndarray,  # (B, O) activation output
    activation: str,
    slope: float = 0.01,
) -> None:
    """dx = dy * f'(x) written in terms of y = f(x)."""
    code, s = act_code(activation), y.dtype.type(slope)
    if dx is dy or (dx.ctypes.data == dy.ctypes.data and dx.strides == dy.strides):
        _act_bwd_inplace(dx, y, code, s)
    else:
        _act_bwd(dx, dy, y, code, s)


def softmax(
    out: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
) -> None:
    """Row-wise softmax, max-shifted."""
    _softmax(out, logits)


def _labels64(labels: np.ndarray) -> np.ndarray:
    return labels if labels.dtype == np.int64 else labels.astype(np.int64)


def softmax_cross_entropy(
    dlogits: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
    labels: np.ndarray,  # (B,) integer class indices
) -> float:
    """Mean softmax cross-entropy and its gradient, fused, stable."""
    return float(_softmax_ce(dlogits, logits, _labels64(labels)))


def bce_with_logits(
    dlogits: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
    targets: np.ndarray,  # (B, O)
) -> float:
    """Mean binary cross-entropy with logits and its gradient, fused, stable."""
    return float(_bce(dlogits, logits, targets))


def mse_loss(
    dpred: np.ndarray,  # (B, O); may alias pred
    pred: np.ndarray,  # (B, O)
    target: np.ndarray,  # (B, O)
) -> float:
    """Mean squared error and its gradient, fused."""
    return float(_mse(dpred, pred, target))


def l2_decay(
    dparams: np.ndarray,  # (N,)
    params: np.ndarray,  # (N,)
    weight_decay: float,
) -> None:
    """dparams += weight_decay * params."""
    _l2(dparams, params, params.dtype.type(weight_decay))


def sgd_update(
    params: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """params -= lr * (grad + wd * params)."""
    dt = params.dtype.type
    _sgd(params, grad, dt(lr), dt(weight_decay))


def momentum_update(
    params: np.ndarray,  # (N,)
    velocity: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """Heavy-ball / Nesterov momentum (PyTorch form)."""
    dt = params.dtype.type
    _momentum(params, velocity, grad, dt(lr), dt(momentum), bool(nesterov), dt(weight_decay))


def rmsprop_update(
    params: np.ndarray,  # (N,)
    sq_avg: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """RMSprop (PyTorch form, no momentum, not centered)."""
    dt = params.dtype.type
    _rmsprop(params, sq_avg, grad, dt(lr), dt(rho), dt(1 - rho), dt(eps), dt(weight_decay))


def _adam_call(params, m, v, grad, lr, beta1, beta2, eps, t, wd, decay) -> None:
    if t < 1:
        raise ValueError("adam step count t is 1-based")
    dt = params.dtype.type
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = math.sqrt(1 - beta2**t)
    _adam(
        params,
        m,
        v,
        grad,
        dt(beta1),
        dt(1 - beta1),
        dt(beta2),
        dt(1 - beta2),
        dt(step_size),
        dt(bc2_sqrt),
        dt(eps),
        dt(wd),
        dt(decay),
    )


def adam_update(
    params: np.ndarray,  # (N,)
    m: np.ndarray,  # (N,)
    v: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    t: int,
) -> None:
    """Adam, bias-corrected, coupled L2 weight decay, fused in one pass."""
    _adam_call(params, m, v, grad, lr, beta1, beta2, eps, t, weight_decay, 1.0)


def adamw_update(
    params: np.ndarray,  # (N,)
    m: np.ndarray,  # (N,)
    v: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    t: int,
) -> None:
    """AdamW (decoupled weight decay), fused in one pass."""
    _adam_call(params, m, v, grad, lr, beta1, beta2, eps, t, 0.0, 1 - lr * weight_decay)
