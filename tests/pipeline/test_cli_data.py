"""`pipeline ingest / synth / inspect` through the real command: output, messages, exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.store import StoreWriter, open_store
from tests.pipeline.helpers import LETTER, corrupt_chunk


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fails(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert "Traceback" not in result.output


def test_make_run_sequence(tmp_path):
    tr, te = tmp_path / "letter-train.zarr", tmp_path / "letter-test.zarr"
    r = run("ingest", LETTER, tr, "--target", "0", "--rows", "0:16000", "--force")
    assert r.exit_code == 0, r.output
    assert "16,000 rows x 16 features" in r.output and "26 classes" in r.output
    r = run("ingest", LETTER, te, "--target", "0", "--rows", "16000:", "--like", tr, "--force")
    assert r.exit_code == 0, r.output
    assert open_store(te).n_rows == 4000 and open_store(te).classes == open_store(tr).classes
    r = run("inspect", tr)
    assert r.exit_code == 0, r.output
    for frag in ("(16000, 16) uint8", "classification", "Crc32cCodec", "classes  26", "bytes on disk"):
        assert frag in r.output, frag
    r = run("inspect", tr, "--json", "--verify")
    info = json.loads(r.output)
    assert info["rows"] == 16000 and info["verify"]["bad"] == [] and sum(info["classes"].values()) == 16000


def test_subprocess_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("pipeline")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    p = subprocess.run(
        [*cmd, "ingest", str(tmp_path / "nope.csv"), str(tmp_path / "x.zarr")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.startswith("error: source file") and "does not exist" in p.stderr


def test_synth_command(tmp_path):
    r = run("synth", tmp_path / "s.zarr", "--rows", "5000", "--features", "12", "--classes", "3", "--seed", "2")
    assert r.exit_code == 0, r.output
    st = open_store(tmp_path / "s.zarr")
    assert (st.n_rows, st.n_features, st.classes) == (5000, 12, ["0", "1", "2"])
    r = run("synth", tmp_path / "r.zarr", "--rows", "100", "--features", "3", "--regression", "--codec", "zstd")
    assert r.exit_code == 0 and open_store(tmp_path / "r.zarr").task == "regression"
    fails(run("synth", tmp_path / "s.zarr", "--rows", "10", "--features", "2"), "exists; pass --force")
    fails(
        run("synth", tmp_path / "t.zarr", "--rows", "10", "--features", "2", "--classes", "3", "--regression"),
        "exclude each other",
    )


def test_help_has_examples():
    for cmd in ("ingest", "synth", "inspect"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output


# ---- errors a user can fix: one line, exit status 1 ---------------------------------------------


def test_missing_source(tmp_path):
    fails(run("ingest", tmp_path / "nope.csv", tmp_path / "s.zarr"), "nope.csv", "does not exist")


def test_unknown_format(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    fails(run("ingest", tmp_path / "blob.bin", tmp_path / "s.zarr"), "cannot tell the format", "--format")
    r = run("ingest", tmp_path / "blob.bin", tmp_path / "s.zarr", "--format", "xls")
    assert r.exit_code == 2 and "xls" in r.stderr  # click's usage error


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    fails(run("ingest", tmp_path / "e.csv", tmp_path / "s.zarr"), "e.csv", "is empty")
    (tmp_path / "c.csv").write_text("|just a comment\n\n")
    fails(run("ingest", tmp_path / "c.csv", tmp_path / "s.zarr"), "empty")


def test_ragged_rows(tmp_path):
    (tmp_path / "r.csv").write_text("a,b,c\n1,2,x\n3,4,y\n5,6\n7,8,x\n")
    fails(run("ingest", tmp_path / "r.csv", tmp_path / "s.zarr"), "ragged", "line 4", "2 fields, expected 3")
    assert not (tmp_path / "s.zarr").exists()


def test_non_numeric_value(tmp_path):
    rows = "\n".join(f"{i},{i * 2},{i % 2}" for i in range(50))
    (tmp_path / "n.csv").write_text("a,b,label\n" + rows + "\n3,oops,1\n")
    fails(run("ingest", tmp_path / "n.csv", tmp_path / "s.zarr"), "column 'b'", "'oops'", "data row 50")


def test_target_absent(tmp_path):
    fails(run("ingest", LETTER, tmp_path / "s.zarr", "--target", "price"), "target column 'price' not found")
    fails(run("ingest", LETTER, tmp_path / "s.zarr", "--target", "40"), "out of range", "17 columns")


def test_npz_lengths_differ(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((10, 3)), y=np.zeros(9))
    fails(run("ingest", tmp_path / "d.npz", tmp_path / "s.zarr"), "X has 10 rows but y has 9")


def test_nan_inf_under_reject(tmp_path):
    (tmp_path / "m.csv").write_text("a,b,label\n1,2,x\n3,inf,y\n4,5,x\n")
    fails(
        run("ingest", tmp_path / "m.csv", tmp_path / "s.zarr", "--missing", "reject"), "column 'b'", "data row 1", "inf"
    )
    A = np.ones((5, 3))
    A[3, 0] = np.nan
    np.save(tmp_path / "a.npy", A)
    fails(run("ingest", tmp_path / "a.npy", tmp_path / "s.zarr", "--missing", "reject"), "column 0", "row 3")
    r = run("ingest", tmp_path / "m.csv", tmp_path / "ok.zarr")
    assert r.exit_code == 0 and np.isfinite(open_store(tmp_path / "ok.zarr").read_chunk(0)[0]).all()


def test_single_class(tmp_path):
    (tmp_path / "one.csv").write_text("a,label\n1,yes\n2,yes\n3,yes\n")
    fails(run("ingest", tmp_path / "one.csv", tmp_path / "s.zarr"), "single class 'yes'", "--task regression")


def test_destination_exists(tmp_path):
    assert run("ingest", LETTER, tmp_path / "s.zarr", "--target", "0", "--rows", ":100").exit_code == 0
    fails(run("ingest", LETTER, tmp_path / "s.zarr", "--target", "0"), "exists; pass --force to overwrite")
    assert open_store(tmp_path / "s.zarr").n_rows == 100


def test_interrupted_ingest(tmp_path, monkeypatch):
    original = StoreWriter.append

    def boom(self, X, y):
        if self.n_rows >= 2048:
            raise KeyboardInterrupt
        original(self, X, y)

    monkeypatch.setattr(StoreWriter, "append", boom)
    monkeypatch.setattr("pipeline.ingest.CSV_BLOCK", 16384)
    r = run("ingest", LETTER, tmp_path / "s.zarr", "--target", "0", "--chunk-rows", "1024")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert os.listdir(tmp_path) == []


def test_corrupted_chunk_named_by_inspect(tmp_path):
    assert run("synth", tmp_path / "s.zarr", "--rows", "4000", "--features", "4", "--chunk-rows", "1000").exit_code == 0
    corrupt_chunk(tmp_path / "s.zarr", "X", 2)
    r = run("inspect", tmp_path / "s.zarr", "--verify")
    assert "4 chunks read, 1 bad" in r.output
    fails(r, "corrupted", "chunk 2 of array 'X'", "s.zarr")


def test_not_a_store(tmp_path):
    fails(run("inspect", tmp_path / "nothing.zarr"), "does not exist")
    (tmp_path / "dir.zarr").mkdir()
    fails(run("inspect", tmp_path / "dir.zarr"), "not a pipeline store")


@pytest.mark.parametrize("bad", ["abc", "5:2"])
def test_bad_rows_option(tmp_path, bad):
    fails(run("ingest", LETTER, tmp_path / "s.zarr", "--rows", bad), "--rows")


def test_inspect_names_the_source_rows_as_rows_spells_them(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("a,b,y\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))
    assert run("ingest", src, tmp_path / "all.zarr").exit_code == 0
    assert run("ingest", src, tmp_path / "part.zarr", "--rows", "2:").exit_code == 0
    assert f"source   {src}  rows all\n" in run("inspect", tmp_path / "all.zarr").output
    assert f"source   {src}  rows 2:\n" in run("inspect", tmp_path / "part.zarr").output
