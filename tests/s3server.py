"""A real S3 endpoint for tests: moto's server on 127.0.0.1 and one empty bucket on it, the
environment pointing this process and every process started from it (worker processes
included) at it, as a user's S3 would be reached (``AWS_ENDPOINT_URL`` and credentials)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

# S3 file systems made before the environment changed: kept alive, not collected, since one
# collected with its session open warns (aiohttp's ResourceWarning) in whichever test runs then
_FORGOTTEN: list[Any] = []


def forget_s3_instances() -> None:
    """Make the next S3 file system anew (s3fs keeps one per set of arguments, reading the
    environment when it is made), keeping those made before alive."""
    import s3fs

    _FORGOTTEN.extend(s3fs.S3FileSystem._cache.values())
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_bucket(bucket: str) -> Iterator[str]:
    """``s3://BUCKET``, empty, on a moto server started for it; the bucket is removed afterwards
    (moto keeps its buckets in this process: another module's server would find it there)."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",  # an endpoint that is down fails at once
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(k, raising=False)
            forget_s3_instances()  # made before: they read another environment
            fs = s3fs.S3FileSystem()
            fs.mkdir(bucket)
            yield f"s3://{bucket}"
            fs.invalidate_cache()
            fs.rm(bucket, recursive=True)
            forget_s3_instances()
    finally:
        server.stop()
