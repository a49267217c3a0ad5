"""Metric arithmetic: partial sums over batches, merged across tasks, finished into metrics.

A task computes :func:`evaluate_arrays` over each batch it reads and merges them with
:func:`merge_metrics`; the sums travel as plain lists (:func:`plain_metrics`, undone by
:func:`array_metrics`), the driver merges every task's and :func:`finish_metrics` turns them
into accuracy, log loss and the confusion matrix, or R^2, RMSE and MAE. Sums add up exactly
across any split of the rows, so a metric does not depend on how the rows were spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def evaluate_arrays(probs_or_pred: np.ndarray, y: np.ndarray, target: dict | None, n_classes: int) -> dict:
    """Partial sums for metrics over one batch (merged with :func:`merge_metrics`)."""
    if target is None:
        yi = np.asarray(y, dtype=np.int64)
        p = np.clip(probs_or_pred[np.arange(len(yi)), yi], 1e-15, 1.0)
        pred = probs_or_pred.argmax(axis=1)
        conf = np.zeros((n_classes, n_classes), np.int64)
        np.add.at(conf, (yi, pred), 1)
        return {"n": len(yi), "loss_sum": float(-np.log(p).sum()), "confusion": conf}
    yy = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    pred = np.asarray(probs_or_pred, dtype=np.float64).reshape(len(y), -1) * target["std"] + target["mean"]
    err = pred - yy
    zerr = err / target["std"]
    # The targets' sums are taken about the training mean (the same shift in every part, so they
    # still add up): raw sums of y and y^2 cancel catastrophically in R^2's sum of squares when
    # the mean is large against the spread (timestamps, 1.7e9 +- 3, gave R^2 = -1840 for 0.92).
    dy = yy - np.asarray(target["mean"], dtype=np.float64)
    return {
        "n": len(yy),
        "loss_sum": float(np.mean(zerr**2, axis=1).sum()),
        "sse": (err**2).sum(axis=0),
        "sae": np.abs(err).sum(axis=0),
        "sum_dy": dy.sum(axis=0),
        "sum_dy2": (dy**2).sum(axis=0),
        "min_y": yy.min(axis=0),  # merged by minimum / maximum: tell a constant target exactly
        "max_y": yy.max(axis=0),
    }


def plain_metrics(sums: dict) -> dict[str, Any]:
    """Partial sums as msgpack-friendly numbers and lists (undone by :func:`array_metrics`)."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sums.items()}


def array_metrics(sums: dict) -> dict[str, Any]:
    """Inverse of :func:`plain_metrics`: lists back to arrays, so partial sums add up (Dask's
    messages decode lists as tuples, which ``+`` would concatenate)."""
    return {k: np.asarray(v) if isinstance(v, list | tuple) else v for k, v in sums.items()}


_MERGE = {"min_y": np.minimum, "max_y": np.maximum}


def merge_metrics(parts: list[dict]) -> dict:
    """Partial sums added up (``min_y`` / ``max_y`` by minimum / maximum)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = v
            else:
                out[k] = _MERGE[k](out[k], v) if k in _MERGE else out[k] + v
    return out


def finish_metrics(sums: dict, target: dict | None) -> dict[str, Any]:
    """Final metrics from merged partial sums: accuracy, log loss, confusion matrix; or R^2,
    RMSE, MAE (averaged over output columns)."""
    n = int(sums.get("n", 0))
    if n == 0:
        return {"n": 0}
    if target is None:
        conf = np.asarray(sums["confusion"])
        return {
            "n": n,
            "loss": sums["loss_sum"] / n,
            "log_loss": sums["loss_sum"] / n,
            "accuracy": float(np.trace(conf) / n),
            "confusion": conf.tolist(),
        }
    sst = sums["sum_dy2"] - sums["sum_dy"] ** 2 / n  # about the training mean: see evaluate_arrays
    r2 = 1 - sums["sse"] / np.where(sst > 0, sst, 1.0)
    if "min_y" in sums:
        # A constant target has no variance to explain: R^2 is 1 for exact predictions and 0
        # otherwise, as scikit-learn's r2_score (force_finite=True) defines it, instead of the
        # huge negative number that rounding noise in sst would give.
        constant = np.asarray(sums["min_y"]) == np.asarray(sums["max_y"])
        r2 = np.where(constant, np.where(np.asarray(sums["sse"]) == 0, 1.0, 0.0), r2)
    return {
        "n": n,
        "loss": sums["loss_sum"] / n,
        "r2": float(np.mean(r2)),
        "rmse": float(np.mean(np.sqrt(sums["sse"] / n))),
        "mae": float(np.mean(sums["sae"] / n)),
    }
