"""Every walkthrough in docs/examples runs as written and prints a sensible result.

Each script runs in a subprocess with ``PYTHONPATH`` set to this checkout, in an empty working
directory, with its outputs directed to a temporary directory (``PIPELINE_EXAMPLES_OUT``); the
checkout must be left as it was and the working directory untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"

# script -> (pattern of the result line, lowest acceptable value, files it writes under its output dir)
EXPECTED = {
    "iris.py": (r"pipeline MLPClassifier: test accuracy ([\d.]+)", 0.9, set()),
    "digits.py": (r"test accuracy ([\d.]+)", 0.95, set()),
    "california_housing.py": (r"full-batch gradient descent, \d+ steps: test R\^2 ([\d.]+)", 0.6, {"housing.zarr"}),
    "adult.py": (r"pipeline LogisticRegression: test accuracy ([\d.]+)", 0.84, {"adult-train.zarr", "adult-test.zarr"}),
    "cluster.py": (r"test accuracy on the cluster: ([\d.]+)", 0.85, {"letter-train.zarr", "letter-test.zarr", "run"}),
}


def _checkout_state() -> str:
    """Untracked and modified files of the checkout (ignored ones such as caches excluded)."""
    try:
        r = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not available to check the checkout")
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout


def test_every_example_is_indexed_and_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(EXPECTED)
    index = (EXAMPLES / "README.md").read_text()
    assert all(f"]({name})" in index for name in scripts)
    assert "docs/examples/README.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_and_prints_its_result(script: str, tmp_path: Path) -> None:
    pattern, lowest, writes = EXPECTED[script]
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_EXAMPLES_OUT": str(out), "PYTHONWARNINGS": "error"}
    before = _checkout_state()
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    match = re.search(pattern, r.stdout)
    assert match, r.stdout
    assert float(match.group(1)) >= lowest, r.stdout
    assert list(work.iterdir()) == []  # nothing in the working directory
    assert {p.name for p in out.iterdir()} == writes if out.exists() else not writes
    assert _checkout_state() == before


def test_an_example_writes_under_out_when_given(tmp_path: Path) -> None:
    """--out wins over the environment variable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_EXAMPLES_OUT": str(tmp_path / "env")}
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "california_housing.py"), "--out", str(tmp_path / "arg")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "arg" / "housing.zarr").is_dir() and not (tmp_path / "env").exists()
