"""The `pipeline` command end to end: train, evaluate, predict, runs, resume, Ctrl-C, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.checkpoint import load_file
from pipeline.model import load_model
from pipeline.store import open_store
from tests.pipeline.helpers import CLI, cli_env, read_until, run_cli

CLUSTER = ("--workers", "2", "--dashboard-address", "none")


@pytest.fixture(scope="module")
def trained(letter_stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli("train", letter_stores[0], "--out", str(out), "--set", "epochs=3", "--set", "patience=0", *CLUSTER)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 3 and 0 < summary["val_accuracy"] <= 1
    assert "configuration:" in r.stderr and "epoch   3" in r.stderr
    return out


def test_train_writes_a_run_and_prints_the_resolved_config(trained):
    assert 'mode = "sync"' in (trained / "config.toml").read_text()
    history = json.loads((trained / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert len(history["rounds"]) == history["epochs"][-1]["rounds"]


def test_evaluate_json_and_table(trained, letter_stores):
    r = run_cli("evaluate", str(trained), letter_stores[1], "--json", *CLUSTER)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["n"] == 4000 and 0.3 < m["accuracy"] <= 1
    assert np.asarray(m["confusion"]).sum() == 4000
    model = load_model(trained)
    test = open_store(letter_stores[1])
    local = np.mean(model.predict_index(test.X[:]) == test.y[:])
    assert m["accuracy"] == pytest.approx(local, abs=1e-9)  # the cluster agrees with the model file
    r = run_cli("evaluate", str(trained), letter_stores[1], *CLUSTER)
    assert "accuracy" in r.stdout and "confusion matrix" in r.stdout


def test_predict_to_zarr_and_parquet(trained, letter_stores, tmp_path):
    test = open_store(letter_stores[1])
    model = load_model(trained)
    expected = model.predict_index(test.X[:])
    out = tmp_path / "pred.zarr"
    r = run_cli("predict", str(trained), letter_stores[1], str(out), "--proba", *CLUSTER)
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(out), mode="r")
    # the labels, as the Parquet output and load_model(...).predict give them
    np.testing.assert_array_equal(g["prediction"][:].astype(object), np.asarray(test.classes, dtype=object)[expected])
    np.testing.assert_allclose(g["proba"][:].sum(axis=1), 1, rtol=1e-5)
    pout = tmp_path / "pred.parquet"
    r = run_cli("predict", str(trained), letter_stores[1], str(pout), *CLUSTER)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(pout).sort_by("row")
    assert table.num_rows == 4000
    assert table["prediction"].to_pylist() == [test.classes[i] for i in expected]
    r = run_cli("predict", str(trained), letter_stores[1], str(pout), *CLUSTER)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp litter


def test_runs_lists_the_run(trained):
    r = run_cli("runs", str(trained.parent), "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["epochs"] == 3 and row["run"].endswith("run")


def test_resume_continues_from_the_checkpoint(letter_stores, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", letter_stores[0], "--out", str(out), "--set", "epochs=2", "--set", "patience=0", *CLUSTER)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", letter_stores[0], "--out", str(out), "--resume", "--set", "epochs=3", *CLUSTER)
    assert r.returncode == 0, r.stderr
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    rounds = [e["rounds"] for e in history["epochs"]]
    assert rounds == sorted(rounds) and rounds[2] > rounds[1]


def _interrupt_training(args: list[str], after: str, delay: float = 0.0) -> tuple[int, str]:
    """Start `pipeline train ARGS`, send it Ctrl-C ``delay`` s after it printed ``after``; its
    exit status and stderr."""
    proc = subprocess.Popen(
        [*CLI, "train", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
        # a test run started in the background of a non-interactive shell has SIGINT ignored,
        # and children inherit that: give the command the disposition a terminal user has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        read_until(proc.stderr, after)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_ctrl_c_stops_cleanly_with_a_checkpoint(letter_stores, tmp_path):
    out = tmp_path / "run"
    code, err = _interrupt_training(
        [letter_stores[0], "--out", str(out), "--set", "epochs=500", "--set", "patience=0", *CLUSTER], "epoch   2"
    )
    assert code == 130, err
    assert "interrupted" in err
    assert "ERROR" not in err and "Traceback" not in err, err[-3000:]
    arrays, meta = load_file(out / "checkpoint.npz", "checkpoint")
    assert meta["epoch"] >= 2 and arrays["params"].dtype == np.float32
    r = run_cli(
        "train", letter_stores[0], "--out", str(out), "--resume", "--set", f"epochs={meta['epoch'] + 1}", *CLUSTER
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ctrl_c_mid_epoch_stops_its_tasks_before_the_cluster_closes(tmp_path, mode):
    """Interrupted while the epoch's tasks compute: they end at their next message to the
    parameter server (the "left" reply to a cancelled participant) and the command closes its
    cluster after them: no error from the scheduler, no worker logging a task cancelled under
    it, no traceback."""
    from pipeline.synth import synth

    store = synth(tmp_path / "s.zarr", rows=40_000, features=256, classes=10, seed=0).path
    args = [store, "--out", str(tmp_path / "run"), "--set", "epochs=500", "--set", "patience=0"]
    args += ["--set", "hidden=[256,128]", "--set", f"mode={mode}", *CLUSTER]
    # 0.7 s into epoch 2's tasks (an epoch takes several seconds here)
    code, err = _interrupt_training(args, "epoch   1", delay=0.7)
    assert code == 130, err
    assert "interrupted: writing a checkpoint before stopping" in err, err[-3000:]
    for noise in ("ERROR", "CancelledError", "Traceback", "Compute Failed"):
        assert noise not in err, err[-3000:]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--set", "epoch=3"), "unknown config key 'epoch'"),
        (("--set", "batch_size=-3"), "'batch_size' = -3 is invalid"),
        (("--set", "lr=fast"), "'lr' must be float"),
        (("--config", "missing.toml"), "not found"),
    ],
)
def test_config_errors_are_one_line(letter_stores, tmp_path, args, fragment):
    r = run_cli("train", letter_stores[0], "--out", str(tmp_path / "run"), *args, *CLUSTER)
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_help_has_examples():
    r = run_cli("--help")
    assert r.returncode == 0 and "ingest" in r.stdout and "train" in r.stdout
    for cmd in ("train", "evaluate", "predict", "ingest", "synth", "inspect"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and ("Example" in r.stdout or "example" in r.stdout), cmd


def test_dask_pipeline_is_the_same_command():
    exe = Path(sys.executable).parent / "dask"
    r = subprocess.run([str(exe), "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Out-of-core neural-network training" in r.stdout


_LOGGING_PROBE = """
import asyncio, logging, sys
from pipeline.cli import cli

@cli.command("probe")
def probe():
    import distributed  # noqa: F401  (configures its loggers as a real run does)
    log = logging.getLogger("distributed.client")
    for exc in (asyncio.CancelledError(), OSError("boom")):
        try:
            raise exc
        except BaseException:
            log.exception("closing" if isinstance(exc, OSError) else "")
    try:
        raise RuntimeError("lost")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved\\nfuture: <Task>")

cli(sys.argv[1:], prog_name="pipeline")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_dask_tracebacks_are_one_line_unless_verbose(verbose):
    # distributed's client logs the tracebacks of its shutdown coroutines when a scheduler
    # vanishes; without --verbose they must not bury the pipeline's own one-line error.
    args = [sys.executable, "-c", _LOGGING_PROBE, *(["--verbose"] if verbose else []), "probe"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if verbose:
        assert r.stderr.count("Traceback") == 3, r.stderr
    else:
        assert "Traceback" not in r.stderr and "CancelledError" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 2, r.stderr
        assert lines[0].endswith("distributed.client: closing (OSError: boom)"), r.stderr
        assert lines[1].endswith("asyncio: Task exception was never retrieved (RuntimeError: lost)"), r.stderr


# -- the run directory is claimed for the life of a run -----------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from pipeline.train import RunDir
claim = RunDir(Path(sys.argv[1])).claim(False, True)
claim.__enter__()
print("claimed", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from pipeline.synth import synth

    return synth(tmp_path_factory.mktemp("small") / "s.zarr", rows=2000, features=4, classes=3, seed=0).path


def _popen_train(store: str, out: Path, *extra: str) -> subprocess.Popen:
    env = cli_env()
    return subprocess.Popen(
        [
            *CLI,
            "train",
            store,
            "--out",
            str(out),
            "--set",
            "epochs=2",
            "--set",
            "hidden=[8]",
            "--workers",
            "1",
            "--dashboard-address",
            "none",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_trainings_started_together_into_one_out_do_not_both_succeed(small_store, tmp_path):
    out = tmp_path / "run"
    procs = [_popen_train(small_store, out), _popen_train(small_store, out)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert "is in use by another training (pid" in loser[2] or "already holds a run" in loser[2], loser[2]
    winner = next(r for r in results if r[0] == 0)
    assert json.loads(winner[1].strip().splitlines()[-1])["epochs"] == 2
    assert not (out / ".lock").exists()  # released when the run ended
    load_model(out)


def test_force_does_not_take_over_a_live_run_but_a_dead_one_s_lock_is_no_claim(small_store, tmp_path):
    out = tmp_path / "run"
    env = cli_env()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), "600"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        p = _popen_train(small_store, out, "--force")
        code, _, err = p.wait(timeout=120), *p.communicate()
        assert code == 1 and f"is in use by another training (pid {holder.pid} on " in err, err
        assert sorted(x.name for x in out.iterdir()) == [".lock"]  # nothing written beside it
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the killed holder's lock file is still there, but the kernel dropped its lock
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)
    p = _popen_train(small_store, out)
    code, _, err = p.wait(timeout=300), *p.communicate()
    assert code == 0, err
    assert (out / "model.npz").is_file() and not (out / ".lock").exists()


def test_cuda_backend_without_a_gpu_is_refused_before_the_cluster_starts(small_store, tmp_path):
    env = cli_env(NUMBA_ENABLE_CUDASIM="0")  # no simulator: the real check
    probe = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels._real_gpu())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.stdout.strip() == "True":
        pytest.skip("this machine has a CUDA GPU")
    r = subprocess.run(
        [*CLI, "train", small_store, "--out", str(tmp_path / "run"), "--set", "backend=cuda", *CLUSTER],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(
        "error: config key 'backend' = 'cuda' cannot run on this machine: CUDA backend unavailable"
    ), r.stderr
    assert "dask dashboard" not in r.stderr and not (tmp_path / "run").exists()


def test_sigterm_stops_with_a_checkpoint_and_evaluate_explains_the_interrupted_run(small_store, tmp_path):
    out = tmp_path / "run"
    proc = _popen_train(small_store, out, "--set", "epochs=500", "--set", "patience=0")
    try:
        read_until(proc.stderr, "epoch   2")
        # while it trains, evaluate says so instead of "model.npz not found"
        r = run_cli("evaluate", str(out), small_store, "--scheduler", "tcp://127.0.0.1:1")
        assert r.returncode == 1 and f"is still training (pid {proc.pid} on " in r.stderr, r.stderr
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest[1]
    assert "interrupted (SIGTERM)" in rest[1]
    _, meta = load_file(out / "checkpoint.npz", "checkpoint")
    assert meta["epoch"] >= 2 and not (out / "model.npz").exists()
    r = run_cli("evaluate", str(out), small_store, "--scheduler", "tcp://127.0.0.1:1")
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith(
        f"error: run directory {str(out)!r} holds an interrupted run (checkpoint after "
        f"{meta['epoch']} epoch(s), no model.npz); continue it with `pipeline train "
        f"{small_store} --out {out} --resume`"
    ), line
    # the command it suggests writes the model of the best epoch so far
    suggested = line.split("`... ")[1].rstrip("`").split()
    r = run_cli("train", small_store, "--out", str(out), *suggested, "--workers", "1", "--dashboard-address", "none")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == meta["epoch"]
    assert run_cli("evaluate", str(out), small_store, "--workers", "1", "--dashboard-address", "none").returncode == 0


def test_report_is_written_without_dask_size_warnings(small_store, tmp_path):
    """A worker's profile is a tree as deep as the stacks it sampled (up to 100 levels: the first
    task imports the compiled kernels); Dask sized it for the report with a recursion deeper
    than Python's default limit and printed a 'Sizeof calculation ... failed' warning."""
    report = tmp_path / "report.html"
    p = _popen_train(small_store, tmp_path / "run", "--report", str(report))
    code, _, err = p.wait(timeout=300), *p.communicate()
    assert code == 0, err
    assert report.stat().st_size > 10_000
    assert "Sizeof calculation" not in err and "WARNING" not in err, err


def test_final_line_and_runs_show_the_saved_model_s_epoch(small_store, tmp_path):
    # min_delta larger than any decrease: no epoch improves on the first, which is the one saved
    out = tmp_path / "runs" / "a"
    p = _popen_train(small_store, out, "--set", "epochs=3", "--set", "patience=0", "--set", "min_delta=1e9")
    code, stdout, err = p.wait(timeout=300), *p.communicate()
    assert code == 0, err
    final = json.loads(stdout.strip().splitlines()[-1])
    epochs = json.loads((out / "history.json").read_text())["epochs"]
    assert len(epochs) == 3 and epochs[0]["val_loss"] != epochs[-1]["val_loss"]
    assert final["best_epoch"] == 0 and final["epochs"] == 3
    assert final["val_loss"] == epochs[0]["val_loss"] and final["val_accuracy"] == epochs[0]["val_accuracy"]
    r = run_cli("runs", str(out.parent), "--json")
    (row,) = json.loads(r.stdout)
    assert row["best_epoch"] == 0 and row["val_loss"] == epochs[0]["val_loss"]
    assert row["samples_per_s"] == epochs[-1]["samples_per_s"]
    table = run_cli("runs", str(out.parent)).stdout.splitlines()
    assert table[0].split() == ["run", "epochs", "best", "val_loss", "val_metric", "samples/s"]
    assert table[1].split()[1:4] == ["3", "1", f"{epochs[0]['val_loss']:.4f}"]


def test_dp_trains_on_a_cluster_and_prints_epsilon_until_the_budget_stops_it(small_store, tmp_path):
    """A store small enough to train in-process still gets a cluster (the parameter server does
    the privacy); each epoch line and the final line carry epsilon; the budget stops the run."""
    out = tmp_path / "run"
    budget = ("--set", "dp=central", "--set", "noise_multiplier=5", "--set", "target_epsilon=3")
    r = run_cli("train", small_store, "--out", str(out), "--set", "epochs=40", "--set", "patience=0", *budget)
    assert r.returncode == 0, r.stderr
    assert "training in this process" not in r.stderr and "epsilon " in r.stderr
    assert "privacy budget: stopping after 11 rounds" in r.stderr  # z = 5, q = 1: 11 rounds within 3
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < final["epsilon"] <= 3 and final["dp_delta"] == 1e-5 and final["epochs"] < 40


def test_a_diverged_run_on_a_local_cluster_is_one_line(tmp_path: Path) -> None:
    """lr=1e30 on two worker processes: the command's whole stderr is the one error line. It was
    that line after the in-process parameter server's ERROR log, each worker's "Compute Failed"
    block with its traceback and NumPy's overflow warnings."""
    from pipeline.synth import synth

    synth(str(tmp_path / "s.zarr"), rows=2000, features=4, classes=3, seed=0)
    r = run_cli("train", tmp_path / "s.zarr", "--out", tmp_path / "run", "--workers", "2", "--set", "lr=1e30", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        "error: training diverged at round 0: the loss is not finite (loss=nan); lower the learning rate or add warm-up"
    ], r.stderr
