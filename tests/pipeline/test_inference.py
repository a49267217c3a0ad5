"""Evaluation and prediction on the cluster: the model's own preprocessing, compatibility checks,
missing chunks, and what a forced prediction may replace."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, StoreError
from pipeline.inference import evaluate_store, predict_store
from pipeline.ingest import ingest
from pipeline.model import load_model
from pipeline.store import open_store
from pipeline.train import check_validation_store, train


def _csv(
    path: Path, n: int, seed: int, shift: float = 0.0, classes: str = "cat,dog,eel", columns: str = "a,b,c"
) -> Path:
    """Three features; the class is the largest of a, b, c (plus noise), named by ``classes``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    names = classes.split(",")
    y = np.argmax(X + 0.1 * rng.standard_normal((n, 3)), axis=1)
    keep = np.isin(np.asarray(["cat", "dog", "eel"])[y], names)
    order = {"a": 0, "b": 1, "c": 2}
    cols = [order[c] for c in columns.split(",")]
    lines = [f"{columns},label"] + [
        ",".join(f"{X[i, j] + shift:.4f}" for j in cols) + f",{'cat dog eel'.split()[y[i]]}"
        for i in range(n)
        if keep[i]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(client, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inference")
    tr = ingest(_csv(root / "tr.csv", 3000, 0), root / "tr.zarr")
    cfg = TrainConfig().with_overrides(["epochs=15", "hidden=[16]", "validation=0", "patience=0"])
    return Path(train(tr.path, cfg, root / "run", client=client).run_dir), root


def _accuracy(model, store) -> float:
    st = open_store(store)
    return float(np.mean(model.predict_index(st.X[:]) == st.y[:]))


def test_one_model_gives_one_answer_on_every_path(run, client, tmp_path):
    """Rows are standardized with the model's statistics, never the test store's own."""
    run_dir, root = run
    src = _csv(tmp_path / "shift.csv", 1500, 1, shift=1.5)  # a shifted test set: its own mean differs
    own = ingest(src, tmp_path / "own.zarr")
    like = ingest(src, tmp_path / "like.zarr", like=root / "tr.zarr")
    assert not np.allclose(own.mean, like.mean)
    model = load_model(run_dir)
    m_own = evaluate_store(model, own.path, client)
    m_like = evaluate_store(model, like.path, client)
    assert m_own["accuracy"] == m_like["accuracy"]
    assert m_own["accuracy"] == pytest.approx(_accuracy(model, own.path), abs=1e-12)
    out = tmp_path / "p.zarr"
    predict_store(model, own.path, str(out), client)
    import zarr

    np.testing.assert_array_equal(  # the labels, as Model.predict and the Parquet output give them
        zarr.open_group(str(out), mode="r")["prediction"][:].astype(object), model.predict(open_store(own.path).X[:])
    )


def test_store_predictions_and_metrics_are_the_arrays_to_the_last_bit(run, client, tmp_path):
    """`pipeline predict` / `evaluate` on a store give what ``Model.predict`` gives on its rows in
    memory, bit for bit: probabilities, regression values (de-standardized) and their metrics."""
    import zarr
    from sklearn.metrics import log_loss, mean_absolute_error, r2_score

    run_dir, root = run
    model = load_model(run_dir)
    st = open_store(root / "tr.zarr")
    out = tmp_path / "proba.zarr"
    predict_store(model, st.path, str(out), client, proba=True)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["proba"][:], model.predict_proba(st.X[:]))
    m = evaluate_store(model, st.path, client)
    assert m["log_loss"] == pytest.approx(log_loss(st.y[:], model.predict_proba(st.X[:]), labels=[0, 1, 2]), rel=1e-12)

    rng = np.random.default_rng(3)  # a regression store: y = a - 2b + noise, targets of scale ~1e3
    X = rng.standard_normal((2000, 3))
    y = 1000.0 + 300.0 * (X[:, 0] - 2 * X[:, 1]) + rng.standard_normal(2000)
    src = tmp_path / "reg.csv"
    lines = [f"{a:.5f},{b:.5f},{c:.5f},{t:.4f}" for (a, b, c), t in zip(X, y, strict=True)]
    src.write_text("a,b,c,y\n" + "\n".join(lines) + "\n")
    reg = ingest(src, tmp_path / "reg.zarr", target="y", task="regression")
    cfg = TrainConfig().with_overrides(["epochs=3", "hidden=[8]", "validation=0", "patience=0"])
    rmodel = load_model(train(reg.path, cfg, tmp_path / "rrun", client=client).run_dir)
    rout = tmp_path / "reg.parquet"
    predict_store(rmodel, reg.path, str(rout), client)
    table = pq.read_table(rout)
    got = table.column("prediction").to_numpy()[np.argsort(table.column("row").to_numpy())]
    rs = open_store(reg.path)
    want = rmodel.predict(rs.X[:])
    np.testing.assert_array_equal(got, want)
    rm = evaluate_store(rmodel, reg.path, client)
    assert rm["r2"] == pytest.approx(r2_score(rs.y[:], want), rel=1e-12)
    assert rm["mae"] == pytest.approx(mean_absolute_error(rs.y[:], want), rel=1e-12)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(run, tmp_path):
    """One line naming the output and the fix, from the checks that run before a cluster starts."""
    from pipeline.inference import check_inputs

    run_dir, root = run
    model = load_model(run_dir)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is not a directory; choose another location"):
        check_inputs(model, str(root / "tr.zarr"), str(tmp_path / "notes.txt" / "p.parquet"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    if Path("/proc/self").is_dir():  # a directory no file can be created in, even by root
        with pytest.raises(PipelineError, match="cannot be written in '/proc'.*choose a writable location"):
            check_inputs(model, str(root / "tr.zarr"), "/proc/p.parquet")


def test_a_store_laid_out_differently_is_refused(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    swapped = ingest(_csv(tmp_path / "sw.csv", 600, 2, columns="b,a,c"), tmp_path / "sw.zarr")
    for call in (
        lambda: evaluate_store(model, swapped.path, client),
        lambda: predict_store(model, swapped.path, str(tmp_path / "p.parquet"), client),
    ):
        with pytest.raises(StoreError, match=r"features in another order \(feature 0 is 'b', expected 'a'\).*--like"):
            call()
    assert not (tmp_path / "p.parquet").exists()
    # the same columns ingested --like the training store are taken by name
    sw_like = ingest(tmp_path / "sw.csv", tmp_path / "sw-like.zarr", like=root / "tr.zarr")
    assert evaluate_store(model, sw_like.path, client)["accuracy"] > 0.6
    with pytest.raises(StoreError, match="validation store .* features in another order"):
        check_validation_store(open_store(root / "tr.zarr"), swapped.path)


def test_a_store_without_one_class(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    src = _csv(tmp_path / "nocat.csv", 900, 3, classes="dog,eel")
    alone = ingest(src, tmp_path / "alone.zarr")
    assert alone.classes == ["dog", "eel"]  # indices 0/1 mean dog/eel here, cat/dog to the model
    with pytest.raises(StoreError, match=r"classes \[dog, eel\], expected \[cat, dog, eel\]"):
        evaluate_store(model, alone.path, client)
    like = ingest(src, tmp_path / "like.zarr", like=root / "tr.zarr")  # the model's class list
    m = evaluate_store(model, like.path, client)
    assert m["accuracy"] == pytest.approx(_accuracy(model, like.path), abs=1e-12)
    assert np.asarray(m["confusion"])[0].sum() == 0  # no row is a cat
    check_validation_store(open_store(root / "tr.zarr"), like.path)  # a subset is fine
    with pytest.raises(StoreError, match="validation store .* classes"):
        check_validation_store(open_store(root / "tr.zarr"), alone.path)


def test_a_missing_chunk_stops_evaluation_and_prediction(run, client, tmp_path):
    run_dir, root = run
    st = ingest(_csv(tmp_path / "te.csv", 3000, 4), tmp_path / "te.zarr", like=root / "tr.zarr", chunk_rows=1024)
    Path(st.path, "y", "c", "1").unlink()
    model = load_model(run_dir)
    with pytest.raises(StoreError, match=r"chunk 1 of array 'y' \(rows 1024:2048\) in store .*te\.zarr' is missing"):
        evaluate_store(model, st.path, client)
    Path(st.path, "X", "c", "2", "0").unlink()
    with pytest.raises(StoreError, match=r"chunk 2 of array 'X' \(rows 2048:3000\) .* is missing"):
        predict_store(model, st.path, str(tmp_path / "p.zarr"), client)
    assert not (tmp_path / "p.zarr").exists()


def test_force_replaces_only_earlier_predictions(run, client, tmp_path):
    run_dir, root = run
    model = load_model(run_dir)
    te = ingest(_csv(tmp_path / "te.csv", 500, 5), tmp_path / "te.zarr", like=root / "tr.zarr")
    out = tmp_path / "p.parquet"
    predict_store(model, te.path, str(out), client)
    with pytest.raises(PipelineError, match="already exists; pass --force"):
        predict_store(model, te.path, str(out), client)
    predict_store(model, te.path, str(out), client, proba=True, force=True)
    assert "proba_cat" in pq.read_table(out).column_names
    zout = tmp_path / "p.zarr"
    predict_store(model, te.path, str(zout), client)
    predict_store(model, te.path, str(zout), client, force=True)
    # a user's own Parquet dataset, a single Parquet file, a store: never replaced
    (tmp_path / "sales.parquet").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "sales.parquet" / "part-000000.parquet")
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "one.parquet")
    ingest(tmp_path / "te.csv", tmp_path / "other.zarr", like=root / "tr.zarr")
    for name in ("sales.parquet", "one.parquet", "other.zarr"):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(PipelineError, match="--force replaces only earlier predictions"):
            predict_store(model, te.path, str(tmp_path / name), client, force=True)
        assert sorted(os.listdir(tmp_path)) == before
    assert pq.read_table(tmp_path / "sales.parquet").column_names == ["x"]
    assert open_store(tmp_path / "other.zarr").n_rows == 500
    with pytest.raises(StoreError, match="is the store"):  # the input itself
        predict_store(model, te.path, te.path, client, force=True)


def _r2_in_batches(y: np.ndarray, pred: np.ndarray, batch: int = 700) -> float:
    """R^2 as evaluation computes it: partial sums per batch, merged, finished."""
    from pipeline.metrics import evaluate_arrays, finish_metrics, merge_metrics

    k = 1 if y.ndim == 1 else y.shape[1]
    target = {"mean": np.zeros(k), "std": np.ones(k)}
    parts = [evaluate_arrays(pred[a : a + batch], y[a : a + batch], target, k) for a in range(0, len(y), batch)]
    return finish_metrics(merge_metrics(parts), target)["r2"]


def test_r2_of_a_constant_target_is_defined_as_scikit_learn_does():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    y = np.full(5000, 5.3, np.float32)  # rounding noise makes its sum of squares not quite zero
    pred = y + 0.01 * rng.standard_normal(5000)
    assert _r2_in_batches(y, pred) == r2_score(y, pred) == 0.0
    assert _r2_in_batches(y, y.astype(np.float64)) == r2_score(y, y) == 1.0
    y2 = np.column_stack([rng.standard_normal(5000) * 3 + 1, y])  # one constant column of two
    p2 = np.column_stack([y2[:, 0] + rng.standard_normal(5000), pred])
    assert _r2_in_batches(y2, p2) == pytest.approx(r2_score(y2, p2), abs=1e-9)
    yv = y2[:, 0]
    assert _r2_in_batches(yv, p2[:, 0]) == pytest.approx(r2_score(yv, p2[:, 0]), abs=1e-9)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_validation_store_is_standardized_like_the_training_store(mode, run, client, tmp_path):
    """Epoch validation on a store with its own statistics agrees with evaluating the model."""
    _, root = run
    val = ingest(_csv(tmp_path / "val.csv", 1500, 6, shift=1.0), tmp_path / "val.zarr")  # not --like
    cfg = TrainConfig().with_overrides(
        ["epochs=1", "hidden=[16]", "patience=0", f"mode={mode}", f"validation_store={val.path!r}".replace("'", '"')]
    )
    res = train(str(root / "tr.zarr"), cfg, tmp_path / "run", client=client)
    m = evaluate_store(load_model(res.run_dir), val.path, client)
    assert res.final["val_n"] == 1500
    assert res.final["val_accuracy"] == pytest.approx(m["accuracy"], abs=1e-12)
    assert res.final["val_loss"] == pytest.approx(m["loss"], rel=1e-5)


def test_an_ordinal_column_encoded_with_other_categories_is_refused(tmp_path):
    from pipeline.store import layout_mismatch, layout_of

    (tmp_path / "tr.csv").write_text(
        "x,colour,y\n" + "".join(f"{i},{'red green blue'.split()[i % 3]},{i % 2}\n" for i in range(30))
    )
    (tmp_path / "te.csv").write_text(
        "x,colour,y\n" + "".join(f"{i},{'red blue'.split()[i % 2]},{i % 2}\n" for i in range(30))
    )
    tr = ingest(tmp_path / "tr.csv", tmp_path / "tr.zarr", encoding="ordinal")
    alone = ingest(tmp_path / "te.csv", tmp_path / "alone.zarr", encoding="ordinal")
    like = ingest(tmp_path / "te.csv", tmp_path / "like.zarr", like=tr.path)
    assert alone.feature_names == tr.feature_names  # same names: only the codes differ
    problem = layout_mismatch(layout_of(tr), alone, labels=True)
    assert problem == (
        "encodes column 'colour' as ordinal with categories blue, red, "
        "expected ordinal with categories blue, green, red"
    )
    assert layout_mismatch(layout_of(tr), like, labels=True) is None
