"""`pipeline evaluate` and `pipeline predict` score a store under cluster_min_rows rows in this
process, as `train` trains one, with the same tasks and the same answer as a cluster's."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.synth import synth
from pipeline.train import train
from tests.pipeline.helpers import corrupt_chunk


def _run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_small_store_is_scored_in_this_process_with_the_clusters_answer(tmp_path):
    store = tmp_path / "s.zarr"
    synth(str(store), rows=3000, features=5, classes=3, seed=0, chunk_rows=700)
    train(str(store), TrainConfig().with_overrides(["epochs=1", "hidden=[8]"]), tmp_path / "run")
    here = _run("evaluate", tmp_path / "run", store, "--json")
    assert here.exit_code == 0, here.output
    assert here.stderr.startswith("evaluating in this process: 3,000 rows, under cluster_min_rows = 100,000")
    there = _run("evaluate", tmp_path / "run", store, "--json", "--workers", "1")
    assert there.exit_code == 0 and "in this process" not in there.stderr, there.output
    assert json.loads(here.stdout) == json.loads(there.stdout)

    for out, extra in (("here.parquet", []), ("there.parquet", ["--workers", "1"])):
        r = _run("predict", tmp_path / "run", store, tmp_path / out, "--proba", *extra)
        assert r.exit_code == 0, r.output
        assert ("predicting in this process" in r.stderr) == (not extra)
    a, b = pq.read_table(tmp_path / "here.parquet"), pq.read_table(tmp_path / "there.parquet")
    assert a.num_rows == 3000 and a.equals(b)


def test_a_failed_prediction_in_this_process_leaves_nothing_behind(tmp_path):
    store = tmp_path / "s.zarr"
    synth(str(store), rows=3000, features=5, classes=3, seed=1, chunk_rows=700)
    train(str(store), TrainConfig().with_overrides(["epochs=1", "hidden=[8]"]), tmp_path / "run")
    corrupt_chunk(store, "X", 2)
    out = tmp_path / "out"
    out.mkdir()
    r = _run("predict", tmp_path / "run", store, out / "p.zarr")
    assert r.exit_code == 1 and "predicting in this process" in r.stderr, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: chunk 2 of array 'X'"), r.stderr
    assert os.listdir(out) == []
