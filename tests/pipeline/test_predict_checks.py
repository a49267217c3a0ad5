"""What `pipeline predict` / `evaluate` and ``load_model(...).predict`` check and write: labels in
every output format, stores whose names, order, fills or target differ from the model's,
non-finite rows, data errors on the workers (one line, no retries), and the temporary output of
an interrupted or killed prediction."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.config import TrainConfig
from pipeline.errors import StoreError
from pipeline.inference import check_inputs, clean_stale_outputs, evaluate_store, predict_store
from pipeline.ingest import ingest
from pipeline.model import load_model
from pipeline.store import names_made_up, open_store
from pipeline.train import train
from tests.pipeline.helpers import CLI, cli_env, run_cli

CLUSTER = ("--workers", "1", "--dashboard-address", "none")


def _csv(path: Path, n: int, seed: int, header: str = "x0,x1,x2,label", missing_x0: bool = False) -> Path:
    """Three features; the label (1, 2 or 3) is 1 + the index of the largest of x0, x1, x2.
    ``header`` names the columns of x0, x1, x2 and the label in that order; ``missing_x0``
    leaves x0 empty where it is largest (its mean over the other rows is lower)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    y = 1 + np.argmax(X, axis=1)
    lines = [header]
    for row, label in zip(X, y, strict=True):
        first = "" if missing_x0 and label == 1 else f"{row[0]:.4f}"
        lines.append(f"{first},{row[1]:.4f},{row[2]:.4f},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(client, tmp_path_factory) -> tuple[Path, Path]:
    """A model trained on a CSV whose header really is ``x0,x1,x2,label`` (labels 1, 2, 3)."""
    root = tmp_path_factory.mktemp("checks")
    tr = ingest(_csv(root / "tr.csv", 2000, 0), root / "tr.zarr")
    cfg = TrainConfig().with_overrides(["epochs=6", "hidden=[8]", "validation=0", "patience=0", "lr=0.01"])
    return Path(train(tr.path, cfg, root / "run", client=client).run_dir), root


# -- finding 1: one model, one answer in every output format ----------------------------------


def test_zarr_and_parquet_predictions_are_the_labels_load_model_predicts(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    te = ingest(_csv(tmp_path / "te.csv", 700, 1), tmp_path / "te.zarr", like=root / "tr.zarr", chunk_rows=256)
    want = model.predict(open_store(te.path).X[:])
    assert set(want) <= {"1", "2", "3"}
    predict_store(model, te.path, str(tmp_path / "p.zarr"), client, proba=True)
    predict_store(model, te.path, str(tmp_path / "p.parquet"), client)
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    np.testing.assert_array_equal(g["prediction"][:].astype(object), want)  # labels, not class indices
    assert g.attrs["classes"] == ["1", "2", "3"]
    np.testing.assert_array_equal(g["proba"][:], model.predict_proba(open_store(te.path).X[:]))
    table = pq.read_table(tmp_path / "p.parquet").sort_by("row")
    assert table["prediction"].to_pylist() == list(want)
    # labels 1, 2, 3 mean what the data says: most predictions are right
    assert np.mean(want.astype(int) == open_store(te.path).y[:] + 1) > 0.8


# -- finding 3: names the source gave are compared whatever their spelling ---------------------


def test_a_store_with_x0_x1_columns_swapped_is_refused(run, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    assert model.feature_names == ["x0", "x1", "x2"] and model.feature_names_generated is False
    swapped = ingest(_csv(tmp_path / "sw.csv", 300, 2, header="x1,x0,x2,label"), tmp_path / "sw.zarr")
    assert not names_made_up(swapped)
    for kw in ({}, {"out": str(tmp_path / "p.parquet")}):
        with pytest.raises(StoreError, match=r"has its features in another order \(feature 0 is 'x1', expected 'x0'\)"):
            check_inputs(model, swapped.path, **kw)
    # names the program made up (NumPy columns) say nothing and are not compared
    X = np.random.default_rng(3).standard_normal((300, 3)).astype(np.float32)
    np.save(tmp_path / "X.npy", np.ascontiguousarray(X[:, [1, 0, 2]]))
    np.save(tmp_path / "y.npy", np.arange(300) % 3)
    arrays = ingest(tmp_path / "X.npy", tmp_path / "arr.zarr", labels=tmp_path / "y.npy")
    assert arrays.feature_names == ["x0", "x1", "x2"] and names_made_up(arrays)
    check_inputs(model, arrays.path, str(tmp_path / "q.parquet"))


# -- finding 4: a store imputed with its own fills ---------------------------------------------


def test_a_store_imputed_with_other_fills_is_refused_and_like_is_accepted(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    src = _csv(tmp_path / "new.csv", 600, 4, missing_x0=True)
    own = ingest(src, tmp_path / "own.zarr")
    like = ingest(src, tmp_path / "like.zarr", like=root / "tr.zarr")
    n_missing = own.attrs["source"]["missing_imputed"]["x0"]
    assert n_missing > 100
    msg = rf"it imputed {n_missing:,} missing value\(s\) of column 'x0' with .* instead of .*; ingest it with --like"
    with pytest.raises(StoreError, match=msg):
        check_inputs(model, own.path, str(tmp_path / "p.parquet"))
    with pytest.raises(StoreError, match=msg):
        evaluate_store(model, own.path, client)
    assert not (tmp_path / "p.parquet").exists()
    check_inputs(model, like.path, str(tmp_path / "p.parquet"))
    # the same columns without missing cells: nothing was imputed, nothing differs
    check_inputs(model, ingest(_csv(tmp_path / "full.csv", 300, 5), tmp_path / "full.zarr").path)


# -- finding 7: the target's name and number --------------------------------------------------


def test_evaluate_refuses_another_target_column_and_accepts_old_model_files(run, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    assert model.target_name == "label"
    other = ingest(_csv(tmp_path / "o.csv", 300, 6, header="x0,x1,x2,grade"), tmp_path / "o.zarr")
    with pytest.raises(
        StoreError, match=r"has the target column 'grade' but the model was trained on 'label'; .*--like"
    ):
        check_inputs(model, other.path)
    check_inputs(model, other.path, predicting=True)  # predicting reads no labels
    # a model file of an older version records no target name (nor whether names were made up)
    old = dataclasses.replace(model, target_name=None, feature_names_generated=None)
    old.save(tmp_path / "old.npz")
    loaded = load_model(tmp_path / "old.npz")
    assert loaded.target_name is None and loaded.feature_names_generated is None
    check_inputs(loaded, other.path)


def test_evaluate_refuses_another_number_of_targets(client, tmp_path):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((400, 3)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y2.npy", np.column_stack([X[:, 0], X[:, 1] - X[:, 2]]).astype(np.float32))
    np.save(tmp_path / "y1.npy", X[:, 0])
    two = ingest(tmp_path / "X.npy", tmp_path / "two.zarr", labels=tmp_path / "y2.npy", task="regression")
    one = ingest(tmp_path / "X.npy", tmp_path / "one.zarr", labels=tmp_path / "y1.npy", task="regression")
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[4]", "validation=0", "patience=0"])
    model = load_model(train(two.path, cfg, tmp_path / "run", client=client).run_dir)
    assert model.n_targets == 2
    with pytest.raises(StoreError, match=r"has 1 target value\(s\) per row but the model predicts 2; .*--like"):
        evaluate_store(model, one.path, client)
    assert evaluate_store(model, two.path, client)["n"] == 400


# -- findings 6 and 15: load_model(...).predict on rows it cannot take --------------------------


def test_load_model_refuses_non_finite_rows_and_raw_rows(run):
    run_dir, _ = run
    model = load_model(run_dir)
    good = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])
    assert list(model.predict(good)) == list(model.predict(good))
    for bad, what in ((np.nan, "NaN"), (np.inf, "infinity"), (-np.inf, "infinity")):
        rows = good.copy()
        rows[1, 2] = bad
        for method in (model.predict, model.predict_proba):
            with pytest.raises(
                ValueError, match=rf"^Input X contains {what} \(row 1, feature 2 \('x2'\)\); impute"
            ) as e:
                method(rows)
            assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError,
        match=r"^expected rows of 3 features, got shape \(2, 2\): .*x0, x1, x2.*--like TRAIN_STORE --unlabelled",
    ) as e:
        model.predict(good[:, :2])
    assert "\n" not in str(e.value)


# -- finding 13: a data error on the workers is one line, not retried -------------------------


def _corrupt_last_x_chunk(store: str) -> None:
    last = sorted(p for p in Path(store, "X", "c").rglob("*") if p.is_file())[-1]
    data = bytearray(last.read_bytes())
    data[min(64, len(data) - 1)] ^= 0xFF
    last.write_bytes(bytes(data))


def test_a_corrupted_chunk_is_one_error_line_without_worker_tracebacks(run, tmp_path):
    run_dir, root = run
    st = ingest(_csv(tmp_path / "te.csv", 1200, 8), tmp_path / "te.zarr", like=root / "tr.zarr", chunk_rows=400)
    _corrupt_last_x_chunk(st.path)
    for args in (("evaluate", run_dir, st.path), ("predict", run_dir, st.path, tmp_path / "p.parquet")):
        r = run_cli(*args, *CLUSTER)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: chunk 2 of array 'X'"), r.stderr
        assert "Compute Failed" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["te.csv", "te.zarr"]  # nothing half-written


def test_a_data_error_is_not_retried(run, client, tmp_path):
    """The task returns the error (no retry re-reads the chunk): the scheduler records no
    erred task, and evaluation raises the store's own error."""
    run_dir, root = run
    st = ingest(_csv(tmp_path / "te.csv", 800, 9), tmp_path / "te.zarr", like=root / "tr.zarr", chunk_rows=400)
    _corrupt_last_x_chunk(st.path)

    def erred(dask_scheduler: Any) -> int:
        return sum(1 for ts in dask_scheduler.tasks.values() if ts.state == "erred")

    with pytest.raises(StoreError, match=r"chunk 1 of array 'X' .* is corrupted"):
        evaluate_store(load_model(run_dir), st.path, client)
    assert client.run_on_scheduler(erred) == 0


# -- finding 14: an interrupted or killed prediction's temporary output -------------------------


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def test_sigterm_stops_predict_and_removes_its_temporary_output(client, tmp_path):
    from pipeline.synth import synth

    small = synth(tmp_path / "small.zarr", rows=1000, features=4, classes=3, seed=0)
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[4]", "validation=0", "patience=0"])
    run_dir = train(small.path, cfg, tmp_path / "run", client=client).run_dir
    big = synth(tmp_path / "big.zarr", rows=40_000, features=4, classes=3, seed=1, chunk_rows=100)
    out = tmp_path / "out" / "p.parquet"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [*CLI, "predict", run_dir, big.path, str(out), *CLUSTER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        deadline = time.time() + 120
        while not _temps(out.parent) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and _temps(out.parent), "predict ended before it could be interrupted"
        time.sleep(0.3)  # some chunks written
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)", err
    assert _temps(out.parent) == [] and not out.exists()


def test_a_later_predict_removes_a_killed_predicts_temporary_and_nothing_else(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    te = ingest(_csv(tmp_path / "te.csv", 300, 10), tmp_path / "te.zarr", like=root / "tr.zarr")
    dead = json.loads(  # the writer record of a process that has ended, as a killed predict leaves it
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json; from pipeline.store import writer_marker as w; print(json.dumps(w()))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    d = tmp_path / "out"
    d.mkdir()
    for name in ("p.parquet", "p.zarr"):
        predict_store(model, te.path, str(d / name), client)  # a real output, to copy as a temporary
        stale = d / f".{name}.tmp-0123abcd"
        shutil.copytree(d / name, stale)
        if name.endswith(".zarr"):
            zarr.open_group(str(stale), mode="r+").attrs["writer"] = dead
        else:
            (stale / "_writer.json").write_text(json.dumps(dead))
        alive = d / f".{name}.tmp-4567cdef"  # a running predict's temporary: ours, writer alive
        shutil.copytree(stale, alive)
        if name.endswith(".zarr"):
            zarr.open_group(str(alive), mode="r+").attrs["writer"] = {**dead, "pid": 1, "started": ""}
        else:
            (alive / "_writer.json").write_text(json.dumps({**dead, "pid": 1, "started": ""}))
        foreign = d / f".{name}.tmp-89abcdef"  # the right name, someone else's content
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        predict_store(model, te.path, str(d / name), client, force=True)
        assert not stale.exists()
        assert alive.exists() and (foreign / "notes.txt").read_text() == "mine"
        assert clean_stale_outputs(d / name) == []
    for name in ("p.parquet", "p.zarr"):  # the final outputs carry no writer record
        assert "_writer.json" not in [p.name for p in (d / name).iterdir()]
    assert "writer" not in zarr.open_group(str(d / "p.zarr"), mode="r").attrs


def test_load_model_refuses_a_table_whose_columns_are_not_the_model_s_in_order(run) -> None:
    """A table with named columns (a pyarrow Table, a DataFrame) is read by position: the same
    names in another order, or other names, would be predicted as the wrong features."""
    import pyarrow as pa

    class Frame:
        """The two things a DataFrame offers here: string ``columns`` and its values."""

        def __init__(self, names: list[str], values: np.ndarray) -> None:
            self.columns, self.values = names, values

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return self.values if dtype is None else self.values.astype(dtype)

    run_dir, _ = run
    model = load_model(run_dir)
    assert model.feature_names == ["x0", "x1", "x2"] and not model.feature_names_generated
    X = np.random.default_rng(5).standard_normal((50, 3))
    want = model.predict(X)
    np.testing.assert_array_equal(model.predict(Frame(["x0", "x1", "x2"], X)), want)  # the model's order
    with pytest.raises(ValueError, match=r"the model's features in another order \(x2, x1, x0\); select them"):
        model.predict(Frame(["x2", "x1", "x0"], X[:, ::-1]))
    table = pa.table({"x1": X[:, 1], "x0": X[:, 0], "x2": X[:, 2]})
    with pytest.raises(ValueError, match="another order"):
        model.predict_proba(table)
    with pytest.raises(ValueError, match=r"the columns of X \(a, b, c\) are not the model's features \(x0, x1, x2\)"):
        model.predict(Frame(["a", "b", "c"], X))


@pytest.mark.parametrize("where", ["training", "validation"])
def test_training_on_a_corrupted_chunk_is_one_error_line_without_worker_tracebacks(tmp_path, where):
    """A training task, or a validation task, that meets a corrupted chunk returns the store's
    error (Dask's retries would read the same bytes again, and each attempt logged a "Compute
    Failed" traceback on the worker): the run ends with that one line."""
    tr = ingest(_csv(tmp_path / "tr.csv", 1200, 11), tmp_path / "tr.zarr", chunk_rows=400)
    va = ingest(_csv(tmp_path / "va.csv", 800, 12), tmp_path / "va.zarr", like=tr.path, chunk_rows=400)
    _corrupt_last_x_chunk(tr.path if where == "training" else va.path)
    r = run_cli(
        "train",
        tr.path,
        "--out",
        tmp_path / "run",
        "-q",
        "--set",
        "epochs=2",
        "--set",
        "hidden=[8]",
        "--set",
        f"validation_store={json.dumps(str(va.path))}",
        *CLUSTER,
    )
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    chunk = "chunk 2 of array 'X'" if where == "training" else "chunk 1 of array 'X'"
    assert len(lines) == 1 and lines[0].startswith(f"error: {chunk}"), r.stderr
    assert "Compute Failed" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model.npz").exists()


def test_a_store_whose_text_was_read_otherwise_is_refused(tmp_path):
    """A model records the decimal mark its training data's numbers were read with; a store read
    with the other one (1,250 as 1250, not 1.25) is refused, a store ingested --like is accepted."""
    rows = "".join(f"{i % 7},{i % 5};{i % 3};{'abc'[i % 3]}\n" for i in range(60))  # p: 0,0 ... 6,4
    (tmp_path / "d.csv").write_text("p;q;y\n" + rows)
    train_store = ingest(tmp_path / "d.csv", tmp_path / "d.zarr")
    assert train_store.attrs["source"]["decimal_comma"] is True
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[4]", "patience=0"])
    train(str(tmp_path / "d.zarr"), cfg, tmp_path / "run", client=None)
    model = load_model(tmp_path / "run")
    (tmp_path / "new.csv").write_text("p;q;y\n1,250;2;a\n3,500;1;b\n2;0;c\n")  # 1,250: 1.25 or 1250
    point = ingest(tmp_path / "new.csv", tmp_path / "pt.zarr", decimal="point")
    with pytest.raises(StoreError, match=r"read its numbers with commas as thousands separators \(--decimal point\)"):
        check_inputs(model, point.path, str(tmp_path / "p.parquet"))
    like = ingest(tmp_path / "new.csv", tmp_path / "like.zarr", like=tmp_path / "d.zarr")
    check_inputs(model, like.path, str(tmp_path / "p.parquet"))
    assert like.attrs["source"]["decimal_comma"] is True  # the training store's reading
    # the model keeps the reading through its file
    assert model.reading == {"decimal_comma": True, "thousands_dot": True}


def test_a_store_whose_dots_were_read_otherwise_is_refused(tmp_path):
    """A decimal-comma store records what its dots were (thousands, in a file that writes 1,5):
    a --like ingest reads them the same, and a store whose dots were decimal points is refused."""
    rows = "".join(f"{i % 7},{i % 5};{i % 3};{'abc'[i % 3]}\n" for i in range(60))  # decimal commas, no dots
    (tmp_path / "d.csv").write_text("p;q;y\n" + rows)
    assert ingest(tmp_path / "d.csv", tmp_path / "d.zarr").attrs["source"]["thousands_dot"] is True
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[4]", "patience=0"])
    train(str(tmp_path / "d.zarr"), cfg, tmp_path / "run", client=None)
    model = load_model(tmp_path / "run")
    (tmp_path / "new.csv").write_text("p;q;y\n1.250;2;a\n3,5;1;b\n2;0;c\n")
    like = ingest(tmp_path / "new.csv", tmp_path / "like.zarr", like=tmp_path / "d.zarr")
    alone = ingest(tmp_path / "new.csv", tmp_path / "alone.zarr")
    for st in (like, alone):  # 1.250 beside 3,5 is 1250, on its own and --like
        assert float(np.asarray(st.X[0, 0])) == 1250 and st.attrs["source"]["thousands_dot"] is True
    check_inputs(model, like.path, str(tmp_path / "p.parquet"))
    src = dict(like.attrs["source"], thousands_dot=False)  # as if its dots had been decimal points
    zarr.open_group(str(tmp_path / "like.zarr"), mode="r+").attrs["source"] = src
    with pytest.raises(StoreError, match=r"read its numbers with dots as decimal points, the training data with dots"):
        check_inputs(model, str(tmp_path / "like.zarr"), str(tmp_path / "q.parquet"))
