"""A read-only view of the parameter server's training jobs, for the dashboard and Prometheus.

The parameter server (:mod:`pipeline.ps`) produces :class:`JobSnapshot` values; the training
page and the Prometheus collector (:mod:`pipeline.dashboard`) read them through a
:class:`JobSource`. Neither side imports the other: the scheduler preload hands the
extension to the dashboard as its source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class JobSnapshot:
    """One job's counters at one moment (running or finished); a copy, never updated.

    ``history`` holds the rounds ``(time, version, loss, samples, deltas)`` when the snapshot
    was asked for with them, else it is empty; ``epochs`` the driver's per-epoch records.
    A federated job's last per-site evaluation: ``sites`` (site -> ``{"loss", "metric", "n"}``),
    ``site_mean`` (the metric weighted by each site's rows) and ``site_worst_decile`` (the
    mean metric of the worst tenth of the sites); empty / None for other jobs. ``shards``: a
    sharded job's shards (its counters are the first shard's, every push reaching every shard).
    """

    job: str
    mode: str
    n_params: int
    version: int
    epoch: int
    pushes: int
    samples: int
    bytes_in: int
    bytes_out: int
    loss: float | None
    lr: float
    participants: tuple[str, ...]
    expected: tuple[str, ...]
    staleness: Mapping[int, int]
    per_worker: Mapping[str, Mapping[str, float]]
    created: float
    last_push: float
    checkpoint_time: float
    failed: str | None
    closed: bool
    epochs: tuple[Mapping[str, Any], ...]
    history: tuple[tuple, ...] = ()
    # differential privacy: dp (off | central | local), epsilon spent at delta, rounds
    # accounted, clip, noise_multiplier, sampling_rate, target_epsilon, exhausted,
    # secure_aggregation (empty for jobs of servers without privacy)
    privacy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sites: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))
    site_mean: float | None = None
    site_worst_decile: float | None = None
    # a sharded job (ps_shards > 0): one row per shard {"address", "lo", "hi", "version",
    # "pushes", "bytes_in"}; empty for a job held by the scheduler
    shards: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_metrics(cls, m: Mapping[str, Any]) -> JobSnapshot:
        """The snapshot of a job's metrics dict (the ``ps_metrics`` reply of one job)."""
        return cls(
            job=str(m["job"]),
            mode=str(m["mode"]),
            n_params=int(m["n_params"]),
            version=int(m["version"]),
            epoch=int(m.get("epoch", 0)),
            pushes=int(m["pushes"]),
            samples=int(m["samples"]),
            bytes_in=int(m["bytes_in"]),
            bytes_out=int(m["bytes_out"]),
            loss=m["loss"],
            lr=float(m["lr"]),
            participants=tuple(m["participants"]),
            expected=tuple(m.get("expected", ())),
            staleness=MappingProxyType({int(k): int(v) for k, v in m["staleness"].items()}),
            per_worker=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in m["per_worker"].items()}),
            created=float(m["created"]),
            last_push=float(m["last_push"]),
            checkpoint_time=float(m["checkpoint_time"]),
            failed=m["failed"],
            closed=bool(m["closed"]),
            epochs=tuple(MappingProxyType(dict(e)) for e in m.get("epochs", ())),
            history=tuple(tuple(h) for h in m.get("history", ())),
            privacy=MappingProxyType(dict(m.get("privacy") or {})),
            sites=MappingProxyType({str(k): MappingProxyType(dict(v)) for k, v in (m.get("sites") or {}).items()}),
            site_mean=m.get("site_mean"),
            site_worst_decile=m.get("site_worst_decile"),
            shards=tuple(MappingProxyType(dict(r)) for r in m.get("shards") or ()),
        )

    @property
    def epsilon(self) -> float | None:
        """The privacy spent so far (epsilon at the job's delta); None without DP."""
        if self.privacy.get("dp", "off") == "off":
            return None
        return float(self.privacy.get("epsilon", 0.0))

    def mean_staleness(self) -> float:
        """Mean staleness of the pushes so far (0 before the first)."""
        n = sum(self.staleness.values())
        return sum(k * v for k, v in self.staleness.items()) / n if n else 0.0


def rounds_after(rows: Sequence[Sequence[Any]], since: int | None) -> list[list]:
    """The history rows (``time, version, ...``, in version order) of versions above ``since``;
    every row when ``since`` is None. Read from the newest back, so a page asking for the few
    rounds since its last refresh costs those, not the whole history."""
    if since is None:
        return [list(r) for r in rows]
    out = []
    for r in reversed(rows):  # a list, tuple or deque
        if r[1] <= since:
            break
        out.append(list(r))
    out.reverse()
    return out


def coarse_history(rows: Sequence[Sequence[Any]], most: int) -> list[list]:
    """The round history ``rows`` (``time, version, loss, samples, deltas``) in at most ``most``
    rows spanning all of it: the first row as it is, then runs of consecutive rounds merged
    into one row each (the last round's time and version, the mean of the finite losses, the
    summed samples and deltas). A finished job's plots then still show its beginning, and the
    samples/s and rounds/s the dashboard computes from the merged rows stay what they were."""
    if len(rows) <= most:
        return [list(r) for r in rows]
    out = [list(rows[0])]
    edges = np.linspace(1, len(rows), most).astype(np.int64)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        group = rows[a:b]
        losses = [float(r[2]) for r in group if r[2] is not None and math.isfinite(r[2])]
        loss = sum(losses) / len(losses) if losses else float("nan")
        out.append([group[-1][0], group[-1][1], loss, sum(int(r[3]) for r in group), sum(int(r[4]) for r in group)])
    return out


class JobSource(Protocol):
    """What the dashboard reads: the jobs of one scheduler's parameter server."""

    def job_names(self) -> list[str]:
        """Recently finished jobs (oldest first, those not running again), then running ones."""
        ...

    def snapshot(self, job: str | None = None, since: int | None = None) -> JobSnapshot | None:
        """``job`` (running or recently finished) with its round history (``since``: only the
        rounds of later versions); the most recent job when ``job`` is None; None when there is
        no such job."""
        ...

    def running(self) -> list[JobSnapshot]:
        """Every running job, without round history."""
        ...

    def finished_jobs(self) -> list[JobSnapshot]:
        """The recently finished jobs not running again (oldest first), without round history."""
        ...
