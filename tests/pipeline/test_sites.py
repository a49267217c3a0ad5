"""The sites file and the driver's combination of what the sites report (no cluster)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError, StoreError
from pipeline.sites import (
    Federation,
    Site,
    clients_per_round,
    pool_sites,
    read_sites,
    sample_clients,
    schema_mismatch,
    site_resources,
    site_spread,
    sites_digest,
)


def test_read_sites_sorted_by_name(tmp_path):
    p = tmp_path / "sites.toml"
    p.write_text('[sites.b-2]\nstore = "/x/b.zarr"\n[sites."a.1"]\nstore = "s3://bucket/a.zarr"\n')
    assert read_sites(p) == [Site("a.1", "s3://bucket/a.zarr"), Site("b-2", "/x/b.zarr")]
    assert sites_digest(read_sites(p)) != sites_digest([Site("a.1", "/other"), Site("b-2", "/x/b.zarr")])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "lists no sites; add one [sites.NAME] table per site"),
        ("[sites]\n", "lists no sites"),
        ('[sites."a b"]\nstore = "x"\n', "site name 'a b' is invalid"),
        ("[sites.a]\n", "site 'a' has no store; add store = \"PATH\""),
        ('[sites.a]\nstore = "x"\nrows = 3\n', "site 'a' has unknown key 'rows'"),
        ('store = "x"\n', "unknown top-level key 'store'"),
        ("[sites.a\n", "is not valid TOML"),
    ],
)
def test_bad_sites_files_are_named_in_one_line(tmp_path, text, fragment):
    p = tmp_path / "sites.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_sites(p)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        read_sites(tmp_path / "missing.toml")


def _info(rows: np.ndarray, y: np.ndarray, classes=("a", "b"), names=("p", "q"), encodings=None) -> dict:
    return {
        "n_features": rows.shape[1],
        "feature_names": list(names),
        "encodings": encodings or [],
        "task": "classification",
        "classes": list(classes),
        "y_width": 1,
        "count": len(rows),
        "sum": rows.sum(axis=0).tolist(),
        "sumsq": (rows**2).sum(axis=0).tolist(),
        "class_counts": np.bincount(y, minlength=len(classes)).tolist(),
        "n_held_out": 0,
    }


def test_pooled_statistics_equal_those_of_the_pooled_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, (500, 2)), rng.normal(-1, 0.5, (200, 2))
    ya, yb = rng.integers(0, 2, 500), rng.integers(0, 2, 200)
    fed = pool_sites("s.toml", {"b": _info(b, yb), "a": _info(a, ya)})
    both = np.vstack([a, b])
    np.testing.assert_allclose(fed.mean, both.mean(axis=0))
    np.testing.assert_allclose(fed.std, both.std(axis=0))
    np.testing.assert_array_equal(fed.class_counts, np.bincount(np.concatenate([ya, yb])))
    assert fed.rows == {"a": 500, "b": 200} and fed.n_rows == 700 and fed.classes == ["a", "b"]


@pytest.mark.parametrize(
    "other, fragment",
    [
        ({"classes": ("b", "a")}, "has the classes [b, a], expected [a, b] in this order"),
        ({"names": ("q", "p")}, "has its features in another order"),
        (
            {"encodings": [{"name": "p", "kind": "onehot", "categories": ["x"]}]},
            "encodes column 'p' as onehot",
        ),
    ],
)
def test_a_site_whose_schema_differs_is_refused_naming_it(other, fragment):
    x, y = np.ones((4, 2)), np.zeros(4, int)
    ordinal = [{"name": "p", "kind": "ordinal", "categories": ["x"]}]
    other = {"encodings": ordinal, **other}
    with pytest.raises(StoreError) as err:
        pool_sites("s.toml", {"a": _info(x, y, encodings=ordinal), "z": _info(x, y, **other)})
    msg = str(err.value)
    assert msg.startswith("site 'z' does not match site 'a'") and fragment in msg and "--like" in msg


def test_a_plan_reads_back_bit_for_bit_and_checks_a_late_report():
    """The plan a checkpoint keeps (JSON) rebuilds the same statistics, and a site reporting
    after it is checked against its schema as the start checks the sites."""
    import json

    rng = np.random.default_rng(1)
    a, b = rng.normal(3, 2, (300, 2)), rng.normal(-1, 0.7, (100, 2))
    fed = pool_sites("s.toml", {"a": _info(a, rng.integers(0, 2, 300)), "b": _info(b, rng.integers(0, 2, 100))})
    back = Federation.from_plan("s.toml", json.loads(json.dumps(fed.plan())))
    for key in ("mean", "std", "y_mean", "y_std", "class_counts"):
        assert getattr(back, key).tobytes() == getattr(fed, key).tobytes(), key
    assert back.schema() == fed.schema() and back.rows == fed.rows and back.norm() == fed.norm()
    x, y = np.ones((4, 2)), np.zeros(4, int)
    assert schema_mismatch(back.schema(), _info(x, y)) is None
    assert schema_mismatch(back.schema(), _info(x, y, classes=("a", "c"))) == (
        "has the classes [a, c], expected [a, b] in this order"
    )
    assert schema_mismatch(back.schema(), _info(np.ones((4, 3)), y, names=("p", "q", "r"))) == (
        "has 3 features, expected 2"
    )


def test_sampling_is_seeded_by_round_and_bounded():
    assert clients_per_round(10, 0.3, 1) == 3 and clients_per_round(10, 0.01, 2) == 2
    assert clients_per_round(1, 0.5, 3) == 1
    sites = [f"s{i}" for i in range(20)]
    first = sample_clients(sites, 5, seed=1, round_=3)
    assert first == sample_clients(list(reversed(sites)), 5, seed=1, round_=3) and len(set(first)) == 5
    assert first != sample_clients(sites, 5, seed=1, round_=4)
    assert sample_clients(sites[:3], 5, seed=1, round_=3) == sites[:3]


def test_site_resources_and_spread():
    info = {"workers": {"tcp://a": {"resources": {"x": 1}}, "tcp://b": {"resources": {}}, "tcp://c": {}}}
    assert site_resources(info) == {"x": {"tcp://a"}}
    per = {f"s{i}": {"n": 10, "accuracy": i / 10} for i in range(10)}
    per["big"] = {"n": 90, "accuracy": 1.0}
    spread = site_spread(per, "accuracy")
    assert spread["site_worst_decile"] == pytest.approx(0.05)  # the worst 2 of 11 sites
    assert spread["site_mean"] == pytest.approx((sum(i for i in range(10)) + 90) / 190)


def test_pooled_statistics_of_columns_far_from_zero_keep_their_spread(tmp_path):
    """Sites report their sums of squared deviations about their own means, which pool exactly: a
    target of Unix times (1.7e9, a few seconds apart) pooled from raw sums of squares had a std
    of 1 (its variance cancelled to 0) where the rows' is about 3."""
    from pipeline.fedclient import site_info
    from pipeline.ingest import ingest
    from pipeline.store import open_store

    rng = np.random.default_rng(0)
    stores = {}
    for name, n, shift in (("a", 400, 0.0), ("b", 250, 2.0)):
        x = rng.standard_normal((n, 2))
        t = 1.7e9 + shift + 3.0 * x[:, 0] + rng.standard_normal(n)
        src = tmp_path / f"{name}.csv"
        src.write_text("p,q,t\n" + "".join(f"{a:.5f},{b + 3e4:.4f},{c:.6f}\n" for (a, b), c in zip(x, t, strict=True)))
        stores[name] = str(ingest(src, tmp_path / f"{name}.zarr", target="t").path)
    fed = pool_sites("s.toml", {name: site_info(path) for name, path in stores.items()})
    X = np.vstack([np.asarray(open_store(p).X[:], np.float64) for p in stores.values()])
    y = np.concatenate([np.asarray(open_store(p).y[:], np.float64).reshape(-1) for p in stores.values()])
    np.testing.assert_allclose(fed.y_mean, [y.mean()], rtol=1e-12)
    np.testing.assert_allclose(fed.y_std, [y.std()], rtol=1e-6)
    np.testing.assert_allclose(fed.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fed.std, X.std(axis=0), rtol=1e-6)
