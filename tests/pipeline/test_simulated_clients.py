"""Simulated federated clients (``clients = N``): row-index views of one store, trained as
ordinary tasks on a real LocalCluster; the partition is computed once and kept with the run."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.checkpoint import load_file
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.federated import client_groups, sample_indices
from pipeline.partition import open_partition
from pipeline.train import train

BASE = {"hidden": [32], "lr": 3e-3, "ema": 0.0, "batch_size": 64, "patience": 0}


def test_sampling_and_evaluation_groups_need_no_list_of_clients():
    a = sample_indices(10_000, 100, seed=3, round_=7)
    assert len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_indices(10_000, 100, seed=3, round_=7))
    assert not np.array_equal(a, sample_indices(10_000, 100, seed=3, round_=8))
    assert np.array_equal(sample_indices(5, 9, 0, 0), np.arange(5))
    assert client_groups(np.array([5, 5, 5, 20, 1]), rows=10) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_simulated_clients_train_resume_and_keep_their_partition(letter_stores, client, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig.from_dict(
        {**BASE, "clients": 20, "partition": "dirichlet", "partition_alpha": 0.5, "fraction_fit": 0.5, "rounds": 4}
    )
    res = train(letter_stores[0], cfg, run, client=client)
    assert [(e["round"], e["sampled"], e["responded"], e["applied"]) for e in res.history] == [
        (r, 10, 10, True) for r in range(4)
    ]
    last = res.history[-1]
    assert last["val_accuracy"] > 0.1 and last["site_worst_decile"] <= last["site_mean"]
    part = open_partition(run / "partition")
    assert part.n_clients == 20 and part.kind == "dirichlet"
    with np.load(run / "clients.npz") as z:
        assert np.array_equal(z["n"], part.sizes()) and int(z["round"]) == 3  # every client scored
    # resumed: the next round, the same partition (not recomputed)
    before = (run / "partition" / "rows.npy").stat().st_mtime_ns
    more = train(letter_stores[0], cfg.with_overrides(["rounds=6"]), run, client=client, resume=True)
    assert [e["round"] for e in more.history] == list(range(6))
    assert more.history[:4] == res.history
    assert (run / "partition" / "rows.npy").stat().st_mtime_ns == before
    meta = load_file(run / "checkpoint.npz", "checkpoint")[1]
    assert meta["federated"] == {"clients": 20, "partition": "dirichlet"} and meta["epoch"] == 6
    # a resume asking for another partition is refused, naming the difference
    with pytest.raises(CheckpointError, match="was made otherwise"):
        train(
            letter_stores[0], cfg.with_overrides(["rounds=7", "partition_alpha=2.0"]), run, client=client, resume=True
        )


def test_asynchronous_simulated_clients_are_replaced_as_they_finish(letter_stores, client, tmp_path):
    cfg = TrainConfig.from_dict(
        {**BASE, "clients": 12, "fraction_fit": 0.5, "rounds": 3, "mode": "async", "concurrency": 3, "buffer_size": 2}
    )
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    assert [e["round"] for e in res.history] == [0, 1, 2]
    assert all(e["responded"] >= 6 for e in res.history)  # a round ends once 6 clients finished
    deltas = sum(e["responded"] for e in res.history)
    assert res.history[-1]["rounds"] == deltas // 2  # one FedBuff step per 2 deltas
    assert res.history[-1]["val_accuracy"] > 0.05
