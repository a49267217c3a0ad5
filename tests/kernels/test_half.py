"""kernels.half against NumPy's float16 conversion, bit for bit."""

from __future__ import annotations

import numpy as np

from kernels.half import from_half, to_half


def _every_half() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def test_every_half_widens_like_numpy():
    h = _every_half()
    got, want = from_half(h), h.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all() and nan.sum() == 2 * 1023


def _edges() -> np.ndarray:
    """Every finite half as float32, the midpoints between neighbours (ties: round to even),
    one float32 step either side of each midpoint, the subnormal and overflow boundaries."""
    h = _every_half()
    f = h.astype(np.float32)
    f = np.sort(f[np.isfinite(f)].astype(np.float64))
    mids = (f[1:] + f[:-1]) / 2  # exact in float64; representable in float32 here
    mids = mids.astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    bounds = np.array(
        [65504, 65519.99, 65520, 65535, 65536, 1e6, 3e38, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-26, 1e-30, 0.0],
        np.float32,
    )
    out = np.concatenate([f.astype(np.float32), mids, near, bounds])
    return np.concatenate([out, -out])


def test_float32_narrows_like_numpy_with_ties_to_even():
    x = _edges()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got, overflow = to_half(x)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert overflow == int(np.isinf(want).sum()) > 0


def test_random_vectors_and_specials():
    rng = np.random.default_rng(0)
    for scale in (1e-8, 1e-5, 1e-3, 1.0, 1e3, 1e5):
        x = (rng.standard_normal(100_003) * scale).astype(np.float32)
        with np.errstate(over="ignore"):
            want = x.astype(np.float16)
        got, overflow = to_half(x)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), scale
        assert overflow == int(np.isinf(want).sum())
        assert np.array_equal(from_half(got).view(np.uint32), want.astype(np.float32).view(np.uint32))
    special = np.array([np.inf, -np.inf, np.nan, -0.0], np.float32)
    got, overflow = to_half(special)
    assert overflow == 0  # infinite already: not an overflow
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2]) and got[3].view(np.uint16) == 0x8000


def test_the_kernels_release_the_gil():
    from kernels.half import _from_half_bits, _to_half_bits

    for fn in (_to_half_bits, _from_half_bits):
        assert fn.targetoptions.get("nogil") is True
