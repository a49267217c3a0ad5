"""Federated training on a real deployment: `dask scheduler --preload pipeline.ps`, one
`dask worker --resources SITE=1` per site and a worker of no site, `pipeline train --sites` as a
subprocess, all on 127.0.0.1.

What keeps each site's rows on its own workers, checked here: a site's store is named in the
sites file by a *relative* path (``a.zarr``) that exists only in the working directory of that
site's worker. Every process runs as the same user, so file permissions cannot separate them;
paths can: the driver, the scheduler, the worker of no site and the other site's worker all run
in directories where that path does not exist, so a task routed anywhere but to the site's own
workers, or the driver or scheduler opening a store, fails loudly with "store 'a.zarr' does not
exist" instead of training. Training succeeding thus proves that every read of a site's rows
happened on that site's workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.checkpoint import load_file
from tests.processes import PIPELINE, ROOT, Procs, wait_for

from .conftest import error_line, fault_procs, finish, history

LETTER = ROOT / "data" / "letter" / "letter-recognition.data"
FAST = ("--set", "hidden=[64]", "--set", "lr=3e-3", "--set", "ema=0", "--set", "batch_size=128", "--set", "patience=0")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """letter-recognition's training rows split in two (IID: the file is in random order),
    each half in its site's own directory; the pooled rows and the test rows beside them."""
    from pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("fed")
    homes = {"a": root / "home-a", "b": root / "home-b"}
    for h in homes.values():
        h.mkdir()
    a = ingest(str(LETTER), homes["a"] / "a.zarr", target=0, rows="0:8000")
    ingest(str(LETTER), homes["b"] / "b.zarr", target=0, rows="8000:16000", like=a.path)
    ingest(str(LETTER), root / "full.zarr", target=0, rows="0:16000", like=a.path)
    ingest(str(LETTER), root / "test.zarr", target=0, rows="16000:", like=a.path)
    from pipeline.synth import synth

    # another schema: 16 features as letter, but 4 classes named otherwise
    homes["z"] = root / "home-z"
    homes["z"].mkdir()
    synth(str(homes["z"] / "z.zarr"), rows=2000, features=16, classes=4, seed=1)
    return {**homes, "root": root}


def _sites_file(path: Path, **stores: str) -> Path:
    path.write_text("".join(f'[sites.{name}]\nstore = "{store}"\n' for name, store in stores.items()))
    return path


def _site_worker(procs: Procs, addr: str, site: str, home: Path, name: str) -> None:
    procs.worker(addr, name, "--resources", f"{site}=1", nanny=False, cwd=home)


def _federated(procs: Procs, addr: str, sites_file: Path, out: Path, *args: str):
    return procs.start(
        "train", [PIPELINE, "train", "--sites", str(sites_file), "--scheduler", addr, "--out", str(out), *args]
    )


def _accuracy(model_dir: Path, store: Path) -> float:
    from pipeline.model import load_model
    from pipeline.store import open_store
    from tests.pipeline.helpers import read_all

    X, y = read_all(open_store(store))
    return float(np.mean(load_model(model_dir).predict_index(X) == y))


def _ckpt_history(run: Path) -> list[dict]:
    try:
        return list(load_file(run / "checkpoint.npz", "checkpoint")[1]["history"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return []


@pytest.fixture(scope="module")
def cluster(sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A scheduler, one worker per site (a, b, z) in its own directory, and a worker of no site."""
    p = fault_procs(tmp_path_factory.mktemp("fedcluster"))
    try:
        _, addr = p.scheduler()
        for s in ("a", "b", "z"):
            _site_worker(p, addr, s, sites[s], f"site-{s}")
        p.worker(addr, "nosite", nanny=False)
        yield p, addr
    finally:
        p.close()


@pytest.mark.timeout(300)
def test_iid_sites_reach_the_pooled_accuracy_and_resume_at_the_next_round(cluster, sites, tmp_path) -> None:
    procs, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr")
    run = tmp_path / "run"
    rounds = 60
    train = _federated(procs, addr, sf, run, "--set", f"rounds={rounds}", *FAST)
    out = finish(train, 240)
    assert train.popen.returncode == 0, out[-3000:]
    h = history(run)
    assert [e["round"] for e in h["epochs"]] == list(range(rounds))
    odd = [e for e in h["epochs"] if not (e["sampled"] == e["responded"] == ["a", "b"] and e["applied"])]
    assert not odd, (odd[:3], out[-3000:])
    assert {t["site"]: t["worker"] for t in h["epochs"][-1]["tasks"]}.keys() == {"a", "b"}
    last = h["epochs"][-1]
    assert set(last["sites"]) == {"a", "b"} and all(v["n"] == 800 for v in last["sites"].values())
    assert last["site_worst_decile"] <= last["site_mean"] + 1e-12
    assert "round 60/60: sampled a, b; responded a, b; applied" in out

    # the same model trained on the pooled rows in one process (same settings, as many passes)
    from pipeline.config import TrainConfig
    from pipeline.train import train as pooled_train

    cfg = TrainConfig(hidden=[64], lr=3e-3, ema=0, batch_size=128, patience=0, epochs=rounds)
    pooled = pooled_train(str(sites["root"] / "full.zarr"), cfg, tmp_path / "pooled", client=None)
    fed_acc = _accuracy(run, sites["root"] / "test.zarr")
    pooled_acc = _accuracy(pooled.run_dir, sites["root"] / "test.zarr")
    assert fed_acc >= pooled_acc - 0.02, (fed_acc, pooled_acc)

    # --resume continues at the next round, sampling as before
    resumed = procs.start(
        "resume", [PIPELINE, "train", "--out", str(run), "--resume", "--scheduler", addr, "--set", "rounds=62"]
    )
    out = finish(resumed, 120)
    assert resumed.popen.returncode == 0, out[-3000:]
    h2 = history(run)
    assert [e["round"] for e in h2["epochs"]] == list(range(62))
    assert h2["epochs"][:rounds] == h["epochs"]
    assert "round 61/62" in out and "round 1/" not in out

    # a resume with another sites file is refused
    moved = _sites_file(tmp_path / "moved.toml", a="a.zarr", b="elsewhere/b.zarr")
    refused = _federated(procs, addr, moved, run, "--resume", "--set", "rounds=64")
    out = finish(refused, 60)
    assert refused.popen.returncode == 1
    assert "names other sites or store paths than the run" in error_line(out)

    # a resume with no rounds left to train is refused before a round starts, naming the fix
    again = _federated(procs, addr, sf, run, "--resume")
    out = finish(again, 60)
    assert again.popen.returncode == 1
    assert error_line(out).endswith(
        "already has 62 round(s) and their model, so rounds = 62 trains nothing; "
        "to train more, resume with --set rounds=N, N > 62"
    ), out[-2000:]
    assert history(run) == h2  # nothing rewritten


@pytest.mark.timeout(120)
def test_a_site_whose_schema_differs_is_refused_before_training(cluster, tmp_path) -> None:
    procs, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", z="z.zarr")
    run = tmp_path / "run"
    train = _federated(procs, addr, sf, run, "--set", "rounds=3", *FAST)
    out = finish(train, 90)
    assert train.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert line.startswith("error: site 'z' does not match site 'a': its store has the classes"), line
    assert "--like" in line
    assert not (run / "checkpoint.npz").exists()


@pytest.mark.timeout(120)
def test_a_store_path_only_another_site_can_resolve_fails_loudly(cluster, tmp_path) -> None:
    """The leak check itself: site b pointed at a's relative path fails, naming the site."""
    procs, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="a.zarr")
    train = _federated(procs, addr, sf, tmp_path / "run", "--set", "rounds=2", *FAST)
    out = finish(train, 90)
    assert train.popen.returncode == 1, out[-3000:]
    line = error_line(out)
    assert "site 'b' cannot read its store 'a.zarr'" in line and "does not exist" in line, line


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_site_is_left_out_until_a_new_worker_for_it_starts(sites, tmp_path, mode) -> None:
    procs = fault_procs(tmp_path / "procs")
    try:
        _, addr = procs.scheduler()
        procs.worker(addr, "site-a", "--resources", "a=1", nanny=False, cwd=sites["a"])
        procs.worker(addr, "site-b", "--resources", "b=1", nanny=False, cwd=sites["b"])
        sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr")
        run = tmp_path / "run"
        train = _federated(
            procs,
            addr,
            sf,
            run,
            "--set",
            "rounds=100000",
            "--set",
            "round_deadline=3",
            "--set",
            "min_responses=0.5",
            "--set",
            "no_worker_timeout=60",
            "--set",
            f"mode={mode}",
            *FAST,
        )
        wait_for(lambda: len(_ckpt_history(run)) >= 3 or not train.alive(), 150, "three rounds")
        assert train.alive(), train.text()
        killed_at = len(_ckpt_history(run))
        procs.procs[2].kill()  # site b's only worker

        def without_b() -> bool:
            return any(e["sampled"] == ["a"] for e in _ckpt_history(run)[killed_at:]) or not train.alive()

        wait_for(without_b, 60, "a round without site b")
        assert train.alive(), train.text()
        back_at = len(_ckpt_history(run))
        procs.worker(addr, "site-b-again", "--resources", "b=1", nanny=False, cwd=sites["b"])

        def b_again() -> bool:
            return any("b" in e["responded"] for e in _ckpt_history(run)[back_at:]) or not train.alive()

        wait_for(b_again, 60, "site b responding again")
        assert train.alive(), train.text()
        t0 = time.monotonic()
        os.killpg(train.popen.pid, signal.SIGTERM)  # checkpoint and stop
        out = finish(train, 60)
        assert train.popen.returncode == 143, out[-3000:]
        assert time.monotonic() - t0 < 30
        hist = _ckpt_history(run)
        assert [e["round"] for e in hist] == list(range(len(hist)))  # no round lost, none twice
        # a's response is always enough (min_responses 0.5): every round that heard from a site
        # applied; a sync round that heard from none before its 3 s deadline (a's task late on a
        # loaded machine) is discarded, which is no loss of a response
        rounds = [(e["round"], e["sampled"], e["responded"], e["applied"]) for e in hist]
        assert all(e["applied"] for e in hist if e["responded"]), rounds
        assert sum(e["applied"] for e in hist) >= len(hist) // 2, rounds
        gone = [e for e in hist[killed_at:] if "b" not in e["responded"]]
        assert gone and all(e["responded"] == ["a"] for e in gone)
        assert "no response from b" in out or any(e["sampled"] == ["a"] for e in gone)
        assert "b" in hist[-1]["responded"] or any("b" in e["responded"] for e in hist[back_at:])
        from pipeline.train import RunDir

        hint = RunDir(run).missing_model()  # what `pipeline evaluate RUN ...` says of it
        assert hint is not None and f"pipeline train --sites {sf} --out {run} --resume" in hint
    finally:
        procs.close()


@pytest.mark.timeout(240)
def test_estimator_fits_sites_on_its_own_cluster_of_one_worker_per_site(sites, cluster) -> None:
    from distributed import Client

    from pipeline.estimator import MLPClassifier

    stores = {"a": str(sites["a"] / "a.zarr"), "b": str(sites["b"] / "b.zarr")}
    _, addr = cluster
    with Client(addr, timeout=10, set_as_default=False) as c:  # workers of sites a, b, z only
        with pytest.raises(ValueError, match=r"has no worker declaring resource\(s\) q; start one per site"):
            MLPClassifier(client=c).fit({"a": stores["a"], "q": stores["b"]})
    with pytest.raises(ValueError, match="each site's store holds its own targets; pass y=None"):
        MLPClassifier().fit(stores, [0, 1])
    clf = MLPClassifier(
        hidden_layer_sizes=(32,), max_iter=4, n_iter_no_change=0, learning_rate_init=3e-3, options={"ema": 0}
    )
    clf.fit(stores)
    assert clf.fitted_on_ == "sites" and clf.n_iter_ == 4 and len(clf.classes_) == 26
    assert [h["responded"] for h in clf.history_] == [["a", "b"]] * 4
    from pipeline.store import open_store
    from tests.pipeline.helpers import read_all

    X, y = read_all(open_store(sites["root"] / "test.zarr"))
    assert np.mean(clf.predict(X) == clf.classes_[y]) > 0.3  # 4 rounds of 2 sites: learning


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "settings, optimizer",
    [
        ({"strategy": "fedavgm", "server_momentum": 0.5}, "momentum"),
        ({"strategy": "fedprox", "proximal_mu": 0.01, "aggregator": "trimmed_mean"}, "sgd"),
        ({"strategy": "fedadam", "server_lr": 0.01}, "fedadam"),
        ({"strategy": "fedyogi", "server_lr": 0.01, "aggregator": "median"}, "yogi"),
        ({"strategy": "fedadagrad", "server_lr": 0.1}, "adagrad"),
    ],
)
def test_every_strategy_trains_with_its_server_optimizer(cluster, tmp_path, settings, optimizer) -> None:
    """The driver in this process, the sites on the real cluster (their relative store paths
    resolve only on their own workers, as above)."""
    from distributed import Client

    from pipeline.config import TrainConfig
    from pipeline.train import train

    procs, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr")
    cfg = TrainConfig.from_dict(
        {"sites": str(sf), "rounds": 4, "hidden": [64], "lr": 3e-3, "ema": 0.0, "batch_size": 128, "patience": 0}
        | settings
    )
    with Client(addr, timeout=10, set_as_default=False) as c:
        res = train(None, cfg, tmp_path / "run", client=c)
    assert [e["applied"] for e in res.history] == [True] * 4
    assert res.history[-1]["val_accuracy"] > 0.2  # 26 classes: chance is 0.04
    meta = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")[1]
    assert meta["config"]["strategy"] == settings["strategy"]
    st = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")[0]
    assert optimizer == "sgd" or any(k.startswith("opt_") for k in st)  # the server optimizer's buffers


@pytest.mark.timeout(240)
def test_asynchronous_sites_buffer_their_deltas(cluster, tmp_path) -> None:
    from distributed import Client

    from pipeline.config import TrainConfig
    from pipeline.train import train

    _, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr")
    cfg = TrainConfig.from_dict(
        {"sites": str(sf), "rounds": 4, "mode": "async", "buffer_size": 2, "hidden": [64], "lr": 3e-3}
        | {"ema": 0.0, "batch_size": 128, "patience": 0}
    )
    with Client(addr, timeout=10, set_as_default=False) as c:
        res = train(None, cfg, tmp_path / "run", client=c)
    assert [e["round"] for e in res.history] == list(range(4))
    assert all(set(e["responded"]) <= {"a", "b"} and e["responded"] for e in res.history)
    assert res.history[-1]["rounds"] >= 3 and res.history[-1]["val_accuracy"] > 0.2
    assert set(res.history[-1]["sites"]) == {"a", "b"}


# -- sites that are not there at the start ------------------------------------------------------


def _late_cfg(sites_file: Path, **over: object):
    from pipeline.config import TrainConfig

    return TrainConfig.from_dict(
        {"sites": str(sites_file), "rounds": 3, "hidden": [32], "lr": 3e-3, "ema": 0.0, "batch_size": 128}
        | {"patience": 0, "min_sites": 2, "site_grace": 1.0, "no_worker_timeout": 5.0}
        | over
    )


def _reported(client, site: str) -> bool:
    """Whether the driver's request for ``site``'s report (a future of ``client``) has finished."""
    return any(
        str(k).startswith(f"site-info-{site}-") and st.status in ("finished", "error")
        for k, st in list(client.futures.items())
    )


def _site_reports_left(client) -> list[str]:
    """Site reports the scheduler still holds (none once a run has ended)."""

    def keys(dask_scheduler=None) -> list[str]:
        return sorted(str(k) for k in dask_scheduler.tasks if str(k).startswith("site-info-"))

    return client.run_on_scheduler(keys)


@contextlib.contextmanager
def _client_and_its_workers(addr: str) -> Iterator[tuple[Any, list]]:
    """A client of the cluster at ``addr`` and a list for the worker processes a test starts,
    killed when it ends (whatever it ends with)."""
    from distributed import Client

    started: list = []
    try:
        with Client(addr, timeout=10, set_as_default=False) as c:
            yield c, started
    finally:
        for p in started:
            p.kill()


def _late_worker(procs: Procs, addr: str, client, site: str, home: Path, started: list) -> None:
    """Start a worker of ``site`` and wait until the run's request for its report is answered
    (so the next round's look at the late reports sees it)."""
    started.append(procs.worker(addr, f"site-{site}-late", "--resources", f"{site}=1", nanny=False, cwd=home))
    wait_for(lambda: _reported(client, site), 60, f"site {site}'s report")


@pytest.mark.timeout(300)
def test_a_site_without_a_worker_at_the_start_joins_later_and_stays_admitted_on_resume(cluster, sites, tmp_path):
    """Three sites, min_sites = 2, no worker for c at the start: the run starts with a and b
    (one line names c), c is admitted when its worker starts after round 1, is sampled and
    evaluated from round 2 on, trains with the statistics pooled from a and b only, and a
    resume keeps those statistics bit for bit and c admitted (its report, asked anew, only
    checked against the plan: no admission, no re-pooling)."""

    from pipeline.fedclient import site_info
    from pipeline.ingest import ingest
    from pipeline.sites import pool_sites
    from pipeline.train import train

    procs, addr = cluster
    home_c = tmp_path / "home-c"
    home_c.mkdir()
    ingest(str(LETTER), home_c / "c.zarr", target=0, rows="16000:17500", like=str(sites["a"] / "a.zarr"))
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", c="c.zarr")
    run = tmp_path / "run"
    cfg = _late_cfg(sf)
    # what each site reports (computed here from the same stores): the expected statistics
    holdout = {"fraction": cfg.validation, "seed": cfg.seed}
    infos = {s: site_info(str(sites[s] / f"{s}.zarr"), holdout) for s in ("a", "b")}
    info_c = site_info(str(home_c / "c.zarr"), holdout)
    planned = pool_sites(str(sf), infos)
    with_c = pool_sites(str(sf), {**infos, "c": info_c})
    lines: list[str] = []
    with _client_and_its_workers(addr) as (c, started):

        def c_starts(record: dict) -> None:
            if record["round"] == 0:
                _late_worker(procs, addr, c, "c", home_c, started)

        res = train(None, cfg, run, client=c, log=lines.append, on_epoch=c_starts)
        text = "\n".join(lines)
        assert "starting with 2 of 3 sites: no report from site(s) c within" in text, text
        h = res.history
        assert [e["round"] for e in h] == [0, 1, 2]
        assert h[0]["admitted"] == ["a", "b"] and h[0]["sampled"] == ["a", "b"]
        assert h[1]["admitted"] == ["c"] and "admitted" not in h[2]
        assert f"site c reported and joins the run at round 2 ({info_c['count']:,} training rows" in text, text
        for e in h[1:]:
            assert e["sampled"] == e["responded"] == ["a", "b", "c"] and e["applied"], e
            assert set(e["sites"]) == {"a", "b", "c"} and e["sites"]["c"]["n"] == info_c["n_held_out"]
        fed = history(run)["federated"]
        assert fed["planned_from"] == ["a", "b"]
        assert {n: s["admitted_round"] for n, s in fed["sites"].items()} == {"a": 0, "b": 0, "c": 1}
        assert fed["sites"]["c"]["rows"] == info_c["count"]

        # the model's statistics: pooled from a and b only
        first = load_file(run / "model.npz", "model")[0]
        assert first["mean"].tobytes() == planned.mean.tobytes()
        assert first["std"].tobytes() == planned.std.tobytes()
        assert not np.array_equal(first["mean"], with_c.mean)  # c's rows would have moved them
        meta = load_file(run / "checkpoint.npz", "checkpoint")[1]["federated"]
        assert sorted(meta["admitted"]) == ["a", "b", "c"] and meta["admitted"]["c"]["round"] == 1

        # --resume: the same statistics and admitted sites (c's worker is up: no re-pooling)
        resumed_lines: list[str] = []
        res2 = train(None, _late_cfg(sf, rounds=5), run, client=c, resume=True, log=resumed_lines.append)
        text2 = "\n".join(resumed_lines)
        assert [e["round"] for e in res2.history] == list(range(5)), text2
        assert "joins the run" not in text2 and "starting with" not in text2, text2
        assert all(e["sampled"] == ["a", "b", "c"] and "admitted" not in e for e in res2.history[3:])
        second = load_file(run / "model.npz", "model")[0]
        assert second["mean"].tobytes() == first["mean"].tobytes()
        assert second["std"].tobytes() == first["std"].tobytes()
        fed2 = history(run)["federated"]
        assert {n: s["admitted_round"] for n, s in fed2["sites"].items()} == {"a": 0, "b": 0, "c": 1}
        wait_for(lambda: not _site_reports_left(c), 10, "no site report left in the scheduler")


@pytest.mark.timeout(240)
def test_a_late_site_of_another_schema_is_refused_and_the_run_completes(cluster, sites, tmp_path):
    """Site y (a store with 4 classes where the run has letter's 26) has no worker at the
    start; its late report is refused with one line, it is never sampled, the run ends."""

    from pipeline.train import train

    procs, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", y="z.zarr")
    run = tmp_path / "run"
    lines: list[str] = []
    with _client_and_its_workers(addr) as (c, started):

        def y_starts(record: dict) -> None:
            if record["round"] == 0:
                _late_worker(procs, addr, c, "y", sites["z"], started)

        res = train(None, _late_cfg(sf), run, client=c, log=lines.append, on_epoch=y_starts)
        refusals = [line for line in lines if "refused for this run" in line]
        assert len(refusals) == 1, lines
        assert refusals[0].startswith(
            "warning: site 'y' reported before round 2 and is refused for this run: its store has the classes ["
        ), refusals
        assert "the run goes on without it" in refusals[0] and "\n" not in refusals[0]
        h = res.history
        assert [e["round"] for e in h] == [0, 1, 2] and all(e["applied"] for e in h)
        assert all(e["sampled"] == ["a", "b"] and set(e.get("sites", ())) == {"a", "b"} for e in h), (h, lines)
        assert list(h[1]["refused"]) == ["y"] and h[1]["refused"]["y"].startswith("its store has the classes")
        y = history(run)["federated"]["sites"]["y"]
        assert y["admitted_round"] is None and y["refused"] == h[1]["refused"]["y"]
        assert (run / "model.npz").is_file()
        wait_for(lambda: not _site_reports_left(c), 10, "no site report left in the scheduler")


@pytest.mark.timeout(120)
def test_fewer_sites_than_min_sites_at_the_start_stop_the_run_in_one_line(cluster, tmp_path):
    from distributed import Client

    from pipeline.errors import TrainingError
    from pipeline.train import train

    _, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", q="q.zarr", r="r.zarr")
    run = tmp_path / "run"
    with Client(addr, timeout=10, set_as_default=False) as c:
        t0 = time.monotonic()
        with pytest.raises(TrainingError) as err:
            train(None, _late_cfg(sf, no_worker_timeout=3.0), run, client=c)
        assert time.monotonic() - t0 < 60
        msg = str(err.value)
        assert msg.startswith(
            f"only 1 of 3 sites of {str(sf)!r} reported within 3 s (none from q, r), fewer than min_sites = 2"
        ), msg
        assert "--resources SITE=1" in msg and "\n" not in msg
        assert not (run / "checkpoint.npz").exists()
        # the requests for q's and r's reports were cancelled with the run
        wait_for(lambda: not _site_reports_left(c), 10, "no site report left in the scheduler")
        assert not any(str(k).startswith("site-info-") for k in c.futures)


@pytest.mark.timeout(240)
def test_a_site_not_admitted_before_the_checkpoint_joins_the_resumed_run(cluster, sites, tmp_path):
    """A run ends without site c (no worker); resumed with c's worker up, c is asked again,
    admitted, and trains with the statistics the run started with."""

    from pipeline.ingest import ingest
    from pipeline.train import train

    procs, addr = cluster
    home_c = tmp_path / "home-c"
    home_c.mkdir()
    ingest(str(LETTER), home_c / "c.zarr", target=0, rows="17500:19000", like=str(sites["a"] / "a.zarr"))
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", c="c.zarr")
    run = tmp_path / "run"
    with _client_and_its_workers(addr) as (c, started):
        res = train(None, _late_cfg(sf, rounds=2), run, client=c)
        assert all(e["sampled"] == ["a", "b"] for e in res.history)
        assert history(run)["federated"]["sites"]["c"]["admitted_round"] is None
        first = load_file(run / "model.npz", "model")[0]
        wait_for(lambda: not _site_reports_left(c), 10, "no site report left in the scheduler")
        started.append(procs.worker(addr, "site-c-late", "--resources", "c=1", nanny=False, cwd=home_c))

        def report_arrives(record: dict) -> None:
            if record["round"] == 2:
                wait_for(lambda: _reported(c, "c"), 60, "site c's report")

        lines: list[str] = []
        res2 = train(
            None, _late_cfg(sf, rounds=5), run, client=c, resume=True, log=lines.append, on_epoch=report_arrives
        )
        text = "\n".join(lines)
        assert "resuming with the admitted site(s) a, b and the run's statistics; site(s) c may join" in text
        joined = history(run)["federated"]["sites"]["c"]["admitted_round"]
        assert joined in (2, 3), text
        assert res2.history[joined]["admitted"] == ["c"]
        assert all(e["sampled"] == ["a", "b", "c"] for e in res2.history[joined:])
        second = load_file(run / "model.npz", "model")[0]
        assert second["mean"].tobytes() == first["mean"].tobytes()
        assert second["std"].tobytes() == first["std"].tobytes()


def _site_up(client, site: str) -> bool:
    from pipeline.sites import site_resources

    return bool(site_resources(client.scheduler_info(n_workers=-1)).get(site))


@pytest.mark.timeout(300)
def test_an_admitted_site_whose_store_changed_is_refused_on_resume_and_never_sampled(cluster, sites, tmp_path):
    """Sites a, b and c train two rounds, c admitted. Between the runs c's store is replaced
    by one of another class set (4 classes where the run has letter's 26; c's new worker runs
    where c.zarr is that store). The resumed run asks every site for its report again: c is
    refused with one line naming it and the difference before any round samples it, a and b
    train the remaining rounds, and the checkpoint no longer counts c as admitted."""

    from pipeline.ingest import ingest
    from pipeline.synth import synth
    from pipeline.train import train

    procs, addr = cluster
    home_c, home_c2 = tmp_path / "home-c", tmp_path / "home-c2"
    home_c.mkdir()
    home_c2.mkdir()
    ingest(str(LETTER), home_c / "c.zarr", target=0, rows="16000:17500", like=str(sites["a"] / "a.zarr"))
    synth(str(home_c2 / "c.zarr"), rows=2000, features=16, classes=4, seed=2)
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", c="c.zarr")
    run = tmp_path / "run"
    with _client_and_its_workers(addr) as (c, started):
        started.append(procs.worker(addr, "site-c", "--resources", "c=1", nanny=False, cwd=home_c))
        wait_for(lambda: _site_up(c, "c"), 60, "site c's worker")
        # site_grace: the start waits for c's report (a loaded machine may be slow to give it)
        res = train(None, _late_cfg(sf, rounds=2, site_grace=30.0), run, client=c)
        assert all(e["sampled"] == ["a", "b", "c"] for e in res.history), res.history
        assert sorted(load_file(run / "checkpoint.npz", "checkpoint")[1]["federated"]["admitted"]) == [
            "a",
            "b",
            "c",
        ]
        started.pop().kill()
        wait_for(lambda: not _site_up(c, "c"), 60, "site c's worker gone")
        started.append(procs.worker(addr, "site-c2", "--resources", "c=1", nanny=False, cwd=home_c2))
        wait_for(lambda: _site_up(c, "c"), 60, "site c's new worker")

        lines: list[str] = []
        res2 = train(None, _late_cfg(sf, rounds=4), run, client=c, resume=True, log=lines.append)
        refusals = [line for line in lines if "refused for this run" in line]
        assert len(refusals) == 1, lines
        assert refusals[0].startswith(
            "warning: site 'c', admitted at round 1 before the checkpoint, reported before round 3 and is "
            "refused for this run: its store has the classes ["
        ), refusals
        assert "the run goes on without it" in refusals[0] and "\n" not in refusals[0]
        h = res2.history
        assert [e["round"] for e in h] == [0, 1, 2, 3] and all(e["applied"] for e in h[2:])
        for e in h[2:]:  # c never sampled, trained or evaluated after the change
            assert e["sampled"] == e["responded"] == ["a", "b"], e
            assert {t["site"] for t in e["tasks"]} == {"a", "b"} and set(e["sites"]) == {"a", "b"}
        assert list(h[2]["refused"]) == ["c"] and h[2]["refused"]["c"].startswith("its store has the classes")
        fed = history(run)["federated"]
        assert fed["sites"]["c"]["admitted_round"] is None and fed["sites"]["c"]["refused"] == h[2]["refused"]["c"]
        meta = load_file(run / "checkpoint.npz", "checkpoint")[1]["federated"]
        assert sorted(meta["admitted"]) == ["a", "b"]
        assert (run / "model.npz").is_file()
        wait_for(lambda: not _site_reports_left(c), 10, "no site report left in the scheduler")


@pytest.mark.timeout(300)
def test_central_dp_accounts_each_round_at_the_rate_of_the_sites_it_sampled_from(cluster, sites, tmp_path):
    """Central DP, sites a, b, c, two sampled per round: c has no worker at the start, so the
    first round samples 2 of 2 candidates (rate 1), the rounds after c joins 2 of 3. The
    epsilon reported is an accountant's fed those rates round by round (from the history's
    sampled and candidate counts), larger than the uniform 2 of 3 would have claimed."""

    from pipeline.ingest import ingest
    from pipeline.privacy import RdpAccountant
    from pipeline.train import train

    procs, addr = cluster
    home_c = tmp_path / "home-c"
    home_c.mkdir()
    ingest(str(LETTER), home_c / "c.zarr", target=0, rows="16000:17500", like=str(sites["a"] / "a.zarr"))
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", c="c.zarr")
    run = tmp_path / "run"
    z, delta = 1.0, 1e-5
    cfg = _late_cfg(sf, dp="central", clip_norm=1.0, noise_multiplier=z, fraction_fit=0.6, min_clients=2)
    with _client_and_its_workers(addr) as (c, started):

        def c_starts(record: dict) -> None:
            if record["round"] == 0:
                _late_worker(procs, addr, c, "c", home_c, started)

        res = train(None, cfg, run, client=c, on_epoch=c_starts)
        h = res.history
        assert [(len(e["sampled"]), e["candidates"]) for e in h] == [(2, 2), (2, 3), (2, 3)], h
        applied = [e for e in h if e["applied"]]
        assert len(applied) == 3
        acc = RdpAccountant(z, 2 / 3, delta)
        for e in applied:
            acc.step(1, len(e["sampled"]) / e["candidates"])
            assert e["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9)
        uniform = RdpAccountant(z, 2 / 3, delta).epsilon(rounds=3)
        doc = history(run)["privacy"]
        assert doc["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9) and doc["epsilon"] > uniform * 1.05
        assert doc["sampling_rate"] == pytest.approx(2 / 3) and doc["rates"] == [[1.0, 1]]


@pytest.mark.timeout(240)
def test_a_round_whose_real_sampling_rate_would_overspend_the_budget_is_not_run(cluster, tmp_path):
    """Central DP, sites a, b, c with no worker for c: every round samples 2 of 2 candidates
    (rate 1, where all three sites would give 2/3). The budget allows one round at rate 1 and
    a second only at 2/3: after the first round the job's look ahead at the run's rate sees
    room, but the second round, announced at its real rate 1, is refused and the run stops
    with the budget line naming the round's candidates; epsilon stays within the budget."""
    from distributed import Client

    from pipeline.privacy import RdpAccountant, epsilon_from_rdp
    from pipeline.train import train

    _, addr = cluster
    sf = _sites_file(tmp_path / "sites.toml", a="a.zarr", b="b.zarr", c="c.zarr")
    run = tmp_path / "run"
    z, delta = 1.0, 1e-5
    acc = RdpAccountant(z, 2 / 3, delta)
    acc.step(1, 1.0)
    at_run_rate, at_real_rate = (
        epsilon_from_rdp(acc.orders, acc.rdp + acc.round_rdp(q), delta)[0] for q in (2 / 3, 1.0)
    )
    assert at_run_rate < at_real_rate
    target = (at_run_rate + at_real_rate) / 2
    cfg = _late_cfg(
        sf,
        rounds=4,
        dp="central",
        clip_norm=1.0,
        noise_multiplier=z,
        fraction_fit=0.6,
        min_clients=2,
        target_epsilon=target,
    )
    lines: list[str] = []
    with Client(addr, timeout=10, set_as_default=False) as c:
        res = train(None, cfg, run, client=c, log=lines.append)
        assert [(e["sampled"], e["candidates"], e["applied"]) for e in res.history] == [(["a", "b"], 2, True)]
        assert res.stopped_early
        stop = [line for line in lines if line.startswith("privacy budget: stopping after 1 rounds")]
        assert len(stop) == 1 and stop[0].endswith("(round 2 would sample 2 of 2 candidates)"), lines
        doc = history(run)["privacy"]
        assert doc["rounds"] == 1 and doc["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9)
        assert doc["epsilon"] <= target
        assert doc["exhausted"] and doc["rates"] == [[1.0, 1]]
        assert (run / "model.npz").is_file()
