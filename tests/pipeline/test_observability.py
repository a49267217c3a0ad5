"""Training seen from the Dask dashboard, Prometheus, the task stream and performance reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline.config import TrainConfig
from pipeline.ps import EXTENSION_NAME
from pipeline.train import train
from tests.pipeline.helpers import CLI


@pytest.fixture(scope="module")
def dash_client() -> Iterator[object]:
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, dashboard_address="127.0.0.1:0") as c:
        yield c


def _base(client) -> str:
    return client.dashboard_link.rsplit("/", 1)[0]


def _versions(dask_scheduler) -> dict[str, int]:
    return {j: st.version for j, st in dask_scheduler.extensions[EXTENSION_NAME].jobs.items()}


def test_prometheus_metrics_match_the_server_during_training(letter_stores, dash_client, tmp_path):
    seen: dict = {}

    def on_epoch(rec: dict) -> None:
        if rec["epoch"] == 1:
            seen["text"] = urllib.request.urlopen(_base(dash_client) + "/metrics", timeout=10).read().decode()
            seen["versions"] = dash_client.run_on_scheduler(_versions)

    train(letter_stores[0], TrainConfig(epochs=2, patience=0), tmp_path / "run", client=dash_client, on_epoch=on_epoch)
    ((job, version),) = seen["versions"].items()
    text = seen["text"]
    m = re.search(rf'^pipeline_rounds_total{{job="{job}"}} (\S+)$', text, re.M)
    assert m and float(m.group(1)) == version > 0
    for name in (
        "pipeline_samples_total",
        "pipeline_pushes_total",
        "pipeline_bytes_received_total",
        "pipeline_loss",
        "pipeline_staleness_mean",
        "pipeline_checkpoint_age_seconds",
    ):
        assert re.search(rf'^{name}{{job="{job}"}} \S+$', text, re.M), name
    samples = float(re.search(rf'^pipeline_samples_total{{job="{job}"}} (\S+)$', text, re.M).group(1))
    assert samples >= 2 * 13000  # two epochs of ~14,000 training rows pushed


def test_training_page_serves_figures_with_the_runs_data(letter_stores, dash_client, tmp_path):
    res = train(letter_stores[0], TrainConfig(epochs=2, patience=0), tmp_path / "run", client=dash_client)
    html = urllib.request.urlopen(_base(dash_client) + "/pipeline", timeout=10).read().decode()
    assert "bokeh" in html.lower()
    # only the scheduler serves the page: the workers trained without importing the dashboard
    imported = dash_client.run(lambda: "distributed.dashboard.scheduler" in sys.modules)
    assert len(imported) == 2 and not any(imported.values())

    from bokeh.client import pull_session

    with pull_session(url=_base(dash_client) + "/pipeline") as session:
        doc = session.document
        names = {m.name for m in doc.select({"type": __import__("bokeh.models").models.Plot})}
        assert {
            "pipeline-loss",
            "pipeline-epochs",
            "pipeline-throughput",
            "pipeline-staleness",
            "pipeline-workers",
            "pipeline-time",
        } <= names
        loss_fig = doc.select_one({"name": "pipeline-loss"})
        data = loss_fig.renderers[0].data_source.data
        history = json.loads((tmp_path / "run" / "history.json").read_text())
        assert len(data["round"]) == len(history["rounds"]) == res.history[-1]["rounds"]
        epochs = doc.select_one({"name": "pipeline-epochs"}).renderers[0].data_source.data
        assert list(epochs["epoch"]) == [0, 1]


def test_task_names_spans_and_fine_metrics(letter_stores, dash_client, tmp_path):
    train(letter_stores[0], TrainConfig(epochs=2, patience=0), tmp_path / "run", client=dash_client)

    def inspect(dask_scheduler):
        spans = [s.name for s in dask_scheduler.extensions["spans"].spans.values()]
        metrics = [k for k in dask_scheduler.cumulative_worker_metrics if isinstance(k, tuple)]
        return sorted(dask_scheduler.task_prefixes), spans, metrics

    prefixes, spans, metrics = dash_client.run_on_scheduler(inspect)
    # sync (the default): the training tasks validate too, so no separate evaluate tasks
    assert "train-chunk" in prefixes and "evaluate" not in prefixes
    assert ("epoch-0",) in spans and ("epoch-1",) in spans
    activities = {k[2] for k in metrics if len(k) >= 4 and k[0] == "execute" and k[1] == "train-chunk"}
    assert {"read", "compute", "communicate", "validate"} <= activities


def test_cli_report_writes_performance_report(letter_stores, tmp_path):
    report = tmp_path / "perf.html"
    proc = subprocess.run(
        [
            *CLI,
            "train",
            letter_stores[0],
            "--out",
            str(tmp_path / "run"),
            "--set",
            "epochs=1",
            "--report",
            str(report),
            "--plots",
            "-q",
            "--dashboard-address",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert "train-chunk" in text
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
