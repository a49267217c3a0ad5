"""A column-major (Fortran-ordered) .npy, which ``np.save(df.to_numpy())`` of a pandas frame
often writes, is ingested into the same store as its row-major copy, streamed in row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.errors import IngestError
from pipeline.ingest import ingest


def _same(a: str, b: str) -> None:
    sa, sb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert sa["X"].shape == sb["X"].shape
    np.testing.assert_array_equal(sa["X"][:], sb["X"][:])
    np.testing.assert_array_equal(sa["y"][:], sb["y"][:])
    assert sa.attrs["mean"] == sb.attrs["mean"] and sa.attrs["std"] == sb.attrs["std"]


@pytest.mark.parametrize("shape", [(2500, 7), (1800, 4, 5)])
def test_a_fortran_ordered_array_is_the_store_of_its_c_ordered_copy(tmp_path, shape):
    rng = np.random.default_rng(0)
    X = rng.random(shape).astype(np.float32)
    y = rng.integers(0, 3, shape[0])
    assert np.asfortranarray(X).flags.f_contiguous and not np.asfortranarray(X).flags.c_contiguous
    np.save(tmp_path / "xf.npy", np.asfortranarray(X))
    np.save(tmp_path / "xc.npy", X)
    np.save(tmp_path / "y.npy", y)
    for name in ("xf", "xc"):  # chunks of 700 rows: several blocks, the last one short
        ingest(tmp_path / f"{name}.npy", tmp_path / f"{name}.zarr", labels=tmp_path / "y.npy", chunk_rows=700)
    _same(str(tmp_path / "xf.zarr"), str(tmp_path / "xc.zarr"))
    assert zarr.open_group(str(tmp_path / "xf.zarr"), mode="r")["X"].shape == (shape[0], int(np.prod(shape[1:])))


def test_fortran_ordered_features_and_targets_under_a_row_range(tmp_path):
    rng = np.random.default_rng(1)
    X, Y = rng.random((3000, 6)), rng.random((3000, 2))
    np.save(tmp_path / "xf.npy", np.asfortranarray(X))
    np.save(tmp_path / "yf.npy", np.asfortranarray(Y))
    np.save(tmp_path / "xc.npy", X)
    np.save(tmp_path / "yc.npy", Y)
    for name in ("f", "c"):
        ingest(tmp_path / f"x{name}.npy", tmp_path / f"{name}.zarr", labels=tmp_path / f"y{name}.npy", rows="1234:2901")
    _same(str(tmp_path / "f.zarr"), str(tmp_path / "c.zarr"))
    assert zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["X"].shape == (1667, 6)


def test_a_fortran_ordered_array_inside_an_npz_is_refused_with_the_fix(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", X=np.asfortranarray(rng.random((100, 3))), y=rng.integers(0, 2, 100))
    with pytest.raises(IngestError, match=r"Fortran-ordered inside an archive; save it with np\.ascontiguousarray"):
        ingest(tmp_path / "d.npz", tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()


def test_the_command_says_how_many_rows_of_an_array_it_imputed(tmp_path):
    """A NumPy source's NaN and inf are imputed with the training mean, as a CSV's missing cells
    are, and the command says so as it does for CSV (it said nothing)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    rng = np.random.default_rng(3)
    X = rng.random((300, 4))
    X[[5, 9], 2], X[17, 0] = np.nan, np.inf
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", rng.integers(0, 2, 300))
    args = ["ingest", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    res = CliRunner().invoke(cli, [*args[:2], str(tmp_path / "a.zarr"), *args[2:]])
    assert res.exit_code == 0, res.output
    assert "warning: 3 rows hold missing or infinite values (NaN, inf), imputed with the training mean" in res.stderr
    stored = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert np.isfinite(stored["X"][:]).all()
    res = CliRunner().invoke(cli, [*args[:2], str(tmp_path / "b.zarr"), *args[2:], "--missing", "drop"])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["X"].shape == (297, 4)
