"""`pipeline train --out DIR`: a run directory's files count as a run's only when this program
wrote them (pipeline.train.RunDir), so neither a refused command nor ``--force`` removes or
writes over a user's file; and no run is written into (or inside) a Zarr store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import TrainingError
from pipeline.train import RunDir
from tests.pipeline.helpers import snapshot

TRAIN = ("--set", "epochs=1", "--set", "hidden=[8]", "--set", "validation=0.2", "-q")
RUN_FILES = ("config.toml", "checkpoint.npz", "model.npz", "history.json", "curves.png", "rounds.png", "throughput.png")


def pipeline(*args: str | Path) -> tuple[int, str]:
    """Run the command in this process: its exit status and the last line it wrote to stderr."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.exit_code, lines[-1] if lines else ""


def refused(*args: str | Path) -> str:
    """Run a command that must be refused with one ``error:`` line; that line."""
    code, line = pipeline(*args)
    assert code == 1 and line.startswith("error: "), (code, line)
    return line


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small store (trained in this process) and a finished run of it with its plots."""
    root = tmp_path_factory.mktemp("rundir")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        code, line = pipeline("synth", "s.zarr", "--rows", "2000", "--features", "4", "--classes", "3", "-q")
        assert code == 0, line
        code, line = pipeline(
            "train", "s.zarr", "--out", "run", "--plots", *TRAIN, "--set", "epochs=2"
        )  # 2 rounds: 3 plots
        assert code == 0, line
    finally:
        os.chdir(cwd)
    assert all((root / "run" / n).is_file() for n in RUN_FILES)
    return root


@pytest.fixture
def work(made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a copy of the store (``s.zarr``); the current directory."""
    shutil.copytree(made / "s.zarr", tmp_path / "s.zarr")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_run(made: Path, work: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(made / "run", work / name))


def users_project(work: Path) -> Path:
    """The new user's directory: their config, and files at names a run writes."""
    proj = work / "proj"
    proj.mkdir()
    (proj / "config.toml").write_text("[model]\nhidden = [8]\n# my notes\n")
    (proj / "curves.png").write_text("mine\n")
    (proj / "history.json").write_text('{"mine": 1}\n')
    return proj


# --------------------------------------------------------------------------------------------
# A user's files are never removed or written over
# --------------------------------------------------------------------------------------------


def test_a_users_files_at_run_names_survive_train_and_train_force(work: Path) -> None:
    users_project(work)
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "proj", "--config", "proj/config.toml", *TRAIN)
    assert "'proj' is not empty and holds no run" in line
    assert "config.toml, history.json and curves.png" in line and "move them out of 'proj'" in line
    assert "--force" not in line  # --force would not write over them: it is not offered
    assert snapshot(work) == before
    line = refused("train", "s.zarr", "--out", "proj", "--force", "--config", "proj/config.toml", *TRAIN)
    assert "holds config.toml, history.json and curves.png, which this program did not write" in line
    assert "move them out of 'proj', or choose another --out" in line
    assert snapshot(work) == before  # byte for byte, and nothing added (no lock file, no run)


@pytest.mark.parametrize("name", [*RUN_FILES, "clients.npz"])
def test_force_refuses_a_users_file_among_a_runs_files(made: Path, work: Path, name: str) -> None:
    run = copy_run(made, work)
    (run / name).unlink(missing_ok=True)
    (run / name).write_bytes(b"the user's own " + name.encode())
    # the plots are drawn from the history: beside a user's history.json they are not known as the run's
    shown = "history.json, curves.png, rounds.png and throughput.png" if name == "history.json" else name
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "run", "--force", *TRAIN)
    assert f"'run' holds {shown}, which this program did not write" in line and "move " in line
    assert snapshot(work) == before
    line = refused("train", "s.zarr", "--out", "run", *TRAIN)
    assert name in line and "--force" not in line
    assert snapshot(work) == before


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_link_or_a_directory_at_a_run_name_is_not_the_runs(made: Path, work: Path, kind: str) -> None:
    run = copy_run(made, work)
    (run / "model.npz").unlink()
    if kind == "symlink":  # writing through it would write over the user's file
        (work / "mine.npz").write_bytes((made / "run" / "model.npz").read_bytes())
        (run / "model.npz").symlink_to(work / "mine.npz")
    else:
        (run / "model.npz").mkdir()
        (run / "model.npz" / "notes.txt").write_text("mine\n")
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "run", "--force", *TRAIN)
    assert "'run' holds model.npz, which this program did not write" in line
    assert snapshot(work) == before


def test_force_writes_beside_other_files_and_keeps_them(work: Path) -> None:
    notes = work / "proj" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine\n")
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "proj", *TRAIN)
    assert "is not empty and holds no run" in line and "beside its files (they are kept" in line
    assert snapshot(work) == before
    code, line = pipeline("train", "s.zarr", "--out", "proj", "--force", *TRAIN)
    assert code == 0, line
    assert notes.read_text() == "mine\n"
    assert sorted(p.name for p in notes.parent.iterdir()) == [
        "checkpoint.npz",
        "config.toml",
        "history.json",
        "model.npz",
        "notes.txt",
    ]


def test_a_users_lock_file_is_not_taken(made: Path, work: Path) -> None:
    run = copy_run(made, work)
    (run / ".lock").write_text("my lock, not yours\n")
    before = snapshot(work)
    for extra in ((), ("--force",), ("--resume",)):
        line = refused("train", "s.zarr", "--out", "run", *extra, *TRAIN)
        assert "'run' holds .lock, which this program did not write" in line
        assert snapshot(work) == before


def test_the_api_refuses_a_users_files_too(work: Path) -> None:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    proj = users_project(work)
    before = snapshot(work)
    with pytest.raises(TrainingError, match="which this program did not write"):
        train("s.zarr", TrainConfig(epochs=1, hidden=[8]), proj, force=True)
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------------
# A run this program wrote is still overwritten with --force, and resumed with --resume
# --------------------------------------------------------------------------------------------


def test_force_still_overwrites_a_real_run_and_keeps_other_files(made: Path, work: Path) -> None:
    run = copy_run(made, work)
    (run / "notes.txt").write_text("mine\n")
    old = json.loads((run / "history.json").read_text())["job"]
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "run", *TRAIN)
    assert "'run' already holds a run; pass --resume to continue it, --force to overwrite it" in line
    assert snapshot(work) == before
    code, line = pipeline("train", "s.zarr", "--out", "run", "--force", *TRAIN)
    assert code == 0, line
    assert json.loads((run / "history.json").read_text())["job"] != old  # a new run's history
    after = snapshot(work)
    for name in ("checkpoint.npz", "model.npz", "history.json"):
        assert after[f"run/{name}"] != before[f"run/{name}"], name
    assert not any((run / n).exists() for n in ("curves.png", "rounds.png", "throughput.png"))  # the old run's
    assert (run / "notes.txt").read_text() == "mine\n"


def test_force_replaces_a_run_that_stopped_before_its_first_checkpoint(made: Path, work: Path) -> None:
    (work / "failed").mkdir()
    shutil.copy2(made / "run" / "config.toml", work / "failed" / "config.toml")
    line = refused("train", "s.zarr", "--out", "failed", *TRAIN)
    assert "holds a run that stopped before its first checkpoint (nothing to resume); pass --force" in line
    line = refused("train", "s.zarr", "--out", "failed", "--resume", *TRAIN)
    assert "holds the configuration of a run that stopped before its first checkpoint" in line
    assert RunDir(work / "failed").missing_model() is not None
    code, line = pipeline("train", "s.zarr", "--out", "failed", "--force", *TRAIN)
    assert code == 0, line
    assert (work / "failed" / "model.npz").is_file()


def test_a_users_config_is_no_failed_run(work: Path) -> None:
    proj = users_project(work)
    (proj / "history.json").unlink()
    (proj / "curves.png").unlink()
    line = refused("train", "s.zarr", "--out", "proj", "--resume", *TRAIN)
    assert "nothing to resume: 'proj/checkpoint.npz' does not exist" in line
    assert RunDir(proj).missing_model() is None  # evaluate/predict do not call it a failed run


def test_resume_still_works_and_refuses_to_write_over_a_users_file(work: Path) -> None:
    code, line = pipeline("train", "s.zarr", "--out", "run", *TRAIN)
    assert code == 0, line
    (work / "run" / "curves.png").write_text("mine\n")
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=2", "-q")
    assert "'run' holds curves.png, which this program did not write and the resumed run would write over" in line
    assert snapshot(work) == before
    (work / "run" / "curves.png").unlink()
    code, line = pipeline("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=2", "-q")
    assert code == 0, line
    history = json.loads((work / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]


# --------------------------------------------------------------------------------------------
# What counts as the program's file
# --------------------------------------------------------------------------------------------


def test_the_files_of_a_run_are_recognised(made: Path) -> None:
    run = RunDir(made / "run")
    assert all(run.written_here(n) for n in RUN_FILES)
    assert run.foreign_files() == []


def test_files_of_earlier_versions_are_recognised(tmp_path: Path) -> None:
    """The version-1 checkpoint kept in the tests, and a history.json with only the keys the
    first version wrote."""
    shutil.copy2(Path(__file__).with_name("checkpoint_v1.npz"), tmp_path / "checkpoint.npz")
    first = {"job": "run-0", "installed_by": "x", "best_epoch": 0, "stopped_early": False, "epochs": [], "rounds": []}
    (tmp_path / "history.json").write_text(json.dumps({**first, "round_columns": ["time"]}, indent=1))
    (tmp_path / "config.toml").write_text('# resolved training configuration\nhidden = [8]\nretired_key = "x"\n')
    with open(tmp_path / "clients.npz", "wb") as fh:  # as a run of simulated clients writes it
        np.savez(fh, n=np.zeros(3), loss=np.zeros(3), metric=np.zeros(3), round=np.int64(1))
    run = RunDir(tmp_path)
    assert [
        n for n in ("checkpoint.npz", "history.json", "config.toml", "clients.npz") if not run.written_here(n)
    ] == []


def test_look_alikes_are_not_the_programs(made: Path, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from pipeline.plots import save_plots

    run = RunDir(tmp_path)
    shutil.copy2(made / "run" / "model.npz", tmp_path / "checkpoint.npz")  # a model, not a checkpoint
    with open(tmp_path / "model.npz", "wb") as fh:
        np.savez(fh, params=np.zeros(3))  # an npz without the program's metadata
    header = "# resolved training configuration\n"
    (tmp_path / "config.toml").write_text(header + "[model]\nhidden = [8]\n")  # the header, then a user's TOML
    (tmp_path / "history.json").write_text(json.dumps({"job": "mine", "epochs": []}))
    Figure().savefig(tmp_path / "curves.png")  # a matplotlib PNG, but no history of a run beside it
    assert run.foreign_files() == ["config.toml", "checkpoint.npz", "model.npz", "history.json", "curves.png"]
    # beside a run's history the same PNG is still the user's: a plot of the run carries the run's job
    shutil.copy2(made / "run" / "history.json", tmp_path / "history.json")
    assert not run.written_here("curves.png")
    history = json.loads((tmp_path / "history.json").read_text())
    assert {p.name for p in save_plots(tmp_path, history)} == {"rounds.png", "throughput.png"}  # curves.png kept
    (tmp_path / "curves.png").unlink()
    assert {p.name for p in save_plots(tmp_path, history)} == {"curves.png", "rounds.png", "throughput.png"}
    assert all(run.written_here(n) for n in ("curves.png", "rounds.png", "throughput.png"))


# --------------------------------------------------------------------------------------------
# No run in a Zarr store
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--force",), ("--resume",)])
def test_no_run_is_written_into_or_inside_the_training_store(work: Path, extra: tuple[str, ...]) -> None:
    before = snapshot(work)
    line = refused("train", "s.zarr", "--out", "s.zarr", *extra, *TRAIN)
    assert "run directory 's.zarr' is a Zarr store (it holds zarr.json), not a place for a run" in line
    line = refused("train", "s.zarr", "--out", "s.zarr/X/run", *extra, *TRAIN)
    assert "run directory 's.zarr/X/run' lies inside the Zarr store 's.zarr'" in line
    assert snapshot(work) == before
    code, line = pipeline("synth", "s.zarr", "--rows", "100", "--features", "4", "--force", "-q")
    assert code == 0, line  # the store is still one `--force` replaces


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_no_run_is_written_into_a_zarr_group_or_array(work: Path, zarr_format: int) -> None:
    import zarr

    zarr.open_group(str(work / "pred.zarr"), mode="w", zarr_format=zarr_format)
    zarr.create_array(str(work / "a.zarr"), shape=(3,), dtype="f4", zarr_format=zarr_format)
    markers = (
        {"pred.zarr": "zarr.json", "a.zarr": "zarr.json"}
        if zarr_format == 3
        else {"pred.zarr": ".zgroup", "a.zarr": ".zarray"}
    )
    before = snapshot(work)
    for out, marker in markers.items():
        line = refused("train", "s.zarr", "--out", out, "--force", *TRAIN)
        assert f"'{out}' is a Zarr store (it holds {marker})" in line
        line = refused("train", "s.zarr", "--out", f"{out}/run", "--force", *TRAIN)
        assert f"'{out}/run' lies inside the Zarr store '{out}'" in line
    assert snapshot(work) == before
