"""A federated study over real sites of unequal sizes (a LocalCluster of one worker per site,
each declaring its site's resource): secure aggregation makes the same aggregate as a plain
round, up to its fixed-point rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.privacy import RdpAccountant, noise_for_epsilon
from pipeline.train import train
from tests.pipeline.helpers import letter_sites

FAST = {"hidden": [16], "lr": 3e-3, "ema": 0.0, "batch_size": 128, "patience": 0, "seed": 7}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """letter's rows over three sites of very different sizes; the sites file naming their stores."""
    return letter_sites(tmp_path_factory.mktemp("fedstudy"), [0, 600, 4600, 5400])


@pytest.fixture(scope="module")
def site_client():
    from pipeline.connect import cluster_client

    with cluster_client(sites=["a", "b", "c"], dashboard_address=":0") as c:
        yield c


def test_secure_aggregation_makes_the_sample_weighted_mean_of_a_plain_round(sites, site_client, tmp_path) -> None:
    # a clip no delta reaches: the masked sum differs from the plain one only by its rounding
    plain = train(None, TrainConfig(**FAST, sites=str(sites), rounds=1), tmp_path / "plain", client=site_client)
    cfg = TrainConfig(**FAST, sites=str(sites), rounds=1, secure_aggregation=True, clip_norm=100.0)
    secure = train(None, cfg, tmp_path / "secure", client=site_client)
    assert [h["samples"] for h in plain.history] == [h["samples"] for h in secure.history]
    assert len(secure.history[0]["responded"]) == 3
    start = plain.history[0]  # the same start and the same local training: only the combination differs
    assert start["applied"] and secure.history[0]["applied"]
    rounding = 3 * 100.0 / 2**31  # n x clip / 2**32 per coordinate, twice over for safety
    np.testing.assert_allclose(secure.model.params, plain.model.params, rtol=0, atol=rounding + 1e-6)


@pytest.mark.parametrize(
    ("sampling_rate", "delta", "named"),
    [(0.1, 1e5, "delta"), (0.1, 0.0, "delta"), (0.1, 1.0, "delta"), (0.0, 1e-5, "sampling_rate")],
)
def test_noise_for_epsilon_refuses_a_delta_or_sampling_rate_out_of_range(
    sampling_rate: float, delta: float, named: str
) -> None:
    # 1e5 for 1e-5: every noise would look private at delta >= 1; the answer must not be a number
    with pytest.raises(ValueError, match=f"^{named} must be in"):
        noise_for_epsilon(3.0, 100, sampling_rate, delta)
    z = noise_for_epsilon(3.0, 100, 0.1, 1e-5)  # in range: the noise keeps the budget
    assert RdpAccountant(z, 0.1, 1e-5).epsilon(rounds=100) <= 3.0


def test_a_resume_at_another_fraction_fit_accounts_the_checkpoint_rounds_at_their_rate(
    sites, site_client, tmp_path
) -> None:
    z = 2.0
    dp = {"dp": "central", "clip_norm": 1.0, "noise_multiplier": z}
    out = tmp_path / "run"
    train(
        None,
        TrainConfig(**FAST, **dp, sites=str(sites), rounds=2, fraction_fit=0.6, min_clients=2),
        out,
        client=site_client,
    )  # 2 of 3 sites a round: q = 2/3
    res = train(
        None,
        TrainConfig(**FAST, **dp, sites=str(sites), rounds=3, fraction_fit=1.0),
        out,
        client=site_client,
        resume=True,
    )  # every site: q = 1
    spent = RdpAccountant(z, 2 / 3, 1e-5)
    spent.step(2)
    spent.step(1, q=1.0)
    assert res.history[-1]["dp_rounds"] == 3
    assert res.history[-1]["epsilon"] == pytest.approx(spent.epsilon(), rel=1e-9)
    assert res.privacy["epsilon"] == pytest.approx(spent.epsilon(), rel=1e-9)


def test_a_resume_at_another_noise_multiplier_is_refused_before_the_config_changes(
    sites, site_client, tmp_path
) -> None:
    from pipeline.errors import ConfigError

    dp = {"dp": "central", "clip_norm": 1.0}
    out = tmp_path / "run"
    train(None, TrainConfig(**FAST, **dp, noise_multiplier=2.0, sites=str(sites), rounds=1), out, client=site_client)
    saved = (out / "config.toml").read_text()
    louder = TrainConfig(**FAST, **dp, noise_multiplier=20.0, sites=str(sites), rounds=2)
    with pytest.raises(ConfigError, match="'noise_multiplier' = 20 cannot resume this run: .* noise_multiplier = 2 "):
        train(None, louder, out, client=site_client, resume=True)
    assert (out / "config.toml").read_text() == saved  # a resume as before still starts from the same settings
