"""Serving a trained model: ``load_model`` once, then predictions from many threads at once, the
model pickled after it has predicted, and refusal of a model file whose metadata was edited."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.ingest import ingest
from pipeline.model import Model, load_model
from pipeline.store import open_store
from pipeline.train import train
from tests.pipeline.helpers import LETTER, invoke, one_line_error


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A run trained in this process on 3,000 rows of letter, a store of 1,000 other rows and
    those rows in memory."""
    root = tmp_path_factory.mktemp("serving")
    tr = ingest(LETTER, root / "train.zarr", target=0, rows="0:3000")
    te = ingest(LETTER, root / "test.zarr", target=0, rows="16000:17000", like=tr.path)
    cfg = TrainConfig().with_overrides(["epochs=2", "hidden=[32, 16]", "validation=0", "patience=0"])
    run = Path(train(tr.path, cfg, root / "run").run_dir)
    return run, Path(te.path), np.asarray(open_store(te.path).X[:])


def test_requests_from_many_threads_get_the_answers_of_one_thread(served):
    """Requests of 1 to 300 rows from 8 threads at once: each answer is, to the bit, what the
    same request alone gets (one set of kernel buffers shared by the threads mixed their rows)."""
    run, _, X = served
    model = load_model(run)
    requests = [X[a : a + 1 + a % 300] for a in range(0, len(X), 3)]
    alone = [model.predict_proba(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            answers = list(pool.map(model.predict_proba, requests))
            wrong = [i for i, (a, b) in enumerate(zip(answers, alone, strict=True)) if not np.array_equal(a, b)]
            assert wrong == [], f"{len(wrong)} of {len(requests)} requests answered with other rows"
            labels = list(pool.map(model.predict, requests))
            assert all(np.array_equal(a, model.predict(r)) for a, r in zip(labels, requests, strict=True))


def test_a_model_that_has_predicted_pickles_and_a_copy_predicts_with_its_own_weights(served):
    """pickle (joblib, a process pool) takes a model that has predicted (its kernels held a module and
    did not pickle); a copy with other weights predicts with them, not the original's kernels."""
    run, _, X = served
    model = load_model(run)
    before = model.predict_proba(X)
    again = pickle.loads(pickle.dumps(model))
    assert np.array_equal(again.predict_proba(X), before)
    halved = dataclasses.replace(model, params=model.params * np.float32(0.5))
    fresh = Model(**{f.name: getattr(halved, f.name) for f in dataclasses.fields(Model) if f.init})
    assert np.array_equal(halved.predict_proba(X), fresh.predict_proba(X))
    assert not np.array_equal(halved.predict_proba(X), before)


def _edited(run: Path, dest: Path, edit) -> Path:
    """A copy of the run's model file with its metadata changed by ``edit`` (as a text editor
    would change it: the weights and their checksum are kept)."""
    with np.load(run / "model.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    edit(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(dest, **arrays)
    return dest


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.__setitem__("task", "regression"), "a regression model with the classification loss"),
        (lambda m: m.__setitem__("classes", m["classes"][:-1]), "25 class name(s) for 26 outputs"),
        (lambda m: m["spec"].pop("hidden"), "its spec lacks hidden"),
        (lambda m: m["spec"].__setitem__("hidden", [16, 32]), "needs"),
        (lambda m: m["spec"].__setitem__("n_in", "16"), "layer widths"),
        (lambda m: m.__setitem__("feature_names", m["feature_names"][:3]), "its feature names 3"),
        (lambda m: m.__setitem__("model_format", "1"), "model format '1', not a number"),
    ],
)
def test_a_model_file_with_edited_metadata_is_refused_when_loaded(served, tmp_path, edit, problem):
    """Only the weights are checksummed: an edited architecture, task or class list gave a
    traceback at the first prediction, or predictions that were wrong (class probabilities
    returned as regression values, labels from another class list)."""
    run, _, _ = served
    path = _edited(run, tmp_path / "model.npz", edit)
    with pytest.raises(CheckpointError, match="edited or damaged") as err:
        load_model(path)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_predict_with_an_edited_model_file_is_one_line_and_writes_nothing(served, tmp_path):
    run, store, _ = served
    path = _edited(run, tmp_path / "model.npz", lambda m: m["spec"].pop("hidden"))
    one_line_error(invoke("predict", path, store, tmp_path / "p.zarr"), "its spec lacks hidden", "edited or damaged")
    assert not (tmp_path / "p.zarr").exists()


def test_requests_in_other_shapes_are_refused_naming_the_problem(served):
    """A web request's rows come as dicts, a frame with extra fields, one row, nullable columns:
    each refusal names what is wrong and how to give the rows (they said "got shape (5,)", listed
    the same first names twice, or called a missing value "not numbers")."""
    import pandas as pd

    run, store, X = served
    model = load_model(run)
    frame = pd.DataFrame(X[:5], columns=model.feature_names)
    with pytest.raises(ValueError, match=r"^X is a list of dicts; .*pandas.DataFrame\(X\)\[model.feature_names\]"):
        model.predict(frame.to_dict("records"))
    with pytest.raises(ValueError, match=r"^X is a dict; "):
        model.predict(frame.to_dict("list"))
    with pytest.raises(ValueError, match=r"^X has columns that are not the model's features \(request_id\); "):
        model.predict(frame.assign(request_id=7))
    with pytest.raises(ValueError, match=r"one row as a 1-D array .*X.reshape\(1, -1\)"):
        model.predict(X[0])
    nullable = frame.astype("Float64")
    nullable.iloc[3, 2] = pd.NA
    with pytest.raises(ValueError, match=r"^Input X contains NaN \(row 3, feature 2 \('c3'\)\)"):
        model.predict(nullable)
    text = frame.astype(object)
    text.iloc[1, 0] = "n/a"
    with pytest.raises(ValueError, match=r"^Input X holds 'n/a' at row 1, feature 0 \('c1'\), which is not a number"):
        model.predict(text)
    with pytest.raises(ValueError, match=r"^X is a path \('.*test.zarr'\), not rows; .*`pipeline predict MODEL STORE"):
        model.predict(str(store))
    assert np.array_equal(model.predict_proba(frame.astype("Float64")), model.predict_proba(X[:5]))
    assert model.predict(X[:0]).shape == (0,) and model.predict_proba(X[:0]).shape == (0, 26)
