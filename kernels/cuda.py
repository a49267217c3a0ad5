"""CUDA backend: ``numba.cuda`` kernels and their launchers, same names as :mod:`kernels.reference`.

Dimension legend:
    B  batch size
    I  input features of a layer (n_in)
    O  output features of a layer (n_out)
    M, N, K  GEMM sizes: out (M, N) = op(a) (M, K) @ op(b) (K, N)
    P  elements of a flat buffer (parameters, gradients, optimizer state)

Every array argument of a launcher is a device array (``numba.cuda`` device arrays or anything
with ``__cuda_array_interface__``); launchers never copy to the host except the losses, which
return the scalar mean loss. Matrix products use a tiled shared-memory GEMM of our own
(transposes and ragged edges handled in the tile loads), or cuBLAS through CuPy when ``cupy`` is
importable on a real GPU (a product of more rows than a grid holds, over ~1M, is done in strips of
rows). Element-wise kernels use grid-stride loops. Launchers may be called from several threads
at once (a worker with a thread per GPU): each thread's losses accumulate on its own device.

Importing this module never touches the driver. On a machine without a GPU, :func:`require`
(called by ``kernels.get_backend("cuda")``) raises ``BackendUnavailable``; with
``NUMBA_ENABLE_CUDASIM=1`` everything runs on Numba's CUDA simulator (slowly: keep shapes small),
where launches use small blocks and tiles and the threads of a process take turns to launch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from typing import Any

import numba
import numpy as np
from numba import config, cuda

from kernels import BackendUnavailable
from kernels.reference import ACTIVATIONS

DEVICE = True
SIM = bool(config.ENABLE_CUDASIM)
TILE = 8 if SIM else 16  # GEMM tile edge (threads per block = TILE * TILE)
TPB = 32 if SIM else 256  # threads per block of the element-wise kernels
MAX_BLOCKS = 1 if SIM else 1024  # grid-stride loops cover the rest
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y dimension: the tiled GEMM's row blocks
IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, STEP = range(6)
_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}

try:  # cuBLAS for the matrix products when CuPy is present (never under the simulator)
    if SIM:
        raise ImportError
    import cupy as _cupy
except ImportError:
    _cupy = None


def _simulator_shared_arrays_thread_safe() -> None:
    """Make the simulator's ``cuda.shared.array`` allocation atomic.

    Numba's simulator runs a block's threads as Python threads and gives them one shared array
    per source line through an unlocked check-then-set on a dict: two threads reaching the line
    together can each get an array of their own, and the block then computes on memory its other
    threads never wrote (measured: 7 wrong tiled GEMMs in 100 with a 1 us thread switch
    interval). This replaces the method with the same logic under a lock. Real GPUs are not
    affected.
    """
    import sys
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_pipeline_thread_safe", False):
        return
    unsafe = cls.array
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if alignment is not None or shape == 0:  # these paths do not look at the caller
            return unsafe(self, shape, dtype, alignment)
        if isinstance(dtype, numba.types.Type):
            dtype = numba.np.numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # the kernel's line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    cls.array = array
    cls._pipeline_thread_safe = True


if SIM:
    _simulator_shared_arrays_thread_safe()

# Numba's simulator runs one kernel at a time per process (a second launch from another thread
# fails inside the simulator) and, while a kernel runs, rebinds this module's global ``cuda`` to
# its in-kernel fake, which another thread allocating through it would get. Under the simulator
# the threads of one process (a worker with a thread per GPU) therefore take turns for every
# launch and allocation. Real GPUs take launches from any thread: no lock there.
_SIM_LOCK: Any = threading.RLock() if SIM else contextlib.nullcontext()


def _launch(kernel: Any, grid: Any, block: Any, *args: Any) -> None:
    """``kernel[grid, block](*args)``, one thread at a time under the simulator."""
    with _SIM_LOCK:
        kernel[grid, block](*args)


_UNAVAILABLE = (
    "CUDA backend unavailable: no usable CUDA GPU/driver; install a GPU driver, "
    "set NUMBA_ENABLE_CUDASIM=1 (simulator) or use backend 'cpu'"
)


def require() -> None:
    """Raise BackendUnavailable (naming the fix) unless a GPU or the simulator is usable."""
    if SIM:
        return
    try:
        ok = bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - any driver failure means unavailable
        ok = False
    if not ok:
        raise BackendUnavailable(_UNAVAILABLE)


_slots = itertools.count()  # the order in which this process's threads first asked for a device
_bound = threading.local()  # .device: the GPU this thread computes on


def bind_thread() -> int:
    """The GPU this thread computes on (its index among the visible ones), chosen at its first
    call: the process's threads take the visible GPUs in turn, the k-th thread to ask getting
    device k mod N. One worker process with a thread per GPU (``dask worker --nthreads 8`` on a
    host of 8 GPUs) thus drives every GPU, one training task per thread, and its tasks can sum
    their deltas into one push a round (``combine_pushes``). With one visible GPU
    (``CUDA_VISIBLE_DEVICES`` per process, one worker process per GPU) every thread gets device
    0, as without binding. A thread that already holds a CUDA context keeps its device.
    :class:`kernels.mlp.MLPTrainer` binds its thread when it is built, before its first
    allocation: the trainer's device arrays live on that thread's GPU."""
    # numba.cuda itself, imported here: under the simulator a running kernel swaps this module's
    # global ``cuda`` for its fake in-kernel module, which other threads would see
    from numba import cuda as driver

    dev = getattr(_bound, "device", None)
    if dev is None:
        dev = next(_slots) % max(len(driver.gpus), 1)
        try:
            driver.select_device(dev)
        except RuntimeError:  # a context of another device is already current here: keep it
            dev = int(driver.get_current_device().id)
        _bound.device = dev
    return dev


def act_code(activation: str) -> int:
    """Integer code of an activation name."""
    try:
        return _CODES[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}") from None


def _blocks(n: int) -> int:
    return max(1, min(MAX_BLOCKS, (n + TPB - 1) // TPB))


# ----------------------------------------------------------------------------------------------
# memory helpers


def empty(shape: tuple[int, ...] | int, dtype: Any) -> Any:
    """An uninitialised device buffer."""
    require()
    with _SIM_LOCK:
        return cuda.device_array(shape, dtype=dtype)


def zeros(shape: tuple[int, ...] | int, dtype: Any) -> Any:
    """A zeroed device buffer."""
    require()
    with _SIM_LOCK:
        arr = cuda.device_array(shape, dtype=dtype)
    flat = arr.reshape(arr.size) if arr.ndim != 1 else arr
    _launch(_fill_k, _blocks(arr.size), TPB, flat, 0)
    return arr


def to_device(arr: np.ndarray, out: Any = None) -> Any:
    """Copy a host array to the device (into ``out`` when given, same dtype required)."""
    require()
    with _SIM_LOCK:
        if out is None:
            return cuda.to_device(np.ascontiguousarray(arr))
        out.copy_to_device(np.ascontiguousarray(arr, dtype=out.dtype))
    return out


def to_host(arr: Any) -> np.ndarray:
    """Host copy of a device array."""
    return arr.copy_to_host()


# ----------------------------------------------------------------------------------------------
# kernels


@cuda.jit
def _fill_k(out, value):  # out: (P,)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, out.size, stride):
        out[k] = value


def _make_gemm(nbtype: Any) -> Any:
    @cuda.jit
    def gemm_k(c, a, b, trans_a, trans_b, m, n, kk):  # c: (M, N); a, b as in gemm()
        sa = cuda.shared.array((TILE, TILE), dtype=nbtype)
        sb = cuda.shared.array((TILE, TILE), dtype=nbtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty
        col = cuda.blockIdx.x * TILE + tx
        acc = nbtype(0)
        for k0 in range(0, kk, TILE):
            ka = k0 + tx  # column of op(a) this thread loads
            if row < m and ka < kk:
                sa[ty, tx] = a[ka, row] if trans_a else a[row, ka]
            else:
                sa[ty, tx] = 0
            kb = k0 + ty  # row of op(b) this thread loads
            if kb < kk and col < n:
                sb[ty, tx] = b[col, kb] if trans_b else b[kb, col]
            else:
                sb[ty, tx] = 0
            cuda.syncthreads()
            for k in range(TILE):
                acc += sa[ty, k] * sb[k, tx]
            cuda.syncthreads()
        if row < m and col < n:
            c[row, col] = acc

    return gemm_k


_GEMM = {np.dtype(np.float32): _make_gemm(numba.float32), np.dtype(np.float64): _make_gemm(numba.float64)}


@cuda.jit(device=True)
def _apply(z, code, slope):
    if code == RELU:
        # max(z, 0) as np.maximum: +0 for every z <= 0, NaN kept (z * 0 made NaN of -inf)
        return slope - slope if z <= 0 else z  # slope - slope: +0 in the array's dtype
    if code == LEAKY_RELU:
        return z if z > 0 else z * slope
    if code == TANH:
        return math.tanh(z)
    if code == STEP:
        zero = slope * 0  # 0 and 1 in the array's dtype (slope is cast to it)
        return zero + 1 if z > 0 else zero
    if code == SIGMOID:
        if z >= 0:
            return 1 / (1 + math.exp(-z))
        e = math.exp(z)
        return e / (1 + e)
    return z


@cuda.jit
def _bias_act_k(out, x, bias, has_bias, code, slope):  # out, x: (B, O); bias: (O,)
    o = x.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, x.shape[0] * o, stride):
        i = idx // o
        j = idx - i * o
        z = x[i, j] + bias[j] if has_bias else x[i, j]
        out[i, j] = _apply(z, code, slope)


@cuda.jit
def _act_bwd_k(dx, dy, y, code, slope):  # dx, dy, y: (B, O)
    o = y.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, y.shape[0] * o, stride):
        i = idx // o
        j = idx - i * o
        g = dy[i, j]
        yy = y[i, j]
        if code == RELU:
            g = g if yy > 0 else slope - slope  # +0, also for an infinite dy (g * 0 was NaN)
        elif code == LEAKY_RELU:
            g = g if yy > 0 else g * slope
        elif code == TANH:
            g = g * (1 - yy * yy)
        elif code == SIGMOID:
            g = g * yy * (1 - yy)
        dx[i, j] = g  # identity and step (straight-through, see reference.py): g = dy


@cuda.jit
def _colsum_k(dbias, dout):  # dbias: (O,); dout: (B, O); one thread per column
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for j in range(start, dout.shape[1], stride):
        s = dout[0, j] * 0
        for i in range(dout.shape[0]):
            s += dout[i, j]
        dbias[j] = s


@cuda.jit
def _softmax_k(out, logits):  # out, logits: (B, O); one thread per row
    start, stride = cuda.grid(1), cuda.gridsize(1)
    o = logits.shape[1]
    for i in range(start, logits.shape[0], stride):
        m = logits[i, 0]
        for j in range(1, o):
            m = max(m, logits[i, j])
        s = m * 0
        for j in range(o):
            e = math.exp(logits[i, j] - m)
            out[i, j] = e
            s += e
        for j in range(o):
            out[i, j] = out[i, j] / s


@cuda.jit
def _softmax_ce_k(dlogits, logits, labels, acc):  # (B, O), (B, O), (B,), acc: (1,) float64
    start, stride = cuda.grid(1), cuda.gridsize(1)
    b, o = logits.shape
    for i in range(start, b, stride):
        lab = labels[i]
        m = logits[i, 0]
        for j in range(1, o):
            m = max(m, logits[i, j])
        z_lab = logits[i, lab] - m
        s = m * 0
        for j in range(o):
            e = math.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        cuda.atomic.add(acc, 0, (math.log(s) - z_lab) / b)
        for j in range(o):
            dlogits[i, j] = dlogits[i, j] / (s * b)
        dlogits[i, lab] -= 1 / b


@cuda.jit
def _bce_k(dlogits, logits, targets, acc):  # (B, O) x3, acc: (1,) float64
    o = logits.shape[1]
    n = logits.shape[0] * o
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, n, stride):
        i = idx // o
        j = idx - i * o
        x = logits[i, j]
        t = targets[i, j]
        e = math.exp(-abs(x))
        cuda.atomic.add(acc, 0, (max(x, 0) - x * t + math.log1p(e)) / n)
        sig = 1 / (1 + e) if x >= 0 else e / (1 + e)
        dlogits[i, j] = (sig - t) / n


@cuda.jit
def _mse_k(dpred, pred, target, acc):  # (B, O) x3, acc: (1,) float64
    o = pred.shape[1]
    n = pred.shape[0] * o
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, n, stride):
        i = idx // o
        j = idx - i * o
        d = pred[i, j] - target[i, j]
        cuda.atomic.add(acc, 0, d * d / n)
        dpred[i, j] = d * 2 / n


@cuda.jit
def _l2_k(dparams, params, wd):  # (P,), (P,)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, params.size, stride):
        dparams[k] += wd * params[k]


@cuda.jit
def _sgd_k(params, grad, lr, wd):  # (P,), (P,)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, params.size, stride):
        params[k] -= lr * (grad[k] + wd * params[k])


@cuda.jit
def _momentum_k(params, velocity, grad, lr, mu, nesterov, wd):  # (P,) x3
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, params.size, stride):
        g = grad[k] + wd * params[k]
        v = mu * velocity[k] + g
        velocity[k] = v
        params[k] -= lr * (g + mu * v if nesterov else v)


@cuda.jit
def _rmsprop_k(params, sq_avg, grad, lr, rho, one_m_rho, eps, wd):  # (P,) x3
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, params.size, stride):
        g = grad[k] + wd * params[k]
        s = rho * sq_avg[k] + one_m_rho * g * g
        sq_avg[k] = s
        params[k] -= lr * g / (math.sqrt(s) + eps)


@cuda.jit
def _adam_k(params, m, v, grad, b1, one_m_b1, b2, one_m_b2, step_size, bc2_sqrt, eps, wd, decay):
    # params, m, v, grad: (P,)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, params.size, stride):
        p = params[k] * decay
        g = grad[k] + wd * params[k]
        mk = b1 * m[k] + one_m_b1 * g
        vk = b2 * v[k] + one_m_b2 * g * g
        m[k] = mk
        v[k] = vk
        params[k] = p - step_size * mk / (math.sqrt(vk) / bc2_sqrt + eps)


# ----------------------------------------------------------------------------------------------
# launchers (same signatures as kernels.reference)

_ACC = threading.local()  # .acc: this thread's loss accumulator, on its own GPU (bind_thread)


def _acc() -> Any:
    """The calling thread's device float64 scalar the loss kernels accumulate into, zeroed: one
    per thread, so that the losses of concurrent training tasks (a thread per GPU) never mix."""
    acc = getattr(_ACC, "acc", None)
    if acc is None:
        acc = _ACC.acc = empty(1, np.float64)
    _launch(_fill_k, 1, 1, acc, 0.0)
    return acc


def gemm(
    out: Any,  # (M, N)
    a: Any,  # (M, K), or (K, M) when trans_a
    b: Any,  # (K, N), or (N, K) when trans_b
    trans_a: bool = False,
    trans_b: bool = False,
) -> None:
    """out = op(a) @ op(b): cuBLAS via CuPy when available, else the tiled GEMM kernel."""
    m, n = out.shape
    kk = a.shape[0] if trans_a else a.shape[1]
    kb = b.shape[1] if trans_b else b.shape[0]
    if kb != kk or (a.shape[1] if trans_a else a.shape[0]) != m:
        raise ValueError(f"gemm shapes do not match: out {out.shape}, a {a.shape}, b {b.shape}")
    if _cupy is not None:
        ca, cb = _cupy.asarray(a), _cupy.asarray(b)
        _cupy.matmul(ca.T if trans_a else ca, cb.T if trans_b else cb, out=_cupy.asarray(out))
        return
    rows = MAX_GRID_Y * TILE  # a grid's y dimension holds at most MAX_GRID_Y blocks of TILE rows
    if m > rows:  # a batch of over ~1M rows: strips of rows, each a grid of its own
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            gemm(out[r0:r1], a[:, r0:r1] if trans_a else a[r0:r1], b, trans_a, trans_b)
        return
    grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    _launch(_GEMM[np.dtype(out.dtype)], grid, (TILE, TILE), out, a, b, bool(trans_a), bool(trans_b), m, n, kk)


def dense_forward(
    out: Any,  # (B, O)
    inp: Any,  # (B, I)
    weight: Any,  # (I, O)
    bias: Any,  # (O,)
) -> None:
    """out = inp @ weight + bias."""
    gemm(out, inp, weight)
    bias_act_forward(out, out, bias, "identity")


def dense_backward(
    dinp: Any | None,  # (B, I); None for the first layer
    dweight: Any,  # (I, O)
    dbias: Any,  # (O,)
    dout: Any,  # (B, O)
    inp: Any,  # (B, I)
    weight: Any,  # (I, O)
) -> None:
    """Gradients of ``out = inp @ weight + bias`` given dout."""
    if dinp is not None:
        gemm(dinp, dout, weight, trans_b=True)
    gemm(dweight, inp, dout, trans_a=True)
    bias_backward(dbias, dout)


def bias_backward(
    dbias: Any,  # (O,)
    dout: Any,  # (B, O)
) -> None:
    """dbias = column sums of dout."""
    _launch(_colsum_k, _blocks(dout.shape[1]), TPB, dbias, dout)


def bias_act_forward(
    out: Any,  # (B, O); may alias x
    x: Any,  # (B, O)
    bias: Any,  # (O,)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x + bias), fused."""
    dt = np.dtype(x.dtype).type
    _launch(_bias_act_k, _blocks(x.size), TPB, out, x, bias, True, act_code(activation), dt(slope))


def act_forward(
    out: Any,  # (B, O); may alias x
    x: Any,  # (B, O)
    activation: str,
    slope: float = 0.01,
) -> None:
    """out = f(x)."""
    dt = np.dtype(x.dtype).type
    _launch(_bias_act_k, _blocks(x.size), TPB, out, x, x[0], False, act_code(activation), dt(slope))


def act_backward(
    dx: Any,  # (B, O); may alias dy
    dy: Any,  # (B, O)
    y: Any,  # (B, O) activation output
    activation: str,
    slope: float = 0.01,
) -> None:
    """dx = dy * f'(x) written in terms of y = f(x)."""
    dt = np.dtype(y.dtype).type
    _launch(_act_bwd_k, _blocks(y.size), TPB, dx, dy, y, act_code(activation), dt(slope))


def softmax(
    out: Any,  # (B, O); may alias logits
    logits: Any,  # (B, O)
) -> None:
    """Row-wise softmax, max-shifted."""
    _launch(_softmax_k, _blocks(logits.shape[0]), TPB, out, logits)


def softmax_cross_entropy(
    dlogits: Any,  # (B, O); may alias logits
    logits: Any,  # (B, O)
    labels: Any,  # (B,) int64 class indices in [0, O) (not checked on the device)
) -> float:
    """Mean softmax cross-entropy and its gradient, fused; returns the scalar to the host."""
    acc = _acc()
    _launch(_softmax_ce_k, _blocks(logits.shape[0]), TPB, dlogits, logits, labels, acc)
    return float(acc.copy_to_host()[0])


def bce_with_logits(
    dlogits: Any,  # (B, O); may alias logits
    logits: Any,  # (B, O)
    targets: Any,  # (B, O)
) -> float:
    """Mean binary cross-entropy with logits and its gradient, fused."""
    acc = _acc()
    _launch(_bce_k, _blocks(logits.size), TPB, dlogits, logits, targets, acc)
    return float(acc.copy_to_host()[0])


def mse_loss(
    dpred: Any,  # (B, O); may alias pred
    pred: Any,  # (B, O)
    target: Any,  # (B, O)
) -> float:
    """Mean squared error and its gradient, fused."""
    acc = _acc()
    _launch(_mse_k, _blocks(pred.size), TPB, dpred, pred, target, acc)
    return float(acc.copy_to_host()[0])


def l2_decay(
    dparams: Any,  # (P,)
    params: Any,  # (P,)
    weight_decay: float,
) -> None:
    """dparams += weight_decay * params."""
    dt = np.dtype(params.dtype).type
    _launch(_l2_k, _blocks(params.size), TPB, dparams, params, dt(weight_decay))


def sgd_update(
    params: Any,  # (P,)
    grad: Any,  # (P,)
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """params -= lr * (grad + wd * params)."""
    dt = np.dtype(params.dtype).type
    _launch(_sgd_k, _blocks(params.size), TPB, params, grad, dt(lr), dt(weight_decay))


def momentum_update(
    params: Any,  # (P,)
    velocity: Any,  # (P,)
    grad: Any,  # (P,)
    lr: float,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """Heavy-ball / Nesterov momentum (PyTorch form)."""
    dt = np.dtype(params.dtype).type
    args = (params, velocity, grad, dt(lr), dt(momentum), bool(nesterov), dt(weight_decay))
    _launch(_momentum_k, _blocks(params.size), TPB, *args)


def rmsprop_update(
    params: Any,  # (P,)
    sq_avg: Any,  # (P,)
    grad: Any,  # (P,)
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """RMSprop (PyTorch form)."""
    dt = np.dtype(params.dtype).type
    args = (params, sq_avg, grad, dt(lr), dt(rho), dt(1 - rho), dt(eps), dt(weight_decay))
    _launch(_rmsprop_k, _blocks(params.size), TPB, *args)


def _adam_launch(params, m, v, grad, lr, beta1, beta2, eps, t, wd, decay) -> None:
    if t < 1:
        raise ValueError("adam step count t is 1-based")
    dt = np.dtype(params.dtype).type
    step_size = lr / (1 - beta1**t)
    bc2_sqrt = math.sqrt(1 - beta2**t)
    _launch(
        _adam_k,
        _blocks(params.size),
        TPB,
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
    params: Any,  # (P,)
    m: Any,  # (P,)
    v: Any,  # (P,)
    grad: Any,  # (P,)
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    t: int,
) -> None:
    """Adam, bias-corrected, coupled L2 weight decay."""
    _adam_launch(params, m, v, grad, lr, beta1, beta2, eps, t, weight_decay, 1.0)


def adamw_update(
    params: Any,  # (P,)
    m: Any,  # (P,)
    v: Any,  # (P,)
    grad: Any,  # (P,)
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    t: int,
) -> None:
    """AdamW (decoupled weight decay)."""
    _adam_launch(params, m, v, grad, lr, beta1, beta2, eps, t, 0.0, 1 - lr * weight_decay)
