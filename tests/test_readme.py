"""Every command of the README's tour runs as written, in a scratch copy of the checkout.

The quick start's two commands are `make run` and `make test` (the latter is what CI runs; the
former's steps are the same `pipeline` commands exercised here and in tests/pipeline). The tour
block that starts a `dask scheduler` is exercised by tests/cluster with real processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    tour = README[README.index("## A short tour") : README.index("## How it works")]
    return re.findall(rf"```{lang}\n(.*?)```", tour, re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("readme")
    (wd / "data").mkdir()
    for d in (ROOT / "data").iterdir():
        if d.is_dir() and d.name != "stores":
            (wd / "data" / d.name).symlink_to(d)
    return wd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_readme_has_the_two_quick_start_commands():
    quick = README[README.index("## Quick start") : README.index("## A short tour")]
    assert "make run" in quick and "make test" in quick
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tour_commands_run_as_written(workdir: Path):
    sh_blocks = _blocks("sh")
    assert len(sh_blocks) >= 4
    cluster_blocks = [b for b in sh_blocks if "dask scheduler" in b]
    assert len(cluster_blocks) == 1 and "--preload pipeline.ps" in cluster_blocks[0]
    assert (ROOT / "tests" / "cluster").is_dir()  # where that block runs with real processes
    for block in sh_blocks:
        if block in cluster_blocks:
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=workdir,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stderr[-3000:]}"
    assert (workdir / "runs" / "adult" / "model.npz").is_file()
    assert (workdir / "predictions.parquet").is_dir()
    (py,) = _blocks("python")
    script = workdir / "readme_example.py"  # run as a saved script, as a user runs it
    script.write_text(py)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "digits accuracy" in proc.stdout and "adult accuracy" in proc.stdout
    acc = float(re.search(r"digits accuracy (\S+)", proc.stdout).group(1))
    assert acc > 0.85
