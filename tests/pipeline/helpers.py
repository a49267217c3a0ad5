"""Shared helpers of the pipeline tests: bundled data paths, small stores made in place, store
readers, a chunk corrupter and the ``pipeline`` command run as its own process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from click.testing import CliRunner, Result

from pipeline.store import Store, create_store, open_store

DATA = Path(__file__).resolve().parents[2] / "data"
LETTER = DATA / "letter" / "letter-recognition.data"
# the `pipeline` command, as a child of this interpreter
CLI = (sys.executable, "-m", "pipeline.cli")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `pipeline` child: this one, warnings not turned into errors."""
    return dict(os.environ, PYTHONWARNINGS="ignore", **extra)


def invoke(*args: object) -> Result:
    """The `pipeline` command run in this process (click's runner), arguments as strings."""
    from pipeline.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result: Result) -> str:
    """The one line of a refused command (exit status 1, no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def one_line_error(result: Result, *fragments: str) -> str:
    """The error a refused command printed: one ``error:`` line with each of ``fragments``,
    exit status 1 and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in result.output, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as ``/``)."""
    return {
        p.relative_to(root).as_posix(): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `pipeline` command to its end; a hang is a failure, not a stuck test session."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=cli_env())


def read_all(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a store, chunk by chunk, as (X, y)."""
    parts = [store.read_chunk(i) for i in range(store.n_chunks)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def make_store(
    path: Any, n: int = 5000, f: int = 3, chunk_rows: int = 500, dtype: Any = np.float32, task: str = "classification"
) -> Store:
    """Row i has X[i, 0] == i, so rows can be identified after shuffling."""
    X = np.zeros((n, f), dtype)
    X[:, 0] = np.arange(n)
    X[:, 1:] = (np.arange(n)[:, None] % 7) * 2.0
    y = (np.arange(n) % 3).astype(np.int32) if task == "classification" else np.arange(n, dtype=np.float32)
    X64 = X.astype(np.float64)
    with create_store(
        path,
        f,
        x_dtype=dtype,
        y_dtype=y.dtype,
        chunk_rows=chunk_rows,
        attrs={
            "task": task,
            "classes": ["a", "b", "c"] if task == "classification" else None,
            "mean": X64.mean(0).tolist(),
            "std": X64.std(0).tolist(),
        },
    ) as w:
        w.append(X, y)
    return open_store(path)


def corrupt_chunk(store_path: str | Path, array: str, index: int) -> Path:
    """Flip one byte in the middle of a stored chunk file."""
    path = Path(store_path, array, "c", str(index), *(["0"] if array == "X" else []))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def read_until(stream: IO[str], prefix: str, timeout: float = 120) -> list[str]:
    """Read lines of a running command's output until one starts with ``prefix`` (asserted)."""
    deadline = time.time() + timeout
    lines: list[str] = []
    while time.time() < deadline:
        lines.append(stream.readline())
        if lines[-1].startswith(prefix) or not lines[-1]:
            break
    assert lines and lines[-1].startswith(prefix), "".join(lines)
    return lines


def letter_sites(root: Path, bounds: list[int]) -> Path:
    """letter's rows ``bounds[i]:bounds[i+1]`` as the stores of sites a, b, c... (each ingested
    ``--like`` the first) under ``root``, and the sites file naming them."""
    from pipeline.ingest import ingest

    names = [chr(ord("a") + i) for i in range(len(bounds) - 1)]
    first = None
    for name, lo, hi in zip(names, bounds, bounds[1:], strict=False):
        st = ingest(str(LETTER), root / f"{name}.zarr", target=0, rows=f"{lo}:{hi}", like=first)
        first = first or st.path
    (root / "sites.toml").write_text("".join(f'[sites.{s}]\nstore = "{root / (s + ".zarr")}"\n' for s in names))
    return root / "sites.toml"
