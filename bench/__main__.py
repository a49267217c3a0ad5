"""Run every benchmark and write bench/RESULTS.md.

    python -m bench                  # full runs (tens of minutes; out-of-core 1/4/16 GB dominates)
    python -m bench --quick          # tiny sizes, writes bench/out/RESULTS-quick.md instead
    python -m bench --only throughput,local_steps
    python -m bench --collect        # rebuild RESULTS.md from the tables the modules last wrote
                                     # to bench/out/ (after running them one by one)
    python -m bench --ooc-sizes 1,4  # pass sizes to the out-of-core benchmark

A table whose module drew a figure (bench/figures.py) gets it linked underneath; a full run's
figures are copied to bench/figures/, kept in git beside RESULTS.md.

Each module also runs alone (``python -m bench.<name>``) and keeps its table in bench/out/.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import OUT, machine
from bench.figures import FIGURES, TITLES
from bench.targets import collect
from bench.targets import render as render_targets

HERE = Path(__file__).resolve().parent
# (module, title, full command)
BENCHMARKS = [
    ("kernels", "Kernel train-step throughput", "python -m bench.kernels"),
    ("io", "Ingest and loader I/O", "python -m bench.io"),
    ("throughput", "End-to-end throughput against peers", "python -m bench.throughput"),
    ("local_steps", "Push interval: throughput vs convergence", "python -m bench.local_steps"),
    ("time_to_accuracy", "Time to accuracy and default-settings quality", "python -m bench.time_to_accuracy"),
    (
        "statistical_efficiency",
        "Statistical efficiency: epochs to a test accuracy, 2 workers vs one process",
        "python -m bench.statistical_efficiency",
    ),
    ("epoch_anatomy", "Where an epoch goes on small stores", "python -m bench.epoch_anatomy"),
    ("step_anatomy", "Where a training step and a cold `pipeline train` go", "python -m bench.step_anatomy"),
    ("cold_start", "A cold `pipeline train` process by phase", "python -m bench.cold_start"),
    ("out_of_core", "Out of core: memory, throughput, disk", "python -m bench.out_of_core --sizes {ooc}"),
    ("ps_limits", "Parameter-server limits", "python -m bench.ps_limits"),
    (
        "ps_compression",
        "Compressed deltas: accuracy, server cost, where one server saturates",
        "python -m bench.ps_compression",
    ),
    ("overlap", "Overlap: accuracy with the push in flight", "python -m bench.overlap"),
    ("ps_shards", "Sharded parameter server against the scheduler's", "python -m bench.ps_shards"),
    ("ps_saturation", "Parameter-server saturation: measured against predicted", "python -m bench.ps_saturation"),
    ("ps_transport", "Sync rounds: TCP against shared memory", "python -m bench.ps_transport"),
    ("ps_summed", "Summed pushes on a real cluster", "python -m bench.ps_summed"),
    ("sklearn_parity", "Estimator defaults vs scikit-learn on its bundled datasets", "python -m bench.sklearn_parity"),
    ("fed_strategies", "Robust aggregation against a Byzantine client", "python -m bench.fed_strategies"),
    ("privacy", "The cost of privacy: DP, secure aggregation, both", "python -m bench.privacy"),
    ("federated", "Federated simulation vs Flower", "python -m bench.federated"),
]


def _run_one(name: str, quick: bool, ooc: str) -> tuple[str, float]:
    mod = importlib.import_module(f"bench.{name}")
    argv = ["--quick"] if quick else []
    if name == "out_of_core" and not quick:
        argv += ["--sizes", ooc]
    if name == "io":
        argv += ["--out", str(OUT / ("io-quick.md" if quick else "io.md"))]
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
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--collect", action="store_true", help="assemble RESULTS.md from bench/out/*.md")
    ap.add_argument("--ooc-sizes", default="1,4,16", help="out-of-core store sizes in GB")
    ap.add_argument(
        "--preamble",
        default=str(Path(__file__).with_name("findings.md")),
        help="a file whose text goes at the top of RESULTS.md (default: bench/findings.md, the "
        "written summary of the last full run: update it when the figures change)",
    )
    args = ap.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only.split(",")]
    sections = []
    figs: dict[str, str] = {}
    for name, title, cmd in chosen:
        cmd = cmd.format(ooc=args.ooc_sizes) + (" --quick" if args.quick else "")
        if args.collect:
            f = OUT / f"{name}{'-quick' if args.quick else ''}.md"
            if not f.exists():
                continue
            text, secs = f.read_text(), None
        else:
            text, secs = _run_one(name, args.quick, args.ooc_sizes)
        sections.append((title, cmd, text, secs))
        fig = publish_figure(name, args.quick)
        if fig:
            figs[title] = fig
    pre = Path(args.preamble).read_text() if args.preamble and Path(args.preamble).is_file() else ""
    doc = render(sections, args.quick, pre, figs)
    dest = OUT / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(doc)
    print(f"wrote {dest}")
    return doc


if __name__ == "__main__":
    main()
