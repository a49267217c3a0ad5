"""An ingest error naming a data row of a Parquet dataset of several files names the file and
the row in it: a dataset written by Spark or Dask has hundreds of part files, and a global row
number alone does not say which one to open."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import IngestError
from pipeline.ingest import ingest


def _dataset(root: str, bad_file: int, bad_row: int, column: dict) -> str:
    """Three part files of 1,000 rows; ``column(i, values)`` may spoil file ``i``'s values."""
    os.makedirs(root)
    for i in range(3):
        a = np.arange(1000, dtype=np.float64) + i
        y = [float(v % 2) for v in range(1000)]
        cols = {"a": a, "b": a * 2, "y": y}
        if i == bad_file:
            cols = column(cols, bad_row)
        pq.write_table(pa.table(cols), os.path.join(root, f"part.{i}.parquet"))
    return root


def _huge(cols: dict, r: int) -> dict:
    cols["a"] = cols["a"].copy()
    cols["a"][r] = 1e39
    return cols


def _missing_target(cols: dict, r: int) -> dict:
    cols["y"] = pa.array([None if k == r else v for k, v in enumerate(cols["y"])], pa.float64())
    return cols


def test_a_value_beyond_float32_names_its_file_and_row(tmp_path):
    src = _dataset(str(tmp_path / "ds"), 1, 500, _huge)
    with pytest.raises(IngestError, match=r"at data row 1500 \(0-based; row 500 of file 'part\.1\.parquet'\)"):
        ingest(src, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_a_missing_target_names_its_file_and_row_under_a_row_range(tmp_path):
    src = _dataset(str(tmp_path / "ds"), 2, 7, _missing_target)
    # --rows counts data rows of the whole dataset; the file's own row is still named
    with pytest.raises(IngestError, match=r"at data row 2007 \(0-based; row 7 of file 'part\.2\.parquet'\)"):
        ingest(src, tmp_path / "s.zarr", target="y", missing="reject", rows="1500:")


def test_a_single_file_names_the_row_alone(tmp_path):
    src = _dataset(str(tmp_path / "ds"), 0, 3, _huge)
    with pytest.raises(IngestError, match=r"at data row 3 \(0-based\), beyond") as info:
        ingest(os.path.join(src, "part.0.parquet"), tmp_path / "s.zarr")
    assert "file" not in str(info.value).split("beyond")[0]
