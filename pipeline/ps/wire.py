"""The parameter server's wire format: float32 vectors (and compressed deltas) as zero-copy frames.

Vectors travel as flat little-endian float32 buffers wrapped in
:func:`distributed.protocol.to_serialize`. The scheduler never deserializes them:
:func:`decode_vector` checks the header (serializer, type, dtype, shape) and builds the array
with ``np.frombuffer``; anything else is refused with :class:`PSError`. Optimizer states
(``{"t", ["lr"], "buffers": {name: vector}}``) travel the same way, buffer by buffer.
Deltas may travel compressed (:func:`compress`, :func:`decode_delta`: fp16, bf16, top-k,
int8), each frame checked the same way.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from distributed.protocol import to_serialize
from distributed.protocol.compression import compressions
from distributed.protocol.serialize import Serialized

from pipeline.errors import PSError
from pipeline.optim import EF_RESIDUAL

_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def encode_vector(vec: np.ndarray) -> Any:
    """Wrap a flat float32 vector for the wire (zero-copy frames)."""
    vec = np.ascontiguousarray(vec, dtype="<f4").reshape(-1)
    return to_serialize(vec)


_DTYPE_NAMES = {"<f4": "float32", "<f2": "float16", "<u2": "uint16", "|i1": "int8", "<i4": "int32"}


def decode_vector(obj: Any, n: int, what: str = "vector") -> np.ndarray:
    """Return the float32 array of length ``n`` carried by ``obj``, or raise :class:`PSError`.

    ``obj`` is what a handler receives: a :class:`Serialized` (header + frames) from a remote
    caller, or the array itself from an in-process one. Only a NumPy float32 vector of length
    ``n`` is accepted; the type named in the header is never unpickled.
    """
    return _frame(obj, "<f4", n, what)


def _frame(obj: Any, dtype: str, n: int, what: str) -> np.ndarray:
    """The 1-d array of ``dtype`` (a NumPy type string such as ``"<f4"``) and length ``n``
    carried by ``obj`` (as :func:`decode_vector`), checked from its header, never unpickled."""
    name = _DTYPE_NAMES[dtype]
    if isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "data") and isinstance(obj.data, np.ndarray):  # Serialize, in-process
        arr = obj.data
    elif isinstance(obj, Serialized):
        header = obj.header
        if not isinstance(header, Mapping):
            raise PSError(f"{what}: malformed header")
        if header.get("serializer") != "dask" or header.get("type") != "numpy.ndarray":
            raise PSError(f"{what}: expected a NumPy array, got {header.get('type')!r}")
        sub = header.get("sub-header") or {}
        got = sub.get("dtype")
        if not (isinstance(got, list | tuple) and len(got) == 2 and got[1] == dtype):
            raise PSError(f"{what}: dtype must be {name}, got {got!r}")
        shape = tuple(sub.get("shape") or ())
        if shape != (n,):
            raise PSError(f"{what}: expected shape ({n},), got {shape}")
        names = tuple(header.get("compression") or (None,) * len(obj.frames))
        if len(names) != len(obj.frames) or any(c not in compressions for c in names):
            raise PSError(f"{what}: unsupported frame compression {names!r}")
        frames = [compressions[c].decompress(f) for c, f in zip(names, obj.frames, strict=True)]
        buf = frames[0] if len(frames) == 1 else b"".join(bytes(f) for f in frames)
        size = np.dtype(dtype).itemsize * n
        if len(memoryview(buf).cast("B")) != size:
            raise PSError(f"{what}: payload of {len(memoryview(buf).cast('B'))} bytes, expected {size}")
        arr = np.frombuffer(buf, dtype=dtype) if n else np.empty(0, dtype)
    else:
        raise PSError(f"{what}: expected a {name} array, got {type(obj).__name__}")
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1 or arr.size != n:
        raise PSError(f"{what}: expected {name} of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr


# -- compressed deltas ------------------------------------------------------------------------
#
# A compressed delta is a small dict ``{"codec", "n", <arrays>}`` whose arrays travel as
# zero-copy frames like float32 vectors do; the server checks every frame's header and the
# arrays' values it relies on (index range and order, finite scales) and never unpickles.
#
# * ``fp16``: ``data`` float16 (n,). Half the bytes; |x| > 65504 overflows (refused on the
#   worker), |x| < 6e-8 flushes to zero (error feedback sends it later).
# * ``bf16``: ``data`` uint16 (n,): the top half of each float32, rounded to nearest even. The
#   float32 range, 8 bits of mantissa.
# * ``topk``: ``index`` int32 (k,) strictly increasing, ``values`` float32 (k,): the k =
#   ceil(topk_fraction * n) entries of largest magnitude, sent exactly (of equal magnitudes at
#   the cut, the lowest indices).
# * ``int8``: ``data`` int8 (n,) and ``scales`` float32 (ceil(n / 4096),): block b holds
#   ``data * scales[b]`` with ``scales[b] = max |x| / 127`` over its 4096 entries. Rounding is to
#   nearest, not stochastic: with error feedback the rounding error of one push is sent with the
#   next (so nothing is lost on average, which is what stochastic rounding buys), it keeps sync
#   runs reproducible whichever worker runs a share (no random stream to carry along) and costs
#   one pass less.
#
# The fp16, bf16 and top-k encoders (and the fp16 and bf16 decoders) are compiled loops
# (kernels/half.py, kernels/codec.py): fp16 and bf16 bit for bit NumPy's conversions, top-k
# NumPy's entries (of equal magnitudes at the cut, the lowest indices).
#
# Replies (the weights sent back) are float32 unless ``compress_replies``: the weights are
# not rounded themselves, which would lose what no residual can give back (a bf16 weight moves
# in steps of 2**-8 of its size, larger than a typical local update; fp16's 2**-11 still
# swallows most Adam steps of lr 1e-3 on weights near 1); with ``compress_replies`` a reply is
# the change of the weights every participant holds, with its rounding carried on (:func:`follow`).
# The server itself always adds in float32.

CODECS = ("none", "fp16", "bf16", "topk", "int8")
# codecs a sync job may send its replies in (dense: every weight moves every round, and the
# rounding of one reply is sent with the next; top-k would leave most weights a round behind)
REPLY_CODECS = ("none", "fp16", "bf16", "int8")
INT8_BLOCK = 4096
_FP16_MAX = 65504.0


def topk_count(n: int, fraction: float) -> int:
    """Entries a top-k delta of ``n`` parameters carries: ``ceil(fraction * n)``, 1 to n."""
    return min(n, max(1, math.ceil(fraction * n)))


# The share of a delta's entries a top-k push sends unless configured (``topk_fraction``): at 10%
# (5x fewer bytes than float32) training stayed within a point of float32's accuracy on both
# benchmark sets; at 1% it lost 6-20 points in runs of 16-32 rounds (bench/findings.md).
TOPK_FRACTION = 0.1


def compress(vec: np.ndarray, codec: str, topk_fraction: float = TOPK_FRACTION) -> tuple[Any, np.ndarray]:
    """``(wire, decoded)``: ``vec`` encoded with ``codec`` for the wire, and the float32 vector
    the server will decode from it (what error feedback subtracts). ``none`` sends ``vec``."""
    vec = np.ascontiguousarray(vec, dtype=np.float32).reshape(-1)
    n = vec.size
    if codec == "none":
        return to_serialize(vec), vec
    if codec == "fp16":
        from kernels.half import from_half, to_half  # numba: loaded with the first fp16 vector

        half, overflowed = to_half(vec)
        if overflowed:
            raise PSError(
                f"a delta entry exceeds float16's range ({_FP16_MAX:g}); use compression = 'bf16' "
                "(float32's range) or lower the learning rate"
            )
        return {"codec": codec, "n": n, "data": to_serialize(half)}, from_half(half)
    if codec == "bf16":
        from kernels.codec import bf16_decode, bf16_encode  # numba: loaded with the first bf16 vector

        top = bf16_encode(vec)
        return {"codec": codec, "n": n, "data": to_serialize(top)}, bf16_decode(top)
    if codec == "topk":
        from kernels.codec import topk  # numba: loaded with the first top-k vector

        k = topk_count(n, topk_fraction)
        index, values = topk(vec, k)
        decoded = np.zeros(n, np.float32)
        decoded[index] = values
        wire = {"codec": codec, "n": n, "k": k, "index": to_serialize(index), "values": to_serialize(values)}
        return wire, decoded
    if codec == "int8":
        blocks = -(-n // INT8_BLOCK)
        padded = np.zeros(blocks * INT8_BLOCK, np.float32)
        padded[:n] = vec
        shaped = padded.reshape(blocks, INT8_BLOCK)
        scales = (np.abs(shaped).max(axis=1) / np.float32(127)).astype(np.float32)
        inv = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales > 0)
        q = np.clip(np.rint(shaped * inv[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
        wire = {"codec": codec, "n": n, "data": to_serialize(q), "scales": to_serialize(scales)}
        return wire, _from_int8(q, scales)
    raise PSError(f"unknown compression {codec!r}; use one of {', '.join(CODECS)}")


def compress_ranges(
    vec: np.ndarray, codec: str, ranges: Sequence[tuple[int, int]], topk_fraction: float = TOPK_FRACTION
) -> tuple[list[Any], np.ndarray]:
    """``(wires, decoded)``: ``vec`` encoded range by range, one wire per ``(lo, hi)`` of
    ``ranges`` (consecutive, covering ``vec``), each a delta of its own length in ``codec``,
    as each shard of a sharded server decodes its slice; and the float32 vector they decode
    to. Top-k keeps ``topk_fraction`` of each range's entries, int8 scales each range's own
    blocks: per range, the encoding is that of a vector of the range's length."""
    vec = np.ascontiguousarray(vec, dtype=np.float32).reshape(-1)
    if (
        not ranges
        or ranges[0][0] != 0
        or ranges[-1][1] != vec.size
        or any(a[1] != b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    ):
        raise PSError(f"ranges {list(ranges)!r} do not cover a vector of {vec.size} entries in order")
    wires, decoded = [], np.empty_like(vec)
    for lo, hi in ranges:
        wire, decoded[lo:hi] = compress(vec[lo:hi], codec, topk_fraction)
        wires.append(wire)
    return wires, decoded


class DeltaCompressor:
    """Encodes one participant's deltas in ``codec``, with error feedback: what compression
    dropped from a delta (``delta - decoded``) is kept in :attr:`residual` and added to the
    next delta, so over many pushes the server receives the sum of the deltas up to the last
    residual. ``residual``: a saved one to continue from (sync shares keep it with their local
    optimizer state). ``codec = "none"`` passes deltas through and keeps nothing."""

    RESIDUAL = EF_RESIDUAL  # its name among a sync share's local-state buffers

    def __init__(
        self,
        codec: str = "none",
        topk_fraction: float = TOPK_FRACTION,
        error_feedback: bool = True,
        residual: np.ndarray | None = None,
    ) -> None:
        if codec not in CODECS:
            raise PSError(f"unknown compression {codec!r}; use one of {', '.join(CODECS)}")
        self.codec, self.topk_fraction = codec, float(topk_fraction)
        self.error_feedback = bool(error_feedback) and codec != "none"
        self.residual: np.ndarray | None = None
        if self.error_feedback and residual is not None:
            self.residual = np.array(residual, dtype=np.float32).reshape(-1)

    def __call__(self, delta: np.ndarray, ranges: Sequence[tuple[int, int]] | None = None) -> tuple[Any, np.ndarray]:
        """``(wire, decoded)`` for ``delta`` (plus the residual kept so far); updates the residual.
        With ``none`` the wire is ``delta`` itself (a float32 array). ``ranges`` (a sharded
        server's): the wire is a list of one encoded delta per range (:func:`compress_ranges`)."""
        if self.codec == "none":
            return delta, delta
        delta = np.asarray(delta, dtype=np.float32)
        if self.residual is not None and self.residual.shape == delta.shape:
            delta = delta + self.residual
        if ranges is not None:
            wire, decoded = compress_ranges(delta, self.codec, ranges, self.topk_fraction)
        else:
            wire, decoded = compress(delta, self.codec, self.topk_fraction)
        if self.error_feedback:
            self.residual = delta - decoded
        return wire, decoded


def _from_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    out = q.astype(np.float32)
    full = (q.size // INT8_BLOCK) * INT8_BLOCK
    out[:full].reshape(-1, INT8_BLOCK)[:] *= scales[: full // INT8_BLOCK, None]
    if full < q.size:
        out[full:] *= scales[-1]
    return out


def follow(held: np.ndarray, target: np.ndarray, codec: str) -> tuple[Any, np.ndarray]:
    """One step of compressed replies (``compress_replies``): the change ``target - held``
    encoded in ``codec`` (what a reply carries) and ``held`` plus what it decodes to (the
    weights every participant holds next). The rounding of this change stays in the gap to
    ``target``, so it goes out with the next one: the held weights follow ``target`` within one
    rounding and never drift from it. The parameter server (:meth:`pipeline.ps.job.Job.held_weights`)
    and the in-process one (:class:`pipeline.local.LocalServer`) both step through it."""
    wire, decoded = compress(target - held, codec)
    return wire, held + decoded


_WARMING: dict[str, threading.Thread] = {}
_WARM_LOCK = threading.Lock()


def _warm_once(key: str, load: Callable[[], None]) -> threading.Thread:
    """Run ``load`` in a daemon thread, once per process for ``key``; returns that thread."""
    with _WARM_LOCK:
        thread = _WARMING.get(key)
        if thread is None:
            thread = threading.Thread(target=load, name=f"pipeline-{key}-load", daemon=True)
            _WARMING[key] = thread
            thread.start()
    return thread


def warm_codec(codec: str) -> threading.Thread | None:
    """Load ``codec``'s compiled conversions (fp16, bf16: :mod:`kernels.half`,
    :mod:`kernels.codec`) in a background thread, once per process: the parameter server calls
    it when a job is created, so the first delta it decodes does not stall the scheduler's event
    loop while numba is imported and the loops are loaded from their cache (or, on a fresh
    install, compiled: seconds). A decode that comes sooner waits for the same load, as it would
    have done anyway. Returns the thread (None for the codecs that need no compiled code)."""
    if codec not in ("fp16", "bf16"):
        return None
    return _warm_once(codec, lambda: _load_codec(codec))


def _load_codec(codec: str) -> None:
    try:
        compress(np.zeros(8, np.float32), codec)  # encodes and decodes: every loop of the codec
    except Exception:  # a warm-up only: the first real delta reports what fails
        logging.getLogger("pipeline.ps").debug("loading the %s codec failed", codec, exc_info=True)


def warm_server_loops() -> threading.Thread:
    """Load the server's compiled round (the weighted mean and the SGD step,
    :mod:`kernels.codec`) in a background thread, once per process, as :func:`warm_codec` does
    for a codec: the first round does not stall the event loop. A round that comes sooner waits
    for the same load."""
    return _warm_once("server-round", _load_server_loops)


def _load_server_loops() -> None:
    try:
        from kernels.codec import sgd_step, weighted_mean_into

        v = np.zeros(8, np.float32)
        # a read-only delta (one joined from a message's several frames, or an in-process
        # caller's) is a type numba compiles apart from a writable one: both are loaded
        frozen = v.copy()
        frozen.flags.writeable = False
        weighted_mean_into([v, frozen], np.ones(2, np.float32), np.empty_like(v))
        for grad in (v, frozen):  # async and ssp step with the delta itself
            sgd_step(v.copy(), grad, 1.0, None, None)
    except Exception:  # a warm-up only: the first real round reports what fails
        logging.getLogger("pipeline.ps").debug("loading the server's compiled loops failed", exc_info=True)


def decode_delta(
    obj: Any, n: int, codec: str = "none", topk_fraction: float = TOPK_FRACTION, what: str = "delta"
) -> np.ndarray:
    """The float32 delta of length ``n`` that ``obj`` carries in the job's ``codec``, or
    :class:`PSError` naming what is wrong (another codec, a frame's dtype or length, an index
    out of range or out of order, a bad scale). Every frame is checked from its header as
    :func:`decode_vector` does; nothing is unpickled."""
    if codec == "none":
        if isinstance(obj, Mapping):
            raise PSError(
                f"{what}: encoded as {obj.get('codec')!r}, but the job expects float32 deltas (compression = 'none')"
            )
        return decode_vector(obj, n, what)
    if not isinstance(obj, Mapping):
        plain = isinstance(obj, Serialized | np.ndarray) or isinstance(getattr(obj, "data", None), np.ndarray)
        got = "an uncompressed array" if plain else type(obj).__name__
        raise PSError(f"{what}: the job expects {codec} deltas (compression = {codec!r}), got {got}")
    got = obj.get("codec")
    if got != codec:
        raise PSError(f"{what}: encoded as {got!r}, but the job expects {codec!r}")
    if obj.get("n") != n:
        raise PSError(f"{what}: {codec} delta of {obj.get('n')!r} parameters, expected {n}")
    for key in {"fp16": ("data",), "bf16": ("data",), "topk": ("index", "values"), "int8": ("data", "scales")}.get(
        codec, ()
    ):
        if key not in obj:
            raise PSError(f"{what}: {codec} delta without its {key!r} frame")
    if codec == "fp16":
        from kernels.half import from_half

        return from_half(_frame(obj["data"], "<f2", n, f"{what} data"))
    if codec == "bf16":
        from kernels.codec import bf16_decode

        return bf16_decode(_frame(obj["data"], "<u2", n, f"{what} data"))
    if codec == "topk":
        k = topk_count(n, topk_fraction)
        if obj.get("k") != k:
            raise PSError(f"{what}: top-k delta of k={obj.get('k')!r} entries, the job expects k={k}")
        index = _frame(obj["index"], "<i4", k, f"{what} index")
        values = _frame(obj["values"], "<f4", k, f"{what} values")
        if index[0] < 0 or index[-1] >= n:
            raise PSError(f"{what}: top-k index out of range [0, {n}): {int(index.min())}..{int(index.max())}")
        if k > 1 and not (index[1:] > index[:-1]).all():
            raise PSError(f"{what}: top-k indices must be strictly increasing (sorted, no repeats)")
        out = np.zeros(n, np.float32)
        out[index] = values
        return out
    if codec == "int8":
        q = _frame(obj["data"], "|i1", n, f"{what} data")
        scales = _frame(obj["scales"], "<f4", -(-n // INT8_BLOCK), f"{what} scales")
        if (scales < 0).any():  # a non-finite scale decodes to a non-finite delta: the job fails as diverged
            raise PSError(f"{what}: int8 block scales must be >= 0")
        return _from_int8(q, scales)
    raise PSError(f"{what}: unknown compression {codec!r}; use one of {', '.join(CODECS)}")


def encode_opt_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state ``{"t", ["lr"], "buffers": {name: vector}}`` for the wire: the
    buffers as zero-copy float32 frames (pass copies of buffers that will change)."""
    out: dict[str, Any] = {
        "t": int(state.get("t", 0)),
        "buffers": {str(k): encode_vector(v) for k, v in (state.get("buffers") or {}).items()},
    }
    if state.get("lr") is not None:
        out["lr"] = float(state["lr"])
    return out


def decode_opt_state(obj: Any, n: int, what: str) -> dict[str, Any]:
    """The optimizer state :func:`encode_opt_state` sent, each buffer checked to be a float32
    vector of length ``n`` (owned copies); :class:`PSError` otherwise."""
    buffers = (obj.get("buffers") or {}) if isinstance(obj, Mapping) else None
    if not isinstance(buffers, Mapping) or len(buffers) > 4:
        raise PSError(f"{what}: expected {{'t', 'buffers': {{name: float32 vector}}}}")
    return {
        "t": int(obj.get("t", 0)),
        "lr": None if obj.get("lr") is None else float(obj["lr"]),
        "buffers": {str(k): decode_vector(v, n, f"{what} buffer {k}").copy() for k, v in buffers.items()},
    }


def check_job_id(job: Any) -> str:
    """``job`` if it is a valid job id (it names files and dashboard entries), else
    :class:`PSError`."""
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise PSError(f"invalid job id {job!r}: use 1-128 letters, digits, '_', '.', ':' or '-'")
    return job
