"""The ingest plan on its own: task inference, class naming, the refusal of unknown labels,
encodings, dtypes and final attributes, decided from in-memory profiles without writing anything."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import IngestError
from pipeline.ingest import _ColumnProfile, _parse
from pipeline.ingest_plan import (
    ArrayProfile,
    Columns,
    LabelProfile,
    Training,
    class_names,
    decide_target,
    infer_task,
    plan_arrays,
    plan_table,
    select_columns,
    table_labels,
)
from pipeline.store import RunningStats


def profiles_of(columns: dict[str, list]) -> dict[str, _ColumnProfile]:
    """Pass 1 over in-memory columns, in two batches (as CSV text: strings)."""
    out = {}
    for name, values in columns.items():
        pr = _ColumnProfile(name)
        half = len(values) // 2
        for row0, part in ((0, values[:half]), (half, values[half:])):
            pr.update(_parse(pa.array([str(v) for v in part], pa.string()), name), row0)
        out[name] = pr
    return out


def training(**kw) -> Training:
    base = dict(
        path="train.zarr",
        task="classification",
        classes=["no", "yes"],
        target={"name": "y", "kind": "string"},
        encodings=[{"name": "a", "kind": "numeric", "fill": 0.5}],
        feature_names=["a"],
        mean=[0.5],
        std=[2.0],
        n_features=1,
        y_ndim=1,
    )
    return Training(**{**base, **kw})


def test_infer_task():
    assert infer_task(LabelProfile("string", strings={"a": 3, "b": 1})) == "classification"
    assert infer_task(LabelProfile("numeric", values={float(v): 1 for v in range(50)})) == "classification"
    assert infer_task(LabelProfile("numeric", values={float(v): 1 for v in range(51)})) == "regression"
    assert infer_task(LabelProfile("numeric", values={0.0: 1, 1.0: 1}, integral=False)) == "regression"
    assert infer_task(LabelProfile("numeric", values=None)) == "regression"  # too many to count
    assert infer_task(LabelProfile("numeric", values={0.0: 1, 1.0: 1}, scalar=False)) == "regression"


def test_class_names():
    assert class_names([-1.0, 0.0, 2.0, 2.5]) == ["-1", "0", "2", "2.5"]


def test_table_labels_drop_a_trailing_dot_and_count_numbers_among_strings():
    tp = profiles_of({"y": ["<=50K", ">50K.", "<=50K.", "7"]})["y"]
    labels = table_labels(tp)
    assert labels.kind == "string" and labels.strings == {"<=50K": 2, ">50K": 1, "7": 1}
    t = decide_target(labels, None, None, "y")
    assert (t.task, t.classes, t.class_values, t.string_labels) == (
        "classification",
        ["7", "<=50K", ">50K"],
        None,
        True,
    )
    assert t.dtype == np.int32


def test_numeric_classes_are_named_from_their_values():
    t = decide_target(table_labels(profiles_of({"y": [3, 1, 1, 3, 2]})["y"]), None, None, "y")
    assert t.task == "classification" and t.classes == ["1", "2", "3"] and t.class_values == [1.0, 2.0, 3.0]
    r = decide_target(table_labels(profiles_of({"y": [0.5, 1.5, 2.25, 3.0]})["y"]), None, None, "y")
    assert r.task == "regression" and r.classes is None and r.dtype == np.float64  # regression targets unrounded


def test_refusals_without_a_training_store():
    single = table_labels(profiles_of({"y": ["x", "x", "x"]})["y"])
    with pytest.raises(IngestError, match=r"target column 'y' has a single class 'x'; a classifier needs at least 2"):
        decide_target(single, None, None, "y")
    strings = table_labels(profiles_of({"y": ["a", "b", "c"]})["y"])
    with pytest.raises(IngestError, match=r"non-numeric value 'a' at data row 0 .* task is regression"):
        decide_target(strings, "regression", None, "y")
    with pytest.raises(IngestError, match="not a 1-D array of class values"):
        decide_target(LabelProfile("numeric", values={0.0: 1, 1.0: 1}, scalar=False), "classification", None, "labels")
    with pytest.raises(IngestError, match="too many distinct values for classification"):
        decide_target(LabelProfile("numeric", values=None), "classification", None, "labels")


def test_labels_the_training_store_does_not_know_are_refused():
    like = training()
    known = table_labels(profiles_of({"y": ["yes", "no.", "no"]})["y"])
    assert decide_target(known, None, like, "y").classes == ["no", "yes"]
    unknown = table_labels(profiles_of({"y": ["yes", "maybe", "no"]})["y"])
    with pytest.raises(
        IngestError, match=r"labels \['maybe'\] are not among the classes of the training store 'train.zarr'"
    ):
        decide_target(unknown, None, like, "y")
    numeric_like = training(classes=["0", "1"], target={"name": "y", "kind": "numeric", "class_values": [0.0, 1.0]})
    with pytest.raises(IngestError, match=r"labels \['2.0'\] are not among the classes"):
        decide_target(
            LabelProfile("numeric", values={0.0: 3, 2.0: 1}, kind_from_dtype=True), None, numeric_like, "labels"
        )
    regression_like = training(task="regression", classes=None, target={"name": "y", "kind": "numeric"})
    with pytest.raises(IngestError, match="holds strings but the training store 'train.zarr' is a regression"):
        decide_target(LabelProfile("string", strings={"a": 1}, kind_from_dtype=True), None, regression_like, "labels")
    # unlabelled: nothing to check, the training store's classes hold
    t = decide_target(LabelProfile("numeric"), None, like, None)
    assert t.name is None and t.classes == ["no", "yes"] and t.string_labels


def test_select_columns():
    names = ["id", "a", "b", "y"]
    assert select_columns(names, target=None, drop=["id"], training=None, unlabelled=False, src="t.csv") == Columns(
        ["a", "b"], "y"
    )
    assert select_columns(names, target=None, drop=["y"], training=None, unlabelled=False, src="t.csv").target == "b"
    with pytest.raises(IngestError, match="both --target and --drop"):
        select_columns(names, target="y", drop=["y"], training=None, unlabelled=False, src="t.csv")
    cols = select_columns(["a", "extra"], target=None, drop=(), training=training(), unlabelled=True, src="t.csv")
    assert cols.read == ["a"] and cols.encodings == training().encodings
    with pytest.raises(IngestError, match="pass --unlabelled"):
        select_columns(["a", "extra"], target=None, drop=(), training=training(), unlabelled=False, src="t.csv")


def test_plan_table_encodings_layout_and_dtype():
    cats = [f"k{i:02d}" for i in range(17)]
    cols = {
        "n": [1, 2, 250, 3] * 17,
        "c": ["red", "blue", "red", "green"] * 17,
        "many": (cats * 4)[:68],
        "y": ["a", "b", "a", "b"] * 17,
    }
    columns = Columns(["n", "c", "many"], "y")
    plan = plan_table(
        columns,
        profiles_of(cols),
        n_out=68,
        task=None,
        encoding="auto",
        missing="impute",
        training=None,
        chunk_rows=None,
    )
    assert plan.feature_names == ["n", "c=blue", "c=green", "c=red", "many"]
    assert [(e["name"], e["kind"], e["offset"]) for e in plan.encodings] == [
        ("n", "numeric", 0),
        ("c", "onehot", 1),
        ("many", "ordinal", 4),
    ]
    assert plan.encodings[1]["fill"] == "red"  # the most frequent category
    assert plan.x_dtype == np.uint8 and plan.chunk_rows > 0 and plan.task == "classification"
    cols["n"][5] = "NA"  # an imputed mean is fractional: float32
    plan = plan_table(
        columns,
        profiles_of(cols),
        n_out=68,
        task=None,
        encoding="onehot",
        missing="impute",
        training=None,
        chunk_rows=100,
    )
    assert plan.x_dtype == np.float32 and plan.chunk_rows == 100 and plan.n_features == 21
    with pytest.raises(IngestError, match="every row has a missing value"):
        plan_table(
            columns,
            profiles_of(cols),
            n_out=0,
            task=None,
            encoding="auto",
            missing="drop",
            training=None,
            chunk_rows=None,
        )
    with pytest.raises(IngestError, match=r"column 'n' has a missing or infinite value \('NA'\) at data row 5"):
        plan_table(
            columns,
            profiles_of(cols),
            n_out=68,
            task=None,
            encoding="auto",
            missing="reject",
            training=None,
            chunk_rows=None,
        )


def test_final_attrs_use_the_training_statistics_under_like():
    xstats, ystats = RunningStats(1), RunningStats(1)
    xstats.update(np.array([[1.0], [3.0]]))
    cols = Columns(["a"], None, training().encodings)
    plan = plan_table(
        cols,
        profiles_of({"a": [1, 3]}),
        n_out=2,
        task=None,
        encoding="auto",
        missing="impute",
        training=training(),
        chunk_rows=None,
    )
    attrs = plan.final_attrs(xstats, ystats, np.zeros(2, np.int64))
    assert attrs == {"mean": [0.5], "std": [2.0], "labelled": False, "target": {"name": None, "kind": "string"}}
    alone = plan_table(
        Columns(["a"], "y"),
        profiles_of({"a": [1, 3], "y": [0.5, 1.5]}),
        n_out=2,
        task=None,
        encoding="auto",
        missing="impute",
        training=None,
        chunk_rows=None,
    )
    ystats.update(np.array([[0.5], [1.5]]))
    attrs = alone.final_attrs(xstats, ystats, np.zeros(0, np.int64))
    assert attrs["mean"] == [2.0] and attrs["std"] == [1.0]
    assert attrs["target"] == {"name": "y", "kind": "numeric", "mean": [1.0], "std": [0.5]}


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.bool_, np.uint8), (">i2", np.int16), (np.uint8, np.uint8), (np.int32, np.float32), (np.float64, np.float32)],
)
def test_plan_arrays_dtype_and_fill(dtype, expected):
    labels = LabelProfile("numeric", values={0.0: 2, 1.0: 2}, kind_from_dtype=True)
    profile = ArrayProfile(np.dtype(dtype), np.array([4.0, 0.0]), np.array([2.0, 0.0]), 1, 4, labels)
    plan = plan_arrays(profile, task=None, missing="drop", training=None, chunk_rows=None)
    assert plan.x_dtype == np.dtype(expected) and plan.n_rows == 3
    np.testing.assert_array_equal(plan.fill, [2.0, 0.0])
    assert plan.feature_names == ["x0", "x1"] and plan.classes == ["0", "1"] and plan.target.name == "labels"


def test_planning_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    columns = select_columns(["a", "y"], target=None, drop=(), training=None, unlabelled=False, src="t.csv")
    plan_table(
        columns,
        profiles_of({"a": [1.5, 2.5], "y": ["u", "v"]}),
        n_out=2,
        task=None,
        encoding="auto",
        missing="impute",
        training=None,
        chunk_rows=None,
    )
    assert list(tmp_path.iterdir()) == []
