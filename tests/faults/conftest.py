"""Real processes for the fault tests: `dask scheduler --preload pipeline.ps`, `dask worker --no-nanny`
(so that a killed worker stays dead) and `pipeline train` subprocesses on 127.0.0.1 free ports.

Every process is started in its own session and registered with a :class:`Procs` collector
whose teardown SIGKILLs its group, so nothing outlives the test even when it fails. Clusters
are module- or function-scoped: distributed's ``gen_cluster`` (tests/pipeline/test_ps.py)
kills stray child processes when it starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import DASK, PIPELINE, ROOT, Proc, free_port
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


@dataclass
class Procs:
    """Starts processes in their own sessions; :meth:`close` kills every one of them."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    n: int = 0

    def start(self, name: str, args: list[str], **env: str) -> Proc:
        self.n += 1
        log = self.root / f"{self.n:02d}-{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - the child owns it
        try:
            p = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=child_env(**env), start_new_session=True, cwd=self.root
            )
        finally:
            fh.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def scheduler(self) -> tuple[Proc, str]:
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        proc = self.start(
            "scheduler",
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
             f"127.0.0.1:{free_port()}", "--preload", "pipeline.ps"],
        )
        wait_for(lambda: _can_connect(port) or not proc.alive(), 60, "the scheduler to listen")
        assert proc.alive(), proc.text()
        return proc, address

    def worker(self, address: str, name: str, *extra: str, **env: str) -> Proc:
        return self.start(
            name,
            [DASK, "worker", address, "--no-nanny", "--nthreads", "1", "--name", name, "--host", "127.0.0.1",
             "--no-dashboard", "--memory-limit", "0", *extra],
            **env,
        )

    def cluster(self, *names: str) -> tuple[Proc, str, list[Proc]]:
        """A scheduler and one single-threaded worker per name, all registered."""
        sched, address = self.scheduler()
        workers = [self.worker(address, n) for n in names]
        wait_workers(address, len(names))
        return sched, address, workers

    def train(self, store: str | Path, address: str, out: Path, *args: str) -> Proc:
        return self.start(
            "train",
            [PIPELINE, "train", str(store), "--scheduler", address, "--out", str(out), *args],
        )

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()


def _can_connect(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(cond, timeout: float, what: str, interval: float = 0.2) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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
    p = Procs(tmp_path)
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
