"""Regression through every path: the metrics of `pipeline evaluate`, the estimators' scores and
the validation records of a run are scikit-learn's metrics of the predictions, in the target's
own units, whatever the target's magnitude."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

from pipeline.config import TrainConfig
from pipeline.inference import evaluate_store
from pipeline.ingest import ingest
from pipeline.metrics import array_metrics, evaluate_arrays, finish_metrics, merge_metrics, plain_metrics
from pipeline.model import load_model
from pipeline.store import open_store
from pipeline.train import train

# a target far from zero against its spread: event times in Unix seconds, a few seconds apart
OFFSET, SPREAD = 1.7e9, 3.0


def _timestamps_csv(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    y = OFFSET + SPREAD * (X @ [1.0, -0.5, 0.25]) + 0.3 * rng.standard_normal(n)
    lines = ["a,b,c,t"] + [f"{a:.5f},{b:.5f},{c:.5f},{t:.6f}" for (a, b, c), t in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_r2_of_a_target_far_from_zero_is_scikit_learns():
    """R^2's sum of squares is taken about the training mean: raw sums of y and y^2 of values
    near 1.7e9 cancel to noise (R^2 came out as -1840 where scikit-learn says 0.92)."""
    rng = np.random.default_rng(0)
    y = OFFSET + SPREAD * rng.standard_normal((5000, 1))
    pred = y + rng.normal(0, 0.3 * SPREAD, y.shape)
    target = {"mean": np.array([float(y.mean()) + 0.5]), "std": np.array([float(y.std())])}
    z = (pred - target["mean"]) / target["std"]  # the model's standardized output
    cuts = [0, 700, 2100, 4999, 5000]
    parts = [
        array_metrics(plain_metrics(evaluate_arrays(z[a:b], y[a:b], target, 1)))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    m = finish_metrics(merge_metrics(parts), target)
    assert m["r2"] == pytest.approx(r2_score(y, pred), rel=1e-9)
    assert m["rmse"] == pytest.approx(root_mean_squared_error(y, pred), rel=1e-9)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-9)


def test_evaluate_and_validation_of_a_target_far_from_zero(client, tmp_path):
    """`pipeline evaluate`'s R^2 on the cluster and the run's validation R^2 (in this process)
    are scikit-learn's of the model's predictions."""
    tr = ingest(_timestamps_csv(tmp_path / "tr.csv", 3000, 0), tmp_path / "tr.zarr", target="t")
    te = ingest(_timestamps_csv(tmp_path / "te.csv", 1000, 1), tmp_path / "te.zarr", target="t", like=tr.path)
    cfg = TrainConfig().with_overrides(["epochs=3", "hidden=[]", "lr=0.05", "patience=0", "validation=0.2"])
    run = train(tr.path, cfg, tmp_path / "run")
    model = load_model(run.run_dir)
    test = open_store(te.path)
    pred = model.predict(test.X[:])
    m = evaluate_store(model, te.path, client)
    assert m["r2"] == pytest.approx(r2_score(test.y[:], pred), rel=1e-9)
    assert 0.5 < m["r2"] < 1.0
    record = json.loads((Path(run.run_dir) / "history.json").read_text())["epochs"][-1]
    assert 0.5 < record["val_r2"] < 1.0


def test_a_made_up_target_name_is_not_compared(client, tmp_path):
    """A model trained on in-memory arrays (an estimator's store names its target "y") or on a
    NumPy file ("labels") scores and evaluates a store ingested from a CSV file with a named
    target, as a fit in this process does; two named targets are still compared."""
    from pipeline.errors import StoreError
    from pipeline.estimator import LinearRegression
    from pipeline.inference import check_inputs

    tr = ingest(_timestamps_csv(tmp_path / "tr.csv", 600, 0), tmp_path / "tr.zarr", target="t")
    X, y = open_store(tr.path).X[:], open_store(tr.path).y[:]
    est = LinearRegression(client=client, max_iter=1, n_iter_no_change=0).fit(X, y)
    assert est.fitted_on_ == "cluster"
    assert est.score(tr.path) == pytest.approx(r2_score(y, est.predict(X)), rel=1e-9)

    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    npy = ingest(tmp_path / "X.npy", tmp_path / "npy.zarr", labels=tmp_path / "y.npy", task="regression")
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[]", "patience=0", "validation=0"])
    model = load_model(train(npy.path, cfg, tmp_path / "run").run_dir)
    check_inputs(model, tr.path)  # the CSV store's target 't' against the NumPy file's made-up 'labels'
    named = load_model(train(tr.path, cfg, tmp_path / "run-named").run_dir)
    assert named.target_name == "t"
    check_inputs(named, npy.path)  # the NumPy store's made-up name is not compared either
    src = _timestamps_csv(tmp_path / "u.csv", 600, 0)
    src.write_text(src.read_text().replace("a,b,c,t", "a,b,c,u", 1))
    other = ingest(src, tmp_path / "other.zarr", target="u")
    with pytest.raises(StoreError, match="has the target column 'u' but the model was trained on 't'"):
        check_inputs(named, other.path)


def test_simulated_clients_r2_of_a_target_far_from_zero(client, tmp_path):
    """Each simulated client's R^2 (``clients.npz``) is taken about the training mean, per target
    column: from raw sums of values near 1.7e9 it was rounding noise (R^2 in the thousands below
    zero) while the pooled validation R^2 of the same model was about 0.9."""
    tr = ingest(_timestamps_csv(tmp_path / "tr.csv", 3000, 0), tmp_path / "tr.zarr", target="t")
    cfg = TrainConfig.from_dict(
        {"hidden": [], "lr": 0.05, "patience": 0, "ema": 0.0, "clients": 4, "rounds": 3, "validation": 0.2}
    )
    res = train(tr.path, cfg, tmp_path / "run", client=client)
    assert 0.5 < res.history[-1]["val_r2"] < 1.0
    with np.load(tmp_path / "run" / "clients.npz") as z:
        metric, n = z["metric"], z["n"]
    assert (n > 0).all() and np.isfinite(metric).all()
    assert (metric > 0.5).all() and (metric < 1.0).all(), metric


def test_evaluate_prints_small_errors_in_significant_digits(client, tmp_path):
    """A target measured in millionths: `pipeline evaluate` printed rmse and mae as 0.0000; they
    are printed to 4 significant digits, the figures of its --json output."""
    from tests.pipeline.helpers import invoke

    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 2))
    y = 1e-6 * (X @ [2.0, -1.0]) + 1e-7 * rng.standard_normal(600)
    src = tmp_path / "small.csv"
    src.write_text("a,b,t\n" + "".join(f"{a:.5f},{b:.5f},{t:.6e}\n" for (a, b), t in zip(X, y, strict=True)))
    store = ingest(src, tmp_path / "small.zarr", target="t").path
    cfg = TrainConfig().with_overrides(["epochs=2", "hidden=[]", "patience=0"])
    run = train(store, cfg, tmp_path / "run").run_dir
    address = client.scheduler.address
    shown = invoke("evaluate", run, store, "--scheduler", address)
    assert shown.exit_code == 0, shown.output
    figures = json.loads(invoke("evaluate", run, store, "--scheduler", address, "--json").stdout)
    lines = dict(ln.split(":", 1) for ln in shown.stdout.splitlines() if ":" in ln)
    for key in ("rmse", "mae"):
        assert 0 < figures[key] < 1e-3
        assert float(lines[key.rjust(10)]) == pytest.approx(figures[key], rel=1e-3), shown.stdout


def test_a_validation_store_of_another_target_is_refused(tmp_path):
    """A validation store with the training store's features but another target column, or two
    targets for one, was accepted: its targets broadcast against the model's outputs and early
    stopping ran on meaningless figures. It is refused naming the difference, before training."""
    from pipeline.errors import StoreError

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 2))
    t, u = X @ [1.0, 2.0], X @ [-1.0, 0.5] + 7
    src = tmp_path / "d.csv"
    rows = zip(X, t, u, strict=True)
    src.write_text("a,b,t,u\n" + "".join(f"{a:.5f},{b:.5f},{c:.5f},{d:.5f}\n" for (a, b), c, d in rows))
    train_store = ingest(src, tmp_path / "t.zarr", target="t", drop=["u"]).path
    other = ingest(src, tmp_path / "u.zarr", target="u", drop=["t"]).path
    np.save(tmp_path / "x.npy", X.astype(np.float32))
    np.save(tmp_path / "y1.npy", t.reshape(-1, 1))
    np.save(tmp_path / "y2.npy", np.stack([t, u], axis=1))
    one = ingest(tmp_path / "x.npy", tmp_path / "one.zarr", labels=tmp_path / "y1.npy", task="regression").path
    two = ingest(tmp_path / "x.npy", tmp_path / "two.zarr", labels=tmp_path / "y2.npy", task="regression").path
    for store, vs, says in (
        (train_store, other, "has the target column 'u', not 't'"),
        (one, two, "has 2 target value(s) per row, not 1"),
    ):
        cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[]", f"validation_store={vs}"])
        with pytest.raises(StoreError, match="does not match the training store") as err:
            train(store, cfg, tmp_path / "run")
        assert says in str(err.value) and f"--like {store}" in str(err.value), err.value
        assert not (tmp_path / "run").exists()
