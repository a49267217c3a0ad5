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
    with pytest.raises(ConfigError, match="cannot afford noise_multiplier = 2"):
        train(letter_stores[0], TrainConfig(**cfg, epochs=1), tmp_path / "refused", client=client)
    cfg["noise_multiplier"] = 0.1
    first = train(letter_stores[0], TrainConfig(**cfg, epochs=1), out, client=client)
    spent = first.history[-1]
    resumed = train(letter_stores[0], TrainConfig(**cfg, epochs=2), out, client=client, resume=True)
    rec = resumed.history[-1]
    assert rec["dp_rounds"] == rec["rounds"] > spent["dp_rounds"]  # counted from the checkpoint's rounds
    assert rec["epsilon"] == pytest.approx(RdpAccountant(0.1, 1.0, 1e-5).epsilon(rounds=rec["dp_rounds"]))
    assert resumed.privacy["clip"] != 0.1  # adaptive clipping moved the clip, and resumed from it
    # the checkpoint's rounds were released at z = 0.1: a resume at z = 10 would account them as
    # if made at 10 and report less privacy spent than it was; refused, the run left as it was
    config, checkpoint = (out / "config.toml").read_bytes(), (out / "checkpoint.npz").read_bytes()
    louder = {**cfg, "noise_multiplier": 10.0, "clip_quantile": 0.0}
    with pytest.raises(
        ConfigError, match=r"'noise_multiplier' = 10 cannot resume this run: .* at noise_multiplier = 0.1"
    ):
        train(letter_stores[0], TrainConfig(**louder, epochs=3), out, client=client, resume=True)
    assert (out / "config.toml").read_bytes() == config and (out / "checkpoint.npz").read_bytes() == checkpoint


def test_secure_aggregation_trains_as_clipped_plain_aggregation_does(letter_stores, client, tmp_path) -> None:
    """The masked, quantized sum equals the plain sum of the clipped deltas up to the
    fixed-point rounding: a sync run with secure aggregation ends at the weights of the same
    run whose server clips in the clear (central DP without noise)."""
    base = {**SMALL, "epochs": 1, "clip_norm": 0.5}
    secure = train(letter_stores[0], TrainConfig(**base, secure_aggregation=True), tmp_path / "secure", client=client)
    clear = train(letter_stores[0], TrainConfig(**base, dp="central"), tmp_path / "clear", client=client)
    assert secure.history[-1]["rounds"] == clear.history[-1]["rounds"] > 0
    np.testing.assert_allclose(secure.model.params, clear.model.params, atol=1e-4)
    doc = json.loads((tmp_path / "secure" / "history.json").read_text())
    assert doc["privacy"]["secure_aggregation"] is True


def _kill_a_worker_mid_epoch(client, stop, killed) -> None:
    """SIGKILL the worker running a training task of the second epoch, once."""
    import os
    import signal
    import time

    pids = client.run(os.getpid)
    while not stop.is_set():
        for worker, keys in client.processing().items():
            if any(str(k).startswith("train-chunk-e1-") for k in keys):
                time.sleep(0.3)  # inside the epoch's rounds, not at its start
                os.kill(pids[worker], signal.SIGKILL)
                killed.append(worker)
                return
        time.sleep(0.005)


@pytest.mark.timeout(240)
def test_secure_aggregation_survives_a_worker_killed_mid_epoch(letter_stores, tmp_path) -> None:
    import threading

    from pipeline.connect import cluster_client

    cfg = TrainConfig(**{**SMALL, "batch_size": 64}, epochs=3, secure_aggregation=True, clip_norm=0.5)
    stop, killed = threading.Event(), []
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as client:
        killer = threading.Thread(target=_kill_a_worker_mid_epoch, args=(client, stop, killed), daemon=True)
        killer.start()
        try:
            res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
        finally:
            stop.set()
            killer.join()
    assert killed, "no worker was killed: the test did not exercise worker loss"
    assert len(res.history) == 3 and np.isfinite(res.model.params).all()
    assert res.history[-1]["val_accuracy"] > res.history[0]["val_accuracy"] - 0.05  # still learning, not corrupted


def test_secure_aggregation_with_one_share_per_round_is_refused(letter_stores, client, tmp_path) -> None:
    """One sync share would push its delta with no peer to mask it: refused before training."""
    cfg = TrainConfig(**SMALL, epochs=1, secure_aggregation=True, min_share_gflop=1e9)  # one share
    with pytest.raises(ConfigError, match="needs at least 2 participants per round"):
        train(letter_stores[0], cfg, tmp_path / "run", client=client)


def test_a_run_trained_without_dp_is_not_resumed_with_it(letter_stores, client, tmp_path) -> None:
    """The rounds a checkpoint released without noise are bounded by no epsilon: a resume that
    turns DP on would count from 0 and claim one. Refused before its config is saved."""
    out = tmp_path / "run"
    train(letter_stores[0], TrainConfig(**SMALL, epochs=1), out, client=client)
    config = (out / "config.toml").read_bytes()
    private = TrainConfig(**SMALL, epochs=2, dp="central", noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ConfigError, match=r"'dp' = 'central' cannot resume this run: .* released without differential"):
        train(letter_stores[0], private, out, client=client, resume=True)
    assert (out / "config.toml").read_bytes() == config
