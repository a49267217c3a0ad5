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


def test_a_reply_folded_in_after_one_step_is_reproducible(letter_stores, client, tmp_path):
    """``overlap_steps = 1`` folds each reply in one local step after its push, waiting there if
    it is late: the same run twice gives the same weights whatever the timing, it pushes as often
    as the run without overlap, and it differs from folding at the next push boundary
    (``overlap_steps = local_steps``), whose steps run on weights one round older."""
    base = {"mode": "sync", "epochs": 2, "patience": 0, "hidden": [32], "local_steps": 4, "overlap": True}
    runs = {}
    for key, steps in (("one", 1), ("again", 1), ("round", 4)):
        runs[key] = train(letter_stores[0], TrainConfig(**base, overlap_steps=steps), tmp_path / key, client=client)
    plain = train(letter_stores[0], TrainConfig(**{**base, "overlap": False}), tmp_path / "plain", client=client)
    assert [h["rounds"] for h in runs["one"].history] == [h["rounds"] for h in plain.history]
    one, again, late = (load_model(tmp_path / k).params for k in ("one", "again", "round"))
    assert np.array_equal(one, again)
    assert not np.array_equal(one, late)
    assert runs["one"].history[1]["val_loss"] < runs["one"].history[0]["val_loss"]
