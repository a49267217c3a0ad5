"""Atomic, checksummed checkpoint and model files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from pipeline.checkpoint import FORMAT_VERSION, load_file, save_file
from pipeline.errors import CheckpointError


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
