"""Differential privacy of the updates: clipping, noise, adaptive clipping and the accountant."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy import stats

from pipeline.errors import PSError
from pipeline.privacy import (
    AdaptiveClip,
    RdpAccountant,
    add_noise,
    check_privacy,
    clip_update,
    epsilon_from_rdp,
    l2_norm,
    local_epsilon,
    noise_for_epsilon,
    privatize_local,
    rdp_sampled_gaussian,
    split_noise,
)


def test_clip_update_bounds_every_norm_and_leaves_small_deltas_alone() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.1, 1.0, 10.0, 1e4):
        delta = (rng.standard_normal(1000) * scale).astype(np.float32)
        before = delta.copy()
        norm = clip_update(delta, 1.5)
        assert norm == pytest.approx(l2_norm(before))
        assert l2_norm(delta) <= 1.5
        if norm <= 1.5:
            np.testing.assert_array_equal(delta, before)  # inside the ball: untouched
        else:
            assert l2_norm(delta) == pytest.approx(1.5, rel=1e-5)  # on the ball, same direction
            np.testing.assert_allclose(delta / l2_norm(delta), before / norm, rtol=1e-4, atol=1e-7)


def test_noise_std_matches_noise_multiplier_times_clip_over_many_rounds() -> None:
    """Chi-square: the pooled sample variance of the noise over 400 rounds of 500 coordinates
    lies within the 99.9% interval of (N - 1) s^2 / sigma^2 ~ chi2(N - 1)."""
    rng = np.random.default_rng(1)
    clip, z, n, rounds = 0.7, 1.3, 500, 400
    sigma = z * clip
    samples = []
    for _ in range(rounds):
        v = np.zeros(n, np.float32)
        add_noise(v, sigma, rng)
        samples.append(v.astype(np.float64))
    x = np.concatenate(samples)
    dof = x.size - 1
    stat = dof * x.var(ddof=1) / sigma**2
    assert stats.chi2.ppf(0.0005, dof) < stat < stats.chi2.ppf(0.9995, dof)
    assert abs(x.mean()) < 4 * sigma / math.sqrt(x.size)


def test_local_privatization_clips_then_noises() -> None:
    rng = np.random.default_rng(2)
    delta = np.full(10_000, 1.0, np.float32)  # norm 100
    norm = privatize_local(delta, 2.0, 0.0, rng)
    assert norm == pytest.approx(100.0)
    assert l2_norm(delta) <= 2.0
    delta = np.zeros(10_000, np.float32)
    privatize_local(delta, 2.0, 0.5, rng)
    assert float(np.std(delta)) == pytest.approx(1.0, rel=0.05)


def test_adaptive_clip_converges_to_the_quantile_of_the_norms() -> None:
    rng = np.random.default_rng(3)
    clip = AdaptiveClip(clip=0.1, quantile=0.5)
    n = 100
    for _ in range(300):
        norms = rng.uniform(0, 10, n)
        clip.update(int((norms <= clip.clip).sum()), n, 0.0, rng)
    assert clip.clip == pytest.approx(5.0, rel=0.15)


def test_split_noise_keeps_the_total_mechanism_and_refuses_too_few_participants() -> None:
    z_delta, sigma_b = split_noise(1.0, 100)
    assert sigma_b == 5.0
    # Theorem 1 of Andrew et al.: (z_delta^-2 + (2 sigma_b)^-2)^-1/2 is the total multiplier
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(1.0)
    assert z_delta > 1.0
    with pytest.raises(PSError, match="noise_multiplier < participants / 10"):
        split_noise(1.0, 8)


# --- the accountant against dp_accounting's published values ----------------------------------


def test_rdp_of_the_poisson_sampled_gaussian_matches_dp_accounting() -> None:
    """dp_accounting's own test (rdp_privacy_accountant_test.py,
    test_compute_rdp_poisson_sampled_gaussian): 50 rounds at q = 0.01, sigma = 2.5."""
    orders = [1.5, 2.5, 5, 50, 100, np.inf]
    acc = RdpAccountant(2.5, 0.01, orders=tuple(orders))
    acc.step(50)
    want = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02, np.inf]
    np.testing.assert_allclose(acc.rdp, want, rtol=1e-4)


def test_epsilon_conversion_matches_dp_accounting() -> None:
    """dp_accounting's test_compute_epsilon_delta_pure_dp and _gaussian: a constant RDP of
    1.1 over orders 2..32 is epsilon 1.32783806176 at delta 1e-5 (order 32); the Gaussian
    mechanism with multiplier 4.530877117 is exactly (1, 1e-6)-DP."""
    eps, order = epsilon_from_rdp(list(range(2, 33)), np.full(31, 1.1), 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-9)
    assert order == 32
    orders = [0.001 * i for i in range(1000, 100000)]
    eps, _ = epsilon_from_rdp(orders, rdp_sampled_gaussian(1.0, 4.530877117, orders), 1e-6)
    assert eps == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize(
    ("q", "sigma", "order"),
    [(1e-4, 1.0, 1.5), (1e-3, 1.0, 2), (0.01, 10, 20), (0.1, 100, 20.5), (0.05, 1.1, 7.3), (0.2, 0.8, 12)],
)
def test_one_round_rdp_equals_the_integral_it_bounds(q: float, sigma: float, order: float) -> None:
    """log A_alpha from the series equals a multi-precision integration of its definition
    E_{z ~ N(0, sigma^2)} [(1 - q + q exp((2z - 1) / (2 sigma^2)))^alpha] (dp_accounting's
    test_compute_log_a_equals_mp, same tolerance)."""

    def integrand(z: mpmath.mpf) -> mpmath.mpf:
        mix = (1 - q) + q * mpmath.exp((2 * z - 1) / (2 * sigma**2))
        return mpmath.npdf(z, mu=0, sigma=sigma) * mix**order

    a = mpmath.quad(integrand, [-mpmath.inf, 0, mpmath.inf], maxdegree=8)
    want = float(mpmath.log(a)) / (order - 1)
    got = rdp_sampled_gaussian(q, sigma, [order])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    a = RdpAccountant(1.0, 0.1, 1e-5)
    eps = [a.epsilon(rounds=r) for r in (1, 10, 100)]
    assert eps == sorted(eps) and eps[0] > 0
    assert RdpAccountant(2.0, 0.1).epsilon(rounds=100) < eps[2]
    assert RdpAccountant(1.0, 0.01).epsilon(rounds=100) < eps[2]
    assert RdpAccountant(0.0, 0.1).epsilon(rounds=1) == math.inf
    # the DP-SGD MNIST setting (q = 256/60000, sigma 1.1, 60 epochs): about 2.6 at 1e-5
    mnist = RdpAccountant(1.1, 256 / 60000, 1e-5)
    assert mnist.epsilon(rounds=60 * 60000 // 256) == pytest.approx(2.6, abs=0.05)


def test_would_exceed_stops_before_the_round_that_passes_the_target() -> None:
    acc = RdpAccountant(1.2, 0.2, 1e-5)
    target = 3.0
    applied = 0
    while not acc.would_exceed(target):
        acc.step()
        applied += 1
    # brute force: the last round count within the target
    fresh = RdpAccountant(1.2, 0.2, 1e-5)
    expected = max(r for r in range(1, 400) if fresh.epsilon(rounds=r) <= target)
    assert applied == expected == acc.rounds_within(target)
    assert acc.epsilon() <= target < fresh.epsilon(rounds=applied + 1)
    # a resumed accountant continues from the rounds it is given
    assert RdpAccountant(1.2, 0.2, 1e-5, rounds=applied).epsilon() == pytest.approx(acc.epsilon())


def test_local_epsilon_is_the_gaussian_mechanism_at_twice_the_sensitivity() -> None:
    assert local_epsilon(0, 1.0, 1e-5) == 0.0
    assert local_epsilon(10, 2.0, 1e-5) == pytest.approx(RdpAccountant(1.0, 1.0, 1e-5).epsilon(rounds=10))


def test_check_privacy_fills_defaults_and_names_the_bad_setting() -> None:
    got = check_privacy({"dp": "central", "noise_multiplier": 1, "target_epsilon": 2})
    assert got["clip_norm"] == 1.0 and got["noise_multiplier"] == 1.0 and got["sampling_rate"] == 1.0
    assert check_privacy(None)["dp"] == "off"
    for bad, match in (
        ({"dp": "global"}, "unknown dp 'global'"),
        ({"clip_norm": 0}, "clip_norm = 0 is invalid"),
        ({"clip_quantile": 1.0}, "clip_quantile"),
        ({"noise_multiplier": -1}, "noise_multiplier"),
        ({"delta": 0}, "delta"),
        ({"sampling_rate": 0}, "sampling_rate"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier = nan"),
        ({"secure_aggregation": "yes"}, "secure_aggregation"),
        ({"epsilon": 1}, "unknown setting 'epsilon'"),
        ({"dp": "central", "target_epsilon": 1.0}, "target_epsilon needs"),
        ([1, 2], "expected a dict"),
    ):
        with pytest.raises(PSError, match=match):
            check_privacy(bad)


def test_noise_for_epsilon_is_the_least_noise_within_the_budget() -> None:
    z = noise_for_epsilon(3.0, 50, 0.1, 1e-5)
    assert RdpAccountant(z, 0.1, 1e-5).epsilon(rounds=50) <= 3.0 < RdpAccountant(z * 0.99, 0.1).epsilon(rounds=50)


def test_the_documented_privacy_example_trains_the_rounds_it_says() -> None:
    """docs/privacy.md's configuration is one that trains: its first round fits the budget
    (a budget the first round spends is refused), and it allows the rounds the docs state."""
    import tomllib
    from pathlib import Path

    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError
    from pipeline.train import check_budget_allows_a_round

    text = (Path(__file__).resolve().parents[2] / "docs" / "privacy.md").read_text()
    settings = tomllib.loads(text.split("```toml\n", 1)[1].split("```", 1)[0])
    cfg = TrainConfig(**settings)
    check_budget_allows_a_round(cfg)  # every participant in every round
    z, target, delta = cfg.noise_multiplier, cfg.target_epsilon, cfg.dp_delta
    assert RdpAccountant(z, 1.0, delta).rounds_within(target) == 28
    assert 2700 <= RdpAccountant(z, 0.1, delta).rounds_within(target) <= 2900  # "about 2,800"
    with pytest.raises(ConfigError, match="allows no round: one round at noise_multiplier = 1.1"):
        check_budget_allows_a_round(TrainConfig(**{**settings, "noise_multiplier": 1.1}))
