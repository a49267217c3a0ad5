"""Differential privacy in a training run on a real LocalCluster: epsilon in every epoch's
record, in history.json and on the job's snapshot, and the budget that stops the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.privacy import RdpAccountant
from pipeline.train import train

SMALL = {"hidden": [32], "mode": "sync", "patience": 0, "batch_size": 256, "local_steps": 8, "ema": 0.0}


def test_central_dp_reports_epsilon_each_epoch_and_stops_at_target_epsilon(letter_stores, client, tmp_path) -> None:
    z, target, delta = 5.0, 3.0, 1e-5
    allowed = RdpAccountant(z, 1.0, delta).rounds_within(target)  # every share takes part in every round
    cfg = TrainConfig(
        **SMALL,
        epochs=20,
        dp="central",
        clip_norm=1.0,
        noise_multiplier=z,
        dp_delta=delta,
        target_epsilon=target,
    )
    logs: list[str] = []
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client, log=logs.append)
    hist = res.history
    assert 1 < len(hist) < cfg.epochs  # stopped by the budget, not by the epoch count
    eps = [h["epsilon"] for h in hist]
    assert eps == sorted(eps) and eps[0] > 0
    for h in hist:  # each epoch's epsilon is the accountant's for the rounds applied so far
        assert h["epsilon"] == pytest.approx(RdpAccountant(z, 1.0, delta).epsilon(rounds=h["dp_rounds"]))
        assert h["epsilon"] <= target
    assert hist[-1]["dp_rounds"] == allowed == hist[-1]["rounds"]  # no round applied past the budget
    assert res.privacy["exhausted"] and res.privacy["epsilon"] == pytest.approx(eps[-1])
    assert any(line.startswith(f"privacy budget: stopping after {allowed} rounds") for line in logs)
    doc = json.loads((tmp_path / "run" / "history.json").read_text())
    assert doc["privacy"]["epsilon"] == pytest.approx(eps[-1]) and doc["privacy"]["dp"] == "central"
    assert [e["epsilon"] for e in doc["epochs"]] == eps
    assert np.isfinite(res.model.params).all()


def test_local_dp_trains_with_noised_pushes_and_reports_the_sites_epsilon(letter_stores, client, tmp_path) -> None:
    cfg = TrainConfig(**SMALL, epochs=1, dp="local", clip_norm=1.0, noise_multiplier=1.0)
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    rec = res.history[-1]
    assert rec["dp_rounds"] == rec["rounds"] > 0
    # each push is a Gaussian mechanism of sensitivity 2 x clip: multiplier z / 2, no sampling
    assert rec["epsilon"] == pytest.approx(RdpAccountant(0.5, 1.0, 1e-5).epsilon(rounds=rec["rounds"]))


def test_dp_refuses_in_process_training(letter_stores, tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs the parameter server of a Dask cluster"):
        train(letter_stores[0], TrainConfig(**SMALL, dp="central"), tmp_path / "run", client=None)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_goes_on_spending_from_its_checkpoint(letter_stores, client, tmp_path) -> None:
    cfg = {**SMALL, "dp": "central", "noise_multiplier": 2.0, "clip_quantile": 0.5, "clip_norm": 0.1}
    out = tmp_path / "run"
    # two shares per round cannot pay for adaptive clipping's noisy count at z = 2: refused
    with pytest.raises(Exception, match="cannot afford noise_multiplier"):
        train(letter_stores[0], TrainConfig(**cfg, epochs=1), tmp_path / "refused", client=client)
    cfg["noise_multiplier"] = 0.1
    first = train(letter_stores[0], TrainConfig(**cfg, epochs=1), out, client=client)
    spent = first.history[-1]
    resumed = train(letter_stores[0], TrainConfig(**cfg, epochs=2), out, client=client, resume=True)
    rec = resumed.history[-1]
    assert rec["dp_rounds"] == rec["rounds"] > spent["dp_rounds"]  # counted from the checkpoint's rounds
    assert rec["epsilon"] == pytest.approx(RdpAccountant(0.1, 1.0, 1e-5).epsilon(rounds=rec["dp_rounds"]))
    assert resumed.privacy["clip"] != 0.1  # adaptive clipping moved the clip, and resumed from it
