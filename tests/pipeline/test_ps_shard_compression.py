"""Compressed deltas and replies on the sharded parameter server, on a real cluster: shards on
`dask worker --resources ps-shard=1` processes beside a LocalCluster's training workers.

A participant's weights are slices that each shard sent at its own version: the shards take a
round's pushes each at its own moment, so a participant can join between two shards' rounds.
With compressed replies every slice must still be the weights that shard holds for its
participants, bit for bit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.checkpoint import read_checkpoint
from pipeline.config import TrainConfig
from pipeline.loop import make_trainer
from pipeline.ps.shard import SHARD_EXTENSION, ShardedParameterServer
from pipeline.ps.wire import DeltaCompressor, compress
from pipeline.train import task_config, train
from pipeline.worker import _Comm, _Pusher
from tests.pipeline.test_ps_shard import (
    assert_survived,
    running_shard_workers,
    shard_test_cluster,
    train_through_a_shard_kill,
)

SPEC = {"n_in": 16, "hidden": [8], "n_out": 4, "activation": "relu"}
N_PARAMS = 16 * 8 + 8 + 8 * 4 + 4


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """The module's LocalCluster (two training workers), as test_ps_shard's."""
    with shard_test_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def shard_procs(client: Any) -> Iterator[list]:
    """Two ps-shard workers beside the module's two training workers."""
    with running_shard_workers(client) as procs:
        yield procs


class _Reads:
    """The one figure of a chunk loader a pusher reads (its seconds spent reading)."""

    read_seconds = 0.0


def _on_shard(job: str, dask_worker: Any = None) -> dict[str, Any]:
    """On a ps-shard worker: its slice of ``job``: version, weights and the weights its
    participants are given (``held``, compressed replies only), read without changing them."""
    st = dask_worker.extensions[SHARD_EXTENSION].jobs[job]
    held = None if st.held is None else st.held.copy()
    return {"version": st.version, "params": st.params.copy(), "held": held, "held_version": st.held_version}


def _send(client: Any, addr: str, route: str, job: str, **kw: Any) -> concurrent.futures.Future:
    """One message to one shard (one of a participant's per-shard requests), from this thread."""

    async def go() -> dict[str, Any]:
        return await getattr(client.rpc(addr), route)(job=job, **kw)

    return asyncio.run_coroutine_threadsafe(go(), client.loop.asyncio_loop)


def _sharded_job(client: Any, job: str, replies: str) -> ShardedParameterServer:
    """A sync job on two shards: int8 deltas, replies in ``replies``, SGD with lr 1."""
    w0 = np.random.default_rng(0).standard_normal(N_PARAMS).astype(np.float32)
    handle = ShardedParameterServer(job, client, n_shards=2)
    handle.create(
        w0,
        mode="sync",
        optimizer={"name": "sgd", "lr": 1.0},
        compression="int8",
        **({} if replies == "none" else {"reply_codec": replies}),
    )
    return handle


def _push_slice(
    client: Any, job: str, name: str, shard: tuple[str, int, int], version: int, rng: np.random.Generator
) -> concurrent.futures.Future:
    """Participant ``name``'s int8 delta of ``shard``'s slice, to that shard alone."""
    addr, lo, hi = shard
    wire, _ = compress((rng.standard_normal(hi - lo) * 1e-2).astype(np.float32), "int8")
    return _send(client, addr, "ps_push", job, name=name, version=version, delta=wire, samples=1, batches=1, loss=0.5)


def _task(client: Any, job: str, name: str, replies: str) -> tuple[_Pusher, Any, dict[str, Any]]:
    """A training task's pusher joined to ``job`` as ``name``, its trainer and the join's
    reply. ``overlap``: each push stays in flight (until :meth:`_Pusher.finish`) while this
    thread sends the other participants' messages."""
    cfg = task_config(
        TrainConfig(
            overlap=True,
            compression="int8",
            compress_replies=replies != "none",
            ps_shards=2,
            barrier_timeout=30,
        )
    )
    ps = ShardedParameterServer(job, client)
    joined = ps.join(name)
    trainer = make_trainer(SPEC, cfg)
    pusher = _Pusher(_Comm(ps, name, 30.0), trainer, _Reads(), name, joined, cfg, DeltaCompressor("int8"))
    return pusher, trainer, joined


def _train_a_step(trainer: Any, rng: np.random.Generator) -> None:
    trainer.set_params(trainer.get_params() - (rng.standard_normal(N_PARAMS) * 1e-2).astype(np.float32))


def _fold_and_compare(
    client: Any, handle: ShardedParameterServer, pusher: _Pusher, replies: str, versions: list[int]
) -> None:
    """Fold the pusher's reply in, then check that each shard is at ``versions`` and that the
    pusher holds each shard's weights for its participants, bit for bit."""
    concurrent.futures.wait([pusher.pending], timeout=30)
    pusher.finish()
    views = [client.run(_on_shard, handle.job, workers=[addr])[addr] for addr, _, _ in handle.shards]
    assert [v["version"] for v in views] == versions
    if replies != "none":  # the replies of these versions set what the shards hold
        assert [v["held_version"] for v in views] == versions
    want = np.concatenate([v["params"] if replies == "none" else v["held"] for v in views])
    np.testing.assert_array_equal(pusher.held, want)


@pytest.mark.parametrize("replies", ["none", "int8"])
def test_a_participant_joining_between_two_shards_rounds_holds_each_shard_s_weights(
    replies: str, client: Any, shard_procs: list
) -> None:
    """Participant q's push reaches shard A (closing A's round 0) before shard B; p joins in
    between (a retried task, or one that joined after join_timeout). Here q's push to B is
    sent only after p's join, so B cannot close its round within the wait of p's join, which
    then joins B where it is: p holds A's slice at version 1 and B's at version 0. p's next push
    is in B's round 0 and A's round 1, and its reply changes each slice from the version p holds
    of it: p's weights are then each shard's, bit for bit, round after round (with compressed
    replies, each shard's ``held``)."""
    rng = np.random.default_rng(1)
    handle = _sharded_job(client, f"between-{replies}", replies)
    try:
        job, (a, b) = handle.job, handle.shards
        for addr, _, _ in (a, b):
            _send(client, addr, "ps_join", job, name="q").result(timeout=30)
        assert _push_slice(client, job, "q", a, 0, rng).result(timeout=30)["version"] == 1  # A's round 0: q alone
        pusher, trainer, joined = _task(client, job, "p", replies)
        assert joined["version"] == 0 and joined["shard_versions"] == [1, 0]
        for step in range(3):
            # B's round, which waits for p since p joined it, closes with p's push; q, given
            # B's reply, pushes to A, whose round waits for q
            _train_a_step(trainer, rng)
            to_b = _push_slice(client, job, "q", b, step, rng)
            pusher.push(samples=1, batches=1, loss=0.5)
            assert to_b.result(timeout=30)["version"] == step + 1
            assert _push_slice(client, job, "q", a, step + 1, rng).result(timeout=30)["version"] == step + 2
            _fold_and_compare(client, handle, pusher, replies, [step + 2, step + 1])
    finally:
        handle.close()


@pytest.mark.parametrize("replies", ["none", "int8"])
def test_a_participant_joining_between_two_shards_rounds_is_joined_at_one_version(
    replies: str, client: Any, shard_procs: list
) -> None:
    """As above, but q's push to shard B is in flight, as it is when a worker pushes to every
    shard at once: p's join leaves B, whose round then closes without p, and joins B again at
    A's version. p holds both slices at one version, the shards stay at one version round
    after round, and a checkpoint can join their states (before, it found them a round apart
    for as long as p trained, gave up after 30 s and restored the job from the last checkpoint)."""
    rng = np.random.default_rng(3)
    handle = _sharded_job(client, f"aligned-{replies}", replies)
    try:
        job, (a, b) = handle.job, handle.shards
        for addr, _, _ in (a, b):
            _send(client, addr, "ps_join", job, name="q").result(timeout=30)
        assert _push_slice(client, job, "q", a, 0, rng).result(timeout=30)["version"] == 1
        got: list = []
        joining = threading.Thread(target=lambda: got.append(_task(client, job, "p", replies)))
        joining.start()
        time.sleep(0.3)  # p has joined both shards and left B, waiting for B's round to close
        assert _push_slice(client, job, "q", b, 0, rng).result(timeout=30)["version"] == 1
        joining.join(timeout=60)
        pusher, trainer, joined = got[0]
        assert joined["shard_versions"] == [1, 1] and joined["version"] == 1
        for step in range(1, 3):
            _train_a_step(trainer, rng)
            pusher.push(samples=1, batches=1, loss=0.5)
            to = [_push_slice(client, job, "q", shard, step, rng) for shard in (a, b)]
            assert [f.result(timeout=30)["version"] for f in to] == [step + 1, step + 1]
            _fold_and_compare(client, handle, pusher, replies, [step + 1, step + 1])
        assert handle.state(timeout=5)["version"] == 3
    finally:
        handle.close()


def test_a_reply_of_one_shard_s_change_and_another_s_whole_slice_gives_each_shard_s_weights(
    client: Any, shard_procs: list
) -> None:
    """A task whose worker died mid-push: its delta reached shard B, not A. B keeps that delta
    in its round, so when the task, run again, joins, B's round waits only for q and closes
    without the rerun's push; A's round waits for it. That push is then stale on B, which
    replies with its slice whole, and in A's round, which replies with its change: the task
    holds each shard's weights for its participants, bit for bit, then and at the next round."""
    rng = np.random.default_rng(2)
    handle = _sharded_job(client, "half-pushed", "int8")
    try:
        job, (a, b) = handle.job, handle.shards
        for name in ("p", "q"):
            for addr, _, _ in (a, b):
                _send(client, addr, "ps_join", job, name=name).result(timeout=30)
        first = _push_slice(client, job, "p", b, 0, rng)  # the first run's push, B's part only
        for addr, _, _ in (a, b):  # its task ended: the scheduler forwards the drop to every shard
            _send(client, addr, "ps_drop", job, name="p", why="worker removed").result(timeout=30)
        pusher, trainer, _ = _task(client, job, "p", "int8")
        to_b = _push_slice(client, job, "q", b, 0, rng)
        assert to_b.result(timeout=30)["version"] == first.result(timeout=30)["version"] == 1  # p's first delta, q's
        to_a = _push_slice(client, job, "q", a, 0, rng)
        _train_a_step(trainer, rng)
        pusher.push(samples=1, batches=1, loss=0.5)
        assert to_a.result(timeout=30)["version"] == 1
        assert [kind for kind, _ in pusher.pending.result(timeout=30)["rdelta"]] == ["rdelta", "params"]
        _fold_and_compare(client, handle, pusher, "int8", [1, 1])
        to_b, to_a = (_push_slice(client, job, "q", shard, 1, rng) for shard in (b, a))
        _train_a_step(trainer, rng)
        pusher.push(samples=1, batches=1, loss=0.5)
        assert to_b.result(timeout=30)["version"] == to_a.result(timeout=30)["version"] == 2
        _fold_and_compare(client, handle, pusher, "int8", [2, 2])
    finally:
        handle.close()


def test_overlapped_pushes_with_compressed_replies_on_two_shards_give_the_single_server_s_weights(
    letter_stores: tuple[str, str], client: Any, shard_procs: list, tmp_path: Path
) -> None:
    """With ``overlap`` a reply is folded in some local steps after its push, into weights that
    moved meanwhile: each shard's change is added to the slice the task held when it pushed.
    bf16 rounds each entry alone, so two shards train the single server's run bit for bit."""
    base = {
        "mode": "sync",
        "epochs": 2,
        "patience": 0,
        "seed": 4,
        "overlap": True,
        "compression": "bf16",
        "compress_replies": True,
    }
    one = train(letter_stores[0], TrainConfig(**base), tmp_path / "one", client=client)
    two = train(letter_stores[0], TrainConfig(**base, ps_shards=2), tmp_path / "two", client=client)
    assert [h["rounds"] for h in two.history] == [h["rounds"] for h in one.history]
    np.testing.assert_array_equal(two.model.params, one.model.params)
    plain = train(
        letter_stores[0], TrainConfig(**{**base, "overlap": False}, ps_shards=2), tmp_path / "p", client=client
    )
    assert not np.array_equal(plain.model.params, two.model.params)  # the replies were folded late


def test_ssp_with_int8_deltas_on_two_shards_learns(
    letter_stores: tuple[str, str], client: Any, shard_procs: list, tmp_path: Path
) -> None:
    """ssp bounds the participants' clocks on each shard apart, and each shard decodes its own
    slice of every delta (int8 blocks of its range, with error feedback on the whole vector):
    the run learns as the single server's does."""
    cfg = TrainConfig(mode="ssp", epochs=3, patience=0, ps_shards=2, compression="int8")
    res = train(letter_stores[0], cfg, tmp_path / "ssp", client=client)
    assert np.isfinite(res.model.params).all()
    accs = [h["val_accuracy"] for h in res.history]
    assert accs[-1] > 0.6, accs


@pytest.mark.timeout(300)
def test_a_killed_shard_worker_is_survived_with_compressed_replies(
    letter_stores: tuple[str, str], client: Any, shard_procs: list, tmp_path: Path
) -> None:
    """A shard's worker SIGKILLed mid-epoch of a run with int8 deltas and replies: the job is
    placed again from the last checkpoint, each shard from its slice of the participants'
    weights there (``reply_view``), and the run ends with every epoch and a model that learned."""
    cfg = TrainConfig(mode="sync", epochs=3, patience=0, ps_shards=2, compression="int8", compress_replies=True)
    res, *rest = train_through_a_shard_kill(client, shard_procs, letter_stores[0], cfg, tmp_path / "run")
    assert_survived(res, *rest)
    # the restored shards' checkpoints hold the participants' weights joined from every slice
    view = read_checkpoint(tmp_path / "run" / "checkpoint.npz").reply_view
    assert view is not None and view.shape == res.model.params.shape and np.isfinite(view).all()
