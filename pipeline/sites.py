"""The sites of a federated run: the sites file, and the plan made from what each site reports.

A sites file (TOML) names each site and where its store is *as that site's workers see it*::

    [sites.hospital-a]
    store = "/data/a/train.zarr"
    [sites.hospital-b]
    store = "/mnt/b/train.zarr"

A site is the set of Dask workers started with ``--resources hospital-a=1`` (site name ==
resource name). The driver never opens a site's store: :func:`pipeline.fedclient.site_info`
runs on the site and reports its rows, schema and per-feature sums over its training rows;
:func:`pool_sites` checks that the reporting sites' schemas agree and combines their sums into
the normalization statistics and class counts the whole federation trains with. That plan is
fixed for the run (:meth:`Federation.plan`, kept in every checkpoint): a site reporting later is
checked against its schema (:func:`schema_mismatch`) and trains with its statistics.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StoreError
from pipeline.store import layout_mismatch

SITE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_SITES = 4096


@dataclass(frozen=True)
class Site:
    """One site: its name (== its workers' Dask resource) and its store as its workers see it."""

    name: str
    store: str


def read_sites(path: str | os.PathLike) -> list[Site]:
    """The sites of the TOML file ``path``, sorted by name; :class:`ConfigError` names the
    first problem (unreadable file, no sites, a bad name, a missing or relative-looking store)."""
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"sites file {spath!r} not found; pass the TOML file that lists [sites.NAME] tables"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"sites file {spath!r} is a directory; pass the TOML file that lists the sites") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sites file {spath!r} is not valid TOML: {exc}") from None
    unknown = sorted(k for k in data if k != "sites")
    if unknown:
        raise ConfigError(
            f"sites file {spath!r}: unknown top-level key {unknown[0]!r}; it holds only [sites.NAME] tables"
        )
    table = data.get("sites")
    if not isinstance(table, dict) or not table:
        raise ConfigError(
            f'sites file {spath!r} lists no sites; add one [sites.NAME] table per site with store = "PATH"'
        )
    if len(table) > MAX_SITES:
        raise ConfigError(f"sites file {spath!r} lists {len(table)} sites; at most {MAX_SITES} are supported")
    sites = []
    for name, entry in table.items():
        if not SITE_NAME.fullmatch(name):
            raise ConfigError(
                f"sites file {spath!r}: site name {name!r} is invalid: use letters, digits, '_', '.' and '-' "
                "(the name is the Dask resource its workers declare)"
            )
        if not isinstance(entry, dict):
            raise ConfigError(f'sites file {spath!r}: site {name!r} must be a table with store = "PATH"')
        extra = sorted(k for k in entry if k != "store")
        if extra:
            raise ConfigError(
                f'sites file {spath!r}: site {name!r} has unknown key {extra[0]!r}; a site has only store = "PATH"'
            )
        store = entry.get("store")
        if not isinstance(store, str) or not store.strip():
            raise ConfigError(
                f'sites file {spath!r}: site {name!r} has no store; add store = "PATH" (the path its workers see)'
            )
        sites.append(Site(name, store))
    return sorted(sites, key=lambda s: s.name)


def sites_digest(sites: list[Site]) -> str:
    """A fingerprint of the sites (names and store paths): a resumed run refuses another one."""
    h = hashlib.sha256()
    for s in sorted(sites, key=lambda s: s.name):
        h.update(f"{s.name}\0{s.store}\0".encode())
    return h.hexdigest()


def site_resources(info: Mapping[str, Any]) -> dict[str, set[str]]:
    """Site name -> addresses of the workers that declare its resource, from
    ``client.scheduler_info()`` (workers without a resource are in no site)."""
    out: dict[str, set[str]] = {}
    for addr, w in (info.get("workers") or {}).items():
        for res, amount in (w.get("resources") or {}).items():
            if amount and amount > 0:
                out.setdefault(str(res), set()).add(addr)
    return out


# --------------------------------------------------------------------------------------------
# Combining what the sites report
# --------------------------------------------------------------------------------------------


@dataclass
class Federation:
    """The federation's pooled view: the schema every site shares, the normalization and
    class counts combined from the sites' sums, and each site's row counts.

    It stands in for a store where the driver needs one (:func:`pipeline.train.build_spec`,
    :meth:`pipeline.model.Model.from_training`): ``path``, ``task``, ``classes``,
    ``n_features``, ``feature_names``, ``attrs["encodings"]``, ``mean``, ``std``, ``y``
    (its ``ndim`` and ``shape``), ``y_mean`` and ``y_std``."""

    path: str
    task: str
    classes: list[str] | None
    n_features: int
    feature_names: list[str]
    encodings: Any
    mean: np.ndarray
    std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    y_width: int
    class_counts: np.ndarray | None
    rows: dict[str, int] = field(default_factory=dict)  # site -> training rows
    held_out: dict[str, int] = field(default_factory=dict)  # site -> held-out (validation) rows

    @property
    def attrs(self) -> dict[str, Any]:
        return {"encodings": self.encodings}

    @property
    def y(self) -> Any:
        shape = (sum(self.rows.values()),) if self.y_width == 1 else (sum(self.rows.values()), self.y_width)
        return SimpleNamespace(ndim=len(shape), shape=shape)

    @property
    def n_rows(self) -> int:
        return sum(self.rows.values())

    def norm(self) -> dict[str, list[float]]:
        """The pooled statistics as the tasks take them (``{"mean": [...], "std": [...]}``)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def schema(self) -> dict[str, Any]:
        """The schema every site of the run shares (:func:`schema_of`): a site reporting after
        the plan is checked against it (:func:`schema_mismatch`)."""
        return schema_of(
            {
                "n_features": self.n_features,
                "feature_names": self.feature_names,
                "encodings": self.encodings,
                "task": self.task,
                "classes": self.classes,
                "y_width": self.y_width,
            }
        )

    def plan(self) -> dict[str, Any]:
        """The federation as JSON-safe data (a checkpoint's meta): the schema, the pooled
        statistics (float64 written as JSON numbers, which read back bit for bit) and the
        planned sites' rows. :meth:`from_plan` rebuilds it without asking a site."""
        return {
            **self.schema(),
            "encodings": self.encodings,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "y_mean": self.y_mean.tolist(),
            "y_std": self.y_std.tolist(),
            "class_counts": None if self.class_counts is None else self.class_counts.tolist(),
            "rows": dict(self.rows),
            "held_out": dict(self.held_out),
        }

    @classmethod
    def from_plan(cls, path: str, plan: Mapping[str, Any]) -> Federation:
        """The federation :meth:`plan` describes (a resumed run's: no re-pooling)."""
        counts = plan.get("class_counts")
        return cls(
            path=path,
            task=plan["task"],
            classes=None if plan.get("classes") is None else list(plan["classes"]),
            n_features=int(plan["n_features"]),
            feature_names=list(plan["feature_names"]),
            encodings=plan.get("encodings"),
            mean=np.asarray(plan["mean"], np.float64),
            std=np.asarray(plan["std"], np.float64),
            y_mean=np.atleast_1d(np.asarray(plan["y_mean"], np.float64)),
            y_std=np.atleast_1d(np.asarray(plan["y_std"], np.float64)),
            y_width=int(plan.get("y_width", 1)),
            class_counts=None if counts is None else np.asarray(counts, np.int64),
            rows={str(k): int(v) for k, v in (plan.get("rows") or {}).items()},
            held_out={str(k): int(v) for k, v in (plan.get("held_out") or {}).items()},
        )


def _layout(info: Mapping[str, Any]) -> SimpleNamespace:
    """A site's report in the shape :func:`pipeline.store.layout_mismatch` reads a store."""
    return SimpleNamespace(
        n_features=int(info["n_features"]),
        feature_names=list(info["feature_names"]),
        attrs={"encodings": info.get("encodings") or []},
        task=info["task"],
        classes=None if info.get("classes") is None else list(info["classes"]),
    )


def schema_of(info: Mapping[str, Any]) -> dict[str, Any]:
    """The schema part of a site's report (or of a :meth:`Federation.plan`): what every site
    of a run must share."""
    return {
        "n_features": int(info["n_features"]),
        "feature_names": list(info["feature_names"]),
        "encodings": info.get("encodings") or [],
        "task": info["task"],
        "classes": None if info.get("classes") is None else list(info["classes"]),
        "y_width": int(info.get("y_width", 1)),
    }


def schema_mismatch(reference: Mapping[str, Any], info: Mapping[str, Any]) -> str | None:
    """How the site's report ``info`` differs from the schema ``reference`` (:func:`schema_of`):
    features, their encodings, the task and classes (:func:`pipeline.store.layout_mismatch`),
    the target's width; None when it agrees."""
    problem = layout_mismatch(reference, _layout(info), labels=True)
    if problem is None and int(info.get("y_width", 1)) != int(reference.get("y_width", 1)):
        problem = f"has {info.get('y_width')} target columns, expected {reference.get('y_width')}"
    return problem


def _pooled(infos: Sequence[Mapping[str, Any]], prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The pooled mean and population std (0 replaced by 1) of the sites' reports ``infos``:
    their counts, sums (``{prefix}sum``) and sums of squared deviations about each site's own
    mean (``{prefix}m2``), combined as Chan et al.'s parallel update does, so a column whose mean
    is large against its spread (timestamps: 1.7e9 +- 3) keeps its spread; from a report without
    them (an earlier version's), the raw sums of squares."""
    count = sum(int(i["count"]) for i in infos)
    s = sum(np.asarray(i[f"{prefix}sum"], np.float64) for i in infos)
    mean = s / max(count, 1)
    if all(f"{prefix}m2" in i for i in infos):
        m2 = sum(
            np.asarray(i[f"{prefix}m2"], np.float64)
            + int(i["count"]) * (np.asarray(i[f"{prefix}sum"], np.float64) / max(int(i["count"]), 1) - mean) ** 2
            for i in infos
        )
        var = m2 / max(count, 1)
    else:
        ss = sum(np.asarray(i[f"{prefix}sumsq"], np.float64) for i in infos)
        var = np.maximum(ss / max(count, 1) - mean**2, 0.0)
    std = np.sqrt(var)
    return mean, np.where(std > 0, std, 1.0)


def pool_sites(sites_path: str, infos: Mapping[str, Mapping[str, Any]]) -> Federation:
    """Check that every site's schema agrees with the first site's (by name) and combine
    their sums; :class:`StoreError` names the first site that differs, how, and the fix."""
    names = sorted(infos)
    if not names:
        raise StoreError(f"sites file {sites_path!r}: no site reported its store")
    ref_name = names[0]
    ref = infos[ref_name]
    reference = schema_of(ref)
    for name in names[1:]:
        problem = schema_mismatch(reference, infos[name])
        if problem:
            raise StoreError(
                f"site {name!r} does not match site {ref_name!r}: its store {problem}; ingest it with "
                f"--like a reference store (e.g. the store of site {ref_name!r}) so that every site shares one schema"
            )
    empty = [n for n in names if int(infos[n]["count"]) <= 0]
    if len(empty) == len(names):
        raise StoreError(f"no site of {sites_path!r} has rows to train on (every store is empty or held out)")
    mean, std = _pooled([infos[n] for n in names])
    width = int(ref.get("y_width", 1))
    if ref["task"] == "classification":
        counts = sum(np.asarray(infos[n]["class_counts"], np.int64) for n in names)
        y_mean, y_std = np.zeros(width), np.ones(width)
    else:
        counts = None
        y_mean, y_std = _pooled([infos[n] for n in names], "y_")
    return Federation(
        path=sites_path,
        task=ref["task"],
        classes=None if ref.get("classes") is None else list(ref["classes"]),
        n_features=int(ref["n_features"]),
        feature_names=list(ref["feature_names"]),
        encodings=ref.get("encodings"),
        mean=np.asarray(mean, np.float64),
        std=np.asarray(std, np.float64),
        y_mean=np.atleast_1d(np.asarray(y_mean, np.float64)),
        y_std=np.atleast_1d(np.asarray(y_std, np.float64)),
        y_width=width,
        class_counts=counts,
        rows={n: int(infos[n]["count"]) for n in names},
        held_out={n: int(infos[n].get("n_held_out", 0)) for n in names},
    )


def clients_per_round(available: int, fraction_fit: float, min_clients: int) -> int:
    """How many of ``available`` clients a round samples: ``max(min_clients, ceil(fraction_fit
    * available))``, at most ``available``."""
    return min(available, max(min_clients, math.ceil(fraction_fit * available)))


def sample_clients(available: list[str], n: int, seed: int, round_: int) -> list[str]:
    """``n`` of ``available`` (sorted first) drawn by a generator seeded with ``(seed, round)``:
    the same round of a resumed run samples the same clients when the same ones are available."""
    pool = sorted(available)
    if n >= len(pool):
        return pool
    rng = np.random.default_rng([int(seed), int(round_), 15485863])
    return sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))


def site_spread(per_site: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, float]:
    """The spread over sites of their evaluation: ``site_mean`` (the metric weighted by each
    site's evaluated rows) and ``site_worst_decile`` (the mean metric of the worst tenth of the
    sites, at least one: the lowest accuracy or R^2)."""
    scored = [(float(v[metric]), int(v["n"])) for v in per_site.values() if v.get("n") and metric in v]
    if not scored:
        return {}
    total = sum(n for _, n in scored)
    mean = sum(m * n for m, n in scored) / max(total, 1)
    worst = sorted(m for m, _ in scored)[: max(1, math.ceil(len(scored) / 10))]
    return {"site_mean": mean, "site_worst_decile": float(np.mean(worst))}
