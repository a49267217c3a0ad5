"""Soak run: long async training on a real deployment while workers are killed and replaced.

    python -m bench.soak --minutes 30 --kill-every 180

Starts ``dask scheduler --preload pipeline.ps`` and two ``dask worker --no-nanny`` processes on
127.0.0.1, trains an MLP in async mode on a synthetic store with ``pipeline train``, and every
``--kill-every`` seconds SIGKILLs the oldest worker and starts a fresh one. Every ``--sample``
seconds it records the resident memory of the scheduler, the workers and the driver, and the
parameter server's round and samples. At the end the driver is interrupted (Ctrl-C: it writes a
checkpoint) and the table is printed and written to ``bench/out/soak/soak.md``.

The verdict compares the scheduler's memory over the last third of the run with the first
third: a parameter server that leaked per push, per participant or per killed worker grows.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import OUT, machine

BIN = Path(sys.executable).parent
# ``pipeline`` as the console script runs it, with SIGUSR1 dumping every thread's stack (a driver
# that does not stop after Ctrl-C shows where it waits)
DRIVER = (
    "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "from pipeline.cli import main; sys.argv[0] = 'pipeline'; sys.exit(main())"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"] = "15s"
    with open(log, "ab") as fh:
        # SIGINT back to its default in the child: the soak stops the driver with it, and a soak
        # started in the background of a non-interactive shell inherits SIGINT ignored
        return subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_default_sigint
        )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def _ps_counters(address: str) -> tuple[int, int, int]:
    """(round, samples, participants) of the one job on the scheduler, via a short client."""
    from distributed import Client

    def read(dask_scheduler) -> tuple[int, int, int]:
        ext = dask_scheduler.extensions["pipeline_ps"]
        if not ext.jobs:
            return (0, 0, 0)
        st = next(iter(ext.jobs.values()))
        return (st.version, st.samples, len(st.participants))

    with Client(address, timeout=10) as c:
        return tuple(c.run_on_scheduler(read))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--kill-every", type=float, default=180.0, help="seconds between worker kills")
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between memory samples")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--out", default=str(OUT / "soak"), help="scratch directory (store, run, logs, soak.md)")
    args = ap.parse_args(argv)

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"store-{args.rows}x{args.features}.zarr"
    if not store.exists():
        from pipeline.synth import synth

        synth(str(store), rows=args.rows, features=args.features, classes=10, seed=0)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    sched = _start(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            f"127.0.0.1:{_free_port()}",
            "--preload",
            "pipeline.ps",
        ],
        work / "scheduler.log",
    )
    procs.append(sched)
    n_started = 0

    def new_worker() -> subprocess.Popen:
        nonlocal n_started
        n_started += 1
        p = _start(
            [
                str(BIN / "dask"),
                "worker",
                address,
                "--no-nanny",
                "--nthreads",
                "1",
                "--memory-limit",
                "0",
                "--name",
                f"w{n_started}",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            work / "workers.log",
        )
        procs.append(p)
        return p

    rows: list[tuple] = []
    try:
        time.sleep(3)
        workers = [new_worker(), new_worker()]
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        driver = _start(
            [
                sys.executable,
                "-c",
                DRIVER,
                "train",
                str(store),
                "--scheduler",
                address,
                "--out",
                str(work / "run"),
                "--force",
                "--quiet",
                "--set",
                "mode=async",
                "--set",
                "epochs=100000",
                "--set",
                "patience=0",
                "--set",
                "hidden=[64,64]",
                "--set",
                "validation=0.01",
                "--set",
                "checkpoint_seconds=60",
            ],
            work / "driver.log",
        )
        procs.append(driver)
        t0 = time.monotonic()
        next_kill = t0 + args.kill_every
        next_sample = t0 + 5
        kills = 0
        print("| minute | scheduler MB | workers MB | driver MB | rounds | samples | kills |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        while time.monotonic() - t0 < args.minutes * 60:
            if driver.poll() is not None:
                raise SystemExit(f"the driver exited with {driver.returncode}; see {work / 'driver.log'}")
            now = time.monotonic()
            if now >= next_kill:
                victim = workers.pop(0)
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                workers.append(new_worker())
                kills += 1
                next_kill += args.kill_every
            if now >= next_sample:
                rnd, samples, _ = _ps_counters(address)
                row = (
                    (now - t0) / 60,
                    _rss_mb(sched.pid),
                    "/".join(f"{_rss_mb(w.pid):.0f}" for w in workers),
                    _rss_mb(driver.pid),
                    rnd,
                    samples,
                    kills,
                )
                rows.append(row)
                print(
                    f"| {row[0]:.1f} | {row[1]:.0f} | {row[2]} | {row[3]:.0f} | {row[4]:,} | {row[5]:,} | {row[6]} |",
                    flush=True,
                )
                next_sample += args.sample
            time.sleep(1)
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(120)
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGUSR1)  # every thread's stack into driver.log
            time.sleep(2)
            tail = (work / "driver.log").read_text(errors="replace").splitlines()[-150:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"the driver did not stop within 120 s of Ctrl-C; see {work / 'driver.log'}") from None
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    third = max(1, len(rows) // 3)
    first = sum(r[1] for r in rows[:third]) / third
    last = sum(r[1] for r in rows[-third:]) / third
    m = machine()
    lines = [
        f"# Soak: {args.minutes:g} min async, a worker killed every {args.kill_every:g} s",
        "",
        f"{m.get('cpu', '?')}; store {args.rows:,} x {args.features}; driver exit {driver.returncode} (130 = Ctrl-C)",
        "",
        "| minute | scheduler MB | workers MB | driver MB | rounds | samples | kills |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r[0]:.1f} | {r[1]:.0f} | {r[2]} | {r[3]:.0f} | {r[4]:,} | {r[5]:,} | {r[6]} |" for r in rows),
        "",
        f"scheduler memory, first third {first:.0f} MB, last third {last:.0f} MB ({(last / first - 1) * 100:+.1f}%)",
    ]
    (work / "soak.md").write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
