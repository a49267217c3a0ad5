"""Stores and outputs on an object store: a real S3 endpoint (moto's server on 127.0.0.1), reached
through the environment (``AWS_ENDPOINT_URL`` and credentials) by this process, by the processes
it starts and by the worker processes of a real LocalCluster, as a user's S3 would be."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.errors import PipelineError, StoreError  # noqa: E402
from pipeline.inference import evaluate_store, predict_store  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.store import create_store, open_store  # noqa: E402
from pipeline.train import train  # noqa: E402
from tests.pipeline.helpers import CLI, LETTER, cli_env, make_store  # noqa: E402
from tests.s3server import s3_bucket  # noqa: E402

BUCKET = "pipeline-data"


def _fresh_listings() -> None:
    """Forget the listings this process's s3fs filesystem cached: another process wrote since."""
    s3fs.S3FileSystem().invalidate_cache()


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The URL of an empty bucket on a moto S3 server on 127.0.0.1; the environment points every
    process started from now on (workers included) at it."""
    with s3_bucket(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def s3_client(s3: str) -> Iterator[object]:
    """Two single-threaded worker processes started with the environment that reaches ``s3``."""
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def s3_run(s3: str, s3_client: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """A model trained by the workers reading a store on S3; its run directory, the store's URL
    and a local copy of the store made by downloading it."""
    root = tmp_path_factory.mktemp("s3run")
    url = f"{s3}/train.zarr"
    make_store(url, n=3000, f=3, chunk_rows=500)
    local = root / "train.zarr"
    s3fs.S3FileSystem().get(url.removeprefix("s3://"), str(local), recursive=True)
    cfg = TrainConfig().with_overrides(["epochs=2", "hidden=[8]", "validation=0", "patience=0"])
    run = Path(train(url, cfg, root / "run", client=s3_client).run_dir)
    return run, url, local


def test_workers_read_a_store_on_s3_as_its_local_copy(s3_run, s3_client):
    run, url, local = s3_run
    model = load_model(run)
    remote = evaluate_store(model, url, s3_client)
    here = evaluate_store(model, str(local), s3_client)
    assert remote["n"] == here["n"] == 3000
    assert remote == here


@pytest.mark.parametrize("name", ["p.zarr", "p.parquet"])
def test_predictions_to_a_url_are_refused_and_nothing_is_written(s3_run, s3, tmp_path, monkeypatch, name):
    """``Path("s3://b/p.zarr")`` is the local directory ``s3:/b/p.zarr``: without the refusal the
    predictions went there (or failed in pyarrow), and the command said they were on S3."""
    run, url, _ = s3_run
    monkeypatch.chdir(tmp_path)
    out = f"{s3}/{name}"
    with pytest.raises(PipelineError, match=r"is a URL; .*name a local output and copy it to the bucket"):
        predict_store(load_model(run), url, out, None)
    assert os.listdir(tmp_path) == []
    assert not s3fs.S3FileSystem().exists(out)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from pipeline.store import create_store
    w = create_store(sys.argv[1], 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={})
    w.append(np.ones((30, 2), np.float32), np.zeros(30, np.int32))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _killed_writer(url: str) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    _fresh_listings()


def test_a_killed_writer_leaves_a_store_readers_refuse_and_force_replaces(s3):
    """An object store has no rename: a new store is written in place, format_version added last."""
    url = f"{s3}/killed.zarr"
    _killed_writer(url)
    meta = json.loads(s3fs.S3FileSystem().cat(f"{url.removeprefix('s3://')}/zarr.json"))
    assert "writer" in meta["attributes"] and "format_version" not in meta["attributes"]
    with pytest.raises(StoreError, match=r"is unfinished: its writer .* --force"):
        open_store(url)
    with pytest.raises(StoreError, match="exists; pass --force"):
        create_store(url, 2, x_dtype="float32", y_dtype="int32", attrs={})
    with create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={}) as w:
        w.append(np.full((15, 2), 3, np.float32), np.ones(15, np.int32))
    st = open_store(url)
    assert st.n_rows == 15 and st.read_rows(0, 15)[0].min() == 3


def test_a_killed_forced_writer_leaves_the_old_store_whole(s3):
    url = f"{s3}/kept.zarr"
    make_store(url, n=100, f=2, chunk_rows=50)
    _killed_writer(url)
    st = open_store(url)
    assert st.n_rows == 100 and st.read_rows(0, 100)[0][:, 0].tolist() == list(range(100))


def test_the_next_writer_removes_what_a_killed_forced_writer_left_beside_the_store(s3):
    """A writer replacing a store on S3 writes the new one beside it (``DEST.tmp-*``); killed, it
    leaves that behind. The next writer to the destination removes it (its writer ran on this
    host and has ended), but not a temporary whose writer still runs, nor one it did not write."""
    fs = s3fs.S3FileSystem()
    url = f"{s3}/swept.zarr"
    make_store(url, n=100, f=2, chunk_rows=50)
    _killed_writer(url)
    path = url.removeprefix("s3://")
    left = fs.glob(f"{path}.tmp-*")
    assert len(left) == 1, left
    live = create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={})
    try:
        live.append(np.ones((20, 2), np.float32), np.zeros(20, np.int32))
        fs.pipe(f"{path}.tmp-0123abcd/notes.txt", b"someone else's")  # not a store this program wrote
        _fresh_listings()
        with create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={}) as w:
            w.append(np.full((15, 2), 3, np.float32), np.ones(15, np.int32))
        _fresh_listings()
        kept = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}.tmp-*"))
        assert kept == sorted([live.tmp.rsplit("/", 1)[-1], "swept.zarr.tmp-0123abcd"]), kept
    finally:
        live.abort()
    assert open_store(url).n_rows == 15


def test_a_store_still_being_written_is_not_replaced(s3):
    url = f"{s3}/live.zarr"
    w = create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, attrs={})
    try:
        w.append(np.ones((20, 2), np.float32), np.zeros(20, np.int32))
        with pytest.raises(StoreError, match=rf"being written by process {os.getpid()} on this host"):
            create_store(url, 2, x_dtype="float32", y_dtype="int32", force=True, attrs={})
    finally:
        w.abort()
    assert not s3fs.S3FileSystem().exists(url)


def test_missing_bucket_and_key_are_named(s3):
    with pytest.raises(StoreError, match=r"^bucket 'no-such-bucket' of 's3://no-such-bucket/x.zarr' does not exist"):
        open_store("s3://no-such-bucket/x.zarr")
    with pytest.raises(StoreError, match=rf"^store '{s3}/absent.zarr' does not exist; check the URL"):
        open_store(f"{s3}/absent.zarr")
    with pytest.raises(StoreError, match=r"^bucket 'no-such-bucket' .* does not exist; check the URL, or create"):
        create_store("s3://no-such-bucket/x.zarr", 2, x_dtype="float32", y_dtype="int32", attrs={})


def test_an_endpoint_that_is_down_is_one_line(s3):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = cli_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    for args in (("inspect", f"{s3}/x.zarr"), ("ingest", LETTER, f"{s3}/x.zarr", "--target", "0")):
        done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: cannot reach the object store of ") and done.stderr.count("\n") == 1
        assert "check its endpoint (AWS_ENDPOINT_URL)" in done.stderr, done.stderr


_SILENT_ENDPOINT = textwrap.dedent(
    """
    import sys
    import pipeline.store as store
    from pipeline.errors import StoreError
    store.REMOTE_TIMEOUT = 2.0
    for attempt in (lambda: store.open_store(sys.argv[1]), lambda: store.create_store(sys.argv[1], 2, **{
        "x_dtype": "float32", "y_dtype": "int32", "force": True})):
        try:
            attempt()
        except StoreError as exc:
            print(exc)
    """
)


def test_an_endpoint_that_never_answers_is_given_up_on(s3):
    """A service that takes the connection and is silent: s3fs and botocore retry it for many minutes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog; nothing ever reads or answers them
        env = cli_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}")
        args = [sys.executable, "-c", _SILENT_ENDPOINT, f"{s3}/x.zarr"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    lines = done.stdout.splitlines()
    assert len(lines) == 2, (done.stdout, done.stderr)
    for line in lines:
        assert line.startswith(f"cannot reach the object store of '{s3}/x.zarr' (no answer within 2 s)"), line


_DTYPES = {"x_dtype": "float32", "y_dtype": "int32", "attrs": {}}


def test_denied_credentials_are_named(s3):
    import requests

    make_store(f"{s3}/guarded.zarr", n=20, f=2, chunk_rows=10)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # check keys now
    try:
        for attempt in (
            lambda: open_store(f"{s3}/guarded.zarr"),
            lambda: create_store(f"{s3}/other.zarr", 2, **_DTYPES),
        ):
            _fresh_listings()
            with pytest.raises(StoreError, match=r"is denied \(PermissionError.* check the credentials"):
                attempt()
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_a_forced_replacement_that_fails_leaves_the_old_store_whole(s3):
    url = f"{s3}/replaced.zarr"
    make_store(url, n=100, f=2, chunk_rows=30)
    fs = s3fs.S3FileSystem()
    before = {f: fs.cat(f) for f in fs.find(url.removeprefix("s3://"))}
    with pytest.raises(RuntimeError, match="source went bad"):
        with create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={}) as w:
            w.append(np.full((25, 2), 7, np.float32), np.ones(25, np.int32))
            raise RuntimeError("source went bad")
    _fresh_listings()
    assert {f: fs.cat(f) for f in fs.find(url.removeprefix("s3://"))} == before
    assert [p for p in fs.ls(BUCKET) if "replaced" in p] == [f"{BUCKET}/replaced.zarr"]  # no temporary left
    with create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=True, attrs={}) as w:
        w.append(np.full((25, 2), 7, np.float32), np.ones(25, np.int32))
    st = open_store(url)
    assert st.n_rows == 25 and st.chunk_rows == 10 and st.read_rows(0, 25)[0].min() == 7
    _fresh_listings()
    assert [p for p in fs.ls(BUCKET) if "replaced" in p] == [f"{BUCKET}/replaced.zarr"]
    chunks = sorted(f.rsplit("/c/", 1)[1] for f in fs.find(f"{BUCKET}/replaced.zarr/X") if "/c/" in f)
    assert chunks == ["0/0", "1/0", "2/0"]  # the old store's chunks 3/0 went with it


_SERVICE_STOPS = textwrap.dedent(
    """
    import os
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = "http://%s:%d" % server.get_host_and_port()
    import s3fs
    from pipeline.errors import StoreError
    from pipeline.store import open_store
    from tests.pipeline.helpers import make_store
    s3fs.S3FileSystem().mkdir("stopping")
    make_store("s3://stopping/s.zarr", n=3000, f=3, chunk_rows=500)
    st = open_store("s3://stopping/s.zarr")
    st.read_chunk(0)
    assert st.chunk_exists("X", 1)
    st._present.add(("X", 1))  # known to be there: its read fails, not the check before it
    server.stop()
    for i in (1, 2):
        try:
            st.read_chunk(i)
        except StoreError as exc:
            print(exc)
    """
)


def test_a_service_that_stops_is_not_taken_for_a_corrupted_store(s3):
    """Re-creating the store is the wrong advice when its chunks are fine and the service is down."""
    root = Path(__file__).resolve().parents[2]
    env = cli_env(PYTHONPATH=str(root))
    args = [sys.executable, "-c", _SERVICE_STOPS]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    lines = done.stdout.splitlines()
    assert len(lines) == 2, (done.stdout, done.stderr[-2000:])
    for i, line in zip((1, 2), lines, strict=True):
        assert line.startswith(f"chunk {i} of array 'X' (rows {i * 500}:{i * 500 + 500}) of store "), line
        assert "could not be fetched from its object store (EndpointConnectionError" in line, line
        assert "re-create" not in line and line.endswith("the network and the credentials, then run again"), line


_WRITES_FAIL = textwrap.dedent(
    """
    import os
    import numpy as np
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = "http://%s:%d" % (host, port)
    import s3fs
    from pipeline.errors import StoreError
    from pipeline.store import create_store, open_store
    from tests.pipeline.helpers import make_store
    s3fs.S3FileSystem().mkdir("failing")
    make_store("s3://failing/old.zarr", n=100, f=2, chunk_rows=50)
    rows = np.ones((10, 2), np.float32), np.zeros(10, np.int32)
    for url, force in (("s3://failing/new.zarr", False), ("s3://failing/old.zarr", True)):
        w = create_store(url, 2, x_dtype="float32", y_dtype="int32", chunk_rows=10, force=force, attrs={})
        w.append(*rows)
        server.stop()
        try:
            with w:
                w.append(*rows)
        except StoreError as exc:
            print(exc)
        server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)  # the same data again
        server.start()
    print(open_store("s3://failing/old.zarr").n_rows)
    server.stop()
    """
)


def test_an_object_store_that_fails_during_a_write_is_one_line(s3):
    root = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-c", _WRITES_FAIL]
    env = cli_env(PYTHONPATH=str(root))
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, (done.stdout, done.stderr[-2000:])
    for line, url in zip(lines, ("s3://failing/new.zarr", "s3://failing/old.zarr"), strict=False):
        assert line.startswith(f"writing the store '{url}' failed (EndpointConnectionError: "), line
        assert line.endswith("then run the command again with --force"), line
    assert "; nothing was kept:" in lines[0] and "; the store there is as it was:" in lines[1]
    assert lines[2] == "100"
