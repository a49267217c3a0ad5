"""IEEE half precision (fp16) conversions for the parameter server's fp16 codec.

NumPy converts float32 to float16 and back one element at a time in portable C (here ~6.5 ms
and ~2.6 ms per million entries): on the scheduler that was more CPU per fp16 push than the
float32 push it replaces. These ``@njit(nogil=True)`` loops do the same bit manipulation in a
compiled loop. Their specification is NumPy's conversion (``x.astype(np.float16)``, round to
nearest, ties to even; overflow to infinity; subnormals kept): the tests compare them bit for
bit over every half value, the midpoints between neighbours, the subnormal and overflow
boundaries and random float32 vectors. A NaN stays a NaN (its payload is not part of the
specification: an update that is not finite fails the job anyway). The module loads numba on
first use (:mod:`pipeline.ps.wire` imports it with the first fp16 vector); the compiled loops are
cached beside it, so only the first fp16 vector a machine ever converts pays the compilation.

Dimension legend: N entries.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


@njit(**_JIT)
def _to_half_bits(f: np.ndarray, out: np.ndarray) -> int:
    # f: (N,) uint32 bits of float32; out: (N,) uint16 half bits. Returns how many finite
    # entries overflowed to infinity.
    overflow = 0
    for i in range(f.shape[0]):
        x = np.uint32(f[i])
        sign = np.uint32((x >> np.uint32(16)) & np.uint32(0x8000))
        exp = x & np.uint32(0x7F800000)
        sig = x & np.uint32(0x007FFFFF)
        if exp >= np.uint32(0x47800000):  # |x| >= 65536, inf or nan
            if exp == np.uint32(0x7F800000):
                if sig != 0:
                    h = np.uint32(0x7C00) + (sig >> np.uint32(13))
                    if h == np.uint32(0x7C00):
                        h += np.uint32(1)  # keep it a NaN
                    out[i] = np.uint16(sign + h)
                else:
                    out[i] = np.uint16(sign + np.uint32(0x7C00))
            else:
                overflow += 1
                out[i] = np.uint16(sign + np.uint32(0x7C00))
        elif exp <= np.uint32(0x38000000):  # a half subnormal or zero
            if exp < np.uint32(0x33000000):
                out[i] = np.uint16(sign)
            else:
                e = exp >> np.uint32(23)
                s = np.uint32(0x00800000) + sig
                s = s >> (np.uint32(113) - e)
                # round half to even: add one at the first dropped bit unless exactly halfway to
                # an even significand (the bits shifted out of ``s`` are checked in ``x``)
                if (s & np.uint32(0x3FFF)) != np.uint32(0x1000) or (x & np.uint32(0x7FF)) != 0:
                    s += np.uint32(0x1000)
                out[i] = np.uint16(sign + (s >> np.uint32(13)))
        else:
            h_exp = (exp - np.uint32(0x38000000)) >> np.uint32(13)
            s = sig
            if (s & np.uint32(0x3FFF)) != np.uint32(0x1000):
                s += np.uint32(0x1000)
            h = h_exp + (s >> np.uint32(13))  # a carry out of the significand bumps the exponent
            if h >= np.uint32(0x7C00):
                overflow += 1
            out[i] = np.uint16(sign + h)
    return overflow


@njit(**_JIT)
def _from_half_bits(h: np.ndarray, out: np.ndarray) -> None:
    # h: (N,) uint16 half bits; out: (N,) uint32 bits of float32
    for i in range(h.shape[0]):
        x = np.uint32(h[i])
        sign = (x & np.uint32(0x8000)) << np.uint32(16)
        exp = (x >> np.uint32(10)) & np.uint32(0x1F)
        man = x & np.uint32(0x3FF)
        if exp == 0:
            if man == 0:
                out[i] = sign
            else:  # subnormal: normalize the significand
                e = np.uint32(113)
                while (man & np.uint32(0x400)) == 0:
                    man <<= np.uint32(1)
                    e -= np.uint32(1)
                out[i] = sign | (e << np.uint32(23)) | ((man & np.uint32(0x3FF)) << np.uint32(13))
        elif exp == 31:
            out[i] = sign | np.uint32(0x7F800000) | (man << np.uint32(13))
        else:
            out[i] = sign | ((exp + np.uint32(112)) << np.uint32(23)) | (man << np.uint32(13))


def to_half(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(x.astype(np.float16), overflowed)`` for a float32 vector ``x``: the half-precision
    copy and how many finite entries became infinite (beyond float16's range)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.size, np.uint16)
    overflow = _to_half_bits(x.view(np.uint32), out)
    return out.view(np.float16), int(overflow)


def from_half(h: np.ndarray) -> np.ndarray:
    """``h.astype(np.float32)`` for a float16 (or uint16 bits) vector ``h``: a new array."""
    h = np.ascontiguousarray(h).reshape(-1)
    out = np.empty(h.size, np.uint32)
    _from_half_bits(h.view(np.uint16), out)
    return out.view(np.float32)
