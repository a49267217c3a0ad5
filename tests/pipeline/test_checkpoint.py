"""Atomic, checksummed checkpoint and model files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import (
    FORMAT_VERSION,
    NO_BEST_LOSS,
    load_file,
    read_checkpoint,
    save_file,
    write_checkpoint,
)
from pipeline.errors import CheckpointError
from pipeline.runstate import RunState


def test_round_trip(tmp_path):
    arrays = {"params": np.arange(5, dtype=np.float32), "m": np.ones(3)}
    save_file(tmp_path / "c.npz", "checkpoint", arrays, {"epoch": 2})
    got, meta = load_file(tmp_path / "c.npz", "checkpoint")
    assert meta["epoch"] == 2 and meta["format_version"] == FORMAT_VERSION
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary file left


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    save_file(path, "checkpoint", {"params": np.zeros(4, np.float32)}, {})
    # rewrite one array inside the archive, keep the metadata (and its checksum)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    raw = bytearray(members["params.npy"])
    raw[-1] ^= 0xFF
    members["params.npy"] = bytes(raw)
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_file(path, "checkpoint")


def test_truncated_wrong_kind_and_newer_version(tmp_path):
    path = tmp_path / "c.npz"
    save_file(path, "checkpoint", {"params": np.zeros(4, np.float32)}, {})
    with pytest.raises(CheckpointError, match="holds a 'checkpoint', not a model"):
        load_file(path, "model")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_file(path, "checkpoint")
    newer = tmp_path / "n.npz"
    meta = {"kind": "model", "format_version": FORMAT_VERSION + 1, "sha256": ""}
    np.savez(newer, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(CheckpointError, match="upgrade the project"):
        load_file(newer, "model")
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.npz", "model")


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "c.npz"
    save_file(path, "checkpoint", {"params": np.full(8, 7, np.float32)}, {"epoch": 1})
    script = f"""
import numpy as np, os, signal
import pipeline.checkpoint as ck
real = np.savez
def slow(fh, **kw):
    fh.write(b"partial bytes")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
ck.np.savez = slow
ck.save_file({str(path)!r}, "checkpoint", {{"params": np.zeros(8, np.float32)}}, {{"epoch": 2}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    arrays, meta = load_file(path, "checkpoint")
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(arrays["params"], 7)


# -- the training checkpoint's layout ------------------------------------------------------------

# A checkpoint of format version 1 as the driver wrote it before the layout moved into
# pipeline.checkpoint: 2 epochs of sync training with Adam (local and server) on
# synth(rows=300, features=4, classes=3, seed=0), hidden=[4], validation=0.2, in this process.
V1 = Path(__file__).with_name("checkpoint_v1.npz")


def test_a_version_1_checkpoint_reads_back_into_the_run_state():
    ckpt = read_checkpoint(V1)
    run = ckpt.run
    assert run.epoch == 2 and [h["epoch"] for h in run.history] == [0, 1] and run.done_tasks == set()
    assert run.job.startswith("run-") and run.n_threads == 1
    assert run.best.epoch == 0 and run.best.loss == pytest.approx(2.5223587)
    assert run.best.params.shape == ckpt.params.shape == (35,)
    assert ckpt.version == 2 and ckpt.optimizer_state["t"] == 2
    assert sorted(ckpt.optimizer_state["buffers"]) == ["average", "m", "v"]
    assert list(ckpt.local_states) == ["s0"] and ckpt.local_states["s0"]["t"] == 16
    assert sorted(ckpt.local_states["s0"]["buffers"]) == ["m", "v"]
    assert ckpt.progress == {"e0-s0": 8, "e1-s0": 8}
    assert ckpt.config["optimizer"] == "adam" and ckpt.spec["hidden"] == [4]


def test_written_checkpoints_keep_the_version_1_layout(tmp_path):
    old_arrays, old_meta = load_file(V1, "checkpoint")
    ckpt = read_checkpoint(V1)
    server = {
        "params": ckpt.params,
        "version": ckpt.version,
        "optimizer_state": ckpt.optimizer_state,
        "local_states": ckpt.local_states,
        "progress": ckpt.progress,
    }
    extra = {k: old_meta[k] for k in ("config", "store", "spec", "in_process")}
    write_checkpoint(tmp_path / "c.npz", ckpt.run, server, **extra)
    arrays, meta = load_file(tmp_path / "c.npz", "checkpoint")
    assert sorted(arrays) == sorted(old_arrays)
    for k, v in old_arrays.items():
        np.testing.assert_array_equal(arrays[k], v)
    assert sorted(meta) == sorted(old_meta)
    assert {k: v for k, v in meta.items() if k not in ("time", "sha256")} == {
        k: v for k, v in old_meta.items() if k not in ("time", "sha256")
    }


def test_a_run_without_a_best_epoch_and_a_malformed_local_state(tmp_path):
    run = RunState("run-x", epoch=0, done_tasks={"e0-t1", "e0-t0"})
    server = {
        "params": np.ones(3, np.float32),
        "version": 4,
        "optimizer_state": {"t": 0, "buffers": {}},
    }
    write_checkpoint(tmp_path / "c.npz", run, server)
    _, meta = load_file(tmp_path / "c.npz", "checkpoint")
    assert meta["best_loss"] == NO_BEST_LOSS and meta["done_tasks"] == ["e0-t0", "e0-t1"]
    back = read_checkpoint(tmp_path / "c.npz").run
    assert back.best.loss == math.inf and back.best.epoch == -1 and back.done_tasks == {"e0-t0", "e0-t1"}
    np.testing.assert_array_equal(back.best.params, server["params"])  # no best yet: the weights
    arrays, meta = load_file(tmp_path / "c.npz", "checkpoint")
    meta["local_states"] = {"s0": {"t": 1, "lr": 0.1, "arrays": {"m": "missing"}}}
    save_file(tmp_path / "c.npz", "checkpoint", arrays, meta)
    with pytest.raises(CheckpointError, match="malformed local optimizer state"):
        read_checkpoint(tmp_path / "c.npz")


def test_a_version_1_checkpoint_resumes(tmp_path):
    from pipeline.synth import synth
    from pipeline.train import resumed_config, train

    st = synth(tmp_path / "s.zarr", rows=300, features=4, classes=3, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(V1, run / "checkpoint.npz")
    cfg = resumed_config(run)
    cfg.epochs = 3
    res = train(st.path, cfg, run, client=None, resume=True)
    old = read_checkpoint(V1).run
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert res.history[:2] == old.history
    assert res.history[2]["rounds"] > res.history[1]["rounds"]  # the server's round went on
    new = read_checkpoint(run / "checkpoint.npz")
    assert new.run.job == old.job and new.run.epoch == 3 and new.version == res.history[2]["rounds"]


@pytest.mark.parametrize("meta", ["[1]", '"text"', "7", "null"])
def test_metadata_that_is_json_but_no_record_is_corrupted_metadata(tmp_path, meta):
    """A file's metadata edited into other JSON (a list, a string, a number) is named as
    corrupted, not an AttributeError traceback."""
    path = tmp_path / "model.npz"
    np.savez(path, params=np.zeros(3, np.float32), __meta__=np.frombuffer(meta.encode(), np.uint8))
    with pytest.raises(CheckpointError, match=r"model file .* has corrupted metadata$"):
        load_file(path, "model")
