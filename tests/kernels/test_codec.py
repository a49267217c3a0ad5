"""kernels.codec against the NumPy expressions it replaces: bf16 bit for bit, top-k entry for entry."""

import numpy as np
import pytest

from kernels.codec import bf16_decode, bf16_encode, bf16_encode_reference, topk, topk_reference


def test_every_bf16_widens_like_the_shift():
    top = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = bf16_decode(top)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), top.astype(np.uint32) << np.uint32(16))


@pytest.mark.parametrize("scale", [1e-40, 1e-20, 1e-3, 1.0, 1e20, 1e37])
def test_bf16_narrows_like_numpy(scale):
    rng = np.random.default_rng(int(np.log10(scale) + 50))
    x = (rng.standard_normal(100_003) * scale).astype(np.float32)
    assert np.array_equal(bf16_encode(x), bf16_encode_reference(x))


def test_bf16_ties_overflow_and_specials_narrow_like_numpy():
    # every bf16 value's bit pattern with each of the low halves that decide the rounding:
    # below, at and above the midpoint (ties to even), and the largest (carries into the exponent)
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    x = (high[:, None] | lows[None, :]).reshape(-1).view(np.float32)
    got, want = bf16_encode(x), bf16_encode_reference(x)
    assert np.array_equal(got, want)
    # float32's largest finite value rounds up to infinity, as the NumPy expression does
    assert bf16_encode(np.array([np.finfo(np.float32).max], np.float32))[0] == 0x7F80
    assert np.array_equal(bf16_decode(bf16_encode(np.array([np.inf, -np.inf], np.float32))), [np.inf, -np.inf])


@pytest.mark.parametrize("n", [1, 2, 7, 4096, 100_003])
@pytest.mark.parametrize("fraction", [1e-3, 0.01, 0.1, 0.5, 1.0])
def test_topk_picks_numpys_entries_without_ties(n, fraction):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    x = x[np.unique(np.abs(x), return_index=True)[1]]  # distinct magnitudes: no ties at the cut
    rng.shuffle(x)
    k = min(x.size, max(1, int(np.ceil(fraction * x.size))))
    index, values = topk(x, k)
    assert index.dtype == np.int32 and values.dtype == np.float32
    assert np.array_equal(index, topk_reference(x, k)[0])
    assert np.array_equal(values.view(np.uint32), x[index].view(np.uint32))


def test_topk_over_magnitudes_sharing_their_leading_bits():
    # entries that differ only in their last bits: the selection is settled by the second and
    # third digits of the radix select
    rng = np.random.default_rng(3)
    bits = np.uint32(0x3C000000) + rng.permutation(50_000).astype(np.uint32)
    x = bits.view(np.float32) * np.where(rng.random(50_000) < 0.5, -1, 1).astype(np.float32)
    for k in (1, 17, 499, 25_000, 50_000):
        assert np.array_equal(topk(x, k)[0], topk_reference(x, k)[0])


def test_ties_at_the_cut_go_to_the_lowest_indices():
    x = np.array([0.5, -2.0, 2.0, 0.0, -0.5, 2.0, 1.0, 0.0], np.float32)
    assert topk(x, 2)[0].tolist() == [1, 2]  # three entries of magnitude 2: the first two
    assert topk(x, 4)[0].tolist() == [1, 2, 5, 6]
    assert topk(x, 5)[0].tolist() == [0, 1, 2, 5, 6]  # 0.5 and -0.5 tie: the lower index
    index, values = topk(x, 7)
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6] and values.tolist() == x[:7].tolist()
    # mostly zeros (inactive units): the zeros taken are the first ones, and decode the same
    z = np.zeros(1000, np.float32)
    z[[10, 500, 900]] = [3.0, -1.0, 2.0]
    index, values = topk(z, 10)
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 500, 900]
    dense = np.zeros_like(z)
    dense[index] = values
    want = np.zeros_like(z)
    want[topk_reference(z, 10)[0]] = z[topk_reference(z, 10)[0]]
    assert np.array_equal(dense, want)


def test_topk_of_non_finite_entries_takes_them_first():
    x = np.array([1.0, np.nan, -np.inf, 2.0, 0.5], np.float32)
    index, values = topk(x, 2)
    assert index.tolist() == [1, 2] and np.isnan(values[0]) and values[1] == -np.inf


def test_topk_refuses_a_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        topk(np.ones(4, np.float32), 0)
    with pytest.raises(ValueError, match="k must be in"):
        topk(np.ones(4, np.float32), 5)


def test_the_kernels_release_the_gil():
    from kernels.codec import _bf16_bits, _bf16_widen, _topk_select, _weighted_sum

    for fn in (_bf16_bits, _bf16_widen, _topk_select, _weighted_sum):
        assert fn.targetoptions.get("nogil") is True


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_weighted_sum_is_numpy_s_multiply_and_add_bit_for_bit(k):
    from kernels.codec import weighted_sum, weighted_sum_reference

    rng = np.random.default_rng(k)
    deltas = [(rng.standard_normal(10_001) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for _ in range(k)]
    samples = rng.integers(1, 300, k)
    shares = np.array([n / samples.sum() for n in samples], np.float32)
    want = weighted_sum_reference(deltas, shares)
    np.testing.assert_array_equal(weighted_sum(deltas, shares), want)
    out = np.full(10_001, np.nan, np.float32)
    assert weighted_sum(tuple(deltas), shares, out) is out
    np.testing.assert_array_equal(out, want)


def test_weighted_sum_refuses_mismatched_inputs():
    from kernels.codec import weighted_sum

    with pytest.raises(ValueError, match="k >= 1 vectors of one length and k shares"):
        weighted_sum([np.ones(3, np.float32), np.ones(4, np.float32)], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="k >= 1 vectors of one length and k shares, got 1 and 2"):
        weighted_sum([np.ones(3, np.float32)], np.ones(2, np.float32))


def _vectors(rng: np.random.Generator, k: int, n: int = 10_001) -> list[np.ndarray]:
    return [(rng.standard_normal(n) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for _ in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 16])
def test_weighted_mean_into_is_the_server_s_former_numpy_mean_bit_for_bit(k):
    from kernels.codec import weighted_mean_into, weighted_sum_reference

    rng = np.random.default_rng(10 + k)
    deltas = _vectors(rng, k)
    samples = rng.integers(1, 300, k)
    shares = np.array([n / samples.sum() for n in samples], np.float32)
    want = weighted_sum_reference(deltas, shares)
    out = np.full(10_001, np.nan, np.float32)
    assert weighted_mean_into(deltas, shares, out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="k >= 1 vectors and k shares, got 2 and 1"):
        weighted_mean_into(deltas[:1] * 2, shares[:1], out)
    with pytest.raises(ValueError, match=r"every delta must have out's shape \(10001,\), got \[\(7,\)"):
        weighted_mean_into([np.ones(7, np.float32)], shares[:1], out)


@pytest.mark.parametrize("average, keep", [(False, None), (True, None), (True, 0.0989)])
def test_sgd_step_is_the_server_s_former_numpy_step_bit_for_bit(average, keep):
    from kernels.codec import sgd_step, sgd_step_reference

    rng = np.random.default_rng(3)
    params, grad, avg = _vectors(rng, 3)
    for lr in (1.0, 0.37):
        p1, p2 = params.copy(), params.copy()
        a1, a2 = (avg.copy(), avg.copy()) if average else (None, None)
        sgd_step(p1, grad, lr, a1, keep)
        sgd_step_reference(p2, grad, lr, a2, keep)
        np.testing.assert_array_equal(p1, p2)
        assert not np.array_equal(p1, params)  # a step was taken
        if average:
            np.testing.assert_array_equal(a1, a2)
            assert not np.array_equal(a1, avg)


def test_the_server_s_loops_release_the_gil():
    from kernels.codec import _scaled_add, _sgd_step

    for fn in (_scaled_add, _sgd_step):
        assert fn.targetoptions.get("nogil") is True
