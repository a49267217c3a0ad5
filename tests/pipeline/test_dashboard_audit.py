"""The training page's figures and ``/metrics`` as a user reads them: throughput as it was,
no NaN gauges, and only the new rounds sent to an open page while a long job trains."""

from __future__ import annotations

import dataclasses
import math
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.dashboard import _rates, _summary_html, source_of, training_doc, watch
from pipeline.jobview import JobSnapshot, rounds_after


def _history(n: int, every: float, samples: int = 100, t0: float = 1_000.0, v0: int = 1) -> list[tuple]:
    """``n`` rounds ``every`` seconds apart, each of ``samples`` samples."""
    return [(t0 + i * every, v0 + i, 1.0 / (i + 1), samples, 1) for i in range(n)]


@pytest.mark.parametrize("every", [1.2, 0.7, 0.3, 0.01])
def test_throughput_of_a_steady_job_is_steady_to_its_last_point(every):
    # 100 samples every `every` seconds: the plot shows that rate everywhere, its last point included
    # (the last bin used to be empty or cut short but divided by a whole window: a drop to 0 or half)
    hist = _history(int(60 / every) + 1, every)
    t, sps, rps = _rates(hist)
    assert len(t) == len(sps) == len(rps) >= 2
    assert t == sorted(t) and t[-1] <= hist[-1][0] - hist[0][0]
    for s, r in zip(sps, rps, strict=True):
        assert s == pytest.approx(100 / every, rel=0.25), sps
        assert r == pytest.approx(1 / every, rel=0.25), rps
    # the bins (centres t) tile the run, and every sample after the first round is counted once
    start, counted = 0.0, 0.0
    for centre, rate in zip(t, sps, strict=True):
        width = 2 * (centre - start)
        counted, start = counted + rate * width, start + width
    assert start == pytest.approx(hist[-1][0] - hist[0][0])
    assert counted == pytest.approx(100 * (len(hist) - 1), rel=1e-6)


def test_a_finished_jobs_history_spans_the_whole_run_at_the_same_rates():
    """A finished job keeps 2,000 rows of history for its page: merged runs of rounds from the
    first to the last (it kept the last 2,000 rounds, so the plots lost the run's beginning),
    with the samples/s and rounds/s the page draws from them unchanged."""
    import asyncio

    from pipeline.ps.job import Job, coarse_history

    hist = _history(9_001, 0.01, samples=64)
    rows = coarse_history(hist, 2_000)
    assert len(rows) == 2_000
    assert rows[0] == list(hist[0]) and rows[-1][:2] == list(hist[-1][:2])
    assert sum(r[3] for r in rows) == sum(h[3] for h in hist) and sum(r[4] for r in rows) == len(hist)
    full, coarse = _rates(hist), _rates(rows)
    assert coarse[0] == full[0]
    np.testing.assert_allclose(coarse[1], full[1], rtol=0.02)
    np.testing.assert_allclose(coarse[2], full[2], rtol=0.02)
    assert coarse_history(hist[:50], 2_000) == [list(h) for h in hist[:50]]

    async def main() -> list:
        job = Job.create("long-job", np.zeros(3, np.float32), 3, mode="async", optimizer={"name": "sgd", "lr": 0.1})
        reply = job.join("w0")
        for _ in range(2_500):
            reply = await job.push("w0", reply["version"], np.full(3, 1e-3, np.float32), samples=8, batches=1, loss=0.5)
        return job.close()["history"]

    kept = asyncio.run(main())
    assert len(kept) == 2_000 and kept[0][1] == 1 and kept[-1][1] == 2_500
    assert sum(r[3] for r in kept) == 8 * 2_500


def test_throughput_needs_time_between_rounds():
    assert _rates(_history(1, 1.0)) == ([], [], [])
    assert _rates(_history(3, 0.0)) == ([], [], [])
    assert _rates(_history(2, 1.0)) == ([0.5], [100.0], [1.0])


def _snapshot(job: str, hist: list[tuple], created: float = 1_000.0, **kw) -> JobSnapshot:
    """A job's snapshot as the parameter server gives it (see ``Job.metrics``)."""
    m = {
        "job": job,
        "mode": "async",
        "n_params": 10,
        "version": hist[-1][1] if hist else 0,
        "pushes": len(hist),
        "samples": sum(h[3] for h in hist),
        "bytes_in": 0,
        "bytes_out": 0,
        "loss": hist[-1][2] if hist else None,
        "lr": 0.1,
        "participants": [],
        "staleness": {},
        "per_worker": {},
        "created": created,
        "last_push": hist[-1][0] if hist else 0.0,
        "checkpoint_time": 0.0,
        "failed": None,
        "closed": False,
        "history": [list(h) for h in hist],
    }
    m.update(kw)
    return JobSnapshot.from_metrics(m)


class ListSource:
    """A job source holding the snapshots it is given (the newest of each job)."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobSnapshot] = {}
        self.asked: list[int] = []  # the versions the page asked for the rounds after

    def job_names(self) -> list[str]:
        return list(self.jobs)

    def snapshot(self, job: str | None = None, since: int | None = None) -> JobSnapshot | None:
        snap = next(reversed(self.jobs.values()), None) if job is None else self.jobs.get(job)
        if snap is None or since is None:
            return snap
        self.asked.append(since)
        return dataclasses.replace(snap, history=tuple(tuple(r) for r in rounds_after(snap.history, since)))

    def running(self) -> list[JobSnapshot]:
        return [s for s in self.jobs.values() if not s.closed]

    def finished_jobs(self) -> list[JobSnapshot]:
        return [s for s in self.jobs.values() if s.closed]


class Scheduler:
    """What the page is given as its scheduler: only looked up, never called."""


@pytest.fixture
def page() -> Iterator[tuple[ListSource, object, list]]:
    """The training page's document for a fresh scheduler, its refresh and the rows each refresh
    sent for the loss plot (``("replaced" | "streamed", rows)``)."""
    from bokeh.document import Document
    from bokeh.document.events import ColumnDataChangedEvent, ColumnsStreamedEvent

    sched, src = Scheduler(), ListSource()
    watch(sched, src)
    assert source_of(sched) is src
    doc = Document()
    training_doc(sched, {}, doc)
    (callback,) = doc.session_callbacks
    loss = doc.select_one({"name": "pipeline-loss"}).renderers[0].data_source
    sent: list[tuple[str, int]] = []

    def record(event: object) -> None:
        if isinstance(event, ColumnsStreamedEvent) and event.model is loss:
            sent.append(("streamed", len(event.data["round"])))
        elif isinstance(event, ColumnDataChangedEvent) and event.model is loss:
            sent.append(("replaced", len(loss.data["round"])))

    doc.on_change(record)
    yield src, (callback.callback, loss), sent


def test_open_page_is_sent_only_the_new_rounds(page):
    src, (refresh, loss), sent = page
    hist = _history(5000, 0.01)
    src.jobs["run-a"] = _snapshot("run-a", hist[:4000])
    refresh()
    assert list(loss.data["round"]) == [h[1] for h in hist[:4000]]
    sent.clear()
    src.jobs["run-a"] = _snapshot("run-a", hist)
    refresh()
    # the 1,000 new rounds, not all 5,000 again (twice a second while a long job trains)
    assert sent == [("streamed", 1000)], sent
    assert list(loss.data["round"]) == [h[1] for h in hist]
    assert list(loss.data["loss"]) == [h[2] for h in hist]
    sent.clear()
    refresh()
    assert sent == []  # nothing new, nothing sent
    # the page asked the job only for the rounds after those it holds
    assert src.asked == [4000, 5000], src.asked


def test_page_draws_again_what_does_not_continue_the_plot(page):
    src, (refresh, loss), sent = page
    hist = _history(300, 0.1)
    src.jobs["run-a"] = _snapshot("run-a", hist)
    refresh()
    # the job's history kept only its newest rounds (the server's window rolled over): the page
    # keeps the rounds it holds and adds the new ones
    src.jobs["run-a"] = _snapshot("run-a", _history(250, 0.1, v0=101, t0=1_010.0) + _history(40, 0.1, 1, 1_035.0, 351))
    refresh()
    assert list(loss.data["round"]) == list(range(1, 391))
    # the same name started again from an earlier checkpoint: drawn again, not appended to
    src.jobs["run-a"] = _snapshot("run-a", _history(20, 0.1, t0=2_000.0, v0=200), created=1_999.0)
    refresh()
    assert list(loss.data["round"]) == list(range(200, 220))
    assert sent[-1] == ("replaced", 20)


def test_summary_shows_a_failure_message_as_text():
    snap = _snapshot("run-a", _history(3, 0.1), failed="aggregator <class 'ValueError'> failed & stopped")
    text = _summary_html(snap)
    assert "&lt;class &#x27;ValueError&#x27;&gt;" in text and "&amp; stopped" in text
    assert "<class" not in text


@pytest.fixture(scope="module")
def dash_client() -> Iterator[object]:
    from pipeline.connect import cluster_client

    with cluster_client(workers=1, dashboard_address="127.0.0.1:0") as c:
        yield c


def test_metrics_have_no_nan_before_a_job_has_a_loss(dash_client):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.ps.client import ParameterServer

    ps = ParameterServer("fresh-job", dash_client)
    ps.create(np.zeros(16, dtype=np.float32), mode="async")
    try:
        url = dash_client.dashboard_link.rsplit("/", 1)[0] + "/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        ps.close()
    samples = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.labels.get("job") == "fresh-job"
    }
    assert samples.get("pipeline_rounds_total") == 0.0, samples
    assert "pipeline_loss" not in samples and "pipeline_validation_loss" not in samples, samples
    assert not [n for n, v in samples.items() if math.isnan(v)], samples
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE pipeline_")]
    assert len(types) == len(set(types)), types


def _scrape(client) -> dict[tuple[str, str], float]:
    """``/metrics`` of the scheduler of ``client``: (metric, job) -> value for the pipeline's families."""
    from prometheus_client.parser import text_string_to_metric_families

    url = client.dashboard_link.rsplit("/", 1)[0] + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("pipeline_") and "job" in s.labels and "site" not in s.labels:
                key = (s.name, s.labels["job"])
                assert key not in out, f"{key} exported twice"
                out[key] = s.value
    return out


def test_metrics_keep_a_finished_jobs_last_counters(dash_client):
    """A scrape after a job ended (Prometheus scrapes every 15 s or so; a short job may end
    between two) still sees its final counters, marked not running, once per job name even
    when the job was resumed and finished again."""
    pytest.importorskip("prometheus_client")
    from pipeline.ps.client import ParameterServer

    for _ in range(2):  # the second run stands for a resume of the same job name
        ps = ParameterServer("short-job", dash_client)
        ps.create(np.zeros(16, dtype=np.float32), mode="async")
        try:
            reply = ps.join("w0")
            for _ in range(3):
                reply = ps.push("w0", reply["version"], np.full(16, 0.01, np.float32), 32, 1, 0.5)
            running = _scrape(dash_client)
            assert running[("pipeline_job_running", "short-job")] == 1.0
        finally:
            ps.close()
        done = _scrape(dash_client)
        assert done[("pipeline_job_running", "short-job")] == 0.0, done
        assert done[("pipeline_rounds_total", "short-job")] == 3.0
        assert done[("pipeline_samples_total", "short-job")] == 96.0
        assert ("pipeline_checkpoint_age_seconds", "short-job") not in done


def test_summary_rate_of_a_resumed_job_counts_its_own_rounds():
    # resumed at round 990: 330 rounds of its own in 33 s, its counter going on from the checkpoint
    hist = _history(330, 0.1, t0=1_000.0, v0=991)
    snap = _snapshot("run-a", hist, created=999.0)
    assert snap.version == 1320
    text = _summary_html(snap)
    assert "round 1,320" in text
    assert "10.0 rounds/s" in text, text
