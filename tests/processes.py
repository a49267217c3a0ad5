"""Real processes for the deployment, fault and allocator tests: the console scripts of this
environment, free loopback ports, a clean environment for children, and one harness,
:class:`Procs`, that starts `dask scheduler --preload pipeline.ps`, `dask worker` and `pipeline`
processes, waits until they are ready and ends every one of them.

Every process runs in its own session, so ending its process group ends it (and a nanny's
worker process) even when a test fails; :meth:`Procs.close` then checks that no process of any
of those groups is left. Distributed's ``gen_cluster`` (tests/pipeline/test_ps.py) kills stray
child processes when it starts, so no harness may outlive the module that made it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASK = str(BIN / "dask")
PIPELINE = str(BIN / "pipeline")
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process started by a test: no stray Dask config from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``cond`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds; always reaps the child."""
        if grace > 0 and self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # the nanny's worker process may outlive the nanny: end the group in any case
        self.kill()


@dataclass
class Procs:
    """Starts a test's processes, each in its own session, and ends all of them in :meth:`close`.

    ``env`` is the environment of every child (default :func:`child_env`); ``tls`` maps a role
    (scheduler, worker, client) to a directory of ca.pem, ROLE.pem and ROLE-key.pem; ``grace``
    is how long :meth:`close` gives a process after SIGTERM before SIGKILL (0: SIGKILL at once).
    """

    root: Path
    env: dict[str, str] = field(default_factory=child_env)
    tls: dict[str, Path] | None = None
    grace: float = 10.0
    procs: list[Proc] = field(default_factory=list)
    address: str = ""  # of the scheduler started last
    schedulers: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, args: Sequence[str], cwd: Path | None = None, **env: str) -> Proc:
        """Start ``args`` with stdout and stderr in ROOT/NN-NAME.log."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{len(self.procs) + 1:02d}-{name}.log"
        with open(log, "wb") as fh:  # the child holds its own copy
            popen = subprocess.Popen(
                list(args),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd or self.root,
                env={**self.env, **env},
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait(self, proc: Proc, what: str, cond: Callable[[], object], timeout: float = START_TIMEOUT) -> None:
        """Wait until ``cond`` holds; fail with the end of ``proc``'s log if it exits first."""

        def ready() -> object:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.text()[-3000:]}")
            return cond()

        try:
            wait_for(ready, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.text()[-3000:]}") from None

    def tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return []
        d = self.tls[role]
        return [
            "--tls-ca-file",
            str(d / "ca.pem"),
            "--tls-cert",
            str(d / f"{role}.pem"),
            "--tls-key",
            str(d / f"{role}-key.pem"),
        ]

    def scheduler(self, dashboard: bool = True, **env: str) -> tuple[Proc, str]:
        """`dask scheduler --preload pipeline.ps` on a free loopback port, listening."""
        port = free_port()
        proto = "tls" if self.tls else "tcp"
        board = ["--dashboard-address", "127.0.0.1:0"] if dashboard else ["--no-dashboard"]
        proc = self.start(
            "scheduler",
            [
                DASK,
                "scheduler",
                "--preload",
                "pipeline.ps",
                "--protocol",
                proto,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *board,
                *self.tls_args("scheduler"),
            ],
            **env,
        )
        self.wait(proc, "the scheduler to listen", lambda: "Scheduler at:" in proc.text())
        self.address = f"{proto}://127.0.0.1:{port}"
        self.schedulers[self.address] = proc
        return proc, self.address

    def registered(self, address: str) -> int:
        """Worker registrations the scheduler at ``address`` has logged."""
        return self.schedulers[address].text().count("Register worker")

    def worker(
        self,
        address: str,
        name: str,
        *extra: str,
        nanny: bool = True,
        cwd: Path | None = None,
        port: int | None = None,
        wrap: Sequence[str] = (),
        **env: str,
    ) -> Proc:
        """A single-threaded `dask worker` of the scheduler at ``address``, registered with it.

        ``nanny=False`` makes a killed worker stay dead (no nanny restarts it). ``wrap``: a
        command the worker's command line is given to (it must exec it, keeping the pid)."""
        before = self.registered(address)
        args = [DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--name", name]
        if nanny:
            args += ["--dashboard-address", "127.0.0.1:0", "--memory-limit", "1GiB"]
        else:
            args += ["--no-nanny", "--no-dashboard", "--memory-limit", "0"]
        if port:
            args += ["--worker-port", str(port)]
        proc = self.start(name, [*wrap, *args, *extra, *self.tls_args("worker")], cwd=cwd, **env)
        self.wait(proc, f"registration of {name}", lambda: self.registered(address) > before)
        return proc

    def cluster(self, *names: str, nanny: bool = True) -> tuple[Proc, str, list[Proc]]:
        """A scheduler and one registered single-threaded worker per name."""
        sched, address = self.scheduler()
        return sched, address, [self.worker(address, n, nanny=nanny) for n in names]

    def train(self, store: str | Path, address: str, out: Path, *args: str) -> Proc:
        """`pipeline train STORE --scheduler ADDRESS --out OUT ARGS...`, not waited for."""
        return self.start("train", [PIPELINE, "train", str(store), "--scheduler", address, "--out", str(out), *args])

    def close(self) -> None:
        """End every process (workers before their scheduler), then check that none is left."""
        for proc in reversed(self.procs):
            proc.stop(self.grace)
        left: dict[str, list[int]] = {}

        def gone() -> bool:
            left.clear()
            left.update({p.name: m for p in self.procs if (m := group_members(p.popen.pid))})
            return not left

        with contextlib.suppress(AssertionError):
            wait_for(gone, 10, "the process groups to end")
        assert not left, f"processes left after the test: {left}"


@contextlib.contextmanager
def running(root: Path, tls: dict[str, Path] | None = None, grace: float = 10.0) -> Iterator[Procs]:
    """A :class:`Procs` that is closed (and checked) however the block ends."""
    procs = Procs(root, tls=tls, grace=grace)
    try:
        yield procs
    finally:
        procs.close()
