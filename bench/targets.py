"""Every measured target in one table, read from the raw figures the benchmarks kept.

    python -m bench.targets                 # print the table (markdown)
    python -m bench.targets --results DIR   # from another results directory
    python -m bench.targets --write         # and put it at the top of bench/RESULTS.md in place

For each benchmark the newest full (not ``--quick``) JSON under ``bench/results/`` is read; each
target is stated with its figure in every pass (or seed), the rule it is judged by, and whether it
is met. The rule is the benchmark protocol's (:mod:`bench.protocol`): a ratio counts as met when it
holds in at least 4 of 5 passes, i.e. in ``ceil(0.8 n)`` of ``n`` passes, unless the target names
its own rule (statistical efficiency: the median of 3 seeds). Passes flagged as taken under load
are counted in the last column: their rates are not a quiet machine's. A benchmark with no full
run on record is listed as "no run", never as met. ``python -m bench`` puts this table at the top
of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.protocol import RESULTS


@dataclass
class Target:
    area: str
    target: str
    figures: str  # per pass / per seed, as printed
    rule: str
    met: bool | None  # None: not measured
    source: str  # the JSON's name, or "" when there is none
    flagged: str = ""  # "k of n" passes flagged as under load


def needed(n: int) -> int:
    """Passes that must meet a target out of ``n``: 4 of 5, ``ceil(0.8 n)`` in general."""
    return max(1, math.ceil(0.8 * n))


def full_runs(kind: str, results: Path = RESULTS) -> list[tuple[Path, dict[str, Any]]]:
    """The full runs of benchmark ``kind`` (files ``kind-<UTC stamp>.json``), newest first."""
    out = []
    for path in sorted(results.glob(f"{kind}-*.json"), reverse=True):
        if not path.stem[len(kind) + 1 :][:1].isdigit():
            continue  # another benchmark whose name starts with this one's
        data = json.loads(path.read_text())
        if not data.get("quick"):
            out.append((path, data))
    return out


def newest(kind: str, results: Path = RESULTS, has: str = "") -> tuple[Path, dict[str, Any]] | None:
    """The newest full run of benchmark ``kind`` (with key ``has`` when given), or None: a run of
    some of a benchmark's parts (e.g. ``--parts server``) does not hide the last run of the others."""
    return next(((p, d) for p, d in full_runs(kind, results) if not has or has in d), None)


def _fmt(x: float, unit: str = "x") -> str:
    if unit == "pt":
        return f"{x:+.2f}"
    if unit == "%":
        return f"{100 * x:.0f}%"
    if unit == "s":
        return f"{x:.2f} s"
    return f"{x:.2f}{unit}"


def _per(xs: Sequence[float], unit: str = "x") -> str:
    return " / ".join(_fmt(x, unit) for x in xs)


def _flagged(conds: Sequence[dict[str, Any]]) -> str:
    flags = sum(1 for c in conds if c.get("flags"))
    return f"{flags} of {len(conds)}"


def _missing(area: str, target: str, command: str) -> Target:
    return Target(area, target, f"no full run on record (`{command}`)", "", None, "")


def throughput_targets(results: Path = RESULTS) -> list[Target]:
    got = newest("throughput", results)
    if got is None:
        return [_missing("speed", "steady state and cold against PyTorch, dask-ml", "python -m bench.throughput")]
    path, d = got
    flagged = _flagged([p["conditions"] for p in d["passes"]])
    out = []
    for t in d["targets"]:
        xs = t["per_pass"]
        if t["target"].startswith(COLD_ROW):
            if cold_peer_run(results) is not None:
                continue  # judged as specified, from bench.cold_start's run (cold_start_targets)
            # until then this run's cold columns, on their own store, epochs and cluster
            t = dict(t, target=f"{t['target']}, measured by bench.throughput: {_throughput_cold_setting(d)}")
        if t.get("points"):
            figures = _per(xs, "pt") + " points (deterministic: the same samples in every pass)"
            rule = "not more than 1 point below"
        elif "GEMM" in t["target"]:
            figures = _per(xs, "%")
            rule = f"{needed(len(xs))} of {len(xs)} passes"
        else:
            figures = _per(xs)
            rule = f"{needed(len(xs))} of {len(xs)} passes"
        out.append(Target("speed", t["target"], figures, rule, bool(t["met"]), path.name, flagged))
    return out


COLD_ROW = "cold: pipeline train process >= 1.0x PyTorch's process"


def _throughput_cold_setting(d: dict[str, Any]) -> str:
    """What bench.throughput's cold columns time: its store, epochs and the pipeline's cluster
    (its default row trains on a 2-worker LocalCluster with a separate validation store)."""
    test = f" + a {d['test_rows']:,}-row validation store" if d.get("test_rows") else ""
    return f"{d['rows']:,} x {d['sizes'][0]} store{test}, {d['epochs']} epochs, a 2-worker cluster"


def cold_peer_run(results: Path = RESULTS) -> tuple[Path, dict[str, Any]] | None:
    """The newest full bench.cold_start run with its PyTorch whole-process peer, or None."""
    return next(((p, d) for p, d in full_runs("cold_start", results) if d.get("peer")), None)


def accuracy_targets(results: Path = RESULTS) -> list[Target]:
    """The accuracy targets over seeds (``python -m bench.throughput --accuracy-only --seeds``),
    the newest run of each store size; accuracies after the same samples do not depend on load."""
    runs = full_runs("throughput-accuracy", results)
    newest_by_rows: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path, d in runs:
        newest_by_rows.setdefault(d["rows"], (path, d))
    out = []
    for rows, (path, d) in sorted(newest_by_rows.items(), reverse=True):
        for t in d["targets"]:
            xs = t["per_pass"]
            out.append(
                Target(
                    "speed",
                    f"{t['target']}, seeds {', '.join(map(str, d['seeds']))}, {rows:,} rows x {d['epochs']} epochs",
                    _per(xs, "pt") + " points per seed",
                    f"not more than 1 point below in {len(xs)} of {len(xs)} seeds",
                    bool(t["met"]),
                    path.name,
                )
            )
    return out


def _cold_flagged(d: dict[str, Any]) -> str:
    """A cold_start run's passes flagged as under load: by the protocol's conditions per pass
    where the run kept them, else by the load average before each pass (earlier runs)."""
    if isinstance(d.get("passes"), list):
        return _flagged([p["conditions"] for p in d["passes"]])
    loads = [t.get("load_before", 0.0) for t in next(iter(d["results"].values()))["timed"]]
    return f"{sum(x > d['meta']['host']['cores'] for x in loads)} of {len(loads)} (load)"


def cold_start_targets(results: Path = RESULTS, limit: float = 2.0) -> list[Target]:
    """The 2 s overhead of a cold ``pipeline train`` per way, from the newest full run; and the
    whole process against PyTorch's (:data:`COLD_ROW`) from the newest full run that has the
    PyTorch peer, per pass PyTorch's seconds over the plain command's, for the default way (in
    process on this store, below ``cluster_min_rows``) and ``--workers 2``."""
    got = newest("cold_start", results)
    name = "cold `pipeline train`: start-up, warm-up, validation and checkpoints under 2 s"
    if got is None:
        return [_missing("speed", name, "python -m bench.cold_start --epochs 5")]
    from bench.cold_start import WAYS, peer_ratio, steady_overhead

    path, d = got
    out = []
    for layout, res in d["results"].items():
        if layout not in WAYS:  # an earlier commit's files run beside (--baseline), a labelled extra way
            continue
        # the plain command's overhead over its steady-state epochs where the run has them (the
        # workers' kernel loads counted, the timers' own cost not), from its raw epochs; else the
        # timed run's
        xs = [
            x
            for wall, epochs in zip(res.get("plain", []), res.get("plain_epochs", []), strict=False)
            if (x := steady_overhead(wall, epochs)) is not None
        ] or [t["overhead_s"] for t in res["timed"]]
        n_ok = sum(x < limit for x in xs)
        out.append(
            Target(
                "speed",
                f"{name} ({layout}, {d['epochs']} epochs of {d['rows']:,} x {d['features']})",
                _per(xs, "s") + f" (median {statistics.median(xs):.2f} s)",
                f"{needed(len(xs))} of {len(xs)} passes",
                n_ok >= needed(len(xs)),
                path.name,
                _cold_flagged(d),
            )
        )
    peer = cold_peer_run(results)
    if peer is None:  # the row stays bench.throughput's (throughput_targets)
        return out
    path, d = peer
    shown = {"in process": "the plain command: in process below cluster_min_rows", "2 workers": "`--workers 2`"}
    for layout in WAYS:
        s = peer_ratio(d, layout)
        xs = [x for x in s["per_pass"] if x is not None]
        out.append(
            Target(
                "speed",
                f"{COLD_ROW} (time ratio; {shown.get(layout, layout)}, {d['epochs']} epochs of "
                f"{d['rows']:,} x {d['features']}, bench.cold_start)",
                _per(xs) + f" (median {s['median']:.2f}x)",
                f"{s['needed']} of {s['passes']} passes",
                bool(s["met"]),
                path.name,
                _cold_flagged(d),
            )
        )
    return out


VARIANTS = ("default", "ema=0")  # the pipeline's defaults, and the same without weight averaging


def seed_cell(two: int | None, one: int | None) -> str:
    """One seed's figure: 2 workers' epochs to the threshold over one process's, or which of the
    two did not reach it (a ratio needs both; "not reached" alone would hide a 2-worker run that
    reached the threshold when the one-process reference did not)."""
    if two and one:
        return f"{two / one:.2f}x"
    if two:
        return f"2 workers {two} epochs, one process not reached"
    if one:
        return f"2 workers not reached, one process {one} epochs"
    return "neither reached"


def statistical_efficiency_targets(results: Path = RESULTS, limit: float = 1.25) -> list[Target]:
    """Per dataset, the default settings and ``ema=0``, each from the newest full run that has it
    (runs of other settings tried, ``--variant local_steps=4`` etc., are not the target's)."""
    name = "statistical efficiency: epochs to the threshold on 2 workers <= 1.25x one process"
    runs = full_runs("statistical_efficiency", results)
    picked: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    for path, d in runs:
        for ds, v in d["results"].items():
            for variant in v["references"]:
                if variant in VARIANTS:
                    picked.setdefault((ds, variant), (path, v))
    if not picked:
        return [_missing("speed", name, "python -m bench.statistical_efficiency")]
    out = []
    for (ds, variant), (path, v) in sorted(picked.items()):
        ref = v["references"][variant]
        two = next(k for k in v["passes"][0]["results"] if k.startswith("2 ") and k.endswith(f"[{variant}]"))
        ratios: list[float | None] = []
        cells: list[str] = []
        for p in v["passes"]:
            a, b = p["results"][two]["epochs_to_threshold"], p["results"][ref]["epochs_to_threshold"]
            ratios.append(a / b if a and b else None)
            cells.append(seed_cell(a, b))
        shown = " / ".join(cells) + " per seed"
        if any(r is None for r in ratios):
            met = False
        else:
            med = statistics.median([r for r in ratios if r is not None])
            met = med <= limit
            over = sum(1 for r in ratios if r is not None and r > limit)
            shown += f" (median {med:.2f}x" + (f"; {over} of {len(ratios)} seeds above 1.25x" if over else "") + ")"
        out.append(
            Target(
                "speed",
                f"{name}: {ds}, threshold {v['threshold']}, {variant}",
                shown,
                f"median of {len(ratios)} seeds (the target's own rule)",
                met,
                path.name,
                _flagged([p["conditions"] for p in v["passes"]]),
            )
        )
    return out


PEERS_COLD = ("pytorch best practice, cold", "pytorch, cold", "scikit-learn, cold")
PEERS_WARM = ("pytorch best practice", "pytorch", "scikit-learn")


def time_to_accuracy_targets(results: Path = RESULTS, big: int = 50_000) -> list[Target]:
    """Per dataset, from the newest full run that has it (a run of some datasets, ``--datasets``,
    does not hide the others' last run); runs before the cold command column are skipped."""
    name = "time to accuracy"
    by_ds: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    for path, d in full_runs("time_to_accuracy", results):
        found: dict[str, list[dict[str, Any]]] = {}
        for seed in d["per_seed"]:
            for rec in seed:
                if "pipeline command, cold" in rec["times"]:
                    found.setdefault(rec["name"], []).append(rec)
        for ds, recs in found.items():
            by_ds.setdefault(ds, (path, recs))
    from bench.time_to_accuracy import DATASETS

    out = [
        _missing("speed", f"{name}, {ds}", f"python -m bench.time_to_accuracy --datasets {ds}")
        for ds in DATASETS
        if ds not in by_ds
    ]
    for ds, (path, recs) in by_ds.items():
        rows = recs[0]["rows"][0]

        def ratio(rec: dict[str, Any], mine: str, peers: Sequence[str]) -> float | None:
            t = rec["times"]
            best = [t[p] for p in peers if t.get(p) is not None]
            if t.get(mine) is None or not best:
                return None
            return t[mine] / min(best)

        def show(xs: list[float | None]) -> str:
            return " / ".join("not reached" if x is None else f"{x:.2f}x" for x in xs)

        cold = [ratio(r, "pipeline command, cold", PEERS_COLD) for r in recs]
        n = len(recs)
        conds = [r["conditions"] for r in recs if r.get("conditions")]  # runs since the protocol's per seed
        flagged = _flagged(conds) if conds else ""
        if rows >= big:
            warm = [ratio(r, "pipeline (warm cluster)", PEERS_WARM) for r in recs]
            for label, xs in (("cold", cold), ("warm", warm)):
                hits = sum(1 for x in xs if x is not None and x < 1.0)
                out.append(
                    Target(
                        "speed",
                        f"{name}, {ds} ({rows:,} training rows, threshold {recs[0]['thr']}): the pipeline first, "
                        f"{label} (time over the fastest peer's)",
                        show(xs) + " per seed",
                        f"below 1.0x in {needed(n)} of {n} seeds",
                        hits >= needed(n),
                        path.name,
                        flagged,
                    )
                )
        else:
            hits = sum(1 for x in cold if x is not None and x <= 1.5)
            out.append(
                Target(
                    "speed",
                    f"{name}, {ds} ({rows:,} training rows, threshold {recs[0]['thr']}): the command cold within "
                    "1.5x of the fastest peer's cold time",
                    show(cold) + " per seed",
                    f"{needed(n)} of {n} seeds",
                    hits >= needed(n),
                    path.name,
                    flagged,
                )
            )
    return out


FED_NAMES = {
    "speed": "rounds/s >= 3x Flower's",
    "accuracy": "accuracy within 1 point of Flower's",
    "memory": "peak memory flat from 100 to 10,000 clients (within 10%)",
}


def federated_targets(results: Path = RESULTS) -> list[Target]:
    got = newest("federated", results)
    if got is None:
        return [_missing("federated", "against Flower", "python -m bench.federated")]
    path, d = got
    flagged = _flagged([p["conditions"] for p in d["passes"] if "conditions" in p])
    largest = max(d.get("clients", [0]))
    out = []
    for key, t in d["targets"].items():
        kind, _, n = key.partition(" ")
        xs = t["per_pass"]
        label = FED_NAMES.get(kind, key)
        if kind == "memory":
            label = f"peak memory flat from 100 to {largest:,} clients (within 10%)"
        unit = "pt" if kind == "accuracy" else "x"
        out.append(
            Target(
                "federated",
                f"{label}{', ' + n.replace('N=', '') + ' clients' if n else ''}",
                _per(xs, unit) + (" points" if unit == "pt" else ""),
                f"{t.get('needed', needed(len(xs)))} of {len(xs)} passes",
                bool(t["met"]),
                path.name,
                flagged,
            )
        )
    return out


CODEC_LIMITS = {"fp16": 0.5, "bf16": 0.5, "int8": 1.0, "topk": 1.0, "topk 10%": 1.0} | {
    f"{c} + replies": limit for c, limit in (("fp16", 0.5), ("bf16", 0.5), ("int8", 1.0))
}
# the rows' names: top-k at its default share of the entries and at 10 times that, both run
# with the same 1-point limit (bench/ps_compression.py, TARGET_POINTS)
CODEC_NAMES = {
    "topk": "topk deltas (1% of the entries)",
    "topk 10%": "topk deltas (10% of the entries, the default)",
} | {f"{c} + replies": f"{c} deltas and replies" for c in ("fp16", "bf16", "int8")}


def compression_targets(results: Path = RESULTS) -> list[Target]:
    got = newest("ps_compression", results, has="accuracy")
    if got is None:
        return [_missing("scale", "compressed deltas: accuracy against float32", "python -m bench.ps_compression")]
    path, d = got
    out = []
    for ds, v in d["accuracy"].items():
        for codec, limit in CODEC_LIMITS.items():
            gaps = [100 * (p["accuracy"]["none"] - p["accuracy"][codec]) for p in v["passes"] if codec in p["accuracy"]]
            if not gaps:
                continue
            out.append(
                Target(
                    "scale",
                    f"{CODEC_NAMES.get(codec, codec + ' deltas')}: accuracy within {limit} points of float32, {ds}",
                    _per(gaps, "pt") + " points below float32 per seed",
                    f"all {len(gaps)} seeds",
                    all(g <= limit for g in gaps),
                    path.name,
                )
            )
    return out


def projection_targets(results: Path = RESULTS, want: int = 64) -> list[Target]:
    """The scaling projection's target: one parameter server is not the bottleneck up to 64 GPU
    workers for the 1M-parameter model at local_steps 8 (worker counts at saturation, per codec)."""
    got = newest("ps_compression", results, has="projection")
    name = f"projection: the parameter server not the bottleneck up to {want} GPU workers, 1M parameters"
    if got is None:
        return [_missing("scale", name, "python -m bench.ps_compression --parts server,projection")]
    path, d = got
    rows = [r for r in d["projection"] if r["model"] == "1M" and r["workers"] == "GPU"]
    # the server-cost runs measure top-k at 1% of the entries (bench.ps_compression)
    figures = "; ".join(
        f"{'topk 1%' if r['codec'] == 'topk' else r['codec']} {r['N 10 GbE']:.1f} / {r['N 100 GbE']:.1f}" for r in rows
    )
    best = max(max(r["N 10 GbE"], r["N 100 GbE"]) for r in rows)
    out = [
        Target(
            "scale",
            name + " (one in-scheduler server; workers at saturation on 10 / 100 GbE, by codec)",
            figures,
            f">= {want} workers with some codec",
            best >= want,
            path.name,
        )
    ]
    f32 = next(r for r in rows if r["codec"] == "none")
    built = f32.get("shards for 64, 8 per host summed, host sum on CPU (estimate)")
    if built is not None:  # runs since combine_pushes: each host's 8 workers push once
        free = f32["shards for 64, 8 per host summed (estimate)"]
        shared = f32.get("host sum ms/push, 8 threads sharing (estimate)")  # runs since the sum is shared
        host, steps = (f32["host sum ms/push (CPU)"] if shared is None else shared), f32["compute ms/push"]
        how = "one thread's sum" if shared is None else "the sum shared by the host's 8 threads"
        built_as = (
            "as built a GPU host runs one process per GPU (the CUDA backend drove one device per process): "
            "nothing to sum"
            if shared is None
            else "a GPU host runs one worker process with a thread per GPU (kernels.cuda.bind_thread); the "
            "shared sum assumes 100 GB/s of host memory bandwidth"
            + (
                f" and needs {f32['host GB/s for the sum within the steps']:.1f} GB/s to stay within the steps"
                if "host GB/s for the sum within the steps" in f32
                else ""
            )
        )
        out.append(
            Target(
                "scale",
                name + " (combine_pushes, 8 workers per host, and a sharded server; estimate, 100 GbE)",
                f"{built} shards with {how} on the host's CPU ({host:.2f} ms a push against "
                f"{steps:.2f} ms of steps); {free} with the sum at GPU speed; {built_as}",
                "a finite shard count with the sum as built, and the sum not slower than the steps",
                isinstance(built, int) and host <= steps and shared is not None,
                path.name,
            )
        )
    return out


def overlap_targets(results: Path = RESULTS) -> list[Target]:
    got = newest("overlap", results)
    if got is None:
        return [_missing("scale", "overlap: accuracy within 0.5 points", "python -m bench.overlap")]
    path, d = got
    out = []
    for ds, v in d["results"].items():
        settings = [k for k in v["passes"][0]["results"] if k != "overlap off"]
        # runs before `overlap_steps` existed had one overlapped row, folded at the next push
        names = {"overlap on": "reply folded in after 1 step" if len(settings) > 1 else "folded at the next push"}
        for setting in settings:
            gaps = [100 * (p["results"]["overlap off"]["acc"] - p["results"][setting]["acc"]) for p in v["passes"]]
            how = names.get(setting, setting.removeprefix("overlap on, "))
            out.append(
                Target(
                    "scale",
                    f"overlap ({how}): accuracy within 0.5 points of the non-overlapped run, {ds}",
                    _per(gaps, "pt") + " points below per seed",
                    f"all {len(gaps)} seeds",
                    all(g <= 0.5 for g in gaps),
                    path.name,
                )
            )
    return out


def out_of_core_targets(results: Path = RESULTS) -> list[Target]:
    """Out of core with memory that binds (a cgroup cap around the workers, or a store of at
    least 2x RAM), at least 2 epochs: the pipeline's peak RSS flat (within 10% over the epochs and
    sizes) and its samples/s against the PyTorch peer streaming the same store, epoch by epoch."""
    name = "out of core, memory binding: the workers' peak RSS flat (within 10%), >= 2 epochs"
    runs = full_runs("out_of_core", results)
    if not runs:
        return [_missing("speed", name, "python -m bench.out_of_core --memory-cap 1.5GiB --sizes 3.5")]

    def binds(d: dict[str, Any]) -> bool:
        return any(r["memory binds?"].startswith("yes") for r in d["rows"])

    # the newest run in which memory bound: a newer run without a cap (a machine without memory
    # cgroups, stores that fit) measures something else and does not hide it
    path, d = next(((p, d) for p, d in runs if binds(d)), runs[0])
    rows = [r for r in d["rows"] if r["memory binds?"].startswith("yes")]
    pipe = [r for r in rows if r["trainer"] == "pipeline"]
    if not pipe:
        return [Target("speed", name, "memory did not bind in the newest run", "", None, path.name)]
    rss = [r["peak RSS MB (max process)"] for r in pipe]
    peer = {(r["store GB (X)"], r["epoch"]): r["samples/s"] for r in rows if r["trainer"] != "pipeline"}
    ratios = [
        r["samples/s"] / peer[(r["store GB (X)"], r["epoch"])] for r in pipe if (r["store GB (X)"], r["epoch"]) in peer
    ]
    figures = (
        f"peak RSS {' / '.join(f'{x:.0f}' for x in rss)} MB per epoch (spread {100 * (max(rss) / min(rss) - 1):.1f}%)"
    )
    if ratios:
        figures += f"; samples/s {_per(ratios)} the PyTorch streaming peer's, per epoch"
    return [
        Target(
            "speed",
            f"{name} ({pipe[0]['memory binds?'][5:]})",
            figures,
            f"{len({r['epoch'] for r in pipe})} epochs, spread <= 10%",
            max(rss) / min(rss) <= 1.1 and len({r["epoch"] for r in pipe}) >= 2,
            path.name,
            _flagged([p["conditions"] for p in d["passes"]]) if d.get("passes") else "",
        )
    ]


def collect(results: Path = RESULTS) -> list[Target]:
    """Every target of every benchmark that states one, newest full runs."""
    return [
        *throughput_targets(results),
        *accuracy_targets(results),
        *cold_start_targets(results),
        *statistical_efficiency_targets(results),
        *time_to_accuracy_targets(results),
        *out_of_core_targets(results),
        *federated_targets(results),
        *compression_targets(results),
        *projection_targets(results),
        *overlap_targets(results),
    ]


def render(targets: Sequence[Target]) -> str:
    met = sum(1 for t in targets if t.met)
    missing = sum(1 for t in targets if t.met is None)
    lines = [
        HEADING,
        "",
        f"{met} of {len(targets)} targets met"
        + (f", {missing} without a full run" if missing else "")
        + ". Built by `python -m bench.targets` from the newest full run of each benchmark under "
        "bench/results/ (the JSON is named in each row); the rule column says how a target is judged, "
        "the last column how many passes were flagged as taken under load (bench/protocol.py).",
        "",
        "| area | target | per pass / per seed | rule | met? | raw figures | under load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in targets:
        verdict = "no run" if t.met is None else ("met" if t.met else "**NOT met**")
        src = f"`{t.source}`" if t.source else "-"
        lines.append(f"| {t.area} | {t.target} | {t.figures} | {t.rule} | {verdict} | {src} | {t.flagged or '-'} |")
    return "\n".join(lines)


HEADING = "## Targets: newest full runs"


def place(doc: str, table: str) -> str:
    """``doc`` (RESULTS.md's text) with its targets section replaced by ``table``, or ``table``
    inserted before the first other section when it has none."""
    lines = doc.splitlines()
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join([*lines[:start], *table.splitlines(), "", *lines[end:]]) + "\n"
    first = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
    return "\n".join([*lines[:first], *table.splitlines(), "", *lines[first:]]) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="directory of the benchmarks' JSON files")
    ap.add_argument("--write", action="store_true", help="replace the targets section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    text = render(collect(Path(args.results)))
    print(text)
    if args.write:
        dest = Path(__file__).resolve().parent / "RESULTS.md"
        dest.write_text(place(dest.read_text() if dest.is_file() else "# Benchmark results\n", text))
        print(f"wrote {dest}")
    return text


if __name__ == "__main__":
    main()
