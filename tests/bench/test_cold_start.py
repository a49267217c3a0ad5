"""bench.cold_start: the PyTorch whole-process peer beside the cold ``pipeline train`` process, and
the protocol's conditions kept for every pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bench.protocol import CONDITION_KEYS
from tests.bench.quick import quick_json

ROOT = Path(__file__).resolve().parents[2]


def test_the_peer_holds_out_the_rows_the_pipeline_holds_out(tmp_path: Path) -> None:
    """The file given to the peer names the rows the pipeline's loader holds out at its default
    settings: as many as the plan counts, each one the loader's own for its chunk."""
    from bench.cold_start import held_out_file
    from pipeline.config import TrainConfig
    from pipeline.loader import held_out_mask
    from pipeline.plan import held_out_count
    from pipeline.synth import synth

    store = synth(str(tmp_path / "s.zarr"), rows=3_000, features=8, classes=3, seed=0, chunk_rows=500)
    cfg = TrainConfig()
    n = held_out_file(store, tmp_path / "held.npy")
    held = np.load(tmp_path / "held.npy")
    assert n == len(held) == held_out_count(store, cfg.validation, cfg.seed) == 300
    want = np.flatnonzero(held_out_mask(store, 0, store.n_rows, cfg.validation, cfg.seed))
    np.testing.assert_array_equal(np.sort(held), want)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_peer_process_trains_the_rows_left_and_validates_on_the_held_out_ones(tmp_path: Path) -> None:
    """One cold process of the PyTorch peer from the store to a saved model: its wall time from
    outside, its phases, and per epoch the training rows (the store less the held-out rows) and
    a validation accuracy over the held-out rows; the saved model holds the MLP's layers."""
    pytest.importorskip("torch")
    import torch

    from bench.cold_start import HIDDEN, held_out_file, peer_run
    from pipeline.synth import synth

    store = synth(str(tmp_path / "s.zarr"), rows=2_000, features=784, classes=10, seed=0)
    held = held_out_file(store, tmp_path / "held.npy")
    got = peer_run(str(store.path), tmp_path / "held.npy", tmp_path / "model.pt", 2, "foreach")
    assert got["held_out_rows"] == held == 200 and got["train_rows"] == 1_800
    assert [e["samples"] for e in got["epochs"]] == [1_800, 1_800]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 and e["val_loss"] > 0 for e in got["epochs"])
    phases = got["phases"]
    for phase in ("imports", "store read into memory", "model and optimizer set-up", "training", "validation"):
        assert phases[phase] > 0, phase
    assert got["wall_s"] >= got["process_in_timer_s"] - phases["interpreter start"] > phases["training"]
    assert got["cpu_s"] > 0 and got["steady_overhead_s"] is not None
    state = torch.load(tmp_path / "model.pt")
    assert [tuple(v.shape) for k, v in state.items() if k.endswith("weight")] == [
        (HIDDEN[0], 784),
        (HIDDEN[1], HIDDEN[0]),
        (10, HIDDEN[1]),
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_run_keeps_the_peer_and_the_conditions_of_every_pass() -> None:
    """``python -m bench.cold_start --quick``: the JSON holds the PyTorch peer's whole process per
    pass beside the plain command's and each pass's conditions (bench.protocol.measure_pass); the
    table shows the peer's column, the ratio per way and the conditions."""
    stdout, d = quick_json("cold_start")
    assert "bench/out/results/cold_start-quick-" in stdout
    assert d["quick"] is True and len(d["passes"]) == 1
    (rec,) = d["passes"]
    assert CONDITION_KEYS <= set(rec["conditions"]) and rec["conditions"]["gemm_numpy_gflops"] > 0
    assert set(rec["order"]) >= {"in process", "2 workers"}
    assert "Conditions per pass:" in stdout and "| pass | first trainer |" in stdout
    if importlib.util.find_spec("torch") is None:
        assert d["peer"] is None and "pytorch best practice: not run" in stdout
        return
    (run,) = d["peer"]["runs"]
    plain = d["results"]["in process"]["plain_epochs"][0]
    assert [e["samples"] for e in run["epochs"]] == [e["samples"] for e in plain]
    assert run["wall_s"] > run["phases"]["training"] > 0 and run["held_out_rows"] == d["peer"]["held_out_rows"] > 0
    assert "pytorch best practice" in rec["order"] and rec["conditions"]["gemm_torch_gflops"] > 0
    assert "| phase | in process s | 2 workers s | in process, blas_threads=2 s | pytorch best practice s |" in stdout
    ratio = run["wall_s"] / d["results"]["in process"]["plain"][0]
    assert f"| in process | {d['results']['in process']['plain'][0]:.2f} | {run['wall_s']:.2f} | {ratio:.2f}x" in stdout
