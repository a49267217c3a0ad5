"""Checkpoints and model files: one ``.npz`` file, written atomically, verified on load.

A file holds named float arrays and a JSON metadata record (kind, format version, checksum).
It is written to a temporary file beside its destination, flushed to disk and renamed over it,
so a crash mid-write leaves the previous file intact. The metadata carries a SHA-256 of every
array; a file whose content does not match is refused.

A training checkpoint (:func:`write_checkpoint`, :func:`read_checkpoint`) holds these arrays:

    params          the server's weights
    best_params     the weights of the best validation epoch so far
    opt_NAME        the server optimizer's buffers (``m``, ``v``, ``average``, ...)
    localI_J        sync shares' local optimizer buffers, named in ``local_states``
    bufferI         asynchronous federated runs (FedBuff): the deltas buffered since the
                    server's last step, in arrival order
    reply_view      runs with ``compress_replies``: the weights the participants hold

and these meta keys: ``job``, ``epoch`` (the epoch running or next to run), ``version`` (the
server's round), ``optimizer_t``, ``local_states`` (slot -> ``t``, ``lr`` and ``arrays``: buffer
name -> array name), ``progress`` (task -> pushes done), ``done_tasks`` (tasks of ``epoch``
finished), ``done_results`` (what those tasks trained: task -> ``samples``, ``trained``, ``loss``;
absent when none is), ``history``, ``best_loss`` (1e300 for none), ``best_epoch`` (-1 for none),
``privacy`` (the privacy spent: ``rounds`` accounted, ``clip``, ``epsilon``; absent without
DP), ``buffer`` (the buffered deltas' ``samples``, ``losses`` and ``staleness``; absent when
nothing is buffered), ``rounds`` (the server's rounds so far, each ``[time, version, loss,
samples, deltas]`` as in history.json, at most :data:`ROUNDS_KEPT` rows: :func:`kept_rounds`),
``pushes`` and ``summed`` (a cluster's server: the deltas it received and those summed into
another's push, so far), ``cluster`` (the cluster options the run was given, for the resume
command its hints print: :func:`pipeline.train.resume_command`), ``config``, ``store``,
``spec``, ``n_threads``, ``in_process`` and ``time``. Format version 1; a reader of a later
version reads every file an earlier one wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CheckpointError
from pipeline.files import new_file_mode, remove_stale_temporaries, writer_tag
from pipeline.jobview import coarse_history
from pipeline.runstate import BestModel, RunState

FORMAT_VERSION = 1
_META = "__meta__"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def save_file(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temp file + fsync + rename); the
    temporaries of ``path`` that killed writers left are removed."""
    path = Path(path)
    if _META in arrays:
        raise ValueError(f"array name {_META!r} is reserved")
    record = dict(meta)
    record.update(kind=kind, format_version=FORMAT_VERSION, sha256=_digest(arrays))
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _not_written(path, kind, exc) from None
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _not_written(path, kind, exc) from None
        raise
    return path


def _not_written(path: Path, kind: str, exc: OSError) -> CheckpointError:
    """The one-line error of a write of ``path`` that failed (a full disk, a file size limit, a
    directory made read-only): the file there before, if any, is whole and kept (the write went
    to a temporary, removed). A run stopped by it resumes from the checkpoint kept."""
    why = exc.strerror or type(exc).__name__
    if path.is_file():
        kept = f"the {kind} written before is kept"
        again = "then continue the run with --resume" if kind == "checkpoint" else "and write it again"
    else:
        kept, again = "nothing was written", "and try again"
    return CheckpointError(
        f"cannot write {kind} file {str(path)!r} ({why}); {kept}: free space on its disk or make "
        f"{str(path.parent)!r} writable, {again}"
    )


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sample
    return True


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata record of a file :func:`save_file` wrote, read without its arrays and without
    checking their checksum (a damaged file of this program is still this program's); None when
    ``path`` is no such file."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{_META}.npy") as fh:
            raw = np.lib.format.read_array(fh, allow_pickle=False)
        meta = json.loads(raw.tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        return None
    return meta if isinstance(meta.get("sha256"), str) else None


class UnreadableFileError(CheckpointError):
    """A file at a checkpoint's or model's path that is not a whole one of this program
    (truncated, damaged, another file): ``problem`` says which, without the fix the message
    ends with for one loaded by its path; resuming a run names its own fix (pipeline.train)."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


def load_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_file`; refuse a wrong kind, version or checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file {str(path)!r} not found")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if not data.startswith(b"PK"):  # not a zip: np.load would take it for a pickle
            what = "a text file" if _looks_like_text(data) else "not a NumPy .npz archive"
            problem = f"{str(path)!r} is not a {kind} file of this project ({what})"
            raise UnreadableFileError(
                f"{problem}; pass the run directory or the {'model.npz' if kind == 'model' else 'checkpoint.npz'} "
                "it holds",
                problem,
            )
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if "allow_pickle" in str(exc):
            raise UnreadableFileError(
                f"{kind} file {str(path)!r} holds pickled Python objects, which are never loaded; "
                f"it is not a {kind} of this project"
            ) from None
        raise UnreadableFileError(f"{kind} file {str(path)!r} is unreadable or truncated ({exc})") from None
    raw = arrays.pop(_META, None)
    if raw is None:
        raise UnreadableFileError(f"{str(path)!r} is not a {kind} file of this project (no metadata)")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnreadableFileError(f"{kind} file {str(path)!r} has corrupted metadata") from None
    if not isinstance(meta, dict):  # valid JSON, but not the record this project writes
        raise UnreadableFileError(f"{kind} file {str(path)!r} has corrupted metadata")
    if meta.get("kind") != kind:
        raise UnreadableFileError(f"{str(path)!r} holds a {meta.get('kind')!r}, not a {kind}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{kind} file {str(path)!r} has format version {version!r}; this version of the "
            f"project reads up to {FORMAT_VERSION}: upgrade the project to load it"
        )
    if meta.get("sha256") != _digest(arrays):
        problem = f"{kind} file {str(path)!r} failed its checksum (corrupted)"
        raise UnreadableFileError(f"{problem}; use an earlier checkpoint", problem)
    return arrays, meta


# --------------------------------------------------------------------------------------------
# Training checkpoints: the layout above
# --------------------------------------------------------------------------------------------

NO_BEST_LOSS = 1e300  # ``best_loss`` of a run without a best epoch (JSON has no infinity)
ROUNDS_KEPT = 20_000  # per-round rows a checkpoint and history.json keep (kept_rounds)


def kept_rounds(rows: Sequence[Sequence[Any]], most: int | None = None) -> list[list]:
    """The per-round rows ``rows`` (``time, version, loss, samples, deltas``, in version order)
    that a checkpoint and history.json keep: every one up to ``most`` (None: :data:`ROUNDS_KEPT`);
    beyond, the newest ``most // 2`` whole and the older ones merged into the other half
    (:func:`pipeline.jobview.coarse_history`: the run's first round, its samples, deltas and
    their rate over time stay). A run resumed many times, or one of millions of rounds, then
    keeps a checkpoint, a write time and a history.json of bounded size (the per-epoch records
    are kept whole: resuming, the best epoch and the privacy spent read those)."""
    rows, most = list(rows), ROUNDS_KEPT if most is None else most
    if len(rows) <= most:
        return [list(r) for r in rows]
    recent = most // 2
    return [*coarse_history(rows[:-recent], most - recent), *(list(r) for r in rows[-recent:])]


@dataclass
class Checkpoint:
    """A training checkpoint read back: the run's state and the parameter server's."""

    run: RunState
    params: np.ndarray
    version: int
    optimizer_state: dict[str, Any]  # {"t": int, "buffers": {name: array}}
    local_states: dict[str, dict] = field(default_factory=dict)  # slot -> {"t", "lr", "buffers"}
    progress: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # every meta key, as written
    # FedBuff: the buffered deltas, as the parameter server's ``state()["buffer"]`` (None: none)
    buffer: dict[str, list] | None = None
    reply_view: np.ndarray | None = None  # compress_replies: the participants' weights
    rounds: list[list] | None = None  # the server's rounds so far (None: not kept, an older checkpoint)

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config") or {}

    @property
    def spec(self) -> Any:
        return self.meta.get("spec")


def _json_safe(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def write_checkpoint(path: str | os.PathLike, run: RunState, server: dict[str, Any], **meta: Any) -> Path:
    """Write ``run`` and the parameter server's ``server`` state (as ``ParameterServer.state``
    returns it) to ``path``; ``meta`` adds keys (``config``, ``store``, ``spec``, ``in_process``)."""
    params = server["params"]
    arrays = {
        "params": params,
        "best_params": params if run.best.params is None else run.best.params,
    }
    for k, v in server["optimizer_state"]["buffers"].items():
        arrays[f"opt_{k}"] = v
    # sync shares' local optimizer states: slot -> t, lr and the names of its arrays
    local_meta: dict[str, dict] = {}
    for i, (slot, loc) in enumerate(sorted(server.get("local_states", {}).items())):
        names = {}
        for j, (k, v) in enumerate(sorted(loc["buffers"].items())):
            names[k] = f"local{i}_{j}"
            arrays[names[k]] = v
        local_meta[slot] = {"t": loc["t"], "lr": loc.get("lr"), "arrays": names}
    # FedBuff: the deltas buffered since the last server step (a resumed run steps with them)
    buffer = server.get("buffer") or {}
    for i, d in enumerate(buffer.get("deltas") or ()):
        arrays[f"buffer{i}"] = np.asarray(d, dtype=np.float32)
    buffered = (
        {"buffer": {k: list(buffer[k]) for k in ("samples", "losses", "staleness")}} if buffer.get("deltas") else {}
    )
    if server.get("reply_view") is not None:
        arrays["reply_view"] = np.asarray(server["reply_view"], dtype=np.float32)
    # the privacy spent (rounds accounted, adaptive clipping's clip): a resumed run goes on from it
    privacy = server.get("privacy") or {}
    private = privacy.get("dp", "off") != "off" or privacy.get("secure_aggregation")
    record = {
        **({"privacy": privacy} if private else {}),
        **buffered,
        # the server's rounds so far (a resumed run's history.json holds them)
        **({"rounds": kept_rounds(server["rounds"])} if server.get("rounds") else {}),
        # a cluster's server: the deltas it received and those summed into another's push, so far
        **({k: int(server[k]) for k in ("pushes", "summed") if k in server}),
        "job": run.job,
        "epoch": run.epoch,
        "version": server["version"],
        "optimizer_t": server["optimizer_state"]["t"],
        "local_states": local_meta,
        "progress": server.get("progress", {}),
        "done_tasks": sorted(run.done_tasks),
        # what the finished tasks of ``epoch`` trained: an epoch resumed after them records their rows
        **({"done_results": {k: run.done_results[k] for k in sorted(run.done_results)}} if run.done_results else {}),
        "history": run.history,
        "best_loss": run.best.loss if math.isfinite(run.best.loss) else NO_BEST_LOSS,
        "best_epoch": run.best.epoch,
        **meta,
        "n_threads": run.n_threads,
        "time": time.time(),
    }
    return save_file(path, "checkpoint", arrays, json.loads(json.dumps(record, default=_json_safe)))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`write_checkpoint` (any format version up to this one)."""
    arrays, meta = load_file(path, "checkpoint")
    try:
        local_states = {
            slot: {
                "t": int(loc["t"]),
                "lr": loc.get("lr"),
                "buffers": {k: arrays[a] for k, a in loc["arrays"].items()},
            }
            for slot, loc in (meta.get("local_states") or {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a malformed local optimizer state; resume from an earlier checkpoint"
        ) from None
    try:
        buf = meta.get("buffer")
        buffer = None
        if buf is not None:
            n = len(buf["samples"])
            if n != len(buf["losses"]) or n != len(buf["staleness"]):
                raise ValueError("buffer lists of different lengths")
            buffer = {
                "deltas": [arrays[f"buffer{i}"] for i in range(n)],
                "samples": [int(x) for x in buf["samples"]],
                "losses": [float(x) for x in buf["losses"]],
                "staleness": [int(x) for x in buf["staleness"]],
            }
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has malformed buffered deltas; resume from an earlier checkpoint"
        ) from None
    try:
        params = arrays["params"]
        best_loss = float(meta["best_loss"])
        run = RunState(
            job=str(meta["job"]),
            epoch=int(meta["epoch"]),
            history=list(meta["history"]),
            done_tasks=set(meta.get("done_tasks", [])),
            done_results={
                str(k): {"samples": int(v["samples"]), "trained": int(v["trained"]), "loss": float(v["loss"])}
                for k, v in (meta.get("done_results") or {}).items()
            },
            best=BestModel(
                math.inf if best_loss >= NO_BEST_LOSS else best_loss,
                arrays.get("best_params", params),
                int(meta["best_epoch"]),
            ),
            n_threads=int(meta.get("n_threads", 0)),
        )
        version = int(meta["version"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks part of a run's state; resume from an earlier checkpoint"
        ) from None
    rounds = meta.get("rounds")
    if rounds is not None and not (
        isinstance(rounds, list)
        and all(isinstance(r, list) and len(r) == 5 and all(isinstance(x, int | float) for x in r) for r in rounds)
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a malformed round history; resume from an earlier checkpoint"
        )
    return Checkpoint(
        run=run,
        params=params,
        version=version,
        optimizer_state={
            "t": int(meta.get("optimizer_t", 0)),
            "buffers": {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")},
        },
        local_states=local_states,
        progress=meta.get("progress") or {},
        meta=meta,
        buffer=buffer,
        reply_view=arrays.get("reply_view"),
        rounds=rounds,
    )
