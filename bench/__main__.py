"""Run every benchmark and write bench/RESULTS.md.

    python -m bench                  # full runs, each as the targets table judges it (hours in all)
    python -m bench --quick          # tiny sizes, writes bench/out/RESULTS-quick.md instead
    python -m bench --only throughput,local_steps
    python -m bench --collect        # rebuild RESULTS.md from the tables the modules last wrote
                                     # to bench/out/ (after running them one by one)
    python -m bench --ooc-sizes 1,4  # the out-of-core benchmark on other store sizes

Each entry of :data:`BENCHMARKS` carries the arguments of the run that bench/targets.py judges
(the command RESULTS.md quotes above each table), so that a regenerated RESULTS.md keeps every
row of its targets table: ``bench.cold_start --epochs 5 --passes 5 --extra`` (the 2 s target is
judged on the plain command's steady epochs, which need several epochs; ``--extra`` as in the run
of record), ``bench.out_of_core --sizes 3.5 --memory-cap 1.5GiB --epochs 2`` (memory binds: a
3.3 GiB store under a 1.5 GiB cgroup around the workers; where no memory cgroup can be made the
cap is left out, the run goes on and its table says whether memory bound: without a cap only a
store of twice the RAM does), and ``bench.throughput
--accuracy-only --seeds 0,1,2`` at 120,000 and 60,000 rows (the accuracy targets over seeds,
both store sizes). ``--quick`` runs every module with ``--quick`` and only the arguments that
choose what it runs (``--accuracy-only``), never the full sizes; a quick entry that would repeat
another's quick run exactly is run once.

A table whose module drew a figure (bench/figures.py) gets it linked underneath; a full run's
figures are copied to bench/figures/, kept in git beside RESULTS.md.

Each module also runs alone (``python -m bench.<name>``) and keeps its table in bench/out/; a run
of ``python -m bench`` also keeps each entry's table there under the entry's name, which
``--collect`` reads.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import OUT, machine
from bench.figures import FIGURES, TITLES
from bench.targets import collect
from bench.targets import render as render_targets

HERE = Path(__file__).resolve().parent

# the out-of-core run the "memory binding" target is judged on (bench/targets.py)
OOC_SIZES = "3.5"
OOC_CAP = "1.5GiB"
# the accuracy targets over seeds (bench/targets.py: accuracy_targets), one run per store size
ACCURACY_SEEDS = "0,1,2"


@dataclass(frozen=True)
class Benchmark:
    """One section of RESULTS.md: ``python -m bench.<module> <args>``.

    ``key`` names the section (``--only``, and its table's file ``bench/out/<key>[-quick].md``);
    ``args`` are the full run's arguments, the run bench/targets.py judges; ``quick_args`` the
    ones a ``--quick`` run keeps beside ``--quick`` (those that choose what runs, not sizes)."""

    key: str
    title: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    module: str = ""  # the module under bench/, when it is not the key

    @property
    def name(self) -> str:
        return self.module or self.key


BENCHMARKS = [
    Benchmark("kernels", "Kernel train-step throughput"),
    Benchmark("io", "Ingest and loader I/O"),
    Benchmark("throughput", "End-to-end throughput against peers"),
    Benchmark(
        "throughput-accuracy",
        "Accuracy parity over seeds, 120,000 rows x 2 epochs",
        ("--accuracy-only", "--seeds", ACCURACY_SEEDS),
        ("--accuracy-only",),
        module="throughput",
    ),
    Benchmark(
        "throughput-accuracy-60000",
        "Accuracy parity over seeds, 60,000 rows x 2 epochs",
        ("--accuracy-only", "--seeds", ACCURACY_SEEDS, "--rows", "60000"),
        ("--accuracy-only",),
        module="throughput",
    ),
    Benchmark("local_steps", "Push interval: throughput vs convergence"),
    Benchmark("time_to_accuracy", "Time to accuracy and default-settings quality"),
    Benchmark("statistical_efficiency", "Statistical efficiency: epochs to a test accuracy, 2 workers vs one process"),
    Benchmark("epoch_anatomy", "Where an epoch goes on small stores"),
    Benchmark("step_anatomy", "Where a training step and a cold `pipeline train` go"),
    Benchmark("cold_start", "A cold `pipeline train` process by phase", ("--epochs", "5", "--passes", "5", "--extra")),
    Benchmark(
        "out_of_core",
        "Out of core: memory, throughput, disk",
        ("--sizes", OOC_SIZES, "--memory-cap", OOC_CAP, "--epochs", "2"),
    ),
    Benchmark("ps_limits", "Parameter-server limits"),
    Benchmark("ps_compression", "Compressed deltas: accuracy, server cost, where one server saturates"),
    Benchmark("overlap", "Overlap: accuracy with the push in flight"),
    Benchmark("ps_shards", "Sharded parameter server against the scheduler's"),
    Benchmark("ps_saturation", "Parameter-server saturation: measured against predicted"),
    Benchmark("ps_transport", "Sync rounds: TCP against shared memory"),
    Benchmark("ps_summed", "Summed pushes on a real cluster"),
    Benchmark("sklearn_parity", "Estimator defaults vs scikit-learn on its bundled datasets"),
    Benchmark("fed_strategies", "Robust aggregation against a Byzantine client"),
    Benchmark("privacy", "The cost of privacy: DP, secure aggregation, both"),
    Benchmark("federated", "Federated simulation vs Flower"),
]


def _set(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag``'s value replaced by ``value`` in place (the flag and its value dropped
    when ``value`` is None; appended when ``args`` lacks the flag)."""
    if flag not in args:
        return args if value is None else [*args, flag, value]
    i = args.index(flag)
    return [*args[:i], *(() if value is None else (flag, value)), *args[i + 2 :]]


def module_argv(b: Benchmark, quick: bool, ooc_sizes: str | None = None, memory_cap: bool = True) -> list[str]:
    """The arguments ``bench.<module>.main`` gets for entry ``b``: the judged run's, or ``--quick``
    and the arguments that choose what runs. For out_of_core, ``ooc_sizes`` replaces the store
    sizes (the cap and epochs kept) and ``memory_cap=False`` leaves the cap out, for a machine where
    no memory cgroup can be made (bench.out_of_core refuses ``--memory-cap`` there)."""
    if quick:
        return ["--quick", *b.quick_args]
    args = list(b.args)
    if b.name == "out_of_core":
        if ooc_sizes:
            args = _set(args, "--sizes", ooc_sizes)
        if not memory_cap:
            args = _set(args, "--memory-cap", None)
    return args


def command(b: Benchmark, argv: Sequence[str]) -> str:
    """The command RESULTS.md quotes above the entry's table."""
    return " ".join(["python", "-m", f"bench.{b.name}", *argv])


def _run_one(b: Benchmark, argv: list[str]) -> tuple[str, float]:
    mod = importlib.import_module(f"bench.{b.name}")
    t = time.perf_counter()
    text = mod.main(argv)  # each module keeps its own table in bench/out/
    return text, time.perf_counter() - t


def publish_figure(name: str, quick: bool) -> str | None:
    """The markdown image line for benchmark ``name``'s figure, if its last run drew one: a full
    run's figure is copied to bench/figures/ (kept in git with RESULTS.md), a quick run's is
    linked where it lies in bench/out/."""
    src = OUT / f"{name}{'-quick' if quick else ''}.png"
    if not src.is_file():
        return None
    if quick:
        rel = src.relative_to(HERE).as_posix()
    else:
        FIGURES.mkdir(exist_ok=True)
        shutil.copyfile(src, FIGURES / f"{name}.png")
        rel = f"{FIGURES.name}/{name}.png"
    return f"![{TITLES.get(name, name)}]({rel})"


def render(
    sections: list[tuple[str, str, str, float | None]],
    quick: bool,
    preamble: str = "",
    figures: dict[str, str] | None = None,
) -> str:
    m = machine()
    lines = [
        "# Benchmark results" + (" (quick smoke sizes: not meaningful figures)" if quick else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM; written {m['date']}; "
        f"load average when written {m['load']} (the machine was shared with other work: "
        "each table's header gives the load around its own run). Regenerate with `python -m bench`. "
        "Every benchmark's table follows the protocol of bench/protocol.py: it gives its commit, versions "
        "and per-pass conditions in its header and names the JSON under bench/results/ its figures come "
        "from.",
        "",
    ]
    if not quick:
        lines += [render_targets(collect()), ""]
    if preamble:
        lines += [preamble, ""]
    for title, cmd, text, secs in sections:
        took = f" ({secs:.0f} s)" if secs is not None else ""
        body = "\n".join("#" + ln if ln.startswith("#") else ln for ln in text.strip().splitlines())
        lines += [f"## {title}", "", f"Command: `{cmd}`{took}", "", body, ""]
        if figures and title in figures:
            lines += [figures[title], ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument(
        "--only", default="", help="comma-separated benchmark names (a module's name selects all its entries)"
    )
    ap.add_argument("--collect", action="store_true", help="assemble RESULTS.md from bench/out/*.md")
    ap.add_argument(
        "--ooc-sizes",
        default=None,
        help=f"out-of-core store sizes in GB (default {OOC_SIZES}: the store on which the {OOC_CAP} memory cap "
        "around the workers binds; the cap and 2 epochs are kept)",
    )
    ap.add_argument(
        "--preamble",
        default=str(Path(__file__).with_name("findings.md")),
        help="a file whose text goes at the top of RESULTS.md (default: bench/findings.md, the "
        "written summary of the last full run: update it when the figures change)",
    )
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    chosen = [b for b in BENCHMARKS if not only or b.key in only or b.name in only]
    suffix = "-quick" if args.quick else ""
    memory_cap = True
    if not args.quick and not args.collect and any(b.name == "out_of_core" for b in chosen):
        from bench.out_of_core import cap_support

        memory_cap, why = cap_support()
        if not memory_cap:
            print(
                f"out_of_core: no memory cgroup can be made here ({why}); it runs without --memory-cap, "
                "and its table says whether memory bound",
                file=sys.stderr,
            )
    sections = []
    figs: dict[str, str] = {}
    ran: set[tuple[str, ...]] = set()
    for b in chosen:
        run_argv = module_argv(b, args.quick, args.ooc_sizes, memory_cap)
        if (b.name, *run_argv) in ran:
            continue  # a quick entry whose run another entry's quick run already was
        ran.add((b.name, *run_argv))
        cmd = command(b, run_argv)
        if args.collect:
            f = OUT / f"{b.key}{suffix}.md"
            if not f.exists():
                continue
            text, secs = f.read_text(), None
        else:
            text, secs = _run_one(b, run_argv)
        sections.append((b, b.title, cmd, text, secs))
        fig = publish_figure(b.key, args.quick)
        if fig:
            figs[b.title] = fig
    if not args.collect:
        # each entry's table under its own name: two entries of one module (throughput's accuracy
        # runs) write the same file of the module's, the later over the earlier
        OUT.mkdir(parents=True, exist_ok=True)
        for b, _, _, text, _ in sections:
            (OUT / f"{b.key}{suffix}.md").write_text(text.rstrip("\n") + "\n")
    pre = Path(args.preamble).read_text() if args.preamble and Path(args.preamble).is_file() else ""
    doc = render([s[1:] for s in sections], args.quick, pre, figs)
    dest = OUT / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(doc)
    print(f"wrote {dest}")
    return doc


if __name__ == "__main__":
    main()
