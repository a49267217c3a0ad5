"""Scoring new data with a trained model: every path (a NumPy array in one piece or row by row, a
Dask array, `pipeline predict` on a store) gives the same numbers to the last bit, and a failed
prediction leaves nothing behind, not even rows a task still computing writes afterwards."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from kernels.mlp import MLPSpec, init_params
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, StoreError
from pipeline.inference import check_inputs, predict_store
from pipeline.model import Model
from pipeline.store import open_store
from pipeline.synth import synth
from pipeline.worker import stop_job_tasks
from tests.pipeline.helpers import corrupt_chunk, invoke, one_line_error, run_cli


def _model(store_path: str | Path, hidden: list[int], n_out: int, seed: int = 0) -> Model:
    """A model of ``store``'s layout with random weights (what the products see, not training,
    decides which rows agree)."""
    store = open_store(store_path)
    spec = {"n_in": store.n_features, "hidden": hidden, "n_out": n_out, "activation": "relu", "loss": "softmax_ce"}
    params = init_params(MLPSpec(**{**spec, "hidden": tuple(hidden)}), seed=seed)
    return Model.from_training(store, spec, None, params, TrainConfig(), [])


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """5,000 rows of 64 features in chunks of 1,000, two classes."""
    root = tmp_path_factory.mktemp("scoring")
    synth(root / "wide.zarr", rows=5000, features=64, classes=2, chunk_rows=1000, seed=1)
    return root / "wide.zarr"


def test_a_rows_outputs_do_not_depend_on_how_many_rows_came_with_it(wide):
    """The same rows in one array, in blocks of other sizes, one by one and as a Dask array give
    the same probabilities bit for bit (BLAS picks another kernel for another product shape)."""
    model = _model(wide, [128], 2)
    X = np.asarray(open_store(wide).X[:])
    whole = model.predict_proba(X)
    for size in (1000, 333, 7):
        parts = np.concatenate([model.predict_proba(X[a : a + size]) for a in range(0, len(X), size)])
        np.testing.assert_array_equal(parts, whole)
    ones = np.concatenate([model.predict_proba(X[i : i + 1]) for i in range(0, len(X), 97)])
    np.testing.assert_array_equal(ones, whole[::97])
    np.testing.assert_array_equal(model.predict_proba(da.from_array(X, chunks=(1200, -1))), whole)


def test_store_probabilities_are_the_arrays_to_the_last_bit(wide, client, tmp_path):
    """`pipeline predict --proba` (chunks of 1,000 rows on the workers) writes what
    ``predict_proba`` gives for the whole array in memory."""
    model = _model(wide, [128], 2, seed=3)
    out = tmp_path / "p.zarr"
    predict_store(model, str(wide), str(out), client, proba=True)
    want = model.predict_proba(np.asarray(open_store(wide).X[:]))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["proba"][:], want)


def _temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def test_a_failed_prediction_leaves_no_temporary_behind(client, tmp_path):
    """A chunk in the middle is damaged: its task fails while the other worker's tasks are still
    computing and writing. Their rows must not land in a temporary the failure already removed
    (tried a few times: the tasks' timing decides where they stand when the failure comes)."""
    src = tmp_path / "s.zarr"
    synth(src, rows=20000, features=64, classes=2, chunk_rows=500, seed=2)
    corrupt_chunk(src, "X", 20)
    model = _model(src, [256, 128], 2)
    for k in range(4):
        out = tmp_path / f"p{k}.zarr"
        with pytest.raises(StoreError, match=r"chunk 20 of array 'X' .* is corrupted"):
            predict_store(model, str(src), str(out), client, proba=True)
        still = client.run(stop_job_tasks, "predict-", 60.0)  # every task of it has ended by now
        assert not any(still.values())
        time.sleep(0.2)
        assert _temporaries(tmp_path) == [] and not out.exists()


def test_a_failed_command_prints_one_error_line(tmp_path):
    """`pipeline predict` on a store with a damaged first chunk: one `error:` line (no worker's
    warning about a task cancelled under it as the command closes its cluster), nothing written.
    `pipeline evaluate` stops its tasks the same way."""
    src = tmp_path / "big.zarr"
    synth(src, rows=60000, features=64, classes=2, chunk_rows=20000, seed=4)
    corrupt_chunk(src, "X", 0)
    _model(src, [512, 256], 2).save(tmp_path / "model.npz")
    on_a_cluster = ("--workers", "2", "--dashboard-address", "none")  # 60,000 rows would be predicted in process
    r = run_cli("predict", tmp_path / "model.npz", src, tmp_path / "p.zarr", "--proba", *on_a_cluster)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: chunk 0 of array 'X'"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zarr", "model.npz"]


def test_no_rows_give_no_predictions(wide, tmp_path):
    """Zero rows (a filter that kept none) give empty predictions of the right shape, for a
    regression model too, not a reshape error."""
    X = np.zeros((0, 64))
    clf = _model(wide, [8], 2)
    assert clf.predict(X).shape == (0,) and clf.predict_proba(X).shape == (0, 2)
    store = open_store(wide)
    for n_out, shape in ((2, (0, 2)), (1, (0,))):
        spec = {"n_in": 64, "hidden": [8], "n_out": n_out, "activation": "relu", "loss": "mse"}
        params = init_params(MLPSpec(**{**spec, "hidden": (8,)}), seed=0)
        target = {"mean": [1.0] * n_out, "std": [3.0] * n_out}
        reg = dataclasses.replace(
            Model.from_training(store, spec, target, params, TrainConfig(), []), task="regression"
        )
        assert reg.predict(X).shape == shape
        assert reg.predict(np.zeros((3, 64))).shape == (3, *shape[1:])


def test_an_output_inside_the_input_store_is_refused(wide, tmp_path):
    """Predictions written into the store's directory would become part of the store."""
    model = _model(wide, [8], 2)
    for out in (wide / "p.zarr", wide / "X" / "p.parquet"):
        with pytest.raises(PipelineError, match=r"is inside the store .*choose a location outside it"):
            check_inputs(model, str(wide), str(out))
        assert not out.exists()
    assert sorted(p.name for p in wide.iterdir()) == ["X", "y", "zarr.json"]


def test_a_csv_file_given_as_the_store_names_the_ingest_that_makes_one(wide, tmp_path):
    """New rows in a CSV (or Parquet) file are ingested like the training store first."""
    model = _model(wide, [8], 2)
    src = tmp_path / "new.csv"
    src.write_text("a,b\n1,2\n")
    for kw in ({}, {"out": str(tmp_path / "p.parquet")}):
        with pytest.raises(StoreError, match=r"is a file, not a store; ingest it first with `pipeline ingest .*--like"):
            check_inputs(model, str(src), **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.csv"]


def test_evaluate_prints_a_confusion_matrix_of_large_counts_in_columns(tmp_path):
    """Counts of six digits get their own columns (they ran together with the class names'
    width): every line of the matrix splits into its class and one count per class."""
    src = tmp_path / "s.zarr"
    synth(src, rows=240_000, features=2, classes=2, seed=5)
    store = open_store(src)
    spec = {"n_in": 2, "hidden": [], "n_out": 2, "activation": "relu", "loss": "softmax_ce"}
    params = np.zeros(MLPSpec(n_in=2, hidden=(), n_out=2).n_params, np.float32)
    params[-2:] = [5.0, 0.0]  # the output bias: every row is predicted class 0
    Model.from_training(store, spec, None, params, TrainConfig(), []).save(tmp_path / "model.npz")
    r = run_cli("evaluate", tmp_path / "model.npz", src, "--workers", "1", "--dashboard-address", "none")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    matrix = lines[lines.index("confusion matrix (rows: true, columns: predicted):") + 1 :]
    assert matrix[0].split() == ["0", "1"]
    rows = [line.split() for line in matrix[1:]]
    assert [row[0] for row in rows] == ["0", "1"] and all(len(row) == 3 for row in rows), r.stdout
    counts = np.asarray([[int(v) for v in row[1:]] for row in rows])
    assert counts.sum() == 240_000 and counts[:, 0].min() >= 100_000 and not counts[:, 1].any()


def test_a_store_given_where_the_run_goes_says_which_comes_first(wide, tmp_path):
    """`pipeline predict STORE RUN OUT` (the arguments swapped) names the order, not a missing
    model.npz inside the store."""
    run = tmp_path / "run"
    run.mkdir()
    _model(wide, [8], 2).save(run / "model.npz")
    for args in (("evaluate", wide, run), ("predict", wide, run, tmp_path / "p.parquet")):
        one_line_error(invoke(*args), "is a store, not a run directory or model file", "first, then the store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_model_of_an_interrupted_run_says_what_the_run_is(tmp_path):
    """From Python, a run directory holding a checkpoint but no model yet is named as such, with
    the command that continues it (it said only that model.npz was not found)."""
    from pipeline.config import TrainConfig
    from pipeline.errors import CheckpointError
    from pipeline.model import load_model
    from pipeline.train import train

    src = tmp_path / "s.zarr"
    synth(src, rows=300, features=3, classes=2, seed=5)
    run = tmp_path / "run"
    train(str(src), TrainConfig().with_overrides(["epochs=1", "hidden=[4]"]), run)
    (run / "model.npz").unlink()  # as a run stopped before its end leaves it
    with pytest.raises(CheckpointError, match=r"has no model\.npz yet: .* interrupted .*--resume"):
        load_model(run)
    with pytest.raises(CheckpointError, match=r"model file .* not found"):  # a directory of no run
        load_model(tmp_path)
