"""Test-only worker preload: ``dask worker --preload slowpatch`` makes this worker slow.

Every minibatch step of :class:`kernels.mlp.MLPTrainer` sleeps ``FAULTS_SLOW_STEP`` seconds
(read from the worker's environment) before computing. Only worker processes started with this
preload are affected; production code paths are untouched.
"""

from __future__ import annotations

import os
import time


def dask_setup(worker) -> None:
    delay = float(os.environ.get("FAULTS_SLOW_STEP", "0.05"))
    from kernels import mlp

    original = mlp.MLPTrainer.step
    if getattr(original, "_faults_slow", False):
        return

    def slow_step(self, *args, **kwargs):
        time.sleep(delay)
        return original(self, *args, **kwargs)

    slow_step._faults_slow = True
    mlp.MLPTrainer.step = slow_step
