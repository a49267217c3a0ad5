"""The worker task's push loop on a real cluster: pushes in flight while the next local steps run."""

from __future__ import annotations

import numpy as np

from pipeline.config import TrainConfig
from pipeline.model import load_model
from pipeline.train import train


def test_overlapped_pushes_fold_in_and_train(letter_stores, client, tmp_path):
    """With ``overlap`` each reply is folded in at the next push boundary: the run pushes as
    often as without it, learns, and its weights differ (the progress made in flight is kept
    on top of the server's weights instead of being replaced by them)."""
    runs = {}
    for overlap in (False, True):
        cfg = TrainConfig(mode="sync", epochs=2, patience=0, hidden=[32], local_steps=4, overlap=overlap)
        runs[overlap] = train(letter_stores[0], cfg, tmp_path / str(overlap), client=client)
    plain, ahead = runs[False].history, runs[True].history
    assert [h["rounds"] for h in ahead] == [h["rounds"] for h in plain]
    assert [h["samples"] for h in ahead] == [h["samples"] for h in plain]
    assert ahead[1]["val_loss"] < ahead[0]["val_loss"]
    assert ahead[1]["val_loss"] < 1.5 * plain[1]["val_loss"]
    a, b = load_model(tmp_path / "True"), load_model(tmp_path / "False")
    assert np.isfinite(a.params).all() and not np.array_equal(a.params, b.params)
