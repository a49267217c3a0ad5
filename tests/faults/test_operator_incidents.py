"""Incidents of long runs on a hand-started cluster (`dask scheduler --preload pipeline.ps` and
`dask worker` processes on 127.0.0.1): a resume that would move the validation rows, or replan an
epoch killed partway; a disk that fills up under a running job; a checkpoint damaged by hand;
`pipeline runs` while a finished run trains again and after that resume was killed. Each refusal
is one line that leaves the run as it was, and the run then resumes to the model of one never
stopped."""

from __future__ import annotations

import io
import resource
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import load_file
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.train import RunDir, resumed_config, train
from tests.cluster.conftest import running_cluster
from tests.faults.conftest import FAST, child_env, error_line
from tests.pipeline.helpers import invoke, snapshot
from tests.processes import PIPELINE, Procs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    """A scheduler with the parameter server preloaded and one worker."""
    with running_cluster(tmp_path_factory.mktemp("operator-cluster"), workers=1) as c:
        yield c


def pipeline_cmd(args: list[str], cwd: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """The ``pipeline`` command as its own process; ``file_size_limit`` bytes caps every file it
    writes (RLIMIT_FSIZE: a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [PIPELINE, *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=limit if file_size_limit else None,
    )


@pytest.fixture(scope="module")
def trained(cluster: Procs, small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 1 epoch (then another of 2, its reference) on the cluster, in ``runs/``."""
    root = tmp_path_factory.mktemp("operator-runs")
    for out, epochs in (("one", 1), ("two", 2)):
        args = ["train", str(small_store), "--scheduler", cluster.address, "--out", f"runs/{out}", "-q", *FAST]
        r = pipeline_cmd([*args, "--set", f"epochs={epochs}", "--set", "hidden=[64]"], root)
        assert r.returncode == 0, r.stderr
    return root / "runs"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the 1-epoch run."""
    shutil.copytree(trained / "one", tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------
# A resume that would validate on other rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("validation=0.3", "resume with --set validation=0.1 (or without setting validation)"),
        ("validation=0", "not no held-out rows (validation = 0)"),
        ("seed=7", "resume with --set seed=0 (or without setting seed)"),
    ],
)
def test_a_resume_that_moves_the_held_out_rows_is_refused_before_anything_is_written(
    run: Path, small_store: Path, cluster: Procs, change: str, fragment: str
) -> None:
    """Another validation fraction or seed holds out other rows: the resumed run would train on
    rows it validated on, and pick its best epoch by losses over different rows."""
    before = snapshot(run.parent)
    line = error_line(
        pipeline_cmd(
            ["train", str(small_store), "--out", str(run), "--resume", "--scheduler", cluster.address]
            + ["--set", "epochs=2", "--set", change],
            run.parent,
        ).stderr
    )
    assert line.startswith(f"error: checkpoint '{run / 'checkpoint.npz'}' was validated on validation = 0.1"), line
    assert fragment in line, line
    assert snapshot(run.parent) == before
    # the Python API refuses it too, on the cluster, before the run's config is written
    from distributed import Client

    cfg = resumed_config(run).with_overrides(["epochs=2", change])
    with Client(cluster.address, timeout=30) as client, pytest.raises(CheckpointError, match="was validated on"):
        train(str(small_store), cfg, run, client=client, resume=True)
    assert snapshot(run.parent) == before


def test_a_resume_onto_a_validation_store_is_refused(run: Path, small_store: Path) -> None:
    before = snapshot(run.parent)
    moved = f"validation_store={small_store}"
    r = invoke("train", small_store, "--out", run, "--resume", "--set", "epochs=2", "--set", moved)
    assert r.exit_code == 1 and "resume with --set validation_store='' (or without setting" in r.stderr, r.output
    assert snapshot(run.parent) == before
    cfg = TrainConfig.from_dict(load_file(run / "checkpoint.npz", "checkpoint")[1]["config"])
    assert (cfg.validation, cfg.seed, cfg.validation_store) == (0.1, 0, "")


# --------------------------------------------------------------------------------------------
# The disk fills up under a running job
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_the_run_resumes_to_the_same_model(
    run: Path, trained: Path, small_store: Path, cluster: Procs
) -> None:
    """The epoch's checkpoint does not fit: the run stops with one line naming the file and the
    fix, the checkpoint written before is whole, no temporary is left, config.toml is still the
    run's; once there is room, --resume ends with the weights of the run never stopped."""
    ckpt = run / "checkpoint.npz"
    size = ckpt.stat().st_size
    before = ckpt.read_bytes()
    args = ["train", str(small_store), "--out", str(run), "--resume", "--scheduler", cluster.address]
    r = pipeline_cmd([*args, "--set", "epochs=2"], run.parent, file_size_limit=size // 2)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    assert line == (
        f"error: cannot write checkpoint file '{ckpt}' (File too large); the checkpoint written before is kept: "
        f"free space on its disk or make '{run}' writable, then continue the run with --resume"
    )
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    assert RunDir(run).written_here("config.toml")
    r = pipeline_cmd([*args, "--set", "epochs=2", "-q"], run.parent)
    assert r.returncode == 0, r.stderr
    got, _ = load_file(run / "model.npz", "model")
    want, _ = load_file(trained / "two" / "model.npz", "model")
    assert np.array_equal(got["params"], want["params"])


# --------------------------------------------------------------------------------------------
# The run's checkpoint damaged by hand (a bad copy, a disk error)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "checksum"])
def test_a_damaged_checkpoint_is_named_by_resume_and_runs_with_the_fix(
    run: Path, small_store: Path, cluster: Procs, damage: str
) -> None:
    """A run directory keeps one checkpoint: resuming from a damaged one says so and names the
    fixes (a copy, or a new start), not those of a path given to `evaluate`; `pipeline runs`
    names it too, instead of calling it a directory without a finished run."""
    from distributed import Client

    ckpt = run / "checkpoint.npz"
    (run / "model.npz").unlink()  # the driver was killed: a checkpoint and no model yet
    (run / "history.json").unlink()
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        what = f"checkpoint file '{ckpt}' is unreadable or truncated (File is not a zip file)"
    else:  # one weight changed inside an intact archive
        import zipfile

        with zipfile.ZipFile(ckpt) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        params = np.load(io.BytesIO(members["params.npy"]))
        params[0] += 1
        raw = io.BytesIO()
        np.save(raw, params)
        members["params.npy"] = raw.getvalue()
        with zipfile.ZipFile(ckpt, "w") as zf:
            for n, data in members.items():
                zf.writestr(n, data)
        what = f"checkpoint file '{ckpt}' failed its checksum (corrupted)"
    fix = f"restore its checkpoint.npz from a copy, or move checkpoint.npz out of '{run}' and start the run again"
    before = snapshot(run.parent)
    r = invoke("train", small_store, "--out", run, "--resume", "--set", "epochs=2")
    line = r.stderr.strip()
    assert r.exit_code == 1 and line == f"error: cannot resume the run in '{run}': {what}; {fix} with --force", r.output
    cfg = TrainConfig().with_overrides([*(a for a in FAST if a != "--set"), "epochs=2", "hidden=[64]"])
    with Client(cluster.address, timeout=30) as client, pytest.raises(CheckpointError) as refused:
        train(str(small_store), cfg, run, client=client, resume=True)
    assert str(refused.value) == f"cannot resume the run in '{run}': {what}; {fix} with --force"
    r = invoke("runs", run.parent)
    assert r.exit_code == 0 and f"run directory '{run}' holds a damaged checkpoint and no model.npz" in r.output
    assert fix in r.output, r.output
    assert snapshot(run.parent) == before


# --------------------------------------------------------------------------------------------
# The driver killed partway through an epoch, resumed with other settings
# --------------------------------------------------------------------------------------------


def test_an_epoch_killed_partway_is_not_resumed_with_another_plan_and_finishes_with_its_own(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    """kill -9 of the driver after some of an async epoch's tasks finished: resuming that epoch
    as sync shares (or with another batch size) would train its finished tasks' rows again and
    count them twice. It is refused in one line naming how to finish the epoch first; done so,
    every epoch records its training rows once, and the next epochs take the new mode."""
    from tests.faults.conftest import finish, history
    from tests.processes import wait_for

    _, address = procs.scheduler()
    procs.worker(address, "w0", "--preload", "slowpatch", nanny=False, FAULTS_SLOW_STEP="0.02")
    run = tmp_path / "run"
    args = ["--set", "epochs=3", "--set", "checkpoint_seconds=0.3", "--set", "mode=async", *FAST]
    driver = procs.train(small_store, address, run, *args)

    def meta() -> dict:
        try:
            return load_file(run / "checkpoint.npz", "checkpoint")[1]
        except (CheckpointError, OSError):
            return {}

    wait_for(lambda: bool(meta().get("done_tasks")) or driver.popen.poll() is not None, 120, "a finished task")
    driver.popen.send_signal(signal.SIGKILL)
    driver.popen.wait(30)
    epoch = meta()["epoch"]
    assert meta()["done_tasks"], "the run ended before a checkpoint within an epoch"
    before = snapshot(run)
    for change, was in (("mode=sync", "mode = async -> sync"), ("batch_size=64", "batch_size = 128 -> 64")):
        line = error_line(
            pipeline_cmd(
                ["train", str(small_store), "--out", str(run), "--resume", "--set", change] + ["--scheduler", address],
                tmp_path,
            ).stderr
        )
        assert f"was taken partway through epoch {epoch + 1}, planned with the settings it started with ({was})" in line
        assert f"finish that epoch first with `--resume --set epochs={epoch + 1}`" in line, line
        assert line.endswith("then resume with the new settings and --set epochs=3"), line
        assert snapshot(run) == before
    done = procs.train(small_store, address, run, "--resume", "--set", f"epochs={epoch + 1}")
    out = finish(done, 120)
    assert done.popen.returncode == 0, out[-2000:]
    if epoch + 1 < 3:
        done = procs.train(small_store, address, run, "--resume", "--set", "mode=sync", "--set", "epochs=3")
        out = finish(done, 120)
        assert done.popen.returncode == 0, out[-2000:]
    epochs = history(run)["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert {e["samples"] for e in epochs} == {18_000}, [e["samples"] for e in epochs]
    assert [t["name"][3] for t in epochs[2]["tasks"]] == (["s"] if epoch + 1 < 3 else ["t"]) * len(epochs[2]["tasks"])


def test_a_config_that_cannot_be_written_on_resume_leaves_the_run_s_own(
    run: Path, small_store: Path, cluster: Procs
) -> None:
    """A resume rewrites config.toml first: a write that fails leaves the run's config whole (a
    half-written one was no longer known as the run's, and every later resume was refused)."""
    before = snapshot(run)
    args = ["train", str(small_store), "--out", str(run), "--resume", "--scheduler", cluster.address]
    half = (run / "config.toml").stat().st_size // 2
    r = pipeline_cmd([*args, "--set", "epochs=2"], run.parent, file_size_limit=half)
    line = error_line(r.stderr)
    assert line == (
        f"error: cannot write '{run / 'config.toml'}' (File too large); the config.toml written before is kept: "
        f"free space on its disk or make '{run}' writable, then continue the run with --resume"
    )
    assert snapshot(run) == before
    r = pipeline_cmd([*args, "--set", "epochs=2", "-q"], run.parent)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# `pipeline runs` while a finished run trains again, and after that resume was killed
# --------------------------------------------------------------------------------------------


def test_runs_names_a_resume_training_now_and_one_killed_before_its_model(
    procs: Procs, small_store: Path, tmp_path: Path
) -> None:
    """A finished run resumed for more epochs keeps its model.npz and history.json until the
    resume ends: `pipeline runs` lists them, and says that the run trains again, then (the
    driver killed) that its checkpoint is further on than the model listed, with the command."""
    from tests.faults.conftest import finish
    from tests.processes import wait_for

    _, address = procs.scheduler()
    procs.worker(address, "w0", "--preload", "slowpatch", nanny=False, FAULTS_SLOW_STEP="0.02")
    run = tmp_path / "run"
    first = procs.train(small_store, address, run, "--set", "epochs=1", "--set", "checkpoint_seconds=0.3", *FAST)
    out = finish(first, 120)
    assert first.popen.returncode == 0, out[-2000:]
    again = procs.train(small_store, address, run, "--resume", "--set", "epochs=5")

    def epoch() -> int:
        try:
            return int(load_file(run / "checkpoint.npz", "checkpoint")[1]["epoch"])
        except (CheckpointError, OSError):
            return -1

    wait_for(lambda: epoch() >= 2 or again.popen.poll() is not None, 120, "an epoch of the resumed run")
    r = invoke("runs", tmp_path)
    assert again.popen.poll() is None, "the resumed run ended before it was listed"
    lines = r.output.splitlines()
    assert lines[1].split()[:2] == [str(run), "1"], r.output
    assert lines[2] == (
        f"run directory '{run}' is training again (pid {again.popen.pid} on {socket.gethostname()}): "
        "listed is the model it saved after 1 epoch(s); its new model.npz is written when the run ends"
    )
    again.popen.send_signal(signal.SIGKILL)
    again.popen.wait(30)
    done = epoch()
    assert 2 <= done < 5
    r = invoke("runs", tmp_path)
    assert r.output.splitlines()[2] == (
        f"run directory '{run}' holds an interrupted resume: its checkpoint is after {done} epoch(s), its listed "
        f"model.npz and history.json after 1; continue it with `pipeline train {small_store} --out {run} --resume "
        f"--scheduler {address}`, "
        f"or write the model of its best epoch so far with `... --resume --set epochs={done}`"
    )
