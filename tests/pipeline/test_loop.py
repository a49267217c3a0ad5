"""The one trainer factory and minibatch loop (pipeline.loop), and the one format of optimizer
states: what the worker task, in-process training and the estimators all train through."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import LOCAL_OPTIMIZERS, TrainConfig
from pipeline.errors import PSError
from pipeline.loop import load_local_state, local_state, make_trainer, prepare_targets, run_batches
from pipeline.optim import ServerOptimizer
from pipeline.train import task_config

SPEC = {"n_in": 5, "hidden": [7], "n_out": 3, "activation": "relu"}


def _batches(n: int, rows: int = 16, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(rows, 5)).astype(np.float32), prepare_targets(rng.integers(0, 3, rows), None))
        for _ in range(n)
    ]


def _trainer(optimizer: str, **cfg: object) -> object:
    return make_trainer(SPEC, task_config(TrainConfig(**{"optimizer": optimizer, "lr": 0.01, "batch_size": 16, **cfg})))


@pytest.mark.parametrize("optimizer", LOCAL_OPTIMIZERS)
def test_local_state_round_trip_continues_bit_for_bit(optimizer):
    """A share's local optimizer state, saved and loaded into another trainer, continues
    exactly as the first trainer does; loading nothing starts the optimizer afresh."""
    a = _trainer(optimizer)
    run_batches(a, _batches(3))
    saved = local_state(a)
    assert saved["t"] == 3 and set(saved) == {"t", "lr", "buffers"}
    b = _trainer(optimizer)
    b.set_params(a.get_params())
    load_local_state(b, {**saved, "buffers": {k: np.array(v) for k, v in saved["buffers"].items()}})
    more = _batches(2, seed=1)
    run_batches(a, more)
    run_batches(b, more)
    np.testing.assert_array_equal(a.get_params(), b.get_params())
    load_local_state(b, None)
    assert local_state(b)["t"] == 0


def test_nesterov_is_momentum_with_the_look_ahead():
    plain, ahead = _trainer("momentum"), _trainer("nesterov")
    for tr in (plain, ahead):
        run_batches(tr, _batches(3))
    assert set(local_state(ahead)["buffers"]) == set(local_state(plain)["buffers"])
    assert not np.array_equal(plain.get_params(), ahead.get_params())


def test_run_batches_syncs_every_local_steps_and_skips_trained_batches():
    calls: list[tuple[int, int]] = []
    timing: dict[str, float] = {}
    tr = _trainer("sgd")
    r = run_batches(tr, _batches(7), local_steps=3, sync=lambda n, b, loss: calls.append((n, b)), skip=1, timing=timing)
    assert calls == [(48, 3), (48, 3)]  # six batches after the skipped one: two pushes of three
    assert r["samples"] == 96 and r["batches"] == r["steps"] == 6 and timing["compute"] > 0
    calls.clear()
    r = run_batches(
        _trainer("sgd", batch_size=0),
        _batches(5),
        full_batch=True,
        local_steps=2,
        sync=lambda n, b, loss: calls.append((n, b)),
    )
    assert calls == [(80, 5)] and r["steps"] == 1  # full batch: one step, one push after it
    assert r["loss"] == pytest.approx(r["row_loss"])


def test_server_optimizer_state_round_trip():
    rng = np.random.default_rng(0)
    params = rng.normal(size=10).astype(np.float32)
    a = ServerOptimizer(name="adam", lr=0.1, ema=0.9, n=10)
    for _ in range(3):
        a.step(params, rng.normal(size=10).astype(np.float32), 0.1)
    saved = a.state()
    b = ServerOptimizer(name="adam", lr=0.1, ema=0.9, n=10)
    b.load_state(saved, params)
    assert b.t == 3 and all(np.array_equal(b.buffers[k], v) for k, v in a.buffers.items())
    # the average is derived: dropped without ema, started from the weights when missing
    c = ServerOptimizer(name="adam", lr=0.1, n=10)
    c.load_state(saved, params)
    assert "average" not in c.buffers
    d = ServerOptimizer(name="adam", lr=0.1, ema=0.9, n=10)
    d.load_state(c.state(), params)
    np.testing.assert_array_equal(d.buffers["average"], params)
    with pytest.raises(PSError, match="optimizer state has unknown buffer 'm'"):
        ServerOptimizer(name="momentum", lr=0.1, n=10).load_state(saved, params)


def test_lookahead_yields_the_same_items_in_order_whatever_is_taken_ahead():
    from pipeline.loop import Lookahead

    made: list[int] = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    ahead = Lookahead(items())
    assert next(ahead) == 0 and made == [0]
    ahead.fill(3)
    assert made == [0, 1, 2, 3] and len(ahead) == 3  # made now, handed out later
    ahead.fill(2)  # already 3 ahead: nothing more made
    assert made == [0, 1, 2, 3]
    assert [next(ahead), next(ahead)] == [1, 2]
    ahead.fill(20)  # to the end, not past it
    assert len(ahead) == 7 and made == list(range(10))
    assert list(ahead) == list(range(3, 10))
    ahead.fill(4)
    assert len(ahead) == 0 and list(ahead) == []


def test_a_closed_lookahead_lets_go_of_its_items_and_closes_their_generator():
    from pipeline.loop import Lookahead

    closed: list[bool] = []

    def items():
        try:
            yield from range(10)
        finally:
            closed.append(True)  # a loader's generator stops its reader and frees its buffer here

    ahead = Lookahead(items())
    next(ahead)
    ahead.fill(3)
    ahead.close()
    assert closed == [True] and len(ahead) == 0
    assert list(ahead) == []
    ahead.fill(2)
    assert len(ahead) == 0


def test_lookahead_raises_an_error_where_its_item_is_asked_for():
    from pipeline.loop import Lookahead

    def items():
        yield 1
        yield 2
        raise OSError("chunk 3 could not be read")

    ahead = Lookahead(items())
    ahead.fill(5)  # the error does not come out of the fill
    assert len(ahead) == 2
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(OSError, match="chunk 3 could not be read"):
        next(ahead)
    assert list(ahead) == []


def test_lookahead_batches_are_a_round_bounded_by_bytes():
    from pipeline.loop import LOOKAHEAD_BYTES, lookahead_batches

    assert lookahead_batches(256, 784, 8) == 8  # 0.8 MB a batch: the whole round
    assert lookahead_batches(256, 784, 1) == 1
    big = LOOKAHEAD_BYTES // (4 * 1000) + 1  # rows of one batch over the bound
    assert lookahead_batches(big, 1000, 8) == 1
    assert lookahead_batches(big // 4, 1000, 8) == 4


def test_run_batches_over_a_lookahead_trains_the_same_weights():
    from pipeline.loop import Lookahead

    batches = _batches(12)
    plain, ahead = _trainer("adam"), _trainer("adam")
    calls: list[int] = []
    run_batches(plain, batches, local_steps=4, sync=lambda n, b, loss: calls.append(b))
    feed = Lookahead(batches)
    # the push fills the next round's batches, as a sync worker's push does while it waits
    run_batches(ahead, feed, local_steps=4, sync=lambda n, b, loss: feed.fill(4))
    np.testing.assert_array_equal(plain.get_params(), ahead.get_params())
    assert calls == [4, 4, 4]
