"""What the parameter server's modes promise a training run: a checkpoint holds whole rounds, and
a schedule counts the rounds the run really takes (real scheduler, real stores)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.plan import plan_epochs
from pipeline.ps.client import ParameterServer
from pipeline.store import open_store
from pipeline.train import build_spec, train

N = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4,000 rows: two sync shares of 2,000, 63 minibatches of 32 each, 16 pushes of 4."""
    from pipeline.synth import synth

    return str(synth(tmp_path_factory.mktemp("sem") / "s.zarr", rows=4000, features=6, classes=3, seed=3).path)


def test_a_checkpoint_mid_round_leaves_out_the_batches_of_a_pooled_delta(client):
    """A sync share that pushed and waits for the others has its delta pooled, not applied: a
    checkpoint taken then must not count its batches, or a run resumed from it skips rows
    whose update is in no weights."""
    ps = ParameterServer("sem-pooled", client)
    ps.create(np.zeros(N, np.float32), mode="sync", aggregate="mean", optimizer={"name": "sgd", "lr": 1.0})
    ps.expect(names=["s0", "s1"], keys=[None, None], epoch=0)
    ps.join("s0")
    ps.join("s1")
    ps.push("s0", 0, np.ones(N, np.float32), samples=8, batches=2, loss=1.0, wait=False)
    ps.push("s1", 0, np.ones(N, np.float32), samples=8, batches=2, loss=1.0, wait=False)  # round 1 applied
    ps.push("s0", 1, np.ones(N, np.float32), samples=8, batches=2, loss=1.0, wait=False)  # pooled only
    st = ps.state()
    assert st["version"] == 1
    np.testing.assert_array_equal(st["params"], -np.ones(N, np.float32))
    assert st["progress"] == {"s0": 2, "s1": 2}  # the batches in these weights
    # the run resumed from this state: s0 trains its pooled batches again
    again = ParameterServer("sem-pooled-resumed", client)
    again.create(st["params"], mode="sync", version=st["version"], progress=st["progress"], epoch=0)
    assert again.join("s0")["skip_batches"] == 2
    # in the running job the pooled delta stays in the round: a rerun task skips it
    assert ps.join("s0")["skip_batches"] == 4
    ps.push("s1", 1, np.ones(N, np.float32), samples=8, batches=2, loss=1.0, wait=False)
    st = ps.state()
    assert st["version"] == 2 and st["progress"] == {"s0": 4, "s1": 4}
    ps.close()
    again.close()


def _finished_lr(dask_scheduler, job: str) -> float:
    ext = dask_scheduler.extensions["pipeline_ps"]
    return next(f["lr"] for f in reversed(ext.finished) if f["job"] == job)


def test_a_cosine_schedule_spans_the_rounds_of_a_sync_run(store, client, tmp_path):
    """Every sync round combines one delta per share: an epoch of two shares takes the pushes
    of one share, and a cosine schedule over the run reaches its end at the last round."""
    cfg = TrainConfig(
        mode="sync",
        hidden=[8],
        batch_size=32,
        local_steps=4,
        epochs=2,
        patience=0,
        validation=0.0,
        schedule="cosine",
        ema=0.0,
    )
    st = open_store(store)
    plan = plan_epochs(st, cfg, 2, build_spec(st, cfg)[0])
    assert plan.sync_shares == 2
    res = train(store, cfg, tmp_path / "run", client=client)
    doc = json.loads((tmp_path / "run" / "history.json").read_text())
    # each share: ceil(ceil(2000 / 32) / 4) = 16 pushes an epoch, all of them in 16 rounds
    assert len(doc["rounds"]) == cfg.epochs * plan.rounds_per_epoch == 32
    assert [r[4] for r in doc["rounds"]] == [2] * len(doc["rounds"])  # one delta per share a round
    assert [h["samples"] for h in res.history] == [4000, 4000]
    assert sum(r[3] for r in doc["rounds"]) == 8000 and doc["pushes"] == 2 * len(doc["rounds"])
    # the learning rate after the last round: cosine at its end (it stayed above 0.6 when the
    # schedule counted one round per push of every task)
    assert client.run_on_scheduler(_finished_lr, job=doc["job"]) == pytest.approx(0.0, abs=1e-9)


def test_a_resume_with_another_server_optimizer_starts_it_afresh(store, client, tmp_path):
    """The server's optimizer state belongs to the optimizer that made it (another one refuses
    its buffers, and adam would take sgd's step count and skip its bias correction): a resume
    with another ``server_optimizer`` says so and starts that optimizer with a fresh state."""
    from pipeline.checkpoint import load_file

    cfg = TrainConfig(hidden=[4], batch_size=64, epochs=1, patience=0, server_optimizer="adam", server_lr=0.1)
    train(store, cfg, tmp_path / "run", client=client)
    said: list[str] = []
    other = TrainConfig(**{**cfg.to_dict(), "epochs": 2, "server_optimizer": "sgd"})
    res = train(store, other, tmp_path / "run", client=client, resume=True, log=said.append)
    assert any(
        "server optimizer changed since the checkpoint (adam -> sgd): it starts with a fresh state" in m for m in said
    ), said
    assert [h["epoch"] for h in res.history] == [0, 1]
    _, meta = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")
    assert meta["optimizer_t"] == res.history[1]["rounds"] - res.history[0]["rounds"]  # counted from the resume


def test_another_optimizers_saved_state_is_refused_naming_the_fix():
    """A state with buffers this optimizer has not (adam's m and v given to sgd) is refused as
    both a parameter-server and a checkpoint error, so the command prints it in one line."""
    from pipeline.errors import CheckpointError, PSError
    from pipeline.optim import OptimizerStateError, ServerOptimizer

    adam = ServerOptimizer("adam", n=4)
    with pytest.raises(OptimizerStateError, match=r"unknown buffer 'm': .* another server optimizer than 'sgd'") as e:
        ServerOptimizer("sgd", n=4).load_state({"t": 3, "buffers": dict(adam.buffers)}, np.zeros(4, np.float32))
    assert isinstance(e.value, PSError) and isinstance(e.value, CheckpointError)
