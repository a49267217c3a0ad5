"""Ingest writes the same stores it always wrote: array bytes and attributes of a few sources
(CSV with strings and missing values, ``like=`` and unlabelled ingests, Parquet, NumPy with
numeric and string labels, a target column of an array, IDX) against recorded expectations.

The expectations in ``ingest_golden.json`` are digests of the X/y arrays (dtype, shape, chunks,
SHA-256 of the bytes) and the store attributes, less what depends on the machine (paths and
creation time). ``python -m tests.pipeline.test_ingest_golden`` rewrites them: do that only for
an intended change of what ingest writes, and say so.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import UnseenCategoryWarning, ingest
from pipeline.store import Store

GOLDEN = Path(__file__).with_name("ingest_golden.json")
_CATS20 = [f"k{i:02d}" for i in range(20)]


def _write_table_csv(path: Path, n: int, seed: int, extra: str | None = None, labelled: bool = True) -> None:
    rng = np.random.default_rng(seed)
    lines = ["num,count,color,city" + (",label" if labelled else "")]
    for i in range(n):
        num = "" if i % 17 == 3 else ("NA" if i % 29 == 5 else f"{rng.normal():.4f}")
        count = str(int(rng.integers(0, 200)))
        color = "?" if i % 23 == 7 else str(rng.choice(["red", "green", "blue"]))
        city = _CATS20[int(rng.integers(0, 20))]
        if extra is not None and i % 11 == 0:
            color = extra
        row = [num, count, color, city]
        if labelled:
            row.append(str(rng.choice(["<=50K", ">50K", "<=50K.", ">50K."])))
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")


def _csv(tmp: Path) -> Store:
    _write_table_csv(tmp / "tr.csv", 400, 0)
    return ingest(tmp / "tr.csv", tmp / "csv.zarr", chunk_rows=64)


def _csv_drop(tmp: Path) -> Store:
    _write_table_csv(tmp / "tr.csv", 400, 0)
    return ingest(tmp / "tr.csv", tmp / "csv_drop.zarr", missing="drop", encoding="ordinal")


def _csv_like(tmp: Path) -> Store:
    train = _csv(tmp)
    _write_table_csv(tmp / "te.csv", 150, 1, extra="purple")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenCategoryWarning)
        return ingest(tmp / "te.csv", tmp / "csv_like.zarr", like=train.path)


def _csv_unlabelled(tmp: Path) -> Store:
    train = _csv(tmp)
    _write_table_csv(tmp / "nolabel.csv", 90, 2, labelled=False)
    return ingest(tmp / "nolabel.csv", tmp / "csv_unlabelled.zarr", like=train.path, unlabelled=True)


def _semicolon(tmp: Path) -> Store:
    (tmp / "euro.csv").write_bytes("\ufeffa;b;y\n1,5;3;0,25\n2,25;4;1,5\n;5;2\n4;250;3,75\n".encode())
    return ingest(tmp / "euro.csv", tmp / "euro.zarr")


def _parquet(tmp: Path) -> Store:
    rng = np.random.default_rng(3)
    n = 1000
    t = pa.table(
        {
            "f": pa.array(np.where(np.arange(n) % 13 == 0, np.nan, rng.normal(size=n))),
            "i": pa.array(rng.integers(0, 50, n)),
            "s": pa.array([str(v) for v in rng.choice(["u", "v", "w"], n)]).dictionary_encode(),
            "b": pa.array(rng.random(n) < 0.5),
            "label": pa.array(rng.integers(0, 4, n)),
        }
    )
    pq.write_table(t, tmp / "t.parquet", row_group_size=300)
    return ingest(tmp / "t.parquet", tmp / "pq.zarr", chunk_rows=256)


def _parquet_regression(tmp: Path) -> Store:
    rng = np.random.default_rng(4)
    n = 600
    t = pa.table({"a": rng.normal(size=n), "b": rng.integers(0, 255, n), "target": rng.normal(size=n) * 10})
    pq.write_table(t, tmp / "r.parquet", row_group_size=250)
    return ingest(tmp / "r.parquet", tmp / "pqr.zarr", rows="50:550")


def _npy_labels(tmp: Path) -> Store:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(700, 5))
    X[rng.random(X.shape) < 0.02] = np.nan
    np.save(tmp / "x.npy", X)
    np.save(tmp / "y.npy", rng.choice([2, 5, 7], 700))
    return ingest(tmp / "x.npy", tmp / "npy.zarr", labels=tmp / "y.npy", chunk_rows=100)


def _npy_like(tmp: Path) -> Store:
    train = _npy_labels(tmp)
    rng = np.random.default_rng(6)
    np.save(tmp / "xt.npy", rng.normal(size=(120, 5)))
    np.save(tmp / "yt.npy", rng.choice([2, 7], 120))
    return ingest(tmp / "xt.npy", tmp / "npy_like.zarr", labels=tmp / "yt.npy", like=train.path)


def _npy_strings(tmp: Path) -> Store:
    rng = np.random.default_rng(7)
    np.save(tmp / "xs.npy", rng.integers(0, 256, (300, 2, 3), dtype=np.uint8))
    np.save(tmp / "ys.npy", rng.choice(np.array(["cat", "dog", " bird "]), 300))
    return ingest(tmp / "xs.npy", tmp / "npy_str.zarr", labels=tmp / "ys.npy")


def _npy_target_column(tmp: Path) -> Store:
    rng = np.random.default_rng(8)
    A = rng.normal(size=(500, 4)).astype(np.float32)
    A[::37, 1] = np.inf
    np.save(tmp / "a.npy", A)
    return ingest(tmp / "a.npy", tmp / "npy_col.zarr", target=0, missing="drop")


def _npz_int16(tmp: Path) -> Store:
    rng = np.random.default_rng(9)
    np.savez(tmp / "d.npz", X=rng.integers(-300, 300, (256, 3)).astype(">i2"), y=rng.normal(size=(256, 2)))
    return ingest(tmp / "d.npz", tmp / "npz.zarr")


def _idx(tmp: Path) -> Store:
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (300, 7, 7), dtype=np.uint8)
    labels = rng.integers(0, 10, 300).astype(np.uint8)
    for name, arr in (("img-idx3-ubyte", images), ("lab-idx1-ubyte", labels)):
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (tmp / name).write_bytes(head + arr.tobytes())
    return ingest(tmp / "img-idx3-ubyte", tmp / "idx.zarr", labels=tmp / "lab-idx1-ubyte", chunk_rows=128)


CASES: dict[str, Callable[[Path], Store]] = {
    "csv": _csv,
    "csv_drop": _csv_drop,
    "csv_like": _csv_like,
    "csv_unlabelled": _csv_unlabelled,
    "semicolon": _semicolon,
    "parquet": _parquet,
    "parquet_regression": _parquet_regression,
    "npy_labels": _npy_labels,
    "npy_like": _npy_like,
    "npy_strings": _npy_strings,
    "npy_target_column": _npy_target_column,
    "npz_int16": _npz_int16,
    "idx": _idx,
}


def _digest(a: Any) -> dict[str, Any]:
    data = np.ascontiguousarray(a[:])
    return {
        "dtype": str(data.dtype),
        "shape": list(data.shape),
        "chunks": list(a.chunks),
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
    }


def summary(store: Store) -> dict[str, Any]:
    """What a store holds, less its paths and creation time."""
    attrs = json.loads(json.dumps(dict(store.attrs)))
    attrs.pop("created", None)
    for key in ("path", "labels", "like"):
        attrs.get("source", {}).pop(key, None)
    return {"X": _digest(store.X), "y": _digest(store.y), "attrs": attrs}


@pytest.mark.parametrize("name", sorted(CASES))
def test_store_matches_golden(tmp_path: Path, name: str) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    got = summary(CASES[name](tmp_path))
    assert got["X"] == expected["X"]
    assert got["y"] == expected["y"]
    assert got["attrs"] == expected["attrs"]


def _record() -> None:
    out = {}
    for name, make in sorted(CASES.items()):
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = summary(make(Path(tmp)))
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(out)} stores)", file=sys.stderr)


if __name__ == "__main__":
    _record()
