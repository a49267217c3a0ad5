"""bench.targets: the summary table of targets is read from the raw figures the benchmarks kept."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from bench.protocol import RESULTS
from bench.targets import collect, needed, newest, place, render

KEPT = sorted(f for f in RESULTS.glob("throughput-*.json") if f.stem.split("-")[1][:1].isdigit())


def test_needed_is_four_of_five() -> None:
    assert needed(5) == 4
    assert needed(3) == 3
    assert needed(10) == 8
    assert needed(1) == 1


def test_targets_follow_the_newest_full_run_and_skip_quick_ones(tmp_path: Path) -> None:
    src = KEPT[-1]
    shutil.copy(src, tmp_path / src.name)
    data = json.loads(src.read_text())
    # a newer quick run must not replace the full one
    quick = dict(data, quick=True, targets=[dict(t, met=not t["met"]) for t in data["targets"]])
    (tmp_path / "throughput-29991231T000000Z.json").write_text(json.dumps(quick))
    path, got = newest("throughput", tmp_path)
    assert path.name == src.name
    rows = [t for t in collect(tmp_path) if t.source == src.name]
    # the cold row names the setting it was measured in (no bench.cold_start run with its peer here)
    assert [t.target.split(", measured by bench.throughput: ")[0] for t in rows] == [
        t["target"] for t in data["targets"]
    ]
    assert [t.met for t in rows] == [bool(t["met"]) for t in data["targets"]]
    # every other benchmark has no run in this directory: listed as such, never as met
    others = [t for t in collect(tmp_path) if t.source != src.name]
    assert others and all(t.met is None for t in others)
    text = render(collect(tmp_path))
    assert f"{sum(1 for t in rows if t.met)} of {len(rows) + len(others)} targets met" in text
    assert "no run" in text


def test_a_flipped_pass_changes_the_verdict(tmp_path: Path) -> None:
    src = sorted(RESULTS.glob("cold_start-*.json"))[-1]
    data = json.loads(src.read_text())
    way = data["results"]["in process"]
    # judged on the plain command's overhead over its steady epochs where the run has them,
    # else on the timed run's: set each pass's wall time to give the overhead wanted
    plain = bool(way.get("plain_epochs"))

    def overhead(k: int, x: float) -> None:
        if plain:
            steady = [e["train_s"] for e in way["plain_epochs"][k][1:]]
            way["plain"][k] = x + sum(steady) + statistics.median(steady)
        else:
            way["timed"][k]["overhead_s"] = x

    for k in range(len(way["timed"])):
        overhead(k, 1.5)
    (tmp_path / src.name).write_text(json.dumps(data))
    row = next(t for t in collect(tmp_path) if "in process" in t.target)
    assert row.met is True
    for k in range(2):  # 3 of 5 (or 1 of 3) passes under 2 s
        overhead(k, 2.5)
    (tmp_path / src.name).write_text(json.dumps(data))
    row = next(t for t in collect(tmp_path) if "in process" in t.target)
    assert row.met is False
    assert "2.50 s" in row.figures


def test_a_baseline_run_beside_or_an_extra_way_is_not_a_target(tmp_path: Path) -> None:
    """``bench.cold_start --baseline DIR`` runs an earlier commit's files in the same passes, and
    ``--extra`` labelled extra ways: their figures are kept in the JSON for the comparison but
    judge no target; each of the command's own ways judges one."""
    from bench.cold_start import EXTRA_WAYS, WAYS

    src = sorted(RESULTS.glob("cold_start-*.json"))[-1]
    data = json.loads(src.read_text())
    own = {k: v for k, v in data["results"].items() if k in WAYS}
    assert len(own) == len(WAYS)
    data["results"] = {
        **own,
        **{f"{k} (baseline)": v for k, v in own.items()},
        **{k: own["in process"] for k in EXTRA_WAYS},
    }
    (tmp_path / src.name).write_text(json.dumps(data))
    rows = [t for t in collect(tmp_path) if t.source == src.name]
    # each own way judges the 2 s overhead, and with the PyTorch peer the 1.0x whole process too
    assert len([t for t in rows if "under 2 s" in t.target]) == len(WAYS)
    assert len(rows) == len(WAYS) * (2 if data.get("peer") else 1)
    assert not any("baseline" in t.target or "blas_threads" in t.target for t in rows)


def _cold_run(plain: dict[str, list[float]], peer: list[float], flags: list[list[str]]) -> dict:
    """A bench.cold_start run's raw figures, as few as the targets read: per way the plain
    command's seconds per pass, the PyTorch peer's per pass and the conditions' flags."""
    epochs = [{"train_s": 1.0}, {"train_s": 1.0}]
    return {
        "meta": {"host": {"cores": 2}},
        "quick": False,
        "rows": 60_000,
        "features": 784,
        "epochs": 5,
        "results": {
            way: {"plain": walls, "plain_epochs": [epochs] * len(walls), "timed": [{"overhead_s": 1.0}] * len(walls)}
            for way, walls in plain.items()
        },
        "passes": [{"pass": k + 1, "order": [], "conditions": {"flags": f}} for k, f in enumerate(flags)],
        "peer": {"name": "pytorch best practice", "runs": [{"wall_s": w} for w in peer]},
    }


def test_the_cold_row_is_judged_on_the_cold_start_run_with_its_pytorch_peer(tmp_path: Path) -> None:
    """With a bench.cold_start run that has the PyTorch whole-process peer, the row "pipeline
    train process >= 1.0x PyTorch's process" is judged there, per pass PyTorch's seconds over the
    plain command's, for the default way (in process) and --workers 2, 4 of 5 passes; the
    throughput run's cold row gives way. Without one the throughput row stays, naming its store."""
    from bench.targets import COLD_ROW

    src = sorted(RESULTS.glob("throughput-2*.json"))[-1]
    shutil.copy(src, tmp_path / src.name)
    data = json.loads(src.read_text())
    (fallback,) = [t for t in collect(tmp_path) if t.target.startswith(COLD_ROW)]
    assert fallback.source == src.name
    assert f"measured by bench.throughput: {data['rows']:,} x 784 store" in fallback.target
    assert f"{data['epochs']} epochs, a 2-worker cluster" in fallback.target
    flags = [[], ["steal 3.0%"], [], [], []]
    # in process: PyTorch slower in 4 of 5 passes (met); 2 workers: in 3 of 5 (not met)
    run = _cold_run(
        {"in process": [6.0, 6.0, 6.0, 6.0, 8.0], "2 workers": [6.0, 6.0, 6.0, 8.0, 8.0]},
        [7.5, 6.0, 9.0, 6.6, 7.2],
        flags,
    )
    (tmp_path / "cold_start-29991231T000000Z.json").write_text(json.dumps(run))
    rows = [t for t in collect(tmp_path) if t.target.startswith(COLD_ROW)]
    assert [t.source for t in rows] == ["cold_start-29991231T000000Z.json"] * 2
    inproc, two = rows
    assert "the plain command: in process below cluster_min_rows, 5 epochs of 60,000 x 784" in inproc.target
    assert "`--workers 2`, 5 epochs of 60,000 x 784" in two.target
    assert inproc.figures.startswith("1.25x / 1.00x / 1.50x / 1.10x / 0.90x")
    assert two.figures.startswith("1.25x / 1.00x / 1.50x / 0.82x / 0.90x")
    assert (inproc.met, two.met) == (True, False)
    assert inproc.rule == "4 of 5 passes" and inproc.flagged == "1 of 5"
    # a newer run without the peer (torch not installed) does not hide it; a quick one neither
    (tmp_path / "cold_start-29991231T000001Z.json").write_text(json.dumps(dict(run, peer=None)))
    (tmp_path / "cold_start-29991231T000002Z.json").write_text(
        json.dumps(dict(_cold_run({"in process": [9.0] * 5, "2 workers": [9.0] * 5}, [1.0] * 5, flags), quick=True))
    )
    again = [t for t in collect(tmp_path) if t.target.startswith(COLD_ROW)]
    assert [(t.source, t.met) for t in again] == [(t.source, t.met) for t in rows]


def test_cold_start_overhead_counts_the_first_epochs_warm_up() -> None:
    from bench.cold_start import steady_overhead

    epochs = [{"train_s": 3.0}, {"train_s": 2.0}, {"train_s": 2.2}, {"train_s": 1.9}]
    # 10 s of process: epochs 2-4 trained for 6.1 s and the first would have taken a steady 2.0 s,
    # so 1.9 s were start-up, the first epoch's warm-up and bookkeeping
    assert abs(steady_overhead(10.0, epochs) - (10.0 - 6.1 - 2.0)) < 1e-12
    assert steady_overhead(10.0, epochs[:1]) is None


def test_the_kept_results_render() -> None:
    text = render(collect())
    assert text.startswith("## Targets: newest full runs")
    assert "| speed | steady: pipeline >= 1.3x PyTorch best practice |" in text


def test_place_replaces_only_its_own_section() -> None:
    doc = "# Benchmark results\n\nMachine: x\n\n## Summary\n\ntext\n"
    once = place(doc, "## Targets: newest full runs\n\n| a |")
    assert once.index("## Targets") < once.index("## Summary")
    twice = place(once, "## Targets: newest full runs\n\n| b |")
    assert "| a |" not in twice and "| b |" in twice
    assert twice.count("## Targets") == 1 and "## Summary\n\ntext" in twice


def row_params(row: dict) -> int:
    from bench.ps_compression import MODELS, n_params

    return n_params(MODELS[row["model"]])


def test_the_summed_projection_is_judged_on_the_sum_as_built(tmp_path: Path) -> None:
    """With combine_pushes' columns (runs since it exists) a second projection row appears: met
    only when the shard estimate with the host's sum on its CPU, as built, is a finite count and
    that sum takes no longer than the GPU worker's steps; and only from runs since a GPU host's
    threads share the sum (each on its own GPU): before, a GPU host had nothing to sum."""
    from bench.ps_compression import projection
    from bench.targets import projection_targets

    kept = sorted(RESULTS.glob("ps_compression-2*.json"))
    src = [f for f in kept if "projection" in (d := json.loads(f.read_text())) and "summed" not in d][-1]
    d = json.loads(src.read_text())
    assert "shards for 64, 8 per host summed, host sum on CPU (estimate)" not in d["projection"][0]
    shutil.copy(src, tmp_path / src.name)
    assert len(projection_targets(tmp_path)) == 1  # a run from before: the single-server row only
    # the GPU worker's 8 steps take 1.35 ms; one thread's sum of 8 deltas of 1e6 1 or 40 ms; shared
    # by 8 threads 1/8 of it, but no less than 36 MB at the assumed 100 GB/s (0.39 ms for 1M)
    for host_ms, shared, met in ((1.0, False, False), (1.0, True, True), (40.0, True, False)):
        summed = [{"params": 10**6, "co-sender ms": 0.01, "host sum ms": host_ms}]
        if shared:
            summed[0]["host sum, 2 threads sharing ms"] = host_ms / 2
        newer = dict(d, projection=projection(d["server"], d["cpu_step"], d.get("encode"), summed))
        row = next(r for r in newer["projection"] if r["model"] == "1M" and r["workers"] == "GPU")
        assert ("host sum ms/push, 8 threads sharing (estimate)" in row) is shared
        if shared:
            floor = 1e3 * 4.0 * row_params(row) * 9 / 100e9
            want = max(host_ms * row_params(row) / 1e6 / 8, floor)
            assert abs(row["host sum ms/push, 8 threads sharing (estimate)"] - want) < 1e-9
        (tmp_path / "ps_compression-29991231T000000Z.json").write_text(json.dumps(newer))
        one, two = projection_targets(tmp_path)
        assert one.met is False and two.met is met
        assert ("the sum shared by the host's 8 threads" in two.figures) is shared
        assert ("one process per GPU" in two.figures) is not shared
    summed = [{"params": 10**6, "co-sender ms": 0.01, "host sum ms": 1.0, "host sum, 2 threads sharing ms": 0.5}]
    # a per-message cost above the budget with 8 per host: "never", not met
    slow = [dict(r, **{"sched ms/push (process)": 50.0}) if r["params"] == 10_000 else r for r in d["server"]]
    newer = dict(d, projection=projection(slow, d["cpu_step"], d.get("encode"), summed))
    (tmp_path / "ps_compression-29991231T000000Z.json").write_text(json.dumps(newer))
    assert projection_targets(tmp_path)[1].met is False


def test_top_k_is_judged_at_each_share_of_the_entries_it_ran_at(tmp_path: Path) -> None:
    """The compression rows come from each seed's gap to float32 in the same seed: top-k at 1% and
    at its default 10% are separate rows under the same limit; a codec a run lacks has none."""
    from bench.targets import compression_targets

    def seed(s: int, topk: float, topk10: float) -> dict:
        return {"seed": s, "accuracy": {"none": 0.80, "fp16": 0.799, "topk": topk, "topk 10%": topk10}}

    run = {"accuracy": {"letter": {"passes": [seed(0, 0.70, 0.795), seed(1, 0.72, 0.81), seed(2, 0.75, 0.805)]}}}
    (tmp_path / "ps_compression-20990101T000000Z.json").write_text(json.dumps(run))
    rows = {t.target: t for t in compression_targets(tmp_path)}
    assert set(rows) == {
        "fp16 deltas: accuracy within 0.5 points of float32, letter",
        "topk deltas (1% of the entries): accuracy within 1.0 points of float32, letter",
        "topk deltas (10% of the entries, the default): accuracy within 1.0 points of float32, letter",
    }
    assert rows["fp16 deltas: accuracy within 0.5 points of float32, letter"].met
    assert not rows["topk deltas (1% of the entries): accuracy within 1.0 points of float32, letter"].met
    ten = rows["topk deltas (10% of the entries, the default): accuracy within 1.0 points of float32, letter"]
    assert ten.met and ten.figures == "+0.50 / -1.00 / -0.50 points below float32 per seed"
    # one seed 1.5 points below float32: not met
    run["accuracy"]["letter"]["passes"][1]["accuracy"]["topk 10%"] = 0.785
    (tmp_path / "ps_compression-20990101T000000Z.json").write_text(json.dumps(run))
    rows = {t.target: t for t in compression_targets(tmp_path)}
    assert not rows["topk deltas (10% of the entries, the default): accuracy within 1.0 points of float32, letter"].met


def test_out_of_core_is_judged_on_the_newest_run_in_which_memory_bound(tmp_path: Path) -> None:
    """A newer run in which memory did not bind (no cgroup on the machine, stores that fit) does
    not hide the run that measured what the target asks; its passes' flags are counted."""
    import json

    from bench.targets import out_of_core_targets

    def rows(binds: str, rss: tuple[float, float]) -> list[dict]:
        out = []
        for epoch, mb in enumerate(rss, 1):
            common = {"store GB (X)": 3.3, "epoch": epoch, "memory binds?": binds}
            out.append({**common, "trainer": "pipeline", "peak RSS MB (max process)": mb, "samples/s": 100.0})
            out.append({**common, "trainer": "pytorch", "peak RSS MB (max process)": 900.0, "samples/s": 40.0})
        return out

    cond = {"flags": ["other processes 1.10 cores"]}
    bound = {"rows": rows("yes (cap 1.5 GiB)", (430.0, 436.0)), "passes": [{"conditions": cond}]}
    loose = {"rows": rows("no: the store fits in RAM", (300.0, 900.0))}
    (tmp_path / "out_of_core-20261201T000000Z.json").write_text(json.dumps(bound))
    (tmp_path / "out_of_core-20261202T000000Z.json").write_text(json.dumps(loose))
    [row] = out_of_core_targets(tmp_path)
    assert row.source == "out_of_core-20261201T000000Z.json" and row.met is True, row
    assert row.flagged == "1 of 1" and "2.50x / 2.50x" in row.figures, row
    (tmp_path / "out_of_core-20261201T000000Z.json").unlink()
    [row] = out_of_core_targets(tmp_path)  # only the loose run left: said so, not judged
    assert row.met is None and row.figures == "memory did not bind in the newest run", row
