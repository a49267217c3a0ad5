"""Run directories as a new user breaks them: a user's image at a plot's name, `pipeline runs` over
a mix of runs, `--resume` with another model config or other data, an `--out` that cannot be
made. Each is refused (or listed) in one line, and nothing of the user's is written over."""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import TrainConfig
from pipeline.synth import synth
from pipeline.train import RunDir, train
from tests.pipeline.helpers import error_line, invoke, snapshot

SMALL = ("--set", "epochs=1", "--set", "hidden=[8]", "--set", "patience=0", "-q")


def users_png(path: Path) -> None:
    """An image a user drew with matplotlib and saved at ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([1, 2, 3], [3, 1, 2])
    fig.savefig(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stores of one layout (``s.zarr``, ``other.zarr``: other rows) and a finished run of
    ``s.zarr`` with its plots (``run``), trained in this process."""
    root = tmp_path_factory.mktemp("audit")
    synth(root / "s.zarr", rows=2000, features=4, classes=3, seed=0)
    synth(root / "other.zarr", rows=1000, features=4, classes=3, seed=1)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        r = invoke("train", "s.zarr", "--out", "run", "--plots", *SMALL, "--set", "epochs=2")
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    assert {"curves.png", "rounds.png", "throughput.png"} <= {p.name for p in (root / "run").iterdir()}
    return root


@pytest.fixture
def work(made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory: copies of the stores and of the run."""
    for name in ("s.zarr", "other.zarr", "run"):
        shutil.copytree(made / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------
# A user's image at a plot's name is not the run's plot
# --------------------------------------------------------------------------------------------


def test_a_users_matplotlib_image_at_a_plot_name_is_kept(work: Path) -> None:
    """matplotlib draws most users' images too: a PNG it saved is not the run's plot unless the
    run marked it, so --force, --resume --plots and save_plots leave the user's file alone."""
    from pipeline.plots import save_plots

    run = RunDir(work / "run")
    assert run.foreign_files() == []  # the run's own plots are known as its own
    users_png(work / "run" / "curves.png")
    assert run.foreign_files() == ["curves.png"]
    before = snapshot(work)
    line = error_line(invoke("train", "s.zarr", "--out", "run", "--force", "--plots", *SMALL))
    assert "'run' holds curves.png, which this program did not write and a run writes" in line
    line = error_line(invoke("train", "s.zarr", "--out", "run", "--resume", "--plots", *SMALL, "--set", "epochs=3"))
    assert "'run' holds curves.png, which this program did not write and the resumed run would write over" in line
    assert snapshot(work) == before
    history = json.loads((work / "run" / "history.json").read_text())
    assert {p.name for p in save_plots(work / "run", history)} == {"rounds.png", "throughput.png"}
    assert snapshot(work)["run/curves.png"] == before["run/curves.png"]
    # a plot another run drew (copied here) is not this run's either
    other = json.loads((work / "run" / "history.json").read_text())
    (work / "elsewhere").mkdir()
    save_plots(work / "elsewhere", {**other, "job": "run-another"})
    shutil.copy2(work / "elsewhere" / "rounds.png", work / "run" / "rounds.png")
    assert run.foreign_files() == ["curves.png", "rounds.png"]


def test_an_interrupted_plot_leaves_no_partial_file(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a plot is saved: no half-written PNG at its name, no temporary beside it."""
    from matplotlib.figure import Figure

    from pipeline.plots import save_plots

    for name in ("curves.png", "rounds.png", "throughput.png"):
        (work / "run" / name).unlink()

    def interrupted(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100  # the first bytes of the image, then Ctrl-C
        if hasattr(fname, "write"):
            fname.write(data)
        else:
            Path(fname).write_bytes(data)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    history = json.loads((work / "run" / "history.json").read_text())
    with pytest.raises(KeyboardInterrupt):
        save_plots(work / "run", history)
    assert sorted(p.name for p in (work / "run").iterdir()) == [
        "checkpoint.npz",
        "config.toml",
        "history.json",
        "model.npz",
    ]


def test_a_plot_killed_mid_save_leaves_no_temporary_after_the_next_drawing(work: Path) -> None:
    """A process killed (SIGKILL) while it saves a plot leaves its temporary beside the run's
    files: the next drawing of the run removes it (it stayed for good), and keeps a user's
    file of a like name."""
    import subprocess
    import sys

    run = work / "run"
    for name in ("curves.png", "rounds.png", "throughput.png"):
        (run / name).unlink()
    killed = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from matplotlib.figure import Figure
        from pipeline.plots import save_plots

        def killed(self, fname, *args, **kwargs):
            fname.write(b"\\x89PNG")
            fname.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        Figure.savefig = killed
        run = Path({str(run)!r})
        save_plots(run, json.loads((run / "history.json").read_text()))
        """
    )
    done = subprocess.run([sys.executable, "-c", killed], capture_output=True, cwd=Path(__file__).parents[2])
    assert done.returncode == -9, done.stderr.decode()
    left = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".curves.png."), left
    (run / ".curves.png.mine.tmp").write_text("a user's")
    from pipeline.plots import save_plots

    assert save_plots(run, json.loads((run / "history.json").read_text()))
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == [".curves.png.mine.tmp"]


# --------------------------------------------------------------------------------------------
# `pipeline runs` over a mix of runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Any:
    from pipeline.connect import cluster_client

    with cluster_client(workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def fed_run(made: Path, client: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 3 simulated clients over 2 rounds."""
    out = tmp_path_factory.mktemp("fed") / "fed"
    train(str(made / "s.zarr"), TrainConfig(clients=3, rounds=2, hidden=[8], patience=0), out, client=client)
    return out


def test_runs_lists_epoch_and_federated_runs_in_their_units(work: Path, fed_run: Path) -> None:
    runs = work / "runs"
    runs.mkdir()
    shutil.copytree(work / "run", runs / "ep")
    shutil.copytree(fed_run, runs / "fed")
    shutil.copytree(work / "run", runs / "group" / "nested")  # runs kept in subdirectories
    (runs / "notes").mkdir()
    (runs / "notes" / "history.json").write_text('{"mine": 1}\n')  # a user's file: no run
    (runs / "damaged").mkdir()
    for name in ("checkpoint.npz", "config.toml", "model.npz"):
        shutil.copy2(work / "run" / name, runs / "damaged" / name)
    (runs / "damaged" / "history.json").write_text('{"job": "run-1", "epo')  # cut short
    (runs / "cut").mkdir()  # interrupted: a checkpoint, no model or history
    for name in ("checkpoint.npz", "config.toml"):
        shutil.copy2(fed_run / name, runs / "cut" / name)
    r = invoke("runs", "runs", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["run"]: row for row in json.loads(r.stdout)}
    assert sorted(rows) == ["runs/ep", "runs/fed", "runs/group/nested"]
    assert rows["runs/ep"]["epochs"] == 2 and rows["runs/ep"]["best_epoch"] == 1
    history = json.loads((fed_run / "history.json").read_text())
    assert rows["runs/fed"]["rounds"] == 2 and "epochs" not in rows["runs/fed"]
    assert rows["runs/fed"]["best_round"] == history["best_epoch"]
    notes = r.stderr.splitlines()
    assert len(notes) == 2
    assert notes[0].startswith("run directory 'runs/cut' holds an interrupted run (checkpoint after 2 round(s)")
    assert notes[1].startswith("run directory 'runs/damaged' is not listed: its history.json is damaged")
    table = invoke("runs", "runs").stdout.splitlines()
    assert table[0].split() == ["run", "trained", "best", "val_loss", "val_metric", "samples/s"]
    assert table[1].split()[:4] == ["runs/ep", "2", "epochs", "2"]
    assert table[2].split()[:3] == ["runs/fed", "2", "rounds"]
    assert table[4:] == notes
    # one federated run alone: its count is headed rounds
    table = invoke("runs", "runs/fed").stdout.splitlines()
    assert table[0].split()[:2] == ["run", "rounds"] and table[1].split()[:2] == ["runs/fed", "2"]
    # a directory holding only a user's history.json holds no run
    assert invoke("runs", "runs/notes").stdout.strip() == "no runs in 'runs/notes'"
    assert json.loads(invoke("runs", "runs/notes", "--json").stdout) == []


def test_force_over_a_federated_run_removes_its_clients_metrics(work: Path, fed_run: Path) -> None:
    """clients.npz holds the simulated clients' metrics of the run that wrote it: beside a new
    epoch run it would describe a model that is gone. A user's file of that name is still kept."""
    shutil.copytree(fed_run, work / "fed")
    (work / "fed" / "notes.txt").write_text("mine\n")
    r = invoke("train", "s.zarr", "--out", "fed", "--force", *SMALL)
    assert r.exit_code == 0, r.output
    assert not (work / "fed" / "clients.npz").exists()
    assert (work / "fed" / "notes.txt").read_text() == "mine\n"
    assert json.loads((work / "fed" / "history.json").read_text())["epochs"][0]["epoch"] == 0


def test_an_interrupted_federated_run_is_explained_in_rounds(work: Path, fed_run: Path) -> None:
    """The command it suggests is one a federated run takes (`--set epochs=` is refused there)."""
    cut = work / "cut"
    cut.mkdir()
    for name in ("checkpoint.npz", "config.toml"):
        shutil.copy2(fed_run / name, cut / name)
    why = RunDir(cut).missing_model()
    assert why is not None and "(checkpoint after 2 round(s), no model.npz)" in why
    assert why.endswith("write the model of its best round so far with `... --resume --set rounds=2`")
    line = error_line(invoke("evaluate", "cut", "s.zarr"))
    assert "holds an interrupted run (checkpoint after 2 round(s)" in line


def test_the_final_line_of_simulated_clients_counts_rounds(work: Path, client: Any) -> None:
    """As a --sites run's final line does: a federated model's round, not an 'epoch'."""
    r = invoke(
        "train", work / "s.zarr", "--out", work / "sim", "--scheduler", client.scheduler.address,
        "--set", "clients=2", "--set", "rounds=2", "--set", "hidden=[8]", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    final = json.loads(r.stdout.strip().splitlines()[-1])
    history = json.loads((work / "sim" / "history.json").read_text())
    assert final["rounds"] == 2 and final["best_round"] == history["best_epoch"]
    assert "epochs" not in final and "best_epoch" not in final
    (row,) = json.loads(invoke("runs", work / "sim", "--json").stdout)
    assert row["rounds"] == final["rounds"] and row["best_round"] == final["best_round"]
    assert row["val_loss"] == final["val_loss"]


# --------------------------------------------------------------------------------------------
# --resume with another model config or on other data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("hidden=[16]", "was trained with hidden = [8], not [16]; resume with --set hidden=[8]"),
        ("activation=tanh", "was trained with activation = 'relu', not 'tanh'; resume with --set activation=relu"),
    ],
)
def test_resume_with_another_model_config_names_the_setting(work: Path, change: str, fragment: str) -> None:
    before = snapshot(work)
    line = error_line(invoke("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=3", "--set", change))
    assert fragment in line, line
    assert snapshot(work) == before


def test_resume_on_other_data_is_refused(work: Path) -> None:
    """Another store of the same layout, or the run's store ingested again with other rows: the
    saved model would pair weights trained on one with the other's statistics."""
    before = snapshot(work)
    line = error_line(invoke("train", "other.zarr", "--out", "run", "--resume", "--set", "epochs=3", "-q"))
    assert "checkpoint 'run/checkpoint.npz' was trained on other data: the row count, feature means" in line, line
    assert "of 'other.zarr' differ (2,000 rows, now 1,000)" in line
    assert "resume with the store it started with ('s.zarr')" in line
    assert snapshot(work) == before
    synth(work / "s.zarr", rows=1500, features=4, classes=3, seed=3, force=True)  # the store made again
    before = snapshot(work)
    line = error_line(invoke("train", "s.zarr", "--out", "run", "--resume", "--set", "epochs=3", "-q"))
    assert "was trained on other data" in line and "resume with the data it started with" in line, line
    assert snapshot(work) == before
    # on the data it was trained on, it resumes
    shutil.rmtree(work / "s.zarr")
    shutil.copytree(work / "other.zarr", work / "o2.zarr")
    r = invoke("train", "o2.zarr", "--out", "fresh", *SMALL)
    assert r.exit_code == 0, r.output
    r = invoke("train", "o2.zarr", "--out", "fresh", "--resume", "--set", "epochs=2", "-q")
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------
# An --out that cannot be made
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["notes.txt/run", "notes.txt/a/run"])
def test_out_under_a_file_is_one_line(work: Path, out: str) -> None:
    (work / "notes.txt").write_text("mine\n")
    before = snapshot(work)
    for extra in ((), ("--force",)):
        line = error_line(invoke("train", "s.zarr", "--out", out, *extra, *SMALL))
        assert line == f"error: cannot create run directory '{out}': 'notes.txt' is a file; choose another --out"
    assert snapshot(work) == before


def test_out_in_a_read_only_directory_is_one_line(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is created, no traceback. Root writes anywhere: for root the directory refuses new
    entries as a read-only one does for everyone else (os.mkdir fails with EACCES)."""
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    cases = [("ro/run", "error: cannot create run directory 'ro/run': Permission denied (in 'ro'); choose an --out")]
    if os.geteuid() == 0:
        real_mkdir = os.mkdir

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if Path(os.path.abspath(path)).parent == work / "ro":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:  # an existing read-only directory: its lock file cannot be made
        cases.append(("ro", "error: cannot write in run directory 'ro': Permission denied; make it writable, or"))
    before = snapshot(work)
    try:
        for out, expected in cases:
            for extra in ((), ("--force",)):
                line = error_line(invoke("train", "s.zarr", "--out", out, *extra, *SMALL))
                assert line.startswith(expected), line
        assert snapshot(work) == before
    finally:
        (work / "ro").chmod(0o755)


def test_a_runs_files_are_as_readable_as_the_users_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model, the checkpoint and the plots are written through a temporary file and renamed
    into place; they get the mode a file made now gets (0o666 less the umask), not mkstemp's 0600."""
    synth(tmp_path / "s.zarr", rows=600, features=4, classes=3, seed=0)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        r = invoke("train", "s.zarr", "--out", "run", "--plots", *SMALL)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {"model.npz", "checkpoint.npz", "curves.png", "history.json"} <= set(modes), modes
    assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()}


def test_a_models_metrics_are_those_of_the_epoch_its_weights_are_from(tmp_path: Path) -> None:
    """The model keeps the best validation epoch's weights; the metrics saved with it are that
    epoch's too (what `pipeline runs` and the final line show), not the last epoch's."""
    from pipeline.model import load_model

    synth(tmp_path / "b.zarr", rows=600, features=8, classes=3, seed=0)
    cfg = TrainConfig().with_overrides(["epochs=8", "patience=0", "hidden=[64]", "lr=0.05", "ema=0"])
    train(str(tmp_path / "b.zarr"), cfg, tmp_path / "run", client=None)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    best = history["best_epoch"]
    assert best != history["epochs"][-1]["epoch"], "this run's best epoch is its last: the test proves nothing"
    metrics = load_model(tmp_path / "run").metrics
    assert metrics["epoch"] == best and metrics["val_loss"] == history["epochs"][best]["val_loss"]
