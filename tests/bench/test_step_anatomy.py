"""bench.step_anatomy's helpers: the training FLOPs it divides by and how it splits a worker's
profiled training thread."""

from bench import step_anatomy, throughput


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
