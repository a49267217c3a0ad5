"""`python -m bench.io --quick` runs end to end (in-process) and prints its tables."""

from __future__ import annotations

from bench import io as bench_io


def test_bench_io_quick(tmp_path, capsys):
    text = bench_io.main(["--quick", "--out", str(tmp_path / "io.md")])
    out = capsys.readouterr().out
    assert "| ingest csv |" in out and "| ingest parquet |" in out
    for codec in ("none", "lz4", "zstd"):
        assert f"| {codec} |" in out
    assert (tmp_path / "io.md").read_text().strip() == text.strip()
