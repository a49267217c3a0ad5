"""Real clusters for the deployment tests: `dask scheduler --preload pipeline.ps` and `dask worker`
processes on 127.0.0.1, free ports, each process in its own session so that stopping it ends its
whole process group (the nanny's worker process included), even when a test fails.

Clusters are module-scoped: distributed's ``gen_cluster`` (tests/pipeline/test_ps.py) kills
stray child processes when it starts, so nothing here may outlive its module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import DASK, PIPELINE, ROOT, Proc, child_env, free_port

DATA = ROOT / "data"
START_TIMEOUT = 60.0


def stop(proc: Proc, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds; always reaps the child."""
    p = proc.popen
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # the nanny's worker process may outlive the nanny: end the group in any case
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(grace)


@dataclass
class Cluster:
    """One scheduler and its workers, all started by this test session."""

    root: Path
    address: str = ""
    tls: dict[str, Path] | None = None  # role -> cert dir (ca.pem, ROLE.pem, ROLE-key.pem)
    procs: list[Proc] = field(default_factory=list)
    scheduler: Proc | None = None

    def tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return []
        d = self.tls[role]
        return ["--tls-ca-file", str(d / "ca.pem"), "--tls-cert", str(d / f"{role}.pem"),
                "--tls-key", str(d / f"{role}-key.pem")]

    def _spawn(self, name: str, cmd: Sequence[str], cwd: Path | None = None) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                list(cmd), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd or self.root, env=child_env(), start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait_for(self, proc: Proc, what: str, predicate, timeout: float = START_TIMEOUT) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not predicate():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not seen within {timeout:.0f} s:\n{proc.text()[-3000:]}")
            time.sleep(0.1)

    def start_scheduler(self) -> str:
        port = free_port()
        proto = "tls" if self.tls else "tcp"
        self.scheduler = self._spawn("scheduler", [
            DASK, "scheduler", "--preload", "pipeline.ps", "--protocol", proto, "--host", "127.0.0.1",
            "--port", str(port), "--dashboard-address", "127.0.0.1:0", *self.tls_args("scheduler"),
        ])
        self.address = f"{proto}://127.0.0.1:{port}"
        self._wait_for(self.scheduler, "'Scheduler at:'", lambda: "Scheduler at:" in self.scheduler.text())
        return self.address

    def registered(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.text().count("Register worker")

    def start_worker(self, name: str, cwd: Path | None = None, port: int | None = None) -> Proc:
        before = self.registered()
        extra = ["--worker-port", str(port)] if port else []
        proc = self._spawn(name, [
            DASK, "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
            "--dashboard-address", "127.0.0.1:0", "--name", name, "--memory-limit", "1GiB",
            *extra, *self.tls_args("worker"),
        ], cwd=cwd)
        assert self.scheduler is not None
        self._wait_for(proc, f"registration of {name}", lambda: self.registered() > before)
        return proc

    def close(self) -> None:
        # workers first, so they do not try to reconnect to a closing scheduler
        for proc in reversed(self.procs):
            stop(proc)


@contextlib.contextmanager
def running_cluster(root: Path, workers: int = 2, tls: dict[str, Path] | None = None) -> Iterator[Cluster]:
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, tls=tls)
    try:
        cluster.start_scheduler()
        for i in range(workers):
            cluster.start_worker(f"w{i}")
        yield cluster
    finally:
        cluster.close()


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run the ``pipeline`` command; a hang is a failure, not a stuck test session."""
    return subprocess.run([PIPELINE, *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def letter_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """letter-recognition's conventional training rows, ingested with the CLI."""
    root = tmp_path_factory.mktemp("store")
    dest = root / "letter.zarr"
    r = run_cli(["ingest", str(DATA / "letter" / "letter-recognition.data"), str(dest),
                 "--target", "0", "--rows", "0:16000", "--quiet"], cwd=root)
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("tcp-cluster"), workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "cluster" / "make-tls-certs.sh"), str(d)], check=True,
                   capture_output=True, timeout=60)
    return d


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Cluster]:
    roles = {"scheduler": certs, "worker": certs, "client": certs}
    with running_cluster(tmp_path_factory.mktemp("tls-cluster"), workers=2, tls=roles) as c:
        yield c
