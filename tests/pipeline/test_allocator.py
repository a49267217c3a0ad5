"""Workers get glibc's mmap threshold back: fresh multi-MB arrays come from the heap again."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from pipeline.allocator import needs_restoring, restore_mmap_threshold

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):
        return False


needs_glibc = pytest.mark.skipif(not _glibc(), reason="the mmap threshold is a glibc malloc setting")


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _libc() -> ctypes.CDLL:
    """This process's glibc with ``malloc``, ``free`` and ``mallinfo2`` typed."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def new_mmaps(nbytes: int = 2 << 20) -> int:
    """How many new mmapped blocks one ``malloc(nbytes)`` makes in this process (glibc)."""
    libc = _libc()
    before = libc.mallinfo2().hblks
    ptr = libc.malloc(nbytes)
    after = libc.mallinfo2().hblks
    libc.free(ptr)
    return int(after - before)


def kept_at_top(nbytes: int = 4 << 20) -> int:
    """Bytes the heap keeps at its top after one ``malloc(nbytes)`` is freed (glibc's
    ``keepcost``): what the next allocation reuses without faulting pages in again."""
    libc = _libc()
    libc.free(libc.malloc(nbytes))
    return int(libc.mallinfo2().keepcost)


def worker_allocator() -> dict:
    return {"trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "new_mmaps": new_mmaps()}


def test_needs_restoring_only_when_a_tunable_fixed_the_threshold():
    assert needs_restoring({"MALLOC_TRIM_THRESHOLD_": "65536"})  # what a Dask nanny sets
    assert needs_restoring({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"})
    assert needs_restoring({"MALLOC_TOP_PAD_": "0"})
    assert not needs_restoring({})  # glibc's dynamic threshold is still on
    assert not needs_restoring({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "131072"})  # chosen
    assert not needs_restoring({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0:glibc.malloc.mmap_threshold=1"})


def test_out_of_range_threshold_is_refused():
    with pytest.raises(ValueError, match=r"mmap_threshold_mb must be in \[0, 32\]"):
        restore_mmap_threshold(33)


def _run(code: str, **env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**full, **env}, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@needs_glibc
def test_restoring_moves_multi_megabyte_blocks_back_to_the_heap():
    code = (
        "from tests.pipeline.test_allocator import new_mmaps\n"
        "from pipeline.allocator import restore_mmap_threshold as r\n"
        "print(new_mmaps(), new_mmaps(), r(0), r(), new_mmaps(), r())\n"
    )
    # trim threshold fixed (a nanny's worker): every 2 MiB block is an mmap until restored
    assert _run(code, MALLOC_TRIM_THRESHOLD_="65536") == ["1", "1", "False", "True", "0", "True"]
    # a process with glibc's dynamic threshold is left alone
    assert _run(code)[2:4] == ["False", "False"]


@needs_glibc
def test_restoring_keeps_freed_blocks_at_the_heap_top_for_the_next_allocation():
    """With only the mmap threshold raised, the nanny's 64 KiB trim threshold hands each freed
    block at the heap's top back to the OS (its pages fault in again next time); restoring
    raises the trim threshold too, so a freed 4 MiB block stays for the next allocation."""
    only_mmap = (
        "import ctypes\n"
        "from tests.pipeline.test_allocator import kept_at_top\n"
        "ctypes.CDLL(None).mallopt(-3, 32 << 20)\n"
        "print(kept_at_top() >= 4 << 20)\n"
    )
    restored = (
        "from tests.pipeline.test_allocator import kept_at_top\n"
        "from pipeline.allocator import restore_mmap_threshold\n"
        "print(restore_mmap_threshold(), kept_at_top() >= 4 << 20)\n"
    )
    assert _run(only_mmap, MALLOC_TRIM_THRESHOLD_="65536") == ["False"]
    assert _run(restored, MALLOC_TRIM_THRESHOLD_="65536") == ["True", "True"]


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc/self/environ")
def test_the_environment_that_counts_is_the_one_the_process_started_with():
    # a nanny puts MALLOC_TRIM_THRESHOLD_ into its *parent's* os.environ: the driver's malloc
    # never saw it, so the driver (and a LocalCluster scheduler living in it) is left alone
    code = (
        "import os\n"
        "os.environ['MALLOC_TRIM_THRESHOLD_'] = '65536'\n"
        "from pipeline.allocator import needs_restoring, startup_environ\n"
        "print(needs_restoring(), 'MALLOC_TRIM_THRESHOLD_' in startup_environ())\n"
    )
    assert _run(code) == ["False", "False"]
    assert _run(code, MALLOC_TRIM_THRESHOLD_="65536") == ["True", "True"]


@needs_glibc
def test_a_nanny_s_worker_allocates_from_the_heap_after_training(letter_stores, tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.connect import cluster_client
    from pipeline.train import train

    with cluster_client(workers=1, threads_per_worker=1, dashboard_address=None) as c:
        (before,) = c.run(worker_allocator).values()
        assert before == {"trim": "65536", "new_mmaps": 1}  # the nanny fixed the trim threshold
        cfg = TrainConfig(epochs=1, patience=0, hidden=[8], mmap_threshold_mb=0)
        train(letter_stores[0], cfg, tmp_path / "alone", client=c)
        (left_alone,) = c.run(worker_allocator).values()
        assert left_alone == before  # 0: the allocator is left as the nanny set it
        train(letter_stores[0], cfg.with_overrides(["mmap_threshold_mb=32"]), tmp_path / "run", client=c)
        (after,) = c.run(worker_allocator).values()
        assert after == {"trim": "65536", "new_mmaps": 0}


def _scheduler_mmaps(tmp_path, **env: str) -> int:
    """New mmapped blocks per malloc(2 MiB) in a real `dask scheduler --preload pipeline.ps`."""
    from distributed import Client

    from tests.processes import ROOT, Procs, child_env

    clean = {k: v for k, v in child_env().items() if not k.startswith("MALLOC_")}
    procs = Procs(tmp_path / "scheduler", env={**clean, "PYTHONPATH": str(ROOT)}, grace=0)
    try:
        _, address = procs.scheduler(dashboard=False, **env)
        with Client(address, timeout=60) as c:
            assert c.run_on_scheduler(lambda dask_scheduler: "pipeline_ps" in dask_scheduler.extensions)
            return int(c.run_on_scheduler(new_mmaps))
    finally:
        procs.close()


@needs_glibc
def test_the_parameter_server_restores_its_scheduler_s_threshold(tmp_path):
    assert _scheduler_mmaps(tmp_path, MALLOC_TRIM_THRESHOLD_="65536") == 0
    # a threshold chosen in the scheduler's environment is kept
    assert _scheduler_mmaps(tmp_path, MALLOC_TRIM_THRESHOLD_="65536", MALLOC_MMAP_THRESHOLD_="131072") == 1
