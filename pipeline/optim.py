"""Learning-rate schedules shared by the local (worker) and server optimizers, and the
server's optimizer itself.

A schedule maps a step count (server rounds on the parameter server) to a multiplier of the
base learning rate. Pure Python, no arrays: the parameter server calls it once per update.
:class:`ServerOptimizer` is the parameter server's optimizer over the flat weight vector
(in place: NumPy passes, and one compiled pass for SGD and its average); the parameter server
(:mod:`pipeline.ps`) owns one per job.

Besides ``sgd``, ``momentum`` and ``adam`` (with bias correction) it has the adaptive server
optimizers of federated learning (Reddi et al. 2021, "Adaptive Federated Optimization"), with
``d`` the combined delta: ``m = beta1 m + (1 - beta1) d`` and ``params -= lr m / (sqrt(v) + tau)``,
no bias correction, where ``v`` is ``v + d^2`` (``adagrad``), ``v - (1 - beta2) d^2 sign(v - d^2)``
(``yogi``) or ``beta2 v + (1 - beta2) d^2`` (``fedadam``; also ``adam`` with
``bias_correction=False``, whose ``eps`` plays ``tau``'s part); ``m`` and ``v`` start at zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import CheckpointError, PSError

SCHEDULES = ("constant", "step", "cosine")
# The name of error feedback's residual among a sync share's local-state buffers
# (pipeline.ps.wire.DeltaCompressor): kept with the share's optimizer state, not part of it.
EF_RESIDUAL = "ef_residual"
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "fedadam", "adagrad", "yogi")
ADAPTIVE = ("fedadam", "adagrad", "yogi")  # the FedOpt family: m, v and tau, no bias correction


class OptimizerStateError(PSError, CheckpointError):
    """A saved server-optimizer state that another server optimizer made: refused by the
    parameter server, and one line for the command (a resume with another ``server_optimizer``)."""


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier as a function of the step count.

    ``kind``: ``constant``; ``step`` (times ``gamma`` every ``step_size`` steps); ``cosine``
    (from 1 down to ``min_factor`` over ``total_steps``). ``warmup`` steps of linear warm-up
    from ``1/warmup`` to 1 come first for every kind.
    """

    kind: str = "constant"
    warmup: int = 0
    step_size: int = 1000
    gamma: float = 0.5
    total_steps: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        if self.warmup < 0 or self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ValueError("schedule needs warmup >= 0, step_size >= 1 and 0 < gamma <= 1")

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        t = step - self.warmup
        if self.kind == "step":
            return self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup)
            frac = min(1.0, t / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "kind": self.kind,
            "warmup": self.warmup,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "total_steps": self.total_steps,
            "min_factor": self.min_factor,
        }


def server_kernels() -> Any:
    """:mod:`kernels.codec`, the server's compiled loops (imports numba on first use)."""
    import kernels.codec

    return kernels.codec


def _one_pass(params: np.ndarray, grad: np.ndarray, average: np.ndarray | None) -> bool:
    """Whether the compiled step takes these vectors: contiguous float32 of one length."""
    return all(
        v.dtype == np.float32 and v.flags.c_contiguous and v.shape == params.shape
        for v in (params, grad, *(() if average is None else (average,)))
    )


class ServerOptimizer:
    """The server's optimizer over the flat parameter vector; the combined delta is its gradient.

    In place, through scratch vectors kept between rounds: NumPy passes for momentum and the
    adaptive family, one compiled pass for SGD and its average (:mod:`kernels.codec`, loaded off
    the event loop when a job is created: :func:`pipeline.ps.wire.warm_server_loops`).

    ``ema`` > 0 also keeps an exponential moving average of the weights (Polyak averaging), the
    buffer ``average``: after update ``t`` (1-based) ``average += (1 - d) * (params - average)``
    with ``d = min(ema, (1 + t) / (10 + t))``, so it starts as the weights themselves and its
    horizon grows with training up to ``1 / (1 - ema)`` updates. The average is the *model*
    (what is validated, kept as best and saved); training continues from the raw weights.
    """

    def __init__(
        self,
        name: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        ema: float = 0.0,
        n: int = 0,
        tau: float = 1e-3,
        bias_correction: bool = True,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise PSError(f"unknown server optimizer {name!r}; use one of {SERVER_OPTIMIZERS}")
        if not lr > 0:
            raise PSError(f"server learning rate must be > 0, got {lr}")
        if not 0 <= ema < 1:
            raise PSError(f"ema must be in [0, 1), got {ema}")
        for key, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise PSError(f"server optimizer {key} must be in [0, 1), got {value}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise PSError(f"server optimizer tau must be > 0, got {tau!r}")
        self.name, self.lr, self.momentum = name, float(lr), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.tau, self.bias_correction = float(tau), bool(bias_correction)
        self.ema = float(ema)
        self.t = 0
        self.buffers: dict[str, np.ndarray] = {}
        self._work: np.ndarray | None = None
        self._work2: np.ndarray | None = None  # adam's second work vector
        if name == "momentum":
            self.buffers["velocity"] = np.zeros(n, np.float32)
        elif name == "adam" or name in ADAPTIVE:
            self.buffers["m"] = np.zeros(n, np.float32)
            self.buffers["v"] = np.zeros(n, np.float32)
        if self.ema:
            self.buffers["average"] = np.zeros(n, np.float32)  # meaningful once t >= 1

    def work_vector(self, like: np.ndarray) -> np.ndarray:
        """A work vector shaped like ``like``, kept between rounds (not state: never saved).
        :meth:`step` overwrites it; free for the caller's use before that."""
        if self._work is None or self._work.shape != like.shape:
            self._work = np.empty_like(like)
        return self._work

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Apply one update in place; ``grad`` is read only. Element-wise results equal the
        plain expressions (``params -= lr * grad`` ...): the products go through scratch
        vectors kept between rounds (one; two for the adam family) instead of fresh temporaries
        per round. SGD, the default, and its average take one compiled pass
        (:func:`kernels.codec.sgd_step`, the same float32 operations)."""
        self.t += 1
        if self.name == "sgd" and _one_pass(params, grad, self.buffers.get("average")):
            keep = None
            if self.ema and self.t > 1:
                keep = 1 - min(self.ema, (1 + self.t) / (10 + self.t))
            server_kernels().sgd_step(params, grad, lr, self.buffers["average"] if self.ema else None, keep)
            return
        tmp = self.work_vector(params)
        if self.name == "sgd":
            np.multiply(grad, np.float32(lr), out=tmp)
            params -= tmp
        elif self.name == "momentum":
            vel = self.buffers["velocity"]
            vel *= np.float32(self.momentum)
            vel += grad
            np.multiply(vel, np.float32(lr), out=tmp)
            params -= tmp
        elif self.name in ADAPTIVE or not self.bias_correction:
            self._adaptive_step(params, grad, lr, tmp)
        else:
            # params -= lr/c1 * m / (sqrt(v / c2) + eps), operation by operation as written,
            # through the work vector and a second one kept for adam alone
            m, v = self.buffers["m"], self.buffers["v"]
            m *= np.float32(self.beta1)
            np.multiply(grad, np.float32(1 - self.beta1), out=tmp)
            m += tmp
            v *= np.float32(self.beta2)
            np.square(grad, out=tmp)
            tmp *= np.float32(1 - self.beta2)
            v += tmp
            c1 = 1 - self.beta1**self.t
            c2 = 1 - self.beta2**self.t
            if self._work2 is None or self._work2.shape != params.shape:
                self._work2 = np.empty_like(params)
            num = self._work2
            np.multiply(m, np.float32(lr / c1), out=num)
            np.divide(v, np.float32(c2), out=tmp)
            np.sqrt(tmp, out=tmp)
            tmp += np.float32(self.eps)
            num /= tmp
            params -= num
        if self.ema:
            avg = self.buffers["average"]
            d = min(self.ema, (1 + self.t) / (10 + self.t))
            np.subtract(params, avg, out=tmp)
            if self.t > 1:
                tmp *= np.float32(1 - d)
            avg += tmp

    def _adaptive_step(self, params: np.ndarray, grad: np.ndarray, lr: float, tmp: np.ndarray) -> None:
        """The FedOpt update (module docstring), operation by operation through the two work
        vectors. ``adam`` without bias correction uses ``eps`` where the others use ``tau``."""
        m, v = self.buffers["m"], self.buffers["v"]
        if self._work2 is None or self._work2.shape != params.shape:
            self._work2 = np.empty_like(params)
        work = self._work2
        m *= np.float32(self.beta1)
        np.multiply(grad, np.float32(1 - self.beta1), out=tmp)
        m += tmp
        np.square(grad, out=tmp)  # d^2
        if self.name == "adagrad":
            v += tmp
        elif self.name == "yogi":
            np.subtract(v, tmp, out=work)
            np.sign(work, out=work)
            work *= tmp
            work *= np.float32(1 - self.beta2)
            v -= work
        else:
            v *= np.float32(self.beta2)
            tmp *= np.float32(1 - self.beta2)
            v += tmp
        tau = self.eps if self.name == "adam" else self.tau
        np.multiply(m, np.float32(lr), out=work)
        np.sqrt(v, out=tmp)
        tmp += np.float32(tau)
        work /= tmp
        params -= work

    def model(self, params: np.ndarray) -> np.ndarray:
        """The weights to validate and save: the average (``ema`` > 0, after an update) or
        ``params`` themselves. The array may change in place with the next update."""
        return self.buffers["average"] if self.ema and self.t else params

    def state(self) -> dict[str, Any]:
        """The step count and copies of the buffers, ``{"t", "buffers": {name: vector}}``: the
        server optimizer's part of a checkpoint (undone by :meth:`load_state`)."""
        return {"t": self.t, "buffers": {k: v.copy() for k, v in self.buffers.items()}}

    def load_state(self, state: Mapping[str, Any], params: np.ndarray) -> None:
        """Restore what :meth:`state` gave (buffers already float32 vectors of this length).

        A saved average is derived state and dropped when ``ema`` is off; with ``ema`` on and
        no average saved, the average starts from ``params``. :class:`OptimizerStateError` (a
        :class:`PSError`) names a buffer this optimizer does not have (a state saved by another
        optimizer) and the fix."""
        buffers = dict(state.get("buffers") or {})
        if not self.ema:
            buffers.pop("average", None)
        unknown = sorted(set(buffers) - set(self.buffers))
        if unknown:
            raise OptimizerStateError(
                f"optimizer state has unknown buffer {unknown[0]!r}: the checkpoint was saved by another "
                f"server optimizer than {self.name!r}; resume with the server_optimizer it trained with, "
                "or start a new run (another --out)"
            )
        self.t = int(state.get("t", 0))
        self.buffers.update(buffers)
        if self.ema and "average" not in buffers:
            self.buffers["average"] = np.array(params, dtype=np.float32)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "ema": self.ema,
            "tau": self.tau,
            "bias_correction": self.bias_correction,
        }
