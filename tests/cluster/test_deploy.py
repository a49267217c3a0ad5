"""Deployment on a real cluster: `dask scheduler --preload pipeline.ps`, `dask worker` processes,
`pipeline train --scheduler ...` as a subprocess, over tcp:// and tls://.

Every process runs on 127.0.0.1 with free ports and is stopped at the end of its module (or
test), failures included; see conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.conftest import run_cli, running_cluster
from tests.processes import ROOT, Procs, child_env, free_port

TRAIN = ["--set", "epochs=3", "--set", "mode=sync", "--set", "seed=0", "--set", "min_share_gflop=0", "--quiet"]


def _train(store: Path, cluster: Procs, out: Path, *extra: str, timeout: float = 180.0):
    return run_cli(
        [
            "train",
            str(store),
            "--scheduler",
            cluster.address,
            "--out",
            str(out),
            *TRAIN,
            *cluster.tls_args("client"),
            *extra,
        ],
        cwd=out.parent,
        timeout=timeout,
    )


def _history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def _params(run: Path) -> np.ndarray:
    from pipeline.model import load_model

    return np.asarray(load_model(run).params)


def _one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# tcp://
# --------------------------------------------------------------------------------------------


def test_train_uses_the_preloaded_parameter_server(letter_store: Path, tcp_cluster: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _train(letter_store, tcp_cluster, run)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 3
    hist = _history(run)
    assert hist["installed_by"] == "preload"  # not the plugin a client installs when missing
    assert len(hist["epochs"]) == 3
    assert hist["epochs"][-1]["val_accuracy"] > 0.5  # it learned (about 0.8 after 3 epochs)
    # both workers took part: sync rounds combined two deltas
    deltas = hist["round_columns"].index("deltas")
    assert max(row[deltas] for row in hist["rounds"]) == 2
    assert (run / "model.npz").is_file() and (run / "checkpoint.npz").is_file()
    # the preload also put the training page on the scheduler's dashboard
    log = tcp_cluster.schedulers[tcp_cluster.address].text()
    dash = next(ln for ln in log.splitlines() if "dashboard at:" in ln).rsplit(" ", 1)[-1]
    dash = dash.replace("http://", "").rstrip("/").split("/")[0]
    with urllib.request.urlopen(f"http://{dash}/pipeline", timeout=30) as resp:
        assert resp.status == 200


def test_compressed_deltas_and_replies_on_real_processes(
    letter_store: Path, tcp_cluster: Procs, tmp_path: Path
) -> None:
    """bf16 deltas and replies between `dask worker` processes and the parameter server of a
    `dask scheduler`: the run learns as float32 does, twice gives the same model (sync rounds
    are reproducible whatever the timing), and its checkpoint keeps the workers' common weights."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        r = _train(letter_store, tcp_cluster, run, "--set", "compression=bf16", "--set", "compress_replies=true")
        assert r.returncode == 0, r.stderr
    hist = _history(runs[0])
    assert hist["epochs"][-1]["val_accuracy"] > 0.5
    deltas = hist["round_columns"].index("deltas")
    assert max(row[deltas] for row in hist["rounds"]) == 2
    np.testing.assert_array_equal(_params(runs[0]), _params(runs[1]))
    from pipeline.checkpoint import load_file

    arrays, _ = load_file(runs[0] / "checkpoint.npz", "checkpoint")
    assert "reply_view" in arrays and arrays["reply_view"].shape == arrays["params"].shape
    assert not np.array_equal(arrays["reply_view"], arrays["params"])  # within a bf16 rounding, not equal
    log = tcp_cluster.schedulers[tcp_cluster.address].text()
    assert "Traceback" not in log, log[-2000:]


def test_concurrent_sync_trainings_match_solo_runs(letter_store: Path, tcp_cluster: Procs, tmp_path: Path) -> None:
    solo = tmp_path / "solo"
    r = _train(letter_store, tcp_cluster, solo)
    assert r.returncode == 0, r.stderr

    outs = [tmp_path / "a", tmp_path / "b"]
    log_start = len(tcp_cluster.schedulers[tcp_cluster.address].text())
    results: dict[Path, subprocess.CompletedProcess] = {}

    def go(out: Path) -> None:
        # join_timeout is short so that a barrier stall would show as a logged, dropped
        # participant (and a different model) instead of a slow pass
        results[out] = _train(letter_store, tcp_cluster, out, "--set", "join_timeout=20", timeout=240)

    threads = [threading.Thread(target=go, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = _params(solo)
    for out in outs:
        assert results[out].returncode == 0, results[out].stderr
        assert _history(out)["installed_by"] == "preload"
    # A participant waiting at a sync barrier leaves its worker's thread pool, so two jobs on
    # single-threaded workers never wait for each other's queued tasks.
    assert "did not join within" not in tcp_cluster.schedulers[tcp_cluster.address].text()[log_start:]
    for out in outs:
        # two jobs on one parameter server stay apart, and sync mode is reproducible: each
        # gives exactly what it gives alone
        np.testing.assert_array_equal(_params(out), reference, err_msg=f"{out.name} != solo")
    jobs = {_history(p)["job"] for p in (solo, *outs)}
    assert len(jobs) == 3


def _hiding(directory: Path) -> list[str]:
    """A command prefix that runs a command in a mount namespace of its own where ``directory``
    is an empty file system: a worker on a machine without the shared file system the store is
    on (root: ``unshare -m``; another user: a user namespace, ``unshare -rm``)."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs none '{directory}'"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here ({probe.stderr.decode().strip()}): a worker cannot be kept from a path")
    return [*unshare, "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(directory)]


def test_worker_that_cannot_read_the_store_is_named(letter_store: Path, tmp_path: Path) -> None:
    # The store is given as a relative path, which the driver makes absolute; one worker runs
    # where the store's directory is another, empty file system (as on a host without the share).
    here = letter_store.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bad_port = free_port()
    with running_cluster(tmp_path / "cluster", workers=0) as cluster:
        cluster.worker(cluster.address, "good", cwd=here)
        cluster.worker(cluster.address, "bad", cwd=elsewhere, port=bad_port, wrap=_hiding(here))
        out = tmp_path / "run"
        r = run_cli(
            ["train", letter_store.name, "--scheduler", cluster.address, "--out", str(out), *TRAIN],
            cwd=here,
            timeout=120,
        )
    assert r.returncode == 1, r.stdout + r.stderr
    line = _one_line_error(r.stderr)
    bad = f"tcp://127.0.0.1:{bad_port}"
    assert bad in line and "1 of 2 workers" in line, line
    assert letter_store.name in line
    assert not (out / "model.npz").exists()  # refused before training started


@contextlib.contextmanager
def _train_in_background(
    store: Path, address: str, out: Path, args: list[str], cwd: Path
) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`pipeline train STORE --scheduler ADDRESS --out OUT ARGS` running beside the test: the
    process and the list its stderr lines are read into as they come. On exit the process is
    killed if it still runs and its pipes are closed."""
    from tests.processes import PIPELINE

    proc = subprocess.Popen(
        [PIPELINE, "train", str(store), "--scheduler", address, "--out", str(out), *args],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)  # the pipe ends with the process
        proc.stdout.close()
        proc.stderr.close()


def _wait_for_line(
    proc: subprocess.Popen, lines: list[str], found: Callable[[str], bool], timeout: float = 120
) -> None:
    """Wait until a line of ``lines`` is ``found`` (or the process ended)."""
    deadline = time.monotonic() + timeout
    while not any(found(ln) for ln in list(lines)) and proc.poll() is None:
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)


def test_a_driver_started_before_its_workers_waits_for_them(letter_store: Path, tmp_path: Path) -> None:
    """A job script starts the scheduler, the workers and the driver together: the driver waits
    (up to no_worker_timeout) for a first worker instead of refusing a cluster still starting;
    with none within it, one line names the fix."""

    with running_cluster(tmp_path / "cluster", workers=0) as cluster:
        r = run_cli(
            [
                "train",
                str(letter_store),
                "--scheduler",
                cluster.address,
                "--out",
                str(tmp_path / "none"),
                *TRAIN,
                "--set",
                "no_worker_timeout=2",
            ],
            cwd=tmp_path,
        )
        assert r.returncode == 1, r.stdout + r.stderr
        line = _one_line_error(r.stderr)
        assert "the cluster has had no workers for 2 s; start some with `dask worker ADDRESS`" in line, line
        assert not (tmp_path / "none" / "model.npz").exists()

        args = [a for a in TRAIN if a != "--quiet"]
        with _train_in_background(letter_store, cluster.address, tmp_path / "run", args, tmp_path) as (proc, lines):
            # the worker starts once the driver is up and has found none (however long its start takes)
            waiting = "the cluster has no workers yet: waiting up to 300 s (no_worker_timeout) for one"
            _wait_for_line(proc, lines, lambda ln: waiting in ln)
            cluster.worker(cluster.address, "late")
            proc.wait(timeout=180)
            stdout = proc.stdout.read()
        stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert waiting in stderr, stderr
    assert "(training page: /pipeline)" in stderr, stderr  # the preload put the page on the dashboard
    assert json.loads(stdout.strip().splitlines()[-1])["epochs"] == 3


def test_a_killed_scheduler_is_one_line_with_the_resume_command(letter_store: Path, tmp_path: Path) -> None:
    """The scheduler SIGKILLed mid-run: `pipeline train` ends with one line naming the lost
    scheduler and the command that resumes the run (not Dask's "Failed to reconnect" before it),
    and the checkpoint it names is there."""
    out = tmp_path / "run"
    with running_cluster(tmp_path / "cluster", workers=1) as cluster:
        sched = cluster.schedulers[cluster.address]
        args = [a for a in TRAIN if a != "--quiet"] + ["--set", "epochs=200"]
        with _train_in_background(letter_store, cluster.address, out, args, tmp_path) as (proc, lines):
            _wait_for_line(proc, lines, lambda ln: ln.startswith("epoch   2"))
            sched.kill()
            proc.wait(timeout=120)
    stderr = "".join(lines)
    assert proc.returncode == 1, stderr
    shown = [ln for ln in stderr.splitlines() if ln.strip()]
    last_epoch = max(i for i, ln in enumerate(shown) if ln.startswith("epoch "))
    after = shown[last_epoch + 1 :]  # what the command said once training stopped
    assert "Failed to reconnect" not in stderr, stderr
    assert len(after) == 1 and after[0].startswith("error: lost the Dask scheduler at "), stderr
    assert f"--out {out} --resume --scheduler {cluster.address}" in after[0], after[0]
    assert (out / "checkpoint.npz").is_file()


def test_evaluate_and_predict_resolve_relative_paths_on_the_driver(tmp_path: Path) -> None:
    # The worker runs in another directory: relative STORE and OUT must reach it as absolute paths.
    here = tmp_path / "here"
    elsewhere = tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    r = run_cli(["synth", "s.zarr", "--rows", "3000", "--features", "4", "--classes", "3", "--quiet"], cwd=here)
    assert r.returncode == 0, r.stderr
    with running_cluster(tmp_path / "cluster", workers=0) as cluster:
        cluster.worker(cluster.address, "w", cwd=elsewhere)
        r = run_cli(
            [
                "train",
                str(here / "s.zarr"),
                "--scheduler",
                cluster.address,
                "--out",
                str(here / "run"),
                "--set",
                "epochs=1",
                "--set",
                "hidden=[8]",
                "--quiet",
            ],
            cwd=here,
        )
        assert r.returncode == 0, r.stderr
        r = run_cli(["evaluate", "run", "s.zarr", "--json", "--scheduler", cluster.address], cwd=here)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["n"] == 3000
        for out in ("p.parquet", "p.zarr"):
            r = run_cli(["predict", "run", "s.zarr", out, "--scheduler", cluster.address], cwd=here)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"rows": 3000, "out": out, "format": out.split(".")[1]}
            assert (here / out).is_dir()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing landed in the worker's directory


# --------------------------------------------------------------------------------------------
# tls://
# --------------------------------------------------------------------------------------------


def test_train_over_tls(letter_store: Path, tls_cluster: Procs, tmp_path: Path) -> None:
    assert tls_cluster.address.startswith("tls://")
    run = tmp_path / "run"
    r = _train(letter_store, tls_cluster, run)
    assert r.returncode == 0, r.stderr
    hist = _history(run)
    assert hist["installed_by"] == "preload"
    assert len(hist["epochs"]) == 3


@pytest.mark.parametrize("case", ["no-certs", "other-ca", "tcp-scheme"])
def test_client_without_valid_certificates_is_refused(
    case: str, letter_store: Path, tls_cluster: Procs, tmp_path: Path
) -> None:
    address = tls_cluster.address
    extra: list[str] = []
    if case == "other-ca":
        other = tmp_path / "other"
        subprocess.run(
            ["bash", str(ROOT / "cluster" / "make-tls-certs.sh"), str(other)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        extra = [
            "--tls-ca-file",
            str(other / "ca.pem"),
            "--tls-cert",
            str(other / "client.pem"),
            "--tls-key",
            str(other / "client-key.pem"),
        ]
    elif case == "tcp-scheme":
        address = address.replace("tls://", "tcp://")
    out = tmp_path / "run"
    r = run_cli(
        ["train", str(letter_store), "--scheduler", address, "--out", str(out), *TRAIN, *extra],
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 1
    line = _one_line_error(r.stderr)
    assert address in line
    if case == "no-certs":
        assert "--tls-ca-file" in line
    if case == "other-ca":
        assert "certificate" in line.lower()
    assert not (out / "history.json").exists()


# --------------------------------------------------------------------------------------------
# cluster/start-local.sh, stop-local.sh and pipeline.yaml
# --------------------------------------------------------------------------------------------


def test_start_and_stop_local_scripts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start = [
        str(ROOT / "cluster" / "start-local.sh"),
        "--workers",
        "1",
        "--port",
        "0",
        "--dashboard-port",
        "0",
        "--tls",
        "--run-dir",
        str(run_dir),
    ]
    stop_cmd = [str(ROOT / "cluster" / "stop-local.sh"), "--run-dir", str(run_dir)]
    pids: list[int] = []
    try:
        r = subprocess.run(start, capture_output=True, text=True, timeout=120, env=child_env())
        pids = [int(f.read_text()) for f in run_dir.glob("*.pid")]
        assert r.returncode == 0, r.stdout + r.stderr
        address = json.loads((run_dir / "scheduler.json").read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        assert f"scheduler: {address}" in r.stdout and "/pipeline" in r.stdout
        assert "Register worker" in (run_dir / "scheduler.log").read_text()
        again = subprocess.run(start, capture_output=True, text=True, timeout=60, env=child_env())
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        s = subprocess.run(stop_cmd, capture_output=True, text=True, timeout=120)
        for pid in pids:  # whatever happened, leave nothing behind (each is a session leader)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    assert s.returncode == 0, s.stderr
    assert "stopped scheduler" in s.stdout and "stopped workers" in s.stdout
    assert not (run_dir / "scheduler.pid").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_stop_local_leaves_another_programs_process_alone(tmp_path: Path) -> None:
    """A pid file left by a cluster that ended without stop-local.sh (a crash, a reboot) may name
    a number another program's process has since; the script does not signal it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen(["sleep", "120"], start_new_session=True)  # a process group leader, as dask's were
    try:
        for name in ("scheduler", "workers"):
            (run_dir / f"{name}.pid").write_text(f"{other.pid}\n")
        s = subprocess.run(
            [str(ROOT / "cluster" / "stop-local.sh"), "--run-dir", str(run_dir), "--grace", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert s.returncode == 0, s.stderr
        assert other.poll() is None, "stop-local.sh signalled a process that is not the cluster's"
        assert f"scheduler: pid {other.pid} in {run_dir}/scheduler.pid is no longer a dask process" in s.stderr
        assert "no cluster running from" in s.stdout and not list(run_dir.glob("*.pid"))
    finally:
        other.kill()
        other.wait()


def test_pipeline_yaml_uses_real_distributed_keys() -> None:
    """Every key of cluster/pipeline.yaml, the commented TLS block included, exists in
    distributed's own schema (distributed/distributed.yaml)."""
    import distributed
    import yaml

    text = (ROOT / "cluster" / "pipeline.yaml").read_text()
    commented_key = re.compile(r"^(\s*)# (\s*[a-z][a-z0-9-]*:(\s.*)?)$")
    uncommented = "\n".join(commented_key.sub(r"\1\2", ln) for ln in text.splitlines())
    ours = yaml.safe_load(uncommented)
    schema = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())

    def leaves(d: dict, prefix: tuple = ()) -> list[tuple]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict) and k != "pre-spawn-environ":  # its keys are env variables
                out += leaves(v, (*prefix, k))
            else:
                out.append((*prefix, k))
        return out

    keys = leaves(ours)
    assert ("distributed", "comm", "tls", "client", "cert") in keys  # the TLS block was read
    assert ("distributed", "comm", "require-encryption") in keys
    for key in keys:
        node = schema
        for part in key:
            assert isinstance(node, dict) and part in node, f"{'.'.join(key)} is not a distributed key"
            node = node[part]
    assert ours["distributed"]["scheduler"]["preload"] == ["pipeline.ps"]
    env = ours["distributed"]["nanny"]["pre-spawn-environ"]
    assert {env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} == {1}


def test_an_estimators_temporary_store_out_of_the_workers_reach_names_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit(X, y) on a cluster writes its arrays to a temporary store under this machine's
    temporary directory; a worker of another host cannot read it, and the error says how to
    give the fit a directory the workers share (TMPDIR), which then trains."""
    import tempfile

    from distributed import Client

    from pipeline.errors import StoreError
    from pipeline.estimator import MLPClassifier

    local, shared = tmp_path / "local", tmp_path / "shared"
    local.mkdir()
    shared.mkdir()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3))
    y = (X[:, 0] > 0).astype(int)
    with running_cluster(tmp_path / "cluster", workers=0) as cluster:
        cluster.worker(cluster.address, "elsewhere", cwd=shared, wrap=_hiding(local))
        with Client(cluster.address, timeout=30, set_as_default=False) as c:
            c.wait_for_workers(1, timeout=60)
            est = MLPClassifier(client=c, cluster_min_rows=0, hidden_layer_sizes=(4,), max_iter=2, n_iter_no_change=0)
            monkeypatch.setattr(tempfile, "tempdir", str(local))
            with pytest.raises(StoreError) as err:
                est.fit(X, y)
            msg = str(err.value)
            assert "1 of 1 workers cannot open store" in msg and "\n" not in msg, msg
            assert f"under this machine's temporary directory ({local})" in msg and "set TMPDIR" in msg, msg
            assert list(local.iterdir()) == []  # the temporary store is removed
            monkeypatch.setattr(tempfile, "tempdir", str(shared))
            assert est.fit(X, y).n_iter_ == 2
