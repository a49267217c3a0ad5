"""Metric arithmetic (pipeline.metrics): partial sums merged across any split of the rows give
the metrics of all the rows, also after a trip through plain lists."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, r2_score

from pipeline.metrics import (
    array_metrics,
    evaluate_arrays,
    finish_metrics,
    merge_metrics,
    plain_metrics,
)


def _split(n: int, seed: int) -> list[slice]:
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, n), 3, replace=False).tolist())
    return [slice(a, b) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def test_classification_sums_merge_to_the_metrics_of_all_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, 50)
    parts = [array_metrics(plain_metrics(evaluate_arrays(probs[s], y[s], None, 4))) for s in _split(50, 1)]
    m = finish_metrics(merge_metrics(parts), None)
    assert m["n"] == 50
    assert m["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)))
    assert m["log_loss"] == pytest.approx(log_loss(y, probs, labels=range(4)))
    assert np.asarray(m["confusion"]).sum() == 50


def test_regression_sums_merge_to_the_metrics_of_all_rows():
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 2.0, (40, 2))
    target = {"mean": np.array([3.0, 3.0]), "std": np.array([2.0, 2.0])}
    pred_z = (y - 3.0) / 2.0 + rng.normal(0, 0.3, y.shape)  # the model's standardized output
    parts = [array_metrics(plain_metrics(evaluate_arrays(pred_z[s], y[s], target, 2))) for s in _split(40, 2)]
    m = finish_metrics(merge_metrics(parts), target)
    pred = pred_z * 2.0 + 3.0
    assert m["r2"] == pytest.approx(r2_score(y, pred))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred))


def test_a_constant_target_scores_as_scikit_learn_does():
    y = np.full((6, 1), 2.0)
    target = {"mean": np.array([2.0]), "std": np.array([1.0])}
    exact = finish_metrics(merge_metrics([evaluate_arrays(np.zeros((6, 1)), y, target, 1)]), target)
    off = finish_metrics(merge_metrics([evaluate_arrays(np.ones((6, 1)), y, target, 1)]), target)
    assert (exact["r2"], off["r2"]) == (1.0, 0.0)
    assert finish_metrics({}, None) == {"n": 0}
