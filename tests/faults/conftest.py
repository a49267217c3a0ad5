"""Real processes for the fault tests: `dask scheduler --preload pipeline.ps`, `dask worker --no-nanny`
(so that a killed worker stays dead) and `pipeline train` subprocesses on 127.0.0.1 free ports,
started and ended by the harness in tests/processes.py (:class:`Procs`), whose teardown SIGKILLs
every process group and checks that nothing is left, even when a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import ROOT, Procs
from tests.processes import child_env as _clean_env

HERE = Path(__file__).resolve().parent


def child_env(**extra: str) -> dict[str, str]:
    """A clean environment (tests.processes.child_env), the test directory importable (for the
    slow-worker preload), warnings not turned into errors inside the children, and a short
    worker TTL so that a SIGKILLed worker is noticed quickly."""
    return _clean_env(
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL="15s",
        **extra,
    )


# min_share_gflop=0: these stores are tiny, and the faults need every worker to hold a share
FAST = (
    "--set",
    "patience=0",
    "--set",
    "hidden=[32]",
    "--set",
    "local_steps=4",
    "--set",
    "batch_size=128",
    "--set",
    "min_share_gflop=0",
)


def finish(proc, timeout: float) -> str:
    """Wait for a command started by :class:`Procs` to end (killed and failed after ``timeout``
    seconds, with its output); its output."""
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{proc.name} did not finish within {timeout} s:\n{proc.text()[-3000:]}") from None
    return proc.text()


def fault_procs(root: Path) -> Procs:
    """The harness with the fault tests' environment; processes are SIGKILLed at the end."""
    return Procs(root, env=child_env(), grace=0)


def n_workers(address: str) -> int:
    """Workers the scheduler knows (through a short-lived client)."""
    from distributed import Client

    with Client(address, timeout=10) as c:
        return len(c.scheduler_info(n_workers=-1)["workers"])


def wait_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout=10) as c:
        c.wait_for_workers(n, timeout=timeout)


def history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def error_line(stderr: str) -> str:
    """The last line of stderr, asserting that stderr carries no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = fault_procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 rows x 16 features, 4 classes, 10 chunks: seconds per epoch on 2 cores."""
    from pipeline.synth import synth

    path = tmp_path_factory.mktemp("faults") / "small.zarr"
    synth(str(path), rows=20_000, features=16, classes=4, hidden=32, chunk_rows=2000, seed=1)
    return path
