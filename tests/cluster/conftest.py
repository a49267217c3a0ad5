"""Real clusters for the deployment tests: `dask scheduler --preload pipeline.ps` and `dask worker`
processes on 127.0.0.1, started and ended by the harness in tests/processes.py.

Clusters are module-scoped: distributed's ``gen_cluster`` (tests/pipeline/test_ps.py) kills
stray child processes when it starts, so nothing here may outlive its module.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.processes import PIPELINE, ROOT, Procs, child_env, running

DATA = ROOT / "data"


@contextlib.contextmanager
def running_cluster(root: Path, workers: int = 2, tls: dict[str, Path] | None = None) -> Iterator[Procs]:
    """A scheduler and ``workers`` nanny workers w0, w1, ...; ``.address`` is the scheduler's."""
    with running(root, tls=tls) as procs:
        _, address = procs.scheduler()
        for i in range(workers):
            procs.worker(address, f"w{i}")
        yield procs


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run the ``pipeline`` command; a hang is a failure, not a stuck test session."""
    return subprocess.run(
        [PIPELINE, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def letter_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """letter-recognition's conventional training rows, ingested with the CLI."""
    root = tmp_path_factory.mktemp("store")
    dest = root / "letter.zarr"
    r = run_cli(
        [
            "ingest",
            str(DATA / "letter" / "letter-recognition.data"),
            str(dest),
            "--target",
            "0",
            "--rows",
            "0:16000",
            "--quiet",
        ],
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    with running_cluster(tmp_path_factory.mktemp("tcp-cluster"), workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["bash", str(ROOT / "cluster" / "make-tls-certs.sh"), str(d)], check=True, capture_output=True, timeout=60
    )
    return d


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Procs]:
    roles = {"scheduler": certs, "worker": certs, "client": certs}
    with running_cluster(tmp_path_factory.mktemp("tls-cluster"), workers=2, tls=roles) as c:
        yield c
