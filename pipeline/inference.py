"""Out-of-core evaluation and prediction on the cluster.

Each task reads its row chunk straight from the store on the worker, runs the model forward
exactly as :meth:`pipeline.model.Model.outputs` does for the same rows in memory (the rows as
stored, standardized with the model's statistics, the float64 reference kernels), so a store's
predictions and metrics are those of ``load_model(run).predict(X)`` on its rows, to the last
bit; and returns metric partial sums (evaluation) or writes its rows of the output (prediction):
a Zarr array whose chunks match the input's, or one Parquet file per input chunk in a
dataset directory. Both hold the same ``prediction``: the class labels as text (what
``Model.predict`` returns), or the predicted values. Outputs are written beside their
destination (a temporary carrying its writer's record, so a later prediction to the same output
removes it if its process was killed) and renamed into place when every task succeeded, so a
failed run leaves no half-written output. A data error a task meets (a corrupted or missing
chunk) is returned as a :class:`TaskFailure`, not raised: it is not retried and logs no worker
traceback, and the driver raises it as one line.

Both kinds of output carry a mark of this program (the Zarr group's ``kind = "predictions"``
attribute, the ``pipeline = predictions`` key of every Parquet file's schema metadata): ``force``
replaces an existing output only when it bears that mark, never a user's own data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.allocator import MAX_MMAP_THRESHOLD_MB, release_freed_memory, restore_mmap_threshold
from pipeline.errors import PipelineError, StoreError, TaskFailure, as_task_failure
from pipeline.metrics import evaluate_arrays, finish_metrics, merge_metrics
from pipeline.model import Model, target_name_of
from pipeline.store import (
    Store,
    _writer_gone,
    check_not_inside,
    for_workers,
    is_url,
    layout_mismatch,
    open_store,
    replace_dir,
    unwritable_reason,
    writer_marker,
)

PARQUET_MARK = {b"pipeline": b"predictions"}
_PART = re.compile(r"part-\d{6}\.parquet")
# A Parquet temporary's record of its writer (host, pid, start time), removed before the rename;
# a Zarr temporary keeps it in its attribute "writer".
_WRITER_FILE = "_writer.json"
# Seconds a failed or interrupted evaluation or prediction waits for its tasks still computing.
TASK_END_TIMEOUT = 30.0


def model_layout(model: Model) -> dict[str, Any]:
    """The model's features and classes, as :func:`pipeline.store.layout_mismatch` takes them."""
    return {
        "n_features": model.n_features,
        "feature_names": list(model.feature_names or []),
        "encodings": model.encodings or [],
        "task": model.task,
        "classes": model.classes,
        "feature_names_generated": model.feature_names_generated,
        "reading": model.reading or {},
    }


def store_targets(store: Store) -> tuple[str | None, int]:
    """The target column's name as the store's source gave it (None: not recorded, or made up for
    a source without column names: :func:`pipeline.model.target_name_of`) and the number of target
    values per row."""
    return target_name_of(store), int(np.prod(store.y.shape[1:], dtype=np.int64))


def _check_targets(model: Model, store: Store) -> None:
    """Refuse, for evaluation, a store whose target is another column than the model's (when
    the model records its target's name: older model files do not) or has another number of
    values per row."""
    name, k = store_targets(store)
    if k != model.n_targets:
        raise StoreError(
            f"store {store.path!r} has {k} target value(s) per row but the model predicts {model.n_targets}; "
            "evaluate it on data with the model's target (ingest it with --like TRAIN_STORE)"
        )
    if model.target_name is not None and name is not None and name != model.target_name:
        raise StoreError(
            f"store {store.path!r} has the target column {name!r} but the model was trained on "
            f"{model.target_name!r}; ingest the data with --like TRAIN_STORE (or --target {model.target_name})"
        )


def _check_compatible(model: Model, store: Store, labels: bool = False) -> None:
    """Refuse a store whose features (count, names, order, encodings) or, when its labels are
    used (``labels``: evaluation), task and classes differ from the model's."""
    if store.n_features != model.n_features:
        raise StoreError(
            f"store {store.path!r} has {store.n_features} features but the model expects "
            f"{model.n_features}; ingest it with --like TRAIN_STORE"
        )
    problem = layout_mismatch(model_layout(model), store, labels=labels)
    if problem:
        raise StoreError(
            f"store {store.path!r} does not match the model: it {problem}; ingest it with "
            "--like TRAIN_STORE (the store the model was trained on)"
        )


def foreign_output_reason(out: str | os.PathLike) -> str | None:
    """Why the existing ``out`` is not a prediction output of this program (None: it is one,
    or an empty directory, and ``force`` may replace it)."""
    dest = Path(out)
    if dest.is_symlink():
        return "it is a symbolic link"
    if not dest.is_dir():
        return "it is a file, not a prediction output of pipeline"
    names = os.listdir(dest)
    if not names:
        return None
    if dest.suffix == ".zarr":
        extra = sorted(set(names) - {"zarr.json", "prediction", "proba"})
        try:
            attrs = json.loads((dest / "zarr.json").read_text()).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            attrs = {}
        if extra or attrs.get("kind") != "predictions":
            return "it is not a prediction output of pipeline"
        return None
    import pyarrow.parquet as pq

    for name in sorted(names):
        if not _PART.fullmatch(name):
            return f"it holds {name!r}, which pipeline's predictions do not"
        try:
            meta = pq.read_schema(dest / name).metadata or {}
        except Exception:  # noqa: BLE001 - unreadable: not ours
            meta = {}
        if meta.get(b"pipeline") != PARQUET_MARK[b"pipeline"]:
            return f"its {name!r} was not written by pipeline"
    return None


def _temp_writer(tmp: Path, fmt: str) -> Any:
    """The writer record of ``tmp`` when it holds only what :func:`predict_store` writes into its
    temporary (else None: not ours, left alone)."""
    try:
        names = set(os.listdir(tmp))
    except OSError:
        return None
    try:
        if fmt == "zarr":
            if names - {"zarr.json", "prediction", "proba"}:
                return None
            attrs = json.loads((tmp / "zarr.json").read_text()).get("attributes") or {}
            return attrs.get("writer") if attrs.get("kind") == "predictions" else None
        if _WRITER_FILE not in names:
            return None
        parts = names - {_WRITER_FILE}
        if any(not _PART.fullmatch(n) for n in parts):
            return None
        import pyarrow.parquet as pq

        if any((pq.read_schema(tmp / n).metadata or {}).get(b"pipeline") != PARQUET_MARK[b"pipeline"] for n in parts):
            return None
        return json.loads((tmp / _WRITER_FILE).read_text())
    except Exception:  # noqa: BLE001 - unreadable or malformed: not ours to remove
        return None


def clean_stale_outputs(out: str | os.PathLike) -> list[str]:
    """Remove the temporaries (``.OUT.tmp-xxxxxxxx``) that earlier predictions to ``out`` left
    when they were killed: only those whose name has the pattern, whose content is what
    :func:`predict_store` writes (with its writer record) and whose writer process (on this host)
    is gone. A running prediction's temporary and anything else are left alone. Returns what
    was removed."""
    dest = Path(os.path.abspath(out))
    fmt = "zarr" if dest.suffix == ".zarr" else "parquet"
    name = re.compile(rf"\.{re.escape(dest.name)}\.tmp-[0-9a-f]{{8}}")
    removed: list[str] = []
    try:
        siblings = [p for p in dest.parent.iterdir() if name.fullmatch(p.name)]
    except OSError:
        return removed
    for p in siblings:
        if p.is_symlink() or not p.is_dir():
            continue
        marker = _temp_writer(p, fmt)
        if marker is not None and _writer_gone(marker):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def check_inputs(
    model: Model,
    store_path: str,
    out: str | None = None,
    *,
    proba: bool = False,
    force: bool = False,
    predicting: bool = False,
) -> tuple[Store, str]:
    """Everything :func:`evaluate_store` / :func:`predict_store` refuse, checked without a
    cluster: the store opens and matches the model (its features; for evaluation, when neither
    ``out`` nor ``predicting`` is given, also its labels: task and class list); ``out`` (for
    predictions) has a known suffix and is not clobbered without ``force``. Returns the store
    and the output format ("" without ``out``)."""
    if os.path.isfile(store_path):  # a CSV or Parquet file of new rows: they are ingested first
        raise StoreError(
            f"{store_path!r} is a file, not a store; ingest it first with `pipeline ingest {store_path} NEW.zarr "
            "--like TRAIN_STORE` (add --unlabelled when it has no target column) and use NEW.zarr"
        )
    store = open_store(store_path)
    evaluating = out is None and not predicting
    if evaluating and store.attrs.get("labelled") is False:
        raise StoreError(
            f"store {store_path!r} has no targets (ingested with --unlabelled), so there is nothing to "
            "evaluate against; use `pipeline predict`, or ingest the data with its target column"
        )
    if evaluating and model.task != store.task:
        raise StoreError(f"store {store_path!r} is a {store.task} store; the model does {model.task}")
    _check_compatible(model, store, labels=evaluating)
    if evaluating:
        _check_targets(model, store)
    if proba and model.task != "classification":
        raise PipelineError("--proba is for classification models")
    if out is None:
        return store, ""
    if is_url(out):  # Path() would make "s3://b/p.zarr" the local directory "s3:/b/p.zarr"
        raise PipelineError(
            f"output {out!r} is a URL; predictions are written to a local path (a file system every worker "
            "shares, on a cluster) and renamed into place, which object stores cannot do: name a local "
            "output and copy it to the bucket afterwards"
        )
    dest = Path(out)
    fmt = "zarr" if dest.suffix == ".zarr" else "parquet" if dest.suffix in (".parquet", ".pq") else ""
    if not fmt:
        raise PipelineError(f"output {out!r}: name it *.zarr (Zarr group) or *.parquet (Parquet dataset)")
    check_not_inside(dest, {"store": store.path})
    _check_not_in_store(dest, out, store)
    _check_writable(dest, out)
    if dest.exists() or dest.is_symlink():
        reason = foreign_output_reason(dest)
        if reason is not None:
            raise PipelineError(
                f"output {out!r} exists and {reason}; --force replaces only earlier predictions: choose another name"
            )
        if not force:
            raise PipelineError(f"output {out!r} already exists; pass --force to overwrite it")
    return store, fmt


def _check_not_in_store(dest: Path, out: str, store: Store) -> None:
    """Refuse an output inside the input store's directory: it would become a member of the
    store's Zarr group (and go with the store when it is ingested again with --force)."""
    if "://" in str(store.path):
        return
    root = os.path.realpath(store.path).rstrip(os.sep) + os.sep
    if os.path.realpath(dest).startswith(root):
        raise PipelineError(
            f"output {out!r} is inside the store {store.path!r}; writing it there would change the store: "
            "choose a location outside it"
        )


def _check_writable(dest: Path, out: str) -> None:
    """Refuse, before any work, an output whose directory cannot take a new entry: the output is
    written beside ``dest`` and renamed into place."""
    anc, why = unwritable_reason(dest)
    if anc.exists() and not anc.is_dir():
        raise PipelineError(f"output {out!r}: {str(anc)!r} is not a directory; choose another location")
    if why is not None:
        raise PipelineError(f"output {out!r} cannot be written in {str(anc)!r} ({why}); choose a writable location")


def _mmap_mb(model: Model) -> int:
    """The allocator setting a worker takes for this model's tasks (config key ``mmap_threshold_mb``)."""
    return int(model.config.get("mmap_threshold_mb", MAX_MMAP_THRESHOLD_MB))


def _target(model: Model) -> dict | None:
    if model.task == "classification":
        return None
    t = model.target or {"mean": [0.0], "std": [1.0]}
    return {"mean": np.asarray(t["mean"], np.float64), "std": np.asarray(t["std"], np.float64)}


def _chunk_ranges(store: Store) -> list[tuple[int, int]]:
    out = []
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        out.append((sl.start, min(sl.stop, store.n_rows)))
    return out


def model_outputs(
    model: Model, store: Store, ranges: list[tuple[int, int]], labels: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The model's outputs (:meth:`Model.outputs`) for rows ``ranges`` of ``store``, in order, in
    batches of 4,096 rows, with their labels when ``labels``. The rows are read as stored (the
    loader standardizes nothing: the model does, with its own statistics, never the store's)."""
    from pipeline.loader import ChunkLoader

    loader = ChunkLoader(store, ranges=ranges, batch_size=4096, shuffle=False, normalize=False, labels=labels)
    try:
        for X, y in loader.epoch(0):
            yield model.outputs(X), (y if labels else None)
    finally:
        loader.close()


def check_memory(model: Model, store: Store, ranges: list[tuple[int, int]], what: str) -> None:
    """Refuse (a :class:`PipelineError` naming the fix) a task whose rows this worker's memory
    limit cannot hold: the chunks it decodes and the model's outputs for them, on top of what
    the worker holds now; otherwise its nanny would restart the worker under it again and again."""
    from pipeline.loader import row_bytes, unit_read_bytes
    from pipeline.worker import check_task_memory

    ranges = [(a, b) for a, b in ranges if b > a]
    if not ranges:
        return
    rows = max(b - a for a, b in ranges)
    need = max(unit_read_bytes(store, a, b) for a, b in ranges) + 2 * rows * int(model.spec["n_out"]) * 8
    check_task_memory(
        need,
        f"{what} of {rows:,} rows (row chunks of {store.chunk_rows * row_bytes(store) / 2**20:,.0f} MiB)",
        "or ingest the store with a smaller --chunk-rows",
        PipelineError,
    )


def _stop_tasks(client: Any, futures: list[Any], token: str) -> None:
    """Cancel ``futures`` (keys ending in ``-token``) and wait, up to :data:`TASK_END_TIMEOUT`
    seconds, until no worker still runs one: a cancelled task that is computing runs to its end,
    and would write its rows into a prediction's temporary after the driver removed it (Zarr
    creates the directories again: a half-written temporary no later prediction recognizes), or
    be closed under by the cluster the command then closes (each logs its cancellation)."""
    from pipeline.worker import stop_job_tasks

    with contextlib.suppress(Exception):  # a client going away must not hide the error
        client.cancel(futures)
        client.run(stop_job_tasks, f"-{token}", TASK_END_TIMEOUT, on_error="ignore")


def _results(client: Any, futures: list[Any], token: str) -> list[Any]:
    """The futures' results in order; the first :class:`TaskFailure` stops the others
    (:func:`_stop_tasks`) and is raised (as ``client.gather`` raises the first exception)."""
    from distributed import as_completed

    pos = {f.key: i for i, f in enumerate(futures)}
    out: list[Any] = [None] * len(futures)
    try:
        for fut in as_completed(futures):
            value = fut.result()
            if isinstance(value, TaskFailure):
                raise value.error
            out[pos[fut.key]] = value
    except BaseException:
        _stop_tasks(client, futures, token)
        raise
    return out


def evaluate_task(store_path: str, ranges: list[tuple[int, int]], model: Model) -> dict | TaskFailure:
    """Metric partial sums of ``model`` on rows ``ranges`` of the store (runs on a worker); a
    data error is returned as a :class:`TaskFailure`."""
    restore_mmap_threshold(_mmap_mb(model))
    target, n_out = _target(model), model.spec["n_out"]
    try:
        store = open_store(store_path)
        check_memory(model, store, ranges, "an evaluation task")
        parts = [evaluate_arrays(out, y, target, n_out) for out, y in model_outputs(model, store, ranges, True)]
    except PipelineError as exc:
        return as_task_failure(exc)
    finally:
        release_freed_memory()
    return merge_metrics(parts)


def _site_store(model: Model, store_path: str) -> tuple[list[tuple[int, int]], str]:
    """On a site's worker: :func:`check_inputs` of its store, and the store's chunk ranges and
    path as its workers open it (the driver may not see the store at all)."""
    store, _ = check_inputs(model, store_path)
    return _chunk_ranges(store), for_workers(store.path)


def evaluate_store(model: Model, store_path: str, client: Any, site: str | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on every row of the store, computed chunk by chunk on the workers:
    accuracy, log loss and confusion matrix, or R^2, RMSE and MAE.

    ``site`` (a federation's store): every task, the checks of the store included, runs on the
    workers that declare the site's Dask resource, which alone may read the site's rows; only
    the metrics' sums leave them."""
    placement: dict[str, Any] = {}
    if site is not None and client is None:
        raise PipelineError("a site's store is evaluated on the workers of its site: pass a client")
    if site is None:
        store, _ = check_inputs(model, store_path)
        ranges, path = _chunk_ranges(store), for_workers(store.path)
    else:
        from pipeline.sites import site_resources

        if not site_resources(client.scheduler_info(n_workers=-1)).get(site):
            raise PipelineError(
                f"no worker of the cluster declares site {site!r}; start one with `dask worker SCHEDULER "
                f"--resources {site}=1` where the site's store is, or check the site's name"
            )
        placement = {"resources": {site: 1}}
        ranges, path = client.submit(_site_store, model, store_path, pure=False, **placement).result()
    if client is None:  # in this process: the same tasks, one after the other
        parts = _in_process(evaluate_task(path, [r], model) for r in ranges)
    else:
        # hash=False: a content-hashed key is shared by back-to-back calls with the same
        # model, and the release of the previous call's future can drop this call's data.
        shared = client.scatter(model, broadcast=True, hash=False)
        token = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                evaluate_task, path, [r], shared, key=f"evaluate-{i}-{token}", pure=False, retries=2, **placement
            )
            for i, r in enumerate(ranges)
        ]
        parts = _results(client, futures, token)
    metrics = finish_metrics(merge_metrics(parts), _target(model))
    if model.classes is not None:
        metrics["classes"] = list(model.classes)
    return metrics


def predict_task(
    store_path: str,
    row_range: tuple[int, int],
    index: int,
    model: Model,
    out_tmp: str,
    fmt: str,
    proba: bool,
) -> int | TaskFailure:
    """Predict rows ``row_range`` and write them to the temporary output; returns rows written
    (a data error: a :class:`TaskFailure`)."""
    restore_mmap_threshold(_mmap_mb(model))
    try:
        store = open_store(store_path)
        check_memory(model, store, [row_range], "a prediction task")
        outs = [out for out, _ in model_outputs(model, store, [row_range])]
    except PipelineError as exc:
        release_freed_memory()
        return as_task_failure(exc)
    a, b = row_range
    n_out, target, classes = model.spec["n_out"], _target(model), model.classes
    raw = np.concatenate(outs) if outs else np.zeros((0, n_out), np.float64)
    if target is not None:  # as Model.decision de-standardizes
        values = raw.reshape(len(raw), -1) * target["std"] + target["mean"]
        pred: np.ndarray = values[:, 0] if values.shape[1] == 1 else values
    else:
        pred = raw.argmax(axis=1).astype(np.int32)
    labels = None
    if target is None:  # the class labels, as Model.predict gives them (indices without a class list)
        labels = np.asarray(classes, dtype=object)[pred] if classes is not None else pred
    if fmt == "zarr":
        import zarr

        group = zarr.open_group(out_tmp, mode="r+")
        group["prediction"][a:b] = pred if labels is None else labels
        if proba and target is None:
            group["proba"][a:b] = raw
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, Any] = {"row": np.arange(a, b, dtype=np.int64)}
        if target is None and classes is not None:
            cols["prediction"] = pa.array(labels.tolist(), pa.string())
        elif pred.ndim == 2:
            for j in range(pred.shape[1]):
                cols[f"prediction_{j}"] = pred[:, j]
        else:
            cols["prediction"] = pred
        if proba and target is None:
            for j, name in enumerate(classes or range(raw.shape[1])):
                cols[f"proba_{name}"] = raw[:, j]
        table = pa.table(cols).replace_schema_metadata(PARQUET_MARK)  # what --force may replace
        pq.write_table(table, os.path.join(out_tmp, f"part-{index:06d}.parquet"))
        del table, cols
    del outs, raw, pred, labels
    release_freed_memory()
    return b - a


def _predict_on_cluster(
    client: Any,
    model: Model,
    store: Store,
    ranges: list[tuple[int, int]],
    tmp: Path,
    fmt: str,
    proba: bool,
    token: str,
    futures: list[Any],
) -> int:
    """The prediction tasks on the cluster; ``futures`` (the caller's list) gets them, so that a
    failure stops them before the temporary is removed. The rows written."""
    shared = client.scatter(model, broadcast=True, hash=False)
    futures.extend(
        client.submit(
            predict_task,
            for_workers(store.path),
            r,
            i,
            shared,
            for_workers(tmp),
            fmt,
            proba,
            key=f"predict-{i}-{token}",
            pure=False,
            retries=2,
        )
        for i, r in enumerate(ranges)
    )
    return sum(_results(client, futures, token))


def _in_process(results: Iterable[Any]) -> list[Any]:
    """The tasks' results, computed one after the other in this process as ``results`` (a
    generator) is read; the first :class:`TaskFailure` is raised (as on a cluster), and the
    tasks after it are not run."""
    out = []
    for value in results:
        if isinstance(value, TaskFailure):
            raise value.error
        out.append(value)
    return out


def predict_store(
    model: Model,
    store_path: str,
    out: str,
    client: Any,
    *,
    proba: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write predictions for every row of the store to ``out`` (``.zarr`` or ``.parquet``), on the
    cluster of ``client``, or in this process when ``client`` is None."""
    store, fmt = check_inputs(model, store_path, out, proba=proba, force=force)
    dest = Path(out)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    ranges = _chunk_ranges(store)
    target = _target(model)
    clean_stale_outputs(dest)
    token = uuid.uuid4().hex[:8]
    futures: list[Any] = []
    try:
        if fmt == "zarr":
            import zarr

            # the writer's record lets a later prediction remove this temporary if the process dies
            group = zarr.open_group(str(tmp), mode="w", attributes={"writer": writer_marker()})
            chunk = store.chunk_rows
            if target is None:  # labels, as the Parquet output and Model.predict give them
                dtype = str if model.classes is not None else "int32"
                group.create_array("prediction", shape=(store.n_rows,), chunks=(chunk,), dtype=dtype)
                if proba:
                    group.create_array(
                        "proba",
                        shape=(store.n_rows, model.spec["n_out"]),
                        chunks=(chunk, model.spec["n_out"]),
                        dtype="float64",  # Model.predict_proba's numbers, every bit
                    )
            else:
                shape = (store.n_rows,) if model.spec["n_out"] == 1 else (store.n_rows, model.spec["n_out"])
                group.create_array("prediction", shape=shape, chunks=(chunk, *shape[1:]), dtype="float64")
            group.attrs.update(
                {"classes": model.classes, "task": model.task, "source": store.path, "kind": "predictions"}
            )
        else:
            tmp.mkdir(parents=True)
            (tmp / _WRITER_FILE).write_text(json.dumps(writer_marker()))
        if client is None:  # in this process: the same tasks, one after the other
            path = for_workers(store.path)
            rows = sum(_in_process(predict_task(path, r, i, model, str(tmp), fmt, proba) for i, r in enumerate(ranges)))
        else:
            rows = _predict_on_cluster(client, model, store, ranges, tmp, fmt, proba, token, futures)
        if dest.exists() or dest.is_symlink():
            reason = foreign_output_reason(dest)  # it may have changed during the run
            if reason is not None or not force:
                raise PipelineError(
                    f"output {out!r} appeared or changed while predicting; it was left as it is: choose another name"
                )
        if fmt == "zarr":
            import zarr

            zgroup = zarr.open_group(str(tmp), mode="r+")
            del zgroup.attrs["writer"]
        else:
            (tmp / _WRITER_FILE).unlink()
        replace_dir(tmp, dest)
    except BaseException:
        if futures:  # no task may write into the temporary once it is removed
            _stop_tasks(client, futures, token)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"rows": rows, "out": str(dest), "format": fmt}
