"""Same-host transport of the parameter server: deltas and weights through shared memory.

A sync round moves every participant's delta to the parameter server and the new weights back,
a float32 vector each way (2 MB for a 535k-parameter MLP). Over TCP on one machine each vector
is copied into the kernel and out again, and on loopback the sender's ``send`` also does the
receiver's half of TCP: the scheduler's event loop spent more of a round writing the replies
than applying the update, while both workers waited for it. When a worker runs on the
scheduler's host the vectors go through POSIX shared memory instead and the messages carry only
their small metadata:

* the parameter server creates, per job, one **weights segment** holding the weights of the
  current version (written once per round, read by every participant of the host), and per
  participant one **push segment** the participant writes its delta into before it pushes;
* a participant asks for them when it joins (``shm=True``) and attaches both by name; only a
  process that sees the scheduler's ``/dev/shm`` can, and the 8-byte nonce in each segment's
  header, sent in the join reply, proves it attached the server's own segments (a worker on
  another host falls back to TCP: nothing else changes);
* every segment is the server's: created with its pages reserved (``posix_fallocate``, so a
  full ``/dev/shm`` is a refusal at creation, never a ``SIGBUS`` later), unlinked when its
  participant leaves or the job closes, and cleaned by Python's resource tracker if the
  scheduler dies; a participant never creates or unlinks one. A server killed together with
  its resource tracker (its process group SIGKILLed) leaves its segments: their names carry
  the PID namespace and the creating process, and the next parameter server to create a
  segment on the host unlinks those whose creator is gone (:func:`sweep_stale`). A job's
  segments take at most a quarter of ``/dev/shm`` (:func:`budget`; a tmpfs is RAM): past that,
  participants use TCP.

The weights segment is a seqlock: the writer makes the sequence odd, copies, records the
version, makes it even; a reader copies and checks that the sequence did not move, is even, and
that the version is the one its reply names, else it pulls the weights over TCP. In sync mode
the weights cannot change before every participant of the round has pushed again, so the check
never fails there; it guards against misuse. The vectors are raw float32 like the wire's frames:
nothing is unpickled. Header (64 bytes): magic, nonce, sequence, version, length (int64 each).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from multiprocessing import shared_memory
from typing import Any

import numpy as np

logger = logging.getLogger("pipeline.ps")

HEADER = 64  # bytes before the vector (cache-line aligned data)
_MAGIC = 0x314D48535350504E  # b"NPPSSHM1" as little-endian int64
_MAGIC_AT, _NONCE_AT, _SEQ_AT, _VERSION_AT, _LENGTH_AT = range(5)


SHM_DIR = "/dev/shm"
# a segment's name: pps-<PID namespace>-<pid of the server that created it>-<random>, all hex
# (at most 31 characters, the shortest limit among POSIX systems); elsewhere pps-<random>
_OWNED = re.compile(r"^pps-([0-9a-f]{1,8})-([0-9a-f]{1,8})-[0-9a-f]{8}$")


def _pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid, hex); '' where there is none."""
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino & 0xFFFFFFFF, "x")
    except OSError:
        return ""


def _name() -> str:
    ns = _pid_namespace()
    if ns:
        return f"pps-{ns}-{os.getpid() & 0xFFFFFFFF:x}-{secrets.token_hex(4)}"
    return f"pps-{secrets.token_hex(8)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


_SWEPT = False


def sweep_stale() -> int:
    """Unlink the segments that parameter servers of this host left when they died together
    with their resource tracker (a process group killed at once with SIGKILL: nothing ran to
    unlink them, and ``/dev/shm`` is RAM). Only segments named by this code, in this PID
    namespace, whose creating process is gone; once per process (the first segment it creates
    runs it). Returns how many were removed."""
    global _SWEPT
    if _SWEPT:
        return 0
    _SWEPT = True
    ns = _pid_namespace()
    try:
        names = os.listdir(SHM_DIR) if ns else []
    except OSError:
        return 0
    removed = 0
    for name in names:
        m = _OWNED.match(name)
        if m is None or m.group(1) != ns:
            continue
        pid = int(m.group(2), 16)
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d shared-memory segment(s) left by parameter servers that died", removed)
    return removed


class Segment:
    """A float32 vector of ``n`` in a shared-memory segment, created (``name=None``) by the
    parameter server or attached by a participant (``name``, ``nonce``: from the join reply).

    Creation reserves the pages; it raises :class:`OSError` when ``/dev/shm`` cannot hold them
    (the caller then uses TCP). Attaching raises :class:`OSError` (no such segment: another
    host) or :class:`ValueError` (not the server's segment, or not ``n`` floats)."""

    def __init__(self, n: int, name: str | None = None, nonce: int | None = None) -> None:
        self.n = int(n)
        size = HEADER + 4 * self.n
        self.owner = name is None
        if self.owner:
            shm = shared_memory.SharedMemory(name=_name(), create=True, size=size)
            try:
                fd = getattr(shm, "_fd", -1)
                if fd >= 0 and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS on a write
            except OSError:
                shm.close()
                shm.unlink()
                raise
        else:
            shm = _attach(str(name))
        self.shm = shm
        self.name = shm.name
        self.head = np.ndarray((HEADER // 8,), np.int64, buffer=shm.buf)
        if shm.size < size:
            self.close()
            raise ValueError(f"shared-memory segment {name} holds {shm.size} bytes, expected {size}")
        self.data = np.ndarray((self.n,), np.float32, buffer=shm.buf, offset=HEADER)
        if self.owner:
            self.nonce = int.from_bytes(secrets.token_bytes(8), "little") >> 1
            self.head[:] = 0
            self.head[_MAGIC_AT], self.head[_NONCE_AT] = _MAGIC, self.nonce
            self.head[_VERSION_AT], self.head[_LENGTH_AT] = -1, self.n
        else:
            self.nonce = int(nonce) if nonce is not None else -1
            ok = (
                int(self.head[_MAGIC_AT]) == _MAGIC
                and int(self.head[_NONCE_AT]) == self.nonce
                and int(self.head[_LENGTH_AT]) == self.n
            )
            if not ok:
                self.close()
                raise ValueError(f"shared-memory segment {name} is not the parameter server's")

    @property
    def version(self) -> int:
        """The version of the weights held (weights segment); -1 before the first write."""
        return int(self.head[_VERSION_AT])

    def write(self, vec: np.ndarray, version: int = -1) -> None:
        """Copy ``vec`` in, recording ``version``, under the sequence lock."""
        seq = int(self.head[_SEQ_AT])
        self.head[_SEQ_AT] = seq + 1
        self.data[:] = vec
        self.head[_VERSION_AT] = int(version)
        self.head[_SEQ_AT] = seq + 2

    def read(self, version: int) -> np.ndarray | None:
        """A copy of the vector if it holds ``version`` and no write overlapped the copy, else None."""
        seq = int(self.head[_SEQ_AT])
        if seq % 2 or int(self.head[_VERSION_AT]) != version:
            return None
        out = self.data.copy()
        if int(self.head[_SEQ_AT]) != seq or int(self.head[_VERSION_AT]) != version:
            return None
        return out

    def describe(self) -> dict[str, Any]:
        """What a participant needs to attach: name and nonce."""
        return {"name": self.name, "nonce": self.nonce}

    def close(self) -> None:
        """Unmap (and, the server's, unlink) the segment; safe to call twice."""
        shm, self.shm = getattr(self, "shm", None), None
        if shm is None:
            return
        self.head = self.data = None  # type: ignore[assignment]  # the buffer's exports go first
        try:
            shm.close()
        except BufferError:  # pragma: no cover - a view escaped; the mapping goes with it
            logger.debug("shared-memory segment %s still has views", shm.name)
        if self.owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class _Mapped:
    """An existing POSIX segment mapped without Python's resource tracker: attaching through
    :class:`~multiprocessing.shared_memory.SharedMemory` registers the segment with the
    tracker, which Dask's local workers share with the process that started them (often the
    scheduler's), so taking that back would also take back the server's own registration."""

    def __init__(self, name: str) -> None:
        import _posixshmem  # POSIX only (Linux, macOS)
        import mmap

        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.buf: memoryview | None = memoryview(self._mmap)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            self._mmap.close()


def _attach(name: str) -> Any:
    """Attach the server's segment ``name`` (never registered here: it is the server's to unlink)."""
    if not name.startswith("pps-") or not all(c.isalnum() or c == "-" for c in name):
        raise ValueError(f"{name!r} is not a parameter-server segment name")
    try:
        return _Mapped(name)
    except ImportError:  # pragma: no cover - no POSIX shared memory (Windows): no tracker either
        return shared_memory.SharedMemory(name=name, create=False)


BUDGET_SHARE = 0.25  # of /dev/shm's size, what one job's segments may take together


def budget() -> int:
    """Bytes one job's segments may take: a quarter of ``/dev/shm`` (a tmpfs is RAM; its default
    size is half of it); 0 where it cannot be read."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return int(BUDGET_SHARE * st.f_blocks * st.f_frsize)


def create(n: int, in_use: int = 0) -> Segment | None:
    """A server segment of ``n`` floats, or None (logged) when shared memory is unavailable or the
    job's segments (``in_use`` bytes) would exceed :func:`budget` with it: that participant uses TCP."""
    if in_use + HEADER + 4 * int(n) > budget():
        logger.info("shared memory budget of %d bytes reached; using TCP", budget())
        return None
    sweep_stale()
    try:
        return Segment(n)
    except (OSError, ValueError) as exc:
        logger.info("shared memory unavailable for %d floats (%s); using TCP", n, exc)
        return None


def attach(info: Any, n: int) -> Segment | None:
    """The participant's side: the server's segment described by ``info`` (``describe()``), or
    None when it cannot be attached here (another host, another container)."""
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not isinstance(info.get("nonce"), int):
        return None
    try:
        return Segment(n, info["name"], info["nonce"])
    except (OSError, ValueError) as exc:
        logger.debug("cannot attach shared memory %s (%s); using TCP", info.get("name"), exc)
        return None
