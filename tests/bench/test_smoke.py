"""Smoke tests: every benchmark's quick mode runs and prints its table.

The cluster benchmarks run as a subprocess (``python -m bench.<name> --quick``) so that a
benchmark's clusters, threads and third-party warnings stay out of the test process; the
in-process ones (``bench.kernels``, ``bench.io``) are called through their ``main``. A missing optional peer
(torch, dask-ml) drops its row inside the benchmark; it never fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "throughput": ["| pipeline default", "Targets:"],
    "local_steps": ["| pipeline sync | 8 |", "kernels in memory"],
    "time_to_accuracy": ["| letter |", "within 2 points"],
    "out_of_core": ["peak RSS MB", "page cache"],
    "ps_limits": ["pushes/s", "| 1e+05 | 2 |"],
    "epoch_anatomy": ["| letter | 16,000 / 4,000 |", "no-op round trip ms"],
    "step_anatomy": ["| GEMMs (9 per step) |", "| cluster start |", "driver (scheduler + PS)"],
    "sklearn_parity": ["| MLPClassifier | iris | 112 / 38 |", "| MLPRegressor | diabetes |"],
}


FIGURES = {"throughput", "time_to_accuracy", "out_of_core", "ps_limits"}  # draw a PNG too


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_runs(name: str) -> None:
    from bench.common import OUT

    png = OUT / f"{name}-quick.png"
    png.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in CASES[name]:
        assert needle in proc.stdout, f"{needle!r} missing from:\n{proc.stdout}"
    if name in FIGURES:  # the figure beside the table: a real PNG with something drawn in it
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (png, len(data))


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
        [sys.executable, "-m", "bench.soak", "--minutes", "0.6", "--kill-every", "12", "--sample", "5",
         "--rows", "20000", "--features", "8", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "soak.md").read_text()
    assert "driver exit 130" in report  # interrupted at the end, not crashed
    rows = [ln.split("|") for ln in report.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert rows and int(rows[-1][7]) >= 2, report  # at least two workers were killed ...
    samples = [int(r[6].replace(",", "")) for r in rows]
    assert samples[-1] > samples[0], report  # ... and training went on


def test_throughput_reports_the_median_of_its_passes() -> None:
    """The table's figures (and so the targets) are each trainer's median over the passes, with
    every pass shown; a single pass is reported as it is."""
    from bench.throughput import _median_rows

    passes = [
        [{"trainer": "a", "samples/s": 10.0, "seconds": 3.0, "test acc": 0.5, "wall": None},
         {"trainer": "b", "samples/s": 40.0, "seconds": 1.0, "test acc": 0.6, "wall": 1.5}],
        [{"trainer": "a", "samples/s": 30.0, "seconds": 1.0, "test acc": 0.5, "wall": None},
         {"trainer": "b", "samples/s": 20.0, "seconds": 2.0, "test acc": 0.6, "wall": 2.5}],
        [{"trainer": "a", "samples/s": 20.0, "seconds": 2.0, "test acc": 0.5, "wall": None},
         {"trainer": "b", "samples/s": 60000.0, "seconds": 0.1, "test acc": 0.6, "wall": 0.5}],
    ]  # fmt: skip
    a, b = _median_rows(passes)
    assert (a["trainer"], a["samples/s"], a["seconds"], a["wall"]) == ("a", 20.0, 2.0, None)
    assert (b["samples/s"], b["wall"], b["test acc"]) == (40.0, 1.5, 0.6)
    assert b["samples/s per pass"] == "0.0k / 0.0k / 60.0k"
    (single,) = _median_rows([passes[0][:1]])
    assert single == {"trainer": "a", "samples/s": 10.0, "seconds": 3.0, "test acc": 0.5, "wall": None}


def test_bench_kernels_quick(capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel benchmark runs end to end (tiny sizes) and prints its table."""
    from bench.kernels import main

    table = main(["--quick"])
    printed = capsys.readouterr().out
    assert table in printed
    assert "GEMM peak" in table
    assert "| trainer | samples/s | GFLOP/s | % of GEMM-implied limit | vs PyTorch |" in table
    for row in ("| cpu |", "| numpy |", "| sklearn-mlp |"):
        assert row in table
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert "| pytorch-cpu |" in table


def test_bench_io_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.io --quick` runs end to end (in-process) and prints its tables."""
    from bench import io as bench_io

    text = bench_io.main(["--quick", "--out", str(tmp_path / "io.md")])
    out = capsys.readouterr().out
    assert "| ingest csv |" in out and "| ingest parquet |" in out
    for codec in ("none", "lz4", "zstd"):
        assert f"| {codec} |" in out
    assert (tmp_path / "io.md").read_text().strip() == text.strip()
