"""Training in this process stopped (Ctrl-C, SIGKILL) and resumed: an epoch resumed partway
records all its rows, the history keeps every round, the checkpoint is always a whole round's,
a killed checkpoint write leaves nothing behind, and a diverging run stops as on a cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.checkpoint import load_file, read_checkpoint, save_file
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, TrainingError
from pipeline.local import LocalServer, LocalTrainer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from pipeline.synth import synth

    return synth(tmp_path_factory.mktemp("local-session") / "s.zarr", rows=3000, features=6, classes=3, seed=0).path


def config() -> TrainConfig:
    # 4 rounds per epoch of the 2,700 training rows
    return TrainConfig(hidden=[8], epochs=2, patience=0, batch_size=64, local_steps=11, checkpoint_seconds=3600)


class StopAtRound(LocalServer):
    """The in-process server, with Ctrl-C pressed as its round ``at`` is applied."""

    at = 0

    def push(self, *args: Any, **kwargs: Any) -> np.ndarray:
        if self.version + 1 == self.at:
            raise KeyboardInterrupt
        return super().push(*args, **kwargs)


class StoppedMidEpoch(LocalTrainer):
    def _server(self) -> LocalServer:
        self._ps = StopAtRound(self.job)
        self._ps.at = 3  # epoch 0 has trained 2 of its rounds
        return self._ps


class StoppedInValidation(LocalTrainer):
    """Ctrl-C while the first epoch's weights are validated: its training is all done."""

    def _evaluate(self, epoch: int, val_ranges: Any) -> dict[str, Any]:
        if epoch == 0:
            raise KeyboardInterrupt
        return super()._evaluate(epoch, val_ranges)


def epochs(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["epochs"]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    LocalTrainer(store, config(), out, None).fit()
    return out


@pytest.mark.parametrize("stopped", [StoppedMidEpoch, StoppedInValidation])
def test_an_epoch_resumed_partway_records_all_its_training_rows(store, reference, tmp_path, stopped):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        stopped(store, config(), out, None).fit()
    ckpt = read_checkpoint(out / "checkpoint.npz")
    assert ckpt.run.epoch == 0 and not ckpt.run.history
    LocalTrainer(store, config(), out, None, resume=True).fit()
    ref, got = epochs(reference), epochs(out)
    rows = ref[0]["samples"]
    assert rows == 2700
    assert [e["samples"] for e in got] == [rows, rows]
    assert [sum(t["samples"] for t in e["tasks"]) for e in got] == [rows, rows]
    if stopped is StoppedInValidation:
        # nothing was trained again: the epoch and the saved model are those of a run never stopped
        assert got[0]["train_loss"] == ref[0]["train_loss"]
        assert [e["val_loss"] for e in got] == [e["val_loss"] for e in ref]
        a, b = np.load(reference / "model.npz"), np.load(out / "model.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "__meta__")


class Recording(LocalServer):
    """The in-process server, keeping its weights after every round."""

    rounds: dict[int, np.ndarray] = {}

    def push(self, *args: Any, **kwargs: Any) -> np.ndarray:
        out = super().push(*args, **kwargs)
        self.rounds[self.version] = self.params.copy()
        return out


class Recorded(LocalTrainer):
    def _server(self) -> LocalServer:
        self._ps = Recording(self.job)
        return self._ps


class SignalInStep(LocalServer):
    """The in-process server, with a real Ctrl-C arriving as its optimizer steps in round 3:
    the weights are updated, the round's count is not yet."""

    def create(self, *args: Any, **kwargs: Any) -> None:
        super().create(*args, **kwargs)
        step = self.optimizer.step

        def stepped(*a: Any, **k: Any) -> Any:
            out = step(*a, **k)
            if self.version + 1 == 3:
                signal.raise_signal(signal.SIGINT)
            return out

        self.optimizer.step = stepped


class SignalledInStep(LocalTrainer):
    def _server(self) -> LocalServer:
        self._ps = SignalInStep(self.job)
        return self._ps


def test_ctrl_c_during_a_server_step_checkpoints_a_whole_round(store, tmp_path):
    cfg = config()
    cfg.server_optimizer, cfg.server_lr, cfg.ema = "adam", 0.01, 0.0
    Recorded(store, cfg, tmp_path / "ref", None).fit()
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        SignalledInStep(store, cfg, out, None).fit()
    ckpt = read_checkpoint(out / "checkpoint.npz")
    assert ckpt.version >= 2
    # the checkpoint's weights are those its round count says, and it counts the rounds' batches
    np.testing.assert_array_equal(ckpt.params, Recording.rounds[ckpt.version])
    assert sum(ckpt.progress.values()) == ckpt.version * cfg.local_steps


def rounds(out: Path) -> list[list]:
    return json.loads((out / "history.json").read_text())["rounds"]


@pytest.mark.parametrize("stopped", [StoppedMidEpoch, StoppedInValidation])
def test_a_resumed_run_keeps_the_rounds_before_it_was_stopped(store, reference, tmp_path, stopped):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        stopped(store, config(), out, None).fit()
    LocalTrainer(store, config(), out, None, resume=True).fit()
    ref, got = rounds(reference), rounds(out)
    assert [r[1] for r in got] == [r[1] for r in ref] == list(range(1, 9))
    assert [r[1:] for r in got[:2]] == [r[1:] for r in ref[:2]]  # the rounds trained before the stop
    # an epoch boundary, and more epochs asked: the first run's rounds stay in the history
    cfg = config()
    cfg.epochs = 3
    LocalTrainer(store, cfg, out, None, resume=True).fit()
    assert [r[1] for r in rounds(out)] == list(range(1, 13))


def test_a_checkpoint_with_a_malformed_round_history_is_refused_in_one_line(store, reference, tmp_path):
    arrays, meta = load_file(reference / "checkpoint.npz", "checkpoint")
    assert len(meta["rounds"]) == 8
    meta["rounds"] = [[1.0, 2]]
    save_file(tmp_path / "c.npz", "checkpoint", arrays, meta)
    with pytest.raises(CheckpointError, match="malformed round history; resume from an earlier checkpoint"):
        read_checkpoint(tmp_path / "c.npz")


def test_a_diverging_run_stops_in_the_servers_words_and_keeps_no_bad_weights(store, tmp_path):
    cfg = config()
    cfg.lr, cfg.checkpoint_seconds = 1e30, 1e-9  # a checkpoint after every round it can take
    out = tmp_path / "run"
    trainer = LocalTrainer(store, cfg, out, None)
    with pytest.raises(TrainingError, match=r"^training diverged at round \d+: the (loss|update) is not finite"):
        trainer.fit()
    assert "lower the learning rate or add warm-up" in str(trainer._ps.failed)
    assert np.isfinite(trainer._ps.params).all()  # the bad update was never applied
    assert not (out / "model.npz").exists() and not (out / "history.json").exists()


KILLED_MID_WRITE = (
    "import os, signal, sys\n"
    "from pipeline.checkpoint import load_file, save_file\n"
    "arrays, meta = load_file(sys.argv[1], 'checkpoint')\n"
    "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed as the file reaches the disk\n"
    "save_file(sys.argv[1], 'checkpoint', arrays, meta)\n"
)


def test_a_checkpoint_write_killed_midway_leaves_no_temporary_after_the_resume(store, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(out / "checkpoint.npz")], env=env, capture_output=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(list(out.glob(".checkpoint.npz.*.tmp"))) == 1
    # a temporary of a writer that still runs is its own: left alone
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        live = out / f".checkpoint.npz.{alive.pid}@{socket.gethostname()}.x1y2z3.tmp"
        live.write_bytes(b"")
        try:
            cfg = config()
            cfg.epochs = 3
            LocalTrainer(store, cfg, out, None, resume=True).fit()
        finally:
            alive.kill()
    assert sorted(p.name for p in out.glob(".checkpoint.npz.*.tmp")) == [live.name]
    assert len(epochs(out)) == 3 and read_checkpoint(out / "checkpoint.npz").run.epoch == 3
