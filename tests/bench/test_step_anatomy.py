"""bench.step_anatomy's helpers: the training FLOPs it divides by and how it splits a worker's
profiled training thread; its quick run's table and JSON under the protocol."""

from pathlib import Path

import pytest

from bench import step_anatomy, throughput
from bench.protocol import CONDITION_KEYS
from tests.bench.quick import quick_json

ROOT = Path(__file__).resolve().parents[2]


def _node(filename: str, name: str, count: int, *children: dict) -> dict:
    return {
        "description": {"filename": f"/src/{filename}", "name": name},
        "count": count,
        "children": {f"{c['description']['name']}-{i}": c for i, c in enumerate(children)},
    }


def test_the_flops_are_the_throughput_benchmarks():
    """8 GEMMs a step (no input gradient for the first layer), as the GEMM-implied limit counts."""
    assert step_anatomy.FLOPS_PER_SAMPLE == throughput._flops(step_anatomy.SIZES)
    assert round(step_anatomy.FLOPS_PER_SAMPLE / 1e6, 2) == 2.41


def test_a_sample_goes_to_the_first_listed_frame_from_the_task_down():
    """Kernels under a validation call count as validation, the optimizer under the step as the
    optimizer, a push's wait as the push, and what no listed frame covers as other."""
    step = _node(
        "mlp.py",
        "step",
        40,
        _node("mlp.py", "_gradient", 30, _node("cpu.py", "gemm", 25)),
        _node("mlp.py", "step", 8, _node("cpu.py", "adam_update", 8)),
    )
    tree = _node(
        "worker.py",
        "train_task",
        100,
        _node(
            "loop.py",
            "run_batches",
            90,
            step,
            _node("worker.py", "push", 20, _node("_base.py", "result", 18)),
            _node("loader.py", "epoch", 10, _node("rows.py", "draw_rows", 6)),
        ),
        _node("worker.py", "evaluate_ranges", 6, _node("mlp.py", "_gradient", 6)),
    )
    split = step_anatomy.thread_split(tree)
    assert split["samples"] == 100
    assert split["forward + backward kernels"] == 0.30
    assert split["optimizer"] == 0.08
    assert split["push and wait for the parameter server"] == 0.20
    assert split["loader"] == 0.10
    assert split["validation"] == 0.06
    # the step's own 2 samples, the loop's 20, the task's 4
    assert abs(split["other"] - 0.26) < 1e-12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_records_every_measurements_conditions_and_provenance():
    """Each measurement is a protocol pass: the JSON keeps its conditions (load, steal, other
    processes, GEMM peaks, flags) beside the figures it had before, and the table's header gives
    the commit, the versions and the conditions per pass."""
    stdout, rec = quick_json("step_anatomy", timeout=270)
    assert rec["quick"] is True
    labels = [p["order"][0] for p in rec["passes"]]
    assert labels == [
        "step, 1 BLAS thread",
        "step, default BLAS threads",
        "loader batch",
        "pull (1-worker cluster)",
        "2-worker run",
        "GEMMs one by one",
        "cold, in process",
        "cold, 2 workers",
    ]
    assert [p["pass"] for p in rec["passes"]] == list(range(1, 9))
    for p in rec["passes"]:
        cond = p["conditions"]
        assert CONDITION_KEYS <= set(cond)
        assert isinstance(cond["flags"], list) and cond["wall"] > 0
    for key in ("step_1_thread", "cluster_run", "gemm_shapes", "cold_in_process", "cold_2_workers"):
        assert key in rec, key
    header = stdout.split("| part |")[0]
    assert f"Commit {rec['meta']['commit']}" in header and "numpy " in header
    assert "Conditions per pass (one pass per measurement" in header and "| 8 | cold, 2 workers |" in header
