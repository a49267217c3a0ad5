"""Fixtures shared by the pipeline tests: real stores from data/ and real local clusters.

Clusters are module-scoped: distributed's ``gen_cluster`` (used by test_ps.py) terminates
stray child processes when it starts, so no cluster may outlive the module that made it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pipeline.helpers import LETTER


@pytest.fixture(scope="session")
def letter_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """letter-recognition ingested with the conventional split (16,000 train / 4,000 test)."""
    from pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("letter")
    src = LETTER
    train = ingest(src, root / "train.zarr", target=0, rows="0:16000")
    test = ingest(src, root / "test.zarr", target=0, rows="16000:", like=train.path)
    return train.path, test.path


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    """A LocalCluster of two single-threaded worker processes, scheduler preloaded."""
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        yield c
