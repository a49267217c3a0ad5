"""Checkpoints and model files: one ``.npz`` file, written atomically, verified on load.

A file holds named float arrays and a JSON metadata record (kind, format version, checksum).
It is written to a temporary file beside its destination, flushed to disk and renamed over it,
so a crash mid-write leaves the previous file intact. The metadata carries a SHA-256 of every
array; a file whose content does not match is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CheckpointError

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
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    if _META in arrays:
        raise ValueError(f"array name {_META!r} is reserved")
    record = dict(meta)
    record.update(kind=kind, format_version=FORMAT_VERSION, sha256=_digest(arrays))
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sample
    return True


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
            raise CheckpointError(
                f"{str(path)!r} is not a {kind} file of this project ({what}); pass the run "
                f"directory or the {'model.npz' if kind == 'model' else 'checkpoint.npz'} it holds"
            )
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if "allow_pickle" in str(exc):
            raise CheckpointError(
                f"{kind} file {str(path)!r} holds pickled Python objects, which are never loaded; "
                f"it is not a {kind} of this project"
            ) from None
        raise CheckpointError(f"{kind} file {str(path)!r} is unreadable or truncated ({exc})") from None
    raw = arrays.pop(_META, None)
    if raw is None:
        raise CheckpointError(f"{str(path)!r} is not a {kind} file of this project (no metadata)")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{kind} file {str(path)!r} has corrupted metadata") from None
    if meta.get("kind") != kind:
        raise CheckpointError(f"{str(path)!r} holds a {meta.get('kind')!r}, not a {kind}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{kind} file {str(path)!r} has format version {version!r}; this version of the "
            f"project reads up to {FORMAT_VERSION}: upgrade the project to load it"
        )
    if meta.get("sha256") != _digest(arrays):
        raise CheckpointError(
            f"{kind} file {str(path)!r} failed its checksum (corrupted); use an earlier checkpoint"
        )
    return arrays, meta
