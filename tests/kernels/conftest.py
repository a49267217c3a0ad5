"""Fixtures for the kernel tests.

The CUDA simulator runs every thread as a Python thread and busy-waits at ``syncthreads`` while
holding the GIL; a short GIL switch interval makes simulated kernels several times faster.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fast_simulator(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
