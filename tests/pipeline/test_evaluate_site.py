"""`pipeline evaluate --site NAME` on a federation's cluster: every task, the store's checks
included, runs on the workers that declare the site's resource; only the metrics leave them."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.inference import evaluate_store
from pipeline.model import load_model
from pipeline.synth import synth
from pipeline.train import train


@pytest.fixture(scope="module")
def sites_client():
    from pipeline.connect import cluster_client

    with cluster_client(sites=["site-a", "site-b"], dashboard_address=None) as c:
        yield c


def _keys_seen(dask_worker) -> list[str]:
    return sorted({str(e[0]) for e in dask_worker.state.log if str(e[0]).startswith(("evaluate-", "_site_store"))})


def test_a_sites_evaluation_runs_on_its_workers_only_and_equals_the_unplaced_one(sites_client, tmp_path):
    store = tmp_path / "s.zarr"
    synth(str(store), rows=5000, features=5, classes=3, seed=0, chunk_rows=1000)
    cfg = TrainConfig().with_overrides(["epochs=1", "hidden=[8]"])
    train(str(store), cfg, tmp_path / "run")
    model = load_model(tmp_path / "run")
    placed = evaluate_store(model, str(store), sites_client, site="site-a")
    seen = sites_client.run(_keys_seen)
    names = {w["name"]: a for a, w in sites_client.scheduler_info()["workers"].items()}
    on_a, on_b = seen[names["site-site-a"]], seen[names["site-site-b"]]
    assert sum(k.startswith("evaluate-") for k in on_a) == 5 and any(k.startswith("_site_store") for k in on_a)
    assert on_b == []
    plain = evaluate_store(model, str(store), sites_client)
    assert placed["n"] == plain["n"] == 5000
    np.testing.assert_array_equal(placed["confusion"], plain["confusion"])
    assert placed["loss"] == pytest.approx(plain["loss"], rel=1e-12)


def test_a_site_no_worker_declares_is_refused_naming_the_fix(sites_client, tmp_path):
    store = tmp_path / "s.zarr"
    synth(str(store), rows=300, features=3, classes=2, seed=1)
    train(str(store), TrainConfig().with_overrides(["epochs=1", "hidden=[4]"]), tmp_path / "run")
    with pytest.raises(PipelineError, match=r"no worker of the cluster declares site 'site-c'; .*--resources site-c=1"):
        evaluate_store(load_model(tmp_path / "run"), str(store), sites_client, site="site-c")


def test_the_command_evaluates_a_site_store_on_a_local_worker_of_that_site(tmp_path):
    store = tmp_path / "s.zarr"
    synth(str(store), rows=600, features=3, classes=2, seed=2)
    train(str(store), TrainConfig().with_overrides(["epochs=1", "hidden=[4]"]), tmp_path / "run")
    both = [
        CliRunner().invoke(cli, ["evaluate", str(tmp_path / "run"), str(store), "--json", *a])
        for a in ([], ["--site", "a"])
    ]
    assert [r.exit_code for r in both] == [0, 0], [r.output for r in both]
    assert both[0].stdout == both[1].stdout
    bad = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "run"), str(store), "--site", "a b"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --site 'a b' is not a site name"), bad.output
