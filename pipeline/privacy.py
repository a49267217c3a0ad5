"""Differential privacy of the updates: clipping, Gaussian noise, adaptive clipping, accounting.

Everything here works on the flat float32 deltas the parameter server already moves, with
NumPy (and SciPy's special functions for the accountant); nothing needs a scheduler.

The mechanism (central DP, the parameter server adds the noise)
---------------------------------------------------------------
Each round, every participant's delta is clipped to L2 norm ``clip`` on arrival
(:func:`clip_update`), so adding or removing one participant changes the SUM of the round's
deltas by at most ``clip`` (L2 sensitivity ``clip``, add-or-remove-one-participant
adjacency: the privacy unit is a participant, i.e. a site or a simulated client, not a row).
The server adds Gaussian noise of standard deviation ``noise_multiplier x clip`` to that sum
(:func:`add_noise`). The deltas are summed with equal weights (sample counts are data and
would change the sensitivity); a mean divides the noisy sum by a FIXED denominator, the
number of participants expected per round (announced before any delta is seen), never by
the number that arrived, so the mean's sensitivity is ``clip / expected`` and its noise
``noise_multiplier x clip / expected``: the same mechanism, rescaled.

Which participants take part in a round is the amplification the accountant knows about:
``sampling_rate`` q is the share of participants sampled per round (1 when every one takes
part every round); a round sampled from fewer candidates than the whole population (sites
down or not admitted yet) is accounted at its own rate ``sampled / candidates``
(:meth:`RdpAccountant.step` with ``q``), which is higher: such a round costs more.
:class:`RdpAccountant` composes the Poisson-subsampled Gaussian mechanism in Rényi DP
(Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism") over the rounds and converts to (epsilon, delta) with the bound of
Canonne, Kamath and Steinke 2020 (Proposition 12), the same computation as
``dp_accounting.rdp.RdpAccountant`` with ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
per round (its published values are checked in the tests). Fixed-size uniform sampling of
the participants is accounted as Poisson sampling at the same rate, as DP-FedAvg
(McMahan et al. 2018) and the DP-SGD literature do.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping") moves ``clip`` each round towards the ``quantile`` of the
update norms: ``clip *= exp(-lr x (b - quantile))`` with ``b`` the noised share of updates
that needed no clipping. That share is released too: its count gets Gaussian noise of
standard deviation ``sigma_b = expected / 20`` (the paper's choice), and the updates' noise
multiplier is raised to ``z_delta = (z**-2 - (2 sigma_b)**-2) ** -0.5`` so that the two
releases together are exactly one Gaussian mechanism of multiplier ``z`` (the paper's
Theorem 1): the accountant needs no change.

Local DP (the sites do not trust the scheduler with their updates)
------------------------------------------------------------------
:func:`privatize_local` clips and noises a delta on its site before it is pushed. Each push
is then a Gaussian mechanism on its own; replacing the site's data moves the clipped delta
anywhere in the ball of radius ``clip``, so its sensitivity is ``2 x clip`` and its noise
multiplier ``z / 2``, and nothing is amplified by sampling (whoever sees the push knows the
site took part): :func:`local_epsilon`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, PSError

DP_MODES = ("off", "central", "local")

# Rényi orders the accountant minimises over (dense where the optimum lies for the noise
# levels of practice): 1.1 .. 10.9 by 0.1, 11 .. 63, and a few large ones
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

ADAPTIVE_CLIP_LR = 0.2  # the geometric step of adaptive clipping (Andrew et al. 2021)
COUNT_NOISE_FRACTION = 1 / 20  # sigma_b = expected participants x this (Andrew et al. 2021)


# --------------------------------------------------------------------------------------------
# Clipping and noise
# --------------------------------------------------------------------------------------------


def l2_norm(vec: np.ndarray) -> float:
    """The L2 norm of a float32 vector, accumulated in float64 (no overflow, no lost digits)."""
    v = np.asarray(vec)
    return float(math.sqrt(float(np.dot(v.astype(np.float64, copy=False), v.astype(np.float64, copy=False)))))


def clip_update(delta: np.ndarray, clip: float) -> float:
    """Scale ``delta`` in place so that its L2 norm is at most ``clip``; return the norm it
    had. A delta already inside the ball is left bit for bit as it was."""
    norm = l2_norm(delta)
    if norm > clip:
        # float32 rounding can leave the scaled norm a hair above clip: aim just inside
        delta *= np.float32(clip / norm * (1 - 1e-6))
    return norm


def add_noise(vec: np.ndarray, std: float, rng: np.random.Generator) -> None:
    """Add independent Gaussian noise of standard deviation ``std`` to every coordinate of
    ``vec`` (float32, in place)."""
    if std <= 0:
        return
    noise = rng.standard_normal(vec.size, dtype=np.float32)
    noise *= np.float32(std)
    vec += noise


def noise_rng(seed: int | None = None) -> np.random.Generator:
    """The generator of privacy noise: fresh OS entropy unless a ``seed`` is given (tests and
    benchmarks, which compare runs drawn with the same noise).
    Privacy noise must not be reproducible by whoever knows the run's seed."""
    return np.random.default_rng(seed)


def privatize_local(delta: np.ndarray, clip: float, noise_multiplier: float, rng: np.random.Generator) -> float:
    """Local DP on a site: clip ``delta`` to ``clip`` and add noise ``noise_multiplier x
    clip`` before it leaves (in place); return the norm it had."""
    norm = clip_update(delta, clip)
    add_noise(delta, noise_multiplier * clip, rng)
    return norm


def split_noise(noise_multiplier: float, expected: float) -> tuple[float, float]:
    """Adaptive clipping's split of one noise budget (Andrew et al. 2021, Theorem 1): the
    updates' noise multiplier ``z_delta`` and the standard deviation ``sigma_b`` of the
    noise on the count of unclipped updates, so that together they are one Gaussian
    mechanism of multiplier ``noise_multiplier``. Raises :class:`PSError` when ``expected``
    participants per round are too few to pay for the count (``z >= expected / 10``)."""
    if noise_multiplier <= 0:
        return 0.0, 0.0
    sigma_b = expected * COUNT_NOISE_FRACTION
    rest = noise_multiplier**-2 - (2 * sigma_b) ** -2
    if rest <= 0:
        raise PSError(
            f"adaptive clipping with {expected:g} participants per round cannot afford noise_multiplier = "
            f"{noise_multiplier:g} (it needs noise_multiplier < participants / 10 = {expected / 10:g}); "
            "use a fixed clip (clip_quantile = 0) or more participants per round"
        )
    return rest**-0.5, sigma_b


@dataclass
class AdaptiveClip:
    """The clip of adaptive clipping: after each round, ``update`` moves it geometrically
    towards the ``quantile`` of the update norms from the (noised) number of updates that
    were inside it."""

    clip: float
    quantile: float
    lr: float = ADAPTIVE_CLIP_LR

    def update(self, unclipped: int, expected: float, count_std: float, rng: np.random.Generator) -> float:
        """The next round's clip, from ``unclipped`` of the round's updates inside the clip,
        ``expected`` participants per round and the count's noise ``count_std``."""
        noisy = unclipped + (float(rng.normal(0.0, count_std)) if count_std > 0 else 0.0)
        share = noisy / max(expected, 1.0)
        self.clip *= math.exp(-self.lr * (share - self.quantile))
        return self.clip


# --------------------------------------------------------------------------------------------
# The accountant: Rényi DP of the Poisson-subsampled Gaussian mechanism
# --------------------------------------------------------------------------------------------


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for an integer order (Mironov et al. 2019, Section 3.2): the binomial
    expansion of E_{z ~ N(0, sigma^2)} [(1 - q + q exp((2z - 1) / (2 sigma^2)))^alpha],
    summed in log space (vectorized over the alpha + 1 terms)."""
    from scipy import special  # the accountant's only: every worker and scheduler imports this module

    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    return float(special.logsumexp(terms))


def _log_a_fractional(q: float, sigma: float, alpha: float, max_terms: int = 1000) -> float:
    """log A_alpha for a fractional order (Mironov et al. 2019, Section 3.3): the integral
    split at z0, where the mixture's two components cross, each side a convergent series,
    summed until both sides' terms fall and are 30 nats below the total (vectorized)."""
    from scipy import special

    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = np.arange(max_terms, dtype=np.float64)
    j = alpha - i
    coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    log_q, log_1mq, half = math.log(q), math.log1p(-q), math.log(0.5)
    root = math.sqrt(2) * sigma
    s0 = coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2) + half + _log_erfc_array((i - z0) / root)
    s1 = coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2) + half + _log_erfc_array((z0 - j) / root)
    total = np.logaddexp(np.logaddexp.accumulate(s0), np.logaddexp.accumulate(s1))
    falling = np.zeros(max_terms, dtype=bool)
    falling[1:] = (s0[1:] < s0[:-1]) & (s1[1:] < s1[:-1])
    done = np.flatnonzero(falling & (np.maximum(s0, s1) < total - 30))
    return float(total[done[0]]) if done.size else math.inf  # no convergence: no bound at this order


def _log_erfc_array(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)) elementwise, accurate far in the tail."""
    from scipy import special

    return math.log(2) + special.log_ndtr(-x * math.sqrt(2))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Rényi DP at ``orders`` of one round of the Gaussian mechanism with multiplier
    ``noise_multiplier`` on a Poisson sample of rate ``q`` (add-or-remove-one adjacency)."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    out = np.empty(len(orders), dtype=np.float64)
    for n, alpha in enumerate(orders):
        if q == 0:
            out[n] = 0.0
        elif math.isinf(alpha) or noise_multiplier == 0:
            out[n] = math.inf
        elif q == 1:
            out[n] = alpha / (2 * noise_multiplier**2)
        elif float(alpha).is_integer():
            out[n] = _log_a_integer(q, noise_multiplier, int(alpha)) / (alpha - 1)
        else:
            out[n] = _log_a_fractional(q, noise_multiplier, float(alpha)) / (alpha - 1)
    return out


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """The smallest epsilon over ``orders`` for ``delta`` (Canonne, Kamath and Steinke 2020,
    Proposition 12; the KL bound for tiny divergences) and the order that gives it."""
    if delta <= 0:
        return (0.0, 0.0) if np.all(np.asarray(rdp) == 0) else (math.inf, 0.0)
    best, best_order = math.inf, 0.0
    for a, r in zip(orders, rdp, strict=True):
        if r < 0:
            eps = 0.0
        elif delta**2 + math.expm1(-r) > 0:  # delta <= sqrt(1 - exp(-KL)): nothing to pay
            eps = 0.0
        elif a > 1.01 and math.isfinite(r):
            eps = r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        else:
            eps = math.inf
        if eps < best:
            best, best_order = eps, float(a)
    return max(0.0, best), best_order


@dataclass
class RdpAccountant:
    """Epsilon at ``delta`` of the rounds applied so far, each one the Gaussian mechanism of
    multiplier ``noise_multiplier`` on a Poisson sample of the participants at rate
    ``sampling_rate`` (the Rényi divergences add up over rounds)."""

    noise_multiplier: float
    sampling_rate: float = 1.0
    delta: float = 1e-5
    orders: tuple[float, ...] = DEFAULT_ORDERS
    rounds: int = 0
    rdp: np.ndarray = field(init=False)
    _per_round: dict[float, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rdp = np.zeros(len(self.orders), dtype=np.float64)
        rounds, self.rounds = self.rounds, 0
        self.round_rdp()  # computed once, before the first round needs it
        if rounds:
            self.step(rounds)

    def round_rdp(self, q: float | None = None) -> np.ndarray:
        """The Rényi divergences of one round at sampling rate ``q`` (default: the accountant's)."""
        q = self.sampling_rate if q is None else float(q)
        got = self._per_round.get(q)
        if got is None:
            got = self._per_round[q] = rdp_sampled_gaussian(q, self.noise_multiplier, self.orders)
        return got

    def step(self, count: int = 1, q: float | None = None) -> None:
        """Account ``count`` more rounds (at sampling rate ``q``)."""
        self.rdp = self.rdp + count * self.round_rdp(q)
        self.rounds += int(count)

    def epsilon(self, rounds: int | None = None, delta: float | None = None) -> float:
        """Epsilon at ``delta`` after the rounds so far (or after ``rounds`` rounds at the
        accountant's own sampling rate)."""
        rdp = self.rdp if rounds is None else rounds * self.round_rdp()
        return epsilon_from_rdp(self.orders, rdp, self.delta if delta is None else delta)[0]

    def would_exceed(self, target_epsilon: float, q: float | None = None) -> bool:
        """Whether one more round would take epsilon above ``target_epsilon`` (0: no budget)."""
        if target_epsilon <= 0:
            return False
        after = self.rdp + self.round_rdp(q)
        return epsilon_from_rdp(self.orders, after, self.delta)[0] > target_epsilon

    def rounds_within(self, target_epsilon: float, limit: int = 1 << 20) -> int:
        """The most rounds (at the accountant's sampling rate, from none) whose epsilon stays
        within ``target_epsilon`` (``limit`` if that many do)."""
        lo, hi = 0, limit
        if self.epsilon(rounds=hi) <= target_epsilon:
            return hi
        while hi - lo > 1:  # epsilon grows with rounds: the last round within the budget
            mid = (lo + hi) // 2
            if self.epsilon(rounds=mid) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo


def noise_for_epsilon(target_epsilon: float, rounds: int, sampling_rate: float, delta: float = 1e-5) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` rounds at ``sampling_rate``
    stay within ``target_epsilon`` at ``delta``: how to choose ``noise_multiplier`` for a
    budget."""
    if target_epsilon <= 0 or rounds < 1:
        raise ValueError(f"need target_epsilon > 0 and rounds >= 1, got {target_epsilon}, {rounds}")
    # checked here: out of range, the accountant's epsilon is 0 for any noise (delta >= 1, no
    # sampling) or infinite (delta 0), and the search would answer a meaningless multiplier
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1] (sampled / available participants), got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (e.g. 1e-5), got {delta}")

    def eps(z: float) -> float:
        return RdpAccountant(z, sampling_rate, delta).epsilon(rounds=rounds)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon}")
    while hi - lo > 1e-3 * hi:  # epsilon falls as the noise grows
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def resumed_privacy(
    spent: Mapping[str, Any] | None, dp: str, noise_multiplier: float, sampling_rate: float, released: int = 0
) -> dict[str, Any] | None:
    """The privacy a checkpoint ``spent`` (the job's :meth:`privacy_metrics`), as the accountant
    of a run resumed with ``dp``, ``noise_multiplier`` and base ``sampling_rate`` must go on
    from it.

    The accountant composes ``rounds`` at one noise multiplier and one base sampling rate (plus
    ``rates``: rounds at other rates). A resume at another sampling rate (``fraction_fit``)
    keeps the checkpoint's rounds at their old base rate in ``rates``, so they are not accounted
    again at the new one. A resume at another ``noise_multiplier`` or ``dp`` would account the
    rounds already released under the old noise as if made with the new, and report an epsilon
    below the one spent: :class:`ConfigError`. So is a resume with DP of a checkpoint whose
    ``released`` rounds (its server's version) were made without it: no epsilon bounds what
    those released, and counting from 0 would claim one."""
    if dp != "off" and released > 0 and (not spent or spent.get("dp", "off") == "off"):
        raise ConfigError(
            f"config key 'dp' = {dp!r} cannot resume this run: the checkpoint's {released} round(s) were released "
            "without differential privacy, which no epsilon bounds; start a new run with dp (--force, or "
            "another --out)"
        )
    if not spent or not int(spent.get("rounds", 0)) or spent.get("dp", "off") == "off":
        return dict(spent) if spent else spent
    rounds = int(spent["rounds"])
    before = f"the checkpoint's {rounds} round(s) were released under dp = {spent['dp']!r}"
    if dp != spent["dp"]:
        raise ConfigError(
            f"config key 'dp' = {dp!r} cannot resume this run: {before} (epsilon = {spent['epsilon']:.4g}); "
            f"resume with dp = {spent['dp']!r}, or start a new run (--force)"
        )
    old_z = float(spent.get("noise_multiplier", noise_multiplier))
    if not math.isclose(noise_multiplier, old_z, rel_tol=1e-9):
        raise ConfigError(
            f"config key 'noise_multiplier' = {noise_multiplier:g} cannot resume this run: {before} at "
            f"noise_multiplier = {old_z:g} (epsilon = {spent['epsilon']:.4g}), which the accountant would count "
            f"as if made at {noise_multiplier:g}; resume with noise_multiplier = {old_z:g}, or start a new run "
            "(--force)"
        )
    old_q = float(spent.get("sampling_rate", sampling_rate))
    if dp != "central" or math.isclose(old_q, sampling_rate, rel_tol=1e-12):
        return dict(spent)
    rates: dict[float, int] = {}
    for q, n in spent.get("rates") or []:
        rates[float(q)] = rates.get(float(q), 0) + int(n)
    base = rounds - sum(rates.values())  # the rounds accounted at the checkpoint's base rate
    if base > 0:
        rates[old_q] = rates.get(old_q, 0) + base
    rates.pop(sampling_rate, None)  # rounds at the new base rate need no entry
    return {**spent, "sampling_rate": sampling_rate, "rates": [[q, n] for q, n in sorted(rates.items())]}


def local_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon at ``delta`` of one site's ``rounds`` locally privatized pushes (each a
    Gaussian mechanism of sensitivity ``2 x clip``: multiplier ``noise_multiplier / 2``, no
    amplification)."""
    if rounds <= 0:
        return 0.0
    acc = RdpAccountant(noise_multiplier / 2, 1.0, delta)
    return acc.epsilon(rounds=rounds)


# --------------------------------------------------------------------------------------------
# The parameter server's privacy settings
# --------------------------------------------------------------------------------------------

PRIVACY_KEYS = (
    "dp",
    "clip_norm",
    "clip_quantile",
    "noise_multiplier",
    "delta",
    "target_epsilon",
    "sampling_rate",
    "expected",
    "secure_aggregation",
    "rounds",
    "rates",
    "clip",
    "seed",
)


def _check_rates(rates: Any, rounds: int) -> list[list]:
    """``rates`` of :func:`check_privacy`: ``[[q, n], ...]`` with q in (0, 1], n >= 1 and the
    n summing to at most ``rounds``."""
    want = f"privacy: rates must be [[sampling rate in (0, 1], rounds >= 1], ...] within rounds = {rounds}"
    if not isinstance(rates, list | tuple):
        raise PSError(f"{want}, got {rates!r}")
    out: list[list] = []
    for pair in rates:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise PSError(f"{want}, got {rates!r}")
        q, n = pair
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
            raise PSError(f"{want}, got {rates!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PSError(f"{want}, got {rates!r}")
        out.append([float(q), int(n)])
    if sum(n for _, n in out) > rounds:
        raise PSError(f"{want}, got {rates!r}")
    return out


def check_privacy(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's privacy settings from ``Job.create(privacy=...)``, every one checked, with
    defaults; :class:`PSError` names the first that is wrong.

    ``dp``: off | central | local; ``clip_norm`` > 0; ``clip_quantile`` in [0, 1) (0: a
    fixed clip); ``noise_multiplier`` >= 0; ``delta`` in (0, 1); ``target_epsilon`` >= 0
    (0: no budget); ``sampling_rate`` in (0, 1]; ``expected`` >= 0 participants per round
    (0: the round's announced participants); ``secure_aggregation`` bool; ``rounds``
    accounted before (a resumed run), ``rates`` (``[[q, n], ...]``: how many of those rounds
    were accounted at a rate ``q`` other than ``sampling_rate``; the rest were at it) and
    ``clip`` (adaptive clipping's clip then); ``seed``: the noise generator's seed (tests
    and benchmarks only: a real run's noise must not be reproducible; None = OS entropy)."""
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise PSError(f"privacy: expected a dict of settings, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(PRIVACY_KEYS))
    if unknown:
        raise PSError(f"privacy: unknown setting {unknown[0]!r}; known: {', '.join(PRIVACY_KEYS)}")
    out: dict[str, Any] = {
        "dp": spec.get("dp", "off"),
        "clip_norm": spec.get("clip_norm", 1.0),
        "clip_quantile": spec.get("clip_quantile", 0.0),
        "noise_multiplier": spec.get("noise_multiplier", 0.0),
        "delta": spec.get("delta", 1e-5),
        "target_epsilon": spec.get("target_epsilon", 0.0),
        "sampling_rate": spec.get("sampling_rate", 1.0),
        "expected": spec.get("expected", 0),
        "secure_aggregation": spec.get("secure_aggregation", False),
        "rounds": spec.get("rounds", 0),
        "rates": spec.get("rates") or [],
        "clip": spec.get("clip"),
        "seed": spec.get("seed"),
    }
    if out["dp"] not in DP_MODES:
        raise PSError(f"privacy: unknown dp {out['dp']!r}; use one of {', '.join(DP_MODES)}")

    def number(key: str, ok: Any, want: str) -> None:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
            raise PSError(f"privacy: {key} = {v!r} is invalid: must be {want}")
        out[key] = float(v)

    number("clip_norm", lambda v: v > 0, "> 0")
    number("clip_quantile", lambda v: 0 <= v < 1, "in [0, 1) (0 = a fixed clip)")
    number("noise_multiplier", lambda v: v >= 0, ">= 0")
    number("delta", lambda v: 0 < v < 1, "in (0, 1)")
    number("target_epsilon", lambda v: v >= 0, ">= 0 (0 = no budget)")
    number("sampling_rate", lambda v: 0 < v <= 1, "in (0, 1]")
    number("expected", lambda v: v >= 0, ">= 0 (0 = the round's announced participants)")
    if not isinstance(out["secure_aggregation"], bool):
        raise PSError(f"privacy: secure_aggregation must be true or false, got {out['secure_aggregation']!r}")
    if isinstance(out["rounds"], bool) or not isinstance(out["rounds"], int) or out["rounds"] < 0:
        raise PSError(f"privacy: rounds must be an int >= 0, got {out['rounds']!r}")
    out["rates"] = _check_rates(out["rates"], out["rounds"])
    if out["clip"] is not None:
        number("clip", lambda v: v > 0, "> 0")
    if out["seed"] is not None and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise PSError(f"privacy: seed must be an int or None, got {out['seed']!r}")
    if out["target_epsilon"] > 0 and (out["dp"] == "off" or out["noise_multiplier"] == 0):
        raise PSError(
            "privacy: target_epsilon needs dp = 'central' or 'local' with noise_multiplier > 0 "
            "(without noise epsilon is infinite)"
        )
    return out
