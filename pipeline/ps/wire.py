"""The parameter server's wire format: float32 vectors as zero-copy frames.

Vectors travel as flat little-endian float32 buffers wrapped in
:func:`distributed.protocol.to_serialize`. The scheduler never deserializes them:
:func:`decode_vector` checks the header (serializer, type, dtype, shape) and builds the array
with ``np.frombuffer``; anything else is refused with :class:`PSError`. Optimizer states
(``{"t", ["lr"], "buffers": {name: vector}}``) travel the same way, buffer by buffer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from distributed.protocol import to_serialize
from distributed.protocol.compression import compressions
from distributed.protocol.serialize import Serialized

from pipeline.errors import PSError

_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def encode_vector(vec: np.ndarray) -> Any:
    """Wrap a flat float32 vector for the wire (zero-copy frames)."""
    vec = np.ascontiguousarray(vec, dtype="<f4").reshape(-1)
    return to_serialize(vec)


def decode_vector(obj: Any, n: int, what: str = "vector") -> np.ndarray:
    """Return the float32 array of length ``n`` carried by ``obj``, or raise :class:`PSError`.

    ``obj`` is what a handler receives: a :class:`Serialized` (header + frames) from a remote
    caller, or the array itself from an in-process one. Only a NumPy float32 vector of length
    ``n`` is accepted; the type named in the header is never unpickled.
    """
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
        dtype = sub.get("dtype")
        if not (isinstance(dtype, list | tuple) and len(dtype) == 2 and dtype[1] == "<f4"):
            raise PSError(f"{what}: dtype must be float32, got {dtype!r}")
        shape = tuple(sub.get("shape") or ())
        if shape != (n,):
            raise PSError(f"{what}: expected shape ({n},), got {shape}")
        names = tuple(header.get("compression") or (None,) * len(obj.frames))
        if len(names) != len(obj.frames) or any(c not in compressions for c in names):
            raise PSError(f"{what}: unsupported frame compression {names!r}")
        frames = [compressions[c].decompress(f) for c, f in zip(names, obj.frames, strict=True)]
        buf = frames[0] if len(frames) == 1 else b"".join(bytes(f) for f in frames)
        if len(memoryview(buf).cast("B")) != 4 * n:
            raise PSError(f"{what}: payload of {len(memoryview(buf).cast('B'))} bytes, expected {4 * n}")
        arr = np.frombuffer(buf, dtype="<f4")
    else:
        raise PSError(f"{what}: expected a float32 array, got {type(obj).__name__}")
    if arr.dtype != np.float32 or arr.ndim != 1 or arr.size != n:
        raise PSError(f"{what}: expected float32 of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr


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
