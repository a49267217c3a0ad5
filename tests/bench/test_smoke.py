"""Smoke tests: every benchmark's quick mode runs and prints its table.

The cluster benchmarks run as a subprocess (``python -m bench.<name> --quick``) so that a
benchmark's clusters, threads and third-party warnings stay out of the test process; the
in-process ones (``bench.kernels``, ``bench.io``) are called through their ``main``. A missing optional peer
(torch, dask-ml) drops its row inside the benchmark; it never fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.bench.quick import quick_json

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "throughput": [
        "| pipeline default",
        "| pytorch best practice (target) |",
        "| pytorch best practice + the same weight averaging |",
        "| accuracy within 1 point of PyTorch best practice + the same weight averaging (ema on) |",
        "| pytorch tutorial (DataLoader) |",
        "| pytorch 2-process local SGD",
        "| pipeline ema=0",
        "| pipeline over TCP only (ps_shared_memory=false) |",
        "| pipeline overlap (reply folded in after 1 step) |",
        "dask-ml Incremental, tuned",
        "Conditions per pass:",
        "Raw figures: `bench/out/results/throughput-quick-",
        "Targets (",
    ],
    "local_steps": [
        "| pipeline sync | 8 |",
        "kernels in memory",
        "| pipeline sync | 8 | the reference |",
        "samples/s vs local_steps 8 (per pass)",
        "Conditions per pass (the synthetic sweep's passes):",
        "Raw figures: `bench/out/results/local_steps-quick-",
    ],
    "time_to_accuracy": [
        "| letter | accuracy >= 0.500 |",
        "within 2 points",
        "; 2 of 2)",
        "2 seeds per system",
        "pytorch best practice s",
        "(in process)",
        "command cold / fastest peer cold",
        "Raw figures: `bench/out/results/time_to_accuracy-quick-",
        "Conditions per pass (one pass per dataset and seed",
    ],
    "statistical_efficiency": [
        "| 1 process [default] |",
        "| 2 workers [default] |",
        "| 2 workers [ema=0] |",
        "| default | 1 process [default] |",
        "<= 1.25x per seed",
        "test accuracy >= 0.75 fixed in code",
        "Raw figures: `bench/out/results/statistical_efficiency-quick-",
    ],
    "out_of_core": [
        "peak RSS MB",
        "page cache MB (epoch end)",
        "| pytorch IterableDataset |",
        "| 2 |",
        "memory binds?",
        "Raw figures: `bench/out/results/out_of_core-quick-",
        "Conditions per pass (one pass per store",
    ],
    "ps_limits": [
        "pushes/s",
        "| 1e+05 | 2 |",
        "Conditions per pass (the 1-worker cluster's passes first, then the 2-worker cluster's):",
        "Raw figures: `bench/out/results/ps_limits-quick-",
    ],
    "ps_compression": [
        "| int8 | 0.",
        "| bf16 + replies | 0.",
        "within 0.5: ",
        "| topk | 1e+05 | 1 |",
        "| codec | params | encode ms per round | reply MB | float32 reply MB |",
        "| codec | params | worker ms/push (compressor) | encoder ms | NumPy encoder ms |",
        "sched ms/push (process)",
        "| 1M | GPU | none |",
        "shards for 64, 100 GbE (estimate)",
        "| 1e+04 | 8 |",
        "8 per host summed, host sum on CPU (estimate)",
        "With `combine_pushes` (8 per host) and shards, 64 GPU workers",
        "Raw figures: `bench/out/results/ps_compression-quick-",
    ],
    "overlap": ["| overlap on |", "| overlap off |", "within 0.5: ", "Raw figures: `bench/out/results/overlap-quick-"],
    "ps_shards": [
        "sched CPU ms/push",
        "| 2 | 1e+05 | 2 |",
        "shards cannot add cores here",
        "Raw figures: `bench/out/results/ps_shards-quick-",
    ],
    "ps_saturation": [
        "Predicted capacity 1/c_s",
        "| 4 | ",
        "achieved / offered",
        "Raw figures: `bench/out/results/ps_saturation-quick-",
    ],
    "ps_transport": [
        "| 2 | 10,000 | shm |",
        "| 2 | 10,000 | tcp |",
        "scheduler CPU per push, TCP / shared memory",
        "Raw figures: `bench/out/results/ps_transport-quick-",
    ],
    "ps_summed": [
        "| 2 | 10,000 | separate |",
        "| 2 | 10,000 | summed |",
        "scheduler CPU per round, separate / summed",
        "Raw figures: `bench/out/results/ps_summed-quick-",
    ],
    "epoch_anatomy": [
        "| letter | 16,000 / 4,000 |",
        "no-op round trip ms",
        "Conditions per pass (one pass per dataset",
        "Raw figures: `bench/out/results/epoch_anatomy-quick-",
    ],
    "step_anatomy": [
        "| GEMMs (8 per step) |",
        "| cluster start |",
        "driver (scheduler + PS)",
        "| forward + backward kernels |",
        "| 784x512 | weight gradient |",
        "Conditions per pass (one pass per measurement",
        "Raw figures: `bench/out/results/step_anatomy-quick-",
    ],
    "cold_start": [
        "| phase | in process s | 2 workers s | in process, blas_threads=2 s |",
        "| JIT / cache load |",
        "| overhead (process - training) |",
        "| whole process, plain command |",
        "| overhead of the plain command (process - epochs 2..n - one steady epoch) |",
        "Raw figures: `bench/out/results/cold_start-quick-",
    ],
    "sklearn_parity": [
        "| MLPClassifier | iris | 112 / 38 |",
        "| MLPRegressor | diabetes |",
        "| estimator | dataset | fit time, ours / scikit-learn (per pass; below 1.00x ours is faster) |",
        "Conditions per pass:",
        "Raw figures: `bench/out/results/sklearn_parity-quick-",
    ],
    "fed_strategies": [
        "| mean, no attacker | no |",
        "| krum f=1 | yes |",
        "| multi-krum f=1 m=5 | yes |",
        "Dirichlet(0.3)",
        "Conditions of the run:",
        "Raw figures: `bench/out/results/fed_strategies-quick-",
    ],
    "privacy": [
        "| no privacy | 0.000 | n/a |",
        "| central DP, epsilon 1 |",
        "| secure aggregation |",
        "| secure aggregation + DP, epsilon 3 |",
        "the job in this process",
        "| setting | noise multiplier | epsilon | target | rounds | test acc | rounds/s | rounds/s vs no privacy |",
        "Conditions per pass:",
        "Raw figures: `bench/out/results/privacy-quick-",
    ],
}


# throughput's smoke run starts five clusters and a fresh cold process per trainer (13: torch.compile
# and two-process PyTorch among them); time_to_accuracy's runs two seeds: minutes on a loaded 2-core machine
TIMEOUT = {
    "throughput": 900,
    "time_to_accuracy": 600,
    "statistical_efficiency": 300,
    "out_of_core": 420,
    "ps_compression": 420,
    "cold_start": 300,
}
FIGURES = {"throughput", "time_to_accuracy", "out_of_core", "ps_limits", "privacy"}  # draw a PNG too


def _optional_peer(needle: str) -> str | None:
    """The optional package (the ``bench`` extra) a row of the table needs, if any."""
    lowered = needle.lower()
    return "torch" if "pytorch" in lowered else "dask_ml" if "dask-ml" in lowered else None


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.timeout(TIMEOUT.get(n, 180) + 30)) for n in sorted(CASES)]
)
def test_quick_mode_runs(name: str) -> None:
    from bench.common import OUT

    png = OUT / f"{name}-quick.png"
    png.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT.get(name, 180),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in CASES[name]:
        if _optional_peer(needle) and importlib.util.find_spec(_optional_peer(needle)) is None:
            continue  # a missing peer drops its row (or shows n/a); the run still succeeds
        assert needle in proc.stdout, f"{needle!r} missing from:\n{proc.stdout}"
    if name == "throughput" and importlib.util.find_spec("torch") is not None:
        # the averaging row trained: its test accuracy (table column 6) is a number in [0, 1]
        row = next(
            ln
            for ln in proc.stdout.splitlines()
            if ln.startswith("| pytorch best practice + the same weight averaging |")
        )
        acc = float(row.split("|")[6])
        assert 0.0 <= acc <= 1.0, row
    if name in FIGURES:  # the figure beside the table: a real PNG with something drawn in it
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (png, len(data))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_throughput_accuracy_only_quick() -> None:
    """``--accuracy-only`` trains the accuracy-parity rows once per seed and keeps their raw
    figures: every row has a finite accuracy in [0, 1] for each seed, the PyTorch averaging row
    took as many averaging updates as the pipeline took sync rounds, and the averaging target is
    reported."""
    import math

    stdout, rec = quick_json("throughput", "--accuracy-only", "--seeds", "0,1")
    assert [p["seed"] for p in rec["passes"]] == [0, 1]
    want = {"pipeline default (sync, local_steps 8)", "pipeline ema=0 (accuracy parity)"}
    if importlib.util.find_spec("torch") is not None:
        want |= {"pytorch best practice (target)", "pytorch best practice + the same weight averaging"}
    for p in rec["passes"]:
        assert want <= set(p["results"]), p["results"].keys()
        for name in want:
            acc = p["results"][name]["acc"]
            assert math.isfinite(acc) and 0.0 <= acc <= 1.0, (name, acc)
        if "pytorch best practice + the same weight averaging" in p["results"]:
            updates = p["results"]["pytorch best practice + the same weight averaging"]["updates"]
            assert updates == p["results"]["pipeline default (sync, local_steps 8)"]["rounds"] >= 1
    if importlib.util.find_spec("torch") is not None:
        assert "| pytorch best practice + the same weight averaging |" in stdout
        labels = [t["target"] for t in rec["targets"]]
        assert "accuracy within 1 point of PyTorch best practice + the same weight averaging (ema on)" in labels


@pytest.mark.parametrize(("ema", "every", "epochs"), [(0.999, 3, 2), (0.6, 1, 2)])
def test_torch_weight_average_matches_the_numpy_rule_and_the_server_optimizer(
    ema: float, every: int, epochs: int
) -> None:
    """The PyTorch peer's average equals a plain-NumPy run of the pipeline's rule on the same
    weights (``average += (1 - d) * (w - average)``, ``d = min(ema, (1 + t) / (10 + t))``,
    update 1 copies), and the pipeline's own :class:`ServerOptimizer` fed the same weights. It
    is updated every ``every`` steps and after an epoch's last step, and ``predict`` uses it.
    ``ema`` 0.6 reaches its cap at update 13, 0.999 never does here."""
    pytest.importorskip("torch")
    from bench.torch_peers import TorchBestAveraged
    from pipeline.optim import ServerOptimizer

    class Recording(TorchBestAveraged):
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.seen: list[np.ndarray] = []  # the weights at each update, before it
            super().__init__(*args, **kwargs)

        def update_average(self) -> None:
            self.seen.append(np.concatenate([p.detach().numpy().ravel() for p in self.weights]))
            super().update_average()

    rng = np.random.default_rng(3)
    n, batch = 50, 8  # 7 steps per epoch, the last of 2 rows
    X = rng.standard_normal((n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n)
    peer = Recording(X, y, (6, 5, 3), batch=batch, lr=0.05, threads=1, adam_kind="foreach", ema=ema, every=every)
    for _ in range(epochs):
        peer.epoch()
    steps = -(-n // batch)
    assert peer.t == len(peer.seen) == epochs * -(-steps // every)
    ref = np.zeros_like(peer.seen[0], dtype=np.float64)
    server = ServerOptimizer("sgd", lr=1.0, ema=ema, n=ref.size)
    params = np.zeros(ref.size, np.float32)
    for t, w in enumerate(peer.seen, start=1):
        d = min(ema, (1 + t) / (10 + t))
        ref = w.astype(np.float64) if t == 1 else ref + (1 - d) * (w - ref)
        server.step(params, params - w, 1.0)  # sgd at lr 1: the server's weights become w
        np.testing.assert_allclose(params, w, rtol=0, atol=1e-6)
    got = np.concatenate([p.detach().numpy().ravel() for p in peer.average])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, server.model(params), rtol=1e-5, atol=1e-6)
    assert np.abs(got - peer.seen[-1]).max() > 1e-4  # the average is not the last weights
    # predict: the averaged weights (Linear stores W as out x in), ReLU between the layers
    shapes = [(5, 6), (5,), (3, 5), (3,)]
    parts = np.split(ref, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
    W0, b0, W1, b1 = (q.reshape(s) for q, s in zip(parts, shapes, strict=True))
    want = np.maximum(X @ W0.T + b0, 0) @ W1.T + b1
    np.testing.assert_allclose(peer.predict(X), want, rtol=1e-4, atol=1e-5)


def test_time_to_accuracy_settings_are_checked_like_train_set() -> None:
    from bench.time_to_accuracy import pipeline_overrides
    from pipeline.errors import ConfigError

    assert pipeline_overrides(["min_share_gflop=20", "ema=0"]) == {"min_share_gflop": 20.0, "ema": 0.0}
    assert pipeline_overrides([]) == {}
    with pytest.raises(ConfigError, match="unknown config key 'emma'"):
        pipeline_overrides(["emma=0"])


def test_full_run_figures_are_published_beside_results(tmp_path: Path, monkeypatch) -> None:
    """A full run's figure is copied from bench/out/ to bench/figures/ and linked relative to
    bench/; a quick one is linked where it lies; a benchmark without a figure gets no link."""
    import bench.__main__ as main

    out, figs = tmp_path / "out", tmp_path / "figures"
    out.mkdir()
    (out / "ps_limits.png").write_bytes(b"\x89PNG full")
    (out / "ps_limits-quick.png").write_bytes(b"\x89PNG quick")
    monkeypatch.setattr(main, "OUT", out)
    monkeypatch.setattr(main, "FIGURES", figs)
    monkeypatch.setattr(main, "HERE", tmp_path)
    assert main.publish_figure("ps_limits", quick=False) == f"![{main.TITLES['ps_limits']}](figures/ps_limits.png)"
    assert (figs / "ps_limits.png").read_bytes() == b"\x89PNG full"
    assert main.publish_figure("ps_limits", quick=True).endswith("(out/ps_limits-quick.png)")
    assert main.publish_figure("kernels", quick=False) is None
    doc = main.render([("T", "python -m bench.x", "| a |", None)], quick=False, figures={"T": "![t](figures/x.png)"})
    assert doc.index("| a |") < doc.index("![t](figures/x.png)")


def test_compression_projection_is_the_stated_arithmetic() -> None:
    """Saturation = push period / scheduler CPU per push, capped by the link in either direction
    (replies are float32); a per-push cost is the smallest size's figure plus the per-parameter
    rest at the nearest measured size, the least disturbed pusher count per size."""
    from bench.ps_compression import BATCH, GPU_FLOPS, LINKS, LOCAL_STEPS, MODELS, n_params, projection

    def cost(n: int, workers: int) -> float:
        return 0.5 + n * (1e-6 if n < 5e6 else 3e-6) + (workers - 1)

    rows = [
        {
            "codec": c,
            "params": n,
            "workers": w,
            "sched ms/push (process)": cost(n, w),
            "MB/push": (4 if c == "none" else 1) * n / 1e6,
        }
        for c in ("none", "fp16", "bf16", "topk", "int8")
        for n in (10_000, 1_000_000, 10_000_000)
        for w in (1, 2)
    ]
    proj = projection(rows, {"flops": 50e9, "params": 1, "step_s": 1.0, "step_wall_s": 1.0})
    p = n_params(MODELS["1M"])
    assert p == 784 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 10 + 10
    r = next(x for x in proj if (x["model"], x["workers"], x["codec"]) == ("1M", "GPU", "int8"))
    a = cost(10_000, 1)
    cpu, bw = (a + (cost(1_000_000, 1) - a) / 1e6 * p) / 1e3, LINKS["10 GbE"]
    assert abs(r["sched ms/push"] - 1e3 * cpu) < 1e-9
    bytes_in = 1e6 * (0.01 + (1.0 - 0.01) / 1e6 * p)  # int8 rows above: 1 byte per parameter
    period = LOCAL_STEPS * 6 * p * BATCH / GPU_FLOPS + cpu + (bytes_in + 4 * p) / bw
    assert abs(r["N 10 GbE"] - min(period / cpu, period * bw / (4 * p))) < 1e-6
    assert r["binds 10 GbE"] == ("CPU" if period / cpu <= period * bw / (4 * p) else "link")
    big = next(x for x in proj if (x["model"], x["workers"], x["codec"]) == ("100M", "CPU", "none"))
    p100 = n_params(MODELS["100M"])
    assert abs(big["sched ms/push"] - (a + (cost(10_000_000, 1) - a) / 1e7 * p100)) < 1e-6
    # the budgets: the 100 GbE push period over 64 pushes a round, or over 8 (a host's 8 summed)
    bw = LINKS["100 GbE"]
    period = LOCAL_STEPS * 6 * p * BATCH / GPU_FLOPS + cpu + (bytes_in + 4 * p) / bw
    assert abs(r["budget ms/push at 64"] - 1e3 * period / 64) < 1e-9
    assert abs(r["budget ms/push, 8 per host summed"] - 1e3 * period / 8) < 1e-9
    assert r["per-message ms"] == a
    # a budget below the per-message cost cannot be met by any shard count
    assert (r["shards for 64, 100 GbE (estimate)"] == "never (per-message cost)") == (period / 64 * 1e3 <= a)
    assert r["encode ms/push"] == 0  # no encoding figures given: none assumed
    # the worker's encoding lengthens its push period: measured at 1e6 and 1e7, scaled linearly
    # from the size nearest the model's
    encode = [
        {"codec": "int8", "params": 1_000_000, "worker ms/push (compressor)": 2.0},
        {"codec": "int8", "params": 10_000_000, "worker ms/push (compressor)": 30.0},
    ]
    r2 = next(
        x
        for x in projection(rows, {"flops": 50e9, "params": 1, "step_s": 1.0, "step_wall_s": 1.0}, encode)
        if (x["model"], x["workers"], x["codec"]) == ("1M", "GPU", "int8")
    )
    enc = 2.0e-3 * p / 1e6
    assert abs(r2["encode ms/push"] - 1e3 * enc) < 1e-9
    period2 = period + enc
    assert abs(r2["budget ms/push at 64"] - 1e3 * period2 / 64) < 1e-9
    big2 = next(
        x
        for x in projection(rows, {"flops": 50e9, "params": 1, "step_s": 1.0, "step_wall_s": 1.0}, encode)
        if (x["model"], x["workers"], x["codec"]) == ("100M", "CPU", "int8")
    )
    assert abs(big2["encode ms/push"] - 30.0 * p100 / 1e7) < 1e-9


def test_compressed_replies_in_the_projection_are_fewer_bytes_out_and_one_encode_a_round() -> None:
    """With ``compress_replies`` the reply's bytes are the codec's (fp16 2 a parameter, int8 1
    plus a scale a block) and the server's encode, once a round, is shared by the round's pushes:
    its CPU saturates at (period - encode) / CPU per push; float32 and top-k replies have no such
    column."""
    from bench.ps_compression import BATCH, LINKS, LOCAL_STEPS, MODELS, n_params, projection

    rows = [
        {"codec": c, "params": n, "workers": 1, "sched ms/push (process)": 0.5 + n * 1e-6, "MB/push": n / 1e6}
        for c in ("none", "fp16", "bf16", "topk", "int8")
        for n in (10_000, 1_000_000, 10_000_000)
    ]
    replies = [{"codec": "int8", "params": 1_000_000, "encode ms per round": 6.0}]
    cpu_step = {"flops": 50e9, "params": 1, "step_s": 1.0, "step_wall_s": 1.0}
    proj = projection(rows, cpu_step, None, None, replies)
    pick = {(x["model"], x["workers"], x["codec"]): x for x in proj}
    p = n_params(MODELS["1M"])
    r = pick[("1M", "CPU", "int8")]
    cpu = (0.5 + (1.0 - 0.01) / 1e6 * p + 0.01) / 1e3  # a + b x params, as the float32 column
    assert abs(r["sched ms/push"] - 1e3 * cpu) < 1e-9
    out = p + 4 * -(-p // 4096)
    for link, bw in LINKS.items():
        period = LOCAL_STEPS * 6 * p * BATCH / 50e9 + cpu + (1e6 * (0.01 + 0.99 / 1e6 * p) + out) / bw
        want = min((period - 6e-3 * p / 1e6) / cpu, period * bw / max(1e6 * (0.01 + 0.99 / 1e6 * p), out))
        assert abs(r[f"N {link}, replies compressed"] - want) < 1e-6
    assert pick[("1M", "GPU", "topk")]["N 10 GbE, replies compressed"] == "n/a"
    assert pick[("1M", "GPU", "none")]["N 100 GbE, replies compressed"] == "n/a"
    assert pick[("1M", "GPU", "fp16")]["N 100 GbE, replies compressed"] == "not measured"


def test_an_overlap_variant_run_does_not_replace_the_judged_run(tmp_path: Path) -> None:
    """``bench.overlap --synthetic-rows N`` keeps its figures as ``overlap_variant-*.json``: the
    overlap targets stay judged on the newest default run, however new the variant is."""
    import json

    from bench.overlap import results_name
    from bench.targets import overlap_targets

    assert results_name() == "overlap" and results_name(["letter", "synthetic-784"]) == "overlap_variant"
    assert results_name(synthetic_rows=120_000) == "overlap_variant"

    def write(name: str, gap: float) -> None:
        passes = [
            {"seed": s, "results": {"overlap off": {"acc": 0.8}, "overlap on": {"acc": 0.8 - gap / 100}}}
            for s in (0, 1, 2)
        ]
        (tmp_path / name).write_text(json.dumps({"results": {"letter": {"passes": passes}}}))

    write("overlap-20261201T000000Z.json", 0.1)
    write(f"{results_name(synthetic_rows=120_000)}-20261205T000000Z.json", 5.0)
    rows = overlap_targets(tmp_path)
    assert [r.met for r in rows] == [True] and "overlap-20261201T000000Z.json" in rows[0].source


def test_a_compression_variant_is_named_apart_and_tables_only_its_rows() -> None:
    """A run of some codecs or other rows (``--runs``, ``--synthetic-rows``) keeps its figures as
    ``ps_compression_variant``, whose table has only the rows it ran, each against float32."""
    from bench.ps_compression import accuracy_table, results_name

    assert results_name() == "ps_compression"
    assert results_name(runs=["topk"]) == results_name(synthetic_rows=120_000) == "ps_compression_variant"
    cond = {
        "load_before": 0.1,
        "load_after": 0.2,
        "steal_share": 0.0,
        "other_cores": 0.0,
        "gemm_numpy_gflops": 100.0,
        "gemm_torch_gflops": 90.0,
        "flags": [],
    }
    passes = [
        {"seed": s, "order": ["none", "topk"], "conditions": cond, "accuracy": {"none": 0.6, "topk": 0.59}}
        for s in (0, 1, 2)
    ]
    res = {"synthetic-784": {"settings": {"hidden": [4], "batch_size": 8, "epochs": 1}, "rows": [10, 5]}}
    res["synthetic-784"]["passes"] = passes
    text = accuracy_table(res)
    assert "| topk |" in text and "+1.00 / +1.00 / +1.00" in text and "| int8 |" not in text


def test_compression_projection_recomputes_from_a_kept_run() -> None:
    from bench.protocol import RESULTS
    from bench.ps_compression import reproject

    kept = [f for f in sorted(RESULTS.glob("ps_compression-*.json")) if "cpu_step" in f.read_text()]
    text = reproject(kept[-1])
    assert "| budget ms/push at 64 |" in text and "1M | GPU | none" in text


def test_main_collect_writes_results(tmp_path: Path) -> None:
    """``python -m bench --collect`` assembles whatever tables exist without running anything."""
    from bench.__main__ import render

    doc = render([("T", "python -m bench.x", "| a |\n| --- |\n| 1 |", 1.0)], quick=True)
    assert "# Benchmark results" in doc and "Command: `python -m bench.x`" in doc and "| 1 |" in doc


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_soak_runs_kills_and_reports(tmp_path: Path) -> None:
    """A minute-long soak: workers are killed and replaced while training goes on."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--minutes",
            "0.6",
            "--kill-every",
            "12",
            "--sample",
            "5",
            "--rows",
            "20000",
            "--features",
            "8",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "soak.md").read_text()
    assert "driver exit 130" in report  # interrupted at the end, not crashed
    rows = [ln.split("|") for ln in report.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert rows and int(rows[-1][7]) >= 2, report  # at least two workers were killed ...
    samples = [int(r[6].replace(",", "")) for r in rows]
    assert samples[-1] > samples[0], report  # ... and training went on


def test_targets_need_four_of_five_passes_not_the_median() -> None:
    """A target is met only when the per-pass ratio meets it in at least 4 of 5 passes: a median
    above the line with two passes below is not met; a missing figure counts as a miss."""
    from bench.protocol import needed, ratio_summary

    assert [needed(n) for n in (1, 3, 5, 10)] == [1, 3, 4, 8]
    s = ratio_summary([14, 14, 14, 12, 12], [10] * 5, 1.3)
    assert s["median"] == 1.4 and (s["hits"], s["met"]) == (3, False)
    s = ratio_summary([14, 14, 14, 14, 12], [10] * 5, 1.3)
    assert (s["hits"], s["met"], s["min"], s["max"]) == (4, True, 1.2, 1.4)
    s = ratio_summary([14, 14, 14, None, 14], [10, 10, 10, 10, 0], 1.3)
    assert s["per_pass"][3:] == [None, None] and (s["hits"], s["met"]) == (3, False)


def test_pass_order_rotates_and_load_is_flagged() -> None:
    """Each pass starts with the next trainer; every trainer runs once per pass; a pass with
    steal, other busy processes or a load above the cores used is flagged with its reason."""
    from bench.protocol import proc_stat, rotated, run_passes, under_load

    assert [rotated("abc", k) for k in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    calls: list[str] = []
    recs = run_passes({n: (lambda n=n: calls.append(n) or {"seconds": 1.0}) for n in "abc"}, passes=3, peak_n=64)
    assert calls == list("abcbcacab") and [r["order"][0] for r in recs] == list("abc")
    c = recs[0]["conditions"]
    assert {
        "load_before",
        "load_after",
        "steal_before",
        "steal_after",
        "other_cores",
        "gemm_numpy_gflops",
        "gemm_torch_gflops",
        "flags",
    } <= set(c)
    assert c["steal_after"] >= c["steal_before"] and c["gemm_numpy_gflops"] > 0
    quiet = {"steal_share": 0.0, "other_cores": 0.1, "load_before": 1.0}
    assert under_load(quiet, 2) == []
    assert under_load({**quiet, "steal_share": 0.05}, 2) == ["steal 5.0%"]
    assert under_load({**quiet, "other_cores": 0.9}, 2) == ["other processes 0.90 cores"]
    assert under_load({**quiet, "load_before": 3.5}, 2) == ["load 3.50 > 2 cores"]
    s = proc_stat()
    assert s["total"] >= s["busy"] >= 0 and s["steal"] >= 0


def test_provenance_names_versions_commit_and_json(tmp_path: Path, monkeypatch) -> None:
    """Every table's header names the commit, the package versions, the BLAS threads and the
    JSON file its figures were written to (a quick run's JSON goes to bench/out/, not kept)."""
    import json

    import bench.protocol as protocol

    monkeypatch.setattr(protocol, "QUICK_RESULTS", tmp_path)
    m = protocol.meta()
    assert m["versions"]["numpy"] and "python" in m["versions"] and m["commit"]
    assert m["host"]["cpu"] == protocol.cpu_model() and m["host"]["cpu"] != ""
    path = protocol.save_json("unit", {"meta": m, "x": np.float32(1.5)}, quick=True)
    assert json.loads(Path(tmp_path / Path(path).name).read_text())["x"] == 1.5
    m["json"] = str(path)
    text = "\n".join(protocol.provenance_lines(m))
    assert f"Commit {m['commit']}" in text and f"numpy {np.__version__}" in text
    assert "BLAS: " in text and f"Raw figures: `{path}`" in text


def test_out_of_core_says_whether_memory_binds() -> None:
    """Memory binds only under a cap below half the store, or with a store at least twice the
    RAM; otherwise the table says it does not (and why), whatever the sizes run."""
    from bench.out_of_core import binds, cap_support, own_memory_cgroup

    gib = 2**30
    assert binds(10 * gib, None, 24 * gib).startswith("NO: store 10.00 GiB < 2x RAM (24.0 GiB), no cap")
    assert binds(10 * gib, 8 * gib, 24 * gib).startswith("NO:") and "cap 8.0 GiB not below half" in binds(
        10 * gib, 8 * gib, 24 * gib
    )
    assert binds(10 * gib, 3 * gib, 24 * gib).startswith("yes: cap 3.0 GiB around the workers")
    assert binds(50 * gib, None, 24 * gib).startswith("yes: store 50.0 GiB >= 2x RAM")
    ok, why = cap_support()  # only looks: creates nothing
    d, limit_file = own_memory_cgroup()
    assert isinstance(ok, bool) and why
    assert limit_file in ("memory.limit_in_bytes", "memory.max") or d is None


def test_bench_kernels_quick(capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel benchmark runs end to end (tiny sizes) and prints its table."""
    from bench.kernels import main

    table = main(["--quick"])
    printed = capsys.readouterr().out
    assert table in printed
    assert "NumPy GEMM peak" in table and "Conditions per pass:" in table
    assert "Raw figures: `" in table and "kernels-" in table
    assert (
        "| trainer | samples/s (median) | samples/s per pass | % of GEMM-implied limit (median) "
        "| vs PyTorch best practice (per pass) |"
    ) in table
    for row in ("| cpu |", "| numpy |", "| sklearn-mlp |"):
        assert row in table
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert "| pytorch best practice |" in table
    assert "PyTorch Adam: fused" in table or "PyTorch Adam: foreach" in table


def test_bench_io_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.io --quick` runs end to end (in-process) and prints its tables."""
    from bench import io as bench_io

    text = bench_io.main(["--quick", "--out", str(tmp_path / "io.md")])
    out = capsys.readouterr().out
    assert "| ingest csv |" in out and "| ingest parquet |" in out
    for codec in ("none", "lz4", "zstd"):
        assert f"| {codec} |" in out
        assert f"| loader rows/s / plain Zarr read rows/s, {codec} | " in out
    for needle in (
        "## Ingest and loader I/O (",
        "| ingest MB/s, Parquet / CSV | ",
        "Conditions per pass:",
        "Raw figures: `bench/out/results/io-quick-",
    ):
        assert needle in out, needle
    assert (tmp_path / "io.md").read_text().strip() == text.strip()


def _flower_python() -> tuple[str | None, str]:
    """An interpreter that imports flwr (with Ray) and torch: ``BENCH_FLOWER_PYTHON``, the
    checkout's ``.venv-flwr``, or this one; (None, why) when there is none."""
    from bench.federated import FLOWER_PYTHON

    tried = []
    for cand in (os.environ.get("BENCH_FLOWER_PYTHON"), str(FLOWER_PYTHON), sys.executable):
        if not cand or not Path(cand).exists():
            continue
        ok = subprocess.run([cand, "-c", "import flwr, ray, torch"], capture_output=True, check=False)
        if ok.returncode == 0:
            return cand, ""
        tried.append(cand)
    return None, f"no interpreter imports flwr, ray and torch (tried {', '.join(tried) or 'none'})"


def test_dirichlet_partition_covers_every_row_once_and_repeats_with_the_seed() -> None:
    from bench.federated import dirichlet_partition

    y = np.random.default_rng(1).integers(0, 10, 5_000)
    offsets, rows = dirichlet_partition(y, 1_000, 0.3, seed=3)
    sizes = np.diff(offsets)
    assert len(offsets) == 1_001 and offsets[-1] == len(y)
    assert sorted(rows.tolist()) == list(range(len(y)))  # every row in exactly one client
    assert sizes.min() >= 1  # no client without rows
    for k in (0, 17, 999):  # sorted within each client
        part = rows[offsets[k] : offsets[k + 1]]
        assert (np.diff(part) > 0).all()
    again = dirichlet_partition(y, 1_000, 0.3, seed=3)
    assert (again[0] == offsets).all() and (again[1] == rows).all()
    other = dirichlet_partition(y, 1_000, 0.3, seed=4)
    assert not np.array_equal(other[1], rows)
    # skewed: with alpha 0.3 a typical client of 100 holds few of the 10 labels
    o100, r100 = dirichlet_partition(y, 100, 0.3, seed=3)
    labels_per_client = [len(np.unique(y[r100[o100[k] : o100[k + 1]]])) for k in range(100)]
    assert np.median(labels_per_client) < 8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federated_quick_runs_flower_and_the_pipeline(tmp_path: Path) -> None:
    """`python -m bench.federated --quick`: 10 clients, 3 rounds, Flower's simulation engine in its own
    interpreter (and the pipeline's simulated clients where this checkout has them)."""
    python, why = _flower_python()
    if python is None:
        pytest.skip(f"Flower is not installed: {why}")
    from bench.federated import pipeline_available

    proc = subprocess.run(
        [sys.executable, "-m", "bench.federated", "--quick", "--flower-python", python],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=570,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| 10 | flower | " in out and "Raw figures: `bench/out/results/federated-" in out
    assert "flwr 1." in out  # the Flower venv's versions beside the project's
    import json

    raw = ROOT / out.split("Raw figures: `")[1].split("`")[0]
    res = json.loads(raw.read_text())
    fl = res["passes"][0]["results"]["flower N=10"]
    assert len(fl["round_end"]) == 3 and 0.0 <= fl["accuracy"] <= 1.0 and fl["rounds_per_s"] > 0
    assert fl["peak_rss"] > 0 and fl["processes"] >= 2  # Ray's processes were sampled with the driver
    assert len(fl["trained"]) == 3 and all(len(r) == 1 for r in fl["trained"])  # 10% of 10 clients per round
    if pipeline_available() is None:
        pl = res["passes"][0]["results"]["pipeline N=10"]
        assert len(pl["round_end"]) == 3 and 0.0 <= pl["accuracy"] <= 1.0 and pl["rounds_per_s"] > 0
        assert pl["same_partition"] is True  # the pipeline trained the partition Flower got
        # ... and Flower trained the clients the pipeline sampled, round by round (checked by the run)
        assert fl["same_clients"] is True and pl["same_clients"] is True and fl["seed"] == pl["seed"]
        assert "both trained the same clients in every round" in out
        steps = pl["breakdown"]  # where the steady round went, from the driver's and the tasks' clocks
        assert steps["total"] > 0 and steps["tasks: compute"] > 0 and steps["slowest task"] > 0
        assert "| tasks: read rows |" in out
    else:
        assert "| 10 | pipeline | not run |" in out and "NOT MEASURED" in out


def test_statistical_efficiency_reads_epochs_and_references_as_stated() -> None:
    """The first epoch (1-based) at or above the threshold, a miss as None; the interpolated
    epoch between the epochs around it; a median with misses counted as later than any epoch;
    a round-structure variant is compared with the default one-process run, an ema variant with
    the one-process run of the same ema; variants are checked like ``pipeline train --set``."""
    from bench.statistical_efficiency import (
        _median_epochs,
        first_epoch,
        interpolated_epoch,
        parse_variant,
        reference_of,
    )
    from pipeline.errors import ConfigError

    curve = [0.50, 0.58, 0.60, 0.59, 0.61]
    assert first_epoch(curve, 0.60) == 3 and first_epoch(curve, 0.62) is None
    assert first_epoch(curve, 0.40) == 1 and interpolated_epoch(curve, 0.40) == 1.0
    assert abs(interpolated_epoch(curve, 0.59) - 2.5) < 1e-9 and interpolated_epoch(curve, 0.62) is None
    assert _median_epochs([3, 5, 4]) == 4.0 and _median_epochs([3, None, 4]) == 4.0
    assert _median_epochs([3, None, None]) is None
    v = parse_variant("local_steps=4, server_lr=1.5,ema=0")
    assert v == {"local_steps": 4, "server_lr": 1.5, "ema": 0.0}
    assert reference_of(v) == {"ema": 0.0} and reference_of({"aggregate": "mean"}) == {}
    with pytest.raises(ConfigError, match="unknown config key 'local_step'"):
        parse_variant("local_step=4")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ab_runs_the_pipeline_row_of_two_checkouts_side_by_side(tmp_path: Path) -> None:
    # this checkout against itself: both sides train, in their own processes, the same model
    import json

    from bench.ab import BASE, OWN, run

    text, payload = run(ROOT, quick=True)
    (rec,) = payload["passes"]
    assert set(rec["results"]) == {OWN, BASE}
    own, base = rec["results"][OWN], rec["results"][BASE]
    assert own["samples"] == base["samples"] == payload["rows"] * payload["settings"]["epochs"]
    assert own["acc"] == base["acc"]  # the same code and data: the same weights, bit for bit
    assert payload["ratio"]["per_pass"][0] == pytest.approx(own["samples/s"] / base["samples/s"])
    assert "Same test accuracy in every pass: yes." in text
    kept = json.loads((ROOT / payload["meta"]["json"]).read_text())
    assert kept["baseline"]["commit"] == payload["baseline"]["commit"] != "unknown"


def test_ab_refuses_a_baseline_that_is_not_a_checkout(tmp_path: Path, capsys) -> None:
    from bench.ab import main

    with pytest.raises(SystemExit):
        main(["--baseline", str(tmp_path), "--quick"])
    assert "is not a checkout of this project (no pipeline/train.py in it)" in capsys.readouterr().err
