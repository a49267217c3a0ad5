"""bench.throughput's cold runs: every trainer row gets one, a fresh process from the training
store to a saved model that loads, in the same pass as its steady run."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import throughput as tp
from bench.common import arrays, mnist_like

HIDDEN, BATCH, EPOCHS, CLASSES = (16,), 64, 1, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny training and test stores, their arrays and the trainers built on them (none run yet)."""
    tmp = tmp_path_factory.mktemp("tp-cold")
    train, test = mnist_like(tmp, 1_000, 200, features=12, classes=CLASSES)
    Xtr, ytr = arrays(train)
    Xte, yte = arrays(test, like=train)
    data = {"Xtr": Xtr, "ytr": ytr, "Xte": Xte, "yte": yte}
    info: dict[str, Any] = {
        "torch": importlib.util.find_spec("torch") is not None,
        "dask_ml": importlib.util.find_spec("dask_ml") is not None,
        "adam": {"kind": "foreach"},
        "compile": None,
    }
    if info["torch"]:
        from bench.torch_peers import compile_works

        info["compile"] = compile_works((12, *HIDDEN, CLASSES))
    fns = tp.trainers(train, test, tmp, data, HIDDEN, BATCH, EPOCHS, CLASSES, True, info)
    return {"tmp": tmp, "train": train, "test": test, "data": data, "info": info, "fns": fns}


def _sizes(setup: dict[str, Any]) -> tuple[int, ...]:
    return (setup["data"]["Xtr"].shape[1], *HIDDEN, CLASSES)


def test_every_trainer_row_has_a_cold_run(setup: dict[str, Any]) -> None:
    fns = setup["fns"]
    expected = {*tp.PIPELINE_ROWS, tp.MEMORY, tp.SKLEARN}
    if setup["info"]["torch"]:
        expected |= {tp.BEST, tp.BEST_EMA, tp.TUTORIAL, tp.DDP}
        if setup["info"]["compile"] is None:
            expected.add(tp.COMPILED)
    if setup["info"]["dask_ml"]:
        expected |= {tp.DML_TUNED, tp.DML_USER}
    assert set(fns) == expected
    runs = {name: getattr(fn, "cold", None) for name, fn in fns.items()}
    assert all(isinstance(r, tp.ColdRun) for r in runs.values()), runs
    # each row's own process, saving its own model, all from the same training store
    assert len({r.model for r in runs.values()}) == len(runs)
    assert all(str(setup["train"].path) in r.command for r in runs.values())
    # the two-process peer starts from the store, not from an .npz of the arrays
    if tp.DDP in runs:
        assert "ddp-store" in runs[tp.DDP].command
        assert not any(a.endswith(".npz") for a in runs[tp.DDP].command)
    # without cold runs the rows are the steady runs alone
    info = setup["info"]
    bare = tp.trainers(
        setup["train"], setup["test"], setup["tmp"], setup["data"], HIDDEN, BATCH, EPOCHS, CLASSES, False, info
    )
    assert set(bare) == set(fns) and not any(hasattr(fn, "cold") for fn in bare.values())


def _cold(setup: dict[str, Any], name: str) -> dict[str, Any]:
    r = tp.run_cold(setup["fns"][name].cold)
    assert r.get("cold error") is None, r
    assert isinstance(r["cold"], float) and r["cold"] > 0
    assert Path(r["cold model"]).is_file()
    assert r["cold acc"] is not None and 0.0 <= r["cold acc"] <= 1.0
    return r


def test_a_failed_cold_process_leaves_its_reason(tmp_path: Path) -> None:
    fail = [sys.executable, "-c", "import sys; sys.exit('cannot read the store')"]
    run = tp.ColdRun(fail, dict(os.environ), tmp_path / "m.pt", tmp_path / "m.pt")
    r = tp.run_cold(run)
    assert r["cold"] is None and r["cold error"] == "exit 1: cannot read the store"
    passes = [{"pass": 1, "results": {"a": {"seconds": 1.0, **r}, "b": {"seconds": 1.0, "cold": 2.5}}}]
    missing = tp.cold_missing(passes)
    assert missing == {"a": "pass 1: exit 1: cannot read the store"}
    assert "* a: pass 1: exit 1: cannot read the store" in tp.cold_lines(missing)
    assert tp.cold_lines({}) == []
    assert tp.cold_missing(passes, cold=False)["a"] == "not run (--no-cold)"


def _n_params(sizes: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_and_in_process_rows_cold(setup: dict[str, Any]) -> None:
    from bench.protocol import run_passes
    from pipeline.config import TrainConfig
    from pipeline.model import load_model

    fns, sizes = setup["fns"], _sizes(setup)
    # two rows through a pass as the benchmark runs them: steady, then cold, into the table
    recs = run_passes({tp.DEFAULT: fns[tp.DEFAULT], tp.MEMORY: fns[tp.MEMORY]}, 1, cores=2, peak_n=64)
    n_samples = EPOCHS * len(setup["data"]["Xtr"])
    rows, _ = tp.summarize(recs, n_samples, tp._flops(sizes))
    assert {r["trainer"] for r in rows} == {tp.DEFAULT, tp.MEMORY}
    assert all(isinstance(r["cold s (median)"], float) for r in rows), rows
    assert tp.cold_missing(recs) == {}
    models = {n: recs[0]["results"][n]["cold model"] for n in (tp.DEFAULT, tp.MEMORY)}
    for name in (tp.EMA0, tp.TCP, tp.OVERLAP, tp.SKLEARN):
        models[name] = _cold(setup, name)["cold model"]
    # the pipeline rows: model files of `pipeline train` with each row's settings
    want = {
        tp.DEFAULT: {"ema": TrainConfig().ema},
        tp.EMA0: {"ema": 0.0},
        tp.TCP: {"ps_shared_memory": False},
        tp.OVERLAP: {"overlap": True, "overlap_steps": 1},
    }
    for name, settings in want.items():
        model = load_model(models[name])
        assert model.params.size == _n_params(sizes)
        assert {k: model.config[k] for k in settings} == settings, name
    saved = np.load(models[tp.MEMORY])
    assert saved["params"].size == _n_params(sizes) and tuple(saved["sizes"]) == sizes
    with open(models[tp.SKLEARN], "rb") as f:
        est = pickle.load(f)
    assert est.predict_proba(setup["data"]["Xte"]).shape == (len(setup["data"]["Xte"]), CLASSES)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pytorch_rows_cold(setup: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    from bench.torch_peers import build_model

    names = [n for n in (tp.BEST, tp.BEST_EMA, tp.TUTORIAL, tp.COMPILED, tp.DDP) if n in setup["fns"]]
    assert tp.DDP in names and tp.BEST in names
    for name in names:
        state = torch.load(_cold(setup, name)["cold model"], weights_only=True)
        model = build_model(_sizes(setup))
        model.load_state_dict(state)  # strict: every layer, every shape
        out = model(torch.from_numpy(setup["data"]["Xte"]))
        assert tuple(out.shape) == (len(setup["data"]["Xte"]), CLASSES), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dask_ml_rows_cold(setup: dict[str, Any]) -> None:
    pytest.importorskip("dask_ml")
    for name in (tp.DML_TUNED, tp.DML_USER):
        with open(_cold(setup, name)["cold model"], "rb") as f:
            est = pickle.load(f)
        assert est.predict_proba(setup["data"]["Xte"]).shape == (len(setup["data"]["Xte"]), CLASSES), name
