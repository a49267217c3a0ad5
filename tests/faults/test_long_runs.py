"""Long runs kept alive on a hand-started cluster (`dask scheduler --preload pipeline.ps` and
`dask worker` processes on 127.0.0.1) and resumed many times: the round history a checkpoint
and history.json keep stays bounded (and the weights those of a run never stopped), the hints
printed for an interrupted run name the scheduler it trained on, a resume that fails before its
first checkpoint leaves the run's config.toml as it was, and a job of many epochs keeps a
bounded record of them for the dashboard."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pipeline.checkpoint
from pipeline.checkpoint import kept_rounds, load_file, read_checkpoint
from pipeline.config import TrainConfig
from pipeline.train import train
from tests.cluster.conftest import running_cluster
from tests.faults.conftest import FAST, child_env, error_line
from tests.processes import PIPELINE, Procs

SETTINGS = [a for a in FAST if a != "--set"]  # the fault tests' fast settings, as overrides


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    """A scheduler with the parameter server preloaded and one single-threaded worker."""
    with running_cluster(tmp_path_factory.mktemp("long-runs-cluster"), workers=1) as c:
        yield c


def pipeline_cmd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PIPELINE, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300, check=False
    )


# --------------------------------------------------------------------------------------------
# The round history of a run resumed many times
# --------------------------------------------------------------------------------------------


def test_kept_rounds_keep_the_first_round_the_newest_whole_and_every_sample() -> None:
    rows = [[1000.0 + i, i + 1, 1.0 / (i + 1), 64, 1] for i in range(50_001)]
    kept = kept_rounds(rows, 2_000)
    assert len(kept) == 2_000
    assert kept[0] == rows[0] and kept[-1_000:] == rows[-1_000:]
    assert [r[1] for r in kept] == sorted({r[1] for r in kept})  # versions rise, none twice
    assert sum(r[3] for r in kept) == 64 * len(rows) and sum(r[4] for r in kept) == len(rows)
    # thinned again (the next checkpoint): still bounded, still every sample
    again = kept_rounds([*kept, *([2e6, 50_002 + i, 0.5, 64, 1] for i in range(500))], 2_000)
    assert len(again) == 2_000 and sum(r[3] for r in again) == 64 * (len(rows) + 500)
    assert kept_rounds(rows[:10], 2_000) == rows[:10]


def test_a_run_resumed_many_times_keeps_a_bounded_round_history_and_the_weights_of_one_never_stopped(
    cluster: Procs, small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every resume added the rounds of the server's whole history to the checkpoint's, so the
    checkpoint, its write time and history.json grew with each resume (without bound)."""
    from distributed import Client

    monkeypatch.setattr(pipeline.checkpoint, "ROUNDS_KEPT", 40, raising=False)
    cfg = TrainConfig().with_overrides([*SETTINGS, "mode=sync"])
    with Client(cluster.address, timeout=30) as client:
        straight = train(str(small_store), cfg.with_overrides(["epochs=4"]), tmp_path / "straight", client=client)
        resumed = tmp_path / "resumed"
        train(str(small_store), cfg.with_overrides(["epochs=1"]), resumed, client=client)
        sizes = []
        for epochs in (2, 3, 4):
            train(str(small_store), cfg.with_overrides([f"epochs={epochs}"]), resumed, client=client, resume=True)
            sizes.append(len(read_checkpoint(resumed / "checkpoint.npz").rounds or ()))
    assert len(straight.history) == 4
    full = json.loads((tmp_path / "straight" / "history.json").read_text())["rounds"]
    doc = json.loads((resumed / "history.json").read_text())
    assert max(sizes) <= 40 and len(doc["rounds"]) <= 40, (sizes, len(doc["rounds"]))
    # the run's first round and its newest ones stay, with every sample trained
    assert doc["rounds"][0][1] == 1 and doc["rounds"][-1][1] == doc["epochs"][-1]["rounds"]
    assert sum(r[3] for r in doc["rounds"]) == sum(r[3] for r in full)
    assert [r[1] for r in doc["rounds"]] == sorted({r[1] for r in doc["rounds"]})
    assert len(doc["epochs"]) == 4  # the per-epoch records are kept whole
    got, _ = load_file(resumed / "model.npz", "model")
    want, _ = load_file(tmp_path / "straight" / "model.npz", "model")
    assert np.array_equal(got["params"], want["params"])


# --------------------------------------------------------------------------------------------
# The resume hints of a run on a hand-started scheduler
# --------------------------------------------------------------------------------------------


def test_the_resume_hint_of_an_interrupted_run_names_its_scheduler_and_resumes_there(
    cluster: Procs, small_store: Path, tmp_path: Path
) -> None:
    """A copied hint without ``--scheduler`` started a local cluster instead of resuming on the
    cluster the run trained on."""
    from distributed import Client

    run = tmp_path / "run"
    args = [PIPELINE, "train", str(small_store), "--scheduler", cluster.address, "--out", str(run)]
    proc = subprocess.Popen(
        [*args, *FAST, "--set", "epochs=500"], cwd=tmp_path, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:
            if line.startswith("epoch   1"):
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    done = int(load_file(run / "checkpoint.npz", "checkpoint")[1]["epoch"])
    hint = f"`pipeline train {small_store} --out {run} --resume --scheduler {cluster.address}`"
    line = error_line(pipeline_cmd(["evaluate", str(run), str(small_store)], tmp_path).stderr)
    assert f"no model.npz); continue it with {hint}, or write the model" in line, line
    # the hint, copied: it resumes on the run's scheduler
    command = shlex.split(line.split("continue it with `")[1].split("`")[0])
    assert command[:2] == ["pipeline", "train"]
    r = pipeline_cmd([*command[1:], "--set", f"epochs={done + 1}", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    job = json.loads((run / "history.json").read_text())["job"]
    with Client(cluster.address, timeout=30) as client:
        finished = client.sync(client.scheduler.ps_metrics)["finished"]
    assert job in [f["job"] for f in finished]


# --------------------------------------------------------------------------------------------
# A resume with new settings that fails before its first checkpoint
# --------------------------------------------------------------------------------------------


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_the_run_s_config(
    cluster: Procs, small_store: Path, tmp_path: Path
) -> None:
    """The resume's ``--set`` values stayed in config.toml, which then said the run trains with
    settings no checkpoint of it had (the next plain --resume trains with its checkpoint's)."""
    run = tmp_path / "run"
    args = ["train", str(small_store), "--scheduler", cluster.address, "--out", str(run), "-q", *FAST]
    assert pipeline_cmd([*args, "--set", "epochs=1"], tmp_path).returncode == 0
    before = (run / "config.toml").read_bytes()
    ckpt = (run / "checkpoint.npz").read_bytes()
    r = pipeline_cmd([*args, "--resume", "--set", "epochs=2", "--set", "server_lr=1e30"], tmp_path)
    assert r.returncode == 1 and error_line(r.stderr).startswith("error: training diverged"), r.stderr
    assert (run / "config.toml").read_bytes() == before
    assert (run / "checkpoint.npz").read_bytes() == ckpt
    # once the resume has checkpointed, the run's config is its new one
    assert pipeline_cmd([*args, "--resume", "--set", "epochs=2", "--set", "server_lr=0.5"], tmp_path).returncode == 0
    assert "server_lr = 0.5" in (run / "config.toml").read_text().splitlines()


def test_a_federated_run_records_its_scheduler_for_the_resume_hint(
    cluster: Procs, small_store: Path, tmp_path: Path
) -> None:
    """A run of simulated clients on a hand-started scheduler: its checkpoint keeps the scheduler
    (it kept none), so the hint of the interrupted run names it as a plain run's does."""
    from distributed import Client

    from pipeline.train import RunDir

    run = tmp_path / "fed"
    cfg = TrainConfig().with_overrides([*SETTINGS, "clients=4", "rounds=2"])
    with Client(cluster.address, timeout=30) as client:
        train(str(small_store), cfg, run, client=client)
    _, meta = load_file(run / "checkpoint.npz", "checkpoint")
    assert meta.get("cluster") == {"scheduler": cluster.address}
    (run / "model.npz").unlink()  # as a run stopped before its model
    hint = RunDir(run).missing_model(str(small_store))
    assert hint is not None and f"--out {run} --resume --scheduler {cluster.address}`" in hint, hint


# --------------------------------------------------------------------------------------------
# The dashboard's record of a job of many epochs
# --------------------------------------------------------------------------------------------


def test_a_job_of_many_epochs_keeps_a_bounded_record_of_them_spanning_the_run() -> None:
    """Every epoch's record stayed on the scheduler and went out with every metrics reply (each
    page refresh, /metrics scrape and the driver's state at each epoch's end)."""
    from pipeline.ps.job import Job

    async def main() -> tuple[list, dict]:
        job = Job.create("many-epochs", np.zeros(3, np.float32), 3, mode="async", optimizer={"name": "sgd", "lr": 0.1})
        for e in range(20_000):
            job.record(epoch={"epoch": e, "val_loss": 1.0 / (e + 1)})
        return job.metrics()["epochs"], job.close()

    epochs, closed = asyncio.run(main())
    assert len(epochs) <= 2_000 and len(closed["epochs"]) <= 2_000
    assert epochs[0]["epoch"] == 0 and epochs[-1]["epoch"] == 19_999
    assert [e["epoch"] for e in epochs[-500:]] == list(range(19_500, 20_000))  # the newest ones whole
