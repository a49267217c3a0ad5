"""``python -m bench`` runs every benchmark as the targets table judges it, and every table it
assembles follows the protocol: the arguments each module gets (full and ``--quick``), what the
runner does with them (real argument building, stand-in benchmark modules: nothing is timed), and
the per-pass conditions the time-to-accuracy and out-of-core quick runs keep in their JSON."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest

import bench.__main__ as runner
from bench.protocol import CONDITION_KEYS
from tests.bench.quick import quick_json

ROOT = Path(__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _entries(name: str) -> list[runner.Benchmark]:
    return [b for b in runner.BENCHMARKS if b.name == name]


def _value(argv: list[str], flag: str) -> str | None:
    """The value following ``flag`` in ``argv`` (None when the flag is absent)."""
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_cold_start_runs_five_epochs_in_five_passes() -> None:
    """The 2 s target is judged on the plain command's steady epochs over 5 passes."""
    (b,) = _entries("cold_start")
    argv = runner.module_argv(b, quick=False)
    assert _value(argv, "--epochs") == "5" and _value(argv, "--passes") == "5"
    assert "--extra" in argv  # the labelled blas_threads=2 way, as in the run of record


def test_out_of_core_runs_where_memory_binds() -> None:
    """A 3.5 GB store under a 1.5 GiB cap for 2 epochs; --ooc-sizes replaces the sizes only, and
    without cgroup support the cap is left out (bench.out_of_core refuses it there)."""
    (b,) = _entries("out_of_core")
    argv = runner.module_argv(b, quick=False)
    assert (_value(argv, "--sizes"), _value(argv, "--memory-cap"), _value(argv, "--epochs")) == ("3.5", "1.5GiB", "2")
    sized = runner.module_argv(b, quick=False, ooc_sizes="1,4")
    assert [_value(sized, f) for f in ("--sizes", "--memory-cap", "--epochs")] == ["1,4", "1.5GiB", "2"]
    assert sized.count("--sizes") == 1
    uncapped = runner.module_argv(b, quick=False, memory_cap=False)
    assert "--memory-cap" not in uncapped and "1.5GiB" not in uncapped
    assert (_value(uncapped, "--sizes"), _value(uncapped, "--epochs")) == ("3.5", "2")


def test_accuracy_targets_run_three_seeds_at_both_store_sizes() -> None:
    """bench/targets.py's accuracy rows: --accuracy-only --seeds 0,1,2 at 120,000 rows (the
    module's default) and at 60,000 rows, each a section of its own."""
    acc = [b for b in _entries("throughput") if "--accuracy-only" in b.args]
    runs = [runner.module_argv(b, quick=False) for b in acc]
    assert [_value(a, "--seeds") for a in runs] == ["0,1,2", "0,1,2"]
    assert sorted(_value(a, "--rows") or "default" for a in runs) == ["60000", "default"]
    (timed,) = [b for b in _entries("throughput") if "--accuracy-only" not in b.args]
    assert runner.module_argv(timed, quick=False) == []  # the timed rows at their defaults
    keys = [b.key for b in runner.BENCHMARKS]
    assert len(keys) == len(set(keys))


def test_quick_runs_pass_quick_and_no_full_run_sizes() -> None:
    sizes = {"--sizes", "--memory-cap", "--epochs", "--passes", "--seeds", "--rows", "--extra"}
    for b in runner.BENCHMARKS:
        argv = runner.module_argv(b, quick=True, ooc_sizes="1,4")
        assert argv[0] == "--quick", (b.key, argv)
        assert not sizes & set(argv), (b.key, argv)
    for b in runner.BENCHMARKS:
        if "--accuracy-only" in b.args:  # what runs is kept: the accuracy rows, not the timed table
            assert runner.module_argv(b, quick=True) == ["--quick", "--accuracy-only"]


def _help_flags(module: str) -> set[str]:
    mod = __import__(f"bench.{module}", fromlist=["main"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        mod.main(["--help"])
    return set(FLAG.findall(out.getvalue()))


def test_every_argument_is_one_the_module_takes() -> None:
    unknown = []
    for b in runner.BENCHMARKS:
        if not b.args:
            continue
        shown = _help_flags(b.name)
        unknown += [f"{b.key} {f}" for f in FLAG.findall(" ".join(b.args)) if f not in shown]
    assert unknown == []


def _stand_in(monkeypatch: pytest.MonkeyPatch, name: str, calls: list[list[str]], **extra: object) -> None:
    """``bench.<name>`` replaced by a module whose ``main`` records its arguments."""

    def main(argv: list[str]) -> str:
        calls.append(list(argv))
        return f"| {name} {' '.join(argv)} |"

    monkeypatch.setitem(sys.modules, f"bench.{name}", types.SimpleNamespace(main=main, **extra))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """bench/out/, bench/figures/ and RESULTS.md's directory moved to ``tmp_path``; the targets
    table left empty (it reads the benchmark modules the tests stand in for)."""
    monkeypatch.setattr(runner, "collect", lambda: [])
    monkeypatch.setattr(runner, "OUT", tmp_path / "out")
    monkeypatch.setattr(runner, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(runner, "HERE", tmp_path)
    return tmp_path


def test_the_full_run_gives_each_module_its_judged_arguments(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    _stand_in(monkeypatch, "cold_start", calls)
    doc = runner.main(["--only", "cold_start", "--preamble", ""])
    assert calls == [["--epochs", "5", "--passes", "5", "--extra"]]
    assert "Command: `python -m bench.cold_start --epochs 5 --passes 5 --extra`" in doc
    assert (scratch / "RESULTS.md").read_text() == doc


def test_out_of_core_still_runs_without_cgroup_support(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    _stand_in(monkeypatch, "out_of_core", calls, cap_support=lambda: (False, "no memory cgroup listed"))
    doc = runner.main(["--only", "out_of_core", "--preamble", ""])
    assert calls == [["--sizes", "3.5", "--epochs", "2"]]
    assert "Command: `python -m bench.out_of_core --sizes 3.5 --epochs 2`" in doc


def test_quick_run_passes_quick_and_runs_a_repeated_quick_entry_once(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--only throughput`` selects the module's three entries; at quick sizes the two accuracy
    runs are the same run (the quick sizes replace --rows), so it runs once."""
    calls: list[list[str]] = []
    _stand_in(monkeypatch, "throughput", calls)
    doc = runner.main(["--quick", "--only", "throughput", "--preamble", ""])
    assert calls == [["--quick"], ["--quick", "--accuracy-only"]]
    assert (scratch / "out" / "RESULTS-quick.md").read_text() == doc
    assert (scratch / "out" / "throughput-accuracy-quick.md").read_text() == "| throughput --quick --accuracy-only |\n"


def test_each_entry_keeps_its_own_table_and_collect_reads_it(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both accuracy runs write the module's one file; the runner keeps each under its entry's
    name, so ``--collect`` puts each table under its own title."""
    calls: list[list[str]] = []
    _stand_in(monkeypatch, "throughput", calls)
    runner.main(["--only", "throughput-accuracy,throughput-accuracy-60000", "--preamble", ""])
    assert len(calls) == 2
    doc = runner.main(["--collect", "--only", "throughput-accuracy,throughput-accuracy-60000", "--preamble", ""])
    small = doc.index("## Accuracy parity over seeds, 60,000 rows x 2 epochs")
    assert doc.index("| throughput --accuracy-only --seeds 0,1,2 --rows 60000 |") > small
    assert doc.index("| throughput --accuracy-only --seeds 0,1,2 |") < small


def _check_conditions(cond: dict) -> None:
    assert CONDITION_KEYS <= set(cond), set(cond)
    assert isinstance(cond["flags"], list) and cond["wall"] > 0 and cond["gemm_numpy_gflops"] > 0


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_time_to_accuracy_quick_json_keeps_each_seeds_conditions() -> None:
    out, rec = quick_json("time_to_accuracy", timeout=600)
    seeds = rec["per_seed"][0]
    assert [p["pass"] for p in seeds] == list(range(1, len(seeds) + 1)) and len(seeds) == 2
    for p in seeds:
        _check_conditions(p["conditions"])
        assert p["order"][0] == "pipeline" and "times" in p  # the figures bench/targets.py reads are kept
    assert "Commit " in out and "Conditions per pass (one pass per dataset and seed" in out


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_out_of_core_quick_json_keeps_each_stores_conditions() -> None:
    out, rec = quick_json("out_of_core", timeout=420)
    assert [p["pass"] for p in rec["passes"]] == [1, 2]
    stores = sorted({round(r["store GB (X)"], 3) for r in rec["rows"]})
    assert [round(p["store GB (X)"], 3) for p in rec["passes"]] == stores
    for p in rec["passes"]:
        _check_conditions(p["conditions"])
    assert {"memory binds?", "peak RSS MB (max process)", "samples/s"} <= set(rec["rows"][0])
    assert "Commit " in out and "Conditions per pass (one pass per store" in out
