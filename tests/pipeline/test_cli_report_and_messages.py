"""`pipeline train --report`, federated `epochs`, `pipeline runs`, ingest into an empty directory and
`--resume` of a run with nothing left to train: refused before any work, in one line, losing nothing."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import TrainConfig
from pipeline.store import open_store
from pipeline.synth import synth
from pipeline.train import train
from tests.pipeline.helpers import error_line, invoke, run_cli, snapshot

SMALL = ("--set", "epochs=1", "--set", "hidden=[8]", "--set", "patience=0")
LOCAL = ("--workers", "1", "--dashboard-address", "none")
REPORT_TITLE = "<title>Dask Performance Report</title>"
GOOD_CSV = "a,b,c\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n"


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(synth(tmp_path_factory.mktemp("store") / "s.zarr", rows=2000, features=4, classes=3, seed=0).path)


@pytest.fixture
def here(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding s.zarr (a copy of the module's store)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(store, tmp_path / "s.zarr")
    return tmp_path


# -- defect 1: --report never replaces what is not an earlier report -----------------------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("name", ["notes.txt", "other/model.npz"])
def test_an_existing_report_path_is_refused_unless_forced_over_a_report(here: Path, name: str, force: bool) -> None:
    target = here / name
    target.parent.mkdir(exist_ok=True)
    target.write_text("my notes, not a report\n")
    before = snapshot(here)
    r = invoke("train", "s.zarr", "--out", "run", "--report", name, *(["--force"] if force else []), *SMALL)
    line = error_line(r)
    if force:
        assert f"--report '{name}' exists and is not a Dask performance report" in line, line
    else:
        assert f"--report '{name}' exists; choose another --report path, or pass --force" in line, line
    assert "configuration:" not in r.stderr
    assert snapshot(here) == before  # nothing written, no run directory


def test_a_report_url_is_checked_as_a_local_path_is(here: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/reports/notes.html", b"<html><title>My notes</title></html>")
    fs.pipe("/reports/old.html", f"<html><head>{REPORT_TITLE}</head></html>".encode())
    try:
        for url, force, fragment in [
            ("memory://reports/notes.html", False, "exists; choose another --report path, or pass --force"),
            ("memory://reports/notes.html", True, "exists and is not a Dask performance report"),
            ("memory://reports", True, "is a directory"),
            ("nosuchprotocol://x/r.html", False, "cannot write --report 'nosuchprotocol://x/r.html': ValueError"),
        ]:
            r = invoke("train", "s.zarr", "--out", "run", "--report", url, *(["--force"] if force else []), *SMALL)
            assert fragment in error_line(r), url
        # an earlier report passes the check: refused here only by the unknown key, checked after it
        old = "memory://reports/old.html"
        r = invoke("train", "s.zarr", "--out", "run", "--report", old, "--force", "--set", "x=1")
        assert "unknown config key 'x'" in error_line(r)
        assert fs.cat("/reports/notes.html") == b"<html><title>My notes</title></html>"
        assert not (here / "run").exists()
    finally:
        fs.rm("/reports", recursive=True)


def test_force_replaces_an_earlier_report_even_gzipped_in_a_new_directory(here: Path) -> None:
    report = here / "reports" / "new" / "r.html.gz"  # its directories do not exist yet
    r = run_cli("train", "s.zarr", "--out", "run1", "--report", report, *SMALL, *LOCAL)
    assert r.returncode == 0, r.stderr
    first = report.read_bytes()
    assert REPORT_TITLE in gzip.decompress(first).decode()
    r = run_cli("train", "s.zarr", "--out", "run2", "--report", report, *SMALL, *LOCAL)
    assert r.returncode == 1 and "exists; choose another --report path" in r.stderr, r.stderr
    assert not (here / "run2").exists() and report.read_bytes() == first
    r = run_cli("train", "s.zarr", "--out", "run2", "--report", report, "--force", *SMALL, *LOCAL)
    assert r.returncode == 0, r.stderr
    assert report.read_bytes() != first and REPORT_TITLE in gzip.decompress(report.read_bytes()).decode()
    assert sorted(p.name for p in report.parent.iterdir()) == ["r.html.gz"]  # no temporary left
    assert (here / "run2" / "model.npz").is_file()


# -- defect 2: a bad --report path is refused before training, in one line ---------------------


@pytest.mark.parametrize(
    ("report", "fragment"),
    [
        ("s.zarr", "--report 's.zarr' is a directory; name a file, such as report.html"),
        ("run", "--report 'run' is the run directory (--out); name a file such as run/report.html"),
        ("run/model.npz", "--report 'run/model.npz' is 'model.npz' of the run directory 'run', which the run writes"),
        ("run/.lock", "is '.lock' of the run directory 'run', which the run writes"),
        ("notes.txt/r.html", "cannot write --report 'notes.txt/r.html': Not a directory"),
    ],
)
def test_a_bad_report_path_is_refused_before_training(here: Path, report: str, fragment: str) -> None:
    (here / "run").mkdir()
    (here / "notes.txt").write_text("notes\n")
    before = snapshot(here)
    r = invoke("train", "s.zarr", "--out", "run", "--force", "--report", report, *SMALL)
    assert fragment in error_line(r)
    assert "configuration:" not in r.stderr and snapshot(here) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("report", ["/proc/nope.html", "/proc/nope/r.html"])
def test_an_unwritable_report_location_is_refused_before_training(here: Path, report: str) -> None:
    r = invoke("train", "s.zarr", "--out", "run", "--report", report, *SMALL)
    line = error_line(r)
    assert line.startswith(f"error: cannot write --report '{report}': ") and "choose a writable location" in line
    assert not (here / "run").exists() and not Path("/proc/nope").exists()


def test_probing_the_report_directory_leaves_nothing_behind(here: Path) -> None:
    # the report's directories are made and removed again; the unknown key is refused after that
    r = invoke("train", "s.zarr", "--out", "run", "--report", "a/b/r.html", "--set", "epoch=3")
    assert "unknown config key 'epoch'" in error_line(r)
    assert sorted(p.name for p in here.iterdir()) == ["s.zarr"]


@pytest.fixture(scope="module")
def scheduler(client: Any) -> str:
    return str(client.scheduler.address)


def test_a_report_that_cannot_be_written_at_the_end_is_one_line_and_the_run_stays(
    here: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distributed

    def disk_full(self: Any, *exc: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distributed.performance_report, "__exit__", disk_full)
    # the store by its absolute path: the cluster's workers run elsewhere
    r = invoke("train", here / "s.zarr", "--out", "run", "--report", "r.html", "--scheduler", scheduler, "-q", *SMALL)
    line = error_line(r)
    assert "the run finished and its outputs are in 'run', but the performance report could not be written" in line
    assert "No space left on device" in line
    assert {"model.npz", "checkpoint.npz", "history.json"} <= {p.name for p in (here / "run").iterdir()}
    assert sorted(p.name for p in here.iterdir()) == ["run", "s.zarr"]  # no report, no temporary


def test_a_file_that_appears_at_the_report_path_during_the_run_is_kept(tmp_path: Path, client: Any) -> None:
    from pipeline.cli import _performance_report
    from pipeline.errors import TrainingError

    target = tmp_path / "r.html"
    with client.as_current(), pytest.raises(TrainingError, match="appeared during the run; it was left as it is"):
        with _performance_report(str(target), "run"):
            assert client.submit(sum, [1, 2]).result() == 3
            target.write_text("someone else's\n")
    assert target.read_text() == "someone else's\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


# -- defect 3: epochs is refused in a federated run, which trains rounds -----------------------


def test_epochs_in_a_simulated_federated_run_is_refused_naming_rounds(here: Path) -> None:
    r = invoke("train", "s.zarr", "--out", "run", "--set", "clients=2", "--set", "epochs=5")
    line = error_line(r)
    assert "config key 'epochs' = 5 does not apply to a federated run" in line and "--set rounds=5" in line
    assert not (here / "run").exists() and "dask dashboard" not in r.stderr


def test_epochs_in_a_federated_config_file_is_refused_naming_rounds(here: Path, store: Path) -> None:
    (here / "sites.toml").write_text(f'[sites.a]\nstore = "{store}"\n')
    (here / "fed.toml").write_text("epochs = 2\nrounds = 3\n")
    r = invoke("train", "--sites", "sites.toml", "--config", "fed.toml", "--out", "run")
    assert "config key 'epochs' = 2 does not apply to a federated run" in error_line(r)
    assert not (here / "run").exists() and "dask dashboard" not in r.stderr


def test_federated_runs_saved_with_epochs_still_resume(here: Path, store: Path, client: Any, scheduler: str) -> None:
    """Runs started before epochs was refused (or through the Python API) saved it: a resume that
    does not set it again continues; setting another value is refused."""
    cfg = TrainConfig(clients=1, epochs=2, rounds=1, hidden=[8])
    train(str(store), cfg, here / "sim", client=client)
    saved = json.loads((here / "sim" / "history.json").read_text())["epochs"]
    sim = here / "sim"  # absolute, as the store: the cluster's workers run elsewhere
    r = invoke("train", store, "--out", sim, "--resume", "--set", "epochs=3", "--scheduler", scheduler)
    assert "config key 'epochs' = 3 does not apply to a federated run" in error_line(r)
    r = invoke("train", store, "--out", sim, "--resume", "--set", "rounds=2", "--scheduler", scheduler, "-q")
    assert r.exit_code == 0, r.output
    resumed = json.loads((here / "sim" / "history.json").read_text())["epochs"]
    assert [e["round"] for e in resumed] == [0, 1] and resumed[0] == saved[0]


def test_a_sites_run_saved_with_epochs_still_resumes(here: Path, store: Path) -> None:
    from pipeline.connect import cluster_client

    (here / "sites.toml").write_text(f'[sites.a]\nstore = "{store}"\n')
    cfg = TrainConfig(sites=str(here / "sites.toml"), epochs=2, rounds=1, hidden=[8])
    with cluster_client(sites=["a"], dashboard_address=None) as c:
        train(None, cfg, here / "fed", client=c)
    r = run_cli("train", "--out", "fed", "--resume", "--set", "rounds=2", "-q", "--dashboard-address", "none")
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout)["rounds"] == 2


# -- defect 4: `pipeline runs` of a missing directory, a file, a run directory ------------------


@pytest.fixture(scope="module")
def finished_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs trained in this process (model, history, checkpoint)."""
    out = tmp_path_factory.mktemp("runs") / "runs" / "a"
    train(str(store), TrainConfig(epochs=2, hidden=[8], patience=0), out, client=None)
    return out


def test_runs_of_a_missing_directory_or_a_file_is_an_error(tmp_path: Path) -> None:
    line = error_line(invoke("runs", tmp_path / "nonexist"))
    assert f"directory '{tmp_path / 'nonexist'}' does not exist" in line
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file, not a directory" in error_line(invoke("runs", tmp_path / "notes.txt", "--json"))


def test_runs_of_a_run_directory_lists_that_run(finished_run: Path, tmp_path: Path) -> None:
    r = invoke("runs", finished_run, "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["run"] == str(finished_run) and row["epochs"] == 2
    table = invoke("runs", finished_run).stdout.splitlines()
    assert len(table) == 2 and table[1].split()[:2] == [str(finished_run), "2"]
    assert json.loads(invoke("runs", finished_run.parent, "--json").stdout) == [row]  # its parent lists it too
    # an interrupted run: its checkpoint, no model or history: said so, with how to finish it
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("checkpoint.npz", "config.toml"):
        (cut / name).write_bytes((finished_run / name).read_bytes())
    r = invoke("runs", cut)
    assert r.exit_code == 0 and "holds an interrupted run (checkpoint after 2 epoch(s)" in r.stdout, r.output
    assert json.loads(invoke("runs", cut, "--json").stdout) == []
    # interrupted in its first epoch: no best model to write yet, so only resuming is offered
    from pipeline.checkpoint import load_file, save_file

    arrays, meta = load_file(cut / "checkpoint.npz", "checkpoint")
    for key in ("kind", "format_version", "sha256"):
        meta.pop(key)
    save_file(cut / "checkpoint.npz", "checkpoint", arrays, {**meta, "epoch": 0, "history": []})
    out = invoke("runs", cut).stdout
    assert f"run directory '{cut}' holds a run interrupted in its first epoch (no model.npz); continue it" in out, out
    assert "--set epochs=" not in out
    (tmp_path / "empty").mkdir()
    assert invoke("runs", tmp_path / "empty").stdout.strip() == f"no runs in '{tmp_path / 'empty'}'"


# -- defect 5: ingest fills an empty directory without --force ---------------------------------


def test_ingest_fills_an_empty_directory_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text(GOOD_CSV)
    (tmp_path / "emptyout").mkdir()
    r = invoke("ingest", "data.csv", "emptyout", "-q")
    assert r.exit_code == 0, r.output
    assert open_store("emptyout").n_rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "emptyout"]
    # now it holds a store: refused without --force, as any store is
    assert "store 'emptyout' exists; pass --force to overwrite" in error_line(invoke("ingest", "data.csv", "emptyout"))


def test_synth_fills_an_empty_directory_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline synth` takes an empty directory as ingest does; one holding a file stays refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptyout").mkdir()
    r = invoke("synth", "emptyout", "--rows", "50", "--features", "3", "--classes", "2", "-q")
    assert r.exit_code == 0, r.output
    assert open_store("emptyout").n_rows == 50
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    line = error_line(invoke("synth", "docs", "--rows", "50", "--features", "3", "--classes", "2", "--force"))
    assert "notes.txt" in line and (tmp_path / "docs" / "notes.txt").read_text() == "mine"


def test_a_failed_ingest_leaves_the_empty_directory_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import IngestError
    from pipeline.store import StoreWriter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text(GOOD_CSV)
    (tmp_path / "emptyout").mkdir()
    inode = os.stat("emptyout").st_ino

    def fail(self: StoreWriter, X: Any, y: Any) -> None:
        assert Path(self.tmp).is_dir()  # the store was being written
        raise IngestError("injected failure while writing")

    monkeypatch.setattr(StoreWriter, "append", fail)
    assert "injected failure while writing" in error_line(invoke("ingest", "data.csv", "emptyout"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "emptyout"]
    assert list((tmp_path / "emptyout").iterdir()) == [] and os.stat("emptyout").st_ino == inode


def test_other_existing_destinations_are_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.csv").write_text(GOOD_CSV)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "work").mkdir()
    before = snapshot(tmp_path)
    line = error_line(invoke("ingest", tmp_path / "data.csv", tmp_path / "docs"))
    assert "it holds notes.txt, which no store of this program holds" in line
    assert "is a symbolic link" in error_line(invoke("ingest", tmp_path / "data.csv", tmp_path / "link"))
    monkeypatch.chdir(tmp_path / "work")  # the working directory, empty: replacing it would delete it
    assert "store '.' exists; pass --force" in error_line(invoke("ingest", tmp_path / "data.csv", "."))
    assert snapshot(tmp_path) == before


# -- defect 6: --resume with nothing left to train --------------------------------------------


def test_resume_with_no_epochs_left_is_refused_and_loses_nothing(finished_run: Path, tmp_path: Path, store: Path):
    run = tmp_path / "run"
    run.mkdir()
    for p in finished_run.iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    before = snapshot(run)
    for extra in (("--set", "epochs=1"), ()):  # fewer epochs, or as many as it has
        line = error_line(invoke("train", store, "--out", run, "--resume", *extra))
        assert f"run directory '{run}' already has 2 epoch(s) and their model, so epochs = " in line, line
        assert line.endswith("trains nothing; to train more, resume with --set epochs=N, N > 2")
    assert snapshot(run) == before
    # an interrupted run (no model): told so, and the model of its best epoch is written
    (run / "model.npz").unlink()
    (run / "history.json").unlink()
    r = invoke("train", store, "--out", run, "--resume", "--set", "epochs=1", "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == ""  # -q: only the final line
    assert last_json(r.stdout)["epochs"] == 2 and (run / "model.npz").is_file()
    (run / "model.npz").unlink()
    r = invoke("train", store, "--out", run, "--resume", "--set", "epochs=2")
    assert r.exit_code == 0, r.output
    assert (
        f"run directory '{run}' already has 2 epoch(s) and epochs = 2: nothing is trained, the model of its best "
        "epoch so far is written; to train more, resume with --set epochs=N, N > 2"
    ) in r.stderr
    # and more epochs train
    r = invoke("train", store, "--out", run, "--resume", "--set", "epochs=3", "-q")
    assert r.exit_code == 0, r.output
    assert [e["epoch"] for e in json.loads((run / "history.json").read_text())["epochs"]] == [0, 1, 2]


def test_resume_of_a_federated_run_with_no_rounds_left_is_refused(
    store: Path, client: Any, scheduler: str, tmp_path: Path
) -> None:
    """Simulated clients count rounds: a resume asking for no more of them than the run has is
    refused as an epoch run's is (it would only rewrite the run's model and history)."""
    run = tmp_path / "fed"
    cfg = TrainConfig(hidden=[8], clients=3, rounds=2, patience=0)
    train(str(store), cfg, run, client=client)
    before = snapshot(run)
    for extra in (("--set", "rounds=1"), ()):
        line = error_line(invoke("train", store, "--out", run, "--resume", "--scheduler", scheduler, *extra))
        assert f"run directory '{run}' already has 2 round(s) and their model, so rounds = " in line, line
        assert line.endswith("trains nothing; to train more, resume with --set rounds=N, N > 2")
    assert snapshot(run) == before
    r = invoke("train", store, "--out", run, "--resume", "--scheduler", scheduler, "--set", "rounds=3", "-q")
    assert r.exit_code == 0, r.output
    assert [e["round"] for e in json.loads((run / "history.json").read_text())["epochs"]] == [0, 1, 2]


def test_a_scheduler_without_the_preload_is_said_to_have_no_training_page(here: Path) -> None:
    """The parameter server a driver installs as a plugin works, but only the preload puts
    /pipeline on the dashboard: the command does not point at a page that is not there."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc:
        r = invoke("train", "s.zarr", "--out", "run", "--scheduler", lc.scheduler_address, "--set", "epochs=1")
    assert r.exit_code == 0, r.output
    assert "(no training page: the scheduler was started without --preload pipeline.ps)" in r.stderr, r.stderr
    assert "training page: /pipeline" not in r.stderr
    assert json.loads((here / "run" / "history.json").read_text())["installed_by"] == "plugin"


def test_a_federated_run_with_dp_prints_epsilon_each_round_and_at_the_end(
    store: Path, client: Any, scheduler: str, tmp_path: Path
) -> None:
    """As an epoch run does (docs/privacy.md): each round's line and the final line carry the
    privacy spent."""
    r = invoke(
        "train",
        store,
        "--out",
        tmp_path / "dp",
        "--scheduler",
        scheduler,
        "--set",
        "clients=4",
        "--set",
        "rounds=2",
        "--set",
        "hidden=[8]",
        "--set",
        "dp=central",
        "--set",
        "noise_multiplier=2",
    )
    assert r.exit_code == 0, r.output
    rounds = [ln for ln in r.stderr.splitlines() if ln.startswith("round ") and "train_loss" in ln]
    assert len(rounds) == 2 and all("  epsilon " in ln for ln in rounds), r.stderr
    final = last_json(r.stdout)
    assert final["epsilon"] > 0 and final["dp_delta"] == 1e-5
    from pipeline.cli import _round_line

    line = _round_line({"round": 0, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "epsilon": 2.5})
    assert line.endswith("epsilon 2.5")


def test_the_event_loop_s_report_of_an_interrupted_dask_call_is_filtered_and_nothing_else() -> None:
    """distributed's ``sync()``, interrupted by Ctrl-C before its coroutine started, makes the
    event loop log a NameError from its cancel callback: the command drops that report (the
    interrupt is handled), and keeps every other error of the loop."""
    import functools
    import logging
    import sys

    from pipeline.cli import _not_an_interrupted_sync

    def sync() -> Any:
        future: Any

        def cancel() -> Any:
            return future  # noqa: F821 - unassigned, as in distributed.utils.sync

        return cancel

    cancel = sync()
    try:
        cancel()
    except NameError:
        interrupted = sys.exc_info()
    try:
        raise ValueError("a real error")
    except ValueError:
        other = sys.exc_info()

    def record(callback: Any, exc_info: Any) -> logging.LogRecord:
        return logging.LogRecord(
            "tornado.application", logging.ERROR, __file__, 1, "Exception in callback %r", (callback,), exc_info
        )

    assert not _not_an_interrupted_sync(record(functools.partial(cancel), interrupted))
    assert _not_an_interrupted_sync(record(functools.partial(cancel), other))
    assert _not_an_interrupted_sync(record(functools.partial(print), interrupted))
