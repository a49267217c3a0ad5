"""`pipeline train` on a small store trains in its own process unless a cluster is asked for."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import load_file
from pipeline.model import load_model
from pipeline.store import open_store
from tests.pipeline.helpers import CLI, cli_env, read_until, run_cli

# the command, with starting a cluster made an error: an in-process run must never start one
NO_CLUSTER = (
    "import sys, pipeline.connect as c\n"
    "def refuse(*a, **k):\n"
    "    raise SystemExit('a Dask cluster was started')\n"
    "c.cluster_client = refuse\n"
    "from pipeline.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
SMALL = ("--set", "hidden=[16]", "--set", "patience=0")


def command(*args: str, cluster: bool = True) -> list[str]:
    if cluster:
        return [*CLI, *args]
    return [sys.executable, "-c", NO_CLUSTER, *args]


def run(*args: str, cluster: bool = True) -> subprocess.CompletedProcess:
    if cluster:
        return run_cli(*args)
    return subprocess.run(command(*args, cluster=False), capture_output=True, text=True, timeout=300, env=cli_env())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from pipeline.synth import synth

    return synth(tmp_path_factory.mktemp("local") / "s.zarr", rows=3000, features=6, classes=3, seed=0).path


def test_a_small_store_trains_in_process_and_its_model_evaluates(store, tmp_path):
    out = tmp_path / "run"
    r = run(
        "train",
        store,
        "--out",
        str(out),
        "--set",
        "epochs=3",
        "--set",
        "lr=0.01",
        "--set",
        "ema=0",
        *SMALL,
        cluster=False,
    )
    assert r.returncode == 0, r.stderr
    assert "training in this process: 3,000 rows, under cluster_min_rows = 100,000" in r.stderr
    assert "dask dashboard" not in r.stderr
    assert {"model.npz", "history.json", "checkpoint.npz", "config.toml"} <= {p.name for p in out.iterdir()}
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert history["installed_by"] == "this process (no cluster)"
    assert len(history["rounds"]) == history["epochs"][-1]["rounds"] > 0
    model = load_model(out)
    st = open_store(store)
    accuracy = float(np.mean(model.predict_index(st.X[:]) == st.y[:]))
    assert accuracy > 0.6  # learned: 3 classes
    r = run("evaluate", str(out), store, "--json", "--workers", "1", "--dashboard-address", "none")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_in_process_equals_a_one_worker_cluster_and_resumes_in_process(store, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    r = run("train", store, "--out", str(local), "--set", "epochs=2", *SMALL, cluster=False)
    assert r.returncode == 0, r.stderr
    r = run(
        "train",
        store,
        "--out",
        str(cluster),
        "--set",
        "epochs=2",
        *SMALL,
        "--workers",
        "1",
        "--dashboard-address",
        "none",
    )
    assert r.returncode == 0, r.stderr
    assert "training in this process" not in r.stderr and "dask dashboard" in r.stderr
    assert json.loads((cluster / "history.json").read_text())["installed_by"] != "this process (no cluster)"
    a, meta_a = load_file(local / "checkpoint.npz", "checkpoint")
    b, meta_b = load_file(cluster / "checkpoint.npz", "checkpoint")
    assert meta_a["in_process"] and not meta_b["in_process"]
    assert sorted(a) == sorted(b)
    for key in a:  # the same weights, optimizer states and average, bit for bit
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    val = [[e["val_loss"] for e in json.loads((d / "history.json").read_text())["epochs"]] for d in (local, cluster)]
    assert val[0] == val[1]  # validated on the same rows with the same weights
    # --resume continues in this process (no cluster flag needed)
    r = run("train", store, "--out", str(local), "--resume", "--set", "epochs=3", cluster=False)
    assert r.returncode == 0, r.stderr
    assert "training in this process, as the run being resumed did" in r.stderr
    history = json.loads((local / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]


def test_sigterm_in_process_writes_a_checkpoint_that_resumes(store, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command("train", store, "--out", str(out), "--set", "epochs=5000", *SMALL, cluster=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        read_until(proc.stderr, "epoch   2")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest[1]
    assert "interrupted (SIGTERM)" in rest[1]
    _, meta = load_file(out / "checkpoint.npz", "checkpoint")
    assert meta["epoch"] >= 2 and not (out / "model.npz").exists()
    r = run("train", store, "--out", str(out), "--resume", "--set", f"epochs={meta['epoch'] + 1}", cluster=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == meta["epoch"] + 1
    assert (out / "model.npz").exists()


def test_api_without_client_trains_in_process(store, tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.train import train

    res = train(store, TrainConfig(hidden=[8], epochs=2, patience=0), tmp_path / "run")
    assert len(res.history) == 2 and res.installed_by == "this process (no cluster)"
    assert Path(res.run_dir, "model.npz").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ("--set", "mode=async"),
        ("--set", "batch_size=0"),
        ("--set", "compression=int8"),
        ("--set", "compression=fp16", "--set", "compress_replies=true"),
        ("--set", "overlap=true", "--set", "server_optimizer=adam"),
        (
            "--set",
            "overlap=true",
            "--set",
            "overlap_steps=8",
            "--set",
            "local_steps=4",
            "--set",
            "server_optimizer=momentum",
        ),
    ],
)
def test_other_modes_in_process_equal_a_one_worker_cluster(store, tmp_path, extra):
    # async: one task after another (each its own shuffle), not one share; full batch: one step;
    # compressed deltas with error feedback, and replies compressed too (the weights the
    # share trains from are the server's common weights, not its own float32 ones); overlap
    # (the reply folded in a step after the push, or at the next push)
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    assert run("train", store, "--out", str(local), "--set", "epochs=2", *SMALL, *extra, cluster=False).returncode == 0
    r = run(
        "train",
        store,
        "--out",
        str(cluster),
        "--set",
        "epochs=2",
        *SMALL,
        *extra,
        "--workers",
        "1",
        "--dashboard-address",
        "none",
    )
    assert r.returncode == 0, r.stderr
    a, _ = load_file(local / "checkpoint.npz", "checkpoint")
    b, _ = load_file(cluster / "checkpoint.npz", "checkpoint")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# the whole in-process command, then what it imported: no Dask cluster machinery at all, and
# matplotlib only when the plots are asked for
NO_DISTRIBUTED = (
    "import sys\n"
    "from pipeline.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'distributed', 'bokeh', 'tornado', 'matplotlib'})\n"
    "print('imported:', ','.join(loaded))\n"
    "sys.exit(code)\n"
)
PLOTS = ("curves.png", "rounds.png", "throughput.png")


def test_training_in_process_never_imports_distributed_and_plots_when_asked(store, tmp_path):
    def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = ("train", store, "--out", str(out), "--set", "epochs=2", *SMALL, *extra)
        return subprocess.run(
            [sys.executable, "-c", NO_DISTRIBUTED, *args], capture_output=True, text=True, timeout=300, env=cli_env()
        )

    out = tmp_path / "run"
    r = train(out, "--plots")
    assert r.returncode == 0, r.stderr
    assert "imported: matplotlib\n" in r.stdout, r.stdout
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000, name
    r = train(out, "--force")  # again over that run, without plots
    assert r.returncode == 0, r.stderr
    assert "training in this process" in r.stderr
    assert "imported: \n" in r.stdout, r.stdout
    for name in ("model.npz", "history.json", "checkpoint.npz"):
        assert (out / name).stat().st_size > 0, name
    assert not any((out / name).exists() for name in PLOTS)  # not asked for: none, and not the earlier run's


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def test_blas_threads_sets_the_blas_threads_of_training_in_this_process(store, tmp_path):
    """``blas_threads``: the BLAS threads an in-process run trains with (1 by default, as in a
    worker); with more, the validation pass forwards on one thread and BLAS uses the cores. The
    process's own setting is back once the run ends."""
    from pipeline.config import TrainConfig
    from pipeline.local import LocalTrainer

    seen: list[int] = []

    class Watched(LocalTrainer):
        def _run_epoch(self, *args, **kwargs):
            seen.append(_blas_threads())
            return super()._run_epoch(*args, **kwargs)

    available = _blas_threads()
    for n, eval_threads in ((1, 2), (2, 1)):
        seen.clear()
        cfg = TrainConfig(hidden=[8], epochs=2, patience=0, blas_threads=n)
        trainer = Watched(store, cfg, tmp_path / f"r{n}", None)
        trainer.fit()
        assert seen == [min(n, available)] * 2
        assert len(trainer._eval_trainers) == eval_threads
        assert _blas_threads() == available


def test_validation_rows_are_read_on_a_thread_during_the_first_epoch(store, tmp_path):
    import threading

    from pipeline.config import TrainConfig
    from pipeline.local import LocalTrainer

    calls: list[tuple[str, int]] = []

    class Watched(LocalTrainer):
        def _read_validation(self, val_ranges):
            calls.append((threading.current_thread().name, len(val_ranges)))
            return super()._read_validation(val_ranges)

    cfg = TrainConfig(hidden=[8], epochs=3, patience=0)
    trainer = Watched(store, cfg, tmp_path / "run", None)
    res = trainer.fit()
    # one read, off the training thread, kept for the later epochs
    assert len(calls) == 1 and calls[0][0].startswith("pipeline-validation-read")
    assert trainer._val_batches is not None and trainer._val_future is None
    # the same batches a read in this thread gives
    again = trainer._read_validation(trainer.epoch_plan.val_ranges)
    assert len(again) == len(trainer._val_batches)
    for (xa, ya), (xb, yb) in zip(again, trainer._val_batches, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # and the metrics equal those of a run validating in this thread
    plain = LocalTrainer(store, cfg, tmp_path / "plain", None)
    plain._prefetch_validation = lambda: None  # read when first validating, in this thread
    other = plain.fit()
    assert [e["val_loss"] for e in res.history] == [e["val_loss"] for e in other.history]


def test_training_in_process_decodes_each_chunk_once_and_lets_go_at_the_end(store, tmp_path):
    """A store under ``row_cache_mb`` is read once: later epochs come from the kept chunks, and
    the run's weights are those of ``row_cache_mb = 0``; the kept chunks go when the run ends."""
    from pipeline.config import TrainConfig
    from pipeline.local import LocalTrainer
    from pipeline.model import load_model
    from pipeline.store import open_store

    seen: dict[str, int] = {}

    class Watched(LocalTrainer):
        def _forget_job(self):
            seen.update(reads=self._rows.reads, hits=self._rows.hits, kept=len(self._rows))
            super()._forget_job()

    n_chunks = open_store(store).n_chunks
    kept = Watched(store, TrainConfig(hidden=[8], epochs=3, patience=0), tmp_path / "kept", None)
    kept.fit()
    assert seen["reads"] == seen["kept"] == n_chunks and seen["hits"] > 0
    assert len(kept._rows) == 0 and kept._rows.nbytes == 0
    streamed = Watched(store, TrainConfig(hidden=[8], epochs=3, patience=0, row_cache_mb=0), tmp_path / "s", None)
    streamed.fit()
    assert seen == {"reads": 0, "hits": 0, "kept": 0}
    np.testing.assert_array_equal(load_model(tmp_path / "kept").params, load_model(tmp_path / "s").params)
