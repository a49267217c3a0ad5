"""Compressed deltas: each codec against a NumPy reference, the server's header checks, error
feedback, and pushes through a real scheduler (gen_cluster)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from distributed.protocol.serialize import Serialize, Serialized, serialize
from distributed.utils_test import gen_cluster

from pipeline.config import COMPRESSIONS
from pipeline.ps import EXTENSION_NAME, ParameterServerExtension, PSError
from pipeline.ps.wire import CODECS, INT8_BLOCK, DeltaCompressor, compress, decode_delta, topk_count

N = 10_000  # not a multiple of the int8 block: the last block is short
FRACTION = 0.05


def _remote(wire):
    """What the scheduler receives: every zero-copy frame as a Serialized (header + frames)."""

    def one(v):
        if isinstance(v, Serialize):
            return Serialized(*serialize(v.data, serializers=["dask"]))
        return v

    return {k: one(v) for k, v in wire.items()} if isinstance(wire, dict) else one(wire)


def _delta(seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32) * np.float32(1e-3)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Round each float32 to the nearer of its two bf16 neighbours (ties: even last bit), in
    float64 arithmetic, element by element."""
    bits = x.view(np.uint32).astype(np.uint64)
    down = bits & 0xFFFF0000
    up = down + 0x10000
    out = np.empty_like(x)
    for i in range(x.size):
        lo = np.array([down[i]], np.uint64).astype(np.uint32).view(np.float32)[0]
        hi = np.array([up[i]], np.uint64).astype(np.uint32).view(np.float32)[0]
        dlo, dhi = abs(float(x[i]) - float(lo)), abs(float(hi) - float(x[i]))
        if dlo < dhi or (dlo == dhi and not (int(down[i]) >> 16) & 1):
            out[i] = lo
        else:
            out[i] = hi
    return out


def test_the_config_knows_every_codec():
    assert COMPRESSIONS == CODECS


def test_fp16_round_trip_equals_numpy_half_precision():
    x = _delta()
    wire, decoded = compress(x, "fp16")
    back = decode_delta(_remote(wire), N, "fp16")
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back, decoded)
    normal = np.abs(x) > 6.2e-5  # float16's normal range: relative error at most 2**-11
    assert (np.abs(back - x)[normal] <= 2.0**-11 * np.abs(x[normal])).all()
    assert wire["data"].data.nbytes == 2 * N


def test_fp16_overflow_is_refused_on_the_worker():
    with pytest.raises(PSError, match="exceeds float16's range"):
        compress(np.array([1.0, 7e4], np.float32), "fp16")


def test_bf16_rounds_to_nearest_even_like_the_reference():
    x = _delta(1, 3000)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F808001], np.uint32).view(np.float32)
    x = np.concatenate([x, ties])
    wire, decoded = compress(x, "bf16")
    back = decode_delta(_remote(wire), x.size, "bf16")
    np.testing.assert_array_equal(back, _bf16_reference(x))
    np.testing.assert_array_equal(back, decoded)
    # halfway cases go to the even neighbour: 1 + 2**-8 -> 1.0, 1 + 3 * 2**-8 -> 1 + 2**-6 ...
    assert back[-4:].view(np.uint32).tolist() == [0x3F800000, 0x3F820000, 0xBF800000, 0x3F810000]
    assert (np.abs(back - x) <= 2.0**-8 * np.abs(x)).all()
    assert wire["data"].data.dtype == np.uint16


def test_topk_sends_the_largest_entries_exactly():
    x = _delta(2)
    k = topk_count(N, FRACTION)
    assert k == math.ceil(FRACTION * N) and topk_count(10, 1e-9) == 1 and topk_count(10, 1.0) == 10
    wire, decoded = compress(x, "topk", FRACTION)
    back = decode_delta(_remote(wire), N, "topk", FRACTION)
    ref = np.zeros_like(x)
    top = np.argsort(-np.abs(x), kind="stable")[:k]
    ref[top] = x[top]
    np.testing.assert_array_equal(back, ref)
    np.testing.assert_array_equal(back, decoded)
    assert wire["index"].data.dtype == np.int32 and (np.diff(wire["index"].data) > 0).all()


def test_int8_error_is_at_most_half_a_step_of_each_block():
    x = _delta(3)
    x[INT8_BLOCK : 2 * INT8_BLOCK] = 0.0  # an all-zero block: scale 0, decodes to zeros
    wire, decoded = compress(x, "int8")
    back = decode_delta(_remote(wire), N, "int8")
    np.testing.assert_array_equal(back, decoded)
    for b in range(math.ceil(N / INT8_BLOCK)):
        sl = slice(b * INT8_BLOCK, min(N, (b + 1) * INT8_BLOCK))
        step = np.abs(x[sl]).max() / 127
        ref = np.clip(np.rint(x[sl] / step), -127, 127) * step if step else np.zeros_like(x[sl])
        np.testing.assert_allclose(back[sl], ref, rtol=1e-6, atol=1e-12)
        assert (np.abs(back[sl] - x[sl]) <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert wire["data"].data.dtype == np.int8 and wire["scales"].data.size == math.ceil(N / INT8_BLOCK)


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_error_feedback_sends_the_sum_up_to_the_last_residual(codec):
    """Over many pushes the server receives the sum of the deltas minus only what is still in
    the last residual; without error feedback what was dropped is lost."""
    ef, plain = DeltaCompressor(codec, FRACTION), DeltaCompressor(codec, FRACTION, error_feedback=False)
    total = np.zeros(N, np.float64)
    got, got_plain = np.zeros(N, np.float64), np.zeros(N, np.float64)
    for step in range(30):
        d = _delta(100 + step)
        total += d
        got += ef(d)[1]
        got_plain += plain(d)[1]
    assert plain.residual is None
    np.testing.assert_allclose(got + ef.residual, total, atol=1e-7)
    if codec == "topk":  # dropping 95% each push: a large gap without feedback, none with it
        assert np.abs(got_plain - total).sum() > 10 * np.abs(got + ef.residual - total).sum()


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_a_sharded_push_encodes_each_range_as_its_shard_decodes_it(codec):
    """With shards each range travels as a delta of its own length: every wire decodes, at its
    range's length (as that shard's job decodes it), to the decoded slice; error feedback keeps
    the whole vector's residual."""
    x = _delta(7)
    ranges = [(0, 1000), (1000, 1001), (1001, N)]
    ef = DeltaCompressor(codec, FRACTION)
    wires, decoded = ef(x, ranges)
    assert isinstance(wires, list) and len(wires) == len(ranges)
    for (lo, hi), wire in zip(ranges, wires, strict=True):
        back = decode_delta(_remote(wire), hi - lo, codec, FRACTION)
        np.testing.assert_array_equal(back, decoded[lo:hi])
        np.testing.assert_array_equal(back, compress(x[lo:hi], codec, FRACTION)[1])
    np.testing.assert_array_equal(ef.residual, x - decoded)
    if codec == "topk":  # each range keeps its own share of entries: a 1-entry range sends its one
        assert decoded[1000] == x[1000]
    with pytest.raises(PSError, match="do not cover a vector of"):
        DeltaCompressor(codec, FRACTION)(x, [(0, 10), (11, N)])


def test_none_passes_the_delta_through():
    x = _delta()
    wire, decoded = DeltaCompressor("none")(x)
    assert wire is x and decoded is x
    with pytest.raises(PSError, match="unknown compression 'zip'"):
        DeltaCompressor("zip")


def _with(wire: dict, **changes) -> dict:
    out = _remote(wire)
    for k, v in changes.items():
        out[k] = _remote(Serialize(v)) if isinstance(v, np.ndarray) else v
    return out


@pytest.mark.parametrize(
    "codec, change, fragment",
    [
        ("fp16", {"data": np.zeros(N, np.float32)}, "dtype must be float16"),
        ("fp16", {"data": np.zeros(N - 1, np.float16)}, r"expected shape \(10000,\)"),
        ("bf16", {"data": np.zeros(N, np.int16)}, "dtype must be uint16"),
        ("int8", {"data": np.zeros(N, np.uint8)}, "dtype must be int8"),
        ("int8", {"scales": np.zeros(2, np.float32)}, r"scales: expected shape \(3,\)"),
        ("int8", {"scales": np.array([1, -1, 1], np.float32)}, "scales must be >= 0"),
        ("topk", {"index": np.full(500, N, np.int32)}, "index out of range"),
        ("topk", {"index": np.arange(-1, 499, dtype=np.int32)}, "index out of range"),
        ("topk", {"index": np.zeros(500, np.int32)}, "strictly increasing"),
        ("topk", {"index": np.arange(500, dtype=np.int64)}, "dtype must be int32"),
        ("topk", {"values": np.zeros(499, np.float32)}, r"values: expected shape \(500,\)"),
        ("topk", {"k": 499}, "k=499 entries, the job expects k=500"),
        ("topk", {"n": N + 1}, "delta of 10001 parameters, expected 10000"),
        ("fp16", {"codec": "bf16"}, "encoded as 'bf16', but the job expects 'fp16'"),
    ],
)
def test_the_server_refuses_malformed_frames_from_their_headers(codec, change, fragment):
    wire, _ = compress(_delta(), codec, FRACTION)
    with pytest.raises(PSError, match=fragment):
        decode_delta(_with(wire, **change), N, codec, FRACTION)


def test_the_server_refuses_a_missing_frame_a_pickle_and_a_plain_vector():
    wire, _ = compress(_delta(), "topk", FRACTION)
    bad = _remote(wire)
    del bad["values"]
    with pytest.raises(PSError, match="without its 'values' frame"):
        decode_delta(bad, N, "topk", FRACTION)
    header, frames = serialize({"evil": 1}, serializers=["pickle"])
    with pytest.raises(PSError, match="expected a NumPy array"):
        decode_delta(_with(wire, index=Serialized(header, frames)), N, "topk", FRACTION)
    with pytest.raises(PSError, match="the job expects int8 deltas .* got an uncompressed array"):
        decode_delta(_remote(Serialize(_delta())), N, "int8")
    with pytest.raises(PSError, match="encoded as 'topk', but the job expects float32 deltas"):
        decode_delta(_remote(wire), N, "none")


@gen_cluster(client=True)
async def test_compressed_pushes_through_the_scheduler(c, s, a, b):
    """A top-k job applies exactly the decoded delta, counts the compressed bytes, refuses a
    bad index with the job unchanged, and replies with float32 weights."""
    ParameterServerExtension(s)
    w0 = np.ones(N, np.float32)
    await c.scheduler.ps_create(
        job="tk",
        params=Serialize(w0),
        n_params=N,
        mode="async",
        optimizer={"name": "sgd", "lr": 1.0},
        compression="topk",
        topk_fraction=FRACTION,
    )
    await c.scheduler.ps_join(job="tk", name="p")
    wire, decoded = compress(_delta(), "topk", FRACTION)
    r = await c.scheduler.ps_push(job="tk", name="p", version=0, delta=wire, samples=1, batches=1, loss=0.0)
    params = np.asarray(r["params"])
    assert r["version"] == 1 and params.dtype == np.float32
    np.testing.assert_array_equal(params, w0 - decoded)
    job = s.extensions[EXTENSION_NAME].jobs["tk"]
    assert job.bytes_in == 8 * topk_count(N, FRACTION)
    bad = {**wire, "index": Serialize(np.full(topk_count(N, FRACTION), N, np.int32))}
    with pytest.raises(PSError, match="index out of range"):
        await c.scheduler.ps_push(job="tk", name="p", version=1, delta=bad, samples=1, batches=1, loss=0.0)
    assert job.version == 1 and np.array_equal(job.params, w0 - decoded)
    with pytest.raises(PSError, match="unknown compression 'zip'"):
        await c.scheduler.ps_create(job="z", params=Serialize(w0), n_params=N, compression="zip")
    await c.scheduler.ps_close(job="tk")


@gen_cluster(client=True)
async def test_compressed_replies_follow_the_weights_within_one_rounding(c, s, a, b):
    """A sync job with ``reply_codec``: a participant that pushed at the previous version gets
    the change of the common weights in the codec, which it adds to its copy: its weights equal
    the server's copy bit for bit, stay within one fp16 rounding of the true weights (the rounding
    goes out with the next reply instead of adding up), and each reply takes half the bytes. A
    participant at another version (a join) gets the common weights whole."""
    ParameterServerExtension(s)
    w0 = _delta(7) * np.float32(1e3)
    await c.scheduler.ps_create(
        job="rc",
        params=Serialize(w0),
        n_params=N,
        mode="sync",
        optimizer={"name": "sgd", "lr": 1.0},
        compression="fp16",
        reply_codec="fp16",
    )
    joined = await c.scheduler.ps_join(job="rc", name="p")
    held = np.array(joined["params"], dtype=np.float32)
    np.testing.assert_array_equal(held, w0)
    job = s.extensions[EXTENSION_NAME].jobs["rc"]
    for version in range(6):
        wire, _ = compress(_delta(version), "fp16")
        before = job.bytes_out
        r = await c.scheduler.ps_push(job="rc", name="p", version=version, delta=wire, samples=1, batches=1, loss=0.0)
        assert r["version"] == version + 1 and r["since"] == version and "params" not in r
        wanted = job.params - held  # this round's change plus the rounding the last reply left
        held = held + decode_delta(r["rdelta"], N, "fp16", what="reply")
        np.testing.assert_array_equal(held, job.held)
        assert job.bytes_out - before == 2 * N
        # off the true weights by one fp16 rounding of the change asked for, entry by entry
        assert np.all(np.abs(held - job.params) <= np.abs(wanted) * 2.0**-11 + 2.0**-24)
    late = await c.scheduler.ps_join(job="rc", name="q")
    np.testing.assert_array_equal(np.asarray(late["params"]), held)
    with pytest.raises(PSError, match="reply_codec 'fp16' needs mode 'sync'"):
        await c.scheduler.ps_create(job="ra", params=Serialize(w0), n_params=N, mode="async", reply_codec="fp16")
    with pytest.raises(PSError, match="reply_codec must be one of none, fp16, bf16, int8, got 'topk'"):
        await c.scheduler.ps_create(job="rt", params=Serialize(w0), n_params=N, reply_codec="topk")
    await c.scheduler.ps_close(job="rc")


_LOAD_CODEC = """
import sys, threading
import numpy as np
from pipeline.ps.job import Job

def join_loads():
    for t in threading.enumerate():
        if t.name.startswith("pipeline-") and t.name.endswith("-load"):
            t.join(300)

Job.create("plain", np.zeros(4, np.float32), 4, mode="async")
Job.create("topk", np.zeros(4, np.float32), 4, mode="async", compression="topk")
join_loads()  # every job loads the server's round (its mean and SGD step), not a codec's loops
from kernels import codec
print("before:", "kernels.half" in sys.modules, len(codec._bf16_bits.signatures), len(codec._sgd_step.signatures) > 0)
Job.create("j", np.zeros(4, np.float32), 4, mode="async", compression=sys.argv[1])
join_loads()
from kernels import half
print("loaded:", len(codec._bf16_bits.signatures), len(codec._bf16_widen.signatures),
      len(half._to_half_bits.signatures), len(half._from_half_bits.signatures))
"""


@pytest.mark.parametrize("codec, loaded", [("bf16", "1 1 0 0"), ("fp16", "0 0 1 1")])
def test_a_job_loads_its_codec_s_compiled_loops_as_it_is_created(codec, loaded):
    """A job whose deltas need compiled conversions starts loading them in a background thread
    when it is created (not on the scheduler's event loop at its first delta); a job without
    them loads the server's round only, none of a codec's conversions."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_CODEC, codec], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "before: False 0 True" in r.stdout, r.stdout
    assert f"loaded: {loaded}" in r.stdout, r.stdout
