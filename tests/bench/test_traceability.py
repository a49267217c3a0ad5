"""Every figure the results documents quote is traceable: the JSON they name is kept, the commands
they quote take the flags they show, the targets table is what ``python -m bench.targets`` prints
from the kept raw figures, and a target's figures say what the raw figures hold."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
from pathlib import Path

import pytest

from bench.protocol import RESULTS
from bench.targets import HEADING, collect, render, statistical_efficiency_targets

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "bench" / "RESULTS.md", ROOT / "bench" / "README.md", ROOT / "README.md"]
NAMED = re.compile(r"\b([a-z][a-z_-]*-\d{8}T\d{6}Z\.json)")
COMMAND = re.compile(r"python -m (bench(?:\.\w+)?)([^`\n|;)]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def named_json(text: str) -> set[str]:
    return set(NAMED.findall(text))


def test_the_name_pattern_finds_what_the_documents_write() -> None:
    text = "Raw figures: `bench/results/throughput-20261203T041301Z.json`; (`cold_start-20261202T234118Z.json`)"
    assert named_json(text) == {"throughput-20261203T041301Z.json", "cold_start-20261202T234118Z.json"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_json_a_document_names_is_kept(doc: Path) -> None:
    missing = sorted(n for n in named_json(doc.read_text()) if not (RESULTS / n).is_file())
    assert missing == []


def _help(module: str) -> str:
    mod = importlib.import_module("bench.__main__" if module == "bench" else module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        mod.main(["--help"])
    return out.getvalue()


def quoted_commands(text: str) -> list[tuple[str, list[str]]]:
    return [(m.group(1), FLAG.findall(m.group(2))) for m in COMMAND.finditer(text)]


def test_the_command_pattern_reads_module_and_flags() -> None:
    got = quoted_commands("run `python -m bench.cold_start --epochs 5 --passes 5 --extra` (23:37 UTC)")
    assert got == [("bench.cold_start", ["--epochs", "--passes", "--extra"])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_command_takes_the_flags_it_shows(doc: Path) -> None:
    helps: dict[str, str] = {}
    unknown = []
    for module, flags in quoted_commands(doc.read_text()):
        if module not in helps:
            helps[module] = _help(module)
        shown = set(FLAG.findall(helps[module]))
        unknown += [f"{module} {f}" for f in flags if f not in shown]
    assert unknown == []


def test_the_targets_table_in_results_md_is_what_bench_targets_prints() -> None:
    lines = (ROOT / "bench" / "RESULTS.md").read_text().splitlines()
    start = lines.index(HEADING)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    assert "\n".join(lines[start:end]).strip() == render(collect()).strip()


def _efficiency_run(two: list[int | None], one: list[int | None]) -> dict:
    passes = [
        {
            "results": {
                "1 process [ema=0]": {"epochs_to_threshold": b},
                "2 workers [ema=0]": {"epochs_to_threshold": a},
            },
            "conditions": {"flags": []},
        }
        for a, b in zip(two, one, strict=True)
    ]
    return {
        "quick": False,
        "results": {"synthetic": {"threshold": 0.595, "references": {"ema=0": "1 process [ema=0]"}, "passes": passes}},
    }


def test_a_seed_only_the_two_workers_reached_is_not_shown_as_not_reached(tmp_path: Path) -> None:
    """The 2-worker run reached the threshold in 3 epochs where one process never did: the
    figure says so instead of "not reached", and the target (a ratio per seed) stays NOT met."""
    data = _efficiency_run(two=[None, None, 3], one=[None, 7, None])
    (tmp_path / "statistical_efficiency-20261201T203140Z.json").write_text(json.dumps(data))
    (row,) = statistical_efficiency_targets(tmp_path)
    cells = row.figures.removesuffix(" per seed").split(" / ")
    assert cells == [
        "neither reached",
        "2 workers not reached, one process 7 epochs",
        "2 workers 3 epochs, one process not reached",
    ]
    assert row.met is False


def test_seeds_both_reached_are_ratios_and_judged_on_their_median(tmp_path: Path) -> None:
    data = _efficiency_run(two=[19, 20, 19], one=[15, 16, 16])
    (tmp_path / "statistical_efficiency-20261202T075430Z.json").write_text(json.dumps(data))
    (row,) = statistical_efficiency_targets(tmp_path)
    assert row.figures.startswith("1.27x / 1.25x / 1.19x per seed (median 1.25x")
    assert row.met is True


def test_the_encoding_cost_table_names_the_top_k_share_it_measured() -> None:
    """The encoding costs are measured with top-k at ``COST_TOPK_FRACTION`` of the entries; the
    table's header says that share, and calls it the default only when the configuration's is."""
    from bench.ps_compression import COST_TOPK_FRACTION, encode_note
    from pipeline.config import TrainConfig

    note = encode_note()
    assert f"top-k at {COST_TOPK_FRACTION:.0%} of the entries" in note
    assert ("the default" in note) == (COST_TOPK_FRACTION == TrainConfig().topk_fraction)
