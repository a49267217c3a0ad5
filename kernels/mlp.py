"""A whole MLP minibatch step over one flat parameter buffer, on any kernel backend.

Dimension legend:
    B  batch size (<= the trainer's buffer capacity; larger batches grow the buffers)
    I  n_in, O  n_out, H_l  width of hidden layer l
    N  n_params, the length of the flat parameter / gradient / optimizer-state buffers

Parameters live in one flat buffer laid out as W0, b0, W1, b1, ... (``MLPSpec.layout``), with
W_l of shape (fan_in, fan_out) so a layer computes ``inp @ W + b``. Gradients share the layout,
so an optimizer step is one fused pass over N elements. On the ``cuda`` backend the parameters,
optimizer state, activations and gradients stay in device memory; a step copies the minibatch in
and the scalar loss out.

Weight decay (``weight_decay``) follows PyTorch: coupled L2 over the whole flat buffer (biases
included) for sgd/momentum/rmsprop/adam, decoupled for adamw. The reported loss is the data loss
(without the decay term). ``rmsprop`` decays its squared-gradient average by ``rho`` (PyTorch's
``alpha``, default 0.99).

FedProx (Li et al. 2020): with ``proximal_mu`` > 0 the trainer minimises the data loss plus
``mu/2 ||w - w_anchor||^2``, the anchor being the weights last given to :meth:`MLPTrainer.set_params`
(the global weights a federated round starts from): every gradient gets ``mu (w - w_anchor)``
added before the optimizer's step (after the data gradient, before weight decay, which the
optimizer applies). ``proximal_mu = 0`` takes no extra pass and keeps no anchor.

Full-batch gradient descent over more rows than fit one buffer: :meth:`MLPTrainer.accumulate`
adds a minibatch's gradient (weighted by its rows) to a running sum, :meth:`MLPTrainer.apply`
takes one optimizer step with the mean gradient of every row accumulated since the last one.
Memory stays that of one minibatch, whatever the number of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from kernels import get_backend
from kernels.reference import ACTIVATIONS, LOSSES, OPTIMIZERS

__all__ = ["FlatOptimizer", "MLPSpec", "MLPTrainer", "ParamView", "init_params", "views"]


class ParamView(NamedTuple):
    """One named parameter array inside the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class MLPSpec:
    """Architecture of a dense network; ``hidden=()`` is linear / logistic regression."""

    n_in: int
    hidden: tuple[int, ...]  # widths of the hidden layers
    n_out: int
    activation: str = "relu"  # identity|sigmoid|tanh|relu|leaky_relu|step (hidden layers only)
    loss: str = "softmax_ce"  # softmax_ce | bce_logits | mse
    leaky_slope: float = 0.01  # negative-side slope of leaky_relu (>= 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.n_in < 1 or self.n_out < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer widths must be >= 1, got {self.sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.leaky_slope < 0:
            raise ValueError("leaky_slope must be >= 0")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Widths of every layer, input first: (n_in, *hidden, n_out)."""
        return (self.n_in, *self.hidden, self.n_out)

    @property
    def n_layers(self) -> int:
        """Number of dense layers (weight matrices)."""
        return len(self.hidden) + 1

    def layout(self) -> list[ParamView]:
        """Named views W0, b0, W1, b1, ... with their offsets in the flat buffer."""
        out: list[ParamView] = []
        off = 0
        s = self.sizes
        for layer in range(self.n_layers):
            w = s[layer] * s[layer + 1]
            out.append(ParamView(f"W{layer}", (s[layer], s[layer + 1]), off, w))
            off += w
            out.append(ParamView(f"b{layer}", (s[layer + 1],), off, s[layer + 1]))
            off += s[layer + 1]
        return out

    @property
    def n_params(self) -> int:
        """Length of the flat parameter buffer."""
        s = self.sizes
        return sum(s[i] * s[i + 1] + s[i + 1] for i in range(self.n_layers))


INIT_SCHEMES = ("auto", "glorot")


def init_params(spec: MLPSpec, seed: int = 0, dtype: Any = np.float32, scheme: str = "auto") -> np.ndarray:
    """Flat initial parameters, zero biases. ``scheme="auto"``: He normal for the relu family,
    Glorot uniform otherwise; ``"glorot"``: Glorot uniform for every activation (scikit-learn's
    MLP initialization; smaller first-layer weights than He's when there are few inputs)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; use one of {', '.join(INIT_SCHEMES)}")
    rng = np.random.default_rng(seed)
    flat = np.zeros(spec.n_params, dtype=np.float64)
    he = scheme == "auto" and spec.activation in ("relu", "leaky_relu")
    for v in spec.layout():
        if v.name.startswith("b"):
            continue
        fan_in, fan_out = v.shape
        if he:
            w = rng.standard_normal(v.shape) * math.sqrt(2.0 / fan_in)
        else:
            lim = math.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-lim, lim, size=v.shape)
        flat[v.offset : v.offset + v.size] = w.ravel()
    return flat.astype(dtype)


def views(spec: MLPSpec, flat: Any) -> dict[str, Any]:
    """Named views (no copies) into ``flat`` (a host or device 1-D array of n_params)."""
    if flat.shape != (spec.n_params,):
        raise ValueError(f"flat buffer has shape {flat.shape}, expected ({spec.n_params},)")
    return {v.name: flat[v.offset : v.offset + v.size].reshape(v.shape) for v in spec.layout()}


def _backend(backend: str | ModuleType) -> ModuleType:
    return backend if isinstance(backend, ModuleType) else get_backend(backend)


# ----------------------------------------------------------------------------------------------
# optimizer over a flat buffer


_STATE_NAMES = {"sgd": (), "momentum": ("velocity",), "rmsprop": ("sq_avg",)}
_STATE_NAMES |= {"adam": ("m", "v"), "adamw": ("m", "v")}


class FlatOptimizer:
    """An optimizer over one flat parameter buffer (used by the trainer and the parameter server).

    ``step(params, grad)`` updates ``params`` in place. State buffers are created on the first
    step with the dtype (and memory) of ``params``; ``t`` counts the steps taken (Adam's
    bias-correction count). ``rmsprop`` decays its average of squared gradients by ``rho``.
    """

    def __init__(
        self,
        name: str,
        n_params: int,
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str | ModuleType = "cpu",
        rho: float = 0.99,
    ) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError("optimizer needs lr > 0, eps > 0 and weight_decay >= 0")
        if not (0 <= momentum < 1 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and 0 <= rho < 1):
            raise ValueError("momentum, beta1, beta2 and rho must be in [0, 1)")
        self.name = name
        self.n_params = int(n_params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.rho = float(rho)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.K = _backend(backend)
        self.t = 0
        self.state: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget the moments and the step count."""
        self.t = 0
        self.state = {}

    def _ensure_state(self, params: Any) -> None:
        names = _STATE_NAMES[self.name]
        if names and (names[0] not in self.state or self.state[names[0]].dtype != params.dtype):
            self.state = {n: self.K.zeros(self.n_params, params.dtype) for n in names}

    def step(self, params: Any, grad: Any, lr: float | None = None) -> None:
        """One update of ``params`` (N,) in place from ``grad`` (N,)."""
        if params.shape != (self.n_params,) or grad.shape != (self.n_params,):
            raise ValueError(f"params and grad must have shape ({self.n_params},)")
        lr = self.lr if lr is None else float(lr)
        self._ensure_state(params)
        self.t += 1
        K, s, wd = self.K, self.state, self.weight_decay
        if self.name == "sgd":
            K.sgd_update(params, grad, lr, wd)
        elif self.name == "momentum":
            K.momentum_update(params, s["velocity"], grad, lr, self.momentum, self.nesterov, wd)
        elif self.name == "rmsprop":
            K.rmsprop_update(params, s["sq_avg"], grad, lr, self.rho, self.eps, wd)
        elif self.name == "adam":
            K.adam_update(params, s["m"], s["v"], grad, lr, self.beta1, self.beta2, self.eps, wd, self.t)
        else:
            K.adamw_update(params, s["m"], s["v"], grad, lr, self.beta1, self.beta2, self.eps, wd, self.t)

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Host copies of the state buffers plus ``t`` and ``lr``."""
        out: dict[str, np.ndarray | int | float] = {"t": self.t, "lr": self.lr}
        for k, v in self.state.items():
            out[f"opt.{k}"] = self.K.to_host(v)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` produced."""
        self.t = int(state.get("t", 0))
        self.lr = float(state.get("lr", self.lr))
        self.state = {}
        for n in _STATE_NAMES[self.name]:
            key = f"opt.{n}"
            if key in state:
                arr = np.asarray(state[key])
                if arr.shape != (self.n_params,):
                    raise ValueError(f"{key} has shape {arr.shape}, expected ({self.n_params},)")
                self.state[n] = self.K.to_device(arr)


# ----------------------------------------------------------------------------------------------
# the trainer


class MLPTrainer:
    """Local minibatch training of an :class:`MLPSpec` on one kernel backend.

    ``step`` runs forward, loss, backward and the optimizer update with preallocated buffers
    (views of them for batches smaller than ``max_batch``; a larger batch grows them once).
    ``accumulate`` and ``apply`` split it for full-batch gradient descent (module docstring).
    """

    def __init__(
        self,
        spec: MLPSpec,
        backend: str = "cpu",
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_batch: int = 256,
        dtype: Any = np.float32,
        params: np.ndarray | None = None,
        seed: int = 0,
        rho: float = 0.99,
        proximal_mu: float = 0.0,
    ) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.spec = spec
        self.proximal_mu = float(proximal_mu)
        self.K = get_backend(backend)
        self.backend = backend
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._device = bool(getattr(self.K, "DEVICE", False))
        # a GPU backend: this thread's GPU (threads of one process take the visible GPUs in turn)
        self.device: int | None = self.K.bind_thread() if hasattr(self.K, "bind_thread") else None
        n = spec.n_params
        self._flat = self.K.zeros(n, self.dtype)
        self._grad = self.K.zeros(n, self.dtype)
        self._anchor = self.K.zeros(n, self.dtype) if self.proximal_mu else None  # FedProx: w_start
        self.set_params(init_params(spec, seed, self.dtype) if params is None else params)
        pv, gv = views(spec, self._flat), views(spec, self._grad)
        self._W = [pv[f"W{i}"] for i in range(spec.n_layers)]
        self._b = [pv[f"b{i}"] for i in range(spec.n_layers)]
        self._dW = [gv[f"W{i}"] for i in range(spec.n_layers)]
        self._db = [gv[f"b{i}"] for i in range(spec.n_layers)]
        self.optimizer = FlatOptimizer(
            optimizer, n, lr, momentum, nesterov, beta1, beta2, eps, weight_decay, self.K, rho
        )
        self._acc: np.ndarray | None = None  # float64 host sum of row-weighted gradients
        self._acc_rows = 0
        self._cap = 0
        self._alloc(int(max_batch))

    # -- buffers ----------------------------------------------------------------------------

    def _alloc(self, cap: int) -> None:
        K, s, dt = self.K, self.spec.sizes, self.dtype
        self._cap = cap
        self._acts = [K.empty((cap, w), dt) for w in s[1:]]  # (cap, H_l) post-activation
        self._deltas = [K.empty((cap, w), dt) for w in s[1:]]  # (cap, H_l) dloss/dpre-activation
        self._xbuf = K.empty((cap, s[0]), dt)  # (cap, I)
        if self.spec.loss == "softmax_ce":
            self._ybuf = K.empty(cap, np.int64)  # (cap,)
        else:
            self._ybuf = K.empty((cap, s[-1]), dt)  # (cap, O)

    def _grow(self, b: int) -> None:
        if b > self._cap:
            self._alloc(b)

    def _put_x(self, X: np.ndarray) -> Any:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.spec.n_in:
            raise ValueError(f"X must have shape (b, {self.spec.n_in}), got {X.shape}")
        b = X.shape[0]
        if not self._device and X.dtype == self.dtype and X.flags.c_contiguous:
            return X
        return self.K.to_device(X, out=self._xbuf[:b])

    def _put_y(self, y: np.ndarray, b: int) -> Any:
        y = np.asarray(y)
        if self.spec.loss == "softmax_ce":
            if y.shape != (b,) or y.dtype.kind not in "iu":
                raise ValueError(f"softmax_ce needs integer class labels of shape ({b},)")
            if y.min() < 0 or y.max() >= self.spec.n_out:
                raise ValueError(f"class labels must be in [0, {self.spec.n_out})")
            if not self._device and y.dtype == np.int64 and y.flags.c_contiguous:
                return y
            if self._device and y.dtype != np.int64:
                y = y.astype(np.int64)
            return self.K.to_device(y, out=self._ybuf[:b])
        n_out = self.spec.n_out
        if y.shape == (b,) and n_out == 1:
            y = y.reshape(b, 1)
        if y.shape != (b, n_out):
            raise ValueError(f"{self.spec.loss} needs targets of shape ({b},) or ({b}, {n_out})")
        if not self._device and y.dtype == self.dtype and y.flags.c_contiguous:
            return y
        if self._device and y.dtype != self.dtype:
            y = y.astype(self.dtype)
        return self.K.to_device(y, out=self._ybuf[:b])

    # -- parameters and state ---------------------------------------------------------------

    def set_params(self, flat: np.ndarray) -> None:
        """Copy ``flat`` (n_params,) into the trainer's buffer; optimizer state is kept. With
        ``proximal_mu`` > 0 these weights also become the proximal anchor."""
        flat = np.asarray(flat)
        if flat.shape != (self.spec.n_params,):
            raise ValueError(f"params have shape {flat.shape}, expected ({self.spec.n_params},)")
        if self._device and flat.dtype != self.dtype:
            flat = flat.astype(self.dtype)
        self.K.to_device(flat, out=self._flat)
        if self._anchor is not None:
            self.K.to_device(flat, out=self._anchor)

    def _proximal(self) -> None:
        """FedProx: the gradient buffer += mu * (params - anchor)."""
        if self._anchor is not None:
            self.K.l2_decay(self._grad, self._flat, self.proximal_mu)
            self.K.l2_decay(self._grad, self._anchor, -self.proximal_mu)

    def get_params(self) -> np.ndarray:
        """Host copy of the flat parameters."""
        return self.K.to_host(self._flat)

    def reset_optimizer(self) -> None:
        """Zero the optimizer state and its step count."""
        self.optimizer.reset()

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Parameters, optimizer state and step count as host arrays / numbers."""
        return {"params": self.get_params(), **self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` produced."""
        self.set_params(state["params"])
        self.optimizer.load_state_dict({k: v for k, v in state.items() if k != "params"})

    # -- compute ----------------------------------------------------------------------------

    def _forward(self, x: Any, b: int) -> Any:
        K, spec = self.K, self.spec
        a = x
        last = spec.n_layers - 1
        for layer in range(spec.n_layers):
            z = self._acts[layer][:b]
            K.gemm(z, a, self._W[layer])
            act = spec.activation if layer < last else "identity"
            K.bias_act_forward(z, z, self._b[layer], act, spec.leaky_slope)
            a = z
        return a

    def _loss(self, dz: Any, logits: Any, y: Any) -> float:
        K = self.K
        if self.spec.loss == "softmax_ce":
            return K.softmax_cross_entropy(dz, logits, y)
        if self.spec.loss == "bce_logits":
            return K.bce_with_logits(dz, logits, y)
        return K.mse_loss(dz, logits, y)

    def step(self, X: np.ndarray, y: np.ndarray) -> float:
        """One minibatch: forward, loss, backward, optimizer update; the pre-update mean loss."""
        loss = self._gradient(X, y)
        self._proximal()
        self.optimizer.step(self._flat, self._grad)
        return loss

    def accumulate(self, X: np.ndarray, y: np.ndarray) -> float:
        """Add this minibatch's gradient, times its rows, to the running sum; no update. The
        minibatch's mean loss (before any update since the last :meth:`apply`)."""
        loss = self._gradient(X, y)
        b = np.shape(X)[0]
        g = np.asarray(self.K.to_host(self._grad), dtype=np.float64)
        if self._acc is None:
            self._acc = g * b
        else:
            self._acc += g * b
        self._acc_rows += b
        return loss

    def discard_accumulated(self) -> None:
        """Forget the gradients accumulated since the last :meth:`apply`."""
        self._acc, self._acc_rows = None, 0

    @property
    def accumulated_rows(self) -> int:
        """Rows whose gradients :meth:`apply` would average."""
        return self._acc_rows

    def apply(self, lr: float | None = None) -> int:
        """One optimizer step with the mean gradient of every row accumulated since the last
        call (full-batch gradient descent over them); the number of rows, 0 (no step) if none."""
        rows = self._acc_rows
        if not rows or self._acc is None:
            return 0
        self.K.to_device((self._acc / rows).astype(self.dtype), out=self._grad)
        self.discard_accumulated()
        self._proximal()  # the weights did not move while accumulating: once for the mean
        self.optimizer.step(self._flat, self._grad, lr)
        return rows

    def _gradient(self, X: np.ndarray, y: np.ndarray) -> float:
        """Forward, loss, backward into the gradient buffer; the mean loss."""
        b = np.shape(X)[0]
        if b < 1:
            raise ValueError("empty batch")
        self._grow(b)
        x = self._put_x(X)
        t = self._put_y(y, b)
        K, spec = self.K, self.spec
        logits = self._forward(x, b)
        last = spec.n_layers - 1
        dz = self._deltas[last][:b]
        loss = self._loss(dz, logits, t)
        for layer in range(last, -1, -1):
            a_in = x if layer == 0 else self._acts[layer - 1][:b]
            K.gemm(self._dW[layer], a_in, dz, trans_a=True)
            K.bias_backward(self._db[layer], dz)
            if layer > 0:
                dprev = self._deltas[layer - 1][:b]
                K.gemm(dprev, dz, self._W[layer], trans_b=True)
                K.act_backward(dprev, dprev, a_in, spec.activation, spec.leaky_slope)
                dz = dprev
        return loss

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(n, i + self._cap)) for i in range(0, n, self._cap)]

    def forward(self, X: np.ndarray) -> np.ndarray:
        """Predictions on host (n, O): softmax / sigmoid probabilities, or raw outputs (mse)."""
        X = np.asarray(X)
        n = X.shape[0]
        out = np.empty((n, self.spec.n_out), dtype=self.dtype)
        for sl in self._chunks(n):
            b = sl.stop - sl.start
            logits = self._forward(self._put_x(X[sl]), b)
            scratch = self._deltas[-1][:b]
            if self.spec.loss == "softmax_ce":
                self.K.softmax(scratch, logits)
            elif self.spec.loss == "bce_logits":
                self.K.act_forward(scratch, logits, "sigmoid")
            else:
                scratch = logits
            out[sl] = self.K.to_host(scratch)
        return out

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean data loss over all rows, no update."""
        X, y = np.asarray(X), np.asarray(y)
        n = X.shape[0]
        total = 0.0
        for sl in self._chunks(n):
            b = sl.stop - sl.start
            logits = self._forward(self._put_x(X[sl]), b)
            total += self._loss(self._deltas[-1][:b], logits, self._put_y(y[sl], b)) * b
        return total / n
