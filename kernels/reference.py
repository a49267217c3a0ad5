"""Plain-NumPy specification of every kernel; also the ``numpy`` backend.

Dimension legend (used in the shape comments of every kernel file):
    B  batch size (rows of a minibatch)
    I  input features of a layer (n_in)
    O  output features of a layer (n_out)
    N  number of elements of a flat buffer (parameters, gradients, optimizer state)

Conventions: outputs first, gradients prefixed ``d``; outputs may alias inputs where a docstring
says so (in-place use). Weight shape is (I, O) so a layer computes ``inp @ weight + bias``.
Losses return the mean loss as a Python float and write the gradient of that mean.

Activations are named ``identity | sigmoid | tanh | relu | leaky_relu | step``; ``act_backward``
takes the activation *output* ``y`` (every derivative is a function of it; leaky_relu needs
slope >= 0).

``step`` is the Heaviside threshold of the perceptron: ``f(x) = 1`` if ``x > 0`` else ``0``. Its
derivative is 0 almost everywhere, so plain backpropagation through it learns nothing; its
backward pass is the straight-through estimator (Hinton's lectures 2012; Bengio, Leonard &
Courville 2013): ``dx = dy``, the derivative of the identity. For a single threshold unit
trained on the squared error ``(f(w.x + b) - t)**2`` one SGD step with the straight-through
gradient is exactly Rosenblatt's perceptron rule ``w += eta (t - f(w.x + b)) x`` with
``eta = 2 lr / B`` (tests/kernels/test_gradcheck.py checks it step by step); in hidden layers
it trains a network of hard threshold units by that same surrogate gradient. It is a biased
estimate of a gradient that is zero, not the gradient itself: a finite-difference check of a
step layer sees 0.

Loss definitions (all means):
    softmax_cross_entropy  mean over rows of -log softmax(logits)[label]
    bce_with_logits        mean over all B*O elements of the binary cross-entropy of sigmoid(logit)
    mse_loss               mean over all B*O elements of (pred - target)**2

Optimizers update a flat parameter buffer in place, with PyTorch's semantics; ``weight_decay`` is
coupled L2 (added to the gradient) except in ``adamw_update`` where it is decoupled.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "step")
LOSSES = ("softmax_ce", "bce_logits", "mse")
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adamw")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")


# ----------------------------------------------------------------------------------------------
# matrix products


def gemm(
    out: np.ndarray,  # (M, N)
    a: np.ndarray,  # (M, K), or (K, M) when trans_a
    b: np.ndarray,  # (K, N), or (N, K) when trans_b
    trans_a: bool = False,
    trans_b: bool = False,
) -> None:
    """out = op(a) @ op(b), op = transpose when the flag is set."""
    np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


def dense_forward(
    out: np.ndarray,  # (B, O)
    inp: np.ndarray,  # (B, I)
    weight: np.ndarray,  # (I, O)
    bias: np.ndarray,  # (O,)
) -> None:
    """out = inp @ weight + bias."""
    np.matmul(inp, weight, out=out)
    out += bias


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
    np.sum(dout, axis=0, out=dbias)


def bias_backward(
    dbias: np.ndarray,  # (O,)
    dout: np.ndarray,  # (B, O)
) -> None:
    """dbias = column sums of dout."""
    np.sum(dout, axis=0, out=dbias)


# ----------------------------------------------------------------------------------------------
# activations


def _act(x: np.ndarray, activation: str, slope: float) -> np.ndarray:
    _check_activation(activation)
    if activation == "identity":
        return x
    if activation == "sigmoid":
        # stable: exp of a non-positive number only
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    if activation == "tanh":
        return np.tanh(x)
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "step":
        return (x > 0).astype(x.dtype)
    return np.where(x > 0, x, x * x.dtype.type(slope))


def act_forward(
    out: np.ndarray,  # (B, O); may alias x
    x: np.ndarray,  # (B, O)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x)."""
    out[...] = _act(x, activation, slope)


def bias_act_forward(
    out: np.ndarray,  # (B, O); may alias x
    x: np.ndarray,  # (B, O)
    bias: np.ndarray,  # (O,)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x + bias)."""
    out[...] = _act(x + bias, activation, slope)


def act_backward(
    dx: np.ndarray,  # (B, O); may alias dy
    dy: np.ndarray,  # (B, O)
    y: np.ndarray,  # (B, O) the activation output f(x)
    activation: str,
    slope: float = 0.01,
) -> None:
    """dx = dy * f'(x), with f' written in terms of y = f(x) (``step``: dx = dy, straight-through)."""
    _check_activation(activation)
    if activation in ("identity", "step"):
        dx[...] = dy
    elif activation == "sigmoid":
        dx[...] = dy * y * (1 - y)
    elif activation == "tanh":
        dx[...] = dy * (1 - y * y)
    elif activation == "relu":
        dx[...] = np.where(y > 0, dy, 0)
    else:
        dx[...] = np.where(y > 0, dy, dy * dy.dtype.type(slope))


def softmax(
    out: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
) -> None:
    """Row-wise softmax, max-shifted."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out[...] = e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# losses (return the mean loss, write its gradient)


def softmax_cross_entropy(
    dlogits: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
    labels: np.ndarray,  # (B,) integer class indices in [0, O)
) -> float:
    """Mean softmax cross-entropy (stable log-sum-exp); dlogits = (softmax - onehot) / B."""
    b = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(b)
    lab = labels.astype(np.intp)
    loss = float(np.sum(lse - z[rows, lab]) / b)
    p = np.exp(z - lse[:, None])
    p[rows, lab] -= 1
    dlogits[...] = p / b
    return loss


def bce_with_logits(
    dlogits: np.ndarray,  # (B, O); may alias logits
    logits: np.ndarray,  # (B, O)
    targets: np.ndarray,  # (B, O) in [0, 1]
) -> float:
    """Mean binary cross-entropy of sigmoid(logits); dlogits = (sigmoid - t) / (B*O)."""
    n = logits.size
    x = logits
    # max(x, 0) - x*t + log(1 + exp(-|x|)) is the stable form
    loss = float(np.sum(np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x)))) / n)
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    dlogits[...] = (sig - targets) / n
    return loss


def mse_loss(
    dpred: np.ndarray,  # (B, O); may alias pred
    pred: np.ndarray,  # (B, O)
    target: np.ndarray,  # (B, O)
) -> float:
    """Mean squared error over all elements; dpred = 2 (pred - target) / (B*O)."""
    diff = pred - target
    loss = float(np.sum(diff * diff) / pred.size)
    dpred[...] = diff * (2 / pred.size)
    return loss


# ----------------------------------------------------------------------------------------------
# weight decay and optimizers over one flat buffer


def l2_decay(
    dparams: np.ndarray,  # (N,)
    params: np.ndarray,  # (N,)
    weight_decay: float,
) -> None:
    """dparams += weight_decay * params (gradient of 0.5 * wd * ||params||^2)."""
    dparams += params.dtype.type(weight_decay) * params


def sgd_update(
    params: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """params -= lr * (grad + wd * params)."""
    dt = params.dtype.type
    g = grad + dt(weight_decay) * params
    params -= dt(lr) * g


def momentum_update(
    params: np.ndarray,  # (N,)
    velocity: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """Heavy-ball / Nesterov momentum (PyTorch form): v = mu v + g; step = g + mu v or v."""
    dt = params.dtype.type
    g = grad + dt(weight_decay) * params
    velocity *= dt(momentum)
    velocity += g
    step = g + dt(momentum) * velocity if nesterov else velocity
    params -= dt(lr) * step


def rmsprop_update(
    params: np.ndarray,  # (N,)
    sq_avg: np.ndarray,  # (N,)
    grad: np.ndarray,  # (N,)
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """s = rho s + (1 - rho) g^2; params -= lr g / (sqrt(s) + eps)."""
    dt = params.dtype.type
    g = grad + dt(weight_decay) * params
    sq_avg *= dt(rho)
    sq_avg += dt(1 - rho) * g * g
    params -= dt(lr) * g / (np.sqrt(sq_avg) + dt(eps))


def _adam(params, m, v, g, lr, beta1, beta2, eps, t) -> None:
    dt = params.dtype.type
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * g * g
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = np.sqrt(1 - beta2**t)
    denom = np.sqrt(v) / dt(bc2_sqrt) + dt(eps)
    params -= dt(step_size) * m / denom


def adam_update(
    params: np.ndarray,  # (N,)
    m: np.ndarray,  # (N,) first moment
    v: np.ndarray,  # (N,) second moment
    grad: np.ndarray,  # (N,)
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    t: int,
) -> None:
    """Adam with bias correction; ``t`` is the 1-based step count; coupled L2 weight decay."""
    g = grad + params.dtype.type(weight_decay) * params
    _adam(params, m, v, g, lr, beta1, beta2, eps, t)


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
    """AdamW: params *= 1 - lr*wd (decoupled), then the Adam step."""
    params *= params.dtype.type(1 - lr * weight_decay)
    _adam(params, m, v, grad, lr, beta1, beta2, eps, t)


# ----------------------------------------------------------------------------------------------
# memory helpers shared by the host backends (the cuda backend has device versions)


def empty(shape: tuple[int, ...] | int, dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised buffer on this backend's memory."""
    return np.empty(shape, dtype=dtype)


def zeros(shape: tuple[int, ...] | int, dtype: np.dtype | type) -> np.ndarray:
    """A zeroed buffer on this backend's memory."""
    return np.zeros(shape, dtype=dtype)


def to_device(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Copy a host array into this backend's memory (into ``out`` when given)."""
    if out is None:
        return np.array(arr, copy=True)
    np.copyto(out, arr, casting="same_kind")
    return out


def to_host(arr: np.ndarray) -> np.ndarray:
    """A host copy."""
    return np.array(arr, copy=True)
