"""Training with compressed deltas end to end: a real LocalCluster, the letter store."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.checkpoint import read_checkpoint
from pipeline.config import TrainConfig
from pipeline.inference import evaluate_store
from pipeline.ps.wire import DeltaCompressor
from pipeline.train import train

RUN = {"epochs": 3, "patience": 0, "topk_fraction": 0.05}
RESUMED = {"epochs": 2, "patience": 0, "min_share_gflop": 0}


def _cut_and_straight(cfg: dict, letter_stores, client, tmp_path) -> tuple:
    """A 2-epoch sync run with ``cfg``, and the same run stopped after its first epoch and
    resumed: checks the resumed model equals the straight one bit for bit and returns both
    checkpoints (resumed, straight) and the straight run's weights."""
    cfg = {**RESUMED, **cfg}
    straight = train(letter_stores[0], TrainConfig(**cfg), tmp_path / "straight", client=client)
    out = tmp_path / "cut"
    train(letter_stores[0], TrainConfig(**{**cfg, "epochs": 1}), out, client=client)
    resumed = train(letter_stores[0], TrainConfig(**cfg), out, client=client, resume=True)
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)
    a, b = (read_checkpoint(p / "checkpoint.npz") for p in (out, tmp_path / "straight"))
    return a, b, straight.model.params


@pytest.fixture(scope="module")
def float32_accuracy(letter_stores, client, tmp_path_factory) -> float:
    res = train(letter_stores[0], TrainConfig(**RUN), tmp_path_factory.mktemp("none"), client=client)
    return evaluate_store(res.model, letter_stores[1], client)["accuracy"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("codec", ["fp16", "bf16", "topk", "int8"])
def test_each_codec_trains_about_as_well_as_float32(codec, float32_accuracy, letter_stores, client, tmp_path):
    """Sync run on two workers: the job decodes every push, the shares' residuals travel with
    their local state into the checkpoint, and the model learns about as well as float32."""
    res = train(letter_stores[0], TrainConfig(compression=codec, **RUN), tmp_path, client=client)
    acc = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    assert float32_accuracy > 0.7
    # 3 epochs are short for top-k (5% of the entries a push): it catches up over longer runs
    assert acc > float32_accuracy - (0.08 if codec == "topk" else 0.02), (codec, acc, float32_accuracy)
    ckpt = read_checkpoint(res.run_dir / "checkpoint.npz")
    residuals = [s["buffers"].get(DeltaCompressor.RESIDUAL) for s in ckpt.local_states.values()]
    assert residuals and all(r is not None and r.shape == res.model.params.shape for r in residuals)
    assert any(np.abs(r).max() > 0 for r in residuals)  # something was held back for later


@pytest.mark.timeout(300)
def test_async_topk_trains_and_counts_compressed_bytes(float32_accuracy, letter_stores, client, tmp_path):
    cfg = TrainConfig(mode="async", compression="topk", **RUN)
    res = train(letter_stores[0], cfg, tmp_path, client=client)
    acc = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    assert acc > float32_accuracy - 0.08, (acc, float32_accuracy)


def test_topk_without_error_feedback_learns_less_in_process(letter_stores, client, tmp_path):
    """In this process (the one-share run a cluster would do): the same codec with and without
    error feedback; dropping 99% of every delta for good costs accuracy that feedback keeps."""
    base = {"epochs": 2, "patience": 0, "compression": "topk", "topk_fraction": 0.01, "ema": 0.0}
    acc = {}
    for ef in (True, False):
        res = train(letter_stores[0], TrainConfig(error_feedback=ef, **base), tmp_path / str(ef))
        acc[ef] = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    plain = train(letter_stores[0], TrainConfig(**{**base, "compression": "none"}), tmp_path / "none")
    acc_none = evaluate_store(plain.model, letter_stores[1], client)["accuracy"]
    assert acc[True] > 0.5 and acc[True] > acc[False] + 0.2, (acc, acc_none)
    assert acc_none >= acc[True] - 0.02, (acc, acc_none)


@pytest.mark.timeout(300)
def test_a_resumed_compressed_run_repeats_the_uninterrupted_one(letter_stores, client, tmp_path):
    """int8 rounds to nearest and the shares' residuals are checkpointed with their local state:
    a sync run stopped after its first epoch and resumed ends with the weights and residuals of a
    run that was never stopped, bit for bit."""
    a, b, _ = _cut_and_straight({"compression": "int8"}, letter_stores, client, tmp_path)
    np.testing.assert_array_equal(a.params, b.params)
    assert sorted(a.local_states) == sorted(b.local_states) == ["s0", "s1"]
    for slot in a.local_states:
        ra, rb = (c.local_states[slot]["buffers"][DeltaCompressor.RESIDUAL] for c in (a, b))
        np.testing.assert_array_equal(ra, rb, err_msg=slot)


@pytest.mark.timeout(300)
def test_compressed_replies_train_about_as_well_as_float32(float32_accuracy, letter_stores, client, tmp_path):
    """fp16 deltas and fp16 replies on two workers: the model learns about as well as float32,
    and the checkpoint keeps the weights the participants held (a resume sends them the same)."""
    cfg = TrainConfig(compression="fp16", compress_replies=True, **RUN)
    res = train(letter_stores[0], cfg, tmp_path, client=client)
    acc = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    assert acc > float32_accuracy - 0.02, (acc, float32_accuracy)
    ckpt = read_checkpoint(res.run_dir / "checkpoint.npz")
    assert ckpt.reply_view is not None and ckpt.reply_view.shape == ckpt.params.shape
    gap = np.abs(ckpt.reply_view - ckpt.params)
    assert 0 < gap.max() <= np.abs(ckpt.params).max() * 2.0**-10  # one rounding off, not the same


@pytest.mark.timeout(300)
def test_a_resumed_run_with_compressed_replies_repeats_the_uninterrupted_one(letter_stores, client, tmp_path):
    """The checkpoint keeps the weights the workers hold: a resumed run with compressed replies
    ends where the uninterrupted one does, bit for bit, and differs from float32 replies."""
    cfg = {"compression": "int8", "compress_replies": True}
    a, b, straight = _cut_and_straight(cfg, letter_stores, client, tmp_path)
    np.testing.assert_array_equal(a.reply_view, b.reply_view)
    plain_cfg = TrainConfig(**{**RESUMED, **cfg, "compress_replies": False})
    plain = train(letter_stores[0], plain_cfg, tmp_path / "plain", client=client)
    assert not np.array_equal(plain.model.params, straight)  # the replies did change the run


@pytest.mark.parametrize("codec", ["none", "topk"])
def test_compressed_replies_without_a_dense_codec_name_the_fix(codec):
    """A resume that turns compression off keeps the run's compress_replies: the refusal says to
    turn that off too, and gives top-k's reason only for top-k."""
    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        TrainConfig().with_overrides([f"compression={codec}", "compress_replies=true"])
    msg = str(info.value)
    assert msg.endswith("set compress_replies = false or one of those codecs"), msg
    assert ("top-k" in msg) == (codec == "topk"), msg
