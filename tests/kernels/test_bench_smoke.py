"""The kernel benchmark runs end to end (tiny sizes) and prints its table."""

from __future__ import annotations

from bench.kernels import main


def test_bench_kernels_quick(capsys):
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
