"""Test-session setup shared by every test module.

The CUDA backend is exercised through Numba's CUDA simulator on machines without a GPU; the
simulator must be switched on before numba is first imported, hence here at the very top.
Set NUMBA_ENABLE_CUDASIM=0 to run the CUDA tests on a real GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
