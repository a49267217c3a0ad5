"""Training on the Dask dashboard (``/pipeline``) and in Prometheus (``/metrics``).

The page is a Bokeh document like Dask's own pages: loss per round, train and validation
metrics per epoch, samples/s over time, the staleness distribution, pushes and samples per
worker and each worker's time split into read / compute / communicate. It refreshes twice a
second from read-only snapshots of the training jobs (:mod:`pipeline.jobview`), shows running
jobs and the last finished ones, and a selector switches between jobs.

This module knows nothing of the parameter server: :func:`watch` hands it a scheduler's
:class:`~pipeline.jobview.JobSource` (the parameter server's installer does, see
:mod:`pipeline.ps.install`). :func:`register` adds the page to
``distributed.dashboard.scheduler.applications``; the scheduler reads that table when it
starts its HTTP server, which is why the registration happens when :mod:`pipeline.ps` is
imported as a scheduler preload.
"""

from __future__ import annotations

import html
import math
import time
import weakref
from typing import Any

import numpy as np

from pipeline.jobview import JobSnapshot, JobSource

ROUTE = "/pipeline"
_REFRESH_MS = 500
_PAGE_ROUNDS = 20_000  # rounds the page holds (a running job keeps as many)
# (scheduler, its job source), both held weakly: the dashboard never keeps a scheduler alive
_sources: list[tuple[weakref.ref, weakref.ref]] = []
_collector_registered = False


def watch(scheduler: Any, source: JobSource) -> bool:
    """Show ``source``'s jobs on ``scheduler``'s training page and on this process's
    ``/metrics``; False where ``prometheus_client`` is missing (the page still works)."""
    _sources[:] = [(s, j) for s, j in _sources if s() is not None and j() is not None and s() is not scheduler]
    _sources.append((weakref.ref(scheduler), weakref.ref(source)))
    return register_prometheus()


def source_of(scheduler: Any) -> JobSource | None:
    """The job source :func:`watch` gave for ``scheduler``, if any (and still alive)."""
    for s, j in _sources:
        if s() is scheduler:
            return j()
    return None


def _all_sources() -> list[JobSource]:
    return [src for _, ref in list(_sources) if (src := ref()) is not None]


def _rates(history: list, window: float = 5.0) -> tuple[list[float], list[float], list[float]]:
    """Samples/s and rounds/s over time from the round history (seconds since the first round).

    Each bin is divided by the time it covers: the bins are ``window`` seconds long but the last,
    which runs to the latest round (between ``window`` and twice that), so the curve neither ends
    in an empty bin (a drop to 0 that never happened) nor in a short one read as a full window.
    The first round only marks the start: its samples were trained before it. A row stands for
    the rounds since the row before (its version's step: a finished job's history merges
    consecutive rounds, :func:`pipeline.ps.job.coarse_history`)."""
    if len(history) < 2:
        return [], [], []
    h = np.asarray([(r[0], r[3], r[1]) for r in history], dtype=np.float64)
    t = h[:, 0] - h[0, 0]
    span = float(t[-1])
    if not span > 0:
        return [], [], []
    n = max(1, int(span // window))
    starts = np.arange(n) * window
    widths = np.append(np.full(n - 1, window), span - starts[-1])
    idx = np.minimum((t // window).astype(np.int64), n - 1)
    after_first = np.arange(len(t)) > 0
    samples = np.bincount(idx, weights=h[:, 1] * after_first, minlength=n)
    steps = np.maximum(np.diff(h[:, 2], prepend=h[0, 2]), 1.0)  # rounds per row (1 unless merged)
    rounds = np.bincount(idx, weights=steps * after_first, minlength=n)
    xs = (starts + widths / 2).tolist()
    return xs, (samples / widths).tolist(), (rounds / widths).tolist()


def _summary_html(snap: JobSnapshot) -> str:
    """The line above the plots: the job's state and counters."""
    elapsed = max(1e-9, (snap.last_push or time.time()) - snap.created)
    ckpt = snap.checkpoint_time
    # the failure's text quotes exceptions (``<class ...>``): shown as text, never as markup
    state = "failed: " + html.escape(snap.failed) if snap.failed else ("finished" if snap.closed else "running")
    loss = snap.loss if snap.loss is not None else float("nan")
    return (
        f"<b>{snap.job}</b> ({state}) &mdash; mode <b>{snap.mode}</b>, "
        + (f"on {len(snap.shards)} parameter-server shards, " if snap.shards else "")
        + f"{snap.n_params:,} parameters, round {snap.version:,}, epoch {snap.epoch}, "
        f"{snap.pushes:,} pushes, {snap.samples:,} samples, "
        f"{snap.samples / elapsed:,.0f} samples/s, {_rounds_per_s(snap, elapsed):,.1f} rounds/s, "
        f"loss {loss:.4f}, lr {snap.lr:.3g}, participants {len(snap.participants)}, "
        + (
            f"privacy <b>{snap.privacy['dp']}</b> DP: epsilon {snap.epsilon:.3g} at delta {snap.privacy['delta']:g} "
            f"after {snap.privacy['rounds']:,} rounds (clip {snap.privacy['clip']:.3g}"
            + (f", budget {snap.privacy['target_epsilon']:g}" if snap.privacy.get("target_epsilon") else "")
            + ("; budget reached" if snap.privacy.get("exhausted") else "")
            + "), "
            if snap.epsilon is not None
            else ""
        )
        + ("secure aggregation, " if snap.privacy.get("secure_aggregation") else "")
        + (f"checkpoint {time.time() - ckpt:,.0f} s ago" if ckpt else "no checkpoint yet")
        + _sites_html(snap)
    )


def _rounds_per_s(snap: JobSnapshot, elapsed: float) -> float:
    """The rounds this job applied per second, from its round history: ``version`` counts the
    rounds of the checkpoint a job resumed from too, which its own time cannot be divided by."""
    hist = snap.history
    if len(hist) >= 2 and hist[-1][0] > hist[0][0]:
        return (hist[-1][1] - hist[0][1]) / (hist[-1][0] - hist[0][0])
    return len(hist) / elapsed


def _sites_html(snap: JobSnapshot) -> str:
    """A federated job's last per-site evaluation: each site's loss and metric, and the spread."""
    spread = ""
    if snap.site_mean is not None and snap.site_worst_decile is not None:
        spread = f"mean {snap.site_mean:.4f}, worst decile {snap.site_worst_decile:.4f}"
    if not snap.sites:
        return f"<br>clients (accuracy / R^2): {spread}" if spread else ""
    cells = ", ".join(
        f"{site} {v.get('metric', float('nan')):.4f} (loss {v.get('loss', float('nan')):.4f}, n {int(v.get('n', 0)):,})"
        for site, v in sorted(snap.sites.items())
    )
    return f"<br>sites (accuracy / R^2): {cells}" + (f"; {spread}" if spread else "")


def training_doc(scheduler: Any, extra: dict, doc: Any) -> None:
    """Bokeh document of the training page (signature of Dask's dashboard applications)."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, Div, Select
    from bokeh.plotting import figure

    src = source_of(scheduler)
    names = src.job_names() if src is not None else []
    select = Select(title="Job", options=names or ["(no job yet)"], value=(names[-1] if names else "(no job yet)"))
    summary = Div(text="No training job has run on this scheduler yet.", width=900, name="pipeline-summary")
    src_rounds = ColumnDataSource({"round": [], "loss": []})
    src_epochs = ColumnDataSource({"epoch": [], "train_loss": [], "val_loss": [], "val_metric": []})
    src_rate = ColumnDataSource({"t": [], "samples_per_s": [], "rounds_per_s": []})
    src_stale = ColumnDataSource({"staleness": [], "count": []})
    src_workers = ColumnDataSource(
        {"worker": [], "pushes": [], "samples": [], "read": [], "compute": [], "communicate": []}
    )
    opts = {"height": 260, "sizing_mode": "stretch_width", "tools": "pan,wheel_zoom,box_zoom,reset,save"}
    f_loss = figure(title="Training loss per round", x_axis_label="round", name="pipeline-loss", **opts)
    f_loss.line("round", "loss", source=src_rounds, line_width=2)
    f_epoch = figure(title="Loss and validation metric per epoch", x_axis_label="epoch", name="pipeline-epochs", **opts)
    f_epoch.line("epoch", "train_loss", source=src_epochs, color="#1f77b4", legend_label="train loss", line_width=2)
    f_epoch.line("epoch", "val_loss", source=src_epochs, color="#ff7f0e", legend_label="validation loss", line_width=2)
    f_epoch.scatter(
        "epoch", "val_metric", source=src_epochs, color="#2ca02c", legend_label="validation accuracy / R^2", size=7
    )
    f_rate = figure(title="Throughput", x_axis_label="seconds since start", name="pipeline-throughput", **opts)
    f_rate.line("t", "samples_per_s", source=src_rate, legend_label="samples/s", line_width=2)
    f_rate.line("t", "rounds_per_s", source=src_rate, legend_label="rounds/s", color="#d62728", line_width=2)
    f_stale = figure(title="Staleness of pushes", x_axis_label="rounds behind", name="pipeline-staleness", **opts)
    f_stale.vbar(x="staleness", top="count", width=0.8, source=src_stale)
    f_workers = figure(
        title="Pushes per worker", x_range=[], name="pipeline-workers", height=260, sizing_mode="stretch_width"
    )
    f_workers.vbar(x="worker", top="pushes", width=0.7, source=src_workers)
    f_time = figure(
        title="Time per worker: read / compute / communicate (s)",
        x_range=[],
        name="pipeline-time",
        height=260,
        sizing_mode="stretch_width",
    )
    f_time.vbar_stack(
        ["read", "compute", "communicate"],
        x="worker",
        width=0.7,
        source=src_workers,
        color=["#9467bd", "#1f77b4", "#ff7f0e"],
        legend_label=["read", "compute", "communicate"],
    )

    # the rounds the page holds (the loss plot's and the throughput's): its job, the job's
    # creation time, its rows; each refresh asks the job only for the rounds after the last row
    drawn: dict[str, Any] = {"job": None, "created": None, "rows": []}

    def update() -> None:
        src_now = source_of(scheduler)
        if src_now is None:
            return
        names_now = src_now.job_names()
        if names_now and select.options != names_now:
            select.options = names_now
            if select.value not in names_now:
                select.value = names_now[-1]
        name = select.value if select.value in names_now else None
        rows = drawn["rows"]
        since = rows[-1][1] if rows and name is not None and name == drawn["job"] else None
        snap = src_now.snapshot(name, since=since)
        if snap is not None and since is not None and snap.created != drawn["created"]:
            snap, since = src_now.snapshot(name), None  # the job started again under its name
        if snap is None:
            return
        if since is None:  # another job: its whole history
            rows[:] = snap.history[-_PAGE_ROUNDS:]
            src_rounds.data = {"round": [h[1] for h in rows], "loss": [h[2] for h in rows]}
        elif snap.history:
            new = snap.history[-_PAGE_ROUNDS:]
            rows.extend(new)
            del rows[: max(0, len(rows) - _PAGE_ROUNDS)]
            src_rounds.stream({"round": [h[1] for h in new], "loss": [h[2] for h in new]}, rollover=_PAGE_ROUNDS)
        drawn.update(job=snap.job, created=snap.created)
        hist = rows
        ep = snap.epochs
        src_epochs.data = {
            "epoch": [e.get("epoch", i) for i, e in enumerate(ep)],
            "train_loss": [e.get("train_loss", np.nan) for e in ep],
            "val_loss": [e.get("val_loss", np.nan) for e in ep],
            "val_metric": [e.get("val_accuracy", e.get("val_r2", np.nan)) for e in ep],
        }
        t, sps, rps = _rates(hist)
        src_rate.data = {"t": t, "samples_per_s": sps, "rounds_per_s": rps}
        stale = snap.staleness
        src_stale.data = {"staleness": [int(k) for k in stale], "count": [int(v) for v in stale.values()]}
        pw = snap.per_worker
        workers = sorted(pw)
        src_workers.data = {
            "worker": workers,
            "pushes": [pw[w]["pushes"] for w in workers],
            "samples": [pw[w]["samples"] for w in workers],
            "read": [pw[w]["read"] for w in workers],
            "compute": [pw[w]["compute"] for w in workers],
            "communicate": [pw[w]["communicate"] for w in workers],
        }
        f_workers.x_range.factors = workers
        f_time.x_range.factors = workers
        summary.text = _summary_html(snap)

    update()
    doc.add_periodic_callback(update, _REFRESH_MS)
    doc.title = "Dask: Training"
    doc.add_root(
        column(
            row(select, summary, sizing_mode="stretch_width"),
            row(f_loss, f_epoch, sizing_mode="stretch_width"),
            row(f_rate, f_stale, sizing_mode="stretch_width"),
            row(f_workers, f_time, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
    )
    try:
        from distributed.dashboard.components.shared import BOKEH_THEME
        from distributed.dashboard.utils import env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except Exception:  # noqa: BLE001 - the page works with Bokeh's plain template too
        pass


def register() -> bool:
    """Add the training page to the scheduler dashboard's table of pages; False without Bokeh."""
    try:
        from distributed.dashboard import scheduler as dash
    except ImportError:
        return False
    dash.applications.setdefault(ROUTE, training_doc)
    return True


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


class TrainingCollector:
    """Prometheus collector of every training job of the sources :func:`watch` was given."""

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fams = {
            "rounds": CounterMetricFamily("pipeline_rounds", "Server updates applied", labels=["job"]),
            "samples": CounterMetricFamily("pipeline_samples", "Training samples pushed", labels=["job"]),
            "pushes": CounterMetricFamily("pipeline_pushes", "Deltas pushed", labels=["job"]),
            "bytes_in": CounterMetricFamily("pipeline_bytes_received", "Delta bytes received", labels=["job"]),
            "bytes_out": CounterMetricFamily("pipeline_bytes_sent", "Parameter bytes sent", labels=["job"]),
            "loss": GaugeMetricFamily("pipeline_loss", "Training loss (moving average)", labels=["job"]),
            "val": GaugeMetricFamily("pipeline_validation_loss", "Last validation loss", labels=["job"]),
            "participants": GaugeMetricFamily("pipeline_participants", "Active participants", labels=["job"]),
            "staleness": GaugeMetricFamily("pipeline_staleness_mean", "Mean staleness of pushes", labels=["job"]),
            "epsilon": GaugeMetricFamily(
                "pipeline_privacy_epsilon", "Differential privacy spent: epsilon at the job's delta", labels=["job"]
            ),
            "ckpt": GaugeMetricFamily(
                "pipeline_checkpoint_age_seconds", "Seconds since the last checkpoint (-1: none yet)", labels=["job"]
            ),
            "site_loss": GaugeMetricFamily(
                "pipeline_site_loss", "Federated: last loss on each site's own held-out rows", labels=["job", "site"]
            ),
            "site_metric": GaugeMetricFamily(
                "pipeline_site_metric",
                "Federated: last accuracy (or R^2) on each site's own held-out rows",
                labels=["job", "site"],
            ),
            "site_mean": GaugeMetricFamily(
                "pipeline_site_metric_mean", "Federated: the sites' metric weighted by their rows", labels=["job"]
            ),
            "site_worst": GaugeMetricFamily(
                "pipeline_site_metric_worst_decile",
                "Federated: mean metric of the worst tenth of sites",
                labels=["job"],
            ),
        }
        fams["running"] = GaugeMetricFamily(
            "pipeline_job_running", "1 while the job trains, 0 once it finished (or failed)", labels=["job"]
        )
        now = time.time()
        for src in _all_sources():
            # a finished job keeps its last counters (until newer jobs push it out of the
            # scheduler's recent list) so that the scrape after its end still sees them
            for st in [*src.finished_jobs(), *src.running()]:
                lab = [st.job]
                fams["running"].add_metric(lab, 0.0 if st.closed else 1.0)
                fams["rounds"].add_metric(lab, st.version)
                fams["samples"].add_metric(lab, st.samples)
                fams["pushes"].add_metric(lab, st.pushes)
                fams["bytes_in"].add_metric(lab, st.bytes_in)
                fams["bytes_out"].add_metric(lab, st.bytes_out)
                # a value not known yet (no push, no evaluation) is left out, not exported as NaN
                _add_known(fams["loss"], lab, st.loss)
                _add_known(fams["val"], lab, st.epochs[-1].get("val_loss") if st.epochs else None)
                fams["participants"].add_metric(lab, len(st.participants))
                fams["staleness"].add_metric(lab, st.mean_staleness())
                if not st.closed:  # a finished job's checkpoint does not age
                    fams["ckpt"].add_metric(lab, now - st.checkpoint_time if st.checkpoint_time else -1.0)
                if st.epsilon is not None:
                    fams["epsilon"].add_metric(lab, st.epsilon)
                for site, v in sorted(st.sites.items()):
                    _add_known(fams["site_loss"], [st.job, site], v.get("loss"))
                    _add_known(fams["site_metric"], [st.job, site], v.get("metric"))
                _add_known(fams["site_mean"], lab, st.site_mean)
                _add_known(fams["site_worst"], lab, st.site_worst_decile)
        yield from fams.values()


def _add_known(family: Any, labels: list[str], value: Any) -> None:
    """Add ``value`` to ``family`` when it is a finite number: a gauge without a value yet has no
    sample (an alert on ``pipeline_loss > 1`` never sees a NaN it cannot compare)."""
    if value is None or isinstance(value, bool):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    if math.isfinite(number):
        family.add_metric(labels, number)


def register_prometheus() -> bool:
    """Expose the watched jobs on ``/metrics`` (one collector per process); False without
    ``prometheus_client``."""
    global _collector_registered
    if _collector_registered:
        return True
    try:
        import prometheus_client
    except ImportError:
        return False
    prometheus_client.REGISTRY.register(TrainingCollector())
    _collector_registered = True
    return True
