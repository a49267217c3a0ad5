"""Keys only a federated run acts on, in a run that is not federated: refused, never ignored;
and the server optimizers a plain run may take (fedadam, adagrad, yogi) get their ``server_tau``."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import FEDERATED_KEYS, TrainConfig
from pipeline.errors import ConfigError
from pipeline.train import train

BASE = ["epochs=1", "hidden=[8]", "validation=0", "patience=0"]


@pytest.mark.parametrize("setting", ["aggregator=median", "strategy=fedavgm", "proximal_mu=0.1", "rounds=3"])
def test_a_federated_key_in_a_plain_run_is_refused_before_anything_is_written(letter_stores, tmp_path, setting):
    cfg = TrainConfig().with_overrides([*BASE, setting])
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} = .*applies only to federated runs .*leave it unset"):
        train(letter_stores[0], cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_federated_key_is_a_config_key_with_a_default():
    keys = set(TrainConfig.keys())
    assert set(FEDERATED_KEYS) <= keys
    TrainConfig().check_federated_keys()  # the defaults pass
    TrainConfig().with_overrides(["clients=4", "rounds=3", "aggregator=median"]).check_federated_keys()


def test_a_plain_runs_fedadam_server_takes_its_server_tau(letter_stores, tmp_path):
    """server_tau is fedadam's epsilon: 0.5 damps every step far more than 1e-3, so the two
    runs end with other weights (server_tau was not passed, and both took the default)."""
    weights = []
    for tau in ("0.001", "0.5"):
        sets = [*BASE, "server_optimizer=fedadam", "server_lr=0.01", f"server_tau={tau}", "seed=3"]
        res = train(letter_stores[0], TrainConfig().with_overrides(sets), tmp_path / f"run-{tau}")
        weights.append(res.model.params.copy())
    assert not np.allclose(weights[0], weights[1])
